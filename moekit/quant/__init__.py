"""Weight-only quantization for CPU inference: int8 (per output channel) and int4 (group-wise) routed
experts, and optionally every linear layer, on PyTorch's own CPU kernels.

    summary = moekit.quant.quantize_model(model, "int4", group_size=32)    # in place
    moekit.quant.save_quantized(model, "runs/small-int4")                   # a verified checkpoint
    model = moekit.from_pretrained("runs/small-int4")                       # no re-quantizing
    print(moekit.quant.quality(reference, model, batches).describe())      # KL, top-1, perplexity

Layout: :mod:`.ops` (quantize / dequantize / the kernels and their reference), :mod:`.config`
(:class:`QuantConfig`), :mod:`.modules` (:class:`QuantizedExperts`, run by the expert backend
``quantized``, and :class:`QuantizedLinear`), :mod:`.reference` (the dequantized float twins),
:mod:`.model` (:func:`quantize_model`), :mod:`.checkpoint`, :mod:`.quality`, :mod:`.cli` (``moekit quantize``).
"""

from moekit.quant.checkpoint import save_quantized
from moekit.quant.config import QuantConfig
from moekit.quant.model import QuantizeSummary, quantization_of, quantize_model
from moekit.quant.modules import QuantizedExperts, QuantizedLinear
from moekit.quant.quality import QualityReport, quality
from moekit.quant.reference import dequantize

__all__ = ["QualityReport", "QuantConfig", "QuantizeSummary", "QuantizedExperts", "QuantizedLinear", "dequantize",
           "quality", "quantization_of", "quantize_model", "save_quantized"]
