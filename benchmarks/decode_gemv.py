"""Weight streaming in one-row products (decoding's shape): how fast one token's matrix-vector
products read expert weights, MKL's mm against a compiled multiply-and-sum reduction; one JSON document.

    python benchmarks/decode_gemv.py [--threads N]

32 expert-sized weights [3584, 512] (fp32, 235 MB in all, well beyond the caches) are visited in turn,
each once per round, as decoding does; the figure is bytes of weights read per second. It prices
the kernel that decoding at batch 1 is bound by, not moekit's generate itself.
"""

import argparse
import sys

import torch

import harness
from moekit.argtypes import POSITIVE


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/decode_gemv.py", description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=POSITIVE, default=torch.get_num_threads())
    p.add_argument("--rounds", type=POSITIVE, default=7, help="timed rounds over all weights (default 7)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    n, rows, cols = 32, 3584, 512
    weights = [torch.randn(rows, cols) for _ in range(n)]
    x = torch.randn(1, cols)
    gigabytes = n * rows * cols * 4 / 1e9

    @torch.compile(dynamic=False)
    def reduction(x, w):  # [1, K] x [N, K] -> [1, N] as one streaming pass over w
        return (w * x).sum(-1)[None]

    kernels = {"mkl_mm": lambda x, w: torch.nn.functional.linear(x, w), "compiled_reduction": reduction}

    def visit(fn):  # one round: every weight once, as one decoding step visits the experts
        return lambda _: harness.timed(lambda: [fn(x, w) for w in weights])[0]

    with torch.no_grad():
        for w in weights[:2]:
            torch.testing.assert_close(reduction(x, w), kernels["mkl_mm"](x, w), rtol=1e-4, atol=1e-3)
        seconds = harness.medians(harness.interleaved({name: visit(fn) for name, fn in kernels.items()}, 1,
                                                      args.rounds))  # the warm-up round compiles
    report = {"benchmark": "one-row products streaming expert weights", **harness.environment(),
              "threads": args.threads, "weights_gb": round(gigabytes, 3),
              "gb_per_s": {name: round(gigabytes / s, 1) for name, s in seconds.items()}}
    return harness.print_json(report)


if __name__ == "__main__":
    sys.exit(main())
