"""The layer benchmark's plumbing (not its speed): options, JSON shape, the HF side's weight check."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moekit import bench


def test_small_run_reports_every_field():
    report = bench.run_layer_benchmark(tokens=64, repeats=1, shapes=[(32, 16, 4, 2)], memory=False)
    assert report["process"] == "a fresh interpreter per shape"
    shape = report["shapes"][0]
    assert shape["dense_hidden"] == 32
    assert shape["moe_expert_impl"] in ("native", "loop")  # which CPU path was timed
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
    probe = bench.measure_memory("moe", bench.Shape(64, 64, 4, 2), 64, "fp32", 0)
    assert probe["peak_step_mb"] >= 0 and probe["memory_method"] in bench.MEMORY_METHODS
    # w_in [4, 128, 64] + w_out [4, 64, 64] + router [4, 64], fp32
    assert probe["param_grads_mb"] == round((4 * 128 * 64 + 4 * 64 * 64 + 4 * 64) * 4 / 2**20, 1) == 0.2


def test_memory_probe_warms_up_before_its_baseline(monkeypatch):
    """The same step once first (every kernel built), and its parameter gradients freed before the
    baseline (freed during the measured step, their memory would be reused by it)."""
    steps, sides, grads_at_baseline = [], [], []
    real_step, real_build, real_reset = bench.train_step, bench.build_side, bench._reset_peak_rss
    monkeypatch.setattr(bench, "train_step", lambda side, x, *a: steps.append(x.shape[0]) or real_step(side, x, *a))
    monkeypatch.setattr(bench, "build_side", lambda *a: sides.append(real_build(*a)) or sides[-1])

    def reset():
        grads_at_baseline.append([p.grad is not None for p in sides[0].module.parameters()])
        return real_reset()

    monkeypatch.setattr(bench, "_reset_peak_rss", reset)
    probe = bench.probe_memory("dense", bench.Shape(128, 256, 4, 2), 300, "fp32", 0)
    assert steps == [300, 300] and probe["param_grads_mb"] > 0
    assert grads_at_baseline and not any(grads_at_baseline[0])


def test_memory_probe_counts_no_lazy_import():
    """The step's peak must be the step's: what a first step imports lazily (torch._dynamo, sympy) the
    probe's unmeasured warm-up step imports; a second step at another size must import nothing."""
    code = ("import sys; from moekit import bench; s = bench.Shape(32, 16, 4, 2); "
            "side = bench.build_side('moe', s, 0); w = bench.make_input(64, s, 1); "
            "bench.train_step(side, w, bench.cotangents(w), 'fp32'); x = bench.make_input(256, s, 0); "
            "before = set(sys.modules); bench.train_step(side, x, bench.cotangents(x), 'fp32'); "
            "print(sorted(set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


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


def test_suite_summary_and_markdown():
    """`moekit bench suite` plumbing on a tiny layer run and stand-in train/generate/scaling reports."""
    from moekit import bench_suite

    runs = [bench.run_layer_benchmark(tokens=32, repeats=1, shapes=[(32, 16, 8, 2)], memory=False,
                                      fresh_process=False)]
    assert runs[0]["process"] == "this process, shapes one after the other"
    rows = bench_suite.layer_rows(runs)
    assert rows[0]["routing"] == "E8 k2 F16" and rows[0]["target"] == bench.SPEED_TARGETS[(8, 2)]
    hf_run = {"shapes": [{**runs[0]["shapes"][0], "moe_vs_hf_eager": {"fwd_bwd": 9.9}}]}
    paired = bench_suite.layer_rows(runs, [hf_run])  # transformers ratios from their own interleaved set
    assert paired[0]["moe_vs_hf_eager"] == 9.9 and paired[0]["moe_vs_dense"] == rows[0]["moe_vs_dense"]
    report = {"summary": {"layer": rows},
              "train": {"shapes": [{"shape": "E8k2F1408", "num_experts": 8, "top_k": 2,
                                    "step_s": {"moekit": 1.0, "transformers_eager": 1.5},
                                    "moekit_vs": {"eager": 1.5}}]},
              "generate": [{"dtype": "fp32", "batches": {"1": {"moekit_compiled_tokens_per_s": 300.0,
                                                               "moekit_eager_tokens_per_s": 110.0,
                                                               "transformers_tokens_per_s": 110.0,
                                                               "speedup_compiled": 2.727}}}],
              "scaling": {"seconds_per_1k_tokens": {"512": 0.1}, "linearity": 0.7,
                          "time_vs_experts_s_at_4096_tokens": {"8": 0.3}, "growth_E8_to_E128": 1.1}}
    text = bench_suite.markdown(report)
    assert "| fp32 | 32 | E8 k2 F16 |" in text and "(≥ 1.1)" in text
    assert "1.5× / – (≥ 1.1)" in text and "**2.727×**" in text and "×1.1 (target ≤ 1.2)" in text


@pytest.mark.slow  # (builds the profiling library of the C++ loop: ~20 s the first time)
def test_loop_profile_reports_the_loops_kinds_of_work():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "loop_profile.py"
    res = subprocess.run([sys.executable, str(script), "--tokens", "64", "--steps", "2", "--shapes", "16,8,8,2"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (result,) = json.loads(res.stdout)["results"]
    assert set(result["thread_ms"]) == {"products", "packing", "gathers", "scatters", "activation"}
    assert result["thread_ms"]["products"]["calls"] > 0 and result["loop_wall_ms"]["forward"]["calls"] == 1
    assert 0 < result["loop_ms"] <= result["step_ms_mean"]
