"""Token dispatchers: how an MoE layer's token-choice assignments reach its experts.

Legend: T tokens, D model width, E experts, K experts per token.

The layer routes its tokens, then asks its dispatcher for everything that depends on where the
experts live: which assignments are kept (capacity is a decision over the batch the experts see),
how the kept rows reach the experts and come back combined, and over which batch the balancing
statistics are summed. :class:`LocalDispatcher` (every expert in this process) is the default; the
expert-parallel all-to-all one (:class:`moekit.dist.alltoall.AllToAllDispatcher`) is installed by
:func:`moekit.dist.ep.shard_experts`. The layer calls the dispatcher unconditionally, so it has one
code path whatever the parallelism, and this package imports nothing distributed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from moekit.config import MoEConfig
from moekit.moe.dispatch import DispatchPlan, plan_token_choice
from moekit.moe.routers import RouterOutput


class TokenDispatcher(ABC):
    """The operations an :class:`moekit.moe.layer.MoELayer` delegates to where its experts live."""

    # Whether ``experts`` holds every expert, indexed by global expert id: the compiled decoding path
    # (:func:`moekit.moe.experts.gather_experts`) reads expert weights by routed id and needs it.
    holds_all_experts: bool = True

    @abstractmethod
    def plan(self, r: RouterOutput, cfg: MoEConfig, training: bool) -> DispatchPlan:
        """The dispatch plan of the token-choice routing ``r`` of this process's T tokens: every
        assignment sorted by expert, those beyond the capacity of the batch the experts see dropped."""

    @abstractmethod
    def run(self, experts: nn.Module, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """The kept assignments of ``plan`` run on their experts and combined with their weights; [T, D]."""

    def batch_sums(self, sum_E: torch.Tensor, routed_E: torch.Tensor,
                   T: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Σ_t p_t, routed counts and token count of the batch the balancing loss is over, from this
        process's own (:func:`moekit.moe.losses.load_balancing_loss`)."""
        return sum_E, routed_E, T

    def sum_load_(self, load_E: torch.Tensor) -> None:
        """Sums, in place, the expert loads counted since the last aux-loss-free bias update over every
        process that must apply the same update."""

    def check_no_rows(self) -> None:
        """Called when every token of this process is padding, in place of any routing: refuses where
        other processes would wait for this one's rows."""


class LocalDispatcher(TokenDispatcher):
    """Every expert in this process: capacity over this batch, the experts run on the plan directly."""

    def plan(self, r: RouterOutput, cfg: MoEConfig, training: bool) -> DispatchPlan:
        capacity = cfg.capacity(r.expert_ids_TK.shape[0], training)
        return plan_token_choice(r.expert_ids_TK, r.weights_TK, cfg.num_experts, capacity, r.priority_TK,
                                 cfg.drop_policy, r.active_TK, cfg.num_null_experts)

    def run(self, experts: nn.Module, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        return experts(x_TD, plan)

    def __repr__(self) -> str:
        return "LocalDispatcher()"
