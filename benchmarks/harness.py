"""What the benchmark scripts here share: the machine's description, interleaved timing with warm-up
and medians, fresh interpreters, the peak-memory probe, JSON on stdout.

Each script runs from a checkout with moekit importable (``pip install -e .``, or ``PYTHONPATH=.``)::

    python benchmarks/NAME.py [--help]

Python puts this directory first on ``sys.path`` when it runs a script here, so the scripts
``import harness`` (and each other) by name. The package never imports anything from here. What
``moekit bench layer`` needs as well (the machine's description, the memory probe, fresh
interpreters on the same moekit) lives in :mod:`moekit.bench` and is reused, not copied.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from moekit import bench
from moekit.bench import PeakMemory, interpreter_env, peak_memory  # noqa: F401 - the scripts' one import

HERE = Path(__file__).resolve().parent
T = TypeVar("T")


def transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def environment(transformers: bool = False) -> dict:
    """The machine and software a report's figures come from (:func:`moekit.bench.environment`: CPU
    model, cores, threads, torch, moekit, GEMM backend), plus transformers' version when compared."""
    env = bench.environment()
    if transformers:
        env["transformers"] = transformers_version()
    return env


def timed(fn: Callable[..., T], *args) -> tuple[float, T]:
    """Seconds of ``fn(*args)`` (time.perf_counter) and its result."""
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def interleaved(fns: Mapping[str, Callable[[int], T]], warmup: int, repeats: int) -> dict[str, list[T]]:
    """Rounds 0 .. warmup + repeats - 1; round i calls every ``fn(i)`` in turn, so a drift of a shared
    machine's speed (frequency, other load) hits every side alike. Returns each name's results of
    the rounds after the warm-up."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup={warmup} must be >= 0 and repeats={repeats} >= 1")
    results: dict[str, list[T]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            out = fn(i)
            if i >= warmup:
                results[name].append(out)
    return results


def medians(samples: Mapping[str, Sequence[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in samples.items()}


def script_argv(name: str, *args: str) -> list[str]:
    """The interpreter's arguments that run ``benchmarks/NAME`` with ``args``."""
    path = HERE / name
    if not path.is_file():
        raise FileNotFoundError(f"no benchmark script {path}")
    return [str(path), *args]


def run_script(name: str, args: Sequence[str], what: str, env: dict[str, str] | None = None) -> dict:
    """``python benchmarks/NAME ARGS`` in a fresh interpreter on this same moekit: its JSON output
    (RuntimeError naming ``what`` with its stderr when it fails)."""
    return bench.fresh_interpreter_json(script_argv(name, *args), what, env)


def print_json(report: dict) -> int:
    """Prints the report as the script's one JSON document; 0, the exit status."""
    print(json.dumps(report, indent=2))
    return 0
