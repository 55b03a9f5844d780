"""The routing report: ``moekit inspect``.

    moekit inspect --model runs/small                       # validation text of the run's own data
    moekit inspect --model runs/small --data my.jsonl --out report/ --max-tokens 131072

Runs the model over validation text and writes a report directory:

    load.png                      expert load per layer (heatmap of load / uniform share, centred on 1)
    balance_over_training.png     most and least loaded expert over training (from the run's metrics.jsonl)
    load_over_training_L{i}.png   every expert's load over training, per layer (metrics.jsonl)
    entropy.png                   router entropy per layer; balance of the aggregate load
    coactivation_L{i}.png         P(expert j | expert i) per layer (top-k > 1), experts in clustered order
    classes_L{i}.png              lexical classes of the most specialised experts' tokens (Python text)
    summary.json                  every number behind the figures, the top tokens of every expert, drops
    index.html                    all of it on one static page (relative links; opens from disk)

Load is the share of the routed assignments (T·K per layer, before capacity) each expert gets; an
expert below 10% of the uniform share 1/E ("starved") or above 3x it ("hot") is flagged as
collapse, on stderr, in ``summary.json`` and on the page. The run's metrics.jsonl adds the same
rule applied to every logged training step, so an expert starved for half of training is reported
even when it recovered. Routing is read from the model's own forward passes
(:mod:`moekit.insight.routing`).

What the experts learned is summarised per layer: how decided the router is (entropy against
ln E, as an effective number of experts per token), how far each expert's tokens depart from the
text's own mix (KL divergence in bits, of token ids and of lexical classes), and which experts
fire together (co-activation lift; the matrix is ordered by average-linkage clustering).

Legend: E experts, K experts per token, V vocabulary, Q token classes, N logged training steps.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from moekit.insight.categories import CATEGORIES, token_bytes
from moekit.insight.common import (LoadedModel, default_seq_len, is_python_corpus, load_for_analysis, open_text,
                                   prepare_out_dir, require_moe, split_tokens, windows, write_json, write_marker)
from moekit.insight.routing import LayerRouting, RoutingData, collect_routing
from moekit.train.metrics import COLLAPSE_HIGH, COLLAPSE_LOW, collapsed_experts, read_metrics

CATEGORY_MODES = ("auto", "on", "off")
# An expert starved or hot in at least this share of the logged training steps is reported in the
# report's banner (a single noisy batch is not): "collapse during training".
TRAINING_COLLAPSE_MIN_FRACTION = 0.1
SPECIALISTS = 3  # most specialised experts named per layer in the summary
PAIRS = 3  # most co-activated expert pairs named per layer


@dataclass(frozen=True)
class InspectConfig:
    """Options of ``moekit inspect``; validated at construction."""

    model: str
    data: str | None = None  # None: the data the run was trained on (its validation split)
    out: str | None = None  # None: runs/inspect-<model directory name>
    max_tokens: int = 65536
    batch_size: int = 8
    seq_len: int | None = None  # None: the run's training sequence length
    top_tokens: int = 10  # tokens listed per expert
    categories: str = "auto"  # lexical classes: "auto" (Python text only), "on", "off"
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name in ("max_tokens", "batch_size", "top_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')}={v!r} is invalid: expected an integer >= 1")
        if self.categories not in CATEGORY_MODES:
            raise ValueError(f"--categories={self.categories!r} is invalid: allowed {', '.join(CATEGORY_MODES)}")


@dataclass(frozen=True)
class CollapseFlag:
    layer: int
    expert: int
    share: float  # of the layer's routed assignments
    ratio: float  # share / (1/E)
    kind: str  # "starved" (< COLLAPSE_LOW x uniform) or "hot" (> COLLAPSE_HIGH x uniform), as in metrics.jsonl

    def message(self) -> str:
        bound = f"< {COLLAPSE_LOW:g}x" if self.kind == "starved" else f"> {COLLAPSE_HIGH:g}x"
        return (f"layer {self.layer} expert {self.expert} is {self.kind}: {100 * self.share:.2f}% of the routed "
                f"assignments, {self.ratio:.2f}x the uniform share ({bound})")


@dataclass
class InspectResult:
    out: Path
    summary: dict
    collapse: list[CollapseFlag]


def collapse_flags(load_by_layer: dict[int, list[float]]) -> list[CollapseFlag]:
    """Experts whose share of the routed assignments is < 0.1x or > 3x the uniform share 1/E (the
    rule :func:`moekit.train.metrics.collapsed_experts` applies to training batches)."""
    flags = []
    for layer, load in load_by_layer.items():
        for kind, experts in collapsed_experts(load).items():
            flags += [CollapseFlag(layer, e, load[e], load[e] * len(load), kind) for e in experts]
    return sorted(flags, key=lambda f: (f.layer, f.expert))


def _entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def token_text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="backslashreplace")


def entropy_reading(entropy: float, num_experts: int, top_k: int) -> str:
    """Mean router entropy H (nats) in words: exp(H) is the number of experts a router spreading its
    weight evenly would use, between K (all weight on the experts it runs) and E (a uniform router)."""
    E, K, eff = num_experts, top_k, math.exp(entropy)
    if E <= 1:
        return "one expert: nothing to decide"
    if eff >= 0.8 * E:
        return (f"undecided: each token's weight is spread almost evenly, as over {eff:.1f} of the {E} experts, "
                f"so which {K} it runs is close to arbitrary")
    if eff <= 1.5 * K:
        return f"decided: each token's weight sits on about {eff:.1f} experts, close to the {K} it runs"
    return f"partly decided: each token's weight is spread as over {eff:.1f} of the {E} experts (it runs {K})"


def balance_reading(max_ratio: float, min_ratio: float) -> str:
    """The layer's load in words (ratios to the uniform share 1/E)."""
    if min_ratio < COLLAPSE_LOW or max_ratio > COLLAPSE_HIGH:
        return "collapsed: some experts are starved or hot"
    if max_ratio <= 1.5 and min_ratio >= 0.5:
        return "balanced"
    return "uneven, within the collapse bounds"


