"""pytest-benchmark suites: every figure beside the limit measured in the same run.

Quick mode (``--quick`` or ``CAMSHAFT_BENCH_QUICK=1``): the tiny preset of ``camshaft bench
--quick``, to prove the suites work (CI's limits). Full mode: the issue's matrix — six torchvision
architectures × every registered method × eager / TorchScript / ONNX Runtime × batch 1, 16, 64 ×
top:1, top:5, plus the pipeline. Narrow it with ``--bench-model``, ``--bench-method``,
``--bench-backend``, ``--bench-batch`` or ``-k``; ``--bench-decode`` chooses the pipeline's
decoders. ``--bench-device cuda`` runs them on a GPU, with ``--bench-dtype`` (mixed precision) and
``--bench-cuda-graphs`` as ``camshaft bench`` takes them. ``--bench-json PATH`` saves the run in
the format of ``camshaft bench --json`` (so ``--compare`` works on it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from camshaft.bench.cases import Case, cases, groups, variants
from camshaft.bench.settings import FULL_BATCH_SIZES, FULL_MODELS, FULL_TARGETS, BenchSettings
from camshaft.bench.timing import synchronize
from camshaft.bench.workload import Skipped, Workload
from camshaft.cli import GLIBC_TUNING
from camshaft.data.workers import DECODERS
from camshaft.engine.backends.base import DTYPES


def pytest_addoption(parser):
    g = parser.getgroup("camshaft-bench")
    g.addoption("--quick", action="store_true", help="tiny sizes (also CAMSHAFT_BENCH_QUICK=1)")
    g.addoption("--bench-model", action="append", help="only these models (repeatable)")
    g.addoption("--bench-method", action="append", help="only these methods (repeatable)")
    g.addoption("--bench-backend", action="append", help="only these backends (repeatable)")
    g.addoption("--bench-batch", action="append", type=int, help="only these batch sizes (repeatable)")
    g.addoption("--bench-decode", choices=DECODERS, help="the pipeline's decoders (default: auto, as camshaft explain)")
    g.addoption("--bench-device", help="cpu (default), cuda or cuda:N")
    g.addoption("--bench-dtype", choices=list(DTYPES), help="autocast dtype (default: float32)")
    g.addoption("--bench-cuda-graphs", action="store_true", help="torch backends and limits replay CUDA graphs")
    g.addoption("--bench-json", help="save the run as camshaft bench JSON")


def _settings(config) -> BenchSettings:
    quick = config.getoption("--quick") or os.environ.get("CAMSHAFT_BENCH_QUICK", "") not in ("", "0")
    base = BenchSettings.preset(quick=quick)
    if not quick:
        base = base.replace(models=FULL_MODELS, batch_sizes=FULL_BATCH_SIZES, targets=FULL_TARGETS, pipeline=True)
    pick = lambda name: tuple(config.getoption(name)) if config.getoption(name) else None  # noqa: E731
    return base.replace(
        models=pick("--bench-model"),
        methods=pick("--bench-method"),
        backends=pick("--bench-backend"),
        batch_sizes=pick("--bench-batch"),
        decode=config.getoption("--bench-decode"),
        device=config.getoption("--bench-device"),
        dtype=config.getoption("--bench-dtype"),
        cuda_graphs=config.getoption("--bench-cuda-graphs") or None,
    )


def pytest_configure(config):
    from camshaft.bench.report import output_problem
    from camshaft.errors import ConfigError

    try:
        config.camshaft_bench_settings = _settings(config)
    except ConfigError as e:  # a usage error, said plainly (not pytest's INTERNALERROR traceback)
        raise pytest.UsageError(str(e)) from e
    path = config.getoption("--bench-json")
    if path and (problem := output_problem(path)):  # found now, not after the whole run
        raise pytest.UsageError(f"--bench-json {path}: {problem}")
    if sys.platform == "linux" and os.environ.get("GLIBC_TUNABLES") != GLIBC_TUNING:
        config.issue_config_time_warning(
            pytest.PytestWarning(
                f"GLIBC_TUNABLES is not camshaft's setting; run as GLIBC_TUNABLES={GLIBC_TUNING} python -m pytest ..."
            ),
            stacklevel=2,
        )


def _id(case: Case) -> str:
    return case.key.replace("/", "-")


def pytest_generate_tests(metafunc):
    s: BenchSettings = metafunc.config.camshaft_bench_settings
    gs = groups(s)
    if "group" in metafunc.fixturenames:
        metafunc.parametrize("group", gs, ids=[g.key.replace("/", "-") for g in gs])
    if "case" in metafunc.fixturenames:
        cs = [c for g in gs for c in cases(s, g)]
        metafunc.parametrize("case", cs, ids=[_id(c) for c in cs])
    if "pipeline_case" in metafunc.fixturenames:
        methods = [m for m in ("gradcam", "cam") if m in s.method_names()]
        cs = [Case(g, m, b, s.targets[0], v) for g in gs for m in methods for v in variants(m) for b in s.backends]
        cs = [c for c in cs if c.group.batch == max(s.batch_sizes)] or cs
        metafunc.parametrize("pipeline_case", cs, ids=[_id(c) for c in cs])


@pytest.fixture(scope="session")
def bench(request, tmp_path_factory):
    from camshaft.bench.session import BenchSession

    session = BenchSession(request.config.camshaft_bench_settings, workdir=tmp_path_factory.mktemp("bench"))
    request.config.camshaft_bench_session = session
    return session


@pytest.fixture
def timed(benchmark, bench):
    """``timed(workload)``: probe it, time it with pytest-benchmark, record the figure, return ratios."""

    def run(item: Workload | Skipped, *, self_timed: bool = False) -> dict:
        if isinstance(item, Skipped):
            pytest.skip(item.reason)
        device = bench.model(item.attrs["model"]).device
        try:
            item.fn()  # the first warm-up call doubles as the probe
        except Exception as e:
            from camshaft.errors import CamshaftError

            if isinstance(e, CamshaftError):
                pytest.skip(str(e))
            raise
        own: list[float] = []

        def call():
            result = item.fn()
            synchronize(device)
            if isinstance(result, float):
                own.append(result)

        t = bench.settings.timing
        if getattr(benchmark, "disabled", False):  # --benchmark-disable: run once, record nothing
            call()
            return {}
        benchmark.pedantic(call, rounds=t.repeats, warmup_rounds=max(0, t.warmup - 1), iterations=1)
        seconds = own[-t.repeats :] if self_timed else list(benchmark.stats.stats.data)
        figure = bench.record(item, seconds)
        derived = {k: v for k, v in bench.derived(figure.key).items() if not isinstance(v, dict)}
        benchmark.extra_info.update(
            key=figure.key,
            images_per_second=figure.images_per_second,
            pairs_per_second=figure.pairs_per_second,
            evaluations_per_second=figure.evaluations_per_second,
            **derived,
        )
        return derived

    return run


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "camshaft_bench_session", None)
    if session is None or not session.report.figures:
        return
    from camshaft.bench.report import format_table, save_json

    session.report.complete = exitstatus != pytest.ExitCode.INTERRUPTED  # Ctrl-C: say the run stopped part-way
    data = session.report.to_dict()
    terminalreporter.write_sep("=", "camshaft: figures beside the limit measured in this run")
    terminalreporter.write_line(format_table(data, skipped=False))
    path = config.getoption("--bench-json")
    if path:
        save_json(data, Path(path))
        terminalreporter.write_line(f"saved {path}")
