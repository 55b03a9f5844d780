"""The expert slice loop in C++ (``csrc/loop_experts.cpp``), built on first use with PyTorch's
extension builder (a C++ compiler and ninja; cached per source and torch version).

Same algorithm as :class:`moekit.moe.experts._LoopExperts`, except that the backward recomputes the
activation from the saved pre-activation (two elementwise ops per expert) instead of holding the
[N, F] activation between the passes, and that the fused fp32 SwiGLU folds the routing weight into
the activation; the tests compare the two (outputs and every gradient). What the C++ buys on a CPU:
at E64-E128 an expert's GEMMs take 0.1-0.3 ms and the ~20 other ops around them (each a Python call
and a fork/join of the intra-op threads) as much again. Here every op runs single-threaded on one
of the intra-op threads, in two passes: pass A splits the experts into contiguous groups of about equal rows, one per thread, for
the work that needs all of an expert's rows (first projection; in backward the weight gradients and
dL/dh); pass B splits the tokens into ranges (:func:`token_blocks`), one per thread, for the work
that adds into token rows (down projection and scatter; in backward dL/dx). No two threads add into
one row, so there is no per-thread [T, D] partial sum (memory that grew with the thread count), and
each token's sum runs over its experts in expert order as in the Python loop, whatever the thread
count (fp64 results equal the Python loop's to ~1e-12 in the tests; fp32 ones differ by rounding:
other GEMM kernels, the routing weight folded in). Experts
with large weights keep one group on the calling thread instead, one pass (each GEMM on all threads),
see :data:`GROUPED_THREADS_MAX_WEIGHT_BYTES`.

Inside the expert groups its fp32 products run on a GEMM kernel of its own (:func:`own_gemm`: on the
oneDNN backend, where the CPU has AVX-512, unless ``MOEKIT_OWN_GEMM=0``): ATen's oneDNN matmul costs
~10 µs a call and a kernel build per new row count, against ~1000 products of 0.05-0.25 ms a step at
E64-E128.

Its step buffers of 32 MiB or more (h, the expert weight gradients) come from a cache of freed
blocks (:func:`empty_cache`, :func:`set_cache_limit_mb`; ``MOEKIT_BLOCK_CACHE_MB``): glibc maps
allocations that large fresh from the kernel, and faulting their pages in cost more than writing
them, every step.

If the build fails (no compiler, no ninja) the experts run the Python loop, after one warning.
``MOEKIT_NATIVE=0`` turns the C++ loop off; :func:`build_root` says where the build is kept.
"""

from __future__ import annotations

import bisect
import hashlib
import importlib.util
import itertools
import os
import shutil
import sys
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from moekit.moe.rows import bucketed_rows, pad_rows, spill
from moekit.nn import gemm

SOURCE = Path(__file__).with_name("csrc") / "loop_experts.cpp"

# Split the experts over the intra-op threads only when one expert's weights (w_in and w_out, in the
# compute dtype) take at most this many bytes. One-off trials on this 2-core CPU (1 MiB L2 per core),
# fwd+bwd of one layer at 4096 tokens, each variant in fresh processes: E8-E128 experts of hidden
# 88-176 (0.5-1.1 MB) ran 2-20% faster split; hidden 704 and 1408 (4.3 and 8.7 MB) 9% and 19% slower
# than one group whose GEMMs use both threads.
GROUPED_THREADS_MAX_WEIGHT_BYTES = 2 * 2**20


def build_root() -> Path:
    """Where the compiled loop is kept: under PyTorch's JIT-extension directory
    (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), per torch and Python version."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                   "torch_extensions")
    return Path(root) / "moekit" / f"torch-{torch.__version__}-{sys.implementation.cache_tag}"


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flags() -> tuple[list[str], list[str]]:
    """Compile and link flags. Without OpenMP (Apple clang) ``at::parallel_for`` runs the groups one
    after the other: still correct, without the split's gain. ``MOEKIT_LOOP_PROFILE=1`` builds (and
    loads) a library of its own that times the loop's kinds of work (``benchmarks/loop_profile.py``)."""
    profile = ["-DMOEKIT_LOOP_PROFILE"] if os.environ.get("MOEKIT_LOOP_PROFILE") == "1" else []
    if sys.platform == "win32":
        return ["/O2", "/openmp", *profile], []
    if sys.platform == "darwin":
        return ["-O3", *profile], []
    return ["-O3", "-fopenmp", *profile], ["-fopenmp"]