def expert_specialisation(lr: LayerRouting, data: RoutingData) -> list[dict]:
    """Per expert, how far its tokens depart from the text's own mix: the KL divergence (bits) of its
    token-id distribution from the text's and, with lexical classes, of its class mix from the text's,
    with its main class (largest share) and its distinctive class (largest term of that KL, with
    lift = its share / the text's share). None where the expert took no tokens."""
    E, V = lr.num_experts, lr.vocab_size
    n_E = lr.coact_EE.diagonal().double()  # tokens routed to each expert
    e_idx, t_idx = lr.pair_keys // V, lr.pair_keys % V
    p = lr.pair_counts.double() / n_E[e_idx].clamp_min(1)
    q = data.token_counts_V.double()[t_idx] / data.tokens  # > 0: the token occurs wherever it was routed
    token_kl_E = torch.zeros(E, dtype=torch.float64).index_add_(0, e_idx, p * torch.log2(p / q))
    class_rows = None
    if lr.classes_EQ is not None and data.class_counts_Q is not None:
        p_EQ = lr.classes_EQ.double() / lr.classes_EQ.sum(dim=1, keepdim=True).clamp_min(1).double()
        q_Q = data.class_counts_Q.double() / data.tokens
        terms_EQ = torch.where(p_EQ > 0, p_EQ * torch.log2(p_EQ / q_Q.clamp_min(1e-300)), torch.zeros_like(p_EQ))
        class_rows = (p_EQ, q_Q, terms_EQ)
    out = []
    for e in range(E):
        if n_E[e] == 0:
            out.append({"tokens": 0, "token_kl_bits": None, "class_kl_bits": None})
            continue
        row = {"tokens": int(n_E[e]), "token_kl_bits": float(token_kl_E[e]), "class_kl_bits": None}
        if class_rows is not None:
            p_EQ, q_Q, terms_EQ = class_rows
            main, distinct = int(p_EQ[e].argmax()), int(terms_EQ[e].argmax())
            row.update(class_kl_bits=float(terms_EQ[e].sum()), main_class=CATEGORIES[main],
                       main_share=float(p_EQ[e, main]), distinct_class=CATEGORIES[distinct],
                       distinct_share=float(p_EQ[e, distinct]), text_share=float(q_Q[distinct]),
                       distinct_lift=float(p_EQ[e, distinct] / q_Q[distinct]) if q_Q[distinct] > 0 else None)
        out.append(row)
    return out


