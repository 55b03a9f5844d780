"""Weight-only quantization (moekit.quant): the kernels against the dequantize-then-matmul reference,
the round-trip error bounds, the quantized experts against the dequantized reference layer, state dicts."""

from __future__ import annotations

import pytest
import torch

from moekit.config import MoEConfig
from moekit.moe.backends.registry import get as get_backend
from moekit.moe.layer import MoELayer
from moekit.moe.reference import reference_forward
from moekit.quant import ops
from moekit.quant.config import QuantConfig
from moekit.quant.modules import QuantizedExperts, QuantizedLinear
from moekit.quant.reference import dequantize, dequantized_linear


def _w(N, K, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g) * scale


# ---- kernels and error bounds ----------------------------------------------------------------------
@pytest.mark.parametrize("N,K", [(16, 64), (48, 96), (7, 33)])
def test_int8_round_trip_within_half_a_scale(N, K):
    w = _w(N, K) * torch.linspace(0.01, 10, N)[:, None]  # rows of very different magnitudes
    r = ops.quantize_int8(w)
    assert r.q_NK.dtype == torch.int8 and r.q_NK.abs().max() <= 127
    err = (ops.dequantize_int8(r.q_NK, r.scale_N) - w).abs()
    assert (err <= r.scale_N.float()[:, None] / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("G", [32, 64, 128])
def test_int4_round_trip_within_half_a_scale(G, symmetric):
    N, K = 32, 256
    w = _w(N, K, seed=G) + 0.5  # groups off-centre: the zero matters
    r = ops.quantize_int4(w, G, symmetric)
    assert r.q_NK.min() >= 0 and r.q_NK.max() <= 15
    deq = ops.dequantize_int4(r.q_NK, r.scale_zero_KgN2, G)
    s_NK = r.scale_zero_KgN2[..., 0].float().t().repeat_interleave(G, dim=1)
    z_NK = r.scale_zero_KgN2[..., 1].float().t().repeat_interleave(G, dim=1)
    bound = s_NK / 2 + (0 if symmetric else z_NK.abs() * 2**-9)  # + the bf16 rounding of the zero
    assert ((deq - w).abs() <= bound * (1 + 1e-5) + 1e-7).all()
    if symmetric:
        assert (z_NK == 0).all()


def test_int4_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="group_size=32"):
        ops.quantize_int4(_w(16, 48), 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        ops.quantize_int4(_w(10, 64), 32)
    with pytest.raises(ValueError, match="group_size=16"):
        ops.quantize_int4(_w(16, 64), 16)


@pytest.mark.parametrize("N,K", [(16, 64), (48, 128), (32, 96)])
def test_cpu_int4_packing_reads_back(N, K):
    q = torch.randint(0, 16, (N, K), generator=torch.Generator().manual_seed(1))
    packed = ops.to_cpu_int4(q)
    assert torch.equal(ops.from_cpu_int4(packed, N, K), q.int())
    assert torch.equal(ops.unpack_nibbles(ops.pack_nibbles(q)), q.int())


@pytest.mark.parametrize("M", [1, 3, 8, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_matches_reference(M, dtype):
    N, K = 48, 128
    r = ops.quantize_int8(_w(N, K))
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype)
    got = ops.int8_mm(x, r.q_NK, r.scale_N)
    want = ops.reference_mm(x.float(), ops.dequantize_int8(r.q_NK, r.scale_N))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want, atol=tol * want.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("M", [1, 3, 8, 64])
@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kernel_matches_reference(M, G, dtype):
    N, K = 32, 256
    r = ops.quantize_int4(_w(N, K, seed=3), G)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype)
    got = ops.int4_mm(x, ops.to_cpu_int4(r.q_NK), r.scale_zero_KgN2, G)
    want = ops.reference_mm(x.float(), ops.dequantize_int4(r.q_NK, r.scale_zero_KgN2, G))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want, atol=tol * want.abs().max().item(), rtol=tol)


