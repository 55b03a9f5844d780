"""The whole performance suite (layer matrix, training step, generation, scaling) in one JSON document.

    python benchmarks/suite.py [--quick] [--markdown FILE]
    moekit bench suite [options]           # the same, through the CLI

The logic lives in :mod:`moekit.bench_suite`.
"""

import sys
from pathlib import Path

# Benchmark this checkout's moekit even where another copy is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moekit.bench_suite import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
