"""The report of a run of several methods (``explain --method cam,gradcam,...``): one report each, and a
landing page that puts them side by side and says how far the methods agree on each image.

``out/index.html`` lists the methods (images explained, flags, the mean map statistics, faithfulness
areas and drift where computed) with links to ``out/METHOD/index.html``, the full report of each;
``out/tables/methods.csv`` and ``out/tables/agreement.csv`` hold the numbers. Agreement is the drift
measure between two methods' maps of the same images (Spearman rank correlation over the cells, IoU of
the top 10% of the cells; maps of other shapes are compared on the first method's grid).
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from camshaft.errors import ConfigError
from camshaft.pipeline.state import MAPS_FILE, STATE_DIR, TABLE_FILE
from camshaft.report import html as h
from camshaft.report.build import TABLES_DIR, Report, ReportOptions, _atomic, build_report, check_out
from camshaft.report.drift import drift
from camshaft.results import load_results


def method_runs(run: str | Path) -> dict[str, Path]:
    """The methods of a run folder and their result folders, in the run's order; ``{}`` for a run of
    one method (its results lie in ``run`` itself)."""
    run = Path(run)
    if (run / TABLE_FILE).exists():
        return {}
    try:
        order = json.loads((run / STATE_DIR / "run.json").read_text()).get("methods") or []
    except (OSError, ValueError):
        order = []
    found = {p.parent.name for p in run.glob(f"*/{TABLE_FILE}") if (p.parent / MAPS_FILE).exists()}
    return {m: run / m for m in [*[m for m in order if m in found], *sorted(found - set(order))]}


@dataclass
class MethodsReport:
    """The reports of each method, the table comparing them, their agreement, and the drift alerts."""

    out: Path
    reports: dict[str, Report]
    methods: pd.DataFrame
    agreement: pd.DataFrame
    alerts: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def index(self) -> Path:
        return self.out / "index.html"


def build_methods_report(
    run: str | Path, *, out: str | Path, compare: str | Path | None = None, options: ReportOptions = ReportOptions()
) -> MethodsReport:
    """One report per method of ``run`` under ``out/METHOD``, and ``out/index.html`` comparing them.

    ``compare``: another run of the same methods (each method is compared with its namesake; a method
    the other run lacks gets no drift), or a run of one method (compared with the same method here).
    """
    start = time.perf_counter()
    run, out = Path(run), Path(out)
    check_out(out, run)
    runs = method_runs(run)
    if not runs:
        raise ConfigError(f"{run} is not a run of several methods")
    others = compare_runs(compare, runs) if compare is not None else {}
    reports = {m: build_report(folder, out=out / m, compare=others.get(m), options=options,
                               up=("← all methods", "../index.html")) for m, folder in runs.items()}
    methods = pd.DataFrame([_method_row(m, r, others.get(m)) for m, r in reports.items()])
    agreement = _agreement({m: r.audit.results for m, r in reports.items()}, top=options.drift_top)
    alerts = [f"{m}: {a}" for m, r in reports.items() for a in r.alerts]
    result = MethodsReport(out, reports, methods, agreement, alerts)
    _atomic(out / TABLES_DIR / "methods.csv", lambda p: methods.to_csv(p, index=False))
    _atomic(out / TABLES_DIR / "agreement.csv", lambda p: agreement.to_csv(p, index=False))
    _atomic(out / "index.html", lambda p: p.write_text(_page(result, run, compare), encoding="utf-8"))
    result.seconds = time.perf_counter() - start
    return result


def compare_runs(compare: str | Path, runs: dict[str, Path]) -> dict[str, Path]:
    compare = Path(compare)
    theirs = method_runs(compare)
    if theirs:
        return {m: theirs[m] for m in runs if m in theirs}
    method = load_results(compare).attrs.get("method")  # a run of one method (or the reason it is not a run)
    if method not in runs:
        raise ConfigError(f"--compare {compare} holds the {method} method only; this run has {', '.join(runs)}")
    return {method: compare}


def _method_row(method: str, report: Report, compare) -> dict:
    s, attrs = report.audit.summary, report.audit.results.attrs
    row = {"method": method, "tap": attrs.get("tap"), "explained": s["explained"], "failed": s["failed"],
           "maps": s["maps"], "flagged_images": s["flagged_images"], "flagged_classes": s["flagged_classes"]}
    row.update({k: s[k] for k in ("border_mass", "entropy", "top_mass", "pointing", "energy_in_box",
                                  "deletion_auc", "insertion_auc") if k in s})
    if report.drift is not None:
        row["drift_rank_corr"] = report.drift.summary["mean_rank_corr"]
        row["drift_top_iou"] = report.drift.summary["mean_top_iou"]
    return row


def _agreement(results: dict, *, top: float) -> pd.DataFrame:
    rows = []
    for a, b in itertools.combinations(results, 2):
        s = drift(results[a], results[b], top=top).summary
        rows.append({"method_a": a, "method_b": b, "images": s["matched"],
                     "mean_rank_corr": s["mean_rank_corr"], "median_rank_corr": s["median_rank_corr"],
                     "mean_top_iou": s["mean_top_iou"]})
    return pd.DataFrame(rows, columns=["method_a", "method_b", "images", "mean_rank_corr", "median_rank_corr",
                                       "mean_top_iou"])


def _page(result: MethodsReport, run: Path, compare) -> str:
    m = result.methods
    link = lambda row: f'<a href="{h.esc(row["method"])}/index.html">{h.esc(row["method"])}</a>'  # noqa: E731
    columns = [("method", link), ("tap", "tap"), ("explained", "explained"), ("failed", "failed"),
               ("flagged images", "flagged_images"), ("flagged classes", "flagged_classes"),
               ("border mass", "border_mass"), ("entropy", "entropy"), ("top-5% mass", "top_mass")]
    for name, col in (("pointing", "pointing"), ("energy in box", "energy_in_box"), ("deletion AUC", "deletion_auc"),
                      ("insertion AUC", "insertion_auc"), ("drift rank corr.", "drift_rank_corr"),
                      ("drift top IoU", "drift_top_iou")):
        if col in m.columns and m[col].notna().any():
            columns.append((name, col))
    first = next(iter(result.reports.values())).audit
    cards = [h.Card("methods", str(len(m))), h.Card("images", f"{first.summary['images']:,}"),
             h.Card("explained", f"{first.summary['explained']:,}")]
    if result.alerts:
        cards.append(h.Card("drift alerts", str(len(result.alerts)), "bad"))
    body = [
        h.section("methods", "Methods", h.cards(cards) + h.table(m, columns),
                  note="Each method's full report (flags, classes, localization, faithfulness, drift) is behind "
                       "its link. Lower border mass and entropy, higher top-5% mass: more concentrated maps."),
        h.section("agreement", "Agreement between methods", h.table(result.agreement, [
            ("method", "method_a"), ("and method", "method_b"), ("images", "images"),
            ("mean rank corr.", "mean_rank_corr"), ("median rank corr.", "median_rank_corr"),
            ("mean top-10% IoU", "mean_top_iou")]),
            note="Per image and target, Spearman's rank correlation of the two maps' cells and the IoU of their "
                 "hottest 10% of cells; maps of other shapes are compared on the first method's grid. Methods that "
                 "agree little on a dataset deserve a look before either is trusted."),
    ]
    if result.alerts:
        body.insert(0, h.section("alerts", "Drift alerts", "".join(f"<p>{h.esc(a)}</p>" for a in result.alerts)))
    attrs = first.results.attrs
    meta = [("model", attrs.get("model_spec") or attrs.get("model")), ("targets", attrs.get("targets")),
            ("run", str(run))] + ([("compared with", str(compare))] if compare is not None else [])
    nav = [("Methods", "#methods"), ("Agreement", "#agreement")] + [(k, f"{k}/index.html") for k in result.reports]
    return h.page(title=f"camshaft audit · {run.name} · {len(result.reports)} methods",
                  meta=" · ".join(f"<b>{h.esc(k)}</b> {h.esc(v)}" for k, v in meta), nav=nav, body="".join(body))

