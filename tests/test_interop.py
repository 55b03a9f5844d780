"""Hugging Face checkpoints in: tiny random transformers models built and saved locally, loaded by
moekit, logits and greedy continuations compared (fp32, CPU, nothing downloaded)."""

import json
import shutil

import pytest
import torch

import moekit
from moekit.interop import InteropError, to_hf

transformers = pytest.importorskip("transformers")


def _tiny_mixtral(tmp_path, shard=False, **kw):
    cfg = transformers.MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=128, initializer_range=0.1,
                                     **kw)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    out = tmp_path / "hf"
    model.save_pretrained(out, max_shard_size="20KB" if shard else "5GB")
    return model, out


@pytest.mark.parametrize("shard", [False, True], ids=["single", "sharded"])
def test_mixtral_logits_and_greedy_equal_transformers(tmp_path, shard):
    hf, path = _tiny_mixtral(tmp_path, shard=shard)
    if shard:
        assert (path / "model.safetensors.index.json").is_file()
    ours = moekit.from_pretrained(path)
    ids = torch.randint(0, 96, (3, 17))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids).logits).abs().max().item()
    assert diff < 1e-4
    prompt = ids[:1, :6]
    theirs = hf.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, 6:].tolist()
    assert moekit.generate(ours, prompt, 16).tokens[0] == theirs


FAMILIES = {
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=40, head_dim=8,
                       mlp_only_layers=[0], norm_topk_prob=True)),
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=24, intermediate_size=40, decoder_sparse_step=2)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, intermediate_size=16)),
    "deepseek-v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
        intermediate_size=40, moe_intermediate_size=12, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
        topk_group=2, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        rope_scaling=None)),
    "deepseek-v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=8, intermediate_size=40, moe_intermediate_size=12, n_routed_experts=8, num_experts_per_tok=3,
        n_group=4, topk_group=2, n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=16.0,
        topk_method="group_limited_greedy", rope_scaling=None)),
}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}
FAMILIES["deepseek-v3-yarn"] = (*FAMILIES["deepseek-v3"][:2], {
    **FAMILIES["deepseek-v3"][2], "rope_scaling": None,
    "rope_parameters": {**YARN, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}})
FAMILIES["qwen3-moe-yarn"] = (*FAMILIES["qwen3-moe"][:2], {**FAMILIES["qwen3-moe"][2], "rope_parameters": YARN})
# a dense layer between MoE layers (not a prefix): moekit lists the MoE layers (ModelConfig.moe_layers)
FAMILIES["qwen2-moe-mlp-only-1"] = (*FAMILIES["qwen2-moe"][:2], {**FAMILIES["qwen2-moe"][2], "decoder_sparse_step": 1,
                                                                 "mlp_only_layers": [1]})


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_logits_and_greedy_equal_transformers(tmp_path, family):
    cfg_name, model_name, kw = FAMILIES[family]
    kw = {"num_key_value_heads": 2, **kw}
    cfg = getattr(transformers, cfg_name)(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                          max_position_embeddings=128, initializer_range=0.1, eos_token_id=None, **kw)
    torch.manual_seed(0)
    hf = getattr(transformers, model_name)(cfg).eval()
    if family.startswith("deepseek-v3"):  # a non-zero selection bias: it must pick experts without weighting them
        with torch.no_grad():
            for layer in hf.model.layers[1:]:
                layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.5)
    hf.save_pretrained(tmp_path / "hf")
    ours = moekit.from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 96, (2, 15))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max().item() < 1e-4
    if family.endswith("yarn"):  # the scaling is read and matters
        assert ours.cfg.rope_scaling["type"] == "yarn" and ours.cfg.rope_scaling["factor"] == 4.0
        plain = moekit.MoETransformer(ours.cfg.replace(rope_scaling=None)).eval()
        plain.load_state_dict(ours.state_dict())
        with torch.no_grad():
            assert (plain(ids).logits - ours(ids).logits).abs().max().item() > 1e-3
    prompt = ids[:1, :6]
    theirs = hf.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, 6:].tolist()
    assert moekit.generate(ours, prompt, 16).tokens[0] == theirs


