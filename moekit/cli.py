"""``moekit <verb>``: a thin command line; every verb calls a library function.

    moekit                            the verbs (moekit VERB --help: a verb's options, defaults and examples)
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
import textwrap
import time
from pathlib import Path

from moekit.argtypes import NON_NEGATIVE, POSITIVE, HelpFormatter, add_verb, number, progress_enabled


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
    if args.benchmark is None:  # `moekit bench`: what there is to run
        args.print_help()
        return 0
    from moekit import bench

    return bench.main(args.rest)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes}m{sec:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def demo_summary(summary: dict) -> str:
    """``moekit demo``'s closing lines: a table of both runs, the verdict, the routing, how the time was
    measured, where the files are."""
    out, dense = Path(summary["out"]), summary["dense"]
    quick = summary.get("quick")
    lines = ["moekit demo: an MoE against a dense model with the same active parameters, tokens and schedule",
             f"  seed {summary.get('seed', 0)}{'; --quick: short runs, noisier figures' if quick else ''}",
             "",
             f"  {'':6s}{'parameters':>11s}{'active':>9s}{'peak lr':>9s}{'final val loss':>16s}{'steps':>7s}"
             f"{'training time':>15s}{'s/step':>8s}"]
    for name in ("dense", "moe"):
        r = summary[name]
        lr = summary.get("lr", {}).get(name)
        lines.append(f"  {name:6s}{_fmt(r['total_params']):>11s}{_fmt(r['active_params']):>9s}"
                     f"{f'{lr:g}' if lr else '':>9s}{r['final_val_loss']:>16.4f}{r['steps']:>7d}"
                     f"{_duration(r['seconds']):>15s}{r['seconds'] / r['steps']:>8.3f}")
    lines.append("")
    hit = summary.get("moe_at_dense_final_loss")
    if hit:
        lines.append(f"  The MoE reached the dense model's final validation loss ({dense['final_val_loss']:.4f}) at "
                     f"step {hit['steps']:.0f}, after {_duration(hit['seconds'])}:")
        lines.append(f"  {hit['steps_ratio']:.2f}x the steps, {hit['flops_ratio']:.2f}x the FLOPs and "
                     f"{hit['seconds_ratio']:.2f}x the wall-clock of the dense model.")
    else:
        lines.append(f"  The MoE did not reach the dense model's final validation loss ({dense['final_val_loss']:.4f}) "
                     f"in {summary['moe']['steps']} steps.")
    routing = summary.get("moe_routing")
    if routing:
        loads = ", ".join(f"{v:.2f}" for v in routing["median_max_load_after_settle"].values() if v is not None)
        collapsed = routing["collapse_after_settle"]
        state = (f"collapse flags after step {routing['settle_step']} at {len(collapsed)} logged steps "
                 f"(first: step {collapsed[0]['step']}, layers {collapsed[0]['layers']})" if collapsed
                 else f"no collapse flag after step {routing['settle_step']}")
        lines += textwrap.wrap(f"Routing: busiest expert / mean load per layer (median after step "
                               f"{routing['settle_step']}): {loads}; {state}.", 100, initial_indent="  ",
                               subsequent_indent="    ")
    timing = summary.get("timing")
    if timing:
        shares = [v for v in timing["other_processes_cpu_share"].values() if v is not None]
        busy = (f"other processes took up to {max(shares):.0%} of the CPU during the runs"
                if shares else "other processes' CPU use is unknown on this system")
        lines += textwrap.wrap(f"Time: {timing['measured']}; {timing['threads']} threads on "
                               f"{timing['cpu'] or 'this CPU'}; one-off costs ({timing['one_off_seconds_before_clocks']:.0f}"
                               f" s: native code, corpus, backend probe) paid before either clock started; {busy}.",
                               100, initial_indent="  ", subsequent_indent="    ")
        if timing.get("busy"):
            lines.append("  WARNING: the machine was busy with other work: the time ratio is not this machine's.")
    lines += ["",
              f"  figures   {summary.get('json', out / 'summary.json')}, {summary['plot']} (validation loss against "
              f"FLOPs and time; load per layer)",
              f"  runs      {out / 'dense'}, {out / 'moe'} (checkpoints, metrics.jsonl)",
              f"next: moekit inspect --model {out / 'moe'}   (what the experts learned)"]
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    from moekit.train.demo import run_demo

    summary = run_demo(args.out, quick=args.quick, overwrite=args.overwrite, progress=not args.no_progress,
                       seed=args.seed, resume=args.resume)
    if "interrupted" in summary:
        print(f"moekit demo: interrupted during the {summary['run']} run; continue with: moekit demo --out "
              f"{summary['out']}{' --quick' if args.quick else ''}"
              f"{f' --seed {args.seed}' if args.seed else ''} --resume", file=sys.stderr)
        return summary["interrupted"]
    print(json.dumps(summary, indent=2) if args.json else demo_summary(summary))
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


def train_summary(result, cfg, seconds: float) -> str:
    """``moekit train``'s closing lines: what ran, the losses, where the files are, what to run next."""
    from moekit import checkpoint as ckpt_io
    from moekit.config import ModelConfig
    from moekit.model import count_parameters

    run = Path(result.run_dir)
    mcfg = ModelConfig.from_dict(json.loads((run / "model_config.json").read_text()))
    count = count_parameters(mcfg)
    lines = [f"moekit train: {run}, preset {cfg.preset}{' (miniature)' if cfg.miniature else ''}: "
             f"{_fmt(count.total)} parameters, {_fmt(count.active)} active"]
    if result.interrupted:
        lines.append(f"  stopped at step {result.step} of {cfg.steps} (interrupted); continue with: moekit train "
                     f"--out {run} --resume")
    speed = f" ({result.tokens / result.elapsed_s:,.0f} tokens/s)" if result.elapsed_s else ""
    lines.append(f"  {result.step} steps, {_fmt(result.tokens)} tokens in {_duration(result.elapsed_s)} of training"
                 f"{speed}; this command took {_duration(seconds)}")
    losses = [f"loss {result.final_loss:.4f} at the last step" if result.final_loss is not None else
              "no step run (the run had already finished)"]
    if result.val_loss is not None:
        losses.append(f"validation loss {result.val_loss:.4f} at step {result.val_step}")
    if result.skipped_nonfinite:
        losses.append(f"{result.skipped_nonfinite} non-finite steps skipped")
    lines.append("  " + "; ".join(losses))
    latest = ckpt_io.latest_checkpoint(run)
    lines += [f"  checkpoint {latest if latest is not None else '(none)'}",
              f"  metrics    {run / 'metrics.jsonl'}   (curves: moekit plot {run})",
              f"  summary    {run / 'summary.json'}"]
    nxt = [f'moekit generate --model {run} --prompt "..."']
    if mcfg.moe is not None:
        nxt.append(f"moekit inspect --model {run}")
    lines.append("next: " + "   ".join(nxt))
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    from moekit.dist import shutdown
    from moekit.train import train

    t0 = time.perf_counter()
    try:
        cfg = _train_config(args)
        result = train(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    finally:
        shutdown()
    if int(os.environ.get("RANK", "0")) != 0:
        return result.exit_code
    summary = {"run_dir": str(result.run_dir), "step": result.step, "loss": result.final_loss,
               "val_loss": result.val_loss, "val_step": result.val_step, "interrupted": result.interrupted,
               "tokens": result.tokens, "train_seconds": result.elapsed_s,
               "skipped_nonfinite": result.skipped_nonfinite}
    (Path(result.run_dir) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary) if args.json else train_summary(result, cfg, time.perf_counter() - t0))
    return result.exit_code  # 130 after Ctrl-C: `moekit train && moekit eval` stops there


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from moekit.checkpoint import load_model
    from moekit.insight.routing import token_progress
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
    with token_progress(model, "validation", max_tokens, progress_enabled(args.no_progress)):
        result = evaluate(model, tokens.val, batch_size, seq_len, max_tokens, autocast_dtype)
    print(json.dumps({**result, "batch_size": batch_size, "seq_len": seq_len}))
    return 0


