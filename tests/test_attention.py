"""GQA and MLA attention against the straightforward reference (outputs and gradients, float64)."""

import pytest
import torch

from moekit.config import ModelConfig
from moekit.nn.attention import build_attention
from moekit.nn.reference import reference_gqa, reference_mla
from moekit.nn.rope import rope_cos_sin, rope_frequencies

BASE = dict(vocab_size=32, d_model=24, n_layers=1, n_heads=4, ffn_hidden=8)
CASES = {
    "mha": dict(),
    "gqa": dict(n_kv_heads=2),
    "mqa_head_dim": dict(n_kv_heads=1, head_dim=8),
    "qkv_bias": dict(qkv_bias=True, n_kv_heads=2),
    "qk_norm_head": dict(qk_norm="head", n_kv_heads=2, head_dim=8),
    "qk_norm_full": dict(qk_norm="full"),
    "clip_qkv": dict(clip_qkv=0.3, n_kv_heads=2),
    "softcap_interleave": dict(attn_logit_softcap=2.0, rope_interleave=True, n_kv_heads=2),
    "mla": dict(attention="mla", q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4,
                v_head_dim=5),
    "mla_no_q_lora": dict(attention="mla", q_lora_rank=0, kv_lora_rank=10, qk_nope_head_dim=6,
                          qk_rope_head_dim=4, v_head_dim=6, rope_interleave=True),
    "mla_layernorm_softcap": dict(attention="mla", q_lora_rank=8, kv_lora_rank=6, qk_nope_head_dim=4,
                                  qk_rope_head_dim=2, v_head_dim=4, norm="layernorm", attn_logit_softcap=3.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_attention_matches_reference(name):
    cfg = ModelConfig(**BASE, **CASES[name])
    attn = build_attention(cfg).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # norms away from 1, biases away from 0
    rot = cfg.qk_rope_head_dim if cfg.attention == "mla" else cfg.head_dim
    B, S = 2, 7
    cos, sin = rope_cos_sin(torch.arange(S), rope_frequencies(rot, cfg.rope_theta, dtype=torch.float64))
    x = torch.randn(B, S, 24, dtype=torch.float64, requires_grad=True)
    out = attn(x, cos, sin)
    ref_fn = reference_mla if cfg.attention == "mla" else reference_gqa
    x2 = x.detach().clone().requires_grad_(True)
    ref = ref_fn(attn, x2)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    params = list(attn.parameters())
    grads = torch.autograd.grad((out * g).sum(), [x, *params])
    grads_ref = torch.autograd.grad((ref * g).sum(), [x2, *params])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


def test_attention_is_causal():
    cfg = ModelConfig(**BASE, n_kv_heads=2)
    attn = build_attention(cfg).double()
    cos, sin = rope_cos_sin(torch.arange(6), rope_frequencies(cfg.head_dim, cfg.rope_theta, dtype=torch.float64))
    x = torch.randn(1, 6, 24, dtype=torch.float64)
    y = x.clone()
    y[:, 4:] = torch.randn(1, 2, 24, dtype=torch.float64)
    torch.testing.assert_close(attn(x, cos, sin)[:, :4], attn(y, cos, sin)[:, :4])
