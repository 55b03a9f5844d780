"""The report's figures (matplotlib, Agg: no display needed). Each function takes plain numbers, as
``summary.json`` holds them, and writes one PNG.

Figures are built with :class:`matplotlib.figure.Figure` directly, never through pyplot's global
state, so plotting from a library call leaves the caller's matplotlib setup alone.

Heatmaps return a :class:`Heatmap`: where their cells lie in the image, in pixels, so the page can
tell the value under the mouse (:mod:`moekit.insight.page`).

Legend: L layers, E experts, Q token classes, N logged training steps (or bins of them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import EngFormatter

DPI = 110
# Load relative to the uniform share: white at 1 (uniform), deep blue at 0 (starved), deep red at the
# "hot" threshold 3x and above, so the colours say how far from uniform an expert is, not "collapse".
LOAD_VMAX = 3.0
CLASS_COLORS = ["#1f77b4", "#aec7e8", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#7f7f7f"]


@dataclass(frozen=True)
class Heatmap:
    """A heatmap PNG and where its cells are: ``box`` = (left, top, right, bottom) in image pixels
    of the cell area, ``size`` = (width, height) of the image in pixels."""

    path: Path
    box: tuple[float, float, float, float]
    size: tuple[int, int]

    def to_dict(self) -> dict:
        return {"box": [round(v, 1) for v in self.box], "size": list(self.size)}


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def _save_heatmap(fig: Figure, ax, path: Path) -> Heatmap:
    """Saves at the figure's own dpi, so the axes' display box (read after the draw) is in image pixels."""
    _save(fig, path)
    bb = ax.get_window_extent()  # display pixels, origin at the bottom left of the figure
    with open(path, "rb") as f:  # the PNG's own size (IHDR), as the renderer rounded it
        head = f.read(24)
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    top = fig.bbox.height
    return Heatmap(path, (float(bb.x0), float(top - bb.y1), float(bb.x1), float(top - bb.y0)), (width, height))


def _load_norm(vmax_data: float) -> tuple[TwoSlopeNorm, str]:
    return TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=LOAD_VMAX), "max" if vmax_data > LOAD_VMAX else "neither"


def _load_colorbar(fig: Figure, im, ax, extend: str) -> None:
    cb = fig.colorbar(im, ax=ax, extend=extend, ticks=[0, 0.1, 0.5, 1, 1.5, 2, 3])
    cb.set_label("load / uniform share 1/E\n(blue: below uniform, white: uniform, red: above)", fontsize=8)
    cb.ax.tick_params(labelsize=8)


def load_heatmap(load_ratio_LE: Sequence[Sequence[float]], layers: Sequence[int], flags: Sequence[tuple[int, int]],
                 path: Path) -> Heatmap:
    """Layer x expert heatmap of load / uniform share (1 = balanced), on a diverging map centred on 1;
    starved (< 0.1x) and hot (> 3x) experts boxed."""
    L, E = len(load_ratio_LE), len(load_ratio_LE[0])
    fig = Figure(figsize=(min(3.5 + 0.3 * E, 16), min(2.2 + 0.4 * L, 12)), dpi=DPI)
    ax = fig.subplots()
    norm, extend = _load_norm(max(max(row) for row in load_ratio_LE))
    im = ax.imshow(load_ratio_LE, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(L), [str(i) for i in layers])
    step = 1 if E <= 32 else 4 if E <= 128 else 8
    ax.set_xticks(range(0, E, step))
    ax.tick_params(labelsize=8 if E <= 64 else 7)
    if E <= 16 and L <= 24:
        for li, row in enumerate(load_ratio_LE):
            for e, v in enumerate(row):
                ax.text(e, li, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v > 2.2 or v < 0.3 else "black")
    row_of = {layer: i for i, layer in enumerate(layers)}
    if flags and E <= 64:  # outlined cells
        for layer, expert in flags:
            ax.add_patch(Rectangle((expert - 0.5, row_of[layer] - 0.5), 1, 1, fill=False, edgecolor="black", lw=1.8))
        mark = Rectangle((0, 0), 1, 1, fill=False, edgecolor="black", lw=1.8, label="starved (< 0.1x) or hot (> 3x)")
    elif flags:  # cells too narrow for outlines: a dot in each
        ax.scatter([e for _, e in flags], [row_of[layer] for layer, _ in flags], s=4, c="black", marker="o", lw=0)
        mark = Line2D([], [], lw=0, marker="o", ms=3, color="black", label="starved (< 0.1x) or hot (> 3x)")
    if flags:
        ax.legend(handles=[mark], loc="upper right", bbox_to_anchor=(1.0, -0.12 if L > 1 else -0.25), fontsize=8,
                  frameon=False)
    _load_colorbar(fig, im, ax, extend)
    ax.set_title("expert load relative to the uniform share 1/E (routed assignments)", fontsize=10)
    return _save_heatmap(fig, ax, path)


def load_over_training(steps_N: Sequence[float], ratio_EN: Sequence[Sequence[float | None]], layer: int,
                       path: Path) -> Heatmap:
    """Expert x training step heatmap of load / uniform share from the run's metrics (same colours
    as the load heatmap): a starved expert is a dark blue stripe, a hot one a dark red stripe."""
    m = np.array([[np.nan if v is None else v for v in row] for row in ratio_EN], dtype=float)
    E, N = m.shape
    fig = Figure(figsize=(10, min(2.2 + 0.12 * E, 9)), dpi=DPI)
    ax = fig.subplots()
    norm, extend = _load_norm(float(np.nanmax(m)) if np.isfinite(m).any() else 1.0)
    im = ax.imshow(m, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
    ticks = sorted({int(round(i)) for i in np.linspace(0, N - 1, min(N, 8))})
    ax.set_xticks(ticks, [f"{int(steps_N[i]):,}" for i in ticks])
    ax.set_xlabel("training step (each column: the mean over a bin of logged steps)")
    ax.set_ylabel("expert")
    step = 1 if E <= 16 else 4 if E <= 64 else 16
    ax.set_yticks(range(0, E, step))
    ax.tick_params(labelsize=8)
    _load_colorbar(fig, im, ax, extend)
    ax.set_title(f"layer {layer}: expert load over training (kept tokens of the training batches)", fontsize=10)
    return _save_heatmap(fig, ax, path)


def training_balance(steps: Sequence[int], max_ratio: dict[str, Sequence[float]], min_ratio: dict[str, Sequence[float]],
                     path: Path) -> Path:
    """Per layer, the most and the least loaded expert's load / mean load over training."""
    fig = Figure(figsize=(11, 4), dpi=DPI)
    ax_max, ax_min = fig.subplots(1, 2)
    for n, layer in enumerate(max_ratio):
        color = f"C{n % 10}"
        ax_max.plot(steps, max_ratio[layer], lw=1.2, color=color, label=f"layer {layer}")
        ax_min.plot(steps, min_ratio[layer], lw=1.2, color=color, label=f"layer {layer}")
    ax_max.axhline(3.0, color="red", ls=":", lw=1, label="hot above 3x")
    ax_min.axhline(0.1, color="red", ls=":", lw=1, label="starved below 0.1x")
    for ax, title in ((ax_max, "most loaded expert"), (ax_min, "least loaded expert")):
        ax.axhline(1.0, color="gray", ls="--", lw=1)
        ax.set_xlabel("training step")
        ax.set_ylabel("load / mean load (1 = uniform)")
        ax.set_title(f"{title} (kept tokens, training batches)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(max_ratio) > 6 else 1)
    ax_min.set_ylim(bottom=0)
    return _save(fig, path)


def entropy(layers: Sequence[int], router_entropy: Sequence[float], load_entropy_norm: Sequence[float],
            num_experts: int, top_k: int, path: Path) -> Path:
    """Mean router entropy per layer against ln E (a uniform router) and ln K; the normalised
    entropy of the layer's aggregate load (1 = balanced)."""
    fig = Figure(figsize=(11, 3.8), dpi=DPI)
    ax_r, ax_l = fig.subplots(1, 2)
    xs = range(len(layers))
    ax_r.bar(xs, router_entropy, color="tab:blue")
    ln_e = math.log(num_experts)
    ax_r.axhline(ln_e, color="gray", ls="--", lw=1, label=f"ln E = {ln_e:.2f} (router undecided: uniform)")
    ax_r.axhline(math.log(top_k), color="tab:green", ls=":", lw=1.2,
                 label=f"ln K = {math.log(top_k):.2f} (all weight on the K experts run)")
    ax_r.set_ylim(0, ln_e * 1.25)
    ax_r.set_ylabel("mean router entropy (nats)")
    ax_r.set_title("how decided the router is, per token", fontsize=10)
    ax_l.bar(xs, load_entropy_norm, color="tab:orange")
    ax_l.axhline(1.0, color="gray", ls="--", lw=1)
    ax_l.set_ylim(0, 1.05)
    ax_l.set_ylabel("H(load) / ln E")
    ax_l.set_title("how evenly the layer's tokens are spread (1 = uniform)", fontsize=10)
    for ax in (ax_r, ax_l):
        ax.set_xticks(list(xs), [str(i) for i in layers])
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3, axis="y")
    ax_r.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def coactivation(given_EE: Sequence[Sequence[float | None]], order: Sequence[int], layer: int, top_k: int,
                 path: Path) -> Heatmap:
    """P(expert j | expert i) with rows and columns in ``order`` (clustered: experts that fire
    together sit side by side, so groups show as blocks on the diagonal; experts not in ``order``
    are left out). The diagonal is blank."""
    m = np.array([[np.nan if v is None else v for v in row] for row in given_EE], dtype=float)
    np.fill_diagonal(m, np.nan)
    num_experts = m.shape[0]
    m = m[np.ix_(order, order)]
    E = m.shape[0]
    side = min(4.0 + 0.16 * E, 12.5)
    fig = Figure(figsize=(side + 1.6, side), dpi=DPI)
    ax = fig.subplots()
    vmax = float(np.nanmax(m)) if np.isfinite(m).any() else 1.0
    im = ax.imshow(m, cmap="viridis", vmin=0, vmax=max(vmax, 1e-9), interpolation="nearest")
    if E <= 12:
        for i in range(E):
            for j in range(E):
                if i != j and np.isfinite(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if m[i, j] < 0.6 * vmax else "black")
    if E <= 64:
        fs = 8 if E <= 24 else 6 if E <= 40 else 5
        labels = [str(e) for e in order]
        ax.set_xticks(range(E), labels, fontsize=fs, rotation=90)
        ax.set_yticks(range(E), labels, fontsize=fs)
        ax.set_xlabel("expert j (clustered order)")
        ax.set_ylabel("expert i (clustered order)")
    else:  # too many for tick labels: the page shows the ids under the mouse
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"expert j ({E} experts, clustered order; hover for ids)")
        ax.set_ylabel("expert i (clustered order)")
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cb.set_label("P(j | i): share of i's tokens also routed to j", fontsize=8)
    if num_experts > 1 and top_k > 1:
        chance = (top_k - 1) / (num_experts - 1)
        cb.ax.axhline(chance, color="white", lw=1.5)
        cb.ax.text(1.05, chance, " chance", transform=cb.ax.get_yaxis_transform(), fontsize=7, va="center")
    ax.set_title(f"layer {layer}: co-activation P(j | i)", fontsize=10)
    return _save_heatmap(fig, ax, path)


