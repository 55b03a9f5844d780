"""Mixtral (transformers ``MixtralForCausalLM``): config and key map."""

from __future__ import annotations

from moekit.config import MoEConfig, ModelConfig
from moekit.interop.rope import hf_rope_parameters, rope_settings
from moekit.interop.keymap import HF_LAYER, LLAMA_GLOBAL, LLAMA_NORMS, KeyMap, Rule

ARCHITECTURE = "MixtralForCausalLM"


def model_config(hf: dict) -> ModelConfig:
    if hf.get("sliding_window") not in (None, 0):
        raise ValueError(f"config.json: sliding_window={hf['sliding_window']!r} is not supported (only None)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
    d = hf["hidden_size"]
    moe = MoEConfig(d_model=d, expert_hidden=hf["intermediate_size"], num_experts=hf["num_local_experts"],
                    top_k=hf["num_experts_per_tok"], aux_loss_coef=hf.get("router_aux_loss_coef", 0.0),
                    lb_convention="hf_compat")
    return ModelConfig(vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"],
                       n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"),
                       head_dim=hf.get("head_dim"), max_seq_len=hf.get("max_position_embeddings", 4096),
                       **rope_settings(hf, hf.get("max_position_embeddings", 4096)), norm_eps=hf.get("rms_norm_eps", 1e-5),
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


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def hf_config(cfg: ModelConfig) -> dict:
    """transformers' MixtralConfig fields for a moekit model Mixtral can express (ValueError otherwise)."""
    m = cfg.moe
    _require(m is not None and cfg.attention == "gqa" and cfg.norm == "rmsnorm", "needs GQA, RMSNorm and MoE")
    _require(all(cfg.is_moe_layer(i) for i in range(cfg.n_layers)), "every layer must be MoE")
    _require(not (cfg.qkv_bias or cfg.qk_norm or cfg.clip_qkv or cfg.sandwich_norm or cfg.parallel_residual_mlp
                  or cfg.attn_logit_softcap or cfg.rope_interleave), "plain attention and blocks only")
    _require(cfg.embedding_multiplier == 1 and cfg.logit_multiplier == 1, "no embedding/logit multipliers")
    _require(m.router == "softmax_topk" and m.normalize_weights and m.n_group == 1 and m.routed_scaling_factor == 1
             and m.activation == "swiglu" and not m.mlp_bias and not m.shared_hidden and not m.dense_hidden,
             "softmax top-k with renormalised weights, SwiGLU experts, no shared or dense experts")
    return {
        "architectures": [ARCHITECTURE], "model_type": "mixtral", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": m.expert_hidden, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": hf_rope_parameters(cfg),
        "num_local_experts": m.num_experts, "num_experts_per_tok": m.top_k, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings, "router_aux_loss_coef": m.aux_loss_coef, "sliding_window": None,
    }
