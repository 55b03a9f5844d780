"""Fault injection: kills at random moments, corrupted files, non-finite numbers, collapse, pickles,
distributed failures, fuzzed configs and command lines. Nothing may be lost or half-written.

    MOEKIT_FUZZ_EXAMPLES=2000 python -m pytest -m faults    # the whole suite (20 kills): see the README
    python -m pytest                # the default run takes the fast subset
"""

import functools
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

from conftest import tiny_cfg
from moekit import checkpoint as ckpt_io
from moekit.train import TrainConfig, train

pytestmark = pytest.mark.faults
FUZZ = int(os.environ.get("MOEKIT_FUZZ_EXAMPLES", "100"))  # examples per fuzz test (the full suite: 2000)

tiny_cfg = functools.partial(tiny_cfg, log_every=1)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))


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

    def patched(self, x, *args, **kwargs):
        res = original(self, x, *args, **kwargs)
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


def test_skip_nonfinite_with_routers_that_keep_no_balancing_load(tmp_path, corpus_dir, monkeypatch):
    """Expert choice has no aux-loss-free bias (and no load buffer): skipping a step must not trip on it."""
    _poison_layer(monkeypatch, layer=0, calls={2, 3})
    moe = {"router": "expert_choice", "capacity_factor": 1.0, "aux_loss_coef": 0.0}
    cfg = tiny_cfg(tmp_path / "r", corpus_dir, steps=5, save_every=5, eval_every=100, skip_nonfinite=True,
                   model_overrides={"moe": moe})
    result = train(cfg, progress=False)
    assert result.step == 5 and json.loads((tmp_path / "r" / "ckpt-00000005" / "state.json").read_text())[
        "skipped_nonfinite"] == 1


def test_router_collapse_is_flagged(tmp_path, corpus_dir, monkeypatch, capsys):
    from moekit.moe.routers import Router
    from moekit.train.metrics import collapsed_experts

    assert collapsed_experts([1, 1, 1, 1]) == {}
    assert collapsed_experts([10, 10, 10, 0.5]) == {"starved": [3]}
    assert collapsed_experts([13, 1, 1, 1]) == {"hot": [0]}

    original = Router.select

    def forced(self, scores_TE, topk=None):  # every token to experts 0 and 1
        ids, _ = original(self, scores_TE, topk)
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
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _logged_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0  # not there yet, or a line half-written at this instant