def test_quant_config_validates():
    with pytest.raises(ValueError, match="QuantConfig.format='int3'"):
        QuantConfig("int3")
    with pytest.raises(ValueError, match="QuantConfig.group_size=48"):
        QuantConfig("int4", group_size=48)
    with pytest.raises(ValueError, match="QuantConfig.symmetric"):
        QuantConfig("int8", symmetric=True)
    q = QuantConfig("int4", group_size=64, linears=True)
    assert QuantConfig.from_dict(q.to_dict()) == q


# ---- quantized experts -----------------------------------------------------------------------------
def _layer(fmt, act_dtype="input", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = MoEConfig(d_model=64, expert_hidden=96, num_experts=4, top_k=2, **kw)
    layer = MoELayer(cfg).eval()
    layer.experts = QuantizedExperts.from_experts(layer.experts, QuantConfig(fmt, act_dtype=act_dtype))
    return layer


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("act_dtype", ["input", "bfloat16"])
@pytest.mark.parametrize("tokens", [1, 3, 8, 96])  # decode (1-8 tokens) and prefill sizes
def test_quantized_experts_match_dequantized_reference(fmt, act_dtype, tokens):
    layer = _layer(fmt, act_dtype, num_shared_experts=1, shared_expert_hidden=32)
    ref_layer = dequantize(layer)
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        got = layer(x).output
    want = reference_forward(ref_layer, x).output.detach()
    tol = 1e-5 if act_dtype == "input" else 2e-2
    torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=tol)
    assert layer.experts.backend_for(x) == "quantized"


def test_quantized_experts_with_biases_and_ungated_activation():
    layer = _layer("int8", mlp_bias=True, activation="gelu")
    with torch.no_grad():
        layer.experts.b_in.normal_()
        layer.experts.b_out.normal_()
    x = torch.randn(10, 64)
    with torch.no_grad():
        got = layer(x).output
    want = reference_forward(dequantize(layer), x).output.detach()
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)


def test_quantized_backend_refuses_backward():
    layer = _layer("int8")
    x = torch.randn(4, 64, requires_grad=True)
    out = layer(x).output  # forward runs under grad mode
    with pytest.raises(RuntimeError, match="expert backend 'quantized' is inference-only"):
        out.sum().backward()
    assert get_backend("quantized").name == "quantized"


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_experts_state_dict_round_trip(fmt):
    layer = _layer(fmt)
    sd = layer.state_dict()
    assert "experts.w_in_q" in sd and "experts.w_in" not in sd
    if fmt == "int4":  # the portable form: plain nibbles, whatever the CPU kernel's packing
        q_NK = ops.from_cpu_int4(layer.experts.w_in_q[1], 192, 64)
        assert torch.equal(sd["experts.w_in_q"][1], ops.pack_nibbles(q_NK))
    other = _layer(fmt, seed=1)
    other.load_state_dict(sd)
    x = torch.randn(6, 64)
    with torch.no_grad():
        assert torch.equal(other(x).output, layer(x).output)


