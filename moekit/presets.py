"""Named model presets (the table lives in :mod:`moekit.config`, at the bottom of the import graph, so
``ModelConfig.from_name`` needs no import from above): the published shapes of the seed MoE systems
and small CPU-trainable ones, their published parameter counts, and :func:`miniature`.

Shapes come from each model's released config file or paper. Parameter counts
(``moekit params NAME``) include the input embedding and the output head (once when tied), as
every publisher below counts them, and never a multi-token-prediction module (DeepSeek-V3's MTP
module, 14B, is excluded from its published 671B). "Active" counts everything a token uses: all
but the routed experts it is not sent to. ``published_total`` / ``published_active`` hold the
publisher's figures as printed (None where none is published), and the tests assert each.

Published numbers are rounded; a count matches when it lies within 2% of the published figure or
rounds to it at its printed precision (GLaM's 1.16T is published as "1.2T"; DeepSeek-V2's 21.4B
active as "21B", within 2%).
"""

from __future__ import annotations

import math

from moekit.config import PRESETS, ModelConfig, Preset, get_preset

__all__ = ["PRESETS", "Preset", "get_preset", "matches_published", "miniature", "parse_count"]


def parse_count(text: str) -> float:
    """"46.7B" -> 46.7e9, "1.2T" -> 1.2e12."""
    scale = {"M": 1e6, "B": 1e9, "T": 1e12}[text[-1]]
    return float(text[:-1]) * scale


def matches_published(count: int, published: str) -> bool:
    """Within 2% of the published figure, or equal to it at the precision it was published with."""
    value = parse_count(published)
    if abs(count / value - 1) <= 0.02:
        return True
    digits = len(published[:-1].partition(".")[2])
    scale = parse_count("1" + published[-1])
    return round(count / scale, digits) == float(published[:-1])


def miniature(cfg: ModelConfig | str, d_model: int = 64, n_heads: int = 4, max_experts: int = 16,
              vocab_size: int = 256) -> ModelConfig:
    """A CPU-sized sibling of a preset: the same architecture (attention kind, norms, routing,
    shared/dense experts, layer pattern) at small widths, so any published system can be trained
    or tested in seconds.

    Widths shrink to ``d_model``; expert counts are capped at ``max_experts`` (groups shrink with
    them: the group count is kept when it still leaves two experts a group, else routing becomes
    ungrouped); the layer count keeps the dense prefix and two MoE layers (with ``moe_layers``: the
    layers up to the second MoE layer).
    """
    cfg = get_preset(cfg) if isinstance(cfg, str) else cfg
    head_dim = d_model // n_heads
    kv_ratio = cfg.n_heads // cfg.n_kv_heads
    changes: dict = dict(
        vocab_size=vocab_size, d_model=d_model, n_heads=n_heads, n_kv_heads=max(1, n_heads // kv_ratio),
        head_dim=head_dim, max_seq_len=min(cfg.max_seq_len, 256), ffn_hidden=4 * d_model if cfg.ffn_hidden else 0,
        n_layers=min(cfg.n_layers, cfg.first_k_dense + 2 * cfg.moe_every),
    )
    if cfg.moe_layers is not None:  # up to and including the second MoE layer
        kept = cfg.moe_layers[:2]
        changes.update(n_layers=kept[-1] + 1, moe_layers=kept)
    if cfg.attention == "mla":
        changes.update(q_lora_rank=d_model // 2 if cfg.q_lora_rank else 0, kv_lora_rank=d_model // 4,
                       qk_nope_head_dim=head_dim // 2, qk_rope_head_dim=head_dim // 2, v_head_dim=head_dim // 2)
    if cfg.embedding_multiplier != 1.0:
        changes["embedding_multiplier"] = math.sqrt(d_model)
    if cfg.moe is not None:
        m = cfg.moe
        E = min(m.num_experts, max_experts)
        n_group = m.n_group if E % m.n_group == 0 and E // m.n_group >= 2 else 1
        changes["moe"] = m.replace(
            d_model=d_model, num_experts=E, top_k=min(m.top_k, E) if m.router != "soft" else E,
            expert_hidden=d_model // 2, shared_expert_hidden=d_model // 2 if m.shared_expert_hidden else None,
            dense_hidden=2 * d_model if m.dense_hidden else 0, n_group=n_group,
            topk_group=min(m.topk_group, n_group) if n_group > 1 else 1)
    return cfg.replace(**changes)
