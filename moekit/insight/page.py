"""Static HTML pages for the report and the run comparison: one self-contained file, images linked
by relative path, so a directory opens from disk in any browser.

A small inline script (no network, no library) sorts a table when its header is clicked, filters
the expert tables by the text typed in their box, and shows the value under the mouse on the
heatmaps (each heatmap image comes with its cell grid and values as inline JSON). Once the page
has loaded it marks ``<body data-ok="1">`` if every image loaded and no script error occurred, or
lists the broken images in ``data-broken``: ``tests/test_report_browser.py`` reads that mark from
a real headless browser.
"""

from __future__ import annotations

import json
import math
from html import escape

from moekit.insight.categories import CATEGORIES

_STYLE = """
*, *::before, *::after { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; line-height: 1.45; color: #222;
       max-width: 1200px; margin: 0 auto; padding: 1.2em clamp(0.8em, 3vw, 2em) 4em; }
h1 { font-size: 1.5em; margin-bottom: 0.3em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
h3 { margin-top: 1.4em; } a { color: #0b5cad; }
img { max-width: 100%; height: auto; display: block; }
figure { margin: 1em 0 1.6em; } figure .frame { border: 1px solid #e4e4e4; display: inline-block; max-width: 100%; }
figcaption { font-size: 0.9em; color: #444; margin-top: 0.4em; max-width: 75em; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 3px 7px; text-align: right; vertical-align: top; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
table.sortable th { cursor: pointer; user-select: none; white-space: nowrap; }
table.sortable th::after { content: " \\2195"; color: #aaa; }
table.sortable th[aria-sort="ascending"]::after { content: " \\2191"; color: #222; }
table.sortable th[aria-sort="descending"]::after { content: " \\2193"; color: #222; }
table.summary td, table.summary th { text-align: left; } table.summary ul { margin: 0; padding-left: 1.1em; }
tr:target { background: #fff6cc; }
code { background: #f2f2f2; padding: 0 3px; white-space: pre; border-radius: 2px; }
nav.toc { background: #f7f7f9; border: 1px solid #e4e4ea; padding: 0.5em 1em; margin: 1em 0; }
nav.toc ol { margin: 0.3em 0; padding-left: 1.4em; columns: 2 16em; }
.banner { padding: 0.6em 1em; margin: 0.8em 0; border-radius: 3px; }
.banner h3 { margin: 0 0 0.3em; }
.collapse { background: #fde8e8; border: 2px solid #c00; } .collapse h3 { color: #c00; }
.history { background: #fff4e0; border: 2px solid #d98c00; } .history h3 { color: #a56500; }
.ok { background: #e8f6e8; border: 1px solid #393; }
.flag { color: #c00; font-weight: bold; } .muted { color: #777; } .warn { color: #a56500; }
input.filter { font: inherit; padding: 3px 6px; width: min(26em, 100%); margin: 0.3em 0.6em 0.3em 0; }
.tip { position: fixed; z-index: 10; pointer-events: none; background: #222; color: #fff; font-size: 0.8em;
       padding: 3px 7px; border-radius: 3px; white-space: nowrap; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; border-radius: 2px; vertical-align: -0.1em;
          margin-right: 0.35em; }
"""

# Records what goes wrong before the page's own script runs: a script error, or an image that fails
# to load (resource errors do not bubble, so the listener captures).
_ERROR_HOOK = """<script>
window.addEventListener("error", function (ev) {
  var root = document.documentElement, t = ev.target;
  if (t && t.tagName) { root.setAttribute("data-broken-early", (root.getAttribute("data-broken-early") || "")
                                          + " " + (t.getAttribute("src") || t.tagName)); return; }
  root.setAttribute("data-js-errors", (root.getAttribute("data-js-errors") || "") + " | " + ev.message);
}, true);
</script>"""

