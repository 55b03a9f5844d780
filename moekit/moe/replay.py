"""Routing replay: record the expert choices of one forward pass and force them in a later one.

Legend: T tokens, K experts per token.

Reinforcement-learning fine-tuning of an MoE model computes the policy's log-probabilities twice, once
when the rollout is sampled and once in the training pass; a router that flips a near-tie between the
two gives the training pass different experts than the tokens were sampled with (Megatron-LM's
"router replay" and the R3 recipe record the rollout's choices and replay them). The same tool pins
the routing while debugging a change elsewhere.

Usage::

    replay = routing_replay(model)
    with replay.record():
        model(ids)              # every MoE layer's expert ids, per call, in call order
    with replay.replay():
        out = model(ids)        # the same experts; weights from the current router scores

Convention: the replayed pass takes the recorded expert ids (and, for ``top_p``, the recorded slots
in use) but computes the combine weights from its *current* router scores (the chosen experts'
probabilities or sigmoid scores, renormalised and scaled as the router does), so the router still
receives gradients and a changed router changes the weights, never the experts. With unchanged
parameters and inputs the replayed pass equals the recorded one exactly. Capacity, when set, is
applied again to the replayed choices. The compiled decode step is bypassed while a replay is
installed (the layer takes its planned path). Expert-choice and soft routers have nothing to replay
and are refused.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from moekit.moe.layer import MoELayer
from moekit.moe.routers import ForcedChoice, RouterOutput


class RoutingReplay:
    """Records the expert choices of every MoE layer of ``model`` and forces them in a later pass.

    ``records[i]``: the choices of the i-th MoE layer (in ``model.modules()`` order), one
    :class:`ForcedChoice` per call of that layer, in call order (a prefill and each decode step are
    separate calls). A replay must make the same calls with the same tokens, or raises ValueError.
    """

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        if not self.layers:
            raise ValueError("routing_replay: the model has no MoE layer")
        for layer in self.layers:
            if not layer.cfg.is_token_choice:
                raise ValueError(f"routing_replay: MoEConfig.router={layer.cfg.router!r} has no per-token choice "
                                 f"to replay; replay needs a token-choice router")
        self.records: list[list[ForcedChoice]] = [[] for _ in self.layers]
        self.mode: str | None = None
        self._cursor = [0] * len(self.layers)
        self._index = {id(layer): i for i, layer in enumerate(self.layers)}

    @contextlib.contextmanager
    def _installed(self, mode: str) -> Iterator["RoutingReplay"]:
        for layer in self.layers:
            if layer.routing_replay is not None:
                raise RuntimeError("routing_replay: another replay is already recording or replaying on this model")
        self.mode = mode
        for layer in self.layers:
            layer.routing_replay = self
        try:
            yield self
        finally:
            for layer in self.layers:
                layer.routing_replay = None
            self.mode = None

    def record(self):
        """Context manager: the forward passes inside it record their choices (earlier records are cleared)."""
        self.records = [[] for _ in self.layers]
        return self._installed("record")

    def replay(self):
        """Context manager: the forward passes inside it take the recorded choices, from the first call on."""
        if not any(self.records):
            raise RuntimeError("routing_replay: nothing recorded; run a forward pass inside record() first")
        self._cursor = [0] * len(self.layers)
        return self._installed("replay")

    # ---- called by MoELayer.route ----------------------------------------------------------
    def forced(self, layer: MoELayer) -> ForcedChoice | None:
        if self.mode != "replay":
            return None
        i = self._index[id(layer)]
        calls = self.records[i]
        if self._cursor[i] >= len(calls):
            raise ValueError(f"routing replay: MoE layer {i} is called more often than in the recorded pass "
                             f"({len(calls)} call(s) recorded)")
        choice = calls[self._cursor[i]]
        self._cursor[i] += 1
        return choice

    def observe(self, layer: MoELayer, r: RouterOutput) -> None:
        if self.mode == "record":
            active_TK = None if r.active_TK is None else r.active_TK.detach().clone()
            self.records[self._index[id(layer)]].append(ForcedChoice(r.expert_ids_TK.detach().clone(), active_TK))

    def expert_ids(self, layer_index: int, call: int = 0) -> torch.Tensor:
        """The recorded expert ids [T, K] of one call of one MoE layer."""
        return self.records[layer_index][call].expert_ids_TK


def routing_replay(model: nn.Module) -> RoutingReplay:
    """A :class:`RoutingReplay` over every MoE layer of ``model``; see the module docstring."""
    return RoutingReplay(model)
