"""TorchScript and .pt2 files that camshaft did not write: converted to graphs camshaft taps, checked against
the file, and explained, inspected and exported as the torch model they came from."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import camshaft
from camshaft.demo.shapes import render_sample
from camshaft.errors import ConfigError
from camshaft.models.prepared import prepare_model
from camshaft.models.sources import resolve_model

SIZE = 32


class Res(nn.Module):
    """A residual block with in-place ReLUs and ``+=``, global average pooling and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)

    def forward(self, x):
        a = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(a))
        out += a
        out = self.relu(out)
        return self.fc(torch.flatten(self.pool(out), 1))


def build() -> nn.Module:
    """The model with fixed, non-trivial weights and batch-norm statistics (a factory: module:build)."""
    torch.manual_seed(0)
    model = Res()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
    return model.eval()


class Aliased(nn.Module):
    """An in-place ReLU on a tensor a view of which is read after it: it must stay in place."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        a = self.conv(x)
        v = a.view(a.shape)  # the same memory
        torch.relu_(a)  # so v is rectified too
        return self.fc((v - 0.25).mean(dim=(2, 3)))


class SizeBound(nn.Module):
    """A linear layer over the flattened map: the model takes one input size."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 2, 3, padding=1), nn.Linear(2 * 16 * 16, 3)

    def forward(self, x):
        a = torch.relu(self.conv(x))
        return self.fc(a.view(a.size(0), -1))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(3):
        render_sample(rng, label=i)[0].save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The model as a traced and a scripted TorchScript file and as a .pt2 file with a dynamic batch."""
    folder, model, x = tmp_path_factory.mktemp("files"), build(), torch.zeros(2, 3, SIZE, SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation
        torch.jit.save(torch.jit.trace(model, x), str(folder / "traced.pt"))
        torch.jit.save(torch.jit.script(model), str(folder / "scripted.pt"))
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(folder / "dynamic.pt2"))
    return folder


def _source(path, **preprocess):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no camshaft metadata: ImageNet statistics assumed
        return resolve_model(path, preprocess={"input_size": (SIZE, SIZE), **preprocess})


@pytest.mark.parametrize("name", ["traced.pt", "scripted.pt", "dynamic.pt2"])
def test_a_foreign_file_is_a_torch_model_with_the_files_outputs_and_a_cam_head(files, name):
    source = _source(files / name)
    assert source.kind == "torch" and source.path == files / name
    prepared = prepare_model(source, preprocess=source.preprocess)
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        np.testing.assert_allclose(prepared.module(x), build()(x), rtol=1e-5, atol=1e-5)
    assert prepared.cam_head is not None and prepared.cam_head.weight.shape == (4, 8)  # found on a graph of ATen ops
    np.testing.assert_array_equal(prepared.cam_head.weight, build().fc.weight.detach())
    assert prepared.split is not None  # the head cut at the tap does not rerun the trunk: in-place ops were undone
    assert not any(n.op == "placeholder" for n in prepared.split.head.gm.graph.nodes if n.name != "a")


def test_explanations_of_a_foreign_file_are_those_of_the_model_it_came_from(files, images, tmp_path):
    common = {"method": ["cam", "gradcam"], "input_size": SIZE, "progress": False}
    camshaft.explain(f"{__name__}:build", images, out=tmp_path / "model", **common)
    with pytest.warns(UserWarning, match=r"carries no camshaft metadata: assuming ImageNet mean/std"):
        camshaft.explain(files / "traced.pt", images, out=tmp_path / "file", **common)
    for method in ("cam", "gradcam"):
        want = camshaft.load_results(tmp_path / "model" / method)
        got = camshaft.load_results(tmp_path / "file" / method)
        assert (got.table["status"] == "ok").all() and got.attrs["backend"] == "eager"
        np.testing.assert_array_equal(got.targets, want.targets)
        np.testing.assert_allclose(got.maps[:], want.maps[:], rtol=1e-4, atol=1e-5)


def test_a_foreign_file_exports_to_an_onnx_artifact_that_explains_the_same(files, images, tmp_path):
    pytest.importorskip("onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        camshaft.export(files / "scripted.pt", format="onnx", out=tmp_path / "m.onnx", input_size=SIZE)
        common = {"method": "gradcam", "progress": False}
        camshaft.explain(tmp_path / "m.onnx", images, out=tmp_path / "onnx", **common)
        camshaft.explain(files / "scripted.pt", images, out=tmp_path / "eager", input_size=SIZE, **common)
    onnx, eager = camshaft.load_results(tmp_path / "onnx"), camshaft.load_results(tmp_path / "eager")
    assert onnx.attrs["backend"] == "onnxruntime"
    np.testing.assert_allclose(onnx.maps[:], eager.maps[:], rtol=1e-3, atol=1e-4)


def test_an_in_place_operation_whose_memory_is_read_later_stays_in_place(tmp_path):
    model, x = Aliased().eval(), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    path = tmp_path / "aliased.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), str(path))
    source = _source(path, input_size=(8, 8))
    with torch.no_grad():
        np.testing.assert_allclose(source.module(x), model(x), rtol=1e-5, atol=1e-6)
    ops = [str(n.target) for n in source.module.graph.nodes if n.op == "call_function"]
    assert "aten.relu_.default" in ops  # made out of place, v would read the values before the ReLU


def test_a_pt2_file_with_a_static_batch_is_refused_naming_the_fix(tmp_path):
    path = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(build(), (torch.zeros(2, 3, SIZE, SIZE),)), str(path))
    with pytest.raises(ConfigError, match=r"exported for batches of exactly 2 image\(s\).*dynamic batch dimension"):
        _source(path)


@pytest.mark.parametrize("bounds", [{"min": 2}, {"max": 2}])
def test_a_pt2_file_with_bounds_on_its_batch_is_checked_and_explains_any_batch(images, tmp_path, bounds):
    """``Dim("batch", min=2)`` (the usual answer to torch.export's 0/1 specialisation), or a highest batch: was
    refused as "does not hold for a 32x32 input", the check on batches of 1 and 3 failing on the program's guard."""
    model, path = build(), tmp_path / "bounded.pt2"
    dim = torch.export.Dim("batch", **bounds)
    torch.export.save(torch.export.export(model, (torch.zeros(2, 3, SIZE, SIZE),), dynamic_shapes=({0: dim},)),
                      str(path))
    source = _source(path)
    prepare_model(source, preprocess=source.preprocess)  # the check, on batches of 1 and 3
    for n in (1, 5):
        x = torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            np.testing.assert_allclose(source.module(x), model(x), rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        camshaft.explain(path, images, out=tmp_path / "out", method="gradcam", batch_size=3, progress=False)
    assert (camshaft.load_results(tmp_path / "out").table["status"] == "ok").sum() == 3


def test_a_file_made_for_one_input_size_takes_that_size_and_refuses_others(files, tmp_path):
    source = _source(files / "dynamic.pt2", input_size=None)
    assert source.preprocess.input_size == (SIZE, SIZE)  # the size the program was exported at: its only one
    with pytest.raises(ConfigError, match=r"does not hold for a 48x48 input.*--input-size"):
        prepare_model(source, preprocess=source.preprocess.replace(input_size=(48, 48)))
    path = tmp_path / "bound.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(SizeBound().eval(), torch.zeros(1, 3, 16, 16)), str(path))
    with pytest.raises(ConfigError, match=r"the conversion failed at a 32x32 input.*give --input-size"):
        _source(path)
    bound = _source(path, input_size=(16, 16))
    assert prepare_model(bound, preprocess=bound.preprocess.replace(input_size=(16, 16))).info.num_classes == 3


class VggLike(nn.Module):
    """Features, then adaptive pooling to a fixed 3x3 (as VGG's 7x7) and a linear classifier."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(3), nn.Linear(4 * 9, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def test_the_default_tap_is_the_last_feature_map_not_the_adaptive_pooling_after_it(tmp_path):
    path = tmp_path / "vgg.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(VggLike().eval(), torch.zeros(1, 3, 16, 16)), str(path))
    source = _source(path, input_size=(16, 16))
    prepared = prepare_model(source, preprocess=source.preprocess)
    assert prepared.tap_shapes[prepared.info.taps[0]] == [4, 8, 8]  # the max pool's map, not the 3x3 pooled one
    assert prepared.info.taps[0].startswith("max_pool2d")


class Two(nn.Module):
    """Two outputs: not a classifier's logits."""

    def forward(self, x):
        return x.mean(dim=(2, 3)), x.amax(dim=(2, 3))


def test_a_model_with_several_outputs_is_refused(tmp_path):
    path = tmp_path / "two.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(Two()), str(path))
    with pytest.raises(ConfigError, match=r"returns 2 outputs; camshaft explains a classifier"):
        _source(path)


def test_a_cluster_worker_gets_the_file_not_weights(files, images, tmp_path):
    from camshaft.engine.explainer import build_explainer
    from camshaft.engine.job import ExplainJob
    from camshaft.pipeline.run import _worker_job
    from camshaft.pipeline.state import RunState

    job = ExplainJob(model=str(files / "traced.pt"), data=images, out=tmp_path / "out", input_size=(SIZE, SIZE),
                     scheduler="tcp://127.0.0.1:1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explainer = build_explainer(job, workdir=tmp_path / "work")
    sent = _worker_job(explainer.job, explainer, RunState(tmp_path / "out", job.methods))
    assert sent.model == str((files / "traced.pt").absolute()) and sent.weights is None


def test_activation_maximization_and_feature_maps_take_a_foreign_file(files, images, tmp_path):
    from camshaft.engine.actmax import RenderConfig, actmax

    config = RenderConfig(steps=2, device="cpu", pad=0, jitter=0, scale=0.0, rotate=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = actmax(files / "traced.pt", ["class:1"], out=tmp_path / "am", config=config,
                                  input_size=SIZE, progress=False)
        maps = camshaft.feature_maps(files / "traced.pt", images / "0.png", top=3, input_size=SIZE)
    assert len(summary.rows) == 1 and (tmp_path / "am" / summary.rows[0]["image"]).is_file()
    want = camshaft.feature_maps(f"{__name__}:build", images / "0.png", top=3, input_size=SIZE)
    assert maps.channels == want.channels
    np.testing.assert_allclose(maps.maps, want.maps, rtol=1e-4, atol=1e-5)


# --- ONNX files from elsewhere: exported to camshaft artifacts (taps as outputs, metadata) --------------------


def _plain_onnx(path, *, batch: int | None = None, output: str | None = None):
    """``build()`` exported by torch alone: a dynamic batch, or a fixed one (torch.onnx.export's default)."""
    axes = {} if batch else {"dynamic_axes": {"x": {0: "b"}}}
    names = {"output_names": [output]} if output else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(build(), (torch.randn(batch or 1, 3, SIZE, SIZE),), str(path), dynamo=False,
                          input_names=["x"], **axes, **names)
    return path


@pytest.mark.parametrize(("batch", "output"), [(None, None), (2, None), (None, "logits")],
                         ids=["dynamic-batch", "fixed-batch", "output-named-logits"])
def test_a_foreign_onnx_file_exports_to_an_artifact_that_explains_as_the_file(images, tmp_path, batch, output):
    pytest.importorskip("onnxruntime")
    plain = _plain_onnx(tmp_path / "plain.onnx", batch=batch, output=output)
    names = tmp_path / "names.txt"
    names.write_text("zero\none\ntwo\nthree\n")
    with pytest.warns(UserWarning, match="records ImageNet mean/std"):
        out = camshaft.export(plain, format="onnx", out=tmp_path / "tapped.onnx", class_names=names)
    from camshaft.exporters.onnx import read_session
    from camshaft.engine.backends.onnx_backend import open_session

    meta, cam, head = read_session(open_session(out, torch.device("cpu")), out)
    assert meta.class_names == ["zero", "one", "two", "three"] and meta.preprocess.input_size == (SIZE, SIZE)
    assert meta.cam_tap == meta.taps[0] and meta.tap_shapes[meta.taps[0]] == [8, SIZE, SIZE] and head is None
    np.testing.assert_array_equal(cam, build().fc.weight.detach())  # the head's weights, read from the graph
    assert meta.parity == {"logits": 0.0}
    common = {"method": ["cam", "occlusion"], "options": {"window": (8, 8), "stride": (8, 8)}, "progress": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the artifact carries its preprocessing: nothing to warn about
        camshaft.explain(out, images, out=tmp_path / "artifact", **common)
    with pytest.warns(UserWarning, match="no camshaft metadata"):
        camshaft.explain(plain, images, out=tmp_path / "file", **common)
    for method in ("cam", "occlusion"):
        got = camshaft.load_results(tmp_path / "artifact" / method)
        want = camshaft.load_results(tmp_path / "file" / method)
        assert got.attrs["backend"] == "onnxruntime" and list(got.table["target_names"].str[0]) == [
            ["zero", "one", "two", "three"][t] for t in want.targets[:, 0]]
        np.testing.assert_allclose(got.maps[:], want.maps[:], rtol=1e-6, atol=1e-7)


def test_a_foreign_onnx_file_is_refused_where_it_cannot_be_exported(tmp_path):
    pytest.importorskip("onnxruntime")
    plain = _plain_onnx(tmp_path / "plain.onnx")
    with pytest.raises(ConfigError, match="exports to ONNX only"):
        camshaft.export(plain, format="torchscript", out=tmp_path / "m.pt")
    with pytest.raises(ConfigError, match="cannot add a differentiable head"):
        camshaft.export(plain, format="onnx", out=tmp_path / "m.onnx", head=True)
    with pytest.raises(ConfigError, match="takes 32x32 inputs only"):
        camshaft.export(plain, format="onnx", out=tmp_path / "m.onnx", input_size=48)
    artifact = camshaft.export("demo", format="onnx", out=tmp_path / "demo.onnx")
    with pytest.raises(ConfigError, match="is a camshaft artifact already"):
        camshaft.export(artifact, format="onnx", out=tmp_path / "again.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.onnx", "plain.onnx"]  # nothing else written
