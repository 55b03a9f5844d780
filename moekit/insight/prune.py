"""Expert pruning and merging: ``moekit prune``.

    moekit prune --model runs/moe --experts 4 --method drop  --out runs/moe-drop4
    moekit prune --model runs/moe --experts 4 --method merge --out runs/moe-merge4

Both methods first route calibration text through the model (``calib_split``: windows of the
training split by default, so the validation loss reported before and after is measured on text
the decisions never saw) and count each expert's routed load per MoE layer.

* ``drop`` keeps the ``num_experts`` most used experts of every layer (ties: the lower index) and
  slices their expert weights, router rows and selection bias: expert pruning by usage frequency.
  (Lu et al. 2024, "Not All Experts are Equal: Efficient Expert Pruning and Skipping for
  Mixture-of-Experts Large Language Models", instead search the expert subset whose layer output
  best reconstructs the full layer's on calibration data; that search is not implemented here.)
  With renormalised top-k weights a token whose chosen experts all survive gets exactly its old output.
* ``merge`` follows MC-SMoE (Li et al. 2023, "Merge, Then Compress: Demystify Efficient SMoE with
  Hints from Its Routing Policy"): the ``num_experts`` most used experts are dominant; every other
  expert joins the dominant expert it is most similar to (cosine similarity of their router logits on
  the calibration tokens, MC-SMoE's choice; or of their router rows, or of their weights); within a
  group each expert's hidden units are first permuted to match the dominant expert's (greedy weight
  matching on the units' concatenated in/out weights; MC-SMoE solves the same matching exactly),
  then weights are averaged with the experts' usage frequencies as weights. Router rows and the
  selection bias are averaged with the same weights.

The result is a moekit checkpoint with fewer experts per layer; ``prune`` returns (and the CLI
prints) the validation loss before and after.

Legend: T tokens, D model width, E experts, F expert hidden width, H = 2F (gated) or F, X unit features.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moekit import checkpoint as ckpt_io
from moekit.config import MoEConfig
from moekit.insight.common import (LoadedModel, default_seq_len, load_for_analysis, open_text, prepare_out_dir,
                                   require_moe, split_tokens, windows, write_marker)
from moekit.insight.routing import collect_routing, token_progress
from moekit.model import MoETransformer
from moekit.moe.layer import MoELayer
from moekit.validate import FLAG, bad, check_choice, check_int

METHODS = ("drop", "merge")
SIMILARITIES = ("router-logits", "router-rows", "weights")
SPLITS = ("train", "val")


@dataclass(frozen=True)
class PruneConfig:
    """How to prune; validated at construction (the model-dependent checks: :func:`check_target`)."""

    num_experts: int  # experts per MoE layer after pruning
    method: str = "drop"
    top_k: int | None = None  # None: keep the model's top_k (it must not exceed num_experts)
    similarity: str = "router-logits"  # merge: how experts are grouped
    align: bool = True  # merge: permute hidden units to the dominant expert's before averaging
    calib_split: str = "train"
    calib_tokens: int = 32768
    eval_tokens: int = 65536
    batch_size: int = 8
    seq_len: int | None = None  # None: the run's training sequence length
    data: str | None = None  # None: the data the run was trained on

    def __post_init__(self) -> None:
        for name in ("num_experts", "calib_tokens", "eval_tokens", "batch_size"):
            check_int(FLAG, name, getattr(self, name), 1)
        if self.top_k is not None:
            check_int(FLAG, "top_k", self.top_k, 1)
            if self.top_k > self.num_experts:
                raise bad(FLAG, "top_k", self.top_k, f"expected an int in [1, {self.num_experts}] (the target expert "
                          f"count)")
        check_choice(FLAG, "method", self.method, METHODS)
        check_choice(FLAG, "similarity", self.similarity, SIMILARITIES)
        check_choice(FLAG, "calib_split", self.calib_split, SPLITS)


@dataclass
class PruneResult:
    checkpoint: Path
    method: str
    num_experts_before: int
    num_experts_after: int
    top_k_before: int
    top_k_after: int
    val_loss_before: float
    val_loss_after: float
    eval_tokens: int
    groups: dict[int, list[list[int]]]  # per MoE layer: the old experts each new expert is made of
    usage: dict[int, list[float]]  # per MoE layer: each old expert's share of the calibration load

    def to_dict(self) -> dict:
        return {"checkpoint": str(self.checkpoint), "method": self.method,
                "num_experts_before": self.num_experts_before, "num_experts_after": self.num_experts_after,
                "top_k_before": self.top_k_before, "top_k_after": self.top_k_after,
                "val_loss_before": self.val_loss_before, "val_loss_after": self.val_loss_after,
                "val_loss_delta": self.val_loss_after - self.val_loss_before, "eval_tokens": self.eval_tokens,
                "groups": {str(k): v for k, v in self.groups.items()},
                "usage": {str(k): v for k, v in self.usage.items()}}


def check_target(moe: MoEConfig, cfg: PruneConfig) -> MoEConfig:
    """The pruned layers' config, or a ValueError saying why the target is impossible."""
    E = moe.num_experts
    if cfg.num_experts >= E:
        raise ValueError(f"--experts={cfg.num_experts} is invalid: the model has {E} experts per MoE layer; the "
                         f"target must be smaller (1 <= experts < {E})")
    if moe.n_group > 1:
        raise ValueError(f"the model uses group-limited routing (moe.n_group={moe.n_group}); pruning across groups "
                         f"would break the groups, so it is not supported")
    if moe.router == "soft":  # soft gating weights every expert: top_k is the expert count by definition
        top_k = cfg.num_experts
    else:
        top_k = cfg.top_k if cfg.top_k is not None else moe.top_k
        if top_k > cfg.num_experts:
            raise ValueError(f"--experts={cfg.num_experts} is below the model's top_k={moe.top_k}: every token needs "
                             f"top_k distinct experts; pass --top-k with a value <= {cfg.num_experts} to route each "
                             f"token to fewer experts")
    return moe.replace(num_experts=cfg.num_experts, top_k=top_k)