def _tiny_dbrx(tmp_path, p=2.0, **ffn):
    cfg = transformers.DbrxConfig(
        vocab_size=96, d_model=32, n_heads=4, n_layers=2, max_seq_len=128, initializer_range=0.1,
        attn_config=dict(kv_n_heads=2, clip_qkv=0.3, rope_theta=10000.0),
        ffn_config=dict(ffn_hidden_size=24, moe_num_experts=4, moe_top_k=2, moe_normalize_expert_weights=p, **ffn))
    torch.manual_seed(0)
    model = transformers.DbrxForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_dbrx_logits_greedy_and_round_trip(tmp_path, p):
    """Fused Wqkv split, [E·F, D] expert tensors, bias-free LayerNorm, clip_qkv, p-norm renormalisation."""
    hf, path = _tiny_dbrx(tmp_path, p)
    ours = moekit.from_pretrained(path)
    assert ours.cfg.clip_qkv == 0.3 and ours.cfg.norm == "layernorm" and ours.cfg.moe.normalize_p == p
    ids = torch.randint(0, 96, (2, 15))
    with torch.no_grad():
        block = hf.transformer.blocks[0].norm_attn_norm
        qkv = block.attn.Wqkv(block.norm_1(hf.transformer.wte(ids)))
        assert qkv.abs().max() > 0.3  # the clamp is exercised
        assert (hf(ids).logits - ours(ids).logits).abs().max().item() < 1e-4
    prompt = ids[:1, :6]
    theirs = hf.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, 6:].tolist()
    assert moekit.generate(ours, prompt, 16).tokens[0] == theirs
    assert to_hf(ours, tmp_path / "out") == "DbrxForCausalLM"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (back(ids).logits - ours(ids).logits).abs().max().item() < 1e-4
    torch.testing.assert_close(moekit.from_pretrained(tmp_path / "out")(ids).logits, ours(ids).logits)


def test_dbrx_unsupported_activation_and_bad_expert_rows(tmp_path):
    _, path = _tiny_dbrx(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "ffn_config": {**cfg["ffn_config"],
                                                                         "ffn_act_fn": {"name": "gelu"}}}))
    with pytest.raises(InteropError, match="ffn_act_fn.name='gelu'"):
        moekit.from_pretrained(path)
    (path / "config.json").write_text(json.dumps({**cfg, "ffn_config": {**cfg["ffn_config"], "moe_num_experts": 5}}))
    with pytest.raises(InteropError, match="ffn.experts.mlp.w1: 96 rows do not split into 5 experts"):
        moekit.from_pretrained(path)


def test_missing_shard_is_named(tmp_path):
    _, path = _tiny_mixtral(tmp_path, shard=True)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (path / victim).unlink()
    with pytest.raises(InteropError, match=victim):
        moekit.from_pretrained(path)


def test_shape_mismatch_is_named(tmp_path):
    _, path = _tiny_mixtral(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 20
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InteropError, match=r"shape mismatch for layers\.0\.ffn\.experts\.w_in"):
        moekit.from_pretrained(path)


def test_unsupported_architecture_lists_supported(tmp_path):
    _, path = _tiny_mixtral(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InteropError, match="GPT2LMHeadModel.*supported: MixtralForCausalLM, DbrxForCausalLM, Qwen2Moe"):
        moekit.from_pretrained(path)


def test_unsupported_config_field_fails_clearly(tmp_path):
    _, path = _tiny_mixtral(tmp_path, sliding_window=8)
    with pytest.raises(InteropError, match="sliding_window=8"):
        moekit.from_pretrained(path)


