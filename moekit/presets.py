"""Named model presets: the published shapes of the seed MoE systems and small CPU-trainable ones.

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
from dataclasses import dataclass

from moekit.config import MoEConfig, ModelConfig


@dataclass(frozen=True)
class Preset:
    config: ModelConfig
    source: str
    published_total: str | None = None  # as published, e.g. "46.7B", "1.2T"
    published_active: str | None = None
    note: str = ""


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


def _moe(d: int, hidden: int, E: int, K: int, **kw) -> MoEConfig:
    return MoEConfig(d_model=d, expert_hidden=hidden, num_experts=E, top_k=K, **kw)


def _presets() -> dict[str, Preset]:
    p: dict[str, Preset] = {}

    # ---- small presets for a CPU (byte-level vocabulary) ----------------------------------------
    tiny_moe = _moe(64, 64, 8, 2, aux_loss_coef=0.01, z_loss_coef=1e-3)
    tiny = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=256, moe=tiny_moe,
                       ffn_hidden=128, tie_embeddings=True)
    p["tiny"] = Preset(tiny, "moekit: trains in seconds, for tests")
    p["tiny-dense"] = Preset(tiny.replace(moe=None), "moekit: tiny's dense twin (FFN width = top_k x expert width)")
    small_moe = _moe(256, 512, 8, 2, aux_loss_coef=0.01, z_loss_coef=1e-3)
    small = ModelConfig(vocab_size=256, d_model=256, n_layers=4, n_heads=4, max_seq_len=1024, moe=small_moe,
                        ffn_hidden=1024, tie_embeddings=True)
    p["small"] = Preset(small, "moekit: a few minutes a run on 2 CPU cores")
    p["small-dense"] = Preset(small.replace(moe=None), "moekit: small's dense twin (same active parameters)")

    # ---- the demo pair (moekit demo): same active parameters, tokens and schedule ---------------
    demo_dense = ModelConfig(vocab_size=256, d_model=256, n_layers=4, n_heads=4, max_seq_len=1024, ffn_hidden=1024,
                             tie_embeddings=True)
    p["demo-dense"] = Preset(demo_dense, "moekit demo: dense baseline, SwiGLU FFN 1024")
    p["demo-moe"] = Preset(demo_dense.replace(moe=_moe(
        256, 128, 64, 6, num_shared_experts=2, aux_loss_coef=0.01, z_loss_coef=1e-3)),
        "moekit demo: DeepSeekMoE-style fine-grained experts (64 x 128, top-6, renormalised) + 2 shared, "
        "active FFN 1024")

    # ---- the published systems -----------------------------------------------------------------
    switch = ModelConfig(
        vocab_size=32128, d_model=768, n_layers=12, n_heads=12, max_seq_len=512, ffn_hidden=3072,
        activation="relu", tie_embeddings=True, moe_every=2,
        moe=_moe(768, 3072, 8, 1, router="switch", activation="relu", capacity_factor=1.25,
                 eval_capacity_factor=2.0, router_jitter=0.01, aux_loss_coef=0.01, z_loss_coef=1e-3))
    p["switch"] = Preset(switch, "Fedus et al. 2021, Switch-Base-8 routing in a 12-layer decoder-only analogue "
                         "(MoE every other FFN, top-1, capacity 1.25, aux 0.01, z-loss 0.001)")

    glam = ModelConfig(
        vocab_size=256000, d_model=8192, n_layers=64, n_heads=128, head_dim=128, max_seq_len=1024,
        ffn_hidden=32768, activation="geglu", tie_embeddings=True, moe_every=2,
        moe=_moe(8192, 32768, 64, 2, activation="gelu", aux_loss_coef=0.01))
    p["glam"] = Preset(glam, "Du et al. 2022, GLaM 64B/64E (Table 4)", "1.2T", "96.6B",
                       "published 1.2T is rounded (count: 1.16T)")

    mixtral = ModelConfig(
        vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, max_seq_len=32768,
        rope_theta=1e6, norm_eps=1e-5, moe=_moe(4096, 14336, 8, 2, aux_loss_coef=0.02))
    p["mixtral-8x7b"] = Preset(mixtral, "Mistral AI, Mixtral-8x7B config.json; Jiang et al. 2024", "46.7B", "12.9B")
    p["mixtral-8x22b"] = Preset(
        mixtral.replace(vocab_size=32768, d_model=6144, n_layers=56, n_heads=48, max_seq_len=65536,
                        moe=_moe(6144, 16384, 8, 2, aux_loss_coef=0.001)),
        "Mistral AI, Mixtral-8x22B-v0.1 config.json", "141B", "39B")

    p["dbrx"] = Preset(ModelConfig(
        vocab_size=100352, d_model=6144, n_layers=40, n_heads=48, n_kv_heads=8, max_seq_len=32768,
        rope_theta=5e5, norm="layernorm", norm_eps=1e-5, clip_qkv=8.0,
        moe=_moe(6144, 10752, 16, 4, aux_loss_coef=0.05)),
        "Databricks, dbrx-base config.json (softmax then L1 renormalisation; clip_qkv 8)", "132B", "36B")

    p["grok-1"] = Preset(ModelConfig(
        vocab_size=131072, d_model=6144, n_layers=64, n_heads=48, n_kv_heads=8, max_seq_len=8192,
        sandwich_norm=True, tie_embeddings=True, embedding_multiplier=math.sqrt(6144),
        logit_multiplier=0.5773502691896257, attn_logit_softcap=30.0,
        moe=_moe(6144, 32768, 8, 2, activation="geglu", normalize_weights=False)),
        "xAI, grok-1 release (model.py): gated GELU experts, softmax over all 8 without renormalisation",
        "314B", None, "xAI publishes 314B total only (\"25% of weights active\")")

    p["arctic"] = Preset(ModelConfig(
        vocab_size=32000, d_model=7168, n_layers=35, n_heads=56, n_kv_heads=8, max_seq_len=4096,
        ffn_hidden=7168, parallel_residual_mlp=True, norm_eps=1e-5,
        moe=_moe(7168, 4864, 128, 2, aux_loss_coef=0.01)),
        "Snowflake, snowflake-arctic-base config.json (dense-MoE hybrid: 10B dense + 128x3.66B MoE)", "480B", "17B")

    p["deepseek-moe-16b"] = Preset(ModelConfig(
        vocab_size=102400, d_model=2048, n_layers=28, n_heads=16, max_seq_len=4096, ffn_hidden=10944,
        first_k_dense=1,
        moe=_moe(2048, 1408, 64, 6, normalize_weights=False, num_shared_experts=2, seq_aux_loss_coef=0.001)),
        "Dai et al. 2024, DeepSeekMoE 16B config.json", "16.4B", "2.8B")

    mla = dict(attention="mla", q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
               v_head_dim=128, rope_interleave=True)
    p["deepseek-v2"] = Preset(ModelConfig(
        vocab_size=102400, d_model=5120, n_layers=60, n_heads=128, max_seq_len=163840, ffn_hidden=12288,
        first_k_dense=1, **mla,
        moe=_moe(5120, 1536, 160, 6, normalize_weights=False, n_group=8, topk_group=3, routed_scaling_factor=16.0,
                 num_shared_experts=2, seq_aux_loss_coef=0.003)),
        "DeepSeek-AI 2024, DeepSeek-V2 config.json", "236B", "21B")

    p["deepseek-v3"] = Preset(ModelConfig(
        vocab_size=129280, d_model=7168, n_layers=61, n_heads=128, max_seq_len=163840, ffn_hidden=18432,
        first_k_dense=3, **mla,
        moe=_moe(7168, 2048, 256, 8, router="sigmoid", n_group=8, topk_group=4, routed_scaling_factor=2.5,
                 num_shared_experts=1, bias_update_rate=1e-3, seq_aux_loss_coef=1e-4)),
        "DeepSeek-AI 2024, DeepSeek-V3 config.json (main model, without the MTP module)", "671B", "37B")

    qwen = dict(qkv_bias=True, rope_theta=1e6)
    p["qwen1.5-moe-a2.7b"] = Preset(ModelConfig(
        vocab_size=151936, d_model=2048, n_layers=24, n_heads=16, max_seq_len=8192, **qwen,
        moe=_moe(2048, 1408, 60, 4, normalize_weights=False, num_shared_experts=1, shared_expert_hidden=5632,
                 shared_expert_gate=True, aux_loss_coef=0.001)),
        "Qwen, Qwen1.5-MoE-A2.7B config.json", "14.3B", "2.7B")
    p["qwen2-57b-a14b"] = Preset(ModelConfig(
        vocab_size=151936, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, max_seq_len=32768, **qwen,
        moe=_moe(3584, 2560, 64, 8, normalize_weights=False, num_shared_experts=1, shared_expert_hidden=20480,
                 shared_expert_gate=True, aux_loss_coef=0.001)),
        "Qwen, Qwen2-57B-A14B config.json", "57B", "14B")
    p["qwen3-30b-a3b"] = Preset(ModelConfig(
        vocab_size=151936, d_model=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128, max_seq_len=40960,
        rope_theta=1e6, qk_norm="head", moe=_moe(2048, 768, 128, 8, aux_loss_coef=0.001)),
        "Qwen, Qwen3-30B-A3B config.json", "30.5B", "3.3B")
    p["olmoe-1b-7b"] = Preset(ModelConfig(
        vocab_size=50304, d_model=2048, n_layers=16, n_heads=16, max_seq_len=4096, qk_norm="full", norm_eps=1e-5,
        moe=_moe(2048, 1024, 64, 8, normalize_weights=False, aux_loss_coef=0.01, z_loss_coef=1e-3)),
        "Muennighoff et al. 2024, OLMoE-1B-7B-0924 config.json", "6.9B", "1.3B")
    return p


PRESETS: dict[str, Preset] = _presets()


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name].config
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


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
