"""``moekit bench layer``: times :class:`moekit.MoELayer` on this machine against a dense SwiGLU FFN of
the same active FLOPs.

    moekit bench layer [--quick] [--tokens N] [--shapes 'D,F,E,K;...'] [--dtype bf16] [--no-memory]
    python -m moekit.bench [options]        # the same

It prints one JSON document: a description of the machine (CPU model, cores, threads, torch, the
fp32 GEMM backend), then per shape (d_model, expert_hidden, num_experts, top_k) what ran the experts
(``moe_backend``: the expert backend, the C++ loop's fp32 GEMM and, where the probe of
:mod:`moekit.moe.backends.probe` decided, its times per candidate), the median forward
and forward+backward times of interleaved repeats, tokens/s, ``moe_vs_dense`` = dense time / MoE
time (> 1: the MoE layer is faster), and the peak memory one training step adds above the resident
parameters and input, measured in a fresh interpreter per side. The dense side is
``MLP(d_model, top_k * expert_hidden, "swiglu")``: per token it does the routed experts' GEMMs, so
the ratio prices routing, dispatch and the per-expert GEMMs.

The project's own benchmarks (transformers' blocks on the same weights, a whole training step,
generation, expert parallelism, the suite) are scripts under ``benchmarks/`` in the repository,
built on this module; the package imports nothing from there.

Legend: T tokens, D model dim.
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
from moekit.argtypes import NON_NEGATIVE, POSITIVE, HelpFormatter
from moekit.config import MoEConfig
from moekit.cpu import options as cpu_options
from moekit.cpu.machine import cpu_model
from moekit.moe import MoELayer, native
from moekit.moe.backends import chooser
from moekit.nn import MLP, gemm

WARMUP = 2  # steps per side before timing: the allocator's first steps map fresh pages
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


DEFAULT_SHAPES = (Shape(512, 1408, 8, 2), Shape(512, 176, 64, 8))  # Mixtral-like, fine-grained


# ---- the machine -----------------------------------------------------------------------------
def environment() -> dict:
    """What a timing depends on besides the code: the CPU, the threads, the software, the GEMM."""
    return {"cpu_model": cpu_model(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
            "moekit": moekit.__version__, "gemm": gemm.backend(), "gemm_request": cpu_options.get().gemm,
            "probe": cpu_options.get().probe, "device": "cpu"}


# ---- the sides -------------------------------------------------------------------------------
@dataclass
class Side:
    """A module under test and how to call it on [T, D] tokens, returning [T, D]; ``note`` goes into
    the report (e.g. how the side was checked)."""

    module: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    note: str | None = None


def build_side(name: str, shape: Shape, seed: int) -> Side:
    """``moe`` or ``dense``, seeded."""
    torch.manual_seed(seed)
    if name == "dense":
        mlp = MLP(shape.d_model, shape.top_k * shape.expert_hidden, "swiglu")
        return Side(mlp, mlp)
    if name == "moe":
        layer = MoELayer(shape.config())
        native.load()  # build / load the C++ expert loop now: code, not a step's memory or time
        return Side(layer, lambda x: layer(x).output)
    raise ValueError(f"side {name!r} is unknown: allowed values are 'moe', 'dense'")


REQUIRED_SIDES = ("moe", "dense")


@dataclass(frozen=True)
class Sides:
    """The sides a layer benchmark times, how it builds them, and the command (after the interpreter)
    that reruns it in a fresh interpreter for a shape's share or a side's memory probe. This module's
    own: the MoE layer and the dense FFN; ``benchmarks/layer.py --hf`` adds transformers' blocks.
    ``build`` may refuse a side beyond moe and dense with a ValueError (a note in the report)."""

    names: tuple[str, ...] = REQUIRED_SIDES
    build: Callable[[str, Shape, int], Side] | None = None  # None: build_side
    command: tuple[str, ...] = ("-m", "moekit.bench")

    def __post_init__(self):
        if self.names[:2] != REQUIRED_SIDES:
            raise ValueError(f"Sides.names={self.names!r}: must start with {REQUIRED_SIDES!r}")

    def side(self, name: str, shape: Shape, seed: int) -> Side:
        return (self.build or build_side)(name, shape, seed)


MOEKIT_SIDES = Sides()


def build_sides(sides: Sides, shape: Shape, seed: int) -> tuple[dict[str, Side], dict[str, str]]:
    """Every side that builds, and a note per side that was skipped (and why) or carries one."""
    built: dict[str, Side] = {}
    notes: dict[str, str] = {}
    for name in sides.names:
        try:
            built[name] = sides.side(name, shape, seed)
        except ValueError as err:
            if name in REQUIRED_SIDES:
                raise
            notes[name] = f"skipped: {err}"
            continue
        if built[name].note:
            notes[name] = built[name].note
    return built, notes


# ---- timing ----------------------------------------------------------------------------------
def make_input(tokens: int, shape: Shape, seed: int) -> torch.Tensor:
    x_TD = torch.randn(tokens, shape.d_model, generator=torch.Generator().manual_seed(seed))
    return x_TD.requires_grad_(True)


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


class PeakMemory(NamedTuple):
    added_mb: float  # the peak resident memory while the call ran, less the resident memory before it
    method: str  # a key of MEMORY_METHODS


MEMORY_METHODS = {
    "clear_refs": "VmHWM - VmRSS from /proc/self/status around the call, after resetting the peak by writing 5 "
                  "to /proc/self/clear_refs",
    "ru_maxrss": "ru_maxrss delta around the call (/proc/self/clear_refs not writable): a lower bound, counting "
                 "only growth above the process's earlier peak",
}


def peak_memory(fn: Callable[[], object]) -> PeakMemory:
    """Runs ``fn()`` and returns the resident memory its peak added (see MEMORY_METHODS)."""
    if _reset_peak_rss():
        before = _status_kb("VmRSS")
        fn()
        return PeakMemory((_status_kb("VmHWM") - before) / 1024, "clear_refs")
    before = _maxrss_kb()
    fn()
    return PeakMemory((_maxrss_kb() - before) / 1024, "ru_maxrss")


def probe_memory(side: Side, x: torch.Tensor, dtype: str) -> dict:
    """Peak memory one training step of ``side`` adds; meant for a fresh interpreter started by
    :func:`measure_memory` (glibc's mmap threshold fixed, see there). Also reports the parameter
    gradients' share of that peak (they outlive the step, and E experts have E times dense's)."""
    grads = cotangents(x)
    # NOTE: a first step also pays once for the process: lazy imports (torch._dynamo, sympy), thread
    # pools, the code pages of its kernels and oneDNN's kernels, compiled per new GEMM shape (the MoE
    # layer has many). Counted in the step, they inflated the sides unequally. So the same step runs
    # once unmeasured: every kernel the measured one needs exists.
    train_step(side, x, grads, dtype)
    # Its parameter gradients go before the baseline: freed inside the measured step instead, their
    # memory would be reused by it and the peak understated.
    side.module.zero_grad(set_to_none=True)
    x.grad = None
    native.empty_cache()  # the C++ loop keeps freed blocks for reuse: none before the baseline
    peak = peak_memory(lambda: train_step(side, x, grads, dtype))
    grad_b = sum(p.grad.numel() * p.grad.element_size() for p in side.module.parameters() if p.grad is not None)
    return {"peak_step_mb": round(peak.added_mb, 1), "param_grads_mb": round(grad_b / MIB, 1),
            "memory_method": peak.method}


def interpreter_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment plus ``extra``, with this moekit's source first on PYTHONPATH: a child
    interpreter runs the same moekit as this one."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(moekit.__file__)))
    return {**os.environ, **(extra or {}),
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


def fresh_interpreter_json(argv: Sequence[str], what: str, env: dict[str, str] | None = None) -> dict:
    """``python ARGV`` (``-m MODULE ...`` or ``SCRIPT ...``) in a fresh interpreter on this same moekit
    source (``env`` added to this one's environment): its JSON output. RuntimeError naming ``what``
    with the child's stderr when it fails."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=interpreter_env(env),
                          check=False)
    if proc.returncode:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


