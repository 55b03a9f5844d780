"""The routing report in a real browser: headless Chromium from the distribution's packages (Debian:
``apt-get install chromium``) opens index.html from disk. Every image must load and no script may
fail; sorting, filtering and the heatmaps' hover values must work; the layout must be centred on a
wide window and fit a narrow one; screenshots must show the page. Also a report at 256 experts.

    python -m pytest -m slow tests/test_report_browser.py
"""

import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import tiny_cfg, write_corpus
from moekit import MoEConfig, ModelConfig, MoETransformer
from moekit.insight.report import InspectConfig, inspect, write_report
from moekit.tokenizer import ByteTokenizer
from moekit.train import train

_spec = importlib.util.spec_from_file_location("render_report",
                                               Path(__file__).parents[1] / "scripts" / "render_report.py")
render = sys.modules.setdefault("render_report", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(render)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(render.find_chromium() is None,
                                                  reason="no Chromium (Debian: apt-get install chromium)")]

# Run after the page's own script, on load: exercises what a reader does and writes the outcome on <body>.
SELFTEST = """<script>
window.addEventListener("load", function () {
  var fails = [], body = document.body;
  function fail(m) { fails.push(m); }
  function rows(t) { return Array.prototype.slice.call(t.tBodies[0].rows); }
  try {
    var t = document.querySelector("table.sortable[id^='experts-']");
    var th = t.tHead.rows[0].cells[1];  // load
    function loads() { return rows(t).map(function (r) { return parseFloat(r.cells[1].getAttribute("data-v")); }); }
    th.click();
    var v = loads();
    for (var i = 1; i < v.length; i++) if (v[i] > v[i - 1]) { fail("not descending after a click"); break; }
    th.click();
    v = loads();
    for (i = 1; i < v.length; i++) if (v[i] < v[i - 1]) { fail("not ascending after a second click"); break; }
    if (th.getAttribute("aria-sort") !== "ascending") fail("aria-sort not set");
    var input = document.querySelector("input.filter[data-table='" + t.id + "']");
    function visible() { return rows(t).filter(function (r) { return !r.hidden; }).length; }
    input.value = "no such text here";
    input.dispatchEvent(new Event("input"));
    if (visible() !== 0) fail("the filter kept " + visible() + " rows");
    var starved = rows(t).filter(function (r) { return r.cells[3].textContent.trim() === "starved"; }).length;
    input.value = "starved";
    input.dispatchEvent(new Event("input"));
    if (visible() < starved) fail("filtering 'starved' hid a starved expert");
    input.value = "";
    input.dispatchEvent(new Event("input"));
    if (visible() !== rows(t).length) fail("clearing the filter did not bring the rows back");
    var tip = document.querySelector(".tip"), imgs = document.querySelectorAll("img[data-heat]");
    if (!imgs.length) fail("no heatmap with hover values");
    Array.prototype.forEach.call(imgs, function (img) {
      var d = JSON.parse(document.getElementById(img.getAttribute("data-heat")).textContent);
      var r = Math.floor(d.rows.length * 0.37), c = Math.floor(d.cols.length * 0.71);
      var rect = img.getBoundingClientRect();
      var px = d.box[0] + (c + 0.5) * (d.box[2] - d.box[0]) / d.cols.length;
      var py = d.box[1] + (r + 0.5) * (d.box[3] - d.box[1]) / d.rows.length;
      img.dispatchEvent(new MouseEvent("mousemove", {clientX: rect.left + px * rect.width / d.size[0],
                                                     clientY: rect.top + py * rect.height / d.size[1]}));
      var want = d.rows[r] + ", " + d.cols[c] + ": " + d.what + " = ";
      if (tip.hidden || tip.textContent.indexOf(want) !== 0)
        fail("hover on " + img.getAttribute("src") + " shows '" + tip.textContent + "', not '" + want + "...'");
      img.dispatchEvent(new MouseEvent("mouseleave"));
      if (!tip.hidden) fail("the hover value stays after the mouse leaves");
    });
    body.setAttribute("data-h1-left", String(Math.round(document.querySelector("h1").getBoundingClientRect().left)));
    body.setAttribute("data-overflow", String(document.documentElement.scrollWidth - window.innerWidth));
  } catch (e) { fail("exception: " + e); }
  body.setAttribute("data-selftest", fails.length ? fails.join(" | ") : "pass");
});
</script>"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The report of a tiny trained run (8 experts, top-2, metrics of every step)."""
    root = tmp_path_factory.mktemp("browser")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEKIT_CACHE", str(root / "cache"))
        corpus = write_corpus(root / "corpus")
        train(tiny_cfg(root / "moe", corpus, steps=6, eval_every=3, log_every=1, warmup=1), progress=False)
        inspect(InspectConfig(model=str(root / "moe"), out=str(root / "report"), max_tokens=1024))
    return root / "report"


