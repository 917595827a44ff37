"""Audit of ``camshaft bench`` as a nightly job uses it: where results go, Ctrl-C, what --compare trusts.

Made-up figures and stubbed runs wherever the measuring itself is not the point; the two pytest
subprocesses only collect (they time nothing).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import run_cli as _main

from camshaft.bench import BenchSettings, compare, format_comparison, format_table, load_json, save_json
from camshaft.bench.report import BenchReport
from camshaft.bench.workload import Figure, Skipped
from camshaft.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
G = {"model": "demo", "input_size": [64, 64], "batch": 2}
MACHINE = {"cpu": "test cpu", "device_name": "test cpu", "usable_cores": 2, "torch_threads": 2, "device": "cpu"}


@pytest.fixture(autouse=True)
def _no_reexec(monkeypatch):
    monkeypatch.setenv("CAMSHAFT_NO_REEXEC", "1")


def fig(key, role, seconds, **attrs) -> Figure:
    return Figure(key, role, 2, 2, 2, (seconds, seconds * 1.2), {**G, "k": 1, **attrs})


def figures(method_seconds: float = 1.0) -> list[Figure]:
    return [
        fig("demo/limit/eager", "limit", 0.5, variant="eager"),
        fig("demo/cam/eager/top:1", "method", method_seconds, method="cam", backend="eager", targets="top:1"),
        fig("demo/gradcam/eager/top:1", "method", 2.0, method="gradcam", backend="eager", targets="top:1"),
    ]


def run_of(figs, *, skipped=(), machine=None, **settings) -> dict:
    """A saved run's document; ``settings`` overrides as another machine (a GPU one) would have saved them."""
    s = {**BenchSettings.preset(quick=True).to_dict(), **settings}
    return BenchReport(s, {**MACHINE, **(machine or {})}, figs, list(skipped)).to_dict()


def _no_work(monkeypatch):
    monkeypatch.setattr("camshaft.bench.runner.bench_model", lambda *a, **k: pytest.fail("work started"))


# --- where the results go ---------------------------------------------------------------------------


def test_json_into_a_folder_or_an_unwritable_place_is_refused_before_any_work(capsys, monkeypatch, tmp_path):
    """Was: the run went on, then crashed with a traceback when saving its first group (and wrote a
    temporary next to the folder)."""
    _no_work(monkeypatch)
    code, _, err = _main(capsys, "bench", "--quick", "--json", tmp_path)
    assert code == 2 and "is a folder; give a file name" in err and "Traceback" not in err
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.*"))
    if Path("/proc/self").is_dir():  # a folder nobody can create files in, even root
        code, _, err = _main(capsys, "bench", "--quick", "--json", "/proc/bench.json")
        assert code == 2 and "cannot write in /proc" in err