# glibc maps every allocation of at least this many bytes on its own and unmaps it when freed. Its
# default threshold rises after the first large frees, and from then on freed tensors stay in the heap
# for later ones to reuse (or not, by size): the warm-up step would then decide how much of the
# measured step's memory is already resident. Fixed, RSS follows the live tensors.
PROBE_MMAP_THRESHOLD = 128 * 2**10


def measure_memory(name: str, shape: Shape, tokens: int, dtype: str, seed: int, sides: Sides = MOEKIT_SIDES) -> dict:
    """Runs :func:`probe_memory` on side ``name`` in a fresh interpreter (``sides.command``)."""
    return fresh_interpreter_json([*sides.command, "--memory-probe", name, "--shapes", shape.spec,
                                   "--tokens", str(tokens), "--dtype", dtype, "--seed", str(seed)],
                                  f"memory probe {name} {shape.name}",
                                  env={"MALLOC_MMAP_THRESHOLD_": str(PROBE_MMAP_THRESHOLD)})


# ---- the benchmark ---------------------------------------------------------------------------
def _params_mb(module: nn.Module) -> float:
    return round(sum(p.numel() * p.element_size() for p in module.parameters()) / MIB, 1)


def _ratio(num: float | None, den: float | None) -> float | None:
    """num / den, None where either is missing or den is 0 (a tiny shape's peak rounds to 0.0 MB)."""
    return None if num is None or den is None or den == 0 else round(num / den, 3)


