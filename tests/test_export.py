"""moekit -> Hugging Face export: every export matches transformers' logits or is refused by name.

Tiny random moekit models, one base per exportable family, each perturbed field by field; fp32 on
CPU, nothing downloaded."""

import dataclasses
import json
import pytest
import torch

import moekit
from moekit import ModelConfig, MoEConfig
from moekit.interop import InteropError, from_pretrained, load_hf_tokenizer, to_hf
from moekit.interop.export import EXPORTERS
from moekit.tokenizer import ByteTokenizer

transformers = pytest.importorskip("transformers")

V = 64  # vocabulary


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny products: threads only add synchronisation (tens of ms a product on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gqa(moe: MoEConfig, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=V, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=64, moe=moe,
                       **{"n_layers": 2, **kw})


BASES = {  # a model each family expresses, with the family's own features switched on
    "MixtralForCausalLM": _gqa(MoEConfig(d_model=32, expert_hidden=16, num_experts=4, top_k=2)),
    "DbrxForCausalLM": _gqa(MoEConfig(d_model=32, expert_hidden=16, num_experts=4, top_k=2, normalize_p=2.0),
                            norm="layernorm", norm_eps=1e-5, clip_qkv=0.3),
    "Qwen3MoeForCausalLM": _gqa(MoEConfig(d_model=32, expert_hidden=16, num_experts=4, top_k=2), n_layers=3,
                                qk_norm="head", first_k_dense=1, ffn_hidden=40),
    "Qwen2MoeForCausalLM": _gqa(MoEConfig(d_model=32, expert_hidden=16, num_experts=4, top_k=2, normalize_weights=False,
                                          num_shared_experts=1, shared_expert_hidden=24, shared_expert_gate=True),
                                n_layers=3, qkv_bias=True, moe_every=2, ffn_hidden=40),
    "OlmoeForCausalLM": _gqa(MoEConfig(d_model=32, expert_hidden=16, num_experts=4, top_k=2, normalize_weights=False),
                             qk_norm="full"),
    "DeepseekV3ForCausalLM": ModelConfig(
        vocab_size=V, d_model=32, n_layers=3, n_heads=4, max_seq_len=64, attention="mla", q_lora_rank=16,
        kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, rope_interleave=True, first_k_dense=1,
        ffn_hidden=40, moe=MoEConfig(d_model=32, expert_hidden=12, num_experts=8, top_k=2, router="sigmoid",
                                     n_group=4, topk_group=2, num_shared_experts=1, routed_scaling_factor=2.5)),
}
GRANITE_MUP = dict(qkv_bias=True, attn_out_bias=True, embedding_multiplier=2.0, logit_multiplier=0.4,
                   residual_multiplier=0.5, attention_multiplier=0.2)
BASES["GraniteMoeForCausalLM"] = _gqa(MoEConfig(d_model=32, expert_hidden=16, num_experts=4, top_k=2,
                                                softmax_order="after"), **GRANITE_MUP)
BASES["GraniteMoeSharedForCausalLM"] = _gqa(MoEConfig(d_model=32, expert_hidden=16, num_experts=4, top_k=2,
                                                      num_shared_experts=1, shared_expert_hidden=24), **GRANITE_MUP)
BASES["PhimoeForCausalLM"] = _gqa(MoEConfig(d_model=32, expert_hidden=16, num_experts=4, top_k=2, router="sparsemixer",
                                            normalize_weights=False, sparsemixer_eps=0.2),
                                  norm="layernorm", norm_bias=True, norm_eps=1e-5, qkv_bias=True, attn_out_bias=True,
                                  lm_head_bias=True)
BASES["Glm4MoeForCausalLM"] = _gqa(MoEConfig(d_model=32, expert_hidden=12, num_experts=8, top_k=2, router="sigmoid",
                                             n_group=4, topk_group=2, num_shared_experts=1,
                                             routed_scaling_factor=2.5),
                                   n_layers=3, first_k_dense=1, ffn_hidden=40, qkv_bias=True, qk_norm="head",
                                   partial_rotary_factor=0.5, norm_eps=1e-5)
BASES["Dots1ForCausalLM"] = _gqa(MoEConfig(d_model=32, expert_hidden=12, num_experts=6, top_k=2, router="sigmoid",
                                           n_group=3, topk_group=2, normalize_weights=False, num_shared_experts=2),
                                 n_layers=3, first_k_dense=1, ffn_hidden=40, qkv_bias=True, attn_out_bias=True,
                                 qk_norm="head")
BASES["Ernie4_5_MoeForCausalLM"] = _gqa(MoEConfig(d_model=32, expert_hidden=12, num_experts=6, top_k=2,
                                                  num_shared_experts=2), n_layers=4,
                                        moe_layers=(1, 3), ffn_hidden=40, rope_interleave=True)
BASES["HunYuanMoEV1ForCausalLM"] = _gqa(MoEConfig(d_model=32, expert_hidden=16, num_experts=5, top_k=2,
                                                  num_shared_experts=1),  # shared width = expert width
                                        qkv_bias=True, attn_out_bias=True, qk_norm="head", qk_norm_after_rope=True)


def moe(**kw):
    return lambda c: c.replace(moe=c.moe.replace(**kw))


def model(**kw):
    return lambda c: c.replace(**kw)


MLA = dict(attention="mla", q_lora_rank=0, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
           qk_norm=None, clip_qkv=0.0)
GQA = dict(attention="gqa", n_kv_heads=2)
EC = dict(router="expert_choice", capacity_factor=1.0, n_group=1, topk_group=1, aux_loss_coef=0.0,
          seq_aux_loss_coef=0.0, bias_update_rate=0.0)

# (owner.field, label, change[, the field a refusal names when not this one]): every field of
# ModelConfig and MoEConfig is perturbed at least once; the export must then be refused naming that
# field, or match transformers.
PERTURBATIONS = [
    ("MoEConfig.d_model", "48", lambda c: c.replace(d_model=48, head_dim=None, moe=c.moe.replace(d_model=48))),
    ("MoEConfig.expert_hidden", "8", moe(expert_hidden=8)),
    ("MoEConfig.num_experts", "16", moe(num_experts=16)),
    ("MoEConfig.top_k", "1", moe(top_k=1)),
    ("MoEConfig.top_k", "3", moe(top_k=3)),
    ("MoEConfig.router", "switch", moe(router="switch", top_k=1)),
    ("MoEConfig.router", "noisy", moe(router="noisy_topk", normalize_weights=True, normalize_p=1.0)),
    ("MoEConfig.router", "sigmoid", moe(router="sigmoid", softmax_order="before")),
    ("MoEConfig.router", "softmax", moe(router="softmax_topk")),
    ("MoEConfig.router", "expert_choice", moe(**EC)),
    ("MoEConfig.router", "soft", lambda c: moe(router="soft", top_k=c.moe.num_experts, n_group=1, topk_group=1)(c)),
    ("MoEConfig.normalize_weights", "flip", lambda c: moe(normalize_weights=not c.moe.normalize_weights,
                                                          normalize_p=1.0)(c)),
    ("MoEConfig.normalize_p", "2", moe(normalize_p=2.0, normalize_weights=True)),
    ("MoEConfig.normalize_p", "0.5", moe(normalize_p=0.5, normalize_weights=True)),
    ("MoEConfig.softmax_order", "after", moe(softmax_order="after", normalize_weights=True, normalize_p=1.0)),
    ("MoEConfig.routed_scaling_factor", "2", moe(routed_scaling_factor=2.0)),
    ("MoEConfig.routed_scaling_factor", "1", moe(routed_scaling_factor=1.0)),
    ("MoEConfig.router_jitter", "switch", moe(router="switch", top_k=1, router_jitter=0.1), "MoEConfig.router"),
    ("MoEConfig.n_group", "2", moe(n_group=2, topk_group=1)),
    ("MoEConfig.n_group", "1", moe(n_group=1, topk_group=1)),
    ("MoEConfig.topk_group", "3", moe(topk_group=3)),
    ("MoEConfig.group_score", "flip", lambda c: moe(group_score="max" if c.moe.group_score == "top2_sum"
                                                    else "top2_sum")(c)),
    ("MoEConfig.aux_loss_coef", "0.05", moe(aux_loss_coef=0.05)),
    ("MoEConfig.lb_convention", "flip", lambda c: moe(aux_loss_coef=0.02, lb_convention="standard" if
                                                      c.moe.lb_convention == "hf_compat" else "hf_compat")(c)),
    ("MoEConfig.z_loss_coef", "1e-3", moe(z_loss_coef=1e-3)),
    ("MoEConfig.seq_aux_loss_coef", "1e-3", moe(seq_aux_loss_coef=1e-3)),
    ("MoEConfig.bias_update_rate", "0.01", moe(bias_update_rate=0.01)),
    ("MoEConfig.capacity_factor", "eval", moe(capacity_factor=1.0)),
    ("MoEConfig.capacity_factor", "train-only", moe(capacity_factor=1.0, eval_capacity_factor=None)),
    ("MoEConfig.eval_capacity_factor", "1", moe(eval_capacity_factor=1.0)),
    ("MoEConfig.drop_policy", "score", moe(drop_policy="score")),
    ("MoEConfig.activation", "gelu", moe(activation="gelu")),
    ("MoEConfig.mlp_bias", "true", moe(mlp_bias=True)),
    ("MoEConfig.num_shared_experts", "2", moe(num_shared_experts=2)),
    ("MoEConfig.num_shared_experts", "0", moe(num_shared_experts=0, shared_expert_hidden=None,
                                              shared_expert_gate=False)),
    ("MoEConfig.shared_expert_hidden", "20", lambda c: moe(shared_expert_hidden=20,
                                                           num_shared_experts=c.moe.num_shared_experts or 1)(c)),
    ("MoEConfig.shared_expert_gate", "flip", lambda c: moe(shared_expert_gate=not c.moe.shared_expert_gate,
                                                           num_shared_experts=c.moe.num_shared_experts or 1)(c)),
    ("MoEConfig.dense_hidden", "16", moe(dense_hidden=16)),
    ("MoEConfig.init_std", "0.05", moe(init_std=0.05)),
    ("MoEConfig.router", "top_p", moe(router="top_p", n_group=1, topk_group=1, bias_update_rate=0.0,
                                      seq_aux_loss_coef=0.0)),
    ("MoEConfig.top_p_threshold", "0.6", moe(top_p_threshold=0.6)),
    ("MoEConfig.top_p_threshold", "top_p", moe(router="top_p", top_p_threshold=0.6, n_group=1, topk_group=1,
                                               bias_update_rate=0.0, seq_aux_loss_coef=0.0), "MoEConfig.router"),
    ("MoEConfig.router_entropy_coef", "1e-4", moe(router_entropy_coef=1e-4)),
    ("MoEConfig.router", "relu", moe(router="relu", n_group=1, topk_group=1, bias_update_rate=0.0,
                                     seq_aux_loss_coef=0.0)),
    ("MoEConfig.relu_l1_init", "1e-6", moe(relu_l1_init=1e-6)),
    ("MoEConfig.relu_l1_growth", "1.5", moe(relu_l1_growth=1.5)),
    ("MoEConfig.num_null_experts", "2", moe(num_null_experts=2)),
    ("MoEConfig.null_expert", "identity", moe(null_expert="identity")),
    ("MoEConfig.null_expert", "identity-null", moe(null_expert="identity", num_null_experts=1),
     "MoEConfig.num_null_experts"),
    ("ModelConfig.vocab_size", "80", model(vocab_size=80)),
    ("ModelConfig.d_model", "48", lambda c: c.replace(d_model=48, head_dim=None, moe=c.moe.replace(d_model=48))),
    ("ModelConfig.n_layers", "+1", lambda c: model(n_layers=c.n_layers + 1)(c)),
    ("ModelConfig.n_heads", "8", model(n_heads=8, n_kv_heads=None, head_dim=None)),
    ("ModelConfig.n_kv_heads", "4", model(n_kv_heads=4)),
    ("ModelConfig.n_kv_heads", "1", model(n_kv_heads=1)),
    ("ModelConfig.head_dim", "16", model(head_dim=16)),
    ("ModelConfig.max_seq_len", "48", model(max_seq_len=48)),
    ("ModelConfig.attention", "mla", model(**MLA)),
    ("ModelConfig.attention", "gqa", lambda c: model(**GQA, head_dim=8, rope_interleave=c.rope_interleave
                                                     and c.attention == "gqa")(c)),
    ("ModelConfig.qkv_bias", "flip", lambda c: model(qkv_bias=not c.qkv_bias)(c)),
    ("ModelConfig.qk_norm", "None", model(qk_norm=None)),
    ("ModelConfig.qk_norm", "head", model(qk_norm="head")),
    ("ModelConfig.qk_norm", "full", model(qk_norm="full")),
    ("ModelConfig.clip_qkv", "0.5", model(clip_qkv=0.5)),
    ("ModelConfig.clip_qkv", "0", model(clip_qkv=0.0)),
    ("ModelConfig.q_lora_rank", "12", model(q_lora_rank=12)),
    ("ModelConfig.q_lora_rank", "0", model(q_lora_rank=0)),
    ("ModelConfig.kv_lora_rank", "12", model(kv_lora_rank=12)),
    ("ModelConfig.qk_nope_head_dim", "4", model(qk_nope_head_dim=4)),
    ("ModelConfig.qk_rope_head_dim", "8", model(qk_rope_head_dim=8)),
    ("ModelConfig.v_head_dim", "12", model(v_head_dim=12)),
    ("ModelConfig.rope_theta", "500", model(rope_theta=500.0)),
    ("ModelConfig.rope_interleave", "flip", lambda c: model(rope_interleave=not c.rope_interleave)(c)),
    ("ModelConfig.rope_scaling", "linear", model(rope_scaling={"type": "linear", "factor": 2.0})),
    ("ModelConfig.rope_scaling", "yarn", model(rope_scaling={"type": "yarn", "factor": 4.0,
                                                             "original_max_seq_len": 16})),
    ("ModelConfig.norm", "flip", lambda c: model(norm="layernorm" if c.norm == "rmsnorm" else "rmsnorm")(c)),
    ("ModelConfig.norm_eps", "1e-3", model(norm_eps=1e-3)),
    ("ModelConfig.ffn_hidden", "24", model(ffn_hidden=24)),
    ("ModelConfig.activation", "gelu", lambda c: model(activation="gelu", ffn_hidden=c.ffn_hidden or 24)(c)),
    ("ModelConfig.moe", "None", lambda c: model(moe=None, ffn_hidden=c.ffn_hidden or 24)(c)),
    ("ModelConfig.moe_every", "2", model(moe_every=2, ffn_hidden=24)),
    ("ModelConfig.first_k_dense", "1", model(first_k_dense=1, ffn_hidden=24)),
    ("ModelConfig.first_k_dense", "0", model(first_k_dense=0)),
    # a layout no shortcut spells (layer 1 dense between MoE layers), and a dense prefix spelt as a list
    ("ModelConfig.moe_layers", "not-a-prefix", lambda c: model(moe_layers=(0, *range(2, c.n_layers)), first_k_dense=0,
                                                               moe_every=1, ffn_hidden=c.ffn_hidden or 24)(c)),
    ("ModelConfig.moe_layers", "prefix", lambda c: model(moe_layers=tuple(range(1, c.n_layers)), first_k_dense=0,
                                                         moe_every=1, ffn_hidden=c.ffn_hidden or 24)(c)),
    ("ModelConfig.parallel_residual_mlp", "true", lambda c: model(parallel_residual_mlp=True,
                                                                  ffn_hidden=c.ffn_hidden or 24)(c)),
    ("ModelConfig.sandwich_norm", "true", model(sandwich_norm=True)),
    ("ModelConfig.tie_embeddings", "flip", lambda c: model(tie_embeddings=not c.tie_embeddings)(c)),
    ("ModelConfig.embedding_multiplier", "2", model(embedding_multiplier=2.0)),
    ("ModelConfig.logit_multiplier", "0.5", model(logit_multiplier=0.5)),
    ("ModelConfig.attn_logit_softcap", "5", model(attn_logit_softcap=5.0)),
    ("ModelConfig.attn_out_bias", "flip", lambda c: model(attn_out_bias=not c.attn_out_bias)(c)),
    ("ModelConfig.residual_multiplier", "0.7", model(residual_multiplier=0.7)),
    ("ModelConfig.attention_multiplier", "0.3", model(attention_multiplier=0.3)),
    ("ModelConfig.attention_multiplier", "None", model(attention_multiplier=None)),
    ("ModelConfig.norm_bias", "flip", lambda c: model(norm_bias=not c.norm_bias)(c)),
    ("ModelConfig.lm_head_bias", "flip", lambda c: model(lm_head_bias=not c.lm_head_bias)(c)),
    ("MoEConfig.router", "sparsemixer", moe(router="sparsemixer", normalize_weights=False, n_group=1, topk_group=1,
                                            bias_update_rate=0.0)),
    ("MoEConfig.sparsemixer_eps", "0.05", moe(sparsemixer_eps=0.05)),
    ("ModelConfig.init_std", "0.05", model(init_std=0.05)),
    ("ModelConfig.qk_norm_after_rope", "flip", lambda c: model(qk_norm_after_rope=not c.qk_norm_after_rope)(c)),
    ("ModelConfig.partial_rotary_factor", "0.5", model(partial_rotary_factor=0.5)),
    ("ModelConfig.partial_rotary_factor", "1", model(partial_rotary_factor=1.0)),
    ("ModelConfig.partial_rotary_factor", "0.55", model(partial_rotary_factor=0.55)),  # same 4 rotary dims as 0.5
]


def _cases():
    """(family, perturbation, config) for every perturbation that gives a valid config of the base."""
    cases = []
    for arch, base in BASES.items():
        for field, label, change, *named in PERTURBATIONS:
            try:
                cfg = change(base)
            except ValueError:  # not a valid config for this base (e.g. a group setting without groups)
                continue
            if cfg != base:
                cases.append(pytest.param(arch, field, (named or [field])[0], cfg,
                                          id=f"{arch.removesuffix('ForCausalLM')}-{field}-{label}"))
    return cases


CASES = _cases()


def _randomised(cfg: ModelConfig, seed: int = 0) -> moekit.MoETransformer:
    """A model whose weights are large enough that every feature moves the logits, with a non-zero
    selection bias where the family keeps one (DeepSeek-V3's e_score_correction_bias)."""
    torch.manual_seed(seed)
    m = moekit.MoETransformer(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
        if cfg.moe is not None and cfg.moe.router == "sigmoid":
            for layer in m.layers:
                if hasattr(layer.ffn, "router"):
                    layer.ffn.router.expert_bias.copy_(torch.randn(cfg.moe.num_routed) * 0.3)
    return m


def _max_diff_with_transformers(m: moekit.MoETransformer, out) -> float:
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, m.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (hf(ids).logits - m(ids).logits).abs().max().item()


def test_every_config_field_is_perturbed():
    """A new config field must join PERTURBATIONS, which then checks that every exporter refuses it
    by name or carries it into transformers."""
    assert set(BASES) == set(EXPORTERS), "every exporter needs a base model here"
    fields = {f"{cls.__name__}.{f.name}" for cls in (ModelConfig, MoEConfig) for f in dataclasses.fields(cls)}
    covered = {c.values[1] for c in CASES}
    assert fields - {p[0] for p in PERTURBATIONS} == set()
    assert fields - covered == set(), "perturbations that fit no base config"


@pytest.mark.parametrize("arch", list(BASES))
def test_bases_export_with_transformers_logits(tmp_path, arch):
    m = _randomised(BASES[arch])
    assert to_hf(m, tmp_path / "out", arch) == arch
    assert _max_diff_with_transformers(m, tmp_path / "out") < 1e-4
    back = from_pretrained(tmp_path / "out")
    assert back.cfg == m.cfg
    ids = torch.randint(0, V, (1, 9))
    torch.testing.assert_close(back(ids).logits, m(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch, field, named, cfg", CASES)
def test_export_matches_transformers_or_is_refused_by_name(tmp_path, arch, field, named, cfg):
    m = _randomised(cfg)
    try:
        to_hf(m, tmp_path / "out", arch)
    except ValueError as err:
        assert f"{named}=" in str(err), str(err)
        assert not (tmp_path / "out").exists()
        return
    assert _max_diff_with_transformers(m, tmp_path / "out") < 1e-4
    assert from_pretrained(tmp_path / "out").cfg == cfg  # training settings travel under "moekit"


def test_refusals_are_real():
    """The features refused in the issue do change the logits (same weights, feature off vs on), so
    the refusals are not vacuous."""
    from moekit.interop.export import export

    base = BASES["MixtralForCausalLM"]
    for change in (moe(capacity_factor=1.0), moe(normalize_p=2.0), moe(routed_scaling_factor=2.0),
                   moe(softmax_order="before", normalize_weights=False)):
        m = _randomised(change(base))
        plain = _randomised(base)
        plain.load_state_dict(m.state_dict())
        ids = torch.randint(0, V, (2, 12))
        with torch.no_grad():
            assert (m(ids).logits - plain(ids).logits).abs().max().item() > 1e-3
        with pytest.raises(ValueError, match="MixtralForCausalLM cannot express MoEConfig"):
            export(m, "MixtralForCausalLM")


# ---- the issue's cases ---------------------------------------------------------------------------
def _tiny(**moe_kw) -> moekit.MoETransformer:
    cfg = ModelConfig.from_name("tiny")
    return _randomised(cfg.replace(moe=cfg.moe.replace(**moe_kw)))


def test_trained_selection_bias_is_refused_by_name(tmp_path):
    """10 training steps of aux-loss-free balancing leave a non-zero bias that Mixtral cannot hold."""
    from moekit.moe.layer import update_expert_biases

    m = _tiny(bias_update_rate=0.01).train()
    ids = torch.randint(0, 256, (4, 32))
    for _ in range(10):
        m(ids)
        update_expert_biases(m)
    assert m.layers[0].ffn.router.expert_bias.abs().max() > 0
    with pytest.raises(ValueError, match=r"MixtralForCausalLM cannot express expert_bias: .*non-zero"):
        to_hf(m.eval(), tmp_path / "a", "MixtralForCausalLM")
    with pytest.raises(ValueError, match="fits no exportable architecture: .*expert_bias"):
        to_hf(m, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("moe_kw, named", [
    (dict(capacity_factor=1.25), "MoEConfig.capacity_factor=1.25"),
    (dict(eval_capacity_factor=2.0), "MoEConfig.eval_capacity_factor=2.0"),
    (dict(normalize_p=2.0), "MoEConfig.normalize_p=2.0"),
    (dict(routed_scaling_factor=2.5), "MoEConfig.routed_scaling_factor=2.5"),
])
def test_issue_features_refused_by_name(tmp_path, moe_kw, named):
    with pytest.raises(ValueError, match=f"MixtralForCausalLM cannot express .*{named}"):
        to_hf(_tiny(**moe_kw), tmp_path / "out", "MixtralForCausalLM")


def test_capacity_for_training_only_exports_and_comes_back(tmp_path):
    m = _tiny(capacity_factor=1.25, eval_capacity_factor=None, drop_policy="score")
    to_hf(m, tmp_path / "out")
    assert _max_diff_with_transformers(m, tmp_path / "out") < 1e-4
    assert from_pretrained(tmp_path / "out").cfg == m.cfg


@pytest.mark.parametrize("convention", ["standard", "hf_compat"])
def test_balance_loss_value_survives_both_ways(tmp_path, convention):
    """transformers' router_aux_loss_coef x its aux loss equals moekit's weighted balance term (one
    MoE layer, where transformers' concatenation over layers changes nothing), and the coefficient
    and convention come back exactly."""
    cfg = BASES["MixtralForCausalLM"].replace(n_layers=1)
    m = _randomised(cfg.replace(moe=cfg.moe.replace(aux_loss_coef=0.02, lb_convention=convention)))
    to_hf(m, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["router_aux_loss_coef"] == pytest.approx(0.02 if convention == "hf_compat" else 0.01)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        theirs = hf.config.router_aux_loss_coef * hf(ids, output_router_logits=True).aux_loss
        ours = m(ids).aux_loss
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-7)
    assert from_pretrained(tmp_path / "out").cfg == m.cfg
    # HF -> moekit -> HF keeps transformers' coefficient
    hf.save_pretrained(tmp_path / "hf")
    again = from_pretrained(tmp_path / "hf")
    assert again.cfg == m.cfg  # transformers kept the "moekit" key through its own save
    cfg_hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    del cfg_hf["moekit"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg_hf))
    plain = from_pretrained(tmp_path / "hf")
    assert plain.cfg.moe.lb_convention == "hf_compat" and plain.cfg.moe.aux_loss_coef == written["router_aux_loss_coef"]
    to_hf(plain, tmp_path / "hf2")
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["router_aux_loss_coef"] == \
        written["router_aux_loss_coef"]


def test_moekit_key_that_contradicts_the_hf_fields_is_refused(tmp_path):
    to_hf(_tiny(), tmp_path / "out")
    path = tmp_path / "out" / "config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "moekit": {"format": 1, "config": {"moe": {"normalize_p": 2.0}}}}))
    with pytest.raises(InteropError, match="contradicts the Hugging Face fields: MoEConfig.normalize_p=2.0"):
        from_pretrained(tmp_path / "out")
    path.write_text(json.dumps({**cfg, "moekit": {"format": 1, "config": {"moe": {"no_such_field": 1}}}}))
    with pytest.raises(InteropError, match="no_such_field"):
        from_pretrained(tmp_path / "out")


# ---- tokenizer -------------------------------------------------------------------------------------
def test_byte_tokenizer_json_encodes_and_decodes_as_moekit(tmp_path):
    byte, hf = ByteTokenizer(), ByteTokenizer().to_hf()
    texts = ["hello world", "  two spaces\n\ttab", "héllo wörld ✓ 日本語 🙂", "", "\x00\x7f"]
    for t in texts:
        assert hf.encode(t) == byte.encode(t)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):  # arbitrary ids, invalid UTF-8 included
        ids = torch.randint(0, 256, (int(torch.randint(0, 12, (1,), generator=gen)),), generator=gen).tolist()
        assert hf.decode(ids) == byte.decode(ids)
    to_hf(_tiny(), tmp_path / "out", tokenizer=byte)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for t in texts:
        assert auto(t, add_special_tokens=True)["input_ids"] == byte.encode(t)
        assert auto.decode(byte.encode(t)) == t
    assert isinstance(load_hf_tokenizer(tmp_path / "out"), ByteTokenizer)


def test_cli_round_trip_restores_config_and_tokenizer(tmp_path, capsys):
    """convert --to-hf then --from-hf: the same ModelConfig (training settings included) and the
    byte tokenizer, with which eval and generate run."""
    from moekit.checkpoint import load_model, save_checkpoint
    from moekit.cli import main

    m = _tiny(capacity_factor=1.25, eval_capacity_factor=None, bias_update_rate=0.01, seq_aux_loss_coef=1e-3)
    save_checkpoint(tmp_path / "mk", 0, m, m.cfg, ByteTokenizer())
    assert main(["--debug", "convert", "--to-hf", str(tmp_path / "mk"), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert main(["--debug", "convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back, tok, _ = load_model(tmp_path / "back")
    assert back.cfg == m.cfg
    assert isinstance(tok, ByteTokenizer)
    ids = torch.randint(0, 256, (1, 9))
    torch.testing.assert_close(back(ids).logits, m(ids).logits, rtol=0, atol=0)
    (tmp_path / "data.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    capsys.readouterr()
    assert main(["--debug", "eval", "--model", str(tmp_path / "back"), "--data", str(tmp_path / "data.txt"),
                 "--seq-len", "32", "--batch-size", "2", "--max-tokens", "256"]) == 0
    assert "loss" in capsys.readouterr().out
    for model_dir in (tmp_path / "back", tmp_path / "hf"):
        assert main(["--debug", "generate", "--model", str(model_dir), "--prompt", "the ", "--max-new-tokens", "4",
                     "--json"]) == 0
        assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ids"]) == 4
