import pytest

from moekit import MoEConfig

BASE = dict(d_model=16, expert_hidden=8, num_experts=4, top_k=2)

BAD = [
    ("top_k", dict(top_k=0)),
    ("top_k", dict(top_k=5)),
    ("top_k", dict(router="switch", top_k=2)),
    ("top_k", dict(router="soft", top_k=2)),
    ("num_experts", dict(num_experts=0)),
    ("d_model", dict(d_model=0)),
    ("d_model", dict(d_model=-3)),
    ("expert_hidden", dict(expert_hidden=0)),
    ("expert_hidden", dict(expert_hidden=2.5)),
    ("capacity_factor", dict(capacity_factor=0)),
    ("capacity_factor", dict(capacity_factor=-1.0)),
    ("capacity_factor", dict(capacity_factor=float("nan"))),
    ("capacity_factor", dict(router="expert_choice", capacity_factor=None)),
    ("eval_capacity_factor", dict(eval_capacity_factor=0.0)),
    ("eval_capacity_factor", dict(eval_capacity_factor="always")),
    ("eval_capacity_factor", dict(router="expert_choice", capacity_factor=1.0, eval_capacity_factor=None)),
    ("n_group", dict(n_group=3)),
    ("n_group", dict(n_group=0)),
    ("n_group", dict(router="expert_choice", capacity_factor=1.0, n_group=2)),
    ("topk_group", dict(n_group=2, topk_group=3)),
    ("topk_group", dict(num_experts=8, top_k=4, n_group=4, topk_group=1)),
    ("router", dict(router="top2")),
    ("activation", dict(activation="swish")),
    ("drop_policy", dict(drop_policy="random")),
    ("softmax_order", dict(softmax_order="middle")),
    ("softmax_order", dict(softmax_order="after", normalize_weights=False)),
    ("lb_convention", dict(lb_convention="mixtral")),
    ("group_score", dict(group_score="sum")),
    ("aux_loss_coef", dict(aux_loss_coef=-0.1)),
    ("aux_loss_coef", dict(router="expert_choice", capacity_factor=1.0, aux_loss_coef=0.01)),
    ("z_loss_coef", dict(z_loss_coef=float("inf"))),
    ("bias_update_rate", dict(router="soft", top_k=4, bias_update_rate=1e-3)),
    ("router_jitter", dict(router="switch", top_k=1, router_jitter=1.5)),
    ("routed_scaling_factor", dict(routed_scaling_factor=0)),
    ("num_shared_experts", dict(num_shared_experts=-1)),
    ("shared_expert_gate", dict(shared_expert_gate=True)),
    ("dense_hidden", dict(dense_hidden=-5)),
    ("init_std", dict(init_std=0)),
]


@pytest.mark.parametrize("field,overrides", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_field_is_named(field, overrides):
    kw = {**BASE, **overrides}
    with pytest.raises(ValueError) as err:
        MoEConfig(**kw)
    msg = str(err.value)
    assert field in msg
    # the message names the offending value too
    bad_value = overrides.get(field, next(iter(overrides.values())))
    assert repr(bad_value) in msg or str(bad_value) in msg


def test_unknown_router_lists_allowed():
    with pytest.raises(ValueError, match="softmax_topk.*switch.*noisy_topk.*sigmoid.*expert_choice.*soft"):
        MoEConfig(**BASE, router="hash")


def test_unknown_activation_lists_allowed():
    with pytest.raises(ValueError, match="swiglu.*geglu.*gelu.*relu"):
        MoEConfig(**BASE, activation="tanh")


def test_capacity_formula():
    cfg = MoEConfig(**{**BASE, "capacity_factor": 1.25, "eval_capacity_factor": 2.0})
    assert cfg.capacity(100, training=True) == 63  # ceil(1.25 * 100 * 2 / 4)
    assert cfg.capacity(100, training=False) == 100  # ceil(2.0 * 100 * 2 / 4) = 100, at most T
    assert cfg.capacity(3, training=True) == 2
    assert MoEConfig(**BASE).capacity(100, training=True) is None
    same = MoEConfig(**{**BASE, "capacity_factor": 1.0})
    assert same.capacity(64, training=False) == same.capacity(64, training=True) == 32
    dropless_eval = MoEConfig(**{**BASE, "capacity_factor": 1.0, "eval_capacity_factor": None})
    assert dropless_eval.capacity(64, training=False) is None


def test_fine_grained_keeps_active_parameters():
    cfg = MoEConfig(d_model=32, expert_hidden=64, num_experts=8, top_k=2)
    fg = cfg.fine_grained(4)
    assert (fg.num_experts, fg.top_k, fg.expert_hidden) == (32, 8, 16)
    assert fg.num_experts * fg.expert_hidden == cfg.num_experts * cfg.expert_hidden
    assert fg.top_k * fg.expert_hidden == cfg.top_k * cfg.expert_hidden
    with pytest.raises(ValueError, match="expert_hidden"):
        cfg.fine_grained(3)


def test_round_trip_dict_and_unknown_field():
    cfg = MoEConfig(**BASE, router="sigmoid", n_group=2, topk_group=1)
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.group_score == "top2_sum"
    with pytest.raises(ValueError, match="num_expert"):
        MoEConfig.from_dict({**BASE, "num_expert": 3})


def test_capacity_is_exact_rational_arithmetic():
    cfg = MoEConfig(d_model=8, expert_hidden=8, num_experts=11, top_k=1, capacity_factor=1.1)
    assert cfg.capacity(100, training=True) == 10  # float arithmetic would give ceil(10.000000000000002) = 11


@pytest.mark.parametrize("overrides", [dict(router="sigmoid", softmax_order="after"),
                                       dict(router="softmax_topk", router_jitter=0.1),
                                       dict(router="noisy_topk", normalize_weights=False)])
def test_options_a_router_would_ignore_are_refused(overrides):
    with pytest.raises(ValueError):
        MoEConfig(**{**BASE, **overrides})
