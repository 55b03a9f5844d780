"""Generation: cached decoding equals full recomputation, left padding is invisible, sampling."""

import pytest
import torch

from moekit import ModelConfig, MoETransformer
from moekit.generate import generate, sample
from moekit.nn.kv_cache import KVCache
from moekit.presets import miniature

NAMES = ["tiny", "mixtral-8x7b", "deepseek-v3", "grok-1", "qwen3-30b-a3b", "arctic"]


def _model(name):
    torch.manual_seed(0)
    cfg = miniature(name) if name != "tiny" else ModelConfig.from_name("tiny")
    model = MoETransformer(cfg).double().eval()
    with torch.no_grad():  # sharper weights than the init, so greedy choices are not near-ties
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4)
    return model


def _naive_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("name", NAMES)
def test_cached_decoding_equals_full_recomputation(name):
    model = _model(name)
    prompt = torch.randint(0, model.cfg.vocab_size, (7,)).tolist()
    # logits step by step from the cache equal a full forward over the same tokens
    seq = torch.randint(0, model.cfg.vocab_size, (2, 12))
    cache = KVCache(len(model.layers), 12)
    pieces = [model(seq[:, :5], cache=cache).logits]
    for t in range(5, 12):
        pieces.append(model(seq[:, t:t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), model(seq).logits)
    assert generate(model, [prompt], 10).tokens[0] == _naive_greedy(model, prompt, 10)


@pytest.mark.parametrize("name", ["tiny", "deepseek-v3"])
def test_left_padding_is_invisible(name):
    model = _model(name)
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,)).tolist() for n in (3, 9, 6)]
    batch = generate(model, prompts, 8).tokens
    for p, out in zip(prompts, batch):
        assert out == generate(model, [p], 8).tokens[0]


def test_stop_tokens_and_streaming():
    model = _model("tiny")
    prompt = [1, 2, 3]
    free = generate(model, [prompt], 12).tokens[0]
    stop = free[4]
    seen = []
    res = generate(model, [prompt], 12, stop_tokens=[stop], on_token=seen.append)
    assert res.tokens[0] == free[: free.index(stop) + 1] and res.finished == [True]
    assert [s[0] for s in seen] == res.tokens[0]


def test_sampling_is_reproducible_with_a_seed_and_respects_top_k():
    model = _model("tiny")
    a = generate(model, [[5, 6]], 20, temperature=1.0, top_k=5, seed=3).tokens
    b = generate(model, [[5, 6]], 20, temperature=1.0, top_k=5, seed=3).tokens
    assert a == b
    logits = torch.randn(4, 50)
    top5 = logits.topk(5, dim=-1).indices
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        pick = sample(logits, 1.0, 5, None, g)
        assert all(int(p) in top5[i].tolist() for i, p in enumerate(pick))
    # top-p close to 0 keeps only the most likely token
    assert torch.equal(sample(logits, 1.0, None, 1e-6, g), logits.argmax(-1))


def test_bad_arguments():
    model = _model("tiny")
    with pytest.raises(ValueError, match="max_seq_len=256"):
        generate(model, [[1] * 250], 10)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[1]], 2, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], 2, temperature=1, top_p=0)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], 2)


def test_cli_generate_on_a_trained_run(tmp_path, monkeypatch):
    import json
    import subprocess
    import sys

    from moekit.train import TrainConfig, train

    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data.txt"
    data.write_text("hello world, hello moe. " * 400)
    train(TrainConfig(preset="tiny", data=str(data), out=str(tmp_path / "run"), steps=3, batch_size=2, seq_len=32,
                      eval_every=3, eval_tokens=64, val_fraction=0.5), progress=False)
    run = [sys.executable, "-m", "moekit", "generate", "--model", str(tmp_path / "run"), "--prompt", "hello"]
    res = subprocess.run([*run, "--max-new-tokens", "6", "--json"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["prompt_ids"] == list(b"hello") and len(out["ids"]) == 6
    streamed = subprocess.run([*run, "--max-new-tokens", "6"], capture_output=True, text=True)
    assert streamed.returncode == 0 and streamed.stdout == out["text"] + "\n"
    too_long = subprocess.run([*run, "--max-new-tokens", "1000"], capture_output=True, text=True)
    assert too_long.returncode == 2 and "max_seq_len" in too_long.stderr and "Traceback" not in too_long.stderr
