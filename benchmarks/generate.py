"""Thin wrapper: ``python benchmarks/generate.py [options]`` = ``moekit bench generate [options]``
(the logic lives in :mod:`moekit.bench_generate`)."""

import sys
from pathlib import Path

# Benchmark this checkout's moekit even where another copy is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moekit.bench_generate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
