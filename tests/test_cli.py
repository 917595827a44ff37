"""The ``camshaft`` command as a new user meets it: help, demo, bad flags, inspect, export, explain.

Most commands run in-process through ``camshaft.cli.main`` (CAMSHAFT_NO_REEXEC keeps it from
re-executing the test process); a few go through ``python -m camshaft`` to cover the real entry.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli as _main

import camshaft
from camshaft.cli import main
from camshaft.demo.shapes import render_sample
from camshaft.engine.backends import backend_names
from camshaft.engine.methods import method_names

NO_REEXEC = {**os.environ, "CAMSHAFT_NO_REEXEC": "1"}


@pytest.fixture(scope="module", autouse=True)
def _no_reexec():
    """main() would otherwise execve over pytest; module scope sets it before the module fixtures."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAMSHAFT_NO_REEXEC", "1")
        yield


def _cli(*argv, env=NO_REEXEC, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "camshaft", *map(str, argv)], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Three small demo images (96 px) in a folder."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(3):
        render_sample(rng, label=i)[0].save(folder / f"{i}.png")
    return folder


# --- help -----------------------------------------------------------------------------------------


def test_top_level_help():
    run = _cli("--help")
    assert run.returncode == 0, run.stderr
    for word in ("demo", "explain", "export", "inspect", "--version"):
        assert word in run.stdout


def test_version_through_the_allocator_reexec():
    env = {k: v for k, v in os.environ.items() if k not in ("CAMSHAFT_NO_REEXEC", "GLIBC_TUNABLES")}
    run = _cli("--version", env=env)  # the default path: the CLI re-executes itself once
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"camshaft {camshaft.__version__}"


def test_main_called_in_process_returns_to_the_caller():
    env = {k: v for k, v in os.environ.items() if k not in ("CAMSHAFT_NO_REEXEC", "GLIBC_TUNABLES")}
    code = "from camshaft.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n    pass\nprint('caller continues')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "caller continues" in run.stdout


SUBCOMMAND_FLAGS = {
    "demo": ["--out", "--images", "--method", "--seed"],
    "explain": ["model", "data", "--out", "--method", "--targets", "--tap", "--backend", "--device", "--dtype",
                "--batch-size", "--workers", "--overlays", "--no-progress", "--input-size", "--mean", "--std", "--resize"],
    "export": ["model", "--format", "torchscript", "onnx", "--tap", "--out", "--rtol", "--input-size"],
    "inspect": ["model", "--weights", "--input-size", "demo model"],
}


@pytest.mark.parametrize("command", list(SUBCOMMAND_FLAGS))
def test_subcommand_help(capsys, command):
    code, out, _ = _main(capsys, command, "--help")
    assert code == 0
    text = " ".join(out.split())  # argparse wraps lines
    missing = [flag for flag in SUBCOMMAND_FLAGS[command] if flag not in text]
    assert not missing, f"{command} --help does not mention {missing}"
    if command == "explain":  # the choices come from the registries
        assert all(name in text for name in [*method_names(), *backend_names()])


# --- demo -----------------------------------------------------------------------------------------


def test_demo(tmp_path):
    out = tmp_path / "demo"
    run = _cli("demo", "--out", out, "--images", 6)
    assert run.returncode == 0, run.stderr
    results = out / "results"
    for line in (f"maps:     {results / 'maps.zarr'}", f"table:    {results / 'results.parquet'}", f"overlays: {results / 'overlays'}"):
        assert line in run.stdout
    assert "6 images, 6 ok, 0 failed; 6 explained" in run.stdout
    table = camshaft.load_results(results).table
    assert len(table) == 6 and (table["status"] == "ok").all()
    assert len(list((results / "overlays").glob("*.png"))) == 6


# --- explain: bad flags fail fast -----------------------------------------------------------------

