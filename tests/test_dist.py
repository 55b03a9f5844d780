"""Expert parallelism on gloo (CPU): 2 and 4 processes against one process on the same global batch."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import write_corpus

pytestmark = pytest.mark.dist

LAYER_CASES = {
    "softmax_topk": dict(),
    "sigmoid_bias": dict(router="sigmoid", n_group=2, topk_group=1, bias_update_rate=0.01),
    "capacity_position": dict(capacity_factor=0.6),
    "capacity_score": dict(capacity_factor=0.6, drop_policy="score"),
    "shared_and_losses": dict(num_shared_experts=1, aux_loss_coef=0.1, z_loss_coef=0.01, mlp_bias=True),
}


def _init(rank, world, store):
    os.environ.pop("WORLD_SIZE", None)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)


def _layer_worker(rank, world, ep, store, case, out):
    from conftest import sharded_pair
    from moekit import MoEConfig
    from moekit.dist import init_distributed
    from moekit.dist.ep import sync_expert_grads

    _init(rank, world, store)
    dims = init_distributed(ep)
    torch.manual_seed(0)
    cfg = MoEConfig(**{"d_model": 16, "expert_hidden": 8, "num_experts": 8, "top_k": 2, "aux_loss_coef": 0.05,
                       **LAYER_CASES[case]})
    ref, layer = sharded_pair(cfg, dims)
    T = 12
    g = torch.Generator().manual_seed(1)
    x_G = torch.randn(world, 2, T // 2, 16, generator=g, dtype=torch.float64)  # [rank, B, S, D]
    dy_G = torch.randn(world, 2, T // 2, 16, generator=g, dtype=torch.float64)

    # one process, the whole batch
    xr = x_G.reshape(world * 2, T // 2, 16).clone().requires_grad_(True)
    res = ref(xr)
    ((res.output * dy_G.reshape_as(xr)).sum() + res.aux_loss).backward()

    # this rank's rows; the loss each rank backpropagates is world x its share (DDP averages)
    x = x_G[rank].clone().requires_grad_(True)
    mine = layer(x)
    (world * (mine.output * dy_G[rank]).sum() + mine.aux_loss).backward()
    for name, p in layer.named_parameters():
        if "experts." not in name or name.startswith("shared"):
            dist.all_reduce(p.grad)
            p.grad /= world
    sync_expert_grads(layer, dims)

    aux = mine.aux_loss.detach().clone()
    dist.all_reduce(aux)  # z-loss: local means, whose average over ranks is the batch's (LB: global already)
    errors = {"output": (mine.output - res.output.view(world, 2, T // 2, 16)[rank]).abs().max().item(),
              "aux_loss": abs(aux.item() / world - res.aux_loss.item()),
              "x.grad": (x.grad / world - xr.grad.view(world, 2, T // 2, 16)[rank]).abs().max().item()}
    ep_ = layer.dispatcher
    for name, p in layer.named_parameters():
        want = dict(ref.named_parameters())[name].grad
        if name.startswith("experts."):
            want = want[ep_.first:ep_.first + ep_.local]
        errors[f"{name}.grad"] = (p.grad - want).abs().max().item()
    errors["dropped"] = int(res.stats.dropped_assignments)
    if cfg.bias_update_rate:
        ref.update_bias()
        layer.update_bias()
        errors["expert_bias"] = (layer.router.expert_bias - ref.router.expert_bias).abs().max().item()
    dist.barrier()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(errors, f)
    dist.destroy_process_group()


def _spawn(fn, world, *args):
    mp.start_processes(fn, args=(world, *args), nprocs=world, start_method="spawn", join=True)


# every case on 2 processes; 4 processes (EP 4, and EP 2 x DP 2) on two of them. Capacity with DP
# replicas is decided per EP group, so it has no single-process twin on the whole batch.
RUNS = [(case, 2, 2) for case in LAYER_CASES] + [("softmax_topk", 4, 4), ("capacity_score", 4, 4),
                                                  ("softmax_topk", 4, 2), ("sigmoid_bias", 4, 2)]


@pytest.mark.parametrize("case, world, ep", RUNS, ids=[f"{c}-w{w}-ep{e}" for c, w, e in RUNS])
def test_ep_layer_equals_one_process(tmp_path, case, world, ep):
    out = tmp_path / "errors.json"
    _spawn(_layer_worker, world, ep, str(tmp_path / "store"), case, str(out))
    errors = json.loads(out.read_text())
    if case.startswith("capacity"):
        assert errors.pop("dropped") > 0  # the capacity really drops something
    errors.pop("dropped", None)
    bad = {k: v for k, v in errors.items() if v > 1e-10}
    assert not bad, bad


# ---- training under torchrun ----------------------------------------------------------------------
def _corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")


def _env(tmp_path):
    return {**os.environ, "MOEKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


def _train(tmp_path, out, nproc, *extra):
    args = ["train", "--preset", "tiny", "--data", str(tmp_path / "corpus"), "--out", str(out), "--steps", "10",
            "--batch-size", "4", "--seq-len", "32", "--eval-every", "10", "--eval-tokens", "512",
            "--save-every", "5", "--log-every", "1", "--warmup", "2", "--no-progress",
            "--set", "moe.bias_update_rate=0.001", *extra]
    launcher = [sys.executable, "-m", "moekit"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "moekit"]
    res = subprocess.run([*launcher, *args], capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow  # 35 s of torchrun jobs; the EP layer equivalence tests stay in the default run
def test_ep_training_equals_one_process_and_checkpoints_move_between_degrees(tmp_path):
    import shutil

    import moekit

    _corpus(tmp_path)
    _train(tmp_path, tmp_path / "one", 1)
    _train(tmp_path, tmp_path / "ep2", 2, "--ep", "2")
    one, ep2 = _losses(tmp_path / "one"), _losses(tmp_path / "ep2")
    assert sorted(one) == sorted(ep2) == list(range(1, 11))
    assert max(abs(one[s] - ep2[s]) for s in one) < 1e-5, (one, ep2)
    val = [json.loads((tmp_path / r / "metrics.jsonl").read_text().splitlines()[-1])["val_loss"] for r in ("one", "ep2")]
    assert abs(val[0] - val[1]) < 1e-5, val  # evaluation split over the ranks gives one process's figure

    # the EP-2 checkpoint is an ordinary one: it loads in one process with the same logits
    ids = torch.randint(0, 256, (2, 16))
    a = moekit.from_pretrained(tmp_path / "one")(ids).logits
    b = moekit.from_pretrained(tmp_path / "ep2")(ids).logits
    assert (a - b).abs().max().item() < 1e-4

    # and an EP-2 run resumes at EP 1 from its step-5 checkpoint, ending where it ended
    shutil.copytree(tmp_path / "ep2", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "ckpt-00000010")
    res = subprocess.run([sys.executable, "-m", "moekit", "train", "--out", str(tmp_path / "resumed"), "--resume",
                          "--ep", "1", "--no-progress"], capture_output=True, text=True, env=_env(tmp_path),
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    c = moekit.from_pretrained(tmp_path / "resumed")(ids).logits
    assert (c - b).abs().max().item() < 1e-4
    assert abs(_losses(tmp_path / "resumed")[10] - ep2[10]) < 1e-5

    # ... and at EP 4 (4 processes, 2 experts each)
    shutil.rmtree(tmp_path / "resumed")
    shutil.copytree(tmp_path / "ep2", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "ckpt-00000010")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                          "-m", "moekit", "train", "--out", str(tmp_path / "resumed"), "--resume", "--ep", "4",
                          "--no-progress"], capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    d = moekit.from_pretrained(tmp_path / "resumed")(ids).logits
    assert (d - b).abs().max().item() < 1e-4
    assert abs(_losses(tmp_path / "resumed")[10] - ep2[10]) < 1e-5


def test_ep_degree_must_divide_processes_and_experts(tmp_path):
    _corpus(tmp_path)
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "moekit",
            "train", "--preset", "tiny", "--data", str(tmp_path / "corpus"), "--out", str(tmp_path / "r"),
            "--steps", "2", "--batch-size", "4", "--seq-len", "32", "--no-progress"]
    res = subprocess.run([*args, "--ep", "3"], capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert res.returncode != 0 and "the EP degree must divide the world size 2" in res.stderr
    res = subprocess.run([sys.executable, "-m", "moekit", "train", "--ep", "2", "--out", str(tmp_path / "s")],
                         capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert res.returncode == 2 and "torchrun --nproc_per_node 2" in res.stderr


def test_received_rows_regroup_by_expert():
    from moekit.dist.alltoall import _regroup_by_expert

    g = torch.Generator().manual_seed(0)
    for P, El in ((1, 1), (2, 3), (4, 2)):
        counts = torch.randint(0, 4, (P, El), generator=g)
        blocks, s = {}, 0  # the straightforward reference: rows [source][expert] -> [expert][source]
        for src in range(P):
            for e in range(El):
                blocks[src, e] = list(range(s, s + int(counts[src, e])))
                s += int(counts[src, e])
        want = [r for e in range(El) for src in range(P) for r in blocks[src, e]]
        assert _regroup_by_expert(counts).tolist() == want


def test_parallel_dims_validation():
    from moekit.dist import ParallelDims

    with pytest.raises(ValueError, match="--ep 3: the EP degree must divide the world size 4"):
        ParallelDims(world=4, rank=0, ep=3)
    with pytest.raises(ValueError, match=r"--ep 4: the EP degree must divide the number of experts \(6\)"):
        ParallelDims(world=4, rank=0, ep=4).check_experts(6)
    with pytest.raises(ValueError, match="expected an int >= 1"):
        ParallelDims(world=1, rank=0, ep=0)
    dims = ParallelDims(world=8, rank=5, ep=4)
    assert (dims.ep_rank, dims.replicas) == (1, 2)


FAILING = """
import os, sys, torch
from moekit import MoEConfig, MoELayer
from moekit.dist import init_distributed
from moekit.dist.ep import shard_experts
dims = init_distributed(2)
layer = shard_experts(MoELayer(MoEConfig(d_model=16, expert_hidden=8, num_experts=4, top_k=2)), dims)
for step in range(1000):
    if step == 3 and dims.rank == 1:
        raise RuntimeError("injected failure on rank 1")
    layer(torch.randn(8, 16)).output.sum().backward()
"""


def test_a_failing_rank_ends_the_job_quickly(tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    t = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    took = time.monotonic() - t
    assert res.returncode != 0 and "injected failure on rank 1" in res.stderr
    assert took < 60, took
