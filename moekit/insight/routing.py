"""Routing statistics of a model over text, read from the model's own forward passes.

Legend: B sequences, S tokens per sequence, T = B·S tokens, D model width, E experts, K experts per
token, C slots per expert (expert choice), V vocabulary, Q token classes.

:class:`RoutingRecorder` puts forward hooks on every MoE layer and on its router, so each pass
yields exactly what the model routed: the router's :class:`~moekit.moe.routers.RouterOutput` (which
experts each token chose, before capacity) and the layer's :class:`~moekit.moe.layer.MoEOutput`
(kept and routed counts, drops, router entropy, router logits). Nothing is recomputed, so every
router, bias and capacity rule is the model's. :func:`collect_routing` accumulates, per MoE layer:

* load: assignments routed to each expert (``RoutingStats.routed_per_expert``) and kept after capacity;
* router entropy (mean over tokens, nats) and drops;
* co-activation: tokens routed to both expert i and expert j (the diagonal: tokens routed to i);
* (expert, token id) counts, for the tokens each expert takes most often;
* (expert, token class) counts, for the lexical classes of :mod:`moekit.insight.categories`;
* optionally the router logits themselves (expert similarity for merging).

:func:`token_progress` shows a progress bar of the tokens a model's forward passes take, for the
commands that route or evaluate many windows (inspect, prune, eval).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from moekit.model import MoETransformer
from moekit.moe.layer import MoELayer, MoEOutput
from moekit.moe.routers import RouterOutput


class RoutingRecorder:
    """Context manager recording, for every MoE layer, the last router output and layer output.

    Usage::

        with RoutingRecorder(model) as rec:
            model(input_ids_BS)
            for layer_index, (router_out, moe_out) in rec.pop().items(): ...
    """

    def __init__(self, model: MoETransformer):
        self.layers: dict[int, MoELayer] = {blk.index: blk.ffn for blk in model.layers if blk.is_moe}
        self._router: dict[int, RouterOutput] = {}
        self._layer: dict[int, MoEOutput] = {}
        self._handles = []

    def __enter__(self) -> "RoutingRecorder":
        for idx, layer in self.layers.items():
            self._handles.append(layer.router.register_forward_hook(self._keep(self._router, idx)))
            self._handles.append(layer.register_forward_hook(self._keep(self._layer, idx)))
        return self

    @staticmethod
    def _keep(store: dict, idx: int):
        def hook(module, inputs, output):
            store[idx] = output
        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def pop(self) -> dict[int, tuple[RouterOutput, MoEOutput]]:
        """The records of the last forward pass; raises if a layer did not run."""
        missing = sorted(set(self.layers) - set(self._router) - set(self._layer))
        if missing or set(self._router) != set(self._layer):
            raise RuntimeError(f"MoE layers {missing or sorted(set(self._router) ^ set(self._layer))} ran no "
                               f"router in the last forward pass")
        out = {i: (self._router[i], self._layer[i]) for i in sorted(self.layers)}
        self._router.clear()
        self._layer.clear()
        return out


def assignment_mask(r: RouterOutput, num_tokens: int, num_experts: int) -> torch.Tensor:
    """Boolean [T, E]: token t was routed to computed expert e (before capacity). Slots a variable-compute
    router left unused (``active_TK``) and choices of null experts (ids >= E) are no assignment."""
    mask_TE = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=r.logits_TE.device)
    if r.expert_ids_TK is not None:
        used_TK = r.expert_ids_TK < num_experts
        if r.active_TK is not None:
            used_TK &= r.active_TK
        t_N, k_N = used_TK.nonzero(as_tuple=True)
        mask_TE[t_N, r.expert_ids_TK[t_N, k_N]] = True
    else:  # expert choice: each expert's chosen tokens
        E, C = r.token_ids_EC.shape
        mask_TE[r.token_ids_EC.reshape(-1), torch.arange(E, device=mask_TE.device).repeat_interleave(C)] = True
    return mask_TE


def _add_counts(keys: torch.Tensor, counts: torch.Tensor, new_keys: torch.Tensor):
    """Sparse counter: (keys, counts) plus one occurrence of each of ``new_keys``."""
    all_keys = torch.cat([keys, new_keys])
    all_counts = torch.cat([counts, torch.ones_like(new_keys)])
    uniq, inverse = torch.unique(all_keys, return_inverse=True)
    return uniq, torch.zeros_like(uniq).index_add_(0, inverse, all_counts)


@dataclass
class LayerRouting:
    """Accumulated routing of one MoE layer (tensors on the CPU, counts exact)."""

    layer: int
    num_experts: int
    top_k: int
    vocab_size: int
    expert_choice: bool = False  # the layer's router is expert choice (drops are counted in tokens)
    tokens: int = 0
    routed_E: torch.Tensor = None  # assignments routed to each expert (before capacity)
    kept_E: torch.Tensor = None  # assignments each expert ran (after capacity)
    dropped_assignments: int = 0
    dropped_tokens: int = 0
    entropy_sum: float = 0.0  # Σ over passes of (mean router entropy · tokens)
    coact_EE: torch.Tensor = None  # tokens routed to both i and j; diagonal: tokens routed to i
    pair_keys: torch.Tensor = None  # expert · V + token id, sorted unique
    pair_counts: torch.Tensor = None
    classes_EQ: torch.Tensor | None = None  # assignments per expert and token class
    logits: list[torch.Tensor] = field(default_factory=list)  # router logits [T, E] per pass (when kept)

    def __post_init__(self):
        E = self.num_experts
        self.routed_E = torch.zeros(E, dtype=torch.long)
        self.kept_E = torch.zeros(E, dtype=torch.long)
        self.coact_EE = torch.zeros(E, E, dtype=torch.long)
        self.pair_keys = torch.zeros(0, dtype=torch.long)
        self.pair_counts = torch.zeros(0, dtype=torch.long)

    # ---- derived ---------------------------------------------------------------------------
    @property
    def load_E(self) -> torch.Tensor:
        """Fraction of the routed assignments each expert got (sums to 1)."""
        total = self.routed_E.sum()
        return self.routed_E.double() / total if total > 0 else torch.zeros(self.num_experts, dtype=torch.float64)

    @property
    def dropped_fraction(self) -> float:
        """As :class:`~moekit.moe.layer.RoutingStats` defines it, pooled over the passes: dropped
        assignments / routed assignments, or for expert choice tokens no expert picked / tokens."""
        if self.expert_choice:
            return self.dropped_tokens / self.tokens if self.tokens else 0.0
        routed = int(self.routed_E.sum())
        return self.dropped_assignments / routed if routed else 0.0

    @property
    def router_entropy(self) -> float:
        return self.entropy_sum / self.tokens if self.tokens else 0.0

    def expert_token_counts(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids, counts) of the tokens routed to ``expert``, most frequent first (ties: lower id)."""
        V = self.vocab_size
        sel = (self.pair_keys // V) == expert
        ids, counts = self.pair_keys[sel] % V, self.pair_counts[sel]
        order = torch.argsort(-counts, stable=True)  # keys are sorted, so ties stay in id order
        return ids[order], counts[order]

    def router_logits(self) -> torch.Tensor:
        """Router logits [T, E] of every recorded token (``keep_logits=True``)."""
        if not self.logits:
            raise ValueError(f"layer {self.layer}: router logits were not kept (collect_routing(keep_logits=True))")
        return torch.cat(self.logits)

    # ---- accumulation ----------------------------------------------------------------------
    def add(self, ids_T: torch.Tensor, r: RouterOutput, out: MoEOutput, classes_T: torch.Tensor | None,
            keep_logits: bool) -> None:
        T, E = ids_T.shape[0], self.num_experts
        stats = out.stats
        mask_TE = assignment_mask(r, T, E).cpu()
        self.tokens += T
        self.routed_E += stats.routed_per_expert[:E].cpu().long()  # null experts (ids >= E) run nothing
        self.kept_E += stats.tokens_per_expert.cpu().long()
        self.dropped_assignments += int(stats.dropped_assignments)
        self.dropped_tokens += int(stats.dropped_tokens)
        self.entropy_sum += float(stats.router_entropy) * T
        m_TE = mask_TE.to(torch.float64)
        self.coact_EE += torch.round(m_TE.t() @ m_TE).long()
        t_idx, e_idx = mask_TE.nonzero(as_tuple=True)
        ids_T = ids_T.cpu()
        self.pair_keys, self.pair_counts = _add_counts(self.pair_keys, self.pair_counts,
                                                       e_idx * self.vocab_size + ids_T[t_idx])
        if classes_T is not None:
            Q = int(self.classes_EQ.shape[1])
            self.classes_EQ += torch.bincount(e_idx * Q + classes_T[t_idx], minlength=E * Q).view(E, Q)
        if keep_logits:
            self.logits.append(out.router_logits.detach().float().cpu())


@dataclass
class RoutingData:
    """Routing of every MoE layer over the same tokens."""

    layers: dict[int, LayerRouting]
    tokens: int
    token_counts_V: torch.Tensor  # occurrences of each token id in the text
    class_counts_Q: torch.Tensor | None  # tokens of each class (None when classes were not computed)


@torch.no_grad()
@contextlib.contextmanager
def token_progress(model: torch.nn.Module, desc: str, total: int | None, enabled: bool = True) -> Iterator[Any]:
    """While the block runs, a progress bar on stderr counting the input tokens of ``model``'s forward
    passes (a pre-hook on the model: any loop over batches is followed without a callback through it).
    ``total`` is an upper bound (evaluation stops early on a short split); the bar (None when not
    ``enabled``) is cleared at the end."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True, leave=False, dynamic_ncols=True, file=sys.stderr)

    def count(_module, args) -> None:  # NOTE: a pre-hook that returns something replaces the forward's inputs
        if args:
            bar.update(args[0].numel())

    handle = model.register_forward_pre_hook(count)
    try:
        yield bar
    finally:
        handle.remove()
        bar.close()


def collect_routing(model: MoETransformer, batches: Iterable[torch.Tensor], pieces: list[bytes] | None = None,
                    keep_logits: bool = False) -> RoutingData:
    """Runs ``model`` (in eval mode) over ``batches`` of input ids [B, S] and accumulates the routing
    of every MoE layer. ``pieces`` (the bytes of each token id): also count token classes."""
    from moekit.insight.categories import CATEGORIES, classify_tokens

    cfg = model.cfg
    if cfg.moe is None:
        raise ValueError("collect_routing: the model has no MoE layers (ModelConfig.moe=None)")
    was_training = model.training
    model.eval()
    V, Q = cfg.vocab_size, len(CATEGORIES)
    layers: dict[int, LayerRouting] = {}
    recorder = RoutingRecorder(model)
    for idx, layer in recorder.layers.items():
        layers[idx] = LayerRouting(idx, layer.cfg.num_experts, layer.cfg.top_k, V,
                                   expert_choice=layer.cfg.router == "expert_choice")
        if pieces is not None:
            layers[idx].classes_EQ = torch.zeros(layer.cfg.num_experts, Q, dtype=torch.long)
    token_counts_V = torch.zeros(V, dtype=torch.long)
    class_counts_Q = torch.zeros(Q, dtype=torch.long) if pieces is not None else None
    tokens = 0
    try:
        with recorder:
            for ids_BS in batches:
                ids_BS = torch.as_tensor(ids_BS)
                model(ids_BS.to(model.embed.weight.device))
                ids_T = ids_BS.reshape(-1).cpu()  # the layer flattens [B, S, D] to [T, D] in this order
                classes_T = None
                if pieces is not None:
                    classes_T = torch.from_numpy(np.concatenate([classify_tokens(row, pieces)
                                                                 for row in ids_BS.cpu().numpy()]))
                    class_counts_Q += torch.bincount(classes_T, minlength=Q)
                token_counts_V += torch.bincount(ids_T, minlength=V)
                tokens += ids_T.numel()
                for idx, (r, out) in recorder.pop().items():
                    layers[idx].add(ids_T, r, out, classes_T, keep_logits)
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("collect_routing: no tokens to route (the text is empty)")
    return RoutingData(layers, tokens, token_counts_V, class_counts_Q)
