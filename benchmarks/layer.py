"""The layer benchmark of ``moekit bench layer`` (MoELayer against a dense SwiGLU FFN of equal active
FLOPs), plus transformers' Mixtral block on the same weights and the project's targets.

    python benchmarks/layer.py [--quick] [--hf] [options of moekit bench layer]

``--hf`` adds transformers' ``MixtralSparseMoeBlock`` holding the MoE layer's own parameters, with its
``eager`` and ``grouped_mm`` expert implementations (each checked against moekit's output and input
gradient first, skipped with a note when it differs or cannot be built); every side is timed in the
same interleaved rounds. ``targets``: the fwd+bwd ``moe_vs_dense`` each routing of SPEED_TARGETS
must reach and the peak-memory ratio every shape must stay under, set for the default run (4096
tokens, fp32). One JSON document on stdout.
"""

from __future__ import annotations

import json
import sys

import torch
from torch import nn

import harness
from moekit.bench import (DEFAULT_SHAPES, MOEKIT_SIDES, Shape, Side, Sides, build_parser, build_side, fresh_share,
                          options, run_layer_benchmark)
from moekit.moe import MoELayer
from moekit.nn import gemm

HF_SIDES = ("hf_eager", "hf_grouped_mm")  # transformers' experts_implementation after the prefix
SUITE_SHAPES = DEFAULT_SHAPES + (Shape(512, 88, 128, 8),)  # the performance suite adds the finest routing
# (num_experts, top_k) -> the fwd+bwd moe_vs_dense a shape of that routing must reach. What the E
# per-expert GEMMs alone reach against dense: benchmarks/gemm_backends.py (ceiling_grouped_*: the
# loop's design for small experts; ceiling_*: one group).
SPEED_TARGETS = {(8, 2): 1.1, (64, 8): 0.9, (128, 8): 0.75}
PEAK_RATIO_TARGET = 1.5
HF_TOLERANCE = 1e-4  # relative; a wrong gate/up order or transposition shows as O(1)


def hf_mixtral_block(layer: MoELayer, implementation: str) -> nn.Module:
    """transformers' MixtralSparseMoeBlock holding ``layer``'s parameters themselves (no copy, so the
    memory probe sees no freed duplicate). Raises ValueError when the parameter layout differs."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = layer.cfg
    hf_cfg = MixtralConfig(hidden_size=cfg.d_model, intermediate_size=cfg.expert_hidden,
                           num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
                           experts_implementation=implementation)
    with torch.device("meta"):
        block = MixtralSparseMoeBlock(hf_cfg)
    # moekit w_in [E, 2F, D] is [gate; up] like HF's gate_up_proj; w_out [E, D, F] is down_proj.
    weights = {"gate.weight": layer.router.weight_ED, "experts.gate_up_proj": layer.experts.w_in,
               "experts.down_proj": layer.experts.w_out}
    try:
        block.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"the Mixtral block's parameters do not match moekit's layout: {err}") from None
    return block


def mismatch(a: Side, b: Side, d_model: int, seed: int) -> float:
    """Max |a - b| / max |a| over the output and the input gradient of 64 fp32 tokens."""
    x = torch.randn(64, d_model, generator=torch.Generator().manual_seed(seed + 1))
    results = []
    for side in (a, b):
        x_ = x.clone().requires_grad_(True)
        out = side.forward(x_)
        out.backward(torch.ones_like(out))
        side.module.zero_grad(set_to_none=True)
        results.append((out.detach(), x_.grad))
    return max(((p - q).abs().max() / p.abs().max()).item() for p, q in zip(*results))


def build_hf_side(name: str, shape: Shape, seed: int) -> Side:
    """moe / dense as moekit bench layer builds them; an HF side on the weights of the seeded MoE
    layer, checked against it (ValueError, a skip note in the report, when it cannot be built or differs)."""
    if name not in HF_SIDES:
        return build_side(name, shape, seed)
    moe = build_side("moe", shape, seed)
    try:
        block = hf_mixtral_block(moe.module, name.removeprefix("hf_"))
        side = Side(block, lambda x: block(x.unsqueeze(0)).squeeze(0))
        diff = mismatch(moe, side, shape.d_model, seed)
    except (ImportError, RuntimeError) as err:  # no transformers, or not this implementation
        raise ValueError(f"{type(err).__name__}: {err}") from None
    if diff > HF_TOLERANCE:
        raise ValueError(f"output differs from moekit's by {diff:.2e} (relative) on the same weights")
    side.note = f"verified against moekit on 64 tokens: relative max difference {diff:.1e}"
    return side


HF = Sides(names=("moe", "dense", *HF_SIDES), build=build_hf_side,
           command=tuple(harness.script_argv("layer.py", "--hf")))


def _target(value: float | None, op: str, threshold: float) -> dict:
    passed = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
    return {"target": f"{op} {threshold}", "value": value, "pass": passed}


def targets(reports: list[dict]) -> dict:
    """fwd+bwd speed at the routings of SPEED_TARGETS and the peak-memory ratio at every shape;
    ``pass`` is null where the value was not measured (--no-memory)."""
    out = {}
    for r in reports:
        minimum = SPEED_TARGETS.get((r["num_experts"], r["top_k"]))
        if minimum is not None:
            out[f"{r['shape']}.fwd_bwd_moe_vs_dense"] = _target(r["moe_vs_dense"]["fwd_bwd"], ">=", minimum)
        out[f"{r['shape']}.peak_ratio_moe_over_dense"] = _target(r["peak_ratio_moe_over_dense"], "<=",
                                                                 PEAK_RATIO_TARGET)
    return out


def run(hf: bool = False, **kwargs) -> dict:
    """:func:`moekit.bench.run_layer_benchmark` (same keywords) with transformers' sides when ``hf``,
    and the targets."""
    report = run_layer_benchmark(**kwargs, sides=HF if hf else MOEKIT_SIDES)
    report["transformers"] = harness.transformers_version() if hf else None
    report["targets"] = targets(report["shapes"])
    report["targets_note"] = ("set for the default run (4096 tokens, fp32): with fewer tokens the fixed costs "
                              "(routing, per-expert calls, the E experts' parameter gradients) weigh more")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(prog="python benchmarks/layer.py")
    parser.description = ("moekit bench layer, plus transformers' Mixtral block on the same weights (--hf) and the "
                          "project's targets; one JSON document on stdout.")
    parser.add_argument("--hf", action="store_true", help="add transformers' Mixtral block with the same weights "
                                                          "(its products run torch.mm whatever --gemm)")
    args = parser.parse_args(argv)
    gemm.choose(args.gemm)
    share = fresh_share(parser, args, HF if args.hf else MOEKIT_SIDES)
    if share is not None:
        print(json.dumps(share))
        return 0
    return harness.print_json(run(hf=args.hf, **options(args)))


if __name__ == "__main__":
    sys.exit(main())
