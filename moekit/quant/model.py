"""Quantizing a model in place: its routed experts (and optionally its linears), one module at a time.

    summary = moekit.quant.quantize_model(model, "int4", group_size=32)   # model now runs int4 experts
    print(summary.describe())
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moekit.moe.experts import Experts
from moekit.quant.config import QuantConfig
from moekit.quant.modules import QuantizedExperts, QuantizedLinear


@dataclass
class QuantizeSummary:
    config: QuantConfig
    experts: int  # MoE layers whose routed experts were quantized
    linears: int  # linears quantized
    skipped: list[str] = field(default_factory=list)  # linears left in float (shape does not fit int4)
    bytes_before: int = 0  # of the modules that were quantized
    bytes_after: int = 0

    def describe(self) -> str:
        mb = 2**20
        out = (f"{self.config.describe()}: {self.experts} expert layers, {self.linears} linears; "
               f"{self.bytes_before / mb:.1f} MiB -> {self.bytes_after / mb:.1f} MiB")
        return out + (f"; left in float: {len(self.skipped)} linears" if self.skipped else "")


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def quantization_of(model: nn.Module) -> QuantConfig | None:
    """The :class:`QuantConfig` of a quantized model, else None."""
    return getattr(model, "quant_config", None)


def _linears(model: nn.Module, qcfg: QuantConfig) -> tuple[list[tuple[str, nn.Linear]], list[str]]:
    """The linears ``linears=True`` quantizes (those of the blocks: attention, dense FFNs, shared and
    residual experts; not a shared expert's one-output gate, the router, the embedding or the LM head,
    which the model reads as a weight) and those whose shape does not fit."""
    blocks = getattr(model, "layers", None)
    roots = [(f"layers.{i}", blk) for i, blk in enumerate(blocks)] if blocks is not None else [("", model)]
    chosen, skipped = [], []
    for prefix, root in roots:
        for name, m in root.named_modules():
            if not isinstance(m, nn.Linear) or name.endswith("shared_gate"):
                continue
            full = f"{prefix}.{name}" if prefix else name
            (chosen if QuantizedLinear.fits(m, qcfg) else skipped).append((full, m))
    return chosen, [n for n, _ in skipped]


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _config(format: str | QuantConfig, group_size: int, linears: bool, symmetric: bool,
            act_dtype: str) -> QuantConfig:
    if isinstance(format, QuantConfig):
        return format
    return QuantConfig(format, group_size=group_size, symmetric=symmetric, linears=linears, act_dtype=act_dtype)


@torch.no_grad()
def quantize_model(model: nn.Module, format: str | QuantConfig = "int8", group_size: int = 32, *,
                   linears: bool = False, symmetric: bool = False, act_dtype: str = "bfloat16") -> QuantizeSummary:
    """Quantizes ``model`` (a :class:`moekit.MoETransformer`, or any module holding MoE layers) in place:
    every routed-experts module becomes a :class:`QuantizedExperts`, and with ``linears`` every linear
    :func:`_linears` names a :class:`QuantizedLinear`. ``format``: ``int8`` / ``int4`` or a whole
    :class:`QuantConfig`. One module at a time, each float module dropped once its quantized twin is in
    place: memory peaks near the model plus one quantized layer. The model is for inference from then
    on (eval mode; a backward through a quantized module raises)."""
    qcfg = _config(format, group_size, linears, symmetric, act_dtype)
    if quantization_of(model) is not None:
        raise ValueError(f"the model is already quantized ({quantization_of(model).describe()})")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("quantize_model: the model must be on the CPU (the int8 / int4 kernels are PyTorch's "
                         "CPU ones)")
    summary = QuantizeSummary(qcfg, 0, 0)
    for name in [n for n, m in model.named_modules() if type(m) is Experts]:  # names only: no float stack kept alive
        float_experts = model.get_submodule(name)
        summary.bytes_before += _bytes(float_experts)
        q = QuantizedExperts.from_experts(float_experts, qcfg)
        summary.bytes_after += _bytes(q)
        del float_experts
        _set(model, name, q)
        summary.experts += 1
    if qcfg.linears:
        chosen, summary.skipped = _linears(model, qcfg)
        chosen = [n for n, _ in chosen]
        for name in chosen:
            lin = model.get_submodule(name)
            summary.bytes_before += _bytes(lin)
            q = QuantizedLinear.from_linear(lin, qcfg)
            summary.bytes_after += _bytes(q)
            _set(model, name, q)
            summary.linears += 1
        del chosen
    if summary.experts == 0 and summary.linears == 0:
        raise ValueError(f"{type(model).__name__} has no MoE experts to quantize"
                         + ("" if qcfg.linears else " (linears=True quantizes its linear layers)"))
    model.quant_config = qcfg
    return summary


def quantized_skeleton(model: nn.Module, qcfg: QuantConfig, device: torch.device | str = "meta") -> None:
    """Gives ``model`` (built on ``device``, e.g. the meta device) the structure :func:`quantize_model`
    would give it, with empty quantized modules: a quantized checkpoint loads into it."""
    for name, m in [(n, m) for n, m in model.named_modules() if type(m) is Experts]:
        _set(model, name, QuantizedExperts(m.cfg, qcfg, device=device))
    if qcfg.linears:
        for name, lin in _linears(model, qcfg)[0]:
            _set(model, name, QuantizedLinear(lin.in_features, lin.out_features, lin.bias is not None, qcfg, device))
    model.quant_config = qcfg
