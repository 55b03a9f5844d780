"""The one parameter initialisation every moekit module uses (:func:`init_weights`)."""

from __future__ import annotations

import torch
from torch import nn

from moekit.nn.norm import LayerNorm, RMSNorm

# Output projections into the residual stream: drawn with ``out_std``.
RESIDUAL_OUTPUTS = ("o_proj", "down_proj")

# Parameters and buffers that moekit's own modules hold outside an nn.Linear, by name (the routers' gate
# and balancing state, the stacked experts): "std", "out_std", "router_std" draw N(0, that std²); "zero" zeroes.
OWN_TENSORS = {
    "weight_ED": "router_std",  # a router's gate
    "noise_weight_ED": "zero",  # the noisy gate's noise weights: softplus(0) noise scale, as the paper's code
    "expert_bias": "zero",  # the aux-loss-free selection bias (DeepSeek-V3) and the load counted for it
    "load_since_update": "zero",
    "w_in": "std",  # the experts' [E, H, D] first projection
    "w_out": "out_std",  # the experts' [E, D, F] output projection, into the residual stream
    "b_in": "zero",
    "b_out": "zero",
}


@torch.no_grad()
def init_weights(module: nn.Module, std: float, out_std: float | None = None, router_std: float | None = None) -> None:
    """Initialises every parameter of ``module`` and its submodules (GPT-2's scheme, as in nanoGPT):

    * embeddings, linear weights and the experts' ``w_in``: N(0, std²) (GPT-2, Mixtral and DeepSeek
      use 0.02: the configs' ``init_std``);
    * the output projections into the residual stream (``o_proj``, ``down_proj``, the experts'
      ``w_out``): N(0, out_std²); the model passes std / sqrt(2 · n_layers), GPT-2's residual scaling,
      so the residual stream's variance does not grow with depth (default: std);
    * the routers' gate ``weight_ED``: N(0, router_std²) (the model passes its MoEConfig's init_std;
      default: std);
    * biases zero, norm weights one, the noisy gate's noise weights zero, the routers' selection bias
      and load counts zero.

    NOTE: the draws run in ``named_modules()`` order and each module's tensors in registration order.
    That order fixes every value for a seed, and saved runs and tests rely on it (tests/test_init.py).
    """
    out_std = std if out_std is None else out_std
    router_std = std if router_std is None else router_std
    stds = {"std": std, "out_std": out_std, "router_std": router_std}
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=out_std if name.endswith(RESIDUAL_OUTPUTS) else std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (RMSNorm, LayerNorm)):
            nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        else:
            for key, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
                rule = OWN_TENSORS.get(key)
                if rule == "zero":
                    t.zero_()
                elif rule is not None:
                    nn.init.normal_(t, std=stds[rule])
