"""Layer feature maps: the arrays are the tap's channels; selection; the CLI writes the views."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import camshaft
from camshaft.cli import main
from conftest import run_cli
from camshaft.demo.model import load_demo_model
from camshaft.demo.shapes import render_sample
from camshaft.errors import ConfigError
from camshaft.preprocess import normalize, prepare
from camshaft.models.sources import resolve_model


@pytest.fixture
def image(tmp_path):
    img, _, _ = render_sample(np.random.default_rng(0), size=120)
    path = tmp_path / "shape.png"
    img.save(path)
    return path


def test_feature_maps_are_the_tap_activations(image):
    fm = camshaft.feature_maps(None, image, tap="features", channels=[0, 5, 79])
    pre = resolve_model("demo").preprocess
    x, _ = prepare(Image.open(image).convert("RGB"), pre)
    with torch.no_grad():
        a = load_demo_model().features(normalize(x[None], pre))[0]
    np.testing.assert_allclose(fm.maps, a[[0, 5, 79]].numpy(), rtol=1e-5, atol=1e-6)
    assert [o.size for o in fm.overlays()] == [(120, 120)] * 3


def test_top_channels_have_the_highest_means(image):
    fm = camshaft.feature_maps(None, image, top=4)
    everything = camshaft.feature_maps(None, image, channels=list(range(80)))
    means = everything.maps.reshape(80, -1).mean(1)
    assert sorted(fm.channels) == sorted(np.argsort(-means)[:4].tolist())


def test_bad_channel_selection_is_explained(image):
    with pytest.raises(ConfigError, match=r"out of range: this tap has channels 0\.\.79"):
        camshaft.feature_maps(None, image, channels=[80])
    with pytest.raises(ConfigError, match="not both"):
        camshaft.feature_maps(None, image, channels=[1], top=2)


def test_the_grid_keeps_the_input_aspect(image):
    square = camshaft.feature_maps(None, image, channels=[0])
    wide = camshaft.feature_maps(None, image, channels=[0], preprocess={"input_size": (96, 176), "resize": "stretch"})
    assert wide.maps.shape[1:] == (12, 22)
    a, b = square.grid(tile=100, columns=1), wide.grid(tile=100, columns=1)
    assert a.width == b.width and a.height - b.height == 100 - round(100 * 96 / 176)


def test_cli_writes_grid_overlays_and_arrays(image, tmp_path, monkeypatch, capsys):
    out = tmp_path / "fm"
    assert main(["featmaps", "demo", str(image), "--channels", "1,2,3", "--out", str(out)]) == 0
    assert (out / "grid.png").is_file() and np.load(out / "featmaps.npy").shape == (3, 12, 12)
    assert sorted(p.name for p in out.glob("overlay_channel_*.png")) == [f"overlay_channel_{c:04d}.png" for c in (1, 2, 3)]
    with pytest.raises(SystemExit):
        main(["featmaps", "demo", str(image), "--channels", "1", "--top", "2", "--out", str(out)])


@pytest.mark.parametrize("where", ["file", "below_a_file"])
def test_cli_refuses_an_out_that_is_a_file_or_unwritable(image, tmp_path, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("mine")
    out = blocker if where == "file" else blocker / "fm"
    code, _, err = run_cli(capsys, "featmaps", "demo", image, "--channels", "1", "--out", out)
    assert code == 2 and ("is not a folder" if where == "file" else "cannot write there") in err, err
    assert "Traceback" not in err and blocker.read_text() == "mine"


def test_cli_names_the_image_it_cannot_read(tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    code, _, err = run_cli(capsys, "featmaps", "demo", bad, "--out", tmp_path / "fm")
    assert code == 2 and str(bad) in err and "not an image" in err, err
    assert not (tmp_path / "fm").exists()


def test_cli_rerun_into_the_same_out_leaves_only_this_runs_files(image, tmp_path, capsys):
    out = tmp_path / "fm"
    assert run_cli(capsys, "featmaps", "demo", image, "--channels", "1,2,3", "--out", out)[0] == 0
    assert run_cli(capsys, "featmaps", "demo", image, "--channels", "5", "--out", out)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["featmaps.npy", "grid.png", "overlay_channel_0005.png"]
    assert np.load(out / "featmaps.npy").shape == (1, 12, 12)


def test_cli_interrupted_while_writing_leaves_no_partial_file(image, tmp_path, capsys, monkeypatch):
    def half_then_ctrl_c(file, arr, *a, **k):
        (open(file, "wb") if isinstance(file, (str, type(tmp_path))) else file).write(b"\x93NUMPY")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", half_then_ctrl_c)
    out = tmp_path / "fm"
    assert run_cli(capsys, "featmaps", "demo", image, "--channels", "1", "--out", out)[0] == 130
    assert not (out / "featmaps.npy").exists() and not [p for p in out.iterdir() if p.name.startswith(".")]


def test_a_file_backend_exports_the_torch_model_and_agrees_with_eager(image):
    eager = camshaft.feature_maps(None, image, channels=[0, 5])
    scripted = camshaft.feature_maps(None, image, channels=[0, 5], backend="torchscript")
    np.testing.assert_allclose(scripted.maps, eager.maps, rtol=1e-4, atol=1e-5)