_SCRIPT = """<script>
(function () {
  "use strict";
  var body = document.body, each = function (list, fn) { Array.prototype.forEach.call(list, fn); };

  // ---- sortable tables: click a header (or press Enter on it); click again to reverse ----
  function key(td) {
    var v = td.getAttribute("data-v");
    if (v !== null && v !== "") return parseFloat(v);
    return td.textContent.trim().toLowerCase();
  }
  function sortTable(table, col, th) {
    var desc = th.getAttribute("aria-sort") !== "descending", tbody = table.tBodies[0];
    each(table.tHead.rows[0].cells, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", desc ? "descending" : "ascending");
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.sort(function (a, b) {
      var x = key(a.cells[col]), y = key(b.cells[col]);
      var nx = typeof x === "number" && !isNaN(x), ny = typeof y === "number" && !isNaN(y);
      if (nx !== ny) return nx ? -1 : 1;  // cells without a number go last either way
      var r = nx ? x - y : (x < y ? -1 : x > y ? 1 : 0);
      return desc ? -r : r;
    });
    rows.forEach(function (r) { tbody.appendChild(r); });
  }
  each(document.querySelectorAll("table.sortable"), function (table) {
    each(table.tHead.rows[0].cells, function (th, col) {
      th.tabIndex = 0;
      th.title = "sort by this column (click again to reverse)";
      th.addEventListener("click", function () { sortTable(table, col, th); });
      th.addEventListener("keydown", function (ev) { if (ev.key === "Enter") sortTable(table, col, th); });
    });
  });

  // ---- filter boxes: keep the rows whose text contains what is typed ----
  each(document.querySelectorAll("input.filter"), function (input) {
    var table = document.getElementById(input.getAttribute("data-table"));
    var count = document.getElementById(input.getAttribute("data-count"));
    input.addEventListener("input", function () {
      var q = input.value.trim().toLowerCase(), rows = table.tBodies[0].rows, shown = 0;
      each(rows, function (r) {
        var hit = !q || (r.textContent + " " + (r.getAttribute("data-search") || "")).toLowerCase().indexOf(q) >= 0;
        r.hidden = !hit;
        if (hit) shown++;
      });
      if (count) count.textContent = q ? shown + " of " + rows.length + " rows" : "";
    });
  });

  // ---- heatmaps: the value under the mouse ----
  var tip = document.createElement("div");
  tip.className = "tip";
  tip.hidden = true;
  body.appendChild(tip);
  each(document.querySelectorAll("img[data-heat]"), function (img) {
    var d = JSON.parse(document.getElementById(img.getAttribute("data-heat")).textContent);
    function cellAt(ev) {
      var r = img.getBoundingClientRect(), b = d.box;
      var px = (ev.clientX - r.left) * d.size[0] / r.width, py = (ev.clientY - r.top) * d.size[1] / r.height;
      if (px < b[0] || px >= b[2] || py < b[1] || py >= b[3]) return null;
      return [Math.floor((py - b[1]) / (b[3] - b[1]) * d.rows.length),
              Math.floor((px - b[0]) / (b[2] - b[0]) * d.cols.length)];
    }
    img.addEventListener("mousemove", function (ev) {
      var rc = cellAt(ev);
      if (!rc) { tip.hidden = true; return; }
      var v = d.v[rc[0]][rc[1]];
      tip.textContent = d.rows[rc[0]] + ", " + d.cols[rc[1]] + ": " + d.what + " = "
        + (v === null ? "n/a" : v.toFixed(d.digits));
      tip.style.left = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 4) + "px";
      tip.style.top = (ev.clientY + 16) + "px";
      tip.hidden = false;
    });
    img.addEventListener("mouseleave", function () { tip.hidden = true; });
  });

  // ---- the page's own check: every image loaded, no script error ----
  window.addEventListener("load", function () {
    var bad = [];
    each(document.images, function (im) {
      if (!im.complete || im.naturalWidth === 0) bad.push(im.getAttribute("src"));
    });
    if (bad.length) body.setAttribute("data-broken", bad.join(" "));
    if (!bad.length && !document.documentElement.getAttribute("data-js-errors")) body.setAttribute("data-ok", "1");
  });
})();
</script>"""


def _page(title: str, body: list[str]) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(title)}</title><style>{_STYLE}</style>{_ERROR_HOOK}</head><body>\n"
            + "\n".join(body) + f"\n{_SCRIPT}\n</body></html>\n")


