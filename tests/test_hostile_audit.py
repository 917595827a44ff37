"""Hostile or odd model files: metadata that lies, ONNX weights outside the file's folder, odd class names.

A model file may come from anywhere. What it claims (class names, classes, taps, CAM head, input size)
is checked against itself and against its graph before any image is read, and its external data is
read only from beside it.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import zipfile

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

import pytest
from conftest import TinyCam, open_backend, source_of

from camshaft.errors import ConfigError
from camshaft.exporters import export_prepared
from camshaft.exporters import onnx as onnx_export
from camshaft.exporters import pt2 as pt2_export
from camshaft.exporters import torchscript as ts_export
from camshaft.exporters.metadata import ArtifactMeta, cam_to_bytes, parse_meta
from camshaft.models.prepared import prepare_model
from camshaft.models.sources import ModelSource, resolve_model
from camshaft.preprocess import Preprocess
from camshaft.writers.pngs import overlay_name

PRE = Preprocess((8, 8), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "stretch")
CAM = torch.tensor([[1.0, -1.0], [0.5, 2.0], [-2.0, 0.25]])  # TinyCam's head: 3 classes, 2 channels


def _meta(**changes) -> ArtifactMeta:
    """TinyCam's metadata as camshaft export writes it (tap ``features``: 2 x 8 x 8, 3 classes)."""
    meta = ArtifactMeta(format="onnx", source="TinyCam", preprocess=PRE, taps=["features"],
                        tap_shapes={"features": [2, 8, 8]}, num_classes=3, class_names=["a", "b", "c"],
                        cam_tap="features", cam_linear="fc")
    return dataclasses.replace(meta, **changes)


def _json(meta: ArtifactMeta, **raw) -> str:
    d = json.loads(meta.to_json())
    d.update(raw)
    return json.dumps(d)


@pytest.mark.parametrize(
    "raw, cam, message",
    [
        ({"class_names": ["a", "a", "c"]}, CAM, r"repeated names \['a'\]"),
        ({"class_names": ["a", "", "c"]}, CAM, "class 1 has an empty name"),
        ({"class_names": [1, 2, 3]}, CAM, r"class_names must be a list of names \(text\), received \[1, 2, 3\]"),
        ({"class_names": "abc"}, CAM, "class_names must be a list of names"),
        ({"class_names": ["a", "b"]}, CAM, "2 class names for 3 classes"),
        ({"num_classes": 0}, None, "num_classes must be a positive integer"),
        ({"taps": []}, None, "taps must be a non-empty list"),
        ({"tap_shapes": {}}, None, r"tap_shapes must give a shape for each tap \['features'\]"),
        ({"cam_tap": "nope"}, CAM, "the CAM head reads tap 'nope', which is not among the taps"),
        ({"cam_linear": None}, CAM, "the CAM head's linear layer must be named"),  # camshaft inspect prints it
        ({"parity": {"logits": "tiny"}}, None, "parity must map outputs to errors"),
        ({}, CAM.T, r"CAM head weights of shape \(2, 3\), expected .* = \(3, 2\)"),
        ({}, CAM[:2], r"CAM head weights of shape \(2, 2\), expected .* = \(3, 2\)"),
        ({}, CAM.flatten(), r"CAM head weights of shape \(6,\)"),
        ({}, torch.full((3, 2), float("nan")), "CAM head weights that are not all finite"),
        ({"preprocess": {"input_size": [8, 8], "mean": [0, 0], "std": [1, 1, 1]}}, None, "mean and std need 3 values"),
        ({"preprocess": {"input_size": [8, 8], "mean": [0, 0, 0], "std": [0, 1, 1]}}, None, "std must be positive"),
        ({"preprocess": {"input_size": [8, 8], "mean": [0, 0, 0], "std": [float("nan"), 1, 1]}}, None, "finite"),
    ],
)
def test_metadata_that_contradicts_itself_is_refused_naming_the_file(raw, cam, message):
    cam_bytes = None if cam is None else cam_to_bytes(cam)
    with pytest.raises(ConfigError, match=f"^model.onnx: .*{message}.*re-export"):
        parse_meta(_json(_meta(), **raw), cam_bytes, where="model.onnx")


