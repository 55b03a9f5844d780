"""Top-p routing, null experts, the entropy loss, compute-per-token statistics and the router learning
rate: the layer against the slow reference (outputs, aux losses and gradients in float64), and each
option trained through ``moekit train --set moe.…``."""

import json

import pytest
import torch

from moekit import MoEConfig, reference_forward

from conftest import grads_of, make_layer
from test_layer import _fast, _ref

CASES = {
    "top_p_paper": dict(router="top_p", top_k=4, top_p_threshold=0.5, normalize_weights=False),
    "top_p_renorm_aux": dict(router="top_p", top_k=3, top_p_threshold=0.6, aux_loss_coef=0.01),
    "top_p_capacity": dict(router="top_p", top_k=3, top_p_threshold=0.6, capacity_factor=0.5),
    "top_p_capacity_score_entropy": dict(router="top_p", top_k=4, top_p_threshold=0.7, capacity_factor=0.75,
                                         drop_policy="score", aux_loss_coef=0.01, router_entropy_coef=0.1),
    "entropy_softmax_topk": dict(router_entropy_coef=0.05, z_loss_coef=1e-3),
    "null_zero": dict(num_null_experts=2, top_k=3, aux_loss_coef=0.01),
    "null_identity_capacity": dict(num_null_experts=2, top_k=3, null_expert="identity", capacity_factor=0.5,
                                   aux_loss_coef=0.01, seq_aux_loss_coef=0.01),
    "null_sigmoid_bias": dict(router="sigmoid", num_null_experts=2, top_k=2, bias_update_rate=1e-3,
                              aux_loss_coef=0.01),
    "null_top_p_identity": dict(router="top_p", num_null_experts=3, top_k=3, top_p_threshold=0.5,
                                null_expert="identity", aux_loss_coef=0.01, capacity_factor=1.0),
    "relu": dict(router="relu", relu_l1_init=0.05),
    "relu_capacity_aux": dict(router="relu", num_experts=6, top_k=2, capacity_factor=0.75, aux_loss_coef=0.01,
                              z_loss_coef=1e-3, routed_scaling_factor=2.0),
    "relu_capacity_score": dict(router="relu", capacity_factor=0.5, drop_policy="score", mlp_bias=True),
}


