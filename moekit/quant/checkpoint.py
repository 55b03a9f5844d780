"""Quantized moekit checkpoints: the usual checkpoint (safetensors weights, config.json, manifest of
checksums, written atomically; :mod:`moekit.checkpoint`) plus ``quant.json``, the :class:`QuantConfig`.
:func:`moekit.checkpoint.load_model` (and so ``moekit.from_pretrained``) reads one back without
re-quantizing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from moekit.checkpoint import CheckpointError, load_weights, save_checkpoint
from moekit.config import ModelConfig
from moekit.quant.config import QuantConfig
from moekit.quant.model import quantization_of, quantized_skeleton

QUANT_FILE = "quant.json"


def save_quantized(model: torch.nn.Module, out_dir: str | Path, tokenizer=None, step: int = 0) -> Path:
    """Writes quantized ``model`` as the checkpoint ``out_dir/ckpt-{step}`` (atomically: whole or absent);
    returns its path. ``moekit.from_pretrained(out_dir)`` loads it."""
    qcfg = quantization_of(model)
    if qcfg is None:
        raise ValueError("save_quantized: the model is not quantized (moekit.quant.quantize_model first)")
    return save_checkpoint(Path(out_dir), step, model, model.cfg, tokenizer,
                           extra_json={QUANT_FILE: {"format": 1, "quant": qcfg.to_dict()}})


def read_quant_config(ckpt: Path) -> QuantConfig:
    path = Path(ckpt) / QUANT_FILE
    try:
        data = json.loads(path.read_text())
        return QuantConfig.from_dict(data["quant"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} is not a moekit quantization config: {err}") from None


def load_quantized_weights(ckpt: Path, model_cfg: ModelConfig) -> torch.nn.Module:
    """The quantized model of a verified checkpoint (:func:`moekit.checkpoint.load_model` calls it): built
    on the meta device in its quantized form, then the file's tensors assigned, so memory holds the
    quantized weights only."""
    from moekit.model import MoETransformer

    qcfg = read_quant_config(ckpt)
    with torch.device("meta"):
        model = MoETransformer(model_cfg)
    quantized_skeleton(model, qcfg)
    load_weights(ckpt, model, assign=True)  # every tensor, or CheckpointError naming the file
    return model
