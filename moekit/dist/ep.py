"""Expert parallelism: each rank of an EP group holds E/P experts of every MoE layer.

Forward of one MoE layer on rank i (GShard, Lepikhin et al. 2020 §2.2; DeepSpeed-MoE; Megatron-Core):

1. route the rank's own tokens (router weights are replicated);
2. decide which assignments are kept: dropless keeps all; with a capacity factor the decision is the
   single-process plan of the whole EP group's batch (expert ids, and priorities for the score policy,
   all-gathered: T·K small integers, not hidden states), so drops are exactly those of one process;
3. sort the kept assignments by expert, exchange the per-expert counts (all-to-all), then the token
   rows themselves (all-to-all of uneven splits, differentiable);
4. run the local experts on the received rows grouped by expert: the same grouped dispatch as the
   single-process layer (slice loop or grouped GEMM), with unit combine weights;
5. send the expert outputs back (second all-to-all) and combine them with the router weights on the
   rank that owns the tokens, so the router's gradient stays local.

Balancing statistics are global where the formula is over the batch: the load-balancing loss uses
the batch-wide routed counts f_i and mean probabilities P_i (all-reduced, differentiable), the
aux-loss-free bias sees loads all-reduced over every rank. The z-loss and the sequence-wise loss are
means over tokens / sequences and stay local (the DP average of equal-sized local means is the
global mean).

Gradient bookkeeping (loss = mean over ranks of each rank's local mean): non-expert parameters are
averaged over all ranks by DDP; an expert's gradient already sums the contributions of every token of
its EP group (the all-to-all's backward brings them home), so it is summed over its replica group and
divided by the world size (:func:`sync_expert_grads`).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from moekit.dist.parallel import ParallelDims
from moekit.moe.dispatch import DispatchPlan, plan_token_choice, plan_with_kept
from moekit.moe.routers import RouterOutput

EXPERT_PARAMS = ("w_in", "w_out", "b_in", "b_out")
# NOTE: these differentiable collectives are the public autograd-aware ones; newer PyTorch marks them
# deprecated in favour of a private module, so the notice is silenced rather than shown every run.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.", category=FutureWarning)


@dataclass
class ExpertParallel:
    """What an MoE layer needs to run its experts across an EP group."""

    dims: ParallelDims
    num_experts: int
    sent_bytes: int = 0  # token rows this rank sent to other ranks in forward passes (both exchanges)

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


def _moe_layers(model: nn.Module):
    from moekit.moe.layer import MoELayer

    return [m for m in model.modules() if isinstance(m, MoELayer)]


def shard_experts(model: nn.Module, dims: ParallelDims) -> nn.Module:
    """Keeps this rank's experts of every MoE layer of ``model`` (built whole, with identical weights on
    every rank) and switches the layers to expert-parallel execution. In place; returns ``model``."""
    for layer in _moe_layers(model):
        cfg = layer.cfg
        dims.check_experts(cfg.num_experts)
        if cfg.router == "expert_choice":
            raise ValueError("router='expert_choice' is not supported under expert parallelism (each expert "
                             "would need every rank's scores); use a token-choice router or --ep 1")
        ep = ExpertParallel(dims, cfg.num_experts)
        for name in EXPERT_PARAMS:
            p = getattr(layer.experts, name)
            if p is not None:
                setattr(layer.experts, name, nn.Parameter(p.detach()[ep.first:ep.first + ep.local].clone()))
        layer.ep = ep
    return model


def data_parallel(model: nn.Module) -> nn.Module:
    """``model`` under DDP for everything but the experts (their gradients: :func:`sync_expert_grads`);
    buffers are not re-broadcast each forward (the routers' balancing state is kept equal by
    all-reduced loads)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    DDP._set_params_and_buffers_to_ignore_for_model(model, expert_param_names(model))
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters \
        else {"broadcast_buffers": False}
    return DDP(model, **no_sync)


def is_expert_param(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] == "experts" and parts[-1] in EXPERT_PARAMS


