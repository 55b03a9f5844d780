"""Serving throughput and latency: ``moekit serve`` under 1, 4 and 16 concurrent streaming clients
against ``moekit.generate`` one request at a time, on the same weights.

    python benchmarks/serve.py [--preset small] [--clients 1,4,16] [--prompt-tokens 64] [--new-tokens 64]

A random model of the preset (byte tokenizer) is saved to a temporary directory and served by a
``moekit serve`` subprocess (``--max-batch`` = the largest client count). At each concurrency C, C
client threads each send ``--requests-per-client`` streaming completions in turn (greedy, token-id
prompts of ``--prompt-tokens``, exactly ``--new-tokens`` generated: the byte tokenizer has no stop
token). Reported per level: generated tokens/s over the wall time, the median and p90 time to first
token, the median inter-token latency (gaps between streamed chunks). The baseline runs the same
prompts through ``moekit.generate`` sequentially in this process, before and after the served runs;
``speedup_vs_sequential`` divides by the faster of the two. Prints one JSON document.

NOTE: the environment reaches the server too: ``MOEKIT_PROBE=0`` (the chooser's fixed rules instead of
the timing probe) applies to both sides, and the report's ``command`` shows it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import harness
from moekit import MoETransformer, ModelConfig
from moekit import checkpoint as ckpt_io
from moekit.argtypes import POSITIVE
from moekit.generate import generate
from moekit.tokenizer import ByteTokenizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_one(port: int, prompt: list[int], new: int) -> dict:
    """One streaming completion: seconds to the first text chunk, the gaps between chunks, chunks."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"the server answered {resp.status}: {resp.read()[:300]!r}")
    stamps = []
    for raw in iter(resp.readline, b""):
        line = raw.strip()
        if line.startswith(b"data:") and line != b"data: [DONE]":
            stamps.append(time.perf_counter())
    conn.close()
    return {"ttft_s": stamps[0] - t0, "gaps_s": [b - a for a, b in zip(stamps, stamps[1:])]}


def run_level(port: int, prompts: list[list[int]], clients: int, per_client: int, new: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(per_client):
            out = stream_one(port, prompts[(c * per_client + r) % len(prompts)], new)
            with lock:
                results.append(out)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = sorted(r["ttft_s"] for r in results)
    gaps = [g for r in results for g in r["gaps_s"]]
    return {"clients": clients, "requests": len(results), "wall_s": round(wall, 3),
            "tokens_per_s": round(len(results) * new / wall, 1),
            "ttft_median_s": round(statistics.median(ttft), 4),
            "ttft_p90_s": round(ttft[math.ceil(0.9 * len(ttft)) - 1], 4),
            "inter_token_median_ms": round(1000 * statistics.median(gaps), 2) if gaps else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="model preset, random weights (default: small)")
    ap.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated (default: 1,4,16)")
    ap.add_argument("--requests-per-client", dest="per_client", type=POSITIVE, default=2,
                    help="requests each client sends in turn (default: 2)")
    ap.add_argument("--prompt-tokens", dest="prompt_tokens", type=POSITIVE, default=64, help="(default: 64)")
    ap.add_argument("--new-tokens", dest="new_tokens", type=POSITIVE, default=64, help="(default: 64)")
    ap.add_argument("--baseline-requests", dest="baseline_requests", type=POSITIVE, default=4,
                    help="requests of the sequential moekit.generate baseline (default: 4)")
    ap.add_argument("--threads", type=POSITIVE, default=torch.get_num_threads(),
                    help="torch threads of the server and of the baseline (default: torch's, here %(default)s)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.clients.split(",")]

    torch.manual_seed(0)
    cfg = ModelConfig.from_name(args.preset).replace(vocab_size=256)
    model = MoETransformer(cfg).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (args.prompt_tokens,), generator=g).tolist() for _ in range(64)]

    def sequential() -> dict:
        """The baseline: one request at a time through moekit.generate."""
        start = time.perf_counter()
        for p in prompts[:args.baseline_requests]:
            generate(model, [p], args.new_tokens)
        wall = time.perf_counter() - start
        return {"requests": args.baseline_requests, "wall_s": round(wall, 3),
                "tokens_per_s": round(args.baseline_requests * args.new_tokens / wall, 1)}

    generate(model, [prompts[0]], args.new_tokens)  # warm-up
    before = sequential()

    with tempfile.TemporaryDirectory() as tmp:
        run = ckpt_io.save_checkpoint(Path(tmp) / "bench", 0, model, cfg, ByteTokenizer()).parent
        port = _free_port()
        proc = subprocess.Popen([sys.executable, "-m", "moekit", "serve", "--model", str(run), "--port", str(port),
                                 "--max-batch", str(max(levels)), "--log-level", "warning"],
                                env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        try:
            deadline = time.time() + 120
            while True:
                try:
                    stream_one(port, prompts[0], 2)  # up, and warmed
                    break
                except OSError:
                    if time.time() > deadline or proc.poll() is not None:
                        raise RuntimeError("the server did not start") from None
                    time.sleep(0.2)
            for _ in range(3):
                stream_one(port, prompts[1], args.new_tokens)
            served = [run_level(port, prompts, c, args.per_client, args.new_tokens) for c in levels]
        finally:
            proc.terminate()
            proc.wait(60)
    after = sequential()  # again: a shared machine's speed drifts; the better of the two is the baseline
    baseline = max(before, after, key=lambda r: r["tokens_per_s"])
    probe_env = f"MOEKIT_PROBE={os.environ['MOEKIT_PROBE']} " if "MOEKIT_PROBE" in os.environ else ""
    for s in served:
        s["speedup_vs_sequential"] = round(s["tokens_per_s"] / baseline["tokens_per_s"], 2)
    return harness.print_json({
        "benchmark": "serve", "environment": harness.environment(), "preset": args.preset,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "threads": args.threads, "sequential_generate": {"before": before, "after": after}, "served": served,
        "command": probe_env + "python benchmarks/serve.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    sys.exit(main())
