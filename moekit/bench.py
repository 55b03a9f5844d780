"""The layer benchmark: :class:`moekit.MoELayer` against a dense SwiGLU FFN of the same active FLOPs.

Run it with any of (same options; ``--quick`` for a fast demo, ``--help`` for the rest)::

    moekit bench layer [options]
    python -m moekit.bench [options]
    python benchmarks/layer.py [options]

It prints one JSON document. Per shape (d_model, expert_hidden, num_experts, top_k): the median
forward and forward+backward times of interleaved repeats, tokens/s, ``moe_vs_dense`` = dense time /
MoE time (> 1: the MoE layer is faster), and the peak memory one training step adds above the
resident parameters and input, measured in a fresh subprocess per side. The dense side is
``MLP(d_model, top_k * expert_hidden, "swiglu")``: per token it does the routed experts' GEMMs, so
the ratio prices routing, dispatch and the per-expert GEMMs. ``--hf`` adds transformers' Mixtral
block sharing the MoE layer's weights, with its ``eager`` and ``grouped_mm`` expert implementations.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

import moekit
from moekit.config import MoEConfig
from moekit.moe import MoELayer, native
from moekit.nn import MLP, gemm
from moekit.argtypes import NON_NEGATIVE, POSITIVE

WARMUP = 2  # steps per side before timing: the allocator's first steps map fresh pages
HF_SIDES = ("hf_eager", "hf_grouped_mm")  # transformers' experts_implementation after the prefix
SIDES = ("moe", "dense", *HF_SIDES)
MIB = 2**20


class Shape(NamedTuple):
    d_model: int
    expert_hidden: int
    num_experts: int
    top_k: int

    @property
    def name(self) -> str:
        return f"D{self.d_model}_F{self.expert_hidden}_E{self.num_experts}_k{self.top_k}"

    @property
    def spec(self) -> str:
        return ",".join(map(str, self))

    def config(self) -> MoEConfig:
        return MoEConfig(d_model=self.d_model, expert_hidden=self.expert_hidden, num_experts=self.num_experts,
                         top_k=self.top_k)


DEFAULT_SHAPES = (Shape(512, 1408, 8, 2), Shape(512, 176, 64, 8))
SUITE_SHAPES = DEFAULT_SHAPES + (Shape(512, 88, 128, 8),)  # the performance suite adds the finest routing
# (num_experts, top_k) -> the fwd+bwd moe_vs_dense a shape of that routing must reach. What the E
# per-expert GEMMs alone reach against dense: benchmarks/gemm_backends.py (ceiling_grouped_*: the
# loop's design for small experts; ceiling_*: one group).
SPEED_TARGETS = {(8, 2): 1.1, (64, 8): 0.9, (128, 8): 0.75}
PEAK_RATIO_TARGET = 1.5


# ---- the sides -------------------------------------------------------------------------------
@dataclass
class Side:
    """A module under test and how to call it on [T, D] tokens, returning [T, D]."""

    module: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]


def build_side(name: str, shape: Shape, seed: int) -> Side:
    """Same seed, same weights: every MoE-shaped side holds the values of one seeded MoELayer."""
    torch.manual_seed(seed)
    if name == "dense":
        mlp = MLP(shape.d_model, shape.top_k * shape.expert_hidden, "swiglu")
        return Side(mlp, mlp)
    layer = MoELayer(shape.config())
    if name == "moe":
        native.load()  # build / load the C++ expert loop now: code, not a step's memory or time
        return Side(layer, lambda x: layer(x).output)
    block = hf_mixtral_block(layer, name.removeprefix("hf_"))
    return Side(block, lambda x: block(x.unsqueeze(0)).squeeze(0))


def hf_mixtral_block(layer: MoELayer, implementation: str) -> nn.Module:
    """transformers' MixtralSparseMoeBlock holding ``layer``'s parameters themselves (no copy, so the
    memory probe sees no freed duplicate). Raises ValueError when the parameter layout differs."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = layer.cfg
    hf_cfg = MixtralConfig(hidden_size=cfg.d_model, intermediate_size=cfg.expert_hidden,
                           num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
                           experts_implementation=implementation)
    with torch.device("meta"):
        block = MixtralSparseMoeBlock(hf_cfg)
    # moekit w_in [E, 2F, D] is [gate; up] like HF's gate_up_proj; w_out [E, D, F] is down_proj.
    weights = {"gate.weight": layer.router.weight_ED, "experts.gate_up_proj": layer.experts.w_in,
               "experts.down_proj": layer.experts.w_out}
    try:
        block.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"the Mixtral block's parameters do not match moekit's layout: {err}") from None
    return block


