"""The ceiling of the loop path: E per-expert GEMMs on contiguous slices against the dense GEMMs of
the same FLOPs, nothing else (no routing, gathers, scatters or activation).

    python benchmarks/expert_gemm_ceiling.py [--tokens 4096] [--repeats 7]

Per routing (E, k, expert hidden) at d_model 512 and balanced load (T·k/E rows per expert): the six
products of a SwiGLU FFN's forward and backward (input projection, output projection, the two
weight gradients and the two input gradients) run per expert on its slice, against the same six
products of one dense FFN of hidden k·F over all T tokens. Medians of interleaved repeats; one JSON
document. ``ratio`` = dense time / per-expert time: what the MoE layer could reach against dense if
everything but its GEMMs were free.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

ROUTINGS = ((8, 2, 1408), (64, 8, 176), (128, 8, 88))
D = 512


def products(x, w_in, w_out, h, a, g, grad_w_in, grad_w_out):
    """The six products of one SwiGLU FFN step (w_in [2F, D], w_out [D, F])."""
    torch.mm(x, w_in.t(), out=h)
    torch.mm(a, w_out.t())
    torch.mm(g.t(), a, out=grad_w_out)
    torch.mm(g, w_out)
    torch.mm(h.t(), x, out=grad_w_in)
    torch.mm(h, w_in)


def measure(experts: int, top_k: int, hidden: int, tokens: int, repeats: int) -> dict:
    g_ = torch.Generator().manual_seed(0)
    rows = tokens * top_k // experts
    x, g = torch.randn(rows, D, generator=g_), torch.randn(rows, D, generator=g_)
    h, a = torch.randn(rows, 2 * hidden, generator=g_), torch.randn(rows, hidden, generator=g_)
    w_in, w_out = torch.randn(experts, 2 * hidden, D, generator=g_), torch.randn(experts, D, hidden, generator=g_)
    grad_w_in, grad_w_out = torch.empty_like(w_in), torch.empty_like(w_out)
    H = top_k * hidden
    xd, gd = torch.randn(tokens, D, generator=g_), torch.randn(tokens, D, generator=g_)
    hd, ad = torch.randn(tokens, 2 * H, generator=g_), torch.randn(tokens, H, generator=g_)
    wd_in, wd_out = torch.randn(2 * H, D, generator=g_), torch.randn(D, H, generator=g_)
    gwd_in, gwd_out = torch.empty_like(wd_in), torch.empty_like(wd_out)

    def per_expert():
        for e in range(experts):
            products(x, w_in[e], w_out[e], h, a, g, grad_w_in[e], grad_w_out[e])

    def dense():
        products(xd, wd_in, wd_out, hd, ad, gd, gwd_in, gwd_out)

    times = {"per_expert": [], "dense": []}
    for i in range(repeats + 1):  # the first round warms up
        for name, fn in (("per_expert", per_expert), ("dense", dense)):
            t = time.perf_counter()
            fn()
            if i:
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"routing": f"E{experts} k{top_k} F{hidden}", "rows_per_expert": rows,
            "per_expert_ms": round(med["per_expert"] * 1e3, 2), "dense_ms": round(med["dense"] * 1e3, 2),
            "ratio": round(med["dense"] / med["per_expert"], 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    if args.tokens < 1 or args.repeats < 1:
        p.error(f"--tokens {args.tokens} and --repeats {args.repeats} must be >= 1")
    report = {"benchmark": "per-expert GEMMs (fwd+bwd products) vs the dense GEMMs of equal FLOPs",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "d_model": D, "tokens": args.tokens,
              "routings": [measure(E, k, F, args.tokens, args.repeats) for E, k, F in ROUTINGS]}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