def test_save_json_stopped_before_the_rename_keeps_the_previous_file_and_leaves_no_temporary(monkeypatch, tmp_path):
    path = save_json({"run": 1}, tmp_path / "bench.json")

    def stop(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr("camshaft.writers.atomic.os.replace", stop)
    with pytest.raises(KeyboardInterrupt):
        save_json({"run": 2}, path)
    assert json.loads(path.read_text()) == {"run": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]


def test_ctrl_c_prints_the_figures_measured_so_far_and_where_they_were_saved(capsys, monkeypatch, tmp_path):
    """Was: only 'interrupted'; the groups already measured were in the JSON, but nothing said so."""

    def first_group_then_ctrl_c(settings, *, workdir, log, progress=None, recheck=None):
        report = BenchReport(settings.to_dict(), MACHINE, figures(), complete=False)
        progress(report)
        raise KeyboardInterrupt

    monkeypatch.setattr("camshaft.bench.runner.run_bench", first_group_then_ctrl_c)
    path = tmp_path / "bench.json"
    code, out, err = _main(capsys, "bench", "--quick", "--json", path)
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert "INCOMPLETE" in out and "demo 64x64 b2  cam" in out
    assert f"results so far (marked incomplete): {path}" in out
    assert load_json(path)["complete"] is False


def test_a_stopped_run_rolling_one_file_forward_keeps_its_baseline(capsys, monkeypatch, tmp_path):
    """--json and --compare the same file (a nightly job): the figures so far go beside it, not over it."""
    calls = []

    def group_then_maybe_ctrl_c(settings, *, workdir, log, progress=None, recheck=None):
        report = BenchReport(settings.to_dict(), MACHINE, figures(), complete=False)
        progress(report)
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        report.complete = True
        return report

    monkeypatch.setattr("camshaft.bench.runner.run_bench", group_then_maybe_ctrl_c)
    path = tmp_path / "last.json"
    baseline = BenchReport(BenchSettings(quick=True).to_dict(), MACHINE, figures()).to_dict()
    save_json(baseline, path)
    code, out, _ = _main(capsys, "bench", "--quick", "--json", path, "--compare", path)
    side = tmp_path / "last.incomplete.json"
    assert code == 130 and f"results so far (marked incomplete): {side}" in out
    assert load_json(path) == json.loads(json.dumps(baseline, default=str)) and load_json(side)["complete"] is False
    code, out, _ = _main(capsys, "bench", "--quick", "--json", path, "--compare", path)
    assert code == 0 and load_json(path)["complete"] is True and not side.exists()


# --- what --compare trusts ----------------------------------------------------------------------------


def test_a_figure_measured_before_and_skipped_now_fails_the_comparison():
    """Was: a method that stopped working (skipped, not failed) only lowered a count; the job passed."""
    before = run_of(figures())
    why = "the torchscript backend cannot open 'demo': export failed"
    after = run_of(figures()[:2], skipped=[Skipped("demo/gradcam/eager/top:1", why, role="method")])
    result = compare(before, after)
    assert not result.ok and result.lost == (("demo/gradcam/eager/top:1", why),)
    assert f"LOST demo/gradcam/eager/top:1: measured in the previous run, skipped in this one: {why}" in (
        format_comparison(result)
    )
    # a figure simply not asked for this time is not lost
    assert compare(before, run_of(figures()[:2])).ok


@pytest.mark.parametrize(
    ("previous", "said"),
    [({"dtype": "bfloat16"}, "dtype bfloat16 -> float32"), ({"device": "cuda:0"}, "device cuda -> cpu")],
)
def test_runs_of_another_dtype_or_device_are_not_compared(previous, said):
    """Was: figure keys leave dtype and device out, so a bfloat16 or GPU baseline was compared as if the same work."""
    before = run_of(figures(), **previous)
    result = compare(before, run_of(figures()))
    assert not result.ok and result.compared == 0 and said in result.refused
    assert f"NOTHING COMPARED: the runs measured different work or machines ({said})" in format_comparison(result)


def test_raw_throughput_is_compared_on_the_same_machine_only_and_other_differences_are_listed():
    before = run_of(figures(), machine={"cpu": "other cpu", "versions": {"torch": "2.0"}})
    after = run_of(figures(), machine={"versions": {"torch": "2.1"}})
    refused = compare(before, after, metric="throughput")
    assert not refused.ok and "cpu other cpu -> test cpu" in refused.refused
    ratios = compare(before, after)  # ratios are measured within each run: compared, the differences listed
    assert ratios.ok and ratios.unchanged == 2
    assert "the runs differ in: cpu other cpu -> test cpu; torch 2.0 -> 2.1" in format_comparison(ratios)


def test_compare_with_malformed_figures_is_refused_before_any_work(capsys, monkeypatch, tmp_path):
    """Was: accepted by the schema check, then a KeyError traceback after the whole run."""
    data = run_of(figures())
    del data["figures"][1]["key"]
    data["figures"].append("not a figure")
    path = save_json(data, tmp_path / "edited.json")
    with pytest.raises(ConfigError, match=r"figures \[1, 3\] of 4 are not benchmark figures"):
        load_json(path)
    _no_work(monkeypatch)
    code, _, err = _main(capsys, "bench", "--quick", "--compare", path)
    assert code == 2 and "are not benchmark figures" in err


def test_the_json_records_the_commit_measured():
    """camshaft's version string is the same every night; the commit tells two nightly runs apart."""
    from camshaft.bench.machine import machine_info

    versions = machine_info("cpu", "float32")["versions"]
    assert "camshaft_commit" in versions
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert re.fullmatch(re.escape(head.stdout.strip()) + r"(\+dirty)?", versions["camshaft_commit"])


# --- the table --------------------------------------------------------------------------------------


def test_the_limit_table_aligns_its_numbers_to_the_right():
    """Was: the first three limit columns were left-aligned, the rest right-aligned."""
    figs = [
        fig(f"demo/limit/{v}", "limit", s, variant=v)
        for v, s in (("eager", 0.25), ("channels_last", 0.25), ("torchscript", 0.002), ("onnxruntime", 0.002))
    ]
    lines = format_table(run_of(figs)).splitlines()
    header = next(line for line in lines if line.startswith("model") and "channels_last" in line)
    row = lines[lines.index(header) + 2]
    for name, value in (("eager", "8.0"), ("channels_last", "8.0"), ("torchscript", "1000.0")):
        end = header.index(name) + len(name)
        assert row[end - len(value) : end] == value, (name, header, row)


# --- the pytest suites -----------------------------------------------------------------------------


def _collect(*argv) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CAMSHAFT_BENCH_QUICK"}
    cmd = [sys.executable, "-m", "pytest", "benchmarks/", "--quick", "--collect-only", "-q", "-p", "no:cacheprovider"]
    return subprocess.run([*cmd, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # 22 s: two pytest subprocesses; test_bench_suites keeps one refusal in the default run
def test_the_suites_refuse_bad_settings_and_an_unusable_bench_json_as_usage_errors(tmp_path):
    """Was: an INTERNALERROR traceback; and --bench-json into a folder crashed after every benchmark ran."""
    bad = _collect("--bench-model", "nonsense")
    text = bad.stdout + bad.stderr
    assert bad.returncode == pytest.ExitCode.USAGE_ERROR and "INTERNALERROR" not in text
    assert "unknown model 'nonsense'" in text
    folder = _collect("--bench-json", str(tmp_path))
    assert folder.returncode == pytest.ExitCode.USAGE_ERROR
    assert "is a folder; give a file name" in folder.stdout + folder.stderr


def test_an_interrupted_suite_run_saves_its_json_marked_incomplete(tmp_path):
    """Was: a session stopped by Ctrl-C saved its figures as a complete run."""
    spec = importlib.util.spec_from_file_location("bench_conftest_audit3", ROOT / "benchmarks" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    path = tmp_path / "suite.json"
    session = SimpleNamespace(report=BenchReport(run_of([])["settings"], MACHINE, figures()))
    config = SimpleNamespace(camshaft_bench_session=session, getoption=lambda name: str(path))
    lines = []
    reporter = SimpleNamespace(write_sep=lambda *a, **k: None, write_line=lines.append)
    given = {"terminalreporter": reporter, "exitstatus": pytest.ExitCode.INTERRUPTED, "config": config}
    hook = conftest.pytest_terminal_summary
    hook(**{k: v for k, v in given.items() if k in inspect.signature(hook).parameters})  # as pytest calls hooks
    assert load_json(path)["complete"] is False and "INCOMPLETE" in lines[0]


def test_a_limit_set_by_another_variant_is_listed():
    """ONNX Runtime missing on one machine: the limit falls to the next variant and every ratio rises."""
    before = run_of(figures() + [fig("demo/limit/onnxruntime", "limit", 0.25, variant="onnxruntime")])
    after = run_of(figures())
    assert "limit set by onnxruntime -> eager" in format_comparison(compare(before, after))
    assert "limit set by" not in format_comparison(compare(after, after))


def test_the_torchscript_limit_runs_in_bfloat16_as_the_backend_does():
    """Was: skipped ('measured in float32 only') while the TorchScript backend runs its frozen float32 trace under
    autocast: a bfloat16 run had no TorchScript limit to compare with."""
    import torch
    from torch import nn

    from camshaft.bench.limits import _torchscript, _traced

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    x = torch.randn(2, 3, 16, 16)
    traced = _traced(model, x, torch.bfloat16)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert traced(x).dtype == torch.bfloat16  # autocast reaches the frozen trace
    _torchscript(model, x, torch.bfloat16)()