def library_name() -> str:
    """The source, the flags and the torch build it is compiled against, hashed into the name."""
    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(repr((_flags(), torch.__version__, torch.version.git_version,
                     torch._C._GLIBCXX_USE_CXX11_ABI)).encode())
    return "moekit_loop_experts_" + key.hexdigest()[:12]


def _compile(name: str, root: Path) -> object:
    """Builds in a private directory, then publishes the library with one atomic rename: a build that
    is interrupted (Ctrl-C, kill) leaves no lock or half-written file for the next process to wait on
    or load, and processes building at once each publish a whole file."""
    from torch.utils import cpp_extension

    print(f"moekit: compiling the C++ expert loop into {root} (once, ~20 s)", file=sys.stderr)
    cflags, ldflags = _flags()
    # The builder runs `ninja` from PATH: the one pip put next to this interpreter comes first.
    scripts, path = sysconfig.get_path("scripts"), os.environ.get("PATH")
    if scripts:
        os.environ["PATH"] = os.pathsep.join(filter(None, [scripts, path]))
    root.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=root, prefix=f".build-{name}-", ignore_cleanup_errors=True) as tmp:
            module = cpp_extension.load(name=name, sources=[str(SOURCE)], build_directory=tmp,
                                        extra_cflags=cflags, extra_ldflags=ldflags, verbose=False)
            built = Path(module.__file__)
            staged = root / f".{name}.{os.getpid()}.partial"
            try:
                shutil.copyfile(built, staged)
                os.replace(staged, root / built.name)
            except OSError as exc:  # read-only or full disk, a loaded library on Windows: this process still has it
                warnings.warn(f"moekit: could not keep the compiled expert loop in {root} ({exc}); the next "
                              f"process compiles it again", RuntimeWarning, stacklevel=4)
                staged.unlink(missing_ok=True)
    finally:
        if path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = path
    return module


def _build() -> tuple[object | None, str | None]:
    if os.environ.get("MOEKIT_NATIVE", "1") == "0":
        return None, "turned off by MOEKIT_NATIVE=0"
    try:
        root, name = build_root(), library_name()
        failed = root / f"{name}.failed"
        if failed.exists():  # an earlier process could not build it: do not pay for the attempt again
            raise RuntimeError(f"{failed.read_text().strip()} (recorded in {failed}; delete it to try again)")
        for built in sorted(root.glob(name + ".*")):  # built before, by this or another process
            if built.suffix in (".so", ".pyd"):
                try:
                    return _import(name, built), None
                except ImportError as exc:  # unreadable: build it again over it
                    warnings.warn(f"moekit: could not load {built} ({exc}); rebuilding it", RuntimeWarning,
                                  stacklevel=3)
        try:
            return _compile(name, root), None
        except Exception as exc:
            try:
                root.mkdir(parents=True, exist_ok=True)
                failed.write_text(f"{type(exc).__name__}: {_first_line(exc)}\n")
            except OSError:
                pass
            raise
    except Exception as exc:  # no compiler, no ninja, a failed compile: the Python loop still works
        reason = f"{type(exc).__name__}: {_first_line(exc)}"
        warnings.warn(f"moekit: the C++ expert loop ({SOURCE}) did not build ({reason}); experts run the "
                      f"Python loop, slower on CPU. MOEKIT_NATIVE=0 skips the build.", RuntimeWarning, stacklevel=3)
        return None, reason


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


_loaded: tuple[object | None, str | None] | None = None  # (module, why not), once per process
_load_lock = threading.Lock()  # threads asking at once wait for one build


def _state() -> tuple[object | None, str | None]:
    # NOTE: a plain global, not functools.cache or @torch.compiler.disable: Dynamo reads a global
    # without tracing into the build, and the decorator would import torch._dynamo with moekit
    # (+1.4 s, +70 MB for every `import moekit`).
    global _loaded
    if _loaded is None:
        with _load_lock:
            if _loaded is None:
                _loaded = _build()
    return _loaded


def load():
    """The compiled module, or None when it cannot be built (see :func:`unavailable_reason`)."""
    return _state()[0]


def unavailable_reason() -> str | None:
    return _state()[1]


def _built():
    """The compiled module when it is already loaded, else None (builds nothing)."""
    return _loaded[0] if _loaded is not None else None


