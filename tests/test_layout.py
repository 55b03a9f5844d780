"""Which layers are MoE: ``ModelConfig.moe_layers`` (any layout) beside the first_k_dense / moe_every
shortcuts, and the Qwen2/3-MoE ``mlp_only_layers`` / ``decoder_sparse_step`` layouts imported and
exported against transformers (tiny random models, fp32 on CPU, nothing downloaded)."""

import json

import pytest
import torch

import moekit
from moekit import ModelConfig, MoEConfig
from moekit.config import moe_layer_indices
from moekit.interop import InteropError, deepseek, mlp_experts, to_hf
from moekit.presets import get_preset, miniature

MOE = MoEConfig(d_model=16, expert_hidden=8, num_experts=4, top_k=2)


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 32, "d_model": 16, "n_layers": 4, "n_heads": 2, "ffn_hidden": 24, "moe": MOE,
                          **kw})


# ---- the config --------------------------------------------------------------------------------
def test_listed_layers_are_exactly_the_moe_layers():
    cfg = _cfg(n_layers=5, moe_layers=(0, 2, 3))
    assert cfg.moe_layer_ids == (0, 2, 3)
    model = moekit.MoETransformer(cfg)
    assert [b.is_moe for b in model.layers] == [True, False, True, True, False]
    assert [type(b.ffn).__name__ for b in model.layers] == ["MoELayer", "MLP", "MoELayer", "MoELayer", "MLP"]
    assert model(torch.randint(0, 32, (2, 5))).logits.shape == (2, 5, 32)


@pytest.mark.parametrize("n_layers, first_k_dense, moe_every", [(4, 0, 1), (4, 1, 1), (6, 0, 2), (7, 2, 3), (5, 5, 1)])
def test_the_shortcuts_are_the_same_layouts_as_a_list(n_layers, first_k_dense, moe_every):
    listed = moe_layer_indices(n_layers, start=first_k_dense, every=moe_every)
    if not listed:
        return
    short = _cfg(n_layers=n_layers, first_k_dense=first_k_dense, moe_every=moe_every)
    assert short.moe_layer_ids == listed == _cfg(n_layers=n_layers, moe_layers=listed).moe_layer_ids


def test_open_checkpoint_rules_as_transformers_reads_them():
    """Llama 4's interleave step (transformers' own default moe_layers), ERNIE 4.5's start / end / interval
    and Qwen's sparse step with mlp_only_layers (the rules in their modeling files)."""
    transformers = pytest.importorskip("transformers")
    for n, step in [(8, 1), (8, 2), (9, 4)]:
        llama4 = transformers.Llama4TextConfig(num_hidden_layers=n, interleave_moe_layer_step=step)
        assert moe_layer_indices(n, every=step) == tuple(llama4.moe_layers)
    for n, start, end, interval in [(12, 1, -1, 1), (12, 3, 9, 2), (10, 0, 4, 1)]:
        ernie = transformers.Ernie4_5_MoeConfig(num_hidden_layers=n, moe_layer_start_index=start,
                                                moe_layer_end_index=end, moe_layer_interval=interval)
        theirs = tuple(i for i in range(n) if (i + 1) % ernie.moe_layer_interval == 0
                       and ernie.moe_layer_start_index <= i <= ernie.moe_layer_end_index)  # modeling_ernie4_5_moe
        assert moe_layer_indices(n, start=start, stop=ernie.moe_layer_end_index + 1, every=interval) == theirs
    for n, step, only in [(6, 2, [3]), (5, 1, [1, 3]), (4, 3, [])]:
        theirs = tuple(i for i in range(n) if i not in only and (i + 1) % step == 0)  # modeling_qwen2_moe
        assert moe_layer_indices(n, every=step, dense=only) == theirs


