"""The C++ extension (moekit.cpu): its expert loop against the Python loop, its kernels (own GEMM,
fused SwiGLU, top-k), the block cache, the build and load (cache, failures, threads) and the fallback
when a private libtorch symbol is missing. Where the extension does not build, or MOEKIT_NATIVE=0,
the tests that need it skip; test_native_loop_is_built_where_a_compiler_is catches a failed build."""

import gc
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from moekit import MoEConfig, reference_forward
from moekit.cpu import build, cache, options
from moekit.cpu import loop as cpu_loop
from moekit.cpu.loop import NativeLoopExperts
from moekit.cpu.rows import bucketed_rows
from moekit.cpu.topk import topk_indices
from moekit.moe import backends
from moekit.moe.backends import chooser
from moekit.moe.backends.loop import LoopExperts
from moekit.moe.dispatch import plan_expert_choice, plan_token_choice
from moekit.moe.experts import Experts

from conftest import make_layer

needs_native = pytest.mark.skipif(build.load() is None, reason="the C++ extension does not build here (or is off)")


def _native(groups=1, onednn=False, own=False):
    """NativeLoopExperts' arguments after ``bucket``."""
    return (groups, onednn, own)


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
    want = _run_loop(LoopExperts, (), experts, plan, counts, activation, bucket, bias, torch.float64)
    got = _run_loop(NativeLoopExperts, _native(groups), experts, plan, counts, activation, bucket, bias, torch.float64)
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
        want = _run_loop(LoopExperts, (), experts, plan, counts, "swiglu", bucket, True, dtype)
        for groups in (1, 2, 3):
            got = _run_loop(NativeLoopExperts, _native(groups), experts, plan, counts, "swiglu", bucket, True, dtype)
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
    want = _run_loop(LoopExperts, (), experts, plan, counts, "swiglu", bucket, False, torch.float64)
    for groups in (2, 3):
        got = _run_loop(NativeLoopExperts, _native(groups), experts, plan, counts, "swiglu", bucket, False,
                        torch.float64)
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
            want = _run_loop(LoopExperts, (), experts, plan, counts, act, bucket, bias, torch.float64)
            got = _run_loop(NativeLoopExperts, _native(pick(range(1, 6))), experts, plan, counts, act, bucket, bias,
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
                                  experts.b_out, counts, "swiglu", False, *_native(groups))
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
        bounds = cpu_loop.split_groups(counts, groups)
        meta, pad, h_rows = cpu_loop.layout(counts, rows, bounds)
        tb = cpu_loop.token_blocks(tok_K, counts, bounds, pad, T, rows, h_rows)
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
                                    "swiglu", False, *_native(2)) for _ in range(2)]
    assert torch.equal(outs[0], outs[1])
    module, grads = build.load(), []

    class Spy:  # records what the C++ backward returns for dL/dx
        forward = module.forward

        @staticmethod
        def backward(*args, **kwargs):
            grads.append(module.backward(*args, **kwargs))
            return grads[-1]

    monkeypatch.setattr(build, "load", lambda: Spy)
    outs[0].sum().backward()
    assert w_in.grad is not None and grads[0][0] is None


def test_split_groups_and_layout_keep_groups_apart():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        E = int(torch.randint(1, 12, (1,), generator=gen))
        counts = torch.randint(0, 300, (E,), generator=gen).tolist()
        groups = int(torch.randint(1, 5, (1,), generator=gen))
        bounds = cpu_loop.split_groups(counts, groups)
        assert len(bounds) == groups + 1 and bounds[0] == 0 and bounds[-1] == E
        assert all(a <= b for a, b in zip(bounds, bounds[1:]))
        meta, pad, h_rows = cpu_loop.layout(counts, bucketed_rows, bounds)
        assert meta[:, 0].tolist() == [sum(counts[:e]) for e in range(E)] and meta[:, 1].tolist() == counts
        # rows an expert writes (its r rows from o) stay below the next group's first row
        for g in range(groups):
            group = range(bounds[g], bounds[g + 1])
            last = max((int(meta[e, 3] + meta[e, 2]) for e in group), default=0)
            nxt = [int(meta[e, 3]) for e in range(bounds[g + 1], E)]
            assert last <= h_rows and all(last <= o for o in nxt)
    # equal rows split evenly
    assert cpu_loop.split_groups([10] * 8, 2) == [0, 4, 8] and cpu_loop.split_groups([10] * 9, 3) == [0, 3, 6, 9]