class _TextStream:
    """``generate``'s ``on_token`` for one prompt: with ``echo`` each token's text to stdout as it comes (a
    character split over several byte tokens once whole), the stop token left out; times the first token
    and the whole generation."""

    def __init__(self, tokenizer, stop: list[int], echo: bool):
        self.tokenizer, self.stop, self.echo = tokenizer, stop, echo
        self.ids: list[int] = []
        self.shown = ""
        self.t0 = time.perf_counter()
        self.first_s: float | None = None  # seconds to the first token: the prefill (and a compile)
        self.seconds = 0.0

    def __call__(self, step_tokens: list[int]) -> None:
        if step_tokens[0] < 0:  # the row has finished
            return
        if self.first_s is None:
            self.first_s = time.perf_counter() - self.t0
        if step_tokens[0] in self.stop:  # the stop token is not text
            return
        self.ids.append(step_tokens[0])
        if not self.echo:
            return
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd") and text.startswith(self.shown):
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text

    def finish(self) -> str:
        """The whole continuation (what is left of it written out, then a newline)."""
        self.seconds = time.perf_counter() - self.t0
        text = self.tokenizer.decode(self.ids)
        if self.echo:
            sys.stdout.write(text[len(self.shown):] + "\n")
            sys.stdout.flush()
        return text


