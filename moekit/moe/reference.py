"""A slow, obviously-correct MoE forward: one token and one assignment at a time.

Tests and benchmarks compare :class:`moekit.MoELayer` against :func:`reference_forward`. It reads
the layer's parameters (so gradients can be compared) and the config's capacity formula, but none of
its routing, dispatch, expert or loss code: selection is a Python sort per token, capacity a per-expert queue, every expert
a matrix-vector product per assignment, and each loss is written out from its paper's formula.
Random draws (Switch jitter, noisy-gating noise) are made with the same calls in the same order as
the fast path, so a test that seeds both gets the same noise. A token mask leaves the masked-out
tokens (padding) out of everything but the shared and dense experts: the rest is computed over the
list of real tokens, as if the padding had never been there. Top-p routing walks each token's sorted
probabilities until their sum reaches the threshold; null experts are routed and counted like the
others but never enter an expert queue (no capacity, no computation; ``identity`` adds w·x).
A router's ``forced`` choice (routing replay) replaces the selection, weights still from the scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moekit.config import MoEConfig
from moekit.nn.activations import reference_act


@dataclass
class ReferenceOutput:
    output: torch.Tensor
    aux_loss: torch.Tensor
    aux_terms: dict[str, torch.Tensor]
    tokens_per_expert: list[int]
    routed_per_expert: list[int]
    dropped_assignments: int
    dropped_tokens: int
    assignments: list[tuple[int, int]]  # kept (token, expert) pairs (token: index into the flattened input)
    experts_per_token: list[int] = field(default_factory=list)  # experts computed per routed token


def _mlp(x_D, w_in_HD, w_out_DF, b_in, b_out, act):
    h = w_in_HD @ x_D
    if b_in is not None:
        h = h + b_in
    y = w_out_DF @ reference_act(act, h)
    return y + b_out if b_out is not None else y


def _top(values: list[float], k: int) -> list[int]:
    """Indices of the k largest values, largest first (ties: lower index first)."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


