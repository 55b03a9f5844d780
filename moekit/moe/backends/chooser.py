"""What runs where: the one place that decides which expert backend and which fp32 CPU GEMM run.

Every choice of moekit's acceleration is made here, from the layer's request, the tensors at hand and
the options (:mod:`moekit.cpu.options`, i.e. the ``MOEKIT_*`` overrides); nothing else reads those.

* :func:`expert_backend`: ``gather`` in the compiled decode step; else the layer's request, else the
  options' ``expert_backend``, else ``auto``: ``grouped_mm`` for CUDA bf16 (fp16 grouped_mm takes a
  slow fallback in PyTorch); on a CPU the faster of ``native`` and ``loop`` as measured on this
  machine (:mod:`.probe`), or with the probe off ``native`` where the C++ extension builds, else
  ``loop``.
* :func:`gemm_backend` / :func:`onednn_for`: fp32 CPU products on oneDNN (``auto``: on x86-64 where
  the extension finds ATen's oneDNN matmul and it runs fp32 here) or on ``torch.mm`` (``blas``).
* :func:`loop_gemm`: for the slice loops, whether their GEMMs run on bucketed rows, in how many
  expert groups, on oneDNN (under ``auto`` for the C++ loop: as measured, per shape class), on the C++
  loop's own kernel.
* :func:`accelerates_dense` / :func:`dense_onednn`: whether a model's dense products (attention, dense
  FFNs, the LM head, the loss) may take oneDNN (decided when it is built: with ``gemm='onednn'``, or
  ``auto`` for a model with MoE layers, whose experts load the C++ extension anyway; a dense model
  never loads it), and whether each does (at run time: where oneDNN measured faster for the model's
  products, or with the probe off, always).

Where ``auto`` is measured, every candidate is timed once per machine and shape class and cached
(:mod:`moekit.moe.backends.probe`); :func:`describe` says what was chosen and why.
"""

from __future__ import annotations

import platform
import torch

from moekit.config import ModelConfig, MoEConfig
from moekit.cpu import options
from moekit.moe.backends import probe
from moekit.moe.backends.base import ExpertWeights, LoopGemm
from moekit.moe.backends.grouped_mm import grouped_mm_aligned
from moekit.moe.backends.probe import Candidate

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
def _probing(device: torch.device) -> bool:
    """Whether ``auto`` is measured here: on a CPU, the probe on, not inside torch.compile or a probe."""
    return (device.type == "cpu" and options.get().probe and not torch.compiler.is_compiling()
            and not probe.active())


def onednn_runs() -> bool:
    """Whether fp32 products can run on oneDNN here (x86-64, the extension found ATen's oneDNN matmul
    and an fp32 product on it ran, oneDNN not turned off in torch)."""
    if not X86 or not torch.backends.mkldnn.enabled:
        return False
    module = _native()
    return module is not None and module.have_onednn()


_candidates_of: dict[tuple, list[Candidate]] = {}


def _candidates(backend: str, dtype: torch.dtype) -> list[Candidate]:
    """What ``auto`` chooses from for an expert ``backend`` request (``auto``, ``native``, ``loop``) at
    the options' GEMM request: the C++ loop on each fp32 GEMM that runs, the Python loop (torch.mm).
    Kept per request and options (every forward asks; the answer changes only with the options)."""
    key = (backend, dtype, options.get(), torch.backends.mkldnn.enabled)
    found = _candidates_of.get(key)
    if found is None:
        found = _candidates_of[key] = _list_candidates(backend, dtype)
    return found


def _list_candidates(backend: str, dtype: torch.dtype) -> list[Candidate]:
    gemm = options.get().gemm
    fp32 = dtype == torch.float32
    out = []
    if backend in ("auto", "native") and native_available():
        if not fp32:
            out.append(Candidate("native"))
        else:
            if gemm in ("auto", "onednn") and onednn_runs():
                out.append(Candidate("native", "onednn"))
            if gemm in ("auto", "blas"):
                out.append(Candidate("native", "blas"))
    if backend in ("auto", "loop") and gemm != "onednn":
        out.append(Candidate("loop", "blas" if fp32 else None))
    return out


def _expert_shape(cfg: MoEConfig, x_TD: torch.Tensor, dtype: torch.dtype) -> probe.ExpertShape:
    T = x_TD.shape[0]
    capacity = cfg.capacity(T, training=True)
    n = T * cfg.top_k if capacity is None else min(T * cfg.top_k, cfg.num_experts * capacity)
    if not cfg.is_token_choice:
        n = cfg.num_experts * (capacity or T)
    return probe.expert_shape(dtype, cfg.d_model, cfg.expert_hidden, cfg.num_experts, cfg.activation, n)


def _measured(shape: probe.ExpertShape, candidates: list[Candidate]) -> Candidate:
    def how_for(c: Candidate, x_TD: torch.Tensor, weights: ExpertWeights) -> LoopGemm:
        return loop_gemm(x_TD, weights, native=c.backend == "native")

    return probe.best(shape, candidates, lambda: probe.expert_workload(shape, how_for))