class _Figures:
    """Numbers the figures of a page and writes each with its caption (and hover data for heatmaps)."""

    def __init__(self, heatmaps: dict | None = None):
        self.n = 0
        self.heatmaps = heatmaps or {}

    def __call__(self, src: str, alt: str, caption: str, hover: dict | None = None) -> str:
        self.n += 1
        attrs, data = "", ""
        geometry = self.heatmaps.get(src)
        if hover is not None and geometry is not None:
            hid = f"heat-{self.n}"
            attrs = f' data-heat="{hid}"'
            payload = json.dumps({**geometry, **hover}, separators=(",", ":")).replace("</", "<\\/")
            data = f'<script type="application/json" id="{hid}">{payload}</script>'
            caption += " Hover a cell for its value."
        return (f'<figure id="fig-{self.n}"><div class="frame"><img src="{escape(src)}" alt="{escape(alt)}"{attrs}>'
                f"</div><figcaption><b>Figure {self.n}.</b> {caption}</figcaption></figure>{data}")


def _hover(rows: list[str], cols: list[str], values, what: str, digits: int = 2) -> dict:
    v = [[None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), digits + 1)
          for x in row] for row in values]
    return {"rows": rows, "cols": cols, "v": v, "what": what, "digits": digits}


def shown(text: str) -> str:
    """A token made visible: spaces, tabs and newlines as symbols."""
    return escape(text).replace(" ", "\u2423").replace("\t", "\u21e5").replace("\n", "\u21b5").replace("\r", "\u240d")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _num(v, fmt: str) -> str:
    return format(v, fmt) if v is not None else "-"


def _dv(v) -> str:
    """A sort key attribute (numbers sort numerically; an empty key sorts last)."""
    return f' data-v="{v:.6g}"' if isinstance(v, (int, float)) and math.isfinite(v) else ' data-v=""'


# ---- the routing report ----------------------------------------------------------------------
def render_report(s: dict) -> str:
    """The page of ``moekit inspect`` from its summary."""
    cfg = s["model_config"]
    plots = s["plots"]
    fig = _Figures(plots.get("heatmaps"))
    E, K = cfg["num_experts"], cfg["top_k"]
    layers = list(s["layers"])
    text = f"{s['tokens']:,} tokens"
    if s.get("data"):
        text += f" of {escape(str(s['data']))}" + (f" ({escape(str(s['split']))})" if s.get("split") else "")
    if s.get("seq_len"):
        text += f", sequence length {s['seq_len']}"
    title = f"Routing report: {escape(str(s['model']))}" if s.get("model") else "Routing report"
    body = [f"<h1>{title}</h1>",
            f"<p>{text}; {E} experts, top-{K}, router <code>{escape(cfg['router'])}</code>, "
            f"MoE layers {', '.join(map(str, cfg['moe_layers']))}.</p>"]
    toc = [("summary", "Summary: what the experts learned"), ("load", "Expert load"),
           ("training", "Load over training"), ("entropy", "Router entropy"), ("numbers", "Numbers per layer")]
    if s.get("text_classes"):
        toc.append(("text", "The text's token classes"))
    toc += [(f"layer-{layer}", f"Layer {layer}: co-activation, classes, experts") for layer in layers]
    body.append('<nav class="toc"><b>Contents</b><ol>' + "".join(f'<li><a href="#{a}">{escape(t)}</a></li>'
                                                                  for a, t in toc) + "</ol></nav>")
    body += _summary(s)

    ids = [str(i) for i in layers]
    body += ['<section id="load"><h2>Expert load</h2>',
             fig(plots["load"], "expert load heatmap",
                 "Each cell is one expert (column) of one MoE layer (row): its share of the layer's routed "
                 "assignments (tokens &times; top-k, counted before any capacity drop) divided by the uniform share "
                 "1/E. White is exactly uniform (1x); blue cells get less than their share, deep blue almost "
                 "nothing; red cells get more, deep red at 3x and above. Colour alone is not collapse (an expert "
                 "at 1.5x is just busier than average): the cells outlined (or, past 64 experts, dotted) in black "
                 "are the starved (&lt; 0.1x) or hot (&gt; 3x) experts listed in the summary.",
                 _hover([f"layer {i}" for i in ids], [f"expert {e}" for e in range(E)],
                        [s["layers"][i]["load_ratio"] for i in ids], "load / uniform")),
             "</section>"]

    body.append('<section id="training"><h2>Load over training</h2>')
    if "balance_over_training" in plots:
        body.append(fig(plots["balance_over_training"], "load balance over training",
                        "Left: the busiest expert's load divided by the mean load, per layer, at each logged training "
                        "step; right: the least busy expert's. 1 (dashed) is perfect balance; the red dotted lines "
                        "are the collapse thresholds (hot above 3x, starved below 0.1x). These are kept tokens "
                        "(after capacity) of each training batch, so single steps are noisy. Every expert's own "
                        "history is in its layer's section."))
    else:
        body.append('<p class="muted">No metrics.jsonl next to this checkpoint: no training history to show.</p>')
    body.append("</section>")

    body += ['<section id="entropy"><h2>Router entropy</h2>',
             fig(plots["entropy"], "router entropy per layer",
                 f"Left: the router's mean per-token entropy per layer, between ln K (green: all of a token's weight "
                 f"on the {K} experts it runs) and ln E (grey: the same weight on all {E}, an undecided router). "
                 "Right: the entropy of the layer's overall load divided by ln E; 1 means tokens are spread evenly "
                 "over the experts in aggregate. The healthy case is a decided router (left bar low) that is still "
                 "balanced overall (right bar near 1)."),
             "</section>"]
    body += ['<section id="numbers"><h2>Numbers per layer</h2>', _layer_table(s), "</section>"]
    if s.get("text_classes"):
        body.append('<section id="text"><h2>The text\'s token classes</h2><p>The lexical classes of the routed text '
                    "itself: the baseline every expert's mix is compared with.</p><div class=scroll><table><tr>"
                    + "".join(f"<th>{c}</th>" for c in CATEGORIES) + "</tr><tr>"
                    + "".join(f"<td>{_pct(s['text_classes'][c])}</td>" for c in CATEGORIES)
                    + "</tr></table></div></section>")
    elif s.get("classes_note"):
        body.append(f'<p class="muted">{escape(s["classes_note"])}</p>')
    flagged = {(f["layer"], f["expert"]): f["kind"] for f in s["collapse"]}
    history = ((s.get("training") or {}).get("collapse_history")) or {}
    for layer, ls in s["layers"].items():
        body += _layer_section(s, layer, ls, fig, flagged, history.get(str(layer), []))
    return _page(f"moekit routing report: {s['model']}" if s.get("model") else "moekit routing report", body)


