"""Robustness of runs sharing an output folder: one run at a time, unwritable folders, leftovers."""

from __future__ import annotations

import numpy as np
import pytest

import camshaft
from camshaft.demo.shapes import write_demo_dataset
from camshaft.errors import ConfigError
from camshaft.pipeline import schedule


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("data"), n=6, seed=3).parent / "images"


def test_a_second_run_into_a_folder_in_use_is_refused_and_mixes_nothing(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real, seen = schedule.run_partition, []

    def second_run_starts_meanwhile(ctx, part, records):
        if not seen:  # while the first run works on its first partition, another job targets the same folder
            seen.append(None)
            try:
                camshaft.explain(None, data, out=out, targets="top:2", scheduler="sync", partition_size=2,
                                 progress=False)
            except ConfigError as e:
                seen[0] = e
        return real(ctx, part, records)

    monkeypatch.setattr(schedule, "run_partition", second_run_starts_meanwhile)
    camshaft.explain(None, data, out=out, scheduler="sync", partition_size=2, progress=False)
    monkeypatch.undo()
    assert isinstance(seen[0], ConfigError) and "another camshaft run" in str(seen[0])
    results = camshaft.load_results(out)
    assert results.maps.shape[:2] == (6, 1) and {len(t) for t in results.table["targets"]} == {1}  # one job's rows
    assert not np.isnan(results.maps[:]).any()
    assert not (out / ".camshaft.lock").exists()  # released: the next run goes ahead
    again = camshaft.explain(None, data, out=out, targets="top:2", scheduler="sync", partition_size=2, progress=False)
    assert (again.mode, again.explained) == ("fresh", 6)


def test_an_output_folder_that_cannot_be_made_is_a_clear_error(data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"cannot write into --out .*choose a writable folder"):
        camshaft.explain(None, data, out=blocker / "run", scheduler="sync", progress=False)
    assert blocker.read_text() == "not a folder"


def test_a_refused_job_leaves_none_of_the_folders_it_made(data, tmp_path):
    with pytest.raises(ConfigError, match="unknown scheduler"):
        camshaft.explain(None, data, out=tmp_path / "a" / "b" / "run", scheduler="nowhere", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("before", "after"), [("gradcam", "cam,gradcam"), ("cam,gradcam", "gradcam")])
def test_another_set_of_methods_removes_what_killed_writers_of_the_old_one_left(data, tmp_path, before, after):
    out = tmp_path / "run"
    camshaft.explain(None, data, out=out, method=before, scheduler="sync", partition_size=3, progress=False)
    folders = [out] if "," not in before else [out / m for m in before.split(",")]
    stale = [f / name for f in folders for name in (".results.parquet.4242.9.tmp", ".metrics.parquet.4242.10.tmp")]
    for p in stale:
        p.write_bytes(b"half")  # the old run was killed while assembling its tables
    camshaft.explain(None, data, out=out, method=after, scheduler="sync", partition_size=3, progress=False)
    assert [p for p in stale if p.exists()] == []
    if "," in before and "," not in after:  # the old method folders go entirely
        assert not (out / "cam").exists()


def test_a_cluster_run_leaves_no_temporaries_of_a_worker_that_died_mid_write(data, tmp_path, monkeypatch):
    distributed = pytest.importorskip("distributed")
    out = tmp_path / "run"
    stale = [out / "_camshaft" / "rows" / "gradcam" / ".part-000000.parquet.4242.140323071704224.tmp",
             out / "maps.zarr" / "maps" / "c" / "0" / "0" / "0" / f"0.{'ab12' * 8}.partial"]
    real = schedule.run_partition

    def a_worker_died_writing_this_partition_before(ctx, part, records):
        if part.number == 0:  # its retry, on another worker, finds what the dead one left
            for p in stale:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(b"half")
        return real(ctx, part, records)

    monkeypatch.setattr(schedule, "run_partition", a_worker_died_writing_this_partition_before)
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None)
    with cluster:
        summary = camshaft.explain(None, data, out=out, scheduler=cluster.scheduler_address, partition_size=2,
                                   progress=False)
    assert (summary.images, summary.ok) == (6, 6)
    assert [p for p in stale if p.exists()] == []


def test_an_unreachable_scheduler_is_a_clear_error(data, tmp_path, monkeypatch):
    pytest.importorskip("distributed")
    import dask.distributed

    class Unreachable(dask.distributed.Client):
        def __init__(self, address, **kwargs):
            raise OSError(f"Timed out trying to connect to {address} after 30 s")

    monkeypatch.setattr(dask.distributed, "Client", Unreachable)
    with pytest.raises(ConfigError, match=r"cannot reach the dask.distributed scheduler at 'tcp://127.0.0.1:1'"):
        camshaft.explain(None, data, out=tmp_path / "run", scheduler="tcp://127.0.0.1:1", progress=False)


def test_a_file_system_without_locks_runs_with_a_warning(data, tmp_path, monkeypatch):
    import errno

    from camshaft.pipeline import lock

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock.fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="cannot lock .*would not be refused"):
        summary = camshaft.explain(None, data, out=tmp_path / "run", scheduler="sync", partition_size=6, progress=False)
    assert summary.ok == 6 and not (tmp_path / "run" / ".camshaft.lock").exists()


@pytest.mark.slow  # 15 s; test_pipeline's killed-worker test keeps the distributed kill in the default run
def test_a_lost_worker_costs_only_its_unfinished_partitions(data, tmp_path, monkeypatch):
    distributed = pytest.importorskip("distributed")
    import os
    import signal

    out, marked = tmp_path / "run", {}
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        client = distributed.Client(cluster)
        pids = client.run(os.getpid)

        def kill_the_busier_worker(summary, on_done, seen=[]):  # noqa: B006 (one run)
            seen.append(summary)
            if len(seen) == 2:  # both finished partitions' results may sit on the workers
                held = client.has_what()
                victim = max(pids, key=lambda w: len(held.get(w, ())))
                marked.update({p.name: p.stat().st_mtime_ns for p in (out / "_camshaft" / "done").iterdir()})
                os.kill(pids[victim], signal.SIGKILL)
            on_done(summary)

        real = schedule._distributed
        monkeypatch.setattr(schedule, "_distributed", lambda ctx, work, address, on_done: real(
            ctx, work, client, lambda s: kill_the_busier_worker(s, on_done)))
        summary = camshaft.explain(None, data, out=out, scheduler=cluster.scheduler_address, partition_size=1,
                                   batch_size=1, progress=False)
        client.close()
    assert (summary.images, summary.ok, summary.explained) == (6, 6, 6)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "_camshaft" / "done").iterdir()}
    assert marked and {k: after[k] for k in marked} == marked  # finished partitions were not run again
