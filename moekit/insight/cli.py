"""The routing-insight verbs of ``moekit``; each calls one library function and prints JSON.

    moekit inspect --model DIR [--data PATH] [--out DIR] [--max-tokens N]
    moekit plot RUN_DIR [RUN_DIR ...] [--out DIR] [--x step|tokens|flops|elapsed_s]
    moekit upcycle --from DENSE_RUN_OR_CKPT --experts E --top-k K [--noise STD] [--seed S] --out DIR
    moekit prune --model CKPT --experts E --method drop|merge [--data PATH] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moekit.argtypes import NON_NEGATIVE, POSITIVE, number


def cmd_inspect(args: argparse.Namespace) -> int:
    from moekit.insight.report import InspectConfig, inspect

    cfg = InspectConfig(model=args.model, data=args.data, out=args.out, max_tokens=args.max_tokens,
                        batch_size=args.batch_size, seq_len=args.seq_len, top_tokens=args.top_tokens,
                        categories=args.categories, overwrite=args.overwrite)
    res = inspect(cfg)
    layers = {i: {"max_load_ratio": round(s["max_load_ratio"], 4), "min_load_ratio": round(s["min_load_ratio"], 4),
                  "router_entropy": round(s["router_entropy"], 4), "dropped_fraction": s["dropped_fraction"]}
              for i, s in res.summary["layers"].items()}
    print(json.dumps({"out": str(res.out), "index": str(res.out / "index.html"), "tokens": res.summary["tokens"],
                      "collapse": [f.message() for f in res.collapse], "layers": layers}))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from moekit.insight.runs import compare_runs

    res = compare_runs(args.runs, args.out, x=args.x, overwrite=args.overwrite)
    runs = {name: {k: v for k, v in r.items() if k != "curves"} for name, r in res.summary["runs"].items()}
    print(json.dumps({"out": str(res.out), "index": str(res.out / "index.html"), "runs": runs}))
    return 0


def _moe_overrides(items: list[str] | None) -> dict | None:
    from moekit.config import parse_overrides

    if not items:
        return None
    parsed = parse_overrides(items)
    other = sorted(k for k in parsed if k != "moe")
    if other or not isinstance(parsed.get("moe"), dict):
        raise ValueError(f"--set {other or 'moe=null'}: upcycle takes moe.<field> settings of the new MoE layers only "
                         f"(the rest of the model is the dense one)")
    return parsed["moe"]


def cmd_upcycle(args: argparse.Namespace) -> int:
    from moekit.insight.upcycle import UpcycleConfig, upcycle

    cfg = UpcycleConfig(num_experts=args.experts, top_k=args.top_k, noise_std=args.noise, noise_kind=args.noise_kind,
                        seed=args.seed, router_init_std=args.router_init_std, moe_every=args.moe_every,
                        first_k_dense=args.first_k_dense, moe_overrides=_moe_overrides(args.set))
    res = upcycle(args.src, args.out, cfg, overwrite=args.overwrite)
    print(json.dumps(res.to_dict()))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from moekit.insight.prune import PruneConfig, prune

    cfg = PruneConfig(num_experts=args.experts, method=args.method, top_k=args.top_k, similarity=args.similarity,
                      align=not args.no_align, calib_split=args.calib_split, calib_tokens=args.calib_tokens,
                      eval_tokens=args.eval_tokens, batch_size=args.batch_size, seq_len=args.seq_len, data=args.data)
    out = args.out or Path("runs") / f"{Path(args.model).resolve().name}-{args.method}{args.experts}"
    res = prune(args.model, out, cfg, overwrite=args.overwrite)
    print(json.dumps(res.to_dict()))
    return 0


def add_parsers(sub) -> None:
    """Registers ``inspect``, ``plot``, ``upcycle`` and ``prune`` on the ``moekit`` sub-parsers."""
    p = sub.add_parser("inspect", help="routing report of a model: expert load, entropy, co-activation, top tokens")
    p.add_argument("--model", required=True, help="a checkpoint or run directory, or a Hugging Face model directory")
    p.add_argument("--data", help="text to route (its validation split); default: the run's own data")
    p.add_argument("--out", help="report directory (default runs/inspect-<model dir name>)")
    p.add_argument("--max-tokens", dest="max_tokens", type=POSITIVE, default=65536)
    p.add_argument("--batch-size", dest="batch_size", type=POSITIVE, default=8)
    p.add_argument("--seq-len", dest="seq_len", type=POSITIVE, help="default: the run's training sequence length")
    p.add_argument("--top-tokens", dest="top_tokens", type=POSITIVE, default=10, help="tokens listed per expert")
    p.add_argument("--categories", choices=["auto", "on", "off"], default="auto",
                   help="lexical classes of the tokens (auto: for Python text)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report directory")
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("plot", help="compare runs: loss curves and load balance from their metrics.jsonl")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="output directory (default runs/compare-<time>)")
    p.add_argument("--x", choices=["step", "tokens", "flops", "elapsed_s"], default="step", help="x axis")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(fn=cmd_plot)

    p = sub.add_parser("upcycle", help="sparse upcycling: a dense checkpoint -> an MoE whose experts copy its FFN")
    p.add_argument("--from", dest="src", required=True, metavar="DENSE_RUN_OR_CKPT")
    p.add_argument("--experts", type=POSITIVE, required=True, help="experts per MoE layer")
    p.add_argument("--top-k", dest="top_k", type=POSITIVE, required=True)
    p.add_argument("--noise", type=number(0), default=0.0, help="relative std of the noise that tells experts apart")
    p.add_argument("--noise-kind", dest="noise_kind", choices=["multiplicative", "additive"], default="multiplicative")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="router initialisation and noise")
    p.add_argument("--router-init-std", dest="router_init_std", type=number(0),
                   help="router weights N(0, std^2); default the model's init_std; 0 = zero router")
    p.add_argument("--moe-every", dest="moe_every", type=POSITIVE, default=1, help="every n-th FFN becomes an MoE")
    p.add_argument("--first-k-dense", dest="first_k_dense", type=NON_NEGATIVE, default=0, help="first k FFNs stay dense")
    p.add_argument("--set", action="append", metavar="moe.FIELD=VALUE",
                   help="another field of the new MoE layers, e.g. --set moe.aux_loss_coef=0.02 (repeatable)")
    p.add_argument("--out", required=True, help="a new directory for the upcycled checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(fn=cmd_upcycle)

    p = sub.add_parser("prune", help="fewer experts: drop the least used or merge similar ones; val loss before/after")
    p.add_argument("--model", required=True, help="a checkpoint or run directory (or a Hugging Face directory)")
    p.add_argument("--experts", type=POSITIVE, required=True, help="experts per MoE layer after pruning")
    p.add_argument("--method", choices=["drop", "merge"], required=True)
    p.add_argument("--top-k", dest="top_k", type=POSITIVE, help="top_k of the pruned model (default: unchanged)")
    p.add_argument("--similarity", choices=["router-logits", "router-rows", "weights"], default="router-logits",
                   help="merge: how experts are grouped (MC-SMoE: router logits)")
    p.add_argument("--no-align", dest="no_align", action="store_true",
                   help="merge: average weights without matching hidden units first")
    p.add_argument("--data", help="default: the run's own data")
    p.add_argument("--calib-split", dest="calib_split", choices=["train", "val"], default="train")
    p.add_argument("--calib-tokens", dest="calib_tokens", type=POSITIVE, default=32768)
    p.add_argument("--eval-tokens", dest="eval_tokens", type=POSITIVE, default=65536)
    p.add_argument("--batch-size", dest="batch_size", type=POSITIVE, default=8)
    p.add_argument("--seq-len", dest="seq_len", type=POSITIVE, help="default: the run's training sequence length")
    p.add_argument("--out", help="output directory (default runs/<model dir name>-<method><experts>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(fn=cmd_prune)
