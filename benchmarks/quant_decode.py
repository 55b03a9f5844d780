"""Decode-step time of weight-only quantized experts: fp32, bf16, int8 and int4 through moekit.generate.

    python benchmarks/quant_decode.py [--quick] [--threads N] [--repeats N] [--new N] [--prompt N]

One random Mixtral-shaped model (d 1024, 8 layers, 8 experts of 2816, top-2, 8 heads / 2 KV heads,
vocabulary 8000; --quick: 2 layers) is built once, seeded, and run four ways: fp32; bf16; int8 and int4
experts (moekit.quant.quantize_model, int4 at group 32) with the rest of the model in bf16, which is
how ``from_pretrained(path, dtype=torch.bfloat16, quantize=...)`` gives it. Each continues the same
random prompt greedily at batch 1 and 8; a decode step's time is the gap between consecutive tokens
(``on_token``), its median over the steps of the rounds after a warm-up round, the four ways
interleaved round by round so a shared machine's drift hits each alike. The expert backend follows
the chooser's fixed rules (``probe=False``: no timing of candidates inside the measured steps).
Prints one JSON document with the CPU model and the threads.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

import harness
import moekit
from moekit.argtypes import POSITIVE
from moekit.cpu import options
from moekit.quant import quantize_model


def build_model(layers: int) -> moekit.MoETransformer:
    moe = moekit.MoEConfig(d_model=1024, expert_hidden=2816, num_experts=8, top_k=2)
    cfg = moekit.ModelConfig(vocab_size=8000, d_model=1024, n_layers=layers, n_heads=8, n_kv_heads=2, head_dim=128,
                             max_seq_len=1024, ffn_hidden=2816, moe=moe, tie_embeddings=False)
    torch.manual_seed(0)
    return moekit.MoETransformer(cfg).eval()


def decode_steps(model, prompts: list[list[int]], new: int) -> list[float]:
    """Seconds between consecutive generated tokens: each a decode step (and the greedy pick)."""
    stamps: list[float] = []
    moekit.generate(model, prompts, max_new_tokens=new, temperature=0,
                    on_token=lambda _: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 layers instead of 8")
    parser.add_argument("--repeats", type=POSITIVE, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--new", type=POSITIVE, default=16, help="greedy tokens a generation")
    parser.add_argument("--prompt", type=POSITIVE, default=32, help="prompt tokens")
    parser.add_argument("--threads", type=POSITIVE, help="intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    options.set(probe=False)

    fp32 = build_model(2 if args.quick else 8)
    params = sum(p.numel() for p in fp32.parameters())
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    models = {"fp32": fp32, "bf16": bf16}
    sizes = {}
    for fmt in ("int8", "int4"):
        models[fmt] = copy.deepcopy(bf16)
        summary = quantize_model(models[fmt], fmt, group_size=32)
        sizes[fmt] = {"experts_mib_before": round(summary.bytes_before / 2**20, 1),
                      "experts_mib_after": round(summary.bytes_after / 2**20, 1)}
    g = torch.Generator().manual_seed(1)
    report: dict = {"benchmark": "quant_decode", "environment": harness.environment(),
                    "model": {"d_model": 1024, "layers": fp32.cfg.n_layers, "experts": 8, "expert_hidden": 2816,
                              "top_k": 2, "vocab": 8000, "parameters": params},
                    "prompt": args.prompt, "new_tokens": args.new, "repeats": args.repeats, "sizes": sizes,
                    "decode_ms": {}, "tokens_per_s": {}}
    for batch in (1, 8):
        prompts = torch.randint(0, 8000, (batch, args.prompt), generator=g).tolist()

        def side(name):
            return lambda _round: decode_steps(models[name], prompts, args.new)

        runs = harness.interleaved({name: side(name) for name in models}, warmup=1, repeats=args.repeats)
        for name, rounds in runs.items():
            ms = statistics.median(s for r in rounds for s in r) * 1e3
            report["decode_ms"].setdefault(name, {})[f"batch{batch}"] = round(ms, 2)
            report["tokens_per_s"].setdefault(name, {})[f"batch{batch}"] = round(batch * 1e3 / ms, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
