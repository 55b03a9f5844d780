"""How a model's weights are quantized: saved beside a quantized checkpoint as ``quant.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from moekit.config import _check_known_fields
from moekit.quant.ops import FORMATS, GROUP_SIZES
from moekit.validate import bad, check_choice

ACT_DTYPES = ("bfloat16", "input")


@dataclass(frozen=True)
class QuantConfig:
    """``format``: ``int8`` (per output channel) or ``int4`` (group-wise, ``group_size`` input features a
    group, asymmetric unless ``symmetric``). ``linears``: every attention / dense-FFN / shared-expert
    linear too, not only the routed experts (never the router, the embedding or the LM head).
    ``act_dtype``: the dtype the quantized products run in: ``bfloat16`` for fp32 and bf16 activations
    (PyTorch's fp32 weight-only kernels are many times slower on a CPU), or ``input`` (the activations'
    own dtype: exact fp32 products, slow)."""

    format: str
    group_size: int = 32
    symmetric: bool = False
    linears: bool = False
    act_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        check_choice("QuantConfig", "format", self.format, FORMATS)
        check_choice("QuantConfig", "group_size", self.group_size, GROUP_SIZES)
        for name in ("symmetric", "linears"):
            if not isinstance(getattr(self, name), bool):
                raise bad("QuantConfig", name, getattr(self, name), "expected True or False")
        if self.symmetric and self.format != "int4":
            raise bad("QuantConfig", "symmetric", self.symmetric, "int8 is always symmetric; only int4 takes it")
        check_choice("QuantConfig", "act_dtype", self.act_dtype, ACT_DTYPES)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        _check_known_fields(cls, data)
        return cls(**data)

    def describe(self) -> str:
        what = self.format if self.format == "int8" else \
            f"int4 g{self.group_size}{' symmetric' if self.symmetric else ''}"
        return what + (" (experts and linears)" if self.linears else " (experts)")
