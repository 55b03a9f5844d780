"""The one place that chooses (moekit.moe.backends.chooser), the options it reads (moekit.cpu.options,
the MOEKIT_* overrides), how a user forces an expert backend, and that the choice is no part of a
model's config or checkpoint."""

import json
import warnings

import pytest
import torch

from moekit import MoEConfig, ModelConfig, MoETransformer
from moekit.cpu import build, options
from moekit.moe import backends
from moekit.moe.backends import chooser
from moekit.nn import MLP

from conftest import make_layer

has_native = build.load() is not None


def test_auto_picks_the_cpp_loop_on_a_cpu_else_the_python_loop(monkeypatch):
    layer = make_layer(dtype=torch.float32)
    cpu = "native" if has_native else "loop"
    assert layer.experts.backend_for(torch.randn(2, 16)) == cpu
    assert layer.experts.backend_for(torch.randn(2, 16, dtype=torch.bfloat16)) == cpu
    assert layer.experts.impl_for(torch.randn(2, 16)) == cpu  # (the name the layer benchmark reports)
    monkeypatch.setattr(chooser, "native_available", lambda: False)  # as when the C++ loop does not build
    assert layer.experts.backend_for(torch.randn(2, 16)) == "loop"
    with options.override(native=False):
        monkeypatch.undo()
        assert layer.experts.backend_for(torch.randn(2, 16)) == "loop"


def test_a_layers_request_beats_the_options_which_beat_auto():
    layer = make_layer(dtype=torch.float32)
    x = torch.randn(2, 16)
    with options.override(expert_backend="grouped_mm"):
        assert layer.experts.backend_for(x) == "grouped_mm"
        assert backends.use(layer, "loop") == 1
        assert layer.experts.backend_for(x) == "loop"
        backends.use(layer, "auto")
        assert layer.experts.backend_for(x) == "grouped_mm"
    assert layer.experts.backend_for(x) == ("native" if has_native else "loop")


def test_use_refuses_an_unknown_backend_and_a_module_without_experts():
    with pytest.raises(ValueError, match="'triton' is unknown; allowed: auto, native, loop, grouped_mm"):
        backends.use(make_layer(), "triton")
    with pytest.raises(ValueError, match="MLP has no MoE experts"):
        backends.use(MLP(8, 16), "loop")
    with pytest.raises(ValueError, match="'gather' is unknown"):
        backends.use(make_layer(), "gather")  # the decode step's, chosen only inside gather_decoding
    with pytest.raises(ValueError, match="expert backend 'triton' is unknown"):
        backends.get("triton")


def test_a_forced_backend_runs(monkeypatch):
    """use(model, name) reaches every MoE layer of a model, and that backend is the one that runs."""
    model = MoETransformer(ModelConfig.from_name("tiny"))
    ran = []
    loop = backends.get("loop")
    monkeypatch.setattr(type(loop), "run", lambda self, x, plan, w, act, how: ran.append(self.name) or x.clone())
    assert backends.use(model, "loop") == len(model.moe_layers) >= 1
    model(torch.randint(0, model.cfg.vocab_size, (1, 5)))
    assert ran == ["loop"] * len(model.moe_layers)


def test_the_backend_choice_is_in_no_config_or_checkpoint(tmp_path):
    """Not a config field, not in the state dict: a model forced to one backend saves exactly what an
    unforced one saves."""
    assert "expert_impl" not in MoEConfig.__dataclass_fields__
    model = MoETransformer(ModelConfig.from_name("tiny"))
    plain = MoETransformer(ModelConfig.from_name("tiny"))
    backends.use(model, "loop")
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert json.dumps(model.cfg.to_dict()) == json.dumps(plain.cfg.to_dict())
    assert "backend" not in json.dumps(model.cfg.to_dict())


