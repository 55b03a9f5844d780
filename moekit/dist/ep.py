"""Expert parallelism: sharding the experts of every MoE layer over an EP group, their gradients and
whole-expert checkpoints.

:func:`shard_experts` keeps each rank's experts and installs the all-to-all token dispatcher
(:mod:`moekit.dist.alltoall`, which says how a layer's forward runs across the group) on every MoE layer.

Gradient bookkeeping (loss = mean over ranks of each rank's local mean): non-expert parameters are
averaged over all ranks by DDP; an expert's gradient already sums the contributions of every token of
its EP group (the all-to-all's backward brings them home), so it is summed over its replica group and
divided by the world size (:func:`sync_expert_grads`).
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import nn

from moekit.dist.alltoall import AllToAllDispatcher, all_gather_rows
from moekit.dist.parallel import ParallelDims
from moekit.moe.layer import MoELayer

EXPERT_PARAMS = ("w_in", "w_out", "b_in", "b_out")


def shard_experts(model: nn.Module, dims: ParallelDims) -> nn.Module:
    """Keeps this rank's experts of every MoE layer of ``model`` (built whole, with identical weights on
    every rank) and installs the all-to-all token dispatcher on each layer. In place; returns ``model``."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for layer in layers:  # every layer checked before any is sharded: a refusal leaves the model whole
        dims.check_experts(layer.cfg.num_experts)
        check_shardable(layer)
    for layer in layers:
        cfg = layer.cfg
        dispatcher = AllToAllDispatcher(dims, cfg.num_experts)
        lo, hi = dispatcher.first, dispatcher.first + dispatcher.local
        for name in EXPERT_PARAMS:
            p = getattr(layer.experts, name)
            if p is not None:
                setattr(layer.experts, name, nn.Parameter(p.detach()[lo:hi].clone()))
        layer.dispatcher = dispatcher
    return model


def check_shardable(layer: MoELayer) -> None:
    """Raises ValueError naming the field when ``layer`` cannot run on the all-to-all dispatcher: it
    plans every slot of every token as an assignment of a computed expert held by some rank."""
    cfg = layer.cfg
    if cfg.router == "expert_choice":
        raise ValueError("router='expert_choice' is not supported under expert parallelism (each expert "
                         "would need every rank's scores); use a token-choice router or --ep 1")
    if cfg.router in ("top_p", "relu") or cfg.num_null_experts:
        field, value, off = (("router", cfg.router, "a fixed top-k router") if cfg.router in ("top_p", "relu")
                             else ("num_null_experts", cfg.num_null_experts, "0"))
        raise ValueError(f"MoEConfig.{field}={value!r} is not supported under expert parallelism (a variable "
                         f"number of computed experts per token); use {off} or --ep 1")
    if not layer.dispatcher.holds_all_experts:
        raise ValueError(f"shard_experts: the layer's experts are already sharded ({layer.dispatcher!r}); "
                         f"shard a model built whole")


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
    return {k: all_gather_rows(v, dims.ep_group) if is_expert_param(k) else v for k, v in state.items()}


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
        state[idx] = {k: all_gather_rows(v, dims.ep_group) if idx in slices and torch.is_tensor(v) and v.dim() else v
                      for k, v in st.items()}
    return {"state": state, "param_groups": sd["param_groups"]}
