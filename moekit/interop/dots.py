"""dots.llm1 (transformers ``Dots1ForCausalLM``): config and key map.

Qwen3-style attention (a per-head RMSNorm on q and k, always on; one ``attention_bias`` switch for
the q, k, v and output biases) with DeepSeek-V3-style FFNs spelled as in GLM-4.5
(:func:`moekit.interop.glm.v3_moe`): ``first_k_dense_replace`` dense layers, then sigmoid routing with
the selection-only ``e_score_correction_bias``, groups, ``norm_topk_prob``, ``routed_scaling_factor``
and ``n_shared_experts`` · ``moe_intermediate_size`` of always-on shared MLP. Refused by name: sliding-
window layers (``layer_types`` / ``sliding_window`` with ``max_window_layers`` below the layer count)
whose window is shorter than the context: moekit attends to the whole context.
"""

from __future__ import annotations

from moekit.config import ModelConfig
from moekit.interop.glm import KEYMAP as GLM_KEYMAP
from moekit.interop.glm import v3_moe, v3_moe_fields
from moekit.interop.keymap import HF_LAYER, KeyMap, Rule
from moekit.interop.rope import hf_rope_parameters, rope_settings
from moekit.nn import activations

ARCHITECTURE = "Dots1ForCausalLM"


def _check_window(hf: dict, max_len: int) -> None:
    window, n = hf.get("sliding_window"), hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None:  # transformers' default: sliding from max_window_layers on, when a window is set
        first = hf.get("max_window_layers", n)
        types = ["sliding_attention" if window is not None and i >= first else "full_attention" for i in range(n)]
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    unknown = sorted({t for t in types if t not in ("sliding_attention", "full_attention")})
    if unknown:
        raise ValueError(f"layer_types {unknown} are not supported (full_attention, sliding_attention)")
    if sliding and window is not None and window < max_len:
        raise ValueError(f"sliding_window={window!r} on layers {sliding} (layer_types / max_window_layers) is not "
                         f"supported (only a window >= max_position_embeddings={max_len}: moekit attends to the "
                         "whole context)")


def model_config(hf: dict) -> ModelConfig:
    activations.from_hf(hf.get("hidden_act", "silu"))  # the key map loads gated SiLU experts only
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    max_len = hf.get("max_position_embeddings", 2048)
    _check_window(hf, max_len)
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim") or d // heads, max_seq_len=max_len,
        **rope_settings(hf, max_len), norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", False), qkv_bias=bias, attn_out_bias=bias, qk_norm="head",
        ffn_hidden=hf["intermediate_size"], first_k_dense=hf.get("first_k_dense_replace", 0),
        moe=v3_moe(hf, norm_topk_prob=False))


KEYMAP = KeyMap(
    global_=GLM_KEYMAP.global_,
    per_layer=[*GLM_KEYMAP.per_layer, Rule("layers.{layer}.attn.o_proj.bias", [f"{HF_LAYER}.self_attn.o_proj.bias"])],
    skip_layers_after=True,
)


def hf_config(cfg: ModelConfig) -> dict:
    """transformers' Dots1Config fields (a plain mapping: :mod:`moekit.interop.expressible` refuses
    what does not read back through :func:`model_config`)."""
    return {
        "architectures": [ARCHITECTURE], "model_type": "dots1", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_parameters": hf_rope_parameters(cfg), "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings,
        # one switch for the q, k, v and output biases: a model with only some reads back with all, and is refused
        "attention_bias": cfg.qkv_bias or cfg.attn_out_bias, "attention_dropout": 0.0,
        "sliding_window": None, "max_window_layers": cfg.n_layers,
        "layer_types": ["full_attention"] * cfg.n_layers, **v3_moe_fields(cfg),
    }