def hf_mismatch(hf: Side, moe: Side, shape: Shape, seed: int) -> float:
    """Max |HF - moekit| / max |moekit| over the output and the input gradient of 64 fp32 tokens:
    a wrong gate/up order or transposition would show as O(1)."""
    x = torch.randn(64, shape.d_model, generator=torch.Generator().manual_seed(seed + 1))
    results = []
    for side in (moe, hf):
        x_ = x.clone().requires_grad_(True)
        out = side.forward(x_)
        out.backward(torch.ones_like(out))
        side.module.zero_grad(set_to_none=True)
        results.append((out.detach(), x_.grad))
    return max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(*results))


def build_sides(shape: Shape, hf: bool, seed: int) -> tuple[dict[str, Side], dict[str, str]]:
    """The sides to time, and a note for each HF side that was skipped (and why)."""
    sides = {name: build_side(name, shape, seed) for name in ("moe", "dense")}
    notes: dict[str, str] = {}
    for name in HF_SIDES if hf else ():
        try:
            side = build_side(name, shape, seed)
            mismatch = hf_mismatch(side, sides["moe"], shape, seed)
        except (ImportError, ValueError, RuntimeError) as err:  # no transformers, other layout or implementation
            notes[name] = f"skipped: {err}"
            continue
        if mismatch > 1e-4:
            notes[name] = f"skipped: output differs from moekit's by {mismatch:.2e} (relative) on the same weights"
            continue
        sides[name] = side
        notes[name] = f"verified against moekit on 64 tokens: relative max difference {mismatch:.1e}"
    return sides, notes


# ---- timing ----------------------------------------------------------------------------------
def make_input(tokens: int, shape: Shape, seed: int) -> torch.Tensor:
    x = torch.randn(tokens, shape.d_model, generator=torch.Generator().manual_seed(seed))
    return x.requires_grad_(True)


def autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")


def cotangents(x: torch.Tensor) -> dict[torch.dtype, torch.Tensor]:
    """Ones cotangents in both output dtypes, built before any clock starts (a bf16 side may return
    bf16 or fp32)."""
    ones = torch.ones_like(x, requires_grad=False)
    return {torch.float32: ones, torch.bfloat16: ones.bfloat16()}


def train_step(side: Side, x: torch.Tensor, grads: dict[torch.dtype, torch.Tensor],
               dtype: str) -> tuple[float, float]:
    """Seconds of the forward and of forward+backward of one step, gradients allocated afresh as
    after ``zero_grad(set_to_none=True)``."""
    side.module.zero_grad(set_to_none=True)
    x.grad = None
    start = time.perf_counter()
    with autocast(dtype):
        out = side.forward(x)
    forward_done = time.perf_counter()
    out.backward(grads[out.dtype])
    return forward_done - start, time.perf_counter() - start


def time_sides(sides: dict[str, Side], xs: Sequence[torch.Tensor], repeats: int,
               dtype: str) -> dict[str, dict[str, float]]:
    """Median seconds per side; sides alternate within each repeat so drifts of a shared, noisy
    machine (frequency, other load) hit every side alike. Round i feeds every side ``xs[i]``: a new
    batch each round, so the routing (and the experts' row counts) change as in training."""
    if len(xs) < WARMUP + repeats:
        raise ValueError(f"time_sides needs {WARMUP + repeats} inputs (warmup + repeats), got {len(xs)}")
    grads = cotangents(xs[0])
    for x in xs[:WARMUP]:
        for side in sides.values():
            train_step(side, x, grads, dtype)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    for x in xs[WARMUP:WARMUP + repeats]:
        for name, side in sides.items():
            samples[name].append(train_step(side, x, grads, dtype))
    return {name: {"fwd": statistics.median(s[0] for s in runs), "fwd_bwd": statistics.median(s[1] for s in runs)}
            for name, runs in samples.items()}


# ---- memory ----------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _maxrss_kb() -> float:
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 1024 if sys.platform == "darwin" else maxrss  # bytes on macOS, KiB on Linux


