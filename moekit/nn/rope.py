"""Rotary position embeddings (Su et al. 2021, RoFormer eq. 34).

Legend: B batch, S sequence, H heads, R rotary dims.
The default layout rotates the two halves of the rotary dims against each other (the Llama /
Mixtral / Qwen layout); ``interleave=True`` rotates adjacent pairs (the original RoFormer and
DeepSeek reference layout).
"""

from __future__ import annotations

import math

import torch

# rope_scaling keys per kind (ModelConfig.rope_scaling = {"type": kind, ...}) with their defaults;
# factor and original_max_seq_len are required, None elsewhere means "not used"
SCALING_KEYS = {
    "linear": {"factor": None},
    "yarn": {"factor": None, "original_max_seq_len": None, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": None,
             "mscale_all_dim": None, "attention_factor": None, "truncate": True},
}


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature sqrt(1/t) = 0.1·mscale·ln(s) + 1 for s > 1 (Peng et al. 2023, eq. 22)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def scaled_frequencies(rot_dim: int, theta: float, scaling: dict | None, device=None,
                       dtype=torch.float32) -> tuple[torch.Tensor, float]:
    """inv_freq and the cos/sin multiplier for ``scaling`` (None: plain RoPE, multiplier 1).

    ``linear``: position interpolation (Chen et al. 2023), every frequency divided by ``factor``.
    ``yarn``: "NTK-by-parts" (Peng et al. 2023, eq. 17-20): dims that rotate more than ``beta_fast``
    times over the original context keep their frequency, those under ``beta_slow`` are interpolated by
    ``factor``, a linear ramp in between; cos/sin scaled by the attention factor (eq. 22; DeepSeek's
    variant divides mscale(s, mscale) by mscale(s, mscale_all_dim)).
    """
    inv_freq = rope_frequencies(rot_dim, theta, device, torch.float64)
    if scaling is None:
        return inv_freq.to(dtype), 1.0
    kind, factor = scaling["type"], float(scaling["factor"])
    if kind == "linear":
        return (inv_freq / factor).to(dtype), 1.0
    opts = {**SCALING_KEYS[kind], **scaling}
    orig = opts["original_max_seq_len"]

    def correction_dim(rotations: float) -> float:  # the dim whose wavelength fits ``rotations`` times in orig
        return rot_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(opts["beta_fast"]), correction_dim(opts["beta_slow"])
    if opts["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot_dim - 1)
    if low == high:
        high += 0.001  # a single-dim ramp
    ramp = ((torch.arange(rot_dim // 2, device=device, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)  # ramp 0: extrapolate, 1: interpolate
    attention = opts["attention_factor"]
    if attention is None:
        m, m_all = opts["mscale"], opts["mscale_all_dim"]
        attention = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all else yarn_mscale(factor)
    return inv_freq.to(dtype), float(attention)


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