def classes(fractions_EQ: Sequence[Sequence[float]], base_Q: Sequence[float], names: Sequence[str],
            experts: Sequence[int], labels: Sequence[str], layer: int, path: Path) -> Path:
    """Horizontal stacked bars: the lexical classes of the tokens of the ``experts`` listed (one row
    each, labelled ``labels``), under the text's own mix as the top row."""
    rows = np.array([list(base_Q)] + [list(fractions_EQ[e]) for e in experts], dtype=float)
    names_y = ["the text itself"] + list(labels)
    fig = Figure(figsize=(10, 1.5 + 0.32 * len(rows)), dpi=DPI)
    ax = fig.subplots()
    left = np.zeros(len(rows))
    ys = np.arange(len(rows))
    for q, name in enumerate(names):
        ax.barh(ys, rows[:, q], left=left, color=CLASS_COLORS[q % len(CLASS_COLORS)], label=name, height=0.75)
        for y in ys:  # the share printed inside a segment wide enough to hold it
            if rows[y, q] >= 0.08:
                ax.text(left[y] + rows[y, q] / 2, y, f"{100 * rows[y, q]:.0f}%", ha="center", va="center", fontsize=7,
                        color="white" if q in (0, 2, 3, 5, 6) else "black")
        left += rows[:, q]
    ax.set_yticks(ys, names_y, fontsize=9)
    ax.invert_yaxis()
    ax.axhline(0.5, color="black", lw=0.8)
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(lambda v, _: f"{100 * v:.0f}%")
    ax.set_xlabel("share of the expert's tokens")
    ax.set_title(f"layer {layer}: lexical classes of the most specialised experts' tokens", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.5 / (1 + 0.32 * len(rows))),
              ncol=len(names), frameon=False)
    return _save(fig, path)


