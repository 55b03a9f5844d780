"""The slow, obviously-correct side of quantization: a module's quantized weights dequantized into plain
float modules, so that :func:`moekit.moe.reference.reference_forward` (or any float path) runs them.
The tests compare the ``quantized`` expert backend and :class:`QuantizedLinear` against it."""

from __future__ import annotations

import copy

import torch
from torch import nn

from moekit.moe.experts import Experts
from moekit.quant.modules import QuantizedExperts, QuantizedLinear


@torch.no_grad()
def dequantized_experts(q: QuantizedExperts, backend: str = "loop") -> Experts:
    """Float :class:`Experts` holding ``q``'s dequantized weights (fp32), asking for ``backend``."""
    experts = Experts(q.cfg, backend=backend)
    experts.w_in.copy_(q._stacks["w_in"].dequantize_all())
    experts.w_out.copy_(q._stacks["w_out"].dequantize_all())
    for name in ("b_in", "b_out"):
        if getattr(q, name) is not None:
            getattr(experts, name).copy_(getattr(q, name))
    return experts


@torch.no_grad()
def dequantized_linear(q: QuantizedLinear) -> nn.Linear:
    linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
    linear.weight.copy_(q.weight)
    if q.bias is not None:
        linear.bias.copy_(q.bias)
    return linear


def dequantize(module: nn.Module) -> nn.Module:
    """A copy of ``module`` (a model, a layer) with every quantized module replaced by its dequantized
    float twin; ``module`` itself is left as it is."""
    out = copy.deepcopy(module)
    for name, child in list(out.named_modules()):
        if isinstance(child, (QuantizedExperts, QuantizedLinear)):
            twin = dequantized_experts(child) if isinstance(child, QuantizedExperts) else dequantized_linear(child)
            _set_submodule(out, name, twin)
    if hasattr(out, "quant_config"):
        del out.quant_config
    return out


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, leaf, module)
