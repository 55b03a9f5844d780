"""``--set FIELD=VALUE``: every field's text parsed to its declared type, everything else refused by name.

The class of bug: values kept as strings ("False" is truthy) or silently ignored (``moe=null``)."""

import dataclasses
import json
import re
import typing

import pytest

from moekit.config import (MoEConfig, ModelConfig, apply_overrides, check_field_types, parse_field,
                           parse_overrides)
from moekit.presets import get_preset

TINY = get_preset("tiny")
MOE_EXAMPLE = TINY.moe.replace(capacity_factor=1.25, eval_capacity_factor=2.0, shared_expert_hidden=32,
                               num_shared_experts=1, shared_expert_gate=True, group_score="top2_sum")
MODEL_EXAMPLE = TINY.replace(qk_norm="head", rope_scaling={"type": "linear", "factor": 2.0}, moe_layers=(1,))


def _as_user_types(value):
    """How a user types ``value`` on a command line: Python-style and JSON-style spellings."""
    if value is None:
        return ["None", "null", "none"]
    if isinstance(value, bool):
        return [str(value), str(value).lower()]
    if isinstance(value, (dict, MoEConfig)):
        return [json.dumps(value if isinstance(value, dict) else value.to_dict())]
    if isinstance(value, tuple):
        return [json.dumps(list(value)), str(list(value))]
    return [str(value)]


def _fields(cls, example):
    return [(cls, f.name, getattr(example, f.name)) for f in dataclasses.fields(cls)]


CASES = _fields(MoEConfig, MOE_EXAMPLE) + _fields(ModelConfig, MODEL_EXAMPLE) + [
    (MoEConfig, "eval_capacity_factor", "same"), (MoEConfig, "eval_capacity_factor", None),
    (MoEConfig, "capacity_factor", None), (MoEConfig, "group_score", None), (ModelConfig, "qk_norm", None),
    (ModelConfig, "moe", None), (ModelConfig, "rope_scaling", None), (ModelConfig, "n_kv_heads", None),
    (ModelConfig, "moe_layers", None), (ModelConfig, "moe_layers", (0, 1))]


@pytest.mark.parametrize("cls,name,value", CASES, ids=[f"{c.__name__}.{n}={v!r}"[:60] for c, n, v in CASES])
def test_every_field_parses_to_its_declared_type(cls, name, value):
    """A tuple field parses to a list: what JSON gives back from a saved run's overrides (so --resume
    compares equal); the config makes it a tuple."""
    expected = value.to_dict() if isinstance(value, MoEConfig) else list(value) if isinstance(value, tuple) else value
    for text in _as_user_types(value):
        parsed = parse_field(cls, name, text)
        assert parsed == expected and type(parsed) is type(expected), (text, parsed)


NOT_TEXT = [(c, n) for c, n, v in CASES if "str" not in str(typing.get_type_hints(c)[n])]


@pytest.mark.parametrize("cls,name", sorted(set(NOT_TEXT), key=str), ids=lambda x: getattr(x, "__name__", x))
def test_text_a_typed_field_cannot_take_is_refused_by_name(cls, name):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{name}='maybe' is invalid"):
        parse_field(cls, name, "maybe")


@pytest.mark.parametrize("cls,name,value", [(MoEConfig, "mlp_bias", "False"), (MoEConfig, "top_k", 2.0),
                                            (MoEConfig, "capacity_factor", True), (ModelConfig, "tie_embeddings", 0),
                                            (ModelConfig, "rope_scaling", "linear"), (ModelConfig, "moe", 1),
                                            (ModelConfig, "moe_layers", "1"), (ModelConfig, "moe_layers", (1.0,)),
                                            (ModelConfig, "moe_layers", (True,))])
def test_a_config_refuses_a_value_of_the_wrong_type(cls, name, value):
    base = MOE_EXAMPLE if cls is MoEConfig else TINY
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{name}=.* is invalid: expected"):
        dataclasses.replace(base, **{name: value})
    check_field_types(base)  # the examples themselves are well typed


