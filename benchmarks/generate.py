"""Greedy generation speed: moekit.generate against transformers' generate on the same weights.

    python benchmarks/generate.py [--quick] [--dtype bf16] [--repeats N]

A random MixtralForCausalLM (4 layers, d 512, 8 experts top-2, vocabulary 4096) is built and saved
locally, loaded by both libraries (moekit through ``moekit.from_pretrained``), and both continue the
same prompt (128 tokens; --quick 32) by 64 greedy tokens (--quick 16) at batch 1 and 8; medians of
interleaved repeats. moekit runs twice: eagerly and with ``compile=True`` (static KV cache, compiled
decode step; the first call's extra seconds, the one-off compile, are reported as ``compile_s``).
Also the peak RSS that ``from_pretrained`` adds over the checkpoint's size (a fresh process). Prints
one JSON document.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

import harness
import moekit
from moekit.argtypes import POSITIVE


def build_checkpoint(directory: Path, layers: int, d: int, experts: int, top_k: int, vocab: int) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=vocab, hidden_size=d, intermediate_size=int(3.5 * d), num_hidden_layers=layers,
                        num_attention_heads=8, num_key_value_heads=2, num_local_experts=experts,
                        num_experts_per_tok=top_k, max_position_embeddings=1024)
    torch.manual_seed(0)
    MixtralForCausalLM(cfg).save_pretrained(directory)


def load_probe(directory: str) -> dict:
    """In a fresh process: peak RSS added by from_pretrained, next to the checkpoint's bytes."""
    peak = harness.peak_memory(lambda: moekit.from_pretrained(directory))
    size = sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))
    return {"peak_load_mb": round(peak.added_mb, 1), "checkpoint_mb": round(size / 2**20, 1),
            "memory_method": peak.method}


def sizes(quick: bool) -> tuple[int, int]:
    """(prompt tokens, new tokens)."""
    return (32, 16) if quick else (128, 64)


def run_generate_benchmark(prompt_len: int = 128, new: int = 64, repeats: int = 3, dtype: str = "fp32") -> dict:
    """The JSON-ready report: both libraries at batch 1 and 8 on one random Mixtral-shaped model."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(Path(tmp), 4, 512, 8, 2, 4096)
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch_dtype).eval()
        ours = moekit.from_pretrained(tmp, dtype=torch_dtype)
        try:
            memory = harness.run_script("generate.py", ["--load-probe", tmp], "load-memory probe")
            memory["ratio"] = round(memory["peak_load_mb"] / memory["checkpoint_mb"], 3)
        except RuntimeError as err:
            memory = {"error": str(err)[-500:]}
        report = {"benchmark": "greedy generation, moekit vs transformers generate, same weights",
                  **harness.environment(transformers=True), "dtype": dtype, "prompt": prompt_len,
                  "new_tokens": new, "repeats": repeats, "load_memory": memory, "batches": {}}
        for batch in (1, 8):
            ids = torch.randint(0, 4096, (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
            outs, first = {}, {}

            def side(name, fn):
                def run(i):
                    seconds, outs[name] = harness.timed(fn)
                    if i == 0:  # the warm-up round (and the compile)
                        first[name] = seconds
                    return seconds
                return run

            def hf_generate():
                with torch.no_grad():
                    return hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                       pad_token_id=0)[:, prompt_len:].tolist()

            def moekit_generate(compile: bool):
                return lambda: moekit.generate(ours, ids, new, compile=compile).tokens

            med = harness.medians(harness.interleaved({
                "moekit": side("moekit", moekit_generate(False)),
                "moekit_compiled": side("moekit_compiled", moekit_generate(True)),
                "transformers": side("transformers", hf_generate)}, 1, repeats))
            report["batches"][str(batch)] = {
                "moekit_compiled_tokens_per_s": round(batch * new / med["moekit_compiled"], 1),
                "moekit_eager_tokens_per_s": round(batch * new / med["moekit"], 1),
                "transformers_tokens_per_s": round(batch * new / med["transformers"], 1),
                "speedup_compiled": round(med["transformers"] / med["moekit_compiled"], 3),
                "speedup_eager": round(med["transformers"] / med["moekit"], 3),
                "compile_s": round(first["moekit_compiled"] - med["moekit_compiled"], 1),
                # fp32: all equal; bf16 rounding differs between kernels, so greedy paths may part
                "same_tokens_eager_vs_transformers": outs["moekit"] == outs["transformers"],
                "same_tokens_compiled_vs_eager": outs["moekit_compiled"] == outs["moekit"],
            }
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/generate.py", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="prompt 32, 16 new tokens, 2 repeats")
    p.add_argument("--repeats", type=POSITIVE, default=3)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="both libraries' weights (default fp32)")
    p.add_argument("--load-probe", metavar="DIR", help=argparse.SUPPRESS)  # a fresh process's share
    args = p.parse_args(argv)
    if args.load_probe:
        print(json.dumps(load_probe(args.load_probe)))
        return 0
    return harness.print_json(run_generate_benchmark(*sizes(args.quick), 2 if args.quick else args.repeats,
                                                     args.dtype))


if __name__ == "__main__":
    sys.exit(main())
