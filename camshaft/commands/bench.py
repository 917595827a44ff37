"""``camshaft bench``: throughput of a chosen subset beside the limit measured in the same run.

Exit status: 0 done, 1 a regression against ``--compare``, a figure it measured that this run
skipped, or nothing compared (or a camshaft workload failed), 2 invalid flags (checked before any
work), 130 Ctrl-C (the groups measured so far are printed, and saved with ``--json``). A ``--compare``
folder without an earlier run of the same work (a nightly job's first night) compares nothing and
says so; that alone does not fail the run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from camshaft.commands.common import count, positive, size

HELP = "benchmark methods × backends against the limit and peer libraries"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from camshaft.data.workers import DECODERS
    from camshaft.bench.settings import BACKENDS
    from camshaft.engine.backends import backend_names
    from camshaft.engine.backends.base import DTYPES
    from camshaft.engine.methods import method_names

    p.add_argument(
        "--model",
        nargs="+",
        metavar="MODEL",
        help="architectures, demo or artifact files (default: resnet50; quick: demo)",
    )
    p.add_argument(
        "--method",
        nargs="+",
        choices=method_names(),
        metavar="METHOD",
        help=f"default: all ({', '.join(method_names())})",
    )
    p.add_argument(
        "--backend",
        nargs="+",
        choices=backend_names(),
        metavar="BACKEND",
        help=f"default: {' '.join(BACKENDS)} (pt2 on request: it runs the same ATen graph as eager, unfused; "
        "inductor on request: it compiles each model first, and adds its compiled forward to the limits)",
    )
    p.add_argument("--batch-size", nargs="+", type=positive, metavar="N", help="default: 16 (quick: 2)")
    p.add_argument("--targets", nargs="+", metavar="TARGETS", help="top:K or classes, one figure each (default: top:1)")
    p.add_argument("--input-size", type=size, metavar="H[,W]", help="default: 224 (quick: 64)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument(
        "--dtype", choices=list(DTYPES), default="float32", help="autocast dtype for camshaft and the limits"
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="camshaft's torch backends replay their forwards from CUDA graphs, and the limit gets graphed "
        "variants (GPU)",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes and 2 rounds: proves the machinery works, measures nothing"
    )
    p.add_argument(
        "--peers", action=argparse.BooleanOptionalAction, default=True, help="time installed peer libraries too"
    )
    p.add_argument("--pipeline", action="store_true", help="also time decode + explain + write on generated JPEGs")
    p.add_argument(
        "--pipeline-batches",
        type=positive,
        metavar="N",
        help="images per pipeline run, in batches (default: 16; quick: 2); a fast GPU needs more to amortize the start",
    )
    p.add_argument(
        "--decode",
        choices=list(DECODERS),
        help="the pipeline's decoders (default: auto, as camshaft explain: processes on a GPU, threads on a CPU)",
    )
    p.add_argument(
        "--actmax", action="store_true", help="also time activation maximization (N classes at once) against its limit"
    )
    p.add_argument("--repeats", type=positive, help="timed rounds (default: 3; quick: 2)")
    p.add_argument("--warmup", type=positive, help="untimed calls per workload first (default: 2; quick: 1)")
    p.add_argument(
        "--json", type=Path, metavar="PATH", help="save the results (machine, versions, settings, figures, ratios)"
    )
    p.add_argument(
        "--compare",
        type=Path,
        nargs="+",
        metavar="PREVIOUS",
        help="flag figures that dropped since a saved run (a --json file); several runs: against each figure's "
        "median over them; a folder: its newest runs of the same work (--history), none yet: nothing to compare",
    )
    p.add_argument(
        "--history",
        type=positive,
        metavar="N",
        help="with a --compare folder: how many of its newest runs make the baseline (default: 7)",
    )
    p.add_argument(
        "--threshold", type=float, help="with --compare: relative drop that counts as a regression (default: 0.1)"
    )
    p.add_argument(
        "--compare-metric",
        choices=["ratio", "throughput"],
        help="with --compare: ratio to the limit (robust to machine load; default) or raw throughput (same machine "
        "only)",
    )
    p.add_argument(
        "--recheck",
        type=count,
        metavar="N",
        help="with --compare: a group whose figures dropped beyond the threshold is timed again, up to N more "
        "passes, keeping the best of all rounds; only a drop that persists is a regression (default: 1; 0: none)",
    )
    p.add_argument("--workdir", type=Path, help="where artifacts and pipeline outputs go (default: a temporary folder)")


def settings_from(args):
    """The run's settings: the preset (quick or full) with every given flag applied; validated."""
    from camshaft.bench import BenchSettings, TimingConfig

    base = BenchSettings.preset(quick=args.quick)
    timing = TimingConfig(warmup=args.warmup or base.timing.warmup, repeats=args.repeats or base.timing.repeats)
    return base.replace(
        models=_tuple(args.model),
        methods=_tuple(args.method),
        backends=_tuple(args.backend),
        batch_sizes=_tuple(args.batch_size),
        targets=_tuple(args.targets),
        input_size=args.input_size,
        device=args.device,
        dtype=args.dtype,
        cuda_graphs=args.cuda_graphs or None,
        peers=args.peers,
        pipeline=args.pipeline or None,
        pipeline_batches=args.pipeline_batches,
        decode=args.decode,
        actmax=args.actmax or None,
        timing=timing,
    )


def _tuple(values):
    return None if values is None else tuple(dict.fromkeys(values))  # keep order, drop repeats


