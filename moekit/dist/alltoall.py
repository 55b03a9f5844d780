"""The expert-parallel token dispatcher: each rank of an EP group holds E/P experts of every MoE layer.

Legend: T tokens, D model width, E experts, K experts per token, P ranks of the EP group, N assignments.

Forward of one MoE layer on rank i (GShard, Lepikhin et al. 2020 §2.2; DeepSpeed-MoE; Megatron-Core):

1. route the rank's own tokens (router weights are replicated; the layer does this);
2. decide which assignments are kept (:meth:`AllToAllDispatcher.plan`): dropless keeps all; with a
   capacity factor the decision is the single-process plan of the whole EP group's batch (expert ids,
   and priorities for the score policy, all-gathered: T·K small integers, not hidden states), so drops
   are exactly those of one process;
3. sort the kept assignments by expert, exchange the per-expert counts (all-to-all), then the token
   rows themselves (all-to-all of uneven splits, differentiable);
4. run the local experts on the received rows grouped by expert: the same grouped dispatch as the
   single-process layer (slice loop or grouped GEMM), with unit combine weights;
5. send the expert outputs back (second all-to-all) and combine them with the router weights on the
   rank that owns the tokens, so the router's gradient stays local.

Balancing statistics are global where the formula is over the batch: the load-balancing loss uses
the batch-wide routed counts f_i and mean probabilities P_i (all-reduced over every rank,
differentiable: :meth:`AllToAllDispatcher.batch_sums`), the aux-loss-free bias sees loads all-reduced
over every rank (:meth:`AllToAllDispatcher.sum_load_`). The z-loss and the sequence-wise loss are
means over tokens / sequences and stay local (the DP average of equal-sized local means is the
global mean).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from moekit.config import MoEConfig
from moekit.dist.parallel import ParallelDims
from moekit.moe.dispatch import DispatchPlan, plan_token_choice, plan_with_kept
from moekit.moe.dispatcher import TokenDispatcher
from moekit.moe.routers import RouterOutput

# NOTE: these differentiable collectives are the public autograd-aware ones; newer PyTorch marks them
# deprecated in favour of a private module, so the notice is silenced rather than shown every run.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.", category=FutureWarning)


def all_gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    """Every rank's ``t`` of ``group`` concatenated along dim 0, in rank order (a collective)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def _regroup_by_expert(counts_PE: torch.Tensor) -> torch.Tensor:
    """Row order that turns received rows, laid out [source rank][local expert], into
    [local expert][source rank] blocks (each block's rows keep their order)."""
    lens_PE = counts_PE.flatten()
    starts_PE = (lens_PE.cumsum(0) - lens_PE).view_as(counts_PE)
    starts_EP, lens_EP = starts_PE.t().flatten(), counts_PE.t().flatten()  # blocks in the wanted order
    block_N = torch.repeat_interleave(starts_EP - (lens_EP.cumsum(0) - lens_EP), lens_EP)
    return block_N + torch.arange(block_N.shape[0], device=counts_PE.device)


