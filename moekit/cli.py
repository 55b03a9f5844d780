"""``moekit <verb>``: a thin command line; every verb calls a library function.

    moekit demo [--quick]             the main job (for now: the MoE layer against a dense FFN)
    moekit bench layer [options]      the layer benchmark, JSON on stdout
    moekit params PRESET [--json]     total and active parameters of a preset (meta device)
    moekit presets                    the known presets with their parameter counts
"""

from __future__ import annotations

import argparse
import json
import sys


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


def cmd_bench(args: argparse.Namespace) -> int:
    from moekit import bench

    return bench.main(args.rest) or 0


def cmd_demo(args: argparse.Namespace) -> int:
    from moekit import bench

    return bench.main(["--quick"] if args.quick else []) or 0


def build_parser() -> argparse.ArgumentParser:
    from moekit import __version__

    parser = argparse.ArgumentParser(prog="moekit", description="Sparse Mixture-of-Experts toolkit")
    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    p = sub.add_parser("demo", help="the main job: the MoE layer against a dense FFN of equal active FLOPs")
    p.add_argument("--quick", action="store_true", help="fewer tokens and repeats (a few seconds)")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("bench", help="benchmarks printing JSON")
    p.add_argument("suite", choices=["layer"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the suite (see --help after it)")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("params", help="total and active parameters of a preset")
    p.add_argument("preset")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_params)

    p = sub.add_parser("presets", help="list the presets")
    p.set_defaults(fn=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:  # no verb: the main job on its defaults
        args.fn, args.quick = cmd_demo, False
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as err:
        if args.debug:
            raise
        print(f"moekit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
