"""The report's figures (matplotlib, Agg: no display needed). Each function takes plain numbers, as
``summary.json`` holds them, and writes one PNG.

Figures are built with :class:`matplotlib.figure.Figure` directly, never through pyplot's global
state, so plotting from a library call leaves the caller's matplotlib setup alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

DPI = 110


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def load_heatmap(load_ratio_LE: Sequence[Sequence[float]], layers: Sequence[int], flags: Sequence[tuple[int, int]],
                 path: Path) -> Path:
    """Layer x expert heatmap of load / uniform load (1 = balanced); collapsed experts boxed in red."""
    L, E = len(load_ratio_LE), len(load_ratio_LE[0])
    fig = Figure(figsize=(min(2.5 + 0.45 * E, 18), min(1.6 + 0.45 * L, 16)))
    ax = fig.subplots()
    vmax = max(3.0, max(max(row) for row in load_ratio_LE))
    im = ax.imshow(load_ratio_LE, cmap="RdBu_r", norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax),
                   aspect="auto", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(L), [str(i) for i in layers])
    if E <= 32:
        ax.set_xticks(range(E))
    if E <= 16 and L <= 24:
        for li, row in enumerate(load_ratio_LE):
            for e, v in enumerate(row):
                ax.text(e, li, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(v - 1) > 0.6 * (vmax - 1) or v < 0.35 else "black")
    row_of = {layer: i for i, layer in enumerate(layers)}
    for layer, expert in flags:
        ax.add_patch(Rectangle((expert - 0.5, row_of[layer] - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    fig.colorbar(im, ax=ax, label="load / uniform load")
    ax.set_title("expert load (share of routed assignments x E); red: collapse")
    return _save(fig, path)


def training_balance(steps: Sequence[int], max_ratio: dict[str, Sequence[float]], min_ratio: dict[str, Sequence[float]],
                     path: Path) -> Path:
    """Per layer, the most and the least loaded expert's load / mean load over training."""
    fig = Figure(figsize=(11, 4))
    ax_max, ax_min = fig.subplots(1, 2)
    for layer in max_ratio:
        ax_max.plot(steps, max_ratio[layer], lw=1.2, label=f"layer {layer}")
        ax_min.plot(steps, min_ratio[layer], lw=1.2, label=f"layer {layer}")
    ax_max.axhline(3.0, color="red", ls=":", lw=1, label="collapse (3x)")
    ax_min.axhline(0.1, color="red", ls=":", lw=1, label="collapse (0.1x)")
    for ax, title in ((ax_max, "most loaded expert"), (ax_min, "least loaded expert")):
        ax.axhline(1.0, color="gray", ls="--", lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("load / mean load")
        ax.set_title(f"{title} (kept tokens, training batches)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def entropy(layers: Sequence[int], router_entropy: Sequence[float], load_entropy_norm: Sequence[float],
            num_experts: int, top_k: int, path: Path) -> Path:
    """Mean router entropy per layer against ln E (a uniform router) and ln K; the normalised
    entropy of the layer's aggregate load (1 = balanced)."""
    fig = Figure(figsize=(11, 3.8))
    ax_r, ax_l = fig.subplots(1, 2)
    xs = range(len(layers))
    ax_r.bar(xs, router_entropy, color="tab:blue")
    ln_e = math.log(num_experts)
    ax_r.axhline(ln_e, color="gray", ls="--", lw=1, label=f"ln E = {ln_e:.2f} (uniform)")
    if top_k > 1:
        ax_r.axhline(math.log(top_k), color="tab:green", ls=":", lw=1, label=f"ln K = {math.log(top_k):.2f}")
    ax_r.set_ylabel("mean router entropy (nats)")
    ax_r.set_title("per-token router entropy")
    ax_l.bar(xs, load_entropy_norm, color="tab:orange")
    ax_l.axhline(1.0, color="gray", ls="--", lw=1)
    ax_l.set_ylim(0, 1.05)
    ax_l.set_ylabel("H(load) / ln E")
    ax_l.set_title("balance of the aggregate load (1 = uniform)")
    for ax in (ax_r, ax_l):
        ax.set_xticks(list(xs), [str(i) for i in layers])
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3, axis="y")
    ax_r.legend(fontsize=8)
    return _save(fig, path)


def coactivation(given_EE: Sequence[Sequence[float | None]], layer: int, path: Path) -> Path:
    """P(expert j | expert i): of the tokens routed to i, the fraction also routed to j."""
    import numpy as np

    m = np.array([[np.nan if v is None else v for v in row] for row in given_EE], dtype=float)
    np.fill_diagonal(m, np.nan)
    E = m.shape[0]
    fig = Figure(figsize=(min(2.5 + 0.42 * E, 16), min(2.0 + 0.38 * E, 14)))
    ax = fig.subplots()
    im = ax.imshow(m, cmap="viridis", vmin=0, vmax=max(1e-9, float(np.nanmax(m)) if np.isfinite(m).any() else 1),
                   interpolation="nearest")
    if E <= 16:
        for i in range(E):
            for j in range(E):
                if i != j and np.isfinite(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6.5, color="white")
    if E <= 32:
        ax.set_xticks(range(E))
        ax.set_yticks(range(E))
    ax.set_xlabel("expert j")
    ax.set_ylabel("expert i")
    ax.set_title(f"layer {layer}: P(j | i), tokens routed to i also routed to j")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def classes(fractions_EQ: Sequence[Sequence[float]], base_Q: Sequence[float], names: Sequence[str], layer: int,
            path: Path) -> Path:
    """Stacked bars: the lexical classes of each expert's tokens, next to the text's own mix."""
    import numpy as np

    rows = np.array(list(fractions_EQ) + [list(base_Q)], dtype=float)
    E = len(fractions_EQ)
    labels = [str(e) for e in range(E)] + ["text"]
    fig = Figure(figsize=(min(3.5 + 0.4 * (E + 1), 18), 4))
    ax = fig.subplots()
    bottom = np.zeros(len(rows))
    colors = ["#1f77b4", "#aec7e8", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#7f7f7f"]
    for q, name in enumerate(names):
        ax.bar(range(len(rows)), rows[:, q], bottom=bottom, color=colors[q % len(colors)], label=name)
        bottom += rows[:, q]
    ax.set_xticks(range(len(rows)), labels, fontsize=7 if E > 16 else 9)
    ax.set_xlabel("expert (last bar: the text itself)")
    ax.set_ylabel("share of the expert's tokens")
    ax.set_ylim(0, 1)
    ax.set_title(f"layer {layer}: lexical class of the tokens each expert takes")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def run_curves(curves: dict[str, dict[str, Sequence[float]]], x_key: str, y_keys: Sequence[tuple[str, str]],
               title: str, path: Path, hline: float | None = None) -> Path:
    """One panel per (y key, label): every run's curve against ``x_key``."""
    fig = Figure(figsize=(5.5 * len(y_keys), 4))
    axes = fig.subplots(1, len(y_keys), squeeze=False)[0]
    for ax, (y_key, label) in zip(axes, y_keys):
        for name, c in curves.items():
            pts = [(x, y) for x, y in zip(c[x_key], c[y_key]) if y is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if len(pts) < 30 else "-", ms=3, lw=1.2,
                        label=name)
        if hline is not None:
            ax.axhline(hline, color="gray", ls="--", lw=1)
        ax.set_xlabel(x_key)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)
