"""Interruption and resume, as a nightly job's operator meets them: stale writers, half-moved updates."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import camshaft
from camshaft.demo.shapes import write_demo_dataset
from camshaft.engine.explainer import Explainer
from camshaft.pipeline import schedule

WAIT = 120  # seconds: a deadlock fails the test instead of hanging it


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("data"), n=6, seed=3).parent / "images"


def _run(data, out, **kw):
    return camshaft.explain(None, data, out=out, partition_size=2, batch_size=2, progress=False, **kw)


def assert_same_results(a, b) -> None:
    np.testing.assert_allclose(a.maps[:], b.maps[:], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(a.targets, b.targets)
    columns = ["index", "path", "status", "targets"]
    assert a.table[columns].equals(b.table[columns])


# a cluster pickles its tasks: what they wait on is found by name, not captured
_STALE = "top:1"  # the interrupted job's targets
_EVENTS = {name: threading.Event() for name in ("entered", "gate", "stale_ended")}
_REAL_PARTITION = schedule.run_partition


def _held_partition(ctx, part, records):
    """The new job reaches partition 2 only once the stale job's copy of it has ended."""
    if ctx.job.targets != _STALE and part.number == 2:
        _EVENTS["gate"].set()
        assert _EVENTS["stale_ended"].wait(WAIT)
    try:
        return _REAL_PARTITION(ctx, part, records)
    finally:
        if ctx.job.targets == _STALE and part.number == 2:
            _EVENTS["stale_ended"].set()


def test_a_late_cluster_write_of_an_interrupted_job_never_enters_the_next_jobs_results(data, tmp_path, monkeypatch):
    """A client killed outright leaves a partition running on a worker, and a Ctrl-C'd one did so until the
    next test's fix; the next job into the same folder (other targets) must neither take that partition's
    marker nor its shards for its own."""
    distributed = pytest.importorskip("distributed")
    out = tmp_path / "run"
    for event in _EVENTS.values():
        event.clear()
    real_explain, real_distributed = Explainer.explain, schedule._distributed

    def explain(self, records, indices, **kw):
        if self.job.targets == _STALE and indices[0] == 4:  # the stale job's last partition: still running
            _EVENTS["entered"].set()
            assert _EVENTS["gate"].wait(WAIT)
        return real_explain(self, records, indices, **kw)

    def ctrl_c_once_the_last_partition_runs(summary, on_done):
        assert _EVENTS["entered"].wait(WAIT)
        raise KeyboardInterrupt

    monkeypatch.setattr(Explainer, "explain", explain)
    monkeypatch.setattr(schedule, "run_partition", _held_partition)
    monkeypatch.setattr(schedule, "_disown", lambda ctx: None)  # kill -9: the client tells the workers nothing
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=3, processes=False, dashboard_address=None)
    with cluster:
        monkeypatch.setattr(schedule, "_distributed", lambda ctx, work, client, on_done: real_distributed(
            ctx, work, client, lambda s: ctrl_c_once_the_last_partition_runs(s, on_done)))
        with pytest.raises(KeyboardInterrupt):
            _run(data, out, targets=_STALE, scheduler=cluster.scheduler_address)
        monkeypatch.setattr(schedule, "_distributed", real_distributed)
        summary = _run(data, out, targets="0", scheduler=cluster.scheduler_address)
    assert _EVENTS["stale_ended"].is_set() and (summary.mode, summary.explained) == ("fresh", 6)
    monkeypatch.undo()
    clean = _run(data, tmp_path / "clean", targets="0", scheduler="sync")
    assert_same_results(camshaft.load_results(out), camshaft.load_results(clean.out))


def test_a_task_of_a_run_that_no_longer_owns_the_folder_writes_nothing(data, tmp_path):
    """A stale task refuses before it loads a model or reads an image (and after, before each write: above)."""
    from camshaft.engine.job import ExplainJob
    from camshaft.errors import Interrupted
    from camshaft.pipeline.plan import plan
    from camshaft.pipeline.state import RunState
    from camshaft.pipeline.tasks import TaskContext, run_partition

    out = tmp_path / "run"
    RunState(out).claim("the run now in the folder")
    job = ExplainJob(model=None, data=data, out=out, partition_size=2, batch_size=2, scheduler="sync")
    stale = TaskContext(job, out, ((1, 12, 12),), False, run_id="an earlier run")
    with pytest.raises(Interrupted, match="another run took .* over"):
        run_partition(stale, plan(6, 2)[1], [])
    assert [p.name for p in out.rglob("*") if p.is_file()] == ["owner"]
    RunState(out).reset()
    assert RunState(out).owner() == "the run now in the folder"  # a fresh start keeps its claim


