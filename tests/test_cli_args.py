"""Every numeric option of every ``moekit`` verb is checked by argparse, which names the flag typed.

The class of bug: ``eval --batch-size 0`` ("range() arg 3 must not be zero"), ``--weight-decay nan``
accepted then blamed on a parameter, ``prune --experts 0`` naming a flag that does not exist."""

import argparse
import contextlib
import io
import re
from pathlib import Path

import pytest

import moekit
from moekit import argtypes
from moekit.cli import build_parser, main


def _verbs() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    from moekit import bench

    return {**sub.choices, "bench layer": bench.build_parser()}


def _checked_options():
    for verb, parser in _verbs().items():
        for action in parser._actions:
            if hasattr(action.type, "bad_example") and action.option_strings:
                yield verb, action.option_strings[0], action.type


CHECKED = list(_checked_options())


def test_no_numeric_option_is_unchecked():
    """No ``type=int`` / ``type=float`` in any parser of the package (benchmarks included)."""
    root = Path(moekit.__file__).parent
    raw = [f"{p.relative_to(root)}: {m.group(0)[:60]!r}" for p in root.rglob("*.py")
           for m in re.finditer(r"add_argument\([^)]*\btype=(int|float)\b", p.read_text())]
    assert not raw, f"use moekit.argtypes for numeric options: {raw}"
    assert len(CHECKED) > 40  # the walk below reaches the options


def _run(verb: str, *argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        if verb == "bench layer":
            from moekit import bench

            bench.build_parser().parse_args(list(argv))
        else:
            main([verb, *argv])
    return exit_.value.code, err.getvalue()


@pytest.mark.parametrize("verb,flag,kind", CHECKED, ids=[f"{v}{f}" for v, f, _ in CHECKED])
def test_a_bad_value_is_refused_naming_the_flag(verb, flag, kind):
    for bad in (kind.bad_example, "x", "1.5" if "int_at_least" in kind.__name__ else "inf"):
        code, err = _run(verb, flag, bad)  # refused while parsing: required options never matter
        assert code == 2 and f"argument {flag}: expected " in err and repr(bad) in err, err


@pytest.mark.parametrize("text,ok", [("0", True), ("-1", False), ("+3", True), (" 7 ", True), ("1e3", False),
                                     ("2.0", False), ("", False)])
def test_int_at_least(text, ok):
    check = argtypes.int_at_least(0)
    if ok:
        assert check(text) == int(text)
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="expected an integer >= 0"):
            check(text)


def test_number_bounds():
    unit = argtypes.number(0, 1, above=True)
    assert unit("1") == 1.0 and unit("0.5") == 0.5
    for bad in ("0", "1.01", "nan", "-inf", "abc"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"expected a finite number > 0 and <= 1"):
            unit(bad)
    assert argtypes.number(0)("0") == 0.0


@pytest.mark.parametrize("field,value,named", [
    ("weight_decay", float("nan"), "--weight-decay=nan is invalid: expected a finite number >= 0"),
    ("grad_clip", float("inf"), "--grad-clip=inf is invalid"), ("seed", -1, "--seed=-1 is invalid"),
    ("lr", float("nan"), "--lr=nan")])
def test_train_config_names_the_flag(field, value, named):
    """The Python API refuses what the command line refuses, naming the same flag."""
    from moekit.train import TrainConfig

    with pytest.raises(ValueError, match=re.escape(named)):
        TrainConfig(preset="tiny", steps=10, **{field: value})


def test_default_warmup_fits_the_run():
    from moekit.train import TrainConfig

    assert [TrainConfig(preset="tiny", steps=s).warmup for s in (1, 10, 200, 600, 5000)] == [0, 1, 20, 50, 50]
    assert TrainConfig(preset="tiny", steps=10, warmup=10).warmup == 10


def test_a_warmup_past_the_steps_is_refused_for_a_new_run(tmp_path):
    from moekit.train import TrainConfig, train

    with pytest.raises(ValueError, match=re.escape("--warmup=11 is invalid: expected at most --steps=10")):
        train(TrainConfig(preset="tiny", steps=10, warmup=11, out=str(tmp_path / "run")), progress=False)
    assert not (tmp_path / "run").exists()
