"""Weight-only quantization of a weight matrix [N out, K in]: int8 and int4, with a slow reference
matmul and the fast one on PyTorch's own CPU kernels.

Legend: M rows of activations, N output features, K input features, G group size (int4), Kg = K / G.

* int8, per output channel, symmetric: ``w ≈ q · s`` with ``q`` int8 in [-127, 127] and one scale per
  row; the fast path is ``torch.ops.aten._weight_int8pack_mm``.
* int4, group-wise: each run of G input features of a row has its own scale and zero,
  ``w ≈ (q - 8) · s + z`` with ``q`` in [0, 15] (asymmetric: ``z`` from the group's minimum; symmetric:
  ``z = 0``). The fast path is ``torch.ops.aten._weight_int4pack_mm_for_cpu`` on the weight packed by
  ``_convert_weight_to_int4pack_for_cpu``; its scales and zeros are one [Kg, N, 2] tensor.

Scales and zeros are kept in bf16 (as llama.cpp keeps Q8_0 / Q4_0 scales in fp16): they are chosen
after that rounding, so the round trip error bounds below hold for the stored values. The PyTorch
kernels take activations, scales and zeros in one dtype; their fp32 variants are far slower than the
bf16 ones on a CPU, so :func:`matmul` runs them in bf16 unless asked for the input's dtype.

The CPU int4 packing is an ISA-dependent permutation of nibbles: the portable form (the state dict,
the checkpoint) is plain nibbles, two per byte, the even column in the low half (:func:`pack_nibbles`);
:func:`to_cpu_int4` / :func:`from_cpu_int4` convert, the latter through the permutation learnt from
the packing op itself (:func:`_cpu_int4_source`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

FORMATS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
SCALE_DTYPE = torch.bfloat16
INT4_ROWS_MULTIPLE = 16  # the CPU int4 packing wants N divisible by 16
_aten = torch.ops.aten


def _round_up_scale(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` in :data:`SCALE_DTYPE`, never below the fp32 value (so the full range still fits the
    integer grid after the rounding): round-to-nearest moves a value by at most 2^-9 of itself."""
    return (scale.float() * (1 + 2**-8)).to(SCALE_DTYPE)


# ---- int8 -----------------------------------------------------------------------------------------
@dataclass
class Int8Weight:
    """``q_NK`` int8 and ``scale_N`` (bf16): w ≈ q · scale[:, None]."""

    q_NK: torch.Tensor
    scale_N: torch.Tensor


