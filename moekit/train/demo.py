"""The main job: an MoE model against a dense model with the same active parameters, measured.

    moekit demo            # ~15 minutes on 2 CPU cores
    moekit demo --quick    # a few minutes

Both models train on the embedded default corpus (byte-level Python standard library source) with
the same tokens, batches, schedule and optimizer; only the FFNs differ (presets ``demo-dense`` and
``demo-moe``). The demo writes ``summary.json`` and ``loss.png`` (validation loss against training
FLOPs and against wall-clock) and reports how much sooner the MoE reached the dense model's final
validation loss, in steps, FLOPs and seconds, or says plainly that it did not.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from moekit.model import count_parameters
from moekit.presets import get_preset
from moekit.train.loop import TrainConfig, train
from moekit.train.metrics import read_metrics

FULL = dict(steps=600, eval_every=50, warmup=30)
QUICK = dict(steps=120, eval_every=20, warmup=10)


def demo_configs(out: Path, quick: bool, seed: int = 0) -> dict[str, TrainConfig]:
    schedule = QUICK if quick else FULL
    common = dict(batch_size=16, seq_len=256, lr=3e-3, eval_tokens=32768 if quick else 131072, log_every=10,
                  save_every=schedule["steps"], keep_last=1, seed=seed, **schedule)
    return {name: TrainConfig(preset=f"demo-{name}", out=str(out / name), **common) for name in ("dense", "moe")}


def _crossing(curve: list[tuple[float, float, float, float]], target: float):
    """First (step, flops, seconds) at which the val-loss curve reaches ``target``, interpolating
    linearly between evaluations; None if it never does."""
    prev = None
    for point in curve:
        if point[3] <= target:
            if prev is None:
                return point[:3]
            f = (prev[3] - target) / (prev[3] - point[3])
            return tuple(a + f * (b - a) for a, b in zip(prev[:3], point[:3]))
        prev = point
    return None


def _curve(run_dir: Path) -> list[tuple[float, float, float, float]]:
    return [(r["step"], r["flops"], r["elapsed_s"], r["val_loss"]) for r in read_metrics(run_dir / "metrics.jsonl")
            if "val_loss" in r]


def summarize(out: Path) -> dict:
    dense, moe = _curve(out / "dense"), _curve(out / "moe")
    target = dense[-1][3]
    hit = _crossing(moe, target)
    summary = {
        "dense": {"final_val_loss": dense[-1][3], "steps": dense[-1][0], "flops": dense[-1][1],
                  "seconds": dense[-1][2]},
        "moe": {"final_val_loss": moe[-1][3], "steps": moe[-1][0], "flops": moe[-1][1], "seconds": moe[-1][2]},
        "moe_reached_dense_final_loss": hit is not None,
    }
    for name in ("dense", "moe"):
        count = count_parameters(get_preset(f"demo-{name}"))
        summary[name].update(total_params=count.total, active_params=count.active)
    if hit is not None:
        step, flops, seconds = hit
        summary["moe_at_dense_final_loss"] = {
            "steps": step, "flops": flops, "seconds": seconds,
            "steps_ratio": step / dense[-1][0], "flops_ratio": flops / dense[-1][1], "seconds_ratio": seconds / dense[-1][2],
        }
    return summary


def plot(out: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_f, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, color in (("dense", "tab:gray"), ("moe", "tab:blue")):
        c = _curve(out / name)
        count = count_parameters(get_preset(f"demo-{name}"))
        label = f"{name}: {count.total / 1e6:.1f}M params, {count.active / 1e6:.1f}M active"
        ax_f.plot([p[1] for p in c], [p[3] for p in c], "o-", ms=3, color=color, label=label)
        ax_t.plot([p[2] for p in c], [p[3] for p in c], "o-", ms=3, color=color, label=label)
    ax_f.set_xlabel("training FLOPs")
    ax_t.set_xlabel("wall-clock seconds (2 CPU cores)")
    for ax in (ax_f, ax_t):
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("MoE vs dense, same active parameters, tokens and schedule")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(out: str | Path | None = None, quick: bool = False, overwrite: bool = False, progress: bool = True,
             seed: int = 0) -> dict:
    out = Path(out) if out else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"demo directory {out} already exists; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    for name, cfg in demo_configs(out, quick, seed).items():
        if progress:  # on stderr with the bars: stdout holds the result alone
            print(f"training {name} ({cfg.preset}) for {cfg.steps} steps of {cfg.tokens_per_step} tokens -> {cfg.out}",
                  file=sys.stderr, flush=True)
        train(cfg, overwrite=overwrite, progress=progress)
    summary = summarize(out)
    summary["quick"] = quick
    summary["out"] = str(out)
    plot(out, out / "loss.png")
    summary["plot"] = str(out / "loss.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