def specialists(spec: list[dict], load_ratio: list[float], n: int = SPECIALISTS) -> list[int]:
    """The ``n`` experts whose tokens depart most from the text (class KL where known, else token
    KL), among the experts that are not starved (a handful of tokens is no evidence)."""
    key = "class_kl_bits" if any(s.get("class_kl_bits") is not None for s in spec) else "token_kl_bits"
    ranked = [e for e in range(len(spec)) if spec[e][key] is not None and load_ratio[e] >= COLLAPSE_LOW]
    return sorted(ranked, key=lambda e: (-spec[e][key], e))[:n]


def cluster_order(sim_EE: np.ndarray) -> list[int]:
    """Leaf order of average-linkage clustering on the distance 1 - similarity: experts that fire
    together end up side by side, so groups show as blocks along the matrix's diagonal.

    1. Every expert starts as its own group; the two closest groups merge (ties: lowest indices).
    2. The merged group's distance to any other is the size-weighted mean of its parts' (average linkage).
    3. The two leaf lists are joined in the orientation whose touching leaves are closest.
    Deterministic, O(E^3) with numpy: well under a second at E = 256."""
    E = sim_EE.shape[0]
    base = 1.0 - np.asarray(sim_EE, dtype=np.float64)
    np.fill_diagonal(base, np.inf)
    dist = base.copy()
    members = {i: [i] for i in range(E)}
    for _ in range(E - 1):
        i, j = sorted(divmod(int(np.argmin(dist)), E))
        a, b = members[i], members[j]
        a, b = min(((a, b), (a[::-1], b), (a, b[::-1]), (a[::-1], b[::-1])), key=lambda ab: base[ab[0][-1], ab[1][0]])
        merged = (len(members[i]) * dist[i] + len(members[j]) * dist[j]) / (len(members[i]) + len(members[j]))
        dist[i, :] = dist[:, i] = merged
        dist[j, :] = dist[:, j] = np.inf
        dist[i, i] = np.inf
        members[i] = a + b
        del members[j]
    return next(iter(members.values()))


def coactivation_stats(coact_EE: torch.Tensor, tokens: int, n: int = PAIRS) -> dict:
    """The clustered order of the experts that took tokens (by the cosine similarity of their token
    sets; "empty": those that took none) and the
    ``n`` pairs that fire together most often relative to independent choices (lift =
    both · T / (n_i · n_j); 1 = independent), among pairs sharing at least 5% of the smaller's tokens."""
    c = coact_EE.double().numpy()
    n_E = np.diagonal(c).copy()
    norm = np.sqrt(np.outer(n_E, n_E))
    sim = np.divide(c, norm, out=np.zeros_like(c), where=norm > 0)
    lift = np.divide(c * tokens, np.outer(n_E, n_E), out=np.zeros_like(c), where=norm > 0)
    i_P, j_P = np.triu_indices(len(n_E), 1)
    keep_P = c[i_P, j_P] >= np.maximum(5.0, 0.05 * np.minimum(n_E[i_P], n_E[j_P]))
    i_P, j_P = i_P[keep_P], j_P[keep_P]
    best = np.lexsort((j_P, i_P, -lift[i_P, j_P]))[:n]  # highest lift first; ties: lower indices
    top = [{"i": int(i), "j": int(j), "both": int(c[i, j]), "lift": float(lift[i, j]),
            "given_i": float(c[i, j] / n_E[i]), "given_j": float(c[i, j] / n_E[j])}
           for i, j in zip(i_P[best], j_P[best])]
    used = np.flatnonzero(n_E > 0)  # experts that took no tokens share none: they are left out of the order
    order = [int(used[k]) for k in cluster_order(sim[np.ix_(used, used)])] if len(used) else []
    return {"order": order, "empty": [int(e) for e in np.flatnonzero(n_E == 0)], "pairs": top}


