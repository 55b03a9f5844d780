"""ERNIE 4.5 MoE (transformers ``Ernie4_5_MoeForCausalLM``): config and key map.

Grouped-query attention with rotary embeddings on interleaved pairs (moekit's ``rope_interleave``).
Layer i is MoE when ``moe_layer_start_index`` <= i <= ``moe_layer_end_index`` (-1: the last layer) and
(i + 1) % ``moe_layer_interval`` == 0; the others are dense MLPs of width ``intermediate_size``. The
router takes an fp32 softmax over all ``moe_num_experts``, picks the top ``moe_k`` of the probabilities
plus the selection-only ``e_score_correction_bias`` (stored [1, E] under ``mlp.moe_statics``) and
divides the chosen probabilities by their sum clamped to at least ``moe_norm_min``; an always-on shared
MLP of width ``moe_num_shared_experts`` · ``moe_intermediate_size`` is added. The multi-token-prediction
weights (keys containing ``mtp``) are skipped, as transformers skips them.

Refused by name: ``use_bias`` (biases on the dense and shared MLPs, which moekit's MLPs do not carry)
and a ``moe_norm_min`` above 1e-6: moekit divides by the plain sum, equal to the clamped one whenever the
chosen experts hold at least ``moe_norm_min`` of the probability (the released 1e-12: practically
always).
"""

from __future__ import annotations

from moekit.config import MoEConfig, ModelConfig, moe_layer_indices
from moekit.interop.expressible import aux_loss_coef_hf
from moekit.interop.keymap import HF_LAYER, LLAMA_GLOBAL, LLAMA_NORMS, KeyMap, Rule, swiglu_rules
from moekit.interop.rope import hf_rope_parameters, rope_settings
from moekit.nn import activations

ARCHITECTURE = "Ernie4_5_MoeForCausalLM"
NORM_MIN_LIMIT = 1e-6


def _layout(hf: dict) -> dict:
    """ModelConfig's layout fields for ERNIE's start / end (inclusive) / interval rule."""
    n = hf["num_hidden_layers"]
    start, end = hf.get("moe_layer_start_index", 1), hf.get("moe_layer_end_index", -1)
    every = hf.get("moe_layer_interval", 1)
    for name, value in (("moe_layer_start_index", start), ("moe_layer_end_index", end), ("moe_layer_interval", every)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}={value!r} is not supported (expected an int)")
    end = n - 1 if end == -1 else end
    if start < 0 or every < 1 or end < 0:
        raise ValueError(f"moe_layer_start_index={start}, moe_layer_end_index={end}, moe_layer_interval={every} is not "
                         "supported (expected start >= 0, end >= 0 or -1, interval >= 1)")
    if end >= n - 1:  # moekit's own rule: i >= first_k_dense and (i + 1) % moe_every == 0
        return {"first_k_dense": min(start, n), "moe_every": every}
    layers = moe_layer_indices(n, start=start, stop=end + 1, every=every)
    if not layers:
        raise ValueError(f"moe_layer_start_index={start}, moe_layer_end_index={end}, moe_layer_interval={every} "
                         f"leave no MoE layer among {n}")
    return {"moe_layers": layers}


def model_config(hf: dict) -> ModelConfig:
    activations.from_hf(hf.get("hidden_act", "silu"))  # the key map loads gated SiLU experts only
    if hf.get("use_bias", False):
        raise ValueError("use_bias=true is not supported (it puts biases on the dense and shared MLPs and the head, "
                         "which moekit's MLPs do not carry)")
    norm_min = hf.get("moe_norm_min", 1e-12)
    if not isinstance(norm_min, (int, float)) or not 0 <= norm_min <= NORM_MIN_LIMIT:
        raise ValueError(f"moe_norm_min={norm_min!r} is not supported (only 0 .. {NORM_MIN_LIMIT}: moekit divides the "
                         "chosen probabilities by their plain sum, which a larger clamp would change)")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    shared = hf.get("moe_num_shared_experts") or 0
    moe = MoEConfig(d_model=d, num_experts=hf["moe_num_experts"], top_k=hf["moe_k"],
                    expert_hidden=hf["moe_intermediate_size"], normalize_weights=True,
                    aux_loss_coef=hf.get("router_aux_loss_coef", 0.0), lb_convention="hf_compat",
                    num_shared_experts=shared, shared_expert_hidden=hf["moe_intermediate_size"] if shared else None)
    max_len = hf.get("max_position_embeddings", 131072)
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim") or d // heads, max_seq_len=max_len,
        **rope_settings(hf, max_len), rope_interleave=True, norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", True), ffn_hidden=hf["intermediate_size"], **_layout(hf),
        moe=moe)


L = HF_LAYER
KEYMAP = KeyMap(
    global_=LLAMA_GLOBAL,
    per_layer=[
        *LLAMA_NORMS,
        *[Rule(f"layers.{{layer}}.attn.{p}.weight", [f"{L}.self_attn.{p}.weight"])
          for p in ("q_proj", "k_proj", "v_proj", "o_proj")],
        *swiglu_rules("layers.{layer}.ffn", f"{L}.mlp"),  # dense layers
        Rule("layers.{layer}.ffn.router.weight_ED", [f"{L}.mlp.gate.weight"]),
        Rule("layers.{layer}.ffn.router.expert_bias", [f"{L}.mlp.moe_statics.e_score_correction_bias"],
             optional=True, leading_one=True),
        *swiglu_rules("layers.{layer}.ffn.experts", f"{L}.mlp.experts.{{expert}}", experts=True),
        *swiglu_rules("layers.{layer}.ffn.shared", f"{L}.mlp.shared_experts"),
    ],
    skip_containing=("mtp",),
)


def _hf_layout(cfg: ModelConfig) -> dict:
    """start / end / interval spelling the model's MoE layers, when one does (else the nearest, which
    reads back differently and is refused by name)."""
    ids = cfg.moe_layer_ids
    start, end = ids[0], ids[-1]
    for every in range(1, cfg.n_layers + 1):
        if moe_layer_indices(cfg.n_layers, start=start, stop=end + 1, every=every) == ids:
            return {"moe_layer_start_index": start, "moe_layer_end_index": end, "moe_layer_interval": every}
    return {"moe_layer_start_index": start, "moe_layer_end_index": end, "moe_layer_interval": 1}


def hf_config(cfg: ModelConfig) -> dict:
    """transformers' Ernie4_5_MoeConfig fields (a plain mapping: :mod:`moekit.interop.expressible`
    refuses what does not read back through :func:`model_config`)."""
    m = cfg.moe
    shared = m.shared_hidden
    n_shared = shared // m.expert_hidden if shared % m.expert_hidden == 0 else m.num_shared_experts
    return {
        "architectures": [ARCHITECTURE], "model_type": "ernie4_5_moe", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_parameters": hf_rope_parameters(cfg), "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings, "use_bias": False,
        "intermediate_size": cfg.ffn_hidden or m.expert_hidden, "moe_intermediate_size": m.expert_hidden,
        "moe_num_experts": m.num_experts, "moe_k": m.top_k, "moe_num_shared_experts": n_shared,
        "moe_norm_min": 1e-12, "router_aux_loss_coef": aux_loss_coef_hf(m), **_hf_layout(cfg),
        "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
    }
