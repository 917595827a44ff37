"""``camshaft report`` on a run of several methods: a report each, and a page that compares them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli

import camshaft
from camshaft.demo.shapes import write_demo_dataset
from camshaft.report import build_methods_report, method_runs


@pytest.fixture(autouse=True)
def _no_reexec(monkeypatch):
    monkeypatch.setenv("CAMSHAFT_NO_REEXEC", "1")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("methods")
    manifest = write_demo_dataset(folder / "data", n=10, seed=4)
    explain = lambda out, methods: camshaft.explain(None, manifest, out=folder / out, method=methods,  # noqa: E731
                                                    targets="top:2", progress=False)
    explain("three", "gradcam,cam,occlusion")
    explain("two", "cam,gradcam")
    explain("one", "occlusion")
    return folder


def test_a_report_per_method_and_a_page_comparing_them(runs, tmp_path, capsys):
    code, out, err = run_cli(capsys, "report", runs / "three", "--out", tmp_path / "report", "--no-progress")
    assert code == 0, err
    assert list(method_runs(runs / "three")) == ["gradcam", "cam", "occlusion"]  # the run's order
    index = (tmp_path / "report" / "index.html").read_text()
    for method in ("gradcam", "cam", "occlusion"):
        assert (tmp_path / "report" / method / "index.html").exists() and f'href="{method}/index.html"' in index
        assert f"{method}:\n  audited 10 images (20 maps)" in out
        page = (tmp_path / "report" / method / "index.html").read_text()
        assert '<nav><a href="../index.html">← all methods</a>' in page  # every page of it leads back
        assert all('href="../index.html"' in p.read_text() for p in (tmp_path / "report" / method).glob("class_*.html"))
    agreement = pd.read_csv(tmp_path / "report" / "tables" / "agreement.csv")
    assert list(zip(agreement["method_a"], agreement["method_b"], strict=True)) == [
        ("gradcam", "cam"), ("gradcam", "occlusion"), ("cam", "occlusion")]
    assert (agreement["images"] == 10).all()
    pair = agreement.iloc[0]  # the demo model's head is GAP + linear: Grad-CAM is ReLU(CAM) times a positive number
    assert pair["mean_top_iou"] == pytest.approx(1.0) and 0.5 < pair["mean_rank_corr"] < 1.0  # ReLU ties the rest
    assert agreement.iloc[1]["mean_top_iou"] < 0.9  # occlusion is another measurement
    methods = pd.read_csv(tmp_path / "report" / "tables" / "methods.csv")
    assert methods["method"].tolist() == ["gradcam", "cam", "occlusion"]
    summaries = {m: json.loads((tmp_path / "report" / m / "tables" / "summary.json").read_text()) for m in methods["method"]}
    for _, row in methods.iterrows():
        assert row["flagged_images"] == summaries[row["method"]]["flagged_images"]
        assert row["border_mass"] == pytest.approx(summaries[row["method"]]["border_mass"])
    assert "agreement gradcam / cam over 10 images" in out


def test_each_method_is_compared_with_its_namesake(runs, tmp_path):
    report = build_methods_report(runs / "three", out=tmp_path / "report", compare=runs / "two")
    assert report.reports["cam"].drift.summary["mean_rank_corr"] == pytest.approx(1.0)  # the same model and images
    assert report.reports["gradcam"].drift is not None and report.reports["occlusion"].drift is None
    single = build_methods_report(runs / "three", out=tmp_path / "single", compare=runs / "one")
    assert [m for m, r in single.reports.items() if r.drift is not None] == ["occlusion"]


def test_drift_alerts_name_their_method_and_fail_the_run(runs, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "report", runs / "two", "--out", tmp_path / "report", "--compare", runs / "three",
                           "--min-rank-corr", "1.5", "--no-progress")
    assert code == 2  # out of [-1, 1]: refused before any work
    code, out, _ = run_cli(capsys, "report", runs / "two", "--out", tmp_path / "report", "--compare", runs / "three",
                           "--max-changed", "-0.5", "--no-progress")
    assert code == 1 and "ALERT: cam: share of changed predictions" in out and "ALERT: gradcam:" in out


def test_a_comparison_run_without_these_methods_is_refused_before_any_metric_is_computed(runs, tmp_path, capsys):
    code, _, err = run_cli(capsys, "report", runs / "two", "--out", tmp_path / "report", "--compare", runs / "one",
                           "--metrics", "deletion", "--no-progress")
    assert code == 2 and "holds the occlusion method only; this run has cam, gradcam" in err
    assert not list((runs / "two").glob("*/metrics.parquet")) and not (tmp_path / "report").exists()


def test_metrics_are_computed_for_every_method(runs, tmp_path, capsys):
    code, _, err = run_cli(capsys, "report", runs / "two", "--out", tmp_path / "report", "--metrics", "deletion",
                           "--steps", "4", "--no-progress")
    assert code == 0, err
    for method in ("cam", "gradcam"):
        assert (runs / "two" / method / "metrics.parquet").exists()
    assert "deletion_auc" in pd.read_csv(tmp_path / "report" / "tables" / "methods.csv").columns


@pytest.mark.slow  # 12 s; the main report's browser check (test_report_runs) stays in the default run
@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("google-chrome") is None,
                    reason="no Chromium installed")
def test_the_page_comparing_methods_opens_in_chromium_and_links_to_each_report(runs, tmp_path, capsys):
    assert run_cli(capsys, "report", runs / "two", "--out", tmp_path / "report", "--no-progress")[0] == 0
    check = [sys.executable, str(Path(__file__).parents[1] / "scripts" / "check_report.py"), "--pages", "1"]
    ok = subprocess.run([*check, str(tmp_path / "report")], capture_output=True, text=True, timeout=180)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    (tmp_path / "report" / "cam" / "index.html").unlink()
    bad = subprocess.run([*check, str(tmp_path / "report")], capture_output=True, text=True, timeout=180)
    assert bad.returncode == 1 and "broken link" in bad.stdout and "cam/index.html" in bad.stdout
