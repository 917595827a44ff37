"""Self-contained HTML: a page shell with inline CSS and small components (cards, tables, galleries).

No JavaScript, no external CSS, fonts or images: every link is relative to the report folder, so
the report opens from disk in any browser without a server or a network.
"""

from __future__ import annotations

import html
import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

CSS = """
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 -apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#1f2937;background:#f3f4f6}
header{background:#111827;color:#f9fafb;padding:18px 32px 14px}
header h1{margin:0;font-size:21px;font-weight:600;letter-spacing:.2px}
header .meta{color:#9ca3af;font-size:12.5px;margin-top:4px}
header .meta b{color:#e5e7eb;font-weight:500}
nav{position:sticky;top:0;z-index:2;background:#1f2937;padding:0 32px;display:flex;gap:2px;flex-wrap:wrap}
nav a{color:#d1d5db;text-decoration:none;padding:9px 12px;font-size:13px}
nav a:hover{background:#374151;color:#fff}
main{padding:20px 32px 48px;max-width:1320px}
section{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:16px 20px;margin:0 0 18px}
h2{font-size:16px;margin:0 0 10px;font-weight:600}
h3{font-size:14px;margin:14px 0 8px;font-weight:600;color:#374151}
p.note{color:#6b7280;font-size:12.5px;margin:4px 0 10px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:2px 0 4px}
.card{background:#f9fafb;border:1px solid #e5e7eb;border-radius:6px;padding:8px 14px;min-width:128px}
.card .v{font-size:20px;font-weight:600;color:#111827}
.card .k{font-size:11.5px;color:#6b7280;text-transform:uppercase;letter-spacing:.4px}
.card.bad{border-color:#fca5a5;background:#fef2f2}.card.bad .v{color:#b91c1c}
.card.good{border-color:#86efac;background:#f0fdf4}.card.good .v{color:#15803d}
table{border-collapse:collapse;width:100%;font-size:12.5px}
th{text-align:left;background:#f9fafb;color:#374151;font-weight:600;border-bottom:2px solid #e5e7eb;padding:6px 8px;white-space:nowrap}
td{border-bottom:1px solid #f3f4f6;padding:5px 8px;vertical-align:middle}
td.n{text-align:right;font-variant-numeric:tabular-nums}
tr:hover td{background:#f9fafb}
a{color:#1d4ed8}
.badge{display:inline-block;border-radius:10px;padding:1px 8px;font-size:11px;font-weight:600;margin-right:3px}
.badge.border-heavy{background:#fee2e2;color:#991b1b}.badge.diffuse{background:#fef3c7;color:#92400e}
.badge.empty{background:#e5e7eb;color:#374151}.badge.changed{background:#ede9fe;color:#5b21b6}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;background:#f9fafb;border:1px solid #e5e7eb;border-radius:6px;padding:6px;width:174px}
figure img{display:block;width:160px;height:auto;border-radius:3px}
.strip{display:flex;gap:6px;align-items:center;margin:0 0 8px}.strip .lab{width:92px;font-size:12px;color:#374151;font-weight:600}
.strip figure{width:104px;padding:4px}.strip figure img{width:94px}.strip figcaption{font-size:10.5px}
figure figcaption{font-size:11.5px;color:#374151;margin-top:4px;line-height:1.35;word-break:break-word}
figure.wide{width:auto}figure.wide img{width:auto;max-width:100%}
.pair{display:flex;gap:4px}.pair img{width:116px}
figure.pairfig{width:250px}
.plots{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
.plots img{max-width:100%;border:1px solid #f3f4f6;border-radius:4px}
.mini{width:44px;height:auto;vertical-align:middle;border-radius:2px}
.tokens{line-height:2.0;font-size:14px;margin:6px 0 12px}
.token{padding:2px 3px;border-radius:3px}
.row{display:flex;gap:18px;flex-wrap:wrap;align-items:flex-start}
footer{color:#9ca3af;font-size:12px;padding:0 32px 24px}
"""


def esc(value) -> str:
    return html.escape(str(value))


