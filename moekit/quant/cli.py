"""``moekit quantize``: a model's experts (and optionally linears) to int8 / int4, saved as a verified
checkpoint, with what it costs in quality printed."""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from moekit.argtypes import POSITIVE, add_verb, int_at_least, progress_enabled


def add_parser(sub) -> argparse.ArgumentParser:
    """Registers ``quantize`` on the ``moekit`` sub-parsers."""
    p = add_verb(sub, "quantize", "quantize a model's experts to int8 / int4 and save it (quality printed)", [
        "moekit quantize --model runs/small --to int8 --out runs/small-int8",
        "moekit quantize --model hf/Mixtral-8x7B --to int4 --group-size 64 --out runs/mixtral-int4",
        "moekit generate --model runs/small-int8 --prompt 'def fib(n):'    # loads quantized",
    ], description="Quantize a model's routed experts (weight-only: int8 per output channel, int4 group-wise; "
                   "--linears: the\nattention and dense linears too) and save a moekit checkpoint that reloads "
                   "without re-quantizing.\nPrints the KL divergence, top-1 agreement and perplexity change of "
                   "the quantized model against the\noriginal on held-out batches (--text FILE: the model's "
                   "tokenizer on that text; else random tokens).")
    p.add_argument("--model", required=True, help="a checkpoint or run directory, or a Hugging Face model directory")
    p.add_argument("--to", required=True, choices=["int8", "int4"], help="the experts' weight format")
    p.add_argument("--group-size", dest="group_size", type=POSITIVE, choices=[32, 64, 128], default=32,
                   help="int4: input features sharing a scale and zero")
    p.add_argument("--symmetric", action="store_true", help="int4: no zero points (scale only)")
    p.add_argument("--linears", action="store_true",
                   help="quantize the attention, dense-FFN and shared-expert linears too (not the router or the head)")
    p.add_argument("--out", required=True, help="a new or empty directory (the checkpoint goes in out/ckpt-*)")
    p.add_argument("--text", help="held-out text for the quality figures, read with the model's tokenizer "
                                  "(default: random tokens)")
    p.add_argument("--batches", type=POSITIVE, default=4, help="held-out batches for the quality figures")
    p.add_argument("--batch-size", dest="batch_size", type=POSITIVE, default=2, help="sequences a batch")
    p.add_argument("--seq-len", dest="seq_len", type=int_at_least(2), default=128, help="tokens a sequence")
    p.add_argument("--no-quality", dest="no_quality", action="store_true",
                   help="skip the quality figures (they hold the original model and the quantized one at once)")
    p.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=run)
    return p


def _load(path: Path, progress: bool):
    """The model and its tokenizer (None when it has none) of a Hugging Face directory or a moekit checkpoint."""
    from moekit.checkpoint import load_model
    from moekit.interop import from_pretrained, load_hf_tokenizer

    if (path / "config.json").is_file() and not (path / "manifest.json").is_file():  # a Hugging Face directory
        return from_pretrained(path, progress=progress), load_hf_tokenizer(path)
    model, tokenizer, _ = load_model(path)
    return model, tokenizer


def held_out_batches(args: argparse.Namespace, vocab_size: int, tokenizer) -> tuple[list, str]:
    """The quality figures' batches and a word on where they come from."""
    import torch

    from moekit.quant.quality import random_batches

    if not args.text:
        return random_batches(vocab_size, args.batches, args.batch_size, args.seq_len), "random tokens"
    if tokenizer is None:
        raise ValueError(f"--text {args.text}: the model has no tokenizer to read it with")
    path = Path(args.text)
    try:
        ids = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))
    except OSError as err:
        raise ValueError(f"--text {path} cannot be read: {err}") from None
    per_batch = args.batch_size * args.seq_len
    n = min(args.batches, len(ids) // per_batch)
    if n == 0:
        raise ValueError(f"--text {path} holds {len(ids)} tokens; one batch needs {per_batch} "
                         f"(--batch-size x --seq-len)")
    flat = torch.tensor(ids[:n * per_batch], dtype=torch.long)
    return list(flat.view(n, args.batch_size, args.seq_len)), f"{n} batches of {path}"


def run(args: argparse.Namespace) -> int:
    from moekit.quant import QuantConfig, quality, quantize_model, save_quantized

    qcfg = QuantConfig(args.to, group_size=args.group_size, symmetric=args.symmetric, linears=args.linears)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not empty (or not a directory); choose an empty or new directory")
    model, tokenizer = _load(Path(args.model), progress_enabled(args.no_progress))
    batches, source = (None, None) if args.no_quality else held_out_batches(args, model.cfg.vocab_size, tokenizer)
    reference = None if args.no_quality else model
    quantized = model if args.no_quality else copy.deepcopy(model)
    summary = quantize_model(quantized, qcfg)
    print(f"moekit: {summary.describe()}", file=sys.stderr)
    result: dict = {"quantization": qcfg.to_dict(), "experts": summary.experts, "linears": summary.linears,
                    "mib_before": round(summary.bytes_before / 2**20, 2),
                    "mib_after": round(summary.bytes_after / 2**20, 2)}
    if reference is not None:
        report = quality(reference, quantized, batches)
        print(f"moekit: quality on {source}: {report.describe()}", file=sys.stderr)
        result["quality"] = {**report.to_dict(), "held_out": source}
        del reference, model
    path = save_quantized(quantized, out, tokenizer)
    result["checkpoint"] = str(path)
    print(json.dumps(result))
    return 0
