"""MoELayer against the slow reference: outputs, aux losses, drop counts and gradients (float64)."""

import pytest
import torch
from torch.func import functional_call

from moekit import MoEConfig, MoELayer, reference_forward

from conftest import grads_of, make_layer

CASES = {
    "softmax_topk": dict(),
    "softmax_topk_no_renorm": dict(normalize_weights=False),
    "softmax_after_topk": dict(softmax_order="after"),
    "softmax_topk_p2_norm": dict(top_k=3, normalize_p=2.0),  # DBRX's p-norm renormalisation
    "softmax_grouped_v2": dict(num_experts=8, top_k=3, n_group=4, topk_group=2, normalize_weights=False,
                               routed_scaling_factor=16.0),
    "switch_jitter": dict(router="switch", top_k=1, router_jitter=0.2, capacity_factor=1.25),
    "noisy_topk": dict(router="noisy_topk"),
    "sigmoid_v3": dict(router="sigmoid", num_experts=8, top_k=2, n_group=4, topk_group=2,
                       routed_scaling_factor=2.5, bias_update_rate=1e-3),
    "sigmoid_no_renorm": dict(router="sigmoid", normalize_weights=False),
    "expert_choice": dict(router="expert_choice", capacity_factor=1.0),
    "expert_choice_half": dict(router="expert_choice", capacity_factor=0.5, top_k=1),
    "soft": dict(router="soft", top_k=4),
    "capacity_position": dict(capacity_factor=0.5),
    "capacity_score": dict(capacity_factor=0.5, drop_policy="score"),
    "capacity_sigmoid_score": dict(router="sigmoid", capacity_factor=0.75, drop_policy="score"),
    "all_losses": dict(aux_loss_coef=0.01, z_loss_coef=1e-3, seq_aux_loss_coef=1e-2),
    "hf_compat_loss": dict(aux_loss_coef=0.02, lb_convention="hf_compat"),
    "shared_gated_dense": dict(num_shared_experts=2, shared_expert_hidden=4, shared_expert_gate=True,
                               dense_hidden=6),
    "geglu_bias": dict(activation="geglu", mlp_bias=True),
    "gelu_bias_capacity": dict(activation="gelu", mlp_bias=True, capacity_factor=0.5),
    "relu": dict(activation="relu"),
    "top1_e1": dict(num_experts=1, top_k=1),
}


def _fast(layer, x):
    res = layer(x)
    return res.output, res.aux_loss


def _ref(layer, x):
    res = reference_forward(layer, x)
    return res.output, res.aux_loss