def layer_summary(lr: LayerRouting, data: RoutingData, pieces: list[bytes], top_n: int) -> dict:
    """The numbers of one MoE layer (see the module docstring)."""
    E = lr.num_experts
    load_E = lr.load_E
    coact = None
    if (lr.coact_EE.sum() - lr.coact_EE.diagonal().sum()) > 0 or lr.top_k > 1:
        diag = lr.coact_EE.diagonal().double()
        given = [[(float(lr.coact_EE[i, j]) / float(diag[i])) if diag[i] > 0 else None for j in range(E)]
                 for i in range(E)]
        coact = {"counts": lr.coact_EE.tolist(), "given": given, **coactivation_stats(lr.coact_EE, lr.tokens)}
    top = []
    for e in range(E):
        ids, counts = lr.expert_token_counts(e)
        n_e = int(lr.coact_EE[e, e])  # tokens routed to e (a token is routed to an expert at most once)
        rows = []
        for tok, c in zip(ids[:top_n].tolist(), counts[:top_n].tolist()):
            rows.append({"id": tok, "text": token_text(pieces[tok]), "count": c, "share": c / n_e,
                         "coverage": c / int(data.token_counts_V[tok])})
        top.append(rows)
    classes = None
    if lr.classes_EQ is not None:
        totals = lr.classes_EQ.sum(dim=1, keepdim=True).clamp_min(1).double()
        classes = [dict(zip(CATEGORIES, row)) for row in (lr.classes_EQ.double() / totals).tolist()]
    ratio_E = (load_E * E).tolist()
    spec = expert_specialisation(lr, data)
    return {
        "layer": lr.layer, "num_experts": E, "top_k": lr.top_k, "tokens": lr.tokens,
        "load": load_E.tolist(), "load_ratio": ratio_E,
        "routed_assignments": lr.routed_E.tolist(), "kept_assignments": lr.kept_E.tolist(),
        "dropped_assignments": lr.dropped_assignments, "dropped_tokens": lr.dropped_tokens,
        "dropped_fraction": lr.dropped_fraction,
        "max_load_ratio": max(ratio_E), "min_load_ratio": min(ratio_E),
        "router_entropy": lr.router_entropy, "router_entropy_uniform": math.log(E),
        "router_entropy_normalized": lr.router_entropy / math.log(E) if E > 1 else 0.0,
        "effective_experts": math.exp(lr.router_entropy),
        "entropy_reading": entropy_reading(lr.router_entropy, E, lr.top_k),
        "balance_reading": balance_reading(max(ratio_E), min(ratio_E)),
        "load_entropy_normalized": _entropy(load_E) / math.log(E) if E > 1 else 1.0,
        "coactivation": coact, "top_tokens": top, "classes": classes,
        "specialisation": spec, "specialists": specialists(spec, ratio_E),
    }


def summarize(data: RoutingData, pieces: list[bytes], top_n: int = 10) -> dict:
    """The report's numbers for every MoE layer, the text's class mix and the collapse flags."""
    layers = {str(i): layer_summary(lr, data, pieces, top_n) for i, lr in data.layers.items()}
    flags = collapse_flags({int(i): s["load"] for i, s in layers.items()})
    base = None
    if data.class_counts_Q is not None:
        base = dict(zip(CATEGORIES, (data.class_counts_Q.double() / data.tokens).tolist()))
    return {"tokens": data.tokens, "layers": layers, "text_classes": base,
            "collapse": [asdict(f) for f in flags],
            "collapse_thresholds": {"starved_below": COLLAPSE_LOW, "hot_above": COLLAPSE_HIGH,
                                    "relative_to": "the uniform share 1/E of the routed assignments"}}


def training_balance(metrics_path: Path, bins: int = 100) -> dict | None:
    """From the run's metrics.jsonl, per MoE layer: the most and least loaded expert (kept tokens /
    mean) at every logged step; every expert's load / mean in at most ``bins`` bins of consecutive
    logged steps (their mean; for the load-over-training heatmap); and every expert that was
    starved or hot at some logged step (the rule of :func:`collapsed_experts`), with how often and when."""
    records = [r for r in read_metrics(metrics_path) if any(k.startswith("moe_") for k in r)]
    if not records:
        return None
    layers = sorted({k[4:] for r in records for k in r if k.startswith("moe_")}, key=int)
    out = {"steps": [r["step"] for r in records], "max_load_ratio": {}, "min_load_ratio": {},
           "dropped_frac": {}, "router_entropy": {}, "load_ratio_binned": {}, "collapse_history": {}}
    for layer in layers:
        recs = [(r["step"], r.get(f"moe_{layer}")) for r in records]
        recs = [(step, m) for step, m in recs if m and m.get("tokens_frac")]
        ms = [r.get(f"moe_{layer}") for r in records]
        out["max_load_ratio"][layer] = [max(m["tokens_frac"]) * len(m["tokens_frac"]) if m else None for m in ms]
        out["min_load_ratio"][layer] = [min(m["tokens_frac"]) * len(m["tokens_frac"]) if m else None for m in ms]
        out["dropped_frac"][layer] = [m.get("dropped_frac") if m else None for m in ms]
        out["router_entropy"][layer] = [m.get("router_entropy") if m else None for m in ms]
        if not recs:
            continue
        steps_N = [step for step, _ in recs]
        ratio_NE = np.array([np.asarray(m["tokens_frac"], dtype=np.float64) * len(m["tokens_frac"]) for _, m in recs])
        chunks = np.array_split(np.arange(len(recs)), min(bins, len(recs)))
        out["load_ratio_binned"][layer] = {
            "steps": [steps_N[c[-1]] for c in chunks],  # the last step of each bin
            "ratio": np.round(np.stack([ratio_NE[c].mean(axis=0) for c in chunks], axis=1), 4).tolist()}
        out["collapse_history"][layer] = _collapse_history(steps_N, [m["tokens_frac"] for _, m in recs])
    return out


