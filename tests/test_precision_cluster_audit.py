"""Mixed precision on the CPU (--dtype bfloat16/float16) and dask.distributed runs (--scheduler ADDRESS).

Mixed precision: every method runs under CPU autocast, writes float32 maps, and ranks pixels as float32
does; ONNX Runtime refuses half precision before any work. Clusters: the same maps and table as a local
run, a rerun recomputes nothing, a worker killed mid-write leaves nothing half-written, workers that
run in another folder than the client still find the run, and an unreachable scheduler is refused
before the output folder changes.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import camshaft
from camshaft.demo.shapes import write_demo_dataset
from camshaft.errors import ConfigError
from camshaft.pipeline import run as pipeline_run
from camshaft.pipeline import schedule

METHODS = ["cam", "gradcam", "gradcam++", "xgradcam", "layercam", "scorecam", "occlusion", "saliency", "smoothgrad",
           "integrated_gradients", "guided_backprop"]
OPTIONS = {"samples": 4, "steps": 4}  # smoothgrad, integrated gradients: few evaluations


def _takes(methods) -> set[str]:
    """The options of OPTIONS that ``methods`` take (a job refuses options none of its methods takes)."""
    return {k for k, m in (("samples", "smoothgrad"), ("steps", "integrated_gradients")) if m in methods}
VOLATILE = ["mtime_ns"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("data"), n=12, seed=3).parent / "images"


@pytest.fixture(scope="module")
def few(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("few"), n=2, seed=5).parent / "images"


def rank_corr(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps (ties get their mean rank; the report's own, not scipy's:
    CI installs the dev extra, which has no scipy)."""
    from camshaft.report.similarity import spearman

    return float(spearman(a.reshape(1, -1), b.reshape(1, -1))[0])


def _precision_runs(data: Path, tmp_path: Path, methods, *, backend: str, dtype: str, model=None, **kw):
    """The float32 and the ``dtype`` results of ``methods``, by method."""
    runs = {}
    for dt in ("float32", dtype):
        out = tmp_path / f"{backend}-{dt}"
        camshaft.explain(model, data, out=out, method=methods, backend=backend, dtype=dt, input_size=64,
                         targets="top:2", batch_size=2, scheduler="sync", progress=False, **kw,
                         options={k: v for k, v in OPTIONS.items() if k in _takes(methods)})
        runs[dt] = {m: camshaft.load_results(out / m if len(methods) > 1 else out) for m in methods}
    return runs["float32"], runs[dtype]


def _assert_close_in_rank(full, half, methods, *, engaged: bool = True) -> None:
    for m in methods:
        a, b = full[m].maps[:], half[m].maps[:]
        assert b.dtype == np.float32, m  # the store holds float32 whatever the compute dtype
        assert np.isfinite(b).all(), m
        np.testing.assert_array_equal(full[m].targets, half[m].targets)
        worst = min(rank_corr(a[i, k], b[i, k]) for i in range(len(a)) for k in range(a.shape[1]))
        assert worst > 0.9, (m, worst)
        if engaged:  # no difference at all would mean autocast never ran
            assert np.abs(a - b).max() > 0, m


def test_bfloat16_on_the_cpu_writes_float32_maps_that_rank_like_float32(few, tmp_path):
    methods = ["gradcam", "saliency"]
    full, half = _precision_runs(few, tmp_path, methods, backend="eager", dtype="bfloat16")
    _assert_close_in_rank(full, half, methods)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["eager", "torchscript"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_every_method_runs_in_half_precision_on_the_cpu(backend, dtype, few, tmp_path):
    methods = [m for m in METHODS if backend == "eager" or m != "guided_backprop"]  # a live model's layers
    full, half = _precision_runs(few, tmp_path, methods, backend=backend, dtype=dtype)
    _assert_close_in_rank(full, half, methods)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["eager", "torchscript"])
def test_a_random_resnet18_at_64px_ranks_alike_in_bfloat16(backend, few, tmp_path):
    """layer3 (4x4 at 64 px): layer4's 2x2 maps have too few pixels for a rank correlation to mean much."""
    torch.manual_seed(0)
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), weights)
    methods = ["gradcam", "xgradcam", "layercam", "gradcam++", "occlusion", "saliency", "integrated_gradients"]
    full, half = _precision_runs(few, tmp_path, methods, backend=backend, dtype="bfloat16", model="resnet18",
                                 weights=weights, tap="layer3")
    _assert_close_in_rank(full, half, methods)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_onnxruntime_refuses_half_precision_before_any_work(dtype, few, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="the onnxruntime backend runs float32 models"):
        camshaft.explain(None, few, out=out, backend="onnxruntime", dtype=dtype, progress=False)
    assert not out.exists()  # nothing exported, no folder left


