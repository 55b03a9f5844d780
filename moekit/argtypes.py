"""Checked argument types, the help layout and the progress switch of every ``moekit`` command line.

An argparse ``type=`` that refuses a bad value makes argparse itself name the flag the user typed
(``argument --batch-size: expected an integer >= 1, got '0'``, exit 2) before any work starts. Each
checker carries ``bad_example``, a value it refuses, so a test can try every numeric option of every
verb (tests/test_cli_args.py). :class:`HelpFormatter` shows each option's default after its help and
keeps the examples of an epilog as written; every option has a help text (tests/test_cli_ux.py).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from typing import Callable


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An integer >= ``minimum`` (digits only: ``1.5`` and ``1e3`` are refused, not truncated)."""

    def parse(text: str) -> int:
        if not re.fullmatch(r"\s*[+-]?\d+\s*", text) or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return int(text)

    parse.bad_example = str(minimum - 1)
    parse.__name__ = f"int_at_least_{minimum}"
    return parse


def number(minimum: float | None = None, maximum: float | None = None, *, above: bool = False) -> Callable[[str], float]:
    """A finite float in [minimum, maximum] ((minimum, maximum] with ``above``); NaN and inf refused."""
    low = "" if minimum is None else f"{'>' if above else '>='} {minimum:g}"
    high = "" if maximum is None else f"<= {maximum:g}"
    what = "a finite number" + (" " + " and ".join(filter(None, (low, high))) if low or high else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and (minimum is None or (value > minimum if above else value >= minimum)) \
            and (maximum is None or value <= maximum)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.bad_example = "nan"
    parse.__name__ = "number"
    return parse


POSITIVE = int_at_least(1)
NON_NEGATIVE = int_at_least(0)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after an option's help unless the help already states its default in words (an
    option whose default depends on the run, the model or the machine says so in its help); off-by-default
    flags and options without a default (None) show none. Descriptions and epilogs keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        off = action.default is None or action.default is False or action.default is argparse.SUPPRESS  # (0 shows)
        if "default" in text or off or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def add_verb(sub, name: str, help: str, examples: list[str], description: str | None = None) -> argparse.ArgumentParser:
    """A ``moekit`` sub-command whose help shows each option's default and ends with ``examples``."""
    return sub.add_parser(name, help=help, description=description or help[:1].upper() + help[1:] + ".",
                          epilog="examples:\n" + "\n".join(f"  {e}" for e in examples), formatter_class=HelpFormatter)


def progress_enabled(no_progress: bool) -> bool:
    """Progress bars on stderr: on unless ``--no-progress`` or stderr is not a terminal (a log file or a
    pipe gets only the results)."""
    return not no_progress and sys.stderr.isatty()
