"""ONNX files that take channels-last images (N, H, W, 3), as Keras models exported by tf2onnx do.

camshaft feeds (N, 3, H, W) batches. Such a file failed with ONNX Runtime's "Got invalid dimensions for input"
(after its input size was read as (W, 3)). Now a Transpose is put before its input, its size is (H, W), a
mean over axes 1, 2 of a channels-last map is its CAM head, and its maps are those of the same network
taking channels-first images. Other inputs (grey-scale, not 4-D) are refused with their shape.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import camshaft
from camshaft.cli import main
from camshaft.errors import ConfigError

pytest.importorskip("onnxruntime")
SIZE = (16, 24)  # not square: height and width cannot be swapped unnoticed
PLAIN = {"mean": 0.0, "std": 1.0, "resize": "stretch"}


class Net(nn.Module):
    """A convolution, then pointwise layers on (N, h, w, C) maps averaged over axes 1, 2 (Keras's layout)."""

    def __init__(self, channels_last_input: bool):
        super().__init__()
        self.channels_last_input = channels_last_input
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.mix = nn.Linear(6, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = x.permute(0, 3, 1, 2) if self.channels_last_input else x
        a = torch.relu(self.mix(torch.relu(self.conv(x)).permute(0, 2, 3, 1)))  # (N, 8, 12, 8)
        return self.fc(a.mean((1, 2)))


def channels_first() -> nn.Module:
    torch.manual_seed(0)
    return Net(False).eval()


def keras_like() -> nn.Module:
    torch.manual_seed(0)
    return Net(True).eval()


def _onnx(model: nn.Module, path, example_shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(*example_shape),), str(path), dynamo=False, input_names=["input_1"],
                          dynamic_axes={"input_1": {0: "n"}})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (30 + 7 * i, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return {"nhwc": _onnx(keras_like(), folder / "nhwc.onnx", (1, *SIZE, 3)), "images": folder}


def test_the_file_is_fed_transposed_and_its_cam_head_is_the_mean_over_axes_1_2(files):
    from camshaft.models.onnx_graph import open_foreign

    graph = open_foreign(files["nhwc"], None)
    assert graph.channels_last_input and graph.input_size == SIZE
    assert graph.tap_shapes[graph.taps[0]] == (8, 12, 8)  # (h, w, C)
    assert graph.cam_tap == graph.taps[0]
    np.testing.assert_array_equal(graph.cam_weight, keras_like().fc.weight.detach())
    assert tuple(d.dim_value or d.dim_param for d in graph.model.graph.input[0].type.tensor_type.shape.dim) == (
        "n", 3, *SIZE)


@pytest.mark.parametrize("method", ["cam", "occlusion", "scorecam"])
def test_its_maps_are_those_of_the_same_network_taking_channels_first_images(files, tmp_path, method):
    options = {"window": 8, "stride": 4} if method == "occlusion" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        camshaft.explain(files["nhwc"], files["images"], out=tmp_path / "onnx", method=method, options=options,
                         progress=False, **PLAIN)
        camshaft.explain(f"{__name__}:channels_first", files["images"], out=tmp_path / "torch", method=method,
                         tap="relu_1", options=options, input_size=SIZE, progress=False, **PLAIN)
    got, want = camshaft.load_results(tmp_path / "onnx"), camshaft.load_results(tmp_path / "torch")
    assert (got.table["status"] == "ok").all() and len(got.table) == 3
    assert list(got.table["targets"].map(list)) == list(want.table["targets"].map(list))
    a, b = np.asarray(got.maps[:]), np.asarray(want.maps[:])
    assert a.shape == b.shape and np.abs(b).max() > 0
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())  # occlusion: differences of logits


def test_an_artifact_exported_from_it_takes_channels_first_batches(files, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = camshaft.export(files["nhwc"], format="onnx", out=tmp_path / "art.onnx", mean=0.0, std=1.0)
        camshaft.explain(out, files["images"], out=tmp_path / "run", method="cam", resize="stretch", progress=False)
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "parity (max abs error): logits" in printed and "8x12x8" in printed
    assert (camshaft.load_results(tmp_path / "run").table["status"] == "ok").all()
    assert main(["inspect", str(files["nhwc"])]) == 0
    assert "input: channels last (N, H, W, 3)" in capsys.readouterr().out


class Grey(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_a_grey_scale_file_is_refused_with_its_shape_before_any_work(files, tmp_path, capsys):
    path = _onnx(Grey().eval(), tmp_path / "grey.onnx", (1, 1, *SIZE))
    from camshaft.models.onnx_graph import open_foreign

    with pytest.raises(ConfigError, match=r"has shape nx1x16x24, neither \(N, 3, H, W\) nor \(N, H, W, 3\)"):
        open_foreign(path, None)
    code = main(["explain", str(path), str(files["images"]), "--out", str(tmp_path / "run"), "--method", "occlusion",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "neither (N, 3, H, W) nor (N, H, W, 3)" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_pt2_file_taking_channels_last_images_is_refused_with_what_to_do(files, tmp_path, capsys):
    batch = torch.export.Dim("batch", min=2)
    program = torch.export.export(keras_like(), (torch.randn(2, *SIZE, 3),), dynamic_shapes=({0: batch},))
    path = tmp_path / "nhwc.pt2"
    torch.export.save(program, str(path))
    code = main(["explain", str(path), str(files["images"]), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "takes channels-last images (N, 16, 24, 3)" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