def test_consistent_metadata_and_cam_weights_are_read_back():
    meta, cam = parse_meta(_meta().to_json(), cam_to_bytes(CAM), where="model.onnx")
    assert meta.class_names == ["a", "b", "c"] and torch.equal(cam, CAM)
    with pytest.raises(ConfigError, match="model.onnx: bad camshaft metadata .*JSONDecodeError"):
        parse_meta("{not json", None, where="model.onnx")


# metadata that agrees with itself but not with the graph it travels with (TinyCam: 8x8 -> 2x8x8 -> 3 logits)
GRAPH_LIES = {
    "more classes": ({"num_classes": 5, "class_names": list("abcde")}, torch.ones(5, 2),
                     "the graph gives 3 logits, the metadata says 5 classes"),
    "fewer classes": ({"num_classes": 2, "class_names": list("ab")}, torch.ones(2, 2),
                      "the graph gives 3 logits, the metadata says 2 classes"),
    "tap channels": ({"tap_shapes": {"features": [4, 8, 8]}}, torch.ones(3, 4),
                     r"tap 'features' is 2x8x8 in the graph, 4x8x8 in the metadata"),
}


def _tiny_onnx(path, meta: ArtifactMeta, cam: torch.Tensor) -> None:
    """TinyCam as a camshaft ONNX artifact, built by hand (torch's ONNX export takes half a minute here)."""
    model = TinyCam()
    inits = [numpy_helper.from_array(t.detach().numpy(), n) for n, t in
             (("w", model.features[0].weight), ("fc_w", model.fc.weight), ("fc_b", model.fc.bias))]
    nodes = [helper.make_node("Conv", ["input", "w"], ["tap:features"]),
             helper.make_node("GlobalAveragePool", ["tap:features"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1)]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in
          (("input", ["batch", 3, 8, 8]), ("logits", ["batch", 3]), ("tap:features", ["batch", 2, 8, 8]))]
    graph = helper.make_graph(nodes, "tiny", [io[0]], io[1:], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.helper.set_model_props(proto, {onnx_export.META_KEY: meta.to_json(),
                                        onnx_export.CAM_KEY: base64.b64encode(cam_to_bytes(cam)).decode()})
    onnx.save(proto, str(path))


def _onnx_backend(path, tmp_path):
    return open_backend("onnxruntime", ModelSource("onnx", str(path), path=path), tmp_path)


@pytest.mark.parametrize("lie", list(GRAPH_LIES))
def test_an_onnx_file_whose_metadata_lies_about_its_graph_is_refused_when_opened(tmp_path, lie):
    raw, cam, message = GRAPH_LIES[lie]
    _tiny_onnx(tmp_path / "ok.onnx", _meta(), CAM)
    assert _onnx_backend(tmp_path / "ok.onnx", tmp_path).info.num_classes == 3  # the honest file opens
    _tiny_onnx(tmp_path / "lie.onnx", _meta(**raw), cam)
    with pytest.raises(ConfigError, match=f"lie.onnx: its camshaft metadata does not match its model: {message}"):
        _onnx_backend(tmp_path / "lie.onnx", tmp_path)


def test_an_onnx_file_whose_metadata_names_another_input_size_is_refused(tmp_path):
    _tiny_onnx(tmp_path / "m.onnx", _meta(preprocess=Preprocess((16, 16), PRE.mean, PRE.std, "stretch"),
                                          tap_shapes={"features": [2, 16, 16]}), CAM)
    with pytest.raises(ConfigError, match="the graph takes 8x8 inputs, the metadata says 16x16"):
        _onnx_backend(tmp_path / "m.onnx", tmp_path)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """TinyCam exported to TorchScript and .pt2 (split: the .pt2 carries its head)."""
    folder = tmp_path_factory.mktemp("artifacts")
    torch.manual_seed(0)
    src = source_of(TinyCam(), size=(8, 8), names=["a", "b", "c"])
    prepared = prepare_model(src, taps=None, preprocess=src.preprocess)
    return {fmt: export_prepared(prepared, format=fmt, out=folder / f"m.{fmt}") for fmt in ("torchscript", "pt2")}


def _rewritten(src, dst, meta: dict, cam: torch.Tensor | None = None):
    """A copy of a zip artifact with other metadata (and CAM weights): what a tampered file looks like."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("extra/camshaft/meta.json"):
                data = json.dumps({**json.loads(data), **meta}).encode()
            elif cam is not None and "extra/camshaft/cam_head.npz" in item.filename:
                data = cam_to_bytes(cam)
                data = base64.b64encode(data) if item.filename.endswith(".b64") else data
            zout.writestr(item, data)
    return dst


LOADERS = {"torchscript": ts_export.load, "pt2": lambda p: pt2_export.load(p)[1:]}  # (..., meta, cam)


@pytest.mark.parametrize("fmt", list(LOADERS))
@pytest.mark.parametrize("lie", list(GRAPH_LIES))
def test_a_torch_artifact_whose_metadata_lies_about_its_graph_is_refused_when_loaded(artifacts, tmp_path, fmt, lie):
    raw, cam, message = GRAPH_LIES[lie]
    path = _rewritten(artifacts[fmt], tmp_path / f"lie.{fmt}", raw, cam)
    with pytest.raises(ConfigError, match=f"lie.{fmt}.*: its camshaft metadata does not match its model: {message}"):
        LOADERS[fmt](path)


@pytest.mark.parametrize("fmt", list(LOADERS))
def test_a_torch_artifact_whose_metadata_names_another_input_size_is_refused(artifacts, tmp_path, fmt):
    pre = {"input_size": [16, 16], "mean": [0, 0, 0], "std": [1, 1, 1], "resize": "stretch"}
    path = _rewritten(artifacts[fmt], tmp_path / f"size.{fmt}", {"preprocess": pre})
    # a TorchScript file takes any size: at 16x16 its tap is 2x16x16, not the 2x8x8 the metadata says
    message = {"torchscript": r"tap 'features' is 2x16x16 in the graph, 2x8x8",
               "pt2": "the graph takes 8x8 inputs, the metadata says 16x16"}[fmt]
    with pytest.raises(ConfigError, match=message):
        LOADERS[fmt](path)


@pytest.mark.parametrize("fmt", list(LOADERS))
def test_a_torch_artifact_with_duplicate_class_names_is_refused(artifacts, tmp_path, fmt):
    assert LOADERS[fmt](artifacts[fmt])[1].class_names == ["a", "b", "c"]  # the honest file loads
    path = _rewritten(artifacts[fmt], tmp_path / f"dup.{fmt}", {"class_names": ["a", "a", "c"]})
    with pytest.raises(ConfigError, match=r"repeated names \['a'\]"):
        LOADERS[fmt](path)


def _external_onnx(folder, location: str) -> None:
    """A foreign ONNX file (GAP -> Gemm) whose Gemm weights are external data at ``location``."""
    weight = numpy_helper.from_array(np.ones((2, 3), np.float32), "W")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", location
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "W"], ["logits"], transB=1)]
    io = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8]),
          helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])]
    graph = helper.make_graph(nodes, "g", io[:1], io[1:], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "m.onnx"))


@pytest.mark.parametrize("where", ["../secret.bin", "ABSOLUTE", "link.bin"])
def test_onnx_weights_outside_the_files_folder_are_never_read(tmp_path, where):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(6, dtype=np.float32).tobytes())
    models = tmp_path / "models"
    models.mkdir()
    (models / "link.bin").symlink_to(secret)
    location = str(secret) if where == "ABSOLUTE" else where
    _external_onnx(models, location)
    with pytest.raises(ConfigError, match=f"m.onnx stores weights outside its folder \\('W' in '{location}'\\)"):
        resolve_model(models / "m.onnx")


def test_onnx_weights_beside_the_file_are_read(tmp_path):
    (tmp_path / "w.bin").write_bytes(np.ones(6, dtype=np.float32).tobytes())
    _external_onnx(tmp_path, "w.bin")
    assert resolve_model(tmp_path / "m.onnx").kind == "onnx"


@pytest.mark.parametrize("name", ["../../etc/passwd", "a/b", "..", "x\x00y", "line\nbreak", "<script>", "n" * 500, ""])
def test_overlay_names_of_hostile_class_and_file_names_stay_in_the_folder(name):
    out = overlay_name(7, f"/data/{name or 'img'}.png", 0, [name or "x"], k=None)
    assert "/" not in out and "\x00" not in out and "\n" not in out and not out.startswith(".")
    assert out.startswith("000007_") and out.endswith(".png") and len(out) < 120
