"""The ``mlp.experts.{e}.{gate,up,down}_proj`` family: Qwen2-MoE (Qwen1.5-MoE), Qwen3-MoE and OLMoE."""

from __future__ import annotations

from moekit.config import MoEConfig, ModelConfig
from moekit.interop.keymap import KeyMap, Rule
from moekit.interop.mixtral import rope_theta

ARCHITECTURES = ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM")


def _first_k_dense(hf: dict) -> int:
    only = sorted(hf.get("mlp_only_layers") or [])
    if only != list(range(len(only))):
        raise ValueError(f"mlp_only_layers={only} is not supported: only a prefix of dense layers (0, 1, …, k-1)")
    return len(only)


def model_config(hf: dict) -> ModelConfig:
    arch = hf["architectures"][0]
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
    if hf.get("clip_qkv") is not None:
        raise ValueError(f"clip_qkv={hf['clip_qkv']!r} is not supported for {arch} (only null)")
    if hf.get("sliding_window") and hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is not supported")
    d = hf["hidden_size"]
    qwen = arch != "OlmoeForCausalLM"
    shared = hf.get("shared_expert_intermediate_size", 0) if arch == "Qwen2MoeForCausalLM" else 0
    num_experts = hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]  # v4 / v5 config name
    moe = MoEConfig(d_model=d, num_experts=num_experts, top_k=hf["num_experts_per_tok"],
                    expert_hidden=hf["moe_intermediate_size"] if qwen else hf["intermediate_size"],
                    normalize_weights=bool(hf.get("norm_topk_prob", False)),
                    aux_loss_coef=hf.get("router_aux_loss_coef", 0.0), lb_convention="hf_compat",
                    num_shared_experts=1 if shared else 0, shared_expert_hidden=shared or None,
                    shared_expert_gate=bool(shared))
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"),
        max_seq_len=hf.get("max_position_embeddings", 4096), rope_theta=rope_theta(hf),
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
        qkv_bias=arch == "Qwen2MoeForCausalLM" or bool(hf.get("attention_bias", False)),
        qk_norm={"Qwen3MoeForCausalLM": "head", "OlmoeForCausalLM": "full"}.get(arch),
        ffn_hidden=hf.get("intermediate_size", 0) if qwen else 0,
        moe_every=(hf.get("decoder_sparse_step") or 1) if qwen else 1,
        first_k_dense=_first_k_dense(hf) if qwen else 0, moe=moe)


def _proj(src: str, dst: str, bias: bool = False) -> list[Rule]:
    rules = [Rule(f"{dst}.weight", [f"{src}.weight"])]
    return rules + ([Rule(f"{dst}.bias", [f"{src}.bias"])] if bias else [])


L = "model.layers.{layer}"
KEYMAP = KeyMap(
    global_=[Rule("embed.weight", ["model.embed_tokens.weight"]), Rule("norm.weight", ["model.norm.weight"]),
             Rule("lm_head.weight", ["lm_head.weight"])],
    per_layer=[
        Rule("layers.{layer}.attn_norm.weight", [f"{L}.input_layernorm.weight"]),
        Rule("layers.{layer}.ffn_norm.weight", [f"{L}.post_attention_layernorm.weight"]),
        *[r for p in ("q_proj", "k_proj", "v_proj") for r in _proj(f"{L}.self_attn.{p}", f"layers.{{layer}}.attn.{p}",
                                                                   bias=True)],
        Rule("layers.{layer}.attn.o_proj.weight", [f"{L}.self_attn.o_proj.weight"]),
        Rule("layers.{layer}.attn.q_norm.weight", [f"{L}.self_attn.q_norm.weight"]),
        Rule("layers.{layer}.attn.k_norm.weight", [f"{L}.self_attn.k_norm.weight"]),
        # dense layers
        Rule("layers.{layer}.ffn.in_proj.weight", [f"{L}.mlp.gate_proj.weight", f"{L}.mlp.up_proj.weight"]),
        Rule("layers.{layer}.ffn.down_proj.weight", [f"{L}.mlp.down_proj.weight"]),
        # MoE layers
        Rule("layers.{layer}.ffn.router.weight_ED", [f"{L}.mlp.gate.weight"]),
        Rule("layers.{layer}.ffn.experts.w_in", [f"{L}.mlp.experts.{{expert}}.gate_proj.weight",
                                                 f"{L}.mlp.experts.{{expert}}.up_proj.weight"], experts=True),
        Rule("layers.{layer}.ffn.experts.w_out", [f"{L}.mlp.experts.{{expert}}.down_proj.weight"], experts=True),
        Rule("layers.{layer}.ffn.shared.in_proj.weight", [f"{L}.mlp.shared_expert.gate_proj.weight",
                                                          f"{L}.mlp.shared_expert.up_proj.weight"]),
        Rule("layers.{layer}.ffn.shared.down_proj.weight", [f"{L}.mlp.shared_expert.down_proj.weight"]),
        Rule("layers.{layer}.ffn.shared_gate.weight", [f"{L}.mlp.shared_expert_gate.weight"]),
    ],
)
