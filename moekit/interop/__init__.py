"""Hugging Face checkpoints in: ``moekit.from_pretrained(path)``; out: ``to_hf`` (moekit.interop.export).

    model = moekit.from_pretrained("path/to/Mixtral-8x7B")     # config.json + *.safetensors
    model = moekit.from_pretrained("runs/small")               # or a moekit checkpoint / run

The model is built on the meta device and filled from memory-mapped safetensors through a
declarative key map per family, so only the weights themselves are ever materialised.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moekit.interop import dbrx, deepseek, dots, ernie, glm, granite, hunyuan, mixtral, mlp_experts, phimoe
from moekit.interop.export import restore_config, to_hf
from moekit.interop.keymap import InteropError, SafetensorsDir, load_with_keymap
from moekit.model import MoETransformer

FAMILIES = {mixtral.ARCHITECTURE: mixtral, dbrx.ARCHITECTURE: dbrx,
            **{a: mlp_experts for a in mlp_experts.ARCHITECTURES},
            **{a: deepseek for a in deepseek.ARCHITECTURES},
            **{a: granite for a in granite.ARCHITECTURES}, phimoe.ARCHITECTURE: phimoe, glm.ARCHITECTURE: glm,
            dots.ARCHITECTURE: dots, ernie.ARCHITECTURE: ernie, hunyuan.ARCHITECTURE: hunyuan}


def _read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise InteropError(f"{cfg_path} is not valid JSON: {err}") from None


def from_pretrained(path: str | Path, dtype: torch.dtype | None = None, *, progress: bool = False,
                    quantize=None) -> MoETransformer:
    """A moekit model from a Hugging Face directory or a moekit checkpoint/run directory.

    ``dtype``: the parameters' dtype (e.g. ``torch.bfloat16``), converted while reading; None = fp32
    whatever the files hold. ``progress``: a bar on stderr over the layers read from a Hugging Face directory.
    ``quantize``: ``"int8"`` / ``"int4"`` or a :class:`moekit.quant.QuantConfig`: the routed experts (and
    with ``linears`` the linears) quantized once read, module by module (:func:`moekit.quant.quantize_model`);
    a quantized checkpoint (``moekit quantize``) loads quantized without it."""
    if quantize is None:
        return _from_pretrained(path, dtype, progress)
    from moekit.quant import QuantConfig, quantization_of, quantize_model

    qcfg = quantize if isinstance(quantize, QuantConfig) else QuantConfig(quantize)  # a bad value fails before reading
    model = _from_pretrained(path, dtype, progress)
    have = quantization_of(model)
    if have is None:
        quantize_model(model, qcfg)
    elif have.format != qcfg.format:
        raise ValueError(f"quantize={qcfg.format!r}: {path} is already quantized ({have.describe()})")
    return model


def _from_pretrained(path: str | Path, dtype: torch.dtype | None, progress: bool) -> MoETransformer:
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
        cfg = restore_config(family.model_config(hf), hf, next(a for a in archs if a in FAMILIES))
    except KeyError as err:
        raise InteropError(f"{path / 'config.json'}: missing field {err}") from None
    except (TypeError, ValueError) as err:
        raise InteropError(f"{path / 'config.json'}: {err}") from None
    with torch.device("meta"):
        model = MoETransformer(cfg)
    with SafetensorsDir(path) as ckpt:
        load_with_keymap(model, ckpt, family.KEYMAP, [b.is_moe for b in model.layers],
                         cfg.moe.num_experts if cfg.moe else 0, dtype, progress=progress)
    for module in model.modules():  # buffers the checkpoint does not carry: the routers' balancing state
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                setattr(module, name, torch.zeros(buf.shape, dtype=buf.dtype))
    return model.eval()


def load_hf_tokenizer(path: str | Path):
    """The tokenizer of a Hugging Face directory as moekit uses it, or None when it has none:
    tokenizer.json, recognised as moekit's byte tokenizer when it is exactly the one ``to_hf`` writes."""
    from moekit.tokenizer import ByteTokenizer, HFTokenizer

    path = Path(path) / "tokenizer.json"
    if not path.is_file():
        return None
    tok = HFTokenizer.from_file(path)
    return ByteTokenizer() if tok.is_byte_tokenizer() else tok


__all__ = ["FAMILIES", "InteropError", "from_pretrained", "load_hf_tokenizer", "to_hf"]
def load_model_and_tokenizer(path: str | Path, purpose: str = "this command") -> tuple[MoETransformer, object]:
    """A moekit checkpoint or run with its tokenizer, or a Hugging Face directory with its tokenizer.json
    (moekit's byte tokenizer, exported, comes back as itself); ``purpose`` names the caller in the error
    when there is no tokenizer."""
    from moekit.checkpoint import load_model

    path = Path(path)
    if (path / "config.json").is_file() and not (path / "manifest.json").is_file():
        model, tokenizer = from_pretrained(path), load_hf_tokenizer(path)
    else:
        model, tokenizer, _ = load_model(path)
    if tokenizer is None:
        raise ValueError(f"{path} has no tokenizer (tokenizer.json or tokenizer_config.json): {purpose} needs one")
    return model, tokenizer