_BANNER_ITEMS = 12  # experts named per layer and kind in the collapse banner; the tables have every one


def _history_text(h: dict) -> str:
    steps = (f"step {h['first_step']:,}" if h["first_step"] == h["last_step"]
             else f"steps {h['first_step']:,}&ndash;{h['last_step']:,}")
    if h["at_end"]:
        end = f"still {h['kind']} at the last logged step (since step {h['since']:,})"
    elif h.get("recent"):
        end = "on and off until the end"
    else:
        end = "recovered"
    return f"{h['kind']} in {h['steps']} of {h['of']} logged steps ({_pct(h['fraction'])}), {steps}; {end}"


def _summary(s: dict) -> list[str]:
    th = s["collapse_thresholds"]
    tr = s.get("training")
    during = s.get("training_collapse") or []
    min_frac = s.get("training_collapse_min_fraction", 0.1)
    out = ['<section id="summary"><h2>Summary: what the experts learned</h2>']
    if s["collapse"]:
        out.append('<div class="banner collapse"><h3>Routing collapse</h3><p>On this text, experts with less than '
                   f"{th['starved_below']:g}x (starved) or more than {th['hot_above']:g}x (hot) the uniform share of "
                   "the routed assignments, with their share as a multiple of the uniform one:</p><ul>")
        by_layer: dict[int, dict[str, list[dict]]] = {}
        for f in s["collapse"]:
            by_layer.setdefault(f["layer"], {}).setdefault(f["kind"], []).append(f)
        for layer, kinds in by_layer.items():
            parts = []
            for kind, fs in sorted(kinds.items()):
                shown_fs = sorted(fs, key=lambda f: (f["ratio"] if kind == "starved" else -f["ratio"], f["expert"]))
                listed = ", ".join(f'<a href="#L{layer}-e{f["expert"]}">{f["expert"]}</a> ({f["ratio"]:.2f}x)'
                                   for f in shown_fs[:_BANNER_ITEMS])
                more = f" and {len(fs) - _BANNER_ITEMS} more" if len(fs) > _BANNER_ITEMS else ""
                parts.append(f"<b>{kind}</b>: {len(fs)} expert{'s' if len(fs) > 1 else ''}: {listed}{more}")
            out.append(f"<li>layer {layer}: " + "; ".join(parts) + "</li>")
        out.append("</ul></div>")
    if during:
        out.append('<div class="banner history"><h3>Collapse during training</h3><p>From the run\'s '
                   f"metrics.jsonl: experts starved or hot in at least {100 * min_frac:g}% of the logged training "
                   "steps (same thresholds, kept tokens of each training batch):</p><ul>")
        by_layer_h: dict[int, list[dict]] = {}
        for h in during:
            by_layer_h.setdefault(h["layer"], []).append(h)
        for layer, hs in by_layer_h.items():
            hs = sorted(hs, key=lambda h: (-h["fraction"], h["expert"]))
            still = sum(h["at_end"] for h in hs)
            h = hs[0]
            out.append(f"<li>layer {layer}: {len(hs)} expert{'s' if len(hs) > 1 else ''} ({still} still at the last "
                       f'logged step); the longest, <a href="#L{layer}-e{h["expert"]}">expert {h["expert"]}</a>: '
                       f"{_history_text(h)}</li>")
        out.append("</ul><p>Every expert's history: the <i>during training</i> column of its layer's table, and "
                   "the layer's load-over-training figure.</p></div>")
    if not s["collapse"] and not during:
        hist = (f" and no expert was starved or hot in {100 * min_frac:g}% or more of the {len(tr['steps']):,} "
                "logged training steps" if tr else " (no training metrics to check the history against)")
        out.append(f'<p class="banner ok">No collapse: on this text every expert gets between '
                   f"{th['starved_below']:g}x and {th['hot_above']:g}x the uniform share{hist}.</p>")
    out.append("<p>Per layer: <b>balance</b> is the busiest expert's load over the mean load (1 = uniform); "
               "<b>router</b> compares the mean per-token entropy H of the router's weights with its maximum ln E; "
               "exp(H) is the number of experts the weight is effectively spread over. <b>Specialists</b> are the "
               "experts whose tokens differ most from the text's own mix; <b>together</b> are expert pairs that "
               "share tokens more often than independent choices would (lift 1 = independent).</p>")
    out.append('<div class="scroll"><table class="summary"><thead><tr><th>layer</th><th>balance</th><th>router</th>'
               "<th>specialists</th><th>together</th><th>during training</th></tr></thead><tbody>")
    history = (tr or {}).get("collapse_history") or {}
    for layer, ls in s["layers"].items():
        out.append(f'<tr><td><a href="#layer-{escape(layer)}">{escape(layer)}</a></td>'
                   f"<td><b>{ls['max_load_ratio']:.2f}x</b> mean (least {ls['min_load_ratio']:.2f}x): "
                   f"{escape(ls['balance_reading'])}</td>"
                   f"<td>H = <b>{ls['router_entropy']:.2f}</b> of ln {ls['num_experts']} = "
                   f"{ls['router_entropy_uniform']:.2f} nats ({_pct(ls['router_entropy_normalized'])}): "
                   f"{escape(ls['entropy_reading'])}</td>"
                   f"<td>{_specialists(ls, layer)}</td><td>{_pairs(ls)}</td>"
                   f"<td>{_history_cell(tr, history.get(str(layer), []), min_frac)}</td></tr>")
    out.append("</tbody></table></div></section>")
    return out