# (extra argv for `explain demo IMAGES --out OUT`, stderr regex, does --out wrongly get created?)
BAD_FLAGS = [
    (["--batch-size", "0"], r"argument --batch-size: expected a positive integer, received '0'", False),
    (["--method", "nope"], r"argument --method: unknown method nope \(choose from .*gradcam", False),
    (["--targets", "top:0"], r"--targets 'top:0': K must be a positive integer", True),
    (["--targets", "top:9"], r"--targets 'top:9': the model has only 5 classes", True),
    (["--targets", "hexagon"], r"unknown classes \['hexagon'\]; use 0\.\.4 or names such as circle", True),
    (["--input-size", "a,b"], r"argument --input-size: expected H or H,W \(positive integers\), received 'a,b'", False),
    (["--backend", "nope"], r"argument --backend: invalid choice: 'nope' \(choose from .*'onnxruntime'", False),
    (["--device", "tpu"], r"invalid device 'tpu': use cpu, cuda or cuda:N", False),
    (["--mean", "1,2"], r"argument --mean: expected one number or R,G,B, received '1,2'", False),
    (["--std", "0"], r"std must be positive", True),
    (["--workers", "0"], r"argument --workers: expected a positive integer", False),
    (["--cuda-graphs", "--device", "cpu"], r"CUDA graphs need a CUDA device; this run is on cpu", False),
    (["--cuda-graphs", "--backend", "onnxruntime"], r"CUDA graphs run on the eager, torchscript and pt2", False),
    (["--cuda-graphs", "--backend", "inductor"], r"CUDA graphs run on .*\(not inductor or onnxruntime\)", False),
    ([], r"data not found: .*no_such_folder", False),  # the data path does not exist
]
IDS = [" ".join(argv) or "missing-data" for argv, _, _ in BAD_FLAGS]


def _bad_explain(capsys, tmp_path, images, argv):
    out = tmp_path / "out"
    data = images if argv else tmp_path / "no_such_folder"
    return out, _main(capsys, "explain", "demo", data, "--out", out, "--no-progress", *argv)


@pytest.mark.parametrize("argv, message, _", BAD_FLAGS, ids=IDS)
def test_explain_bad_flag_exits_2_with_a_clear_message(capsys, tmp_path, images, argv, message, _):
    _, (code, out, err) = _bad_explain(capsys, tmp_path, images, argv)
    assert code == 2
    assert re.search(message, err), err
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize(
    "argv", [argv for argv, _, _ in BAD_FLAGS], ids=IDS
)
def test_explain_bad_flag_writes_nothing(capsys, tmp_path, images, argv):
    out, (code, _, _) = _bad_explain(capsys, tmp_path, images, argv)
    assert code == 2
    assert not out.exists()


def test_explain_targets_label_without_labels_is_rejected(capsys, tmp_path, images):
    code, _, err = _main(capsys, "explain", "demo", images, "--out", tmp_path / "out", "--targets", "label", "--no-progress")
    assert code == 2 and "label" in err


# --- inspect, export, explain an artifact ---------------------------------------------------------


def test_inspect_demo(capsys):
    code, out, _ = _main(capsys, "inspect")  # no model: the demo model
    assert code == 0
    assert re.search(r"^features\.23 +ReLU +80x12x12 +<- default tap \(features\)$", out, re.M), out
    assert re.search(r"^fc +Linear +5 +<- CAM head$", out, re.M), out
    assert "default tap: features" in out and "classes: 5 (circle, square, triangle, cross, ring)\n" in out
    assert "CAM head: global average pool of features -> fc (5, 80)" in out


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime")
    path = tmp_path_factory.mktemp("artifact") / "x.onnx"
    with contextlib.redirect_stdout(io.StringIO()) as out:  # module scope: no capsys
        assert main(["export", "demo", "--format", "onnx", "--out", str(path)]) == 0
    assert f"wrote {path}" in out.getvalue()
    return path


def test_an_onnx_artifact_needs_its_suffix_and_nothing_is_written(capsys, tmp_path):
    code, _, err = _main(capsys, "export", "demo", "--format", "onnx", "--out", tmp_path / "model.bin")
    assert code == 2 and "must end in .onnx" in err
    assert not any(tmp_path.iterdir())


def test_inspect_onnx_artifact(capsys, onnx_file):
    code, out, _ = _main(capsys, "inspect", onnx_file)
    assert code == 0
    assert "camshaft onnx artifact of demo" in out
    assert "tap features: 80x12x12" in out
    assert "gradients (split head): yes" in out
    parity = dict(re.findall(r"(\w+) ([\d.e+-]+)", out.split("parity (max abs error):")[1].splitlines()[0]))
    assert set(parity) == {"logits", "features"}
    assert all(float(v) < 1e-3 for v in parity.values()), parity


