"""Padding never changes a real token's result, for every routing kind, with and without a capacity.

With a capacity factor or expert-choice routing a token's routing depends on the other real tokens
of its forward pass (the capacity is per batch, by design); padding must never count among them: a
masked-out token takes no capacity slot, is seen by no expert-choice router, and counts in no aux
loss, statistic or balancing load. Checked on the layer (against the reference too), the model's
``attention_mask`` (logits and the eval loss) and both decoders of ``generate``.
"""

import pytest
import torch

from moekit import MoEConfig, ModelConfig, MoETransformer, reference_forward
from moekit.generate import _CompiledDecoder, _EagerDecoder, generate

from conftest import make_layer

TOKEN_CHOICE = {"softmax_topk": {}, "switch": dict(top_k=1), "noisy_topk": {}, "sigmoid": {}, "soft": dict(top_k=4)}
ROUTINGS: dict[str, dict] = {}
for _router, _extra in TOKEN_CHOICE.items():
    ROUTINGS[_router] = dict(router=_router, **_extra)
    ROUTINGS[f"{_router}-cap-position"] = dict(router=_router, capacity_factor=0.75, **_extra)
    ROUTINGS[f"{_router}-cap-score"] = dict(router=_router, capacity_factor=0.75, drop_policy="score", **_extra)
ROUTINGS["expert_choice"] = dict(router="expert_choice", capacity_factor=1.0)
ROUTINGS["expert_choice-half-top1"] = dict(router="expert_choice", capacity_factor=0.5, top_k=1)
DROPLESS = [n for n, kw in ROUTINGS.items() if kw.get("capacity_factor") is None]


def _losses(kw: dict) -> dict:
    """Every aux term the routing allows, and the aux-loss-free load where it applies."""
    if kw["router"] == "expert_choice":
        return dict(z_loss_coef=1e-3)
    extra = dict(aux_loss_coef=0.01, z_loss_coef=1e-3, seq_aux_loss_coef=0.01)
    if kw["router"] != "soft":
        extra["bias_update_rate"] = 1e-3
    return extra


def _layer(name: str):
    kw = ROUTINGS[name]
    return make_layer(**kw, **_losses(kw))


def _stats_equal(a, b):
    for k, v in a.stats.__dict__.items():
        torch.testing.assert_close(v, b.stats.__dict__[k], rtol=1e-12, atol=1e-12, msg=lambda m: f"stats.{k}: {m}")
    assert set(a.aux_terms) == set(b.aux_terms)
    for k in a.aux_terms:
        torch.testing.assert_close(a.aux_terms[k], b.aux_terms[k], rtol=1e-12, atol=1e-14, msg=lambda m: f"{k}: {m}")


