"""The newer Hugging Face MoE families: tiny random transformers models built and saved locally,
loaded by moekit (logits within 1e-4 in fp32, equal greedy continuations), exported back (transformers
loads the export with the same logits) and the presets of their published shapes."""

import math

import pytest
import torch

import moekit
from moekit.interop import InteropError, to_hf
from moekit.model import count_parameters
from moekit.presets import PRESETS, matches_published

transformers = pytest.importorskip("transformers")

V = 96  # vocabulary


def _build(cfg_name: str, model_name: str, **kw):
    cfg = getattr(transformers, cfg_name)(vocab_size=V, max_position_embeddings=128, initializer_range=0.15,
                                          eos_token_id=None, bos_token_id=None, pad_token_id=None, **kw)
    torch.manual_seed(0)
    hf = getattr(transformers, model_name)(cfg).eval()
    with torch.no_grad():  # norms and biases away from their init, so that a wrong mapping shows
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return hf


def _check_import(hf, path, prompt_len=6, new=12):
    hf.save_pretrained(path)
    ours = moekit.from_pretrained(path)
    ids = torch.randint(0, V, (2, 15), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids).logits).abs().max().item()
    assert diff < 1e-4
    prompt = ids[:1, :prompt_len]
    theirs = hf.generate(prompt, max_new_tokens=new, do_sample=False, pad_token_id=0)[0, prompt_len:].tolist()
    assert moekit.generate(ours, prompt, new).tokens[0] == theirs
    return ours


def _check_export(ours, out, arch):
    assert to_hf(ours, out, arch) == arch
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == arch
    ids = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max().item() < 1e-4
    back = moekit.from_pretrained(out)
    assert back.cfg == ours.cfg
    torch.testing.assert_close(back(ids).logits, ours(ids).logits, rtol=0, atol=0)


# ---- Granite MoE and Granite MoE Shared ----------------------------------------------------------
GRANITE = dict(hidden_size=48, intermediate_size=20, num_hidden_layers=3, num_attention_heads=6,
               num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=3, attention_bias=True,
               embedding_multiplier=3.0, logits_scaling=2.5, residual_multiplier=0.6, attention_multiplier=0.3,
               rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 5000.0})


@pytest.mark.parametrize("arch, kw", [
    ("GraniteMoe", {}),
    ("GraniteMoe", {"attention_bias": False, "tie_word_embeddings": True}),
    ("GraniteMoeShared", {"shared_intermediate_size": 28}),
    ("GraniteMoeShared", {"shared_intermediate_size": 0}),
], ids=["granite", "granite-tied-nobias", "granite-shared", "granite-shared-0"])
def test_granite_import_greedy_and_export(tmp_path, arch, kw):
    hf = _build(f"{arch}Config", f"{arch}ForCausalLM", **{**GRANITE, **kw})
    ours = _check_import(hf, tmp_path / "hf")
    cfg = ours.cfg
    assert (cfg.residual_multiplier, cfg.attention_multiplier, cfg.embedding_multiplier) == (0.6, 0.3, 3.0)
    assert cfg.logit_multiplier == pytest.approx(1 / 2.5)
    assert cfg.moe.shared_hidden == kw.get("shared_intermediate_size", 0)
    _check_export(ours, tmp_path / "out", f"{arch}ForCausalLM")


@pytest.mark.parametrize("field, value", [("residual_multiplier", 1.0), ("attention_multiplier", None),
                                          ("attn_out_bias", False)])
def test_granite_multipliers_and_output_bias_matter(tmp_path, field, value):
    """Each µP setting (and the output-projection bias) moves the logits: none is read and ignored."""
    hf = _build("GraniteMoeConfig", "GraniteMoeForCausalLM", **GRANITE)
    hf.save_pretrained(tmp_path / "hf")
    ours = moekit.from_pretrained(tmp_path / "hf")
    other = moekit.MoETransformer(ours.cfg.replace(**{field: value})).eval()
    other.load_state_dict(ours.state_dict(), strict=False)
    ids = torch.randint(0, V, (1, 9))
    with torch.no_grad():
        assert (other(ids).logits - ours(ids).logits).abs().max().item() > 1e-3


def test_moekit_model_with_default_scale_exports_to_granite(tmp_path):
    """A moekit model (attention scale 1/√head_dim, no µP) is a Granite model with those numbers written out."""
    cfg = moekit.ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                             moe=moekit.MoEConfig(d_model=32, expert_hidden=16, num_experts=4, top_k=2))
    torch.manual_seed(0)
    m = moekit.MoETransformer(cfg).eval()
    _check_export(m, tmp_path / "out", "GraniteMoeForCausalLM")
    hf_cfg = (tmp_path / "out" / "config.json").read_text()
    assert f'"attention_multiplier": {1 / math.sqrt(8)}' in hf_cfg


