"""The expert paths (the slice loop in Python and in C++, grouped_mm) against each other and the reference."""

import gc
import math
import importlib.util
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from moekit import MoEConfig, MoELayer, reference_forward
from moekit.moe.dispatch import plan_expert_choice, plan_token_choice
from moekit.moe import native
from moekit.moe.experts import Experts, _LoopExperts, bucketed_rows
from moekit.moe.native import NativeLoopExperts
from moekit.nn import gemm

from conftest import grads_of, make_layer


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
def test_grouped_mm_matches_loop_and_reference(overrides):
    loop = make_layer(dtype=torch.float32, std=0.2, expert_impl="loop", **overrides)
    grouped = MoELayer(loop.cfg.replace(expert_impl="grouped_mm"))
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(3, 10, 16)
    out_l, _, g_l = grads_of(loop, x, _fast)
    out_g, _, g_g = grads_of(grouped, x, _fast)
    ref = reference_forward(loop, x).output.detach()
    torch.testing.assert_close(out_l, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_g, ref, atol=1e-5, rtol=1e-5)
    for k in g_l:
        torch.testing.assert_close(g_g[k], g_l[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")


def test_grouped_mm_needs_aligned_widths():
    layer = make_layer(dtype=torch.float32, d_model=12, expert_impl="grouped_mm")
    with pytest.raises(ValueError, match="divisible by 8"):
        layer(torch.randn(4, 12))


def test_auto_uses_the_cpp_loop_on_cpu_else_the_python_loop(monkeypatch):
    layer = make_layer(dtype=torch.float32)
    cpu = "native" if native.load() is not None else "loop"
    assert layer.experts.impl_for(torch.randn(2, 16)) == cpu
    assert layer.experts.impl_for(torch.randn(2, 16, dtype=torch.bfloat16)) == cpu
    monkeypatch.setattr(native, "load", lambda: None)  # as when the C++ loop does not build
    assert layer.experts.impl_for(torch.randn(2, 16)) == "loop"


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
        out = _LoopExperts.apply(x, plan.token_ids_N, w, w_in, w_out, b_in, b_out, counts, activation, bucket)
        out.backward(torch.randn(T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
        results.append([out.detach(), x.grad, w.grad] + [p.grad for p in params])
    for exact, bucketed in zip(*results):
        torch.testing.assert_close(bucketed, exact, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", ["blas", "onednn"])
@pytest.mark.parametrize("impl,fn,bucket_arg", [("loop", _LoopExperts, -1), ("native", NativeLoopExperts, -2)])
def test_cpu_experts_bucket_their_rows_on_onednn(monkeypatch, impl, fn, bucket_arg, backend):
    """oneDNN builds a kernel per GEMM shape: bf16 GEMMs always run on it, the C++ loop's fp32 ones
    when it is the backend of moekit.nn.gemm."""
    if backend == "onednn" and (native.load() is None or not native.load().have_onednn()):
        pytest.skip("no oneDNN matmul here")
    seen = []
    monkeypatch.setattr(fn, "apply", lambda *args: seen.append(args[bucket_arg]) or args[0].clone())
    layer = make_layer(dtype=torch.float32, expert_impl=impl)
    with gemm.use_backend(backend):
        layer(torch.randn(20, 16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(torch.randn(20, 16))
    assert seen == [backend == "onednn" and impl == "native", True]  # the Python loop's fp32 runs torch.mm


@pytest.mark.parametrize("own", ["0", "1"])
def test_native_loop_runs_exact_rows_on_its_own_gemm(monkeypatch, own):
    """Asked to bucket, the C++ loop still runs its products on the exact rows where its own kernel
    runs them (it builds nothing per shape); on oneDNN the rows are bucketed."""
    if native.load() is None or not native.load().have_onednn():
        pytest.skip("no oneDNN matmul here")
    monkeypatch.setenv("MOEKIT_OWN_GEMM", own)
    rows_seen = []
    layout = native.layout
    monkeypatch.setattr(native, "layout", lambda counts, rows, bounds: rows_seen.append(rows(17)) or
                        layout(counts, rows, bounds))
    experts, plan, counts = _loop_case("swiglu", False, None)
    experts = experts.float()
    x = torch.randn(plan.num_tokens, 8)
    with gemm.use_backend("onednn"), torch.no_grad():
        NativeLoopExperts.apply(x, plan.token_ids_N, plan.weights_N, experts.w_in, experts.w_out, None, None,
                                counts, "swiglu", True, 2)
    own_runs = own == "1" and native.load().have_own_gemm()
    assert rows_seen == [17 if own_runs else bucketed_rows(17)] and bucketed_rows(17) > 17


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
    from moekit.moe.experts import gather_experts

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
    """gather_experts runs only under gather_decoding() in a compiled no-grad forward of a few tokens of
    a dropless token-choice layer; a user's own torch.compile(model) keeps the loop path."""
    from moekit.moe import layer as moe_layer

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    dropless, soft = make_layer().eval(), make_layer(router="soft", top_k=4).eval()
    capped = make_layer(capacity_factor=1.0, eval_capacity_factor=1.0).eval()
    expert_choice = make_layer(router="expert_choice", capacity_factor=1.0).eval()
    x = torch.randn(3, 16, dtype=torch.float64)
    with torch.no_grad():
        assert not dropless._decoding(x)
        with moe_layer.gather_decoding():
            assert dropless._decoding(x) and soft._decoding(x)
            assert not dropless._decoding(torch.randn(moe_layer.GATHER_MAX_TOKENS + 1, 16))
            assert not capped._decoding(x) and not expert_choice._decoding(x)
        assert not dropless._decoding(x)
    with moe_layer.gather_decoding():
        assert not dropless._decoding(x)  # gradients recorded: never


# --- the slice loop in C++ (moekit.moe.native) against the Python loop ---------------------------------
# Where no compiler is, these skip; test_native_loop_is_built_where_a_compiler_is catches a failed build.
needs_native = pytest.mark.skipif(native.load() is None, reason="the C++ expert loop does not build here")


def _run_loop(fn, extra, experts, plan, counts, activation, bucket, bias, dtype):
    x = torch.randn(plan.num_tokens, experts.cfg.d_model, generator=torch.Generator().manual_seed(1)).to(dtype)
    x.requires_grad_(True)
    w = plan.weights_N.to(dtype).clone().requires_grad_(True)
    params = [p.detach().to(dtype).clone().requires_grad_(True) for p in experts.parameters()]
    w_in, w_out, b_in, b_out = params if bias else (*params, None, None)
    out = fn.apply(x, plan.token_ids_N, w, w_in, w_out, b_in, b_out, counts, activation, bucket, *extra)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype))
    return [out.detach(), x.grad, w.grad] + [p.grad for p in params]


def _loop_case(activation, bias, capacity, E=7, T=150):
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=8, expert_hidden=12, num_experts=E, top_k=2, activation=activation, mlp_bias=bias)
    experts = Experts(cfg).double()
    for b in (experts.b_in, experts.b_out):
        if b is not None:
            torch.nn.init.normal_(b)
    ids_TK = torch.stack([torch.randperm(E - 1)[:2] for _ in range(T)])  # expert E-1 idle
    plan = plan_token_choice(ids_TK, torch.rand(T, 2, dtype=torch.float64), E, capacity=capacity)
    return experts, plan, plan.counts_E.tolist()


@needs_native
@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("activation,bias,capacity,bucket", [
    ("swiglu", False, None, False), ("swiglu", False, None, True), ("geglu", True, 45, True),
    ("gelu", True, None, False), ("relu", False, 45, True), ("relu", True, None, False)])
def test_native_loop_matches_python_loop(activation, bias, capacity, bucket, groups):
    """fp64: outputs and every gradient (input, routing weights, weights, biases) equal the Python loop,
    with expert groups on threads (spill-over rows of bucketed GEMMs included), idle experts and drops."""
    experts, plan, counts = _loop_case(activation, bias, capacity)
    assert 0 in counts and (not bucket or any(bucketed_rows(n) > n for n in counts))
    want = _run_loop(_LoopExperts, (), experts, plan, counts, activation, bucket, bias, torch.float64)
    got = _run_loop(NativeLoopExperts, (groups,), experts, plan, counts, activation, bucket, bias, torch.float64)
    for name, g, w in zip(["out", "x", "weights", "w_in", "w_out", "b_in", "b_out"], got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12, msg=lambda m: f"{name}: {m}")
    assert torch.equal(got[3][-1], torch.zeros_like(got[3][-1]))  # the idle expert's weight gradient


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_loop_with_threads_matches_python_loop(dtype):
    """Every group count gives the Python loop's sums (each token's experts added in expert order).
    Threads add into disjoint rows of one output: a scatter that rewrites other rows (at::index_add_
    on bf16 does) shows here as O(1) errors."""
    experts, plan, counts = _loop_case("swiglu", True, None, E=9, T=2000)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for bucket in (False, True):
        want = _run_loop(_LoopExperts, (), experts, plan, counts, "swiglu", bucket, True, dtype)
        for groups in (1, 2, 3):
            got = _run_loop(NativeLoopExperts, (groups,), experts, plan, counts, "swiglu", bucket, True, dtype)
            for name, g, w in zip(["out", "x", "weights", "w_in", "w_out", "b_in", "b_out"], got, want):
                torch.testing.assert_close(g.float(), w.float(), **tol, msg=lambda m: f"{groups} {name}: {m}")


@needs_native
@pytest.mark.parametrize("bucket", [False, True])
def test_native_loop_expert_choice_with_groups_matches_python_loop(bucket):
    """Expert choice: an expert's tokens come in score order, not token order (pass B gathers rows)."""
    torch.manual_seed(0)
    E, T, C = 6, 90, 20
    experts = Experts(MoEConfig(d_model=8, expert_hidden=12, num_experts=E, top_k=2)).double()
    scores_ET = torch.rand(E, T, dtype=torch.float64)
    weights_EC, token_ids_EC = scores_ET.topk(C, dim=1)
    plan = plan_expert_choice(token_ids_EC, weights_EC, T)
    counts = plan.counts_E.tolist()
    want = _run_loop(_LoopExperts, (), experts, plan, counts, "swiglu", bucket, False, torch.float64)
    for groups in (2, 3):
        got = _run_loop(NativeLoopExperts, (groups,), experts, plan, counts, "swiglu", bucket, False, torch.float64)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)


@needs_native
def test_native_loop_matches_python_loop_on_random_cases():
    """fp64, random shapes and plans (token choice with and without capacity, expert choice),
    activations, biases, bucketing, 1-5 groups on 1-4 threads."""
    gen = torch.Generator().manual_seed(0)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    threads = torch.get_num_threads()
    try:
        for trial in range(60):
            E, T = pick(range(1, 13)), pick(range(1, 61))
            k = pick(range(1, min(3, E) + 1))
            act, bias = pick(["swiglu", "geglu", "gelu", "relu"]), pick([False, True])
            cfg = MoEConfig(d_model=pick([4, 8, 16]), expert_hidden=pick([3, 8, 12]), num_experts=E, top_k=k,
                            activation=act, mlp_bias=bias)
            experts = Experts(cfg).double()
            for b in (experts.b_in, experts.b_out):
                if b is not None:
                    torch.nn.init.normal_(b, generator=gen)
            if T >= 2 and pick([False, False, True]):
                weights_EC, token_ids_EC = torch.rand(E, T, dtype=torch.float64, generator=gen).topk(
                    pick(range(1, T + 1)), dim=1)
                plan = plan_expert_choice(token_ids_EC, weights_EC, T)
            else:
                ids_TK = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
                plan = plan_token_choice(ids_TK, torch.rand(T, k, dtype=torch.float64, generator=gen), E,
                                         capacity=pick([None, pick(range(1, 2 * T + 1))]))
            counts, bucket = plan.counts_E.tolist(), pick([False, True])
            torch.set_num_threads(pick([1, 2, 3, 4]))
            want = _run_loop(_LoopExperts, (), experts, plan, counts, act, bucket, bias, torch.float64)
            got = _run_loop(NativeLoopExperts, (pick(range(1, 6)),), experts, plan, counts, act, bucket, bias,
                            torch.float64)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, atol=1e-11, rtol=1e-11, msg=lambda m: f"trial {trial}: {m}")
    finally:
        torch.set_num_threads(threads)


@needs_native
@pytest.mark.parametrize("groups", [1, 2])
def test_native_loop_second_backward_through_the_graph(groups):
    """With groups the backward overwrites h with dL/dh; a second backward through the same graph
    (retain_graph) must recompute it and give the same gradients."""
    experts, plan, counts = _loop_case("swiglu", True, None)
    x = torch.randn(plan.num_tokens, 8, dtype=torch.float64, requires_grad=True)
    w_in = experts.w_in.detach().clone().requires_grad_(True)
    out = NativeLoopExperts.apply(x, plan.token_ids_N, plan.weights_N, w_in, experts.w_out, experts.b_in,
                                  experts.b_out, counts, "swiglu", False, groups)
    grads = []
    for _ in range(3):
        x.grad = w_in.grad = None
        out.pow(2).sum().backward(retain_graph=True)
        grads.append((x.grad, w_in.grad))
    for later in grads[1:]:
        assert torch.equal(later[0], grads[0][0]) and torch.equal(later[1], grads[0][1])


def test_token_blocks_split_tokens_between_threads():
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        E, T = int(torch.randint(1, 10, (1,), generator=gen)), int(torch.randint(1, 60, (1,), generator=gen))
        expert_N = torch.randint(0, E, (3 * T,), generator=gen)
        order = torch.argsort(expert_N, stable=True)
        counts = torch.bincount(expert_N, minlength=E).tolist()
        tok_N = torch.randint(0, T, (3 * T,), generator=gen)
        if int(torch.randint(0, 2, (1,), generator=gen)):  # token order within each expert, as plans give
            tok_N = tok_N.sort().values
        tok_K = tok_N[order]  # tokens of the assignments, by expert
        groups = int(torch.randint(2, 5, (1,), generator=gen))
        rows = bucketed_rows if int(torch.randint(0, 2, (1,), generator=gen)) else int
        bounds = native.split_groups(counts, groups)
        meta, pad, h_rows = native.layout(counts, rows, bounds)
        tb = native.token_blocks(tok_K, counts, bounds, pad, T, rows, h_rows)
        K = tok_K.shape[0]
        assert sorted(tb.order_R[:K].tolist()) == list(range(K))  # every assignment once
        owner = {}  # token -> the range that adds into its row
        for g in range(groups):
            for start, m, r, e, h0 in tb.blocks_B5[tb.bounds[g]:tb.bounds[g + 1]].tolist():
                a = tb.order_R[start:start + m]
                s, n, _, o = meta[e].tolist()
                assert r == rows(m) and start + r <= tb.hidx_R.shape[0] and ((s <= a) & (a < s + n)).all()
                assert torch.equal(tb.hidx_R[start:start + m], a - s + o)  # the expert's rows of h
                assert torch.equal(tb.token_ids_R[start:start + m], tok_K[a])
                first = int(tb.hidx_R[start])
                if torch.equal(tb.hidx_R[start:start + m], torch.arange(first, first + m)) and first + r <= h_rows:
                    assert h0 == first  # consecutive rows of h: read in place, bucketed rows too
                else:
                    assert h0 == -1
                assert int(tb.hidx_R[start:start + r].max()) < h_rows
                for t in tok_K[a].tolist():
                    assert owner.setdefault(t, g) == g


@needs_native
def test_native_loop_is_deterministic_and_skips_the_input_gradient(monkeypatch):
    experts, plan, counts = _loop_case("swiglu", False, None)
    x = torch.randn(plan.num_tokens, 8, dtype=torch.float64)  # no grad: the backward skips dL/dx
    w_in = experts.w_in.detach().clone().requires_grad_(True)
    outs = [NativeLoopExperts.apply(x, plan.token_ids_N, plan.weights_N, w_in, experts.w_out, None, None, counts,
                                    "swiglu", False, 2) for _ in range(2)]
    assert torch.equal(outs[0], outs[1])
    module, grads = native.load(), []

    class Spy:  # records what the C++ backward returns for dL/dx
        forward = module.forward

        @staticmethod
        def backward(*args, **kwargs):
            grads.append(module.backward(*args, **kwargs))
            return grads[-1]

    monkeypatch.setattr(native, "load", lambda: Spy)
    outs[0].sum().backward()
    assert w_in.grad is not None and grads[0][0] is None


def test_split_groups_and_layout_keep_groups_apart():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        E = int(torch.randint(1, 12, (1,), generator=gen))
        counts = torch.randint(0, 300, (E,), generator=gen).tolist()
        groups = int(torch.randint(1, 5, (1,), generator=gen))
        bounds = native.split_groups(counts, groups)
        assert len(bounds) == groups + 1 and bounds[0] == 0 and bounds[-1] == E
        assert all(a <= b for a, b in zip(bounds, bounds[1:]))
        meta, pad, h_rows = native.layout(counts, bucketed_rows, bounds)
        assert meta[:, 0].tolist() == [sum(counts[:e]) for e in range(E)] and meta[:, 1].tolist() == counts
        # rows an expert writes (its r rows from o) stay below the next group's first row
        for g in range(groups):
            group = range(bounds[g], bounds[g + 1])
            last = max((int(meta[e, 3] + meta[e, 2]) for e in group), default=0)
            nxt = [int(meta[e, 3]) for e in range(bounds[g + 1], E)]
            assert last <= h_rows and all(last <= o for o in nxt)
    # equal rows split evenly
    assert native.split_groups([10] * 8, 2) == [0, 4, 8] and native.split_groups([10] * 9, 3) == [0, 3, 6, 9]


def test_native_loop_is_built_where_a_compiler_is():
    """A build failure must show here, not only as a slower CPU path."""
    if not shutil.which("c++") or not (shutil.which("ninja") or importlib.util.find_spec("ninja")):
        pytest.skip("no C++ compiler or ninja here: moekit runs the Python loop")
    assert native.load() is not None, native.unavailable_reason()


def test_native_requested_but_unavailable_says_why(monkeypatch):
    monkeypatch.setattr(native, "_loaded", (None, "OSError: no compiler"))
    layer = make_layer(dtype=torch.float32, expert_impl="native")
    with pytest.raises(RuntimeError, match="no compiler"):
        layer(torch.randn(4, 16))
    assert make_layer(dtype=torch.float32).experts.impl_for(torch.randn(2, 16)) == "loop"


def test_thread_groups_by_expert_size():
    small = Experts(MoEConfig(d_model=512, expert_hidden=176, num_experts=4, top_k=2))
    large = Experts(MoEConfig(d_model=512, expert_hidden=1408, num_experts=4, top_k=2))
    assert native.thread_groups(small.w_in, small.w_out) == min(torch.get_num_threads(), 4)
    assert native.thread_groups(large.w_in, large.w_out) == 1


@needs_native
def test_native_build_is_imported_from_the_cache_and_a_corrupt_copy_rebuilt(tmp_path, monkeypatch):
    """A library built before is imported without compiling; one that cannot be loaded (a truncated
    copy, say) is named in a warning and built again."""
    assert native.load() is not None  # the session's real build, published before anything is patched
    name = native.library_name()
    good = native.build_root() / f"{name}.so"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    root = native.build_root()
    root.mkdir(parents=True)
    built = []
    monkeypatch.setattr(native, "_compile", lambda n, r: built.append((n, r)) or "rebuilt")
    shutil.copyfile(good, root / f"{name}.so")
    module, reason = native._build()
    assert reason is None and callable(module.forward) and built == []
    # elsewhere: this process keeps the library it loaded above by its path
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "other"))
    root = native.build_root()
    root.mkdir(parents=True)
    (root / f"{name}.so").write_bytes(b"\x7fELF truncated")
    with pytest.warns(RuntimeWarning, match="could not load .*" + name):
        assert native._build() == ("rebuilt", None)
    assert built == [(name, root)]


