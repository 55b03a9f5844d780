"""Quantized moekit checkpoints: the usual checkpoint (safetensors weights, config.json, manifest of
checksums, written atomically; :mod:`moekit.checkpoint`) plus ``quant.json``, the :class:`QuantConfig`.
:func:`moekit.checkpoint.load_model` (and so ``moekit.from_pretrained``) reads one back without
re-quantizing (the loading lives there: the checkpoint module imports nothing that imports it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from moekit.checkpoint import QUANT_FILE, save_checkpoint
from moekit.quant.model import quantization_of


def save_quantized(model: torch.nn.Module, out_dir: str | Path, tokenizer=None, step: int = 0) -> Path:
    """Writes quantized ``model`` as the checkpoint ``out_dir/ckpt-{step}`` (atomically: whole or absent);
    returns its path. ``moekit.from_pretrained(out_dir)`` loads it."""
    qcfg = quantization_of(model)
    if qcfg is None:
        raise ValueError("save_quantized: the model is not quantized (moekit.quant.quantize_model first)")
    return save_checkpoint(Path(out_dir), step, model, model.cfg, tokenizer,
                           extra_json={QUANT_FILE: {"format": 1, "quant": qcfg.to_dict()}})
