"""The layer benchmark's plumbing (not its speed): options, JSON shape, the HF side's weight check."""

import json
import subprocess
import sys

import pytest

from moekit import bench


def test_small_run_reports_every_field():
    report = bench.run_layer_benchmark(tokens=64, repeats=1, shapes=[(32, 16, 4, 2)], memory=False)
    shape = report["shapes"][0]
    assert shape["dense_hidden"] == 32
    for side in ("moe", "dense"):
        assert shape[side]["fwd_ms"] > 0 and shape[side]["fwd_bwd_ms"] >= shape[side]["fwd_ms"]
    assert shape["moe_vs_dense"]["fwd_bwd"] > 0
    assert json.loads(json.dumps(report)) == report


def test_hf_side_is_verified_against_moekit():
    pytest.importorskip("transformers")
    report = bench.run_layer_benchmark(tokens=32, repeats=1, shapes=[(32, 16, 4, 2)], memory=False, hf=True)
    notes = report["shapes"][0]["hf_notes"]
    assert "verified" in notes["hf_eager"], notes


def test_memory_probe_in_a_fresh_process():
    probe = bench.measure_memory("moe", bench.Shape(32, 16, 4, 2), 64, "fp32", 0)
    assert probe["peak_step_mb"] >= 0 and probe["memory_method"] in bench.MEMORY_METHODS


@pytest.mark.parametrize("args,message", [
    (["--shapes", "1,2,3"], "4 integers"),
    (["--shapes", "32,16,4,8"], "top_k"),
    (["--tokens", "0"], "--tokens"),
    (["--dtype", "fp8"], "--dtype"),
])
def test_bad_options_are_one_line_errors(args, message):
    res = subprocess.run([sys.executable, "-m", "moekit", "bench", "layer", *args], capture_output=True, text=True)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


def test_train_benchmark_runs_both_libraries_on_the_same_weights(monkeypatch):
    """A miniature of `moekit bench train`: the first step's losses agree (same weights, same maths)."""
    pytest.importorskip("transformers")
    from moekit import bench_train

    monkeypatch.setattr(bench_train, "D", 32)
    monkeypatch.setattr(bench_train, "LAYERS", 1)
    monkeypatch.setattr(bench_train, "VOCAB", 64)
    r = bench_train.bench_train_shape(4, 2, 16, batch=2, seq=8, repeats=1, seed=0)
    assert r["first_loss_max_diff"] < 1e-5
    assert set(r["step_s"]) == {"moekit", "transformers_eager", "transformers_grouped_mm"}
    assert all(v > 0 for v in r["moekit_vs"].values())
