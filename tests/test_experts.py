"""The expert backends (moekit.moe.backends: the slice loop in Python and in C++, grouped_mm, the decode
step's gather) against each other and the reference. The C++ loop's own tests: test_native.py."""

import pytest
import torch

from moekit import MoEConfig, MoELayer, reference_forward
from moekit.cpu import build, options
from moekit.cpu.loop import NativeLoopExperts
from moekit.cpu.rows import bucketed_rows
from moekit.moe import backends
from moekit.moe.backends import chooser
from moekit.moe.backends.gather import gather_experts
from moekit.moe.backends.loop import LoopExperts
from moekit.moe.dispatch import plan_token_choice
from moekit.moe.experts import Experts

from conftest import grads_of, make_layer

has_native = build.load() is not None


def _fast(layer, x):
    res = layer(x)
    return res.output, res.aux_loss


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(capacity_factor=0.5),
    dict(capacity_factor=0.5, mlp_bias=True, activation="geglu"),
    dict(router="expert_choice", capacity_factor=1.0),
    dict(router="soft", top_k=4, activation="relu"),
    dict(router="sigmoid", num_experts=8, n_group=4, topk_group=2, mlp_bias=True),
], ids=["dropless", "capacity", "capacity_bias_geglu", "expert_choice", "soft_relu", "sigmoid_grouped_bias"])
@pytest.mark.parametrize("backend", ["native", "grouped_mm"])
def test_every_backend_matches_the_loop_and_reference(overrides, backend):
    """Outputs against the reference, every gradient against the Python loop's (fp32 on the CPU)."""
    if backend == "native" and not has_native:
        pytest.skip("the C++ extension does not build here (or is off)")
    loop = make_layer(dtype=torch.float32, std=0.2, **overrides)
    backends.use(loop, "loop")
    grouped = MoELayer(loop.cfg)
    grouped.load_state_dict(loop.state_dict())
    backends.use(grouped, backend)
    x = torch.randn(3, 10, 16)
    out_l, _, g_l = grads_of(loop, x, _fast)
    out_g, _, g_g = grads_of(grouped, x, _fast)
    ref = reference_forward(loop, x).output.detach()
    torch.testing.assert_close(out_l, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_g, ref, atol=1e-5, rtol=1e-5)
    for k in g_l:
        torch.testing.assert_close(g_g[k], g_l[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")


def test_grouped_mm_needs_aligned_widths():
    layer = make_layer(dtype=torch.float32, d_model=12)
    backends.use(layer, "grouped_mm")
    with pytest.raises(ValueError, match="divisible by 8"):
        layer(torch.randn(4, 12))


def test_idle_experts_get_exact_zero_gradients():
    cfg = MoEConfig(d_model=8, expert_hidden=8, num_experts=6, top_k=1)
    experts = Experts(cfg).double()
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0], [0], [3], [3], [0]])
    plan = plan_token_choice(ids, torch.ones(5, 1, dtype=torch.float64), 6)
    experts(x, plan).sum().backward()
    for e in (1, 2, 4, 5):
        assert experts.w_in.grad[e].abs().sum() == 0 and experts.w_out.grad[e].abs().sum() == 0
    for e in (0, 3):
        assert experts.w_in.grad[e].abs().sum() > 0