def test_native_loop_is_built_where_a_compiler_is():
    """A build failure must show here, not only as a slower CPU path."""
    if not shutil.which("c++") or not (shutil.which("ninja") or importlib.util.find_spec("ninja")):
        pytest.skip("no C++ compiler or ninja here: moekit runs the Python loop")
    if not options.get().native:
        pytest.skip("turned off by MOEKIT_NATIVE=0")
    assert build.load() is not None, build.unavailable_reason()


def test_native_requested_but_unavailable_says_why(monkeypatch):
    monkeypatch.setattr(build, "_loaded", (None, "OSError: no compiler"))
    monkeypatch.setattr(options, "_current", options.CpuOptions(native=True))  # (whatever MOEKIT_NATIVE says)
    layer = make_layer(dtype=torch.float32)
    backends.use(layer, "native")
    with pytest.raises(RuntimeError, match="no compiler"):
        layer(torch.randn(4, 16))
    assert make_layer(dtype=torch.float32).experts.backend_for(torch.randn(2, 16)) == "loop"


def test_thread_groups_by_expert_size():
    small = Experts(MoEConfig(d_model=512, expert_hidden=176, num_experts=4, top_k=2))
    large = Experts(MoEConfig(d_model=512, expert_hidden=1408, num_experts=4, top_k=2))
    assert chooser.thread_groups(small.w_in, small.w_out) == min(torch.get_num_threads(), 4)
    assert chooser.thread_groups(large.w_in, large.w_out) == 1


@needs_native
def test_native_build_is_imported_from_the_cache_and_a_corrupt_copy_rebuilt(tmp_path, monkeypatch):
    """A library built before is imported without compiling; one that cannot be loaded (a truncated
    copy, say) is named in a warning and built again."""
    assert build.load() is not None  # the session's real build, published before anything is patched
    name = build.library_name()
    good = build.build_root() / f"{name}.so"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    root = build.build_root()
    root.mkdir(parents=True)
    built = []
    monkeypatch.setattr(build, "_compile", lambda n, r: built.append((n, r)) or "rebuilt")
    shutil.copyfile(good, root / f"{name}.so")
    module, reason = build._build()
    assert reason is None and callable(module.forward) and built == []
    # elsewhere: this process keeps the library it loaded above by its path
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "other"))
    root = build.build_root()
    root.mkdir(parents=True)
    (root / f"{name}.so").write_bytes(b"\x7fELF truncated")
    with pytest.warns(RuntimeWarning, match="could not load .*" + name):
        assert build._build() == ("rebuilt", None)
    assert built == [(name, root)]


def test_threads_loading_at_once_build_once(monkeypatch):
    """The first load from several threads at once runs one build; every thread gets its result."""
    calls, started = [], threading.Barrier(4)

    class FakeModule:  # what _prepare asks of a loaded module
        @staticmethod
        def private_symbols():
            return []

    def slow_build():
        calls.append(1)
        time.sleep(0.05)
        return FakeModule, None

    monkeypatch.setattr(build, "_loaded", None)
    monkeypatch.setattr(build, "_build", slow_build)
    monkeypatch.setattr(options, "_current", options.CpuOptions(native=True))

    def ask():
        started.wait()
        return build.load()

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: ask(), range(4)))
    assert got == [FakeModule] * 4 and len(calls) == 1


def test_native_build_failure_falls_back_once_and_is_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    attempts = []

    def fail(name, root):
        attempts.append(name)
        raise OSError("c++: command not found")

    monkeypatch.setattr(build, "_compile", fail)
    with pytest.warns(RuntimeWarning, match="did not build .*command not found"):
        assert build._build() == (None, "OSError: c++: command not found")
    # the next process does not try again until the record is deleted
    with pytest.warns(RuntimeWarning, match="delete it to try again"):
        module, reason = build._build()
    assert module is None and "command not found" in reason and len(attempts) == 1


