"""Straightforward attention, one batch row, head and position at a time, for the tests.

Reads the weights of :class:`moekit.nn.attention.GroupedQueryAttention` or
:class:`moekit.nn.attention.MultiHeadLatentAttention` and shares none of their code: rotary
embeddings rotate each pair by its angle explicitly (RoFormer eq. 34) and the causal softmax is
written out.
"""

from __future__ import annotations

import math

import torch

from moekit.nn.norm import RMSNorm


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x / torch.sqrt((x * x).mean() + eps))


def _norm(module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, RMSNorm):
        return _rms(x, module.weight, module.eps)
    mu = x.mean()
    var = ((x - mu) ** 2).mean()
    y = (x - mu) / torch.sqrt(var + module.eps) * module.weight
    return y + module.bias if module.bias is not None else y


def _rotate(x: torch.Tensor, pos: int, theta: float, interleave: bool) -> torch.Tensor:
    R = x.shape[0]
    out = x.clone()
    for j in range(R // 2):
        angle = pos * theta ** (-2 * j / R)
        a, b = (2 * j, 2 * j + 1) if interleave else (j, j + R // 2)
        c, s = math.cos(angle), math.sin(angle)
        out[a] = x[a] * c - x[b] * s
        out[b] = x[a] * s + x[b] * c
    return out


def _causal_attend(qs: list, ks: list, vs: list, scale: float, softcap: float) -> list:
    outs = []
    for s in range(len(qs)):
        scores = torch.stack([qs[s] @ ks[t] * scale for t in range(s + 1)])
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        p = torch.exp(scores - scores.max())
        p = p / p.sum()
        outs.append(sum(p[t] * vs[t] for t in range(s + 1)))
    return outs


def reference_gqa(attn, x_BSD: torch.Tensor) -> torch.Tensor:
    cfg = attn.cfg
    B, S, _ = x_BSD.shape
    H, G, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    rows = []
    for b in range(B):
        q_all = [attn.q_proj(x_BSD[b, s]) for s in range(S)]
        k_all = [attn.k_proj(x_BSD[b, s]) for s in range(S)]
        v_all = [attn.v_proj(x_BSD[b, s]) for s in range(S)]
        if cfg.clip_qkv:
            c = cfg.clip_qkv
            q_all, k_all, v_all = ([torch.clamp(t, -c, c) for t in ts] for ts in (q_all, k_all, v_all))
        if cfg.qk_norm == "full":
            q_all = [_norm(attn.q_norm, q) for q in q_all]
            k_all = [_norm(attn.k_norm, k) for k in k_all]
        heads = []
        for h in range(H):
            g = h // (H // G)
            qs = [q_all[s][h * Dh:(h + 1) * Dh] for s in range(S)]
            ks = [k_all[s][g * Dh:(g + 1) * Dh] for s in range(S)]
            vs = [v_all[s][g * Dh:(g + 1) * Dh] for s in range(S)]
            if cfg.qk_norm == "head":
                qs = [_norm(attn.q_norm, q) for q in qs]
                ks = [_norm(attn.k_norm, k) for k in ks]
            qs = [_rotate(q, s, cfg.rope_theta, cfg.rope_interleave) for s, q in enumerate(qs)]
            ks = [_rotate(k, s, cfg.rope_theta, cfg.rope_interleave) for s, k in enumerate(ks)]
            heads.append(_causal_attend(qs, ks, vs, 1 / math.sqrt(Dh), cfg.attn_logit_softcap))
        rows.append(torch.stack([attn.o_proj(torch.cat([heads[h][s] for h in range(H)])) for s in range(S)]))
    return torch.stack(rows)


def reference_mla(attn, x_BSD: torch.Tensor) -> torch.Tensor:
    cfg = attn.cfg
    B, S, _ = x_BSD.shape
    H, Dn, R, Dv, C = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    rows = []
    for b in range(B):
        xs = [x_BSD[b, s] for s in range(S)]
        if cfg.q_lora_rank:
            q_all = [attn.q_b_proj(_norm(attn.q_a_norm, attn.q_a_proj(x))) for x in xs]
        else:
            q_all = [attn.q_proj(x) for x in xs]
        ckv = [attn.kv_a_proj(x) for x in xs]
        latents = [_norm(attn.kv_a_norm, c[:C]) for c in ckv]
        k_rope = [_rotate(c[C:], s, cfg.rope_theta, cfg.rope_interleave) for s, c in enumerate(ckv)]
        kv_all = [attn.kv_b_proj(c) for c in latents]
        heads = []
        for h in range(H):
            qs, ks, vs = [], [], []
            for s in range(S):
                qh = q_all[s][h * (Dn + R):(h + 1) * (Dn + R)]
                kvh = kv_all[s][h * (Dn + Dv):(h + 1) * (Dn + Dv)]
                qs.append(torch.cat([qh[:Dn], _rotate(qh[Dn:], s, cfg.rope_theta, cfg.rope_interleave)]))
                ks.append(torch.cat([kvh[:Dn], k_rope[s]]))
                vs.append(kvh[Dn:])
            heads.append(_causal_attend(qs, ks, vs, 1 / math.sqrt(Dn + R), cfg.attn_logit_softcap))
        rows.append(torch.stack([attn.o_proj(torch.cat([heads[h][s] for h in range(H)])) for s in range(S)]))
    return torch.stack(rows)
