"""The routing-insight verbs of ``moekit``; each calls one library function and prints JSON (``prune``: a
short summary, JSON with ``--json``).

    moekit inspect --model DIR [--data PATH] [--out DIR] [--max-tokens N]
    moekit plot RUN_DIR [RUN_DIR ...] [--out DIR] [--x step|tokens|flops|elapsed_s]
    moekit upcycle --from DENSE_RUN_OR_CKPT --experts E --top-k K [--noise STD] [--seed S] --out DIR
    moekit prune --model CKPT --experts E --method drop|merge [--data PATH] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moekit.argtypes import NON_NEGATIVE, POSITIVE, add_verb, number, progress_enabled


def cmd_inspect(args: argparse.Namespace) -> int:
    from moekit.insight.report import InspectConfig, inspect

    cfg = InspectConfig(model=args.model, data=args.data, out=args.out, max_tokens=args.max_tokens,
                        batch_size=args.batch_size, seq_len=args.seq_len, top_tokens=args.top_tokens,
                        categories=args.categories, overwrite=args.overwrite)
    from moekit.insight.common import load_for_analysis
    from moekit.insight.routing import token_progress

    loaded = load_for_analysis(cfg.model)
    with token_progress(loaded.model, "routing", cfg.max_tokens, progress_enabled(args.no_progress)):
        res = inspect(cfg, loaded)
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


def prune_summary(res, model: str) -> str:
    """``moekit prune``'s closing lines: what was cut, the loss before and after, where the files are."""
    from moekit.insight.common import MARKER

    out = Path(res.checkpoint).parent
    delta = res.val_loss_after - res.val_loss_before
    lines = [f"moekit prune: {model}, {res.num_experts_before} -> {res.num_experts_after} experts per MoE layer by "
             f"{res.method} (top-k {res.top_k_before} -> {res.top_k_after})",
             f"  validation loss {res.val_loss_before:.4f} -> {res.val_loss_after:.4f} ({delta:+.4f}) on "
             f"{res.eval_tokens:,} tokens"]
    for i, (layer, groups) in enumerate(sorted(res.groups.items())):
        if i == 6:
            lines.append(f"  ... {len(res.groups) - 6} more layers in {out / MARKER}")
            break
        usage = res.usage[layer]
        kept = sum(usage[g[0]] for g in groups)
        what = ", ".join("+".join(map(str, g)) for g in groups)
        lines.append(f"  layer {layer}: experts {what} ({kept:.0%} of the calibration load on the "
                     f"{'kept' if res.method == 'drop' else 'dominant'} experts)")
    lines += [f"  checkpoint {res.checkpoint}", f"  details    {out / MARKER} (groups, usage, losses)",
              f"next: moekit eval --model {out}   moekit inspect --model {out}"]
    return "\n".join(lines)


def cmd_prune(args: argparse.Namespace) -> int:
    from moekit.insight.prune import PruneConfig, prune

    cfg = PruneConfig(num_experts=args.experts, method=args.method, top_k=args.top_k, similarity=args.similarity,
                      align=not args.no_align, calib_split=args.calib_split, calib_tokens=args.calib_tokens,
                      eval_tokens=args.eval_tokens, batch_size=args.batch_size, seq_len=args.seq_len, data=args.data)
    out = args.out or Path("runs") / f"{Path(args.model).resolve().name}-{args.method}{args.experts}"
    res = prune(args.model, out, cfg, overwrite=args.overwrite, progress=progress_enabled(args.no_progress))
    print(json.dumps(res.to_dict()) if args.json else prune_summary(res, args.model))
    return 0


