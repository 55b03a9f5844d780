"""What a Hugging Face family can express, checked field by field.

An export must reproduce the model's logits in transformers or be refused by name. The check is
one walk over every field of :class:`ModelConfig` and :class:`MoEConfig`: the family's exporter
writes its config, the family's own importer reads it back, and each field must come back equal,
or be one of the fields listed in ``MODEL_FIELDS`` / ``MOE_FIELDS`` under a condition that says why
a different value leaves the eval forward unchanged (training-only settings, equivalent spellings).
A field nobody listed is compared strictly, so a new field that a family cannot carry is refused
rather than dropped. The parity tests in tests/test_export.py check that whatever passes matches
transformers.

The fields that differ but are harmless form the *delta*, written under config.json's ``"moekit"``
key (transformers keeps unknown keys and ignores them) and applied again by ``from_pretrained``, so
moekit -> HF -> moekit restores the same ModelConfig exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from moekit.config import MoEConfig, ModelConfig

Harmless = Callable[[ModelConfig, ModelConfig], bool]


def _always(a: ModelConfig, b: ModelConfig) -> bool:
    """Does not enter the eval forward (a training setting or an initialisation)."""
    return True


def _has_dense(cfg: ModelConfig) -> bool:
    return cfg.moe is None or cfg.parallel_residual_mlp or any(not cfg.is_moe_layer(i) for i in range(cfg.n_layers))


def _no_dense_ffn(a: ModelConfig, b: ModelConfig) -> bool:
    """The dense FFN's width and activation matter only where a layer has a dense FFN."""
    return not _has_dense(a) and not _has_dense(b)


def _same_moe_layers(a: ModelConfig, b: ModelConfig) -> bool:
    """moe_every, first_k_dense and moe_layers only decide which layers are MoE."""
    return a.n_layers == b.n_layers and all(a.is_moe_layer(i) == b.is_moe_layer(i) for i in range(a.n_layers))


def _both(attention: str) -> Harmless:
    def unused(a: ModelConfig, b: ModelConfig) -> bool:
        return a.attention == b.attention == attention
    unused.__doc__ = f"unused by attention={attention!r}"
    return unused


def _dropless_in_eval(a: ModelConfig, b: ModelConfig) -> bool:
    """Capacity settings act in eval only when they give a capacity there (then they are refused)."""
    return a.moe.capacity(1, training=False) is None and b.moe.capacity(1, training=False) is None


def _renormalised_by_sum(a: ModelConfig, b: ModelConfig) -> bool:
    """A softmax over the chosen logits equals the softmax over all, renormalised over the chosen."""
    return all(m.normalize_weights and m.normalize_p == 1 and m.router == "softmax_topk" for m in (a.moe, b.moe))


def _same_shared_width(a: ModelConfig, b: ModelConfig) -> bool:
    """The shared experts run as one MLP of width shared_hidden: only the total matters."""
    return a.moe.shared_hidden == b.moe.shared_hidden


def _no_groups(a: ModelConfig, b: ModelConfig) -> bool:
    return a.moe.n_group == b.moe.n_group == 1


def _no_sparsemixer(a: ModelConfig, b: ModelConfig) -> bool:
    """The threshold acts only in router='sparsemixer'."""
    return "sparsemixer" not in (a.moe.router, b.moe.router)


def _same_logit_scale(a: ModelConfig, b: ModelConfig) -> bool:
    """Granite divides by logits_scaling = 1 / logit_multiplier: the inverse of an inverse may differ
    in the last bit."""
    return math.isclose(a.logit_multiplier, b.logit_multiplier, rel_tol=1e-12)


def _same_attention_scale(a: ModelConfig, b: ModelConfig) -> bool:
    """attention_multiplier=None is 1/sqrt(head_dim), which a family with an explicit scale writes out."""
    def scale(c: ModelConfig) -> float:
        return c.attention_multiplier if c.attention_multiplier is not None else 1.0 / math.sqrt(c.head_dim)
    return a.attention == b.attention == "gqa" and math.isclose(scale(a), scale(b), rel_tol=1e-12)


def _same_rope_dims(a: ModelConfig, b: ModelConfig) -> bool:
    """Only the number of rotary dims it gives, int(head_dim · factor), enters the forward."""
    return a.rope_dims == b.rope_dims


def _no_top_p(a: ModelConfig, b: ModelConfig) -> bool:
    """The threshold acts only in router='top_p'."""
    return "top_p" not in (a.moe.router, b.moe.router)


def _no_null_experts(a: ModelConfig, b: ModelConfig) -> bool:
    """What a null expert returns matters only where there are null experts."""
    return a.moe.num_null_experts == b.moe.num_null_experts == 0