def expert_param_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if is_expert_param(n)]


# ---- the forward ------------------------------------------------------------------------------
def _all_gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def _kept_mask(layer, r: RouterOutput, T: int) -> torch.Tensor:
    """Which of this rank's T·K assignments survive the capacity of the whole EP group's batch."""
    cfg, ep = layer.cfg, layer.ep
    sizes = _all_gather_rows(torch.tensor([T], device=r.expert_ids_TK.device), ep.group)
    if bool((sizes != T).any()):
        raise ValueError(f"capacity_factor under expert parallelism needs the same number of tokens on every rank "
                         f"(real tokens, when a token mask leaves out padding); got {sizes.tolist()}")
    capacity = cfg.capacity(T * ep.size, layer.training)
    ids = _all_gather_rows(r.expert_ids_TK, ep.group)
    prio = _all_gather_rows(r.priority_TK.detach(), ep.group) if cfg.drop_policy == "score" else None
    plan = plan_token_choice(ids, torch.zeros(ids.shape, device=ids.device), cfg.num_experts, capacity, prio,
                             cfg.drop_policy)
    kept = torch.zeros(ids.numel(), dtype=torch.bool, device=ids.device)
    kept[plan.order_N[:int(plan.counts_E.sum())]] = True
    K = ids.shape[1]
    rank = ep.dims.ep_rank
    return kept[rank * T * K:(rank + 1) * T * K].view(T, K)


def ep_route(layer, x_TD: torch.Tensor) -> tuple[RouterOutput, DispatchPlan]:
    """Routing under EP: the router runs locally, capacity is decided over the EP group."""
    cfg = layer.cfg
    r = layer.router(x_TD)
    if cfg.capacity(x_TD.shape[0], layer.training) is None:  # dropless: every assignment is kept
        plan = plan_token_choice(r.expert_ids_TK, r.weights_TK, cfg.num_experts)
    else:
        plan = plan_with_kept(r.expert_ids_TK, r.weights_TK, cfg.num_experts, _kept_mask(layer, r, x_TD.shape[0]))
    if layer.training and cfg.bias_update_rate > 0:
        layer.router.record_load(r.expert_ids_TK)
    return r, plan


def _regroup_by_expert(counts_PE: torch.Tensor) -> torch.Tensor:
    """Row order that turns received rows, laid out [source rank][local expert], into
    [local expert][source rank] blocks (each block's rows keep their order)."""
    lens_PE = counts_PE.flatten()
    starts_PE = (lens_PE.cumsum(0) - lens_PE).view_as(counts_PE)
    starts_EP, lens_EP = starts_PE.t().flatten(), counts_PE.t().flatten()  # blocks in the wanted order
    block_N = torch.repeat_interleave(starts_EP - (lens_EP.cumsum(0) - lens_EP), lens_EP)
    return block_N + torch.arange(block_N.shape[0], device=counts_PE.device)