def _side_report(seconds: dict[str, float], tokens: int, module: nn.Module) -> dict:
    report = {f"{k}_ms": round(v * 1e3, 2) for k, v in seconds.items()}
    report.update({f"{k}_tokens_per_s": round(tokens / v) for k, v in seconds.items()})
    report["params_mb"] = _params_mb(module)
    return report


def bench_shape(shape: Shape, tokens: int, repeats: int, memory: bool, dtype: str, seed: int,
                sides: Sides = MOEKIT_SIDES) -> tuple[dict, set[str]]:
    """One shape's report, and the memory methods its probes used."""
    built, notes = build_sides(sides, shape, seed)
    xs = [make_input(tokens, shape, seed + i) for i in range(WARMUP + repeats)]
    seconds = time_sides(built, xs, repeats, dtype)
    report: dict = {"shape": shape.name, **shape._asdict(), "dense_hidden": shape.top_k * shape.expert_hidden,
                    "moe_expert_impl": built["moe"].module.experts.impl_for(xs[0])}
    methods = set()
    # what ran the experts and why (the probe's times when it decided), as the warm-up steps left it
    x_TD = xs[0].detach().to(torch.bfloat16) if dtype == "bf16" else xs[0].detach()
    report["moe_backend"] = chooser.describe(shape.config(), x_TD)
    for name, side in built.items():
        report[name] = _side_report(seconds[name], tokens, side.module)
        if memory:
            probe = measure_memory(name, shape, tokens, dtype, seed, sides)
            report[name]["peak_step_mb"] = probe["peak_step_mb"]
            report[name]["param_grads_mb"] = probe["param_grads_mb"]
            methods.add(probe["memory_method"])
    for name in [n for n in built if n != "moe"]:
        report[f"moe_vs_{name}"] = {k: _ratio(seconds[name][k], seconds["moe"][k]) for k in ("fwd", "fwd_bwd")}
        report[f"peak_ratio_moe_over_{name}"] = _ratio(report["moe"].get("peak_step_mb"),
                                                       report[name].get("peak_step_mb"))
        if memory:  # the same without the parameter gradients: activations and workspace
            report[f"peak_ratio_moe_over_{name}_without_param_grads"] = _ratio(
                report["moe"]["peak_step_mb"] - report["moe"]["param_grads_mb"],
                report[name]["peak_step_mb"] - report[name]["param_grads_mb"])
    if notes:
        report["notes"] = notes
    return report, methods


