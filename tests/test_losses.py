"""Auxiliary losses against hand-computed values and transformers' Mixtral."""

import math

import pytest
import torch

from moekit.moe.losses import load_balancing_loss, router_z_loss, sequence_balance_loss


def test_perfect_balance_gives_one():
    T, E, K = 8, 4, 2
    probs = torch.full((T, E), 1.0 / E)
    routed = torch.full((E,), T * K // E)
    assert load_balancing_loss(probs, routed, K).item() == pytest.approx(1.0, abs=1e-7)
    assert load_balancing_loss(probs, routed, K, "hf_compat").item() == pytest.approx(K, abs=1e-6)


def test_collapse_gives_num_experts():
    T, E = 10, 8
    probs = torch.zeros(T, E)
    probs[:, 3] = 1.0
    routed = torch.zeros(E, dtype=torch.long)
    routed[3] = T
    assert load_balancing_loss(probs, routed, 1).item() == pytest.approx(E)


def test_hand_computed_example():
    # T=2, E=2, K=1: token 0 -> expert 0 with p=(0.75, 0.25), token 1 -> expert 0 with p=(0.5, 0.5)
    probs = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    routed = torch.tensor([2, 0])
    # f = (1, 0), P = (0.625, 0.375): L = 2 · (1·0.625) = 1.25
    assert load_balancing_loss(probs, routed, 1).item() == pytest.approx(1.25)


def test_z_loss_hand_computed():
    logits = torch.zeros(5, 4)
    assert router_z_loss(logits).item() == pytest.approx(math.log(4) ** 2)
    logits = torch.tensor([[0.0, math.log(3.0)]])  # logsumexp = log 4
    assert router_z_loss(logits).item() == pytest.approx(math.log(4) ** 2, rel=1e-6)


def test_sequence_balance_loss_balanced_and_collapsed():
    B, S, E, K = 2, 4, 4, 1
    probs = torch.full((B, S, E), 0.25)
    ids = torch.arange(4).view(1, 4, 1).expand(B, S, K)
    assert sequence_balance_loss(probs, ids).item() == pytest.approx(1.0)
    collapsed = torch.zeros(B, S, E)
    collapsed[..., 0] = 1
    assert sequence_balance_loss(collapsed, torch.zeros(B, S, K, dtype=torch.long)).item() == pytest.approx(E)


def test_hf_compat_equals_transformers_mixtral():
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    T, E, K = 37, 8, 2
    logits = torch.randn(T, E)
    probs = logits.softmax(-1)
    routed = torch.bincount(probs.topk(K, dim=-1).indices.flatten(), minlength=E)
    ours = load_balancing_loss(probs, routed, K, "hf_compat")
    theirs = mixtral.load_balancing_loss_func((logits,), num_experts=E, top_k=K)
    torch.testing.assert_close(ours, theirs)
    # and the standard convention is the same value divided by K
    torch.testing.assert_close(load_balancing_loss(probs, routed, K), theirs / K)


def test_losses_run_in_fp32_for_bf16_inputs():
    probs = torch.full((4, 2), 0.5, dtype=torch.bfloat16)
    assert load_balancing_loss(probs, torch.tensor([4, 4]), 2).dtype == torch.float32
    assert router_z_loss(torch.zeros(3, 2, dtype=torch.bfloat16)).dtype == torch.float32