@pytest.mark.parametrize("change, named", [
    (dict(qkv_bias=True), "ModelConfig.attn_out_bias"),  # one attention_bias switch: the output bias would appear
    (dict(qk_norm="head"), "ModelConfig.qk_norm"),
    (dict(first_k_dense=1, ffn_hidden=24), "ModelConfig.first_k_dense"),
])
def test_granite_refuses_what_it_cannot_express(tmp_path, change, named):
    cfg = moekit.ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                             moe=moekit.MoEConfig(d_model=32, expert_hidden=16, num_experts=4, top_k=2), **change)
    with pytest.raises(ValueError, match=f"{named}="):
        to_hf(moekit.MoETransformer(cfg), tmp_path / "out", "GraniteMoeForCausalLM")
    assert not (tmp_path / "out").exists()


def test_new_model_fields_are_validated():
    base = dict(vocab_size=V, d_model=32, n_layers=1, n_heads=4, ffn_hidden=24)
    for field, value in (("residual_multiplier", 0.0), ("attention_multiplier", -1.0),
                         ("attention_multiplier", float("inf"))):
        with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
            moekit.ModelConfig(**base, **{field: value})
    mla = dict(attention="mla", kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    for field, value in (("attention_multiplier", 0.1), ("attn_out_bias", True)):
        with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
            moekit.ModelConfig(**base, **mla, **{field: value})


def test_granite_config_without_logits_scaling_is_refused_by_name(tmp_path):
    hf = _build("GraniteMoeConfig", "GraniteMoeForCausalLM", **GRANITE)
    hf.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(path.read_text().replace('"logits_scaling": 2.5', '"logits_scaling": 0'))
    with pytest.raises(InteropError, match="logits_scaling=0"):
        moekit.from_pretrained(tmp_path / "hf")


# ---- PhiMoE --------------------------------------------------------------------------------------
PHIMOE = dict(hidden_size=40, intermediate_size=20, num_hidden_layers=3, num_attention_heads=5, num_key_value_heads=1,
              num_local_experts=6, num_experts_per_tok=2, attention_bias=True, lm_head_bias=True,
              router_jitter_noise=0.3, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1e4})


@pytest.mark.parametrize("kw", [{}, {"attention_bias": False, "lm_head_bias": False, "router_jitter_noise": 0.01},
                                {"tie_word_embeddings": True, "lm_head_bias": False}],
                         ids=["biases", "no-bias", "tied"])
def test_phimoe_import_greedy_and_export(tmp_path, kw):
    hf = _build("PhimoeConfig", "PhimoeForCausalLM", **{**PHIMOE, **kw})
    ours = _check_import(hf, tmp_path / "hf")
    assert ours.cfg.moe.router == "sparsemixer" and ours.cfg.norm_bias
    _check_export(ours, tmp_path / "out", "PhimoeForCausalLM")


def test_sparsemixer_masks_and_weights_as_transformers():
    """moekit's router against transformers' own ``sparsemixer`` (eval) on logits with near-ties, negative
    maxima and wide gaps, at several thresholds: same experts, same weights."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    torch.manual_seed(0)
    for eps in (0.0, 0.01, 0.2, 2.0):
        cfg = moekit.MoEConfig(d_model=8, expert_hidden=4, num_experts=7, top_k=2, router="sparsemixer",
                               normalize_weights=False, sparsemixer_eps=eps)
        router = moekit.moe.routers.build_router(cfg).eval()
        x = torch.randn(64, 8) * torch.tensor([0.1, 1.0, 5.0, -3.0]).repeat_interleave(16)[:, None]
        out = router(x)
        weights, ids = sparsemixer(router.logits(x), jitter_eps=eps, training=False)
        assert torch.equal(out.expert_ids_TK, ids)
        torch.testing.assert_close(out.weights_TK, weights, rtol=0, atol=1e-6)


def test_sparsemixer_weights_differ_from_a_softmax_top2():
    """The threshold matters: the weights are not Mixtral's renormalised softmax."""
    torch.manual_seed(0)
    cfg = moekit.MoEConfig(d_model=8, expert_hidden=4, num_experts=6, top_k=2, router="sparsemixer",
                           normalize_weights=False, sparsemixer_eps=0.3)
    router = moekit.moe.routers.build_router(cfg).eval()
    x = torch.randn(32, 8)
    out = router(x)
    softmax = router.logits(x).softmax(-1).topk(2).values
    assert (out.weights_TK - softmax / softmax.sum(-1, keepdim=True)).abs().max() > 1e-2


