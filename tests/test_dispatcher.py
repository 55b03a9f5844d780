"""The token dispatcher: the layer's one code path, the local default and the all-to-all one agree.

The layer delegates everything that depends on where its experts live (capacity decision, the
exchange, batch-wide balancing statistics) to ``layer.dispatcher``; moekit.moe imports nothing
distributed, and the expert-parallel dispatcher on one process gives the local one's results.
"""

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moekit
from moekit import MoEConfig, MoELayer
from moekit.moe.dispatcher import LocalDispatcher

from conftest import make_layer

MOE_DIR = Path(moekit.__file__).parent / "moe"


def test_single_process_layer_imports_nothing_distributed():
    code = ("import sys, moekit, moekit.moe.layer; "
            "print([m for m in sys.modules if m.startswith('moekit.dist')])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"


def test_moe_package_never_imports_dist():
    """Lazy imports inside functions count too: dependencies flow one way, dist above moe."""
    bad = []
    for path in sorted(MOE_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{path.name}:{node.lineno} {n}" for n in names if n.startswith(("moekit.dist", "moekit.train"))]
    assert not bad, bad


def test_layer_logic_never_asks_whether_it_is_distributed():
    """Only the read-only ``ep`` property reads the dispatcher's kind; no method branches on ``self.ep``."""
    tree = ast.parse(inspect.getsource(MoELayer))
    uses = [f"{fn.name}:{node.lineno}" for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef) and fn.name != "ep"
            for node in ast.walk(fn) if isinstance(node, ast.Attribute) and node.attr == "ep"
            and isinstance(node.value, ast.Name) and node.value.id == "self"]
    assert not uses, uses


class CountingDispatcher(LocalDispatcher):
    def __init__(self):
        self.calls: list[str] = []

    def plan(self, r, cfg, training):
        self.calls.append("plan")
        return super().plan(r, cfg, training)

    def run(self, experts, x_TD, plan):
        self.calls.append("run")
        return super().run(experts, x_TD, plan)

    def batch_sums(self, sum_E, routed_E, T):
        self.calls.append("batch_sums")
        return super().batch_sums(sum_E, routed_E, T)

    def sum_load_(self, load_E):
        self.calls.append("sum_load_")

    def check_no_rows(self):
        self.calls.append("check_no_rows")


def test_layer_goes_through_its_dispatcher():
    layer = make_layer(router="sigmoid", aux_loss_coef=0.01, bias_update_rate=0.01, capacity_factor=1.0).train()
    assert isinstance(layer.dispatcher, LocalDispatcher) and layer.ep is None
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    want = layer(x).output
    layer.dispatcher = CountingDispatcher()
    got = layer(x).output
    layer.update_bias()
    mask = torch.zeros(2, 5, dtype=torch.bool)
    layer(x, mask)
    assert layer.dispatcher.calls == ["plan", "run", "batch_sums", "sum_load_", "check_no_rows"]
    assert torch.equal(got, want)
    assert layer.ep is None  # a local dispatcher, whatever its class
    with pytest.raises(AttributeError):
        layer.ep = object()


def test_shard_experts_installs_the_all_to_all_dispatcher_once():
    """No process group needed: sharding only slices the experts and installs the dispatcher."""
    from moekit.dist import ParallelDims
    from moekit.dist.alltoall import AllToAllDispatcher
    from moekit.dist.ep import shard_experts

    layer = make_layer(num_experts=4)
    w_in = layer.experts.w_in.detach().clone()
    shard_experts(layer, ParallelDims(world=2, rank=1, ep=2))
    assert isinstance(layer.dispatcher, AllToAllDispatcher) and layer.ep is layer.dispatcher
    assert not layer.dispatcher.holds_all_experts and (layer.ep.first, layer.ep.local) == (2, 2)
    assert torch.equal(layer.experts.w_in, w_in[2:4])
    with pytest.raises(ValueError, match="already sharded"):
        shard_experts(layer, ParallelDims(world=2, rank=1, ep=2))
    assert torch.equal(layer.experts.w_in, w_in[2:4])


# ---- the all-to-all dispatcher on one process equals the local one ---------------------------------
CASES = {
    "dropless": dict(aux_loss_coef=0.05, z_loss_coef=0.01),
    "capacity_position": dict(capacity_factor=0.6, aux_loss_coef=0.05),
    "capacity_score": dict(capacity_factor=0.6, drop_policy="score", aux_loss_coef=0.05),
    "sigmoid_bias": dict(router="sigmoid", n_group=2, topk_group=1, bias_update_rate=0.01, aux_loss_coef=0.05),
    "shared_bias_seq": dict(num_shared_experts=1, mlp_bias=True, seq_aux_loss_coef=0.01),
}


def _one_process_worker(rank, store, out):
    import os

    import torch.distributed as dist

    from conftest import sharded_pair
    from moekit.dist import init_distributed

    os.environ.pop("WORLD_SIZE", None)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    torch.set_num_threads(1)
    dims = init_distributed(1)
    errors = {}
    for case, extra in CASES.items():
        for masked in (False, True):
            torch.manual_seed(0)
            cfg = MoEConfig(d_model=16, expert_hidden=8, num_experts=8, top_k=2, **extra)
            local, a2a = sharded_pair(cfg, dims)
            g = torch.Generator().manual_seed(1)
            x = torch.randn(3, 6, 16, generator=g, dtype=torch.float64)
            dy = torch.randn(3, 6, 16, generator=g, dtype=torch.float64)
            mask = torch.rand(3, 6, generator=g) > 0.3 if masked else None
            results = []
            for layer in (local, a2a):
                xi = x.clone().requires_grad_(True)
                res = layer(xi, mask)
                ((res.output * dy).sum() + res.aux_loss).backward()
                layer.update_bias()
                results.append((res, xi.grad, {n: p.grad for n, p in layer.named_parameters()}))
            (want, want_dx, want_g), (got, got_dx, got_g) = results
            err = {"output": (got.output - want.output).abs().max().item(),
                   "aux_loss": abs(got.aux_loss.item() - want.aux_loss.item()),
                   "x.grad": (got_dx - want_dx).abs().max().item(),
                   "dropped": abs(int(got.stats.dropped_assignments) - int(want.stats.dropped_assignments)),
                   "sent_bytes": a2a.ep.sent_bytes,  # one rank sends nothing to others
                   **{f"{n}.grad": (got_g[n] - want_g[n]).abs().max().item() for n in want_g}}
            if cfg.bias_update_rate:
                err["expert_bias"] = (a2a.router.expert_bias - local.router.expert_bias).abs().max().item()
            errors[f"{case}-{'masked' if masked else 'full'}"] = err
            errors[f"{case}-{'masked' if masked else 'full'}"]["_dropped"] = int(want.stats.dropped_assignments)
    with open(out, "w") as f:
        json.dump(errors, f)
    dist.destroy_process_group()


@pytest.mark.dist
def test_all_to_all_dispatcher_on_one_process_equals_local(tmp_path):
    """Every step of the expert-parallel path (group-wide capacity decision, both exchanges, regrouping,
    the combine, batch-wide loss sums, the all-reduced bias load) runs on a group of one and must give
    the local dispatcher's outputs, losses, gradients and bias, with and without padding."""
    import torch.multiprocessing as mp

    out = tmp_path / "errors.json"
    mp.start_processes(_one_process_worker, args=(str(tmp_path / "store"), str(out)), nprocs=1,
                       start_method="spawn", join=True)
    errors = json.loads(out.read_text())
    assert set(errors) == {f"{c}-{m}" for c in CASES for m in ("full", "masked")}
    assert errors["capacity_position-full"]["_dropped"] > 0 and errors["capacity_score-masked"]["_dropped"] > 0
    bad = {case: {k: v for k, v in e.items() if k != "_dropped" and v > 1e-12} for case, e in errors.items()}
    assert not any(bad.values()), bad
