"""Rotary position embeddings (Su et al. 2021, RoFormer eq. 34).

Legend: B batch, S sequence, H heads, R rotary dims.
The default layout rotates the two halves of the rotary dims against each other (the Llama /
Mixtral / Qwen layout); ``interleave=True`` rotates adjacent pairs (the original RoFormer and
DeepSeek reference layout).
"""

from __future__ import annotations

import torch


def rope_frequencies(rot_dim: int, theta: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """inv_freq_j = theta^(-2j / R), j = 0 .. R/2 - 1 (computed in fp64, returned in ``dtype``)."""
    exponents = torch.arange(0, rot_dim, 2, device=device, dtype=torch.float64) / rot_dim
    return (1.0 / theta**exponents).to(dtype)


def rope_cos_sin(positions_S: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [*positions.shape, R] in ``inv_freq``'s dtype (each frequency repeated for
    both members of its pair). Per-row positions [B, S] (left-padded batches) give [B, S, R]."""
    angles = positions_S.to(inv_freq.dtype)[..., None] * inv_freq  # [..., R/2]; positions may be [B, S]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x_BHSR: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor,
               interleave: bool = False) -> torch.Tensor:
    """Rotates the last dim of x by position, in at least fp32, and casts back. cos/sin are [S, R] or
    [B, 1, S, R]."""
    dtype = x_BHSR.dtype
    x = x_BHSR.to(torch.promote_types(dtype, torch.float32))
    if interleave:
        # adjacent pairs (x0, x1), (x2, x3) ... -> the halves layout, rotate, and back
        B, H, S, R = x.shape
        x = x.view(B, H, S, R // 2, 2).transpose(-1, -2).reshape(B, H, S, R)
        out = x * cos_SR + _rotate_half(x) * sin_SR
        return out.view(B, H, S, 2, R // 2).transpose(-1, -2).reshape(B, H, S, R).to(dtype)
    return (x * cos_SR + _rotate_half(x) * sin_SR).to(dtype)