@pytest.mark.slow
def test_bench_quick_in_bfloat16_runs_and_labels_what_it_skips(tmp_path):
    import json

    env = {**os.environ, "CAMSHAFT_NO_REEXEC": "1"}
    args = ["bench", "--quick", "--dtype", "bfloat16", "--method", "cam", "--no-peers", "--json", tmp_path / "b.json"]
    done = subprocess.run([sys.executable, "-m", "camshaft", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "(cpu, bfloat16)" in done.stdout
    assert "the onnxruntime backend runs float32 models" in done.stdout
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["settings"]["dtype"] == "bfloat16"
    variants = {f.get("variant") for f in saved["figures"] if f.get("role") == "limit"}
    assert {"torchscript", "torchscript_cl"} <= variants  # under autocast, as the TorchScript backend runs


# --- dask.distributed ---------------------------------------------------------------------------------


def _explain(data, out, scheduler, **kw):
    kw = {"partition_size": 4, "batch_size": 4, "targets": "top:2", "progress": False, **kw}
    return camshaft.explain(None, data, out=out, scheduler=scheduler, **kw)


def assert_same_results(a, b) -> None:
    np.testing.assert_array_equal(a.maps[:], b.maps[:])
    np.testing.assert_array_equal(a.targets, b.targets)
    assert a.table.drop(columns=VOLATILE).equals(b.table.drop(columns=VOLATILE))


def _markers(out: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "_camshaft" / "done").iterdir()}


def test_a_cluster_run_equals_the_threaded_one_resumes_and_reports_progress(data, tmp_path, capsys):
    distributed = pytest.importorskip("distributed")
    _explain(data, tmp_path / "local", "threads")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None)
    with cluster:
        capsys.readouterr()
        first = _explain(data, tmp_path / "cluster", cluster.scheduler_address, progress=True)
        bar = capsys.readouterr().err
        markers = _markers(tmp_path / "cluster")
        again = _explain(data, tmp_path / "cluster", cluster.scheduler_address)
    assert (first.mode, first.explained, first.failed) == ("fresh", 12, 0)
    assert "12/12" in bar  # the bar follows the cluster's partitions to the end
    assert (again.mode, again.explained) == ("resume", 0)
    assert _markers(tmp_path / "cluster") == markers == {f"part-{i:06d}.json": markers[f"part-{i:06d}.json"]
                                                          for i in range(3)}  # none rewritten
    assert_same_results(camshaft.load_results(tmp_path / "cluster"), camshaft.load_results(tmp_path / "local"))


def test_an_unreachable_scheduler_is_refused_before_the_last_results_change(few, tmp_path, monkeypatch):
    """Was: the client connected only after planning, when a changed job had already deleted the results."""
    distributed = pytest.importorskip("distributed")
    out = tmp_path / "run"
    _explain(few, out, "sync")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    class Unreachable(distributed.Client):
        def __init__(self, *args, **kwargs):
            raise OSError("Timed out trying to connect to tcp://10.0.0.9:8786 after 30 s")

    monkeypatch.setattr("dask.distributed.Client", Unreachable)
    with pytest.raises(ConfigError, match=r"cannot reach the dask.distributed scheduler at 'tcp://10.0.0.9:8786'"):
        _explain(few, out, "tcp://10.0.0.9:8786", targets="top:1")  # another job: it would start over
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert len(camshaft.load_results(out).table) == 2