# ---- the layer -----------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(ROUTINGS))
def test_left_padding_changes_nothing_in_the_layer(name, training):
    """One sequence left-padded with random rows, masked: outputs, aux losses, statistics, gradients and
    the balancing load of its real tokens equal those of the sequence alone."""
    layer = _layer(name).train(training)
    n, pad, D = 9, 5, layer.cfg.d_model
    x_real = torch.randn(1, n, D, dtype=torch.float64)
    x_pad = torch.cat([torch.randn(1, pad, D, dtype=torch.float64) * 3, x_real], dim=1)
    mask = torch.ones(1, pad + n, dtype=torch.bool)
    mask[0, :pad] = False
    g = torch.randn(1, n, D, dtype=torch.float64)

    def run(x, m):
        layer.zero_grad(set_to_none=True)
        if hasattr(layer.router, "load_since_update"):
            layer.router.load_since_update.zero_()
        torch.manual_seed(3)  # the same noise draws (noisy top-k, jitter): both route n tokens
        res = layer(x, m)
        ((res.output[:, -n:] * g).sum() + res.aux_loss).backward()
        grads = {k: p.grad.clone() for k, p in layer.named_parameters() if p.grad is not None}
        load = layer.router.load_since_update.clone() if hasattr(layer.router, "load_since_update") else None
        return res, grads, load

    alone, grads_alone, load_alone = run(x_real, None)
    padded, grads_padded, load_padded = run(x_pad, mask)
    torch.testing.assert_close(padded.output[:, pad:], alone.output, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(padded.aux_loss, alone.aux_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(padded.router_logits[pad:], alone.router_logits, rtol=0, atol=0)
    assert (padded.router_logits[:pad] == 0).all()
    assert (padded.output[:, :pad] == 0).all()  # no shared / dense experts here: padding's output is zero
    _stats_equal(padded, alone)
    assert set(grads_padded) == set(grads_alone)
    for k in grads_alone:
        torch.testing.assert_close(grads_padded[k], grads_alone[k], rtol=1e-10, atol=1e-12, msg=lambda m: f"{k}: {m}")
    if load_alone is not None:
        assert torch.equal(load_padded, load_alone) and (load_alone.sum() > 0) == training


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(ROUTINGS))
def test_masked_layer_equals_reference(name, training):
    """A batch with padding in two rows (and none in the third) against the slow reference."""
    layer = _layer(name).train(training)
    if layer.cfg.router == "sigmoid":
        layer.router.expert_bias.copy_(torch.linspace(-0.3, 0.3, layer.cfg.num_experts))
    x = torch.randn(3, 8, layer.cfg.d_model, dtype=torch.float64)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, :3] = False
    mask[1, :7] = False
    torch.manual_seed(5)
    fast = layer(x, mask)
    torch.manual_seed(5)
    ref = reference_forward(layer, x, mask)
    torch.testing.assert_close(fast.output, ref.output, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(fast.aux_loss, ref.aux_loss, rtol=1e-9, atol=1e-12)
    assert fast.stats.tokens_per_expert.tolist() == ref.tokens_per_expert
    assert fast.stats.routed_per_expert.tolist() == ref.routed_per_expert
    assert int(fast.stats.dropped_assignments) == ref.dropped_assignments
    assert int(fast.stats.dropped_tokens) == ref.dropped_tokens
    assert all(bool(mask.view(-1)[t]) for t, _ in ref.assignments)  # no expert ran a padding row
    for k in ref.aux_terms:
        torch.testing.assert_close(fast.aux_terms[k], torch.as_tensor(ref.aux_terms[k], dtype=fast.aux_terms[k].dtype))


@pytest.mark.parametrize("policy", ["position", "score"])
def test_padding_takes_no_capacity(policy):
    """Padding rows that route exactly as the first real token, ahead of it: unmasked they fill its
    expert's slots and drop it; masked, capacity counts the real tokens only and the token is kept."""
    layer = make_layer(top_k=1, capacity_factor=1.0, drop_policy=policy).eval()
    n, pad = 4, 4
    x_real = torch.randn(n, layer.cfg.d_model, dtype=torch.float64)
    x_pad = torch.cat([x_real[:1].expand(pad, -1), x_real])
    mask = torch.arange(pad + n) >= pad
    unmasked = layer(x_pad)
    assert int(unmasked.stats.dropped_tokens) > 0 and (unmasked.output[pad] == 0).all()  # the trap is real
    masked, alone = layer(x_pad, mask), layer(x_real)
    assert (masked.output[pad] != 0).any()
    torch.testing.assert_close(masked.output[pad:], alone.output, rtol=0, atol=0)
    assert masked.stats.routed_per_expert.sum() == n


def test_all_padding_and_bad_masks():
    layer = make_layer(num_shared_experts=1, capacity_factor=1.0, aux_loss_coef=0.01)
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    res = layer(x, torch.zeros(2, 3, dtype=torch.bool))
    torch.testing.assert_close(res.output, layer.shared(x))  # only the shared expert runs on padding
    assert res.aux_loss.item() == 0 and res.aux_terms == {} and int(res.stats.routed_per_expert.sum()) == 0
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(2, 3\)"):
        layer(x, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"got torch.bool \(6,\)"):
        layer(x, torch.ones(6, dtype=torch.bool))


# ---- the model: attention_mask, the eval loss ------------------------------------------------------
def _model(name: str) -> MoETransformer:
    kw = ROUTINGS[name]
    moe = MoEConfig(d_model=32, expert_hidden=16, num_experts=4, top_k=kw.get("top_k", 2),
                    **{k: v for k, v in kw.items() if k != "top_k"}, **_losses(kw))
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, moe=moe, ffn_hidden=64)
    torch.manual_seed(0)
    model = MoETransformer(cfg).double().eval()
    with torch.no_grad():  # sharper weights than the init: routing and greedy choices far from ties
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4)
    return model


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_left_padded_prompt_equals_prompt_alone(name):
    """Logits, eval loss (padding targets ignored), aux losses and routing statistics of a left-padded
    prompt equal those of the prompt alone."""
    model = _model(name)
    n, pad = 11, 6
    ids = torch.randint(0, 64, (1, n))
    padded = torch.cat([torch.randint(0, 64, (1, pad)), ids], dim=1)
    mask = torch.arange(pad + n)[None] >= pad
    targets = torch.randint(0, 64, (1, n))
    targets_padded = torch.cat([torch.full((1, pad), -100), targets], dim=1)
    with torch.no_grad():
        alone = model(ids, targets=targets, return_logits=True)
        got = model(padded, targets=targets_padded, attention_mask=mask, return_logits=True)
    torch.testing.assert_close(got.logits[:, pad:], alone.logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.ce_loss, alone.ce_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.aux_loss, alone.aux_loss, rtol=1e-10, atol=1e-12)
    for layer, st in alone.routing.items():
        for k, v in st.__dict__.items():
            torch.testing.assert_close(got.routing[layer].__dict__[k], v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", DROPLESS)
def test_dropless_prompt_in_a_padded_batch_equals_alone(name):
    """Dropless routing: a token's result is its own, so a short prompt batched (left-padded) with a
    longer one gives exactly its logits alone."""
    model = _model(name)
    short, long = torch.randint(0, 64, (1, 5)), torch.randint(0, 64, (1, 12))
    batch = torch.cat([torch.cat([torch.zeros(1, 7, dtype=torch.long), short], dim=1), long])
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, :7] = False
    with torch.no_grad():
        got = model(batch, attention_mask=mask).logits
        torch.testing.assert_close(got[:1, 7:], model(short).logits, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got[1:], model(long).logits, rtol=1e-10, atol=1e-10)