def add_parsers(sub) -> None:
    """Registers ``inspect``, ``plot``, ``upcycle`` and ``prune`` on the ``moekit`` sub-parsers."""
    p = add_verb(sub, "inspect", "routing report of a model: expert load, entropy, co-activation, top tokens", [
        "moekit inspect --model runs/demo/moe",
        "moekit inspect --model runs/small --data my_texts/ --max-tokens 262144 --out runs/inspect-small",
    ], description="Route text through a model and write a report (index.html, figures, summary.json): expert "
                   "load, router entropy,\nco-activation, the tokens each expert takes; collapsed experts are "
                   "flagged on stderr. Prints the main figures as JSON.")
    p.add_argument("--model", required=True, help="a checkpoint or run directory, or a Hugging Face model directory")
    p.add_argument("--data", help="text to route (its validation split); default: the run's own data")
    p.add_argument("--out", help="report directory (default: runs/inspect-<model dir name>)")
    p.add_argument("--max-tokens", dest="max_tokens", type=POSITIVE, default=65536, help="tokens of text routed")
    p.add_argument("--batch-size", dest="batch_size", type=POSITIVE, default=8, help="windows per forward pass")
    p.add_argument("--seq-len", dest="seq_len", type=POSITIVE,
                   help="tokens per window; default: the run's training sequence length")
    p.add_argument("--top-tokens", dest="top_tokens", type=POSITIVE, default=10, help="tokens listed per expert")
    p.add_argument("--categories", choices=["auto", "on", "off"], default="auto",
                   help="lexical classes of the tokens (auto: for Python text)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report directory")
    p.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_inspect)

    p = add_verb(sub, "plot", "compare runs: loss curves and load balance from their metrics.jsonl", [
        "moekit plot runs/demo/dense runs/demo/moe",
        "moekit plot runs/a runs/b --x flops --out runs/compare-ab"])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, each with its metrics.jsonl")
    p.add_argument("--out", help="output directory (default: runs/compare-<time>)")
    p.add_argument("--x", choices=["step", "tokens", "flops", "elapsed_s"], default="step", help="x axis")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(fn=cmd_plot)

    p = add_verb(sub, "upcycle", "sparse upcycling: a dense checkpoint -> an MoE whose experts copy its FFN", [
        "moekit upcycle --from runs/demo/dense --experts 8 --top-k 2 --out runs/upcycled",
        "moekit upcycle --from runs/demo/dense --experts 8 --top-k 2 --noise 0.01 --first-k-dense 1 --out runs/up2"])
    p.add_argument("--from", dest="src", required=True, metavar="DENSE_RUN_OR_CKPT",
                   help="a dense model's run or checkpoint directory")
    p.add_argument("--experts", type=POSITIVE, required=True, help="experts per MoE layer")
    p.add_argument("--top-k", dest="top_k", type=POSITIVE, required=True, help="experts each token is routed to")
    p.add_argument("--noise", type=number(0), default=0.0, help="relative std of the noise that tells experts apart")
    p.add_argument("--noise-kind", dest="noise_kind", choices=["multiplicative", "additive"], default="multiplicative",
                   help="multiplicative: w·(1 + noise·N(0,1)); additive: w + noise·rms(w)·N(0,1)")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="router initialisation and noise")
    p.add_argument("--router-init-std", dest="router_init_std", type=number(0),
                   help="router weights N(0, std^2); default: the model's init_std; 0 = zero router")
    p.add_argument("--moe-every", dest="moe_every", type=POSITIVE, default=1, help="every n-th FFN becomes an MoE")
    p.add_argument("--first-k-dense", dest="first_k_dense", type=NON_NEGATIVE, default=0, help="first k FFNs stay dense")
    p.add_argument("--set", action="append", metavar="moe.FIELD=VALUE",
                   help="another field of the new MoE layers, e.g. --set moe.aux_loss_coef=0.02 (repeatable; default: "
                        "the model's MoE defaults)")
    p.add_argument("--out", required=True, help="a new directory for the upcycled checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(fn=cmd_upcycle)

    p = add_verb(sub, "prune", "fewer experts: drop the least used or merge similar ones; val loss before/after", [
        "moekit prune --model runs/demo/moe --experts 4 --method drop",
        "moekit prune --model runs/demo/moe --experts 4 --method merge --out runs/moe-merge4 --json",
    ], description="Fewer experts per MoE layer: count each expert's load on calibration text, then drop the least "
                   "used experts\nor merge each into the most similar of the most used ones (MC-SMoE). Ends with the "
                   "validation loss before and after\nand where the new checkpoint is (--json: all of it as JSON; it "
                   "is also in <out>/moekit-insight.json).")
    p.add_argument("--model", required=True, help="a checkpoint or run directory (or a Hugging Face directory)")
    p.add_argument("--experts", type=POSITIVE, required=True, help="experts per MoE layer after pruning")
    p.add_argument("--method", choices=["drop", "merge"], required=True,
                   help="drop: keep the most used experts; merge: fold the others into the most similar kept one")
    p.add_argument("--top-k", dest="top_k", type=POSITIVE, help="top_k of the pruned model (default: unchanged)")
    p.add_argument("--similarity", choices=["router-logits", "router-rows", "weights"], default="router-logits",
                   help="merge: how experts are grouped (MC-SMoE: router logits)")
    p.add_argument("--no-align", dest="no_align", action="store_true",
                   help="merge: average weights without matching hidden units first")
    p.add_argument("--data", help="calibration and validation text; default: the run's own data")
    p.add_argument("--calib-split", dest="calib_split", choices=["train", "val"], default="train",
                   help="the split whose text the expert load is counted on")
    p.add_argument("--calib-tokens", dest="calib_tokens", type=POSITIVE, default=32768,
                   help="calibration tokens (expert load and, for merge, router logits)")
    p.add_argument("--eval-tokens", dest="eval_tokens", type=POSITIVE, default=65536,
                   help="validation tokens of the loss before and after")
    p.add_argument("--batch-size", dest="batch_size", type=POSITIVE, default=8, help="windows per forward pass")
    p.add_argument("--seq-len", dest="seq_len", type=POSITIVE,
                   help="tokens per window; default: the run's training sequence length")
    p.add_argument("--out", help="output directory (default: runs/<model dir name>-<method><experts>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the summary")
    p.set_defaults(fn=cmd_prune)