@needs_native
def test_native_loop_rejects_a_layout_outside_its_tensors():
    experts, plan, counts = _loop_case("swiglu", False, None)
    x = torch.randn(plan.num_tokens, 8, dtype=torch.float64)
    meta, _, h_rows = cpu_loop.layout(counts, int, [0, len(counts)])
    meta[2, 3] = h_rows  # expert 2's rows of h would start at its end
    with torch.no_grad(), pytest.raises(RuntimeError, match="expert 2 has"):
        build.load().forward(x, plan.token_ids_N, plan.weights_N, experts.w_in, experts.w_out, None, None,
                              meta, [0, len(counts)], "swiglu", h_rows)
    meta, _, h_rows = cpu_loop.layout(counts, int, [0, len(counts)])
    strided_w = torch.stack([plan.weights_N, plan.weights_N], dim=1)[:, 0]  # read through a raw pointer
    with torch.no_grad(), pytest.raises(RuntimeError, match="routing weights"):
        build.load().forward(x, plan.token_ids_N, strided_w, experts.w_in, experts.w_out, None, None,
                              meta, [0, len(counts)], "swiglu", h_rows)


@needs_native
def test_native_loop_rejects_a_token_block_row_outside_h():
    experts, plan, counts = _loop_case("swiglu", False, None)
    K, x = sum(counts), torch.randn(plan.num_tokens, 8, dtype=torch.float64)
    bounds = cpu_loop.split_groups(counts, 2)
    meta, pad, h_rows = cpu_loop.layout(counts, int, bounds)
    tb = cpu_loop.token_blocks(plan.token_ids_N[:K], counts, bounds, pad, plan.num_tokens, int, h_rows)
    blocks = tb.blocks_B5.clone()
    blocks[:, 4] = -1  # every block gathers its rows by hidx
    hidx = tb.hidx_R.clone()
    hidx[3] = h_rows + 5
    with torch.no_grad(), pytest.raises(IndexError, match="out of range"):
        build.load().forward(x, plan.token_ids_N[:K], plan.weights_N[:K], experts.w_in, experts.w_out, None, None,
                              meta, bounds, "swiglu", h_rows, hidx, tb.token_ids_R, plan.weights_N[:K][tb.order_R],
                              blocks, tb.bounds)


needs_fused_swiglu = pytest.mark.skipif(build.load() is None or not build.load().have_fused_swiglu(),
                                        reason="no AVX-512 / SLEEF here: the gated SiLU runs on ATen")


