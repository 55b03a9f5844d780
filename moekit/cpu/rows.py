"""Row counts of the per-expert GEMMs of the slice loops (:mod:`moekit.moe.backends.loop`, :mod:`moekit.cpu.loop`).

On a CPU, bf16 / fp16 GEMMs run on oneDNN (fp32 ones too where :mod:`moekit.moe.backends.chooser` picks
it, but for the C++ loop's expert groups where its own fp32 kernel runs the products), which compiles a
kernel per new GEMM shape (~0.6 ms and ~0.6 MB of RSS here, kept in its primitive cache), and routing
gives new per-expert row counts every step: the loops then run each expert's GEMMs on a bucketed row
count, the extra rows being the next assignments' (never scattered).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def bucketed_rows(n: int) -> int:
    """``n`` rounded up to one of 8 sizes per power of two above 16 (at most 1/8 more rows)."""
    if n <= 16:
        return n
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


def spill(sizes: Iterable[int], rows: Callable[[int], int]) -> int:
    """The most rows a GEMM of ``rows(n)`` rows reads past its n assignments: the padding its inputs
    need after the last slice."""
    return max((rows(n) - n for n in sizes), default=0)


def pad_rows(t_N: torch.Tensor, pad: int) -> torch.Tensor:
    """``t_N`` followed by ``pad`` zeros: bucketed rows past the last assignment read token 0 with
    routing weight 0 (never scattered)."""
    return torch.cat([t_N, t_N.new_zeros(pad)]) if pad else t_N
