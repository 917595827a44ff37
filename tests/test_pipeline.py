"""The Dask pipeline: same results whatever the scheduling, resume after kill -9, updates."""

from __future__ import annotations

import functools
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import camshaft
from camshaft.demo.shapes import render_sample, write_demo_dataset

VOLATILE = ["mtime_ns"]  # the table otherwise matches exactly


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("data"), n=14, seed=3).parent / "images"


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    camshaft.explain(None, data, out=out, scheduler="sync", partition_size=100, progress=False)
    return camshaft.load_results(out)


def assert_same_results(a, b):
    np.testing.assert_allclose(a.maps[:], b.maps[:], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(a.targets, b.targets)
    left, right = a.table.drop(columns=VOLATILE), b.table.drop(columns=VOLATILE)
    assert left[["index", "path", "status", "targets"]].equals(right[["index", "path", "status", "targets"]])
    np.testing.assert_allclose(np.stack(left["map_max"]), np.stack(right["map_max"]), rtol=1e-5)


def test_the_maps_store_names_its_axes(reference):
    import zarr

    group = zarr.open_group(str(reference.out / "maps.zarr"), mode="r")
    assert group["maps"].metadata.dimension_names == ("image", "k", "y", "x")
    assert group["targets"].metadata.dimension_names == ("image", "k")
    xarray = pytest.importorskip("xarray")  # not a dependency; where it is installed, it reads the store as it is
    ds = xarray.open_zarr(reference.out / "maps.zarr")
    assert ds["maps"].dims == ("image", "k", "y", "x") and ds.sizes["image"] == 14


@pytest.mark.parametrize(("scheduler", "partition_size"), [("threads", 1), ("threads", 4), ("sync", 5), ("threads", 14)])
def test_results_do_not_depend_on_scheduler_or_partition_size(scheduler, partition_size, data, reference, tmp_path):
    summary = camshaft.explain(None, data, out=tmp_path / "run", scheduler=scheduler, partition_size=partition_size, batch_size=3, progress=False)
    assert (summary.images, summary.explained, summary.mode) == (14, 14, "fresh")
    assert_same_results(camshaft.load_results(tmp_path / "run"), reference)
    assert len(list((tmp_path / "run" / "_camshaft" / "done").iterdir())) == -(-14 // partition_size)


def test_distributed_scheduler_gives_the_same_results(data, reference, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        camshaft.explain(None, data, out=tmp_path / "run", scheduler=cluster.scheduler_address, partition_size=3, progress=False)
    assert_same_results(camshaft.load_results(tmp_path / "run"), reference)


def test_rerun_resumes_without_recomputing(data, tmp_path):
    camshaft.explain(None, data, out=tmp_path / "run", partition_size=4, progress=False)
    again = camshaft.explain(None, data, out=tmp_path / "run", partition_size=4, progress=False)
    assert (again.mode, again.explained, again.images) == ("resume", 0, 14)
    over = camshaft.explain(None, data, out=tmp_path / "run", partition_size=4, overwrite=True, progress=False)
    assert (over.mode, over.explained) == ("fresh", 14)


def test_a_memory_option_changed_on_rerun_resumes_and_a_result_option_starts_over(data, tmp_path):
    """``--samples-per-forward`` sets how much runs at once, as the batch size: a run stopped for memory resumes
    with a smaller one. It used to start over. ``--samples`` changes the maps: that run starts over."""
    out = tmp_path / "run"
    run = functools.partial(camshaft.explain, None, data, out=out, method="smoothgrad", partition_size=7,
                            progress=False)
    run(options={"samples": 4, "samples_per_forward": 8})
    (out / "_camshaft" / "done" / "part-000001.json").unlink()  # that partition was cut short
    again = run(options={"samples": 4, "samples_per_forward": 2})
    assert (again.mode, again.explained) == ("resume", 7)
    other = run(options={"samples": 3, "samples_per_forward": 2})
    assert (other.mode, other.explained) == ("fresh", 14)


def test_a_rerun_removes_what_killed_writers_left_half_written(data, reference, tmp_path):
    out = tmp_path / "run"
    camshaft.explain(None, data, out=out, partition_size=4, overlays=True, progress=False)
    (out / "_camshaft" / "done" / "part-000001.json").unlink()  # that partition was cut short
    stale = [out / "_camshaft" / "rows" / "gradcam" / ".part-000001.parquet.4242.140323071704224.tmp",
             out / "_camshaft" / "done" / ".part-000001.json.4242.7.tmp",
             out / "overlays" / ".0004_x.png.4242.8.tmp", out / ".results.parquet.4242.9.tmp",
             out / "artifacts" / ".model.onnx.4242.10.tmp",  # an export killed mid-way
             out / "maps.zarr" / "maps" / "c" / "1" / "0" / "0" / f"0.{'ab12' * 8}.partial"]  # zarr's chunk write
    kept = [out / "overlays" / "notes.tmp", out / "_camshaft" / ".cache.tmp", out / ".results.parquet.4242.tmp",
            out / "maps.zarr" / "notes.partial"]
    for p in stale + kept:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
    again = camshaft.explain(None, data, out=out, partition_size=4, overlays=True, progress=False)
    assert (again.mode, again.explained) == ("resume", 4)
    assert [p for p in stale if p.exists()] == []  # only the names atomic writes make
    assert all(p.read_bytes() == b"half" for p in kept)
    assert_same_results(camshaft.load_results(out), reference)


def _cli(*args, **kwargs):
    env = {**os.environ, "CAMSHAFT_NO_REEXEC": "1"}
    return subprocess.Popen([sys.executable, "-m", "camshaft", *map(str, args)], env=env, **kwargs)


def test_kill_dash_9_then_rerun_equals_a_clean_run(data, reference, tmp_path):
    out = tmp_path / "run"
    args = ("explain", "demo", data, "--out", out, "--partition-size", "2", "--batch-size", "2", "--no-progress", "--overlays")
    rng = random.Random(7)
    for _ in range(3):  # kill at random moments: during start-up, planning, or mid-partition
        proc = _cli(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.5, 6.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finish = _cli(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = finish.communicate(timeout=300)
    assert finish.returncode == 0, stderr
    results = camshaft.load_results(out)
    assert_same_results(results, reference)
    assert sorted(results.table["index"]) == list(range(14))  # every image exactly once
    assert len(list((out / "overlays").glob("*.png"))) == 14
    leftovers = [p for p in out.rglob("*") if p.name.endswith((".tmp", ".partial"))]
    assert leftovers == []  # killed writes never become results; the finished run left none


def test_a_killed_distributed_worker_does_not_lose_or_duplicate_images(data, reference, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        client = distributed.Client(cluster)
        killed = []

        def kill_one(summary):
            if not killed:  # after the first partition finishes, kill a worker mid-run
                pid = next(iter(client.run(os.getpid).values()))
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

        from camshaft.pipeline import schedule

        original = schedule._distributed
        try:
            schedule._distributed = lambda ctx, work, address, on_done: original(ctx, work, client, lambda s: (kill_one(s), on_done(s)))
            camshaft.explain(None, data, out=tmp_path / "run", scheduler=cluster.scheduler_address, partition_size=2, progress=False)
        finally:
            schedule._distributed = original
        client.close()
    assert killed
    results = camshaft.load_results(tmp_path / "run")
    assert sorted(results.table["index"]) == list(range(14))
    assert_same_results(results, reference)


def test_update_explains_only_new_and_changed_images(tmp_path):
    data = write_demo_dataset(tmp_path / "data", n=9, seed=4).parent / "images"
    out = tmp_path / "run"
    camshaft.explain(None, data, out=out, partition_size=4, progress=False)
    files = sorted(data.rglob("*.*"))
    files[0].unlink()  # removed
    image, _, _ = render_sample(np.random.default_rng(11), size=96)
    image.save(files[1], format="PNG" if files[1].suffix == ".png" else "JPEG")  # changed
    image.save(data / "circle" / "new.png")  # added
    update = camshaft.explain(None, data, out=out, partition_size=4, progress=False)
    assert (update.mode, update.images, update.explained) == ("update", 9, 2)
    fresh = camshaft.explain(None, data, out=tmp_path / "fresh", partition_size=4, progress=False)
    assert_same_results(camshaft.load_results(out), camshaft.load_results(tmp_path / "fresh"))
    assert fresh.explained == 9


def test_a_changed_model_recomputes_everything(tmp_path):
    data = write_demo_dataset(tmp_path / "data", n=4, seed=5).parent / "images"
    weights = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = tmp_path / f"w{seed}.pt"
        torch.save(camshaft_test_factory().state_dict(), path)
        weights.append(path)
    first = camshaft.explain("test_pipeline:camshaft_test_factory", data, out=tmp_path / "run", weights=weights[0], progress=False, input_size=(32, 32))
    second = camshaft.explain("test_pipeline:camshaft_test_factory", data, out=tmp_path / "run", weights=weights[1], progress=False, input_size=(32, 32))
    assert (first.explained, second.mode, second.explained) == (4, "fresh", 4)


def camshaft_test_factory():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)
    )


def test_a_file_that_vanishes_mid_run_is_an_error_row(data, tmp_path, monkeypatch):
    import shutil

    from camshaft.data import workers

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    victim = sorted(copy.rglob("*.*"))[-1]
    real = workers.load_rgb

    def load_and_delete(path):
        if victim.exists():
            victim.unlink()  # gone after listing, before its turn
        return real(path)

    monkeypatch.setattr(workers, "load_rgb", load_and_delete)
    summary = camshaft.explain(None, copy, out=tmp_path / "run", scheduler="sync", partition_size=5, workers=1, decode="threads",
                               progress=False)
    table = camshaft.load_results(tmp_path / "run").table
    row = table[table["path"] == str(victim)].iloc[0]
    assert (row["status"], row["error"]) == ("error", "file not found")
    assert summary.ok == 13 and summary.failed == 1


def test_several_methods_share_one_forward_and_match_single_runs(data, reference, tmp_path, monkeypatch):
    from camshaft.engine.backends.torch_backend import TorchBackend

    calls = {"forward": 0, "tap_gradients": 0}
    for name in calls:
        real = getattr(TorchBackend, name)
        monkeypatch.setattr(TorchBackend, name, lambda self, *a, _real=real, _n=name: (calls.__setitem__(_n, calls[_n] + 1), _real(self, *a))[1])
    summary = camshaft.explain(None, data, out=tmp_path / "run", method=["cam", "gradcam", "layercam"], scheduler="sync", batch_size=7, partition_size=14, progress=False)
    assert calls == {"forward": 0, "tap_gradients": 1 + 2}  # the probe, then one shared pass per batch of 7
    assert [d.name for d in summary.result_dirs] == ["cam", "gradcam", "layercam"]
    assert_same_results(camshaft.load_results(tmp_path / "run" / "gradcam"), reference)
    single = camshaft.explain(None, data, out=tmp_path / "cam", method="cam", progress=False)
    assert_same_results(camshaft.load_results(tmp_path / "run" / "cam"), camshaft.load_results(single.out))
    again = camshaft.explain(None, data, out=tmp_path / "run", method=["cam", "gradcam", "layercam"], progress=False, partition_size=14)
    assert again.mode == "resume" and again.explained == 0


def test_metrics_and_exemplars_gathered_in_the_pass_equal_the_later_computation(data, tmp_path):
    from camshaft.report import compute_exemplars, compute_metrics, load_exemplars, load_metrics, parse_metrics
    from camshaft.report.exemplars import ExemplarSpec

    out = tmp_path / "run"
    camshaft.explain(
        None, data, out=out, metrics=("deletion", "insertion"), metric_steps=8, exemplars=("features:0,5",), exemplar_k=3,
        partition_size=5, batch_size=4, progress=False,
    )
    (in_pass, specs), exemplars = load_metrics(out), load_exemplars(out)
    assert len(in_pass) == 14 and set(exemplars["channel"]) == {0, 5} and len(exemplars) == 6
    later = tmp_path / "later"
    camshaft.explain(None, data, out=later, partition_size=14, progress=False)
    compute_metrics(later, specs=parse_metrics("deletion,insertion", steps=8))
    compute_exemplars(later, specs=[ExemplarSpec.parse("features:0,5")], k=3)
    assert [s["kind"] for s in specs] == ["deletion", "insertion"]
    # maps differ by float noise between batchings, which can swap near-tied pixels in the ranking
    np.testing.assert_allclose(in_pass["deletion_auc"], load_metrics(later)[0]["deletion_auc"], rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(in_pass["insertion_auc"], load_metrics(later)[0]["insertion_auc"], rtol=2e-3, atol=1e-5)
    assert list(exemplars["index"]) == list(load_exemplars(later)["index"])


def test_a_partition_of_unreadable_files_does_not_stop_the_exemplars(tmp_path):
    from camshaft.report import load_exemplars

    data = tmp_path / "data"
    write_demo_dataset(data, n=3, seed=1)
    for name in ("zz_bad_1.jpg", "zz_bad_2.jpg"):  # sorted last: the last partition holds only these
        (data / name).write_bytes(b"not an image")
    out = camshaft.explain(None, data, out=tmp_path / "run", exemplars=("features:0,1",), exemplar_k=2,
                           partition_size=2, progress=False)
    assert (out.images, out.failed) == (5, 2)
    exemplars = load_exemplars(tmp_path / "run")
    assert set(exemplars["channel"]) == {0, 1} and len(exemplars) == 4 and exemplars["index"].max() < 3

    # no readable image at all: no exemplar rows, and the run still ends
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "a.jpg").write_bytes(b"not an image")
    out = camshaft.explain(None, only_bad, out=tmp_path / "run_bad", exemplars=("features",), progress=False)
    assert out.failed == 1 and load_exemplars(tmp_path / "run_bad").empty


def test_decode_workers_default_to_all_usable_cores_but_one_at_least_2(monkeypatch):
    from camshaft.data.workers import decoder

    assert decoder("threads", 3).workers == 3  # as asked
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert decoder("threads", None).workers == 15  # one pool for all partitions; one core drives the device
    assert decoder("device", None).workers == 4  # threads that only read: a few suffice, and each takes the GIL
    assert decoder("device", 8).workers == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert decoder("threads", None).workers == 2 and decoder("device", None).workers == 2


def test_a_partition_reaches_the_device_before_all_of_it_is_decoded(data, tmp_path, monkeypatch):
    """Decoding runs ahead of the device: the first batch must not wait for the partition's last image."""
    import threading

    from camshaft.data import workers
    from camshaft.data.sources import list_images
    from camshaft.engine.explainer import Explainer, build_explainer
    from camshaft.engine.job import ExplainJob

    job = ExplainJob(None, data, tmp_path / "out", method="cam", batch_size=2, workers=2, decode="threads")
    explainer = build_explainer(job, workdir=tmp_path / "artifacts")
    explainer.probe()
    records = list_images(data)[:6]
    batch_ran = threading.Event()
    decode, launch = workers.decode_resized, Explainer._launch

    def last_waits_for_a_batch(path, pre):
        if path == records[5].path and not batch_ran.wait(10):
            raise AssertionError("the device waited for the whole partition to be decoded")
        return decode(path, pre)

    def batch_then_signal(self, batch, **kwargs):
        out = launch(self, batch, **kwargs)
        batch_ran.set()
        return out

    monkeypatch.setattr(workers, "decode_resized", last_waits_for_a_batch)
    monkeypatch.setattr(Explainer, "_launch", batch_then_signal)
    out = explainer.explain(records, list(range(6)))
    assert [r["status"] for r in out.rows["cam"]] == ["ok"] * 6
    assert [r["path"] for r in out.rows["cam"]] == [r.path for r in records]  # in the records' order


def test_a_batch_is_collected_after_the_next_is_queued_and_outside_the_device_lock(data, tmp_path, monkeypatch):
    """On a GPU the device computes one batch while the host tabulates the one before: the order of
    calls is launch 1, launch 2, collect 1, ... and no collect holds the device."""
    from camshaft.data.sources import list_images
    from camshaft.engine.explainer import Explainer, build_explainer
    from camshaft.engine.job import ExplainJob

    explainer = build_explainer(ExplainJob(None, data, tmp_path / "out", method="cam", batch_size=2), workdir=tmp_path / "a")
    explainer.probe()
    calls = []
    launch, collect = Explainer._launch, Explainer._collect

    def launching(self, batch, **kwargs):
        calls.append(("launch", batch[0].index))
        return launch(self, batch, **kwargs)

    def collecting(self, launched):
        assert not self.lock.locked(), "results collected while holding the device"
        calls.append(("collect", launched.batch[0].index))
        return collect(self, launched)

    monkeypatch.setattr(Explainer, "_launch", launching)
    monkeypatch.setattr(Explainer, "_collect", collecting)
    out = explainer.explain(list_images(data)[:6], [10, 11, 12, 13, 14, 15])
    assert calls == [("launch", 10), ("launch", 12), ("collect", 10), ("launch", 14), ("collect", 12), ("collect", 14)]
    assert [r["index"] for r in out.rows["cam"]] == list(range(10, 16)) and not np.isnan(out.maps["cam"]).any()


def test_the_gpu_warm_up_runs_a_full_batch_and_leaves_out_of_memory_to_the_back_off(data, tmp_path, monkeypatch):
    """Before a GPU run's clock starts one full batch goes through every method (TorchScript: two);
    a batch too large for the device is no error there: the run's back-off halves it later."""
    from camshaft.engine import explainer as module
    from camshaft.engine.job import ExplainJob

    explainer = module.build_explainer(ExplainJob(None, data, tmp_path / "out", method=("cam", "gradcam"), batch_size=3),
                                       workdir=tmp_path / "artifacts")
    explainer.probe()  # on the CPU: no warm-up
    seen = []
    real = module.SharedBatch

    def recording(backend, x, *args, **kwargs):
        seen.append(len(x))
        return real(backend, x, *args, **kwargs)

    monkeypatch.setattr(module, "SharedBatch", recording)
    explainer._warm_up()
    assert seen == [3]  # one full batch, shared by both methods

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(module, "SharedBatch", out_of_memory)
    explainer._warm_up()  # no error


def test_a_run_says_where_its_time_went(data, tmp_path):
    from camshaft.engine.explainer import STAGES

    first = camshaft.explain(None, data, out=tmp_path / "run", method="gradcam", batch_size=4, partition_size=5,
                             progress=False)
    assert list(first.stages) == list(STAGES)
    assert first.stages["explaining"] > 0 and first.stages["writing"] > 0
    assert all(v >= 0 for v in first.stages.values())
    again = camshaft.explain(None, data, out=tmp_path / "run", method="gradcam", batch_size=4, partition_size=5,
                             progress=False)  # resumed: nothing was explained, no time in any stage
    assert again.explained == 0 and not any(again.stages.values())


# --- updates and reruns: what a nightly job and a notebook do ---------------------------------------------


def _copy_images(src, dst, names):
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy2(src / name, dst / name)


def _images(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.suffix in (".jpg", ".png"))


def test_two_updates_in_one_process_each_reuse_their_own_previous_run(data, tmp_path):
    """A process keeps the previous run's rows and maps while it updates; another update of the same
    folder must not reuse them (they were those of an earlier run)."""
    names = _images(data)
    work = tmp_path / "data"
    flat = {n: n.replace("/", "_") for n in names}
    for group in ([names[0], names[3]], [names[1]], [names[2]]):  # a, d -> add b -> add c
        for n in group:
            _copy_images(data / n.rsplit("/", 1)[0], work, [n.rsplit("/", 1)[1]])
            (work / n.rsplit("/", 1)[1]).rename(work / flat[n])
        summary = camshaft.explain(None, work, out=tmp_path / "run", progress=False)
        assert summary.explained == len(group)
    fresh = camshaft.explain(None, work, out=tmp_path / "fresh", progress=False)
    assert fresh.explained == 4
    assert_same_results(camshaft.load_results(tmp_path / "run"), camshaft.load_results(tmp_path / "fresh"))


def test_an_update_recomputes_an_image_whose_label_or_box_changed(tmp_path):
    manifest = write_demo_dataset(tmp_path / "data", n=4, seed=2)
    run = lambda out: camshaft.explain(None, manifest, out=out, targets="label", progress=False)  # noqa: E731
    run(tmp_path / "run")
    lines = manifest.read_text().splitlines()
    path, label, *box = lines[1].split(",")
    other = lines[2].split(",")[1]
    lines[1] = ",".join([path, other, "0", "0", "10", "10"])  # relabelled, another box
    lines.append(",".join([path, label, *box]))  # and listed once more with its old label
    manifest.write_text("\n".join(lines) + "\n")
    update = run(tmp_path / "run")
    assert (update.mode, update.explained) == ("update", 1)  # the copy with the old label and box is reused
    assert_same_results(camshaft.load_results(tmp_path / "run"), camshaft.load_results(run(tmp_path / "fresh").out))


def test_updates_reuse_images_with_several_methods(data, tmp_path):
    work = tmp_path / "data"
    names = _images(data)
    for n in names[:5]:
        _copy_images(data / n.rsplit("/", 1)[0], work, [n.rsplit("/", 1)[1]])
    camshaft.explain(None, work, out=tmp_path / "run", method=["cam", "gradcam"], progress=False)
    _copy_images(data / names[5].rsplit("/", 1)[0], work, [names[5].rsplit("/", 1)[1]])
    update = camshaft.explain(None, work, out=tmp_path / "run", method=["cam", "gradcam"], progress=False)
    assert (update.mode, update.explained, update.images) == ("update", 1, 6)


def test_overlays_asked_for_later_are_written_without_recomputing(data, tmp_path):
    camshaft.explain(None, data, out=tmp_path / "run", progress=False)
    again = camshaft.explain(None, data, out=tmp_path / "run", overlays=True, progress=False)
    assert (again.mode, again.explained) == ("update", 0)
    assert len(list((tmp_path / "run" / "overlays").glob("*.png"))) == 14


def test_another_set_of_methods_leaves_no_results_of_the_old_one(data, tmp_path):
    out = tmp_path / "run"
    camshaft.explain(None, data, out=out, method=["cam", "layercam"], progress=False)
    camshaft.explain(None, data, out=out, method="gradcam", overwrite=True, progress=False)
    assert not (out / "cam").exists() and not (out / "layercam").exists()
    camshaft.explain(None, data, out=out, method=["cam", "layercam"], progress=False)
    assert not (out / "results.parquet").exists() and not (out / "maps.zarr").exists()
    assert camshaft.load_results(out / "cam").table.shape[0] == 14


def test_an_output_folder_inside_the_data_is_not_read_as_data(data, tmp_path):
    import shutil

    work = tmp_path / "data"
    shutil.copytree(data, work)
    camshaft.explain(None, work, out=work / "run", overlays=True, progress=False)
    again = camshaft.explain(None, work, out=work / "run", overlays=True, progress=False)
    assert (again.mode, again.explained, again.images, again.failed) == ("resume", 0, 14, 0)


def test_a_parquet_manifest_with_integer_labels_and_a_gap_is_read(tmp_path):
    import pandas as pd

    from camshaft.engine.targets import class_index

    manifest = write_demo_dataset(tmp_path / "data", n=3, seed=1)
    frame = pd.read_csv(manifest)
    frame["label"] = [0, 1, None]  # pandas stores the column as double
    frame.to_parquet(manifest.with_suffix(".parquet"))
    summary = camshaft.explain(None, manifest.with_suffix(".parquet"), out=tmp_path / "run", targets="label", progress=False)
    assert (summary.ok, summary.failed) == (2, 1) and "no label" in summary.errors[0][1]
    assert class_index("3.0", class_names=None, num_classes=5) == 3  # the same column written as CSV
    assert class_index("3.5", class_names=None, num_classes=5) is None


def test_a_worker_keeps_one_explainer_per_model_content(tmp_path):
    from camshaft.engine.job import ExplainJob
    from camshaft.pipeline.tasks import TaskContext

    job = ExplainJob(None, tmp_path, tmp_path / "out")
    day1, day2 = (TaskContext(job, tmp_path / "out", ((1, 6, 6),), False, model) for model in ("aa", "bb"))
    assert day1.key != day2.key  # the same job and weights path, another checkpoint


def test_an_update_killed_while_moving_the_previous_results_aside_recovers(data, tmp_path, monkeypatch):
    import shutil

    from camshaft.pipeline import state as state_module

    work = tmp_path / "data"
    names = _images(data)
    for n in names[:5]:
        _copy_images(data / n.rsplit("/", 1)[0], work, [n.rsplit("/", 1)[1]])
    camshaft.explain(None, work, out=tmp_path / "run", progress=False)
    _copy_images(data / names[5].rsplit("/", 1)[0], work, [names[5].rsplit("/", 1)[1]])
    moves, move = [], shutil.move

    def dies_after_the_first(src, dst):
        if moves:
            raise SystemExit("killed")  # between the maps' move and the table's
        moves.append(src)
        return move(src, dst)

    monkeypatch.setattr(state_module.shutil, "move", dies_after_the_first)
    with pytest.raises(SystemExit):
        camshaft.explain(None, work, out=tmp_path / "run", progress=False)
    monkeypatch.undo()
    update = camshaft.explain(None, work, out=tmp_path / "run", progress=False)
    assert (update.mode, update.explained) == ("update", 1)
    fresh = camshaft.explain(None, work, out=tmp_path / "fresh", progress=False)
    assert_same_results(camshaft.load_results(tmp_path / "run"), camshaft.load_results(fresh.out))


def test_a_refused_job_leaves_an_existing_run_as_it_was(data, tmp_path):
    from camshaft.errors import CapabilityError

    out = tmp_path / "run"
    camshaft.explain(None, data, out=out, progress=False)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(CapabilityError):  # the run's export for onnxruntime happens before the method is refused
        camshaft.explain(None, data, out=out, method="guided_backprop", backend="onnxruntime", progress=False)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_an_update_drops_exemplars_computed_on_the_old_images(tmp_path):
    from camshaft.report import compute_exemplars, load_exemplars
    from camshaft.report.exemplars import ExemplarSpec

    data = write_demo_dataset(tmp_path / "data", n=5, seed=6).parent / "images"
    out = tmp_path / "run"
    camshaft.explain(None, data, out=out, progress=False)
    compute_exemplars(out, specs=[ExemplarSpec.parse("features:0")], k=2)
    assert load_exemplars(out) is not None
    image, _, _ = render_sample(np.random.default_rng(12), size=96)
    image.save(data / "circle" / "new.png")
    assert camshaft.explain(None, data, out=out, progress=False).mode == "update"
    assert load_exemplars(out) is None  # they ranked images of the old dataset: gone, not stale


def test_ctrl_c_says_how_to_resume_and_the_rerun_keeps_the_finished_partitions(data, reference, tmp_path):
    out = tmp_path / "run"
    args = ("explain", "demo", data, "--out", out, "--partition-size", "2", "--batch-size", "2", "--no-progress")
    proc = _cli(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "_camshaft" / "done").is_dir() or not any((out / "_camshaft" / "done").iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "no partition finished"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in stderr and "interrupted; run the same command again to resume" in stderr
    again = _cli(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    assert "resumed from earlier work" in stdout
    assert_same_results(camshaft.load_results(out), reference)


def test_a_file_name_that_is_not_utf8_is_explained_written_and_reused(tmp_path):
    from camshaft.data.sources import file_path

    data = write_demo_dataset(tmp_path / "data", n=3, seed=8).parent / "images"
    first = sorted(data.rglob("*.jpg"))[0]
    odd = os.fsdecode(os.fsencode(str(first.parent)) + b"/\xffodd.jpg")
    os.rename(first, odd)
    out = tmp_path / "run"
    summary = camshaft.explain(None, data, out=out, overlays=True, progress=False)
    assert (summary.ok, summary.failed) == (3, 0)
    table = camshaft.load_results(out).table
    texts = [p for p in table["path"] if "\\xff" in p]
    assert len(texts) == 1 and file_path(texts[0]) == odd
    assert len(list((out / "overlays").glob("*.png"))) == 3
    image, _, _ = render_sample(np.random.default_rng(13), size=96)
    image.save(data / "circle" / "new.png")
    update = camshaft.explain(None, data, out=out, overlays=True, progress=False)
    assert (update.mode, update.explained) == ("update", 1)  # the odd name is reused like any other


def test_a_full_disk_is_a_clear_error_and_the_rerun_goes_on(data, reference, tmp_path, monkeypatch, capsys):
    import errno

    from camshaft.cli import main
    from camshaft.pipeline import tasks

    real, calls = tasks.write_overlays, []

    def fill_up(folder, *args, **kwargs):
        calls.append(folder)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / "x.png.tmp"))
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(tasks, "write_overlays", fill_up)
    out = tmp_path / "run"
    args = ["explain", "demo", str(data), "--out", str(out), "--partition-size", "2", "--no-progress", "--overlays"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "No space left on device" in err and "run the same command again" in err
    assert [p for p in out.rglob("*") if p.name.endswith((".tmp", ".partial"))] == []
    assert main(args) == 0 and "resumed from earlier work" in capsys.readouterr().out
    assert_same_results(camshaft.load_results(out), reference)


def test_ctrl_c_stops_the_partitions_in_flight_at_their_next_batch(data, tmp_path, monkeypatch):
    import threading

    from camshaft.engine.explainer import Explainer
    from camshaft.errors import Interrupted
    from camshaft.pipeline import schedule

    launches, exits, lock, ended = [], [], threading.Lock(), threading.Condition()
    real_launch, real_partition = Explainer._launch, schedule.run_partition

    def launch(self, *args, **kwargs):
        with lock:
            launches.append(1)
            if len(launches) == 3:  # both partitions are mid-way: Ctrl-C
                os.kill(os.getpid(), signal.SIGINT)
        return real_launch(self, *args, **kwargs)

    def partition(*args):
        try:
            result = real_partition(*args)
        except BaseException as e:
            exits.append(type(e))
            raise
        else:
            exits.append(None)  # ran to its end
            return result
        finally:
            with ended:
                ended.notify_all()

    monkeypatch.setattr(Explainer, "_launch", launch)
    monkeypatch.setattr(schedule, "run_partition", partition)
    with pytest.raises(KeyboardInterrupt):
        camshaft.explain(None, data, out=tmp_path / "run", scheduler="threads", partition_size=7, batch_size=1,
                         progress=False)
    with ended:
        assert ended.wait_for(lambda: len(exits) == 2, timeout=120)
    assert exits == [Interrupted, Interrupted] and len(launches) <= 3 + 2  # 14 launches when they ran to the end
    done = tmp_path / "run" / "_camshaft" / "done"
    assert not done.exists() or not any(done.iterdir())  # neither partition marked done
