"""``moekit <verb>``: a thin command line; every verb calls a library function.

    moekit demo [--quick]             the main job: MoE vs dense with equal active parameters, measured
    moekit bench layer [options]      the layer benchmark, JSON on stdout
    moekit train [options]            train a model (moekit train --help)
    moekit eval --model DIR           validation loss of a checkpoint
    moekit generate --model DIR --prompt TEXT   continue a prompt (streams; --json for ids)
    moekit convert --from-hf DIR --out DIR | --to-hf DIR --out DIR
    moekit params PRESET [--json]     total and active parameters of a preset (meta device)
    moekit presets                    the known presets with their parameter counts
    moekit inspect --model DIR        routing report: expert load, entropy, co-activation, top tokens (HTML)
    moekit plot RUN_DIR [RUN_DIR ...] compare runs: loss curves, load balance
    moekit upcycle --from DIR --experts E --top-k K --out DIR   sparse upcycling of a dense checkpoint
    moekit prune --model DIR --experts E --method drop|merge   fewer experts; val loss before/after
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from moekit.argtypes import NON_NEGATIVE, POSITIVE, number


def _fmt(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def cmd_params(args: argparse.Namespace) -> int:
    from moekit.model import count_parameters
    from moekit.presets import PRESETS, get_preset

    count = count_parameters(get_preset(args.preset))
    preset = PRESETS[args.preset]
    if args.json:
        print(json.dumps({"preset": args.preset, **count.to_dict(), "published_total": preset.published_total,
                          "published_active": preset.published_active, "source": preset.source}, indent=2))
    else:
        published = ", ".join(f"{k} {v}" for k, v in (("total", preset.published_total),
                                                       ("active", preset.published_active)) if v)
        print(f"{args.preset}: {_fmt(count.total)} total, {_fmt(count.active)} active "
              f"({count.total:,} / {count.active:,})" + (f"; published: {published}" if published else ""))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from moekit.model import count_parameters
    from moekit.presets import PRESETS

    for name, preset in PRESETS.items():
        c = count_parameters(preset.config)
        print(f"{name:20s} {_fmt(c.total):>8s} total {_fmt(c.active):>8s} active  {preset.source}")
    return 0


MOVED_BENCHMARKS = ("train", "generate", "ep", "suite")  # now scripts: python benchmarks/<name>.py


def _benchmark_name(text: str) -> str:
    if text in MOVED_BENCHMARKS:
        raise argparse.ArgumentTypeError(f"'{text}' is no longer part of the package: run python "
                                         f"benchmarks/{text}.py in a checkout of the moekit repository")
    if text != "layer":
        raise argparse.ArgumentTypeError(f"expected 'layer', got {text!r}")
    return text


def cmd_bench(args: argparse.Namespace) -> int:
    from moekit import bench

    return bench.main(args.rest)


def cmd_demo(args: argparse.Namespace) -> int:
    from moekit.train.demo import run_demo

    summary = run_demo(args.out, quick=args.quick, overwrite=args.overwrite, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0


def _train_config(args: argparse.Namespace):
    from moekit.config import parse_overrides
    from moekit.train import TrainConfig
    from moekit.train.loop import RESUMABLE

    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    if args.set:
        given["model_overrides"] = parse_overrides(args.set)
    if not args.resume:
        return TrainConfig(**given)
    from moekit import checkpoint as ckpt_io

    saved_path = Path(args.out) / "train_config.json"
    if not saved_path.is_file():
        raise FileNotFoundError(f"--resume: {saved_path} not found; is {args.out} a moekit run directory?")
    # the options the run last ran with are its latest checkpoint's (an earlier --resume may have changed
    # --steps and the like); before any checkpoint, those it started with
    latest = ckpt_io.latest_checkpoint(Path(args.out))
    try:
        last = (ckpt_io.verify(latest).get("train") if latest is not None else None) or json.loads(saved_path.read_text())
        saved = TrainConfig(**{**last, "out": args.out})
    except (ValueError, TypeError) as err:
        raise ValueError(f"--resume: {saved_path} does not hold a valid training config: {err}") from None
    # Every flag given must either be one a resumed run may change, or agree with the saved run:
    # a flag that silently did nothing (--lr 5 on resume) misleads more than an error.
    wanted = TrainConfig(**{**saved.to_dict(), **given})
    flag = {"model_overrides": "--set"}
    conflicts = [f"{flag.get(k, '--' + k.replace('_', '-'))} {getattr(wanted, k)!r} (the run has {getattr(saved, k)!r})"
                 for k in given if k not in RESUMABLE and getattr(wanted, k) != getattr(saved, k)]
    if conflicts:
        may = ", ".join("--" + k.replace("_", "-") for k in RESUMABLE if k != "out")
        raise ValueError(f"--resume continues {args.out} as it was saved, but {'; '.join(conflicts)}; on resume only "
                         f"{may} may change (start a new run in another --out to change the rest)")
    changed = [f"--{k.replace('_', '-')} {getattr(saved, k)!r} -> {getattr(wanted, k)!r}"
               for k in given if k in RESUMABLE and k != "out" and getattr(wanted, k) != getattr(saved, k)]
    if changed and int(os.environ.get("RANK", "0")) == 0:
        print(f"moekit: resuming {args.out} with {', '.join(changed)}", file=sys.stderr)
    return wanted


def cmd_train(args: argparse.Namespace) -> int:
    from moekit.train import train

    from moekit.dist import shutdown

    try:
        result = train(_train_config(args), resume=args.resume, overwrite=args.overwrite,
                       progress=not args.no_progress)
    finally:
        shutdown()
    summary = {"run_dir": str(result.run_dir), "step": result.step, "loss": result.final_loss,
               "val_loss": result.val_loss, "val_step": result.val_step, "interrupted": result.interrupted}
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return result.exit_code  # 130 after Ctrl-C: `moekit train && moekit eval` stops there


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from moekit.checkpoint import load_model
    from moekit.train import evaluate
    from moekit.train.data import load_tokens, open_corpus

    model, tokenizer, config = load_model(Path(args.model))
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer (tokenizer.json or tokenizer_config.json)")
    train_cfg = config.get("train") or {}
    data = args.data if args.data is not None else train_cfg.get("data")
    # The run's own settings by default, so a fresh eval of a run reproduces its logged val_loss.
    seq_len = args.seq_len or train_cfg.get("seq_len", 256)
    batch_size = args.batch_size or train_cfg.get("batch_size", 8)
    max_tokens = args.max_tokens or train_cfg.get("eval_tokens", 262144)
    autocast_dtype = torch.bfloat16 if train_cfg.get("dtype") == "bf16" else None
    if seq_len > model.cfg.max_seq_len:
        raise ValueError(f"--seq-len={seq_len} exceeds the model's max_seq_len={model.cfg.max_seq_len}")
    tokens = load_tokens(open_corpus(data, train_cfg.get("val_fraction", 0.02)), tokenizer, splits=("val",))
    result = evaluate(model, tokens.val, batch_size, seq_len, max_tokens, autocast_dtype)
    print(json.dumps({**result, "batch_size": batch_size, "seq_len": seq_len}))
    return 0


def _model_and_tokenizer(path: Path):
    """A moekit checkpoint/run with its tokenizer, or a Hugging Face directory with tokenizer.json."""
    from moekit.checkpoint import load_model
    from moekit.interop import from_pretrained, load_hf_tokenizer

    if (path / "config.json").is_file() and not (path / "manifest.json").is_file():
        model = from_pretrained(path)
        tokenizer = load_hf_tokenizer(path)  # (moekit's byte tokenizer, exported, comes back as itself)
        if tokenizer is None:
            raise FileNotFoundError(f"{path / 'tokenizer.json'} not found: generate needs the model's tokenizer")
        return model, tokenizer
    model, tokenizer, _ = load_model(path)
    if tokenizer is None:
        raise ValueError(f"{path} has no tokenizer (tokenizer.json or tokenizer_config.json)")
    return model, tokenizer


def cmd_generate(args: argparse.Namespace) -> int:
    from moekit.generate import generate

    model, tokenizer = _model_and_tokenizer(Path(args.model))
    prompt = tokenizer.encode(args.prompt)
    stop = [tokenizer.eot_id] if getattr(tokenizer, "eot_id", None) is not None else []
    ids: list[int] = []
    shown = ""

    def stream(step_tokens: list[int]) -> None:
        nonlocal shown
        if step_tokens[0] < 0 or step_tokens[0] in stop:  # a finished row; the stop token is not text
            return
        ids.append(step_tokens[0])
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd") and text.startswith(shown):  # wait for a whole UTF-8 character
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text

    res = generate(model, [prompt], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, stop_tokens=stop, on_token=None if args.json else stream,
                   compile=args.compile)
    if args.json:
        text_ids = res.tokens[0][:-1] if res.finished[0] else res.tokens[0]
        print(json.dumps({"prompt_ids": prompt, "ids": res.tokens[0], "text": tokenizer.decode(text_ids),
                          "stopped": res.finished[0]}))
    else:
        sys.stdout.write(tokenizer.decode(ids)[len(shown):] + "\n")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from moekit.checkpoint import load_model, save_checkpoint
    from moekit.interop import from_pretrained, load_hf_tokenizer, to_hf

    if bool(args.from_hf) == bool(args.to_hf):
        raise ValueError("convert takes exactly one of --from-hf DIR or --to-hf DIR (a non-empty path)")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not empty (or not a directory); choose an empty or new directory")
    if args.from_hf:
        src = Path(args.from_hf)
        model = from_pretrained(src)
        tok = load_hf_tokenizer(src)  # moekit's byte tokenizer comes back as itself
        if tok is None:
            print(f"moekit: note: {src} has no tokenizer.json; the checkpoint has none (eval and generate need one)",
                  file=sys.stderr)
        path = save_checkpoint(out, 0, model, model.cfg, tok)
        print(json.dumps({"checkpoint": str(path), "architecture": "moekit"}))
    else:
        src = Path(args.to_hf)
        model, tok, _ = load_model(src)
        arch = to_hf(model, out, args.architecture, tok)  # the byte tokenizer as an equivalent tokenizer.json
        print(json.dumps({"out": str(out), "architecture": arch}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from moekit import __version__

    parser = argparse.ArgumentParser(prog="moekit", description="Sparse Mixture-of-Experts toolkit")
    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    p = sub.add_parser("demo", help="the main job: train an MoE and a dense model with equal active parameters")
    p.add_argument("--quick", action="store_true", help="a few minutes instead of about fifteen")
    p.add_argument("--out", help="output directory (default runs/demo-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", dest="no_progress", action="store_true")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("bench", help="time the MoE layer against a dense FFN on this machine (JSON)",
                       description="moekit bench layer: the MoE layer against a dense SwiGLU FFN of equal active "
                                   "FLOPs on this machine, as JSON (moekit bench layer --help). The project's "
                                   "other benchmarks (transformers comparisons, training step, generation, expert "
                                   "parallelism, the suite) are scripts in the repository: python "
                                   "benchmarks/{layer,train,generate,ep,suite}.py.")
    p.add_argument("benchmark", metavar="layer", type=_benchmark_name, help="the benchmark (one: layer)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="its options (moekit bench layer --help)")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("params", help="total and active parameters of a preset")
    p.add_argument("preset")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_params)

    p = sub.add_parser("train", help="train a model (default: the small preset on the embedded corpus)")
    p.add_argument("--preset", help="model preset (moekit presets lists them); default small")
    p.add_argument("--miniature", action="store_true", default=None,
                   help="a CPU-sized sibling of the preset, same architecture")
    p.add_argument("--data", help="text file, directory of text files, or JSONL with a 'text' field")
    p.add_argument("--out", default="runs/train", help="run directory (never overwritten without --overwrite)")
    p.add_argument("--steps", type=POSITIVE)
    p.add_argument("--seed", type=NON_NEGATIVE)
    p.add_argument("--batch-size", dest="batch_size", type=POSITIVE,
                   help="sequences per micro-batch, over all processes (each takes an equal share)")
    p.add_argument("--ep", type=POSITIVE, help="expert-parallel degree under torchrun (divides the process count "
                   "and the expert count); default 1")
    p.add_argument("--seq-len", dest="seq_len", type=POSITIVE)
    p.add_argument("--grad-accum", dest="grad_accum", type=POSITIVE)
    p.add_argument("--lr", type=number(0, above=True))
    p.add_argument("--warmup", type=NON_NEGATIVE, help="linear warmup steps (default min(50, steps // 10)); "
                   "at most --steps")
    p.add_argument("--weight-decay", dest="weight_decay", type=number(0))
    p.add_argument("--grad-clip", dest="grad_clip", type=number(0), help="gradient norm clip; 0 = off")
    p.add_argument("--dtype", choices=["fp32", "bf16"])
    p.add_argument("--device", help="cpu (default), cuda or cuda:N")
    p.add_argument("--compile", action="store_true", default=None)
    p.add_argument("--tokenizer", help="'byte' (default), 'bpe', or a path to a tokenizer.json")
    p.add_argument("--vocab-size", dest="vocab_size", type=POSITIVE, help="BPE vocabulary size")
    p.add_argument("--eval-every", dest="eval_every", type=POSITIVE)
    p.add_argument("--eval-tokens", dest="eval_tokens", type=POSITIVE)
    p.add_argument("--log-every", dest="log_every", type=POSITIVE)
    p.add_argument("--save-every", dest="save_every", type=POSITIVE)
    p.add_argument("--keep-last", dest="keep_last", type=POSITIVE)
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override a model field of the preset, e.g. --set n_layers=6 --set moe.top_k=4 (repeatable)")
    p.add_argument("--init-from", dest="init_from", metavar="CKPT",
                   help="start from this checkpoint's weights (e.g. moekit upcycle's output): fresh optimizer and "
                        "schedule; the model built from --preset/--set must have the same tensor shapes")
    p.add_argument("--skip-nonfinite", dest="skip_nonfinite", action="store_true", default=None,
                   help="skip (and count) a step whose loss or gradient is NaN/inf instead of stopping")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="validation loss of a checkpoint (JSON: loss, ppl, tokens)")
    p.add_argument("--model", required=True, help="a checkpoint or run directory")
    p.add_argument("--data", help="default: the data the model was trained on")
    p.add_argument("--seq-len", dest="seq_len", type=POSITIVE, help="default: the run's training sequence length")
    p.add_argument("--batch-size", dest="batch_size", type=POSITIVE,
                   help="default: the run's batch size (with a capacity factor the loss depends on it)")
    p.add_argument("--max-tokens", dest="max_tokens", type=POSITIVE,
                   help="validation tokens (default: the run's --eval-tokens, so the figure equals its val_loss)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("generate", help="continue a prompt with a trained model (streams text)")
    p.add_argument("--model", required=True, help="a checkpoint or run directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=POSITIVE, default=128)
    p.add_argument("--temperature", type=number(0), default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", dest="top_k", type=POSITIVE)
    p.add_argument("--top-p", dest="top_p", type=number(0, 1, above=True))
    p.add_argument("--seed", type=NON_NEGATIVE)
    p.add_argument("--json", action="store_true", help="print the token ids and the text as JSON")
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile with a static KV cache: 2-2.9x tokens/s in fp32 on a "
                        "2-core CPU after a one-off compile of several seconds (pays for long generations)")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("convert", help="Hugging Face directory <-> moekit checkpoint")
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", dest="from_hf", metavar="DIR", help="a Hugging Face model directory")
    way.add_argument("--to-hf", dest="to_hf", metavar="DIR", help="a moekit checkpoint or run directory")
    p.add_argument("--out", required=True, help="a new or empty directory")
    p.add_argument("--architecture", help="with --to-hf: force one (default: the first that fits)")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("presets", help="list the presets")
    p.set_defaults(fn=cmd_presets)

    from moekit.insight.cli import add_parsers as add_insight_parsers

    add_insight_parsers(sub)  # inspect, plot, upcycle, prune
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:  # no verb: the main job on its defaults
        args = parser.parse_args([*(["--debug"] if args.debug else []), "demo"])
    try:
        return args.fn(args)
    except (ValueError, OSError, FloatingPointError) as err:
        if args.debug:
            raise
        print(f"moekit: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - a bug: say so in one line, the traceback under --debug
        if args.debug:
            raise
        print(f"moekit: unexpected error (a bug; rerun with --debug and report it): {type(err).__name__}: {err}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("moekit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
