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
