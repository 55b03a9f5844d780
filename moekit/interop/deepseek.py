"""DeepSeek-V3 (and V2 with the same layout): MLA, dense prefix, shared experts, group-limited routing."""

from __future__ import annotations

from moekit.config import MoEConfig, ModelConfig
from moekit.interop.keymap import HF_LAYER, LLAMA_GLOBAL, LLAMA_NORMS, KeyMap, Rule, swiglu_rules
from moekit.interop.rope import hf_rope_parameters, rope_settings
from moekit.nn import activations

ARCHITECTURES = ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM")
LATENT_NORM_EPS = 1e-6  # transformers' q_a_layernorm / kv_a_layernorm ignore rms_norm_eps


def model_config(hf: dict) -> ModelConfig:
    arch = hf["architectures"][0]
    activations.from_hf(hf.get("hidden_act", "silu"))  # the key map loads gated SiLU experts only
    d = hf["hidden_size"]
    if hf.get("rms_norm_eps", LATENT_NORM_EPS) != LATENT_NORM_EPS:
        raise ValueError(f"rms_norm_eps={hf['rms_norm_eps']!r} is not supported (only {LATENT_NORM_EPS}: "
                         f"transformers normalises the MLA latents with eps {LATENT_NORM_EPS} whatever it says, moekit "
                         "uses one eps for every norm)")
    if arch == "DeepseekV3ForCausalLM":
        if hf.get("scoring_func", "sigmoid") != "sigmoid":
            raise ValueError(f"scoring_func={hf['scoring_func']!r} is not supported for DeepSeek-V3 (only 'sigmoid')")
        router, group_score = "sigmoid", "top2_sum"
    else:
        method = hf.get("topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"topk_method={method!r} is not supported (greedy, group_limited_greedy)")
        router, group_score = "softmax_topk", "max"
    grouped = arch == "DeepseekV3ForCausalLM" or hf.get("topk_method") == "group_limited_greedy"
    n_group = hf.get("n_group") or 1 if grouped else 1
    moe = MoEConfig(
        d_model=d, num_experts=hf["n_routed_experts"], top_k=hf["num_experts_per_tok"],
        expert_hidden=hf["moe_intermediate_size"], router=router, group_score=group_score,
        n_group=n_group, topk_group=(hf.get("topk_group") or 1) if n_group > 1 else 1,
        normalize_weights=bool(hf.get("norm_topk_prob", False)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        num_shared_experts=hf.get("n_shared_experts") or 0, shared_expert_hidden=hf["moe_intermediate_size"],
        aux_loss_coef=hf.get("aux_loss_alpha", 0.0) if arch == "DeepseekV2ForCausalLM" else 0.0)
    if hf.get("moe_layer_freq", 1) != 1:
        # NOTE: transformers ignores it (every layer from first_k_dense_replace on is MoE), DeepSeek's
        # own modeling code makes layer i MoE when i % moe_layer_freq == 0; the two agree only at 1.
        raise ValueError(f"moe_layer_freq={hf['moe_layer_freq']!r} is not supported (only 1: transformers "
                         "ignores it, DeepSeek's own code reads it as layer % moe_layer_freq == 0)")
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
        max_seq_len=hf.get("max_position_embeddings", 4096), attention="mla", q_lora_rank=hf.get("q_lora_rank") or 0,
        kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
        **rope_settings(hf, hf.get("max_position_embeddings", 4096)),
        rope_interleave=bool(hf.get("rope_interleave", True)), norm_eps=LATENT_NORM_EPS,
        tie_embeddings=hf.get("tie_word_embeddings", False), ffn_hidden=hf["intermediate_size"],
        first_k_dense=hf.get("first_k_dense_replace", 0), moe=moe)


L = HF_LAYER
A = f"{L}.self_attn"
KEYMAP = KeyMap(
    global_=LLAMA_GLOBAL,
    per_layer=[
        *LLAMA_NORMS,
        *[Rule(f"layers.{{layer}}.attn.{ours}.weight", [f"{A}.{theirs}.weight"]) for ours, theirs in (
            ("q_a_proj", "q_a_proj"), ("q_a_norm", "q_a_layernorm"), ("q_b_proj", "q_b_proj"), ("q_proj", "q_proj"),
            ("kv_a_proj", "kv_a_proj_with_mqa"), ("kv_a_norm", "kv_a_layernorm"), ("kv_b_proj", "kv_b_proj"),
            ("o_proj", "o_proj"))],
        *swiglu_rules("layers.{layer}.ffn", f"{L}.mlp"),  # the dense prefix
        Rule("layers.{layer}.ffn.router.weight_ED", [f"{L}.mlp.gate.weight"]),
        Rule("layers.{layer}.ffn.router.expert_bias", [f"{L}.mlp.gate.e_score_correction_bias"], optional=True),
        *swiglu_rules("layers.{layer}.ffn.experts", f"{L}.mlp.experts.{{expert}}", experts=True),
        *swiglu_rules("layers.{layer}.ffn.shared", f"{L}.mlp.shared_experts"),
    ],
)


def v3_config(cfg: ModelConfig) -> dict:
    """transformers' DeepseekV3Config for a moekit MoE model with MLA (a plain mapping:
    :mod:`moekit.interop.expressible` refuses what does not read back through :func:`model_config`)."""
    m = cfg.moe
    if cfg.norm_eps != LATENT_NORM_EPS:
        raise ValueError(f"ModelConfig.norm_eps={cfg.norm_eps!r} (transformers' DeepSeek-V3 normalises the MLA "
                         f"latents with eps {LATENT_NORM_EPS} whatever rms_norm_eps says; moekit uses norm_eps for "
                         "every norm)")
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden or m.expert_hidden,
        "moe_intermediate_size": m.expert_hidden, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
        "q_lora_rank": cfg.q_lora_rank or None, "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim, "head_dim": cfg.qk_rope_head_dim, "n_routed_experts": m.num_experts,
        "num_experts_per_tok": m.top_k, "n_group": m.n_group, "topk_group": m.topk_group,
        "n_shared_experts": m.num_shared_experts,
        # the first MoE layer: a layout other than a dense prefix reads back differently and is refused
        "first_k_dense_replace": cfg.moe_layer_ids[0],
        "routed_scaling_factor": m.routed_scaling_factor, "norm_topk_prob": m.normalize_weights,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_interleave": True,
        "rope_parameters": hf_rope_parameters(cfg), "rope_scaling": None,
        "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings, "num_nextn_predict_layers": 0,
    }


EXPORT = {"DeepseekV3ForCausalLM": v3_config}
