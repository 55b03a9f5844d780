"""Run metrics: ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard when installed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


COLLAPSE_LOW, COLLAPSE_HIGH = 0.1, 3.0  # of the uniform share 1/E


def collapsed_experts(load_E: list[float]) -> dict[str, list[int]]:
    """Routing collapse in one layer: experts taking under 10% of the uniform share 1/E (starved) or
    over 3x it (hot); {} when neither. ``load_E``: tokens (or fractions) per expert."""
    total = sum(load_E)
    if total <= 0:
        return {}
    uniform = total / len(load_E)
    starved = [i for i, v in enumerate(load_E) if v < COLLAPSE_LOW * uniform]
    hot = [i for i, v in enumerate(load_E) if v > COLLAPSE_HIGH * uniform]
    return {k: v for k, v in (("starved", starved), ("hot", hot)) if v}


def layer_metrics(outs) -> dict:
    """Aux terms (mean over micro-batches) and, per MoE layer, the tokens-per-expert fractions, the
    dropped fraction and the max/mean load, summed over the micro-batches of a step."""
    rec: dict = {}
    if not outs:
        return rec
    for k in outs[0].aux_terms:
        rec[f"aux_{k}"] = sum(float(o.aux_terms[k].detach()) for o in outs) / len(outs)
    if outs[0].routing:
        rec["aux_loss"] = sum(float(o.aux_loss.detach()) for o in outs) / len(outs)
    for layer in outs[0].routing:
        kept = sum(o.routing[layer].tokens_per_expert.double() for o in outs)
        dropped = sum(float(o.routing[layer].dropped_fraction) for o in outs) / len(outs)
        frac = (kept / kept.sum().clamp_min(1)).tolist()
        rec[f"moe_{layer}"] = {
            "tokens_frac": [round(f, 6) for f in frac],
            "dropped_frac": dropped,
            "max_load_ratio": max(frac) * len(frac),
            "router_entropy": sum(float(o.routing[layer].router_entropy) for o in outs) / len(outs),
            **_experts_per_token(outs, layer),
        }
        collapse = collapsed_experts(frac)
        if collapse:
            rec[f"moe_{layer}"]["collapse"] = collapse
            rec.setdefault("collapsed_layers", []).append(layer)
    return rec


def _experts_per_token(outs, layer) -> dict:
    """Compute per token over the step's micro-batches: the mean number of experts computed for a token
    (null experts and dropped assignments excluded) and the token counts for 0, 1, ..., max experts."""
    hist = sum(o.routing[layer].experts_per_token_hist.double() for o in outs)
    tokens = float(hist.sum())
    mean = float((hist * torch.arange(len(hist), dtype=torch.float64)).sum()) / tokens if tokens else 0.0
    return {"experts_per_token": mean, "experts_per_token_hist": [int(n) for n in hist.tolist()]}


class MetricsLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._fh = None
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))
        except Exception:  # tensorboard is optional: not installed means no event files
            self._tb = None

    def truncate_after(self, step: int) -> None:
        """Drops records past ``step`` (written by a run killed after its last checkpoint)."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                break  # a line cut by a kill: it and anything after are dropped
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        os.replace(tmp, self.path)

    def append(self, record: dict) -> None:
        if self._fh is None:
            self._fh = open(self.path, "a")
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