def test_old_saved_configs_with_expert_impl_still_load():
    """model_config.json files written before carry expert_impl: it is dropped ('auto' silently, another
    value with a warning saying how to ask for that backend now)."""
    saved = ModelConfig.from_name("tiny").to_dict()
    saved["moe"]["expert_impl"] = "auto"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = ModelConfig.from_dict(saved)
    assert cfg == ModelConfig.from_name("tiny")
    saved["moe"]["expert_impl"] = "loop"
    with pytest.warns(UserWarning, match=r"expert_impl='loop'.*backends.use\(model, 'loop'\).*MOEKIT_EXPERT_BACKEND"):
        assert ModelConfig.from_dict(saved) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        MoEConfig.from_dict({**cfg.moe.to_dict(), "expert_imp": "loop"})


def test_options_from_the_environment_are_typed_and_name_the_variable():
    env = {"MOEKIT_NATIVE": "0", "MOEKIT_GEMM": "blas", "MOEKIT_OWN_GEMM": "0", "MOEKIT_EXPERT_BACKEND": "loop",
           "MOEKIT_BLOCK_CACHE_MB": "64", "MOEKIT_LOOP_PROFILE": "1", "MOEKIT_HIDE_SYMBOLS": "a, b"}
    opts = options.from_env(env)
    assert opts == options.CpuOptions(native=False, gemm="blas", own_gemm=False, expert_backend="loop",
                                      block_cache_mb=64, loop_profile=True, hidden_symbols=("a", "b"))
    assert options.from_env(options.as_env(opts)) == opts
    assert options.from_env({}) == options.CpuOptions()
    for var, value in (("MOEKIT_GEMM", "mkl"), ("MOEKIT_NATIVE", "yes"), ("MOEKIT_BLOCK_CACHE_MB", "-1"),
                       ("MOEKIT_EXPERT_BACKEND", "gather"), ("MOEKIT_OWN_GEMM", "true")):
        with pytest.raises(ValueError, match=f"{var}.*{value}"):
            options.from_env({var: value})
    with pytest.raises(ValueError, match="CpuOptions.gemm='fast' is invalid"):
        options.CpuOptions(gemm="fast")


def test_options_set_and_override_restore():
    before = options.get()
    with options.override(gemm="blas", own_gemm=False) as inside:
        assert options.get() is inside and inside.gemm == "blas" and not inside.own_gemm
        with pytest.raises(ValueError, match="expert_backend"):
            options.set(expert_backend="nope")
        assert options.get() is inside
    assert options.get() == before


def test_loop_gemm_decisions():
    """bf16 / fp16 CPU GEMMs run on oneDNN: bucketed rows in both loops; the Python loop's fp32 ones run
    torch.mm (exact rows); the C++ loop's fp32 ones follow the GEMM backend, its own kernel only with
    expert groups, on oneDNN, and own_gemm on."""
    small = make_layer(dtype=torch.float32, num_experts=4)
    x = torch.randn(8, 16)
    w = small.experts.cast(x)[1]
    assert chooser.loop_gemm(x.bfloat16(), w, native=False) == (True, 1, False, False)
    assert chooser.loop_gemm(x, w, native=False) == (False, 1, False, False)
    with options.override(gemm="blas"):
        how = chooser.loop_gemm(x, w, native=True)
        assert not how.onednn and not how.own_gemm and not how.bucket
        assert how.groups == chooser.thread_groups(*w[:2])
    if has_native and build.load().have_onednn() and build.load().have_own_gemm() and torch.get_num_threads() > 1:
        with options.override(gemm="onednn"):
            assert chooser.loop_gemm(x, w, native=True).own_gemm
        with options.override(gemm="onednn", own_gemm=False):
            how = chooser.loop_gemm(x, w, native=True)
            assert how.onednn and how.bucket and not how.own_gemm


def test_the_decode_step_takes_the_gather_backend_only_when_compiling(monkeypatch):
    cfg = make_layer().cfg
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert chooser.expert_backend(cfg, x, decode_step=True) != "gather"  # eager
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert chooser.expert_backend(cfg, x, "loop", decode_step=True) == "gather"
        assert chooser.expert_backend(cfg, x, decode_step=False) != "gather"
        assert chooser.expert_backend(cfg, torch.randn(chooser.GATHER_MAX_TOKENS + 1, 16), decode_step=True) != "gather"
    assert chooser.expert_backend(cfg, x, decode_step=True) != "gather"  # gradients recorded