def empty_cache() -> int:
    """Frees the blocks the C++ loop keeps for reuse (freed h and weight-gradient buffers of
    :func:`cache_min_mb` or more, see ``BlockCache`` in ``csrc/loop_experts.cpp``) and returns their
    bytes. Blocks still held by tensors are not touched. Does not build the loop."""
    module = _built()
    return module.release_cache() if module is not None else 0


def cached_bytes() -> int:
    """Bytes of freed blocks kept for the next step (0 before the loop is loaded)."""
    module = _built()
    return module.cache_bytes() if module is not None else 0


def cache_limit_mb() -> int:
    """The most MiB of freed blocks kept: ``MOEKIT_BLOCK_CACHE_MB`` (read once), else 2048, unless
    :func:`set_cache_limit_mb` changed it; 0 when the loop cannot be built."""
    module = load()
    return module.cache_limit() >> 20 if module is not None else 0


def _mib(name: str, mib: int) -> int:
    if isinstance(mib, bool) or not isinstance(mib, int) or mib < 0:
        raise ValueError(f"{name}: a whole number of MiB >= 0, got {mib!r}")
    return mib << 20


def set_cache_limit_mb(mib: int) -> None:
    """Bounds the MiB of freed blocks kept (0: none), freeing the oldest above the new bound."""
    limit = _mib("set_cache_limit_mb", mib)
    module = load()
    if module is not None:
        module.set_cache_limit(limit)


def cache_min_mb() -> int:
    """The smallest block (MiB) the cache keeps: by default 32, glibc's largest mmap threshold (smaller
    buffers come from its heap without page faults); 0 when the loop cannot be built."""
    module = load()
    return module.cache_min_bytes() >> 20 if module is not None else 0


def set_cache_min_mb(mib: int) -> None:
    """The smallest block (MiB) the cache keeps; smaller buffers come from torch's allocator."""
    smallest = _mib("set_cache_min_mb", mib)
    module = load()
    if module is not None:
        module.set_cache_min_bytes(smallest)


def thread_groups(w_in_EHD: torch.Tensor, w_out_EDF: torch.Tensor) -> int:
    """How many groups to split the experts into: one per intra-op thread for small experts, else 1."""
    expert_bytes = (w_in_EHD[0].numel() + w_out_EDF[0].numel()) * w_in_EHD.element_size()
    if expert_bytes > GROUPED_THREADS_MAX_WEIGHT_BYTES:
        return 1
    return max(1, min(torch.get_num_threads(), w_in_EHD.shape[0]))


def own_gemm(x_TD: torch.Tensor, groups: int) -> bool:
    """Whether the loop's products run on its own fp32 kernel (``gemm_f32`` in ``csrc/loop_experts.cpp``)
    instead of oneDNN: fp32 on the oneDNN backend (:mod:`moekit.nn.gemm`), small experts split into
    groups (large ones keep oneDNN's multi-threaded GEMMs), a CPU with AVX-512, and ``MOEKIT_OWN_GEMM``
    not ``0``. Its products need no bucketed rows: it builds nothing per shape."""
    if groups < 2 or not gemm.onednn_for(x_TD) or os.environ.get("MOEKIT_OWN_GEMM", "1") == "0":
        return False
    module = load()
    return module is not None and module.have_own_gemm()


def topk_indices(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of each row's ``k`` largest scores, largest first, ties to the lower index (the order
    of :mod:`moekit.moe.reference`), NaN above every number (as ``torch.topk``): the C++ kernel for fp32 /
    fp64 on a CPU outside ``torch.compile``, else ``torch.topk``, whose CPU order among equal scores is
    its own (ties among the top 8 of a softmax over 128 experts came up in ~1 row of 400k here, and
    ``torch.topk`` put the higher index first). At E128 / k8 over 4096 tokens 1.1 ms against
    ``torch.topk``'s 2.2 (one-off)."""
    if (scores_TE.device.type == "cpu" and scores_TE.dim() == 2 and scores_TE.dtype in (torch.float32, torch.float64)
            and 1 <= k <= scores_TE.shape[1] and not torch.compiler.is_compiling()):
        module = load()
        if module is not None:
            return module.topk(scores_TE.detach().contiguous(), k)
    return scores_TE.topk(k, dim=-1).indices


def split_groups(counts: list[int], groups: int) -> list[int]:
    """Bounds of ``groups`` contiguous expert ranges of about equal rows: experts b[g] .. b[g+1]-1."""
    cum = [0, *itertools.accumulate(counts)]  # rows before expert e
    bounds = [0]
    for g in range(1, groups):
        target = cum[-1] * g / groups
        e = bisect.bisect_left(cum, target, lo=bounds[-1])  # the first cut with >= target rows before it
        if e > bounds[-1] and target - cum[e - 1] < cum[e] - target:  # the nearer of the two cuts
            e -= 1
        bounds.append(e)
    bounds.append(len(counts))
    return bounds


