"""Aux-loss-free bias balancing (DeepSeek-V3 §2.1.2)."""

import torch

from moekit import MoEConfig, MoELayer, update_expert_biases


def _skewed_layer(rate=0.02, router="sigmoid"):
    cfg = MoEConfig(d_model=16, expert_hidden=8, num_experts=8, top_k=2, router=router, bias_update_rate=rate)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight_ED.normal_(0, 0.05)
        layer.router.weight_ED[0] += 0.5  # experts 0 and 1 attract almost every token
        layer.router.weight_ED[1] += 0.4
    return layer


def _imbalance(layer, x):
    with torch.no_grad():
        return layer(x).stats.max_load_ratio.item()


def test_bias_update_moves_load_toward_uniform():
    torch.manual_seed(0)
    held_out = torch.randn(1024, 16) + 1.0  # positive mean: the skewed rows dominate
    layer = _skewed_layer(rate=0.002)
    start = _imbalance(layer.eval(), held_out)
    history = []
    for _ in range(300):  # fresh batches, as in training
        layer.train()(torch.randn(256, 16) + 1.0)
        update_expert_biases(layer)
        history.append(_imbalance(layer.eval(), held_out))
    assert start == 4.0  # two of eight experts take everything
    assert sum(history[-20:]) / 20 < 1.6
    assert sum(history[-20:]) / 20 < 0.5 * sum(history[:20]) / 20


def test_bias_picks_but_never_weighs():
    layer = _skewed_layer()
    x = torch.randn(32, 16)
    before = layer(x)
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([0, 0, 0, 0, 0, 0, 0, 10.0]))
    r, plan = layer.route(x)
    assert (r.expert_ids_TK == 7).any(dim=1).all()  # the bias forces expert 7 into every token's top-2
    scores = r.logits_TE.sigmoid()
    chosen = scores.gather(1, r.expert_ids_TK)
    torch.testing.assert_close(r.weights_TK, chosen / chosen.sum(-1, keepdim=True))  # unbiased scores
    assert not torch.equal(before.output, layer(x).output)


def test_update_uses_training_loads_only_and_resets():
    layer = _skewed_layer()
    x = torch.randn(64, 16) + 1.0
    layer.eval()
    layer(x)
    assert layer.router.load_since_update.sum() == 0
    layer.update_bias()
    assert layer.router.expert_bias.abs().sum() == 0  # nothing counted -> nothing moves
    layer.train()
    layer(x)
    layer(x)
    assert layer.router.load_since_update.sum() == 2 * 64 * 2  # two passes accumulate
    layer.update_bias()
    assert layer.router.load_since_update.sum() == 0
    b = layer.router.expert_bias
    assert abs(b.abs().max().item() - 0.02) < 1e-7 and b[0] < 0  # gamma·sign(mean - load), overloaded expert goes down


def test_update_is_sign_of_mean_minus_load():
    layer = _skewed_layer(rate=0.5)
    load = torch.tensor([10.0, 2, 4, 4, 4, 4, 4, 0])
    layer.router.update_bias(load)
    expected = 0.5 * torch.sign(load.mean() - load)
    torch.testing.assert_close(layer.router.expert_bias, expected)


def test_no_update_when_rate_is_zero():
    layer = _skewed_layer(rate=0.0)
    layer.train()(torch.randn(64, 16))
    update_expert_biases(layer)
    assert layer.router.expert_bias.abs().sum() == 0 and layer.router.load_since_update.sum() == 0


def test_softmax_router_bias_balancing_also_works():
    torch.manual_seed(1)
    held_out = torch.randn(1024, 16) + 1.0
    layer = _skewed_layer(rate=0.002, router="softmax_topk")
    start = _imbalance(layer.eval(), held_out)
    for _ in range(300):
        layer.train()(torch.randn(256, 16) + 1.0)
        layer.update_bias()
    assert _imbalance(layer.eval(), held_out) < 0.75 * start


def test_balancing_state_stays_fp32_in_a_bf16_model():
    layer = _skewed_layer().to(torch.bfloat16)
    assert layer.router.weight_ED.dtype == torch.bfloat16
    assert layer.router.expert_bias.dtype == torch.float32
    assert layer.router.load_since_update.dtype == torch.float32
    with torch.no_grad():
        layer.router.expert_bias.fill_(1.0)
    layer.router.update_bias(torch.tensor([3.0, 1, 1, 1, 1, 1, 1, 1]))
    assert abs(layer.router.expert_bias[0].item() - 0.98) < 1e-6  # bf16 would round 0.98 to 0.98046875
