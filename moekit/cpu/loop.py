"""The expert slice loop in C++ (``csrc/loop.cpp``): its layout, computed here, and its autograd Function.

Same algorithm as :class:`moekit.moe.backends.loop.LoopExperts`, except that the backward recomputes
the activation from the saved pre-activation (two elementwise ops per expert) instead of holding the
[N, F] activation between the passes, and that the fused fp32 SwiGLU folds the routing weight into
the activation; the tests compare the two (outputs and every gradient). What the C++ buys on a CPU:
at E64-E128 an expert's GEMMs take 0.1-0.3 ms and the ~20 other ops around them (each a Python call
and a fork/join of the intra-op threads) as much again. Here every op runs single-threaded on one of
the intra-op threads, in two passes: pass A splits the experts into contiguous groups of about equal
rows, one per thread, for the work that needs all of an expert's rows (first projection; in backward
the weight gradients and dL/dh); pass B splits the tokens into ranges (:func:`token_blocks`), one per
thread, for the work that adds into token rows (down projection and scatter; in backward dL/dx). No
two threads add into one row, so there is no per-thread [T, D] partial sum (memory that grew with the
thread count), and each token's sum runs over its experts in expert order as in the Python loop,
whatever the thread count (fp64 results equal the Python loop's to ~1e-12 in the tests; fp32 ones
differ by rounding: other GEMM kernels, the routing weight folded in). How many groups, and which GEMM
runs the products, the caller says (:mod:`moekit.moe.backends.chooser`).

Inside the expert groups its fp32 products may run on a GEMM kernel of its own (``own_gemm``: AVX-512):
ATen's oneDNN matmul costs ~10 µs a call and a kernel build per new row count, against ~1000 products
of 0.05-0.25 ms a step at E64-E128. Its step buffers of 32 MiB or more come from a cache of freed
blocks (:mod:`moekit.cpu.cache`).
"""

from __future__ import annotations

import bisect
import itertools
from typing import NamedTuple

import torch

from moekit.cpu import build
from moekit.cpu.rows import bucketed_rows, pad_rows, spill


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
    """:class:`moekit.moe.backends.loop.LoopExperts` with the loop in C++; ``groups`` expert groups (and
    as many token ranges) run on the intra-op threads (1: on the calling thread). Same arguments, plus
    ``groups``, ``onednn`` (fp32 products on oneDNN) and ``own_gemm`` (fp32 products inside expert
    groups on the loop's own kernel, where the CPU has AVX-512); ``bucket`` is ignored where the own
    kernel runs the products: it builds nothing per shape, so they run on the exact rows."""

    @staticmethod
    def forward(ctx, x_TD, token_ids_N, weights_N, w_in_EHD, w_out_EDF, b_in_EH, b_out_ED, counts, act_name,
                bucket, groups, onednn, own):
        module = build.load()
        if module is None:
            raise RuntimeError(f"expert backend 'native': the C++ extension is unavailable "
                               f"({build.unavailable_reason()})")
        kept = sum(counts)
        own = own and groups > 1
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
        module, need_x = build.load(), ctx.needs_input_grad[0]
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
                None, None, None, None, None, None)


def loop_experts(x_TD: torch.Tensor, token_ids_N: torch.Tensor, weights_N: torch.Tensor, w_in_EHD: torch.Tensor,
                 w_out_EDF: torch.Tensor, b_in_EH: torch.Tensor | None, b_out_ED: torch.Tensor | None,
                 counts: list[int], act_name: str, *, bucket: bool = False, groups: int = 1, onednn: bool = False,
                 own_gemm: bool = False) -> torch.Tensor:
    """:class:`NativeLoopExperts` with its options by name."""
    return NativeLoopExperts.apply(x_TD, token_ids_N, weights_N, w_in_EHD, w_out_EDF, b_in_EH, b_out_ED, counts,
                                   act_name, bucket, groups, onednn, own_gemm)
