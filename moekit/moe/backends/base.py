"""The interface every expert backend implements.

Legend: T tokens, D model width, E experts, F expert hidden width, H = 2F for gated activations
(gate and up fused, gate first) else F, K experts per token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moekit.config import MoEConfig
from moekit.moe.dispatch import DispatchPlan


class ExpertWeights(NamedTuple):
    """The stacked expert weights, in the compute dtype."""

    w_in_EHD: torch.Tensor
    w_out_EDF: torch.Tensor
    b_in_EH: torch.Tensor | None
    b_out_ED: torch.Tensor | None


class LoopGemm(NamedTuple):
    """How a slice loop (``loop``, ``native``) runs its per-expert GEMMs, as the chooser decided
    (:func:`moekit.moe.backends.chooser.loop_gemm`); other backends ignore it."""

    bucket: bool  # on bucketed row counts (oneDNN builds a kernel per shape)
    groups: int  # expert groups over the intra-op threads (the C++ loop; 1: one group, each GEMM threaded)
    onednn: bool  # fp32 products on oneDNN (the C++ loop)
    own_gemm: bool  # fp32 products inside the expert groups on the C++ loop's own kernel


PLAIN_GEMM = LoopGemm(bucket=False, groups=1, onednn=False, own_gemm=False)


class ExpertBackend:
    """Runs a layer's routed experts: out[t] = Σ over t's kept assignments a of w_a · down_e(act(in_e(x_t))),
    differentiable in x, the routing weights and every expert weight.

    :meth:`run` takes the dispatch plan (assignments sorted by expert) and how the chooser wants its
GEMMs run (a :class:`LoopGemm`; backends never decide that themselves); a backend with ``needs_plan``
    False (the compiled decode step's) takes the router's choices through :meth:`run_routed` instead.
    :meth:`topk` is the router's top-k selection as this backend offers it (the layer passes it to the
    router; the default is ``torch.topk``).
    """

    name: str = ""
    needs_plan: bool = True

    def check(self, cfg: MoEConfig, x_TD: torch.Tensor) -> None:
        """Raises ValueError / RuntimeError naming why these tokens cannot run here (nothing when they can)."""

    def run(self, x_TD: torch.Tensor, plan: DispatchPlan, weights: ExpertWeights, activation: str,
            how: LoopGemm = PLAIN_GEMM) -> torch.Tensor:
        raise NotImplementedError(f"expert backend {self.name!r} runs without a dispatch plan (run_routed)")

    def run_routed(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                   weights: ExpertWeights, activation: str) -> torch.Tensor:
        raise NotImplementedError(f"expert backend {self.name!r} runs on a dispatch plan (run)")

    def topk(self, scores_TE: torch.Tensor, k: int) -> torch.Tensor:
        """The indices of each row's ``k`` largest scores, largest first."""
        return scores_TE.topk(k, dim=-1).indices
