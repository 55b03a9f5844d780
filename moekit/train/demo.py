"""The main job: an MoE model against a dense model with the same active parameters, measured.

    moekit demo            # ~15 minutes on 2 CPU cores
    moekit demo --quick    # a few minutes, noisier figures
    moekit demo --seed 1   # the same comparison from other initial weights and batches

Both models train on the embedded default corpus (byte-level Python standard library source) with
the same tokens, batches, schedule and optimizer; only the FFNs differ (presets ``demo-dense`` and
``demo-moe``), and each trains at its own peak learning rate, the best of the same sweep
(:data:`TRAIN`, docs/demo.md). The demo writes ``summary.json`` and ``loss.png`` (validation loss
against training FLOPs and against wall-clock, and the MoE's per-layer load over training) and
reports how much sooner the MoE reached the dense model's final validation loss, in steps, FLOPs and
seconds, or says plainly that it did not.

Clocks: a run's time is the sum of its training steps (forward, backward, optimizer), evaluation and
checkpoints excluded. One-off costs are paid before either clock starts (:func:`warm_up`: the native
code's build, the corpus, the backend probe's measurements), the two runs run one after the other,
and the CPU time other processes took during each run is measured and reported (a busy machine
makes the wall-clock ratio meaningless, and the summary says so).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from moekit.cpu.machine import cpu_model
from moekit.model import count_parameters
from moekit.presets import get_preset
from moekit.train.loop import TrainConfig, train
from moekit.train.metrics import read_metrics

FULL = dict(steps=400, eval_every=40, warmup=30, eval_tokens=65536)
QUICK = dict(steps=120, eval_every=20, warmup=10, eval_tokens=32768)
SETTLE = {"full": 100, "quick": 20}  # routing is judged after this step (the router's warm-up)
NAMES = ("dense", "moe")
# Each model's own optimizer settings: the peak learning rate with the best final validation loss of
# the same sweep {7.5e-4, 1.5e-3, 3e-3, 6e-3} on the full schedule, seed 0 (dense: 1.5e-3; the MoE:
# 7.5e-4, its routers at 0.3x); docs/demo.md has the sweep's figures and commands.
TRAIN = {"dense": dict(lr=1.5e-3), "moe": dict(lr=7.5e-4, router_lr_mult=0.3)}
BUSY_WARNING = 0.05  # share of the machine's CPU time other processes may take before the summary warns


def demo_configs(out: Path, quick: bool, seed: int = 0) -> dict[str, TrainConfig]:
    schedule = QUICK if quick else FULL
    common = dict(batch_size=16, seq_len=256, log_every=10, save_every=schedule["steps"], keep_last=1, seed=seed,
                  **schedule)
    return {name: TrainConfig(preset=f"demo-{name}", out=str(out / name), **TRAIN[name], **common) for name in NAMES}


def warm_up(configs: dict[str, TrainConfig], where: Path) -> float:
    """Pays the one-off costs before any clock starts: two steps and an evaluation of each model in a
    throwaway directory build the native code, open the corpus, run the backend probe on the shapes
    the runs will meet (cached, so the runs find them decided) and warm the allocator. Returns the
    seconds it took."""
    t0 = time.perf_counter()
    try:
        for name, cfg in configs.items():
            tokens = cfg.batch_size * cfg.seq_len
            short = dataclasses.replace(cfg, out=str(where / name), steps=2, warmup=1, eval_every=2, save_every=2,
                                        eval_tokens=tokens)
            if train(short, overwrite=True, progress=False).interrupted:  # Ctrl-C stops the demo here too
                raise KeyboardInterrupt
    finally:
        shutil.rmtree(where, ignore_errors=True)
    return time.perf_counter() - t0


def _busy_cpu_seconds() -> float | None:
    """CPU seconds every process on the machine has run so far (/proc/stat), None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def other_cpu_share(busy_s: float, own_s: float, wall_s: float, cpus: int) -> float:
    """The share of a machine of ``cpus`` CPUs that other processes took over ``wall_s`` seconds in
    which the machine ran ``busy_s`` CPU-seconds in all, ``own_s`` of them this process's."""
    return max(0.0, busy_s - own_s) / (wall_s * cpus)


class CpuShare:
    """The share of the machine's CPU time that processes other than this one took while the block
    ran: ``with CpuShare() as c: ...; c.others`` (None where the system does not say)."""

    def __enter__(self):
        self._busy, self._own, self._wall = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
        self.others = None
        return self

    def __exit__(self, *exc):
        busy, own, wall = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
        if busy is not None and self._busy is not None and wall > self._wall:
            self.others = other_cpu_share(busy - self._busy, own - self._own, wall - self._wall, os.cpu_count() or 1)
        return False


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


def _curve(records: list[dict]) -> list[tuple[float, float, float, float]]:
    return [(r["step"], r["flops"], r["elapsed_s"], r["val_loss"]) for r in records if "val_loss" in r]


