"""The fp32 GEMM: oneDNN's products (moekit.cpu.gemm) against torch.mm's, the Linear built on them
against F.linear (outputs and gradients), the chooser's choice of backend and its errors, where a
model takes it, and the names the benchmarks still reach through moekit.nn.gemm."""

import functools
import os
import platform

import pytest
import torch
import torch.nn.functional as F

from moekit import ModelConfig, MoETransformer
from moekit.cpu import build, options
from moekit.cpu import gemm as cpu_gemm
from moekit.moe.backends import chooser
from moekit.nn import gemm as gemm_alias
from moekit.nn.loss import linear_cross_entropy

has_onednn = build.load() is not None and build.load().have_onednn()
needs_onednn = pytest.mark.skipif(not has_onednn, reason="oneDNN's fp32 matmul does not run here")


def _operands(M=37, K=29, N=41, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g), torch.randn(K, N, generator=g)


@needs_onednn
@pytest.mark.parametrize("layout", ["nn", "tn", "nt", "tt"])
def test_onednn_mm_equals_torch_mm(layout):
    """Every operand layout the loops use (a or b transposed views), plain and accumulated."""
    a, b = _operands()
    if layout[0] == "t":
        a = a.t().contiguous().t()
    if layout[1] == "t":
        b = b.t().contiguous().t()
    want = torch.mm(a, b)
    got = cpu_gemm.mm(a, b, onednn=True)
    acc = torch.ones_like(want)
    cpu_gemm.mm(a, b, out=acc, accumulate=True, onednn=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acc, want + 1, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not (platform.machine().lower() in ("x86_64", "amd64") and build.load() is not None
                         and torch.backends.mkldnn.is_available()
                         and torch.backends.cpu.get_cpu_capability() == "AVX512"),
                    reason="oneDNN's fp32 matmul is expected only on AVX-512 x86-64 with the extension built")
def test_onednn_is_the_default_on_avx512_x86():
    """auto picks oneDNN where it runs: a torch whose oneDNN matmul went missing or stopped running
    fp32 would silently lose the speed-up; this fails instead."""
    with options.override(gemm="auto"):
        assert chooser.gemm_backend() == "onednn" and chooser.onednn_for(torch.zeros(1))
    with options.override(gemm="blas"):
        assert chooser.gemm_backend() == "blas" and not chooser.onednn_for(torch.zeros(1))
    enabled, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False
    try:
        with options.override(gemm="auto"):
            assert chooser.gemm_backend() == "blas"
    finally:
        torch.backends.mkldnn.enabled = enabled


def test_an_unavailable_onednn_says_why_and_auto_falls_back():
    with options.override(native=False, gemm="onednn"), pytest.raises(RuntimeError, match="MOEKIT_NATIVE=0"):
        chooser.gemm_backend()
    with options.override(native=False, gemm="auto"):
        assert chooser.gemm_backend() == "blas" and not chooser.onednn_for(torch.zeros(1))


def test_mm_casts_into_an_output_of_another_dtype_and_checks_shapes():
    a, b = _operands()
    out = torch.zeros(a.shape[0], b.shape[1])
    cpu_gemm.mm(a.bfloat16(), b.bfloat16(), out=out, onednn=True)
    torch.testing.assert_close(out, (a.bfloat16() @ b.bfloat16()).float())
    torch.testing.assert_close(cpu_gemm.mm(a.double(), b.double(), onednn=True), a.double() @ b.double(),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="accumulate=True needs out"):
        cpu_gemm.mm(a, b, accumulate=True)
    with pytest.raises(ValueError, match=r"a \(37, 29\).*b \(41, 29\)"):
        cpu_gemm.mm(a, b.t())
    with pytest.raises(ValueError, match=r"out \(2, 2\).*must be \(37, 41\)"):
        cpu_gemm.mm(a, b, out=torch.empty(2, 2))


def test_the_benchmarks_names_still_choose_and_restore(monkeypatch):
    """moekit.nn.gemm (kept for the benchmarks): choose / use_backend set the options and export
    MOEKIT_GEMM for child processes, restore both, and check names."""
    with pytest.raises(ValueError, match="'fast'.*auto, onednn, blas"):
        with gemm_alias.use_backend("fast"):
            pass
    with pytest.raises(ValueError, match="'fast'"):
        gemm_alias.choose("fast")
    monkeypatch.delenv("MOEKIT_GEMM", raising=False)
    before = options.get()
    with pytest.raises(KeyError):
        with gemm_alias.use_backend("blas"):
            assert os.environ["MOEKIT_GEMM"] == "blas" and gemm_alias.requested() == "blas"
            assert gemm_alias.backend() == "blas"
            raise KeyError
    assert "MOEKIT_GEMM" not in os.environ and options.get() == before
    monkeypatch.setattr(options, "_current", None)
    monkeypatch.setenv("MOEKIT_GEMM", "mkl")
    with pytest.raises(ValueError, match="MOEKIT_GEMM"):
        options.get()
    monkeypatch.setattr(options, "_current", None)