def ep_experts(layer, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Runs the kept assignments of ``plan`` on the experts of the whole EP group; [T, D]."""
    ep = layer.ep
    P, El = ep.size, ep.local
    kept = int(plan.counts_E.sum())
    rows_N = plan.token_ids_N[:kept]  # sorted by expert, so by destination rank
    send_E = plan.counts_E
    recv_E = torch.empty_like(send_E)
    dist.all_to_all_single(recv_E, send_E, group=ep.group)  # [source rank, my local expert] counts
    send_splits = send_E.view(P, El).sum(1).tolist()
    recv_PE = recv_E.view(P, El)
    recv_splits = recv_PE.sum(1).tolist()

    me = ep.dims.ep_rank
    rows_out = sum(send_splits) - send_splits[me] + sum(recv_splits) - recv_splits[me]
    ep.sent_bytes += rows_out * x_TD.shape[1] * x_TD.element_size()  # backward moves as much again

    x_send = x_TD.index_select(0, rows_N)
    x_recv = x_send.new_empty(sum(recv_splits), x_TD.shape[1])
    x_recv = dist_fn.all_to_all_single(x_recv, x_send, recv_splits, send_splits, group=ep.group)

    perm_N = _regroup_by_expert(recv_PE)
    local_counts = recv_PE.sum(0)
    local_plan = DispatchPlan(perm_N, torch.ones(perm_N.shape[0], device=x_TD.device), local_counts,
                              local_counts.clone(), num_tokens=x_recv.shape[0])
    y_recv = layer.experts(x_recv, local_plan)  # row j: its expert's output, unweighted

    y_back = y_recv.new_empty(kept, x_TD.shape[1])
    y_back = dist_fn.all_to_all_single(y_back, y_recv, send_splits, recv_splits, group=ep.group)
    y_back = y_back * plan.weights_N[:kept, None].to(y_back.dtype)
    return x_TD.new_zeros(x_TD.shape).index_add(0, rows_N, y_back.to(x_TD.dtype))


def global_batch_sums(sum_E: torch.Tensor, routed_E: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Batch-wide Σ_t p_t (a differentiable all-reduce over every rank), routed counts and token count."""
    sum_E = dist_fn.all_reduce(sum_E)
    routed = routed_E.clone()
    dist.all_reduce(routed)
    T_ = torch.tensor([T], device=routed.device)
    dist.all_reduce(T_)
    return sum_E, routed, int(T_)


# ---- gradients, checkpoints ---------------------------------------------------------------------
@torch.no_grad()
def sync_expert_grads(model: nn.Module, dims: ParallelDims) -> None:
    """Expert gradients: summed over the replica group, divided by the world size (see the module doc)."""
    for name, p in model.named_parameters():
        if is_expert_param(name) and p.grad is not None:
            if dims.replicas > 1:
                dist.all_reduce(p.grad, group=dims.replica_group)
            p.grad.div_(dims.world)


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, dims: ParallelDims) -> torch.Tensor:
    """The global gradient norm (every expert counted once) and clipping by it, as
    ``torch.nn.utils.clip_grad_norm_`` does for one process."""
    shared_sq = torch.zeros((), dtype=torch.float64)
    expert_sq = torch.zeros((), dtype=torch.float64)
    grads = []
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        grads.append(p.grad)
        sq = p.grad.double().square().sum()
        if is_expert_param(name):
            expert_sq += sq
        else:
            shared_sq += sq
    if dims.ep > 1:
        dist.all_reduce(expert_sq, group=dims.ep_group)
    total = (shared_sq + expert_sq).sqrt().float()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total


@torch.no_grad()
def full_state_dict(model: nn.Module, dims: ParallelDims) -> dict[str, torch.Tensor]:
    """The model's state with every expert tensor gathered whole [E, ...] (a collective: every rank of
    the EP group calls it); the checkpoint format is the same whatever the EP degree."""
    state = model.state_dict()
    if dims.ep == 1:
        return state
    return {k: _all_gather_rows(v, dims.ep_group) if is_expert_param(k) else v for k, v in state.items()}


def expert_slices(model: nn.Module, optimizer: torch.optim.Optimizer, dims: ParallelDims) -> dict[int, slice]:
    """Optimizer parameter index -> this rank's slice of the whole expert tensor."""
    expert_ids = {id(p) for n, p in model.named_parameters() if is_expert_param(n)}
    out, i = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in expert_ids:
                local = p.shape[0]
                out[i] = slice(dims.ep_rank * local, (dims.ep_rank + 1) * local)
            i += 1
    return out


@torch.no_grad()
def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, dims: ParallelDims) -> dict:
    """``optimizer.state_dict()`` with the expert states gathered whole (a collective)."""
    sd = optimizer.state_dict()
    if dims.ep == 1:
        return sd
    slices = expert_slices(model, optimizer, dims)
    state = {}
    for idx, st in sd["state"].items():
        state[idx] = {k: _all_gather_rows(v, dims.ep_group) if idx in slices and torch.is_tensor(v) and v.dim() else v
                      for k, v in st.items()}
    return {"state": state, "param_groups": sd["param_groups"]}
