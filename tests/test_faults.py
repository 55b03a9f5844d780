"""Fault injection: kills at random moments, corrupted files, non-finite numbers, collapse, pickles,
distributed failures, fuzzed configs and command lines. Nothing may be lost or half-written.

    python -m pytest -m faults      # the whole suite (20 kills, 4-process runs): see the README
    python -m pytest                # the default run takes the fast subset
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from moekit import checkpoint as ckpt_io
from moekit.train import TrainConfig, train

pytestmark = pytest.mark.faults

TEXT = "def add(a, b):\n    return a + b  # the sum\n\nclass Point:\n    x: int = 0\n" * 40


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def corpus_dir(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(12):
        (d / f"f{i:02d}.py").write_text(TEXT.replace("Point", f"Point{i}") * (1 + i % 3))
    return d


def tiny_cfg(out, data, **kw):
    base = dict(preset="tiny", data=str(data), out=str(out), steps=24, batch_size=4, seq_len=32, eval_every=8,
                eval_tokens=512, save_every=6, log_every=1, warmup=4, val_fraction=0.2)
    return TrainConfig(**{**base, **kw})


def _cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "moekit", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def _clear_error(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    for n in needles:
        assert n in result.stderr, (n, result.stderr)
    return result.stderr


# ---- numerical faults ---------------------------------------------------------------------------
def _poison_layer(monkeypatch, layer: int, calls: set[int] | None, from_call: int | None = None):
    """Makes MoE layer ``layer``'s output NaN at the given forward calls of that layer (counted over
    the run: training steps, then the diagnosis pass, evaluations)."""
    from moekit.moe.layer import MoELayer

    seen = {"n": 0}
    original = MoELayer.forward

    def patched(self, x):
        res = original(self, x)
        if getattr(self, "_fault_id", None) != layer:
            return res
        k = seen["n"]
        seen["n"] += 1
        if (calls is not None and k in calls) or (from_call is not None and k >= from_call):
            res.output = res.output * float("nan")
        return res

    def init(self, cfg, _orig=MoELayer.__init__):
        _orig(self, cfg)
        self._fault_id = init.count % 2  # the tiny preset has 2 MoE layers, built in order
        init.count += 1

    init.count = 0
    monkeypatch.setattr(MoELayer, "__init__", init)
    monkeypatch.setattr(MoELayer, "forward", patched)


def test_nonfinite_loss_stops_naming_step_and_layer(tmp_path, corpus_dir, monkeypatch):
    _poison_layer(monkeypatch, layer=1, calls=None, from_call=8)  # layer 1 breaks at step 9
    cfg = tiny_cfg(tmp_path / "r", corpus_dir, steps=20, save_every=4, eval_every=100)
    with pytest.raises(FloatingPointError) as err:
        train(cfg, progress=False)
    msg = str(err.value)
    assert "step 9:" in msg and "layers.1.ffn" in msg and "ckpt-00000008" in msg and "--skip-nonfinite" in msg
    last = ckpt_io.latest_checkpoint(tmp_path / "r")
    assert last.name == "ckpt-00000008"
    ckpt_io.verify(last)  # the last good checkpoint is whole
    weights = load_file(str(last / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_skip_nonfinite_skips_and_counts(tmp_path, corpus_dir, monkeypatch):
    _poison_layer(monkeypatch, layer=0, calls={4, 5})  # step 5's forward and its diagnosis pass
    cfg = tiny_cfg(tmp_path / "r", corpus_dir, steps=10, save_every=5, eval_every=100, skip_nonfinite=True)
    result = train(cfg, progress=False)
    assert result.step == 10 and result.final_loss == result.final_loss  # finished, finite
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_nonfinite"] for r in records] == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    state = json.loads((tmp_path / "r" / "ckpt-00000010" / "state.json").read_text())
    assert state["skipped_nonfinite"] == 1
    weights = load_file(str(tmp_path / "r" / "ckpt-00000010" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_router_collapse_is_flagged(tmp_path, corpus_dir, monkeypatch, capsys):
    from moekit.moe.routers import Router
    from moekit.train.metrics import collapsed_experts

    assert collapsed_experts([1, 1, 1, 1]) == {}
    assert collapsed_experts([10, 10, 10, 0.5]) == {"starved": [3]}
    assert collapsed_experts([13, 1, 1, 1]) == {"hot": [0]}

    original = Router.select

    def forced(self, scores_TE):  # every token to experts 0 and 1
        ids, _ = original(self, scores_TE)
        ids = torch.tensor([0, 1]).expand_as(ids).contiguous()
        return ids, scores_TE.gather(1, ids)

    monkeypatch.setattr(Router, "select", forced)
    train(tiny_cfg(tmp_path / "r", corpus_dir, steps=3, eval_every=100), progress=True)
    assert "COLLAPSE=layers 0,1" in capsys.readouterr().err  # the progress bar says it
    rec = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["collapsed_layers"] == [0, 1]
    layer = next(v for k, v in rec.items() if k.startswith("moe_"))
    assert layer["collapse"] == {"starved": [2, 3, 4, 5, 6, 7], "hot": [0, 1]}


# ---- kills at random moments ------------------------------------------------------------------
def _weights(run: Path) -> dict:
    return load_file(str(ckpt_io.latest_checkpoint(run) / "model.safetensors"))


def _start(cfg: TrainConfig, resume: bool):
    code = (f"from moekit.train import TrainConfig, train; "
            f"train(TrainConfig(**{cfg.to_dict()!r}), resume={resume}, progress=False)")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _kill_campaign(tmp_path, corpus_dir, kills: int, seed: int):
    """SIGKILLs one run ``kills`` times at seeded random moments (each after a random delay from its
    (re)start), resuming each time; returns (kills that landed, kills that left a partial checkpoint)."""
    steps = 40
    ref = tiny_cfg(tmp_path / "ref", corpus_dir, steps=steps, save_every=2, eval_every=20, keep_last=3)
    t = time.monotonic()
    train(ref, progress=False)
    run_time = time.monotonic() - t
    cfg = tiny_cfg(tmp_path / "run", corpus_dir, steps=steps, save_every=2, eval_every=20, keep_last=3)
    rng = random.Random(seed)
    landed = mid_write = 0
    resume = False
    for _ in range(kills):
        proc = _start(cfg, resume)
        time.sleep(rng.uniform(1.0, 1.0 + run_time))  # interpreter start-up, then somewhere in training
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            landed += 1
        proc.wait(timeout=60)
        run = tmp_path / "run"
        mid_write += any(p.name.startswith(".tmp-") for p in run.iterdir()) if run.exists() else 0
        for ckpt in ckpt_io.checkpoint_dirs(run) if run.exists() else []:
            ckpt_io.verify(ckpt)  # never a half-written checkpoint: every file matches its manifest
        resume = ckpt_io.latest_checkpoint(run) is not None if run.exists() else False
        if run.exists() and not resume:
            shutil.rmtree(run)  # killed before its first checkpoint: start again
    proc = _start(cfg, resume)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return landed, mid_write


def test_sigkill_at_random_moments_loses_nothing(tmp_path, corpus_dir):
    landed, _ = _kill_campaign(tmp_path, corpus_dir, kills=3, seed=0)
    assert landed >= 2


@pytest.mark.slow
def test_sigkill_twenty_times_loses_nothing(tmp_path, corpus_dir):
    landed, mid_write = _kill_campaign(tmp_path, corpus_dir, kills=20, seed=1)
    print(json.dumps({"kills": 20, "landed": landed, "during_checkpoint_write": mid_write}))
    assert landed >= 15