@pytest.mark.parametrize("change, match", [
    ({"num_experts_per_tok": 3}, "num_experts_per_tok=3"),
    ({"sliding_window": 16}, "sliding_window=16"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 4,
                          "long_factor": [1.0] * 4, "original_max_position_embeddings": 64}}, "rope_type='longrope'"),
])
def test_phimoe_refuses_by_name(tmp_path, change, match):
    import json

    hf = _build("PhimoeConfig", "PhimoeForCausalLM", **PHIMOE)
    hf.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(InteropError, match=match):
        moekit.from_pretrained(tmp_path / "hf")


@pytest.mark.parametrize("change, named", [
    (dict(norm="rmsnorm", norm_bias=False), "ModelConfig.norm"),
    (dict(norm_bias=False), "ModelConfig.norm_bias"),
    (dict(moe_top_k=3), "MoEConfig.top_k"),
])
def test_phimoe_export_refuses_what_it_cannot_express(tmp_path, change, named):
    change = dict(change)
    top_k = change.pop("moe_top_k", 2)
    cfg = moekit.ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                             **{"norm": "layernorm", "norm_bias": True, **change},
                             moe=moekit.MoEConfig(d_model=32, expert_hidden=16, num_experts=4, top_k=top_k,
                                                  router="sparsemixer", normalize_weights=False))
    with pytest.raises(ValueError, match=f"{named}="):
        to_hf(moekit.MoETransformer(cfg), tmp_path / "out", "PhimoeForCausalLM")


def test_head_bias_trains_through_the_loss():
    """With a head bias the loss is computed from the logits (the fused loss has no bias): same value,
    and the bias gets a gradient."""
    cfg = moekit.ModelConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=4, norm="layernorm", norm_bias=True,
                             lm_head_bias=True, moe=moekit.MoEConfig(d_model=32, expert_hidden=16, num_experts=4,
                                                                     top_k=2, router="sparsemixer",
                                                                     normalize_weights=False))
    torch.manual_seed(0)
    m = moekit.MoETransformer(cfg)
    with torch.no_grad():
        m.lm_head.bias.normal_()
    ids = torch.randint(0, V, (2, 9))
    out = m(ids[:, :-1], targets=ids[:, 1:])
    logits = m(ids[:, :-1]).logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.ce_loss, ce)
    out.loss.backward()
    assert m.lm_head.bias.grad.abs().sum() > 0


def test_norm_and_head_bias_are_validated():
    base = dict(vocab_size=V, d_model=32, n_layers=1, n_heads=4, ffn_hidden=24)
    with pytest.raises(ValueError, match="ModelConfig.norm_bias"):
        moekit.ModelConfig(**base, norm_bias=True)  # RMSNorm
    with pytest.raises(ValueError, match="ModelConfig.lm_head_bias"):
        moekit.ModelConfig(**base, lm_head_bias=True, tie_embeddings=True)
    moe = dict(d_model=8, expert_hidden=4, num_experts=4, top_k=2, router="sparsemixer")
    with pytest.raises(ValueError, match="MoEConfig.normalize_weights"):
        moekit.MoEConfig(**moe)


