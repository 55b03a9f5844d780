"""A run's life at the command line: a failed start leaves nothing, Ctrl-C is acknowledged and never
costs the checkpoint being written, --resume refuses flags it would ignore."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import tiny_cfg
from moekit import checkpoint as ckpt_io
from moekit.train import train
from test_train import _cli, _err


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))


BASE = ["train", "--preset", "tiny", "--batch-size", "2", "--seq-len", "16", "--no-progress"]


def test_a_failed_start_leaves_no_run_directory(tmp_path, corpus_dir):
    latin = tmp_path / "latin"
    latin.mkdir()
    for name in ("a.txt", "b.txt"):
        (latin / name).write_bytes("café ".encode("latin-1") * 200)
    for args in (["--data", str(tmp_path / "missing")],
                 ["--data", str(latin), "--tokenizer", "bpe", "--vocab-size", "300"],
                 ["--data", str(corpus_dir), "--set", "n_layers=0"]):
        out = tmp_path / "run"
        _err(_cli(*BASE, "--steps", "2", "--out", str(out), *args))
        assert not out.exists(), args
    # the same command, fixed, then just works: nothing was left in its way
    res = _cli(*BASE, "--steps", "1", "--out", str(tmp_path / "run"), "--data", str(corpus_dir))
    assert res.returncode == 0, res.stderr


def test_a_model_too_large_for_the_machine_is_refused_with_the_figures(tmp_path):
    out = tmp_path / "big"
    err = _err(_cli("train", "--preset", "mixtral-8x7b", "--out", str(out), "--no-progress"))
    assert re.search(r"has 46,\d{3},\d{3},\d{3} parameters: training needs at least 6\d\d\.\d GiB", err), err
    assert "GiB is available" in err and "--miniature" in err
    assert not out.exists()


def test_ctrl_c_says_so_at_once_saves_and_exits_130(tmp_path, corpus_dir):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "moekit", *BASE, "--steps", "100000", "--save-every", "100000",
                             "--eval-every", "100000", "--data", str(corpus_dir), "--out", str(out), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "train_config.json").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # a few steps in, no checkpoint yet
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "SIGINT received: stopping after this step and saving a checkpoint" in stderr
    summary = json.loads(stdout)
    assert summary["interrupted"] is True and summary["val_step"] is None
    last = ckpt_io.latest_checkpoint(out)
    assert last is not None and last.name == f"ckpt-{summary['step']:08d}"
    ckpt_io.verify(last)


def test_a_second_ctrl_c_during_the_save_does_not_lose_it(tmp_path, corpus_dir, monkeypatch):
    """The first Ctrl-C comes at step 2's evaluation, the second in the middle of the save it asked for:
    the save finishes, the run stops there with SIGINT's exit code."""
    saved = []
    real_save = ckpt_io.save_checkpoint

    def save_with_a_second_ctrl_c(run_dir, step, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # handled at once, in this (main) thread
        saved.append(step)
        return real_save(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(ckpt_io, "save_checkpoint", save_with_a_second_ctrl_c)
    cfg = tiny_cfg(tmp_path / "run", corpus_dir, steps=50, eval_every=2, save_every=1000)
    result = train(cfg, progress=False, on_eval=lambda record: os.kill(os.getpid(), signal.SIGINT))
    assert saved == [2] and result.interrupted and result.step == 2 and result.exit_code == 130
    assert result.val_step == 2
    ckpt_io.verify(ckpt_io.latest_checkpoint(tmp_path / "run"))


def test_resume_refuses_flags_it_would_ignore_and_says_what_it_changes(tmp_path, corpus_dir):
    out = tmp_path / "run"
    first = [*BASE, "--data", str(corpus_dir), "--out", str(out), "--eval-every", "2"]
    assert _cli(*first, "--steps", "2").returncode == 0
    for flags, named in ((["--lr", "5.0"], "--lr 5.0 (the run has 0.003)"),
                         (["--batch-size", "64"], "--batch-size 64 (the run has 2)"),
                         (["--set", "moe.top_k=3"], "--set {'moe': {'top_k': 3}} (the run has None)")):
        err = _err(_cli("train", "--out", str(out), "--resume", "--steps", "4", *flags))
        assert named in err and "on resume only --steps" in err, err
    assert ckpt_io.latest_checkpoint(out).name == "ckpt-00000002"  # nothing ran
    # a flag equal to the run's own value is fine; the ones that may change are applied and named
    os.chdir(tmp_path)
    res = _cli("train", "--out", str(out), "--resume", "--steps", "4", "--batch-size", "2", "--no-progress", "--json")
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stderr and "--steps 2 -> 4" in res.stderr
    assert json.loads(res.stdout)["step"] == 4


def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_it_again(tmp_path, corpus_dir):
    cfg = tiny_cfg(tmp_path / "run", corpus_dir, steps=3, save_every=1000)
    train(cfg, progress=False)
    for ckpt in ckpt_io.checkpoint_dirs(tmp_path / "run"):  # as if killed before its first save
        import shutil

        shutil.rmtree(ckpt)
    res = _cli("train", "--out", str(tmp_path / "run"), "--resume", "--no-progress", "--json")
    assert res.returncode == 0, res.stderr
    assert "no checkpoint yet; starting it again from step 0" in res.stderr
    assert json.loads(res.stdout)["step"] == 3


def test_ctrl_c_during_an_evaluation_ends_it_at_the_next_batch(tmp_path, corpus_dir, monkeypatch):
    """A stop asked in the middle of a long evaluation does not wait for the rest of it."""
    from moekit.train import loop

    batches = []
    real_batches = loop.eval_batches

    def counted(*args):
        for i, batch in enumerate(real_batches(*args)):
            batches.append(i)
            if i == 1:
                os.kill(os.getpid(), signal.SIGINT)
            yield batch

    monkeypatch.setattr(loop, "eval_batches", counted)
    cfg = tiny_cfg(tmp_path / "run", corpus_dir, steps=50, eval_every=2, save_every=1000, eval_tokens=4096,
                   batch_size=2)
    result = train(cfg, progress=False)
    assert result.interrupted and result.step == 2 and result.val_step is None and result.exit_code == 130
    assert batches == [0, 1]  # the stop came as batch 1 was drawn: it never ran, of 64 windows due
    ckpt_io.verify(ckpt_io.latest_checkpoint(tmp_path / "run"))


def test_device_flag_is_checked_before_anything_is_written(tmp_path, corpus_dir):
    for device, named in (("tpu", "expected cpu, cuda or cuda:N"), ("cuda:7", "CUDA device(s)")):
        if device.startswith("cuda") and __import__("torch").cuda.device_count() > 7:
            continue
        err = _err(_cli(*BASE, "--steps", "1", "--data", str(corpus_dir), "--out", str(tmp_path / "r"),
                        "--device", device))
        assert f"--device={device!r} is invalid" in err and named in err
        assert not (tmp_path / "r").exists()
    res = _cli(*BASE, "--steps", "1", "--data", str(corpus_dir), "--out", str(tmp_path / "r"), "--device", "cpu")
    assert res.returncode == 0, res.stderr


def test_a_restart_by_resume_takes_the_init_checkpoint(tmp_path, corpus_dir):
    """--resume of a run stopped before its first checkpoint starts it as new: --init-from's weights too."""
    import shutil

    import torch

    train(tiny_cfg(tmp_path / "base", corpus_dir, steps=2), progress=False)
    cfg = tiny_cfg(tmp_path / "run", corpus_dir, steps=1, init_from=str(tmp_path / "base"), save_every=1000,
                   lr=1e-12, warmup=0)
    train(cfg, progress=False)
    for ckpt in ckpt_io.checkpoint_dirs(tmp_path / "run"):
        shutil.rmtree(ckpt)
    train(cfg, resume=True, progress=False)
    from safetensors.torch import load_file

    base = load_file(str(ckpt_io.latest_checkpoint(tmp_path / "base") / "model.safetensors"))
    again = load_file(str(ckpt_io.latest_checkpoint(tmp_path / "run") / "model.safetensors"))
    assert all(torch.allclose(base[k], again[k], atol=1e-6) for k in base if base[k].is_floating_point())


def test_a_second_resume_keeps_what_the_first_changed(tmp_path, corpus_dir):
    out = tmp_path / "run"
    assert _cli(*BASE, "--data", str(corpus_dir), "--out", str(out), "--steps", "2").returncode == 0
    assert _cli("train", "--out", str(out), "--resume", "--steps", "4", "--no-progress").returncode == 0
    res = _cli("train", "--out", str(out), "--resume", "--no-progress", "--json")  # finished at 4: nothing to do
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["step"] == 4


def test_a_split_shorter_than_one_window_is_refused_before_training(tmp_path):
    data = tmp_path / "one.txt"
    data.write_text("a" * 1000)  # held-out tail: 20 bytes, one short of a 20-token window's 21
    out = tmp_path / "run"
    err = _err(_cli(*BASE, "--seq-len", "20", "--steps", "2", "--data", str(data), "--out", str(out)))
    assert "split" in err and "--seq-len=20" in err and not out.exists()


def test_an_empty_out_directory_given_by_the_user_stays(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    _err(_cli(*BASE, "--steps", "2", "--data", str(tmp_path / "missing"), "--out", str(out)))
    _err(_cli(*BASE, "--steps", "2", "--set", "moe.top_k=99", "--out", str(out)))
    assert out.is_dir() and not any(out.iterdir())


def test_evaluate_restores_the_training_mode_when_it_fails(tmp_path):
    import numpy as np

    from moekit import MoETransformer
    from moekit.config import ModelConfig
    from moekit.train import evaluate

    model = MoETransformer(ModelConfig.from_name("tiny")).train()
    with pytest.raises(ValueError, match="fewer than seq_len"):
        evaluate(model, np.arange(10), 2, 16, 100)
    assert model.training


def test_train_config_checks_field_types():
    from moekit.train import TrainConfig

    for field, value in (("lr", True), ("miniature", "false"), ("steps", 2.0)):
        with pytest.raises(ValueError, match=f"TrainConfig.{field}="):
            TrainConfig(**{field: value})
