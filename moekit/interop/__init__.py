"""Hugging Face checkpoints in: ``moekit.from_pretrained(path)``.

    model = moekit.from_pretrained("path/to/Mixtral-8x7B")     # config.json + *.safetensors
    model = moekit.from_pretrained("runs/small")               # or a moekit checkpoint / run

The model is built on the meta device and filled from memory-mapped safetensors through a
declarative key map per family, so only the weights themselves are ever materialised.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moekit.interop import deepseek, mixtral, mlp_experts
from moekit.interop.keymap import InteropError, SafetensorsDir, load_with_keymap
from moekit.model import MoETransformer

FAMILIES = {mixtral.ARCHITECTURE: mixtral, **{a: mlp_experts for a in mlp_experts.ARCHITECTURES},
            **{a: deepseek for a in deepseek.ARCHITECTURES}}


def _read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise InteropError(f"{cfg_path} is not valid JSON: {err}") from None


def from_pretrained(path: str | Path, dtype: torch.dtype | None = None) -> MoETransformer:
    """A moekit model from a Hugging Face directory or a moekit checkpoint/run directory."""
    from moekit.checkpoint import load_model

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path not found: {path}")
    if not (path / "config.json").is_file() or (path / "manifest.json").is_file():
        return load_model(path, dtype)[0]
    hf = _read_config(path)
    if "model" in hf and "format" in hf:  # a moekit checkpoint's config.json
        return load_model(path, dtype)[0]
    archs = hf.get("architectures") or [hf.get("model_type", "?")]
    family = next((FAMILIES[a] for a in archs if a in FAMILIES), None)
    if family is None:
        raise InteropError(f"{path / 'config.json'}: architecture {archs} is not supported; supported: "
                           f"{', '.join(FAMILIES)}")
    try:
        cfg = family.model_config(hf)
    except KeyError as err:
        raise InteropError(f"{path / 'config.json'}: missing field {err}") from None
    except (TypeError, ValueError) as err:
        raise InteropError(f"{path / 'config.json'}: {err}") from None
    with torch.device("meta"):
        model = MoETransformer(cfg)
    ckpt = SafetensorsDir(path)
    load_with_keymap(model, ckpt, family.KEYMAP, [b.is_moe for b in model.layers],
                     cfg.moe.num_experts if cfg.moe else 0, dtype)
    for module in model.modules():  # buffers the checkpoint does not carry: the routers' balancing state
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                setattr(module, name, torch.zeros(buf.shape, dtype=buf.dtype))
    return model.eval()


__all__ = ["FAMILIES", "InteropError", "from_pretrained"]