@pytest.mark.parametrize("rerun_overlays", [  # 10 s each; the failing rerun stays in the default run
    True, pytest.param(False, marks=pytest.mark.slow)], ids=["the-earlier-command", "the-update-again"])
def test_an_update_killed_just_after_moving_the_results_aside_is_taken_up_by_either_command(
        data, tmp_path, monkeypatch, rerun_overlays):
    """Killed between moving the last results aside and recording the update, the folder holds no maps; the
    earlier command resumed into that missing store and failed at every rerun, the update again reused the id
    of an older update (a cluster worker may still hold that update's rows under it)."""
    import json

    from camshaft.writers import maps_store

    out = tmp_path / "run"
    _run(data, out, scheduler="sync")  # the nightly job ...
    first = camshaft.load_results(out)
    maps, table = first.maps[:], first.table
    assert _run(data, out, scheduler="sync", overlays=True).mode == "update"  # ... asked for overlays once
    older_id = json.loads((out / "_camshaft" / "run.json").read_text())["previous_id"]
    assert older_id

    def killed(*args, **kwargs):
        raise SystemExit("killed")  # the results are in _camshaft/previous, run.json still the last run's

    monkeypatch.setattr(maps_store, "create_store", killed)
    with pytest.raises(SystemExit):
        _run(data, out, scheduler="sync")  # and without them again
    monkeypatch.undo()
    assert not (out / "maps.zarr").exists() and (out / "_camshaft" / "previous").is_dir()
    again = _run(data, out, scheduler="sync", overlays=rerun_overlays)
    assert (again.mode, again.explained, again.ok) == ("update", 0, 6)  # every map taken from the moved results
    assert json.loads((out / "_camshaft" / "run.json").read_text())["previous_id"] != older_id
    results = camshaft.load_results(out)
    np.testing.assert_array_equal(results.maps[:], maps)
    assert results.table.drop(columns="mtime_ns").equals(table.drop(columns="mtime_ns"))
    assert len(list((out / "overlays").glob("*.png"))) == (6 if rerun_overlays else 0)


def test_a_refused_second_run_names_the_first_ones_process_and_machine(tmp_path):
    """On a folder that several machines share, a process id alone does not say where to look."""
    import os
    import re
    import socket

    from camshaft.errors import ConfigError
    from camshaft.pipeline.lock import run_lock

    with run_lock(tmp_path):
        holder = re.escape(f"(process {os.getpid()} on {socket.gethostname()})")
        with pytest.raises(ConfigError, match=rf"another camshaft run {holder} is writing into"):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):  # released: the next one goes ahead
        pass


_ENDED: list = []  # how the held partition of the next test ended


def _partition_noting_its_end(ctx, part, records):
    try:
        result = _REAL_PARTITION(ctx, part, records)
    except BaseException as e:
        _ENDED.append(type(e).__name__)
        raise
    _ENDED.append("finished")
    return result


def test_ctrl_c_on_a_cluster_stops_the_partitions_running_on_workers_at_their_next_batch(data, tmp_path, monkeypatch):
    """As the threaded scheduler does: a worker's partition in flight is dropped, unfinished, and the same
    command redoes it (before, it ran to its end while the user thought the run had stopped)."""
    distributed = pytest.importorskip("distributed")
    out, entered, gate = tmp_path / "run", threading.Event(), threading.Event()
    real_explain, real_distributed = Explainer.explain, schedule._distributed
    _ENDED.clear()

    def explain(self, records, indices, **kw):
        if indices[0] == 3:  # the second partition: it runs on a worker as Ctrl-C comes
            entered.set()
            assert gate.wait(WAIT)
        return real_explain(self, records, indices, **kw)

    def ctrl_c(summary, on_done):
        assert entered.wait(WAIT)
        raise KeyboardInterrupt

    monkeypatch.setattr(Explainer, "explain", explain)
    monkeypatch.setattr(schedule, "run_partition", _partition_noting_its_end)
    monkeypatch.setattr(schedule, "_distributed", lambda ctx, work, client, on_done: real_distributed(
        ctx, work, client, lambda s: ctrl_c(s, on_done)))
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None)
    with cluster:
        with pytest.raises(KeyboardInterrupt):
            camshaft.explain(None, data, out=out, partition_size=3, batch_size=1, progress=False,
                             scheduler=cluster.scheduler_address)
        gate.set()
        deadline = time.monotonic() + WAIT
        while len(_ENDED) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert sorted(_ENDED) == ["Interrupted", "finished"]
    assert sorted(p.name for p in (out / "_camshaft" / "done").iterdir()) == ["part-000000.json"]
    monkeypatch.undo()
    again = camshaft.explain(None, data, out=out, partition_size=3, batch_size=1, progress=False, scheduler="sync")
    assert (again.mode, again.explained, again.ok) == ("resume", 3, 6)