def _dim(text: str) -> str:
    """``text`` dimmed when stdout is a terminal that takes colours (https://no-color.org: NO_COLOR unsets them)."""
    if sys.stdout.isatty() and not os.environ.get("NO_COLOR"):
        return f"\033[2m{text}\033[0m"
    return text


def whitespace_note(text: str) -> str | None:
    """A line saying what an invisible continuation is (none for text with something to see)."""
    if text.strip():
        return None
    if not text:
        return "the model generated no text (it ended its text at once)"
    names = {" ": "space", "\n": "newline", "\t": "tab", "\r": "carriage return"}
    counts: dict[str, int] = {}
    for ch in text:
        name = names.get(ch, f"{ch!r}")
        counts[name] = counts.get(name, 0) + 1
    parts = ", ".join(f"{n} {name}{'s' if n > 1 and name in names.values() else ''}" for name, n in counts.items())
    shown = repr(text) if len(text) <= 40 else repr(text[:40])[:-1] + "...'"
    return f"the continuation is whitespace only: {len(text)} characters ({parts}): {shown}"


def cmd_generate(args: argparse.Namespace) -> int:
    import random

    from moekit.generate import generate

    from moekit.interop import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(Path(args.model), "generate")
    prompt = tokenizer.encode(args.prompt)
    stop = [tokenizer.eot_id] if getattr(tokenizer, "eot_id", None) is not None else []
    greedy = args.temperature == 0
    # a drawn seed, reported: any sampled output can be had again with --seed
    seed = None if greedy else args.seed if args.seed is not None else random.randrange(2**31)
    top_k = args.top_k or None
    if not args.json:
        sys.stdout.write(_dim(args.prompt))
        sys.stdout.flush()
    stream = _TextStream(tokenizer, stop, echo=not args.json)
    try:
        res = generate(model, [prompt], args.max_new_tokens, temperature=args.temperature, top_k=top_k,
                       top_p=args.top_p, seed=seed, stop_tokens=stop, on_token=stream, compile=args.compile)
    except BaseException:
        if not args.json:  # the error (or Ctrl-C) is said on a line of its own
            sys.stdout.write("\n")
        raise
    text = stream.finish()
    settings = "greedy (--temperature 0)" if greedy else (
        f"sampled: temperature {args.temperature:g}, top-k {top_k or 'off'}, top-p {args.top_p or 'off'}, "
        f"seed {seed} (--seed {seed} repeats it)")
    if args.json:
        print(json.dumps({"prompt_ids": prompt, "ids": res.tokens[0], "text": text, "stopped": res.finished[0],
                          "sampling": {"temperature": args.temperature, "top_k": top_k, "top_p": args.top_p,
                                       "seed": seed}}))
    else:
        note = whitespace_note(text)
        if note:
            print(f"moekit: {note}", file=sys.stderr)
    n = len(res.tokens[0])
    first = f", the first after {stream.first_s:.2f} s" if stream.first_s else ""
    end = "the model ended its text" if res.finished[0] else f"--max-new-tokens {args.max_new_tokens} reached"
    print(f"moekit: {n} tokens in {stream.seconds:.2f} s ({n / stream.seconds:.1f} tokens/s{first}); {end}; {settings}",
          file=sys.stderr)
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
        model = from_pretrained(src, progress=progress_enabled(args.no_progress))
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


