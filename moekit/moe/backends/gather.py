"""The compiled decode step's expert backend ``gather``: no dispatch plan, no host sync.

Legend: T tokens, D model width, E experts, F expert hidden width, H = 2F for gated activations, K
experts per token, N = T·K (token, choice) pairs.
"""

from __future__ import annotations

import torch

from moekit.moe.backends.base import ExpertBackend, ExpertWeights
from moekit.moe.backends.grouped_mm import inverse_permutation
from moekit.nn.activations import activation_fn


def gather_experts(x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                   w_in_EHD: torch.Tensor, w_out_EDF: torch.Tensor, b_in_EH: torch.Tensor | None,
                   b_out_ED: torch.Tensor | None, act_name: str) -> torch.Tensor:
    """The decoding path for a handful of tokens under ``torch.compile``: no plan, no host sync.

    Each (token, choice) pair reads its expert's weights in place, out[t] = Σ_k w_tk · W_out[e_tk]
    act(W_in[e_tk] x_t), written as indexed multiply-and-sum reductions. Compiled, the index and the
    product fuse into one reduction that streams the chosen experts' weights once (gpt-fast's MoE
    decoding); eagerly it would copy them, so only the compiled decode step uses it. Tokens pick an
    expert at most once, and every choice is kept: dropless routing only (no capacity).
    """
    T, K = expert_ids_TK.shape
    # Pairs sorted by expert: consecutive reductions over the same expert find its weights in cache.
    order_N = expert_ids_TK.flatten().argsort(stable=True)
    e_N, tok_N = expert_ids_TK.flatten()[order_N], order_N // K
    h_NH = (w_in_EHD[e_N] * x_TD[tok_N][:, None, :]).sum(-1)
    if b_in_EH is not None:
        h_NH = h_NH + b_in_EH[e_N]
    a_NF = activation_fn(act_name)(h_NH)
    y_ND = (w_out_EDF[e_N] * a_NF[:, None, :]).sum(-1)
    if b_out_ED is not None:
        y_ND = y_ND + b_out_ED[e_N]
    y_TKD = y_ND[inverse_permutation(order_N)].view(T, K, -1)  # back to (token, choice) order: a fixed-order sum
    return (y_TKD * weights_TK.to(y_TKD.dtype)[..., None]).sum(1)


class GatherBackend(ExpertBackend):
    name = "gather"
    needs_plan = False

    def run_routed(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                   weights: ExpertWeights, activation: str) -> torch.Tensor:
        return gather_experts(x_TD, expert_ids_TK, weights_TK, *weights, activation)