def run_layer_benchmark(tokens: int = 4096, repeats: int = 5, shapes: Sequence[Sequence[int]] = DEFAULT_SHAPES,
                        memory: bool = True, dtype: str = "fp32", seed: int = 0, fresh_process: bool = True,
                        sides: Sides = MOEKIT_SIDES) -> dict:
    """Runs the benchmark and returns the JSON-ready report (see the module docstring).

    ``fresh_process``: each shape is timed in a fresh interpreter, as a training run would meet it.
    NOTE: in one process the allocator's state after the earlier shapes' large buffers slowed the
    later shapes against running alone."""
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
                    "--dtype", dtype, "--seed", str(seed), *([] if memory else ["--no-memory"])]
            out = fresh_interpreter_json([*sides.command, *args], f"layer benchmark of {s.name}")
            report, used = out["report"], set(out["memory_methods"])
        else:
            report, used = bench_shape(s, tokens, repeats, memory, dtype, seed, sides)
        reports.append(report)
        methods |= used
    return {
        "benchmark": "moekit.MoELayer vs dense SwiGLU MLP(d_model, top_k * expert_hidden) of equal active FLOPs",
        **environment(),
        "dtype": dtype,
        "tokens": tokens,
        "repeats": repeats,
        "warmup": WARMUP,
        "seed": seed,
        "timing": "time.perf_counter medians over repeats interleaving the sides, a new random input each round "
                  "(new routing, as in training); fwd is the training forward (autograd recording), fwd_bwd "
                  "adds backward of a ones cotangent with x.requires_grad",
        "process": "a fresh interpreter per shape" if fresh_process else "this process, shapes one after the other",
        "memory_method": "; ".join(MEMORY_METHODS[m] for m in sorted(methods)) + "; one step, in a fresh "
                         "interpreter per side and shape (glibc's mmap threshold fixed at 128 KiB), after the "
                         "same step once unmeasured" if memory else "not measured (--no-memory)",
        "ratios": "moe_vs_X = X time / moe time (> 1: moe faster); peak_ratio_moe_over_X = moe peak / X peak",
        "shapes": reports,
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


def build_parser(prog: str = "moekit bench layer") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter,
                                epilog="examples:\n  moekit bench layer --quick\n  moekit bench layer --dtype bf16 "
                                       "--shapes '512,1408,8,2' --no-memory",
                                description="MoELayer vs a dense SwiGLU FFN of equal active FLOPs on this machine: "
                                            "forward and forward+backward time and peak step memory, as JSON on "
                                            "stdout, with the CPU model, threads and GEMM backend.")
    p.add_argument("--tokens", type=POSITIVE, help="tokens per step (default 4096; --quick 1024)")
    p.add_argument("--repeats", type=POSITIVE, help="timed repeats per side (default 5; --quick 3)")
    p.add_argument("--shapes", type=parse_shapes, default=DEFAULT_SHAPES,
                   help="'D,F,E,K;...' (default '512,1408,8,2;512,176,64,8')")
    p.add_argument("--quick", action="store_true", help="1024 tokens, 3 repeats: a fast demo")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: every side under torch.autocast('cpu', bfloat16)")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the weights and inputs")
    p.add_argument("--gemm", choices=gemm.BACKENDS,
                   help="fp32 GEMM of both sides (default: $MOEKIT_GEMM, else auto: oneDNN where it runs, else the "
                        "BLAS of torch.mm); the report's 'gemm' names the one used")
    p.add_argument("--memory-probe", metavar="SIDE", help=argparse.SUPPRESS)  # a fresh process's share
    p.add_argument("--one-shape", action="store_true", help=argparse.SUPPRESS)  # likewise
    return p


def options(args: argparse.Namespace) -> dict:
    """:func:`run_layer_benchmark`'s keywords from :func:`build_parser`'s options."""
    return {"tokens": args.tokens or (1024 if args.quick else 4096),
            "repeats": args.repeats or (3 if args.quick else 5), "shapes": args.shapes,
            "memory": not args.no_memory, "dtype": args.dtype, "seed": args.seed}


def fresh_share(parser: argparse.ArgumentParser, args: argparse.Namespace, sides: Sides) -> dict | None:
    """What a fresh interpreter started by this module prints (``--memory-probe`` / ``--one-shape``),
    else None."""
    if not (args.memory_probe or args.one_shape):
        return None
    if len(args.shapes) != 1:
        parser.error("--memory-probe and --one-shape take exactly one shape")
    shape, opts = args.shapes[0], options(args)
    if args.memory_probe:
        if args.memory_probe not in sides.names:
            parser.error(f"--memory-probe {args.memory_probe!r}: expected one of {', '.join(sides.names)}")
        side = sides.side(args.memory_probe, shape, args.seed)
        return probe_memory(side, make_input(opts["tokens"], shape, args.seed), args.dtype)
    report, methods = bench_shape(shape, opts["tokens"], opts["repeats"], opts["memory"], args.dtype, args.seed,
                                  sides)
    return {"report": report, "memory_methods": sorted(methods)}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    gemm.choose(args.gemm)
    share = fresh_share(parser, args, MOEKIT_SIDES)
    if share is not None:
        print(json.dumps(share))
        return 0
    print(json.dumps(run_layer_benchmark(**options(args)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