def quantize_int8(w_NK: torch.Tensor) -> Int8Weight:
    """Per-output-channel symmetric int8: scale = max |w| of the row / 127 (rounded up to bf16)."""
    _check_matrix(w_NK)
    w = w_NK.detach().float()
    amax_N = w.abs().amax(dim=1).clamp_min(1e-12)
    scale_N = _round_up_scale(amax_N / 127)
    q_NK = torch.round(w / scale_N.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(q_NK, scale_N)


def dequantize_int8(q_NK: torch.Tensor, scale_N: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q_NK.float() * scale_N.float()[:, None]).to(dtype)


# ---- int4 -----------------------------------------------------------------------------------------
@dataclass
class Int4Weight:
    """``q_NK`` (int32 values in [0, 15], unpacked) and ``scale_zero_KgN2`` (bf16, the kernel's layout:
    [..., 0] the scale, [..., 1] the zero): w[n, k] ≈ (q[n, k] - 8) · s[k // G, n] + z[k // G, n]."""

    q_NK: torch.Tensor
    scale_zero_KgN2: torch.Tensor
    group_size: int


def check_int4_shape(N: int, K: int, group_size: int, what: str = "weight") -> None:
    """Raises ValueError unless a [N, K] weight can take int4 at ``group_size`` on the CPU kernel."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size!r} is invalid: expected one of {', '.join(map(str, GROUP_SIZES))}")
    if K % group_size:
        raise ValueError(f"{what} has {K} input features, not a multiple of group_size={group_size}; "
                         f"int4 needs whole groups (try another group size or int8)")
    if N % INT4_ROWS_MULTIPLE:
        raise ValueError(f"{what} has {N} output features; int4 on the CPU kernel needs a multiple of "
                         f"{INT4_ROWS_MULTIPLE} (use int8)")


def quantize_int4(w_NK: torch.Tensor, group_size: int = 32, symmetric: bool = False) -> Int4Weight:
    """Group-wise int4 over runs of ``group_size`` input features. Asymmetric: the group's [min, max] on
    16 levels, |w - dequant| <= s/2 + the bf16 rounding of the zero (<= |z|·2^-9); symmetric: zero 0,
    s = max |w| / 7.5 (levels -8s..7s, so +max |w| is at most s/2 above 7s): |w - dequant| <= s/2."""
    _check_matrix(w_NK)
    N, K = w_NK.shape
    check_int4_shape(N, K, group_size)
    G = group_size
    w_NKgG = w_NK.detach().float().reshape(N, K // G, G)
    if symmetric:
        scale = _round_up_scale(w_NKgG.abs().amax(-1).clamp_min(1e-12) / 7.5)
        zero = torch.zeros_like(scale)
    else:
        lo, hi = w_NKgG.amin(-1), w_NKgG.amax(-1)
        scale = _round_up_scale((hi - lo).clamp_min(1e-12) / 15)
        zero = (lo + 8 * scale.float()).to(SCALE_DTYPE)  # the value of level 8
    s, z = scale.float()[..., None], zero.float()[..., None]
    q = torch.round((w_NKgG - z) / s + 8).clamp_(0, 15).to(torch.int32).reshape(N, K)
    scale_zero_KgN2 = torch.stack([scale.t(), zero.t()], dim=-1).contiguous()
    return Int4Weight(q, scale_zero_KgN2, G)


def dequantize_int4(q_NK: torch.Tensor, scale_zero_KgN2: torch.Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    N, K = q_NK.shape
    sz = scale_zero_KgN2.float()
    s_NKg1, z_NKg1 = sz[..., 0].t()[..., None], sz[..., 1].t()[..., None]
    w = (q_NK.float().reshape(N, K // group_size, group_size) - 8) * s_NKg1 + z_NKg1
    return w.reshape(N, K).to(dtype)


def pack_nibbles(q_NK: torch.Tensor) -> torch.Tensor:
    """[N, K] values in [0, 15] -> [N, K/2] uint8, column 2i in the low half of byte i."""
    q = q_NK.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(p_NK2: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_nibbles`: [N, K] int32."""
    lo, hi = (p_NK2 & 15).to(torch.int32), (p_NK2 >> 4).to(torch.int32)
    return torch.stack([lo, hi], dim=-1).reshape(p_NK2.shape[0], -1)


def to_cpu_int4(q_NK: torch.Tensor) -> torch.Tensor:
    """The CPU kernel's packed weight ([N, K/2] uint8) of unpacked int4 values."""
    return _aten._convert_weight_to_int4pack_for_cpu(q_NK.to(torch.int32).contiguous(), 1)


@functools.lru_cache(maxsize=4)  # N·K int64 each: a few shapes a model
def _cpu_int4_source(N: int, K: int) -> torch.Tensor:
    """For each nibble of the CPU packing of an [N, K] weight (bytes in order, low half first), the flat
    index n·K + k of the value it holds. Learnt by packing the base-16 digits of the indices, one
    digit plane at a time, so it follows whatever layout this machine's kernel uses."""
    index = torch.arange(N * K, dtype=torch.int64)
    source = torch.zeros(N * K, dtype=torch.int64)
    planes = max(1, ((N * K - 1).bit_length() + 3) // 4)
    for j in range(planes):
        digit = ((index >> (4 * j)) & 15).view(N, K)
        source |= unpack_nibbles(to_cpu_int4(digit)).reshape(-1).long() << (4 * j)
    if not torch.equal(source.sort().values, index):
        raise RuntimeError(f"this torch's CPU int4 packing of a [{N}, {K}] weight is not a permutation of nibbles; "
                           f"moekit cannot read it back")
    return source


def from_cpu_int4(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """The unpacked [N, K] int32 values of a CPU-packed int4 weight (:func:`to_cpu_int4`)."""
    out = torch.empty(N * K, dtype=torch.int32)
    out[_cpu_int4_source(N, K)] = unpack_nibbles(packed.reshape(N, K // 2)).reshape(-1)
    return out.view(N, K)


# ---- matmuls ----------------------------------------------------------------------------------------
def matmul_dtype(x: torch.Tensor, act_dtype: str = "bfloat16") -> torch.dtype:
    """The dtype the fast kernels run in: bf16 for fp32 / bf16 activations (``act_dtype='bfloat16'``),
    else the input's."""
    if act_dtype == "bfloat16" and x.dtype in (torch.float32, torch.bfloat16):
        return torch.bfloat16
    return x.dtype


def int8_mm(x_MK: torch.Tensor, q_NK: torch.Tensor, scale_N: torch.Tensor) -> torch.Tensor:
    """x @ (q · scale)^T on ``_weight_int8pack_mm``, in ``x``'s dtype (a CPU tensor)."""
    return _aten._weight_int8pack_mm(x_MK.contiguous(), q_NK, scale_N.to(x_MK.dtype))


def int4_mm(x_MK: torch.Tensor, packed: torch.Tensor, scale_zero_KgN2: torch.Tensor, group_size: int) -> torch.Tensor:
    """x @ dequant(packed)^T on ``_weight_int4pack_mm_for_cpu`` (``packed``: :func:`to_cpu_int4`), in ``x``'s dtype."""
    return _aten._weight_int4pack_mm_for_cpu(x_MK.contiguous(), packed, group_size, scale_zero_KgN2.to(x_MK.dtype))


def reference_mm(x_MK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """The obviously-correct product with a dequantized weight, in fp32 (fp64 for fp64), cast back."""
    dt = torch.float64 if x_MK.dtype == torch.float64 else torch.float32
    return (x_MK.to(dt) @ w_NK.to(dt).t()).to(x_MK.dtype)


def _check_matrix(w: torch.Tensor) -> None:
    if not torch.is_tensor(w) or w.dim() != 2 or not w.is_floating_point():
        got = f"{w.dtype} {tuple(w.shape)}" if torch.is_tensor(w) else type(w).__name__
        raise ValueError(f"expected a floating-point [out, in] weight matrix, got {got}")
