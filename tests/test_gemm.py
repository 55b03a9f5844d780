"""The fp32 GEMM backend (moekit.nn.gemm): oneDNN's products against torch.mm's, the Linear built on
them against F.linear (outputs and gradients), the choice of backend and its errors."""

import platform

import pytest
import torch
import torch.nn.functional as F

from moekit.moe import native
from moekit.nn import gemm

has_onednn = native.load() is not None and native.load().have_onednn()
needs_onednn = pytest.mark.skipif(not has_onednn, reason="oneDNN's matmul is not reachable here")


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


@needs_onednn
def test_onednn_is_the_default_on_x86():
    """auto picks oneDNN on an x86-64 CPU whose torch has it (a torch without the symbol would
    silently lose the speed-up: this fails instead)."""
    with gemm.use_backend("auto"):
        expected = "onednn" if platform.machine().lower() in ("x86_64", "amd64") else "blas"
        assert gemm.backend() == expected
    with gemm.use_backend("blas"):
        assert gemm.backend() == "blas" and not gemm.onednn_for(torch.zeros(1))


def test_mm_casts_into_an_output_of_another_dtype_and_skips_other_dtypes():
    a, b = _operands()
    out = torch.zeros(a.shape[0], b.shape[1])
    gemm.mm(a.bfloat16(), b.bfloat16(), out=out)
    torch.testing.assert_close(out, (a.bfloat16() @ b.bfloat16()).float())
    torch.testing.assert_close(gemm.mm(a.double(), b.double()), a.double() @ b.double(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="accumulate=True needs out"):
        gemm.mm(a, b, accumulate=True)


def test_backend_names_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="'fast'.*auto, onednn, blas"):
        with gemm.use_backend("fast"):
            pass
    monkeypatch.setenv("MOEKIT_GEMM", "mkl")
    with pytest.raises(ValueError, match="MOEKIT_GEMM='mkl'"):
        gemm.backend()


@pytest.mark.parametrize("backend", ["onednn", "blas"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_f_linear(backend, bias):
    """Output and the gradients of input, weight and bias, on 3-D input (fp64 reference)."""
    if backend == "onednn" and not has_onednn:
        pytest.skip("oneDNN's matmul is not reachable here")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 24, generator=g, requires_grad=True)
    w = torch.randn(16, 24, generator=g, requires_grad=True)
    b = torch.randn(16, generator=g, requires_grad=True) if bias else None
    cot = torch.randn(2, 5, 16, generator=g)
    with gemm.use_backend(backend):
        y = gemm.linear(x, w, b)
    y.backward(cot)
    got = [y.detach(), x.grad, w.grad] + ([b.grad] if bias else [])
    xd, wd = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    bd = b.detach().double().requires_grad_(True) if bias else None
    yd = F.linear(xd, wd, bd)
    yd.backward(cot.double())
    want = [yd.detach(), xd.grad, wd.grad] + ([bd.grad] if bias else [])
    for name, a, e in zip(["y", "x", "w", "b"], got, want):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@needs_onednn
def test_linear_leaves_autocast_and_other_dtypes_to_f_linear(monkeypatch):
    calls = []
    monkeypatch.setattr(gemm._Linear, "apply", lambda *a: calls.append(a) or F.linear(*a))
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with gemm.use_backend("onednn"):
        gemm.linear(x.double(), w.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert gemm.linear(x, w).dtype == torch.bfloat16
        assert not calls
        gemm.linear(x, w)
        assert len(calls) == 1
