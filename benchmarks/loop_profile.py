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
import os
import statistics
import sys

os.environ["MOEKIT_LOOP_PROFILE"] = "1"  # (before moekit loads the extension)

import harness  # noqa: E402
from layer import SUITE_SHAPES  # noqa: E402
from moekit.argtypes import NON_NEGATIVE, POSITIVE  # noqa: E402
from moekit.bench import Shape, build_side, cotangents, make_input, parse_shapes, train_step  # noqa: E402
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
    p = argparse.ArgumentParser(prog="python benchmarks/loop_profile.py", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=POSITIVE, default=4096)
    p.add_argument("--steps", type=POSITIVE, default=10)
    p.add_argument("--shapes", type=parse_shapes, default=SUITE_SHAPES,
                   help="'D,F,E,K;...' (default: the suite's three routings)")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    args = p.parse_args(argv)
    report = {"benchmark": "time inside the C++ expert loop by kind of work", **harness.environment(),
              "results": [profile_shape(s, args.tokens, args.steps, args.seed) for s in args.shapes]}
    return harness.print_json(report)


if __name__ == "__main__":
    sys.exit(main())