def test_threads_loading_at_once_build_once(monkeypatch):
    """The first load from several threads at once runs one build; every thread gets its result."""
    calls, started = [], threading.Barrier(4)

    def slow_build():
        calls.append(1)
        time.sleep(0.05)
        return "module", None

    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "_build", slow_build)

    def ask():
        started.wait()
        return native.load()

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: ask(), range(4)))
    assert got == ["module"] * 4 and len(calls) == 1


def test_native_build_failure_falls_back_once_and_is_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    attempts = []

    def fail(name, root):
        attempts.append(name)
        raise OSError("c++: command not found")

    monkeypatch.setattr(native, "_compile", fail)
    with pytest.warns(RuntimeWarning, match="did not build .*command not found"):
        assert native._build() == (None, "OSError: c++: command not found")
    # the next process does not try again until the record is deleted
    with pytest.warns(RuntimeWarning, match="delete it to try again"):
        module, reason = native._build()
    assert module is None and "command not found" in reason and len(attempts) == 1


@needs_native
def test_native_loop_rejects_a_layout_outside_its_tensors():
    experts, plan, counts = _loop_case("swiglu", False, None)
    x = torch.randn(plan.num_tokens, 8, dtype=torch.float64)
    meta, _, h_rows = native.layout(counts, int, [0, len(counts)])
    meta[2, 3] = h_rows  # expert 2's rows of h would start at its end
    with torch.no_grad(), pytest.raises(RuntimeError, match="expert 2 has"):
        native.load().forward(x, plan.token_ids_N, plan.weights_N, experts.w_in, experts.w_out, None, None,
                              meta, [0, len(counts)], "swiglu", h_rows)
    meta, _, h_rows = native.layout(counts, int, [0, len(counts)])
    strided_w = torch.stack([plan.weights_N, plan.weights_N], dim=1)[:, 0]  # read through a raw pointer
    with torch.no_grad(), pytest.raises(RuntimeError, match="routing weights"):
        native.load().forward(x, plan.token_ids_N, strided_w, experts.w_in, experts.w_out, None, None,
                              meta, [0, len(counts)], "swiglu", h_rows)


