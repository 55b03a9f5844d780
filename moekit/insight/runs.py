"""Run comparison: ``moekit plot``.

    moekit plot runs/dense runs/moe runs/upcycled --out runs/compare [--x tokens]

Reads each run's ``metrics.jsonl`` and writes ``loss.png`` (training and validation loss),
``balance.png`` (the most and least loaded expert's load / mean load, averaged over the MoE layers;
MoE runs only), ``summary.json`` with every curve and the final figures, and ``index.html``: a
table of each run's total and active parameters (from its checkpoint's model configuration),
training FLOPs, wall-clock, final and best losses. Each run keeps one colour in every figure.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from moekit import checkpoint as ckpt_io
from moekit.insight.common import prepare_out_dir, write_json, write_marker
from moekit.train.metrics import read_metrics

X_AXES = ("step", "tokens", "flops", "elapsed_s")
# matplotlib's tab10, then tab20's light shades: run n keeps colour n in every figure and in the table
RUN_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
              "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
              "#dbdb8d", "#9edae5")


@dataclass
class CompareResult:
    out: Path
    summary: dict


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def run_curves(run_dir: Path) -> dict:
    """Curves of one run from its metrics.jsonl: x axes, train/val loss, load balance."""
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    if not records:
        raise ValueError(f"{Path(run_dir) / 'metrics.jsonl'} holds no records")
    c: dict[str, list] = {k: [] for k in (*X_AXES, "train_loss", "val_loss", "max_load_ratio", "min_load_ratio")}
    for r in records:
        for k in X_AXES:
            c[k].append(r.get(k))
        c["train_loss"].append(r.get("ce_loss", r.get("loss")))
        c["val_loss"].append(r.get("val_loss"))
        moe = [v for k, v in r.items() if k.startswith("moe_") and isinstance(v, dict) and v.get("tokens_frac")]
        c["max_load_ratio"].append(_mean([max(m["tokens_frac"]) * len(m["tokens_frac"]) for m in moe]))
        c["min_load_ratio"].append(_mean([min(m["tokens_frac"]) * len(m["tokens_frac"]) for m in moe]))
    return c


def loss_unit(run_dir: Path) -> str:
    """What one unit of the run's loss is: nats per byte for the byte tokenizer, else nats per token
    of that run's own tokenizer (two runs are comparable only when these strings are equal)."""
    from moekit.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(Path(run_dir))
    except (OSError, ValueError):
        return "unknown unit (no tokenizer in the run)"
    if tok.kind == "byte":
        return "nats/byte"
    return f"nats/token (tokenizer {tok.fingerprint()[:8]}, vocabulary {tok.vocab_size:,})"


def run_params(run_dir: Path) -> dict:
    """Total and active parameters of the run's model, from its newest checkpoint's config.json
    (the weights are not read); {} when the run has no readable checkpoint."""
    from moekit.config import ModelConfig
    from moekit.model import count_parameters

    ckpt = ckpt_io.latest_checkpoint(Path(run_dir))
    if ckpt is None:
        return {}
    try:
        cfg = ModelConfig.from_dict(json.loads((ckpt / "config.json").read_text())["model"])
    except (OSError, KeyError, TypeError, ValueError) as err:
        print(f"moekit: note: {ckpt / 'config.json'} cannot be read ({err}): no parameter counts for this run",
              file=sys.stderr)
        return {}
    c = count_parameters(cfg)
    return {"total_params": c.total, "active_params": c.active}


def run_colors(names: list[str]) -> dict[str, str]:
    """One colour per run, by position (cycling past 20 runs)."""
    return {name: RUN_COLORS[i % len(RUN_COLORS)] for i, name in enumerate(names)}


def _last(values: list):
    return next((v for v in reversed(values) if v is not None), None)


def _labels(run_dirs: list[Path]) -> list[str]:
    """Directory names, with the parent's name prepended where two runs share a name."""
    names = [p.resolve().name for p in run_dirs]
    out = []
    for p, n in zip(run_dirs, names):
        out.append(f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n)
    if len(set(out)) < len(out):
        out = [str(p) for p in run_dirs]
    return out


def compare_runs(run_dirs: list[str | Path], out: str | Path | None = None, x: str = "step",
                 overwrite: bool = False) -> CompareResult:
    """``moekit plot``: see the module docstring."""
    from moekit.insight.page import render_comparison
    from moekit.insight import plots  # matplotlib: imported when a figure is drawn

    if not run_dirs:
        raise ValueError("moekit plot needs at least one run directory")
    if x not in X_AXES:
        raise ValueError(f"--x={x!r} is invalid: allowed {', '.join(X_AXES)}")
    paths = [Path(p) for p in run_dirs]
    for p in paths:
        if not p.is_dir():
            raise FileNotFoundError(f"run directory not found: {p}")
    curves = {name: run_curves(p) for name, p in zip(_labels(paths), paths)}  # reads every run before writing
    out = prepare_out_dir(Path(out) if out else Path("runs") / time.strftime("compare-%Y%m%d-%H%M%S"),
                          overwrite, "plot")
    units = {name: loss_unit(p) for name, p in zip(curves, paths)}
    colors = run_colors(list(curves))
    runs = {}
    for (name, c), p in zip(curves.items(), paths):
        vals = [v for v in c["val_loss"] if v is not None]
        runs[name] = {"path": str(p), "color": colors[name], "loss_unit": units[name], "steps": c["step"][-1],
                      "tokens": c["tokens"][-1], **run_params(p), "flops": _last(c["flops"]),
                      "wall_clock_s": _last(c["elapsed_s"]),
                      "final_train_loss": c["train_loss"][-1], "final_val_loss": vals[-1] if vals else None,
                      "best_val_loss": min(vals) if vals else None,
                      "final_max_load_ratio": c["max_load_ratio"][-1], "curves": c}
    plot_files, notes = {}, {}
    if len(set(units.values())) == 1:
        loss_curves, loss_colors, unit = curves, colors, next(iter(units.values()))
    else:  # a token of one tokenizer is not a byte nor another's token: say so on the figure itself
        loss_curves = {f"{name} [{units[name]}]": c for name, c in curves.items()}
        loss_colors = {f"{name} [{units[name]}]": colors[name] for name in curves}
        unit = "units differ: see legend"
        notes["loss"] = ("these runs measure loss in different units (" + "; ".join(
            f"{n}: {u}" for n, u in units.items()) + "): their loss curves are not comparable with each other")
        print(f"moekit: note: {notes['loss']}", file=sys.stderr)
    plots.run_curves(loss_curves, x,
                     [("train_loss", f"training loss ({unit})"), ("val_loss", f"validation loss ({unit})")],
                     "loss (cross-entropy)", out / "loss.png", loss_colors)
    plot_files["loss"] = "loss.png"
    moe_curves = {n: c for n, c in curves.items() if any(v is not None for v in c["max_load_ratio"])}
    if moe_curves:
        plots.run_curves(moe_curves, x, [("max_load_ratio", "most loaded expert / mean (mean over layers)"),
                                         ("min_load_ratio", "least loaded expert / mean (mean over layers)")],
                         "load balance (kept tokens, training batches)", out / "balance.png", colors, hline=1.0)
        plot_files["balance"] = "balance.png"
    else:
        notes["balance"] = "no run has MoE layers: no load balance to show"
    summary = {"kind": "moekit-plot", "x": x, "runs": runs, "plots": plot_files, "notes": notes}
    write_json(out / "summary.json", summary)
    (out / "index.html").write_text(render_comparison(summary))
    write_marker(out, "plot", runs=[str(p) for p in paths])
    return CompareResult(out, summary)