def _with_bias(layer):
    # a non-zero selection bias, so that tests see it pick experts without weighting them
    if hasattr(layer.router, "expert_bias") and layer.cfg.router == "sigmoid":
        layer.router.expert_bias.copy_(torch.linspace(-0.3, 0.3, layer.cfg.num_experts))
    return layer


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(CASES))
def test_layer_matches_reference(name, training):
    layer = _with_bias(make_layer(**CASES[name])).train(training)
    x = torch.randn(2, 12, 16, dtype=torch.float64)

    torch.manual_seed(7)
    out, aux, grads = grads_of(layer, x, _fast)
    torch.manual_seed(7)
    out_ref, aux_ref, grads_ref = grads_of(layer, x, _ref)

    torch.testing.assert_close(out, out_ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(aux, aux_ref, rtol=1e-9, atol=1e-12)
    for key in grads_ref:
        torch.testing.assert_close(grads[key], grads_ref[key], rtol=1e-8, atol=1e-10, msg=lambda m: f"{key}: {m}")

    torch.manual_seed(7)
    fast = layer(x)
    torch.manual_seed(7)
    ref = reference_forward(layer, x)
    assert fast.stats.tokens_per_expert.tolist() == ref.tokens_per_expert
    assert fast.stats.routed_per_expert.tolist() == ref.routed_per_expert
    assert int(fast.stats.dropped_assignments) == ref.dropped_assignments
    assert int(fast.stats.dropped_tokens) == ref.dropped_tokens
    assert set(fast.aux_terms) == set(ref.aux_terms)
    for k in ref.aux_terms:
        torch.testing.assert_close(fast.aux_terms[k], torch.as_tensor(ref.aux_terms[k], dtype=fast.aux_terms[k].dtype))


@pytest.mark.parametrize("name", ["softmax_topk", "softmax_grouped_v2", "sigmoid_v3", "expert_choice", "soft",
                                  "capacity_score", "all_losses", "shared_gated_dense", "geglu_bias"])
def test_gradcheck(name):
    """Finite differences through the fused backward, w.r.t. the input and every parameter."""
    layer = _with_bias(make_layer(**{**dict(d_model=6, expert_hidden=3), **CASES[name]}))
    layer.eval()  # deterministic (no noise); capacity uses the same factor
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        res = functional_call(layer, dict(zip(names, ps)), (x,))
        return res.output, res.aux_loss

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_output_shape_and_named_result():
    layer = make_layer(dtype=torch.float32, aux_loss_coef=0.01, z_loss_coef=1e-3)
    x = torch.randn(3, 5, 7, 16)
    res = layer(x)
    assert res.output.shape == x.shape
    assert res.aux_loss.shape == ()
    assert set(res.aux_terms) == {"load_balancing", "z_loss"}
    st = res.stats.to_dict()
    assert sum(st["tokens_per_expert"]) == 3 * 5 * 7 * 2
    assert st["dropped_assignments"] == 0 and st["dropped_fraction"] == 0.0
    assert 0 < st["router_entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
    assert st["max_load_ratio"] >= 1.0


def test_aux_loss_zero_when_disabled():
    res = make_layer(dtype=torch.float32)(torch.randn(10, 16))
    assert res.aux_loss.item() == 0.0 and res.aux_terms == {}


def test_capacity_drops_are_counted_and_carried_by_zero():
    layer = make_layer(dtype=torch.float64, capacity_factor=0.25, top_k=1)
    x = torch.randn(40, 16, dtype=torch.float64)
    res = layer(x)
    cap = layer.cfg.capacity(40, training=True)
    routed = res.stats.routed_per_expert
    assert res.stats.tokens_per_expert.tolist() == routed.clamp(max=cap).tolist()
    assert int(res.stats.dropped_assignments) == int((routed - cap).clamp(min=0).sum())
    # top-1: a dropped assignment is a dropped token, whose MoE output is exactly zero
    zero_rows = (res.output == 0).all(dim=-1).sum()
    assert int(zero_rows) == int(res.stats.dropped_tokens) == int(res.stats.dropped_assignments)


def test_eval_capacity_factor_is_used_in_eval():
    layer = make_layer(capacity_factor=0.25, eval_capacity_factor=None)
    x = torch.randn(32, 16, dtype=torch.float64)
    assert int(layer.train()(x).stats.dropped_assignments) > 0
    assert int(layer.eval()(x).stats.dropped_assignments) == 0


def test_bf16_autocast_keeps_router_in_fp32():
    layer = make_layer(dtype=torch.float32, std=0.1, aux_loss_coef=0.01, z_loss_coef=1e-3)
    x = torch.randn(64, 16)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = layer(x)
    assert res.router_logits.dtype == torch.float32
    assert res.aux_loss.dtype == torch.float32
    torch.testing.assert_close(res.router_logits, ref.router_logits)  # fp32 router: identical routing
    torch.testing.assert_close(res.output.float(), ref.output, atol=3e-2, rtol=3e-2)
    res.output.float().sum().backward()
    assert layer.experts.w_in.grad is not None and layer.experts.w_in.grad.dtype == torch.float32


def test_bf16_parameters():
    layer = make_layer(dtype=torch.bfloat16, std=0.1)
    x = torch.randn(32, 16, dtype=torch.bfloat16, requires_grad=True)
    res = layer(x)
    assert res.output.dtype == torch.bfloat16
    res.output.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


def test_wrong_last_dim():
    with pytest.raises(ValueError, match=r"d_model=16"):
        make_layer()(torch.randn(4, 15, dtype=torch.float64))


def test_integer_input():
    with pytest.raises(TypeError, match="floating-point"):
        make_layer()(torch.ones(4, 16, dtype=torch.long))


def test_empty_batch_returns_empty_result():
    layer = make_layer(dtype=torch.float32, aux_loss_coef=0.01)
    res = layer(torch.randn(0, 5, 16))
    assert res.output.shape == (0, 5, 16)
    assert res.aux_loss.item() == 0.0
    assert res.stats.tokens_per_expert.tolist() == [0, 0, 0, 0]


def test_layer_rejects_non_config():
    with pytest.raises(TypeError, match="MoEConfig"):
        MoELayer(dict(d_model=4))


def test_no_shared_state_between_layers():
    cfg = MoEConfig(d_model=8, expert_hidden=8, num_experts=4, top_k=2, bias_update_rate=0.1)
    a, b = MoELayer(cfg), MoELayer(cfg)
    a.train()(torch.randn(16, 8))
    a.update_bias()
    assert b.router.expert_bias.abs().sum() == 0 and b.router.load_since_update.sum() == 0
    assert a.router.expert_bias.abs().sum() > 0