# ---- grouping -------------------------------------------------------------------------------
def plan_drop(usage_E: torch.Tensor, target: int) -> list[list[int]]:
    """The ``target`` most used experts (ties: the lower index), in index order, one per group."""
    order = torch.argsort(-usage_E.double(), stable=True)
    return [[int(e)] for e in sorted(order[:target].tolist())]


def plan_merge(usage_E: torch.Tensor, target: int, similarity_EE: torch.Tensor) -> list[list[int]]:
    """MC-SMoE grouping: the ``target`` most used experts are dominant (in index order); every other
    expert joins its most similar dominant expert. Each group lists its dominant expert first."""
    dominant = [g[0] for g in plan_drop(usage_E, target)]
    groups = {d: [d] for d in dominant}
    for e in range(usage_E.numel()):
        if e not in groups:
            best = max(dominant, key=lambda d: (float(similarity_EE[e, d]), -d))
            groups[best].append(e)
    return [groups[d] for d in dominant]


def _cosine_rows(x_EX: torch.Tensor) -> torch.Tensor:
    x_EX = x_EX.double()
    x_EX = x_EX / x_EX.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return x_EX @ x_EX.t()


def expert_similarity(layer: MoELayer, kind: str, logits_TE: torch.Tensor | None = None) -> torch.Tensor:
    """[E, E] cosine similarity of the experts' router logits over tokens, router rows, or weights."""
    if kind == "router-logits":
        if logits_TE is None:
            raise ValueError("similarity='router-logits' needs the router logits of the calibration tokens")
        return _cosine_rows(logits_TE.t())
    if kind == "router-rows":
        return _cosine_rows(layer.router.weight_ED.detach())
    E = layer.cfg.num_experts
    return _cosine_rows(torch.cat([layer.experts.w_in.detach().reshape(E, -1),
                                   layer.experts.w_out.detach().reshape(E, -1)], dim=1))


