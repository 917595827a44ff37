"""``build_report``: the audit (and drift) of a run as one self-contained folder.

``out/index.html`` (overview, flags, classes, localization, faithfulness, drift, exemplars),
``out/class_<c>.html`` per class, ``out/img/`` (plots and a sample of overlays) and
``out/tables/`` (the numbers behind every page, Parquet and CSV).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from camshaft.errors import ConfigError
from camshaft.report.audit import Audit, audit
from camshaft.report.drift import Drift, DriftThresholds, drift
from camshaft.report.exemplars import load_exemplars
from camshaft.report.flags import FlagRules
from camshaft.report.spatial import SpatialSpec
from camshaft.results import load_results
from camshaft.writers.atomic import atomic_path

TABLES_DIR = "tables"
DRIFT_TABLES = ("drift_images.parquet", "drift_classes.csv", "drift_summary.json")
TABLES = ("images.parquet", "classes.csv", "flags.csv", "summary.json", *DRIFT_TABLES, "exemplars.csv")


@dataclass(frozen=True)
class ReportOptions:
    """What the report computes and how much of it it shows."""

    spatial: SpatialSpec = field(default_factory=SpatialSpec)
    rules: FlagRules = field(default_factory=FlagRules)
    thresholds: DriftThresholds = field(default_factory=DriftThresholds)
    drift_top: float = 0.1  # top-region share of cells for the drift IoU
    examples: int = 4  # best and worst examples per class page
    flagged: int = 24  # flagged images shown on the index
    changed: int = 12  # most-changed images shown in the drift section
    channels: int = 8  # exemplar channels shown per tap
    thumb: int = 176  # thumbnail size, pixels
    class_pages: int | None = 100  # pages for (and index rows of) at most this many classes, worst first; None: all

    def __post_init__(self):
        counts = {"examples": self.examples, "flagged": self.flagged, "changed": self.changed, "channels": self.channels}
        if self.class_pages is not None:
            counts["class_pages"] = self.class_pages
        bad = [f"{k} must be >= 0, received {v}" for k, v in counts.items() if v < 0]
        if not 0 < self.drift_top <= 1:
            bad.append(f"drift_top must lie in (0, 1], received {self.drift_top}")
        if self.thumb < 32:
            bad.append(f"thumb must be at least 32 pixels, received {self.thumb}")
        if bad:
            raise ConfigError("; ".join(bad))


@dataclass
class Report:
    """A written report: where it is, what it found, and the drift alerts (empty: none)."""

    out: Path
    audit: Audit
    drift: Drift | None = None
    exemplars: pd.DataFrame | None = None
    alerts: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def index(self) -> Path:
        return self.out / "index.html"


def build_report(
    run: str | Path,
    *,
    out: str | Path,
    compare: str | Path | None = None,
    options: ReportOptions = ReportOptions(),
    tokens: Mapping[str, Sequence[tuple[str, float]]] | None = None,
    up: tuple[str, str] | None = None,
) -> Report:
    """Audit ``run`` (and its drift against ``compare``) and write the report folder ``out``.

    ``tokens`` (name -> (token, weight) pairs) adds a token-attribution section, for text models.
    ``up`` (text, relative link) leads every page back to a page above (the comparison of methods).
    """
    from camshaft.report.pages import write_pages  # the HTML layer, imported when needed

    start = time.perf_counter()
    out = Path(out)
    run_dir = Path(run)
    check_out(out, run_dir)
    results = load_results(run_dir)
    result = Report(out, audit(results, spec=options.spatial, rules=options.rules))
    if compare is not None:
        result.drift = drift(results, load_results(compare), top=options.drift_top)
        result.alerts = options.thresholds.alerts(result.drift.summary)
    result.exemplars = load_exemplars(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_tables(out / TABLES_DIR, result)
    write_pages(out, result, options=options, tokens=tokens, compare=compare, up=up)
    result.seconds = time.perf_counter() - start
    return result


def check_out(out: Path, run_dir: Path) -> None:
    """Refuse a report folder that is the run folder, or a file."""
    if out.resolve() == run_dir.resolve():
        raise ConfigError(f"--out {out} is the run folder itself; give the report its own folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; the report is a folder (index.html, img/, tables/)")


def write_tables(folder: Path, report: Report) -> list[Path]:
    """The numbers behind the pages: per-map tables as Parquet, summaries as CSV and JSON.

    Tables of an earlier report into the same folder that this one has not (its drift, when this
    report compares with no run) are removed, so the folder never mixes two reports.
    """
    folder.mkdir(parents=True, exist_ok=True)
    a = report.audit
    written = [
        _atomic(folder / "images.parquet", lambda p: a.images.to_parquet(p, index=False)),
        _atomic(folder / "classes.csv", lambda p: a.classes.to_csv(p, index=False)),
        _atomic(folder / "flags.csv", lambda p: a.flags.to_csv(p, index=False)),
        _atomic(folder / "summary.json", lambda p: p.write_text(json.dumps(_jsonable(a.summary)))),
    ]
    if report.drift is not None:
        d = report.drift
        written += [
            _atomic(folder / "drift_images.parquet", lambda p: d.images.to_parquet(p, index=False)),
            _atomic(folder / "drift_classes.csv", lambda p: d.classes.to_csv(p, index=False)),
            _atomic(folder / "drift_summary.json", lambda p: p.write_text(json.dumps(_jsonable({**d.summary, "alerts": report.alerts})))),
        ]
    if report.exemplars is not None:
        ex = report.exemplars.drop(columns=["map"])
        written.append(_atomic(folder / "exemplars.csv", lambda p: ex.to_csv(p, index=False)))
    for name in set(TABLES) - {p.name for p in written}:  # left by an earlier report into this folder
        (folder / name).unlink(missing_ok=True)
    return written


def _atomic(path: Path, write) -> Path:
    with atomic_path(path) as tmp:
        write(tmp)
    return path


def _jsonable(d: dict) -> dict:
    """NaN -> None, so the JSON is standard."""
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in d.items()}
