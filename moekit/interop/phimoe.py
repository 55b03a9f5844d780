"""PhiMoE (transformers ``PhimoeForCausalLM``, Phi-3.5-MoE): config and key map.

Mixtral's layout (``block_sparse_moe.experts.{e}.w1/w2/w3``, ``block_sparse_moe.gate``) with LayerNorms
that carry a bias, biases on the q, k, v and output projections (``attention_bias``) and on the head
(``lm_head_bias``), routed by SparseMixer (moekit's ``router='sparsemixer'``): at inference two rounds,
each taking the best remaining expert with the masked-softmax weight of ``sparsemixer`` in
modeling_phimoe.py (threshold ``router_jitter_noise``). transformers picks two experts whatever
``num_experts_per_tok`` says, so any other value is refused. Training-only settings
(``input_jitter_noise``, SparseMixer's Gumbel sampling and gradient estimator) leave the logits alone
and are not reproduced. Refused by name: ``longrope`` rope scaling (Phi-3.5-MoE's released config uses
it; moekit's rotary embeddings do not implement it) and a sliding window shorter than the context.
"""

from __future__ import annotations

from moekit.config import MoEConfig, ModelConfig
from moekit.interop.expressible import aux_loss_coef_hf
from moekit.interop.keymap import HF_LAYER, KeyMap, Rule
from moekit.interop.rope import hf_rope_parameters, rope_settings
from moekit.nn import activations

ARCHITECTURE = "PhimoeForCausalLM"


def model_config(hf: dict) -> ModelConfig:
    activations.from_hf(hf.get("hidden_act", "silu"))  # the key map loads gated SiLU experts only
    max_len = hf.get("max_position_embeddings", 4096 * 32)
    window = hf.get("sliding_window")
    if window is not None and window < max_len:
        raise ValueError(f"sliding_window={window!r} is not supported (only null or >= max_position_embeddings="
                         f"{max_len}: moekit attends to the whole context)")
    if hf.get("num_experts_per_tok", 2) != 2:
        raise ValueError(f"num_experts_per_tok={hf['num_experts_per_tok']!r} is not supported (transformers' PhiMoE "
                         "sparsemixer always picks 2 experts)")
    d = hf["hidden_size"]
    moe = MoEConfig(d_model=d, expert_hidden=hf["intermediate_size"], num_experts=hf["num_local_experts"], top_k=2,
                    router="sparsemixer", sparsemixer_eps=float(hf.get("router_jitter_noise", 0.01)),
                    normalize_weights=False, aux_loss_coef=hf.get("router_aux_loss_coef", 0.0),
                    lb_convention="hf_compat")
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"],
                       n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"),
                       head_dim=hf.get("head_dim"), max_seq_len=max_len, **rope_settings(hf, max_len),
                       norm="layernorm", norm_bias=True, norm_eps=hf.get("rms_norm_eps", 1e-5),
                       qkv_bias=bias, attn_out_bias=bias, tie_embeddings=hf.get("tie_word_embeddings", False),
                       lm_head_bias=bool(hf.get("lm_head_bias", False)), moe=moe)


L, M = HF_LAYER, f"{HF_LAYER}.block_sparse_moe"
KEYMAP = KeyMap(
    global_=[Rule("embed.weight", ["model.embed_tokens.weight"]),
             *[Rule(f"norm.{t}", [f"model.norm.{t}"]) for t in ("weight", "bias")],
             *[Rule(f"lm_head.{t}", [f"lm_head.{t}"]) for t in ("weight", "bias")]],
    per_layer=[
        *[Rule(f"layers.{{layer}}.{ours}.{t}", [f"{L}.{theirs}.{t}"]) for t in ("weight", "bias")
          for ours, theirs in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"))],
        *[Rule(f"layers.{{layer}}.attn.{p}.{t}", [f"{L}.self_attn.{p}.{t}"])
          for p in ("q_proj", "k_proj", "v_proj", "o_proj") for t in ("weight", "bias")],
        Rule("layers.{layer}.ffn.router.weight_ED", [f"{M}.gate.weight"]),
        # w1 = gate, w3 = up, w2 = down; moekit's w_in is [gate; up]
        Rule("layers.{layer}.ffn.experts.w_in",
             [f"{M}.experts.{{expert}}.w1.weight", f"{M}.experts.{{expert}}.w3.weight"], experts=True),
        Rule("layers.{layer}.ffn.experts.w_out", [f"{M}.experts.{{expert}}.w2.weight"], experts=True),
    ],
)


def hf_config(cfg: ModelConfig) -> dict:
    """transformers' PhimoeConfig fields (a plain mapping: :mod:`moekit.interop.expressible` refuses
    what does not read back through :func:`model_config`)."""
    m = cfg.moe
    if cfg.rope_scaling is not None:
        raise ValueError(f"ModelConfig.rope_scaling={cfg.rope_scaling!r} (transformers' PhiMoE takes default rope or "
                         "longrope with short/long mscales, which moekit does not implement)")
    return {
        "architectures": [ARCHITECTURE], "model_type": "phimoe", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": m.expert_hidden, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": hf_rope_parameters(cfg), "hidden_act": "silu", "sliding_window": None,
        "tie_word_embeddings": cfg.tie_embeddings, "lm_head_bias": cfg.lm_head_bias,
        # one switch for the q, k, v and output biases: a model with only some reads back with all, and is refused
        "attention_bias": cfg.qkv_bias or cfg.attn_out_bias, "attention_dropout": 0.0,
        "num_local_experts": m.num_experts, "num_experts_per_tok": 2, "router_jitter_noise": m.sparsemixer_eps,
        "input_jitter_noise": 0.0, "router_aux_loss_coef": aux_loss_coef_hf(m),
    }
