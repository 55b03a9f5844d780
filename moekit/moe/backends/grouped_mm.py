"""The sync-free expert backend ``grouped_mm`` (CUDA bf16 by default): ``torch.nn.functional.grouped_mm``
over the sorted rows with offsets, no host synchronisation, and a gather-based deterministic combine
for token choice.

Legend: T tokens, D model width, E experts, F expert hidden width, H = 2F for gated activations, N
assignments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moekit.config import MoEConfig
from moekit.moe.backends.base import PLAIN_GEMM, ExpertBackend, ExpertWeights, LoopGemm
from moekit.moe.dispatch import DispatchPlan
from moekit.nn.activations import activation_fn


def inverse_permutation(order_N: torch.Tensor) -> torch.Tensor:
    """inverse[order[i]] = i: where each original row went."""
    inverse_N = torch.empty_like(order_N)
    inverse_N[order_N] = torch.arange(order_N.shape[0], device=order_N.device)
    return inverse_N


def grouped_mm_aligned(cfg: MoEConfig) -> bool:
    """``grouped_mm`` needs every row stride to be a multiple of 16 bytes: widths divisible by 8."""
    return cfg.d_model % 8 == 0 and cfg.expert_hidden % 8 == 0


def grouped_mm_experts(x_TD: torch.Tensor, plan: DispatchPlan, w_in_EHD: torch.Tensor, w_out_EDF: torch.Tensor,
                       b_in_EH: torch.Tensor | None, b_out_ED: torch.Tensor | None, act_name: str) -> torch.Tensor:
    """The sync-free path: one grouped GEMM per projection over all N sorted rows.

    Rows past the last offset (dropped assignments) are not computed by ``grouped_mm``; they are
    masked out before the combine. Token choice combines by gathering each token's K rows back and
    summing them (deterministic on CUDA, no atomics); expert choice uses ``index_add_``.
    """
    D, F_ = w_out_EDF.shape[1:]
    if D % 8 or F_ % 8:  # the rule of grouped_mm_aligned, on the tensors at hand
        raise ValueError(f"expert backend 'grouped_mm' needs d_model and expert_hidden divisible by 8 "
                         f"(16-byte strides), got d_model={D}, expert_hidden={F_}; use the 'loop' backend")
    act = activation_fn(act_name)
    N = plan.num_assignments
    offs_E = plan.offsets_E.to(torch.int32)
    # NOTE: grouped_mm leaves rows past offs[-1] (and their gradients) uninitialised. Every tensor
    # that crosses it is masked with `where`, which drops those rows' values and gradients even if
    # they are inf/NaN (a multiply by zero would not).
    kept_N1 = (torch.arange(N, device=x_TD.device) < offs_E[-1])[:, None]
    x_ND = torch.where(kept_N1, x_TD[plan.token_ids_N], 0.0)
    if b_in_EH is not None or b_out_ED is not None:
        expert_N = torch.searchsorted(offs_E, torch.arange(N, device=x_TD.device, dtype=torch.int32), right=True)
        expert_N = expert_N.clamp(max=w_in_EHD.shape[0] - 1)
    h_NH = F.grouped_mm(x_ND, w_in_EHD.transpose(-2, -1), offs=offs_E)
    if b_in_EH is not None:
        h_NH = h_NH + b_in_EH[expert_N]
    h_NH = torch.where(kept_N1, h_NH, 0.0)
    y_ND = F.grouped_mm(act(h_NH), w_out_EDF.transpose(-2, -1), offs=offs_E)
    if b_out_ED is not None:
        y_ND = y_ND + b_out_ED[expert_N]
    w_N1 = torch.where(kept_N1[:, 0], plan.weights_N, 0.0).to(x_TD.dtype)[:, None]
    y_ND = torch.where(kept_N1, y_ND, 0.0) * w_N1
    if plan.order_N is not None:
        T = plan.num_tokens
        return y_ND[inverse_permutation(plan.order_N)].view(T, N // T, -1).sum(dim=1)
    return x_TD.new_zeros(x_TD.shape).index_add_(0, plan.token_ids_N, y_ND)


class GroupedMMBackend(ExpertBackend):
    name = "grouped_mm"

    def run(self, x_TD: torch.Tensor, plan: DispatchPlan, weights: ExpertWeights, activation: str,
            how: LoopGemm = PLAIN_GEMM) -> torch.Tensor:
        return grouped_mm_experts(x_TD, plan, *weights, activation)
