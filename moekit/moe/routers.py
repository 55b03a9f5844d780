"""Routers: map tokens to experts and weights. All router maths runs in fp32.

Legend: T tokens, D model width, E experts, K experts per token, C slots per expert (expert choice).

Every router owns the gate weight ``weight_ED`` and returns a :class:`RouterOutput`. Token-choice
routers (softmax top-k, Switch, noisy top-k, sigmoid) fill ``expert_ids_TK``/``weights_TK``; the
expert-choice router fills ``token_ids_EC``/``weights_EC`` instead. Token-choice routers also own the
selection bias of DeepSeek-V3's aux-loss-free balancing (``expert_bias``, zeros unless updated) and
the load counted in training passes since the last update. They select with ``torch.topk`` unless the
caller hands in another top-k (``forward(x, topk=...)``: the layer passes its expert backend's, e.g.
the C++ one, which breaks ties to the lower index as the reference does).

With ``num_null_experts`` m > 0 a router scores E + m experts (ids E .. E+m-1 are the null ones) and
selects among all of them; the layer leaves the null choices out of the dispatch plan. The ``top_p``
router chooses a variable number of experts: it fills K slots and marks the ones in use in
``active_TK``. A router whose ``forced`` choice is set (routing replay, :mod:`moekit.moe.replay`)
takes those expert ids instead of selecting and computes their weights from its current scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import MoEConfig
from moekit.nn.initialize import init_weights


@dataclass
class RouterOutput:
    logits_TE: torch.Tensor  # fp32 clean router logits (z-loss)
    probs_TE: torch.Tensor  # fp32 per-token distribution over experts (P_i of the balance losses, entropy)
    expert_ids_TK: torch.Tensor | None = None  # token choice: chosen experts
    weights_TK: torch.Tensor | None = None  # token choice: their combine weights (fp32)
    priority_TK: torch.Tensor | None = None  # token choice: unbiased score of each choice (score drop policy)
    token_ids_EC: torch.Tensor | None = None  # expert choice: chosen tokens per expert
    weights_EC: torch.Tensor | None = None  # expert choice: their combine weights (fp32)
    active_TK: torch.Tensor | None = None  # token choice, bool: the slots in use (None: all; top_p leaves some out)


@dataclass
class ForcedChoice:
    """Expert ids (and slots in use) a router takes instead of selecting its own (routing replay)."""

    expert_ids_TK: torch.Tensor
    active_TK: torch.Tensor | None = None


def group_limited_mask(scores_TE: torch.Tensor, n_group: int, topk_group: int, group_score: str) -> torch.Tensor:
    """Boolean [T, E] mask of the experts inside each token's ``topk_group`` best groups.

    DeepSeek-V2 scores a group by its best expert (``max``); DeepSeek-V3 by the sum of its two best
    (bias-corrected) scores (``top2_sum``).
    """
    T, E = scores_TE.shape
    grouped_TGe = scores_TE.view(T, n_group, E // n_group)
    if group_score == "max":
        group_scores_TG = grouped_TGe.amax(dim=-1)
    else:
        group_scores_TG = grouped_TGe.topk(2, dim=-1).values.sum(dim=-1)
    kept_TG = group_scores_TG.topk(topk_group, dim=-1).indices
    mask_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, kept_TG, True)
    return mask_TG.repeat_interleave(E // n_group, dim=1)


TopK = Callable[[torch.Tensor, int], torch.Tensor]


def topk_indices(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of each row's ``k`` largest scores, largest first (``torch.topk``: its order among
    equal scores is its own)."""
    return scores_TE.topk(k, dim=-1).indices


