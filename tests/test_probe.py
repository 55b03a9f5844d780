"""The measured choice (moekit.moe.backends.probe): it picks what its timings say, caches them per
machine atomically, survives a corrupt or unwritable cache, leaves the caller's random stream and
autograd state alone, and the chooser consults it only under ``auto`` with the probe on."""

import json
import re
import time

import pytest
import torch

from moekit import ModelConfig, MoETransformer, reference_forward
from moekit.cpu import options
from moekit.moe.backends import chooser, probe
from moekit.moe.backends.probe import Candidate
from moekit.moe.backends.registry import get as get_backend

from conftest import grads_of, make_layer

A, B, PLAIN = Candidate("native", "onednn"), Candidate("native", "blas"), probe.PLAIN


@pytest.fixture
def probing(tmp_path):
    """The probe on, its cache in a fresh directory, this process's copy forgotten before and after."""
    probe.forget()
    with options.override(probe=True, cache_dir=str(tmp_path / "cache")):
        yield tmp_path / "cache"
    probe.forget()


def sleeper(ms: dict):
    """A workload whose candidates take the given milliseconds per step."""
    calls = []

    def for_candidate(c):
        def step():
            calls.append(c.name)
            time.sleep(ms[c.name] / 1e3)
        return step

    for_candidate.calls = calls
    return for_candidate


def test_picks_the_fastest_and_caches_it(probing):
    work = sleeper({A.name: 12, B.name: 2, PLAIN.name: 6})
    assert probe.best("k", [A, B, PLAIN], lambda: work) == B
    times = json.loads(probe.cache_file().read_text())["entries"]["k"]
    assert set(times) == {A.name, B.name, PLAIN.name} and times[B.name] < times[PLAIN.name] < times[A.name]
    n = len(work.calls)
    assert probe.best("k", [A, B, PLAIN], lambda: work) == B and len(work.calls) == n  # this process: no second timing
    probe.forget()  # as a fresh process: read from the file, not timed again
    assert probe.best("k", [A, PLAIN], lambda: work) == PLAIN and len(work.calls) == n


def test_only_missing_candidates_are_timed(probing):
    assert probe.best("k", [B, PLAIN], lambda: sleeper({B.name: 1, PLAIN.name: 5})) == B
    work = sleeper({A.name: 0.1})
    assert probe.best("k", [A, B, PLAIN], lambda: work) == A and set(work.calls) == {A.name}


def test_plain_pytorch_wins_what_noise_cannot_tell_apart():
    times = {A.name: 100.0, PLAIN.name: 101.0}
    assert probe._choose(times, [A, PLAIN]) == PLAIN
    assert probe._choose({A.name: 90.0, PLAIN.name: 101.0}, [A, PLAIN]) == A
    assert probe._choose({A.name: None, PLAIN.name: 101.0}, [A, PLAIN]) == PLAIN  # a failed candidate


def test_a_failing_candidate_is_never_chosen(probing):
    def work(c):
        if c == A:
            raise RuntimeError("no oneDNN here")
        return lambda: None

    with pytest.warns(UserWarning, match="native/onednn failed"):
        assert probe.best("k", [A, PLAIN], lambda: work) == PLAIN
    assert json.loads(probe.cache_file().read_text())["entries"]["k"][A.name] is None


def test_a_corrupt_cache_is_named_and_measured_again(probing):
    path = probe.cache_file()
    path.parent.mkdir(parents=True)
    path.write_text('{"format": 1, "entries": {"k": ')
    with pytest.warns(UserWarning, match=re.escape(f"probe cache {path} is unreadable")):
        assert probe.best("k", [B, PLAIN], lambda: sleeper({B.name: 1, PLAIN.name: 5})) == B
    assert json.loads(path.read_text())["entries"]["k"][B.name] > 0  # rewritten whole
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_an_unwritable_cache_warns_and_still_chooses(probing):
    probing.parent.joinpath("cache").write_text("a file where the directory should be")
    with pytest.warns(UserWarning, match="could not write the probe cache"):
        assert probe.best("k", [B, PLAIN], lambda: sleeper({B.name: 1, PLAIN.name: 5})) == B


def test_another_format_is_measured_again(probing):
    path = probe.cache_file()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format": probe.FORMAT + 1, "entries": {"k": {B.name: 1.0, PLAIN.name: 9.0}}}))
    work = sleeper({B.name: 5, PLAIN.name: 0.5})
    assert probe.best("k", [B, PLAIN], lambda: work) == PLAIN and work.calls


def test_assignment_classes():
    assert [probe.assignments_class(n) for n in (1, 3, 5, 6, 8192, 9000, 12000, 10**6)] == \
        [1, 4, 4, 8, 8192, 8192, 16384, probe.MAX_ASSIGNMENTS]


def test_expert_workload_runs_every_candidate_without_touching_the_callers_state(probing):
    shape = probe.expert_shape(torch.float32, 16, 8, 4, "swiglu", 64)
    candidates = chooser._candidates("auto", torch.float32)
    assert PLAIN in candidates
    rng = torch.get_rng_state()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # as inside a generation step
        choice = chooser._measured(shape, candidates)
    assert choice in candidates and torch.equal(torch.get_rng_state(), rng)
    times = probe.lookup(shape.key)
    assert set(times) == {c.name for c in candidates} and all(t is not None and t > 0 for t in times.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_layer_under_the_probe_matches_the_reference(probing, dtype):
    layer = make_layer(dtype=torch.float32, num_experts=8, top_k=2)
    x = torch.randn(32, 16)
    ref = grads_of(layer, x, lambda m, t: (lambda r: (r.output, r.aux_loss))(reference_forward(m, t)))
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        got = grads_of(layer, x, lambda m, t: (lambda r: (r.output, r.aux_loss))(m(t)))
    for name, want in [("<output>", ref[0]), *ref[2].items()]:
        have = (got[0] if name == "<output>" else got[2][name]).float()
        if dtype == torch.float32:
            torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-5)
        else:  # bf16 rounding: the error relative to the tensor's norm
            assert (have - want).norm() <= 2e-2 * want.norm() + 1e-6, name
    described = chooser.describe(layer.cfg, x)
    assert described["probe"]["class"].startswith("experts|float32|D16|F8|E8|swiglu")
    assert described["expert_backend"] in {c.split("/")[0] for c in described["probe"]["ms"]}