# ---- generate: both decoders --------------------------------------------------------------------
@torch.no_grad()
def _greedy(model, prompt: list[int], n: int, pad: int = 0, compiled: bool = False):
    """Greedy tokens and the logits of every step for one prompt left-padded by ``pad`` tokens,
    through generate's own decoders."""
    L = pad + len(prompt)
    ids = torch.tensor([[7] * pad + prompt])
    mask = torch.zeros(1, L + n, dtype=torch.bool)
    mask[0, pad:] = True
    decoder = (_CompiledDecoder if compiled else _EagerDecoder)(model, ids, mask, pad > 0)
    logits, tokens = [decoder.prefill()], []
    for step in range(n):
        tokens.append(int(logits[-1].argmax(-1)))
        if step + 1 < n:
            logits.append(decoder.step(torch.tensor([tokens[-1]]), step))
    return tokens, torch.cat(logits)


COMPILED = ["softmax_topk", "sigmoid-cap-score", "expert_choice"]  # one a path of the compiled decode step


@pytest.mark.parametrize("name, compiled", [pytest.param(n, False, id=f"{n}-eager") for n in ROUTINGS] + [
    pytest.param(n, True, marks=pytest.mark.slow, id=f"{n}-compiled") for n in COMPILED])
def test_generate_left_padded_prompt_equals_alone(name, compiled):
    """A prompt left-padded in a batch of one continues with the tokens and logits of the prompt alone,
    capacity or not (the batch holds the same real tokens). Compiled decoding: one case per path
    (experts read in place, the capacity loop, expert choice)."""
    model = _model(name)
    prompt = torch.randint(0, 64, (6,)).tolist()
    tokens, logits = _greedy(model, prompt, 8, compiled=compiled)
    tokens_pad, logits_pad = _greedy(model, prompt, 8, pad=5, compiled=compiled)
    assert tokens_pad == tokens
    torch.testing.assert_close(logits_pad, logits, rtol=1e-10, atol=1e-10)
    if not compiled:
        assert generate(model, [prompt], 8).tokens[0] == tokens


