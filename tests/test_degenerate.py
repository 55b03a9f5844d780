"""Degenerate cases that must reduce to simpler, known computations."""

import pytest
import torch

from moekit import MoEConfig, MoELayer
from moekit.nn import MLP

from conftest import make_layer


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu"])
@pytest.mark.parametrize("router", ["softmax_topk", "switch", "sigmoid"])
def test_one_expert_top1_equals_dense_ffn(activation, router):
    layer = make_layer(num_experts=1, top_k=1, activation=activation, router=router)
    dense = MLP(16, 8, activation).double()
    with torch.no_grad():
        dense.in_proj.weight.copy_(layer.experts.w_in[0])
        dense.down_proj.weight.copy_(layer.experts.w_out[0])
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    res = layer(x)
    # switch keeps p = 1 for a single expert; sigmoid renormalises its one score to 1
    torch.testing.assert_close(res.output, dense(x2))
    g = torch.randn_like(res.output)
    (res.output * g).sum().backward()
    (dense(x2) * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.experts.w_in.grad[0], dense.in_proj.weight.grad)
    torch.testing.assert_close(layer.experts.w_out.grad[0], dense.down_proj.weight.grad)
    # the weight is identically 1, so the router gets no gradient
    assert layer.router.weight_ED.grad.abs().max() < 1e-12


@pytest.mark.parametrize("normalize", [True, False])
def test_softmax_top_e_equals_soft_gating(normalize):
    topk = make_layer(num_experts=4, top_k=4, normalize_weights=normalize)
    soft = MoELayer(topk.cfg.replace(router="soft")).double()
    soft.load_state_dict(topk.state_dict(), strict=False)
    x = torch.randn(20, 16, dtype=torch.float64)
    torch.testing.assert_close(topk(x).output, soft(x).output)


def test_softmax_after_topk_equals_before_with_renorm():
    before = make_layer(softmax_order="before", normalize_weights=True)
    after = MoELayer(before.cfg.replace(softmax_order="after")).double()
    after.load_state_dict(before.state_dict())
    x = torch.randn(20, 16, dtype=torch.float64)
    torch.testing.assert_close(before(x).output, after(x).output)


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid", "switch"])
@pytest.mark.parametrize("policy", ["position", "score"])
def test_dropless_equals_ample_capacity(router, policy):
    top_k = 1 if router == "switch" else 2
    dropless = make_layer(router=router, top_k=top_k).eval()
    # capacity = ceil(cf·T·K/E) >= T when cf = E/K: nothing can overflow
    ample = MoELayer(dropless.cfg.replace(capacity_factor=4.0 / top_k, drop_policy=policy)).double().eval()
    ample.load_state_dict(dropless.state_dict())
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    a, b = dropless(x), ample(x)
    assert int(b.stats.dropped_assignments) == 0
    torch.testing.assert_close(a.output, b.output)
    ga = torch.autograd.grad(a.output.sum(), [x, *dropless.parameters()])
    gb = torch.autograd.grad(b.output.sum(), [x, *ample.parameters()])
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v)


@pytest.mark.parametrize("cf,top_k,T", [(1.0, 2, 24), (0.5, 1, 30), (2.0, 2, 7)])
def test_expert_choice_gives_each_expert_exactly_c_tokens(cf, top_k, T):
    layer = make_layer(router="expert_choice", capacity_factor=cf, top_k=top_k)
    res = layer(torch.randn(T, 16, dtype=torch.float64))
    C = layer.cfg.capacity(T, training=True)
    assert res.stats.tokens_per_expert.tolist() == [C] * layer.cfg.num_experts
    tok = layer.route(torch.randn(T, 16, dtype=torch.float64))[1].token_ids_N.view(4, C)
    for e in range(4):  # an expert never takes a token twice
        assert len(set(tok[e].tolist())) == C


def test_fine_grained_config_builds_equal_size_layer():
    base = MoEConfig(d_model=16, expert_hidden=32, num_experts=4, top_k=1)
    fg = MoELayer(base.fine_grained(4))
    coarse = MoELayer(base)
    n = lambda m: sum(p.numel() for p in m.experts.parameters())  # noqa: E731
    assert n(fg) == n(coarse)
    assert fg(torch.randn(10, 16)).output.shape == (10, 16)
