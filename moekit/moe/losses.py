"""Auxiliary losses of MoE routing, in fp32.

Legend: T tokens, E experts, K experts per token, B sequences, S tokens per sequence.
Each function returns the unweighted term; the layer multiplies by its coefficient.
"""

from __future__ import annotations

import torch


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64 for gradcheck)."""
    return t if t.dtype == torch.float64 else t.float()


def load_balancing_loss(probs_TE: torch.Tensor, routed_E: torch.Tensor, top_k: int,
                        convention: str = "standard", batch_sums=None, variable_k: bool = False) -> torch.Tensor:
    """L = E · Σ_i f_i · P_i  (Shazeer et al. 2017; Switch, Fedus et al. 2021 eq. 4-6; GShard).

    P_i = mean_t p_{t,i} (differentiable); f_i = c_i / (T·K) with c_i the assignments routed to
    expert i before any capacity drop (Megatron-Core, MegaBlocks, OLMo-core): perfect balance gives
    exactly 1, collapse onto one expert gives E.
    ``convention="hf_compat"``: f_i = c_i / T, the value transformers' Mixtral
    ``load_balancing_loss_func`` returns for one layer (balance gives K). NOTE: transformers
    concatenates all layers' tokens before the formula; per layer the two agree.
    ``batch_sums(Σ_t p_t, routed_E, T)``: returns the batch-wide ones when the batch is spread over
    processes (the layer passes its dispatcher's :meth:`~moekit.moe.dispatcher.TokenDispatcher.batch_sums`).
    ``variable_k`` (top-p routing, a varying number of experts per token): the standard f_i divides by
    the assignments made, Σ_j c_j, in place of T·K, so balance still gives 1. With null experts E
    counts them too: they are balanced like the others (AdaMoE).
    """
    T, E = probs_TE.shape
    sum_E = _fp32(probs_TE).sum(dim=0)
    if batch_sums is not None:
        sum_E, routed_E, T = batch_sums(sum_E, routed_E, T)
    denom = T if convention == "hf_compat" else (routed_E.sum().clamp_min(1) if variable_k else T * top_k)
    P_E = sum_E / T
    f_E = routed_E.to(P_E.dtype) / denom
    return E * torch.sum(f_E * P_E)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022 eq. 5): mean_t (logsumexp_j z_{t,j})²."""
    return torch.logsumexp(_fp32(logits_TE), dim=-1).square().mean()


def router_entropy_loss(probs_TE: torch.Tensor) -> torch.Tensor:
    """The dynamic loss of top-p routing (Huang et al. 2024 eq. 7): L_d = mean_t -Σ_i P_{t,i} log P_{t,i},
    the entropy of the router distribution (nats). Minimising it sharpens the distribution, so fewer
    experts reach the threshold: without it the router could spread P to activate many experts."""
    p_TE = _fp32(probs_TE)
    return -(p_TE * torch.log(p_TE.clamp_min(1e-30))).sum(dim=-1).mean()


def sequence_balance_loss(probs_BSE: torch.Tensor, expert_ids_BSK: torch.Tensor,
                          mask_BS: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V3 complementary sequence-wise balance loss (DeepSeek-AI 2024 eq. 17-20), unweighted.

    Per sequence: f_i = E/(K·S) · Σ_t 1[i ∈ TopK(t)], P_i = (1/S) Σ_t s'_{t,i} with s' the
    normalised scores s/Σ_j s_j; L = Σ_i f_i P_i. Averaged over the B sequences.
    Balance gives 1, as with :func:`load_balancing_loss`.
    ``mask_BS`` (bool, True = real token): a sequence counts its real tokens only (S = their number),
    and one without any is left out of the average.
    """
    B, S, E = probs_BSE.shape
    K = expert_ids_BSK.shape[-1]
    if mask_BS is not None:
        m_BS = mask_BS.to(_fp32(probs_BSE).dtype)
        len_B1 = m_BS.sum(dim=1, keepdim=True)
        P_BE = (_fp32(probs_BSE) * m_BS[..., None]).sum(dim=1) / len_B1.clamp_min(1)
        counts_BE = torch.zeros(B, E, device=P_BE.device, dtype=P_BE.dtype)
        counts_BE.scatter_add_(1, expert_ids_BSK.reshape(B, S * K), m_BS[..., None].expand(B, S, K).reshape(B, S * K))
        f_BE = counts_BE * (E / K) / len_B1.clamp_min(1)
        return (f_BE * P_BE).sum(dim=-1)[len_B1[:, 0] > 0].mean()
    P_BE = _fp32(probs_BSE).mean(dim=1)
    counts_BE = torch.zeros(B, E, device=P_BE.device, dtype=P_BE.dtype)
    counts_BE.scatter_add_(1, expert_ids_BSK.reshape(B, S * K), torch.ones(B, S * K, device=P_BE.device,
                                                                              dtype=P_BE.dtype))
    f_BE = counts_BE * (E / (K * S))
    return (f_BE * P_BE).sum(dim=-1).mean()