def _collapse_history(steps_N: list[int], frac_NE: list[list[float]]) -> list[dict]:
    """Every (expert, kind) collapsed at some logged step: in how many, the first and last such step,
    whether it still was at the last logged step and since when (the start of that final run), and
    whether it was in the last tenth of the logged steps at all ("recent": not recovered)."""
    hits: dict[tuple[int, str], list[int]] = {}
    for n, frac in enumerate(frac_NE):
        for kind, experts in collapsed_experts(frac).items():
            for e in experts:
                hits.setdefault((e, kind), []).append(n)
    out = []
    last = len(steps_N) - 1
    for (e, kind), ns in sorted(hits.items()):
        at_end = ns[-1] == last
        since = None
        if at_end:  # walk back over the unbroken run of collapsed steps that reaches the end
            k = len(ns) - 1
            while k > 0 and ns[k - 1] == ns[k] - 1:
                k -= 1
            since = steps_N[ns[k]]
        out.append({"expert": e, "kind": kind, "steps": len(ns), "of": len(steps_N), "fraction": len(ns) / len(steps_N),
                    "first_step": steps_N[ns[0]], "last_step": steps_N[ns[-1]], "at_end": at_end, "since": since,
                    "recent": ns[-1] >= last - len(steps_N) // 10})
    return out


def training_collapse(training: dict | None, min_fraction: float = TRAINING_COLLAPSE_MIN_FRACTION) -> list[dict]:
    """The experts of the training history collapsed in at least ``min_fraction`` of the logged steps."""
    if not training:
        return []
    return [{"layer": int(layer), **h} for layer, hist in training.get("collapse_history", {}).items()
            for h in hist if h["fraction"] >= min_fraction]


def write_report(model, tokenizer, batches: Iterable[torch.Tensor], out: Path, *, categories: bool = False,
                 top_n: int = 10, metrics_path: Path | None = None, meta: dict | None = None,
                 warn: bool = True) -> InspectResult:
    """Routes ``batches`` through ``model``, writes the figures, ``summary.json`` and ``index.html``
    into the existing directory ``out``, and warns on stderr about collapsed experts."""
    from moekit.insight.page import render_report

    t0 = time.perf_counter()
    pieces = token_bytes(tokenizer)
    data = collect_routing(model, batches, pieces if categories else None)
    summary = {"kind": "moekit-inspect", **(meta or {}), **summarize(data, pieces, top_n)}
    moe = model.cfg.moe
    summary["model_config"] = {"num_experts": moe.num_experts, "top_k": moe.top_k, "router": moe.router,
                               "capacity_factor": moe.capacity_factor,
                               "eval_capacity_factor": moe.eval_capacity_factor,
                               "moe_layers": [int(i) for i in summary["layers"]]}
    summary["training"] = training_balance(metrics_path) if metrics_path is not None else None
    summary["training_collapse"] = training_collapse(summary["training"])
    summary["training_collapse_min_fraction"] = TRAINING_COLLAPSE_MIN_FRACTION
    summary["plots"] = _plot(summary, out)
    summary["seconds"] = time.perf_counter() - t0
    flags = [CollapseFlag(**f) for f in summary["collapse"]]
    write_json(out / "summary.json", summary)
    (out / "index.html").write_text(render_report(summary))
    write_marker(out, "inspect", model=summary.get("model"))
    if warn and flags:
        bar = "!" * 78
        lines = [bar, f"moekit inspect: ROUTING COLLAPSE in {len(flags)} expert(s):"]
        lines += [f"  {f.message()}" for f in flags] + [bar]
        print("\n".join(lines), file=sys.stderr)
    if warn and summary["training_collapse"]:
        n = len(summary["training_collapse"])
        print(f"moekit inspect: during training, {n} expert(s) were starved or hot in at least "
              f"{100 * TRAINING_COLLAPSE_MIN_FRACTION:g}% of the logged steps (see {out / 'index.html'})",
              file=sys.stderr)
    return InspectResult(out, summary, flags)


CLASS_CHART_EXPERTS = 16  # rows of the class chart: the most specialised experts (the table has them all)


def _plot(summary: dict, out: Path) -> dict:
    """Writes every figure the summary supports; returns {figure: file name}, and under "heatmaps"
    {file name: where its cells are} for the page's hover values."""
    from moekit.insight import plots  # matplotlib: imported when a figure is drawn
    layers = summary["layers"]
    ids = [int(i) for i in layers]
    names: dict = {"heatmaps": {}}

    def heat(h: "plots.Heatmap") -> str:
        names["heatmaps"][h.path.name] = h.to_dict()
        return h.path.name

    ratio = [layers[str(i)]["load_ratio"] for i in ids]
    flags = [(f["layer"], f["expert"]) for f in summary["collapse"]]
    names["load"] = heat(plots.load_heatmap(ratio, ids, flags, out / "load.png"))
    tr = summary.get("training")
    names["load_over_training"] = {}
    if tr:
        plots.training_balance(tr["steps"], tr["max_load_ratio"], tr["min_load_ratio"],
                               out / "balance_over_training.png")
        names["balance_over_training"] = "balance_over_training.png"
        for layer, binned in tr.get("load_ratio_binned", {}).items():
            names["load_over_training"][layer] = heat(plots.load_over_training(
                binned["steps"], binned["ratio"], int(layer), out / f"load_over_training_L{layer}.png"))
    first = layers[str(ids[0])]
    plots.entropy(ids, [layers[str(i)]["router_entropy"] for i in ids],
                  [layers[str(i)]["load_entropy_normalized"] for i in ids], first["num_experts"], first["top_k"],
                  out / "entropy.png")
    names["entropy"] = "entropy.png"
    names["coactivation"], names["classes"] = {}, {}
    for i in ids:
        s = layers[str(i)]
        if s["coactivation"] is not None:
            names["coactivation"][str(i)] = heat(plots.coactivation(
                s["coactivation"]["given"], s["coactivation"]["order"], i, s["top_k"], out / f"coactivation_L{i}.png"))
        if s["classes"] is not None and summary.get("text_classes"):
            chosen = specialists(s["specialisation"], s["load_ratio"], CLASS_CHART_EXPERTS)
            labels = [f"expert {e} ({s['load_ratio'][e]:.2f}x load)" for e in chosen]
            plots.classes([[c[q] for q in CATEGORIES] for c in s["classes"]],
                          [summary["text_classes"][q] for q in CATEGORIES], CATEGORIES, chosen, labels, i,
                          out / f"classes_L{i}.png")
            names["classes"][str(i)] = f"classes_L{i}.png"
    return names


def inspect(cfg: InspectConfig, loaded: LoadedModel | None = None) -> InspectResult:
    """``moekit inspect``: see the module docstring."""
    loaded = loaded or load_for_analysis(cfg.model)
    require_moe(loaded.model, cfg.model, "inspect (expert load, co-activation, top tokens)")
    seq_len = default_seq_len(loaded, cfg.seq_len)
    corpus = open_text(loaded, cfg.data)
    use_classes = cfg.categories == "on" or (cfg.categories == "auto" and is_python_corpus(corpus))
    val = split_tokens(corpus, loaded.tokenizer, "val")
    out = Path(cfg.out) if cfg.out else Path("runs") / f"inspect-{Path(cfg.model).resolve().name}"
    out = prepare_out_dir(out, cfg.overwrite, "inspect")
    meta = {"model": str(cfg.model), "checkpoint": str(loaded.checkpoint) if loaded.checkpoint else None,
            "data": corpus.source, "split": "validation", "seq_len": seq_len, "batch_size": cfg.batch_size,
            "max_tokens": cfg.max_tokens,
            "classes_note": None if use_classes else "lexical classes are computed for Python text only "
                                                     "(--categories on forces them)"}
    return write_report(loaded.model, loaded.tokenizer, windows(val, cfg.batch_size, seq_len, cfg.max_tokens), out,
                        categories=use_classes, top_n=cfg.top_tokens, metrics_path=loaded.metrics_path, meta=meta)