@pytest.mark.parametrize("change, message", [
    (dict(moe_layers=()), "at least one MoE layer"),
    (dict(moe_layers=(4,)), r"0 \.\. n_layers - 1 = 3; \[4\]"),
    (dict(moe_layers=(-1, 2)), r"\[-1\] do not"),
    (dict(moe_layers=(1, 1)), r"\[1\] more than once"),
    (dict(moe_layers=(1,), first_k_dense=1), "first_k_dense=1 and moe_every=1 must keep their defaults"),
    (dict(moe_layers=(1,), moe_every=2), "first_k_dense=0 and moe_every=2 must keep their defaults"),
    (dict(moe_layers=(1,), moe=None), r"a dense model \(moe=None\)"),
    (dict(moe_layers="1,2"), "expected a list of ints or None"),
    (dict(moe_layers=(True,)), "expected a list of ints or None"),
    (dict(moe_layers=(1.0,)), "expected a list of ints or None"),
])
def test_a_bad_layer_list_is_refused_by_name(change, message):
    with pytest.raises(ValueError, match=r"ModelConfig\.moe_layers=.* is invalid: .*" + message):
        _cfg(**change)


def test_the_list_is_one_set_of_layers_and_json_reads_back_equal():
    cfg = _cfg(moe_layers=[3, 0])  # a list (as JSON holds it), in any order
    assert cfg.moe_layers == (0, 3) and cfg == _cfg(moe_layers=(0, 3))
    saved = json.loads(json.dumps(cfg.to_dict()))
    assert saved["moe_layers"] == [0, 3]
    assert ModelConfig.from_dict(saved) == cfg


def test_a_config_saved_without_the_field_loads_unchanged(tmp_path):
    """Configs written before moe_layers existed have no such key: they keep the shortcut layout."""
    from moekit.checkpoint import load_model, save_checkpoint
    from moekit.tokenizer import ByteTokenizer

    old = {k: v for k, v in get_preset("deepseek-v3").to_dict().items() if k != "moe_layers"}
    cfg = ModelConfig.from_dict(old)
    assert cfg == get_preset("deepseek-v3") and cfg.moe_layers is None and cfg.moe_layer_ids[0] == 3
    tiny = get_preset("tiny")
    for layout in (tiny, tiny.replace(moe_layers=(1,))):
        model = moekit.MoETransformer(layout).eval()
        save_checkpoint(tmp_path / str(layout.moe_layers), 1, model, layout, ByteTokenizer())
        back, _, _ = load_model(tmp_path / str(layout.moe_layers))
        assert back.cfg == layout
        ids = torch.randint(0, 256, (1, 8))
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_miniature_keeps_a_listed_layout():
    cfg = get_preset("qwen1.5-moe-a2.7b")
    big = cfg.replace(ffn_hidden=5632, moe_layers=moe_layer_indices(cfg.n_layers, every=2, dense=[3]))
    small = miniature(big)
    assert small.moe_layers == (1, 5) and small.n_layers == 6
    assert [small.is_moe_layer(i) for i in range(6)] == [big.is_moe_layer(i) for i in range(6)]


# ---- Hugging Face ------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")

QWEN = {
    "Qwen2MoeForCausalLM": ("Qwen2MoeConfig", dict(shared_expert_intermediate_size=24)),
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", dict(head_dim=8, norm_topk_prob=True)),
}
LAYOUTS = [  # (family, num_hidden_layers, mlp_only_layers, decoder_sparse_step, the MoE layers)
    ("Qwen2MoeForCausalLM", 4, [1], 1, (0, 2, 3)),
    ("Qwen2MoeForCausalLM", 6, [3], 2, (1, 5)),
    ("Qwen3MoeForCausalLM", 4, [1], 2, (3,)),
    ("Qwen3MoeForCausalLM", 5, [0, 2], 1, (1, 3, 4)),
]


