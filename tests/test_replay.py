"""Routing replay: a replayed pass equals the recorded one exactly, and a changed router keeps the
recorded experts while its weights follow the current scores."""

import pytest
import torch

from moekit import MoEConfig, MoELayer, reference_forward
from moekit.config import get_preset
from moekit.model import MoETransformer
from moekit.moe import routing_replay

from conftest import make_layer

ROUTERS = {
    "softmax_topk": dict(),
    "sigmoid_null": dict(router="sigmoid", num_null_experts=2),
    "top_p": dict(router="top_p", top_k=3, top_p_threshold=0.6),
    "noisy_topk": dict(router="noisy_topk"),
    "capacity_score": dict(capacity_factor=0.75, drop_policy="score"),
    "relu": dict(router="relu"),
}


def _tiny_model():
    torch.manual_seed(0)
    return MoETransformer(get_preset("tiny")).eval()


def test_replayed_model_outputs_equal_the_recorded_pass():
    model = _tiny_model()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16))
    replay = routing_replay(model)
    with replay.record():
        recorded = model(ids).logits
    n_layers = len(replay.layers)
    assert n_layers >= 1 and all(len(calls) == 1 for calls in replay.records)
    with replay.replay():
        replayed = model(ids).logits
    assert torch.equal(replayed, recorded)
    assert all(layer.routing_replay is None for layer in replay.layers)  # uninstalled on exit


@pytest.mark.parametrize("name", list(ROUTERS))
def test_perturbed_router_keeps_the_recorded_experts(name):
    layer = make_layer(**ROUTERS[name]).train()
    model = torch.nn.Sequential(layer)
    x = torch.randn(30, 16, dtype=torch.float64)
    replay = routing_replay(model)
    torch.manual_seed(1)
    with replay.record():
        first = layer(x)
    torch.manual_seed(1)
    with replay.replay():
        again = layer(x)
    torch.testing.assert_close(again.output, first.output, rtol=0, atol=0)
    recorded = replay.expert_ids(0)

    with torch.no_grad():  # a router far from the recorded one chooses other experts ...
        layer.router.weight_ED.add_(torch.randn_like(layer.router.weight_ED) * 2.0)
    torch.manual_seed(2)
    free = layer.router(x)
    rec_active = replay.records[0][0].active_TK
    assert not torch.equal(free.expert_ids_TK, recorded) or not torch.equal(free.active_TK, rec_active)
    # ... but under replay it takes the recorded ones, weighted by its current scores
    seen = []
    run = layer.dispatcher.run
    layer.dispatcher.run = lambda experts, x_TD, plan: seen.append(plan) or run(experts, x_TD, plan)
    torch.manual_seed(2)
    with replay.replay():
        forced = layer(x)
        layer.router.forced = replay.records[0][0]  # the reference reads the router's forced choice
        torch.manual_seed(2)
        ref = reference_forward(layer, x)
        layer.router.forced = None
    kept = {(int(t), int(e)) for t, e in ref.assignments}
    active = torch.ones_like(recorded, dtype=torch.bool) if replay.records[0][0].active_TK is None \
        else replay.records[0][0].active_TK
    allowed = {(t, int(recorded[t, k])) for t in range(30) for k in range(recorded.shape[1]) if active[t, k]}
    assert kept <= allowed and len(kept) > 0
    torch.testing.assert_close(forced.output, ref.output, rtol=1e-9, atol=1e-10)
    assert not torch.allclose(forced.output, first.output)  # the weights follow the current router
    # gradients reach the router through the recomputed weights
    forced.output.sum().backward()
    assert layer.router.weight_ED.grad is not None and layer.router.weight_ED.grad.abs().sum() > 0


def test_replay_of_generation_calls_in_order():
    model = _tiny_model()
    ids = torch.randint(0, model.cfg.vocab_size, (1, 8))
    replay = routing_replay(model)
    with replay.record():
        a = model(ids[:, :5]).logits
        b = model(ids).logits
    assert all(len(calls) == 2 for calls in replay.records)
    with replay.replay():
        assert torch.equal(model(ids[:, :5]).logits, a)
        assert torch.equal(model(ids).logits, b)
        with pytest.raises(ValueError, match="called more often"):
            model(ids)


def test_replay_refuses_mismatched_tokens_and_bad_models():
    model = _tiny_model()
    replay = routing_replay(model)
    with replay.record():
        model(torch.zeros(1, 6, dtype=torch.long))
    with replay.replay(), pytest.raises(ValueError, match="recorded choice has shape"):
        model(torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(RuntimeError, match="nothing recorded"):
        routing_replay(model).replay().__enter__()
    ec = MoELayer(MoEConfig(d_model=8, expert_hidden=4, router="expert_choice", capacity_factor=1.0))
    with pytest.raises(ValueError, match="router='expert_choice'"):
        routing_replay(ec)
    with pytest.raises(ValueError, match="no MoE layer"):
        routing_replay(torch.nn.Linear(2, 2))
