"""Routed experts: weights stacked per expert, run by an expert backend on the dispatch plan.

Legend: T tokens, D model width, E experts, F expert hidden width, H = 2F for gated activations
(gate and up fused, gate first) else F.

The computation itself lives in :mod:`moekit.moe.backends` (the Python loop, the C++ loop, grouped_mm,
the decode step's gather), each checked against :mod:`moekit.moe.reference` by the tests; which one
runs, :mod:`moekit.moe.backends.chooser` decides.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from moekit.config import MoEConfig
from moekit.cpu.options import EXPERT_BACKENDS
from moekit.moe.backends import chooser
from moekit.moe.backends.base import ExpertWeights
from moekit.moe.backends.gather import gather_experts
from moekit.moe.backends.registry import get as get_backend
from moekit.moe.dispatch import DispatchPlan
from moekit.nn.initialize import init_weights

__all__ = ["Experts", "gather_experts"]


class Experts(nn.Module):
    """E routed expert MLPs with stacked weights ``w_in`` [E, H, D] and ``w_out`` [E, D, F].

    ``backend``: the expert backend this module asks for (``auto``: the chooser's pick; see
    :func:`moekit.moe.backends.use`). A run-time choice: not in the config or the state dict.
    """

    def __init__(self, cfg: MoEConfig, backend: str = "auto"):
        super().__init__()
        if backend not in EXPERT_BACKENDS:
            raise ValueError(f"Experts backend={backend!r} is unknown; allowed: {', '.join(EXPERT_BACKENDS)}")
        self.cfg = cfg
        self.backend = backend
        self.decoding = False  # inside moekit.moe.backends.gather_decoding (the compiled decode step)
        E, D, F_ = cfg.num_experts, cfg.d_model, cfg.expert_hidden
        H = 2 * F_ if cfg.gated else F_
        self.w_in = nn.Parameter(torch.empty(E, H, D))
        self.w_out = nn.Parameter(torch.empty(E, D, F_))
        self.b_in = nn.Parameter(torch.empty(E, H)) if cfg.mlp_bias else None
        self.b_out = nn.Parameter(torch.empty(E, D)) if cfg.mlp_bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self, self.cfg.init_std)

    def backend_for(self, x_TD: torch.Tensor, decode_step: bool = False) -> str:
        """The backend that runs these tokens (see :func:`moekit.moe.backends.chooser.expert_backend`);
        ``decode_step``: the layer could take the decode step's gather path (inside
        :func:`moekit.moe.backends.gather_decoding`)."""
        return chooser.expert_backend(self.cfg, x_TD, self.backend, decode_step and self.decoding,
                                      dtype=self.compute_dtype(x_TD))

    def impl_for(self, x_TD: torch.Tensor) -> str:
        """The backend these tokens run on (:meth:`backend_for`)."""
        return self.backend_for(x_TD)

    def topk_for(self, x_TD: torch.Tensor) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """The router's top-k selection as the backend of these tokens offers it (native: the C++ one,
        ties to the lower index as the reference; else ``torch.topk``)."""
        return get_backend(self.backend_for(x_TD)).topk

    @staticmethod
    def compute_dtype(x_TD: torch.Tensor) -> torch.dtype:
        """Autocast's dtype, else the input's."""
        device_type = x_TD.device.type
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x_TD.dtype

    def cast(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, ExpertWeights]:
        """The input and the weights in the compute dtype (:meth:`compute_dtype`)."""
        params = [self.w_in, self.w_out, self.b_in, self.b_out]
        dtype = self.compute_dtype(x_TD)
        return x_TD.to(dtype), ExpertWeights(*(p.to(dtype) if p is not None else None for p in params))

    def forward(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        device_type = x_TD.device.type
        x_TD, weights = self.cast(x_TD)
        with torch.autocast(device_type=device_type, enabled=False):
            name = self.backend_for(x_TD)
            backend = get_backend(name)
            backend.check(self.cfg, x_TD)
            how = chooser.loop_gemm(x_TD, weights, native=name == "native", activation=self.cfg.activation,
                                    num_assignments=plan.num_assignments)
            return backend.run(x_TD, plan, weights, self.cfg.activation, how)
