"""fp32 GEMM on this CPU: torch.mm (the BLAS, MKL in the x86-64 wheels) against oneDNN's matmul as
moekit calls it (moekit.nn.gemm), product by product.

    python benchmarks/gemm_backends.py [--tokens 4096] [--repeats 9]

Per routing (E, k, expert hidden) at d_model 512 and balanced load (T·k/E rows per expert): the six
products of a SwiGLU expert's forward and backward on its slice (transposed operands as the loops
pass them), and the same six of the dense FFN of hidden k·F over all T tokens; then small-row
products (decoding: 1-64 rows). Medians of interleaved repeats, GFLOP/s and the speed-up
(blas time / onednn time), and the largest relative difference between the two results. One JSON
document on stdout.

Two GEMM-only ceilings per routing and backend (dense time / the E experts' time: what the layer
would reach against dense if everything but its GEMMs were free):
- ``ceiling_<backend>``: every product on all threads, E times one expert's products (its weights
  stay in cache): the loop with one group (experts too large to split, see moekit.moe.native);
- ``ceiling_grouped_<backend>``: the experts split into one contiguous group per thread, each
  thread running its group's products single-threaded, every expert with weights of its own (read
  from memory as in the loop): the loop with groups (E64, E128 here). Backend ``own`` is the C++
  loop's own fp32 kernel (``gemm_f32`` in moekit/moe/csrc/loop_experts.cpp, AVX-512), which the loop
  uses there; ``single_thread`` gives each of an expert's six products on one thread, oneDNN against
  it (``own_max_rel_diff``: its largest relative difference from torch.mm over the six).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

import harness
from moekit.argtypes import POSITIVE
from moekit.moe import native
from moekit.nn import gemm

ROUTINGS = ((8, 2, 1408), (64, 8, 176), (128, 8, 88))
D = 512


def six_products(rows: int, hidden: int, g_: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(a, b) of each product of a gated FFN step with w_in [2F, D], w_out [D, F]."""
    x, g = torch.randn(rows, D, generator=g_), torch.randn(rows, D, generator=g_)
    h, a = torch.randn(rows, 2 * hidden, generator=g_), torch.randn(rows, hidden, generator=g_)
    w_in, w_out = torch.randn(2 * hidden, D, generator=g_), torch.randn(D, hidden, generator=g_)
    return {"x w_in^T": (x, w_in.t()), "a w_out^T": (a, w_out.t()), "g w_out": (g, w_out),
            "g^T a": (g.t(), a), "h^T x": (h.t(), x), "h w_in": (h, w_in)}


def time_pair(a: torch.Tensor, b: torch.Tensor, repeats: int) -> dict:
    out = torch.empty(a.shape[0], b.shape[1])

    def product(name):
        def run(_):
            with gemm.use_backend(name):
                return harness.timed(gemm.mm, a, b, out)[0]
        return run

    # two warm-up rounds (oneDNN builds its kernel on first use)
    t = harness.medians(harness.interleaved({name: product(name) for name in ("blas", "onednn")}, 2, repeats))
    with gemm.use_backend("blas"):
        want = gemm.mm(a, b)
    with gemm.use_backend("onednn"):
        got = gemm.mm(a, b)
    flop = 2 * a.shape[0] * a.shape[1] * b.shape[1]
    return {"shape": [a.shape[0], a.shape[1], b.shape[1]],
            "blas_gflops": round(flop / t["blas"] / 1e9, 1), "onednn_gflops": round(flop / t["onednn"] / 1e9, 1),
            "speedup": round(t["blas"] / t["onednn"], 2),
            "max_rel_diff": float((got - want).abs().max() / want.abs().max()), "_s": t}


def single_thread_pair(a: torch.Tensor, b: torch.Tensor, repeats: int) -> dict:
    """GFLOP/s of one product on one thread, oneDNN (as moekit calls it) against the C++ loop's own kernel
    (interleaved, the own kernel's largest relative difference from torch.mm): the two as the loop's
    expert groups run them."""
    module, threads = native.load(), torch.get_num_threads()
    out = torch.empty(a.shape[0], b.shape[1])
    kernels = {"onednn": lambda _: harness.timed(gemm.mm, a, b, out)[0],
               "own": lambda _: harness.timed(lambda: module.own_mm(a, b, out=out))[0]}
    torch.set_num_threads(1)
    try:
        with gemm.use_backend("onednn"):
            t = harness.medians(harness.interleaved(kernels, 2, repeats))
    finally:
        torch.set_num_threads(threads)
    want = a @ b
    flop = 2 * a.shape[0] * a.shape[1] * b.shape[1]
    return {**{f"{name}_gflops": round(flop / seconds / 1e9, 1) for name, seconds in t.items()},
            "own_max_rel_diff": float((module.own_mm(a, b) - want).abs().max() / want.abs().max())}