def _add_train_parser(sub) -> None:
    import dataclasses

    from moekit.train import TrainConfig

    default = {f.name: f.default for f in dataclasses.fields(TrainConfig)}

    def d(field: str) -> str:  # TrainConfig's default: the flags default to None so --resume sees what was given
        return f"(default: {default[field]})"

    p = add_verb(sub, "train", "train a model (default: the small preset on the embedded corpus)", [
        "moekit train --preset small --steps 600 --out runs/small",
        "moekit train --preset small --miniature --steps 100 --out runs/mini   # a CPU-sized sibling, for a try",
        "moekit train --data my_texts/ --tokenizer bpe --out runs/mine",
        "moekit train --out runs/small --resume --steps 1000                  # continue, with a longer schedule",
    ], description="Train a model: AdamW, linear warmup then cosine decay, periodic validation and checkpoints. "
                   "Ends with a short summary\n(--json: the same as JSON, also written to <out>/summary.json). "
                   "Under torchrun every process runs it (--ep: expert parallelism).")
    g = p.add_argument_group("model")
    g.add_argument("--preset", help=f"model preset (moekit presets lists them) {d('preset')}")
    g.add_argument("--miniature", action="store_true", default=None,
                   help="a CPU-sized sibling of the preset: the same architecture at small widths")
    g.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override a model field of the preset, e.g. --set n_layers=6 --set moe.top_k=4 (repeatable; "
                        "default: the preset as it is)")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="text file, directory of text files, or JSONL with a 'text' field (default: the "
                                  "embedded corpus, the Python standard library's source)")
    g.add_argument("--tokenizer", help=f"'byte', 'bpe' (trained on the data), or a path to a tokenizer.json "
                                       f"{d('tokenizer')}")
    g.add_argument("--vocab-size", dest="vocab_size", type=POSITIVE,
                   help=f"BPE vocabulary size (--tokenizer bpe) {d('vocab_size')}")
    g.add_argument("--seq-len", dest="seq_len", type=POSITIVE, help=f"tokens per training sequence {d('seq_len')}")
    g.add_argument("--batch-size", dest="batch_size", type=POSITIVE,
                   help=f"sequences per micro-batch, over all processes (each takes an equal share) {d('batch_size')}")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=POSITIVE, help=f"optimizer steps {d('steps')}")
    g.add_argument("--lr", type=number(0, above=True),
                   help=f"peak learning rate, reached after --warmup, then cosine decay to {default['min_lr_ratio']}"
                        f"·lr {d('lr')}")
    g.add_argument("--router-lr-mult", dest="router_lr_mult", type=number(0, above=True),
                   help=f"the routers' learning rate is --lr times this (their own param group) {d('router_lr_mult')}")
    g.add_argument("--warmup", type=NON_NEGATIVE, help="linear warmup steps, at most --steps (default: min(50, "
                                                       "steps // 10))")
    g.add_argument("--weight-decay", dest="weight_decay", type=number(0),
                   help=f"AdamW's decoupled weight decay (none on norms, biases and embeddings) {d('weight_decay')}")
    g.add_argument("--grad-clip", dest="grad_clip", type=number(0),
                   help=f"clip the gradient norm to this; 0 = off {d('grad_clip')}")
    g.add_argument("--grad-accum", dest="grad_accum", type=POSITIVE,
                   help=f"micro-batches per optimizer step (tokens a step: batch size x seq len x this) "
                        f"{d('grad_accum')}")
    g.add_argument("--seed", type=NON_NEGATIVE, help=f"seed of the initial weights and the batch order {d('seed')}")
    g.add_argument("--skip-nonfinite", dest="skip_nonfinite", action="store_true", default=None,
                   help="skip (and count) a step whose loss or gradient is NaN/inf instead of stopping")
    g = p.add_argument_group("compute")
    g.add_argument("--device", help=f"cpu, cuda or cuda:N {d('device')}")
    g.add_argument("--dtype", choices=["fp32", "bf16"], help=f"fp32, or bf16 autocast {d('dtype')}")
    g.add_argument("--compile", action="store_true", default=None,
                   help="run the model through torch.compile (a one-off compile before the first step)")
    g.add_argument("--ep", type=POSITIVE, help=f"expert-parallel degree under torchrun (divides the process count "
                                               f"and the expert count) {d('ep')}")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--out", default=default["out"],
                   help="run directory: checkpoints, metrics.jsonl, summary.json (never overwritten without "
                        "--overwrite)")
    g.add_argument("--save-every", dest="save_every", type=POSITIVE,
                   help=f"a checkpoint every N steps and at the end {d('save_every')}")
    g.add_argument("--keep-last", dest="keep_last", type=POSITIVE,
                   help=f"checkpoints kept on disk, the newest {d('keep_last')}")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    g.add_argument("--init-from", dest="init_from", metavar="CKPT",
                   help="start from this checkpoint's weights (e.g. moekit upcycle's output): fresh optimizer and "
                        "schedule; the model built from --preset/--set must have the same tensor shapes (default: "
                        "random initial weights)")
    g = p.add_argument_group("output")
    g.add_argument("--eval-every", dest="eval_every", type=POSITIVE,
                   help=f"validation loss every N steps and at the end {d('eval_every')}")
    g.add_argument("--eval-tokens", dest="eval_tokens", type=POSITIVE,
                   help=f"validation tokens per evaluation {d('eval_tokens')}")
    g.add_argument("--log-every", dest="log_every", type=POSITIVE,
                   help=f"a metrics.jsonl record every N steps {d('log_every')}")
    g.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    g.add_argument("--json", action="store_true", help="print the result as one line of JSON instead of the summary")
    p.set_defaults(fn=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    from moekit import __version__

    parser = argparse.ArgumentParser(
        prog="moekit", formatter_class=HelpFormatter,
        description="Sparse Mixture-of-Experts toolkit: train, compare, inspect, convert and prune MoE models.\n"
                    "Start with `moekit demo --quick`: an MoE against a dense model of equal active parameters.",
        epilog="Each verb has its own help with examples: moekit VERB --help.")
    parser.add_argument("--version", action="version", version=f"moekit {__version__}",
                        help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    p = add_verb(sub, "demo", "the main job: train an MoE and a dense model with equal active parameters", [
        "moekit demo --quick            # a few minutes",
        "moekit demo --out runs/demo    # the full comparison, about fifteen minutes on 2 CPU cores",
        "moekit demo --out runs/demo-s1 --seed 1    # the same comparison from other weights and batches",
        "moekit demo --out runs/demo --resume       # finish a demo stopped by Ctrl-C",
    ], description="Train an MoE and a dense model with the same active parameters, tokens and schedule, and say "
                   "how much sooner\nthe MoE reached the dense model's final validation loss. Writes summary.json, "
                   "loss.png and both runs.")
    p.add_argument("--quick", action="store_true", help="a few minutes instead of about fifteen")
    p.add_argument("--out", help="output directory (default: runs/demo-<time>)")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of both models' initial weights and batches (default: 0)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted demo in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print summary.json instead of the summary")
    p.set_defaults(fn=cmd_demo)

    p = add_verb(sub, "bench", "time the MoE layer against a dense FFN on this machine (JSON)", [
        "moekit bench layer --quick",
        "moekit bench layer --shapes '512,1408,8,2' --dtype bf16",
    ], description="Benchmarks. In the package:\n"
                   "  layer   the MoE layer against a dense SwiGLU FFN of equal active FLOPs on this machine, as JSON\n"
                   "          (moekit bench layer --help)\n"
                   "In a checkout of the moekit repository, as scripts: python benchmarks/NAME.py with NAME one of\n"
                   "  train, generate, ep, suite   (training step, generation, expert parallelism, all of them)")
    p.add_argument("benchmark", metavar="layer", nargs="?", type=_benchmark_name,
                   help="the benchmark (one: layer); without it, this help")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="its options (moekit bench layer --help)")
    p.set_defaults(fn=cmd_bench, print_help=p.print_help)

    p = add_verb(sub, "params", "total and active parameters of a preset", [
        "moekit params deepseek-v3", "moekit params mixtral-8x7b --json"])
    p.add_argument("preset", help="a preset name (moekit presets lists them)")
    p.add_argument("--json", action="store_true", help="print the counts and the published figures as JSON")
    p.set_defaults(fn=cmd_params)

    _add_train_parser(sub)

    p = add_verb(sub, "eval", "validation loss of a checkpoint (JSON: loss, ppl, tokens)", [
        "moekit eval --model runs/small",
        "moekit eval --model runs/small --data other.txt --max-tokens 131072"])
    p.add_argument("--model", required=True, help="a checkpoint or run directory")
    p.add_argument("--data", help="text to evaluate (its validation split); default: the data the model was trained on")
    p.add_argument("--seq-len", dest="seq_len", type=POSITIVE, help="default: the run's training sequence length")
    p.add_argument("--batch-size", dest="batch_size", type=POSITIVE,
                   help="default: the run's batch size (with a capacity factor the loss depends on it)")
    p.add_argument("--max-tokens", dest="max_tokens", type=POSITIVE,
                   help="validation tokens (default: the run's --eval-tokens, so the figure equals its val_loss)")
    p.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_eval)

    p = add_verb(sub, "generate", "continue a prompt with a trained model (streams text)", [
        'moekit generate --model runs/demo/moe --prompt "def fib(n):" --max-new-tokens 80',
        'moekit generate --model runs/small --prompt "import os" --temperature 0    # greedy',
        'moekit generate --model runs/small --prompt "class " --seed 1 --json       # token ids and text as JSON',
    ], description="Continue a prompt: the prompt is echoed (dimmed on a terminal), the continuation streams as it "
                   "is produced,\nand the sampling settings and tokens/s follow on stderr.\n\n"
                   "Sampling is the default (temperature 0.8, top-k 50): greedy decoding (--temperature 0) of a "
                   "small model\noften repeats one token, e.g. a run of spaces, and shows nothing readable. Without "
                   "--seed a random seed is\ndrawn and reported, so any output can be repeated.")
    p.add_argument("--model", required=True, help="a checkpoint or run directory, or a Hugging Face model directory")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=POSITIVE, default=128,
                   help="tokens to generate at most (fewer when the model ends its text)")
    p.add_argument("--temperature", type=number(0), default=0.8, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", dest="top_k", type=NON_NEGATIVE, default=50,
                   help="sample among the k most likely tokens; 0 = all")
    p.add_argument("--top-p", dest="top_p", type=number(0, 1, above=True),
                   help="sample among the most likely tokens holding this probability (nucleus); default: off")
    p.add_argument("--seed", type=NON_NEGATIVE, help="sampling seed (default: a random one, reported on stderr)")
    p.add_argument("--json", action="store_true", help="print the token ids and the text as JSON (no streaming)")
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile with a static KV cache: faster decode steps after a one-off "
                        "compile of several seconds, which pays for long generations (figures: docs/performance.md)")
    p.set_defaults(fn=cmd_generate)

    p = add_verb(sub, "convert", "Hugging Face directory <-> moekit checkpoint", [
        "moekit convert --from-hf ~/models/Mixtral-8x7B --out runs/mixtral",
        "moekit convert --to-hf runs/small --out hf/small"])
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", dest="from_hf", metavar="DIR", help="a Hugging Face model directory")
    way.add_argument("--to-hf", dest="to_hf", metavar="DIR", help="a moekit checkpoint or run directory")
    p.add_argument("--out", required=True, help="a new or empty directory")
    p.add_argument("--architecture", help="with --to-hf: force one (default: the first that fits)")
    p.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_convert)

    p = add_verb(sub, "presets", "list the presets with their parameter counts", ["moekit presets"])
    p.set_defaults(fn=cmd_presets)

    from moekit.insight.cli import add_parsers as add_insight_parsers

    add_insight_parsers(sub)  # inspect, plot, upcycle, prune
    from moekit.serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub)
    from moekit.quant.cli import add_parser as add_quantize_parser

    add_quantize_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:  # no verb: what there is to do (the demo is `moekit demo`)
        parser.print_help()
        return 0
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