def _specialist(ls: dict, layer: str, e: int) -> str:
    sp = ls["specialisation"][e]
    toks = " ".join(f"<code>{shown(t['text'])}</code>" for t in ls["top_tokens"][e][:3])
    if sp.get("distinct_class"):
        lift = f", {sp['distinct_lift']:.1f}x" if sp.get("distinct_lift") else ""
        what = f"{_pct(sp['distinct_share'])} {sp['distinct_class']} (text: {_pct(sp['text_share'])}{lift})"
    else:
        what = f"{sp['token_kl_bits']:.2f} bits from the text's token mix"
    return (f'<a href="#L{escape(layer)}-e{e}">expert {e}</a> ({ls["load_ratio"][e]:.2f}x load): {what}'
            + (f"; most often {toks}" if toks else ""))


def _specialists(ls: dict, layer: str) -> str:
    chosen = ls.get("specialists") or []
    if not chosen:
        return '<span class="muted">no expert with enough tokens</span>'
    return "<ul>" + "".join(f"<li>{_specialist(ls, layer, e)}</li>" for e in chosen) + "</ul>"


def _pairs(ls: dict) -> str:
    co = ls.get("coactivation")
    if co is None:
        return '<span class="muted">top-1: one expert a token</span>'
    if not co.get("pairs"):
        return '<span class="muted">no pair shares 5% of its tokens</span>'
    return "<ul>" + "".join(f"<li>{p['i']} &amp; {p['j']}: <b>{p['lift']:.1f}x</b> chance (P({p['j']}|{p['i']}) "
                            f"= {p['given_i']:.2f})</li>" for p in co["pairs"]) + "</ul>"


