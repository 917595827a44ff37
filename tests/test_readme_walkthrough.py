"""What a new user meets following README.md: its examples work as written, mistakes get one line."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from camshaft.cli import build_parser
from camshaft.commands.common import print_summary
from camshaft.engine.jobfile import load_job
from camshaft.pipeline.run import RunSummary
from camshaft.writers import maps_store

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(autouse=True)
def _no_reexec(monkeypatch):
    monkeypatch.setenv("CAMSHAFT_NO_REEXEC", "1")  # main() would otherwise execve over pytest


@pytest.mark.parametrize(
    "argv, message, command",
    [
        (["explain", "demo", "imgs/", "--out", "o/", "--method", "gradcm"], "unknown method gradcm", "explain"),
        (["explain", "demo", "imgs/", "--out", "o/", "--bogus"], "unrecognized arguments: --bogus", "explain"),
        (["demo", "--imgs", "3"], "unrecognized arguments: --imgs 3", "demo"),
        (["explian"], "invalid choice: 'explian'", None),
    ],
)
def test_a_mistyped_command_line_is_one_line_pointing_to_the_right_help(capsys, argv, message, command):
    code, out, err = run_cli(capsys, *argv)
    prog = f"camshaft {command}" if command else "camshaft"
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "usage:" not in err, err  # not 30 lines of usage above the error
    assert err.startswith(f"{prog}: error: ") and message in err and err.rstrip().endswith(f"(see {prog} --help)")


def _help(command: str) -> str:
    return build_parser([command]).commands[command].format_help()


def test_help_texts_name_what_the_readme_says():
    explain = _help("explain")
    assert "OPTION_" not in explain and "--samples SAMPLES" in explain  # the method options' metavars
    assert "CSV or Parquet manifest" in explain and ".pt2" in explain
    assert re.search(r"--backend \{[^}]*\}\s+runtime", explain) and re.search(r"--batch-size BATCH_SIZE\s+images", explain)
    assert "TorchScript, .pt2 or ONNX" in build_parser(["export"]).format_help()
    assert "artifact format" in _help("export")
    assert "seed of the generated images" in _help("demo")


def test_a_run_of_several_methods_prints_where_each_one_is(capsys, tmp_path):
    dirs = [tmp_path / "cam", tmp_path / "gradcam"]
    (dirs[1] / "overlays").mkdir(parents=True)
    summary = RunSummary(out=tmp_path, images=1, ok=1, failed=0, seconds=1.0, method="cam+gradcam", tap="layer4",
                         backend="eager", explained=1, result_dirs=dirs)
    print_summary(summary)
    out = capsys.readouterr().out
    assert "1 image, 1 ok" in out
    assert f"cam: {dirs[0]} (maps.zarr, results.parquet)\n" in out
    assert f"gradcam: {dirs[1]} (maps.zarr, results.parquet, overlays)\n" in out


def test_a_failed_file_is_one_line_of_the_summary_whatever_its_name(capsys, tmp_path):
    errors = [("/data/two\nlines.png", "empty file (0 bytes)"), ("/data/café.png", "file not found")]
    summary = RunSummary(out=tmp_path, images=2, ok=0, failed=2, seconds=1.0, method="gradcam", tap="layer4",
                         backend="eager", explained=2, errors=errors, result_dirs=[tmp_path])
    print_summary(summary)
    failed = [line for line in capsys.readouterr().out.splitlines() if "failed:" in line]
    assert failed == ["  failed: '/data/two\\nlines.png': empty file (0 bytes)", "  failed: /data/café.png: file not found"]


def test_the_readme_job_file_is_a_valid_job(tmp_path):
    toml = re.search(r"```toml\n(.*?)```", README.read_text(), re.S).group(1)
    job_file = tmp_path / "nightly.toml"
    job_file.write_text("\n".join(line.strip() for line in toml.splitlines()))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "today.pth").write_bytes(b"")
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "manifest.csv").write_text("path\n")
    job = load_job(job_file)  # the example refused its own [options] before (samples with gradcam, layercam)
    assert job.options == {"samples": 8} and len(job.method) == 2


def test_the_maps_store_reads_as_the_readme_shows(tmp_path):
    path = tmp_path / "maps.zarr"
    maps_store.create_store(path, n_images=2, map_shape=(1, 3, 4), chunk=2, attrs={"method": "cam"})
    maps_store.write_rows(path, 0, np.ones((2, 1, 3, 4), np.float32), np.zeros((2, 1), np.int32))
    da = pytest.importorskip("dask.array")
    assert da.from_zarr(str(path), component="maps").shape == (2, 1, 3, 4)
    xr = pytest.importorskip("xarray")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning about consolidated metadata
        ds = xr.open_zarr(str(path), consolidated=False)
    assert ds["maps"].dims == ("image", "k", "y", "x") and ds.attrs["method"] == "cam"
