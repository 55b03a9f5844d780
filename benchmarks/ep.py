"""Thin wrapper: ``python benchmarks/ep.py [options]`` = ``moekit bench ep [options]``
(the logic lives in :mod:`moekit.bench_ep`)."""

import sys
from pathlib import Path

# Benchmark this checkout's moekit even where another copy is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moekit.bench_ep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