def test_bucketed_rows_bound_the_shapes():
    sizes = [bucketed_rows(n) for n in range(1, 20001)]
    assert all(n <= m <= n + max(1, n // 8) for n, m in enumerate(sizes, 1))
    assert len(set(sizes)) <= 16 + 8 * 11  # 8 per power of two from 16 to 2**15
    assert sizes[:16] == list(range(1, 17))


@pytest.mark.parametrize("activation,bias,capacity", [("swiglu", False, None), ("gelu", True, 45),
                                                      ("geglu", True, None)])
def test_bucketed_expert_gemms_match_exact_rows(activation, bias, capacity):
    """The CPU bf16 path runs each expert on bucketed row counts; in fp64 it must equal the exact-rows
    path, outputs and every gradient (extra rows: other experts' tokens, and past the end token 0)."""
    torch.manual_seed(0)
    E, T, D, F_ = 6, 150, 8, 12
    cfg = MoEConfig(d_model=D, expert_hidden=F_, num_experts=E, top_k=2, activation=activation, mlp_bias=bias)
    experts = Experts(cfg).double()
    for b in (experts.b_in, experts.b_out):
        if b is not None:
            torch.nn.init.normal_(b)
    ids_TK = torch.stack([torch.randperm(E - 1)[:2] for _ in range(T)])  # ~60 rows each, expert E-1 idle
    plan = plan_token_choice(ids_TK, torch.rand(T, 2, dtype=torch.float64), E, capacity=capacity)
    counts = plan.counts_E.tolist()
    assert any(bucketed_rows(n) > n for n in counts) and 0 in counts
    results = []
    for bucket in (False, True):
        x = torch.randn(T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        w = plan.weights_N.clone().requires_grad_(True)
        params = [p.detach().clone().requires_grad_(True) for p in experts.parameters()]
        w_in, w_out, b_in, b_out = params if bias else (*params, None, None)
        out = LoopExperts.apply(x, plan.token_ids_N, w, w_in, w_out, b_in, b_out, counts, activation, bucket)
        out.backward(torch.randn(T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
        results.append([out.detach(), x.grad, w.grad] + [p.grad for p in params])
    for exact, bucketed in zip(*results):
        torch.testing.assert_close(bucketed, exact, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("gemm", ["blas", "onednn"])
@pytest.mark.parametrize("impl,fn,bucket_arg", [("loop", LoopExperts, -1), ("native", NativeLoopExperts, -4)])
def test_cpu_experts_bucket_their_rows_on_onednn(monkeypatch, impl, fn, bucket_arg, gemm):
    """oneDNN builds a kernel per GEMM shape: bf16 GEMMs always run on it, the C++ loop's fp32 ones
    when the chooser puts fp32 products on it."""
    if impl == "native" and not has_native:
        pytest.skip("the C++ extension does not build here (or is off)")
    if gemm == "onednn" and not (has_native and build.load().have_onednn()):
        pytest.skip("no oneDNN matmul here")
    seen = []
    monkeypatch.setattr(fn, "apply", lambda *args: seen.append(args[bucket_arg]) or args[0].clone())
    layer = make_layer(dtype=torch.float32)
    backends.use(layer, impl)
    with options.override(gemm=gemm):
        layer(torch.randn(20, 16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(torch.randn(20, 16))
    assert seen == [gemm == "onednn" and impl == "native", True]  # the Python loop's fp32 runs torch.mm




def test_combine_is_deterministic():
    layer = make_layer(dtype=torch.float32, num_experts=8, top_k=3)
    x = torch.randn(200, 16)
    a, b = layer(x).output, layer(x).output
    assert torch.equal(a, b)


def test_weight_gradient_reaches_router_through_experts():
    layer = make_layer(dtype=torch.float64)
    x = torch.randn(20, 16, dtype=torch.float64)
    layer(x).output.pow(2).sum().backward()
    assert layer.router.weight_ED.grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_cuda_bf16_grouped_mm_matches_fp32_loop(capacity_factor):
    """The CUDA training path: fp32 parameters, bf16 autocast -> grouped_mm experts, fp32 router."""
    cfg = MoEConfig(d_model=256, expert_hidden=128, num_experts=8, top_k=2, capacity_factor=capacity_factor)
    ref = MoELayer(cfg)
    fast = MoELayer(cfg).cuda()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(512, 256).bfloat16().float()  # representable in bf16: same routing on both sides
    assert fast.experts.impl_for(x.cuda().bfloat16()) == "grouped_mm"
    xr = x.clone().requires_grad_(True)
    xf = x.cuda().requires_grad_(True)
    out_r = ref(xr).output
    with torch.autocast("cuda", dtype=torch.bfloat16):
        res_f = fast(xf)
    assert res_f.router_logits.dtype == torch.float32
    torch.testing.assert_close(res_f.output.float().cpu(), out_r, atol=5e-2, rtol=5e-2)
    out_r.sum().backward()
    res_f.output.float().sum().backward()
    torch.testing.assert_close(xf.grad.float().cpu(), xr.grad, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(fast.experts.w_in.grad.cpu(), ref.experts.w_in.grad, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(mlp_bias=True, activation="geglu"),
    dict(activation="relu", top_k=1),
    dict(router="sigmoid", num_experts=8, n_group=4, topk_group=2, routed_scaling_factor=2.5),
    dict(router="soft", top_k=4, activation="gelu", mlp_bias=True),
    dict(num_shared_experts=2, shared_expert_gate=True, dense_hidden=6),
], ids=["swiglu", "geglu_bias", "relu_top1", "sigmoid_grouped", "soft_gelu_bias", "shared_gate_dense"])
def test_gather_path_matches_reference(overrides):
    """The compiled decoding path (run eagerly here: same arithmetic) against the reference layer."""
    layer = make_layer(**overrides).eval()
    x_TD = torch.randn(5, 16, dtype=torch.float64)
    with torch.no_grad():
        r = layer.router(x_TD)
        ex = layer.experts
        routed = gather_experts(x_TD, r.expert_ids_TK, r.weights_TK, ex.w_in, ex.w_out, ex.b_in, ex.b_out,
                                layer.cfg.activation)
        got = layer._residual_experts(x_TD, routed)
        torch.testing.assert_close(got, reference_forward(layer, x_TD).output, atol=1e-12, rtol=1e-12)


def test_gather_path_only_inside_the_decode_step(monkeypatch):
    """The gather backend runs only for the modules under gather_decoding(module), in a compiled no-grad
    forward of a few tokens of a dropless token-choice layer; a user's own torch.compile(model) keeps
    the loop path, and another model is never affected (no process-wide flag)."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    dropless, soft = make_layer().eval(), make_layer(router="soft", top_k=4).eval()
    capped = make_layer(capacity_factor=1.0, eval_capacity_factor=1.0).eval()
    expert_choice = make_layer(router="expert_choice", capacity_factor=1.0).eval()
    other = make_layer().eval()
    layers = torch.nn.ModuleList([dropless, soft, capped, expert_choice])
    x = torch.randn(3, 16, dtype=torch.float64)
    with torch.no_grad():
        assert not dropless._decoding(x)
        with backends.gather_decoding(layers):
            assert dropless._decoding(x) and soft._decoding(x)
            assert not dropless._decoding(torch.randn(chooser.GATHER_MAX_TOKENS + 1, 16))
            assert not capped._decoding(x) and not expert_choice._decoding(x)
            assert not other._decoding(x)
        assert not dropless._decoding(x)
    with backends.gather_decoding(layers):
        assert not dropless._decoding(x)  # gradients recorded: never


@pytest.mark.slow  # 37 s: a compile (the gather backend's parity with the loop is tested eagerly above)
def test_compiled_generation_runs_the_gather_backend(monkeypatch):
    """generate(compile=True) marks its model's layers for the decode step (gather_decoding(model)):
    the compiled step traces the gather path; the flag is down again afterwards."""
    from moekit import MoETransformer, generate
    from moekit.moe import layer as moe_layer
    from moekit.presets import miniature

    traced = []
    real = moe_layer.gather_experts
    monkeypatch.setattr(moe_layer, "gather_experts", lambda *args: traced.append(1) or real(*args))
    torch.manual_seed(0)
    model = MoETransformer(miniature("deepseek-v3"))
    generate(model, [[1, 2, 3]], 3, compile=True)
    assert traced
    assert not any(m.experts.decoding for m in model.moe_layers)