# Fields whose value may differ from what the family reads back, and when that is harmless. Every
# other field is part of the forward and must read back equal.
MODEL_FIELDS: dict[str, Harmless] = {
    "init_std": _always,
    "ffn_hidden": _no_dense_ffn,
    "activation": _no_dense_ffn,
    "moe_every": _same_moe_layers,
    "first_k_dense": _same_moe_layers,
    "moe_layers": _same_moe_layers,
    "logit_multiplier": _same_logit_scale,
    "attention_multiplier": _same_attention_scale,
    "partial_rotary_factor": _same_rope_dims,
    **{f: _both("mla") for f in ("n_kv_heads", "head_dim", "qkv_bias")},
    **{f: _both("gqa") for f in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")},
}
MOE_FIELDS: dict[str, Harmless] = {
    **{f: _always for f in ("aux_loss_coef", "lb_convention", "z_loss_coef", "seq_aux_loss_coef", "bias_update_rate",
                            "router_jitter", "init_std", "router_entropy_coef",
                            "relu_l1_init", "relu_l1_growth")},
    "top_p_threshold": _no_top_p,
    "null_expert": _no_null_experts,
    **{f: _dropless_in_eval for f in ("capacity_factor", "eval_capacity_factor", "drop_policy")},
    "softmax_order": _renormalised_by_sum,
    "sparsemixer_eps": _no_sparsemixer,
    "num_shared_experts": _same_shared_width,
    "shared_expert_hidden": _same_shared_width,
    "group_score": _no_groups,
    "topk_group": _no_groups,
}

# Why a value cannot be expressed, where "it reads back as X" is not explanation enough.
_REASONS = {
    "capacity_factor": "transformers' MoE layers are dropless, and eval_capacity_factor={ecf!r} keeps this capacity "
                       "in eval, where it drops assignments; eval_capacity_factor=None keeps it for training only",
    "eval_capacity_factor": "transformers' MoE layers are dropless; a capacity in eval drops assignments",
    "normalize_p": "only DBRX renormalises by a p-norm other than 1 (moe_normalize_expert_weights); {arch} "
                   "divides by the sum",
    "routed_scaling_factor": "{arch} does not scale the routed weights (only DeepSeek-V3 has routed_scaling_factor)",
    "router": "{arch} routes with router={back!r}",
    "moe": "{arch} is a Mixture-of-Experts family",
    "num_null_experts": "{arch} has no zero-computation (null) experts: every routed expert is an MLP",
    "partial_rotary_factor": "{arch} rotates every head dim (partial_rotary_factor reads back as {back!r}; "
                             "GLM-4.5 rotates part of each head)",
    **{f: "written and read back, the MoE layers are {back_layers}, not {mine_layers}: {arch} cannot spell this "
          "layout" for f in ("moe_layers", "moe_every", "first_k_dense")},
}


def aux_loss_coef_hf(m: MoEConfig) -> float:
    """The balance coefficient for transformers, whose loss is moekit's ``hf_compat`` term (balance
    gives K): the ``standard`` term (balance gives 1) is that divided by top_k, so coefficient a
    on it is a / K on transformers' term, the same loss value."""
    return m.aux_loss_coef if m.lb_convention == "hf_compat" else m.aux_loss_coef / m.top_k


def _reason(field: str, cfg: ModelConfig, arch: str, back: Any, back_cfg: ModelConfig) -> str:
    text = _REASONS.get(field)
    if text is None:
        return f"{arch} has no such setting: written and read back it is {back!r}"
    return text.format(arch=arch, back=back, ecf=cfg.moe.eval_capacity_factor if cfg.moe else None,
                       mine_layers=list(cfg.moe_layer_ids), back_layers=list(back_cfg.moe_layer_ids))


def compare(cfg: ModelConfig, back: ModelConfig, arch: str) -> tuple[dict[str, Any], list[str]]:
    """(delta, refusals) between a model's config and what ``arch`` reads back after exporting it.

    delta: the fields that differ harmlessly ({"moe": {...}} for MoEConfig's); refusals: one
    "Owner.field=value (why)" for every field that changes the forward."""
    refused: list[str] = []

    def fields_delta(mine_obj, theirs_obj, harmless: dict, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        """The fields of one config class that differ harmlessly; the others are refused."""
        delta = {}
        for f in dataclasses.fields(mine_obj):
            mine, theirs = getattr(mine_obj, f.name), getattr(theirs_obj, f.name)
            if f.name in skip or mine == theirs:
                continue
            if f.name in harmless and harmless[f.name](cfg, back):
                delta[f.name] = mine
            else:
                refused.append(f"{type(mine_obj).__name__}.{f.name}={mine!r} "
                               f"({_reason(f.name, cfg, arch, theirs, back)})")
        return delta

    delta = fields_delta(cfg, back, MODEL_FIELDS, skip=("moe",))
    if cfg.moe is None or back.moe is None:
        if cfg.moe is not back.moe:
            refused.append(f"ModelConfig.moe={None if cfg.moe is None else 'MoEConfig(...)'} "
                           f"({_reason('moe', cfg, arch, back.moe, back)})")
        return delta, refused
    moe_delta = fields_delta(cfg.moe, back.moe, MOE_FIELDS)
    if moe_delta:
        delta["moe"] = moe_delta
    return delta, refused


def apply_delta(cfg: ModelConfig, delta: dict[str, Any]) -> ModelConfig:
    """``cfg`` with the fields of a delta from :func:`compare` (as read from JSON) put back.

    Raises ValueError naming an unknown field or a value the config rejects."""
    if not isinstance(delta, dict):
        raise ValueError(f"expected a mapping of ModelConfig fields, got {type(delta).__name__}")
    delta = dict(delta)
    moe = delta.pop("moe", None)
    if moe is not None:
        if cfg.moe is None or not isinstance(moe, dict):
            raise ValueError(f"'moe': {moe!r} does not apply to a model without MoE layers")
        known = {f.name for f in dataclasses.fields(MoEConfig)}
        if set(moe) - known:
            raise ValueError(f"unknown MoEConfig field(s) {sorted(set(moe) - known)}")
        delta["moe"] = cfg.moe.replace(**moe)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    if set(delta) - known:
        raise ValueError(f"unknown ModelConfig field(s) {sorted(set(delta) - known)}")
    return cfg.replace(**delta)