def _history_cell(tr: dict | None, hist: list[dict], min_frac: float) -> str:
    if not tr:
        return '<span class="muted">no training metrics</span>'
    if not hist:
        return f"no expert starved or hot at any of the {len(tr['steps']):,} logged steps"
    major = sorted((h for h in hist if h["fraction"] >= min_frac), key=lambda h: (-h["fraction"], h["expert"]))
    items = [f"expert {h['expert']}: {_history_text(h)}" for h in major[:2]]
    if len(major) > 2:
        items.append(f"&hellip; {len(major) - 2} more")
    minor = len(hist) - len(major)
    if minor:
        items.append(f'<span class="muted">{minor} more only briefly (under {100 * min_frac:g}% of the steps)</span>')
    return f'<ul class="{"warn" if major else ""}">' + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _layer_table(s: dict) -> str:
    rows = ['<div class="scroll"><table class="sortable"><thead><tr><th>layer</th><th>router entropy (nats)</th>'
            "<th>ln E</th><th>H / ln E</th><th>effective experts exp(H)</th><th>H(load) / ln E</th>"
            "<th>max load / uniform</th><th>min load / uniform</th><th>dropped assignments</th>"
            "<th>dropped tokens</th></tr></thead><tbody>"]
    for layer, ls in s["layers"].items():
        rows.append(f"<tr><td{_dv(int(layer))}>{escape(layer)}</td><td>{ls['router_entropy']:.3f}</td>"
                    f"<td>{ls['router_entropy_uniform']:.3f}</td><td>{ls['router_entropy_normalized']:.3f}</td>"
                    f"<td>{ls['effective_experts']:.2f}</td><td>{ls['load_entropy_normalized']:.3f}</td>"
                    f"<td>{ls['max_load_ratio']:.2f}</td><td>{ls['min_load_ratio']:.2f}</td>"
                    f"<td{_dv(ls['dropped_assignments'])}>{ls['dropped_assignments']:,} "
                    f"({_pct(ls['dropped_fraction'])})</td><td>{ls['dropped_tokens']:,}</td></tr>")
    rows.append("</tbody></table></div>")
    return "\n".join(rows)


def _layer_section(s: dict, layer: str, ls: dict, fig: _Figures, flagged: dict, hist: list[dict]) -> list[str]:
    plots = s["plots"]
    E, K = ls["num_experts"], ls["top_k"]
    out = [f'<section id="layer-{escape(layer)}"><h2>Layer {escape(layer)}</h2>',
           f"<p>Balance {ls['max_load_ratio']:.2f}x the mean at most, {ls['min_load_ratio']:.2f}x at least "
           f"({escape(ls['balance_reading'])}); router {escape(ls['entropy_reading'])}.</p>"]
    co = ls["coactivation"]
    if layer in plots["coactivation"]:
        order = co["order"]
        chance = f" Chance level (independent choices, uniform load) is (K-1)/(E-1) = {(K - 1) / (E - 1):.2f}, " \
                 "marked on the colour bar." if E > 1 and K > 1 else ""
        out.append(fig(plots["coactivation"][layer], f"co-activation, layer {layer}",
                       "Row i, column j: of the tokens routed to expert i, the share also routed to expert j, "
                       "P(j | i); brighter is more. The diagonal (an expert with itself) is blank. Rows and columns "
                       "are in the same clustered order (average-linkage clustering on how often two experts share "
                       "tokens), so experts that fire together form bright blocks along the diagonal, and a bright "
                       "column is an expert many others pair with." + chance
                       + (f" Left out: {len(co['empty'])} expert{'s' if len(co['empty']) > 1 else ''} that took no "
                          "tokens." if co.get("empty") else ""),
                       _hover([f"i = expert {e}" for e in order], [f"j = expert {e}" for e in order],
                              [[co["given"][i][j] if i != j else None for j in order] for i in order],
                              "P(j | i)")))
    elif K == 1:
        out.append('<p class="muted">Top-1 routing: a token goes to one expert, so there is no co-activation.</p>')
    if layer in plots["classes"]:
        out.append(fig(plots["classes"][layer], f"token classes of the most specialised experts, layer {layer}",
                       "Each bar splits the tokens an expert takes into lexical classes of Python source; the top "
                       "bar is the text's own mix. Shown: the layer's most specialised experts (largest divergence "
                       "of their class mix from the text's), most specialised first, with their load; every expert "
                       "is in the table below. An expert whose bar looks like the text's is a generalist."))
    if layer in plots.get("load_over_training", {}):
        binned = s["training"]["load_ratio_binned"][layer]
        out.append(fig(plots["load_over_training"][layer], f"expert load over training, layer {layer}",
                       "Each row is an expert, each column a bin of consecutive logged training steps (their mean "
                       "load over the uniform share, kept tokens of the training batches). Colours as in the load "
                       "heatmap: white uniform, blue below, red above. A dark blue stretch is an expert starved "
                       "during that part of training; a row that turns pale later recovered.",
                       _hover([f"expert {e}" for e in range(E)], [f"steps to {st:,}" for st in binned["steps"]],
                              binned["ratio"], "load / uniform")))
    out.append(_expert_table(ls, layer, flagged, hist))
    out.append("</section>")
    return out


