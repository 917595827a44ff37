"""``camshaft run JOB.toml``: a nightly job described in a file (the fields of ``explain``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from camshaft.commands.common import print_summary

HELP = "run an explain job described in a TOML file (nightly jobs)"
RESUMABLE = True  # Ctrl-C keeps the finished partitions; the same command resumes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", type=Path, help="TOML file with the fields of `camshaft explain` (model, data, out, method, ...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from camshaft.engine.jobfile import load_job
    from camshaft.pipeline import run_explain

    summary = run_explain(load_job(args.job), progress=not args.no_progress)
    print_summary(summary)
    return 0