def test_explain_onnx_gradcam_matches_eager(capsys, tmp_path, onnx_file, images):
    argv = ["--method", "gradcam", "--no-progress"]
    code, out, err = _main(capsys, "explain", onnx_file, images, "--backend", "onnxruntime", "--out", tmp_path / "onnx", *argv)
    assert code == 0, err
    assert "gradcam on onnxruntime, tap features: 3 images, 3 ok, 0 failed" in out
    code, _, err = _main(capsys, "explain", "demo", images, "--out", tmp_path / "eager", *argv)
    assert code == 0, err
    onnx, eager = camshaft.load_results(tmp_path / "onnx"), camshaft.load_results(tmp_path / "eager")
    assert (onnx.table["status"] == "ok").all()
    np.testing.assert_array_equal(onnx.targets, eager.targets)
    np.testing.assert_allclose(onnx.maps[:], eager.maps[:], rtol=1e-3, atol=1e-4)


def test_an_exported_file_runs_on_its_formats_backend_by_default(capsys, tmp_path, onnx_file, images):
    out = tmp_path / "auto"
    code, text, err = _main(capsys, "explain", onnx_file, images, "--out", out, "--method", "cam", "--no-progress")
    assert code == 0, err
    assert "cam on onnxruntime, tap features: 3 images, 3 ok, 0 failed" in text
    assert camshaft.load_results(out).attrs["backend"] == "onnxruntime"  # the backend that ran, not "auto"
    before = (out / "maps.zarr").stat().st_mtime_ns, sorted(p.name for p in out.rglob("*"))
    code, text, err = _main(capsys, "explain", onnx_file, images, "--out", out, "--method", "cam", "--no-progress",
                            "--backend", "onnxruntime")  # the same job named in full: finished, nothing redone
    assert code == 0, err
    assert "0 explained" in text and "resumed from earlier work" in text, text
    assert ((out / "maps.zarr").stat().st_mtime_ns, sorted(p.name for p in out.rglob("*"))) == before


def test_featmaps_of_an_exported_file_runs_on_its_formats_backend_by_default(capsys, tmp_path, onnx_file, images):
    code, _, err = _main(capsys, "featmaps", onnx_file, images / "0.png", "--top", "4", "--out", tmp_path / "f")
    assert code == 0, err
    eager = camshaft.feature_maps(None, images / "0.png", top=4)
    np.testing.assert_allclose(np.load(tmp_path / "f" / "featmaps.npy"), eager.maps, rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def cam_without_head(tmp_path_factory, images):
    """``explain vgg11 --method cam`` (random weights, 64 px): (code, stderr, warnings, out folder)."""
    pytest.importorskip("torchvision")
    out = tmp_path_factory.mktemp("vgg") / "out"
    argv = ["explain", "vgg11", str(images), "--input-size", "64", "--method", "cam", "--out", str(out), "--no-progress"]
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(io.StringIO()) as err:
        warnings.simplefilter("always")
        code = main(argv)
    return code, err.getvalue(), [str(w.message) for w in caught], out


def test_cam_without_cam_head_names_gradcam(cam_without_head):
    code, err, caught, _ = cam_without_head
    assert code == 2
    assert "CAM needs a global-average-pool + linear head" in err
    assert "there is none after 'features' in 'vgg11'" in err
    assert "Use --method gradcam instead" in err
    assert any("vgg11: no weights given (--weights, or weights= in Python), using random weights" in w for w in caught)


def test_cam_without_cam_head_writes_nothing(cam_without_head):
    *_, out = cam_without_head
    assert not out.exists()


def test_top_level_help_lists_every_command_without_importing_torch():
    code = (
        "import sys\n"
        "from camshaft.cli import build_parser\n"
        "help_ = build_parser(['--help']).format_help()\n"
        "print('torch' in sys.modules, help_)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=NO_REEXEC, timeout=300)
    assert run.returncode == 0, run.stderr
    imported, text = run.stdout.split(" ", 1)
    assert imported == "False"  # the command's own arguments (and torch) load only for that command
    for name in ("demo", "explain", "export", "inspect", "featmaps", "run", "report", "bench", "actmax"):
        assert name in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["export", "demo", "--rtol", "-1", "--format", "onnx", "--out", "{tmp}/m.onnx"], "--rtol: expected a positive number"),
        (["featmaps", "demo", "{image}", "--channels", ",", "--out", "{tmp}/fm"], "--channels: expected channel indices"),
        (["inspect", "demo", "--input-size", "1"], "the model cannot run on a 1x1 input"),
    ],
)
def test_other_commands_refuse_bad_values_before_writing(capsys, tmp_path, images, argv, message):
    argv = [a.format(tmp=tmp_path, image=images / "0.png") for a in argv]
    code, _, err = _main(capsys, *argv)
    assert code == 2 and message in err
    assert list(tmp_path.iterdir()) == []
