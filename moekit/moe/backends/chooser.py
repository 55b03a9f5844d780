"""What runs where: the one place that decides which expert backend and which fp32 CPU GEMM run.

Every choice of moekit's acceleration is made here, from the layer's request, the tensors at hand and
the options (:mod:`moekit.cpu.options`, i.e. the ``MOEKIT_*`` overrides); nothing else reads those.

* :func:`expert_backend`: ``gather`` in the compiled decode step; else the layer's request, else the
  options' ``expert_backend``, else ``auto``: ``grouped_mm`` for CUDA bf16 (fp16 grouped_mm takes a
  slow fallback in PyTorch), ``native`` on a CPU where the C++ extension builds, else ``loop``.
* :func:`gemm_backend` / :func:`onednn_for`: fp32 CPU products on oneDNN (``auto``: on x86-64 where
  the extension finds ATen's oneDNN matmul and it runs fp32 here) or on ``torch.mm`` (``blas``).
* :func:`loop_gemm`: for the slice loops, whether their GEMMs run on bucketed rows, in how many
  expert groups, on oneDNN, on the C++ loop's own kernel.
* :func:`accelerates_dense`: whether a model's dense products (attention, dense FFNs, the LM head,
  the loss) take :func:`onednn_for` too: with ``gemm='onednn'``, or ``auto`` for a model with MoE
  layers (on a CPU their experts load the C++ extension anyway). A dense model then never loads it.

NOTE: a later per-machine probe (which backend wins per shape class) plugs in here; until then the
rules above are fixed.
"""

from __future__ import annotations

import platform
from typing import NamedTuple

import torch

from moekit.config import ModelConfig, MoEConfig
from moekit.cpu import options
from moekit.moe.backends.grouped_mm import grouped_mm_aligned

X86 = platform.machine().lower() in ("x86_64", "amd64")
GATHER_MAX_TOKENS = 64  # the decode step's gather reads each (token, choice)'s expert weights: a few tokens only
# Split the experts over the intra-op threads only when one expert's weights (w_in and w_out, in the
# compute dtype) take at most this many bytes. One-off trials on a 2-core CPU (1 MiB L2 per core),
# fwd+bwd of one layer at 4096 tokens, each variant in fresh processes: E8-E128 experts of hidden
# 88-176 (0.5-1.1 MB) ran 2-20% faster split; hidden 704 and 1408 (4.3 and 8.7 MB) 9% and 19% slower
# than one group whose GEMMs use both threads.
GROUPED_THREADS_MAX_WEIGHT_BYTES = 2 * 2**20


def _native():
    """The loaded C++ extension, or None (turned off, or it does not build). Imports the build module
    only here: nothing reaches this for a dense model."""
    if not options.get().native:
        return None
    from moekit.cpu import build

    return build.load()


def native_available() -> bool:
    return _native() is not None


# ---- experts -------------------------------------------------------------------------------------
def expert_backend(cfg: MoEConfig, x_TD: torch.Tensor, requested: str = "auto", decode_step: bool = False) -> str:
    """The expert backend for these tokens (in the compute dtype).

    ``requested``: the layer's own choice (``auto`` leaves it to the options, then to the rules).
    ``decode_step``: the layer runs inside :func:`moekit.moe.backends.gather_decoding` and can take the
    gather path (dropless token choice, every expert in this process); it does when compiled, without
    gradients, on at most :data:`GATHER_MAX_TOKENS` tokens.
    """
    if (decode_step and torch.compiler.is_compiling() and not torch.is_grad_enabled()
            and x_TD.shape[0] <= GATHER_MAX_TOKENS):
        return "gather"
    name = requested if requested != "auto" else options.get().expert_backend
    if name != "auto":
        return name
    if x_TD.is_cuda and x_TD.dtype == torch.bfloat16 and grouped_mm_aligned(cfg):
        return "grouped_mm"
    if x_TD.device.type == "cpu" and native_available():
        return "native"
    return "loop"