def routing_over_training(records: list[dict], settle: int) -> dict:
    """The MoE's per-layer load over training, from its logged steps: each layer's max/mean expert
    load (1.0 = perfectly even) at every logged step, its median after ``settle``, and the logged
    steps after ``settle`` at which a layer had starved or hot experts (metrics.collapsed_experts)."""
    logged = [r for r in records if any(k.startswith("moe_") for k in r)]
    layers = sorted({int(k[4:]) for r in logged for k in r if k.startswith("moe_")})
    load = {str(i): [(r["step"], round(r[f"moe_{i}"]["max_load_ratio"], 3)) for r in logged if f"moe_{i}" in r]
            for i in layers}
    after = {i: sorted(v for s, v in pts if s > settle) for i, pts in load.items()}
    collapsed = [{"step": r["step"], "layers": r["collapsed_layers"]} for r in logged
                 if r.get("collapsed_layers") and r["step"] > settle]
    return {"settle_step": settle,
            "median_max_load_after_settle": {i: v[len(v) // 2] if v else None for i, v in after.items()},
            "collapse_after_settle": collapsed, "max_load_by_step": load}


def summarize(records: dict[str, list[dict]], quick: bool = False) -> dict:
    """``records``: each run's metrics.jsonl records, by name."""
    dense, moe = _curve(records["dense"]), _curve(records["moe"])
    target = dense[-1][3]
    hit = _crossing(moe, target)
    summary: dict = {}
    for name, curve in (("dense", dense), ("moe", moe)):
        count = count_parameters(get_preset(f"demo-{name}"))
        summary[name] = {"final_val_loss": curve[-1][3], "steps": curve[-1][0], "flops": curve[-1][1],
                         "seconds": curve[-1][2], "seconds_per_step": curve[-1][2] / curve[-1][0],
                         "total_params": count.total, "active_params": count.active}
    summary["moe_reached_dense_final_loss"] = hit is not None
    if hit is not None:
        step, flops, seconds = hit
        summary["moe_at_dense_final_loss"] = {
            "steps": step, "flops": flops, "seconds": seconds,
            "steps_ratio": step / dense[-1][0], "flops_ratio": flops / dense[-1][1], "seconds_ratio": seconds / dense[-1][2],
        }
    summary["moe_routing"] = routing_over_training(records["moe"], SETTLE["quick" if quick else "full"])
    return summary


def plot(records: dict[str, list[dict]], path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_f, ax_t, ax_l) = plt.subplots(1, 3, figsize=(16, 4.4))
    for name, color in (("dense", "tab:gray"), ("moe", "tab:blue")):
        c = _curve(records[name])
        r = summary[name]
        label = f"{name}: {r['total_params'] / 1e6:.1f}M params, {r['active_params'] / 1e6:.1f}M active"
        ax_f.plot([p[1] for p in c], [p[3] for p in c], "o-", ms=3, color=color, label=label)
        ax_t.plot([p[2] for p in c], [p[3] for p in c], "o-", ms=3, color=color, label=label)
    target = summary["dense"]["final_val_loss"]
    for ax in (ax_f, ax_t):
        ax.axhline(target, color="tab:gray", ls=":", lw=1)
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
        ax.legend()
    ax_f.set_xlabel("training FLOPs")
    ax_t.set_xlabel("training seconds (steps only)")
    routing = summary["moe_routing"]
    for layer, pts in routing["max_load_by_step"].items():
        ax_l.plot([s for s, _ in pts], [v for _, v in pts], lw=1, label=f"layer {layer}")
    ax_l.axhline(1.0, color="black", lw=0.8)
    ax_l.axvline(routing["settle_step"], color="tab:gray", ls=":", lw=1)
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("MoE: busiest expert's load / mean load")
    ax_l.grid(alpha=0.3)
    ax_l.legend()
    fig.suptitle("MoE vs dense: same active parameters, tokens and schedule")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(out: str | Path | None = None, quick: bool = False, overwrite: bool = False, progress: bool = True,
             seed: int = 0, resume: bool = False) -> dict:
    """Trains both models (or, with ``resume``, finishes an interrupted demo in ``out``) and writes
    ``summary.json`` and ``loss.png``. A run stopped by a signal returns ``{"interrupted": <exit code>, ...}``
    without a summary."""
    out = Path(out) if out else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    if resume:
        if not (out / "demo.json").is_file():
            raise ValueError(f"--resume: {out} holds no demo to continue (no {out / 'demo.json'})")
        saved = json.loads((out / "demo.json").read_text())
        if (saved["quick"], saved["seed"]) != (quick, seed):
            raise ValueError(f"--resume: {out} was started with quick={saved['quick']}, seed={saved['seed']}; "
                             f"got quick={quick}, seed={seed}")
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"demo directory {out} already exists; choose another --out, pass --overwrite, or "
                         f"--resume an interrupted demo")
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps({"quick": quick, "seed": seed}) + "\n")
    configs = demo_configs(out, quick, seed)
    if progress:
        print("moekit demo: one-off costs first (native code, corpus, backend probe), outside both clocks",
              file=sys.stderr, flush=True)
    warm_s = warm_up(configs, out / ".warm-up")
    others: dict[str, float | None] = {}
    for name, cfg in configs.items():
        if progress:  # on stderr with the bars: stdout holds the result alone
            print(f"training {name} ({cfg.preset}, lr {cfg.lr:g}) for {cfg.steps} steps of {cfg.tokens_per_step} "
                  f"tokens -> {cfg.out}", file=sys.stderr, flush=True)
        with CpuShare() as share:
            result = train(cfg, resume=resume, overwrite=overwrite and not resume, progress=progress)
        others[name] = share.others
        if result.interrupted:
            return {"interrupted": result.exit_code, "out": str(out), "run": name}
    records = {name: read_metrics(out / name / "metrics.jsonl") for name in NAMES}  # read once: summary and plot
    summary = summarize(records, quick)
    summary.update(quick=quick, seed=seed, out=str(out), lr={name: cfg.lr for name, cfg in configs.items()})
    summary["timing"] = {
        "measured": "training steps only (forward, backward, optimizer step); evaluation and checkpoints excluded",
        "one_off_seconds_before_clocks": round(warm_s, 1), "cpu": cpu_model(), "threads": torch.get_num_threads(),
        "other_processes_cpu_share": others,
        "busy": any(v is not None and v > BUSY_WARNING for v in others.values()),
    }
    plot(records, out / "loss.png", summary)
    summary["plot"] = str(out / "loss.png")
    summary["json"] = str(out / "summary.json")
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / "summary.json")
    return summary
