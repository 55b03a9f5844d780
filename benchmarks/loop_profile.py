"""Where the C++ expert loop's time goes: per layer forward+backward step, the milliseconds of each
kind of work inside the loop (products, packing of transposed weights, gathers, scatters, activation),
summed over the intra-op threads, beside the loop's and the step's wall time.

    python benchmarks/loop_profile.py [--tokens 4096] [--steps 10] [--shapes 'D,F,E,K;...']

It loads a build of the loop that times those kinds of work (``MOEKIT_LOOP_PROFILE=1``, set here:
a library of its own, compiled on first use, ~20 s). Thread-ms over both threads can reach twice
the loop's wall time; packing (the own kernel's transposed weights) also counts inside products.
``outside_loop_ms`` is the step's mean wall time less the loop's: routing, the plan, the router's
products, statistics, autograd. fp32, the shapes one after the other in this process, a new random
batch each step. One JSON document on stdout.
"""

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ["MOEKIT_LOOP_PROFILE"] = "1"  # (before moekit loads the extension)
# Profile this checkout's moekit even where another copy is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from moekit.bench import SUITE_SHAPES, Shape, build_side, cotangents, make_input, train_step  # noqa: E402
from moekit.moe import native  # noqa: E402

WARMUP = 3


def profile_shape(shape: Shape, tokens: int, steps: int, seed: int) -> dict:
    side = build_side("moe", shape, seed)
    module = native.load()
    if module is None or not hasattr(module, "profile"):
        raise SystemExit(f"no profiling build of the C++ loop: {native.unavailable_reason() or 'built without it'}")
    xs = [make_input(tokens, shape, seed + i) for i in range(WARMUP + steps)]
    grads = cotangents(xs[0])
    for x in xs[:WARMUP]:
        train_step(side, x, grads, "fp32")
    module.profile_reset()
    walls = [train_step(side, x, grads, "fp32")[1] for x in xs[WARMUP:]]
    per_step = {name: {"ms": round(seconds / steps * 1e3, 2), "calls": round(calls / steps, 1)}
                for name, (seconds, calls) in module.profile().items()}
    loop_ms = per_step["forward"]["ms"] + per_step["backward"]["ms"]
    step_ms = statistics.fmean(walls) * 1e3
    return {"shape": shape.name, "tokens": tokens, "steps": steps, "step_ms_mean": round(step_ms, 2),
            "step_ms_median": round(statistics.median(walls) * 1e3, 2), "loop_ms": round(loop_ms, 2),
            "outside_loop_ms": round(step_ms - loop_ms, 2),
            "thread_ms": {k: v for k, v in per_step.items() if k not in ("forward", "backward")},
            "loop_wall_ms": {k: per_step[k] for k in ("forward", "backward")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--shapes", default=";".join(s.spec for s in SUITE_SHAPES), help="'D,F,E,K;...'")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tokens < 1 or args.steps < 1:
        p.error(f"--tokens and --steps must be >= 1, got {args.tokens} and {args.steps}")
    try:
        shapes = [Shape(*map(int, spec.split(","))) for spec in args.shapes.split(";")]
    except (TypeError, ValueError):
        p.error(f"--shapes {args.shapes!r}: expected 'D,F,E,K;...' (four integers per shape)")
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(),
              "results": [profile_shape(s, args.tokens, args.steps, args.seed) for s in shapes]}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
