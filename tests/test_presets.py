"""Parameter counts of every preset against the published figures (computed on the meta device)."""

import json
import subprocess
import sys

import pytest

from moekit.model import count_parameters
from moekit.presets import PRESETS, matches_published

PUBLISHED = [name for name, p in PRESETS.items() if p.published_total or p.published_active]


def test_the_seed_systems_are_all_there():
    for name in ["switch", "glam", "mixtral-8x7b", "mixtral-8x22b", "dbrx", "grok-1", "arctic", "deepseek-moe-16b",
                 "deepseek-v2", "deepseek-v3", "qwen1.5-moe-a2.7b", "qwen2-57b-a14b", "qwen3-30b-a3b", "olmoe-1b-7b",
                 "tiny", "small", "tiny-dense", "small-dense"]:
        assert name in PRESETS


@pytest.mark.parametrize("name", PUBLISHED)
def test_parameter_counts_match_published(name):
    preset = PRESETS[name]
    count = count_parameters(preset.config)
    if preset.published_total:
        assert matches_published(count.total, preset.published_total), (count.total, preset.published_total)
    if preset.published_active:
        assert matches_published(count.active, preset.published_active), (count.active, preset.published_active)


def test_exact_counts_of_the_notes():
    # independent arithmetic for Mixtral 8x7B: per layer attention 4096·(4096+1024+1024) + 4096·4096,
    # 8 experts of 3·4096·14336, router 8·4096, two norms; embeddings and head 2·32000·4096; final norm
    attn = 4096 * (4096 + 1024 + 1024) + 4096 * 4096
    per_layer = attn + 8 * 3 * 4096 * 14336 + 8 * 4096 + 2 * 4096
    total = 32 * per_layer + 2 * 32000 * 4096 + 4096
    count = count_parameters(PRESETS["mixtral-8x7b"].config)
    assert count.total == total
    assert count.active == total - 32 * 6 * 3 * 4096 * 14336


def test_dense_twins_have_the_same_active_ffn():
    for name in ("tiny", "small"):
        moe, dense = count_parameters(PRESETS[name].config), count_parameters(PRESETS[f"{name}-dense"].config)
        cfg = PRESETS[name].config
        routers = cfg.n_layers * cfg.moe.num_experts * cfg.d_model
        assert moe.active - routers == dense.active


def test_matches_published_rounding():
    assert matches_published(1_161_800_000_000, "1.2T")  # rounds to the printed figure
    assert matches_published(21_376_000_000, "21B")  # within 2%
    assert not matches_published(22_000_000_000, "21B")


def test_params_cli_json():
    out = subprocess.run([sys.executable, "-m", "moekit", "params", "deepseek-v3", "--json"], capture_output=True,
                         text=True, check=True)
    data = json.loads(out.stdout)
    assert round(data["total"] / 1e9) == 671 and round(data["active"] / 1e9) == 38


def test_params_cli_unknown_preset():
    out = subprocess.run([sys.executable, "-m", "moekit", "params", "gpt-5"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "unknown preset 'gpt-5'" in out.stderr and "mixtral-8x7b" in out.stderr
    assert "Traceback" not in out.stderr
