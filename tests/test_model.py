"""The decoder LM: equivalence with a plain dense transformer, MoE wiring, aux-loss gradients, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from moekit import ModelConfig, MoEConfig, MoETransformer
from moekit.presets import PRESETS, miniature


def _plain_dense_lm(model: MoETransformer, ids: torch.Tensor) -> torch.Tensor:
    """A from-scratch dense Llama-style forward that reads moekit's weights: einsum attention with an
    explicit causal mask, rotary embeddings as complex multiplication, SwiGLU written out."""
    cfg = model.cfg
    B, S = ids.shape
    H, G, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def rms(x, w):
        return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)

    freqs = torch.tensor([cfg.rope_theta ** (-2 * j / Dh) for j in range(Dh // 2)], dtype=torch.float64)
    rot = torch.polar(torch.ones(S, Dh // 2, dtype=torch.float64), torch.arange(S)[:, None] * freqs[None])

    def rope(x):  # x [B, S, n, Dh], halves layout
        z = torch.complex(x[..., : Dh // 2], x[..., Dh // 2:]) * rot[None, :, None, :]
        return torch.cat([z.real, z.imag], dim=-1)

    x = model.embed.weight[ids]
    mask = torch.full((S, S), float("-inf"), dtype=torch.float64).triu(1)
    for blk in model.layers:
        a = blk.attn
        h = rms(x, blk.attn_norm.weight)
        q = rope((h @ a.q_proj.weight.T).view(B, S, H, Dh))
        k = rope((h @ a.k_proj.weight.T).view(B, S, G, Dh)).repeat_interleave(H // G, dim=2)
        v = (h @ a.v_proj.weight.T).view(B, S, G, Dh).repeat_interleave(H // G, dim=2)
        scores = torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(Dh) + mask
        att = torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v).reshape(B, S, H * Dh)
        x = x + att @ a.o_proj.weight.T
        h = rms(x, blk.ffn_norm.weight)
        gate, up = (h @ blk.ffn.in_proj.weight.T).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ blk.ffn.down_proj.weight.T
    return rms(x, model.norm.weight) @ model.output_weight().T


def test_dense_model_equals_plain_transformer():
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=48)
    model = MoETransformer(cfg).double()
    ids = torch.randint(0, 50, (2, 9))
    torch.testing.assert_close(model(ids).logits, _plain_dense_lm(model, ids))


def test_one_expert_moe_model_equals_dense_twin():
    moe = MoEConfig(d_model=32, expert_hidden=48, num_experts=1, top_k=1)
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, moe=moe)
    model = MoETransformer(cfg).double()
    dense = MoETransformer(cfg.replace(moe=None, ffn_hidden=48)).double()
    state = {}
    for k, v in model.state_dict().items():
        if ".ffn.experts.w_in" in k:
            state[k.replace("experts.w_in", "in_proj.weight")] = v[0]
        elif ".ffn.experts.w_out" in k:
            state[k.replace("experts.w_out", "down_proj.weight")] = v[0]
        elif ".ffn.router." not in k:
            state[k] = v
    dense.load_state_dict(state)
    ids = torch.randint(0, 50, (3, 8))
    torch.testing.assert_close(model(ids).logits, dense(ids).logits)


def test_layer_pattern():
    moe = MoEConfig(d_model=16, expert_hidden=8, num_experts=4, top_k=2)
    cfg = ModelConfig(vocab_size=10, d_model=16, n_layers=6, n_heads=2, ffn_hidden=32, moe=moe, moe_every=2)
    assert [b.is_moe for b in MoETransformer(cfg).layers] == [False, True, False, True, False, True]
    cfg = cfg.replace(moe_every=1, first_k_dense=2)
    assert [b.is_moe for b in MoETransformer(cfg).layers] == [False, False, True, True, True, True]


def test_tiny_forward_backward_and_aux_loss_reaches_parameters():
    model = MoETransformer(ModelConfig.from_name("tiny"))
    ids = torch.randint(0, 256, (2, 32))
    out = model(ids, targets=ids.roll(-1, dims=1), return_logits=True)
    assert out.logits.shape == (2, 32, 256)
    assert set(out.routing) == {0, 1}
    assert set(out.aux_terms) == {"load_balancing", "z_loss"}
    torch.testing.assert_close(out.loss, out.ce_loss + out.aux_loss)
    # the aux loss alone reaches every router
    out.aux_loss.backward(retain_graph=True)
    for layer in model.moe_layers:
        assert layer.router.weight_ED.grad.abs().sum() > 0
    model.zero_grad()
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_tiny_model_learns():
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.from_name("tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 256, (4, 33))
    first = None
    for _ in range(30):
        out = model(ids[:, :-1], targets=ids[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else out.ce_loss.item()
    assert out.ce_loss.item() < 0.7 * first


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_has_a_working_miniature(name):
    cfg = miniature(name)
    model = MoETransformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    out = model(ids, targets=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    full = PRESETS[name].config
    assert cfg.attention == full.attention and (cfg.moe is None) == (full.moe is None)
    if full.moe is not None:
        assert cfg.moe.router == full.moe.router and len(model.moe_layers) >= 1


def test_bad_inputs():
    model = MoETransformer(ModelConfig.from_name("tiny"))
    with pytest.raises(ValueError, match="vocab_size=256"):
        model(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match="vocab_size=256"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="max_seq_len=256"):
        model(torch.zeros(1, 257, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 4))


BAD = [
    ("n_heads", dict(d_model=30, n_heads=4)),
    ("n_kv_heads", dict(n_heads=4, n_kv_heads=3)),
    ("kv_lora_rank", dict(attention="mla", kv_lora_rank=0, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4)),
    ("q_lora_rank", dict(attention="mla", q_lora_rank=-1, kv_lora_rank=4, qk_nope_head_dim=4, qk_rope_head_dim=4,
                         v_head_dim=4)),
    ("qk_rope_head_dim", dict(attention="mla", kv_lora_rank=4, qk_nope_head_dim=4, qk_rope_head_dim=3, v_head_dim=4)),
    ("first_k_dense", dict(first_k_dense=5)),
    ("attention", dict(attention="linear")),
    ("norm", dict(norm="batchnorm")),
    ("ffn_hidden", dict(ffn_hidden=0)),
    ("vocab_size", dict(vocab_size=0)),
    ("max_seq_len", dict(max_seq_len=0)),
    ("moe", dict(moe=MoEConfig(d_model=8, expert_hidden=8))),
    ("qk_norm", dict(qk_norm="layer")),
]


@pytest.mark.parametrize("field,kw", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_config_errors_name_the_field(field, kw):
    base = dict(vocab_size=32, d_model=32, n_layers=4, n_heads=4, ffn_hidden=64)
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{**base, **kw})


def test_first_k_dense_leaving_no_moe_layer():
    moe = MoEConfig(d_model=32, expert_hidden=8)
    with pytest.raises(ValueError, match="first_k_dense"):
        ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, ffn_hidden=8, moe=moe, first_k_dense=2)


def test_unknown_preset_lists_known():
    with pytest.raises(ValueError, match="mixtral-8x7b.*deepseek-v3"):
        ModelConfig.from_name("mixtral-8x8b")


def test_config_round_trip():
    cfg = ModelConfig.from_name("deepseek-v3")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_rope_scaling_is_validated_and_yarn_matches_its_formula():
    """YaRN (Peng et al. 2023 eq. 17-22) frequencies against a direct per-dimension computation."""
    import math

    from moekit.nn.rope import scaled_frequencies

    base = dict(vocab_size=32, d_model=16, n_layers=1, n_heads=2)
    with pytest.raises(ValueError, match="rope_scaling.*needs \\['original_max_seq_len'\\]"):
        ModelConfig(**base, rope_scaling={"type": "yarn", "factor": 4})
    with pytest.raises(ValueError, match="rope_scaling.*type in"):
        ModelConfig(**base, rope_scaling={"type": "dynamic", "factor": 4})
    with pytest.raises(ValueError, match="unknown keys \\['beta'\\]"):
        ModelConfig(**base, rope_scaling={"type": "linear", "factor": 4, "beta": 1})
    R, theta, s, L = 16, 10000.0, 4.0, 64
    inv, attn = scaled_frequencies(R, theta, {"type": "yarn", "factor": s, "original_max_seq_len": L,
                                              "truncate": False}, dtype=torch.float64)
    lo = R * math.log(L / (32 * 2 * math.pi)) / (2 * math.log(theta))
    hi = R * math.log(L / (1 * 2 * math.pi)) / (2 * math.log(theta))
    for j in range(R // 2):
        f = theta ** (-2 * j / R)
        gamma = min(max((j - max(lo, 0)) / (min(hi, R - 1) - max(lo, 0)), 0), 1)  # 1: interpolate
        assert math.isclose(inv[j].item(), (1 - gamma) * f + gamma * f / s, rel_tol=1e-12)
    assert math.isclose(attn, 0.1 * math.log(s) + 1)
    lin, one = scaled_frequencies(R, theta, {"type": "linear", "factor": s}, dtype=torch.float64)
    torch.testing.assert_close(lin * s, scaled_frequencies(R, theta, None, dtype=torch.float64)[0])
    assert one == 1.0
