"""``camshaft report``: a dataset-wide audit of a run as an HTML folder, with drift against another run."""

from __future__ import annotations

import argparse
from pathlib import Path

from camshaft.commands.common import positive

HELP = "audit a run (flags, classes, localization, faithfulness, drift) as an HTML report"


def _unit(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [-1, 1], received {text!r}")
    return value


def _inside(lo: float, hi: float, *, closed: bool = False):
    """An argparse type: a number in (lo, hi), or [lo, hi) when ``closed`` (the error names the flag)."""
    shown = f"{'[' if closed else '('}{lo:g}, {hi:g})"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not ((lo <= value if closed else lo < value) and value < hi):
            raise argparse.ArgumentTypeError(f"expected a number in {shown}, received {text!r}")
        return value

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder written by camshaft explain")
    p.add_argument("--out", type=Path, required=True, help="report folder (index.html, img/, tables/)")
    p.add_argument("--compare", type=Path, metavar="OTHER_RUN", help="another run over the same images: explanation drift")
    g = p.add_argument_group("faithfulness (computed now, into RUN/metrics.parquet; else read from it)")
    g.add_argument("--metrics", help="deletion, insertion or deletion,insertion (Petsiuk et al. 2018)")
    g.add_argument("--steps", type=positive, default=50, help="points per curve minus one (default: 50)")
    g.add_argument("--score", choices=("prob", "logit"), default="prob", help="the target score tracked (default: prob)")
    g.add_argument("--metric-batch", type=positive, default=64, help="perturbed images per forward (default: 64)")
    g = p.add_argument_group("dataset exemplars (computed now, into RUN/exemplars.parquet)")
    g.add_argument("--exemplars", action="append", metavar="TAP[:C,...]", help="a tap, optionally channels; repeatable")
    g.add_argument("--exemplar-k", type=positive, default=8, help="images per channel (default: 8)")
    g = p.add_argument_group("map statistics and flags")
    g.add_argument("--border", type=_inside(0, 0.5), default=0.1,
                   help="border band, a fraction of the image side (default: 0.1)")
    g.add_argument("--tolerance", type=_inside(0, float("inf"), closed=True), default=15.0,
                   help="pointing game tolerance in pixels (default: 15)")
    g.add_argument("--flag-border", type=_inside(0, 1), default=0.5,
                   help="border-heavy at this border mass (default: 0.5)")
    g.add_argument("--flag-entropy", type=_inside(0, 1), default=0.95,
                   help="diffuse at this normalised entropy (default: 0.95)")
    g.add_argument("--examples", type=int, default=4, help="best and worst examples per class page (default: 4)")
    g.add_argument(
        "--class-pages",
        type=int,
        default=100,
        help="pages for at most this many classes, flagged first; the index's class tables show as many "
        "(default: 100; every class is in tables/classes.csv)",
    )
    g = p.add_argument_group("drift alerts (exit code 1 when crossed)")
    g.add_argument("--min-rank-corr", type=_unit, help="alert when the mean rank correlation is below this")
    g.add_argument("--min-iou", type=_unit, help="alert when the mean top-region IoU is below this")
    g.add_argument("--max-changed", type=_unit, help="alert when this share of top-1 predictions changed")
    p.add_argument("--device", help="cpu, cuda or cuda:N for metrics and exemplars (default: cuda when available)")
    p.add_argument("--batch-size", type=positive, default=16, help="images per batch for metrics and exemplars")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def options_from(args):
    from camshaft.report.build import ReportOptions
    from camshaft.report.drift import DriftThresholds
    from camshaft.report.flags import FlagRules
    from camshaft.report.spatial import SpatialSpec

    return ReportOptions(
        spatial=SpatialSpec(border=args.border, tolerance=args.tolerance),
        rules=FlagRules(border=args.flag_border, entropy=args.flag_entropy),
        thresholds=DriftThresholds(args.min_rank_corr, args.min_iou, args.max_changed),
        examples=args.examples,
        class_pages=args.class_pages,
    )


def run(args) -> int:
    from camshaft.report.build import check_out
    from camshaft.report.exemplars import ExemplarSpec
    from camshaft.report.faithfulness import parse_metrics
    from camshaft.report.methods import compare_runs, method_runs

    from camshaft.results import load_results

    options = options_from(args)  # validate every flag before any work
    check_out(Path(args.out), Path(args.run_dir))
    runs = method_runs(args.run_dir)  # a run of several methods: a report each, and a page comparing them
    for run_dir in [*(runs.values() or [args.run_dir]), *([] if args.compare is None else [args.compare])]:
        if not method_runs(run_dir):
            load_results(run_dir)  # a finished run, or the reason it is not (before metrics are written)
    specs = parse_metrics(args.metrics, steps=args.steps, score=args.score, batch_size=args.metric_batch) if args.metrics else None
    exemplars = [ExemplarSpec.parse(t) for t in args.exemplars or []]
    if runs and args.compare is not None:
        compare_runs(args.compare, runs)  # a run of other methods is refused before metrics are computed
    for run_dir in runs.values() or [args.run_dir]:
        _compute(args, run_dir, specs, exemplars)
    if runs:
        return _report_methods(args, options)
    from camshaft.report import build_report

    report = build_report(args.run_dir, out=args.out, compare=args.compare, options=options)
    _print_audit(report)
    print(f"report: {report.index} ({report.seconds:.1f} s)")
    for alert in report.alerts:
        print(f"ALERT: {alert}")
    return 1 if report.alerts else 0


def _compute(args, run_dir, specs, exemplars) -> None:
    from camshaft.report import compute_exemplars, compute_metrics

    common = {"batch_size": args.batch_size, "device": args.device, "progress": not args.no_progress}
    if specs:
        compute_metrics(run_dir, specs=specs, **common)
    if exemplars:
        compute_exemplars(run_dir, specs=exemplars, k=args.exemplar_k, **common)


def _report_methods(args, options) -> int:
    from camshaft.report.methods import build_methods_report

    result = build_methods_report(args.run_dir, out=args.out, compare=args.compare, options=options)
    for method, report in result.reports.items():
        print(f"{method}:")
        _print_audit(report, indent="  ")
    for _, row in result.agreement.iterrows():
        print(f"agreement {row['method_a']} / {row['method_b']} over {row['images']:,} images: mean rank correlation "
              f"{row['mean_rank_corr']:.4f}, mean top-region IoU {row['mean_top_iou']:.4f}")
    print(f"report: {result.index} ({result.seconds:.1f} s; one report per method under {args.out})")
    for alert in result.alerts:
        print(f"ALERT: {alert}")
    return 1 if result.alerts else 0


def _print_audit(report, *, indent: str = "") -> None:
    s = report.audit.summary
    print(
        f"{indent}audited {s['explained']:,} images ({s['maps']:,} maps): {s['flagged_images']:,} flagged images, "
        f"{s['flagged_classes']:,} flagged classes"
    )
    for _, c in report.audit.flagged_classes.head(10).iterrows():
        print(f"{indent}  flagged class {c['class_name']}: {c['flags']} (border {c['mean_border_mass']:.3f}, "
              f"entropy {c['mean_entropy']:.3f})")
    if report.drift is not None:
        d = report.drift.summary
        print(
            f"{indent}drift over {d['matched']:,} images: mean rank correlation {d['mean_rank_corr']:.4f}, "
            f"mean top-region IoU {d['mean_top_iou']:.4f}, {d['changed_images']:,} changed predictions"
        )