def test_moekit_checkpoint_loads_through_from_pretrained(tmp_path):
    from moekit.checkpoint import save_checkpoint
    from moekit.tokenizer import ByteTokenizer

    model = moekit.MoETransformer(moekit.ModelConfig.from_name("tiny")).eval()
    save_checkpoint(tmp_path, 1, model, model.cfg, ByteTokenizer())
    loaded = moekit.from_pretrained(tmp_path)
    ids = torch.randint(0, 256, (1, 8))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    shutil.rmtree(tmp_path / "ckpt-00000001")
    with pytest.raises(ValueError, match="not a moekit checkpoint"):
        moekit.from_pretrained(tmp_path)


@pytest.mark.parametrize("family", ["mixtral", *FAMILIES])
def test_export_round_trip_through_transformers(tmp_path, family):
    """moekit -> HF directory -> transformers: identical logits (and back into moekit)."""
    if family == "mixtral":
        _, path = _tiny_mixtral(tmp_path)
    else:
        cfg_name, model_name, kw = FAMILIES[family]
        kw = {"num_key_value_heads": 2, **kw}
        cfg = getattr(transformers, cfg_name)(vocab_size=96, hidden_size=32, num_hidden_layers=3,
                                              num_attention_heads=4, max_position_embeddings=128,
                                              initializer_range=0.1, eos_token_id=None, **kw)
        torch.manual_seed(0)
        getattr(transformers, model_name)(cfg).save_pretrained(tmp_path / "hf")
        path = tmp_path / "hf"
    ours = moekit.from_pretrained(path)
    if family == "deepseek-v2":
        with pytest.raises(ValueError, match="fits no exportable architecture"):
            to_hf(ours, tmp_path / "out")
        return
    to_hf(ours, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        assert (back(ids).logits - ours(ids).logits).abs().max().item() < 1e-4
    again = moekit.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(again(ids).logits, ours(ids).logits)


def test_trained_moekit_model_exports_as_mixtral(tmp_path):
    model = moekit.MoETransformer(moekit.ModelConfig.from_name("tiny")).eval()
    assert to_hf(model, tmp_path / "out") == "MixtralForCausalLM"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert (back(ids).logits - model(ids).logits).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="not empty"):
        to_hf(model, tmp_path / "out")


def test_cli_convert_both_ways(tmp_path):
    import subprocess
    import sys

    _, path = _tiny_mixtral(tmp_path)
    run = lambda *a: subprocess.run([sys.executable, "-m", "moekit", "convert", *a], capture_output=True, text=True)  # noqa: E731
    res = run("--from-hf", str(path), "--out", str(tmp_path / "mk"))
    assert res.returncode == 0, res.stderr
    res = run("--to-hf", str(tmp_path / "mk"), "--out", str(tmp_path / "hf2"))
    assert res.returncode == 0, res.stderr and json.loads(res.stdout)["architecture"] == "MixtralForCausalLM"
    ids = torch.randint(0, 96, (1, 7))
    a = moekit.from_pretrained(path)(ids).logits
    b = moekit.from_pretrained(tmp_path / "hf2")(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    res = run("--to-hf", str(tmp_path / "mk"), "--out", str(tmp_path / "hf2"))
    assert res.returncode == 2 and "not empty" in res.stderr


@pytest.mark.parametrize("saved, wanted", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                           (torch.bfloat16, None)])
def test_dtype_choice_converts_while_reading(tmp_path, saved, wanted):
    hf, _ = _tiny_mixtral(tmp_path)
    hf.to(saved).save_pretrained(tmp_path / "saved")
    ours = moekit.from_pretrained(tmp_path / "saved", dtype=wanted)
    expect = wanted or torch.float32  # None: fp32 whatever the file holds
    assert all(p.dtype == expect for p in ours.parameters())
    layer = hf.model.layers[1].mlp.experts
    w_in = ours.layers[1].ffn.experts.w_in  # [E, 2F, D] = [gate; up] per expert
    ref = getattr(layer, "gate_up_proj", None)
    if ref is None:  # per-expert modules
        ref = torch.stack([torch.cat([layer[e].w1.weight, layer[e].w3.weight]) for e in range(4)])
    torch.testing.assert_close(w_in, ref.to(expect), rtol=0, atol=0)
