"""Expert parallelism on this machine (gloo): training-step time and bytes moved, EP 1, 2 and 4.

    python benchmarks/ep.py              # d 256, 4 layers, 8 experts top-2, global batch 16 x 128
    python benchmarks/ep.py --quick      # fewer steps

One JSON document. For each EP degree P (P processes under torchrun, one EP group, the global batch
split over them): the median time of a full training step (forward, backward, DDP all-reduce,
expert-gradient sync, clipping, AdamW), and the bytes each rank sent to other ranks per step in the
token all-to-alls (measured: forward rows of both exchanges; the backward sends as many again) next
to the formula 4·k·D·b·(P-1)/P per token per MoE layer for uniform routing. Threads per process =
cores / P. On a 2-core machine this prices the exchange, it cannot show a speed-up: EP pays off
when the experts do not fit one device, and on GPUs with NVLink / InfiniBand. Each degree runs in
fresh processes (``torch.distributed.run`` for P > 1) of this script's ``--worker``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import harness
from moekit import ModelConfig, MoEConfig, MoETransformer
from moekit.argtypes import NON_NEGATIVE, POSITIVE

D, LAYERS, EXPERTS, TOP_K, HIDDEN, BATCH, SEQ = 256, 4, 8, 2, 512, 16, 128


def worker(ep: int, steps: int, out: str) -> None:
    import torch.distributed as dist

    from moekit.dist import init_distributed
    from moekit.dist.ep import clip_grad_norm, data_parallel, expert_param_names, shard_experts, sync_expert_grads

    dims = init_distributed(ep)
    cfg = ModelConfig(vocab_size=256, d_model=D, n_layers=LAYERS, n_heads=4, max_seq_len=SEQ,
                      moe=MoEConfig(d_model=D, expert_hidden=HIDDEN, num_experts=EXPERTS, top_k=TOP_K,
                                    aux_loss_coef=0.01))
    torch.manual_seed(0)
    model = MoETransformer(cfg).train()
    step_fn = model
    if dims.distributed:
        shard_experts(model, dims)
        step_fn = data_parallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    per = BATCH // dims.world
    g = torch.Generator().manual_seed(1)
    times = []
    for step in range(steps + 2):  # two warm-up steps
        ids = torch.randint(0, 256, (BATCH, SEQ + 1), generator=g)[dims.rank * per:(dims.rank + 1) * per]
        if step == 2:
            for layer in model.moe_layers:
                if layer.ep is not None:
                    layer.ep.sent_bytes = 0
        t = time.perf_counter()
        res = step_fn(ids[:, :-1], targets=ids[:, 1:])
        res.loss.backward()
        if dims.distributed:
            sync_expert_grads(model, dims)
            clip_grad_norm(model, 1.0, dims)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    sent = sum(layer.ep.sent_bytes for layer in model.moe_layers if layer.ep is not None) / steps
    if dims.distributed:
        sent_all = torch.tensor([sent], dtype=torch.float64)
        dist.all_reduce(sent_all)
        sent = sent_all.item() / dims.world
    if dims.is_main:
        non_expert = sum(p.numel() for n, p in model.named_parameters() if n not in expert_param_names(model))
        tokens = BATCH * SEQ
        Path(out).write_text(json.dumps({
            "step_s_median": statistics.median(times[2:]),
            "tokens_per_s": tokens / statistics.median(times[2:]),
            "all_to_all_bytes_per_rank_per_step": 2 * sent,  # forward + backward
            "formula_bytes_per_rank_per_step": (4 * TOP_K * D * 4 * (ep - 1) / ep) * LAYERS * tokens / ep,
            "ddp_allreduce_payload_bytes": non_expert * 4 if dims.distributed else 0,
        }))
    if dims.distributed:
        del step_fn  # DDP before its process group
        dist.destroy_process_group()


def _degrees(text: str) -> tuple[int, ...]:
    try:
        degrees = tuple(int(v) for v in text.split(","))
    except ValueError:
        degrees = ()
    if not degrees or min(degrees) < 1 or any(BATCH % d for d in degrees):
        raise argparse.ArgumentTypeError(f"expected degrees >= 1 dividing the global batch {BATCH}, comma-separated, "
                                         f"got {text!r}")
    return degrees


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/ep.py", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 timed steps instead of 8")
    p.add_argument("--degrees", type=_degrees, default=(1, 2, 4), help="EP degrees, comma-separated (default 1,2,4)")
    p.add_argument("--worker", type=NON_NEGATIVE, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=POSITIVE, default=8)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    steps = 3 if args.quick else args.steps
    if args.worker is not None:
        worker(args.worker, steps, args.out)
        return 0
    cores = os.cpu_count() or 1
    report = {"benchmark": "expert-parallel training step (gloo)", **harness.environment(), "shape": {
        "d_model": D, "layers": LAYERS, "experts": EXPERTS, "top_k": TOP_K, "expert_hidden": HIDDEN,
        "global_batch": [BATCH, SEQ], "dtype": "fp32"}, "backend": "gloo", "steps": steps, "ep": {}}
    for ep in args.degrees:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "r.json"
            launch = [sys.executable] if ep == 1 else \
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ep}"]
            argv = harness.script_argv("ep.py", "--worker", str(ep), "--steps", str(steps), "--out", str(out))
            env = harness.interpreter_env({"OMP_NUM_THREADS": str(max(1, cores // ep))})
            res = subprocess.run([*launch, *argv], capture_output=True, text=True, env=env)
            if res.returncode != 0:
                report["ep"][str(ep)] = {"error": res.stderr[-1500:]}
                continue
            r = json.loads(out.read_text())
            r["threads_per_process"] = max(1, cores // ep)
            report["ep"][str(ep)] = r
    base = report["ep"].get("1", {}).get("step_s_median")
    for r in report["ep"].values():
        if base and "step_s_median" in r:
            r["step_time_vs_ep1"] = round(r["step_s_median"] / base, 3)
    return harness.print_json(report)


if __name__ == "__main__":
    sys.exit(main())