# ---- presets ----------------------------------------------------------------------------------
def test_granite_preset_counts():
    """granite-3.0-3b-a800m by independent arithmetic, and the published 3.3B total."""
    d, heads, kv, layers, E, K, F, vocab = 1536, 24, 8, 32, 40, 8, 512, 49155
    attn = d * d + 2 * d * (kv * d // heads) + d * d
    expert = 3 * d * F
    total = layers * (attn + E * expert + E * d + 2 * d) + vocab * d + d  # tied head
    count = count_parameters(PRESETS["granite-3.0-3b-a800m"].config)
    assert (count.total, count.active) == (total, total - layers * (E - K) * expert)
    for name in ("granite-3.0-3b-a800m", "granite-3.0-1b-a400m"):
        preset = PRESETS[name]
        assert matches_published(count_parameters(preset.config).total, preset.published_total)


def test_phi_moe_preset_counts():
    """phi-3.5-moe against Microsoft's 41.9B / 6.6B, and by arithmetic (biases everywhere PhiMoE has them)."""
    d, kv, layers, E, K, F, vocab = 4096, 1024, 32, 16, 2, 6400, 32064
    attn = d * (d + 2 * kv) + (d + 2 * kv) + d * d + d
    expert = 3 * d * F
    total = layers * (attn + E * expert + E * d + 4 * d) + 2 * vocab * d + vocab + 2 * d
    count = count_parameters(PRESETS["phi-3.5-moe"].config)
    assert (count.total, count.active) == (total, total - layers * (E - K) * expert)
    assert matches_published(count.total, "41.9B") and matches_published(count.active, "6.6B")


def _refused_after_editing(tmp_path, hf, change: dict, match: str) -> None:
    """``hf`` saved, its config.json updated with ``change`` (a None value deletes the key): loading fails
    with an InteropError matching ``match``."""
    import json

    hf.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    data = {**json.loads(path.read_text()), **change}
    path.write_text(json.dumps({k: v for k, v in data.items() if not (k in change and v is None)}))
    with pytest.raises(InteropError, match=match):
        moekit.from_pretrained(tmp_path / "hf")


# ---- GLM-4.5 -------------------------------------------------------------------------------------
GLM = dict(hidden_size=48, intermediate_size=40, moe_intermediate_size=12, num_hidden_layers=3, num_attention_heads=6,
           num_key_value_heads=2, head_dim=16, n_routed_experts=9, num_experts_per_tok=3, n_group=3, topk_group=2,
           n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
           use_qk_norm=True, attention_bias=True, partial_rotary_factor=0.5, rms_norm_eps=1e-5)


def _with_correction_bias(hf):
    """A non-zero e_score_correction_bias (transformers initialises it to zero), so that dropping it shows."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.3 * torch.randn_like(buf))
    return hf


@pytest.mark.parametrize("kw", [
    {},
    {"use_qk_norm": False, "attention_bias": False, "partial_rotary_factor": 1.0, "norm_topk_prob": False,
     "n_group": 1, "topk_group": 1, "n_shared_experts": 1, "routed_scaling_factor": 1.0, "tie_word_embeddings": True},
    {"first_k_dense_replace": 0, "partial_rotary_factor": 0.25, "num_key_value_heads": 6},
], ids=["full", "plain-tied", "all-moe-quarter-rotary"])
def test_glm4_moe_import_greedy_and_export(tmp_path, kw):
    hf = _with_correction_bias(_build("Glm4MoeConfig", "Glm4MoeForCausalLM", **{**GLM, **kw}))
    ours = _check_import(hf, tmp_path / "hf")
    cfg = {**GLM, **kw}
    assert ours.cfg.rope_dims == int(16 * cfg["partial_rotary_factor"])
    assert ours.cfg.moe.router == "sigmoid" and ours.cfg.moe.shared_hidden == 12 * cfg["n_shared_experts"]
    assert ours.layers[-1].ffn.router.expert_bias.abs().max() > 0
    _check_export(ours, tmp_path / "out", "Glm4MoeForCausalLM")


def test_partial_rotary_matters_and_leaves_the_tail_unrotated():
    """Rotating all dims instead of half moves the logits; with half, the last dims of each q and k head
    carry no position: with the rotary dims' projections zeroed, attention is the same at stretched positions."""
    from moekit.nn.attention import GroupedQueryAttention

    cfg = moekit.ModelConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=2, head_dim=16, max_seq_len=64,
                             partial_rotary_factor=0.5, ffn_hidden=24)
    torch.manual_seed(0)
    m = moekit.MoETransformer(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else None
    full = moekit.MoETransformer(cfg.replace(partial_rotary_factor=1.0)).eval()
    full.load_state_dict(m.state_dict())
    ids = torch.randint(0, V, (1, 9))
    with torch.no_grad():
        assert (m(ids).logits - full(ids).logits).abs().max() > 1e-3

    def shifted_outputs(c):
        attn = GroupedQueryAttention(c).eval()
        with torch.no_grad():
            for proj in (attn.q_proj, attn.k_proj):
                proj.weight.view(-1, 16, 32)[:, :8] = 0  # the first 8 dims of every head: the rotary half
        x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(4))
        model = moekit.MoETransformer(c)
        with torch.no_grad():
            return [attn(x, *model.rope(torch.arange(0, 6 * step, step), torch.float32)) for step in (1, 3)]

    near, far = shifted_outputs(cfg)
    torch.testing.assert_close(near, far)
    near, far = shifted_outputs(cfg.replace(partial_rotary_factor=1.0))
    assert (near - far).abs().max() > 1e-3


