"""fp32 products on ATen's oneDNN matmul, and a ``Linear`` that runs them, for the parts of a model
that are plain PyTorch (attention, dense FFNs, the LM head, the fused loss).

PyTorch runs an fp32 ``torch.mm`` on a CPU through its BLAS (MKL in the x86-64 wheels, whose fp32
GEMM takes its AVX2 kernels on non-Intel CPUs) and sends only bf16 / fp16 products to oneDNN, which
picks its kernels by the CPU's features; where oneDNN's fp32 GEMM is the faster one
(``python benchmarks/gemm_backends.py`` compares them, product by product) moekit calls it through
its C++ extension, into preallocated outputs.

Nothing here decides: every function takes ``onednn`` (or, for :class:`Linear`, a function that says
it per input) from :mod:`moekit.moe.backends.chooser`, which also installs :class:`Linear` in a model
(:func:`accelerate`). ``onednn=False`` is exactly ``torch.mm`` / ``F.linear``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def mm(a_MK: torch.Tensor, b_KN: torch.Tensor, out: torch.Tensor | None = None, accumulate: bool = False,
       onednn: bool = False) -> torch.Tensor:
    """``a @ b`` (into ``out``; added to it with ``accumulate``), on oneDNN with ``onednn`` (fp32 CPU
    operands, where the extension found it; else ``torch.mm``)."""
    if a_MK.dim() != 2 or b_KN.dim() != 2 or a_MK.shape[1] != b_KN.shape[0] or a_MK.device != b_KN.device:
        raise ValueError(f"mm: a {tuple(a_MK.shape)} on {a_MK.device} and b {tuple(b_KN.shape)} on {b_KN.device} "
                         f"must be [M, K] and [K, N] matrices on one device")
    shape = (a_MK.shape[0], b_KN.shape[1])
    if out is None:
        if accumulate:
            raise ValueError("mm: accumulate=True needs out")
        out = a_MK.new_empty(shape)
    elif tuple(out.shape) != shape or out.device != a_MK.device:
        raise ValueError(f"mm: out {tuple(out.shape)} on {out.device} must be {shape} on {a_MK.device}")
    if out.dtype != a_MK.dtype:  # e.g. a bf16 product into an fp32 gradient: cast once, as `out[:] = a @ b`
        return out.add_(a_MK @ b_KN) if accumulate else out.copy_(a_MK @ b_KN)
    module = None
    if onednn:
        from moekit.cpu import build  # (here: importing this module loads nothing)

        module = build.load()
    if module is not None and b_KN.dtype == a_MK.dtype and out.is_contiguous():
        module.mm_out(out, a_MK, b_KN, accumulate)
    elif accumulate:
        out.addmm_(a_MK, b_KN)
    else:
        torch.mm(a_MK, b_KN, out=out)
    return out


class _Linear(torch.autograd.Function):
    """y = x W^T + b with the three products on oneDNN (x is [M, K], 2-D and contiguous). A backward
    under grad mode (``create_graph=True``) runs differentiable ops instead."""

    @staticmethod
    def forward(ctx, x_MK, w_NK, b_N):
        y_MN = mm(x_MK, w_NK.t(), onednn=True)
        if b_N is not None:
            y_MN += b_N
        ctx.save_for_backward(x_MK, w_NK)
        ctx.has_bias = b_N is not None
        return y_MN

    @staticmethod
    def backward(ctx, grad_MN):
        x_MK, w_NK = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_MN = grad_MN.contiguous()
        # under grad mode (create_graph=True: a double backward) differentiable products keep the graph
        if torch.is_grad_enabled():
            matmul = torch.mm
        else:
            def matmul(a, b):
                return mm(a, b, onednn=True)
        return (matmul(grad_MN, w_NK) if need_x else None, matmul(grad_MN.t(), x_MK) if need_w else None,
                grad_MN.sum(0) if ctx.has_bias and need_b else None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           onednn: bool = False) -> torch.Tensor:
    """``F.linear``, its products on oneDNN with ``onednn`` where that applies: fp32 CPU tensors of one
    dtype, at least 2-D, outside ``torch.compile``, CPU autocast, FX tracing and tensor subclasses."""
    plain = all(t is None or type(t) in (torch.Tensor, nn.Parameter) for t in (x, weight, bias))  # (no FX
    # proxies or tensor subclasses: they keep F.linear's semantics)
    if (not onednn or not plain or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu")
            or x.dtype != torch.float32 or x.device.type != "cpu" or weight.dtype != x.dtype
            or (bias is not None and bias.dtype != x.dtype) or x.numel() == 0 or x.dim() < 2):
        return F.linear(x, weight, bias)
    y = _Linear.apply(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


def _never(x: torch.Tensor) -> bool:
    return False


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, state dict and initialisation) whose products run on oneDNN where
    ``onednn_for(x)`` says so (default: never)."""

    onednn_for: Callable[[torch.Tensor], bool] = staticmethod(_never)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, onednn=not torch.compiler.is_compiling() and self.onednn_for(x))


def accelerate(module: nn.Module, onednn_for: Callable[[torch.Tensor], bool]) -> int:
    """Makes every ``nn.Linear`` of ``module`` a :class:`Linear` asking ``onednn_for`` (parameters, state
    dict and hooks unchanged); returns how many."""
    count = 0
    for m in module.modules():
        if type(m) in (nn.Linear, Linear):
            m.__class__ = Linear
            m.onednn_for = onednn_for
            count += 1
    return count