def test_int4_state_dict_refuses_a_wrong_shape():
    layer = _layer("int4")
    sd = layer.state_dict()
    sd["experts.w_in_q"] = sd["experts.w_in_q"][:, :, :-1]
    with pytest.raises(RuntimeError, match="experts.w_in_q: expected uint8"):
        layer.load_state_dict(sd)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_linear_matches_reference(fmt):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48, bias=True)
    q = QuantizedLinear.from_linear(lin, QuantConfig(fmt, act_dtype="input"))
    x = torch.randn(2, 3, 128)
    with torch.no_grad():
        got, want = q(x), dequantized_linear(q)(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (q.weight - lin.weight).abs().max() < 0.1


# ---- whole models: quantize_model, checkpoints, quality ---------------------------------------------
def _model(seed=0, init_std=0.1):
    import moekit

    torch.manual_seed(seed)
    return moekit.MoETransformer(moekit.ModelConfig.from_name("tiny", init_std=init_std)).eval()


def _batches():
    from moekit.quant.quality import random_batches

    return random_batches(256, batches=2, batch_size=2, seq_len=24)


@pytest.mark.parametrize("fmt,linears", [("int8", False), ("int4", False), ("int4", True)])
def test_quantize_model_matches_its_dequantized_twin(fmt, linears):
    from moekit.quant import quantization_of, quantize_model

    model = _model()
    summary = quantize_model(model, fmt, group_size=32, linears=linears, act_dtype="input")
    assert summary.experts == 2 and summary.bytes_after < summary.bytes_before / 3
    assert (summary.linears > 0) == linears
    assert quantization_of(model).format == fmt
    assert not any(type(m).__name__ == "Experts" for m in model.modules())
    ids = _batches()[0]
    with torch.no_grad():
        got, want = model(ids).logits, dequantize(model)(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, fmt)


def test_quantize_model_refuses_a_model_without_experts():
    from moekit.quant import quantize_model

    with pytest.raises(ValueError, match="no MoE experts"):
        quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), "int8")


def test_quality_int8_tiny_int4_larger_but_bounded():
    import copy

    from moekit.quant import quality, quantize_model

    model, batches = _model(), _batches()
    same = quality(model, copy.deepcopy(model), batches)
    assert same.kl == pytest.approx(0, abs=1e-12) and same.top1_agreement == 1 and same.ppl_change == pytest.approx(0)
    reports = {}
    for fmt in ("int8", "int4"):
        q = copy.deepcopy(model)
        quantize_model(q, fmt)
        reports[fmt] = quality(model, q, batches)
    assert reports["int8"].kl < 3e-3 and reports["int8"].top1_agreement >= 0.97
    assert reports["int8"].kl < reports["int4"].kl < 0.05
    assert abs(reports["int4"].ppl_change) < 0.02
    assert "KL" in reports["int4"].describe()


@pytest.mark.parametrize("fmt,linears", [("int8", True), ("int4", False), ("int4", True)])
def test_quantized_checkpoint_round_trip(tmp_path, fmt, linears):
    import moekit
    from moekit.quant import quantization_of, quantize_model, save_quantized

    model = _model()
    quantize_model(model, fmt, group_size=32, linears=linears)
    ckpt = save_quantized(model, tmp_path / "q")
    assert (ckpt / "quant.json").is_file()
    loaded = moekit.from_pretrained(tmp_path / "q")
    assert quantization_of(loaded) == quantization_of(model)
    ids = _batches()[0]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert all(not t.is_meta for t in loaded.state_dict().values())


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "quant_json"])
def test_damaged_quantized_checkpoint_is_one_clear_error(tmp_path, damage):
    import moekit
    from moekit.checkpoint import CheckpointError
    from moekit.quant import quantize_model, save_quantized

    model = _model()
    quantize_model(model, "int4")
    ckpt = save_quantized(model, tmp_path / "q")
    weights = ckpt / "model.safetensors"
    if damage == "corrupt":
        data = bytearray(weights.read_bytes())
        data[-100] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-1000])
    else:
        (ckpt / "quant.json").write_text('{"format": 1, "quant": {"format": "int3"}}\n')
    with pytest.raises(CheckpointError, match=str(ckpt)):
        moekit.from_pretrained(tmp_path / "q")


def test_generate_on_a_quantized_model_equals_its_dequantized_twin():
    import moekit
    from moekit.quant import quantize_model

    model = _model()
    quantize_model(model, "int4", act_dtype="input")
    prompts = [[1, 2, 3], [4, 5, 6]]
    out = moekit.generate(model, prompts, max_new_tokens=6, temperature=0)
    assert out.tokens == moekit.generate(dequantize(model), prompts, max_new_tokens=6, temperature=0).tokens
    assert all(len(t) == 6 for t in out.tokens)


