"""The ``mlp.experts.{e}.{gate,up,down}_proj`` family: Qwen2-MoE (Qwen1.5-MoE), Qwen3-MoE and OLMoE."""

from __future__ import annotations

from moekit.config import MoEConfig, ModelConfig, moe_layer_indices
from moekit.interop.keymap import HF_LAYER, LLAMA_GLOBAL, LLAMA_NORMS, KeyMap, Rule, swiglu_rules
from moekit.interop.expressible import aux_loss_coef_hf
from moekit.interop.rope import hf_rope_parameters, rope_settings
from moekit.nn import activations

ARCHITECTURES = ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM")


def _qwen_layout(hf: dict) -> dict:
    """ModelConfig's layout fields for Qwen2/3-MoE. transformers makes layer i MoE when i is not in
    ``mlp_only_layers`` and (i + 1) % ``decoder_sparse_step`` == 0 (modeling_qwen2_moe.py,
    modeling_qwen3_moe.py); the other layers are dense MLPs of width ``intermediate_size``."""
    step = hf.get("decoder_sparse_step") or 1
    only = hf.get("mlp_only_layers") or []
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"decoder_sparse_step={step!r} is not supported (expected an int >= 1)")
    if not isinstance(only, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in only):
        raise ValueError(f"mlp_only_layers={only!r} is not supported (expected a list of layer indices)")
    if sorted(only) == list(range(len(only))):  # a dense prefix: the shortcut fields
        return {"first_k_dense": len(only), "moe_every": step}
    layers = moe_layer_indices(hf["num_hidden_layers"], every=step, dense=only)
    if not layers:
        raise ValueError(f"mlp_only_layers={only} with decoder_sparse_step={step} leaves no MoE layer")
    return {"moe_layers": layers}


def model_config(hf: dict) -> ModelConfig:
    arch = hf["architectures"][0]
    activations.from_hf(hf.get("hidden_act", "silu"))  # the key map loads gated SiLU experts only
    if hf.get("clip_qkv") is not None:
        raise ValueError(f"clip_qkv={hf['clip_qkv']!r} is not supported for {arch} (only null)")
    if hf.get("sliding_window") and hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is not supported")
    d = hf["hidden_size"]
    qwen = arch != "OlmoeForCausalLM"
    head_dim = hf.get("head_dim")
    if not qwen and head_dim not in (None, d // hf["num_attention_heads"]):
        # transformers' OLMoE sizes its q/k norms by hidden_size whatever head_dim says
        raise ValueError(f"head_dim={head_dim!r} is not supported for {arch} (only hidden_size / "
                         f"num_attention_heads = {d // hf['num_attention_heads']})")
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
        n_kv_heads=hf.get("num_key_value_heads"), head_dim=head_dim,
        max_seq_len=hf.get("max_position_embeddings", 4096),
        **rope_settings(hf, hf.get("max_position_embeddings", 4096)),
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
        qkv_bias=arch == "Qwen2MoeForCausalLM" or bool(hf.get("attention_bias", False)),
        qk_norm={"Qwen3MoeForCausalLM": "head", "OlmoeForCausalLM": "full"}.get(arch),
        ffn_hidden=hf.get("intermediate_size", 0) if qwen else 0, **(_qwen_layout(hf) if qwen else {}), moe=moe)


def _proj(src: str, dst: str, bias: bool = False) -> list[Rule]:
    rules = [Rule(f"{dst}.weight", [f"{src}.weight"])]
    return rules + ([Rule(f"{dst}.bias", [f"{src}.bias"])] if bias else [])


L = HF_LAYER
KEYMAP = KeyMap(
    global_=LLAMA_GLOBAL,
    per_layer=[
        *LLAMA_NORMS,
        *[r for p in ("q_proj", "k_proj", "v_proj") for r in _proj(f"{L}.self_attn.{p}", f"layers.{{layer}}.attn.{p}",
                                                                   bias=True)],
        Rule("layers.{layer}.attn.o_proj.weight", [f"{L}.self_attn.o_proj.weight"]),
        Rule("layers.{layer}.attn.q_norm.weight", [f"{L}.self_attn.q_norm.weight"]),
        Rule("layers.{layer}.attn.k_norm.weight", [f"{L}.self_attn.k_norm.weight"]),
        *swiglu_rules("layers.{layer}.ffn", f"{L}.mlp"),  # dense layers
        Rule("layers.{layer}.ffn.router.weight_ED", [f"{L}.mlp.gate.weight"]),
        *swiglu_rules("layers.{layer}.ffn.experts", f"{L}.mlp.experts.{{expert}}", experts=True),
        *swiglu_rules("layers.{layer}.ffn.shared", f"{L}.mlp.shared_expert"),
        Rule("layers.{layer}.ffn.shared_gate.weight", [f"{L}.mlp.shared_expert_gate.weight"]),
    ],
)


def _common(cfg: ModelConfig, arch: str, model_type: str) -> dict:
    """The fields the three families share (a plain mapping: :mod:`moekit.interop.expressible` refuses
    what does not read back through :func:`model_config`)."""
    m = cfg.moe
    return {
        "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": hf_rope_parameters(cfg), "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings, "num_experts": m.num_experts, "num_local_experts": m.num_experts,
        "num_experts_per_tok": m.top_k, "norm_topk_prob": m.normalize_weights,
        "router_aux_loss_coef": aux_loss_coef_hf(m),
    }


def _qwen_layers(cfg: ModelConfig) -> dict:
    if cfg.moe_layers is None:  # the shortcut fields, which transformers spells the same way
        step, dense = cfg.moe_every, list(range(cfg.first_k_dense))
    else:
        step, dense = 1, [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)]
    return {"moe_intermediate_size": cfg.moe.expert_hidden,
            "intermediate_size": cfg.ffn_hidden or cfg.moe.expert_hidden,
            "decoder_sparse_step": step, "mlp_only_layers": dense, "use_sliding_window": False}


def qwen3_config(cfg: ModelConfig) -> dict:
    return {**_common(cfg, "Qwen3MoeForCausalLM", "qwen3_moe"), **_qwen_layers(cfg), "attention_bias": False}


def qwen2_config(cfg: ModelConfig) -> dict:
    if not cfg.moe.shared_hidden:
        raise ValueError(f"MoEConfig.num_shared_experts={cfg.moe.num_shared_experts} (Qwen2-MoE always runs a gated "
                         "shared expert; Qwen3-MoE and OLMoE have none)")
    return {**_common(cfg, "Qwen2MoeForCausalLM", "qwen2_moe"), **_qwen_layers(cfg),
            "shared_expert_intermediate_size": cfg.moe.shared_hidden, "qkv_bias": True}


def olmoe_config(cfg: ModelConfig) -> dict:
    hf = {**_common(cfg, "OlmoeForCausalLM", "olmoe"), "intermediate_size": cfg.moe.expert_hidden,
          "clip_qkv": None, "attention_bias": False}
    del hf["head_dim"]  # OLMoE's q/k norms span hidden_size: its head_dim is hidden_size / heads
    return hf


EXPORT = {"Qwen3MoeForCausalLM": qwen3_config, "Qwen2MoeForCausalLM": qwen2_config, "OlmoeForCausalLM": olmoe_config}