@pytest.mark.parametrize("name", DROPLESS)
def test_generate_dropless_prompt_in_a_batch_equals_alone(name):
    model = _model(name)
    prompts = [torch.randint(0, 64, (n,)).tolist() for n in (3, 10)]
    batch = generate(model, prompts, 8).tokens
    assert batch == [generate(model, [p], 8).tokens[0] for p in prompts]


# ---- expert parallelism ---------------------------------------------------------------------------
EP_CASES = {"dropless": ({}, (10, 8)), "capacity": (dict(capacity_factor=0.6), (10, 10)),
            "capacity_uneven": (dict(capacity_factor=0.6), (10, 8))}


def _ep_worker(rank, world, store, case, out):
    import json
    import os

    import torch.distributed as dist

    from moekit import MoELayer
    from moekit.dist import init_distributed
    from moekit.dist.ep import shard_experts

    os.environ.pop("WORLD_SIZE", None)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    dims = init_distributed(world)
    extra, real = EP_CASES[case]
    torch.manual_seed(0)
    ref = MoELayer(MoEConfig(d_model=16, expert_hidden=8, num_experts=4, top_k=2, aux_loss_coef=0.05,
                             **extra)).double().train()
    layer = MoELayer(ref.cfg).double().train()
    layer.load_state_dict(ref.state_dict())
    shard_experts(layer, dims)
    x_G = torch.randn(world, 2, 6, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mask_G = torch.ones(world, 2, 6, dtype=torch.bool)
    for r, n in enumerate(real):  # rank r: n real tokens, the padding at the start of its first row
        mask_G[r, 0, :12 - n] = False
    want = ref(x_G.reshape(world * 2, 6, 16), mask_G.reshape(world * 2, 6))
    try:
        got = layer(x_G[rank], mask_G[rank])
    except ValueError as err:
        result = {"error": str(err)}
    else:
        result = {"output": (got.output - want.output.view(world, 2, 6, 16)[rank]).abs().max().item(),
                  "load_balancing": abs(got.aux_terms["load_balancing"].item()
                                        - want.aux_terms["load_balancing"].item()),
                  "dropped": int(want.stats.dropped_assignments)}
    dist.barrier()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.parametrize("case", list(EP_CASES))
def test_masked_layer_under_expert_parallelism(tmp_path, case):
    """Each rank's real tokens routed over the EP group equal one process routing the whole masked batch;
    a capacity with ranks holding different numbers of real tokens is refused by name."""
    import json

    import torch.multiprocessing as mp

    out = tmp_path / "result.json"
    mp.start_processes(_ep_worker, args=(2, str(tmp_path / "store"), case, str(out)), nprocs=2,
                       start_method="spawn", join=True)
    result = json.loads(out.read_text())
    if case == "capacity_uneven":
        assert "same number of tokens on every rank (real tokens" in result["error"]
        return
    if case == "capacity":
        assert result.pop("dropped") > 0
    result.pop("dropped", None)
    assert result["output"] < 1e-12 and result["load_balancing"] < 1e-12, result