def _layer(name):
    layer = make_layer(**CASES[name])
    if layer.cfg.router == "sigmoid":  # a selection bias that moves choices onto and off the null experts
        layer.router.expert_bias.copy_(torch.linspace(-0.3, 0.3, layer.cfg.num_routed))
    return layer


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(CASES))
def test_routing_option_matches_reference(name, training):
    layer = _layer(name).train(training)
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    out, aux, grads = grads_of(layer, x, _fast)
    out_ref, aux_ref, grads_ref = grads_of(layer, x, _ref)
    torch.testing.assert_close(out, out_ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(aux, aux_ref, rtol=1e-9, atol=1e-12)
    for key in grads_ref:
        torch.testing.assert_close(grads[key], grads_ref[key], rtol=1e-8, atol=1e-10, msg=lambda m: f"{key}: {m}")

    fast, ref = layer(x), reference_forward(layer, x)
    assert set(fast.aux_terms) == set(ref.aux_terms)
    for k in ref.aux_terms:
        torch.testing.assert_close(fast.aux_terms[k], ref.aux_terms[k], rtol=1e-9, atol=1e-12)
    assert fast.stats.tokens_per_expert.tolist() == ref.tokens_per_expert
    assert fast.stats.routed_per_expert.tolist() == ref.routed_per_expert
    assert int(fast.stats.dropped_assignments) == ref.dropped_assignments
    assert int(fast.stats.dropped_tokens) == ref.dropped_tokens
    # compute per token: experts computed (null choices and drops excluded), mean and histogram
    slots = layer.cfg.num_experts if layer.cfg.router == "relu" else layer.cfg.top_k
    hist = torch.bincount(torch.tensor(ref.experts_per_token), minlength=slots + 1)
    assert fast.stats.experts_per_token_hist.tolist() == hist.tolist()
    assert float(fast.stats.experts_per_token) == pytest.approx(sum(ref.experts_per_token) / 24)


def test_top_p_takes_a_variable_number_of_experts():
    layer = make_layer(router="top_p", num_experts=8, top_k=8, top_p_threshold=0.6, std=1.0)
    x = torch.randn(64, 16, dtype=torch.float64)
    r = layer.router(x)
    n_T = r.active_TK.sum(dim=1)
    assert n_T.min() >= 1 and len(set(n_T.tolist())) > 1  # easy tokens take fewer experts than hard ones
    # slots in use reach the threshold, and without the last one they would not
    mass_T = (r.probs_TE.gather(1, r.expert_ids_TK) * r.active_TK).sum(dim=1)
    last_T = r.probs_TE.gather(1, r.expert_ids_TK).gather(1, (n_T - 1)[:, None]).squeeze(1)
    assert bool((mass_T >= 0.6 - 1e-12).all()) and bool((mass_T - last_T < 0.6).all())
    stats = layer(x).stats
    assert float(stats.experts_per_token) == pytest.approx(float(n_T.double().mean()))
    # threshold 1 with K = E is dense soft-max gating's support; a tiny threshold is top-1
    one = make_layer(router="top_p", top_k=4, top_p_threshold=1e-6)
    assert one(x).stats.experts_per_token_hist.tolist() == [0, 64, 0, 0, 0]


def test_null_experts_cost_no_dispatch(monkeypatch):
    layer = make_layer(num_null_experts=4, top_k=3)
    seen = []
    run = type(layer.experts).forward

    def spy(self, x_TD, plan):
        seen.append(plan)
        return run(self, x_TD, plan)

    monkeypatch.setattr(type(layer.experts), "forward", spy)
    x = torch.randn(40, 16, dtype=torch.float64)
    res = layer(x)
    r = layer.router(x)
    real = int((r.expert_ids_TK < 4).sum())
    assert 0 < real < 120  # some choices went to null experts
    (plan,) = seen
    assert plan.counts_E.shape == (4,) and int(plan.counts_E.sum()) == real  # the backend computes only these
    assert plan.routed_E.shape == (8,) and int(plan.routed_E.sum()) == 120  # the balance loss counts all
    assert layer.experts.w_in.shape[0] == 4 and layer.router.weight_ED.shape[0] == 8
    assert int(res.stats.dropped_assignments) == 0 and int(res.stats.dropped_tokens) == 0
    assert float(res.stats.experts_per_token) == pytest.approx(real / 40)


def test_all_null_choices_give_zero_or_identity():
    for kind, expect in (("zero", lambda x: torch.zeros_like(x)), ("identity", lambda x: x)):
        layer = make_layer(num_null_experts=2, top_k=2, null_expert=kind)
        with torch.no_grad():  # the null experts (ids 4, 5) win every token
            layer.router.weight_ED.zero_()
            layer.router.weight_ED[4:, 0] = 50.0
        x = torch.randn(10, 16, dtype=torch.float64)
        x[:, 0] = x[:, 0].abs() + 1
        res = layer(x)
        torch.testing.assert_close(res.output, expect(x))  # weights renormalised over the two null choices: 1
        assert res.stats.experts_per_token_hist.tolist() == [10, 0, 0]


def test_masked_padding_and_decoding_keep_null_experts_right():
    layer = make_layer(num_null_experts=2, top_k=2, null_expert="identity").eval()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    res = layer(x, mask)
    ref = reference_forward(layer, x, mask)
    torch.testing.assert_close(res.output, ref.output)
    assert res.router_logits.shape == (12, 6)


@pytest.mark.parametrize("kw, field", [(dict(router="top_p"), "router"), (dict(router="relu"), "router"),
                                       (dict(num_null_experts=1), "num_null_experts")])
def test_expert_parallelism_refuses_variable_compute(kw, field):
    """Refused by name before any layer is sharded: the model stays whole."""
    from moekit.dist.ep import check_shardable, shard_experts
    from moekit.dist.parallel import ParallelDims

    fine, bad = make_layer(), make_layer(**kw)
    model = torch.nn.Sequential(fine, bad)
    w_in = fine.experts.w_in
    with pytest.raises(ValueError, match=f"MoEConfig.{field}=.*expert parallelism"):
        shard_experts(model, ParallelDims(world=2, rank=0, ep=2))
    assert fine.experts.w_in is w_in and fine.dispatcher.holds_all_experts
    check_shardable(make_layer())  # a fixed top-k layer can be sharded


@pytest.mark.parametrize("kw, match", [
    (dict(top_p_threshold=0.0), "top_p_threshold=0.0"),
    (dict(top_p_threshold=1.5), "top_p_threshold=1.5"),
    (dict(router_entropy_coef=-1.0), "router_entropy_coef"),
    (dict(num_null_experts=-1), "num_null_experts=-1"),
    (dict(null_expert="copy"), "null_expert='copy'"),
    (dict(router="top_p", bias_update_rate=1e-3), "bias_update_rate"),
    (dict(router="top_p", seq_aux_loss_coef=0.01), "seq_aux_loss_coef"),
    (dict(router="noisy_topk", num_null_experts=1), "num_null_experts=1"),
    (dict(num_null_experts=2, n_group=2, topk_group=1, top_k=1), "num_null_experts=2"),
    (dict(router="relu", num_null_experts=1), "num_null_experts=1"),
    (dict(router="relu", bias_update_rate=1e-3), "bias_update_rate"),
    (dict(relu_l1_init=0.0), "relu_l1_init=0.0"),
    (dict(relu_l1_growth=1.0), "relu_l1_growth=1.0"),
])
def test_bad_routing_options_are_refused_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(d_model=8, expert_hidden=4, **kw)


def test_old_configs_load_with_todays_behaviour():
    old = {"d_model": 8, "expert_hidden": 4, "num_experts": 4, "top_k": 2}
    cfg = MoEConfig.from_dict(old)
    assert (cfg.router, cfg.num_null_experts, cfg.router_entropy_coef, cfg.num_routed) == ("softmax_topk", 0, 0.0, 4)
    assert cfg.capacity(10, True) is None and cfg.replace(capacity_factor=1.0).capacity(10, True) == 5


def test_null_experts_capacity_counts_them():
    cfg = MoEConfig(d_model=8, expert_hidden=4, num_experts=4, top_k=2, num_null_experts=4, capacity_factor=1.0)
    assert cfg.capacity(16, True) == 4  # ceil(16 · 2 / 8)


def test_relu_l1_coefficient_adapts_toward_the_target_sparsity():
    from moekit.moe.layer import update_expert_biases

    layer = make_layer(router="relu", num_experts=4, top_k=1, relu_l1_init=1e-3, relu_l1_growth=2.0).train()
    x = torch.randn(50, 16, dtype=torch.float64)
    with torch.no_grad():  # every gate positive: sparsity 0 < target 0.75, so the penalty doubles
        layer.router.weight_ED.copy_(torch.zeros_like(layer.router.weight_ED))
        layer.router.weight_ED[:, 0] = 1.0
    x[:, 0] = x[:, 0].abs() + 0.1
    res = layer(x)
    assert res.stats.experts_per_token_hist.tolist() == [0, 0, 0, 0, 50]
    torch.testing.assert_close(res.aux_terms["relu_l1"], torch.relu(layer.router.logits(x)).sum(-1).mean())
    torch.testing.assert_close(res.aux_loss, 1e-3 * res.aux_terms["relu_l1"])
    update_expert_biases(torch.nn.Sequential(layer))
    assert float(layer.router.l1_coef) == pytest.approx(2e-3)
    with torch.no_grad():  # every gate zero: sparsity 1 > 0.75, so it halves
        layer.router.weight_ED.neg_()
    layer(x)
    layer.update_bias()
    assert float(layer.router.l1_coef) == pytest.approx(1e-3)
    layer.eval()(x)  # eval passes do not count
    layer.update_bias()
    assert float(layer.router.l1_coef) == pytest.approx(1e-3)
    assert "router.l1_coef" in layer.state_dict()  # it resumes with the checkpoint


@pytest.mark.parametrize("moe_kw", [dict(router="top_p", top_k=3, top_p_threshold=0.5),
                                    dict(num_null_experts=2, top_k=3, null_expert="identity"),
                                    dict(router="relu")], ids=["top_p", "null", "relu"])
def test_cached_decoding_equals_recomputation(moe_kw):
    from moekit.config import get_preset
    from moekit.generate import generate
    from moekit.model import MoETransformer

    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = MoETransformer(cfg.replace(moe=cfg.moe.replace(**moe_kw))).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, 6))
    got = generate(model, prompt, max_new_tokens=5).tokens[0]
    ids = prompt[0].tolist()
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert got == ids[6:]


