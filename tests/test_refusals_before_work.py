"""A method the model cannot serve is refused before the model is exported to another backend."""

from __future__ import annotations

import pytest

from camshaft.engine.explainer import build_explainer
from camshaft.engine.job import ExplainJob
from camshaft.errors import CapabilityError, ConfigError


@pytest.mark.parametrize("backend", ["torchscript", "onnxruntime"])
def test_cam_on_a_model_without_a_pooled_linear_head_is_refused_before_the_export(backend, tmp_path, monkeypatch):
    """Was: VGG was exported to ONNX first (about a minute here), then CAM refused."""
    monkeypatch.setattr("camshaft.exporters.export_prepared", lambda *a, **k: pytest.fail("exported before refusing"))
    (tmp_path / "images").mkdir()
    job = ExplainJob("vgg11", tmp_path / "images", tmp_path / "out", method=("gradcam", "cam"), backend=backend,
                     input_size=(64, 64))
    with pytest.warns(UserWarning, match="random weights"), pytest.raises(CapabilityError, match="CAM needs a global"):
        build_explainer(job, workdir=tmp_path / "work")


def test_a_model_that_can_serve_cam_is_exported_unchanged(tmp_path):
    """The check before the export leaves the model as loaded (no layout or device change)."""
    (tmp_path / "images").mkdir()
    job = ExplainJob("resnet18", tmp_path / "images", tmp_path / "out", method="cam", backend="onnxruntime",
                     input_size=(64, 64))
    with pytest.warns(UserWarning, match="random weights"):
        explainer = build_explainer(job, workdir=tmp_path / "work")
    assert explainer.backend.name == "onnxruntime" and explainer.runs[0].tap == "layer4"
    weight = explainer.source.module.conv1.weight
    assert weight.is_contiguous() and weight.device.type == "cpu"


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
@pytest.mark.parametrize("input_size, window", [(None, 120), ((64, 64), 80), ((64, 64), "32,70")])
def test_an_occlusion_window_larger_than_the_input_is_refused_before_the_backend(backend, input_size, window, tmp_path,
                                                                              monkeypatch):
    """Was: refused by the start-up probe, after the backend was built (and the model exported for ONNX)."""
    monkeypatch.setattr("camshaft.engine.explainer.backend_factory", lambda *a, **k: pytest.fail("backend built"))
    (tmp_path / "images").mkdir()
    job = ExplainJob(None, tmp_path / "images", tmp_path / "out", method=("gradcam", "occlusion"), backend=backend,
                     input_size=input_size, options={"window": window})
    size = "96x96" if input_size is None else "64x64"  # the demo model's input, or the run's override
    with pytest.raises(ConfigError, match=f"is larger than the {size} model input"):
        build_explainer(job, workdir=tmp_path / "work")


def test_an_occlusion_window_that_fits_the_overridden_input_is_accepted(tmp_path):
    (tmp_path / "images").mkdir()
    job = ExplainJob(None, tmp_path / "images", tmp_path / "out", method="occlusion", input_size=(128, 128),
                     options={"window": 120})  # larger than the demo model's 96 px, not than the run's input
    assert build_explainer(job, workdir=tmp_path / "work").runs[0].method.name == "occlusion"


@pytest.mark.parametrize("backend", ["eager", "torchscript"])
@pytest.mark.parametrize("method", ["cam", "gradcam", "gradcam++", "layercam", "xgradcam", "scorecam"])
def test_a_tap_without_a_spatial_map_is_refused_with_its_shape_before_any_image(method, backend, tmp_path):
    """Was: an einsum traceback (``--tap flatten --method gradcam``) from the start-up probe. The probe
    runs on a black image, so nothing of the dataset is read and no output is written."""
    from PIL import Image

    from camshaft.api import explain

    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 40), "white").save(tmp_path / "images" / "a.png")
    expected = (CapabilityError, "there is none after 'flatten'") if method == "cam" else (
        ConfigError, r"tap 'flatten' outputs 80 per image, not a \(C, h, w\) feature map")
    with pytest.raises(expected[0], match=expected[1]):
        explain(None, tmp_path / "images", out=tmp_path / "out", method=method, tap="flatten", backend=backend,
                progress=False)
    assert not (tmp_path / "out" / "results.parquet").exists()
    assert not (tmp_path / "out" / "maps.zarr").exists()