def expert_backend(cfg: MoEConfig, x_TD: torch.Tensor, requested: str = "auto", decode_step: bool = False,
                   dtype: torch.dtype | None = None) -> str:
    """The expert backend for these tokens; ``dtype``: the compute dtype (default: ``x_TD``'s).

    ``requested``: the layer's own choice (``auto`` leaves it to the options, then to the probe or the
    rules).
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
    dtype = x_TD.dtype if dtype is None else dtype
    if x_TD.is_cuda and dtype == torch.bfloat16 and grouped_mm_aligned(cfg):
        return "grouped_mm"
    if _probing(x_TD.device):
        candidates = _candidates("auto", dtype)
        if len(candidates) > 1:
            return _measured(_expert_shape(cfg, x_TD, dtype), candidates).backend
    if x_TD.device.type == "cpu" and native_available():
        return "native"
    return "loop"


def thread_groups(w_in_EHD: torch.Tensor, w_out_EDF: torch.Tensor) -> int:
    """How many groups the C++ loop splits the experts into: one per intra-op thread for small experts
    (see :data:`GROUPED_THREADS_MAX_WEIGHT_BYTES`), else 1."""
    expert_bytes = (w_in_EHD[0].numel() + w_out_EDF[0].numel()) * w_in_EHD.element_size()
    if expert_bytes > GROUPED_THREADS_MAX_WEIGHT_BYTES:
        return 1
    return max(1, min(torch.get_num_threads(), w_in_EHD.shape[0]))


def loop_gemm(x_TD: torch.Tensor, weights, native: bool, activation: str | None = None,
              num_assignments: int | None = None) -> LoopGemm:
    """For the C++ loop (``native``) or the Python one: CPU bf16 / fp16 GEMMs run on oneDNN, the C++
    loop's fp32 ones too where :func:`onednn_for` holds (under ``auto`` with the probe on and the
    ``activation`` and ``num_assignments`` given: where oneDNN measured faster for this shape class),
    and oneDNN builds a kernel per new shape (~0.6 ms and ~0.6 MB of RSS each, cached), hence
    bucketed rows there. The C++ loop's own fp32 kernel, for
    small experts split into groups on a CPU with AVX-512, builds nothing per shape (``MOEKIT_OWN_GEMM=0``
    turns it off); the Python loop's fp32 products run ``torch.mm``."""
    cpu = x_TD.device.type == "cpu"
    low_precision = x_TD.dtype in (torch.bfloat16, torch.float16)
    if not native:
        return LoopGemm(bucket=cpu and low_precision, groups=1, onednn=False, own_gemm=False)
    groups = thread_groups(weights[0], weights[1])
    onednn = onednn_for(x_TD)
    if (onednn and activation is not None and num_assignments is not None and options.get().gemm == "auto"
            and _probing(x_TD.device)):
        candidates = _candidates("native", x_TD.dtype)
        if len(candidates) > 1:
            E, D, F_ = weights[1].shape
            shape = probe.expert_shape(x_TD.dtype, D, F_, E, activation, num_assignments)
            onednn = _measured(shape, candidates).gemm == "onednn"
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


_DENSE_CANDIDATES = [Candidate("dense", "onednn"), Candidate("dense", "blas")]


def dense_onednn(shape: probe.DenseShape, t: torch.Tensor) -> bool:
    """For a model :func:`accelerates_dense` accepted: whether this product on ``t`` runs on oneDNN.
    Where :func:`onednn_for` holds, ``gemm='onednn'`` says yes; under ``auto`` with the probe on, the
    model's dense products as measured (``shape``: :func:`dense_shape`), timed at the first product
    and then a dictionary lookup. NOTE: decided here, at run time, and not when the model is built: a
    model is built on the meta device when it is loaded or only counted (``moekit params``)."""
    if not onednn_for(t):
        return False
    if options.get().gemm == "onednn" or not _probing(t.device):
        return True
    from moekit.cpu import gemm as cpu_gemm

    return probe.best(shape, _DENSE_CANDIDATES,
                      lambda: probe.dense_workload(shape, cpu_gemm.linear)).gemm == "onednn"


def dense_shape(cfg: ModelConfig) -> probe.DenseShape:
    """The dense products a model's probe times: attention's query and output projections' widths and
    a dense FFN's (gated: both halves) where the model has dense FFN layers."""
    q_width = cfg.n_heads * cfg.qk_head_dim
    widths = [q_width]
    if any(not cfg.is_moe_layer(i) for i in range(cfg.n_layers)) and cfg.ffn_hidden:
        widths.append(2 * cfg.ffn_hidden if cfg.activation in ("swiglu", "geglu") else cfg.ffn_hidden)
    return probe.DenseShape(cfg.d_model, tuple(widths), torch.get_num_threads())


def describe(cfg: MoEConfig, x_TD: torch.Tensor) -> dict:
    """What runs a layer of ``cfg`` on these tokens and why: the expert backend, the fp32 GEMM of the C++
    loop, and the probe's times (ms per forward+backward of the expert computation) when it decided."""
    name = expert_backend(cfg, x_TD)
    out: dict = {"expert_backend": name, "gemm": None, "probe": None}
    if name == "native" and x_TD.dtype == torch.float32:
        E, H, D = cfg.num_experts, (2 if cfg.gated else 1) * cfg.expert_hidden, cfg.d_model
        fake = (torch.empty(E, H, D), torch.empty(E, D, cfg.expert_hidden))
        out["gemm"] = "onednn" if loop_gemm(x_TD, fake, True, cfg.activation,
                                            _expert_shape(cfg, x_TD, x_TD.dtype).assignments).onednn else "blas"
    if _probing(x_TD.device) and options.get().expert_backend == "auto":
        shape = _expert_shape(cfg, x_TD, x_TD.dtype)
        times = probe.lookup(shape.key)
        if times:
            out["probe"] = {"class": shape.key, "ms": dict(times), "cache": str(probe.cache_file())}
    return out
