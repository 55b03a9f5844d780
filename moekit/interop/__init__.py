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

from moekit.interop import dbrx, deepseek, mixtral, mlp_experts
from moekit.interop.keymap import InteropError, SafetensorsDir, export_with_keymap, load_with_keymap
from moekit.model import MoETransformer

FAMILIES = {mixtral.ARCHITECTURE: mixtral, dbrx.ARCHITECTURE: dbrx, **{a: mlp_experts for a in mlp_experts.ARCHITECTURES},
            **{a: deepseek for a in deepseek.ARCHITECTURES}}


def _read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise InteropError(f"{cfg_path} is not valid JSON: {err}") from None


def from_pretrained(path: str | Path, dtype: torch.dtype | None = None) -> MoETransformer:
    """A moekit model from a Hugging Face directory or a moekit checkpoint/run directory.

    ``dtype``: the parameters' dtype (e.g. ``torch.bfloat16``), converted while reading; None = fp32
    whatever the files hold."""
    from moekit.checkpoint import load_model

    from moekit.checkpoint import refuse_pickle

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path not found: {path}")
    if path.is_file():
        refuse_pickle(path)
        raise InteropError(f"{path} is a file; expected a Hugging Face model directory or a moekit checkpoint")
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
    with SafetensorsDir(path) as ckpt:
        load_with_keymap(model, ckpt, family.KEYMAP, [b.is_moe for b in model.layers],
                         cfg.moe.num_experts if cfg.moe else 0, dtype)
    for module in model.modules():  # buffers the checkpoint does not carry: the routers' balancing state
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                setattr(module, name, torch.zeros(buf.shape, dtype=buf.dtype))
    return model.eval()


# architecture -> (moekit config -> HF config dict, key map)
EXPORTERS = {mixtral.ARCHITECTURE: (mixtral.hf_config, mixtral.KEYMAP), dbrx.ARCHITECTURE: (dbrx.hf_config, dbrx.KEYMAP),
             **{a: (fn, mlp_experts.KEYMAP) for a, fn in mlp_experts.EXPORT.items()},
             **{a: (fn, deepseek.KEYMAP) for a, fn in deepseek.EXPORT.items()}}


def to_hf(model: MoETransformer, out: str | Path, architecture: str | None = None) -> str:
    """Writes a Hugging Face directory (config.json + model.safetensors) that transformers loads with
    the same logits; returns the architecture used (the first that can express the model when
    ``architecture`` is None). Refuses to write into a non-empty directory."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} exists and is not empty; choose an empty or new directory")
    reasons = {}
    for arch, (hf_config, keymap) in EXPORTERS.items():
        if architecture not in (None, arch):
            continue
        try:
            hf = hf_config(model.cfg)
        except ValueError as err:
            reasons[arch] = str(err)
            continue
        tensors = export_with_keymap(model, keymap, model.cfg.moe.num_experts if model.cfg.moe else 0)
        if model.cfg.tie_embeddings:
            tensors.pop("lm_head.weight", None)
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps({**hf, "torch_dtype": "float32"}, indent=2) + "\n")
        return arch
    if architecture is not None and architecture not in EXPORTERS:
        raise ValueError(f"--architecture {architecture!r} cannot be exported; exportable: {', '.join(EXPORTERS)}")
    raise ValueError(f"this model fits no exportable architecture: " +
                     "; ".join(f"{a}: {r}" for a, r in reasons.items()))


__all__ = ["FAMILIES", "InteropError", "from_pretrained", "to_hf"]
