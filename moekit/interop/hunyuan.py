"""Hunyuan MoE V1 (transformers ``HunYuanMoEV1ForCausalLM``, Hunyuan-A13B): config and key map.

Every layer is MoE: a softmax router (``mlp.gate.wg``) over ``num_experts``, top ``moe_topk``,
renormalised, experts of width ``intermediate_size``, plus an always-on ``shared_mlp`` of the same
width. Attention normalises each q and k head with an RMSNorm *after* the rotary embedding
(``query_layernorm`` / ``key_layernorm``; moekit's ``qk_norm_after_rope``); ``attention_bias`` puts
a bias on q, k, v and the output. Rotary NTK-alpha scaling (``rope_type`` "dynamic" with ``alpha``, as
Hunyuan-A13B is released) only stretches the base: it reads as rope_theta · alpha^(head_dim / (head_dim - 2)).

transformers reads none of the released config's ``moe_intermediate_size``, ``num_shared_expert``,
``use_mixed_mlp_moe``, ``use_qk_norm`` and ``use_cla`` and computes as above; moekit follows it, and
refuses by name a config whose values there say otherwise (a different expert or shared width, no
shared MLP, no QK norm, cross-layer attention), and per-layer expert counts or top-k that differ.
"""

from __future__ import annotations

from moekit.config import MoEConfig, ModelConfig
from moekit.interop.expressible import aux_loss_coef_hf
from moekit.interop.keymap import HF_LAYER, LLAMA_GLOBAL, LLAMA_NORMS, KeyMap, Rule, swiglu_rules
from moekit.interop.rope import hf_rope_parameters, rope_settings
from moekit.nn import activations

ARCHITECTURE = "HunYuanMoEV1ForCausalLM"


def _one(hf: dict, key: str):
    """An int, or a per-layer list whose entries all agree."""
    value = hf[key]
    if isinstance(value, list):
        if not value or any(v != value[0] for v in value):
            raise ValueError(f"{key}={value!r} is not supported (per-layer values must all be equal: moekit's MoE "
                             "layers share one shape)")
        value = value[0]
    return value


def _check_ignored(hf: dict, width: int) -> None:
    """The released config's fields that transformers ignores, when they ask for something else."""
    expected = {"moe_intermediate_size": width, "num_shared_expert": 1, "use_mixed_mlp_moe": True,
                "use_qk_norm": True, "use_cla": False}
    for key, want in expected.items():
        if key not in hf:
            continue
        value = hf[key]
        values = value if isinstance(value, list) else [value]
        if any(v != want for v in values):
            raise ValueError(f"{key}={value!r} is not supported (only {want!r}: transformers' HunYuanMoEV1 ignores it "
                             f"and computes as if it were {want!r}; moekit follows transformers)")


def _rope(hf: dict, head_dim: int, max_len: int) -> dict:
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    kind = params.get("rope_type") or params.get("type")
    if kind == "dynamic" and params.get("alpha"):
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        return {"rope_theta": theta * float(params["alpha"]) ** (head_dim / (head_dim - 2)), "rope_scaling": None}
    return rope_settings(hf, max_len)


def model_config(hf: dict) -> ModelConfig:
    activations.from_hf(hf.get("hidden_act", "silu"))  # the key map loads gated SiLU experts only
    d, heads, width = hf["hidden_size"], hf["num_attention_heads"], hf["intermediate_size"]
    _check_ignored(hf, width)
    head_dim = hf.get("head_dim") or d // heads
    max_len = hf.get("max_position_embeddings", 2048)
    moe = MoEConfig(d_model=d, num_experts=_one(hf, "num_experts"), top_k=_one(hf, "moe_topk"), expert_hidden=width,
                    normalize_weights=True, aux_loss_coef=hf.get("router_aux_loss_coef", 0.0),
                    lb_convention="hf_compat", num_shared_experts=1, shared_expert_hidden=width)
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads"), head_dim=head_dim, max_seq_len=max_len,
        **_rope(hf, head_dim, max_len), norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", False), qkv_bias=bias, attn_out_bias=bias, qk_norm="head",
        qk_norm_after_rope=True, moe=moe)


L = HF_LAYER
KEYMAP = KeyMap(
    global_=LLAMA_GLOBAL,
    per_layer=[
        *LLAMA_NORMS,
        *[Rule(f"layers.{{layer}}.attn.{p}.{t}", [f"{L}.self_attn.{p}.{t}"])
          for p in ("q_proj", "k_proj", "v_proj", "o_proj") for t in ("weight", "bias")],
        Rule("layers.{layer}.attn.q_norm.weight", [f"{L}.self_attn.query_layernorm.weight"]),
        Rule("layers.{layer}.attn.k_norm.weight", [f"{L}.self_attn.key_layernorm.weight"]),
        Rule("layers.{layer}.ffn.router.weight_ED", [f"{L}.mlp.gate.wg.weight"]),
        *swiglu_rules("layers.{layer}.ffn.experts", f"{L}.mlp.experts.{{expert}}", experts=True),
        *swiglu_rules("layers.{layer}.ffn.shared", f"{L}.mlp.shared_mlp"),
    ],
)


def hf_config(cfg: ModelConfig) -> dict:
    """transformers' HunYuanMoEV1Config fields (a plain mapping: :mod:`moekit.interop.expressible`
    refuses what does not read back through :func:`model_config`)."""
    m = cfg.moe
    return {
        "architectures": [ARCHITECTURE], "model_type": "hunyuan_v1_moe", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": m.expert_hidden, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": hf_rope_parameters(cfg), "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings,
        # one switch for the q, k, v and output biases: a model with only some reads back with all, and is refused
        "attention_bias": cfg.qkv_bias or cfg.attn_out_bias, "attention_dropout": 0.0,
        "num_experts": m.num_experts, "moe_topk": m.top_k, "router_aux_loss_coef": aux_loss_coef_hf(m),
        "pad_token_id": None, "bos_token_id": None, "eos_token_id": None, "eod_token_id": None, "sep_token_id": None,
    }