def _check_files(args, settings) -> tuple[dict | None, list[Path]]:
    """Output and comparison files, checked before any work: the baseline (None: nothing to compare
    with) and the files it was made of."""
    from camshaft.bench import load_json
    from camshaft.bench.compare import baseline, history, work_of
    from camshaft.bench.report import output_problem
    from camshaft.errors import ConfigError
    from camshaft.writers.atomic import out_folder_problem

    problems = []
    if args.json is not None and (problem := output_problem(args.json)):
        problems.append(f"--json {args.json}: {problem}")
    if args.threshold is not None and not 0 < args.threshold < 1:
        problems.append(f"--threshold must be between 0 and 1 (0.1 = a 10% drop), received {args.threshold}")
    if args.recheck is not None and args.compare is None:
        problems.append("--recheck times again figures that dropped since a previous run: give --compare too")
    for flag, name, needs in (("--threshold", "threshold", "--compare"),
                              ("--compare-metric", "compare_metric", "--compare"),
                              ("--pipeline-batches", "pipeline_batches", "--pipeline"),
                              ("--decode", "decode", "--pipeline")):
        if getattr(args, name) is not None and not getattr(args, needs[2:].replace("-", "_")):
            problems.append(f"{flag} acts only with {needs}: give {needs} too, or leave {flag} out")
    folders = [p for p in dict.fromkeys(args.compare or ()) if p.is_dir()]
    if args.history is not None and not folders:
        problems.append("--history chooses the runs of a --compare folder: give one")
    if args.workdir is not None and (problem := out_folder_problem(args.workdir)):
        problems.append(f"--workdir {args.workdir}: {problem}")
    runs: dict[Path, dict] = {}
    for path in dict.fromkeys(args.compare or ()):
        try:
            if path in folders:
                found = history(path, work=work_of(settings.to_dict()), keep=args.history or 7,
                                exclude=() if args.json is None else (args.json,))
                said = f"; passed over: {', '.join(found.passed)}" if found.passed else ""
                print(f"camshaft bench: --compare {path}: {len(found.runs)} earlier runs of this work{said}",
                      file=sys.stderr, flush=True)
                runs.update(found.runs)
            else:
                runs[path] = load_json(path)
        except ConfigError as e:
            problems.append(f"--compare: {e}")
    previous = None
    if runs and not problems:
        try:
            previous = baseline(list(runs.values()))
        except ConfigError as e:
            problems.append(f"--compare: {e}")
    if problems:
        raise ConfigError("; ".join(problems))
    return previous, list(runs)


def run(args) -> int:
    from camshaft.bench import compare, format_comparison, format_table, run_bench, save_json

    settings = settings_from(args)
    previous, baseline_files = _check_files(args, settings)
    log = lambda message: print(f"camshaft bench: {message}", file=sys.stderr, flush=True)  # noqa: E731
    so_far: list[dict] = []
    partial = _partial_path(args, baseline_files)

    def progress(report) -> None:  # after each group: with --json, the figures so far are saved (marked incomplete)
        so_far[:] = [report.to_dict()]
        if partial is not None:
            save_json(so_far[0], partial)

    recheck = None
    passes = 1 if args.recheck is None else args.recheck
    if previous is not None and passes:
        from camshaft.bench.runner import Recheck

        def dropped(data: dict) -> set[str]:
            result = compare(previous, data, threshold=args.threshold or 0.1,
                             metric=args.compare_metric or "ratio")
            return {c.key for c in result.regressions}

        recheck = Recheck(dropped, passes)
    try:
        with tempfile.TemporaryDirectory(prefix="camshaft-bench-") as tmp:
            data = run_bench(
                settings, workdir=args.workdir or Path(tmp), log=log, progress=progress, recheck=recheck
            ).to_dict()
    except KeyboardInterrupt:  # Ctrl-C: show what was measured before the stop, and where it was saved
        if so_far and so_far[0]["figures"]:
            print(format_table(so_far[0]))
            if partial is not None:
                print(f"\nresults so far (marked incomplete): {partial}")
        else:
            print("camshaft bench: stopped before any group was measured", file=sys.stderr, flush=True)
        raise
    print(format_table(data))
    if args.json is not None:
        save_json(data, args.json)
        if partial != args.json:
            partial.unlink(missing_ok=True)
        print(f"\nresults: {args.json}")
    code = 1 if _failures(data) else 0
    if not any(f.get("role") in ("method", "pipeline") for f in data.get("figures", [])):
        print("\ncamshaft bench: no figure of camshaft's was measured (every workload was skipped: see above)")
        code = 1
    if previous is not None:
        result = compare(previous, data, threshold=args.threshold or 0.1,
                             metric=args.compare_metric or "ratio")
        print("\n" + format_comparison(result))
        rechecked = sorted({f["key"] for f in data["figures"] if f.get("rechecks")})
        if rechecked:
            print(f"  {len(rechecked)} figures were timed again after a drop (up to {passes} more passes, "
                  "limits included); the lines above judge the best of all their rounds")
        code = code or (0 if result.ok else 1)
    elif args.compare:
        print(f"\nno earlier run of this work in {', '.join(map(str, args.compare))}: nothing compared "
              "(this run starts the history)")
    return code


def _partial_path(args, baseline_files: list[Path]) -> Path | None:
    """Where the figures so far are saved during the run: ``--json`` itself, or beside it when it is part of
    the ``--compare`` baseline (a nightly job rolling one file forward must not lose it to a stopped run)."""
    if args.json is None:
        return None
    if args.json.exists() and args.json.resolve() in {p.resolve() for p in baseline_files}:
        return args.json.with_name(f"{args.json.stem}.incomplete{args.json.suffix}")
    return args.json


def _failures(data: dict) -> list[dict]:
    """camshaft's own workloads that raised unexpectedly (a peer's failure is not ours)."""
    return [s for s in data["skipped"] if s.get("failed") and s.get("role") != "peer"]