# ---- alignment and merging ------------------------------------------------------------------
def greedy_matching(sim_FF: torch.Tensor) -> torch.Tensor:
    """perm [F]: perm[i] is the column matched to row i, taking the most similar free pairs first
    (a greedy approximation of the linear assignment MC-SMoE solves)."""
    F_ = sim_FF.shape[0]
    order = np.argsort(-sim_FF.double().numpy().ravel(), kind="stable")
    perm = np.full(F_, -1, dtype=np.int64)
    used_cols = np.zeros(F_, dtype=bool)
    matched = 0
    for flat in order:
        i, j = divmod(int(flat), F_)
        if perm[i] >= 0 or used_cols[j]:
            continue
        perm[i], used_cols[j] = j, True
        matched += 1
        if matched == F_:
            break
    return torch.from_numpy(perm)


def _unit_features(w_in_HD: torch.Tensor, w_out_DF: torch.Tensor, gated: bool) -> torch.Tensor:
    """[F, X]: each hidden unit's gate row, up row (gated) and down column, unit-normalised."""
    F_ = w_out_DF.shape[1]
    parts = [w_in_HD[:F_], w_in_HD[F_:]] if gated else [w_in_HD]
    feats = torch.cat([*parts, w_out_DF.t()], dim=1).double()
    return feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-30)


def permute_units(tensors: dict[str, torch.Tensor], perm_F: torch.Tensor, gated: bool) -> dict[str, torch.Tensor]:
    """One expert's weights with hidden unit perm[i] moved to position i (the function is unchanged:
    the activation acts on each unit alone)."""
    F_ = perm_F.numel()
    rows_H = torch.cat([perm_F, perm_F + F_]) if gated else perm_F
    out = {"w_in": tensors["w_in"][rows_H], "w_out": tensors["w_out"][:, perm_F]}
    if "b_in" in tensors:
        out["b_in"] = tensors["b_in"][rows_H]
    if "b_out" in tensors:
        out["b_out"] = tensors["b_out"]
    return out


def pruned_layer_state(layer: MoELayer, groups: list[list[int]], usage_E: torch.Tensor,
                       align: bool = True) -> dict[str, torch.Tensor]:
    """The state dict of the layer with one expert per group: a group of one is that expert (drop);
    a larger group is the usage-weighted average of its experts, each aligned to the first (merge).
    Shared and dense experts are kept as they are."""
    sd = {k: v.detach() for k, v in layer.state_dict().items()}
    gated = layer.cfg.gated
    expert_keys = [k for k in ("w_in", "w_out", "b_in", "b_out") if f"experts.{k}" in sd]
    router_rows = [k for k in ("router.weight_ED", "router.noise_weight_ED", "router.expert_bias") if k in sd]
    out = {k: v for k, v in sd.items() if not k.startswith(("experts.", "router."))}
    merged: dict[str, list[torch.Tensor]] = {k: [] for k in expert_keys + router_rows}
    for group in groups:
        ref = group[0]
        if len(group) == 1:  # a kept expert: its slices as they are
            for k in expert_keys:
                merged[k].append(sd[f"experts.{k}"][ref])
            for k in router_rows:
                merged[k].append(sd[k][ref])
            continue
        u = usage_E[group].double()
        w = u / u.sum() if u.sum() > 0 else torch.full_like(u, 1.0 / len(group))  # an unused group: plain mean
        ref_t = {k: sd[f"experts.{k}"][ref] for k in expert_keys}
        acc = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in ref_t.items()}
        for m, wm in zip(group, w.tolist()):
            t = {k: sd[f"experts.{k}"][m] for k in expert_keys}
            if align and m != ref:
                sim_FF = _unit_features(ref_t["w_in"], ref_t["w_out"], gated) @ \
                    _unit_features(t["w_in"], t["w_out"], gated).t()
                t = permute_units(t, greedy_matching(sim_FF), gated)
            for k in expert_keys:
                acc[k] += wm * t[k].double()
        for k in expert_keys:
            merged[k].append(acc[k].to(sd[f"experts.{k}"].dtype))
        for k in router_rows:
            rows = sd[k][group]
            merged[k].append((w @ rows.double()).to(rows.dtype))
    for k in expert_keys:
        out[f"experts.{k}"] = torch.stack(merged[k])
    for k in router_rows:
        out[k] = torch.stack(merged[k])
    if "router.load_since_update" in sd:  # a training-time counter: starts again at zero
        out["router.load_since_update"] = torch.zeros(len(groups), dtype=sd["router.load_since_update"].dtype)
    return out