def test_partial_rotary_factor_is_validated():
    base = dict(vocab_size=V, d_model=32, n_layers=1, n_heads=2, head_dim=16, ffn_hidden=24)
    for value in (0.0, 1.5, 0.0625, 0.3125):  # out of range, 1 dim, 5 dims (odd)
        with pytest.raises(ValueError, match="ModelConfig.partial_rotary_factor"):
            moekit.ModelConfig(**base, partial_rotary_factor=value)
    mla = dict(attention="mla", kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    with pytest.raises(ValueError, match="ModelConfig.partial_rotary_factor"):
        moekit.ModelConfig(**base, **mla, partial_rotary_factor=0.5)
    assert moekit.ModelConfig(**base, partial_rotary_factor=0.75).rope_dims == 12


def test_glm4_moe_skips_the_mtp_layers_after_the_decoder(tmp_path):
    """Released GLM-4.5 checkpoints store the multi-token-prediction layer as model.layers.{n_layers};
    it does not enter the logits and is skipped, as transformers skips it. Other stray keys still fail."""
    from safetensors.torch import save_file

    hf = _with_correction_bias(_build("Glm4MoeConfig", "Glm4MoeForCausalLM", **GLM))
    hf.save_pretrained(tmp_path / "hf")
    plain = moekit.from_pretrained(tmp_path / "hf")
    save_file({"model.layers.3.eh_proj.weight": torch.randn(48, 96),
               "model.layers.3.mlp.experts.0.up_proj.weight": torch.randn(12, 48)},
              str(tmp_path / "hf" / "model-mtp.safetensors"))
    ids = torch.randint(0, V, (1, 7))
    torch.testing.assert_close(moekit.from_pretrained(tmp_path / "hf")(ids).logits, plain(ids).logits, rtol=0, atol=0)
    save_file({"model.extra.weight": torch.randn(3)}, str(tmp_path / "hf" / "model-extra.safetensors"))
    with pytest.raises(InteropError, match="unexpected keys.*model.extra.weight"):
        moekit.from_pretrained(tmp_path / "hf")


@pytest.mark.parametrize("change, match", [
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.3125}},
     "partial_rotary_factor=0.3125"),  # 5 rotary dims
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                          "short_factor": [1.0] * 4, "long_factor": [1.0] * 4}}, "rope_type='longrope'"),
])
def test_glm4_moe_refuses_by_name(tmp_path, change, match):
    _refused_after_editing(tmp_path, _build("Glm4MoeConfig", "Glm4MoeForCausalLM", **GLM), change, match)


@pytest.mark.parametrize("change, named", [
    (dict(attn_out_bias=True), "ModelConfig.attn_out_bias"),  # GLM's o_proj has no bias
    (dict(qk_norm="full"), "ModelConfig.qk_norm"),
    (dict(moe_layers=(0, 2), ffn_hidden=24), "ModelConfig.moe_layers"),
    (dict(moe_router="softmax_topk"), "MoEConfig.router"),
])
def test_glm4_moe_export_refuses_what_it_cannot_express(tmp_path, change, named):
    change = dict(change)
    router = change.pop("moe_router", "sigmoid")
    cfg = moekit.ModelConfig(vocab_size=V, d_model=32, n_layers=3, n_heads=4, max_seq_len=64, partial_rotary_factor=0.5,
                             moe=moekit.MoEConfig(d_model=32, expert_hidden=16, num_experts=4, top_k=2, router=router,
                                                  num_shared_experts=1), **change)
    with pytest.raises(ValueError, match=f"{named}="):
        to_hf(moekit.MoETransformer(cfg), tmp_path / "out", "Glm4MoeForCausalLM")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, total, active, d, vocab", [("glm-4.5", "355B", "32B", 5120, 151552),
                                                           ("glm-4.5-air", "106B", "12B", 4096, 151552)])
def test_glm_preset_counts(name, total, active, d, vocab):
    """Z.ai's totals, and its active figures, which leave out the embedding and the (untied) head."""
    preset = PRESETS[name]
    count = count_parameters(preset.config)
    assert preset.published_total == total and matches_published(count.total, total)
    assert matches_published(count.active - 2 * vocab * d, active)
    assert not matches_published(count.active, active)  # with them it is 5% (10%) over: the note says so


# ---- dots.llm1 -----------------------------------------------------------------------------------
DOTS = dict(hidden_size=48, intermediate_size=40, moe_intermediate_size=12, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=3, head_dim=16, n_routed_experts=10, num_experts_per_tok=3, n_group=5, topk_group=3,
            n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
            attention_bias=True, rms_norm_eps=1e-5, sliding_window=None,
            rope_parameters={"rope_type": "default", "rope_theta": 5e4})


@pytest.mark.parametrize("kw", [
    {},
    {"attention_bias": False, "norm_topk_prob": False, "n_group": 1, "topk_group": 1, "n_shared_experts": 2,
     "first_k_dense_replace": 0, "tie_word_embeddings": True},
    {"sliding_window": 128, "max_window_layers": 1},  # a window as long as the context: full attention
], ids=["full", "plain-tied", "window-covers-context"])
def test_dots1_import_greedy_and_export(tmp_path, kw):
    hf = _with_correction_bias(_build("Dots1Config", "Dots1ForCausalLM", **{**DOTS, **kw}))
    ours = _check_import(hf, tmp_path / "hf")
    cfg = {**DOTS, **kw}
    assert ours.cfg.qk_norm == "head" and ours.cfg.attn_out_bias == cfg["attention_bias"]
    assert ours.cfg.moe.shared_hidden == 12 * cfg["n_shared_experts"]
    _check_export(ours, tmp_path / "out", "Dots1ForCausalLM")


