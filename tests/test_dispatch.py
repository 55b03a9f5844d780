"""Property tests of dispatch planning (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.moe.dispatch import plan_expert_choice, plan_token_choice


@st.composite
def routings(draw):
    E = draw(st.integers(1, 9))
    K = draw(st.integers(1, E))
    T = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    # distinct experts per token, like a real top-k
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    weights = torch.rand(T, K, generator=g, dtype=torch.float64)
    priority = torch.rand(T, K, generator=g, dtype=torch.float64)
    capacity = draw(st.one_of(st.none(), st.integers(1, T)))
    policy = draw(st.sampled_from(["position", "score"]))
    return ids, weights, priority, E, capacity, policy


@settings(max_examples=150, deadline=None)
@given(routings())
def test_plan_is_a_permutation_round_trip(r):
    ids, weights, priority, E, capacity, policy = r
    T, K = ids.shape
    plan = plan_token_choice(ids, weights, E, capacity, priority, policy)
    # every (token, slot) appears exactly once
    assert sorted(plan.order_N.tolist()) == list(range(T * K))
    assert torch.equal(plan.token_ids_N, plan.order_N // K)
    assert torch.equal(plan.weights_N, weights.reshape(-1)[plan.order_N])
    # dispatch then combine with the inverse permutation is exact
    x = torch.randn(T, K, 3, dtype=torch.float64).reshape(T * K, 3)
    dispatched = x[plan.order_N]
    back = torch.empty_like(dispatched)
    back[plan.order_N] = dispatched
    assert torch.equal(back, x)
    # kept rows are grouped by expert, in expert order
    kept = int(plan.counts_E.sum())
    experts = ids.reshape(-1)[plan.order_N[:kept]]
    assert torch.equal(experts, torch.repeat_interleave(torch.arange(E), plan.counts_E))


@settings(max_examples=150, deadline=None)
@given(routings())
def test_dropped_counts_match_capacity(r):
    ids, weights, priority, E, capacity, policy = r
    T, K = ids.shape
    plan = plan_token_choice(ids, weights, E, capacity, priority, policy)
    routed = torch.bincount(ids.reshape(-1), minlength=E)
    assert torch.equal(plan.routed_E, routed)
    expected_kept = routed if capacity is None else routed.clamp(max=capacity)
    assert torch.equal(plan.counts_E, expected_kept)
    dropped = T * K - int(plan.counts_E.sum())
    expected_dropped = 0 if capacity is None else int((routed - capacity).clamp(min=0).sum())
    assert dropped == expected_dropped


@settings(max_examples=100, deadline=None)
@given(routings())
def test_drop_policy_keeps_the_right_assignments(r):
    ids, weights, priority, E, capacity, policy = r
    if capacity is None:
        return
    T, K = ids.shape
    plan = plan_token_choice(ids, weights, E, capacity, priority, policy)
    kept = set(plan.order_N[: int(plan.counts_E.sum())].tolist())
    flat_ids, flat_prio = ids.reshape(-1), priority.reshape(-1)
    for e in range(E):
        mine = [i for i in range(T * K) if flat_ids[i] == e]
        if policy == "position":
            want = set(mine[:capacity])  # earliest tokens first
        else:
            want = set(sorted(mine, key=lambda i: (-flat_prio[i].item(), i))[:capacity])
        assert kept.intersection(mine) == want


def test_expert_choice_plan():
    tok = torch.tensor([[0, 2], [1, 2], [3, 0]])
    w = torch.rand(3, 2)
    plan = plan_expert_choice(tok, w, num_tokens=4)
    assert plan.counts_E.tolist() == [2, 2, 2]
    assert plan.token_ids_N.tolist() == [0, 2, 1, 2, 3, 0]
    assert plan.order_N is None
