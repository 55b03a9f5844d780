"""Dispatch planning: turn a routing decision into assignments grouped by expert.

Legend: T tokens, E experts, K experts per token, N = number of assignments (T·K for token choice,
E·C for expert choice), C slots per expert.

The plan lists every (token, expert, weight) assignment sorted by expert, kept ones first: expert
e's kept assignments are rows ``offsets[e-1]:offsets[e]`` and the rest follow after ``offsets[-1]``:
the dropped ones (capacity overflow), the choices of null experts (ids >= E: nothing to compute) and
the slots a variable-k router left unused (``active_TK`` False; no assignment at all). Experts then run on contiguous slices (a grouped GEMM); nothing of
shape [T, E, C] is ever built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DispatchPlan:
    token_ids_N: torch.Tensor  # int64, the token of each assignment, sorted by expert (kept first)
    weights_N: torch.Tensor  # fp32 combine weight of each assignment (carries the router's gradient)
    counts_E: torch.Tensor  # int64 kept assignments per computed expert [E]
    routed_E: torch.Tensor  # int64 assignments per expert before capacity dropping [E + null experts]
    num_tokens: int
    # token choice only: position of assignment (t, k) in the sorted order, for a gather-based combine
    order_N: torch.Tensor | None = None

    @property
    def offsets_E(self) -> torch.Tensor:
        return self.counts_E.cumsum(0)

    @property
    def num_assignments(self) -> int:
        return self.token_ids_N.shape[0]


def plan_token_choice(expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int,
                      capacity: int | None = None, priority_TK: torch.Tensor | None = None,
                      drop_policy: str = "position", active_TK: torch.Tensor | None = None,
                      num_null_experts: int = 0) -> DispatchPlan:
    """Groups the T·K assignments by expert and drops those beyond ``capacity`` per expert.

    Within an expert, assignments keep token order (a stable sort of the flat index t·K + k), so the
    ``position`` policy keeps the earliest tokens (Switch, GShard). The ``score`` policy keeps those
    with the highest ``priority_TK`` (router probability of that choice): a per-assignment variant of
    V-MoE's batch-priority routing (which ranks whole tokens and fills first choices first).
    ``active_TK`` (bool): only the slots it marks are assignments (a variable number of experts per
    token, e.g. top-p routing); the others count nowhere. Ids ``num_experts .. num_experts +
    num_null_experts - 1`` are null experts: counted in ``routed_E``, never computed nor dropped.
    """
    T, K = expert_ids_TK.shape
    E = num_experts
    flat_expert_N = expert_ids_TK.reshape(-1)
    flat_weight_N = weights_TK.reshape(-1)
    if active_TK is None:
        routed_E = torch.bincount(flat_expert_N, minlength=E + num_null_experts)
    else:  # (index_add_, not boolean indexing: no host sync)
        routed_E = torch.zeros(E + num_null_experts, dtype=torch.long, device=flat_expert_N.device)
        routed_E.index_add_(0, flat_expert_N, active_TK.reshape(-1).long())
    # The sort key: the expert for an assignment the experts compute, E (behind all of them) otherwise.
    key_N = flat_expert_N
    if active_TK is not None or num_null_experts:
        computed_N = flat_expert_N < E
        if active_TK is not None:
            computed_N = computed_N & active_TK.reshape(-1)
        key_N = torch.where(computed_N, flat_expert_N, E)
    routed_here_E = routed_E[:E]  # assignments of the computed experts

    if capacity is not None and drop_policy == "score":
        # Two stable sorts: by descending priority, then by expert -> priority order within experts.
        by_priority_N = torch.argsort(priority_TK.reshape(-1).detach(), descending=True, stable=True)
        order_N = by_priority_N[torch.argsort(key_N[by_priority_N], stable=True)]
    else:
        order_N = torch.argsort(key_N, stable=True)

    if capacity is None:
        counts_E = routed_here_E
    else:
        sorted_key_N = key_N[order_N]
        # rank of each assignment inside its expert's run (the rows behind every expert: no capacity)
        bucket_B = torch.cat([routed_here_E, (T * K - routed_here_E.sum()).view(1)])
        starts_B = bucket_B.cumsum(0) - bucket_B
        rank_N = torch.arange(T * K, device=expert_ids_TK.device) - starts_B[sorted_key_N]
        kept_N = (rank_N < capacity) & (sorted_key_N < E)
        counts_E = routed_here_E.clamp(max=capacity)
        # Move the dropped assignments behind every kept one; the sort is stable so the kept order
        # (and the dropped one) is preserved.
        order_N = order_N[torch.argsort((~kept_N).to(torch.int8), stable=True)]

    return DispatchPlan(
        token_ids_N=torch.div(order_N, K, rounding_mode="floor"),
        weights_N=flat_weight_N[order_N],
        counts_E=counts_E,
        routed_E=routed_E,
        num_tokens=T,
        order_N=order_N,
    )


def plan_expert_choice(token_ids_EC: torch.Tensor, weights_EC: torch.Tensor, num_tokens: int) -> DispatchPlan:
    """Expert choice is already grouped by expert: exactly C assignments each, none dropped."""
    E, C = token_ids_EC.shape
    counts_E = torch.full((E,), C, dtype=torch.long, device=token_ids_EC.device)
    return DispatchPlan(token_ids_EC.reshape(-1), weights_EC.reshape(-1), counts_E, counts_E.clone(), num_tokens)


def plan_with_kept(expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int,
                   kept_TK: torch.Tensor) -> DispatchPlan:
    """A token-choice plan whose capacity decisions were made elsewhere (``kept_TK``): under expert
    parallelism the plan of the whole group's batch decides, each rank keeps its own rows of it."""
    T, K = expert_ids_TK.shape
    flat_expert_N = expert_ids_TK.reshape(-1)
    kept_N = kept_TK.reshape(-1)
    routed_E = torch.bincount(flat_expert_N, minlength=num_experts)
    counts_E = torch.bincount(flat_expert_N[kept_N], minlength=num_experts)
    # kept rows sorted by expert in token order, then the dropped ones (still in expert order)
    order_N = torch.argsort(flat_expert_N + num_experts * (~kept_N).long(), stable=True)
    return DispatchPlan(torch.div(order_N, K, rounding_mode="floor"), weights_TK.reshape(-1)[order_N], counts_E,
                        routed_E, T, order_N)