@needs_native
def test_native_loop_rejects_a_token_block_row_outside_h():
    experts, plan, counts = _loop_case("swiglu", False, None)
    K, x = sum(counts), torch.randn(plan.num_tokens, 8, dtype=torch.float64)
    bounds = native.split_groups(counts, 2)
    meta, pad, h_rows = native.layout(counts, int, bounds)
    tb = native.token_blocks(plan.token_ids_N[:K], counts, bounds, pad, plan.num_tokens, int, h_rows)
    blocks = tb.blocks_B5.clone()
    blocks[:, 4] = -1  # every block gathers its rows by hidx
    hidx = tb.hidx_R.clone()
    hidx[3] = h_rows + 5
    with torch.no_grad(), pytest.raises(IndexError, match="out of range"):
        native.load().forward(x, plan.token_ids_N[:K], plan.weights_N[:K], experts.w_in, experts.w_out, None, None,
                              meta, bounds, "swiglu", h_rows, hidx, tb.token_ids_R, plan.weights_N[:K][tb.order_R],
                              blocks, tb.bounds)


needs_fused_swiglu = pytest.mark.skipif(native.load() is None or not native.load().have_fused_swiglu(),
                                        reason="no AVX-512 / SLEEF here: the gated SiLU runs on ATen")


def test_avx512_kernels_run_on_avx512_x86():
    """Where the CPU has AVX-512 the fused SwiGLU and the loop's own GEMM must run: a lost SLEEF symbol
    or a broken CPU check fails here."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if native.load() is None or " avx512f" not in flags:
        pytest.skip("no AVX-512 or no C++ loop here")
    assert native.load().have_fused_swiglu() and native.load().have_own_gemm()


@needs_fused_swiglu
@pytest.mark.parametrize("F", [1, 12, 15, 16, 17, 88, 176])
def test_fused_swiglu_matches_aten(F):
    """Forward against ATen's silu (fp32, same formulas; within a few ulp: ATen's scalar path rounds
    otherwise), backward against fp64 autograd, over full vectors and tails of 1-15 lanes and values
    where exp under- and overflows; strided rows as the loop passes them. With a per-row scale (the
    routing weights the loop folds in), the backward also returns <dL/d(a s), a> of the first rows:
    the weights' gradient."""
    g_ = torch.Generator().manual_seed(F)
    h_full = torch.randn(37, 2 * F + 5, generator=g_) * 4
    h = h_full[:, 2:2 + 2 * F]  # a row stride that is not 2F
    h[0, :F] = torch.tensor([-100.0, 100.0, -87.0, 89.0, 0.0, -0.0] * 30)[:F]  # exp under- and overflows
    grad_a = torch.randn(37, F, generator=g_)
    scale = torch.rand(37, generator=g_)
    gate, up = h[:, :F], h[:, F:]
    mod = native.load()
    torch.testing.assert_close(mod.swiglu(h), torch.nn.functional.silu(gate) * up, rtol=5e-7, atol=0)
    torch.testing.assert_close(mod.swiglu(h, scale), torch.nn.functional.silu(gate) * up * scale[:, None],
                               rtol=1e-6, atol=0)
    h64 = h.double().requires_grad_(True)
    (torch.nn.functional.silu(h64[:, :F]) * h64[:, F:]).backward(grad_a.double())
    grad_h, dot = mod.swiglu_backward(h, grad_a)
    torch.testing.assert_close(grad_h, h64.grad.float(), rtol=1e-5, atol=1e-6)
    assert dot.shape == (0,)
    h64.grad = None
    s64 = scale.double().requires_grad_(True)
    (torch.nn.functional.silu(h64[:, :F]) * h64[:, F:] * s64[:, None]).backward(grad_a.double())
    grad_h, dot = mod.swiglu_backward(h, grad_a, scale, 30)
    torch.testing.assert_close(grad_h, h64.grad.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dot, s64.grad[:30].float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="scale"):
        mod.swiglu(h, scale[:-1])
    with pytest.raises(RuntimeError, match="n_dot"):
        mod.swiglu_backward(h, grad_a, scale, 38)


