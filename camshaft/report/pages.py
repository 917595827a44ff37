"""Writing the report's pages: the shared context, the index and one page per class."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from camshaft.report import html as h
from camshaft.report.samples import Sampler, heat
from camshaft.report.thumbs import safe_name
from camshaft.writers.atomic import atomic_path


@dataclass
class Context:
    """What every section needs: the report, its options, the overlay sampler, the quality score."""

    out: Path
    report: object  # build.Report
    options: object  # build.ReportOptions
    sampler: Sampler
    quality: pd.Series  # per row of report.audit.images, higher is better
    quality_name: str
    run_name: str
    paged: frozenset = frozenset()  # the classes that get a page
    tiles: dict = field(default_factory=dict)  # class -> rendered mean-map tile

    @property
    def audit(self):
        return self.report.audit

    def mean_tile(self, c: int) -> str | None:
        """The coloured mean map of class ``c`` (rendered once), or None when no map explains it."""
        c = int(c)
        if c not in self.audit.mean_maps.counts:
            return None
        if c not in self.tiles:
            self.tiles[c] = heat(self.out, self.audit.mean_maps.mean(c), name=f"mean_{c}", size=self.options.thumb)
        return self.tiles[c]

    def class_href(self, c: int) -> str:
        return safe_name("class", int(c)) + ".html"

    def class_link(self, c: int, name: str) -> str:
        """A link to the class's page, or its plain name when it has none."""
        if int(c) in self.paged:
            return f'<a href="{self.class_href(c)}">{h.esc(name)}</a>'
        return h.esc(name)

    def caption(self, row: pd.Series, *, extra: str = "") -> str:
        """``#12 circle (label ring) · extra``: the image, its explained class and the label if it differs."""
        label = row.get("label")
        shown = "" if pd.isna(label) or str(label) == str(row["target_name"]) else f" <i>(label {h.esc(label)})</i>"
        cls = self.class_link(row["target"], row["target_name"])
        name = h.esc(os.path.basename(str(row["path"])))
        text = f"#{int(row['index'])} {cls}{shown}<br><span title=\"{h.esc(row['path'])}\">{name}</span>"
        return text + (f"<br>{extra}" if extra else "")


def meta_line(report, *, compare) -> str:
    attrs = report.audit.results.attrs
    parts = [
        ("model", attrs.get("model_spec") or attrs.get("model")),
        ("method", f"{attrs.get('method')} @ {attrs.get('tap')}"),
        ("targets", attrs.get("targets")),
        ("data", os.path.basename(str(attrs.get("data")))),
        ("run", str(report.audit.results.out)),
    ]
    if compare is not None:
        parts.append(("compared with", str(compare)))
    return " · ".join(f"<b>{h.esc(k)}</b> {h.esc(v)}" for k, v in parts)


def index_nav(report, *, tokens) -> list[tuple[str, str]]:
    a = report.audit
    nav = [("Overview", "index.html#overview"), ("Flags", "index.html#flags"), ("Classes", "index.html#classes")]
    if a.has_boxes:
        nav.append(("Localization", "index.html#localization"))
    if a.curves:
        nav.append(("Faithfulness", "index.html#faithfulness"))
    if report.drift is not None:
        nav.append(("Drift", "index.html#drift"))
    if report.exemplars is not None:
        nav.append(("Exemplars", "index.html#exemplars"))
    if tokens:
        nav.append(("Tokens", "index.html#tokens"))
    nav.append(("Tables", "index.html#tables"))
    return nav


def write_pages(
    out: Path, report, *, options, tokens: Mapping[str, Sequence[tuple[str, float]]] | None, compare,
    up: tuple[str, str] | None = None,
) -> list[Path]:
    """index.html and one page per class, all in ``out``; ``up``: a first navigation link (text, href)."""
    from camshaft.report import class_page, drift_page, sections

    a = report.audit
    quality, quality_name = a.quality() if len(a.images) else (pd.Series(dtype=float), "")
    paged = paged_classes(a.classes, options.class_pages)
    ctx = Context(out, report, options, Sampler(out, a.results, size=options.thumb), quality, quality_name, str(a.results.out), paged)
    nav = ([up] if up else []) + index_nav(report, tokens=tokens)
    meta = meta_line(report, compare=compare)
    body = [sections.overview(ctx), sections.flags(ctx), sections.classes(ctx)]
    if a.has_boxes:
        body.append(sections.localization(ctx))
    if a.curves:
        body.append(sections.faithfulness(ctx))
    if report.drift is not None:
        body.append(drift_page.drift_section(ctx, compare))
    if report.exemplars is not None:
        body.append(sections.exemplars(ctx))
    if tokens:
        body.append(sections.tokens(tokens))
    body.append(sections.tables(ctx))
    title = f"camshaft audit · {Path(ctx.run_name).name}"
    written = [_write(out / "index.html", h.page(title=title, meta=meta, nav=nav, body="".join(body)))]
    with_page = a.classes[a.classes["class"].isin(paged)] if len(a.classes) else a.classes
    for _, row in with_page.iterrows():
        page = h.page(title=f"class {row['class_name']} · camshaft audit", meta=meta, nav=nav, body=class_page.render(ctx, row))
        written.append(_write(out / ctx.class_href(row["class"]), page))
    for stale in {p for p in out.glob("class_*.html") if re.fullmatch(r"class_\d+\.html", p.name)} - set(written):
        stale.unlink(missing_ok=True)  # the page of a class an earlier report into this folder had
    return written


def paged_classes(classes: pd.DataFrame, limit: int | None) -> frozenset:
    """The classes that get a page: all, or the ``limit`` worst (flagged first) when there are more."""
    if classes.empty:
        return frozenset()
    order = classes.sort_values(["severity", "class"], ascending=[False, True])
    chosen = order if limit is None else order.head(limit)
    return frozenset(int(c) for c in chosen["class"])


def _write(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