def _kill_campaign(tmp_path, corpus_dir, kills: int, seed: int):
    """SIGKILLs one run ``kills`` times at seeded random moments, resuming each time; returns (kills
    that landed, kills that left a checkpoint half-written). Odd kills wait for a checkpoint write to
    begin; even ones for a random step still ahead, plus a random fraction of a step."""
    steps = 40
    ref = tiny_cfg(tmp_path / "ref", corpus_dir, steps=steps, save_every=2, eval_every=20, keep_last=3)
    ref_proc = _start(ref, False)  # the same kind of process as the killed ones: same threads, same sums
    _, err = ref_proc.communicate(timeout=300)
    assert ref_proc.returncode == 0, err.decode()[-2000:]
    cfg = tiny_cfg(tmp_path / "run", corpus_dir, steps=steps, save_every=2, eval_every=20, keep_last=3)
    run = tmp_path / "run"
    rng = random.Random(seed)
    landed = mid_write = 0
    resume = False
    for i in range(kills):
        proc = _start(cfg, resume)
        last_target = steps - 8  # leave the run steps to do, so that the kill lands before it ends
        target = rng.randint(min(_logged_step(run) if run.exists() else 0, last_target), last_target)
        pause = rng.uniform(0, 0.05)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if i % 2:  # aim at a checkpoint write: kill the moment its temporary directory appears
                if run.exists() and any(p.name.startswith(".tmp-") for p in run.iterdir()):
                    break
            elif _logged_step(run) >= target:
                time.sleep(pause)
                break
            time.sleep(0.0005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            landed += 1
        proc.communicate(timeout=60)  # also closes its pipes
        mid_write += any(p.name.startswith(".tmp-") for p in run.iterdir()) if run.exists() else 0
        for ckpt in ckpt_io.checkpoint_dirs(run) if run.exists() else []:
            ckpt_io.verify(ckpt)  # never a half-written checkpoint: every file matches its manifest
        resume = ckpt_io.latest_checkpoint(run) is not None if run.exists() else False
        if run.exists() and not resume:
            shutil.rmtree(run)  # killed before its first checkpoint: start again
    proc = _start(cfg, resume)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    a, b = _weights(tmp_path / "ref"), _weights(run)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run after {landed} kills: {differ[:5]}"
    return landed, mid_write


def test_sigkill_at_random_moments_loses_nothing(tmp_path, corpus_dir):
    landed, mid_write = _kill_campaign(tmp_path, corpus_dir, kills=4, seed=0)
    assert landed >= 3, f"only {landed} of 4 kills landed before the run ended"


def test_kill_while_pruning_old_checkpoints_leaves_each_whole_or_gone(tmp_path, monkeypatch):
    """keep_last deletes old checkpoints; a kill halfway through a deletion (simulated: the removal
    stops after one file) must not leave a listed checkpoint with files missing."""
    import moekit
    from moekit.tokenizer import ByteTokenizer

    model = moekit.MoETransformer(moekit.ModelConfig.from_name("tiny"))
    run = tmp_path / "run"
    for step in (1, 2):
        ckpt_io.save_checkpoint(run, step, model, model.cfg, ByteTokenizer(), keep_last=2)

    def killed_rmtree(path, *args, **kwargs):
        next(p for p in sorted(Path(path).iterdir()) if p.name != "manifest.json").unlink()
        raise KeyboardInterrupt  # stands for SIGKILL: nothing after this runs

    monkeypatch.setattr(ckpt_io.shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        ckpt_io.save_checkpoint(run, 3, model, model.cfg, ByteTokenizer(), keep_last=2)
    monkeypatch.undo()
    assert [p.name for p in ckpt_io.checkpoint_dirs(run)] == ["ckpt-00000002", "ckpt-00000003"]
    for ckpt in ckpt_io.checkpoint_dirs(run):
        ckpt_io.verify(ckpt)
    ckpt_io.clean_partial(run)  # what a resumed run does first
    assert sorted(p.name for p in run.iterdir()) == ["ckpt-00000002", "ckpt-00000003"]


@pytest.mark.slow
def test_sigkill_twenty_times_loses_nothing(tmp_path, corpus_dir):
    landed, mid_write = _kill_campaign(tmp_path, corpus_dir, kills=20, seed=1)
    print(json.dumps({"kills": 20, "landed": landed, "during_checkpoint_write": mid_write}))
    assert landed >= 15 and mid_write >= 3


# ---- corrupted and hostile inputs -----------------------------------------------------------------
transformers = pytest.importorskip("transformers")


def _hf_dir(tmp_path, shard=False) -> Path:
    cfg = transformers.MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=128)
    torch.manual_seed(0)
    out = tmp_path / "hf"
    transformers.MixtralForCausalLM(cfg).save_pretrained(out, max_shard_size="20KB" if shard else "5GB")
    return out


def _moekit_ckpt(tmp_path) -> Path:
    import moekit
    from moekit.tokenizer import ByteTokenizer

    model = moekit.MoETransformer(moekit.ModelConfig.from_name("tiny"))
    return ckpt_io.save_checkpoint(tmp_path / "run", 1, model, model.cfg, ByteTokenizer())


def _tree_digest(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _edit_json(path: Path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _flip_header_byte(path: Path, token: bytes):
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    at = raw.index(token, 8, 8 + n)
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


HF_CORRUPTIONS = {
    "truncated_safetensors": (lambda d: _truncate(d / "model.safetensors"), "model.safetensors"),
    "flipped_dtype_byte": (lambda d: _flip_header_byte(d / "model.safetensors", b'"F32"'), "model.safetensors"),
    "flipped_offset_byte": (lambda d: _flip_header_byte(d / "model.safetensors", b'"data_offsets":[0,'),
                            "model.safetensors"),
    "flipped_name_byte": (lambda d: _flip_header_byte(d / "model.safetensors", b"embed_tokens"), "embed"),
    "config_wrong_type": (lambda d: _edit_json(d / "config.json", lambda c: c.update(num_local_experts="four")),
                          "config.json"),
    "config_missing_field": (lambda d: _edit_json(d / "config.json", lambda c: c.pop("hidden_size")),
                             "config.json: missing field 'hidden_size'"),
    "config_not_json": (lambda d: (d / "config.json").write_text("{not json"), "config.json"),
    "pickle_weights": (lambda d: ((d / "model.safetensors").unlink(), torch.save({"w": torch.zeros(1)},
                                                                                 d / "pytorch_model.bin")),
                       "pytorch_model.bin is a pickle-based checkpoint"),
}


@pytest.mark.parametrize("case", list(HF_CORRUPTIONS))
def test_corrupted_hf_directory_gets_one_clear_error_and_writes_nothing(tmp_path, case):
    src = _hf_dir(tmp_path)
    corrupt, needle = HF_CORRUPTIONS[case]
    corrupt(src)
    before = _tree_digest(src)
    res = _cli("convert", "--from-hf", src, "--out", tmp_path / "out")
    _clear_error(res, needle)
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert _tree_digest(src) == before  # nothing touched


def test_index_naming_missing_or_escaping_shards(tmp_path):
    src = _hf_dir(tmp_path, shard=True)
    index = src / "model.safetensors.index.json"
    victim = sorted(set(json.loads(index.read_text())["weight_map"].values()))[-1]
    (src / victim).rename(tmp_path / victim)
    _clear_error(_cli("convert", "--from-hf", src, "--out", tmp_path / "out"), f"shard {src / victim}")
    (tmp_path / victim).rename(src / victim)
    _edit_json(index, lambda d: d["weight_map"].update({k: "../" + v for k, v in d["weight_map"].items()}))
    _clear_error(_cli("convert", "--from-hf", src, "--out", tmp_path / "out"), "is not a plain file name")


def test_bad_tokenizer_file_is_named(tmp_path):
    src = _hf_dir(tmp_path)
    (src / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    _clear_error(_cli("generate", "--model", src, "--prompt", "x"), "tokenizer.json")


MOEKIT_CORRUPTIONS = {
    "truncated_weights": (lambda c: _truncate(c / "model.safetensors"), "model.safetensors is corrupt"),
    "flipped_weight_byte": (lambda c: _flip_header_byte(c / "model.safetensors", b'"F32"'),
                            "model.safetensors is corrupt"),
    "edited_config": (lambda c: _edit_json(c / "config.json", lambda d: d["model"].update(d_model="wide")),
                      "config.json is corrupt"),
    "missing_file": (lambda c: (c / "tokenizer.json").unlink() if (c / "tokenizer.json").exists()
                     else (c / "model.safetensors").unlink(), "is missing (listed in the manifest)"),
    "escaping_manifest": (lambda c: _edit_json(c / "manifest.json", lambda m: m.update({"../../etc/passwd": {
        "size": 1, "sha256": "0"}})), "'../../etc/passwd' is not a plain file name"),
    "manifest_not_json": (lambda c: (c / "manifest.json").write_text("[1, 2"), "manifest.json is corrupt"),
}


@pytest.mark.parametrize("case", list(MOEKIT_CORRUPTIONS))
def test_corrupted_moekit_checkpoint_is_refused_by_name(tmp_path, case):
    ckpt = _moekit_ckpt(tmp_path)
    corrupt, needle = MOEKIT_CORRUPTIONS[case]
    corrupt(ckpt)
    before = _tree_digest(ckpt)
    _clear_error(_cli("eval", "--model", ckpt), needle)
    _clear_error(_cli("convert", "--to-hf", ckpt, "--out", tmp_path / "out"), needle)
    assert not (tmp_path / "out").exists() and _tree_digest(ckpt) == before


def test_crafted_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    import pickle

    evil = tmp_path / "model.pt"
    evil.write_bytes(pickle.dumps(Payload()))
    renamed = tmp_path / "weights"  # no telling suffix: recognised by its bytes
    renamed.write_bytes(evil.read_bytes())
    for path in (evil, renamed):
        _clear_error(_cli("eval", "--model", path), "pickle-based checkpoint")
        _clear_error(_cli("generate", "--model", path, "--prompt", "x"), "pickle-based checkpoint")
    assert not marker.exists()


# ---- fuzzing --------------------------------------------------------------------------------------
ANY_VALUE = st.one_of(st.integers(-3, 70), st.floats(-1e3, 1e3), st.sampled_from([float("nan"), float("inf")]),
                      st.booleans(), st.none(), st.sampled_from(["", "x", "swiglu", "sigmoid", "score", "same", "max",
                                                                 "gqa", "mla", "head", "full", "layernorm"]))
MOE_FIELDS = ["num_experts", "top_k", "router", "normalize_weights", "normalize_p", "softmax_order",
              "routed_scaling_factor", "router_jitter", "n_group", "topk_group", "group_score", "aux_loss_coef",
              "lb_convention", "z_loss_coef", "seq_aux_loss_coef", "bias_update_rate", "capacity_factor",
              "eval_capacity_factor", "drop_policy", "activation", "mlp_bias", "num_shared_experts",
              "shared_expert_hidden", "shared_expert_gate", "dense_hidden", "init_std"]


def _names_a_field(message: str) -> bool:
    """The config errors' form: ``MoEConfig.<field>=<value> is invalid: <what is allowed>``."""
    import re

    return re.search(r"(MoEConfig|ModelConfig)\.\w+=.* is invalid: ", message) is not None


@settings(max_examples=FUZZ, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(MOE_FIELDS), ANY_VALUE, max_size=4), st.integers(1, 5))
def test_fuzzed_moe_configs_build_a_working_layer_or_name_the_field(fields, tokens):
    from moekit import MoEConfig, MoELayer

    try:
        cfg = MoEConfig(d_model=8, expert_hidden=4, **fields)
    except ValueError as err:
        assert _names_a_field(str(err)), (fields, str(err))
        return
    layer = MoELayer(cfg)
    out = layer(torch.randn(tokens, 8))
    assert out.output.shape == (tokens, 8) and torch.isfinite(out.output).all(), fields
    assert out.aux_loss.shape == () and torch.isfinite(out.aux_loss)


MODEL_FIELDS = ["n_layers", "n_heads", "n_kv_heads", "head_dim", "attention", "qkv_bias", "qk_norm", "clip_qkv",
                "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "q_lora_rank", "norm",
                "ffn_hidden", "moe_every", "first_k_dense", "tie_embeddings", "attn_logit_softcap", "rope_theta",
                "max_seq_len", "parallel_residual_mlp", "sandwich_norm", "embedding_multiplier"]


@settings(max_examples=FUZZ, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(MODEL_FIELDS), ANY_VALUE, max_size=4), st.booleans())
def test_fuzzed_model_configs_build_a_working_model_or_name_the_field(fields, with_moe):
    from moekit import ModelConfig, MoEConfig, MoETransformer

    moe = MoEConfig(d_model=16, expert_hidden=8, num_experts=4, top_k=2) if with_moe else None
    try:
        cfg = ModelConfig(vocab_size=32, d_model=16, **{"n_layers": 2, "n_heads": 2, "ffn_hidden": 24, **fields},
                          moe=moe)
    except ValueError as err:
        assert _names_a_field(str(err)), (fields, str(err))
        return
    S = min(4, cfg.max_seq_len)
    logits = MoETransformer(cfg)(torch.randint(0, 32, (2, S))).logits
    assert logits.shape == (2, S, 32) and torch.isfinite(logits).all(), fields


CLI_TOKENS = {
    "train": ["--steps", "--batch-size", "--seq-len", "--lr", "--warmup", "--grad-clip", "--preset", "--set",
              "--ep", "--dtype", "--tokenizer", "--vocab-size", "--resume", "--overwrite", "--init-from",
              "--skip-nonfinite", "--keep-last", "--miniature", "--grad-accum"],
    "eval": ["--model", "--batch-size", "--seq-len", "--max-tokens", "--data"],
    "generate": ["--model", "--prompt", "--max-new-tokens", "--temperature", "--top-p", "--top-k", "--seed", "--json"],
    "convert": ["--from-hf", "--to-hf", "--out", "--architecture"],
    "params": ["--json"],
}
CLI_VALUES = ["0", "-1", "3", "1e9", "nan", "inf", "abc", "", "tiny", "gpt9", "bf16", "fp16", "bpe",
              "moe.top_k=0", "moe.router=x", "n_layers=two", "foo.bar=1", "moe=3", "d_model=-4", "/nonexistent",
              "{}"]


@settings(max_examples=FUZZ, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(CLI_TOKENS)), st.data())
def test_fuzzed_command_lines_never_end_in_a_traceback(tmp_path, capsys, verb, data):
    from moekit.cli import main

    words = data.draw(st.lists(st.one_of(st.sampled_from(CLI_TOKENS[verb]), st.sampled_from(CLI_VALUES)),
                               max_size=7))
    if verb == "train":  # whatever the options, never start a real run
        words += ["--data", "/nonexistent", "--out", str(tmp_path / "run"), "--no-progress"]
    if verb == "convert":
        words += ["--out", str(tmp_path / "conv")]
    if verb == "params":
        words = [data.draw(st.sampled_from(["tiny", "mixtral-8x7b", "gpt9", ""])), *words]
    try:
        code = main([verb, *words])
    except SystemExit as exit_:  # argparse: usage errors exit 2 with a message
        code = exit_.code
    err = capsys.readouterr().err
    assert code in (0, 2), (verb, words, err)
    assert "Traceback" not in err and "unexpected error" not in err, (verb, words, err)


# ---- distributed ----------------------------------------------------------------------------------
@pytest.mark.dist
def test_a_killed_rank_ends_the_job_and_the_run_resumes(tmp_path, corpus_dir):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "moekit", "train", "--preset", "tiny", "--data", str(corpus_dir), "--out", str(run),
                             "--steps", "400", "--batch-size", "4", "--seq-len", "32", "--save-every", "5",
                             "--eval-every", "1000", "--ep", "2", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 120
    while ckpt_io.latest_checkpoint(run) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    t = time.monotonic()
    os.kill(int(workers[1]), signal.SIGKILL)  # rank 1 dies mid-step, without a word
    proc.communicate(timeout=120)
    took = time.monotonic() - t
    print(json.dumps({"killed_rank_job_exit_s": round(took, 2), "returncode": proc.returncode}))
    assert proc.returncode != 0 and took < 60, (proc.returncode, took)
    last = ckpt_io.latest_checkpoint(run)
    ckpt_io.verify(last)
    step = int(last.name.split("-")[1])
    res = _cli("train", "--out", run, "--resume", "--ep", "1", "--steps", step + 3, "--no-progress",
               env={"MOEKIT_CACHE": os.environ["MOEKIT_CACHE"]})
    assert res.returncode == 0, res.stderr[-2000:]
    assert ckpt_io.latest_checkpoint(run).name == f"ckpt-{step + 3:08d}"
