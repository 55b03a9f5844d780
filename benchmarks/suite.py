"""The whole performance suite in one run: layer matrix, training step, generation, scaling.

    python benchmarks/suite.py [--quick] [--markdown FILE] [--gemm blas]

Runs, one after the other on the same idle machine:

* layer: ``benchmarks/layer.py`` at the three routings (E, k, hidden) = (8, 2, 1408),
  (64, 8, 176), (128, 8, 88), d_model 512, for 512 / 4096 / 16384 tokens, fp32 and bf16 (peak memory
  at 4096 tokens, fp32), MoE against dense alone; then MoE against transformers' blocks (``--hf``)
  in a second interleaved set, whose ratios fill the transformers columns;
* train: ``benchmarks/train.py`` (full step of a Mixtral-shaped model against transformers);
* generate: ``benchmarks/generate.py`` (fp32 and bf16);
* scaling: time against tokens and against E at fixed active FLOPs.

Prints one JSON document (every report in full, plus ``summary`` rows and the targets); with
``--markdown FILE`` also writes the summary as markdown tables. ``--quick`` (1024 tokens, fp32, short
generation) takes a few minutes on 2 cores, the full run several times that.
"""

from __future__ import annotations

import argparse
import sys
import time

import generate as bench_generate
import harness
import layer as bench_layer
import train as bench_train
from moekit.argtypes import NON_NEGATIVE
from moekit.nn import gemm

SHAPES = bench_layer.SUITE_SHAPES


def layer_matrix(tokens_list, dtypes, repeats: int, seed: int) -> dict[str, list[dict]]:
    """Two interleaved sets per (dtype, tokens): MoE against dense alone (the target ratios, with
    more repeats: nothing else's allocations in between), then MoE against transformers' two blocks."""
    runs: dict[str, list[dict]] = {"vs_dense": [], "vs_hf": []}
    for dtype in dtypes:
        for tokens in tokens_list:
            memory = tokens == 4096 and dtype == "fp32"
            runs["vs_dense"].append(bench_layer.run(tokens=tokens, repeats=repeats + 2, shapes=SHAPES,
                                                    memory=memory, dtype=dtype, seed=seed))
            runs["vs_hf"].append(bench_layer.run(hf=True, tokens=tokens, repeats=repeats, shapes=SHAPES,
                                                 memory=False, dtype=dtype, seed=seed))
    return runs


def layer_rows(runs: list[dict], hf_runs: list[dict] | None = None) -> list[dict]:
    """Summary rows: MoE and dense from ``runs``, the transformers ratios from the matching
    ``hf_runs`` (default: ``runs`` themselves)."""
    rows = []
    for run, hf_run in zip(runs, hf_runs or runs):
        hf_shapes = {s["shape"]: s for s in hf_run["shapes"]}
        for s in run["shapes"]:
            hf = hf_shapes.get(s["shape"], {})
            target = bench_layer.SPEED_TARGETS.get((s["num_experts"], s["top_k"]))
            rows.append({
                "dtype": run["dtype"], "tokens": run["tokens"],
                "routing": f"E{s['num_experts']} k{s['top_k']} F{s['expert_hidden']}",
                "moe_fwd_bwd_ms": s["moe"]["fwd_bwd_ms"], "dense_fwd_bwd_ms": s["dense"]["fwd_bwd_ms"],
                "moe_vs_dense": s["moe_vs_dense"]["fwd_bwd"], "target": target,
                "moe_vs_hf_eager": hf.get("moe_vs_hf_eager", {}).get("fwd_bwd"),
                "moe_vs_hf_grouped_mm": hf.get("moe_vs_hf_grouped_mm", {}).get("fwd_bwd"),
                "peak_ratio_moe_over_dense": s.get("peak_ratio_moe_over_dense"),
            })
    return rows


def _fmt(value, suffix: str = "") -> str:
    return "–" if value is None else f"{value}{suffix}"


