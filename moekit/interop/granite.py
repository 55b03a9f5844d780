"""Granite MoE (transformers ``GraniteMoeForCausalLM``) and Granite MoE Shared
(``GraniteMoeSharedForCausalLM``): config and key map.

Mixtral's maths with µP multipliers around it: the embeddings times ``embedding_multiplier``, each
attention and MoE output times ``residual_multiplier`` before the residual add, attention scores
scaled by ``attention_multiplier`` (not 1/√head_dim) and the logits divided by ``logits_scaling``.
The router takes the softmax over the top-k logits. Experts are stored fused, one [E, 2F, D]
``input_linear`` ([gate; up] per expert, moekit's ``w_in`` as it is) and one [E, D, F]
``output_linear``; Shared adds an always-on SwiGLU ``shared_mlp`` of width
``shared_intermediate_size`` (0 = none), summed with the routed output.
"""

from __future__ import annotations

import math

from moekit.config import MoEConfig, ModelConfig
from moekit.interop.expressible import aux_loss_coef_hf
from moekit.interop.keymap import HF_LAYER, LLAMA_GLOBAL, LLAMA_NORMS, KeyMap, Rule
from moekit.interop.rope import hf_rope_parameters, rope_settings
from moekit.nn import activations

ARCHITECTURES = ("GraniteMoeForCausalLM", "GraniteMoeSharedForCausalLM")


def model_config(hf: dict) -> ModelConfig:
    arch = hf["architectures"][0]
    activations.from_hf(hf.get("hidden_act", "silu"))  # the key map loads gated SiLU experts only
    d = hf["hidden_size"]
    shared = hf.get("shared_intermediate_size", 0) if arch == "GraniteMoeSharedForCausalLM" else 0
    logits_scaling = hf.get("logits_scaling", 1.0)
    if not logits_scaling or logits_scaling <= 0:
        raise ValueError(f"logits_scaling={logits_scaling!r} is not supported (expected a number > 0: the logits "
                         "are divided by it)")
    moe = MoEConfig(d_model=d, expert_hidden=hf["intermediate_size"], num_experts=hf["num_local_experts"],
                    top_k=hf["num_experts_per_tok"], softmax_order="after",
                    aux_loss_coef=hf.get("router_aux_loss_coef", 0.0), lb_convention="hf_compat",
                    num_shared_experts=1 if shared else 0, shared_expert_hidden=shared or None)
    bias = bool(hf.get("attention_bias", False))
    max_len = hf.get("max_position_embeddings", 4096)
    return ModelConfig(vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"],
                       n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"),
                       head_dim=hf.get("head_dim"), max_seq_len=max_len, **rope_settings(hf, max_len),
                       norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
                       qkv_bias=bias, attn_out_bias=bias,
                       embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
                       logit_multiplier=1.0 / logits_scaling,
                       residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
                       attention_multiplier=float(hf.get("attention_multiplier", 1.0)), moe=moe)


L, M = HF_LAYER, f"{HF_LAYER}.block_sparse_moe"
KEYMAP = KeyMap(
    global_=LLAMA_GLOBAL,
    per_layer=[
        *LLAMA_NORMS,
        *[Rule(f"layers.{{layer}}.attn.{p}.{t}", [f"{L}.self_attn.{p}.{t}"])
          for p in ("q_proj", "k_proj", "v_proj", "o_proj") for t in ("weight", "bias")],
        Rule("layers.{layer}.ffn.router.weight_ED", [f"{M}.router.layer.weight"]),
        # all experts of a layer in one tensor, already in moekit's layout ([E, 2F, D] and [E, D, F])
        Rule("layers.{layer}.ffn.experts.w_in", [f"{M}.input_linear.weight"]),
        Rule("layers.{layer}.ffn.experts.w_out", [f"{M}.output_linear.weight"]),
        Rule("layers.{layer}.ffn.shared.in_proj.weight", [f"{L}.shared_mlp.input_linear.weight"]),
        Rule("layers.{layer}.ffn.shared.down_proj.weight", [f"{L}.shared_mlp.output_linear.weight"]),
    ],
)


def _common(cfg: ModelConfig, arch: str, model_type: str) -> dict:
    """transformers' GraniteMoe(Shared)Config fields (a plain mapping: :mod:`moekit.interop.expressible`
    refuses what does not read back through :func:`model_config`)."""
    m = cfg.moe
    return {
        "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": m.expert_hidden, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_parameters": hf_rope_parameters(cfg), "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
        # one switch for the q, k, v and output biases: a model with only some reads back with all, and is refused
        "attention_bias": cfg.qkv_bias or cfg.attn_out_bias,
        "num_local_experts": m.num_experts, "num_experts_per_tok": m.top_k,
        "router_aux_loss_coef": aux_loss_coef_hf(m),
        "embedding_multiplier": cfg.embedding_multiplier, "logits_scaling": 1.0 / cfg.logit_multiplier,
        "residual_multiplier": cfg.residual_multiplier,
        "attention_multiplier": cfg.attention_multiplier if cfg.attention_multiplier is not None
        else 1.0 / math.sqrt(cfg.head_dim),
    }


def granitemoe_config(cfg: ModelConfig) -> dict:
    return _common(cfg, "GraniteMoeForCausalLM", "granitemoe")


def granitemoeshared_config(cfg: ModelConfig) -> dict:
    return {**_common(cfg, "GraniteMoeSharedForCausalLM", "granitemoeshared"),
            "shared_intermediate_size": cfg.moe.shared_hidden}


EXPORT = {"GraniteMoeForCausalLM": granitemoe_config, "GraniteMoeSharedForCausalLM": granitemoeshared_config}