needs_own_gemm = pytest.mark.skipif(native.load() is None or not native.load().have_own_gemm(),
                                    reason="no AVX-512 here: the loop's fp32 products run on oneDNN")


@needs_own_gemm
@pytest.mark.parametrize("M", [1, 2, 3, 5, 6, 7, 256])  # tiles of 6 rows: tails of 1-5 rows (256 = 42 * 6 + 4)
@pytest.mark.parametrize("N", [1, 15, 16, 17, 64, 65, 88, 176])
def test_own_gemm_matches_fp64_matmul(M, N):
    """Every tile shape (1-6 rows, 1-4 vectors, masked tails), K from 0, A and B as transposed views
    (B transposed is packed first), A strided both ways, an output with a longer row stride, and
    out += a @ b; within fp32 rounding of an fp64 product."""
    mod = native.load()
    g_ = torch.Generator().manual_seed(M * 1000 + N)
    for K in (0, 1, 7, 88, 300):
        a = torch.randn(M, K, generator=g_)
        b = torch.randn(K, N, generator=g_)
        want = a.double() @ b.double()
        tol = dict(rtol=1e-5, atol=1e-5 * max(K, 1) ** 0.5)
        a_strided = torch.zeros(2 * M, 3 * K)[::2, ::3]
        a_strided.copy_(a)
        for a_, b_ in ((a, b), (a.t().contiguous().t(), b), (a, b.t().contiguous().t()),
                       (a.t().contiguous().t(), b.t().contiguous().t()), (a_strided, b)):
            torch.testing.assert_close(mod.own_mm(a_, b_).double(), want, **tol)
        wide = torch.randn(M, N + 3, generator=g_)
        out, kept = wide[:, :N], wide[:, N:].clone()
        expected = out.double() + want
        torch.testing.assert_close(mod.own_mm(a, b, out, accumulate=True).double(), expected, **tol)
        assert torch.equal(wide[:, N:], kept)  # the columns past the output's are not written
    with pytest.raises(RuntimeError, match="own_gemm"):
        mod.own_mm(a.double(), b.double())
    square = torch.randn(8, 8)
    with pytest.raises(RuntimeError, match="single memory location"):
        mod.own_mm(square, torch.randn(8, 8), out=square)