def router_dtype(x: torch.Tensor) -> torch.dtype:
    """Router maths run in fp32, or fp64 when the input is fp64 (gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class Router(nn.Module):
    """Base: the gate projection in fp32 and the balancing state of token-choice routers."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight_ED = nn.Parameter(torch.empty(cfg.num_routed, cfg.d_model))  # E routed + m null experts
        if cfg.is_token_choice:
            # Aux-loss-free balancing (DeepSeek-V3 §2.1.2): selection-only bias and the load counted
            # in training forward passes since the last update.
            self.register_buffer("expert_bias", torch.zeros(cfg.num_routed))
            self.register_buffer("load_since_update", torch.zeros(cfg.num_routed))
        self.forced: ForcedChoice | None = None  # set by the layer for one call (routing replay)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self, self.cfg.init_std)

    def _apply(self, fn, recurse=True):
        # NOTE: model.to(bf16) must not round the selection bias or the load counts (a 1e-3 update
        # of a bias near 1 vanishes in bf16); they stay fp32 whatever the parameters' dtype.
        super()._apply(fn, recurse)
        for name in ("expert_bias", "load_since_update", "l1_coef", "gates_since_update"):
            buf = getattr(self, name, None)
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        return self

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        # NOTE: fp32 (fp64 for fp64 inputs) even under bf16 autocast: softmax/top-k on bf16 logits
        # flip near-ties.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            dtype = router_dtype(x_TD)
            return F.linear(x_TD.to(dtype), self.weight_ED.to(dtype))

    # ---- token-choice selection shared by the routers ----------------------------------------
    def select(self, scores_TE: torch.Tensor, topk: TopK | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k of ``scores + bias`` (restricted to the best groups when group-limited), by ``topk``
        (default :func:`topk_indices`).

        Returns (expert_ids_TK, unbiased scores of the chosen experts): the bias picks, never weighs.
        """
        cfg = self.cfg
        if self.forced is not None:
            expert_ids_TK = self.forced_ids(scores_TE)
            return expert_ids_TK, scores_TE.gather(1, expert_ids_TK)
        # The bias is zeros unless updated or loaded (DeepSeek-V3's e_score_correction_bias).
        select_TE = scores_TE + self.expert_bias
        if cfg.n_group > 1:
            mask_TE = group_limited_mask(select_TE, cfg.n_group, cfg.topk_group, cfg.group_score)
            select_TE = select_TE.masked_fill(~mask_TE, float("-inf"))
        expert_ids_TK = (topk or topk_indices)(select_TE, cfg.top_k)
        return expert_ids_TK, scores_TE.gather(1, expert_ids_TK)

    def forced_ids(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """The forced expert ids, checked against this call's tokens."""
        ids_TK = self.forced.expert_ids_TK
        T, E = scores_TE.shape
        K = E if self.cfg.router == "relu" else self.cfg.top_k  # slots per token
        if ids_TK.dim() != 2 or ids_TK.shape[0] != T or ids_TK.shape[1] != K:
            raise ValueError(f"routing replay: the recorded choice has shape {tuple(ids_TK.shape)}, but this call "
                             f"routes {T} tokens to {K} expert slots each; replay needs the recorded "
                             f"pass's inputs (same tokens, same padding) in the same order")
        return ids_TK.to(scores_TE.device)

    def finish_weights(self, weights_TK: torch.Tensor) -> torch.Tensor:
        if self.cfg.normalize_weights and self.cfg.softmax_order == "before":
            if self.cfg.normalize_p == 1:
                weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
            else:  # DBRX: divide by the p-norm of the chosen weights
                weights_TK = weights_TK / torch.linalg.vector_norm(weights_TK, ord=self.cfg.normalize_p, dim=-1,
                                                                   keepdim=True).clamp_min(1e-20)
        if self.cfg.routed_scaling_factor != 1.0:
            weights_TK = weights_TK * self.cfg.routed_scaling_factor
        return weights_TK

    @torch.no_grad()
    def record_load(self, expert_ids_TK: torch.Tensor) -> None:
        """Counts a training pass's routed assignments per expert (for the bias update)."""
        self.load_since_update += torch.bincount(expert_ids_TK.flatten(), minlength=self.cfg.num_routed)

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor | None = None) -> None:
        """b_i <- b_i + gamma · sign(mean load - load_i) (DeepSeek-V3 §2.1.2), then resets the count.

        ``load_E`` overrides the locally counted load (e.g. the count all-reduced over ranks).
        """
        load_E = self.load_since_update if load_E is None else load_E
        if load_E.sum() > 0:
            self.expert_bias += self.cfg.bias_update_rate * torch.sign(load_E.mean() - load_E)
        self.load_since_update.zero_()