@torch.no_grad()
def prune_model(model: MoETransformer, groups: dict[int, list[list[int]]], usage: dict[int, torch.Tensor],
                new_moe: MoEConfig, align: bool = True) -> MoETransformer:
    """A new model whose MoE layer i has one expert per group of ``groups[i]``; all else copied."""
    cfg = model.cfg.replace(moe=new_moe)
    dtype = next(model.parameters()).dtype
    with torch.random.fork_rng(devices=[]):
        new = MoETransformer(cfg).to(dtype)
    state = {}
    moe_prefixes = {f"layers.{i}.ffn." for i in groups}
    for k, v in model.state_dict().items():
        if not any(k.startswith(p) for p in moe_prefixes):
            state[k] = v
    for i, layer_groups in groups.items():
        layer = model.layers[i].ffn
        if len(layer_groups) != new_moe.num_experts:
            raise ValueError(f"layer {i}: {len(layer_groups)} groups for num_experts={new_moe.num_experts}")
        for k, v in pruned_layer_state(layer, layer_groups, usage[i], align).items():
            state[f"layers.{i}.ffn.{k}"] = v
    new.load_state_dict(state, strict=True)
    return new.eval()


def prune(model_path: str | Path, out: str | Path, cfg: PruneConfig, overwrite: bool = False,
          loaded: LoadedModel | None = None, progress: bool = False) -> PruneResult:
    """``moekit prune``: see the module docstring. ``progress``: a bar on stderr for each pass over text."""
    from moekit.train.loop import evaluate

    loaded = loaded or load_for_analysis(model_path)
    model = loaded.model
    require_moe(model, model_path, "prune")
    new_moe = check_target(model.cfg.moe, cfg)
    seq_len = default_seq_len(loaded, cfg.seq_len)
    corpus = open_text(loaded, cfg.data)
    calib = split_tokens(corpus, loaded.tokenizer, cfg.calib_split)
    val = split_tokens(corpus, loaded.tokenizer, "val")
    out = prepare_out_dir(Path(out), overwrite, "prune")

    # 1. Calibrate: the routed load of every expert (and the router logits for MC-SMoE grouping).
    keep_logits = cfg.method == "merge" and cfg.similarity == "router-logits"
    with token_progress(model, "calibration", cfg.calib_tokens, progress):
        routing = collect_routing(model, windows(calib, cfg.batch_size, seq_len, cfg.calib_tokens),
                                  keep_logits=keep_logits)
    # 2. Group the experts of every layer.
    groups, usage = {}, {}
    for i, lr in routing.layers.items():
        usage[i] = lr.load_E
        if cfg.method == "drop":
            groups[i] = plan_drop(usage[i], cfg.num_experts)
        else:
            sim = expert_similarity(model.layers[i].ffn, cfg.similarity, lr.router_logits() if keep_logits else None)
            groups[i] = plan_merge(usage[i], cfg.num_experts, sim)
    # 3. Build the smaller model, 4. measure both on the validation split.
    pruned = prune_model(model, groups, usage, new_moe, cfg.align)
    with token_progress(model, "validation before", cfg.eval_tokens, progress):
        before = evaluate(model, val, cfg.batch_size, seq_len, cfg.eval_tokens)
    with token_progress(pruned, "validation after", cfg.eval_tokens, progress):
        after = evaluate(pruned, val, cfg.batch_size, seq_len, cfg.eval_tokens)
    path = ckpt_io.save_checkpoint(out, 0, pruned, pruned.cfg, loaded.tokenizer, loaded.train_cfg or None)
    result = PruneResult(path, cfg.method, model.cfg.moe.num_experts, new_moe.num_experts, model.cfg.moe.top_k,
                         new_moe.top_k, before["loss"], after["loss"], after["tokens"], groups,
                         {i: u.tolist() for i, u in usage.items()})
    write_marker(out, "prune", source=str(loaded.checkpoint or model_path), seq_len=seq_len, **result.to_dict())
    return result