def fmt(value, digits: int = 3) -> str:
    """A table cell: '–' for missing, yes/no, integers with separators, reals rounded, text escaped."""
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if isinstance(value, numbers.Real):
        return "–" if math.isnan(value) else f"{float(value):.{digits}f}"
    return esc(value)


def pct(v: float) -> str:
    """A share as a percentage; '–' for NaN."""
    return "–" if v != v else f"{100 * v:.1f}%"


def num(v: float, digits: int = 3) -> str:
    """A number with ``digits`` decimals; '–' for NaN (an empty map has no entropy, a constant one no rank)."""
    return "–" if v != v else f"{v:.{digits}f}"


def is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def page(*, title: str, meta: str, nav: Sequence[tuple[str, str]], body: str) -> str:
    """A whole page: header (title, meta line), sticky navigation, main content."""
    links = "".join(f'<a href="{esc(href)}">{esc(text)}</a>' for text, href in nav)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{esc(title)}</title><link rel=\"icon\" href=\"data:,\"><style>{CSS}</style></head><body>"
        f"<header><h1>{esc(title)}</h1><div class=\"meta\">{meta}</div></header>"
        f"<nav>{links}</nav><main>{body}</main>"
        "<footer>Generated by camshaft report. Static files only: tables are in tables/.</footer></body></html>\n"
    )


def section(anchor: str, title: str, body: str, *, note: str = "") -> str:
    n = f'<p class="note">{note}</p>' if note else ""
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{n}{body}</section>'


@dataclass(frozen=True)
class Card:
    label: str
    value: str
    tone: str = ""  # "", "good" or "bad"


def cards(items: Sequence[Card]) -> str:
    inner = "".join(
        f'<div class="card {c.tone}"><div class="v">{esc(c.value)}</div><div class="k">{esc(c.label)}</div></div>' for c in items
    )
    return f'<div class="cards">{inner}</div>'


Cell = Callable[[pd.Series], str]


def table(rows: pd.DataFrame, columns: Sequence[tuple[str, str | Cell]]) -> str:
    """An HTML table: columns as (header, column name or a function row -> cell HTML)."""
    if rows.empty:
        return '<p class="note">Nothing to show.</p>'
    head = "".join(f"<th>{esc(h)}</th>" for h, _ in columns)
    body = []
    for _, row in rows.iterrows():
        cells = []
        for _, col in columns:
            if callable(col):
                cells.append(f"<td>{col(row)}</td>")
            else:
                v = row[col]
                cells.append(f'<td class="n">{fmt(v)}</td>' if is_number(v) else f"<td>{fmt(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def text_of(markup: str) -> str:
    """The plain text of an HTML fragment (tags dropped, entities decoded): for ``alt`` attributes."""
    return " ".join(html.unescape(re.sub(r"<[^>]*>", " ", markup)).split())


def figure(src: str, caption: str = "", *, href: str | None = None, css: str = "") -> str:
    """An image with an HTML ``caption``; its alt text is the caption's plain text."""
    img = f'<img src="{esc(src)}" alt="{esc(text_of(caption))}">'
    if href:
        img = f'<a href="{esc(href)}">{img}</a>'
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure class="{esc(css)}">{img}{cap}</figure>'


def gallery(figures: Sequence[str]) -> str:
    if not figures:
        return '<p class="note">Nothing to show.</p>'
    return f'<div class="gallery">{"".join(figures)}</div>'


def strip(label: str, figures: Sequence[str]) -> str:
    """One labelled row of small figures (dataset exemplars)."""
    return f'<div class="strip"><div class="lab">{esc(label)}</div>{"".join(figures)}</div>'


def plots(srcs: Sequence[str]) -> str:
    return '<div class="plots">' + "".join(f'<img src="{esc(s)}" alt="plot">' for s in srcs) + "</div>"


def badges(flags: str) -> str:
    return "".join(f'<span class="badge {esc(f.strip())}">{esc(f.strip())}</span>' for f in flags.split(",") if f.strip())