def test_the_reported_overrides_reach_the_model_config():
    cfg = apply_overrides(TINY, parse_overrides(["moe.mlp_bias=False", "moe.normalize_weights=False",
                                                 "tie_embeddings=False", "qk_norm=None",
                                                 "moe.num_shared_experts=1", "moe.shared_expert_gate=False"]))
    assert cfg.moe.mlp_bias is False and cfg.moe.normalize_weights is False and cfg.tie_embeddings is False
    assert cfg.qk_norm is None and cfg.moe.shared_expert_gate is False
    assert apply_overrides(TINY, parse_overrides(["moe.mlp_bias=True"])).moe.mlp_bias is True
    dense = apply_overrides(TINY, parse_overrides(["moe=null"]))
    assert dense.moe is None and not any(dense.is_moe_layer(i) for i in range(dense.n_layers))
    both = apply_overrides(TINY, parse_overrides(['moe={"top_k": 1}', "moe.num_experts=4"]))
    assert both.moe.top_k == 1 and both.moe.num_experts == 4 and both.moe.expert_hidden == TINY.moe.expert_hidden
    upgraded = apply_overrides(get_preset("tiny-dense"), parse_overrides(['moe={"expert_hidden": 32}']))
    assert upgraded.moe.expert_hidden == 32 and upgraded.moe.d_model == upgraded.d_model


def test_a_layer_list_override_survives_json_and_reaches_the_config():
    """``--set moe_layers=[1]`` is stored in train_config.json; read back it must equal what was parsed
    (a tuple would read back as a list and make --resume see a changed --set)."""
    overrides = parse_overrides(["moe_layers=[1]"])
    assert json.loads(json.dumps(overrides)) == overrides
    cfg = apply_overrides(TINY, overrides)
    assert cfg.moe_layers == (1,) and [cfg.is_moe_layer(i) for i in range(2)] == [False, True]
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert apply_overrides(cfg, parse_overrides(["moe=null"])).moe_layers is None  # dense: no MoE layers to list


@pytest.mark.parametrize("item,named", [("moe=1", "ModelConfig.moe='1'"), ("moe.mlp_bias=maybe", "mlp_bias"),
                                        ("moe.topk=3", "'topk'"), ("n_layers=2.5", "n_layers"),
                                        ("rope_theta=fast", "rope_theta"), ("x.y=1", "only model fields"),
                                        ("novalue", "FIELD=VALUE"), ("moe.capacity_factor=nan", "capacity_factor"),
                                        ("moe_layers=[1,2.5]", "ModelConfig.moe_layers='[1,2.5]'")])
def test_bad_overrides_name_the_item(item, named):
    with pytest.raises(ValueError, match="--set|capacity_factor") as err:
        apply_overrides(TINY, parse_overrides([item]))
    assert named in str(err.value)


def test_cli_stores_typed_values(tmp_path, corpus_dir):
    from test_train import _cli, _err

    out = tmp_path / "run"
    res = _cli("train", "--preset", "tiny", "--data", str(corpus_dir), "--out", str(out), "--steps", "1",
               "--batch-size", "2", "--seq-len", "16", "--no-progress", "--eval-every", "1",
               "--set", "moe.mlp_bias=False", "--set", "tie_embeddings=False", "--set", "qk_norm=None",
               env={"MOEKIT_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr
    saved = json.loads((out / "model_config.json").read_text())
    assert saved["moe"]["mlp_bias"] is False and saved["tie_embeddings"] is False and saved["qk_norm"] is None
    assert json.loads((out / "train_config.json").read_text())["model_overrides"]["moe"] == {"mlp_bias": False}
    bad = _cli("train", "--preset", "tiny", "--out", str(tmp_path / "bad"), "--set", "moe=1")
    assert "moe" in _err(bad) and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("items,named", [(['moe={"foo": 1}'], "MoEConfig has no field(s) ['foo']"),
                                         (["moe.top_k=4", "moe=null"], "an earlier --set gives moe fields"),
                                         (["moe=null", "moe.top_k=4"], "moe is set to None by an earlier --set")])
def test_moe_overrides_that_cannot_all_apply_are_refused(items, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        parse_overrides(items)