def test_from_pretrained_quantizes_while_loading(tmp_path):
    import moekit
    from moekit.checkpoint import save_checkpoint
    from moekit.quant import quantization_of, quantize_model

    model = _model()
    save_checkpoint(tmp_path / "run", 5, model, model.cfg, None)
    q = moekit.from_pretrained(tmp_path / "run", quantize="int8")
    assert quantization_of(q).format == "int8"
    quantize_model(model, "int8")  # the same weights quantized in memory
    ids = _batches()[0]
    with torch.no_grad():
        assert torch.equal(q(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="QuantConfig.format='int5'"):
        moekit.from_pretrained(tmp_path / "run", quantize="int5")


# ---- moekit quantize ---------------------------------------------------------------------------------
def _saved_model(tmp_path):
    from moekit.checkpoint import save_checkpoint
    from moekit.tokenizer import ByteTokenizer

    model = _model()
    save_checkpoint(tmp_path / "run", 3, model, model.cfg, ByteTokenizer())
    return model


@pytest.mark.parametrize("extra", [[], ["--text", "TEXT"]])
def test_cli_quantize_saves_and_prints_quality(tmp_path, capsys, extra):
    import json

    import moekit
    from moekit.cli import main
    from moekit.quant import quantization_of, quantize_model

    model = _saved_model(tmp_path)
    if extra:
        text = tmp_path / "held_out.txt"
        text.write_text("def add(a, b):\n    return a + b\n" * 40)
        extra = ["--text", str(text)]
    rc = main(["quantize", "--model", str(tmp_path / "run"), "--to", "int4", "--group-size", "64", "--out",
               str(tmp_path / "q"), "--batches", "2", "--seq-len", "32", *extra])
    assert rc == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["quantization"]["format"] == "int4" and result["quantization"]["group_size"] == 64
    assert 0 < result["quality"]["kl"] < 0.05 and 0.5 < result["quality"]["top1_agreement"] <= 1
    assert result["quality"]["positions"] == 2 * 2 * 31
    assert "top-1 agreement" in captured.err
    loaded = moekit.from_pretrained(tmp_path / "q")
    assert quantization_of(loaded).group_size == 64
    quantize_model(model, "int4", group_size=64)
    ids = _batches()[0]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_cli_quantize_refuses_a_damaged_model_and_writes_nothing(tmp_path, capsys):
    from moekit.cli import main

    _saved_model(tmp_path)
    ckpt = next((tmp_path / "run").glob("ckpt-*"))
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-500])
    rc = main(["quantize", "--model", str(tmp_path / "run"), "--to", "int8", "--out", str(tmp_path / "q")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "model.safetensors is corrupt" in err and err.count("\n") == 1
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("routing", [{"capacity_factor": 1.0}, {"router": "expert_choice", "capacity_factor": 1.0}])
def test_quantized_experts_with_dropping_and_expert_choice_routing(routing):
    layer = _layer("int4", **routing)
    x = torch.randn(24, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = layer(x)
    ref = reference_forward(dequantize(layer), x)
    if "router" not in routing:
        assert ref.dropped_assignments > 0  # the capacity drops something here
    torch.testing.assert_close(got.output, ref.output.detach(), atol=1e-5 * ref.output.abs().max().item(), rtol=1e-5)


@pytest.mark.slow  # (compiles the decode step)
def test_compiled_generate_on_a_quantized_model_equals_eager():
    import moekit
    from moekit.quant import quantize_model

    model = _model()
    quantize_model(model, "int4", act_dtype="input", linears=True)
    prompts = [[1, 2, 3], [4, 5]]
    eager = moekit.generate(model, prompts, max_new_tokens=5, temperature=0)
    assert moekit.generate(model, prompts, max_new_tokens=5, temperature=0, compile=True).tokens == eager.tokens