class TokenBlocks(NamedTuple):
    """Pass B's rows (see ``csrc/loop_experts.cpp``), in order of (token range, expert), padded."""

    hidx_R: torch.Tensor  # int64 row of h of each
    token_ids_R: torch.Tensor  # int64 token of each
    order_R: torch.Tensor  # int64 kept assignment of each (to gather the routing weights)
    blocks_B5: torch.Tensor  # int64 [B, 5] (start, m, r, expert, h0) of the non-empty blocks; h0 >= 0: the
    # block's r rows of h are h0 .. h0+r-1 (read in place), else gathered by hidx
    bounds: list[int]  # blocks bounds[g] .. bounds[g+1]-1 belong to token range g


def token_blocks(token_ids_K: torch.Tensor, counts: list[int], bounds: list[int], pad: int, num_tokens: int,
                 rows, h_rows: int) -> TokenBlocks:
    """Splits the kept assignments by token into len(bounds) - 1 ranges of about equal assignments,
    then by expert: block (g, e) holds expert e's assignments whose token lies in range g, in their
    order. The thread of range g adds only into its own tokens' rows, expert by expert. Each block's
    GEMM runs on r = rows(m) rows; ``pad`` rows past the end keep the spill-over in bounds. A block
    whose m rows are consecutive rows of h (``h_rows`` of them) reads its r rows in place (the r - m
    past its own are other rows of h: computed on, never scattered)."""
    groups, E, K = len(bounds) - 1, len(counts), token_ids_K.shape[0]
    expert_K = torch.repeat_interleave(torch.arange(E), torch.tensor(counts, dtype=torch.long))
    group_E = torch.repeat_interleave(torch.arange(groups), torch.tensor([b - a for a, b in zip(bounds, bounds[1:])]))
    # cut g: the first token with at least g/G of the assignments up to and including it
    upto_T = torch.bincount(token_ids_K, minlength=num_tokens).cumsum(0)
    cuts = torch.searchsorted(upto_T, torch.arange(1, groups) * K / groups)
    range_K = torch.searchsorted(cuts, token_ids_K, right=True)
    key_K = range_K * E + expert_K
    order_K = torch.argsort(key_K, stable=True)
    sizes_GE = torch.bincount(key_K, minlength=groups * E)
    hidx_K = order_K + group_E[expert_K[order_K]] * pad  # assignment a of a group-g expert: h row a + g·pad
    # A block whose rows are consecutive rows of h (token-ordered experts) reads h in place: no break in
    # h rows between its first and last row.
    nonempty = sizes_GE.nonzero()[:, 0]
    start_B = (sizes_GE.cumsum(0) - sizes_GE)[nonempty]
    m_B = sizes_GE[nonempty]
    breaks_K = torch.cat([hidx_K.new_zeros(1), (hidx_K.diff() != 1).long().cumsum(0)])
    consecutive_B = breaks_K[start_B + m_B - 1] == breaks_K[start_B]
    sizes = m_B.tolist()
    blocks, block_bounds = [], [0] * (groups + 1)
    for b, e, start, m, h0, consecutive in zip(nonempty.tolist(), (nonempty % E).tolist(), start_B.tolist(),
                                               sizes, hidx_K[start_B].tolist(), consecutive_B.tolist()):
        r = rows(m)
        blocks.append((start, m, r, e, h0 if consecutive and h0 + r <= h_rows else -1))
        block_bounds[b // E + 1] += 1
    block_bounds = list(itertools.accumulate(block_bounds))
    pad_B = spill(sizes, rows)
    return TokenBlocks(pad_rows(hidx_K, pad_B), pad_rows(token_ids_K[order_K], pad_B), pad_rows(order_K, pad_B),
                       torch.tensor(blocks, dtype=torch.long).reshape(-1, 5), block_bounds)


def layout(counts: list[int], rows, bounds: list[int]) -> tuple[torch.Tensor, int, int]:
    """Per expert (s, n, r, o) as an [E, 4] int64 tensor, the pad and the rows of the h buffer.

    The expert's assignments are s .. s+n-1; its GEMMs run on r = rows(n) rows; its h rows start at
    o. Each group after the first is shifted by one more pad (the largest r - n), so the bucketed rows
    an expert spills past its n never reach the next group's rows (written by another thread).
    """
    pad = spill(counts, rows)
    meta, s = [], 0
    for g in range(len(bounds) - 1):
        for e in range(bounds[g], bounds[g + 1]):
            n = counts[e]
            meta.append((s, n, rows(n), s + g * pad))
            s += n
    return torch.tensor(meta, dtype=torch.long).reshape(len(counts), 4), pad, s + (len(bounds) - 1) * pad


class NativeLoopExperts(torch.autograd.Function):
    """:class:`moekit.moe.experts._LoopExperts` with the loop in C++; ``groups`` expert groups (and as
    many token ranges) run on the intra-op threads (1: on the calling thread). Same arguments, plus
    ``groups``; ``bucket`` is ignored where the loop's own kernel runs the products (:func:`own_gemm`):
    it builds nothing per shape, so they run on the exact rows."""

    @staticmethod
    def forward(ctx, x_TD, token_ids_N, weights_N, w_in_EHD, w_out_EDF, b_in_EH, b_out_ED, counts, act_name,
                bucket, groups):
        module = load()
        if module is None:
            raise RuntimeError(f"expert_impl='native': the C++ expert loop is unavailable ({unavailable_reason()})")
        kept = sum(counts)
        onednn, own = gemm.onednn_for(x_TD), own_gemm(x_TD, groups)
        rows = bucketed_rows if bucket and not own else int
        bounds = split_groups(counts, groups)
        meta_E4, pad, h_rows = layout(counts, rows, bounds)
        w_K = weights_N[:kept].to(x_TD.dtype).contiguous()  # (the C++ reads it through a raw pointer)
        tok_pad, w_pad = pad_rows(token_ids_N[:kept], pad), pad_rows(w_K, pad)
        blocks = ()
        if len(bounds) > 2:
            tb = token_blocks(token_ids_N[:kept], counts, bounds, pad, x_TD.shape[0], rows, h_rows)
            blocks = (tb.hidx_R, tb.token_ids_R, w_K[tb.order_R], tb.blocks_B5, tb.bounds)
        out_TD, h_NH = module.forward(x_TD, tok_pad, w_pad, w_in_EHD, w_out_EDF, b_in_EH, b_out_ED, meta_E4, bounds,
                                      act_name, h_rows, *blocks, onednn=onednn, own_gemm=own)
        ctx.save_for_backward(x_TD, tok_pad, w_pad, w_in_EHD, w_out_EDF, b_in_EH, b_out_ED, h_NH, meta_E4,
                              *blocks[:4])
        ctx.bounds, ctx.act_name, ctx.num_assignments = bounds, act_name, weights_N.shape[0]
        ctx.weights_dtype, ctx.block_bounds, ctx.onednn, ctx.own = weights_N.dtype, blocks[4:], onednn, own
        return out_TD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out_TD):
        x_TD, tok_pad, w_pad, w_in_EHD, w_out_EDF, b_in_EH, b_out_ED, h_NH, meta_E4, *blocks = ctx.saved_tensors
        module, need_x = load(), ctx.needs_input_grad[0]
        weights = (x_TD, tok_pad, w_pad, w_in_EHD, w_out_EDF, b_in_EH, b_out_ED)
        # NOTE: with expert groups the C++ backward overwrites h (this Function's own tensor) with dL/dh,
        # saving an [N, H] buffer. A second backward through the same graph (retain_graph, gradcheck)
        # then recomputes h by running the forward again.
        if getattr(ctx, "h_spent", False):
            h_NH = module.forward(*weights, meta_E4, ctx.bounds, ctx.act_name, h_NH.shape[0], *blocks,
                                  *ctx.block_bounds, onednn=ctx.onednn, own_gemm=ctx.own)[1]
        grad_x, grad_w, grad_w_in, grad_w_out, grad_b_in, grad_b_out = module.backward(
            grad_out_TD.contiguous(), *weights, h_NH, meta_E4, ctx.bounds, ctx.act_name, need_x,
            ctx.num_assignments, *blocks, *ctx.block_bounds, onednn=ctx.onednn, own_gemm=ctx.own)
        ctx.h_spent = need_x and len(ctx.bounds) > 2
        return (grad_x, None, grad_w.to(ctx.weights_dtype), grad_w_in, grad_w_out, grad_b_in, grad_b_out,
                None, None, None, None)