def _choose(cfg: MoEConfig, sel: list[float]) -> list[int]:
    E = len(sel)
    allowed = list(range(E))
    if cfg.n_group > 1:
        size = E // cfg.n_group
        group_scores = []
        for g in range(cfg.n_group):
            members = sorted(sel[g * size:(g + 1) * size], reverse=True)
            group_scores.append(members[0] if cfg.group_score == "max" else members[0] + members[1])
        groups = _top(group_scores, cfg.topk_group)
        allowed = [e for e in range(E) if e // size in groups]
    masked = [sel[e] if e in allowed else -math.inf for e in range(E)]
    return _top(masked, cfg.top_k)


def reference_forward(layer, x: torch.Tensor, mask: torch.Tensor | None = None) -> ReferenceOutput:
    """The MoE layer's output, aux loss and drop counts, computed the slow way; ``mask`` (bool, shape
    ``x.shape[:-1]``): only the tokens it marks True are routed."""
    cfg: MoEConfig = layer.cfg
    router, experts = layer.router, layer.experts
    E, K, D = cfg.num_experts, cfg.top_k, cfg.d_model
    E_r = cfg.num_routed  # scored experts: E computed ones, then the null ones
    x_all = x.reshape(-1, D)
    # The routed tokens: every one, or the real ones. Below, t indexes them; rows[t] is the input row.
    rows = list(range(x_all.shape[0])) if mask is None else mask.reshape(-1).nonzero().flatten().tolist()
    x_TD = x_all[rows]
    T = len(rows)

    # Router logits in fp32, with the same random draws as the fast path.
    rdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xr = x_TD.to(rdt)
    if cfg.router == "switch" and layer.training and cfg.router_jitter > 0:
        eps = cfg.router_jitter
        xr = xr * torch.empty_like(x_TD, dtype=torch.float32).uniform_(1 - eps, 1 + eps)
    logits = xr @ router.weight_ED.to(rdt).t()
    sel_logits = logits
    if cfg.router == "noisy_topk" and layer.training:
        scale = F.softplus(x_TD.to(rdt) @ router.noise_weight_ED.to(rdt).t())
        sel_logits = logits + torch.randn_like(logits, dtype=torch.float32) * scale

    # Per-token scores: probabilities (softmax) or sigmoid scores.
    probs = []  # the distribution the balance losses average (list of [E] tensors)
    routes = []  # per token: list of (expert, weight tensor, priority float)
    bias = router.expert_bias.tolist() if hasattr(router, "expert_bias") else [0.0] * E_r
    forced = router.forced
    for t in range(T):
        z = sel_logits[t]
        ez = torch.exp(z - z.max())
        if cfg.router == "sigmoid":
            s = 1 / (1 + torch.exp(-z))
            probs.append(s / s.sum())
        else:
            s = ez / ez.sum()
            probs.append(s)
        if cfg.router == "expert_choice":
            continue
        if cfg.router == "soft":
            routes.append([(e, s[e] * cfg.routed_scaling_factor, float(s[e].detach())) for e in range(E)])
            continue
        if cfg.router == "relu":  # ReMoE: every expert with a positive gate, weighted by the gate
            on = forced.active_TK[t].tolist() if forced is not None else [float(z[e].detach()) > 0 for e in range(E)]
            routes.append([(e, torch.clamp(z[e], min=0) * cfg.routed_scaling_factor, max(float(z[e].detach()), 0.0))
                           for e in range(E) if on[e]])
            continue
        sel_values = z.tolist() if cfg.router == "noisy_topk" else (s.detach() + 0).tolist()
        if forced is not None:
            chosen = forced.expert_ids_TK[t].tolist()
            if forced.active_TK is not None:
                chosen = [e for e, on in zip(chosen, forced.active_TK[t].tolist()) if on]
        elif cfg.router == "top_p":  # the most probable experts until their mass reaches p, at most K
            chosen, mass = [], 0.0
            for e in _top(sel_values, K):
                if mass >= cfg.top_p_threshold:
                    break
                chosen.append(e)
                mass += sel_values[e]
        else:
            chosen = _choose(cfg, [sel_values[e] + bias[e] for e in range(E_r)])
        if cfg.router == "noisy_topk":
            ek = torch.stack([torch.exp(z[e] - z.max()) for e in chosen])
            w = [ek[i] / ek.sum() for i in range(len(chosen))]
        elif cfg.router == "switch":
            w = [s[chosen[0]]]
        elif cfg.softmax_order == "after":
            ek = torch.stack([torch.exp(z[e] - z.max()) for e in chosen])
            w = [ek[i] / ek.sum() for i in range(len(chosen))]
        else:
            w = [s[e] for e in chosen]
            if cfg.normalize_weights:
                total = sum(wi ** cfg.normalize_p for wi in w) ** (1 / cfg.normalize_p) + 1e-20
                w = [wi / total for wi in w]
        routes.append([(e, w[i] * cfg.routed_scaling_factor, float(s[e].detach())) for i, e in enumerate(chosen)])

    # Capacity: per-expert queues in token order (or router-score order); overflow is dropped.
    if cfg.router == "expert_choice":
        C = cfg.capacity(T, layer.training)
        kept = []
        for e in range(E):
            col = [float(probs[t][e].detach()) for t in range(T)]
            for t in _top(col, C):
                kept.append((t, e, probs[t][e] * cfg.routed_scaling_factor))
        routed = [C] * E
    else:
        capacity = cfg.capacity(T, layer.training)
        queues: list[list] = [[] for _ in range(E_r)]
        for t in range(T):
            for e, w, prio in routes[t]:
                queues[e].append((t, e, w, prio))
        routed = [len(q) for q in queues]
        kept = []
        for q in queues[:E]:  # null experts' queues: no capacity, nothing to compute
            if capacity is not None and cfg.drop_policy == "score":
                q = sorted(q, key=lambda a: -a[3])
            kept.extend((t, e, w) for t, e, w, _ in (q if capacity is None else q[:capacity]))

    # Experts, one assignment at a time.
    out = [x.new_zeros(D) for _ in range(x_all.shape[0])]  # every input row; padding gets no routed expert
    b_in = experts.b_in
    b_out = experts.b_out
    if cfg.router != "expert_choice" and cfg.null_expert == "identity":
        for t in range(T):
            for e, w, _ in routes[t]:
                if e >= E:
                    out[rows[t]] = out[rows[t]] + w.to(x.dtype) * x_TD[t]
    for t, e, w in kept:
        y = _mlp(x_TD[t], experts.w_in[e], experts.w_out[e], None if b_in is None else b_in[e],
                 None if b_out is None else b_out[e], cfg.activation)
        out[rows[t]] = out[rows[t]] + w.to(x.dtype) * y
    for i, x_D in enumerate(x_all):  # shared and dense experts: every row, padding included
        if layer.shared is not None:
            sh = layer.shared
            y = _mlp(x_D, sh.in_proj.weight, sh.down_proj.weight, sh.in_proj.bias, sh.down_proj.bias,
                     cfg.activation)
            if layer.shared_gate is not None:
                y = y * torch.sigmoid(layer.shared_gate.weight[0] @ x_D)
            out[i] = out[i] + y
        if layer.dense is not None:
            dn = layer.dense
            out[i] = out[i] + _mlp(x_D, dn.in_proj.weight, dn.down_proj.weight, dn.in_proj.bias,
                                   dn.down_proj.bias, cfg.activation)
    output = torch.stack(out).reshape(x.shape)

    # Auxiliary losses, from their formulas.
    terms: dict[str, torch.Tensor] = {}  # none when no token is routed (the fast path's empty result)
    if T and cfg.aux_loss_coef > 0:
        denom = T if cfg.lb_convention == "hf_compat" else (sum(routed) if cfg.router in ("top_p", "relu") else T * K)
        P = [sum(probs[t][e] for t in range(T)) / T for e in range(E_r)]
        terms["load_balancing"] = E_r * sum((routed[e] / denom) * P[e] for e in range(E_r))
    if T and cfg.z_loss_coef > 0:
        terms["z_loss"] = sum(torch.log(torch.exp(logits[t]).sum()) ** 2 for t in range(T)) / T
    if T and cfg.router == "relu":
        terms["relu_l1"] = sum(torch.clamp(logits[t], min=0).sum() for t in range(T)) / T
    if T and cfg.router_entropy_coef > 0:
        terms["router_entropy"] = sum(-sum(p * torch.log(p) for p in probs[t]) for t in range(T)) / T
    if T and cfg.seq_aux_loss_coef > 0:
        S_in = x.shape[-2] if x.dim() >= 3 else x_all.shape[0]
        per_seq = []
        for b in range(x_all.shape[0] // S_in):
            toks = [t for t in range(T) if rows[t] // S_in == b]  # the sequence's real tokens
            S = len(toks)
            if S == 0:
                continue
            loss_b = 0
            for e in range(E_r):
                hits = sum(1 for t in toks for ee, _, _ in routes[t] if ee == e)
                f = E_r / (K * S) * hits
                P = sum(probs[t][e] for t in toks) / S
                loss_b = loss_b + f * P
            per_seq.append(loss_b)
        terms["seq_balance"] = sum(per_seq) / len(per_seq)
    coefs = {"load_balancing": cfg.aux_loss_coef, "z_loss": cfg.z_loss_coef, "seq_balance": cfg.seq_aux_loss_coef,
             "router_entropy": cfg.router_entropy_coef,
             "relu_l1": float(router.l1_coef) if cfg.router == "relu" else 0.0}
    aux = sum((coefs[k] * v for k, v in terms.items()), logits.new_zeros(()))

    kept_counts = [sum(1 for _, e, _ in kept if e == i) for i in range(E)]
    served = {t for t, _, _ in kept}
    if cfg.router != "expert_choice":  # a null choice serves its token (it is never dropped)
        served |= {t for t in range(T) for e, _, _ in routes[t] if e >= E}
    return ReferenceOutput(output, aux, terms, kept_counts, routed, sum(routed[:E]) - len(kept)
                           if cfg.router != "expert_choice" else 0, T - len(served),
                           [(rows[t], e) for t, e, _ in kept], [sum(1 for tt, _, _ in kept if tt == t) for t in range(T)])
