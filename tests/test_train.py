"""Training: data, tokenizers, the loop, checkpoints, exact resume, and bad input at the CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TEXT, tiny_cfg
from moekit import checkpoint as ckpt_io
from moekit.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, train_bpe
from moekit.train import TrainConfig, train
from moekit.train.data import discover, get_batch, load_tokens, open_corpus, split

@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))


def _cli(*args, **kw):
    env = {**os.environ, **kw.pop("env", {})}
    return subprocess.run([sys.executable, "-m", "moekit", *args], capture_output=True, text=True, env=env, **kw)


# ---- data ---------------------------------------------------------------------------------------
def test_default_corpus_is_found_split_deterministically_and_cached(tmp_path):
    docs, source = discover(None)
    assert source.startswith("python-stdlib:") and len(docs) > 500
    assert [d.name for d in docs] == sorted(d.name for d in docs)
    train_a, val_a = split(docs, 0.02)
    train_b, val_b = split(list(reversed(docs)), 0.02)
    assert {d.name for d in val_a} == {d.name for d in val_b} and val_a
    assert not {d.name for d in train_a} & {d.name for d in val_a}
    corpus = open_corpus(None)
    t0 = time.perf_counter()
    first = load_tokens(corpus, ByteTokenizer())
    t1 = time.perf_counter()
    second = load_tokens(corpus, ByteTokenizer())
    t2 = time.perf_counter()
    assert len(first.train) > 10_000_000 and np.array_equal(first.val, second.val)
    assert isinstance(second.train, np.memmap)
    assert t2 - t1 < (t1 - t0)  # the second load reads the cache
    assert len(list((tmp_path / "cache" / "tokens").glob("*.npy"))) == 2


def test_jsonl_and_directory_sources(tmp_path):
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"doc {i} " * 20}) for i in range(10)) + "\n")
    docs, _ = discover(jl)
    assert len(docs) == 10 and docs[3].name == "d.jsonl:4"
    data = load_tokens(open_corpus(jl, 0.3), ByteTokenizer())
    assert bytes(data.train[:6]).startswith(b"doc")


def test_batches_are_a_pure_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.uint8)
    a = get_batch(tokens, 4, 16, seed=1, step=7)
    b = get_batch(tokens, 4, 16, seed=1, step=7)
    c = get_batch(tokens, 4, 16, seed=1, step=8)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert torch.equal(a[0][:, 1:], a[1][:, :-1])  # targets are inputs shifted by one


# ---- tokenizers ---------------------------------------------------------------------------------
def test_bpe_training_and_tokenizer_json_round_trip(tmp_path):
    tok = train_bpe(iter([TEXT] * 5), vocab_size=300)
    assert 257 <= tok.vocab_size <= 300
    sample = "def add(a, b):\n    return a + b  # ünïcode ✓\n"
    assert tok.decode(tok.encode(sample)) == sample
    assert len(tok.encode(TEXT)) < len(TEXT.encode())  # merges compress
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, HFTokenizer) and loaded.encode(sample) == tok.encode(sample)
    byte = ByteTokenizer()
    assert byte.decode(byte.encode(sample)) == sample


def test_bad_tokenizer_file(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        HFTokenizer.from_file(bad)


# ---- the loop and checkpoints -------------------------------------------------------------------
def test_training_lowers_the_loss_and_writes_metrics(tmp_path, corpus_dir):
    res = train(tiny_cfg(tmp_path / "run", corpus_dir, steps=40, lr=5e-3), progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 40 and res.step == 40
    assert records[-1]["ce_loss"] < 0.6 * records[0]["ce_loss"]
    for key in ("step", "loss", "lr", "tokens", "tokens_per_s", "aux_load_balancing", "aux_z_loss"):
        assert key in records[-1]
    assert len(records[-1]["moe_0"]["tokens_frac"]) == 8 and "dropped_frac" in records[-1]["moe_1"]
    assert "val_loss" in records[-1]


def test_checkpoint_round_trip_restores_outputs_and_optimizer(tmp_path, corpus_dir):
    train(tiny_cfg(tmp_path / "run", corpus_dir, steps=6), progress=False)
    model, tok, config = ckpt_io.load_model(tmp_path / "run")
    ids = torch.randint(0, 256, (2, 16))
    state = load_file(str(tmp_path / "run" / "ckpt-00000006" / "model.safetensors"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    # the optimizer state loads back exactly
    from moekit.train.loop import param_groups

    cfg = TrainConfig(**config["train"])
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=1e-3)
    ckpt_io.load_trainer_state(tmp_path / "run" / "ckpt-00000006", opt)
    saved = load_file(str(tmp_path / "run" / "ckpt-00000006" / "trainer.safetensors"))
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], saved["opt.0.exp_avg"])
    model2, _, _ = ckpt_io.load_model(tmp_path / "run" / "ckpt-00000006")
    torch.testing.assert_close(model(ids).logits, model2(ids).logits, rtol=0, atol=0)


def test_corrupt_checkpoint_is_refused(tmp_path, corpus_dir):
    train(tiny_cfg(tmp_path / "run", corpus_dir, steps=6), progress=False)
    weights = tmp_path / "run" / "ckpt-00000006" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ckpt_io.CheckpointError, match="model.safetensors is corrupt"):
        ckpt_io.load_model(tmp_path / "run")


def test_run_directory_is_never_overwritten(tmp_path, corpus_dir):
    cfg = tiny_cfg(tmp_path / "run", corpus_dir, steps=4)
    train(cfg, progress=False)
    with pytest.raises(ValueError, match="already exists"):
        train(cfg, progress=False)
    assert (tmp_path / "run" / "ckpt-00000004").is_dir()
    train(cfg, overwrite=True, progress=False)


def _weights(run):
    return load_file(str(ckpt_io.latest_checkpoint(run) / "model.safetensors"))


def _losses(run):
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def _start_training(cfg: TrainConfig):
    code = f"from moekit.train import TrainConfig, train; train(TrainConfig(**{cfg.to_dict()!r}), progress=False)"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_checkpoint(run: Path, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ckpt_io.latest_checkpoint(run) is not None:
            return
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint appeared in {run}: {proc.stderr.read() if proc.poll() else ''}")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_run_resumes_to_identical_weights(tmp_path, corpus_dir, sig):
    cfg_a = tiny_cfg(tmp_path / "a", corpus_dir, steps=60, save_every=4, eval_every=20)
    train(cfg_a, progress=False)
    cfg_b = tiny_cfg(tmp_path / "b", corpus_dir, steps=60, save_every=4, eval_every=20)
    proc = _start_training(cfg_b)
    _wait_for_checkpoint(tmp_path / "b", proc)
    os.kill(proc.pid, sig)
    proc.communicate(timeout=60)  # also closes its pipes
    if sig == signal.SIGTERM:
        assert proc.returncode == 0  # a clean exit after saving
    last = ckpt_io.latest_checkpoint(tmp_path / "b")
    assert last is not None and last.name != "ckpt-00000060", "the run finished before it was interrupted"
    train(cfg_b, resume=True, progress=False)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def test_resume_of_a_checkpoint_saved_with_another_adamw_kernel_runs_fused(tmp_path, corpus_dir, monkeypatch):
    """optimizer.load_state_dict restores each group's saved ``fused``/``foreach``; a checkpoint from
    a run on the per-tensor loop must still resume on the fused kernel."""
    cfg = tiny_cfg(tmp_path / "r", corpus_dir, steps=2, save_every=2, eval_every=20)
    train(cfg, progress=False)
    ckpt = ckpt_io.latest_checkpoint(tmp_path / "r")
    state_path = ckpt / "state.json"
    state = json.loads(state_path.read_text())
    for group in state["optimizer"]["param_groups"]:
        group["fused"], group["foreach"] = None, True  # as saved by a run without the fused kernel
    state_path.write_text(json.dumps(state))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["state.json"] = {"size": state_path.stat().st_size, "sha256": ckpt_io._sha256(state_path)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    seen = []
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step",
                        lambda self, *a, **k: seen.append([(g["fused"], g["foreach"]) for g in self.param_groups])
                        or step(self, *a, **k))
    train(TrainConfig(**{**cfg.to_dict(), "steps": 4}), resume=True, progress=False)
    assert seen and all(flags == (True, None) for groups in seen for flags in groups)


# ---- bad input at the CLI -----------------------------------------------------------------------
def _err(result):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def test_cli_bad_inputs(tmp_path, corpus_dir):
    out = str(tmp_path / "r")
    base = ["train", "--preset", "tiny", "--steps", "2", "--no-progress", "--batch-size", "2", "--seq-len", "16"]
    assert "does not exist" in _err(_cli(*base, "--data", str(tmp_path / "missing"), "--out", out))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "empty" in _err(_cli(*base, "--data", str(empty), "--out", out))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.dat").write_bytes(b"\0\1\2" * 100)
    assert "no text files" in _err(_cli(*base, "--data", str(tmp_path / "bin"), "--out", out))
    latin = tmp_path / "latin"
    latin.mkdir()
    (latin / "a.txt").write_bytes("café ".encode("latin-1") * 200)
    (latin / "b.txt").write_bytes("café ".encode("latin-1") * 200)
    assert "not valid UTF-8" in _err(_cli(*base, "--data", str(latin), "--out", out, "--tokenizer", "bpe",
                                          "--vocab-size", "300"))
    assert "argument --batch-size: expected an integer >= 1, got '0'" in _err(_cli("train", "--preset", "tiny",
                                                                                  "--batch-size", "0", "--out", out))
    assert "unknown preset 'gpt9'" in _err(_cli("train", "--preset", "gpt9", "--out", out))
    assert "not a moekit checkpoint" in _err(_cli("eval", "--model", str(corpus_dir)))
    assert "max_seq_len" in _err(_cli("train", "--preset", "tiny", "--seq-len", "100000", "--steps", "1",
                                      "--data", str(corpus_dir), "--out", str(tmp_path / "long"),
                                      "--no-progress"))


def test_cli_train_then_eval(tmp_path, corpus_dir):
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--data", str(corpus_dir), "--out", str(out), "--steps", "6",
            "--batch-size", "2", "--seq-len", "32", "--eval-every", "3", "--no-progress", "--json"]
    res = _cli(*args)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["step"] == 6
    again = _cli(*args)
    assert "already exists" in _err(again)
    ev = _cli("eval", "--model", str(out))
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)
    assert set(result) == {"loss", "ppl", "tokens", "batch_size", "seq_len"} and result["tokens"] > 0
    # by default the run's own batch size, sequence length and eval tokens: the run's last val_loss
    assert (result["batch_size"], result["seq_len"]) == (2, 32)
    last_val = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]["val_loss"]
    assert result["loss"] == pytest.approx(last_val, rel=1e-6)


# ---- the demo -----------------------------------------------------------------------------------
def test_crossing_interpolates_between_evaluations():
    from moekit.train.demo import _crossing

    curve = [(10, 100.0, 1.0, 3.0), (20, 200.0, 2.0, 2.0), (30, 300.0, 3.0, 1.0)]
    assert _crossing(curve, 2.5) == (15.0, 150.0, 1.5)
    assert _crossing(curve, 3.5) == (10, 100.0, 1.0)
    assert _crossing(curve, 0.5) is None


def test_demo_end_to_end_on_a_short_schedule(tmp_path, monkeypatch):
    from moekit.train import demo

    monkeypatch.setitem(demo.QUICK, "steps", 4)
    monkeypatch.setitem(demo.QUICK, "eval_every", 2)
    monkeypatch.setitem(demo.QUICK, "warmup", 1)
    monkeypatch.setitem(demo.QUICK, "eval_tokens", 4096)
    monkeypatch.setitem(demo.SETTLE, "quick", 1)
    summary = demo.run_demo(tmp_path / "demo", quick=True, progress=False, seed=3)
    assert (tmp_path / "demo" / "loss.png").stat().st_size > 10_000
    assert not (tmp_path / "demo" / ".warm-up").exists()  # the one-off run leaves nothing behind
    saved = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert saved["dense"]["steps"] == saved["moe"]["steps"] == 4 and saved["seed"] == 3
    assert saved["moe"]["active_params"] < 1.05 * saved["dense"]["active_params"]
    assert saved["moe"]["total_params"] > 3 * saved["dense"]["total_params"]
    assert summary["moe_reached_dense_final_loss"] == ("moe_at_dense_final_loss" in summary)
    routing = saved["moe_routing"]
    n_moe = len([k for k in json.loads((tmp_path / "demo" / "moe" / "metrics.jsonl").read_text().splitlines()[-1])
                 if k.startswith("moe_")])
    assert len(routing["max_load_by_step"]) == n_moe == 4
    assert all(v >= 1.0 for v in routing["median_max_load_after_settle"].values())
    timing = saved["timing"]
    assert timing["one_off_seconds_before_clocks"] > 0 and set(timing["other_processes_cpu_share"]) == {"dense", "moe"}
    with pytest.raises(ValueError, match="already exists"):
        demo.run_demo(tmp_path / "demo", quick=True, progress=False)
    with pytest.raises(ValueError, match="seed=3"):  # a resume must repeat the demo's own settings
        demo.run_demo(tmp_path / "demo", quick=True, progress=False, resume=True)
    with pytest.raises(ValueError, match="no demo to continue"):
        demo.run_demo(tmp_path / "other", quick=True, progress=False, resume=True)
    again = demo.run_demo(tmp_path / "demo", quick=True, progress=False, seed=3, resume=True)  # both runs were done
    assert again["moe"]["final_val_loss"] == summary["moe"]["final_val_loss"]


def test_demo_ctrl_c_during_the_warm_up_stops_the_demo(tmp_path, monkeypatch):
    from moekit.train import demo
    from moekit.train.loop import TrainResult

    calls = []

    def interrupted(cfg, **kw):  # the SIGINT handler inside train() turns Ctrl-C into an interrupted result
        calls.append(cfg.out)
        Path(cfg.out).mkdir(parents=True)
        return TrainResult(Path(cfg.out), 1, None, None, True, exit_code=130)

    monkeypatch.setattr(demo, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(tmp_path / "demo", quick=True, progress=False)
    assert len(calls) == 1 and ".warm-up" in calls[0]  # no model's run was started
    assert not (tmp_path / "demo" / ".warm-up").exists() and (tmp_path / "demo" / "demo.json").is_file()


def test_demo_routing_over_training_flags_collapse_after_the_router_settles():
    from moekit.train.demo import routing_over_training

    def rec(step, loads, collapsed=()):
        r = {"step": step, **{f"moe_{i}": {"max_load_ratio": v} for i, v in enumerate(loads)}}
        if collapsed:
            r["collapsed_layers"] = list(collapsed)
        return r

    records = [rec(10, [4.0, 3.5], [0, 1]), rec(20, [1.5, 1.2]), rec(30, [1.4, 3.2], [1]), rec(40, [1.3, 1.1]),
               {"step": 40, "val_loss": 2.0}]
    out = routing_over_training(records, settle=10)
    assert out["median_max_load_after_settle"] == {"0": 1.4, "1": 1.2}
    assert out["collapse_after_settle"] == [{"step": 30, "layers": [1]}]
    assert out["max_load_by_step"]["1"] == [(10, 3.5), (20, 1.2), (30, 3.2), (40, 1.1)]
    assert routing_over_training(records, settle=30)["collapse_after_settle"] == []


def test_demo_cpu_share_counts_other_processes_only():
    from moekit.train import demo

    if not os.path.exists("/proc/stat"):
        pytest.skip("needs /proc/stat")
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<1.5: pass"])
    try:
        with demo.CpuShare() as busy:
            time.sleep(1.0)
    finally:
        spin.wait()
    assert busy.others > 0.25 / os.cpu_count()  # a spinning process takes about one CPU of the machine's
    # 3 busy CPU-seconds on the machine, 1 of them this process's, over 1 s on 2 CPUs: one CPU's worth
    assert demo.other_cpu_share(3.0, 1.0, 1.0, 2) == pytest.approx(1.0)
    assert demo.other_cpu_share(1.0, 1.02, 1.0, 2) == 0.0  # clock granularity never makes it negative


def test_bf16_autocast_and_bpe_tokenizer_train(tmp_path, corpus_dir):
    cfg = tiny_cfg(tmp_path / "run", corpus_dir, steps=4, dtype="bf16", tokenizer="bpe", vocab_size=300,
                   eval_every=2)
    res = train(cfg, progress=False)
    assert res.val_loss is not None and res.val_loss == res.val_loss  # finite, not NaN
    tok = load_tokenizer(tmp_path / "run")
    assert isinstance(tok, HFTokenizer) and tok.vocab_size <= 300
    model, _, _ = ckpt_io.load_model(tmp_path / "run")
    assert model.cfg.vocab_size == tok.vocab_size


@pytest.mark.slow
def test_torch_compile_training_matches_eager(tmp_path, corpus_dir):
    eager = train(tiny_cfg(tmp_path / "eager", corpus_dir, steps=3), progress=False)
    compiled = train(tiny_cfg(tmp_path / "compiled", corpus_dir, steps=3, compile=True), progress=False)
    assert abs(eager.final_loss - compiled.final_loss) < 1e-3


def test_cli_set_overrides_model_fields(tmp_path, corpus_dir):
    out = tmp_path / "run"
    res = _cli("train", "--preset", "tiny", "--data", str(corpus_dir), "--out", str(out), "--steps", "2",
               "--batch-size", "2", "--seq-len", "16", "--no-progress", "--set", "moe.top_k=3", "--set", "n_layers=3")
    assert res.returncode == 0, res.stderr
    saved = json.loads((out / "model_config.json").read_text())
    assert saved["n_layers"] == 3 and saved["moe"]["top_k"] == 3
    bad = _cli("train", "--preset", "tiny", "--out", str(tmp_path / "bad"), "--set", "moe.topk=3")
    assert "topk" in _err(bad) and not (tmp_path / "bad").exists()


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path, corpus_dir):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="not a moekit run directory"):
        train(tiny_cfg(precious, corpus_dir, steps=2), overwrite=True, progress=False)
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_resaving_a_step_keeps_one_complete_checkpoint(tmp_path):
    from moekit import MoETransformer, ModelConfig

    model = MoETransformer(ModelConfig.from_name("tiny"))
    for _ in range(2):
        ckpt_io.save_checkpoint(tmp_path, 5, model, model.cfg, ByteTokenizer())
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-00000005"]
    ckpt_io.verify(tmp_path / "ckpt-00000005")
    (tmp_path / "ckpt-00000009").mkdir()  # an incomplete directory is never taken for a checkpoint
    assert ckpt_io.latest_checkpoint(tmp_path).name == "ckpt-00000005"
