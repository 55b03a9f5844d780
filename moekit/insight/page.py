"""Static HTML pages for the report and the run comparison: one self-contained file, images linked
by relative path, no scripts, so a directory opens from disk in any browser."""

from __future__ import annotations

from html import escape

from moekit.insight.categories import CATEGORIES

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; } h3 { margin-top: 1.2em; }
img { max-width: 100%; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 2px 6px; text-align: right; vertical-align: top; }
th { background: #f4f4f4; } td.l { text-align: left; }
code { background: #f4f4f4; padding: 0 3px; white-space: pre; }
.collapse { background: #fde8e8; border: 2px solid #c00; padding: 0.6em 1em; }
.collapse h2 { color: #c00; border: none; margin-top: 0; }
.ok { background: #e8f6e8; border: 1px solid #393; padding: 0.4em 1em; }
.flag { color: #c00; font-weight: bold; } .muted { color: #777; }
"""


def _page(title: str, body: list[str]) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _img(name: str, alt: str) -> str:
    return f'<p><img src="{escape(name)}" alt="{escape(alt)}"></p>'


def shown(text: str) -> str:
    """A token made visible: spaces, tabs and newlines as symbols."""
    return escape(text).replace(" ", "\u2423").replace("\t", "\u21e5").replace("\n", "\u21b5").replace("\r", "\u240d")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def render_report(s: dict) -> str:
    """The page of ``moekit inspect`` from its summary."""
    cfg = s["model_config"]
    body = [f"<h1>Routing report: {escape(str(s.get('model')))}</h1>",
            f"<p>{s['tokens']:,} tokens of {escape(str(s.get('data')))} ({escape(str(s.get('split')))}), "
            f"sequence length {s.get('seq_len')}; {cfg['num_experts']} experts, top-{cfg['top_k']}, router "
            f"<code>{escape(cfg['router'])}</code>, MoE layers {cfg['moe_layers']}.</p>"]
    th = s["collapse_thresholds"]
    if s["collapse"]:
        body.append('<div class="collapse"><h2>Routing collapse</h2><p>Experts with less than '
                    f"{th['starved_below']:g}x or more than {th['hot_above']:g}x the uniform share of the "
                    "routed assignments:</p><ul>")
        for f in s["collapse"]:
            body.append(f"<li>layer {f['layer']}, expert {f['expert']}: <b>{f['kind']}</b>, {_pct(f['share'])} of the "
                        f"assignments ({f['ratio']:.2f}x uniform)</li>")
        body.append("</ul></div>")
    else:
        body.append(f'<p class="ok">No collapse: every expert gets between {th["starved_below"]:g}x and '
                    f'{th["hot_above"]:g}x the uniform share.</p>')
    plots = s["plots"]
    body += ["<h2>Expert load</h2>", "<p>Share of the routed assignments (before capacity) each expert gets, "
             "relative to the uniform share 1/E.</p>", _img(plots["load"], "expert load heatmap")]
    body.append("<h2>Load balance over training</h2>")
    if "balance_over_training" in plots:
        body.append(_img(plots["balance_over_training"], "load balance over training"))
    else:
        body.append('<p class="muted">No metrics.jsonl next to this checkpoint: nothing to show.</p>')
    body += ["<h2>Router entropy</h2>", _img(plots["entropy"], "router entropy per layer")]
    body.append(_layer_table(s))
    if s.get("text_classes"):
        body.append("<h2>The text</h2><table><tr>" + "".join(f"<th>{c}</th>" for c in CATEGORIES) + "</tr><tr>"
                    + "".join(f"<td>{_pct(s['text_classes'][c])}</td>" for c in CATEGORIES) + "</tr></table>")
    elif s.get("classes_note"):
        body.append(f'<p class="muted">{escape(s["classes_note"])}</p>')
    flagged = {(f["layer"], f["expert"]): f["kind"] for f in s["collapse"]}
    for layer, ls in s["layers"].items():
        body.append(f"<h2>Layer {escape(layer)}</h2>")
        if str(layer) in plots["coactivation"]:
            body.append(_img(plots["coactivation"][str(layer)], f"co-activation, layer {layer}"))
        elif ls["top_k"] == 1:
            body.append('<p class="muted">top-1 routing: no co-activation.</p>')
        if str(layer) in plots["classes"]:
            body.append(_img(plots["classes"][str(layer)], f"token classes per expert, layer {layer}"))
        body.append(_expert_table(ls, int(layer), flagged))
    return _page(f"moekit routing report: {s.get('model')}", body)


def _layer_table(s: dict) -> str:
    rows = ["<table><tr><th>layer</th><th>router entropy (nats)</th><th>ln E</th><th>H(load)/ln E</th>"
            "<th>max load / uniform</th><th>min load / uniform</th><th>dropped assignments</th>"
            "<th>dropped tokens</th></tr>"]
    for layer, ls in s["layers"].items():
        rows.append(f"<tr><td>{escape(layer)}</td><td>{ls['router_entropy']:.3f}</td>"
                    f"<td>{ls['router_entropy_uniform']:.3f}</td><td>{ls['load_entropy_normalized']:.3f}</td>"
                    f"<td>{ls['max_load_ratio']:.2f}</td><td>{ls['min_load_ratio']:.2f}</td>"
                    f"<td>{ls['dropped_assignments']:,} ({_pct(ls['dropped_fraction'])})</td>"
                    f"<td>{ls['dropped_tokens']:,}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _expert_table(ls: dict, layer: int, flagged: dict) -> str:
    has_classes = ls["classes"] is not None
    head = "<tr><th>expert</th><th>load</th><th>load / uniform</th>"
    head += "<th>main class</th>" if has_classes else ""
    head += ("<th class='l'>tokens it takes most often: token (share of its tokens, share of that token's "
             "occurrences)</th></tr>")
    rows = ["<table>", head]
    for e, top in enumerate(ls["top_tokens"]):
        kind = flagged.get((layer, e))
        mark = f' <span class="flag">{kind}</span>' if kind else ""
        cls = ""
        if has_classes:
            c = ls["classes"][e]
            best = max(c, key=c.get) if any(c.values()) else None
            cls = f"<td class='l'>{escape(best)} {_pct(c[best])}</td>" if best else "<td>-</td>"
        tokens = ", ".join(f"<code>{shown(t['text'])}</code> ({_pct(t['share'])}, {_pct(t['coverage'])})" for t in top)
        rows.append(f"<tr><td>{e}{mark}</td><td>{_pct(ls['load'][e])}</td><td>{ls['load_ratio'][e]:.2f}</td>{cls}"
                    f"<td class='l'>{tokens or '<span class=muted>no tokens</span>'}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


def render_comparison(s: dict) -> str:
    """The page of ``moekit plot`` from its summary."""
    body = [f"<h1>Run comparison ({len(s['runs'])} runs)</h1>", "<table><tr><th class='l'>run</th><th>steps</th>"
            "<th>tokens</th><th>final train loss</th><th>final val loss</th><th>best val loss</th>"
            "<th>final max load / mean</th><th>loss unit</th></tr>"]
    for name, r in s["runs"].items():
        def num(v, fmt):
            return format(v, fmt) if v is not None else "-"
        body.append(f"<tr><td class='l'>{escape(name)}<br><span class=muted>{escape(r['path'])}</span></td>"
                    f"<td>{num(r['steps'], ',')}</td><td>{num(r['tokens'], ',')}</td>"
                    f"<td>{num(r['final_train_loss'], '.4f')}</td><td>{num(r['final_val_loss'], '.4f')}</td>"
                    f"<td>{num(r['best_val_loss'], '.4f')}</td><td>{num(r['final_max_load_ratio'], '.2f')}</td>"
                    f"<td>{escape(r.get('loss_unit', '-'))}</td></tr>")
    body.append("</table>")
    for key, title in (("loss", "Loss"), ("balance", "Load balance")):
        if key in s["plots"]:
            note = s["notes"].get(key)  # e.g. runs whose losses are in different units
            body += [f"<h2>{title}</h2>", *([f"<p><b>{escape(note)}</b></p>"] if note else []),
                     _img(s["plots"][key], title)]
        else:
            body.append(f'<h2>{title}</h2><p class="muted">{escape(s["notes"].get(key, ""))}</p>')
    return _page("moekit run comparison", body)
