"""MoE layer vs a dense SwiGLU FFN of equal active FLOPs (and, with --hf, transformers' Mixtral
block): forward and forward+backward time, peak step memory; one JSON document on stdout.

    python benchmarks/layer.py             # defaults: 4096 tokens, 5 repeats, two shapes, fp32
    python benchmarks/layer.py --quick     # 1024 tokens, 3 repeats
    moekit bench layer [options]           # the same, through the CLI

The logic lives in :mod:`moekit.bench`; ``--help`` lists the options.
"""

import sys
from pathlib import Path

# Benchmark this checkout's moekit even where another copy is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moekit.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
