"""The decode pool: worker processes give what threads give, in order, and fail with a clear reason."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

import camshaft
from camshaft.data import workers
from camshaft.data.workers import Decoder, decode_resized
from camshaft.errors import CamshaftError, ConfigError
from camshaft.preprocess import Preprocess

PRE = Preprocess((24, 32), resize="center-crop")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Images of several sizes and modes, and files that are not images, in one list."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h, mode) in enumerate([(40, 30, "RGB"), (17, 50, "L"), (64, 64, "RGBA"), (33, 21, "P"), (90, 60, "RGB")] * 3):
        path = folder / f"{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode).save(path)
        paths.append(str(path))
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    paths.insert(4, str(folder / "corrupt.jpg"))
    paths.insert(9, str(folder / "missing.png"))
    return paths


def test_worker_processes_decode_exactly_what_threads_decode_in_order(files):
    processes = list(Decoder("processes", 2).map(files, PRE))
    threads = list(Decoder("threads", 2).map(files, PRE))
    assert [r.error for r in processes] == [r.error for r in threads]
    assert processes[4].error.startswith("truncated or corrupt image data") and processes[9].error == "file not found"
    for p, t, path in zip(processes, threads, files, strict=True):
        if p.error is None:
            assert p.pixels.shape == (24, 32, 3) and p.pixels.dtype == np.uint8 and p.pixels.flags.writeable
            np.testing.assert_array_equal(p.pixels, t.pixels)
            np.testing.assert_array_equal(p.pixels, decode_resized(path, PRE).pixels)  # and what one call gives
            assert p.geometry == t.geometry


def _torch_imported() -> bool:
    return "torch" in sys.modules


def test_worker_processes_stay_small_they_never_import_torch(files):
    list(Decoder("processes", 2).map(files[:3], PRE))  # the pool is up and has decoded
    pool = workers._pool("processes", 2)
    assert [pool.submit(_torch_imported).result() for _ in range(4)] == [False] * 4
    assert _torch_imported()  # (here it is)


def test_auto_decodes_in_processes_for_a_gpu_and_threads_for_a_cpu_and_daemons_use_threads(monkeypatch):
    assert Decoder("auto", 2, device="cuda:0").kind == "processes"
    assert Decoder("auto", 2, device="cpu").kind == "threads"
    assert Decoder("threads", 2, device="cuda").kind == "threads"

    class Daemon:
        daemon = True

    monkeypatch.setattr(multiprocessing, "current_process", lambda: Daemon())
    assert Decoder("processes", 2).kind == "threads"  # a dask.distributed worker may not start children
    assert Decoder("device", 2, device="cuda:0").kind == "device"  # threads only read there
    with pytest.raises(CamshaftError, match=r"unknown decoder 'gpu' \(choose from auto, processes, threads, device\)"):
        Decoder("gpu", 2)
    with pytest.raises(ConfigError, match=r"unknown decode 'gpu'"):
        camshaft.explain(None, ".", out="never-written", decode="gpu")
    assert not os.path.exists("never-written")


def test_a_killed_worker_fails_the_run_with_a_reason_and_the_next_run_gets_a_fresh_pool(files):
    d = Decoder("processes", 3)
    d.start()
    pool = workers._pool("processes", 3)
    os.kill(pool.submit(workers._ready).result(), signal.SIGKILL)
    with pytest.raises(CamshaftError, match=r"a decode worker process died .* rerun the same command to resume"):
        list(d.map(files * 4, PRE))
    assert workers._pool("processes", 3) is not pool
    assert [r.error for r in Decoder("processes", 3).map(files, PRE)] == [r.error for r in Decoder("threads", 1).map(files, PRE)]


def test_a_pipeline_decoding_in_processes_matches_one_decoding_in_threads(tmp_path):
    from camshaft.demo.shapes import write_demo_dataset

    data = write_demo_dataset(tmp_path / "data", n=10, seed=5).parent / "images"
    (data / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")  # an error row among the partitions
    runs = {}
    for kind in ("processes", "threads"):
        summary = camshaft.explain(None, data, out=tmp_path / kind, decode=kind, workers=2, batch_size=3, partition_size=4,
                                   method="cam", progress=False)
        runs[kind] = camshaft.load_results(summary.out)
        assert (summary.ok, summary.failed) == (10, 1) and summary.decoding == f"2 {kind}"
        assert summary.errors[0][1].startswith("truncated or corrupt image data")
    np.testing.assert_array_equal(runs["processes"].maps[:], runs["threads"].maps[:])
    assert runs["processes"].table.drop(columns="mtime_ns").equals(runs["threads"].table.drop(columns="mtime_ns"))


def test_the_cli_decodes_in_processes(tmp_path):
    """The flag reaches the run, and worker processes under the CLI start (and run no CLI of their own)."""
    from camshaft.demo.shapes import write_demo_dataset

    data = write_demo_dataset(tmp_path / "data", n=6, seed=1).parent / "images"
    done = subprocess.run(
        [sys.executable, "-m", "camshaft", "explain", "demo", str(data), "--out", str(tmp_path / "run"), "--method", "cam",
         "--device", "cpu", "--decode", "processes", "--workers", "2", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "6 images, 6 ok, 0 failed" in done.stdout
    assert done.stdout.count("images, ") == 1 and "usage" not in done.stderr
    assert "time in stages (decoding in 2 processes): waiting for decode" in done.stdout


def test_a_script_without_a_main_guard_is_told_how_to_fix_it(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent("""
        from camshaft.data.workers import Decoder
        Decoder("processes", 2).start()
    """))
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(camshaft.__file__))}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode != 0
    assert 'CamshaftError: the decode worker processes could not start' in done.stderr
    assert 'if __name__ == "__main__":' in done.stderr



@pytest.mark.slow  # 12 s: a script's smoke run
def test_the_gil_contention_script_runs(tmp_path):
    """The measurement behind ``--decode auto`` stays runnable (what it prints is not asserted: no timing in tests)."""
    script = os.path.join(os.path.dirname(os.path.dirname(camshaft.__file__)), "scripts", "gil_contention.py")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(camshaft.__file__))}
    done = subprocess.run([sys.executable, script, "--workers", "1", "--seconds", "0.1"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("alone: ") and [line.split(":")[0].split() for line in lines[1:]] == [
        ["1", "decode", "threads"], ["1", "decode", "processes"], ["1", "decode", "device"]]
    assert all("ops lost per image" in line for line in lines[1:])
