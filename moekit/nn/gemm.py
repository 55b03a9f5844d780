"""Which GEMM moekit's fp32 products run on, on a CPU, and a ``Linear`` that uses it.

PyTorch runs an fp32 ``torch.mm`` on a CPU through its BLAS (MKL in the x86-64 wheels). MKL's fp32
GEMM takes its AVX2 kernels on non-Intel CPUs; oneDNN, also inside PyTorch, picks AVX-512 by the
CPU's features. On this project's 2-core AMD EPYC (Zen 5) oneDNN ran every product of an FFN step
(x W^T, its two input and weight gradients, transposed operands included) 1.5-2.3x faster than
``torch.mm`` at the layer benchmark's sizes, equal to fp32 rounding (``python benchmarks/gemm_backends.py``). PyTorch sends only bf16 /
fp16 (and reduced-precision fp32) products to oneDNN; moekit calls ATen's own oneDNN matmul for fp32
through its C++ extension (:mod:`moekit.moe.native`), into preallocated outputs.

``MOEKIT_GEMM`` chooses: ``auto`` (the default: oneDNN for fp32 on an x86-64 CPU when the extension
found it, else the BLAS), ``onednn`` (the same, stated) or ``blas`` (``torch.mm`` everywhere, as
PyTorch does). Only fp32 CPU tensors are affected; bf16 / fp16 already run on oneDNN through
``torch.mm``, CUDA on cuBLAS. Under ``torch.compile`` and CPU autocast :func:`linear` is
``F.linear``, so compiled graphs and autocast see the usual op.
"""

from __future__ import annotations

import contextlib
import os
import platform

import torch
import torch.nn as nn
import torch.nn.functional as F

BACKENDS = ("auto", "onednn", "blas")
_override: str | None = None  # set by use_backend (benchmarks and tests); else MOEKIT_GEMM


def _native():
    from moekit.moe import native  # (lazy: moekit.moe imports this module's users)

    return native.load()


def requested() -> str:
    """The backend asked for: :func:`use_backend`'s, else ``MOEKIT_GEMM``, else ``auto``."""
    name = _override or os.environ.get("MOEKIT_GEMM", "auto")
    if name not in BACKENDS:
        raise ValueError(f"MOEKIT_GEMM={name!r}: must be one of {', '.join(BACKENDS)}")
    return name


def backend() -> str:
    """The backend fp32 CPU products run on now: ``onednn`` or ``blas``."""
    name = requested()
    if name == "blas" or (name == "auto" and platform.machine().lower() not in ("x86_64", "amd64")):
        return "blas"
    module = _native()
    if module is not None and module.have_onednn():
        return "onednn"
    if name == "onednn":
        raise RuntimeError("MOEKIT_GEMM=onednn: oneDNN's matmul is unavailable (the C++ extension did not build, "
                           "or this torch has no oneDNN); use auto or blas")
    return "blas"


@contextlib.contextmanager
def use_backend(name: str):
    """Runs the block with ``name`` (one of :data:`BACKENDS`) as the backend, e.g. to compare them;
    processes started inside it inherit the choice (``MOEKIT_GEMM``)."""
    global _override
    if name not in BACKENDS:
        raise ValueError(f"gemm backend {name!r}: must be one of {', '.join(BACKENDS)}")
    previous, previous_env = _override, os.environ.get("MOEKIT_GEMM")
    _override = os.environ["MOEKIT_GEMM"] = name
    try:
        yield
    finally:
        _override = previous
        if previous_env is None:
            os.environ.pop("MOEKIT_GEMM", None)
        else:
            os.environ["MOEKIT_GEMM"] = previous_env


def add_argument(parser) -> None:
    """The benchmarks' ``--gemm`` option (see :func:`choose`)."""
    parser.add_argument("--gemm", choices=BACKENDS,
                        help="fp32 CPU GEMM of moekit's side (default: $MOEKIT_GEMM, else auto); transformers' "
                             "sides always run torch.mm")


def choose(name: str | None) -> None:
    """Makes ``name`` (None: leave it) the backend of this process and of those it starts."""
    if name is None:
        return
    if name not in BACKENDS:
        raise ValueError(f"gemm backend {name!r}: must be one of {', '.join(BACKENDS)}")
    os.environ["MOEKIT_GEMM"] = name


def onednn_for(t: torch.Tensor) -> bool:
    """Whether products on ``t`` run on oneDNN: fp32 CPU tensors, when that is the backend."""
    return (t.dtype == torch.float32 and t.device.type == "cpu" and not torch.compiler.is_compiling()
            and backend() == "onednn")


def mm(a_MK: torch.Tensor, b_KN: torch.Tensor, out: torch.Tensor | None = None, accumulate: bool = False):
    """``a @ b`` (into ``out``; added to it with ``accumulate``) on the chosen backend."""
    if out is None:
        if accumulate:
            raise ValueError("mm: accumulate=True needs out")
        out = a_MK.new_empty(a_MK.shape[0], b_KN.shape[1])
    if out.dtype != a_MK.dtype:  # e.g. a bf16 product into an fp32 gradient: cast once, as `out[:] = a @ b`
        return out.add_(a_MK @ b_KN) if accumulate else out.copy_(a_MK @ b_KN)
    if onednn_for(a_MK) and b_KN.dtype == a_MK.dtype and out.is_contiguous():
        _native().mm_out(out, a_MK, b_KN, accumulate)
    elif accumulate:
        out.addmm_(a_MK, b_KN)
    else:
        torch.mm(a_MK, b_KN, out=out)
    return out


class _Linear(torch.autograd.Function):
    """y = x W^T + b with the three products on :func:`mm` (x is [M, K], 2-D and contiguous)."""

    @staticmethod
    def forward(ctx, x_MK, w_NK, b_N):
        y_MN = mm(x_MK, w_NK.t())
        if b_N is not None:
            y_MN += b_N
        ctx.save_for_backward(x_MK, w_NK)
        ctx.has_bias = b_N is not None
        return y_MN

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_MN):
        x_MK, w_NK = ctx.saved_tensors
        grad_MN = grad_MN.contiguous()
        grad_x = mm(grad_MN, w_NK) if ctx.needs_input_grad[0] else None
        grad_w = mm(grad_MN.t(), x_MK) if ctx.needs_input_grad[1] else None
        grad_b = grad_MN.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with fp32 CPU products on the chosen backend (:func:`backend`)."""
    if (torch.is_autocast_enabled("cpu") or not onednn_for(x)
            or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype) or x.numel() == 0):
        return F.linear(x, weight, bias)
    y = _Linear.apply(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, state dict and initialisation) running :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