def markdown(report: dict) -> str:
    lines = ["| dtype | tokens | routing | MoE fwd+bwd | dense | MoE vs dense (target) | vs HF eager | "
             "vs HF grouped_mm | peak MoE / dense |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["summary"]["layer"]:
        target = f" (≥ {r['target']})" if r["target"] and r["dtype"] == "fp32" else ""
        lines.append(f"| {r['dtype']} | {r['tokens']} | {r['routing']} | {r['moe_fwd_bwd_ms']} ms | "
                     f"{r['dense_fwd_bwd_ms']} ms | **{r['moe_vs_dense']}×**{target} | "
                     f"{_fmt(r['moe_vs_hf_eager'], '×')} | "
                     f"{_fmt(r['moe_vs_hf_grouped_mm'], '×')} | {_fmt(r['peak_ratio_moe_over_dense'])} |")
    if report["summary"].get("layer_blas"):
        blas = report["summary"]["layer_blas"]
        cells = ", ".join(f"{r['routing']} **{r['moe_vs_dense']}×** ({r['moe_fwd_bwd_ms']} vs {r['dense_fwd_bwd_ms']} "
                          f"ms)" for r in blas)
        lines += ["", f"The same, fp32 with both sides' GEMMs on torch.mm (`--gemm blas`, the BLAS PyTorch calls; "
                      f"the rows above use {report['gemm']}), {blas[0]['tokens']} tokens: {cells}."]
    lines += ["", "| training step | moekit | transformers eager | transformers grouped_mm | "
                  "moekit vs eager / grouped_mm (target) |", "|---|---|---|---|---|"]
    for s in report["train"]["shapes"]:
        st, vs = s["step_s"], s["moekit_vs"]
        target = bench_train.TRAIN_TARGETS.get((s["num_experts"], s["top_k"]))
        lines.append(f"| {s['shape']} | {st['moekit']} s | {_fmt(st.get('transformers_eager'), ' s')} | "
                     f"{_fmt(st.get('transformers_grouped_mm'), ' s')} | {_fmt(vs.get('eager'), '×')} / "
                     f"{_fmt(vs.get('grouped_mm'), '×')} (≥ {target}) |")
    lines += ["", "| generate | batch | moekit compiled | moekit eager | transformers | "
                  "compiled vs transformers (target ≥ 2) |", "|---|---|---|---|---|---|"]
    for g in report["generate"]:
        for batch, b in g["batches"].items():
            lines.append(f"| {g['dtype']} | {batch} | {b['moekit_compiled_tokens_per_s']} tok/s | "
                         f"{b['moekit_eager_tokens_per_s']} | {b['transformers_tokens_per_s']} | "
                         f"**{b['speedup_compiled']}×** |")
    sc = report["scaling"]
    lines += ["", f"Scaling (MoE layer d 512, top-8, fwd+bwd): seconds per 1k tokens "
                  f"{sc['seconds_per_1k_tokens']} (linearity {sc['linearity']}); at 4096 tokens and fixed active "
                  f"FLOPs {sc['time_vs_experts_s_at_4096_tokens']} s, E8 → E128 ×{sc['growth_E8_to_E128']} "
                  f"(target ≤ 1.2)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/suite.py", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1024 tokens, fp32 only, short generation: a few minutes")
    p.add_argument("--markdown", metavar="FILE", help="also write the summary tables as markdown")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    gemm.add_argument(p)
    args = p.parse_args(argv)
    gemm.choose(args.gemm)
    start = time.perf_counter()
    tokens_list, dtypes = ((1024,), ("fp32",)) if args.quick else ((512, 4096, 16384), ("fp32", "bf16"))
    repeats = 2 if args.quick else 3
    runs = layer_matrix(tokens_list, dtypes, repeats, args.seed)
    layer_blas = None
    if gemm.backend() == "onednn":  # the layer ratios with both sides on torch.mm, as PyTorch runs them
        with gemm.use_backend("blas"):
            layer_blas = bench_layer.run(tokens=tokens_list[-1] if args.quick else 4096, repeats=repeats + 2,
                                         shapes=SHAPES, memory=False, seed=args.seed)
    train = bench_train.run_train_benchmark(args.quick, repeats if args.quick else bench_train.TRAIN_REPEATS, args.seed)
    generate = [bench_generate.run_generate_benchmark(*bench_generate.sizes(args.quick), repeats, dtype)
                for dtype in dtypes]
    report = {"benchmark": "moekit performance suite", **harness.environment(transformers=True), "quick": args.quick,
              "layer": runs, "layer_blas": layer_blas, "train": train,
              "generate": generate,
              "scaling": bench_train.scaling(repeats, args.seed, args.quick)}
    report["summary"] = {"layer": layer_rows(runs["vs_dense"], runs["vs_hf"]),
                         "layer_blas": layer_rows([layer_blas]) if layer_blas else None}
    report["wall_s"] = round(time.perf_counter() - start, 1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(report))
    return harness.print_json(report)


if __name__ == "__main__":
    sys.exit(main())
