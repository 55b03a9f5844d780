"""Generation: cached decoding equals full recomputation, left padding is invisible, sampling."""

import pytest
import torch

from moekit import ModelConfig, MoETransformer
from moekit.generate import generate, sample, static_forward
from moekit.nn.kv_cache import KVCache, StaticKVCache
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
    res = subprocess.run([*run, "--max-new-tokens", "6", "--json", "--temperature", "0"], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["prompt_ids"] == list(b"hello") and len(out["ids"]) == 6
    compiled = subprocess.run([*run, "--max-new-tokens", "6", "--json", "--compile", "--temperature", "0"],
                              capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stderr
    assert json.loads(compiled.stdout)["ids"] == out["ids"]  # greedy: the compiled path picks the same tokens
    streamed = subprocess.run([*run, "--max-new-tokens", "6", "--temperature", "0"], capture_output=True, text=True)
    assert streamed.returncode == 0 and streamed.stdout == "hello" + out["text"] + "\n"  # the prompt, then the text
    too_long = subprocess.run([*run, "--max-new-tokens", "1000"], capture_output=True, text=True)
    assert too_long.returncode == 2 and "max_seq_len" in too_long.stderr and "Traceback" not in too_long.stderr


@pytest.mark.parametrize("name", ["tiny", "deepseek-v3"])
def test_static_cache_forward_equals_the_model(name):
    """The fixed-shape forward of compiled decoding (run eagerly): prefill then single tokens into a
    static cache, with left padding, give the model's own logits."""
    model = _model(name)
    B, L, C = 2, 9, 16
    seq = torch.randint(0, model.cfg.vocab_size, (B, L))
    valid = torch.ones(B, C, dtype=torch.bool)
    valid[1, :3] = False  # row 1 is left-padded by 3
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cache = StaticKVCache(len(model.layers), C)
    with torch.no_grad():
        cache.slots_S = torch.arange(5)
        got = [static_forward(model, seq[:, :5], positions[:, :5], valid, cache)]
        for t in range(5, L):
            cache.slots_S = torch.tensor([t])
            got.append(static_forward(model, seq[:, t:t + 1], positions[:, t:t + 1], valid, cache))
        want = model(seq, attention_mask=valid[:, :L]).logits
    for i, t in enumerate(range(4, L)):
        torch.testing.assert_close(got[i], want[:, t])


@pytest.mark.parametrize("name", ["deepseek-v3", pytest.param("mixtral-8x7b", marks=pytest.mark.slow),
                                  pytest.param("grok-1", marks=pytest.mark.slow),
                                  pytest.param("qwen3-30b-a3b", marks=pytest.mark.slow)])
def test_compiled_decoding_equals_eager(name):
    """compile=True (static cache, torch.compile, experts read in place) continues padded prompts with
    exactly the eager path's tokens."""
    model = _model(name)
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,)).tolist() for n in (3, 9, 6)]
    eager = generate(model, prompts, 10)
    compiled = generate(model, prompts, 10, compile=True)
    assert compiled.tokens == eager.tokens
    assert generate(model, prompts[:1], 10, compile=True).tokens[0] == eager.tokens[0]


def test_row_product_decomposition_matches_mm():
    from moekit.generate import _decode_decompositions, _row_products

    a, w = torch.randn(3, 40, dtype=torch.float64), torch.randn(24, 40, dtype=torch.float64)
    torch.testing.assert_close(_row_products(a, w.t()), a @ w.t())
    assert _row_products(torch.randn(5, 40), w.t().float()) is NotImplemented  # > 4 rows: left to the GEMM
    addmm = _decode_decompositions()[torch.ops.aten.addmm.default]
    bias = torch.randn(24, dtype=torch.float64)
    torch.testing.assert_close(addmm(bias, a, w.t()), torch.addmm(bias, a, w.t()))
    assert addmm(bias, a, w.t(), beta=2) is NotImplemented


def test_cli_prints_no_stop_token(tmp_path, monkeypatch, capsys):
    """The stop token ends the text; it is not printed (streamed or in --json's text)."""
    import json

    from moekit import checkpoint as ckpt_io
    import sys

    from moekit.cli import main
    from moekit.tokenizer import train_bpe

    tok = train_bpe(["hello world " * 50], 300)
    model = MoETransformer(miniature("tiny").replace(vocab_size=tok.vocab_size))
    ckpt_io.save_checkpoint(tmp_path / "run", 1, model, model.cfg, tok)
    ids = tok.encode("hi") + [tok.eot_id]
    gen_module = sys.modules["moekit.generate"]  # the module (moekit.generate is also the function)

    def fake_generate(model, prompts, max_new_tokens, on_token=None, stop_tokens=(), **kw):
        assert list(stop_tokens) == [tok.eot_id]
        for t in ids:
            if on_token is not None:
                on_token([t])
        return gen_module.GenerateResult([ids], [True])

    monkeypatch.setattr(gen_module, "generate", fake_generate)
    assert main(["generate", "--model", str(tmp_path / "run"), "--prompt", "x"]) == 0
    assert capsys.readouterr().out == "xhi\n"  # the prompt echoed, then the text
    assert main(["generate", "--model", str(tmp_path / "run"), "--prompt", "x", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == "hi" and out["stopped"] is True and out["ids"] == ids


def test_one_flat_prompt_and_bad_sampling_arguments():
    model = _model("tiny")
    prompt = [1, 2, 3]
    assert generate(model, prompt, 3).tokens == generate(model, [prompt], 3).tokens
    assert generate(model, torch.tensor(prompt), 3).tokens == generate(model, [prompt], 3).tokens
    for kw, named in ((dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
                      (dict(top_p=float("nan")), "top_p"), (dict(top_k=1.5), "top_k")):
        with pytest.raises(ValueError, match=named):
            generate(model, prompt, 2, **kw)
    with pytest.raises(TypeError, match="token ids"):
        generate(model, "hello", 2)