def test_the_chooser_follows_the_cached_times(probing):
    """The times in the cache decide: the chooser's expert backend, and the C++ loop's GEMM."""
    cfg = make_layer(dtype=torch.float32, num_experts=8, top_k=2).cfg
    x = torch.randn(32, 16)
    candidates = chooser._candidates("auto", torch.float32)
    if len(candidates) < 2:
        pytest.skip("one candidate only here (the C++ extension does not build)")
    shape = chooser._expert_shape(cfg, x, torch.float32)
    for winner in candidates:
        probe.forget()
        probe._write(probe.cache_file(), shape.key, {c.name: (1.0 if c == winner else 50.0) for c in candidates})
        assert chooser.expert_backend(cfg, x) == winner.backend
        if winner.backend == "native":
            w = (torch.empty(8, 16, 16), torch.empty(8, 16, 8))
            how = chooser.loop_gemm(x, w, native=True, activation="swiglu", num_assignments=64)
            assert how.onednn == (winner.gemm == "onednn")
    with options.override(expert_backend="loop"):  # a request is not second-guessed
        assert chooser.expert_backend(cfg, x) == "loop"


def test_off_means_the_fixed_rules_and_no_file(tmp_path):
    probe.forget()
    with options.override(probe=False, cache_dir=str(tmp_path)):
        cfg = make_layer(dtype=torch.float32).cfg
        expected = "native" if chooser.native_available() else "loop"
        assert chooser.expert_backend(cfg, torch.randn(8, 16)) == expected
        assert chooser.describe(cfg, torch.randn(8, 16))["probe"] is None
    assert not (tmp_path / "probe").exists()


def test_compiling_never_probes(probing, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not chooser._probing(torch.device("cpu"))


def test_the_model_dense_products_follow_the_dense_probe(probing):
    if not chooser.onednn_runs():
        pytest.skip("fp32 oneDNN does not run here: the dense products are never accelerated")
    cfg = ModelConfig.from_name("tiny")
    shape = chooser.dense_shape(cfg)
    model = MoETransformer(cfg)
    h = torch.randn(4, cfg.d_model)
    for onednn_wins in (True, False):
        probe.forget()
        times = {"dense/onednn": 1.0 if onednn_wins else 9.0, "dense/blas": 9.0 if onednn_wins else 1.0}
        probe._write(probe.cache_file(), shape.key, times)
        assert model.accelerated and model._onednn(h) == onednn_wins


def test_dense_workload_times_both_gemms(probing):
    if not chooser.onednn_runs():
        pytest.skip("fp32 oneDNN does not run here")
    cfg = ModelConfig.from_name("tiny")
    with torch.device("meta"):  # as moekit params and from_pretrained build it: nothing is timed
        MoETransformer(cfg)
    assert not probe.lookup(chooser.dense_shape(cfg).key)
    model = MoETransformer(cfg)
    assert not probe.lookup(chooser.dense_shape(cfg).key)  # nor when built on the CPU: at the first product
    model(torch.randint(0, cfg.vocab_size, (1, 8)))
    times = probe.lookup(chooser.dense_shape(cfg).key)
    assert set(times) == {"dense/onednn", "dense/blas"} and all(t > 0 for t in times.values())


def test_a_decided_class_builds_no_workload_again(probing, monkeypatch):
    """Every forward asks the chooser: once a class is decided (or read from the cache) no synthetic
    workload is built again (building one per call made decoding ~25x slower)."""
    cfg = make_layer(dtype=torch.float32, num_experts=8, top_k=2).cfg
    x = torch.randn(4, 16)
    first = chooser.expert_backend(cfg, x)
    probe.forget()  # a fresh process: the file's entry, no timing

    def refuse(*a, **k):
        raise AssertionError("a workload was built for a class already measured")

    monkeypatch.setattr(probe, "expert_workload", refuse)
    for _ in range(3):
        assert chooser.expert_backend(cfg, x) == first
    assert probe.best("k2", [B, PLAIN], lambda: sleeper({B.name: 1, PLAIN.name: 5})) == B
    assert probe.best("k2", [B, PLAIN], refuse) == B


def test_the_probe_times_cpu_tensors_under_a_meta_device_context(probing, monkeypatch):
    """Loading builds a model under torch.device("meta"): the probe's tensors must still be real (on
    meta tensors it timed nothing, and cached what it timed)."""
    seen = []

    def linear(x, w, onednn=False):
        seen.append(x.device.type)
        return torch.nn.functional.linear(x, w)

    def loop_run(self, x, plan, weights, activation, how):
        seen.append(x.device.type)
        return x * 2

    monkeypatch.setattr(type(get_backend("loop")), "run", loop_run)
    expert_shape = probe.expert_shape(torch.float32, 16, 8, 4, "swiglu", 32)
    with torch.device("meta"):
        probe.dense_workload(probe.DenseShape(32, (16,), 1), linear)(Candidate("dense", "onednn"))()
        probe.expert_workload(expert_shape, lambda c, x, w: chooser.loop_gemm(x, w, native=False))(PLAIN)()
    assert seen == ["cpu", "cpu"]
