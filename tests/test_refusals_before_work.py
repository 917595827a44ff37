"""A method the model cannot serve is refused before the model is exported to another backend."""

from __future__ import annotations

import pytest

from camshaft.engine.explainer import build_explainer
from camshaft.engine.job import ExplainJob
from camshaft.errors import CapabilityError


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