@dataclass(eq=False, repr=False)
class AllToAllDispatcher(TokenDispatcher):
    """The dispatcher of an MoE layer whose experts are sharded over an EP group: this rank holds
    experts ``[first, first + local)``, indexed from 0 in the layer's ``experts``."""

    dims: ParallelDims
    num_experts: int
    sent_bytes: int = 0  # token rows this rank sent to other ranks in forward passes (both exchanges)

    holds_all_experts = False  # a class attribute (no annotation): not a dataclass field

    @property
    def size(self) -> int:
        return self.dims.ep

    @property
    def local(self) -> int:
        return self.num_experts // self.dims.ep

    @property
    def first(self) -> int:
        return self.dims.ep_rank * self.local

    @property
    def group(self):
        return self.dims.ep_group

    def __repr__(self) -> str:
        return (f"AllToAllDispatcher(ep={self.size}, ep_rank={self.dims.ep_rank}, "
                f"experts=[{self.first}, {self.first + self.local}))")

    # ---- routing ------------------------------------------------------------------------------
    def plan(self, r: RouterOutput, cfg: MoEConfig, training: bool) -> DispatchPlan:
        """The router ran locally; capacity is decided over the EP group's batch."""
        T = r.expert_ids_TK.shape[0]
        if cfg.capacity(T, training) is None:  # dropless: every assignment is kept
            return plan_token_choice(r.expert_ids_TK, r.weights_TK, cfg.num_experts)
        return plan_with_kept(r.expert_ids_TK, r.weights_TK, cfg.num_experts, self._kept_mask(r, cfg, training))

    def _kept_mask(self, r: RouterOutput, cfg: MoEConfig, training: bool) -> torch.Tensor:
        """Which of this rank's T·K assignments survive the capacity of the whole EP group's batch."""
        T, K = r.expert_ids_TK.shape
        sizes = all_gather_rows(torch.tensor([T], device=r.expert_ids_TK.device), self.group)
        if bool((sizes != T).any()):
            raise ValueError(f"capacity_factor under expert parallelism needs the same number of tokens on every "
                             f"rank (real tokens, when a token mask leaves out padding); got {sizes.tolist()}")
        capacity = cfg.capacity(T * self.size, training)
        ids = all_gather_rows(r.expert_ids_TK, self.group)
        prio = all_gather_rows(r.priority_TK.detach(), self.group) if cfg.drop_policy == "score" else None
        plan = plan_token_choice(ids, torch.zeros(ids.shape, device=ids.device), cfg.num_experts, capacity, prio,
                                 cfg.drop_policy)
        kept = torch.zeros(ids.numel(), dtype=torch.bool, device=ids.device)
        kept[plan.order_N[:int(plan.counts_E.sum())]] = True
        rank = self.dims.ep_rank
        return kept[rank * T * K:(rank + 1) * T * K].view(T, K)

    # ---- the exchange -------------------------------------------------------------------------
    def run(self, experts: nn.Module, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Runs the kept assignments of ``plan`` on the experts of the whole EP group; [T, D]."""
        P, El = self.size, self.local
        kept = int(plan.counts_E.sum())
        rows_N = plan.token_ids_N[:kept]  # sorted by expert, so by destination rank
        send_E = plan.counts_E
        recv_E = torch.empty_like(send_E)
        dist.all_to_all_single(recv_E, send_E, group=self.group)  # [source rank, my local expert] counts
        send_splits = send_E.view(P, El).sum(1).tolist()
        recv_PE = recv_E.view(P, El)
        recv_splits = recv_PE.sum(1).tolist()

        me = self.dims.ep_rank
        rows_out = sum(send_splits) - send_splits[me] + sum(recv_splits) - recv_splits[me]
        self.sent_bytes += rows_out * x_TD.shape[1] * x_TD.element_size()  # backward moves as much again

        x_send = x_TD.index_select(0, rows_N)
        x_recv = x_send.new_empty(sum(recv_splits), x_TD.shape[1])
        x_recv = dist_fn.all_to_all_single(x_recv, x_send, recv_splits, send_splits, group=self.group)

        perm_N = _regroup_by_expert(recv_PE)
        local_counts = recv_PE.sum(0)
        local_plan = DispatchPlan(perm_N, torch.ones(perm_N.shape[0], device=x_TD.device), local_counts,
                                  local_counts.clone(), num_tokens=x_recv.shape[0])
        y_recv = experts(x_recv, local_plan)  # row j: its expert's output, unweighted

        y_back = y_recv.new_empty(kept, x_TD.shape[1])
        y_back = dist_fn.all_to_all_single(y_back, y_recv, send_splits, recv_splits, group=self.group)
        y_back = y_back * plan.weights_N[:kept, None].to(y_back.dtype)
        return x_TD.new_zeros(x_TD.shape).index_add(0, rows_N, y_back.to(x_TD.dtype))

    # ---- balancing statistics -----------------------------------------------------------------
    def batch_sums(self, sum_E: torch.Tensor, routed_E: torch.Tensor,
                   T: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Batch-wide Σ_t p_t (a differentiable all-reduce over every rank), routed counts and token count."""
        sum_E = dist_fn.all_reduce(sum_E)
        routed = routed_E.clone()
        dist.all_reduce(routed)
        T_ = torch.tensor([T], device=routed.device)
        dist.all_reduce(T_)
        return sum_E, routed, int(T_)

    def sum_load_(self, load_E: torch.Tensor) -> None:
        dist.all_reduce(load_E)  # every rank, replicas included, must hold the same bias

    def check_no_rows(self) -> None:
        # NOTE: the other ranks then wait in the exchange until its timeout
        raise ValueError("MoELayer mask: every token of this rank is padding; under expert parallelism "
                         "each rank needs at least one real token to take part in the exchange")