@needs_own_gemm
@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("swiglu", True), ("geglu", True), ("gelu", False),
                                             ("relu", True)])
def test_native_loop_on_its_own_gemm_matches_onednn(activation, bias, monkeypatch):
    """fp32 with expert groups on two threads: the loop's own kernel (exact rows) against oneDNN
    (bucketed rows), outputs and every gradient, through the layer; every activation (the fused
    SwiGLU and ATen's paths)."""
    if not native.load().have_onednn():
        pytest.skip("no oneDNN matmul here")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = []
        for own in ("1", "0"):
            monkeypatch.setenv("MOEKIT_OWN_GEMM", own)
            torch.manual_seed(0)
            layer = make_layer(dtype=torch.float32, num_experts=12, top_k=3, activation=activation, mlp_bias=bias,
                               expert_impl="native")
            x = torch.randn(300, 16, generator=torch.Generator().manual_seed(3), requires_grad=True)
            with gemm.use_backend("onednn"):
                groups = native.thread_groups(layer.experts.w_in, layer.experts.w_out)
                assert groups == 2 and native.own_gemm(x, groups) == (own == "1")
                out = layer(x).output
                out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(4)))
            results.append([out.detach(), x.grad] + [p.grad for p in layer.parameters()])
    finally:
        torch.set_num_threads(threads)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_own_gemm