def test_avx512_kernels_run_on_avx512_x86():
    """Where the CPU has AVX-512 the fused SwiGLU and the loop's own GEMM must run: a lost SLEEF symbol
    or a broken CPU check fails here."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if build.load() is None or " avx512f" not in flags:
        pytest.skip("no AVX-512 or no C++ loop here")
    assert build.load().have_fused_swiglu() and build.load().have_own_gemm()


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
    mod = build.load()
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


needs_own_gemm = pytest.mark.skipif(build.load() is None or not build.load().have_own_gemm(),
                                    reason="no AVX-512 here: the loop's fp32 products run on oneDNN")


@needs_own_gemm
@pytest.mark.parametrize("M", [1, 2, 3, 5, 6, 7, 256])  # tiles of 6 rows: tails of 1-5 rows (256 = 42 * 6 + 4)
@pytest.mark.parametrize("N", [1, 15, 16, 17, 64, 65, 88, 176])
def test_own_gemm_matches_fp64_matmul(M, N):
    """Every tile shape (1-6 rows, 1-4 vectors, masked tails), K from 0, A and B as transposed views
    (B transposed is packed first), A strided both ways, an output with a longer row stride, and
    out += a @ b; within fp32 rounding of an fp64 product."""
    mod = build.load()
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
    if not build.load().have_onednn():
        pytest.skip("no oneDNN matmul here")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = []
        for own in (True, False):
            torch.manual_seed(0)
            layer = make_layer(dtype=torch.float32, num_experts=12, top_k=3, activation=activation, mlp_bias=bias)
            backends.use(layer, "native")
            x = torch.randn(300, 16, generator=torch.Generator().manual_seed(3), requires_grad=True)
            with options.override(gemm="onednn", own_gemm=own):
                how = chooser.loop_gemm(x, layer.experts.cast(x)[1], native=True)
                assert how.groups == 2 and how.own_gemm == own
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
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        layer = make_layer(dtype=torch.float32, num_experts=12, top_k=3)
        backends.use(layer, "native")
        x = torch.randn(300, 16, generator=torch.Generator().manual_seed(3))
        with options.override(gemm="onednn", own_gemm=True):
            assert chooser.loop_gemm(x, layer.experts.cast(x)[1], native=True).own_gemm
            want = layer(x).output
        w_in = layer.experts.w_in.detach()
        strided = torch.empty(w_in.shape[1], w_in.shape[2], w_in.shape[0]).permute(2, 0, 1)
        strided.copy_(w_in)
        assert strided[0].t().stride(0) != 1 and strided[0].t().stride(1) != 1
        layer.experts.w_in = torch.nn.Parameter(strided)
        with options.override(gemm="onednn", own_gemm=True):
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
        assert topk_indices(scores, k).tolist() == want
    assert torch.equal(topk_indices(scores[:, :0].reshape(0, 13), 3), torch.empty(0, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="k=14"):
        build.load().topk(scores, 14)


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
    return lambda: _run_loop(NativeLoopExperts, _native(2), experts, plan, plan.counts_E.tolist(), "swiglu", False,
                             False, torch.float64)


@pytest.fixture
def block_cache():
    """An empty block cache keeping blocks from 1 MiB (default 32), restored after the test."""
    gc.collect()  # tensors of earlier tests still in reference cycles give their blocks back now
    cache.empty_cache()
    limit, smallest = cache.cache_limit_mb(), cache.cache_min_mb()
    cache.set_cache_min_mb(1)
    yield
    cache.set_cache_limit_mb(limit)
    cache.set_cache_min_mb(smallest)
    cache.empty_cache()


@needs_native
def test_freed_blocks_are_reused_and_released(block_cache):
    """h (freed with the graph) and the weight gradients (freed by their owner) serve the next step
    from the cache, every element written again (an idle expert's gradient stays exactly zero over
    stale values); empty_cache() frees them; a bound of 0 keeps none."""
    run = _cached_case()
    first = run()
    h_bytes = cache.cached_bytes()  # h went back when backward freed the graph
    assert h_bytes >= 2**20
    want = [t.clone() for t in first]
    ptrs = {first[3].data_ptr(), first[4].data_ptr()}
    need = sum(t.numel() * t.element_size() for t in first[3:5])
    first[3].fill_(7.0), first[4].fill_(7.0)  # stale values for the next backward to overwrite
    del first
    grad_bytes = cache.cached_bytes() - h_bytes
    assert grad_bytes == need
    again = run()
    assert {again[3].data_ptr(), again[4].data_ptr()} == ptrs and cache.cached_bytes() == h_bytes
    assert all(torch.equal(g, w) for g, w in zip(again, want))
    assert torch.equal(again[3][-1], torch.zeros_like(again[3][-1]))
    del again
    assert cache.empty_cache() == h_bytes + grad_bytes and cache.cached_bytes() == 0
    cache.set_cache_limit_mb(0)
    run()  # its result dropped at once: every block freed, none kept
    assert cache.cached_bytes() == 0


@needs_native
def test_block_cache_keeps_at_most_its_bound(block_cache):
    """Past the bound, freed blocks are let go, the oldest first; lowering the bound frees the blocks
    above it at once."""
    run = _cached_case()
    cache.set_cache_limit_mb(4)
    out = run()  # h's block (~2.4 MiB) went back with the graph
    h_bytes = cache.cached_bytes()
    assert 2**21 < h_bytes < 3 * 2**20
    grad_w_in, grad_w_out = out[3], out[4]  # 4 MiB and 2 MiB blocks
    del out
    del grad_w_out  # h's block is older: it goes to make room
    assert cache.cached_bytes() == 2**21
    del grad_w_in  # w_out's goes
    assert cache.cached_bytes() == 2**22
    cache.set_cache_limit_mb(1)
    assert cache.cached_bytes() == 0
    with pytest.raises(ValueError, match="MiB"):
        cache.set_cache_limit_mb(-1)
    cache.set_cache_limit_mb(2048)
    cache.set_cache_min_mb(4)
    run()  # blocks of 4 MiB or more only: w_in's is kept, w_out's (2 MiB) and h's are not
    assert cache.cached_bytes() == 2**22


@needs_native
@pytest.mark.skipif(build.load() is None or not build.load().have_onednn(), reason="no oneDNN matmul here")
@pytest.mark.parametrize("groups", [1, 2])
def test_native_loop_on_onednn_matches_python_loop(groups):
    """fp32, biases included (oneDNN's GEMM with the bias added by its sum post-op)."""
    experts, plan, counts = _loop_case("swiglu", True, None, E=9, T=400)
    want = _run_loop(LoopExperts, (), experts, plan, counts, "swiglu", True, True, torch.float32)
    got = _run_loop(NativeLoopExperts, _native(groups, onednn=True), experts, plan, counts, "swiglu", True, True,
                    torch.float32)
    for name, g, w in zip(["out", "x", "weights", "w_in", "w_out", "b_in", "b_out"], got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("own", [False, True])
def test_native_loop_runs_exact_rows_on_its_own_gemm(monkeypatch, own):
    """Asked to bucket, the C++ loop still runs its products on the exact rows where its own kernel
    runs them (it builds nothing per shape); on oneDNN the rows are bucketed."""
    if build.load() is None or not build.load().have_onednn():
        pytest.skip("no oneDNN matmul here")
    rows_seen = []
    layout = cpu_loop.layout
    monkeypatch.setattr(cpu_loop, "layout", lambda counts, rows, bounds: rows_seen.append(rows(17)) or
                        layout(counts, rows, bounds))
    experts, plan, counts = _loop_case("swiglu", False, None)
    experts = experts.float()
    x = torch.randn(plan.num_tokens, 8)
    with torch.no_grad():
        cpu_loop.loop_experts(x, plan.token_ids_N, plan.weights_N, experts.w_in, experts.w_out, None, None, counts,
                              "swiglu", bucket=True, groups=2, onednn=True, own_gemm=own)
    own_runs = own and build.load().have_own_gemm()
    assert rows_seen == [17 if own_runs else bucketed_rows(17)] and bucketed_rows(17) > 17


_HIDDEN_SYMBOLS_SCRIPT = r"""
import json, warnings
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from moekit.cpu import build, cache
    from moekit.moe import backends
    from moekit.moe.backends import chooser
    from moekit import MoEConfig, MoELayer
    module = build.load()
    build.load()
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=32, expert_hidden=16, num_experts=4, top_k=2))
    x = torch.randn(64, 32)
    with torch.no_grad():
        ran = layer.experts.backend_for(x)
        got = layer(x).output
        backends.use(layer, "loop")
        want = layer(x).output
print(json.dumps({"warnings": [str(w.message) for w in caught if "moekit" in str(w.message)],
                  "symbols": module.private_symbols(), "onednn": module.have_onednn(),
                  "swiglu": module.have_fused_swiglu(), "gemm": chooser.gemm_backend(), "ran": ran,
                  "close": torch.allclose(got, want, rtol=1e-5, atol=1e-6), "cache_limit_mb": cache.cache_limit_mb()}))
"""


def _run_script(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1], env={**os.environ, **env})


@needs_native
def test_a_missing_private_symbol_warns_once_by_name_and_pure_pytorch_takes_over():
    """Every private libtorch symbol the extension uses, treated as missing (as a torch that renamed it
    would leave it): one warning each, naming it; oneDNN and the fused SwiGLU are off, the GEMM backend
    falls back to blas, and the C++ loop still runs and equals the Python loop. The load also applies
    the block cache bound of the options."""
    names = [name for name, _ in build.load().private_symbols()]
    assert any(n.startswith("at::native::mkldnn_matmul") for n in names)
    proc = _run_script(_HIDDEN_SYMBOLS_SCRIPT, {"MOEKIT_HIDE_SYMBOLS": ",".join(n.split("(")[0] for n in names),
                                                "MOEKIT_BLOCK_CACHE_MB": "5", "MOEKIT_GEMM": "auto"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert len(out["warnings"]) == len(names)
    for name, message in zip(names, out["warnings"]):
        assert name in message and "does not export" in message
    assert out["symbols"] == [[name, False] for name in names]
    assert not out["onednn"] and not out["swiglu"] and out["gemm"] == "blas"
    assert out["ran"] == "native" and out["close"]
    assert out["cache_limit_mb"] == 5


@needs_native
def test_an_unknown_hidden_symbol_is_refused_by_name():
    proc = _run_script("from moekit.cpu import build; build.load()", {"MOEKIT_HIDE_SYMBOLS": "at::native::nothing"})
    assert proc.returncode != 0 and "MOEKIT_HIDE_SYMBOLS: 'at::native::nothing'" in proc.stderr


def test_native_off_loads_and_builds_nothing(monkeypatch):
    """MOEKIT_NATIVE=0 (options.native False): no module, a reason naming the variable, the Python loop."""
    monkeypatch.setattr(build, "_state", lambda: pytest.fail("built or loaded with native off"))
    with options.override(native=False):
        assert build.load() is None and build.loaded() is None
        assert "MOEKIT_NATIVE=0" in build.unavailable_reason()
        assert make_layer(dtype=torch.float32).experts.backend_for(torch.randn(2, 16)) == "loop"
        assert cache.empty_cache() == 0 and cache.cached_bytes() == 0
