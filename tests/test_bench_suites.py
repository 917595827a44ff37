"""The pytest-benchmark suites under ``benchmarks/`` run, in quick mode, and every figure has its ratio.

This times nothing worth reading (tiny sizes on a shared CI machine); it proves that the suites a
person runs by hand or on a GPU still collect, run and save a complete JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from camshaft.engine.methods import method_names

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    env = {k: v for k, v in os.environ.items() if k != "CAMSHAFT_BENCH_QUICK"}
    cmd = [sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-only", "--quick", "-q",
           "-p", "no:cacheprovider", "--bench-json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    return json.loads(out.read_text())


def test_every_method_is_timed_beside_its_limit(quick_run):
    figures = quick_run["figures"]
    timed = {f["method"] for f in figures if f["role"] == "method"}
    assert set(method_names()) | {"actmax"} <= timed
    for f in figures:
        if f["role"] == "method":
            assert f["ratio_to_limit"] > 0 and f["limit_per_second"] > 0, f["key"]
    assert {"eager", "onnxruntime"} <= {f["variant"] for f in figures if f["role"] == "limit"}
    assert {"contiguous", "channels_last"} <= {f["variant"] for f in figures if f["role"] == "actmax_limit"}


def test_pipelines_and_peers_are_timed_in_the_same_run(quick_run):
    figures = quick_run["figures"]
    pipelines = [f for f in figures if f["role"] == "pipeline"]
    assert pipelines and all(f["ratio_to_method"] > 0 for f in pipelines)
    for f in pipelines:  # where the time went, and who decoded (threads: a CPU run's default)
        assert set(f["stages"]) == {"waiting_for_decode", "waiting_for_device", "decoding_on_device", "explaining", "writing"}
        assert f["decoding"].endswith(" threads"), f["decoding"]
    assert any(f["role"] == "peer" for f in figures)  # captum and torchcam come with the dev extra
    assert quick_run["settings"]["quick"] is True and quick_run["machine"]


def test_the_suites_take_camshaft_benchs_device_settings_and_refuse_bad_ones():
    env = {k: v for k, v in os.environ.items() if k != "CAMSHAFT_BENCH_QUICK"}
    base = [sys.executable, "-m", "pytest", "benchmarks/", "--quick", "--collect-only", "-q", "-p", "no:cacheprovider"]
    ok = subprocess.run([*base, "--bench-device", "cpu", "--bench-dtype", "bfloat16"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    bad = subprocess.run([*base, "--bench-device", "cpu", "--bench-cuda-graphs"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert "CUDA graphs need a CUDA device; this benchmark runs on cpu" in bad.stdout + bad.stderr
