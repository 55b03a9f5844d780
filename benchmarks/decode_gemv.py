"""Weight streaming in one-row products (decoding's shape): how fast one token's matrix-vector
products read expert weights, MKL's mm against a compiled multiply-and-sum reduction; one JSON document.

    python benchmarks/decode_gemv.py [--threads N]

32 expert-sized weights [3584, 512] (fp32, 235 MB in all, well beyond the caches) are visited in turn,
each once per round, as decoding does; the figure is bytes of weights read per second. It prices
the kernel that decoding at batch 1 is bound by, not moekit's generate itself.
"""

import argparse
import json
import statistics
import sys
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=7)
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
    report = {"torch": torch.__version__, "threads": args.threads, "weights_gb": round(gigabytes, 3), "gb_per_s": {}}
    with torch.no_grad():
        for w in weights[:2]:
            torch.testing.assert_close(reduction(x, w), kernels["mkl_mm"](x, w), rtol=1e-4, atol=1e-3)
        for name, fn in kernels.items():
            for w in weights:  # warm-up (and compilation)
                fn(x, w)
            times = []
            for _ in range(args.rounds):
                t = time.perf_counter()
                for w in weights:
                    fn(x, w)
                times.append(time.perf_counter() - t)
            report["gb_per_s"][name] = round(gigabytes / statistics.median(times), 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
