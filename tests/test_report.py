"""The routing report's analysis and page, and ``moekit plot``'s comparison: clustering that finds
planted groups, specialisation and co-activation numbers, collapse read from the training history,
heatmap geometry checked against the PNG's pixels, a self-contained page with captions and anchors,
and one colour per run with parameter counts in the comparison."""

import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_cfg, write_corpus
from test_insight import _forced_model  # a model whose routers follow a table
from moekit.config import ModelConfig
from moekit.insight import plots
from moekit.insight.report import (cluster_order, coactivation_stats, entropy_reading, training_balance,
                                   training_collapse, write_report)
from moekit.model import count_parameters
from moekit.tokenizer import ByteTokenizer
from moekit.train import train


# ---- analysis -----------------------------------------------------------------------------------
def test_cluster_order_puts_planted_groups_side_by_side():
    rng = np.random.default_rng(0)
    E = 64
    group = rng.permutation(np.repeat(np.arange(4), E // 4))  # four groups of 16, scattered over the ids
    sim = np.where(group[:, None] == group[None, :], 0.6, 0.05) + rng.uniform(0, 0.04, (E, E))
    sim = (sim + sim.T) / 2
    order = cluster_order(sim)
    assert sorted(order) == list(range(E))
    runs = [group[order[0]]]
    for e in order[1:]:
        if group[e] != runs[-1]:
            runs.append(group[e])
    assert len(runs) == 4  # each group is one contiguous block
    assert cluster_order(sim) == order  # deterministic
    assert cluster_order(np.ones((1, 1))) == [0]


def test_coactivation_stats_lift_and_empty_experts_last():
    # 100 tokens, top-2 over 5 experts: experts 0 and 1 always together (50 tokens), 2 and 3 together
    # (50 tokens); expert 4 never chosen
    c = torch.zeros(5, 5, dtype=torch.long)
    c[0, 0] = c[1, 1] = c[0, 1] = c[1, 0] = 50
    c[2, 2] = c[3, 3] = c[2, 3] = c[3, 2] = 50
    st = coactivation_stats(c, tokens=100)
    assert st["empty"] == [4] and sorted(st["order"]) == list(range(4))
    pos = {e: k for k, e in enumerate(st["order"])}
    assert abs(pos[0] - pos[1]) == 1 and abs(pos[2] - pos[3]) == 1  # the pairs that fire together sit together
    top = st["pairs"][0]
    assert (top["i"], top["j"]) == (0, 1) and top["lift"] == pytest.approx(50 * 100 / (50 * 50))
    assert top["given_i"] == 1.0 and len(st["pairs"]) == 2


def test_entropy_reading_spans_decided_to_undecided():
    assert entropy_reading(math.log(64), 64, 4).startswith("undecided")
    assert entropy_reading(math.log(4.5), 64, 4).startswith("decided")
    assert entropy_reading(math.log(20), 64, 4).startswith("partly decided") and "20.0 of the 64" in \
        entropy_reading(math.log(20), 64, 4)


def test_specialisation_is_exact_on_forced_routing(tmp_path):
    """Digits go to expert 0 (with 1), everything else to 2 (with 3): expert 0's class KL from the
    text is log2(1 / share of digits), its distinctive class digits, and expert 0 is named first."""
    text = b"x = 12\nyy = 345\n" * 8
    ids = torch.tensor(list(text))
    digit = torch.tensor([chr(b).isdigit() for b in range(256)])
    table = torch.where(digit[:, None], torch.tensor([0, 1]), torch.tensor([2, 3]))
    res = write_report(_forced_model([table]), ByteTokenizer(), [ids.view(2, -1)], tmp_path, categories=True,
                       warn=False)
    ls = res.summary["layers"]["0"]
    q_digits = sum(chr(b).isdigit() for b in text) / len(text)
    sp0 = ls["specialisation"][0]
    assert sp0["class_kl_bits"] == pytest.approx(math.log2(1 / q_digits))
    assert sp0["distinct_class"] == "digits" and sp0["distinct_share"] == 1.0
    assert sp0["distinct_lift"] == pytest.approx(1 / q_digits)
    # token KL: expert 0 takes the digit tokens in proportion, so KL = log2(1 / share of digits) too
    assert sp0["token_kl_bits"] == pytest.approx(math.log2(1 / q_digits))
    assert ls["specialisation"][4]["tokens"] == 0 and ls["specialisation"][4]["class_kl_bits"] is None
    assert ls["specialists"][:2] in ([0, 1], [1, 0])
    html = (tmp_path / "index.html").read_text()
    assert "100.0% digits (text: " in html


def _metrics(path: Path, E: int, steps: int, starved_until: int) -> None:
    """Expert 3 takes nothing for the first ``starved_until`` steps, then the load is uniform."""
    with open(path, "w") as f:
        for step in range(1, steps + 1):
            frac = [1 / E] * E
            if step <= starved_until:
                frac = [1 / (E - 1)] * E
                frac[3] = 0.0
            f.write(json.dumps({"step": step, "loss": 1.0, "moe_0": {"tokens_frac": frac}}) + "\n")


def test_collapse_during_training_is_reported_even_when_it_recovered(tmp_path):
    """The issue's case: starved for the first half of training, balanced at the end; the banner must
    not say "No collapse"."""
    _metrics(tmp_path / "metrics.jsonl", E=8, steps=40, starved_until=20)
    tr = training_balance(tmp_path / "metrics.jsonl", bins=10)
    hist = tr["collapse_history"]["0"]
    assert hist == [{"expert": 3, "kind": "starved", "steps": 20, "of": 40, "fraction": 0.5, "first_step": 1,
                     "last_step": 20, "at_end": False, "since": None, "recent": False}]
    binned = tr["load_ratio_binned"]["0"]
    assert binned["steps"] == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    assert binned["ratio"][3] == [0.0] * 5 + [1.0] * 5
    during = training_collapse(tr)
    assert [(d["layer"], d["expert"], d["kind"]) for d in during] == [(0, 3, "starved")]
    # one starved step in 40 is noise: not in the banner, still in the history
    _metrics(tmp_path / "brief.jsonl", E=8, steps=40, starved_until=1)
    brief = training_balance(tmp_path / "brief.jsonl")
    assert training_collapse(brief) == [] and brief["collapse_history"]["0"][0]["steps"] == 1
    # the page: a balanced model on the text, a run that starved expert 3 for half of training
    text = b"def f(x):\n    return x + 1\n" * 8
    table = torch.stack([torch.arange(256) % 8, (torch.arange(256) + 1) % 8], dim=1)
    (tmp_path / "r").mkdir()
    res = write_report(_forced_model([table]), ByteTokenizer(), [torch.tensor(list(text)).view(4, -1)], tmp_path / "r",
                       metrics_path=tmp_path / "metrics.jsonl", warn=False)
    assert res.collapse == []
    html = (tmp_path / "r" / "index.html").read_text()
    assert "Collapse during training" in html and "No collapse" not in html
    assert "starved in 20 of 40 logged steps (50.0%), steps 1&ndash;20; recovered" in html
    assert (tmp_path / "r" / "load_over_training_L0.png").is_file()


# ---- figures ------------------------------------------------------------------------------------
def _cells(png: Path, heat: plots.Heatmap, rows: int, cols: int):
    """The colour at the centre of cell (r, c), found with the box the page uses for the mouse."""
    import matplotlib.image

    img = matplotlib.image.imread(str(png))
    assert (img.shape[1], img.shape[0]) == heat.size
    left, top, right, bottom = heat.box

    def rgb(r: int, c: int) -> np.ndarray:
        x = left + (c + 0.5) * (right - left) / cols
        y = top + (r + 0.5) * (bottom - top) / rows
        return img[int(y), int(x), :3]
    return rgb


def test_heatmap_geometry_matches_the_pixels_and_the_load_colours_centre_on_uniform(tmp_path):
    """The page maps the mouse to a cell with the box plots returns: the colour at each cell's centre
    must be that cell's colour. White is the uniform share; 1.5x is light red, 3x and above deep red."""
    from matplotlib import colormaps

    ratio = [[0.0, 1.0, 1.5, 3.0, 6.0] * 8, [1.0] * 40]  # 2 layers x 40 experts
    heat = plots.load_heatmap(ratio, [0, 1], [], tmp_path / "load.png")
    cmap = colormaps["RdBu_r"]
    cell = _cells(tmp_path / "load.png", heat, 2, 40)
    expected = {0.0: cmap(0.0), 1.0: cmap(0.5), 1.5: cmap(0.5 + 0.25 * 0.5), 3.0: cmap(1.0), 6.0: cmap(1.0)}
    for r in range(2):
        for c in range(40):
            got = cell(r, c)
            assert np.abs(got - np.array(expected[ratio[r][c]][:3])).max() < 0.03, (r, c, got)
    white = cell(1, 7)
    assert white.min() > 0.95  # uniform is white, not a colour that reads as a warning
    # co-activation at 256 experts: values that differ from cell to cell, rows and columns in the given order
    E = 256

    def value(i, j):
        return ((3 * i + 5 * j) % 11) / 10

    given = [[value(i, j) if i != j else None for j in range(E)] for i in range(E)]
    order = list(range(0, E, 2)) + list(range(1, E, 2))
    heat = plots.coactivation(given, order, 0, 2, tmp_path / "co.png")
    viridis = colormaps["viridis"]
    cell = _cells(tmp_path / "co.png", heat, E, E)
    for r in range(0, E, 7):
        for c in range(1, E, 5):
            if r != c:
                want = viridis(value(order[r], order[c]))[:3]
                got = cell(r, c)
                assert np.abs(got - np.array(want)).max() < 0.03, (r, c)


# ---- the page -----------------------------------------------------------------------------------
class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.hrefs, self.srcs, self.stack, self.figures = set(), [], [], [], []
        self.scripts_src = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and "href" in a:
            self.hrefs.append(a["href"])
        if tag == "script" and "src" in a:
            self.scripts_src.append(a["src"])
        if tag == "figure":
            self.figures.append({"img": None, "caption": ""})
        if tag == "img":
            self.srcs.append(a["src"])
            assert self.figures and "figure" in self.stack, f"image {a['src']} outside a <figure>"
            self.figures[-1]["img"] = a["src"]
        if tag not in ("img", "input", "meta", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self.stack:
            while self.stack.pop() != tag:
                pass

    def handle_data(self, data):
        if "figcaption" in self.stack:
            self.figures[-1]["caption"] += data


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny MoE run and a tiny dense run (4 steps, every step logged)."""
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEKIT_CACHE", str(root / "cache"))
        corpus = write_corpus(root / "corpus")
        for name, preset in (("moe", "tiny"), ("dense", "tiny-dense")):
            train(tiny_cfg(root / name, corpus, preset=preset, steps=4, eval_every=2, log_every=1, warmup=1),
                  progress=False)
        yield {"root": root, "corpus": corpus, "moe": root / "moe", "dense": root / "dense"}


def test_report_page_is_self_contained_with_contents_and_captions(runs, tmp_path, monkeypatch):
    from moekit.insight.report import InspectConfig, inspect

    monkeypatch.setenv("MOEKIT_CACHE", str(runs["root"] / "cache"))
    res = inspect(InspectConfig(model=str(runs["moe"]), out=str(tmp_path / "r"), max_tokens=512))
    html = (tmp_path / "r" / "index.html").read_text()
    page = _Page()
    page.feed(html)
    internal = [h[1:] for h in page.hrefs if h.startswith("#")]
    assert internal and all(h in page.ids for h in internal), set(internal) - page.ids  # every anchor resolves
    for section in ("summary", "load", "training", "entropy", "layer-0", "layer-1"):
        assert f'href="#{section}"' in html  # in the table of contents
    assert page.figures and all(f["img"] and len(f["caption"]) > 80 for f in page.figures), page.figures
    assert {f["img"] for f in page.figures} >= {"load.png", "entropy.png", "balance_over_training.png",
                                                "coactivation_L0.png", "load_over_training_L1.png", "classes_L0.png"}
    assert all((tmp_path / "r" / s).is_file() for s in page.srcs)
    assert not page.scripts_src and not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # no network
    assert "red: collapse" not in html and 'class="sortable"' in html and 'class="filter"' in html
    # hover data: one JSON block a heatmap, its grid the matrix's shape
    blocks = dict(re.findall(r'<script type="application/json" id="(heat-\d+)">(.*?)</script>', html))
    imgs = dict((h, src) for src, h in re.findall(r'<img src="([^"]+)"[^>]*data-heat="(heat-\d+)"', html))
    assert set(blocks) == set(imgs) and "coactivation_L0.png" in imgs.values()
    for hid, raw in blocks.items():
        d = json.loads(raw)
        assert len(d["v"]) == len(d["rows"]) and all(len(row) == len(d["cols"]) for row in d["v"])
        assert d["size"] == list(Image.open(tmp_path / "r" / imgs[hid]).size)
    s = res.summary
    for ls in s["layers"].values():
        co = ls["coactivation"]
        assert sorted(co["order"] + co["empty"]) == list(range(8)) and ls["entropy_reading"]
        assert 0 < ls["router_entropy_normalized"] <= 1 and ls["effective_experts"] == pytest.approx(
            math.exp(ls["router_entropy"]))
    assert s["training"]["collapse_history"].keys() == {"0", "1"}


def test_plot_one_colour_per_run_and_parameter_counts(runs, tmp_path, monkeypatch):
    from moekit.insight.runs import compare_runs

    calls = []
    real = plots.run_curves
    monkeypatch.setattr(plots, "run_curves", lambda curves, x, ys, title, path, colors, **kw: (
        calls.append({n: colors[n] for n in curves}), real(curves, x, ys, title, path, colors, **kw))[1])
    res = compare_runs([runs["dense"], runs["moe"]], tmp_path / "c", x="tokens")
    r = res.summary["runs"]
    assert r["dense"]["color"] != r["moe"]["color"]
    assert calls == [{"dense": r["dense"]["color"], "moe": r["moe"]["color"]}, {"moe": r["moe"]["color"]}]
    for name, preset in (("moe", "tiny"), ("dense", "tiny-dense")):
        c = count_parameters(ModelConfig.from_name(preset))
        assert (r[name]["total_params"], r[name]["active_params"]) == (c.total, c.active)
        last = json.loads((runs[name] / "metrics.jsonl").read_text().splitlines()[-1])
        assert r[name]["flops"] == last["flops"] and r[name]["wall_clock_s"] == last["elapsed_s"]
    assert r["moe"]["total_params"] > r["moe"]["active_params"]
    html = (tmp_path / "c" / "index.html").read_text()
    assert "active params" in html and "training FLOPs" in html and "wall-clock" in html
    assert f'background:{r["moe"]["color"]}' in html and "<figcaption>" in html
