"""Which GEMM moekit's fp32 products run on, on a CPU, and a ``Linear`` that uses it.

PyTorch runs an fp32 ``torch.mm`` on a CPU through its BLAS (MKL in the x86-64 wheels). MKL's fp32
GEMM takes its AVX2 kernels on non-Intel CPUs; oneDNN, also inside PyTorch, picks its kernels by the
CPU's features. On this project's 2-core AMD EPYC (Zen 5, AVX-512) oneDNN ran every product of an
FFN step (x W^T, its input and weight gradients, transposed operands included) 1.5-2.3x faster than
``torch.mm`` at the layer benchmark's sizes, equal to fp32 rounding
(``python benchmarks/gemm_backends.py``). PyTorch sends only bf16 / fp16 (and reduced-precision
fp32) products to oneDNN; moekit calls ATen's own oneDNN matmul for fp32 through its C++ extension
(:mod:`moekit.moe.native`), into preallocated outputs. Small experts' products inside that C++
expert loop run on a kernel of the loop's own instead (:func:`moekit.moe.native.own_gemm`).

``MOEKIT_GEMM`` chooses: ``auto`` (the default: oneDNN for fp32 on an x86-64 CPU when the extension
found it and a first product on it ran: ATen's fp32 path needs AVX-512 or AVX-NE-CONVERT), ``onednn``
(the same, an error when unavailable) or ``blas`` (``torch.mm`` everywhere, as PyTorch does).
``torch.backends.mkldnn.enabled = False`` also means ``blas``. Only fp32 CPU tensors are affected;
bf16 / fp16 already run on oneDNN through ``torch.mm``, CUDA on cuBLAS. Under ``torch.compile``,
CPU autocast, FX tracing and tensor subclasses :func:`linear` is ``F.linear``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform

import torch
import torch.nn as nn
import torch.nn.functional as F

BACKENDS = ("auto", "onednn", "blas")
_X86 = platform.machine().lower() in ("x86_64", "amd64")
_native_module = None  # moekit.moe.native, imported on first use


def _native():
    global _native_module
    if _native_module is None:
        from moekit.moe import native  # (lazy: moekit.moe imports this module's users)

        _native_module = native
    return _native_module.load()


def _checked(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r}: must be one of {', '.join(BACKENDS)}")
    return name


def requested() -> str:
    """The backend asked for: ``MOEKIT_GEMM`` (which :func:`use_backend` and :func:`choose` set), else
    ``auto``."""
    return _checked(os.environ.get("MOEKIT_GEMM", "auto"), "MOEKIT_GEMM")


def backend() -> str:
    """The backend fp32 CPU products run on now: ``onednn`` or ``blas`` (a few µs: call it once per op)."""
    name = requested()
    if name == "blas" or (name == "auto" and not _X86) or not torch.backends.mkldnn.enabled:
        return "blas"
    module = _native()
    if module is not None and module.have_onednn():
        return "onednn"
    if name == "onednn":
        why = _native_module.unavailable_reason() or "this torch's oneDNN matmul did not run an fp32 product here"
        raise RuntimeError(f"gemm backend 'onednn' is unavailable ({why}); use 'auto' or 'blas'")
    return "blas"


@contextlib.contextmanager
def use_backend(name: str):
    """Runs the block with ``name`` (one of :data:`BACKENDS`) as the backend, e.g. to compare them;
    processes started inside it inherit the choice (``MOEKIT_GEMM``)."""
    previous_env = os.environ.get("MOEKIT_GEMM")
    choose(name)
    try:
        yield
    finally:
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
    if name is not None:
        os.environ["MOEKIT_GEMM"] = _checked(name, "gemm backend")


def onednn_for(t: torch.Tensor) -> bool:
    """Whether products on ``t`` run on oneDNN: fp32 CPU tensors, when that is the backend."""
    return (t.dtype == torch.float32 and t.device.type == "cpu" and not torch.compiler.is_compiling()
            and backend() == "onednn")


def mm(a_MK: torch.Tensor, b_KN: torch.Tensor, out: torch.Tensor | None = None, accumulate: bool = False,
       onednn: bool | None = None) -> torch.Tensor:
    """``a @ b`` (into ``out``; added to it with ``accumulate``) on the chosen backend (``onednn``:
    decided by the caller, default :func:`onednn_for`)."""
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
    module = _native() if (onednn_for(a_MK) if onednn is None else onednn) else None
    if module is not None and b_KN.dtype == a_MK.dtype and out.is_contiguous():
        module.mm_out(out, a_MK, b_KN, accumulate)
    elif accumulate:
        out.addmm_(a_MK, b_KN)
    else:
        torch.mm(a_MK, b_KN, out=out)
    return out


class _Linear(torch.autograd.Function):
    """y = x W^T + b with the three products on :func:`mm` (x is [M, K], 2-D and contiguous). A
    backward under grad mode (``create_graph=True``) runs differentiable ops instead."""

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
        matmul = torch.mm if torch.is_grad_enabled() else functools.partial(mm, onednn=True)
        return (matmul(grad_MN, w_NK) if need_x else None, matmul(grad_MN.t(), x_MK) if need_w else None,
                grad_MN.sum(0) if ctx.has_bias and need_b else None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with fp32 CPU products on the chosen backend (:func:`backend`)."""
    plain = all(t is None or type(t) in (torch.Tensor, nn.Parameter) for t in (x, weight, bias))  # (no FX
    # proxies or tensor subclasses: they keep F.linear's semantics)
    if (not plain or torch.is_autocast_enabled("cpu") or not onednn_for(x) or weight.dtype != x.dtype
            or (bias is not None and bias.dtype != x.dtype) or x.numel() == 0 or x.dim() < 2):
        return F.linear(x, weight, bias)
    y = _Linear.apply(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, state dict and initialisation) running :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