@pytest.fixture(scope="module")
def report_256(tmp_path_factory):
    """The report of an untrained model with 256 experts, top-8 (no training history)."""
    out = tmp_path_factory.mktemp("report256")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2, max_seq_len=64, ffn_hidden=64,
                      moe=MoEConfig(d_model=32, expert_hidden=8, num_experts=256, top_k=8))
    model = MoETransformer(cfg).eval()
    text = (b"def add(a, b):\n    return a + b  # 42\n" * 60)[:2048]
    ids_BS = torch.tensor(list(text)).view(32, 64)
    write_report(model, ByteTokenizer(), [ids_BS[:16], ids_BS[16:]], out, categories=True, warn=False)
    return out


def _selftest(report_dir: Path, width: int) -> dict:
    page = report_dir / "selftest.html"
    page.write_text((report_dir / "index.html").read_text().replace("</body>", SELFTEST + "</body>"))
    try:
        check = render.check_page(page, width=width)
    finally:
        page.unlink()
    assert check.ok and not check.problems(), check.problems()
    return check.body_attrs


def test_every_image_loads_and_no_script_fails(report):
    check = render.check_page(report / "index.html")
    assert check.ok and check.problems() == [], check.problems()
    n_images = len(re.findall(r"<img ", (report / "index.html").read_text()))
    assert n_images >= 9  # load, balance, entropy, and per layer co-activation, classes, load over training


def test_the_check_fails_on_a_missing_image_and_on_a_script_error(report, tmp_path):
    broken = tmp_path / "missing"
    shutil.copytree(report, broken)
    (broken / "coactivation_L1.png").unlink()
    check = render.check_page(broken / "index.html")
    assert not check.ok and "coactivation_L1.png" in check.broken
    failing = tmp_path / "error"
    shutil.copytree(report, failing)
    html = (failing / "index.html").read_text()
    (failing / "index.html").write_text(html.replace("<h1>", "<script>noSuchFunction();</script><h1>", 1))
    check = render.check_page(failing / "index.html")
    assert not check.ok and any("noSuchFunction" in e for e in check.js_errors), check.js_errors


@pytest.mark.parametrize("width", [800, 1600])
def test_sorting_filtering_hover_and_layout(report, width):
    attrs = _selftest(report, width)
    assert attrs["data-selftest"] == "pass"
    assert int(attrs["data-overflow"]) <= 0  # nothing wider than the window: wide tables scroll inside
    if width == 800:
        assert int(attrs["data-h1-left"]) >= 12  # padding, not flush against the edge
    else:
        assert int(attrs["data-h1-left"]) >= (width - 1200) // 2  # a centred column of at most 1200 px


def test_a_report_at_256_experts_renders_with_hover_values(report_256):
    html = (report_256 / "index.html").read_text()
    assert "coactivation_L0.png" in html and "256 experts" in html
    attrs = _selftest(report_256, 1280)
    assert attrs["data-selftest"] == "pass"
    with Image.open(report_256 / "coactivation_L0.png") as im:
        assert im.size[0] <= 2000 and im.size[1] <= 2000  # fits a page; cells are read by hovering


def test_screenshots_of_the_top_and_of_a_layer(report, tmp_path):
    top = render.screenshot(report / "index.html", tmp_path / "top.png", 1280, 900)
    layer = render.screenshot(report / "index.html", tmp_path / "layer.png", 1280, 900, only="layer-1")
    assert not (report / ".screenshot-layer-1.html").exists()
    for png in (top, layer):
        with Image.open(png) as im:
            assert im.size == (1280, 900)
            assert len(im.convert("RGB").getcolors(1 << 20)) > 50  # text and figures, not a blank page
    with pytest.raises(ValueError, match="no element with id 'layer-9'"):
        render.screenshot(report / "index.html", tmp_path / "x.png", only="layer-9")
