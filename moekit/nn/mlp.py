"""Dense feed-forward blocks and the activations shared with the experts.

Legend: T tokens, D model width, H hidden width.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn



def _swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def _geglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.gelu(gate) * up


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # Gated variants (Shazeer 2020, "GLU Variants Improve Transformer"): h = [gate | up], 2H wide.
    "swiglu": _swiglu,
    "geglu": _geglu,
    "gelu": F.gelu,
    "relu": F.relu,
}


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Maps the first projection's output (2H wide when gated, H otherwise) to the H-wide activation."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation={name!r} is unknown; allowed: {', '.join(_ACTIVATIONS)}") from None


def is_gated(name: str) -> bool:
    return name in ("swiglu", "geglu")


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
