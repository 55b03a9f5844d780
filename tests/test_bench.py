"""The benchmarks' plumbing (not their speed): ``moekit bench layer`` in the package (options, JSON
shape, the memory probe), and the scripts under benchmarks/ (transformers' side check, training
step, suite summary), imported from there as ``python benchmarks/X.py`` would."""

import contextlib
import importlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import moekit
from moekit import bench
from moekit.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name != "harness.py")


@pytest.fixture
def script(monkeypatch):
    """Imports a benchmark script by name, its directory first on sys.path as when Python runs it."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module


# ---- the package: moekit bench layer ---------------------------------------------------------
def test_small_run_reports_every_field():
    report = bench.run_layer_benchmark(tokens=64, repeats=1, shapes=[(32, 16, 4, 2)], memory=False)
    assert report["process"] == "a fresh interpreter per shape"
    for key in ("cpu_model", "cpu_count", "threads", "torch", "gemm"):
        assert key in report, key
    assert report["gemm"] in ("onednn", "blas") and report["threads"] >= 1
    shape = report["shapes"][0]
    assert shape["dense_hidden"] == 32
    assert shape["moe_expert_impl"] in ("native", "loop")  # which CPU path was timed
    for side in ("moe", "dense"):
        assert shape[side]["fwd_ms"] > 0 and shape[side]["fwd_bwd_ms"] >= shape[side]["fwd_ms"]
    assert shape["moe_vs_dense"]["fwd_bwd"] > 0
    assert "targets" not in report  # the project's speed targets live in benchmarks/layer.py
    assert json.loads(json.dumps(report)) == report


def test_cli_layer_names_the_machine_and_imports_no_transformers():
    """``moekit bench layer`` end to end in a fresh interpreter: its JSON names the CPU model and the
    GEMM backend, and nothing it runs imports transformers."""
    code = ("import contextlib, io, json, sys; from moekit.cli import main; out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            "    rc = main(['bench', 'layer', '--tokens', '32', '--repeats', '1', '--shapes', '32,16,4,2', "
            "'--no-memory', '--gemm', 'blas'])\n"
            "print(json.dumps({'rc': rc, 'report': json.loads(out.getvalue()), "
            "'transformers': 'transformers' in sys.modules}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = json.loads(res.stdout)
    assert out["rc"] == 0 and not out["transformers"]
    assert out["report"]["gemm"] == "blas" and out["report"]["cpu_model"] == bench.cpu_model()


def test_package_holds_no_transformers_comparison_or_targets():
    source = Path(bench.__file__).read_text()
    assert not re.search(r"^\s*(import|from)\s+transformers\b", source, re.M)
    assert not re.search(r"TARGET", source)
    assert not list(Path(moekit.__file__).parent.glob("bench_*.py"))


def test_cpu_model_reads_proc_cpuinfo():
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("model name")]
    if not names:
        pytest.skip("/proc/cpuinfo names no model (lscpu's is used)")
    assert bench.cpu_model() == names[0] and bench.environment()["cpu_model"] == names[0]


def test_ratio_of_a_zero_peak_is_null():
    """A tiny shape's peak rounds to 0.0 MB: its ratio is null, not a ZeroDivisionError."""
    assert bench._ratio(0.2, 0.0) is None and bench._ratio(None, 1.0) is None and bench._ratio(1.0, 2.0) == 0.5


def test_memory_probe_in_a_fresh_process():
    probe = bench.measure_memory("moe", bench.Shape(64, 64, 4, 2), 64, "fp32", 0)
    assert probe["peak_step_mb"] >= 0 and probe["memory_method"] in bench.MEMORY_METHODS
    # w_in [4, 128, 64] + w_out [4, 64, 64] + router [4, 64], fp32
    assert probe["param_grads_mb"] == round((4 * 128 * 64 + 4 * 64 * 64 + 4 * 64) * 4 / 2**20, 1) == 0.2


def test_memory_probe_warms_up_before_its_baseline(monkeypatch):
    """The same step once first (every kernel built), and its parameter gradients freed before the
    baseline (freed during the measured step, their memory would be reused by it)."""
    steps, grads_at_baseline = [], []
    shape = bench.Shape(128, 256, 4, 2)
    side = bench.build_side("dense", shape, 0)
    real_step, real_reset = bench.train_step, bench._reset_peak_rss
    monkeypatch.setattr(bench, "train_step", lambda side, x, *a: steps.append(x.shape[0]) or real_step(side, x, *a))

    def reset():
        grads_at_baseline.append([p.grad is not None for p in side.module.parameters()])
        return real_reset()

    monkeypatch.setattr(bench, "_reset_peak_rss", reset)
    probe = bench.probe_memory(side, bench.make_input(300, shape, 0), "fp32")
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
    (["--hf"], "unrecognized arguments: --hf"),  # transformers' blocks: python benchmarks/layer.py --hf
])
def test_bad_options_are_one_line_errors(args, message):
    res = subprocess.run([sys.executable, "-m", "moekit", "bench", "layer", *args], capture_output=True, text=True)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("name", ["train", "generate", "ep", "suite"])
