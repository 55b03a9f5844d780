"""Dense feed-forward blocks (the activations: :mod:`moekit.nn.activations`).

Legend: T tokens, D model width, H hidden width.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.nn.activations import activation_fn, is_gated

__all__ = ["MLP", "activation_fn"]  # activation_fn: moekit.nn exports it from here


class MLP(nn.Module):
    """A dense FFN: ``down(act(in_proj(x)))``, with the gate and up projections fused for gated
    activations (one [2H, D] GEMM instead of two [H, D] ones)."""

    def __init__(self, d_model: int, hidden: int, activation: str = "swiglu", bias: bool = False):
        super().__init__()
        self.act = activation_fn(activation)
        self.in_proj = nn.Linear(d_model, (2 if is_gated(activation) else 1) * hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.in_proj(x_TD)))
