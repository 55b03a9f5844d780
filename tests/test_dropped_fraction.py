"""`moekit inspect`'s dropped fraction is the layer's own (RoutingStats), expert choice included."""

import pytest
import torch

from moekit import ModelConfig, MoETransformer
from moekit.insight.report import summarize
from moekit.insight.routing import collect_routing

PIECES = [bytes([i]) for i in range(256)]


@pytest.mark.parametrize("moe", [dict(router="expert_choice", capacity_factor=0.5, aux_loss_coef=0.0),
                                 dict(capacity_factor=0.5)], ids=["expert_choice", "token_choice_capacity"])
def test_inspect_dropped_fraction_matches_routing_stats(moe):
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny")
    model = MoETransformer(cfg.replace(moe=cfg.moe.replace(**moe))).eval()
    batches = [torch.randint(0, 256, (2, 32)) for _ in range(3)]  # equal sizes: the pooled fraction is the mean
    summary = summarize(collect_routing(model, batches), PIECES)
    with torch.no_grad():
        outs = [model(b) for b in batches]
    for layer, s in summary["layers"].items():
        want = sum(float(o.routing[int(layer)].dropped_fraction) for o in outs) / len(outs)
        assert want > 0  # something is dropped: the comparison means something
        assert s["dropped_fraction"] == pytest.approx(want, rel=1e-12)
