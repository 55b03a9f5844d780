import os

# The probe (moekit.moe.backends.probe) times candidates on first use: the tests run the fixed rules
# instead, so they take the same paths on every machine; tests/test_probe.py turns it on where it tests it.
os.environ["MOEKIT_PROBE"] = "0"

import pytest  # noqa: E402
import torch  # noqa: E402

from moekit import MoEConfig, MoELayer  # noqa: E402

TEXT = "def add(a, b):\n    return a + b  # the sum\n\nclass Point:\n    x: int = 0\n" * 40


def write_corpus(d):
    """Twelve small Python-like files: a corpus that trains the tiny preset in seconds."""
    d.mkdir()
    for i in range(12):
        (d / f"f{i:02d}.py").write_text(TEXT.replace("Point", f"Point{i}") * (1 + i % 3))
    return d


@pytest.fixture
def corpus_dir(tmp_path):
    return write_corpus(tmp_path / "corpus")


def tiny_cfg(out, data, **kw):
    from moekit.train import TrainConfig

    base = dict(preset="tiny", data=str(data), out=str(out), steps=24, batch_size=4, seq_len=32, eval_every=8,
                eval_tokens=512, save_every=6, log_every=4, warmup=min(4, kw.get("steps", 24)), val_fraction=0.2)
    return TrainConfig(**{**base, **kw})


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


def sharded_pair(cfg, dims):
    """A fp64 MoE layer in training mode (a random selection bias for the sigmoid router) and a copy of it
    whose experts are sharded over ``dims``' expert-parallel group: the two sides of an EP equivalence test."""
    import torch

    from moekit import MoELayer
    from moekit.dist.ep import shard_experts

    ref = MoELayer(cfg).double().train()
    if cfg.router == "sigmoid":
        with torch.no_grad():
            ref.router.expert_bias.copy_(torch.randn(cfg.num_experts, dtype=torch.float64) * 0.1)
    layer = MoELayer(cfg).double().train()
    layer.load_state_dict(ref.state_dict())
    shard_experts(layer, dims)
    return ref, layer