class LoopGemm(NamedTuple):
    """How a slice loop runs its per-expert GEMMs."""

    bucket: bool  # on bucketed row counts (oneDNN builds a kernel per shape)
    groups: int  # expert groups over the intra-op threads (the C++ loop; 1: one group, each GEMM threaded)
    onednn: bool  # fp32 products on oneDNN (the C++ loop)
    own_gemm: bool  # fp32 products inside the expert groups on the C++ loop's own kernel


def thread_groups(w_in_EHD: torch.Tensor, w_out_EDF: torch.Tensor) -> int:
    """How many groups the C++ loop splits the experts into: one per intra-op thread for small experts
    (see :data:`GROUPED_THREADS_MAX_WEIGHT_BYTES`), else 1."""
    expert_bytes = (w_in_EHD[0].numel() + w_out_EDF[0].numel()) * w_in_EHD.element_size()
    if expert_bytes > GROUPED_THREADS_MAX_WEIGHT_BYTES:
        return 1
    return max(1, min(torch.get_num_threads(), w_in_EHD.shape[0]))


def loop_gemm(x_TD: torch.Tensor, weights, native: bool) -> LoopGemm:
    """For the C++ loop (``native``) or the Python one: CPU bf16 / fp16 GEMMs run on oneDNN, the C++
    loop's fp32 ones too where :func:`onednn_for` holds, and oneDNN builds a kernel per new shape (~0.6 ms
    and ~0.6 MB of RSS each, cached), hence bucketed rows there. The C++ loop's own fp32 kernel, for
    small experts split into groups on a CPU with AVX-512, builds nothing per shape (``MOEKIT_OWN_GEMM=0``
    turns it off); the Python loop's fp32 products run ``torch.mm``."""
    cpu = x_TD.device.type == "cpu"
    low_precision = x_TD.dtype in (torch.bfloat16, torch.float16)
    if not native:
        return LoopGemm(bucket=cpu and low_precision, groups=1, onednn=False, own_gemm=False)
    groups = thread_groups(weights[0], weights[1])
    onednn = onednn_for(x_TD)
    module = _native()
    own = (groups >= 2 and onednn and options.get().own_gemm and module is not None and module.have_own_gemm())
    return LoopGemm(bucket=cpu and (low_precision or onednn), groups=groups, onednn=onednn, own_gemm=own)


# ---- fp32 CPU GEMM -------------------------------------------------------------------------------
def gemm_backend() -> str:
    """The backend fp32 CPU products run on now: ``onednn`` or ``blas`` (a few µs: call it once per op).
    ``auto`` is oneDNN on x86-64 where the extension found ATen's oneDNN matmul and a first fp32 product
    on it ran (ATen's fp32 path needs AVX-512 or AVX-NE-CONVERT); ``torch.backends.mkldnn.enabled =
    False`` means ``blas``; ``onednn`` where it does not run raises RuntimeError saying why."""
    name = options.get().gemm
    if name == "blas" or (name == "auto" and not X86) or not torch.backends.mkldnn.enabled:
        return "blas"
    module = _native()
    if module is not None and module.have_onednn():
        return "onednn"
    if name == "onednn":
        from moekit.cpu import build

        why = build.unavailable_reason() or "this torch's oneDNN matmul did not run an fp32 product here"
        raise RuntimeError(f"gemm backend 'onednn' is unavailable ({why}); use 'auto' or 'blas'")
    return "blas"


def onednn_for(t: torch.Tensor) -> bool:
    """Whether products on ``t`` run on oneDNN: fp32 CPU tensors outside ``torch.compile``, when
    :func:`gemm_backend` says so."""
    return (t.dtype == torch.float32 and t.device.type == "cpu" and not torch.compiler.is_compiling()
            and gemm_backend() == "onednn")


def accelerates_dense(cfg: ModelConfig) -> bool:
    """Whether a model of ``cfg`` runs its dense fp32 CPU products through :func:`onednn_for`
    (:func:`moekit.cpu.gemm.accelerate`), decided when it is built: never with ``gemm='blas'`` or the
    extension turned off; with ``auto`` only when it has MoE layers."""
    opts = options.get()
    if not opts.native or opts.gemm == "blas":
        return False
    return opts.gemm == "onednn" or (X86 and any(cfg.is_moe_layer(i) for i in range(cfg.n_layers)))
