"""The FFN activations, one entry each: adding an activation is one entry in :data:`REGISTRY`.

Legend: H hidden width. A gated activation (Shazeer 2020, "GLU Variants Improve Transformer") takes the
first projection's 2H-wide output [gate | up] and returns act(gate) · up; the others act elementwise.

Who reads the registry: config validation (:data:`ACTIVATIONS`, the allowed names), the dense MLP and
the Python expert backends (``fn``, ``gated``; the loop backend keeps one explicit-output kernel per
``elementwise`` name), the references (``formula``) and the Hugging Face importers (``hf_name``). The C++
loop (moekit/cpu/csrc/loop.cpp, ``parse_activation``) keeps its own switch over the names;
tests/test_activations.py checks that it runs every name here and matches the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

Elementwise = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Activation:
    elementwise: str  # the elementwise function's name: the key of the loop backends' kernels
    fn: Elementwise  # that function as PyTorch runs it
    gated: bool  # act(gate) · up over [gate | up] (2H wide) instead of act(h) (H wide)
    formula: Elementwise  # the same function written out from its definition, for the references
    hf_name: str | None = None  # transformers' ``hidden_act`` for this gated FFN (Llama-style MLPs)


def _silu_formula(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def _gelu_formula(x: torch.Tensor) -> torch.Tensor:  # the exact (erf) GELU, not the tanh approximation
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2.0)))


def _relu_formula(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x, min=0)


REGISTRY: dict[str, Activation] = {
    "swiglu": Activation("silu", F.silu, True, _silu_formula, hf_name="silu"),
    "geglu": Activation("gelu", F.gelu, True, _gelu_formula, hf_name="gelu"),
    "gelu": Activation("gelu", F.gelu, False, _gelu_formula),
    "relu": Activation("relu", F.relu, False, _relu_formula),
}
ACTIVATIONS: tuple[str, ...] = tuple(REGISTRY)  # the names a config accepts (moekit.config re-exports it)


def _apply_gated(act: Elementwise) -> Elementwise:
    def gated(h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        return act(gate) * up
    return gated


_APPLIED: dict[str, Elementwise] = {name: _apply_gated(s.fn) if s.gated else s.fn for name, s in REGISTRY.items()}


def get(name: str) -> Activation:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"activation={name!r} is unknown; allowed: {', '.join(REGISTRY)}") from None


def is_gated(name: str) -> bool:
    return get(name).gated


def activation_fn(name: str) -> Elementwise:
    """Maps the first projection's output (2H wide when gated, H otherwise) to the H-wide activation."""
    get(name)  # an unknown name: ValueError listing the known ones
    return _APPLIED[name]


def reference_act(name: str, h: torch.Tensor) -> torch.Tensor:
    """The activation by its written-out formula on one token's pre-activation h (1-D), for the references."""
    spec = get(name)
    if not spec.gated:
        return spec.formula(h)
    gate, up = h[: h.shape[0] // 2], h[h.shape[0] // 2:]
    return spec.formula(gate) * up


def from_hf(hf_name: str, key: str = "hidden_act", supported: Iterable[str] = ("swiglu",)) -> str:
    """The activation of a Hugging Face gated FFN whose config says ``key=hf_name``; ValueError naming
    the key unless it is one of ``supported`` (the activations the importer's key map can load)."""
    supported = tuple(supported)
    for name in supported:
        if get(name).hf_name == hf_name:
            return name
    allowed = ", ".join(repr(get(n).hf_name) for n in supported)
    raise ValueError(f"{key}={hf_name!r} is not supported (only {allowed})")
