"""The MoE FFN layer: route, plan, run the experts, combine; plus shared / dense residual experts.

Legend: T tokens, D model width, E experts, K experts per token, B sequences, S tokens per sequence.

Usage::

    cfg = MoEConfig(d_model=512, expert_hidden=1408, num_experts=8, top_k=2, aux_loss_coef=0.01)
    layer = MoELayer(cfg)
    res = layer(x)            # x: [..., 512]
    loss = task_loss + res.aux_loss
    ...; optimizer.step(); layer.update_bias()   # aux-loss-free bias, when bias_update_rate > 0
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moekit.config import MoEConfig
from moekit.moe.dispatch import DispatchPlan, plan_expert_choice
from moekit.moe.dispatcher import LocalDispatcher, TokenDispatcher
from moekit.moe.experts import Experts, gather_experts
from moekit.moe.losses import load_balancing_loss, router_entropy_loss, router_z_loss, sequence_balance_loss
from moekit.moe.routers import ExpertChoiceRouter, RouterOutput, build_router
from moekit.nn.initialize import init_weights
from moekit.nn.mlp import MLP


@dataclass
class RoutingStats:
    """Detached routing statistics of one forward pass (tensors: no host sync until read)."""

    tokens_per_expert: torch.Tensor  # [E] kept assignments per expert
    routed_per_expert: torch.Tensor  # [E] assignments before capacity dropping
    dropped_assignments: torch.Tensor  # () assignments dropped by capacity
    dropped_tokens: torch.Tensor  # () tokens left with no expert at all (the residual carries them)
    dropped_fraction: torch.Tensor  # () dropped assignments / all assignments (expert choice: tokens)
    router_entropy: torch.Tensor  # () mean over tokens of the entropy of the router distribution (nats)
    max_load_ratio: torch.Tensor  # () max / mean of tokens_per_expert (1 = perfect balance)
    # compute per token: experts actually computed for a token (null experts and dropped assignments
    # excluded), its mean over tokens and the histogram of tokens over 0, 1, ..., max (K; E for expert choice)
    experts_per_token: torch.Tensor  # ()
    experts_per_token_hist: torch.Tensor  # [max + 1] tokens

    def to_dict(self) -> dict[str, float | list[float]]:
        return {k: (v.tolist() if v.dim() else v.item()) for k, v in self.__dict__.items()}


@dataclass
class MoEOutput:
    output: torch.Tensor  # same shape as the input
    aux_loss: torch.Tensor  # () weighted sum of the enabled auxiliary terms (0 when none)
    stats: RoutingStats | None  # None from the compiled decoding path (no plan is built)
    aux_terms: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted enabled terms
    router_logits: torch.Tensor | None = None  # [T, E] fp32 (rows of masked-out tokens: zero)


class MoELayer(nn.Module):
    """A sparse MoE FFN (Shazeer et al. 2017; GShard; Switch; DeepSeekMoE; see :class:`MoEConfig`).

    ``forward(x)`` takes ``x`` of shape [..., d_model] (float; for the sequence-wise loss dim -2 of an
    input with 3 or more dims is the sequence, and a 1-D or 2-D input is one sequence) and returns a
    :class:`MoEOutput`. ``forward(x, mask)`` leaves out the tokens the mask marks False (padding):
    they are not routed at all. An empty batch returns an empty output, zero aux loss and zero stats.
    Where the experts live (this process, or an expert-parallel group) is its :attr:`dispatcher`'s
    business (:mod:`moekit.moe.dispatcher`): the layer has one code path.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"MoELayer expects a MoEConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.router = build_router(cfg)
        self.experts = Experts(cfg)
        self.shared = MLP(cfg.d_model, cfg.shared_hidden, cfg.activation, cfg.mlp_bias) if cfg.shared_hidden else None
        self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False) if cfg.shared_expert_gate else None
        self.dense = MLP(cfg.d_model, cfg.dense_hidden, cfg.activation, cfg.mlp_bias) if cfg.dense_hidden else None
        # where the experts live (a plain attribute, no state): moekit.dist.ep.shard_experts installs
        # the expert-parallel all-to-all one
        self.dispatcher: TokenDispatcher = LocalDispatcher()
        self.routing_replay = None  # a moekit.moe.replay.RoutingReplay while one records or replays
        self.reset_parameters()

    @property
    def ep(self):
        """The expert-parallel dispatcher (its ``sent_bytes``, ``first``, ``local``) once
        :func:`moekit.dist.ep.shard_experts` sharded the experts, else None. Read-only: the layer's
        own logic goes through :attr:`dispatcher`."""
        return None if isinstance(self.dispatcher, LocalDispatcher) else self.dispatcher

    def reset_parameters(self) -> None:
        """:func:`moekit.nn.initialize.init_weights` at the config's ``init_std``, every weight alike.

        NOTE: the shared and dense experts are drawn before the router and the routed experts, the
        order every seeded layer has been built with (tests/test_init.py)."""
        for part in (self.shared, self.shared_gate, self.dense, self.router, self.experts):
            if part is not None:
                init_weights(part, self.cfg.init_std)

    # ---- routing -----------------------------------------------------------------------------
    def route(self, x_TD: torch.Tensor) -> tuple[RouterOutput, DispatchPlan]:
        cfg = self.cfg
        T = x_TD.shape[0]
        if isinstance(self.router, ExpertChoiceRouter):  # each expert picks among this batch's tokens
            r = self.router(x_TD, cfg.capacity(T, self.training))
            return r, plan_expert_choice(r.token_ids_EC, r.weights_EC, T)
        replay = self.routing_replay
        self.router.forced = None if replay is None else replay.forced(self)
        try:
            r = self.router(x_TD, topk=self.experts.topk_for(x_TD))  # (the expert backend's top-k)
        finally:
            self.router.forced = None
        if replay is not None:
            replay.observe(self, r)
        plan = self.dispatcher.plan(r, cfg, self.training)  # capacity: over the batch the experts see
        if self.training and cfg.bias_update_rate > 0:
            self.router.record_load(r.expert_ids_TK)
        return r, plan

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MoEOutput:
        """``mask`` (bool, shape ``x.shape[:-1]``, True = a real token): the other rows (padding) are
        not routed at all. They take no capacity slot, no expert-choice router sees them, they count in
        no aux loss, statistic or balancing load, and their routed-expert output is zero (the shared and
        dense experts still run on them); capacity comes from the number of real tokens. So padding
        never changes a real token's result."""
        cfg = self.cfg
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(f"MoELayer input must be a floating-point tensor, got "
                            f"{x.dtype if torch.is_tensor(x) else type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != cfg.d_model:
            raise ValueError(f"MoELayer input has shape {tuple(x.shape)}; its last dimension must be "
                             f"d_model={cfg.d_model}")
        if mask is not None and (not torch.is_tensor(mask) or mask.dtype != torch.bool
                                 or mask.shape != x.shape[:-1]):
            got = f"{mask.dtype} {tuple(mask.shape)}" if torch.is_tensor(mask) else type(mask).__name__
            raise ValueError(f"MoELayer mask must be a bool tensor of shape {tuple(x.shape[:-1])} (the input's "
                             f"shape without d_model), got {got}")
        x_TD = x.reshape(-1, cfg.d_model)
        if x_TD.shape[0] == 0:
            return self._empty(x)

        if self._decoding(x_TD):
            r = self.router(x_TD)
            x_cast, params = self.experts.cast(x_TD)
            out_TD = gather_experts(x_cast, r.expert_ids_TK, r.weights_TK, *params, cfg.activation)
            if mask is not None:  # dropless token choice: a token's routing is its own, padding only zeroed
                out_TD = torch.where(mask.reshape(-1, 1), out_TD, out_TD.new_zeros(()))
            return MoEOutput(self._residual_experts(x_TD, out_TD).view(x.shape).to(x.dtype),
                             r.logits_TE.new_zeros(()), None, {}, r.logits_TE)
        if mask is not None and bool(mask.all()):
            mask = None  # no padding: the plain path
        rows_R = None if mask is None else mask.reshape(-1).nonzero().squeeze(1)  # only real tokens are routed
        if rows_R is not None and rows_R.numel() == 0:
            self.dispatcher.check_no_rows()
            return self._all_padding(x, x_TD)
        res = self._run(x, x_TD if rows_R is None else x_TD.index_select(0, rows_R), mask, rows_R)
        out_TD = res.output
        if rows_R is not None:  # scatter the real rows back among the padding (zero routed output)
            T, E = x_TD.shape[0], cfg.num_routed
            out_TD = out_TD.new_zeros(T, cfg.d_model).index_copy(0, rows_R, out_TD)
            res.router_logits = res.router_logits.new_zeros(T, E).index_copy(0, rows_R, res.router_logits)
        res.output = self._residual_experts(x_TD, out_TD).view(x.shape).to(x.dtype)
        return res

    def _run(self, x: torch.Tensor, x_RD: torch.Tensor, mask: torch.Tensor | None,
             rows_R: torch.Tensor | None) -> MoEOutput:
        """Routes the rows ``x_RD`` (all of ``x``, or its real tokens ``rows_R`` of the flattened
        input) and runs their experts; the output is the routed experts' alone, [R, D]."""
        r, plan = self.route(x_RD)
        out_RD = self.dispatcher.run(self.experts, x_RD, plan)
        if self.cfg.num_null_experts and self.cfg.null_expert == "identity":
            out_RD = out_RD + self._identity_experts(x_RD, r)
        aux_loss, terms = self._aux_losses(x, r, plan, mask, rows_R)
        return MoEOutput(out_RD, aux_loss, self._stats(r, plan), terms, r.logits_TE)

    def _identity_experts(self, x_RD: torch.Tensor, r: RouterOutput) -> torch.Tensor:
        """LongCat-Flash's zero-computation experts: a token's null choices return the token, weighted."""
        null_TK = r.expert_ids_TK >= self.cfg.num_experts
        if r.active_TK is not None:
            null_TK = null_TK & r.active_TK
        w_T = (r.weights_TK * null_TK).sum(dim=-1, keepdim=True)
        return w_T.to(x_RD.dtype) * x_RD

    def _all_padding(self, x: torch.Tensor, x_TD: torch.Tensor) -> MoEOutput:
        res = self._empty(x)
        res.output = self._residual_experts(x_TD, torch.zeros_like(x_TD)).view(x.shape).to(x.dtype)
        res.router_logits = x_TD.new_zeros(x_TD.shape[0], self.cfg.num_routed, dtype=torch.float32)
        return res

    def _decoding(self, x_TD: torch.Tensor) -> bool:
        """Inside the compiled decode step (:func:`moekit.moe.backends.gather_decoding`) the loop path's
        host sync cannot run: a dropless token-choice layer holding all its experts may take the gather
        backend there, when the chooser picks it."""
        return (self.experts.decoding and self.dispatcher.holds_all_experts and self.routing_replay is None
                and self.cfg.num_null_experts == 0 and self.cfg.router != "relu"
                and not isinstance(self.router, ExpertChoiceRouter) and self.cfg.capacity(1, self.training) is None
                and self.experts.backend_for(x_TD, decode_step=True) == "gather")

    def _residual_experts(self, x_TD: torch.Tensor, out_TD: torch.Tensor) -> torch.Tensor:
        """Adds the shared experts (optionally sigmoid-gated, Qwen-MoE) and the dense residual FFN."""
        if self.shared is not None:
            shared_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                shared_TD = shared_TD * torch.sigmoid(self.shared_gate(x_TD))
            out_TD = out_TD + shared_TD
        if self.dense is not None:
            out_TD = out_TD + self.dense(x_TD)
        return out_TD

    # ---- losses and statistics ---------------------------------------------------------------
    def _aux_losses(self, x: torch.Tensor, r: RouterOutput, plan: DispatchPlan, seq_mask: torch.Tensor | None = None,
                    rows_R: torch.Tensor | None = None):
        cfg = self.cfg
        terms: dict[str, torch.Tensor] = {}
        total = r.logits_TE.new_zeros(())
        if cfg.aux_loss_coef > 0:
            terms["load_balancing"] = load_balancing_loss(r.probs_TE, plan.routed_E, cfg.top_k, cfg.lb_convention,
                                                          self.dispatcher.batch_sums, variable_k=cfg.router in ("top_p", "relu"))
            total = total + cfg.aux_loss_coef * terms["load_balancing"]
        if cfg.z_loss_coef > 0:
            terms["z_loss"] = router_z_loss(r.logits_TE)
            total = total + cfg.z_loss_coef * terms["z_loss"]
        if cfg.router == "relu":  # ReMoE's L1 on the gates, its coefficient adapted by the router
            terms["relu_l1"] = torch.relu(r.logits_TE).sum(dim=-1).mean()
            total = total + self.router.l1_coef.to(total.dtype) * terms["relu_l1"]
        if cfg.router_entropy_coef > 0:
            terms["router_entropy"] = router_entropy_loss(r.probs_TE)
            total = total + cfg.router_entropy_coef * terms["router_entropy"]
        if cfg.seq_aux_loss_coef > 0:
            S = x.shape[-2] if x.dim() >= 3 else x.numel() // cfg.d_model
            E, K = cfg.num_routed, cfg.top_k
            probs_TE, expert_ids_TK, mask_BS = r.probs_TE, r.expert_ids_TK, None
            if rows_R is not None:  # back to [B, S] sequences, the padding masked out
                T = seq_mask.numel()
                probs_TE = probs_TE.new_zeros(T, E).index_copy(0, rows_R, probs_TE)
                expert_ids_TK = expert_ids_TK.new_zeros(T, K).index_copy(0, rows_R, expert_ids_TK)
                mask_BS = seq_mask.reshape(-1, S)
            terms["seq_balance"] = sequence_balance_loss(probs_TE.view(-1, S, E), expert_ids_TK.view(-1, S, K),
                                                         mask_BS)
            total = total + cfg.seq_aux_loss_coef * terms["seq_balance"]
        return total, terms

    @torch.no_grad()
    def _stats(self, r: RouterOutput, plan: DispatchPlan) -> RoutingStats:
        T, N = plan.num_tokens, plan.num_assignments
        kept_E = plan.counts_E
        if plan.order_N is not None:
            K = N // T
            kept_N = torch.arange(N, device=kept_E.device) < kept_E.sum()
            computed_TK = torch.empty_like(kept_N)
            computed_TK[plan.order_N] = kept_N
            computed_TK = computed_TK.view(T, K)
            served_TK = computed_TK  # a token whose assignments were all dropped is carried by the residual
            if self.cfg.num_null_experts:  # a null choice is served (it costs nothing), never dropped
                null_TK = r.expert_ids_TK >= self.cfg.num_experts
                served_TK = computed_TK | (null_TK if r.active_TK is None else null_TK & r.active_TK)
            dropped_tokens = (~served_TK.any(dim=1)).sum()
            dropped_assign = plan.routed_E[:self.cfg.num_experts].sum() - kept_E.sum()
            dropped_fraction = dropped_assign.float() / (N if r.active_TK is None else plan.routed_E.sum().clamp_min(1))
            per_token_T, most = computed_TK.sum(dim=1), K
        else:  # expert choice: a token no expert picked is dropped
            picked_T = torch.zeros(T, dtype=torch.bool, device=kept_E.device)
            picked_T[plan.token_ids_N] = True
            dropped_tokens = (~picked_T).sum()
            dropped_assign = torch.zeros((), dtype=torch.long, device=kept_E.device)
            dropped_fraction = dropped_tokens.float() / T
            per_token_T, most = torch.bincount(plan.token_ids_N, minlength=T), self.cfg.num_experts
        p_TE = r.probs_TE.float()
        entropy = -(p_TE * torch.log(p_TE.clamp_min(1e-30))).sum(dim=-1).mean()
        load_E = kept_E.float()
        return RoutingStats(kept_E, plan.routed_E, dropped_assign, dropped_tokens, dropped_fraction, entropy,
                            load_E.max() / load_E.mean().clamp_min(1e-30), per_token_T.float().mean(),
                            torch.bincount(per_token_T, minlength=most + 1))

    def _empty(self, x: torch.Tensor) -> MoEOutput:
        cfg = self.cfg
        E = cfg.num_experts
        zero_E = torch.zeros(E, dtype=torch.long, device=x.device)
        zero = torch.zeros((), device=x.device)
        most = cfg.top_k if cfg.is_token_choice and cfg.router != "relu" else E
        stats = RoutingStats(zero_E, torch.zeros(cfg.num_routed, dtype=torch.long, device=x.device), zero.long(),
                             zero.long(), zero, zero, zero, zero.clone(),
                             torch.zeros(most + 1, dtype=torch.long, device=x.device))
        return MoEOutput(torch.zeros_like(x), zero.clone(), stats, {}, x.new_zeros(0, cfg.num_routed, dtype=torch.float32))

    # ---- balancing ---------------------------------------------------------------------------
    @torch.no_grad()
    def update_bias(self) -> None:
        """Applies the aux-loss-free bias update once (call after each optimizer step, never in eval);
        with ``router='relu'``, ReMoE's L1 coefficient update too."""
        if self.cfg.router == "relu":
            self.router.update_l1()
        if self.cfg.bias_update_rate > 0:
            self.dispatcher.sum_load_(self.router.load_since_update)  # the load of the whole batch
            self.router.update_bias()


def update_expert_biases(model: nn.Module) -> None:
    """Calls :meth:`MoELayer.update_bias` on every MoE layer of ``model`` (once per optimizer step)."""
    for m in model.modules():
        if isinstance(m, MoELayer):
            m.update_bias()
