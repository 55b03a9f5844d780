import pytest
import torch

from moekit import MoEConfig, MoELayer


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_layer(dtype=torch.float64, std=0.3, **overrides) -> MoELayer:
    """A tiny layer with weights large enough that routing and activations are far from trivial."""
    kw = dict(d_model=16, expert_hidden=8, num_experts=4, top_k=2)
    kw.update(overrides)
    layer = MoELayer(MoEConfig(**kw)).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, std)
    return layer


def grads_of(layer, x, fn):
    """Runs fn(layer, x) -> (output, aux_loss), backprops a fixed random cotangent, returns all grads."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out, aux = fn(layer, x)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(123))
    ((out * g).sum() + aux).backward()
    named = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in layer.named_parameters()}
    named["<input>"] = x.grad.clone()
    return out.detach(), aux.detach(), named
