"""Hugging Face checkpoints out: ``moekit.interop.to_hf(model, out)``.

    to_hf(model, "out/hf")                        # the first family that can express the model
    to_hf(model, "out/hf", "DeepseekV3ForCausalLM", tokenizer)

An export reproduces the model's logits in transformers or is refused with a ValueError naming
every field that stands in the way (:mod:`moekit.interop.expressible`). moekit's training settings
that transformers has no field for travel under config.json's ``"moekit"`` key, so
``from_pretrained`` restores the same ModelConfig.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from moekit.config import ModelConfig
from moekit.interop import dbrx, deepseek, dots, ernie, glm, granite, hunyuan, mixtral, mlp_experts, phimoe
from moekit.interop.expressible import apply_delta, compare
from moekit.interop.keymap import KeyMap, export_with_keymap, unmapped_selection_bias

EXTRA_KEY = "moekit"  # config.json: {"format": 1, "config": the delta of ModelConfig fields}
EXTRA_FORMAT = 1


@dataclass(frozen=True)
class Exporter:
    hf_config: Callable[[ModelConfig], dict]  # the family's config.json fields (a plain mapping)
    model_config: Callable[[dict], ModelConfig]  # the family's importer: what those fields mean
    keymap: KeyMap
    attention: str  # the attention the family computes


EXPORTERS = {
    mixtral.ARCHITECTURE: Exporter(mixtral.hf_config, mixtral.model_config, mixtral.KEYMAP, "gqa"),
    dbrx.ARCHITECTURE: Exporter(dbrx.hf_config, dbrx.model_config, dbrx.KEYMAP, "gqa"),
    **{a: Exporter(fn, mlp_experts.model_config, mlp_experts.KEYMAP, "gqa") for a, fn in mlp_experts.EXPORT.items()},
    **{a: Exporter(fn, deepseek.model_config, deepseek.KEYMAP, "mla") for a, fn in deepseek.EXPORT.items()},
    **{a: Exporter(fn, granite.model_config, granite.KEYMAP, "gqa") for a, fn in granite.EXPORT.items()},
    phimoe.ARCHITECTURE: Exporter(phimoe.hf_config, phimoe.model_config, phimoe.KEYMAP, "gqa"),
    glm.ARCHITECTURE: Exporter(glm.hf_config, glm.model_config, glm.KEYMAP, "gqa"),
    dots.ARCHITECTURE: Exporter(dots.hf_config, dots.model_config, dots.KEYMAP, "gqa"),
    ernie.ARCHITECTURE: Exporter(ernie.hf_config, ernie.model_config, ernie.KEYMAP, "gqa"),
    hunyuan.ARCHITECTURE: Exporter(hunyuan.hf_config, hunyuan.model_config, hunyuan.KEYMAP, "gqa"),
}


@dataclass
class HFExport:
    architecture: str
    config: dict  # config.json
    tensors: dict[str, torch.Tensor]  # model.safetensors


def export(model, architecture: str) -> HFExport:
    """``model`` as ``architecture``'s config.json and tensors, or ValueError naming every field
    (and the selection bias) that the family cannot express."""
    if architecture not in EXPORTERS:
        raise ValueError(f"--architecture {architecture!r} cannot be exported; exportable: {', '.join(EXPORTERS)}")
    ex, cfg = EXPORTERS[architecture], model.cfg
    if cfg.moe is None:
        raise ValueError(f"{architecture} cannot express ModelConfig.moe=None (a dense model; {architecture} is a "
                         "Mixture-of-Experts family)")
    if cfg.attention != ex.attention:
        raise ValueError(f"{architecture} cannot express ModelConfig.attention={cfg.attention!r} ({architecture} "
                         f"computes attention={ex.attention!r})")
    try:
        hf = json.loads(json.dumps(ex.hf_config(cfg)))  # exactly what config.json will hold
    except ValueError as err:
        raise ValueError(f"{architecture} cannot express {err}") from None
    try:
        back = ex.model_config(hf)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{architecture} cannot express this model: its exported config does not read back "
                         f"({err})") from None
    delta, refused = compare(cfg, back, architecture)
    bias = unmapped_selection_bias(model, ex.keymap)
    if bias:
        refused.append(bias)
    if refused:
        raise ValueError(f"{architecture} cannot express " + "; ".join(refused))
    delta = json.loads(json.dumps(delta))
    if apply_delta(back, delta) != cfg:  # by construction; a failure here is a bug in compare
        raise AssertionError(f"{architecture}: the config delta {delta} does not restore {cfg}")
    tensors = export_with_keymap(model, ex.keymap, cfg.moe.num_experts)
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return HFExport(architecture, {**hf, "torch_dtype": dtype, EXTRA_KEY: {"format": EXTRA_FORMAT, "config": delta}},
                    tensors)


def restore_config(cfg: ModelConfig, hf: dict, architecture: str) -> ModelConfig:
    """The ModelConfig an export came from: ``cfg`` (read from the Hugging Face fields) with the
    fields under config.json's "moekit" key put back. ValueError when the key is malformed or sets a
    forward-changing field the Hugging Face fields contradict (edited after the export)."""
    extra = hf.get(EXTRA_KEY)
    if extra is None:
        return cfg
    if not isinstance(extra, dict) or extra.get("format") != EXTRA_FORMAT or not isinstance(extra.get("config"), dict):
        raise ValueError(f"{EXTRA_KEY!r} key: expected {{'format': {EXTRA_FORMAT}, 'config': {{...}}}}, got {extra!r}")
    restored = apply_delta(cfg, extra["config"])
    _, contradicted = compare(restored, cfg, architecture)
    if contradicted:
        raise ValueError(f"{EXTRA_KEY!r} key contradicts the Hugging Face fields: " + "; ".join(contradicted)
                         + f"; remove the {EXTRA_KEY!r} key to load what the Hugging Face fields say")
    return restored


def save_tokenizer(tokenizer, out: Path, max_seq_len: int) -> None:
    """tokenizer.json (moekit's byte tokenizer as an equivalent byte-level BPE) and the
    tokenizer_config.json with which transformers' AutoTokenizer loads it."""
    (tokenizer.to_hf() if tokenizer.kind == "byte" else tokenizer).save(out)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_seq_len,
              "clean_up_tokenization_spaces": False}
    if tokenizer.eot_id is not None:
        from moekit.tokenizer import END_OF_TEXT

        config["eos_token"] = END_OF_TEXT
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def to_hf(model, out: str | Path, architecture: str | None = None, tokenizer=None) -> str:
    """Writes a Hugging Face directory (config.json, model.safetensors and, given a moekit
    ``tokenizer``, tokenizer.json) that transformers loads with the same logits; returns the
    architecture used (the first that can express the model when ``architecture`` is None).

    Refuses (ValueError naming each field, its value and why) a model the family cannot express,
    and refuses to write into a non-empty directory."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not empty; choose an empty or new directory")
    if architecture is not None:
        result = export(model, architecture)
    else:
        reasons = {}
        for arch in EXPORTERS:
            try:
                result = export(model, arch)
                break
            except ValueError as err:
                reasons[arch] = str(err)
        else:
            raise ValueError("this model fits no exportable architecture: " + "; ".join(reasons.values()))
    out.mkdir(parents=True, exist_ok=True)
    save_file(result.tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(result.config, indent=2) + "\n")
    if tokenizer is not None:
        save_tokenizer(tokenizer, out, model.cfg.max_seq_len)
    return result.architecture
