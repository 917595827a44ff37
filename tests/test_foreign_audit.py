"""Model files from elsewhere, as a new user meets them: guided backpropagation, shape assertions in converted
graphs, the taps a converted graph offers, and ONNX files that take any input size."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import camshaft
from camshaft.demo.shapes import render_sample
from camshaft.errors import ConfigError
from camshaft.models.inspect import describe
from camshaft.models.prepared import prepare_model
from camshaft.models.sources import resolve_model

SIZE = 16


class Shuffled(nn.Module):
    """A channel shuffle sized from its input (ShuffleNet's), ReLU modules, global average pooling and a linear
    head. Traced, the shuffle's ``c // g`` becomes tensor arithmetic, which torch's converter guards with
    shape assertions."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.relu, self.fc = nn.ReLU(), nn.Linear(4, 3)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        b, c, h, w = x.size()
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)
        x = self.relu(self.conv2(x))
        return self.fc(x.mean([2, 3]))


def build() -> nn.Module:
    torch.manual_seed(0)
    return Shuffled().eval()


def _save(model: nn.Module, path, how: str):
    x = torch.zeros(2, 3, SIZE, SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation
        if how == "traced":
            torch.jit.save(torch.jit.trace(model, x), str(path))
        elif how == "scripted":
            torch.jit.save(torch.jit.script(model), str(path))
        else:
            program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
            torch.export.save(program, str(path))
    return path


def _source(path, **preprocess):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no camshaft metadata: ImageNet statistics assumed
        return resolve_model(path, preprocess={"input_size": (SIZE, SIZE), **preprocess})


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(2):
        render_sample(rng, label=i)[0].save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("how", ["traced", "pt2"])
def test_guided_backprop_of_a_foreign_file_is_that_of_the_model_it_came_from(images, tmp_path, how):
    """Guided backpropagation rewires nn.ReLU modules; a converted graph had only relu calls, so its map was the
    plain input gradient (0.96 relative off resnet18's)."""
    path = _save(build(), tmp_path / f"m.{'pt2' if how == 'pt2' else 'pt'}", how)
    common = {"method": "guided_backprop", "input_size": SIZE, "progress": False, "targets": "top:2"}
    camshaft.explain(f"{__name__}:build", images, out=tmp_path / "model", **common)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "has no nn.ReLU modules to guide" would fail here
        warnings.filterwarnings("ignore", message=".*carries no camshaft metadata")
        camshaft.explain(path, images, out=tmp_path / "file", **common)
    want, got = camshaft.load_results(tmp_path / "model"), camshaft.load_results(tmp_path / "file")
    np.testing.assert_array_equal(got.targets, want.targets)
    np.testing.assert_allclose(got.maps[:], want.maps[:], rtol=1e-4, atol=1e-6)
    source = _source(path)
    names = [n for n, m in source.module.named_modules() if isinstance(m, nn.ReLU)]
    assert names == ["relu_default", "relu_default_1"]  # named as the calls were: taps keep their names
    assert describe(source.module, input_size=(SIZE, SIZE)).default_tap == "relu_default_1"


def test_a_traced_file_with_shape_assertions_splits_at_its_tap_and_has_a_cam_head(tmp_path):
    """The converter's ``_assert_scalar`` nodes read the input's size and are impure: the head cut at the tap kept
    them, so the model did not split (gradients through the whole trunk) and had no CAM head."""
    source = _source(_save(build(), tmp_path / "shuffled.pt", "traced"))
    prepared = prepare_model(source, preprocess=source.preprocess)
    assert prepared.split is not None and prepared.cam_head is not None
    np.testing.assert_array_equal(prepared.cam_head.weight, build().fc.weight.detach())
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        np.testing.assert_allclose(prepared.module(x), build()(x), rtol=1e-5, atol=1e-6)


def test_the_weights_of_a_pt2_file_are_no_taps(tmp_path):
    """A .pt2 file's parameters were FX nodes: listed by inspect as layers (``conv1_weight 4x3x3``) and taken as a
    tap, which crashed the run with a reshape error."""
    source = _source(_save(build(), tmp_path / "m.pt2", "pt2"))
    layers = [lay.name for lay in describe(source.module, input_size=(SIZE, SIZE)).layers]
    assert not [name for name in layers if name.endswith(("_weight", "_bias"))]
    with pytest.raises(ConfigError, match=r"unknown tap 'conv1_weight'; valid choices: mean_dim, relu_default_1,"):
        prepare_model(source, taps=["conv1_weight"], preprocess=source.preprocess)


def test_a_module_path_of_a_converted_file_is_refused_listing_its_nodes(tmp_path):
    """The refusal listed the module paths holding the weights (``conv1, conv2, fc``) as the valid choices."""
    source = _source(_save(build(), tmp_path / "m.pt", "scripted"))
    with pytest.raises(ConfigError, match=r"unknown tap 'conv2'; valid choices: mean_dim, relu_default_1, "
                                          r".*a tap is one of its nodes") as e:
        prepare_model(source, taps=["conv2"], preprocess=source.preprocess)
    assert "conv1," not in str(e.value)


def test_actmax_on_a_converted_file_refuses_a_module_path_listing_its_nodes(tmp_path):
    """actmax listed the module paths as valid choices too, ``conv2`` among them, while refusing ``conv2``;
    a node of the graph is taken, and nothing is written for the refused one."""
    from camshaft.engine.actmax import RenderConfig, actmax

    path = _save(build(), tmp_path / "m.pt", "scripted")
    config = RenderConfig(steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no camshaft metadata
        with pytest.raises(ConfigError, match=r"unknown tap 'conv2'; valid choices: mean_dim, relu_default_1, "
                                              r".*a tap is one of its nodes") as e:
            actmax(path, ["channel:conv2:0"], out=tmp_path / "refused", config=config, input_size=(SIZE, SIZE),
                   progress=False)
        assert "conv1," not in str(e.value) and not (tmp_path / "refused").exists()
        summary = actmax(path, ["channel:relu_default_1:0"], out=tmp_path / "am", config=config,
                         input_size=(SIZE, SIZE), progress=False)
    assert len(summary.rows) == 1


def _onnx(path, axes: dict | None = None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(build(), (torch.randn(1, 3, SIZE, SIZE),), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "b", **(axes or {})}})
    return path


def test_the_cam_head_of_an_onnx_file_is_found_when_reducemean_reads_its_axes_from_a_constant(tmp_path):
    """torch.onnx writes ``x.mean([2, 3])`` as ReduceMean with its axes from a Constant node, not an initializer:
    ShuffleNet's .onnx file had no CAM head, and no default tap."""
    pytest.importorskip("onnxruntime")
    from camshaft.models.onnx_graph import open_foreign

    graph = open_foreign(_onnx(tmp_path / "plain.onnx"), None)
    assert graph.cam_tap == graph.taps[0] == "/relu_1/Relu_output_0"
    np.testing.assert_array_equal(graph.cam_weight, build().fc.weight.detach())


def test_an_onnx_file_of_any_input_size_exports_at_the_size_given(images, tmp_path):
    """Its tap shapes were symbolic (``[4, 'unk__0', ...]``), and the export's parity check refused the artifact."""
    pytest.importorskip("onnxruntime")
    plain = _onnx(tmp_path / "plain.onnx", {2: "h", 3: "w"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = camshaft.export(plain, format="onnx", out=tmp_path / "tapped.onnx", input_size=(SIZE, 24),
                              taps="/relu_1/Relu_output_0")
        camshaft.explain(out, images, out=tmp_path / "artifact", method="cam", progress=False)
        camshaft.explain(f"{__name__}:build", images, out=tmp_path / "model", method="cam", input_size=(SIZE, 24),
                         progress=False)
    got, want = camshaft.load_results(tmp_path / "artifact"), camshaft.load_results(tmp_path / "model")
    assert got.maps.shape == (2, 1, SIZE, 24)
    np.testing.assert_allclose(got.maps[:], want.maps[:], rtol=1e-4, atol=1e-5)


class Named(nn.Module):
    """The logits alone in a dict, as many model libraries return them."""

    def __init__(self):
        super().__init__()
        self.inner = build()

    def forward(self, x):
        return {"logits": self.inner(x)}


def test_a_file_returning_its_logits_in_a_dict_is_the_model(tmp_path):
    """The check of the converted graph sliced the file's dict (``TypeError: unhashable type: 'slice'``)."""
    path = tmp_path / "named.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(Named().eval(), torch.zeros(2, 3, SIZE, SIZE), strict=False), str(path))
    source = _source(path)
    prepared = prepare_model(source, preprocess=source.preprocess)
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        np.testing.assert_allclose(prepared.module(x), build()(x), rtol=1e-5, atol=1e-6)
    assert prepared.cam_head is not None


class Grey(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean([2, 3]))


@pytest.mark.parametrize("how", ["traced", "pt2"])
def test_a_file_for_grey_images_is_refused_saying_so(tmp_path, how):
    """Was: "the conversion failed ... If the model takes another input size, give --input-size" (a TorchScript
    file) or "the model cannot run on a 16x16 input (choose another --input-size)" (a .pt2 file)."""
    x = torch.zeros(2, 1, SIZE, SIZE)
    path = tmp_path / f"grey.{'pt2' if how == 'pt2' else 'pt'}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if how == "traced":
            torch.jit.save(torch.jit.trace(Grey().eval(), x), str(path))
        else:
            torch.export.save(torch.export.export(Grey().eval(), (x,), dynamic_shapes=({0: torch.export.Dim("b")},)),
                              str(path))
    with pytest.raises(ConfigError, match=r"3-channel images|takes 1-channel images") as e:
        _source(path)
    assert "RGB images (N, 3, H, W)" in str(e.value) and "--input-size" not in str(e.value)


def test_a_tap_that_is_no_tensor_is_refused_naming_it(tmp_path):
    """A size node of the converted graph (``size``, listed by inspect) crashed with an AttributeError."""
    source = _source(_save(build(), tmp_path / "m.pt", "traced"))
    with pytest.raises(ConfigError, match=r"taps must be feature maps \(N, C, \.\.\.\): size \(int\) is not"):
        prepare_model(source, taps=["size"], preprocess=source.preprocess)


@pytest.mark.parametrize("how", ["traced", "pt2"])
def test_a_converted_file_with_a_channel_shuffle_exports_to_torchscript_for_any_batch(images, tmp_path, how):
    """torch.jit.trace took the converted graph's ``aten.sym_size`` for plain numbers: the artifact kept the batch of
    its probe and the export's parity check crashed (``shape '[2, 2, 2, 16, 16]' is invalid``), as did
    ``--backend torchscript``."""
    path = _save(build(), tmp_path / f"m.{'pt2' if how == 'pt2' else 'pt'}", how)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = camshaft.export(path, format="torchscript", out=tmp_path / "a.pt", input_size=SIZE)
        camshaft.explain(out, images, out=tmp_path / "file", method="gradcam", batch_size=3, progress=False)
    camshaft.explain(f"{__name__}:build", images, out=tmp_path / "model", method="gradcam", input_size=SIZE,
                     progress=False)
    got, want = camshaft.load_results(tmp_path / "file"), camshaft.load_results(tmp_path / "model")
    assert got.attrs["backend"] == "torchscript"
    np.testing.assert_allclose(got.maps[:], want.maps[:], rtol=1e-4, atol=1e-6)
