"""An ONNX file from elsewhere without a CAM head still has a default tap (the last map larger than 1x1), so a
method that needs no tap, or any map method, runs on it without --tap. Was: every method was refused with
"no CAM head found to pick a default tap", occlusion and Score-CAM too."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import camshaft
from camshaft.cli import main

pytest.importorskip("onnxruntime")
SIZE = 16


class Pooled(nn.Module):
    """VGG's shape: features, an adaptive average pool to 2x2 (an AveragePool in ONNX), flatten, linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
        self.relu1, self.relu2, self.pool = nn.ReLU(), nn.ReLU(), nn.MaxPool2d(2)
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(2), nn.Linear(6 * 4, 3)

    def forward(self, x):
        x = self.relu2(self.conv2(self.pool(self.relu1(self.conv1(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class MaxPooled(nn.Module):
    """A global max pool before the linear layer: no CAM head; any input size."""

    def __init__(self):
        super().__init__()
        self.conv, self.relu, self.fc = nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).amax(dim=(2, 3)))


def pooled() -> nn.Module:
    torch.manual_seed(0)
    return Pooled().eval()


def max_pooled() -> nn.Module:
    torch.manual_seed(1)
    return MaxPooled().eval()


def _onnx(model: nn.Module, path, axes: dict | None = None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, SIZE, SIZE),), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "b", **(axes or {})}})
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_the_default_tap_is_the_last_feature_map_not_the_classifier_pool(tmp_path):
    from camshaft.models.onnx_graph import open_foreign

    graph = open_foreign(_onnx(pooled(), tmp_path / "pooled.onnx"), None)
    assert graph.taps == ["/relu2/Relu_output_0"] and graph.cam_tap is None
    assert graph.tap_shapes == {"/relu2/Relu_output_0": (6, SIZE // 2, SIZE // 2)}


def test_a_symbolic_map_size_counts_as_a_map(tmp_path):
    from camshaft.models.onnx_graph import open_foreign

    graph = open_foreign(_onnx(max_pooled(), tmp_path / "any.onnx", {2: "h", 3: "w"}), None)
    assert graph.taps == ["/relu/Relu_output_0"] and graph.cam_tap is None


def test_inspect_names_the_default_tap_and_no_cam_head(tmp_path, capsys):
    path = _onnx(pooled(), tmp_path / "pooled.onnx")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "default tap: /relu2/Relu_output_0\n" in out and "CAM head: none\n" in out


def test_scorecam_and_occlusion_run_at_the_default_tap_as_on_the_torch_model(images, tmp_path):
    path = _onnx(pooled(), tmp_path / "pooled.onnx")
    options = {"window": 8, "stride": 8, "masks_per_forward": 4}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no camshaft metadata; the factory's random weights
        camshaft.explain(path, images, out=tmp_path / "onnx", method=("scorecam", "occlusion"), options=options,
                         progress=False)
        camshaft.explain(f"{__name__}:pooled", images, out=tmp_path / "torch", method=("scorecam", "occlusion"),
                         tap="relu2", input_size=(SIZE, SIZE), options=options, progress=False)
    for method in ("scorecam", "occlusion"):
        got = camshaft.load_results(tmp_path / "onnx" / method)
        want = camshaft.load_results(tmp_path / "torch" / method)
        assert got.maps.shape == want.maps.shape == ((2, 1, SIZE // 2, SIZE // 2) if method == "scorecam" else
                                                     (2, 1, 2, 2))  # the tap's map; occlusion's 2x2 windows
        assert float(np.abs(got.maps[:]).max()) > 0
        np.testing.assert_allclose(got.maps[:], want.maps[:], rtol=1e-4, atol=1e-5)