@pytest.mark.parametrize("change, match", [
    ({"sliding_window": 8, "max_window_layers": 1, "layer_types": None}, "sliding_window=8 on layers \\[1, 2\\]"),
    ({"sliding_window": 8, "layer_types": ["full_attention", "sliding_attention", "full_attention"]},
     "sliding_window=8 on layers \\[1\\]"),
    ({"layer_types": ["full_attention", "chunked_attention", "full_attention"]}, "layer_types \\['chunked_attention'\\]"),
])
def test_dots1_refuses_by_name(tmp_path, change, match):
    _refused_after_editing(tmp_path, _build("Dots1Config", "Dots1ForCausalLM", **DOTS), change, match)


@pytest.mark.parametrize("change, named", [
    (dict(qk_norm=None), "ModelConfig.qk_norm"),  # dots.llm1 always normalises q and k
    (dict(qkv_bias=True), "ModelConfig.attn_out_bias"),  # one attention_bias switch for all four projections
    (dict(shared_expert_hidden=20), "MoEConfig.shared_expert_hidden"),  # not a multiple of the expert width
])
def test_dots1_export_refuses_what_it_cannot_express(tmp_path, change, named):
    change = dict(change)
    shared = change.pop("shared_expert_hidden", None)
    cfg = moekit.ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                             **{"qk_norm": "head", **change},
                             moe=moekit.MoEConfig(d_model=32, expert_hidden=16, num_experts=4, top_k=2,
                                                  router="sigmoid", num_shared_experts=1, shared_expert_hidden=shared))
    with pytest.raises(ValueError, match=f"{named}="):
        to_hf(moekit.MoETransformer(cfg), tmp_path / "out", "Dots1ForCausalLM")


def test_dots_preset_counts():
    """dots-llm1 against rednote-hilab's 142B / 14B, and by arithmetic."""
    d, layers, E, K, F, dense, shared, vocab = 4096, 62, 128, 6, 1408, 10944, 2, 152064
    attn = 4 * d * d + 2 * 128  # q, k, v, o and the per-head q/k norms
    moe = E * 3 * d * F + shared * 3 * d * F + E * d
    total = layers * (attn + 2 * d) + 3 * d * dense + (layers - 1) * moe + 2 * vocab * d + d
    count = count_parameters(PRESETS["dots-llm1"].config)
    assert (count.total, count.active) == (total, total - (layers - 1) * (E - K) * 3 * d * F)
    assert matches_published(count.total, "142B") and matches_published(count.active, "14B")


# ---- ERNIE 4.5 MoE -------------------------------------------------------------------------------
ERNIE = dict(hidden_size=48, intermediate_size=40, moe_intermediate_size=12, num_hidden_layers=5, num_attention_heads=6,
             num_key_value_heads=2, moe_num_experts=7, moe_k=3, moe_num_shared_experts=2, moe_layer_start_index=1,
             moe_layer_end_index=3, moe_layer_interval=2, tie_word_embeddings=False, rms_norm_eps=1e-5,
             rope_parameters={"rope_type": "default", "rope_theta": 5e4})


def _ernie_with_bias(**kw):
    hf = _build("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", **{**ERNIE, **kw})
    torch.manual_seed(3)
    with torch.no_grad():  # a selection bias as large as the probabilities, so that dropping it shows
        for name, p in hf.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.copy_(0.2 * torch.rand_like(p))
    return hf


@pytest.mark.parametrize("kw, moe_layers", [
    ({}, (1, 3)),  # a range with an interval: neither a prefix nor every layer
    ({"moe_layer_start_index": 0, "moe_layer_end_index": -1, "moe_layer_interval": 1, "tie_word_embeddings": True,
      "moe_num_shared_experts": 0}, (0, 1, 2, 3, 4)),
    ({"moe_layer_start_index": 2, "moe_layer_end_index": 4, "moe_layer_interval": 1, "moe_num_shared_experts": 1},
     (2, 3, 4)),
], ids=["range-interval", "all-tied-no-shared", "dense-prefix"])
def test_ernie4_5_moe_import_greedy_and_export(tmp_path, kw, moe_layers):
    hf = _ernie_with_bias(**kw)
    ours = _check_import(hf, tmp_path / "hf")
    assert ours.cfg.moe_layer_ids == moe_layers and ours.cfg.rope_interleave
    assert ours.cfg.moe.shared_hidden == 12 * {**ERNIE, **kw}["moe_num_shared_experts"]
    assert ours.layers[moe_layers[0]].ffn.router.expert_bias.abs().max() > 0
    _check_export(ours, tmp_path / "out", "Ernie4_5_MoeForCausalLM")