def _expert_table(ls: dict, layer: str, flagged: dict, hist: list[dict]) -> str:
    has_classes = ls["classes"] is not None
    tid = f"experts-{escape(layer)}"
    by_expert: dict[int, list[dict]] = {}
    for h in hist:
        by_expert.setdefault(h["expert"], []).append(h)
    head = ("<tr><th>expert</th><th>load</th><th>load / uniform</th><th class='l'>now</th>"
            "<th class='l'>during training (share of logged steps)</th><th>tokens vs text (bits)</th>")
    head += ("<th>classes vs text (bits)</th><th class='l'>main class</th>"
             "<th class='l'>distinctive class (its share / the text's)</th>") if has_classes else ""
    head += ("<th class='l'>tokens it takes most often: token (share of its tokens, share of that token's "
             "occurrences)</th></tr>")
    rows = [f'<h3>Experts of layer {escape(layer)}</h3><p><input class="filter" type="search" '
            f'placeholder="filter: an expert, a class, a token, starved, hot" data-table="{tid}" '
            f'data-count="{tid}-count" aria-label="filter the experts of layer {escape(layer)}"> '
            f'<span class="muted" id="{tid}-count"></span></p><p class="muted">Click a column header to sort, again to '
            "reverse. Bits: the KL divergence of the expert's tokens (or their classes) from the text's, 0 for an "
            "expert that takes a fair sample of the text; the larger, the more specialised.</p>",
            f'<div class="scroll"><table class="sortable" id="{tid}"><thead>{head}</thead><tbody>']
    for e, top in enumerate(ls["top_tokens"]):
        sp = ls["specialisation"][e]
        kind = flagged.get((int(layer), e))
        now = f'<span class="flag">{kind}</span>' if kind else ""
        hs = by_expert.get(e, [])
        during = ", ".join(f"{h['kind']} {100 * h['fraction']:.0f}%"
                           + (" to the end" if h["at_end"] else " until late" if h.get("recent") else "") for h in hs)
        cls = ""
        if has_classes:
            c = ls["classes"][e]
            best = max(c, key=c.get) if any(c.values()) else None
            cls = (f"<td{_dv(sp['class_kl_bits'])}>{_num(sp['class_kl_bits'], '.3f')}</td>"
                   + (f"<td class='l'{_dv(c[best])}>{escape(best)} {_pct(c[best])}</td>" if best else "<td>-</td>"))
            if sp.get("distinct_class"):
                lift = sp.get("distinct_lift")
                cls += f"<td class='l'{_dv(lift)}>{escape(sp['distinct_class'])} {_num(lift, '.1f')}x</td>"
            else:
                cls += "<td>-</td>"
        tokens = ", ".join(f"<code>{shown(t['text'])}</code> ({_pct(t['share'])}, {_pct(t['coverage'])})" for t in top)
        search = " ".join(t["text"] for t in top)
        rows.append(f'<tr id="L{escape(layer)}-e{e}" data-search="{escape(search)}"><td{_dv(e)}>{e}</td>'
                    f"<td{_dv(ls['load'][e])}>{_pct(ls['load'][e])}</td><td>{ls['load_ratio'][e]:.2f}</td>"
                    f"<td class='l'>{now}</td><td class='l'{_dv(max((h['fraction'] for h in hs), default=0))}>"
                    f"{during}</td><td{_dv(sp['token_kl_bits'])}>{_num(sp['token_kl_bits'], '.3f')}</td>{cls}"
                    f"<td class='l'>{tokens or '<span class=muted>no tokens</span>'}</td></tr>")
    rows.append("</tbody></table></div>")
    return "\n".join(rows)


