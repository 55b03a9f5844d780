"""Causal self-attention: grouped-query attention and DeepSeek's Multi-head Latent Attention.

Legend: B batch, S sequence, D model width, H query heads, G key/value heads, Dh head dim,
R rotary dims, C latent (compressed) width.

Both run ``scaled_dot_product_attention``; :mod:`moekit.nn.reference` holds the straightforward
versions the tests compare against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import ModelConfig
from moekit.nn.norm import RMSNorm, build_norm
from moekit.nn.rope import apply_rope, yarn_mscale


def sdpa(q_BHSD: torch.Tensor, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor, scale: float,
         softcap: float = 0.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention; G key/value heads are shared by H/G query heads each.

    ``mask`` (bool, broadcastable to [B, H, S_q, S_k], True = attend) replaces the plain causal mask
    when decoding with a cache or with left padding. With a logit soft cap (Grok-1: c·tanh(s/c))
    SDPA's fused kernels do not apply, so the scores are computed explicitly.
    """
    H, G = q_BHSD.shape[1], k_BGSD.shape[1]
    if softcap > 0:
        if G != H:
            k_BGSD = k_BGSD.repeat_interleave(H // G, dim=1)
            v_BGSD = v_BGSD.repeat_interleave(H // G, dim=1)
        S, Sk = q_BHSD.shape[2], k_BGSD.shape[2]
        dtype = torch.promote_types(q_BHSD.dtype, torch.float32)
        scores = (q_BHSD.to(dtype) @ k_BGSD.to(dtype).transpose(-1, -2)) * scale
        scores = softcap * torch.tanh(scores / softcap)
        if mask is None:
            mask = torch.ones(S, Sk, dtype=torch.bool, device=q_BHSD.device).tril(diagonal=Sk - S)
        scores = scores.masked_fill(~mask, float("-inf"))
        return (scores.softmax(dim=-1) @ v_BGSD.to(dtype)).to(q_BHSD.dtype)
    return F.scaled_dot_product_attention(q_BHSD, k_BGSD, v_BGSD, attn_mask=mask, is_causal=mask is None,
                                          scale=scale, enable_gqa=G != H)


class GroupedQueryAttention(nn.Module):
    """Multi-head (G = H) or grouped-query (Ainslie et al. 2023) attention with rotary embeddings.

    ``qk_norm='head'``: RMSNorm over each head's q and k (Qwen3); ``'full'``: RMSNorm over the whole
    q and k projections (OLMoE). With ``partial_rotary_factor`` < 1 only the first ``cfg.rope_dims`` dims
    of each head rotate (GLM-4.5). ``qk_norm_after_rope``: the per-head norm follows the rotation (Hunyuan).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D, H, G, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(D, H * Dh, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, G * Dh, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, G * Dh, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * Dh, D, bias=cfg.attn_out_bias)
        self.scale = cfg.attention_multiplier if cfg.attention_multiplier is not None else 1.0 / math.sqrt(Dh)
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(Dh, cfg.norm_eps), RMSNorm(Dh, cfg.norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(H * Dh, cfg.norm_eps), RMSNorm(G * Dh, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        B, S, _ = x_BSD.shape
        H, G, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q, k, v = self.q_proj(x_BSD), self.k_proj(x_BSD), self.v_proj(x_BSD)
        if cfg.clip_qkv:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        if cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, H, Dh).transpose(1, 2)
        k = k.view(B, S, G, Dh).transpose(1, 2)
        v = v.view(B, S, G, Dh).transpose(1, 2)
        if cfg.qk_norm == "head" and not cfg.qk_norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        R = cfg.rope_dims
        if R == Dh:
            q = apply_rope(q, cos, sin, cfg.rope_interleave)
            k = apply_rope(k, cos, sin, cfg.rope_interleave)
        else:  # partial rotary: the first R dims of each head rotate, the rest pass through
            q = torch.cat([apply_rope(q[..., :R], cos, sin, cfg.rope_interleave), q[..., R:]], dim=-1)
            k = torch.cat([apply_rope(k[..., :R], cos, sin, cfg.rope_interleave), k[..., R:]], dim=-1)
        if cfg.qk_norm_after_rope:  # Hunyuan normalises the rotated heads
            q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None:
            k, v = cache.update(k, v)
        out = sdpa(q, k, v, self.scale, cfg.attn_logit_softcap, mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, H * Dh))


class MultiHeadLatentAttention(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2 §2.1, eq. 9-19).

    q = W_UQ · norm(W_DQ · x) (or W_Q · x without ``q_lora_rank``), split per head into
    [q_nope (Dn) | q_rope (R)]; the latent c_KV = norm(W_DKV · x) (C wide) gives k_nope and v per head
    through W_UKV; one rotary key head k_rope = RoPE(W_KR · x) is shared by all heads. Scores use
    scale 1/sqrt(Dn + R).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D, H = cfg.d_model, cfg.n_heads
        Dn, R, Dv, C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_a_norm = build_norm(cfg.norm, cfg.q_lora_rank, cfg.norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * (Dn + R), bias=False)
        else:
            self.q_proj = nn.Linear(D, H * (Dn + R), bias=False)
        self.kv_a_proj = nn.Linear(D, C + R, bias=False)
        self.kv_a_norm = build_norm(cfg.norm, C, cfg.norm_eps)
        self.kv_b_proj = nn.Linear(C, H * (Dn + Dv), bias=False)
        self.o_proj = nn.Linear(H * Dv, D, bias=False)
        self.scale = 1.0 / math.sqrt(Dn + R)
        rs = cfg.rope_scaling
        if rs and rs["type"] == "yarn" and rs.get("mscale_all_dim"):
            # DeepSeek-V2/V3 with YaRN also sharpen the softmax by mscale(s, mscale_all_dim)^2
            self.scale *= yarn_mscale(float(rs["factor"]), rs["mscale_all_dim"]) ** 2

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        B, S, _ = x_BSD.shape
        H, Dn, R, Dv, C = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BSD))) if cfg.q_lora_rank else self.q_proj(x_BSD)
        q = q.view(B, S, H, Dn + R).transpose(1, 2)
        q_nope, q_rope = q.split([Dn, R], dim=-1)
        latent, k_rope = self.kv_a_proj(x_BSD).split([C, R], dim=-1)
        kv = self.kv_b_proj(self.kv_a_norm(latent)).view(B, S, H, Dn + Dv).transpose(1, 2)
        k_nope, v = kv.split([Dn, Dv], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin, cfg.rope_interleave)
        k_rope = apply_rope(k_rope.reshape(B, 1, S, R), cos, sin, cfg.rope_interleave)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(B, H, S, R)], dim=-1)
        if cache is not None:  # NOTE: caches full keys and values, not the compressed latent
            k, v = cache.update(k, v)
        out = sdpa(q, k, v, self.scale, cfg.attn_logit_softcap, mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, H * Dv))


def build_attention(cfg: ModelConfig) -> nn.Module:
    return MultiHeadLatentAttention(cfg) if cfg.attention == "mla" else GroupedQueryAttention(cfg)
