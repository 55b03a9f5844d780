"""The expert backend of weight-only quantized experts (``quantized``): a slice loop over the experts,
each slice's products on its expert's int8 / int4 weights. Inference only.

Legend: T tokens, D model width, E experts, F expert hidden width, H = 2F for gated activations
(gate and up fused, gate first) else F, N assignments, n one expert's assignments.

The weights come as :class:`QuantizedExpertWeights`: per projection an object whose ``mm(e, x)`` is
x @ W_e^T on expert e's quantized weight (:class:`moekit.quant.modules.QuantStack`), so this backend
knows nothing of the formats. Its reference is the dequantized experts run through
:func:`moekit.moe.reference.reference_forward` (tests/test_quant.py).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from moekit.config import MoEConfig
from moekit.moe.backends.base import PLAIN_GEMM, ExpertBackend, LoopGemm
from moekit.moe.backends.loop import _slices
from moekit.moe.dispatch import DispatchPlan
from moekit.nn.activations import activation_fn

NAME = "quantized"


class QuantizedMatrices(Protocol):
    def mm(self, e: int, x_nK: torch.Tensor) -> torch.Tensor:
        """x @ W_e^T for expert e's [N, K] weight, in the kernels' dtype."""

    def matmul_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype ``mm`` wants its input in."""


class QuantizedExpertWeights(NamedTuple):
    w_in: QuantizedMatrices  # E × [H, D]
    w_out: QuantizedMatrices  # E × [D, F]
    b_in_EH: torch.Tensor | None
    b_out_ED: torch.Tensor | None


def quantized_experts(x_TD: torch.Tensor, plan: DispatchPlan, weights: QuantizedExpertWeights,
                      activation: str) -> torch.Tensor:
    """out[t] = Σ over t's kept assignments a of w_a · down_e(act(in_e(x_t))), [T, D] in x's dtype."""
    counts = plan.counts_E.tolist()  # the slice bounds: one host sync
    act = activation_fn(activation)
    dt = weights.w_in.matmul_dtype(x_TD)
    x_mm = x_TD.to(dt)
    out_TD = torch.zeros(x_TD.shape, dtype=dt, device=x_TD.device)
    w_N = plan.weights_N.to(dt)
    for e, s, t in _slices(counts):
        tok_n = plan.token_ids_N[s:t]
        # 1. Gather the expert's tokens; its first projection, activation and down projection.
        h_nH = weights.w_in.mm(e, x_mm.index_select(0, tok_n))
        if weights.b_in_EH is not None:
            h_nH = h_nH + weights.b_in_EH[e].to(dt)
        y_nD = weights.w_out.mm(e, act(h_nH))
        if weights.b_out_ED is not None:
            y_nD = y_nD + weights.b_out_ED[e].to(dt)
        # 2. Weight and scatter back; experts in order, so the sum is deterministic.
        out_TD.index_add_(0, tok_n, y_nD * w_N[s:t, None])
    return out_TD.to(x_TD.dtype)


class _InferenceOnly(torch.autograd.Function):
    """Runs ``fn`` without building a graph; a backward through it raises, naming the backend."""

    @staticmethod
    def forward(ctx, fn, *inputs):
        return fn()

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"expert backend {NAME!r} is inference-only: quantized experts have no gradients "
                           f"(fine-tune the unquantized model, or run under torch.no_grad())")


def inference_only(fn, *inputs: torch.Tensor | None) -> torch.Tensor:
    """``fn()``; when any of ``inputs`` requires a gradient, the result is tied to them so that a backward
    through it fails with a clear error instead of silently giving none."""
    tensors = [t for t in inputs if t is not None and t.requires_grad]
    if not tensors or not torch.is_grad_enabled():
        with torch.no_grad():
            return fn()
    return _InferenceOnly.apply(fn, *tensors)


class QuantizedBackend(ExpertBackend):
    name = NAME

    def check(self, cfg: MoEConfig, x_TD: torch.Tensor) -> None:
        if x_TD.device.type != "cpu":
            raise RuntimeError(f"expert backend {NAME!r} runs on the CPU only (PyTorch's weight-only int8 / int4 "
                               f"CPU kernels); got a tensor on {x_TD.device}")

    # NOTE: eager even inside torch.compile (generate(compile=True)): inductor cannot lower the weight-only
    # kernels' inputs, and the slice loop needs its host sync anyway; the graph breaks around it.
    @torch.compiler.disable
    def run(self, x_TD: torch.Tensor, plan: DispatchPlan, weights: QuantizedExpertWeights, activation: str,
            how: LoopGemm = PLAIN_GEMM) -> torch.Tensor:
        return inference_only(lambda: quantized_experts(x_TD, plan, weights, activation), x_TD, plan.weights_N)