# ---- the run comparison ----------------------------------------------------------------------
def _si(v, unit: str = "") -> str:
    if v is None:
        return "-"
    for factor, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= factor:
            return f"{v / factor:.3g} {prefix}{unit}".rstrip()
    return f"{v:.3g} {unit}".rstrip()


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def render_comparison(s: dict) -> str:
    """The page of ``moekit plot`` from its summary."""
    fig = _Figures()
    body = [f"<h1>Run comparison ({len(s['runs'])} runs)</h1>",
            "<p>One colour per run in the table and in every figure. Parameters and FLOPs come from each run's "
            "model configuration: <i>active</i> parameters are those a token uses (all but the routed experts it is "
            "not sent to), so an MoE and a dense model with the same active parameters cost the same per token. "
            "Training FLOPs are 6 &times; active parameters per token plus attention, summed over the tokens seen; "
            "wall-clock counts training steps only (no evaluation or saving). Click a header to sort.</p>",
            '<div class="scroll"><table class="sortable"><thead><tr><th class="l">run</th><th>steps</th><th>tokens</th>'
            "<th>total params</th><th>active params</th><th>training FLOPs</th><th>wall-clock</th>"
            "<th>final train loss</th><th>final val loss</th><th>best val loss</th><th>final max load / mean</th>"
            "<th class='l'>loss unit</th></tr></thead><tbody>"]
    for name, r in s["runs"].items():
        swatch = f'<span class="swatch" style="background:{escape(r.get("color", "#888"))}"></span>'
        body.append(f"<tr><td class='l'>{swatch}{escape(name)}<br><span class=muted>{escape(r['path'])}</span></td>"
                    f"<td{_dv(r['steps'])}>{_num(r['steps'], ',')}</td><td{_dv(r['tokens'])}>{_si(r['tokens'])}</td>"
                    f"<td{_dv(r.get('total_params'))}>{_si(r.get('total_params'))}</td>"
                    f"<td{_dv(r.get('active_params'))}>{_si(r.get('active_params'))}</td>"
                    f"<td{_dv(r.get('flops'))}>{_si(r.get('flops'), 'FLOP')}</td>"
                    f"<td{_dv(r.get('wall_clock_s'))}>{_duration(r.get('wall_clock_s'))}</td>"
                    f"<td>{_num(r['final_train_loss'], '.4f')}</td><td>{_num(r['final_val_loss'], '.4f')}</td>"
                    f"<td>{_num(r['best_val_loss'], '.4f')}</td><td>{_num(r['final_max_load_ratio'], '.2f')}</td>"
                    f"<td class='l'>{escape(r.get('loss_unit', '-'))}</td></tr>")
    body.append("</tbody></table></div>")
    captions = {
        "loss": "Training loss (left, every logged step) and validation loss (right, at each evaluation) of every "
                "run, in the unit named on the axis; lower is better.",
        "balance": "The busiest (left) and least busy (right) expert's load divided by the mean load, averaged over "
                   "the MoE layers, at each logged step (kept tokens of the training batches). 1 (dashed) is perfect "
                   "balance; dense runs have no experts and are not drawn.",
    }
    for key, title in (("loss", "Loss"), ("balance", "Load balance")):
        if key in s["plots"]:
            note = s["notes"].get(key)  # e.g. runs whose losses are in different units
            body += [f"<h2>{title}</h2>", *([f"<p><b>{escape(note)}</b></p>"] if note else []),
                     fig(s["plots"][key], title, captions[key])]
        else:
            body.append(f'<h2>{title}</h2><p class="muted">{escape(s["notes"].get(key, ""))}</p>')
    return _page("moekit run comparison", body)
