"""The expert backend ``native`` (CPU, the default there): the reference loop in C++
(:mod:`moekit.cpu.loop`), small experts' work split over the intra-op threads by expert groups and by
token ranges; and the C++ top-k for the router, ties to the lower index as the reference.

Importing this module imports :mod:`moekit.cpu.build`: the chooser imports it only when it picks it.
"""

from __future__ import annotations

import torch

from moekit.config import MoEConfig
from moekit.cpu import build
from moekit.cpu.loop import loop_experts
from moekit.cpu.topk import topk_indices
from moekit.moe.backends.base import PLAIN_GEMM, ExpertBackend, ExpertWeights, LoopGemm
from moekit.moe.dispatch import DispatchPlan


class NativeBackend(ExpertBackend):
    name = "native"

    def check(self, cfg: MoEConfig, x_TD: torch.Tensor) -> None:
        if x_TD.device.type != "cpu":
            raise ValueError(f"expert backend 'native' runs on the CPU, got a tensor on {x_TD.device}; use 'auto', "
                             f"'loop' or 'grouped_mm'")
        if build.load() is None:
            raise RuntimeError(f"expert backend 'native': the C++ extension is unavailable "
                               f"({build.unavailable_reason()})")

    def run(self, x_TD: torch.Tensor, plan: DispatchPlan, weights: ExpertWeights, activation: str,
            how: LoopGemm = PLAIN_GEMM) -> torch.Tensor:
        counts = plan.counts_E.tolist()  # the one host sync of the loop path: slice bounds
        return loop_experts(x_TD.contiguous(), plan.token_ids_N, plan.weights_N, *weights, counts, activation,
                            bucket=how.bucket, groups=how.groups, onednn=how.onednn, own_gemm=how.own_gemm)

    def topk(self, scores_TE: torch.Tensor, k: int) -> torch.Tensor:
        return topk_indices(scores_TE, k)
