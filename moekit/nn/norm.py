"""Normalisation layers. Statistics are computed in fp32 whatever the input dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x²) + eps) · w, computed in fp32 and cast back
    before the weight (the Llama / Mixtral / DeepSeek convention)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype and x.dtype in (torch.float32, torch.float64):
            # Same maths in one fused kernel (equal to rms_norm_composite here; 5.2 -> 3.8 ms fwd+bwd
            # on [2048, 512] in a one-off run); lower precisions keep the cast-before-weight order.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return rms_norm_composite(x, self.weight, self.eps)


def rms_norm_composite(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm op by op: normalised in at least fp32, cast back to x's dtype, then times the weight."""
    x32 = _at_least_fp32(x)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (DBRX uses none), statistics in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = _at_least_fp32(x)
        b = self.bias.to(x32.dtype) if self.bias is not None else None
        return nn.functional.layer_norm(x32, (x.shape[-1],), self.weight.to(x32.dtype), b, self.eps).to(x.dtype)


def build_norm(kind: str, dim: int, eps: float, bias: bool = False) -> nn.Module:
    """``bias``: LayerNorm only (the config refuses it with RMSNorm)."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return LayerNorm(dim, eps, bias)
    raise ValueError(f"norm={kind!r} is unknown; allowed: 'rmsnorm', 'layernorm'")
