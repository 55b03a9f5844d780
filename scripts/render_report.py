"""Renders a routing report (``moekit inspect``'s index.html) in headless Chromium: checks that every
image loaded and no script failed, and takes screenshots of the report's top and of one layer.

    python scripts/render_report.py --report runs/inspect-small                  # check it, screenshots
    python scripts/render_report.py --model runs/small --out /tmp/report          # inspect first, then the same
    python scripts/render_report.py --report R --top docs/images/report-top.png --layer 1 \\
        --layer-png docs/images/report-layer.png

Chromium comes from the distribution's packages (Debian: ``apt-get install chromium``). The page
marks ``<body data-ok="1">`` once every image has loaded and no script error occurred
(:mod:`moekit.insight.page`); ``--dump-dom`` prints the page after its load event, so the mark is
read from there. Exit status 1 when the check fails. ``tests/test_report_browser.py`` uses the
functions below.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--allow-file-access-from-files")


def find_chromium() -> str | None:
    """The first Chromium-family browser on PATH, or None."""
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def _run(browser: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([browser, *FLAGS, "--enable-logging=stderr", "--v=0", *args], capture_output=True,
                          text=True, timeout=timeout)


@dataclass
class PageCheck:
    """What the browser saw: the body's marks, and the script errors of its console."""

    ok: bool  # <body data-ok="1">: every image loaded, no script error
    broken: list[str]  # images that did not load
    js_errors: list[str]  # uncaught errors reported on the console, and those the page recorded
    body_attrs: dict[str, str]
    dom: str

    def problems(self) -> list[str]:
        out = [f"image did not load: {b}" for b in self.broken] + [f"script error: {e}" for e in self.js_errors]
        if not self.ok and not out:
            out.append("the page's script did not finish (no data-ok on <body>)")
        return out


def check_page(html: Path, browser: str | None = None, width: int = 1280, height: int = 1000,
               timeout: float = 120) -> PageCheck:
    """Loads ``html`` from disk in headless Chromium and reads the page's own check from its DOM."""
    browser = browser or find_chromium()
    if browser is None:
        raise FileNotFoundError(f"no Chromium found on PATH (tried {', '.join(BROWSERS)})")
    res = _run(browser, [f"--window-size={width},{height}", "--dump-dom", Path(html).resolve().as_uri()], timeout)
    if res.returncode != 0 or "<body" not in res.stdout:
        raise RuntimeError(f"{browser} --dump-dom {html} failed (exit {res.returncode}): {res.stderr[-2000:]}")
    m = re.search(r"<body([^>]*)>", res.stdout)
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', m.group(1))) if m else {}
    root = re.search(r"<html([^>]*)>", res.stdout)
    root_attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', root.group(1))) if root else {}
    errors = [line for line in res.stderr.splitlines() if "CONSOLE" in line and "Uncaught" in line]
    errors += [e.strip() for e in root_attrs.get("data-js-errors", "").split(" | ") if e.strip()]
    broken = attrs.get("data-broken", "").split() + root_attrs.get("data-broken-early", "").split()
    return PageCheck(attrs.get("data-ok") == "1", sorted(set(broken)), errors, attrs, res.stdout)


def screenshot(html: Path, png: Path, width: int = 1280, height: int = 1400, only: str | None = None,
               browser: str | None = None, timeout: float = 120) -> Path:
    """A ``width`` x ``height`` screenshot of the top of ``html``; with ``only`` (an element id), of
    that section alone: a sibling copy of the page hides everything else (so its images still load)."""
    browser = browser or find_chromium()
    if browser is None:
        raise FileNotFoundError(f"no Chromium found on PATH (tried {', '.join(BROWSERS)})")
    html = Path(html).resolve()
    target = html
    if only is not None:
        if f'id="{only}"' not in html.read_text():
            raise ValueError(f"{html} has no element with id {only!r}")
        target = html.with_name(f".screenshot-{only}.html")
        style = f"<style>body > :not(#{only}):not(script) {{ display: none !important; }}</style></head>"
        target.write_text(html.read_text().replace("</head>", style, 1))
    try:
        png = Path(png).resolve()
        png.parent.mkdir(parents=True, exist_ok=True)
        res = _run(browser, [f"--window-size={width},{height}", f"--screenshot={png}", target.as_uri()], timeout)
        if res.returncode != 0 or not png.is_file():
            raise RuntimeError(f"{browser} --screenshot of {target} failed (exit {res.returncode}): "
                               f"{res.stderr[-2000:]}")
    finally:
        if target != html:
            target.unlink(missing_ok=True)
    return png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--report", type=Path, help="a report directory (holding index.html)")
    src.add_argument("--model", help="run `moekit inspect` on this run or checkpoint first (into --out)")
    p.add_argument("--out", type=Path, help="with --model: the report directory (default: a temporary one)")
    p.add_argument("--max-tokens", type=int, default=65536, help="with --model: tokens routed (default 65536)")
    p.add_argument("--top", type=Path, help="screenshot of the report's top (PNG)")
    p.add_argument("--layer", help="the MoE layer of --layer-png (default: the first)")
    p.add_argument("--layer-png", type=Path, help="screenshot of one layer's section (PNG)")
    p.add_argument("--width", type=int, default=1280, help="browser window width in CSS pixels (default 1280)")
    p.add_argument("--height", type=int, default=1500, help="screenshot height in CSS pixels (default 1500)")
    args = p.parse_args(argv)
    report = args.report
    if args.model:
        import tempfile

        from moekit.insight.report import InspectConfig, inspect

        report = args.out or Path(tempfile.mkdtemp(prefix="moekit-report-"))
        inspect(InspectConfig(model=args.model, out=str(report), max_tokens=args.max_tokens, overwrite=True))
    html = Path(report) / "index.html"
    if not html.is_file():
        print(f"render_report: {html} not found", file=sys.stderr)
        return 2
    if find_chromium() is None:
        print(f"render_report: no Chromium on PATH (tried {', '.join(BROWSERS)}); Debian: apt-get install chromium",
              file=sys.stderr)
        return 2
    check = check_page(html, width=args.width)
    for problem in check.problems():
        print(f"render_report: {html}: {problem}", file=sys.stderr)
    if args.top:
        print(f"top: {screenshot(html, args.top, args.width, args.height)}")
    if args.layer_png:
        layer = args.layer
        if layer is None:
            found = re.search(r'<section id="layer-(\d+)"', html.read_text())
            layer = found.group(1) if found else "0"
        print(f"layer {layer}: {screenshot(html, args.layer_png, args.width, args.height, only=f'layer-{layer}')}")
    print(f"{html}: {'ok' if check.ok and not check.problems() else 'FAILED'}")
    return 0 if check.ok and not check.problems() else 1


if __name__ == "__main__":
    sys.exit(main())