# ---- training through the command line ------------------------------------------------------
def _train(tmp_path, corpus_dir, *extra):
    from moekit.cli import main

    out = tmp_path / "run"
    argv = ["train", "--preset", "tiny", "--data", str(corpus_dir), "--out", str(out), "--steps", "4",
            "--batch-size", "2", "--seq-len", "16", "--eval-every", "4", "--eval-tokens", "64", "--save-every", "4",
            "--log-every", "2", "--warmup", "1", "--no-progress", *extra]
    assert main(argv) == 0
    from moekit.train.metrics import read_metrics

    return read_metrics(out / "metrics.jsonl")


@pytest.mark.parametrize("sets", [
    ("moe.router=top_p", "moe.top_k=4", "moe.top_p_threshold=0.5", "moe.router_entropy_coef=1e-4"),
    ("moe.num_null_experts=2", "moe.top_k=3", "moe.null_expert=identity", "moe.aux_loss_coef=0.01"),
    ("moe.router=relu", "moe.relu_l1_init=1e-4"),
], ids=["top_p", "null_experts", "relu"])
def test_training_with_routing_options(tmp_path, corpus_dir, sets):
    args = [a for s in sets for a in ("--set", s)]
    records = [r for r in _train(tmp_path, corpus_dir, *args) if any(k.startswith("moe_") for k in r)]
    assert records
    layer = next(v for k, v in records[-1].items() if k.startswith("moe_"))
    hist = layer["experts_per_token_hist"]
    from moekit.config import get_preset

    E = get_preset("tiny").moe.num_experts
    assert len(hist) == (4 if "moe.top_k=3" in sets else E + 1 if "moe.router=relu" in sets else 5)
    assert sum(hist) > 0
    assert layer["experts_per_token"] == pytest.approx(sum(i * n for i, n in enumerate(hist)) / sum(hist))
    if "moe.router=top_p" in sets:
        assert "aux_router_entropy" in records[-1]
    if "moe.router=relu" in sets:
        assert "aux_relu_l1" in records[-1]
    json.dumps(records)