def test_ernie4_5_moe_selection_bias_matters_and_mtp_is_skipped(tmp_path):
    """Without its [1, E] correction bias the routing changes (so the bias is really read); MTP weights in
    the checkpoint are skipped as transformers skips them."""
    from safetensors.torch import save_file

    hf = _ernie_with_bias()
    hf.save_pretrained(tmp_path / "hf")
    ours = moekit.from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, V, (2, 15), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = ours(ids).logits
        for layer in ours.layers:
            if layer.is_moe:
                layer.ffn.router.expert_bias.zero_()
        assert (ours(ids).logits - before).abs().max() > 1e-3
    save_file({"model.mtp_linear_proj.0.weight": torch.randn(48, 96)}, str(tmp_path / "hf" / "mtp.safetensors"))
    torch.testing.assert_close(moekit.from_pretrained(tmp_path / "hf")(ids).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("change, match", [
    ({"use_bias": True}, "use_bias=true"),
    ({"moe_norm_min": 0.5}, "moe_norm_min=0.5"),
    ({"moe_layer_start_index": 4, "moe_layer_end_index": 3}, "leave no MoE layer"),
])
def test_ernie4_5_moe_refuses_by_name(tmp_path, change, match):
    _refused_after_editing(tmp_path, _build("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", **ERNIE), change, match)


def test_ernie_norm_min_acts_only_on_tiny_sums():
    """Why a clamp of 1e-12 is taken as the plain sum: transformers' router with moe_norm_min=1e-12 gives
    the same weights as dividing by the sum, and a large clamp does not."""
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeTopKRouter

    torch.manual_seed(0)
    cfg = transformers.Ernie4_5_MoeConfig(hidden_size=16, moe_num_experts=8, moe_k=2, moe_norm_min=1e-12)
    router = Ernie4_5_MoeTopKRouter(cfg)
    with torch.no_grad():
        router.weight.normal_(0, 1.0)
    x = torch.randn(64, 16)
    _, weights, _ = router(x)
    torch.testing.assert_close(weights.sum(-1), torch.ones(64))
    router.norm_min = 0.9
    assert (router(x)[1].sum(-1) - 1).abs().max() > 1e-2


@pytest.mark.parametrize("change, named", [
    (dict(qkv_bias=True), "ModelConfig.qkv_bias"),
    (dict(qk_norm="head"), "ModelConfig.qk_norm"),
    (dict(rope_interleave=False), "ModelConfig.rope_interleave"),
    (dict(moe_layers=(0, 1, 3), ffn_hidden=24), "ModelConfig.moe_layers"),  # no start / end / interval spells it
])
def test_ernie4_5_moe_export_refuses_what_it_cannot_express(tmp_path, change, named):
    cfg = moekit.ModelConfig(vocab_size=V, d_model=32, n_layers=4, n_heads=4, max_seq_len=64,
                             **{"rope_interleave": True, **change},
                             moe=moekit.MoEConfig(d_model=32, expert_hidden=16, num_experts=4, top_k=2,
                                                  num_shared_experts=1))
    with pytest.raises(ValueError, match=f"{named}="):
        to_hf(moekit.MoETransformer(cfg), tmp_path / "out", "Ernie4_5_MoeForCausalLM")


def test_ernie_preset_counts():
    """ernie-4.5-300b-a47b by arithmetic and against the name's 300B / 47B."""
    d, kv, layers, dense, E, K, F, ffn, vocab = 8192, 1024, 54, 3, 64, 8, 3584, 28672, 103424
    attn = d * (d + 2 * kv) + d * d
    total = layers * (attn + 2 * d) + dense * 3 * d * ffn + (layers - dense) * (E * 3 * d * F + E * d) \
        + 2 * vocab * d + d
    count = count_parameters(PRESETS["ernie-4.5-300b-a47b"].config)
    assert (count.total, count.active) == (total, total - (layers - dense) * (E - K) * 3 * d * F)
    assert matches_published(count.total, "300B") and matches_published(count.active, "47B")


# ---- Hunyuan MoE V1 ------------------------------------------------------------------------------
HUNYUAN = dict(hidden_size=48, intermediate_size=20, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
               head_dim=8, num_experts=5, moe_topk=2, attention_bias=True, rms_norm_eps=1e-5, eod_token_id=None,
               sep_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 5e4})