def test_moved_benchmarks_name_their_script(name):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        cli_main(["bench", name])
    assert exit_.value.code == 2 and f"python benchmarks/{name}.py" in err.getvalue()
    assert (BENCHMARKS / f"{name}.py").is_file()


# ---- the scripts under benchmarks/ -----------------------------------------------------------
def test_scripts_need_no_path_hack():
    """Each script imports ``harness`` and moekit by name; the package imports nothing from here."""
    for name in SCRIPTS:
        source = (BENCHMARKS / name).read_text()
        assert "sys.path" not in source and "moekit.bench_" not in source, name
    for path in Path(moekit.__file__).parent.rglob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+(benchmarks|harness)\b", path.read_text(), re.M), path


def test_harness_interleaves_and_drops_the_warmup(script):
    harness = script("harness")
    calls = []
    out = harness.interleaved({"a": lambda i: calls.append(("a", i)) or i, "b": lambda i: calls.append(("b", i))
                               or 10 * i}, warmup=1, repeats=2)
    assert calls == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert out == {"a": [1, 2], "b": [10, 20]} and harness.medians(out) == {"a": 1.5, "b": 15}
    with pytest.raises(ValueError, match="repeats=0"):
        harness.interleaved({}, 0, 0)


def test_hf_side_is_verified_against_moekit(script):
    pytest.importorskip("transformers")
    report = script("layer").run(hf=True, tokens=32, repeats=1, shapes=[(32, 16, 4, 2)], memory=False)
    notes = report["shapes"][0]["notes"]
    assert "verified" in notes["hf_eager"], notes
    assert report["transformers"] and "moe_vs_hf_eager" in report["shapes"][0]
    assert set(report["targets"]) == {"D32_F16_E4_k2.peak_ratio_moe_over_dense"}


def test_hf_side_that_differs_is_skipped_with_its_reason(script, monkeypatch):
    pytest.importorskip("transformers")
    layer = script("layer")
    monkeypatch.setattr(layer, "HF_TOLERANCE", -1.0)  # every difference, even 0, is too large
    report = layer.run(hf=True, tokens=32, repeats=1, shapes=[(32, 16, 4, 2)], memory=False, fresh_process=False)
    shape = report["shapes"][0]
    assert shape["notes"]["hf_eager"].startswith("skipped: output differs from moekit's")
    assert "hf_eager" not in shape and "moe_vs_hf_eager" not in shape and "moe_vs_dense" in shape


def test_train_benchmark_runs_both_libraries_on_the_same_weights(script, monkeypatch):
    """A miniature of benchmarks/train.py: the first step's losses agree (same weights, same maths)."""
    pytest.importorskip("transformers")
    train = script("train")
    monkeypatch.setattr(train, "D", 32)
    monkeypatch.setattr(train, "LAYERS", 1)
    monkeypatch.setattr(train, "VOCAB", 64)
    r = train.bench_train_shape(4, 2, 16, batch=2, seq=8, repeats=1, seed=0)
    assert r["first_loss_max_diff"] < 1e-5
    assert set(r["step_s"]) == {"moekit", "transformers_eager", "transformers_grouped_mm"}
    assert all(v > 0 for v in r["moekit_vs"].values())


def test_suite_summary_and_markdown(script):
    """benchmarks/suite.py's plumbing on a tiny layer run and stand-in train/generate/scaling reports."""
    suite, layer = script("suite"), script("layer")
    runs = [layer.run(tokens=32, repeats=1, shapes=[(32, 16, 8, 2)], memory=False, fresh_process=False)]
    assert runs[0]["process"] == "this process, shapes one after the other"
    rows = suite.layer_rows(runs)
    assert rows[0]["routing"] == "E8 k2 F16" and rows[0]["target"] == layer.SPEED_TARGETS[(8, 2)]
    hf_run = {"shapes": [{**runs[0]["shapes"][0], "moe_vs_hf_eager": {"fwd_bwd": 9.9}}]}
    paired = suite.layer_rows(runs, [hf_run])  # transformers ratios from their own interleaved set
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
    text = suite.markdown(report)
    assert "| fp32 | 32 | E8 k2 F16 |" in text and "(≥ 1.1)" in text
    assert "1.5× / – (≥ 1.1)" in text and "**2.727×**" in text and "×1.1 (target ≤ 1.2)" in text


@pytest.mark.slow  # (each script imports torch and moekit in a fresh interpreter)
@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_runs_from_the_repository_root(name):
    res = subprocess.run([sys.executable, f"benchmarks/{name}", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "usage:" in res.stdout, res.stderr[-2000:]


@pytest.mark.slow  # (builds the profiling library of the C++ loop: ~20 s the first time)
def test_loop_profile_reports_the_loops_kinds_of_work():
    res = subprocess.run([sys.executable, str(BENCHMARKS / "loop_profile.py"), "--tokens", "64", "--steps", "2",
                          "--shapes", "16,8,8,2"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (result,) = json.loads(res.stdout)["results"]
    assert set(result["thread_ms"]) == {"products", "packing", "gathers", "scatters", "activation"}
    assert result["thread_ms"]["products"]["calls"] > 0 and result["loop_wall_ms"]["forward"]["calls"] == 1
    assert 0 < result["loop_ms"] <= result["step_ms_mean"]
