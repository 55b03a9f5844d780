"""Distributed training: expert parallelism over torch.distributed (see :mod:`moekit.dist.ep`)."""

from moekit.dist.parallel import SINGLE, ParallelDims, init_distributed, shutdown

__all__ = ["SINGLE", "ParallelDims", "init_distributed", "shutdown"]