@pytest.mark.parametrize("kw", [{}, {"attention_bias": False, "tie_word_embeddings": True, "moe_topk": [3, 3, 3]}],
                         ids=["biases", "tied-list-topk"])
def test_hunyuan_moe_import_greedy_and_export(tmp_path, kw):
    hf = _build("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM", **{**HUNYUAN, **kw})
    ours = _check_import(hf, tmp_path / "hf")
    assert ours.cfg.qk_norm_after_rope and ours.cfg.moe.shared_hidden == 20
    assert ours.cfg.moe.top_k == (3 if kw else 2)
    _check_export(ours, tmp_path / "out", "HunYuanMoEV1ForCausalLM")


def test_hunyuan_ntk_alpha_rope_is_a_stretched_base(tmp_path):
    """Hunyuan-A13B's released rope ({"type": "dynamic", "alpha": 1000}) against transformers' own
    ntk_alpha frequencies: the same logits."""
    import json

    hf = _build("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM", **HUNYUAN)
    hf.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    data = json.loads(path.read_text())
    data["rope_parameters"] = {"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 5e4}
    path.write_text(json.dumps(data))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert theirs.model.rotary_emb.rope_type == "ntk_alpha"
    ours = moekit.from_pretrained(tmp_path / "hf")
    assert ours.cfg.rope_theta == pytest.approx(5e4 * 1000.0 ** (8 / 6))
    ids = torch.randint(0, V, (2, 15), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids).logits).abs().max().item() < 1e-4


def test_qk_norm_after_rope_matters():
    """Normalising the rotated heads (Hunyuan) is not normalising before the rotation (Qwen3)."""
    cfg = moekit.ModelConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=4, max_seq_len=64, qk_norm="head",
                             qk_norm_after_rope=True, ffn_hidden=24)
    torch.manual_seed(0)
    m = moekit.MoETransformer(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.5 * torch.randn_like(p)) if "norm" in name else p.normal_(0, 0.3)
    before = moekit.MoETransformer(cfg.replace(qk_norm_after_rope=False)).eval()
    before.load_state_dict(m.state_dict())
    ids = torch.randint(0, V, (1, 9))
    with torch.no_grad():
        assert (m(ids).logits - before(ids).logits).abs().max() > 1e-3
    with pytest.raises(ValueError, match="ModelConfig.qk_norm_after_rope"):
        cfg.replace(qk_norm="full")


@pytest.mark.parametrize("change, match", [
    ({"num_experts": [5, 5, 4]}, "num_experts=\\[5, 5, 4\\]"),
    ({"moe_intermediate_size": [16, 16, 16]}, "moe_intermediate_size=\\[16, 16, 16\\]"),
    ({"use_cla": True}, "use_cla=True"),
    ({"num_shared_expert": [1, 0, 1]}, "num_shared_expert="),
    ({"use_qk_norm": False}, "use_qk_norm=False"),
])
def test_hunyuan_moe_refuses_by_name(tmp_path, change, match):
    _refused_after_editing(tmp_path, _build("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM", **HUNYUAN), change,
                           match)


@pytest.mark.parametrize("change, named", [
    (dict(qk_norm_after_rope=False), "ModelConfig.qk_norm_after_rope"),
    (dict(first_k_dense=1, ffn_hidden=24), "ModelConfig.first_k_dense"),
    (dict(shared_expert_hidden=24), "MoEConfig.shared_expert_hidden"),
])
def test_hunyuan_moe_export_refuses_what_it_cannot_express(tmp_path, change, named):
    change = dict(change)
    shared = change.pop("shared_expert_hidden", 16)
    cfg = moekit.ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                             **{"qk_norm": "head", "qk_norm_after_rope": True, **change},
                             moe=moekit.MoEConfig(d_model=32, expert_hidden=16, num_experts=4, top_k=2,
                                                  num_shared_experts=1, shared_expert_hidden=shared))
    with pytest.raises(ValueError, match=f"{named}="):
        to_hf(moekit.MoETransformer(cfg), tmp_path / "out", "HunYuanMoEV1ForCausalLM")


def test_hunyuan_preset_counts():
    """hunyuan-a13b by arithmetic (tied head, per-head q/k norms) and against Tencent's 80B / 13B."""
    d, kv, layers, E, K, F, vocab = 4096, 1024, 32, 64, 8, 3072, 128167
    attn = 2 * d * d + 2 * d * kv + 2 * 128
    total = layers * (attn + (E + 1) * 3 * d * F + E * d + 2 * d) + vocab * d + d
    count = count_parameters(PRESETS["hunyuan-a13b"].config)
    assert (count.total, count.active) == (total, total - layers * (E - K) * 3 * d * F)
    assert matches_published(count.total, "80B") and matches_published(count.active, "13B")
