"""HTML rendering shared by `analyze` (report.html) and `speculate` (speculation.html).

A report is self-contained by default: every chart is embedded as a data: URI, so the one file can be
mailed or attached. Tables format each column by what it holds (Col: counts with thousands
separators, rates as percentages, small values with significant digits), not one format for all.
"""

from __future__ import annotations

import base64
import html
import math
import os

CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1150px}table{border-collapse:collapse;
font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#eee}
td.l,th.l{text-align:left}img{max-width:100%;border:1px solid #ddd;margin:4px 0}code{background:#f4f4f4}
.demo{background:#fff3cd;border:2px solid #e0a800;padding:.6em 1em;margin:1em 0;font-size:15px}
.note{color:#555;font-size:13px}details{margin:.5em 0}"""

MIME = {"png": "image/png", "svg": "image/svg+xml"}


class Col:
    """A table column: header and kind. Kinds: 'text', 'int' (1,234,567), 'pct' (a share in 0..1
    shown as 12.3%, small ones as 0.012%), 'float' (3 significant digits, fixed point when sensible),
    'bits' (3 decimals)."""

    def __init__(self, header: str, kind: str = "float", digits: int = 3):
        self.header, self.kind, self.digits = header, kind, digits

    def fmt(self, v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–"
        if self.kind == "text" or isinstance(v, str):
            return str(v)
        if self.kind == "int":
            return f"{int(round(v)):,}"
        if self.kind == "pct":
            p = 100.0 * float(v)
            if p == 0:
                return "0%"
            if abs(p) < 0.1:
                return f"{p:.2g}%"
            return f"{p:.1f}%"
        if self.kind == "bits":
            return f"{float(v):.{self.digits}f}"
        x = float(v)
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) >= 0.01:
            return f"{x:.{self.digits}g}" if abs(x) < 1 else f"{x:.{max(1, self.digits - 1)}f}"
        return f"{x:.{self.digits}g}"


def table(cols: list, rows: list[list]) -> str:
    """cols: Col objects (or header strings: float columns)."""
    cols = [c if isinstance(c, Col) else Col(c) for c in cols]
    cls = lambda c: " class='l'" if c.kind == "text" else ""  # noqa: E731
    h = "".join(f"<th{cls(c)}>{html.escape(c.header)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td{cls(c)}>{html.escape(c.fmt(v))}</td>" for c, v in zip(cols, r)) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def image(out_dir: str, name: str, embed: bool = True) -> str:
    """An <img> of chart `name` (a file in out_dir): embedded as a data: URI, or linked."""
    alt = html.escape(name)
    ext = name.rsplit(".", 1)[-1].lower()
    if embed and ext in MIME:
        with open(os.path.join(out_dir, name), "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
        return f"<img src=\"data:{MIME[ext]};base64,{data}\" alt='{alt}' title='{alt}'>"
    if ext == "pdf":
        return f"<p><a href='{alt}'>{alt}</a> (PDF)</p>"
    return f"<img src='{alt}' alt='{alt}'>"


def demo_banner(model: dict | None) -> str:
    """The first-screen warning for stores collected with a random-weight demo model."""
    model = model or {}
    if not model.get("demo"):
        return ""
    return ("<div class='demo'><b>Demo model: random weights.</b> This store was collected with "
            f"<code>{html.escape(str(model.get('id') or '?'))}</code>, whose weights are seeded random numbers "
            "(manifest <code>model.demo</code>). Its routing exercises the pipeline but says nothing about a "
            "trained Switch Transformer's; collect with <code>--model google/switch-base-N</code> for real "
            "traces.</div>")


def page(title: str, body: list[str]) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>")
