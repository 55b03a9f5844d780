"""The fp32 GEMM backend (moekit.nn.gemm): oneDNN's products against torch.mm's, the Linear built on
them against F.linear (outputs and gradients), the choice of backend and its errors."""

import os
import platform

import pytest
import torch
import torch.nn.functional as F

from moekit.moe import native
from moekit.nn import gemm

has_onednn = native.load() is not None and native.load().have_onednn()
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
    with gemm.use_backend("onednn"):
        got = gemm.mm(a, b)
        acc = torch.ones_like(want)
        gemm.mm(a, b, out=acc, accumulate=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acc, want + 1, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not (platform.machine().lower() in ("x86_64", "amd64") and native.load() is not None
                         and torch.backends.mkldnn.is_available()
                         and torch.backends.cpu.get_cpu_capability() == "AVX512"),
                    reason="oneDNN's fp32 matmul is expected only on AVX-512 x86-64 with the extension built")
def test_onednn_is_the_default_on_avx512_x86():
    """auto picks oneDNN where it runs: a torch whose oneDNN matmul went missing or stopped running
    fp32 would silently lose the speed-up; this fails instead."""
    with gemm.use_backend("auto"):
        assert gemm.backend() == "onednn"
    with gemm.use_backend("blas"):
        assert gemm.backend() == "blas" and not gemm.onednn_for(torch.zeros(1))
    enabled, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False
    try:
        with gemm.use_backend("auto"):
            assert gemm.backend() == "blas"
    finally:
        torch.backends.mkldnn.enabled = enabled


def test_mm_casts_into_an_output_of_another_dtype_and_checks_shapes():
    a, b = _operands()
    out = torch.zeros(a.shape[0], b.shape[1])
    gemm.mm(a.bfloat16(), b.bfloat16(), out=out)
    torch.testing.assert_close(out, (a.bfloat16() @ b.bfloat16()).float())
    torch.testing.assert_close(gemm.mm(a.double(), b.double()), a.double() @ b.double(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="accumulate=True needs out"):
        gemm.mm(a, b, accumulate=True)
    with pytest.raises(ValueError, match=r"a \(37, 29\).*b \(41, 29\)"):
        gemm.mm(a, b.t())
    with pytest.raises(ValueError, match=r"out \(2, 2\).*must be \(37, 41\)"):
        gemm.mm(a, b, out=torch.empty(2, 2))


def test_backend_names_are_checked_and_restored(monkeypatch):
    with pytest.raises(ValueError, match="'fast'.*auto, onednn, blas"):
        with gemm.use_backend("fast"):
            pass
    with pytest.raises(ValueError, match="'fast'"):
        gemm.choose("fast")
    monkeypatch.delenv("MOEKIT_GEMM", raising=False)
    with pytest.raises(KeyError):
        with gemm.use_backend("blas"):
            assert os.environ["MOEKIT_GEMM"] == "blas"
            raise KeyError
    assert "MOEKIT_GEMM" not in os.environ
    monkeypatch.setenv("MOEKIT_GEMM", "blas")
    with gemm.use_backend("auto"):
        assert os.environ["MOEKIT_GEMM"] == "auto"
    assert os.environ["MOEKIT_GEMM"] == "blas"
    monkeypatch.setenv("MOEKIT_GEMM", "mkl")
    with pytest.raises(ValueError, match="MOEKIT_GEMM='mkl'"):
        gemm.backend()


def _linear_case(shape, bias, needs, contiguous, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape[:-1], shape[-1] * (1 if contiguous else 2), generator=g)
    x = (x if contiguous else x[..., ::2]).requires_grad_(needs[0])
    w = torch.randn(16, shape[-1], generator=g).requires_grad_(needs[1])
    b = torch.randn(16, generator=g).requires_grad_(needs[2]) if bias else None
    return x, w, b, torch.randn(*shape[:-1], 16, generator=g)


@pytest.mark.parametrize("backend", ["onednn", "blas"])
@pytest.mark.parametrize("bias,needs,contiguous", [(False, (True, True, False), True),
                                                   (True, (True, True, True), True),
                                                   (True, (False, False, True), True),
                                                   (False, (False, True, False), False)])
def test_linear_matches_f_linear(monkeypatch, backend, bias, needs, contiguous):
    """Output and the gradients that are asked for (x, w, b in any combination), 3-D and strided
    input, against fp64 F.linear; on oneDNN the fast Function must be the one that ran."""
    if backend == "onednn" and not has_onednn:
        pytest.skip("oneDNN's fp32 matmul does not run here")
    calls = []
    real_apply = gemm._Linear.apply
    monkeypatch.setattr(gemm._Linear, "apply", lambda *a: calls.append(1) or real_apply(*a))
    x, w, b, cot = _linear_case((2, 5, 24), bias, needs, contiguous)
    with gemm.use_backend(backend):
        y = gemm.linear(x, w, b)
        y.backward(cot)
    assert len(calls) == (backend == "onednn")
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
    with gemm.use_backend("onednn"):
        (gx,) = torch.autograd.grad(gemm.linear(x, w, b).pow(2).sum(), x, create_graph=True)
    (gw,) = torch.autograd.grad(gx.sum(), w)
    xd, wd, bd = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    (gxd,) = torch.autograd.grad(F.linear(xd, wd, bd).pow(2).sum(), xd, create_graph=True)
    (gwd,) = torch.autograd.grad(gxd.sum(), wd)
    torch.testing.assert_close(gw.double(), gwd, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_linear_leaves_autocast_other_dtypes_and_1d_to_f_linear(monkeypatch):
    calls = []
    monkeypatch.setattr(gemm._Linear, "apply", lambda *a: calls.append(a) or F.linear(*a))
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with gemm.use_backend("onednn"):
        gemm.linear(x.double(), w.double())
        gemm.linear(x[0], w)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert gemm.linear(x, w).dtype == torch.bfloat16
        assert not calls
        gemm.linear(x, torch.nn.Parameter(w))
        assert len(calls) == 1
