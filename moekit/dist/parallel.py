"""Process groups for expert parallelism (EP) combined with data parallelism (DP).

World W processes, EP degree P (P divides W and the number of experts). Ranks form W/P expert-parallel
groups of P consecutive ranks, {0..P-1}, {P..2P-1}, ...; inside one, rank i holds experts
[i·E/P, (i+1)·E/P) of every MoE layer. Ranks at the same position of different EP groups hold the
same experts: they form a replica group, across which expert gradients are summed. Everything that
is not an expert is replicated on all W ranks and averaged over all of them (DDP).

The job starts under ``torchrun`` (which sets RANK, WORLD_SIZE, MASTER_ADDR, ...); gloo on CPU, NCCL
on CUDA. Collectives time out (``MOEKIT_DIST_TIMEOUT``, 60 s by default) so that a peer that died
without torchrun noticing cannot hang the others forever.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelDims:
    """This process's place in the job; ``world == 1`` is the plain single-process case."""

    world: int
    rank: int
    ep: int
    ep_group: object | None = None  # ProcessGroup of this rank's EP group
    replica_group: object | None = None  # ProcessGroup of the ranks holding the same experts

    def __post_init__(self):
        if not (isinstance(self.ep, int) and self.ep >= 1):
            raise ValueError(f"--ep {self.ep!r}: expected an int >= 1")
        if self.world % self.ep:
            raise ValueError(f"--ep {self.ep}: the EP degree must divide the world size {self.world}")

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def replicas(self) -> int:
        return self.world // self.ep

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check_experts(self, num_experts: int) -> None:
        if num_experts % self.ep:
            raise ValueError(f"--ep {self.ep}: the EP degree must divide the number of experts ({num_experts})")


SINGLE = ParallelDims(world=1, rank=0, ep=1)


def init_distributed(ep: int = 1, backend: str | None = None) -> ParallelDims:
    """Joins the job torchrun started (or returns the single-process dims when there is none) and
    builds the EP and replica groups. Idempotent for the default process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not dist.is_initialized():
        if ep != 1:
            raise ValueError(f"--ep {ep}: a single process can only run --ep 1; launch with "
                             f"torchrun --nproc_per_node {ep} -m moekit train --ep {ep} ...")
        return ParallelDims(world=1, rank=0, ep=ep)
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        timeout = datetime.timedelta(seconds=float(os.environ.get("MOEKIT_DIST_TIMEOUT", "60")))
        dist.init_process_group(backend=backend, timeout=timeout)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    world, rank = dist.get_world_size(), dist.get_rank()
    dims = ParallelDims(world=world, rank=rank, ep=ep)
    # every rank creates every group, in the same order (a torch.distributed requirement)
    for start in range(0, world, ep):
        g = dist.new_group(list(range(start, start + ep)))
        if start <= rank < start + ep:
            dims.ep_group = g
    for pos in range(ep):
        g = dist.new_group(list(range(pos, world, ep)))
        if rank % ep == pos:
            dims.replica_group = g
    return dims


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
