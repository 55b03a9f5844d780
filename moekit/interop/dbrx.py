"""DBRX (transformers ``DbrxForCausalLM``): config and key map.

DBRX differs from the Llama-style families in its layout more than its maths: one fused ``Wqkv``
projection (clamped to ±clip_qkv), LayerNorm without bias, and every expert of a layer stored in
three [E·F, D] tensors (``w1`` gate, ``v1`` up, ``w2`` down used as ``h @ w2``, i.e. transposed).
The router renormalises the top-k softmax weights by their p-norm (``moe_normalize_expert_weights``).
"""

from __future__ import annotations

import warnings

from moekit.config import MoEConfig, ModelConfig
from moekit.interop.keymap import KeyMap, Rule, Split
from moekit.interop.expressible import aux_loss_coef_hf
from moekit.interop.rope import hf_rope_parameters, rope_settings
from moekit.nn import activations

ARCHITECTURE = "DbrxForCausalLM"


def model_config(hf: dict) -> ModelConfig:
    attn, ffn = hf.get("attn_config") or {}, hf.get("ffn_config") or {}
    activations.from_hf((ffn.get("ffn_act_fn") or {"name": "silu"}).get("name", "silu"), "ffn_config.ffn_act_fn.name")
    if ffn.get("moe_jitter_eps"):
        warnings.warn(f"DBRX ffn_config.moe_jitter_eps={ffn['moe_jitter_eps']} (training-time input jitter) is "
                      "not reproduced; logits are unaffected", stacklevel=3)
    p = ffn.get("moe_normalize_expert_weights", 1.0)
    d = hf["d_model"]
    moe = MoEConfig(d_model=d, expert_hidden=ffn.get("ffn_hidden_size", 3584),
                    num_experts=ffn.get("moe_num_experts", 4),
                    top_k=ffn.get("moe_top_k", 1), normalize_weights=p is not None,
                    normalize_p=float(p) if p is not None else 1.0,
                    aux_loss_coef=ffn.get("moe_loss_weight", 0.01), lb_convention="hf_compat")
    if "rope_theta" in attn and not hf.get("rope_parameters"):
        hf = {**hf, "rope_theta": attn["rope_theta"]}
    return ModelConfig(vocab_size=hf.get("vocab_size", 32000), d_model=d, n_layers=hf.get("n_layers", 24),
                       n_heads=hf.get("n_heads", 16), n_kv_heads=attn.get("kv_n_heads", 1),
                       max_seq_len=hf.get("max_seq_len", 2048), **rope_settings(hf, hf.get("max_seq_len", 2048)),
                       norm="layernorm", norm_eps=1e-5, clip_qkv=attn.get("clip_qkv") or 0.0, tie_embeddings=False,
                       moe=moe)


B = "transformer.blocks.{layer}"
N = f"{B}.norm_attn_norm"
KEYMAP = KeyMap(
    global_=[Rule("embed.weight", ["transformer.wte.weight"]), Rule("norm.weight", ["transformer.norm_f.weight"]),
             Rule("lm_head.weight", ["lm_head.weight"])],
    per_layer=[
        Rule("layers.{layer}.attn_norm.weight", [f"{N}.norm_1.weight"]),
        Rule("layers.{layer}.ffn_norm.weight", [f"{N}.norm_2.weight"]),
        Split(["layers.{layer}.attn.q_proj.weight", "layers.{layer}.attn.k_proj.weight",
               "layers.{layer}.attn.v_proj.weight"], f"{N}.attn.Wqkv.weight"),
        Rule("layers.{layer}.attn.o_proj.weight", [f"{N}.attn.out_proj.weight"]),
        Rule("layers.{layer}.ffn.router.weight_ED", [f"{B}.ffn.router.layer.weight"]),
        Rule("layers.{layer}.ffn.experts.w_in", [f"{B}.ffn.experts.mlp.w1", f"{B}.ffn.experts.mlp.v1"],
             experts=True, stacked=True),
        Rule("layers.{layer}.ffn.experts.w_out", [f"{B}.ffn.experts.mlp.w2"], experts=True, stacked=True,
             transpose=True),
    ],
)


def hf_config(cfg: ModelConfig) -> dict:
    """transformers' DbrxConfig fields for a moekit MoE model with GQA attention (a plain mapping;
    :mod:`moekit.interop.expressible` refuses what does not read back through :func:`model_config`)."""
    m = cfg.moe
    if not cfg.clip_qkv:
        # NOTE: DBRX without a clamp is clip_qkv=null, and transformers' DbrxAttention then calls
        # clamp(min=None, max=None), which raises; 0 would clamp q, k and v to zero.
        raise ValueError(f"ModelConfig.clip_qkv={cfg.clip_qkv!r} (transformers' DBRX attention runs only with "
                         "a clamp: clip_qkv > 0)")
    return {
        "architectures": [ARCHITECTURE], "model_type": "dbrx", "vocab_size": cfg.vocab_size, "d_model": cfg.d_model,
        "n_heads": cfg.n_heads, "n_layers": cfg.n_layers, "max_seq_len": cfg.max_seq_len, "tie_word_embeddings": False,
        "rope_parameters": hf_rope_parameters(cfg),
        "attn_config": {"kv_n_heads": cfg.n_kv_heads, "clip_qkv": cfg.clip_qkv, "attn_pdrop": 0.0,
                        "rope_theta": cfg.rope_theta},  # transformers reads it here too
        "ffn_config": {"ffn_hidden_size": m.expert_hidden, "moe_num_experts": m.num_experts, "moe_top_k": m.top_k,
                       "moe_normalize_expert_weights": m.normalize_p if m.normalize_weights else None,
                       "moe_loss_weight": aux_loss_coef_hf(m), "ffn_act_fn": {"name": "silu"}},
    }