X_LABELS = {"step": "optimizer steps", "tokens": "training tokens", "flops": "training FLOPs (6 x active params per "
            "token + attention)", "elapsed_s": "wall-clock seconds (training steps only)"}


def run_curves(curves: dict[str, dict[str, Sequence[float]]], x_key: str, y_keys: Sequence[tuple[str, str]],
               title: str, path: Path, colors: dict[str, str], hline: float | None = None) -> Path:
    """One panel per (y key, label): every run's curve against ``x_key``, each run in its ``colors``
    entry (the same colour in every figure of a comparison)."""
    fig = Figure(figsize=(5.5 * len(y_keys), 4), dpi=DPI)
    axes = fig.subplots(1, len(y_keys), squeeze=False)[0]
    for ax, (y_key, label) in zip(axes, y_keys):
        for name, c in curves.items():
            pts = [(x, y) for x, y in zip(c[x_key], c[y_key]) if y is not None and x is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if len(pts) < 30 else "-", ms=3, lw=1.2,
                        label=name, color=colors[name])
        if hline is not None:
            ax.axhline(hline, color="gray", ls="--", lw=1)
        ax.set_xlabel(X_LABELS.get(x_key, x_key))
        if x_key in ("tokens", "flops"):
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.legend(handles=[Line2D([], [], lw=0, label="no values logged")], fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)