class SoftmaxTopKRouter(Router):
    """Softmax scores, top-k (Shazeer et al. 2017 eq. 3-5 without noise; GShard; Mixtral).

    ``softmax_order='before'``: p = softmax(z) over all E, keep the top-k p, optionally renormalise.
    ``softmax_order='after'``: weights = softmax over the K chosen logits (equal to the above with
    renormalisation). Group-limited selection with group score ``max`` is DeepSeek-V2's.
    """

    def forward(self, x_TD: torch.Tensor, topk: TopK | None = None) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        expert_ids_TK, chosen_TK = self.select(probs_TE, topk)
        if self.cfg.softmax_order == "after":
            weights_TK = logits_TE.gather(1, expert_ids_TK).softmax(dim=-1)
        else:
            weights_TK = chosen_TK
        return RouterOutput(logits_TE, probs_TE, expert_ids_TK, self.finish_weights(weights_TK), chosen_TK)


class SwitchRouter(Router):
    """Switch Transformer top-1 (Fedus et al. 2021 §2.1): weight = p_i(x), the router probability.

    In training the router input is multiplied by uniform noise in [1-eps, 1+eps] (Switch's
    "multiplicative jitter", applied to the router input only).
    """

    def forward(self, x_TD: torch.Tensor, topk: TopK | None = None) -> RouterOutput:
        eps = self.cfg.router_jitter
        if self.training and eps > 0:
            x_TD = x_TD.to(router_dtype(x_TD)) * torch.empty_like(x_TD, dtype=torch.float32).uniform_(1 - eps, 1 + eps)
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        expert_ids_TK, chosen_TK = self.select(probs_TE, topk)
        weights_TK = chosen_TK * self.cfg.routed_scaling_factor  # never renormalised: top-1 would give 1
        return RouterOutput(logits_TE, probs_TE, expert_ids_TK, weights_TK, chosen_TK)


