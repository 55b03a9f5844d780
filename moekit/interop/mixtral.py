"""Mixtral (transformers ``MixtralForCausalLM``): config and key map."""

from __future__ import annotations

from moekit.config import MoEConfig, ModelConfig
from moekit.interop.expressible import aux_loss_coef_hf
from moekit.interop.rope import hf_rope_parameters, rope_settings
from moekit.interop.keymap import HF_LAYER, LLAMA_GLOBAL, LLAMA_NORMS, KeyMap, Rule
from moekit.nn import activations

ARCHITECTURE = "MixtralForCausalLM"


def model_config(hf: dict) -> ModelConfig:
    if hf.get("sliding_window") not in (None, 0):
        raise ValueError(f"config.json: sliding_window={hf['sliding_window']!r} is not supported (only None)")
    activations.from_hf(hf.get("hidden_act", "silu"))  # the key map loads gated SiLU experts only
    d = hf["hidden_size"]
    moe = MoEConfig(d_model=d, expert_hidden=hf["intermediate_size"], num_experts=hf["num_local_experts"],
                    top_k=hf["num_experts_per_tok"], aux_loss_coef=hf.get("router_aux_loss_coef", 0.0),
                    lb_convention="hf_compat")
    return ModelConfig(vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"],
                       n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"),
                       head_dim=hf.get("head_dim"), max_seq_len=hf.get("max_position_embeddings", 4096),
                       **rope_settings(hf, hf.get("max_position_embeddings", 4096)),
                       norm_eps=hf.get("rms_norm_eps", 1e-5),
                       tie_embeddings=hf.get("tie_word_embeddings", False), moe=moe)


KEYMAP = KeyMap(
    global_=LLAMA_GLOBAL,
    per_layer=[
        *LLAMA_NORMS,
        *[Rule(f"layers.{{layer}}.attn.{p}.weight", [f"{HF_LAYER}.self_attn.{p}.weight"])
          for p in ("q_proj", "k_proj", "v_proj", "o_proj")],
        Rule("layers.{layer}.ffn.router.weight_ED", [f"{HF_LAYER}.block_sparse_moe.gate.weight"]),
        # w1 = gate, w3 = up, w2 = down; moekit's w_in is [gate; up]
        Rule("layers.{layer}.ffn.experts.w_in", [f"{HF_LAYER}.block_sparse_moe.experts.{{expert}}.w1.weight",
                                                 f"{HF_LAYER}.block_sparse_moe.experts.{{expert}}.w3.weight"],
             experts=True),
        Rule("layers.{layer}.ffn.experts.w_out", [f"{HF_LAYER}.block_sparse_moe.experts.{{expert}}.w2.weight"],
             experts=True),
    ],
)


def hf_config(cfg: ModelConfig) -> dict:
    """transformers' MixtralConfig fields for a moekit MoE model with GQA attention.

    A plain mapping: whatever Mixtral cannot hold reads back differently through
    :func:`model_config` and is refused by :mod:`moekit.interop.expressible`."""
    m = cfg.moe
    return {
        "architectures": [ARCHITECTURE], "model_type": "mixtral", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": m.expert_hidden, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": hf_rope_parameters(cfg),
        "num_local_experts": m.num_experts, "num_experts_per_tok": m.top_k, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings, "router_aux_loss_coef": aux_loss_coef_hf(m),
        "router_jitter_noise": 0.0, "sliding_window": None,
    }