def _qwen(tmp_path, arch, n_layers, only, step):
    cfg_name, kw = QWEN[arch]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=96, hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, initializer_range=0.1, eos_token_id=None, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, intermediate_size=40, mlp_only_layers=only, decoder_sparse_step=step, **kw)
    torch.manual_seed(0)
    hf = getattr(transformers, arch)(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf"


@pytest.mark.parametrize("arch, n_layers, only, step, moe_layers", LAYOUTS,
                         ids=[f"{a[:5]}-n{n}-only{o}-step{s}" for a, n, o, s, _ in LAYOUTS])
def test_qwen_layouts_import_and_export_with_transformers_logits(tmp_path, arch, n_layers, only, step, moe_layers):
    hf, path = _qwen(tmp_path, arch, n_layers, only, step)
    assert tuple(i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")) == moe_layers
    ours = moekit.from_pretrained(path)
    assert ours.cfg.moe_layer_ids == moe_layers
    assert [b.is_moe for b in ours.layers] == [i in moe_layers for i in range(n_layers)]
    ids = torch.randint(0, 96, (2, 15), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max().item() < 1e-4
    prompt = ids[:1, :6]
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 6:].tolist()
    assert moekit.generate(ours, prompt, 12).tokens[0] == theirs
    # and back out: transformers builds the same layers and computes the same logits
    assert to_hf(ours, tmp_path / "out", arch) == arch
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert tuple(i for i, layer in enumerate(back.model.layers) if hasattr(layer.mlp, "experts")) == moe_layers
    with torch.no_grad():
        assert (back(ids).logits - ours(ids).logits).abs().max().item() < 1e-4
    assert moekit.from_pretrained(tmp_path / "out").cfg == ours.cfg


def _qwen_config(**kw) -> dict:
    return {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
            "intermediate_size": 40, **kw}


def test_a_dense_prefix_still_reads_as_the_shortcuts():
    cfg = mlp_experts.model_config(_qwen_config(mlp_only_layers=[1, 0], decoder_sparse_step=2))
    assert (cfg.first_k_dense, cfg.moe_every, cfg.moe_layers) == (2, 2, None) and cfg.moe_layer_ids == (3,)
    cfg = mlp_experts.model_config(_qwen_config(mlp_only_layers=[1, 7], decoder_sparse_step=1))  # 7: no such layer
    assert cfg.moe_layers == (0, 2, 3)


@pytest.mark.parametrize("kw, message", [
    (dict(mlp_only_layers=[1, 3], decoder_sparse_step=2), r"mlp_only_layers=\[1, 3\] with decoder_sparse_step=2 "
                                                          "leaves no MoE layer"),
    (dict(mlp_only_layers=[1], decoder_sparse_step=-2), "decoder_sparse_step=-2"),
    (dict(mlp_only_layers=[1.5]), r"mlp_only_layers=\[1.5\]"),
])
def test_a_qwen_layout_that_cannot_be_read_is_named(kw, message):
    with pytest.raises(ValueError, match=message):
        mlp_experts.model_config(_qwen_config(**kw))


def test_deepseek_moe_layer_freq_other_than_1_is_refused_by_name(tmp_path):
    """transformers ignores moe_layer_freq, DeepSeek's own code reads layer % freq == 0: neither is safe."""
    hf = {"architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 3,
          "num_attention_heads": 4, "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
          "intermediate_size": 40, "moe_intermediate_size": 12, "n_routed_experts": 8, "num_experts_per_tok": 2,
          "first_k_dense_replace": 1}
    assert deepseek.model_config({**hf, "moe_layer_freq": 1}).moe_layer_ids == (1, 2)
    with pytest.raises(ValueError, match="moe_layer_freq=2 is not supported"):
        deepseek.model_config({**hf, "moe_layer_freq": 2})
    (tmp_path / "config.json").write_text(json.dumps({**hf, "moe_layer_freq": 2}))
    with pytest.raises(InteropError, match="moe_layer_freq=2"):
        moekit.from_pretrained(tmp_path)