def test_router_lr_mult_makes_its_own_param_group(tmp_path, corpus_dir):
    from moekit.model import MoETransformer
    from moekit.train.loop import param_groups

    from conftest import tiny_cfg

    cfg = tiny_cfg(tmp_path / "o", corpus_dir, router_lr_mult=0.1)
    from moekit.config import get_preset

    model = MoETransformer(get_preset("tiny"))
    groups = param_groups(model, cfg)
    routers = {id(m.router.weight_ED) for m in model.modules() if hasattr(m, "router")}
    assert len(groups) == 3 and groups[2]["lr_mult"] == 0.1 and {id(p) for p in groups[2]["params"]} == routers
    assert not routers & {id(p) for g in groups[:2] for p in g["params"]}
    assert len(param_groups(model, tiny_cfg(tmp_path / "o", corpus_dir))) == 2  # default: as before
    with pytest.raises(ValueError, match="--router-lr-mult=0"):
        tiny_cfg(tmp_path / "o", corpus_dir, router_lr_mult=0)
    records = _train(tmp_path, corpus_dir, "--router-lr-mult", "0.25")
    cfg_saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert cfg_saved["router_lr_mult"] == 0.25 and records


@pytest.mark.parametrize("moe_kw", [dict(num_null_experts=3), dict(router="top_p", top_k=4), dict(router="relu")],
                         ids=["null", "top_p", "relu"])
def test_routing_report_counts_only_computed_experts(moe_kw):
    """moekit inspect's counts: a null expert's choice and a slot a variable-compute router left unused
    are no assignment; every layer's co-activation diagonal equals its routed load."""
    from moekit import ModelConfig, MoETransformer
    from moekit.insight.routing import collect_routing

    cfg = ModelConfig.from_name("tiny")
    cfg = cfg.replace(moe=cfg.moe.replace(**moe_kw))
    model = MoETransformer(cfg).eval()
    ids_BS = torch.randint(0, cfg.vocab_size, (2, 16))
    data = collect_routing(model, [ids_BS])
    for lr in data.layers.values():
        E = cfg.moe.num_experts
        assert lr.routed_E.shape == (E,) and lr.coact_EE.shape == (E, E)
        assert torch.equal(lr.coact_EE.diagonal(), lr.routed_E)
        if moe_kw.get("router") == "top_p":
            assert int(lr.routed_E.sum()) < cfg.moe.top_k * ids_BS.numel()
