"""One initialisation (moekit.nn.initialize.init_weights) that draws exactly what the code before it drew.

Seeded models, saved runs and tests depend on every initial value, so the order of the random draws is
part of the contract. ``_FROZEN`` is the initialisation as it stood before init_weights (the model's walk,
the layer's, the experts' and the router's own resets), kept here verbatim: a model built through it and
one built through the code of today, from the same seed, must agree bit for bit, and so must the
generator's state after them (no draw more, none fewer).
"""

import math

import pytest
import torch
from torch import nn

from moekit.config import MoEConfig, ModelConfig
from moekit.model import MoETransformer
from moekit.moe.experts import Experts
from moekit.moe.layer import MoELayer
from moekit.moe.routers import Router, build_router


@torch.no_grad()
def _frozen_model_init(self):
    cfg = self.cfg
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
    for name, module in self.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            is_out = name.endswith(("o_proj", "down_proj"))
            nn.init.normal_(module.weight, std=out_std if is_out else std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif hasattr(module, "weight") and module.__class__.__name__ in ("RMSNorm", "LayerNorm"):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, MoELayer):
            module.router.reset_parameters()
            if hasattr(module.router, "expert_bias"):
                module.router.expert_bias.zero_()
                module.router.load_since_update.zero_()
            nn.init.normal_(module.experts.w_in, std=std)
            nn.init.normal_(module.experts.w_out, std=out_std)
            for b in (module.experts.b_in, module.experts.b_out):
                if b is not None:
                    nn.init.zeros_(b)


def _frozen_layer_reset(self):
    for m in self.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=self.cfg.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    self.router.reset_parameters()
    self.experts.reset_parameters()


def _frozen_experts_reset(self):
    nn.init.normal_(self.w_in, std=self.cfg.init_std)
    nn.init.normal_(self.w_out, std=self.cfg.init_std)
    for b in (self.b_in, self.b_out):
        if b is not None:
            nn.init.zeros_(b)


def _frozen_router_reset(self):
    nn.init.normal_(self.weight_ED, std=self.cfg.init_std)


_FROZEN = {(MoETransformer, "init_weights"): _frozen_model_init, (MoELayer, "reset_parameters"): _frozen_layer_reset,
           (Experts, "reset_parameters"): _frozen_experts_reset, (Router, "reset_parameters"): _frozen_router_reset}

_SMALL_MOE = dict(d_model=32, expert_hidden=16, num_experts=4, top_k=2)
_LAYER_MOE = MoEConfig(d_model=16, expert_hidden=8, num_experts=4, top_k=2, num_shared_experts=1,
                       shared_expert_gate=True, dense_hidden=12, mlp_bias=True, init_std=0.03)
BUILDS = {
    "dense": lambda: MoETransformer(ModelConfig.from_name("tiny-dense")),
    "moe": lambda: MoETransformer(ModelConfig.from_name("tiny")),
    "shared": lambda: MoETransformer(ModelConfig.from_name("demo-dense").replace(moe=MoEConfig(
        d_model=256, expert_hidden=128, num_experts=64, top_k=6, num_shared_experts=2))),
    # every rule at once: MLA, LayerNorm with sandwich norms, the Arctic residual MLP, a dense prefix,
    # biases, a gated shared expert, a parallel dense FFN, the noisy gate, and an MoE init_std of its own
    "every_rule": lambda: MoETransformer(ModelConfig(
        vocab_size=64, d_model=32, n_layers=3, n_heads=4, ffn_hidden=48, attention="mla", q_lora_rank=8,
        kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, norm="layernorm", sandwich_norm=True,
        parallel_residual_mlp=True, first_k_dense=1,
        moe=MoEConfig(**_SMALL_MOE, router="noisy_topk", num_shared_experts=1, shared_expert_gate=True,
                      dense_hidden=8, mlp_bias=True, init_std=0.05))),
    "gqa_qk_norm_sigmoid": lambda: MoETransformer(ModelConfig(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm="full", qkv_bias=True,
        moe=MoEConfig(**_SMALL_MOE, router="sigmoid", num_shared_experts=2))),
    "layer": lambda: MoELayer(_LAYER_MOE),
    "experts": lambda: Experts(_LAYER_MOE),
    "router": lambda: build_router(_LAYER_MOE),
}


def _build(name: str, seed: int):
    torch.manual_seed(seed)
    module = BUILDS[name]()
    return module.state_dict(), torch.get_rng_state()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(-1).view(torch.uint8)


@pytest.mark.parametrize("name", list(BUILDS))
def test_init_draws_what_it_always_drew(name, monkeypatch):
    new_sd, new_rng = _build(name, seed=1234)
    for (cls, attr), frozen in _FROZEN.items():
        monkeypatch.setattr(cls, attr, frozen)
    old_sd, old_rng = _build(name, seed=1234)
    assert list(new_sd) == list(old_sd)
    for key, old in old_sd.items():
        new = new_sd[key]
        assert new.dtype == old.dtype and new.shape == old.shape, key
        assert torch.equal(_bits(new), _bits(old)), f"{name}: {key} differs from the frozen initialisation"
    assert torch.equal(new_rng, old_rng), f"{name}: initialisation drew a different amount of random numbers"


def test_init_weights_rules():
    """The scheme its docstring states, on a model whose stds differ: embeddings and linears N(0, std²),
    residual outputs N(0, (std / sqrt(2 · n_layers))²), routers N(0, moe.init_std²), biases zero,
    norms one, balancing state zero."""
    cfg = ModelConfig(vocab_size=512, d_model=64, n_layers=8, n_heads=4, ffn_hidden=128, first_k_dense=1,
                      init_std=0.1, moe=MoEConfig(d_model=64, expert_hidden=64, num_experts=32, top_k=2,
                                                  mlp_bias=True, init_std=0.5))
    model = MoETransformer(cfg)
    for name, p in model.named_parameters():
        if name.endswith(("bias", "b_in", "b_out")):
            assert not p.any(), name
        elif "norm" in name:
            assert (p == 1).all(), name
        else:
            want = 0.5 if "router" in name else 0.1 / 4 if ("o_proj" in name or "down_proj" in name
                                                           or "w_out" in name) else 0.1
            assert p.std().item() == pytest.approx(want, rel=0.1), name
    for layer in model.moe_layers:
        assert not layer.router.expert_bias.any() and not layer.router.load_since_update.any()
