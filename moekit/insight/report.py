"""The routing report: ``moekit inspect``.

    moekit inspect --model runs/small                       # validation text of the run's own data
    moekit inspect --model runs/small --data my.jsonl --out report/ --max-tokens 131072

Runs the model over validation text and writes a report directory:

    load.png                  expert load per layer (heatmap of load / uniform load)
    balance_over_training.png most and least loaded expert over training (from the run's metrics.jsonl)
    entropy.png               router entropy per layer; balance of the aggregate load
    coactivation_L{i}.png     P(expert j | expert i) per layer (top-k > 1)
    classes_L{i}.png          lexical classes of each expert's tokens (Python text)
    summary.json              every number behind the figures, the top tokens of every expert, drops
    index.html                all of it on one static page (relative links; opens from disk)

Load is the share of the routed assignments (T·K per layer, before capacity) each expert gets; an
expert below 10% of the uniform share 1/E ("starved") or above 3x it ("hot") is flagged as
collapse, on stderr, in ``summary.json`` and on the page. Routing is read from the model's own
forward passes (:mod:`moekit.insight.routing`).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch

from moekit.insight.categories import CATEGORIES, token_bytes
from moekit.insight.common import (LoadedModel, default_seq_len, is_python_corpus, load_for_analysis, open_text,
                                   prepare_out_dir, require_moe, split_tokens, windows, write_json, write_marker)
from moekit.insight.routing import LayerRouting, RoutingData, collect_routing
from moekit.train.metrics import COLLAPSE_HIGH, COLLAPSE_LOW, collapsed_experts, read_metrics

CATEGORY_MODES = ("auto", "on", "off")


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


def layer_summary(lr: LayerRouting, data: RoutingData, pieces: list[bytes], top_n: int) -> dict:
    """The numbers of one MoE layer (see the module docstring)."""
    E = lr.num_experts
    load_E = lr.load_E
    coact = None
    if (lr.coact_EE.sum() - lr.coact_EE.diagonal().sum()) > 0 or lr.top_k > 1:
        diag = lr.coact_EE.diagonal().double()
        given = [[(float(lr.coact_EE[i, j]) / float(diag[i])) if diag[i] > 0 else None for j in range(E)]
                 for i in range(E)]
        coact = {"counts": lr.coact_EE.tolist(), "given": given}
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
    return {
        "layer": lr.layer, "num_experts": E, "top_k": lr.top_k, "tokens": lr.tokens,
        "load": load_E.tolist(), "load_ratio": ratio_E,
        "routed_assignments": lr.routed_E.tolist(), "kept_assignments": lr.kept_E.tolist(),
        "dropped_assignments": lr.dropped_assignments, "dropped_tokens": lr.dropped_tokens,
        "dropped_fraction": lr.dropped_fraction,
        "max_load_ratio": max(ratio_E), "min_load_ratio": min(ratio_E),
        "router_entropy": lr.router_entropy, "router_entropy_uniform": math.log(E),
        "load_entropy_normalized": _entropy(load_E) / math.log(E) if E > 1 else 1.0,
        "coactivation": coact, "top_tokens": top, "classes": classes,
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


def training_balance(metrics_path: Path) -> dict | None:
    """Per MoE layer, the most and least loaded expert (kept tokens / mean) at every logged step."""
    records = [r for r in read_metrics(metrics_path) if any(k.startswith("moe_") for k in r)]
    if not records:
        return None
    layers = sorted({k[4:] for r in records for k in r if k.startswith("moe_")}, key=int)
    out = {"steps": [r["step"] for r in records], "max_load_ratio": {}, "min_load_ratio": {},
           "dropped_frac": {}, "router_entropy": {}}
    for layer in layers:
        recs = [r.get(f"moe_{layer}") for r in records]
        out["max_load_ratio"][layer] = [max(m["tokens_frac"]) * len(m["tokens_frac"]) if m else None for m in recs]
        out["min_load_ratio"][layer] = [min(m["tokens_frac"]) * len(m["tokens_frac"]) if m else None for m in recs]
        out["dropped_frac"][layer] = [m.get("dropped_frac") if m else None for m in recs]
        out["router_entropy"][layer] = [m.get("router_entropy") if m else None for m in recs]
    return out


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
    return InspectResult(out, summary, flags)


def _plot(summary: dict, out: Path) -> dict:
    """Writes every figure the summary supports; returns {figure: file name}."""
    from moekit.insight import plots  # matplotlib: imported when a figure is drawn
    layers = summary["layers"]
    ids = [int(i) for i in layers]
    names: dict = {}
    ratio = [layers[str(i)]["load_ratio"] for i in ids]
    flags = [(f["layer"], f["expert"]) for f in summary["collapse"]]
    plots.load_heatmap(ratio, ids, flags, out / "load.png")
    names["load"] = "load.png"
    tr = summary.get("training")
    if tr:
        plots.training_balance(tr["steps"], tr["max_load_ratio"], tr["min_load_ratio"],
                               out / "balance_over_training.png")
        names["balance_over_training"] = "balance_over_training.png"
    first = layers[str(ids[0])]
    plots.entropy(ids, [layers[str(i)]["router_entropy"] for i in ids],
                  [layers[str(i)]["load_entropy_normalized"] for i in ids], first["num_experts"], first["top_k"],
                  out / "entropy.png")
    names["entropy"] = "entropy.png"
    names["coactivation"], names["classes"] = {}, {}
    for i in ids:
        s = layers[str(i)]
        if s["coactivation"] is not None:
            plots.coactivation(s["coactivation"]["given"], i, out / f"coactivation_L{i}.png")
            names["coactivation"][str(i)] = f"coactivation_L{i}.png"
        if s["classes"] is not None and summary.get("text_classes"):
            plots.classes([[c[q] for q in CATEGORIES] for c in s["classes"]],
                          [summary["text_classes"][q] for q in CATEGORIES], CATEGORIES, i, out / f"classes_L{i}.png")
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