@pytest.mark.parametrize("model", ["resnet18", "an exported file"])
def test_workers_in_another_folder_than_the_client_find_a_relative_out(model, few, tmp_path, monkeypatch):
    """Was: --out, the weights and class names the client writes for the workers, and a model file travelled
    as relative paths, which a worker started elsewhere (dask worker, a service) resolved in its own folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    Path("names.txt").write_text("a\nb\nc\nd\ne\n")
    kw = dict(class_names="names.txt", input_size=32, partition_size=1, progress=False)
    if model == "resnet18":
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), "r18.pth")
        kw["weights"] = "r18.pth"
    else:
        model, kw["backend"] = "demo.pt", "torchscript"
        camshaft.export(None, format="torchscript", out=model, input_size=32)

    def on_a_worker_elsewhere(ctx, work, *, scheduler, on_done):  # a worker process: its own folder, no explainer
        if scheduler == "sync":  # the local run to compare with
            return schedule.run_tasks(ctx, work, scheduler=scheduler, on_done=on_done)
        assert scheduler == "tcp://cluster:8786"
        os.chdir(tmp_path / "elsewhere")
        try:
            return schedule.run_tasks(ctx, work, scheduler="sync", on_done=on_done)
        finally:
            os.chdir(tmp_path)

    monkeypatch.setattr(pipeline_run, "connected", contextlib.nullcontext, raising=False)
    monkeypatch.setattr(pipeline_run, "run_tasks", on_a_worker_elsewhere)
    summary = camshaft.explain(model, few, out="run", scheduler="tcp://cluster:8786", **kw)
    assert (summary.explained, summary.failed) == (2, 0)
    assert list((tmp_path / "elsewhere").iterdir()) == []  # nothing written in the worker's folder
    local = camshaft.explain(model, few, out="local", scheduler="sync", **kw)
    cluster = camshaft.load_results("run")
    np.testing.assert_array_equal(cluster.maps[:], camshaft.load_results(local.out).maps[:])
    assert set(np.concatenate(cluster.table["target_names"].to_numpy())) <= set("abcde")


@pytest.mark.slow
def test_a_worker_killed_mid_write_in_another_folder_leaves_nothing_half_written(data, tmp_path, monkeypatch):
    """Real worker processes started in their own folder; the first shard write kills its worker half-way."""
    distributed = pytest.importorskip("distributed")
    _explain(data, tmp_path / "local", "threads")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    flag = tmp_path / "killed"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            client.run(os.chdir, str(tmp_path / "elsewhere"))
            client.run(_die_in_the_first_shard_write, str(flag))
            summary = _explain(data, "cluster", cluster.scheduler_address)
    assert flag.exists()  # a worker did die half-way through a shard
    assert (summary.explained, summary.failed) == (12, 0)
    results = camshaft.load_results(tmp_path / "cluster")
    assert sorted(results.table["index"]) == list(range(12))
    assert_same_results(results, camshaft.load_results(tmp_path / "local"))
    assert [p for p in (tmp_path / "cluster").rglob("*") if p.name.endswith((".tmp", ".partial"))] == []
    assert list((tmp_path / "elsewhere").iterdir()) == []


def _die_in_the_first_shard_write(flag: str) -> None:
    """On a worker: the first table shard written on the cluster is cut short by the death of its process."""
    from camshaft.pipeline import tasks
    from camshaft.writers.atomic import atomic_path

    original = tasks.write_table

    def write_table(rows, path):
        try:
            os.close(os.open(flag, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return original(rows, path)
        with atomic_path(Path(path)) as tmp:
            Path(tmp).write_bytes(b"PAR1 half a shard")
            os._exit(1)

    tasks.write_table = write_table


def test_a_long_lived_worker_keeps_the_models_of_its_latest_runs_only(monkeypatch, tmp_path):
    """Was: a worker kept every explainer (a loaded model) it ever built: a cluster serving a nightly job
    whose checkpoint changes every night held one more model per night, until it ran out of memory."""
    from camshaft.engine.job import ExplainJob
    from camshaft.pipeline import tasks

    built = []

    class Explainer:
        runs = ()

    monkeypatch.setattr(tasks, "build_explainer", lambda job, workdir: built.append(job) or Explainer())
    monkeypatch.setattr(tasks, "_EXPLAINERS", {})
    monkeypatch.setattr(tasks, "_BUILT", [], raising=False)
    job = ExplainJob(model=None, data=tmp_path, out=tmp_path / "run")
    nights = [tasks.TaskContext(job, tmp_path / "run", (), False, model=f"weights of night {n}") for n in range(5)]
    for ctx in nights:
        for _ in range(3):  # a night's partitions share the model the worker loaded for the first one
            tasks._explainer(ctx)
    assert len(built) == 5
    assert len(tasks._EXPLAINERS) <= 2 and nights[-1].key in tasks._EXPLAINERS