def test_native_loop_with_strided_expert_weights(monkeypatch):
    """Expert weights the own kernel does not take (neither stride 1) run on the library GEMM instead:
    the same results as contiguous ones."""
    monkeypatch.setenv("MOEKIT_OWN_GEMM", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        layer = make_layer(dtype=torch.float32, num_experts=12, top_k=3, expert_impl="native")
        x = torch.randn(300, 16, generator=torch.Generator().manual_seed(3))
        with gemm.use_backend("onednn"):
            assert native.own_gemm(x, native.thread_groups(layer.experts.w_in, layer.experts.w_out))
            want = layer(x).output
        w_in = layer.experts.w_in.detach()
        strided = torch.empty(w_in.shape[1], w_in.shape[2], w_in.shape[0]).permute(2, 0, 1)
        strided.copy_(w_in)
        assert strided[0].t().stride(0) != 1 and strided[0].t().stride(1) != 1
        layer.experts.w_in = torch.nn.Parameter(strided)
        with gemm.use_backend("onednn"):
            torch.testing.assert_close(layer(x).output, want, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_indices_order_ties_and_nan(dtype):
    """Largest first, ties to the lower index, NaN above every number, k from 1 to E: the reference's
    order (moekit.moe.reference._top), on scores with many ties."""
    g_ = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (300, 13), generator=g_).to(dtype)
    scores[5, 3] = scores[7, 0] = scores[7, 9] = float("nan")
    scores[8, :] = float("nan")
    scores[9, 4] = float("-inf")
    for k in (1, 2, 5, 13):
        want = [sorted(range(13), key=lambda i: (-(math.inf if row[i] != row[i] else row[i]), i))[:k]
                for row in scores.tolist()]
        assert native.topk_indices(scores, k).tolist() == want
    assert torch.equal(native.topk_indices(scores[:, :0].reshape(0, 13), 3), torch.empty(0, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="k=14"):
        native.load().topk(scores, 14)


@needs_native
def test_router_ties_go_to_the_lower_expert_as_in_the_reference():
    """A router with zero weights scores every expert alike: experts 0..k-1 for every token, and the
    layer's output equals the reference's."""
    layer = make_layer(num_experts=6, top_k=2)
    with torch.no_grad():
        layer.router.weight_ED.zero_()
    x = torch.randn(40, 16, dtype=torch.float64)
    r, _ = layer.route(x)
    assert torch.equal(r.expert_ids_TK, torch.tensor([[0, 1]] * 40))
    torch.testing.assert_close(layer(x).output, reference_forward(layer, x).output, atol=1e-12, rtol=1e-12)


def _cached_case():
    """Experts whose h and weight gradients are blocks of 1 MiB or more (fp64: w_in 4 MiB, w_out
    2 MiB, h ~2.4 MiB), expert 3 idle."""
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=256, expert_hidden=256, num_experts=4, top_k=2)
    experts = Experts(cfg).double()
    ids_TK = torch.stack([torch.randperm(3)[:2] for _ in range(300)])
    plan = plan_token_choice(ids_TK, torch.rand(300, 2, dtype=torch.float64), 4)
    return lambda: _run_loop(NativeLoopExperts, (2,), experts, plan, plan.counts_E.tolist(), "swiglu", False, False,
                             torch.float64)


@pytest.fixture
def block_cache():
    """An empty block cache keeping blocks from 1 MiB (default 32), restored after the test."""
    gc.collect()  # tensors of earlier tests still in reference cycles give their blocks back now
    native.empty_cache()
    limit, smallest = native.cache_limit_mb(), native.cache_min_mb()
    native.set_cache_min_mb(1)
    yield
    native.set_cache_limit_mb(limit)
    native.set_cache_min_mb(smallest)
    native.empty_cache()


@needs_native
def test_freed_blocks_are_reused_and_released(block_cache):
    """h (freed with the graph) and the weight gradients (freed by their owner) serve the next step
    from the cache, every element written again (an idle expert's gradient stays exactly zero over
    stale values); empty_cache() frees them; a bound of 0 keeps none."""
    run = _cached_case()
    first = run()
    h_bytes = native.cached_bytes()  # h went back when backward freed the graph
    assert h_bytes >= 2**20
    want = [t.clone() for t in first]
    ptrs = {first[3].data_ptr(), first[4].data_ptr()}
    need = sum(t.numel() * t.element_size() for t in first[3:5])
    first[3].fill_(7.0), first[4].fill_(7.0)  # stale values for the next backward to overwrite
    del first
    grad_bytes = native.cached_bytes() - h_bytes
    assert grad_bytes == need
    again = run()
    assert {again[3].data_ptr(), again[4].data_ptr()} == ptrs and native.cached_bytes() == h_bytes
    assert all(torch.equal(g, w) for g, w in zip(again, want))
    assert torch.equal(again[3][-1], torch.zeros_like(again[3][-1]))
    del again
    assert native.empty_cache() == h_bytes + grad_bytes and native.cached_bytes() == 0
    native.set_cache_limit_mb(0)
    run()  # its result dropped at once: every block freed, none kept
    assert native.cached_bytes() == 0


@needs_native
def test_block_cache_keeps_at_most_its_bound(block_cache):
    """Past the bound, freed blocks are let go, the oldest first; lowering the bound frees the blocks
    above it at once."""
    run = _cached_case()
    native.set_cache_limit_mb(4)
    out = run()  # h's block (~2.4 MiB) went back with the graph
    h_bytes = native.cached_bytes()
    assert 2**21 < h_bytes < 3 * 2**20
    grad_w_in, grad_w_out = out[3], out[4]  # 4 MiB and 2 MiB blocks
    del out
    del grad_w_out  # h's block is older: it goes to make room
    assert native.cached_bytes() == 2**21
    del grad_w_in  # w_out's goes
    assert native.cached_bytes() == 2**22
    native.set_cache_limit_mb(1)
    assert native.cached_bytes() == 0
    with pytest.raises(ValueError, match="MiB"):
        native.set_cache_limit_mb(-1)
    native.set_cache_limit_mb(2048)
    native.set_cache_min_mb(4)
    run()  # blocks of 4 MiB or more only: w_in's is kept, w_out's (2 MiB) and h's are not
    assert native.cached_bytes() == 2**22


@needs_native
@pytest.mark.skipif(native.load() is None or not native.load().have_onednn(), reason="no oneDNN matmul here")
@pytest.mark.parametrize("groups", [1, 2])
def test_native_loop_on_onednn_matches_python_loop(groups):
    """fp32, biases included (oneDNN's GEMM with the bias added by its sum post-op)."""
    experts, plan, counts = _loop_case("swiglu", True, None, E=9, T=400)
    want = _run_loop(_LoopExperts, (), experts, plan, counts, "swiglu", True, True, torch.float32)
    with gemm.use_backend("onednn"):
        got = _run_loop(NativeLoopExperts, (groups,), experts, plan, counts, "swiglu", True, True, torch.float32)
    for name, g, w in zip(["out", "x", "weights", "w_in", "w_out", "b_in", "b_out"], got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
