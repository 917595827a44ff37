"""Dataset-wide audit of explanation runs: the numbers as data frames, and an HTML report.

- ``audit(run)``: per (image, target) map statistics (border mass, entropy, top mass; pointing
  game and energy in box when the manifest has boxes; faithfulness areas when the run has
  ``metrics.parquet``), per-class summary, flags (worst first), per-class mean maps.
- ``compute_metrics(run, specs=...)``: deletion / insertion curves, written to ``metrics.parquet``.
- ``compute_exemplars(run, specs=...)``: the images that most activate chosen channels.
- ``drift(run_a, run_b)``: per-image map similarity between two runs over the same images.
- ``build_report(run, out=..., compare=...)``: all of it as a self-contained HTML folder.
- ``build_methods_report(run, out=...)``: a run of several methods: a report each, and a page comparing
  them with the methods' agreement per image.
- ``render_tokens(pairs)``: (token, weight) pairs as shaded HTML.
- ``faithfulness.curves``, ``MetricsCollector``, ``TopK``, ``ExemplarCollector``: the pure parts,
  for a pass over the data that already has the model and the maps at hand (the explain pass).
"""

from camshaft.report.audit import Audit, audit
from camshaft.report.build import Report, ReportOptions, build_report
from camshaft.report.drift import Drift, DriftThresholds, drift
from camshaft.report.exemplars import ExemplarCollector, ExemplarSpec, compute_exemplars, load_exemplars, merge_tables, write_exemplars
from camshaft.report.faithfulness import CurveSpec, area, curves, parse_metrics
from camshaft.report.flags import FlagRules
from camshaft.report.methods import MethodsReport, build_methods_report, method_runs
from camshaft.report.metrics import MetricsCollector, compute_metrics, load_metrics, metric_rows, write_metrics
from camshaft.report.spatial import SpatialSpec
from camshaft.report.tokens import render_tokens
from camshaft.report.topk import TopK, TopKResult

__all__ = [
    "Audit", "audit", "Report", "ReportOptions", "build_report", "Drift", "DriftThresholds", "drift",
    "ExemplarCollector", "ExemplarSpec", "compute_exemplars", "load_exemplars", "merge_tables", "write_exemplars",
    "CurveSpec", "area", "curves", "parse_metrics", "FlagRules", "MetricsCollector", "compute_metrics", "load_metrics",
    "metric_rows", "write_metrics", "MethodsReport", "build_methods_report", "method_runs",
    "SpatialSpec", "render_tokens", "TopK", "TopKResult",
]