def grouped_step_s(E: int, rows: int, hidden: int, backend: str, repeats: int, g_: torch.Generator) -> float:
    """Median seconds of the six products of all E experts, one contiguous group per thread, each thread
    single-threaded (torch's ops and moekit's oneDNN call release the GIL); activations shared within a
    thread (hot, as the loop's gathered rows), weights per expert (read from memory), operands listed
    before the clock starts. Python's call overhead (a few µs a product) stays in: a bound from below."""
    threads = torch.get_num_threads()
    acts = [six_products(rows, hidden, g_) for _ in range(threads)]
    weights = [(torch.randn(2 * hidden, D, generator=g_), torch.randn(D, hidden, generator=g_)) for _ in range(E)]
    bounds = [E * t // threads for t in range(threads + 1)]

    def products(t: int, e: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        (w_in, w_out), p = weights[e], acts[t]
        return [(p["x w_in^T"][0], w_in.t()), (p["a w_out^T"][0], w_out.t()), (p["g w_out"][0], w_out),
                (p["g^T a"][0], p["g^T a"][1]), (p["h^T x"][0], p["h^T x"][1]), (p["h w_in"][0], w_in)]

    work = []  # per thread: (a, b, out) of every product of its experts
    for t in range(threads):
        outs = [torch.empty(a.shape[0], b.shape[1]) for a, b in products(t, 0)]
        work.append([(a, b, out) for e in range(bounds[t], bounds[t + 1])
                     for (a, b), out in zip(products(t, e), outs)])

    module = native.load()

    def group(t: int) -> None:
        for a, b, out in work[t]:
            if backend == "own":
                module.own_mm(a, b, out=out)
            else:
                gemm.mm(a, b, out=out)

    # each worker sets its own intra-op threads (a thread's count is its own in ATen and OpenMP)
    with (gemm.use_backend("onednn" if backend == "own" else backend),
          ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool):
        runs = harness.interleaved({"step": lambda _: harness.timed(lambda: list(pool.map(group, range(threads))))[0]},
                                   2, repeats)
    return statistics.median(runs["step"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/gemm_backends.py", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=POSITIVE, default=4096)
    p.add_argument("--repeats", type=POSITIVE, default=9)
    args = p.parse_args(argv)
    if gemm.backend() != "onednn":
        with gemm.use_backend("onednn"):
            gemm.backend()  # raises with the reason when oneDNN's matmul is unreachable
    g_ = torch.Generator().manual_seed(0)
    report = {"benchmark": "fp32 GEMM: torch.mm (BLAS) against oneDNN as moekit calls it", **harness.environment(),
              "tokens": args.tokens, "repeats": args.repeats, "routings": [], "small_rows": []}
    for E, k, F in ROUTINGS:
        entry = {"routing": f"E{E} k{k} F{F}"}
        for side, rows, hidden, count in (("per_expert", args.tokens * k // E, F, E), ("dense", args.tokens, k * F, 1)):
            products = {name: time_pair(a, b, args.repeats) for name, (a, b) in six_products(rows, hidden, g_).items()}
            total = {name: count * sum(p["_s"][name] for p in products.values()) for name in ("blas", "onednn")}
            for p_ in products.values():
                del p_["_s"]
            entry[side] = {"products": products, "step_ms": {n: round(s * 1e3, 2) for n, s in total.items()}}
        rows = args.tokens * k // E
        own = native.load() is not None and native.load().have_own_gemm()
        if own:  # the expert's products on one thread, as the loop's groups run them
            entry["single_thread"] = {name: single_thread_pair(a, b, args.repeats)
                                      for name, (a, b) in six_products(rows, F, g_).items()}
            entry["own_max_rel_diff"] = max(p_["own_max_rel_diff"] for p_ in entry["single_thread"].values())
        for name in ("blas", "onednn"):  # dense time / the E experts' time: the loop's GEMM ceilings
            entry[f"ceiling_{name}"] = round(entry["dense"]["step_ms"][name] / entry["per_expert"]["step_ms"][name], 3)
        for name in ("blas", "onednn", "own") if own else ("blas", "onednn"):
            dense_ms = entry["dense"]["step_ms"]["onednn" if name == "own" else name]  # own: against oneDNN's dense
            grouped_ms = grouped_step_s(E, rows, F, name, args.repeats, g_) * 1e3
            entry[f"grouped_step_ms_{name}"] = round(grouped_ms, 2)
            entry[f"ceiling_grouped_{name}"] = round(dense_ms / grouped_ms, 3)
        report["routings"].append(entry)
    for rows in (1, 8, 64):
        for hidden in (1408, 4096):
            a, b = torch.randn(rows, D, generator=g_), torch.randn(hidden, D, generator=g_).t()
            r = time_pair(a, b, args.repeats * 5)
            del r["_s"]
            report["small_rows"].append(r)
    return harness.print_json(report)


if __name__ == "__main__":
    sys.exit(main())