def _reset_peak_rss() -> bool:
    """Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def probe_memory(name: str, shape: Shape, tokens: int, dtype: str, seed: int) -> dict:
    """Peak memory one training step adds; meant for a fresh process started by
    :func:`measure_memory` (glibc's mmap threshold fixed, see there). Also reports the parameter
    gradients' share of that peak (they outlive the step: E128's are 16x dense's)."""
    side = build_side(name, shape, seed)
    x = make_input(tokens, shape, seed)
    grads = cotangents(x)
    # NOTE: a first step also pays once for the process: lazy imports (torch._dynamo and sympy, ~33 MB),
    # thread pools, the code pages of the kernels it calls first and oneDNN's kernels, compiled per new
    # GEMM shape (~0.6 MB each; E128's layer has ~50 of them). Counted in the step, they inflated the
    # sides unequally. So the same step runs once unmeasured: every kernel the measured one needs exists.
    train_step(side, x, grads, dtype)
    # Its parameter gradients go before the baseline: freed inside the measured step instead, their
    # memory would be reused by it and the peak understated (E128 read 0.66x dense so).
    side.module.zero_grad(set_to_none=True)
    x.grad = None
    native.empty_cache()  # the C++ loop keeps freed blocks for reuse: none before the baseline
    if _reset_peak_rss():
        before = _status_kb("VmRSS")
        train_step(side, x, grads, dtype)
        peak, method = _status_kb("VmHWM"), "clear_refs"
    else:
        before = _maxrss_kb()
        train_step(side, x, grads, dtype)
        peak, method = _maxrss_kb(), "ru_maxrss"
    grad_mb = sum(p.grad.numel() * p.grad.element_size() for p in side.module.parameters() if p.grad is not None)
    return {"peak_step_mb": round((peak - before) / 1024, 1), "param_grads_mb": round(grad_mb / 2**20, 1),
            "memory_method": method}


def fresh_interpreter_json(args: list[str], what: str, module: str = "moekit.bench",
                           env: dict[str, str] | None = None) -> dict:
    """``python -m MODULE ARGS`` in a fresh interpreter on this same moekit source (``env`` added to
    this one's environment): its JSON output."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(moekit.__file__)))
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          check=False)
    if proc.returncode:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


# glibc maps every allocation of at least this many bytes on its own and unmaps it when freed. Its
# default threshold rises after the first large frees, and from then on freed tensors stay in the heap
# for later ones to reuse (or not, by size): the warm-up step would then decide how much of the
# measured step's memory is already resident. Fixed, RSS follows the live tensors. (Checked here with
# torch.mm on both: a 64-token warm-up and the default threshold read the same peaks within 3%.)
PROBE_MMAP_THRESHOLD = 128 * 2**10


def measure_memory(name: str, shape: Shape, tokens: int, dtype: str, seed: int) -> dict:
    """Runs :func:`probe_memory` in a fresh interpreter."""
    return fresh_interpreter_json(["--memory-probe", name, "--shapes", shape.spec, "--tokens", str(tokens),
                                   "--dtype", dtype, "--seed", str(seed)], f"memory probe {name} {shape.name}",
                                  env={"MALLOC_MMAP_THRESHOLD_": str(PROBE_MMAP_THRESHOLD)})


MEMORY_METHODS = {
    "clear_refs": "VmHWM - VmRSS from /proc/self/status around one step, after resetting the peak "
                  "by writing 5 to /proc/self/clear_refs; fresh subprocess per side and shape (glibc's mmap "
                  "threshold fixed at 128 KiB), after the same step once unmeasured",
    "ru_maxrss": "ru_maxrss delta around one step (/proc/self/clear_refs not writable): a lower bound, "
                 "counting only growth above the process's earlier peak; fresh subprocess per side and shape, "
                 "after the same step once unmeasured",
}


# ---- the benchmark ---------------------------------------------------------------------------
def _params_mb(module: nn.Module) -> float:
    return round(sum(p.numel() * p.element_size() for p in module.parameters()) / MIB, 1)


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None else round(num / den, 3)


def _side_report(seconds: dict[str, float], tokens: int, module: nn.Module) -> dict:
    report = {f"{k}_ms": round(v * 1e3, 2) for k, v in seconds.items()}
    report.update({f"{k}_tokens_per_s": round(tokens / v) for k, v in seconds.items()})
    report["params_mb"] = _params_mb(module)
    return report


def bench_shape(shape: Shape, tokens: int, repeats: int, hf: bool, memory: bool, dtype: str,
                seed: int) -> tuple[dict, set[str]]:
    """One shape's report, and the memory methods its probes used."""
    sides, notes = build_sides(shape, hf, seed)
    xs = [make_input(tokens, shape, seed + i) for i in range(WARMUP + repeats)]
    seconds = time_sides(sides, xs, repeats, dtype)
    report: dict = {"shape": shape.name, **shape._asdict(), "dense_hidden": shape.top_k * shape.expert_hidden,
                    "moe_expert_impl": sides["moe"].module.experts.impl_for(xs[0])}
    methods = set()
    for name, side in sides.items():
        report[name] = _side_report(seconds[name], tokens, side.module)
        if memory:
            probe = measure_memory(name, shape, tokens, dtype, seed)
            report[name]["peak_step_mb"] = probe["peak_step_mb"]
            report[name]["param_grads_mb"] = probe["param_grads_mb"]
            methods.add(probe["memory_method"])
    for name in [n for n in sides if n != "moe"]:
        report[f"moe_vs_{name}"] = {k: _ratio(seconds[name][k], seconds["moe"][k]) for k in ("fwd", "fwd_bwd")}
        report[f"peak_ratio_moe_over_{name}"] = _ratio(report["moe"].get("peak_step_mb"),
                                                       report[name].get("peak_step_mb"))
        if memory:  # the same without the parameter gradients: activations and workspace
            report[f"peak_ratio_moe_over_{name}_without_param_grads"] = _ratio(
                report["moe"]["peak_step_mb"] - report["moe"]["param_grads_mb"],
                report[name]["peak_step_mb"] - report[name]["param_grads_mb"])
    if notes:
        report["hf_notes"] = notes
    return report, methods


def _target(value: float | None, op: str, threshold: float) -> dict:
    passed = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
    return {"target": f"{op} {threshold}", "value": value, "pass": passed}


def targets(reports: list[dict]) -> dict:
    """fwd+bwd speed at the routings of SPEED_TARGETS and the peak-memory ratio at every shape;
    ``pass`` is null where the value was not measured (--no-memory)."""
    out = {}
    for r in reports:
        minimum = SPEED_TARGETS.get((r["num_experts"], r["top_k"]))
        if minimum is not None:
            out[f"{r['shape']}.fwd_bwd_moe_vs_dense"] = _target(r["moe_vs_dense"]["fwd_bwd"], ">=", minimum)
        out[f"{r['shape']}.peak_ratio_moe_over_dense"] = _target(r["peak_ratio_moe_over_dense"], "<=",
                                                                 PEAK_RATIO_TARGET)
    return out


def _transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def run_layer_benchmark(tokens: int = 4096, repeats: int = 5, shapes: Sequence[Sequence[int]] = DEFAULT_SHAPES,
                        hf: bool = False, memory: bool = True, dtype: str = "fp32", seed: int = 0,
                        fresh_process: bool = True) -> dict:
    """Runs the benchmark and returns the JSON-ready report (see the module docstring).

    ``fresh_process``: each shape is timed in a fresh interpreter, as a training run would meet it.
    NOTE: in one process the allocator's state after the earlier shapes' large buffers made E64 and
    E128 10-20% slower than alone (4096 tokens, fp32: 0.75x / 0.53x dense after E8 vs 0.82x / 0.64x)."""
    if tokens <= 0 or repeats <= 0:
        raise ValueError(f"tokens={tokens} and repeats={repeats} must both be > 0")
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype={dtype!r} is invalid: allowed values are 'fp32', 'bf16'")
    shapes = [Shape(*s) for s in shapes]
    for s in shapes:
        s.config()  # validates the sizes before any timing
    reports, methods = [], set()
    for s in shapes:
        if fresh_process:
            args = ["--one-shape", "--shapes", s.spec, "--tokens", str(tokens), "--repeats", str(repeats),
                    "--dtype", dtype, "--seed", str(seed), *(["--hf"] if hf else []),
                    *([] if memory else ["--no-memory"])]
            out = fresh_interpreter_json(args, f"layer benchmark of {s.name}")
            report, used = out["report"], set(out["memory_methods"])
        else:
            report, used = bench_shape(s, tokens, repeats, hf, memory, dtype, seed)
        reports.append(report)
        methods |= used
    return {
        "benchmark": "moekit.MoELayer vs dense SwiGLU MLP(d_model, top_k * expert_hidden) of equal active FLOPs",
        "torch": torch.__version__,
        "moekit": moekit.__version__,
        "transformers": _transformers_version() if hf else None,
        "python": platform.python_version(),
        "processor": platform.processor(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gemm": gemm.backend(),
        "device": "cpu",
        "dtype": dtype,
        "tokens": tokens,
        "repeats": repeats,
        "warmup": WARMUP,
        "seed": seed,
        "timing": "time.perf_counter medians over repeats interleaving the sides, a new random input each round "
                  "(new routing, as in training); fwd is the training forward (autograd recording), fwd_bwd "
                  "adds backward of a ones cotangent with x.requires_grad",
        "process": "a fresh interpreter per shape" if fresh_process else "this process, shapes one after the other",
        "memory_method": "; ".join(MEMORY_METHODS[m] for m in sorted(methods)) if memory
                         else "not measured (--no-memory)",
        "ratios": "moe_vs_X = X time / moe time (> 1: moe faster); peak_ratio_moe_over_X = moe peak / X peak",
        "shapes": reports,
        "targets": targets(reports),
        "targets_note": "set for the default run (4096 tokens, fp32): with fewer tokens the fixed costs (routing, "
                        "per-expert calls, the E experts' parameter gradients) weigh more",
    }


# ---- command line ----------------------------------------------------------------------------
def parse_shapes(text: str) -> tuple[Shape, ...]:
    """``D,F,E,K[;D,F,E,K...]`` -> shapes, each checked by MoEConfig."""
    shapes = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        try:
            shape = Shape(*(int(v) for v in item.split(",")))
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(
                f"{item!r} is not d_model,expert_hidden,num_experts,top_k (4 integers)") from None
        try:
            shape.config()
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{item!r}: {err}") from None
        shapes.append(shape)
    if not shapes:
        raise argparse.ArgumentTypeError(f"no shape in {text!r}")
    return tuple(shapes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moekit bench layer",
                                description="MoELayer vs a dense SwiGLU FFN of equal active FLOPs: forward and "
                                            "forward+backward time and peak step memory, as JSON on stdout.")
    p.add_argument("--tokens", type=POSITIVE, help="tokens per step (default 4096; --quick 1024)")
    p.add_argument("--repeats", type=POSITIVE, help="timed repeats per side (default 5; --quick 3)")
    p.add_argument("--shapes", type=parse_shapes, default=DEFAULT_SHAPES,
                   help="'D,F,E,K;...' (default '512,1408,8,2;512,176,64,8')")
    p.add_argument("--quick", action="store_true", help="1024 tokens, 3 repeats: a fast demo")
    p.add_argument("--hf", action="store_true", help="add transformers' Mixtral block with the same weights")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: every side under torch.autocast('cpu', bfloat16)")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    gemm.add_argument(p)
    p.add_argument("--memory-probe", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--one-shape", action="store_true", help=argparse.SUPPRESS)  # a fresh process's share
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    gemm.choose(args.gemm)
    tokens = args.tokens or (1024 if args.quick else 4096)
    if args.memory_probe:
        if len(args.shapes) != 1:
            parser.error("--memory-probe takes exactly one shape")
        print(json.dumps(probe_memory(args.memory_probe, args.shapes[0], tokens, args.dtype, args.seed)))
        return 0
    if args.one_shape:
        if len(args.shapes) != 1:
            parser.error("--one-shape takes exactly one shape")
        report, methods = bench_shape(args.shapes[0], tokens, args.repeats or 5, args.hf, not args.no_memory,
                                      args.dtype, args.seed)
        print(json.dumps({"report": report, "memory_methods": sorted(methods)}))
        return 0
    result = run_layer_benchmark(tokens=tokens, repeats=args.repeats or (3 if args.quick else 5),
                                 shapes=args.shapes, hf=args.hf, memory=not args.no_memory, dtype=args.dtype,
                                 seed=args.seed)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