class NoisyTopKRouter(Router):
    """Noisy top-k gating (Shazeer et al. 2017 eq. 3-5).

    H(x) = x·W_g + N(0,1) · softplus(x·W_noise) in training (clean logits in eval);
    G(x) = softmax(KeepTopK(H(x), k)). The balance losses use softmax(H) over all experts.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        # Zero noise weights start at softplus(0) = 0.69 noise scale, as in the paper's code.
        self.noise_weight_ED = nn.Parameter(torch.zeros(cfg.num_experts, cfg.d_model))

    def forward(self, x_TD: torch.Tensor, topk: TopK | None = None) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        noisy_TE = logits_TE
        if self.training:
            with torch.autocast(device_type=x_TD.device.type, enabled=False):
                dtype = router_dtype(x_TD)
                scale_TE = F.softplus(F.linear(x_TD.to(dtype), self.noise_weight_ED.to(dtype)))
            noisy_TE = logits_TE + torch.randn_like(logits_TE, dtype=torch.float32) * scale_TE
        probs_TE = noisy_TE.softmax(dim=-1)
        expert_ids_TK, _ = self.select(noisy_TE, topk)
        weights_TK = noisy_TE.gather(1, expert_ids_TK).softmax(dim=-1) * self.cfg.routed_scaling_factor
        return RouterOutput(logits_TE, probs_TE, expert_ids_TK, weights_TK, probs_TE.gather(1, expert_ids_TK))


class SigmoidRouter(Router):
    """DeepSeek-V3 routing (DeepSeek-AI 2024, eq. 12-16 and §2.1.2).

    s = sigmoid(z); experts are chosen by top-k of s + b (b: the aux-loss-free bias, restricted to
    the best groups, group score = sum of the two best biased scores); the weights are the unbiased s
    of the chosen experts, normalised to sum to 1 when ``normalize_weights``, times
    ``routed_scaling_factor``. The balance losses use the normalised scores s / Σ_j s_j.
    """

    def forward(self, x_TD: torch.Tensor, topk: TopK | None = None) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        scores_TE = logits_TE.sigmoid()
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        expert_ids_TK, chosen_TK = self.select(scores_TE, topk)
        return RouterOutput(logits_TE, probs_TE, expert_ids_TK, self.finish_weights(chosen_TK), chosen_TK)


class TopPRouter(Router):
    """Top-p (threshold) routing (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing
    in MoE Models", eq. 3-5).

    P = softmax(x·W_r); with the experts sorted by descending P (I_1, I_2, ...), token t takes
    t_k = min{ k : Σ_{j<=k} P_{I_j} >= p } experts, p = ``top_p_threshold``, at most K = ``top_k``:
    slot k is in use when the probability mass of the slots before it is below p, so the first always
    is. The weights are the chosen P (the paper's form: ``normalize_weights=False``; with True they are
    renormalised over the slots in use), times ``routed_scaling_factor``. The slots past a token's
    t_k keep the next-ranked experts' ids, weight 0, ``active_TK`` False: no assignment. The paper
    pairs it with the dynamic loss, the router entropy (``router_entropy_coef``, β = 1e-4 there).
    """

    def forward(self, x_TD: torch.Tensor, topk: TopK | None = None) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        if self.forced is not None:
            expert_ids_TK = self.forced_ids(probs_TE)
            active_TK = self.forced.active_TK
            if active_TK is None:
                active_TK = torch.ones_like(expert_ids_TK, dtype=torch.bool)
            chosen_TK = probs_TE.gather(1, expert_ids_TK)
        else:
            expert_ids_TK = (topk or topk_indices)(probs_TE, self.cfg.top_k)
            chosen_TK = probs_TE.gather(1, expert_ids_TK)
            # mass of the slots before each one (exclusive cumulative sum); the selection takes no gradient
            before_TK = chosen_TK.detach().cumsum(dim=-1) - chosen_TK.detach()
            active_TK = before_TK < self.cfg.top_p_threshold
        weights_TK = self.finish_weights(chosen_TK.masked_fill(~active_TK, 0.0))
        return RouterOutput(logits_TE, probs_TE, expert_ids_TK, weights_TK, chosen_TK, active_TK=active_TK)


class SparseMixerRouter(Router):
    """PhiMoE's SparseMixer routing at inference (Liu et al. 2024, arXiv 2409.12136; transformers'
    ``sparsemixer`` with ``training=False``), for K rounds (PhiMoE: K = 2).

    Round k takes the best remaining logit m (the experts chosen before are out); experts whose logit
    lies more than 2·``sparsemixer_eps`` below m, relative to max(|z_j|, m), are masked; the weight is
    the chosen expert's softmax over the unmasked remaining logits.
    NOTE: training runs the same deterministic choice with plain gradients through these weights;
    PhiMoE's training-time Gumbel sampling and its Heun's-method gradient estimator are not reproduced.
    """

    def forward(self, x_TD: torch.Tensor, topk: TopK | None = None) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        scores_TE = logits_TE
        ids, weights = [], []
        for _ in range(self.cfg.top_k):
            with torch.no_grad():
                best_T1, best_id_T1 = scores_TE.max(dim=-1, keepdim=True)
                factor_TE = logits_TE.abs().clamp(min=best_T1)
                masked_TE = (best_T1 - logits_TE) / factor_TE > 2 * self.cfg.sparsemixer_eps
            if self.forced is not None:
                best_id_T1 = self.forced_ids(logits_TE)[:, len(ids), None]
            gates_TE = scores_TE.masked_fill(masked_TE, float("-inf")).softmax(dim=-1)
            ids.append(best_id_T1)
            weights.append(gates_TE.gather(1, best_id_T1))
            scores_TE = scores_TE.scatter(1, best_id_T1, float("-inf"))
        expert_ids_TK, weights_TK = torch.cat(ids, dim=1), torch.cat(weights, dim=1)
        return RouterOutput(logits_TE, logits_TE.softmax(dim=-1), expert_ids_TK, self.finish_weights(weights_TK),
                            weights_TK.detach())


class ReluRouter(Router):
    """ReMoE: ReLU routing (Wang et al., ICLR 2025, "ReMoE: Fully Differentiable Mixture-of-Experts with
    ReLU Routing", eq. 5-8).

    Gates R(x) = ReLU(x·W_r): token t uses every expert with R_{t,e} > 0, weighted by R_{t,e} (no
    normalisation; ``routed_scaling_factor`` applies). The slots are all E experts, ``active_TK`` marks
    the positive gates. Sparsity comes from the L1 term L_reg = mean_t Σ_e R_{t,e} (the layer adds
    λ·L_reg to its aux loss; the paper averages it over layers too) whose coefficient λ (the buffer
    ``l1_coef``, λ_0 = ``relu_l1_init``) is adapted after each optimizer step (:meth:`update_l1`):
    λ ← λ · α^sign(S_target − S), α = ``relu_l1_growth``, S the fraction of zero gates in the training
    passes since the last update, S_target = 1 − top_k/E. So ``top_k`` is the *mean* number of experts
    per token the penalty steers toward, and the capacity formula uses it. The paper's load-balancing
    refinement of the L1 term is not included: combine with ``aux_loss_coef`` to balance.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        self.register_buffer("l1_coef", torch.tensor(float(cfg.relu_l1_init)))
        self.register_buffer("gates_since_update", torch.zeros(2))  # [zero gates, all gates] in training passes

    def forward(self, x_TD: torch.Tensor, topk: TopK | None = None) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        gates_TE = F.relu(logits_TE)
        T, E = logits_TE.shape
        expert_ids_TK = torch.arange(E, device=x_TD.device).expand(T, E)
        if self.forced is not None:
            self.forced_ids(logits_TE)
            active_TK = self.forced.active_TK.to(x_TD.device)
        else:
            active_TK = logits_TE.detach() > 0
        if self.training:
            with torch.no_grad():
                self.gates_since_update += torch.stack([(~active_TK).sum(), torch.tensor(T * E, device=x_TD.device)])
        weights_TK = gates_TE.masked_fill(~active_TK, 0.0) * self.cfg.routed_scaling_factor
        return RouterOutput(logits_TE, logits_TE.softmax(dim=-1), expert_ids_TK, weights_TK, gates_TE,
                            active_TK=active_TK)

    @torch.no_grad()
    def update_l1(self) -> None:
        """λ ← λ · α^sign(S_target − S) from the gates counted since the last call, then resets the count."""
        zeros, total = self.gates_since_update
        if total > 0:
            target = 1 - self.cfg.top_k / self.cfg.num_experts
            self.l1_coef *= self.cfg.relu_l1_growth ** torch.sign(target - zeros / total)
        self.gates_since_update.zero_()


class ExpertChoiceRouter(Router):
    """Expert-choice routing (Zhou et al. 2022 §3.2): S = softmax(x·W_g) over experts; each expert
    takes its top-C tokens by S (columns of S), weights = the chosen entries of S.

    C = ceil(capacity_factor · T · top_k / E) (``top_k`` = mean experts per token). NOTE: an expert
    sees the whole batch to choose, so in a causal LM a token's routing depends on later tokens.
    """

    def forward(self, x_TD: torch.Tensor, capacity: int) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        weights_EC, token_ids_EC = probs_TE.t().topk(capacity, dim=-1)
        return RouterOutput(logits_TE, probs_TE, token_ids_EC=token_ids_EC,
                            weights_EC=weights_EC * self.cfg.routed_scaling_factor)


class SoftRouter(Router):
    """Dense soft gating (Jacobs et al. 1991): every expert, weighted by softmax(x·W_g) (``topk`` unused)."""

    def forward(self, x_TD: torch.Tensor, topk: TopK | None = None) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        T, E = probs_TE.shape
        expert_ids_TK = torch.arange(E, device=x_TD.device).expand(T, E)
        weights_TE = probs_TE * self.cfg.routed_scaling_factor
        return RouterOutput(logits_TE, probs_TE, expert_ids_TK, weights_TE, probs_TE)


ROUTER_CLASSES: dict[str, type[Router]] = {
    "softmax_topk": SoftmaxTopKRouter,
    "switch": SwitchRouter,
    "noisy_topk": NoisyTopKRouter,
    "sigmoid": SigmoidRouter,
    "expert_choice": ExpertChoiceRouter,
    "soft": SoftRouter,
    "sparsemixer": SparseMixerRouter,
    "top_p": TopPRouter,
    "relu": ReluRouter,
}


def build_router(cfg: MoEConfig) -> Router:
    return ROUTER_CLASSES[cfg.router](cfg)
