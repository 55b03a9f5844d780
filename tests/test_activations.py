"""The activation registry (moekit.nn.activations) against everything that names activations: the configs,
every expert backend (the C++ loop keeps its own switch over the names) and the references."""

import pytest
import torch

from moekit import MoEConfig, ModelConfig, reference_forward
from moekit.config import ACTIVATIONS
from moekit.cpu import build
from moekit.moe import backends
from moekit.moe.backends.gather import gather_experts
from moekit.moe.backends.loop import _ACT_KERNELS
from moekit.nn import activations
from moekit.nn.activations import REGISTRY, reference_act
from moekit.nn.mlp import MLP

from conftest import grads_of, make_layer

has_native = build.load() is not None


def test_the_configs_accept_exactly_the_registry():
    assert ACTIVATIONS == tuple(REGISTRY)
    for name in REGISTRY:
        assert MoEConfig(d_model=8, expert_hidden=4, activation=name).gated == REGISTRY[name].gated
        ModelConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=2, ffn_hidden=4, activation=name)
    with pytest.raises(ValueError, match=r"MoEConfig\.activation='tanh' is invalid: allowed values are "
                       + ", ".join(repr(n) for n in REGISTRY)):
        MoEConfig(d_model=8, expert_hidden=4, activation="tanh")


@pytest.mark.parametrize("name", list(REGISTRY))
def test_the_function_and_its_written_out_formula_agree(name):
    spec = REGISTRY[name]
    x = torch.randn(1000, dtype=torch.float64) * 4
    torch.testing.assert_close(spec.fn(x), spec.formula(x), atol=1e-12, rtol=1e-12)
    assert spec.elementwise in _ACT_KERNELS, f"the loop backend has no kernel for {spec.elementwise!r}"
    h = torch.randn(2, 6, dtype=torch.float64)
    a = activations.activation_fn(name)(h)
    assert a.shape == (2, 3 if spec.gated else 6)
    torch.testing.assert_close(a[1], reference_act(name, h[1]), atol=1e-12, rtol=1e-12)
    assert MLP(4, 3, name).in_proj.out_features == (6 if spec.gated else 3)


def _output_and_aux(forward):
    """``grads_of``'s function for a forward whose result has ``output`` and ``aux_loss``."""
    def run(layer, x):
        res = forward(layer, x)
        return res.output, res.aux_loss
    return run


@pytest.mark.parametrize("name", list(REGISTRY))
@pytest.mark.parametrize("backend", ["loop", "native", "grouped_mm"])
def test_every_backend_runs_every_activation_as_the_reference(name, backend):
    """Output and every gradient against the reference (fp32 on the CPU). A name the C++ loop does not know
    fails here: add it to parse_activation in moekit/cpu/csrc/loop.cpp."""
    if backend == "native" and not has_native:
        pytest.skip("the C++ extension does not build here (or is off)")
    layer = make_layer(dtype=torch.float32, std=0.2, activation=name, mlp_bias=True)
    backends.use(layer, backend)
    x = torch.randn(3, 10, 16)
    out, _, grads = grads_of(layer, x, _output_and_aux(lambda layer, x: layer(x)))
    out_r, _, grads_r = grads_of(layer, x, _output_and_aux(reference_forward))
    torch.testing.assert_close(out, out_r, atol=1e-5, rtol=1e-5)
    for k in grads_r:
        torch.testing.assert_close(grads[k], grads_r[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("name", list(REGISTRY))
def test_the_decode_gather_runs_every_activation_as_the_reference(name):
    layer = make_layer(activation=name, mlp_bias=True).eval()
    x_TD = torch.randn(5, 16, dtype=torch.float64)
    with torch.no_grad():
        r = layer.router(x_TD)
        ex = layer.experts
        got = gather_experts(x_TD, r.expert_ids_TK, r.weights_TK, ex.w_in, ex.w_out, ex.b_in, ex.b_out, name)
        torch.testing.assert_close(got, reference_forward(layer, x_TD).output, atol=1e-12, rtol=1e-12)


def test_hugging_face_names():
    assert activations.from_hf("silu") == "swiglu"
    assert activations.from_hf("gelu", supported=("swiglu", "geglu")) == "geglu"
    with pytest.raises(ValueError, match=r"ffn_act_fn\.name='gelu' is not supported \(only 'silu'\)"):
        activations.from_hf("gelu", "ffn_act_fn.name")
