"""GLM-4.5 / GLM-4.6 (transformers ``Glm4MoeForCausalLM``): config and key map.

Grouped-query attention with a bias on q, k and v (``attention_bias``; none on the output), an optional
per-head RMSNorm on q and k (``use_qk_norm``) and partial rotary embeddings: only the first
int(head_dim · ``partial_rotary_factor``) dims of each head rotate (0.5 in the released models). The
FFNs follow DeepSeek-V3: ``first_k_dense_replace`` dense layers of width ``intermediate_size``, then
MoE layers routed by sigmoid scores with the selection-only ``e_score_correction_bias``, group-limited
(``n_group`` / ``topk_group``, a group scored by the sum of its top-2), renormalised when
``norm_topk_prob`` and scaled by ``routed_scaling_factor``, plus an always-on shared MLP of width
``n_shared_experts`` · ``moe_intermediate_size``. The multi-token-prediction layers that released
checkpoints store after the decoder layers (``model.layers.{num_hidden_layers}...``) are skipped, as
transformers skips them: they do not enter the next-token logits.

:func:`v3_moe` and :func:`v3_moe_fields` are the DeepSeek-V3-style routing fields that dots.llm1
spells the same way.
"""

from __future__ import annotations

from moekit.config import MoEConfig, ModelConfig
from moekit.interop.keymap import HF_LAYER, LLAMA_GLOBAL, LLAMA_NORMS, KeyMap, Rule, swiglu_rules
from moekit.interop.rope import hf_rope_parameters, rope_settings
from moekit.nn import activations

ARCHITECTURE = "Glm4MoeForCausalLM"


def v3_moe(hf: dict, norm_topk_prob: bool = True) -> MoEConfig:
    """The MoEConfig of DeepSeek-V3-style routing fields (GLM-4.5, dots.llm1); ``norm_topk_prob``: the
    family's default where the config leaves it out."""
    n_group = hf.get("n_group") or 1
    shared = hf.get("n_shared_experts") or 0
    num_experts = hf["n_routed_experts"] if "n_routed_experts" in hf else hf["num_local_experts"]
    return MoEConfig(
        d_model=hf["hidden_size"], num_experts=num_experts, top_k=hf["num_experts_per_tok"],
        expert_hidden=hf["moe_intermediate_size"], router="sigmoid", group_score="top2_sum", n_group=n_group,
        topk_group=(hf.get("topk_group") or 1) if n_group > 1 else 1,
        normalize_weights=bool(hf.get("norm_topk_prob", norm_topk_prob)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        num_shared_experts=shared, shared_expert_hidden=hf["moe_intermediate_size"] if shared else None)


def v3_moe_fields(cfg: ModelConfig) -> dict:
    """The routing and layout fields :func:`v3_moe` reads, for a moekit MoE model."""
    m = cfg.moe
    shared = m.shared_hidden
    # transformers' shared MLP is n_shared_experts x moe_intermediate_size wide: a total that is not a
    # multiple of the expert width reads back differently and is refused by name
    n_shared = shared // m.expert_hidden if shared % m.expert_hidden == 0 else m.num_shared_experts
    return {
        "intermediate_size": cfg.ffn_hidden or m.expert_hidden, "moe_intermediate_size": m.expert_hidden,
        "n_routed_experts": m.num_experts, "num_experts_per_tok": m.top_k, "n_group": m.n_group,
        "topk_group": m.topk_group, "n_shared_experts": n_shared, "routed_scaling_factor": m.routed_scaling_factor,
        "norm_topk_prob": m.normalize_weights,
        # the first MoE layer: a layout other than a dense prefix reads back differently and is refused
        "first_k_dense_replace": cfg.moe_layer_ids[0],
    }


def model_config(hf: dict) -> ModelConfig:
    activations.from_hf(hf.get("hidden_act", "silu"))  # the key map loads gated SiLU experts only
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    max_len = hf.get("max_position_embeddings", 4096)
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim") or d // heads, max_seq_len=max_len,
        **rope_settings(hf, max_len, partial_rotary=True), norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", False), qkv_bias=bool(hf.get("attention_bias", False)),
        qk_norm="head" if hf.get("use_qk_norm", False) else None, ffn_hidden=hf["intermediate_size"],
        first_k_dense=hf.get("first_k_dense_replace", 1), moe=v3_moe(hf))


L = HF_LAYER
KEYMAP = KeyMap(
    global_=LLAMA_GLOBAL,
    per_layer=[
        *LLAMA_NORMS,
        *[Rule(f"layers.{{layer}}.attn.{p}.{t}", [f"{L}.self_attn.{p}.{t}"])
          for p in ("q_proj", "k_proj", "v_proj") for t in ("weight", "bias")],
        Rule("layers.{layer}.attn.o_proj.weight", [f"{L}.self_attn.o_proj.weight"]),
        Rule("layers.{layer}.attn.q_norm.weight", [f"{L}.self_attn.q_norm.weight"]),
        Rule("layers.{layer}.attn.k_norm.weight", [f"{L}.self_attn.k_norm.weight"]),
        *swiglu_rules("layers.{layer}.ffn", f"{L}.mlp"),  # the dense prefix
        Rule("layers.{layer}.ffn.router.weight_ED", [f"{L}.mlp.gate.weight"]),
        Rule("layers.{layer}.ffn.router.expert_bias", [f"{L}.mlp.gate.e_score_correction_bias"], optional=True),
        *swiglu_rules("layers.{layer}.ffn.experts", f"{L}.mlp.experts.{{expert}}", experts=True),
        *swiglu_rules("layers.{layer}.ffn.shared", f"{L}.mlp.shared_experts"),
    ],
    skip_layers_after=True,
)


def hf_config(cfg: ModelConfig) -> dict:
    """transformers' Glm4MoeConfig fields (a plain mapping: :mod:`moekit.interop.expressible` refuses
    what does not read back through :func:`model_config`)."""
    return {
        "architectures": [ARCHITECTURE], "model_type": "glm4_moe", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_parameters": hf_rope_parameters(cfg, partial_rotary=True),
        "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": cfg.qkv_bias,
        "attention_dropout": 0.0, "use_qk_norm": cfg.qk_norm is not None, "num_nextn_predict_layers": 0,
        **v3_moe_fields(cfg),
    }
