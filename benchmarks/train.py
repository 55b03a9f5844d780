"""A full training step, moekit vs transformers' MixtralForCausalLM on the same weights (and, with
--scaling, the MoE layer's scaling in tokens and experts); one JSON document.

    python benchmarks/train.py [--quick] [--scaling]
    moekit bench train [options]           # the same, through the CLI

The logic lives in :mod:`moekit.bench_train`.
"""

import sys
from pathlib import Path

# Benchmark this checkout's moekit even where another copy is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moekit.bench_train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