def _linear_case(shape, bias, needs, contiguous, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape[:-1], shape[-1] * (1 if contiguous else 2), generator=g)
    x = (x if contiguous else x[..., ::2]).requires_grad_(needs[0])
    w = torch.randn(16, shape[-1], generator=g).requires_grad_(needs[1])
    b = torch.randn(16, generator=g).requires_grad_(needs[2]) if bias else None
    return x, w, b, torch.randn(*shape[:-1], 16, generator=g)


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("bias,needs,contiguous", [(False, (True, True, False), True),
                                                   (True, (True, True, True), True),
                                                   (True, (False, False, True), True),
                                                   (False, (False, True, False), False)])
def test_linear_matches_f_linear(monkeypatch, onednn, bias, needs, contiguous):
    """Output and the gradients that are asked for (x, w, b in any combination), 3-D and strided
    input, against fp64 F.linear; on oneDNN the fast Function must be the one that ran."""
    if onednn and not has_onednn:
        pytest.skip("oneDNN's fp32 matmul does not run here")
    calls = []
    real_apply = cpu_gemm._Linear.apply
    monkeypatch.setattr(cpu_gemm._Linear, "apply", lambda *a: calls.append(1) or real_apply(*a))
    x, w, b, cot = _linear_case((2, 5, 24), bias, needs, contiguous)
    y = cpu_gemm.linear(x, w, b, onednn=onednn)
    y.backward(cot)
    assert len(calls) == onednn
    leaves = [t for t in (x, w, b) if t is not None]
    ref = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    yd = F.linear(*ref)
    yd.backward(cot.double())
    torch.testing.assert_close(y.detach().double(), yd.detach(), rtol=1e-5, atol=1e-5)
    for t, r in zip(leaves, ref):
        assert (t.grad is None) == (not t.requires_grad)
        if t.requires_grad:
            torch.testing.assert_close(t.grad.double(), r.grad, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_linear_double_backward():
    """create_graph=True keeps the graph (the backward runs differentiable ops under grad mode)."""
    x, w, b, _ = _linear_case((6, 8), True, (True, True, True), True)
    (gx,) = torch.autograd.grad(cpu_gemm.linear(x, w, b, onednn=True).pow(2).sum(), x, create_graph=True)
    (gw,) = torch.autograd.grad(gx.sum(), w)
    xd, wd, bd = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    (gxd,) = torch.autograd.grad(F.linear(xd, wd, bd).pow(2).sum(), xd, create_graph=True)
    (gwd,) = torch.autograd.grad(gxd.sum(), wd)
    torch.testing.assert_close(gw.double(), gwd, rtol=1e-5, atol=1e-5)


def test_linear_leaves_autocast_other_dtypes_and_1d_to_f_linear(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_gemm._Linear, "apply", lambda *a: calls.append(a) or F.linear(*a))
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    cpu_gemm.linear(x.double(), w.double(), onednn=True)
    cpu_gemm.linear(x[0], w, onednn=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_gemm.linear(x, w, onednn=True).dtype == torch.bfloat16
    cpu_gemm.linear(x, w, onednn=False)
    assert not calls
    cpu_gemm.linear(x, torch.nn.Parameter(w), onednn=True)
    assert len(calls) == 1


def test_accelerate_swaps_linears_in_place_and_asks_per_input(monkeypatch):
    """accelerate() keeps parameters and state dict; each forward asks the given function, and runs the
    oneDNN Function only when it says so."""
    calls, asked = [], []
    monkeypatch.setattr(cpu_gemm._Linear, "apply", lambda *a: calls.append(1) or F.linear(*a))
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert cpu_gemm.accelerate(net, lambda x: asked.append(x.shape) or x.shape[0] > 3) == 2
    assert all(type(m) is cpu_gemm.Linear for m in (net[0], net[2]))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    net(torch.randn(2, 8))
    assert calls == [] and len(asked) == 2
    net(torch.randn(5, 8))
    assert len(calls) == 2


@pytest.mark.parametrize("gemm", ["auto", "onednn", "blas"])
def test_a_model_takes_onednn_for_its_dense_parts_as_the_chooser_says(gemm):
    """With auto only a model with MoE layers (whose experts load the extension anyway) runs its dense
    products through the chooser; onednn asks for it on any model; blas on none."""
    if gemm == "onednn" and not has_onednn:
        pytest.skip("oneDNN's fp32 matmul does not run here")
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    with options.override(gemm=gemm):
        for name, has_moe in (("tiny", True), ("tiny-dense", False)):
            model = MoETransformer(ModelConfig.from_name(name))
            want = gemm == "onednn" or (gemm == "auto" and has_moe and x86 and build.load() is not None)
            kinds = {type(m) for m in model.modules() if isinstance(m, torch.nn.Linear)}
            assert model.accelerated == want and kinds == ({cpu_gemm.Linear} if want else {torch.nn.Linear}), name


@needs_onednn
def test_the_fused_loss_on_onednn_matches_torch_mm():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 24, generator=g, requires_grad=True)
    w = torch.randn(50, 24, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (300,), generator=g)
    results = []
    for mm in (functools.partial(cpu_gemm.mm, onednn=True), None):
        h.grad = w.grad = None
        loss = linear_cross_entropy(h, w, t, chunk=64, **({"mm": mm} if mm else {}))
        loss.backward()
        results.append((loss.detach(), h.grad.clone(), w.grad.clone()))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
