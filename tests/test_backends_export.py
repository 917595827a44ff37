"""Taps, the split at the tap, exported artifacts and parity between the three backends."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import onnx
import pytest
import torch
import torchvision
from torch import nn
from conftest import TinyCam, Untraceable, fixed, open_backend, source_of
from test_methods import closed_form_cam

from camshaft.cli import main
from camshaft.engine.methods import check_backend, get_method
from camshaft.errors import CapabilityError, ConfigError, ParityError, UnknownNameError
from camshaft.exporters import export_prepared
from camshaft.exporters import torchscript as ts_export
from camshaft.models.prepared import prepare_model
from camshaft.models.sources import ModelSource
from camshaft.models.split import split_at_first_tap
from camshaft.models.taps import TappedModel, plan_taps

BACKENDS = ["eager", "torchscript", "pt2", "onnxruntime"]



@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def test_untraceable_models_are_tapped_with_hooks():
    assert plan_taps(TinyCam()).traceable
    assert not plan_taps(Untraceable()).traceable


def test_unknown_tap_lists_the_valid_choices(resnet):
    with pytest.raises(UnknownNameError, match="layer4.*camshaft inspect"):
        TappedModel(resnet, ["layer5"])


def test_a_tap_on_the_logits_layer_is_refused_clearly(resnet):
    with pytest.raises(ConfigError, match="tap 'fc' is the layer that outputs the logits, not a feature map"):
        TappedModel(resnet, ["fc"])


def test_taps_come_back_in_execution_order_and_match_the_model(resnet):
    tapped = TappedModel(resnet, ["layer4", "layer2"])
    assert tapped.taps == ["layer2", "layer4"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, taps = tapped(x)
        torch.testing.assert_close(logits, resnet(x))
        torch.testing.assert_close(taps["layer2"], resnet.layer2(resnet.layer1(resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x)))))))


def test_split_exists_only_where_the_tap_cuts_the_graph(resnet):
    split = split_at_first_tap(TappedModel(resnet, ["layer3", "layer4"]))
    assert split is not None
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, taps = split.head(split.trunk(x))
        torch.testing.assert_close(logits, resnet(x))
    assert set(taps) == {"layer3", "layer4"}
    # inside a residual block the skip connection bypasses the tap: no split
    assert split_at_first_tap(TappedModel(resnet, ["layer4.0.conv1"])) is None


def test_a_split_at_a_tap_the_model_overwrites_leaves_the_activation_alone(resnet):
    """The stem's ``bn1`` feeds an in-place ReLU: the head must not write into the tap it is given."""
    split = split_at_first_tap(TappedModel(resnet, ["bn1", "layer4"]))
    assert split is not None
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = split.trunk(x)
        torch.testing.assert_close(a, resnet.bn1(resnet.conv1(x)))
        before = a.clone()
        logits, taps = split.head(a)
        torch.testing.assert_close(logits, resnet(x))
    assert torch.equal(a, before) and a.min() < 0 and taps["bn1"] is a
    leaf = a.clone().requires_grad_(True)  # what tap_gradients hands the head: no in-place error
    (g,) = torch.autograd.grad(split.head(leaf)[0][:, 3].sum(), leaf)
    assert g.abs().sum() > 0


def test_gradients_at_a_tap_that_does_not_cut_the_graph(resnet, tmp_path):
    """Eager tap gradients need no split: compare with retain_grad on the full model."""
    backend = open_backend("eager", source_of(resnet, size=(64, 64)), tmp_path, taps=["layer4.0.conv1"])
    x = torch.randn(2, 3, 64, 64)
    out = backend.tap_gradients(x, fixed([[3], [5]]))
    store = {}
    handle = resnet.layer4[0].conv1.register_forward_hook(lambda m, i, o: store.setdefault("a", o))
    try:
        with torch.enable_grad():
            logits = resnet(x.requires_grad_(True))
            store["a"].retain_grad()
            (logits[0, 3] + logits[1, 5]).backward()
    finally:
        handle.remove()
        resnet.zero_grad(set_to_none=True)
    torch.testing.assert_close(out.grads["layer4.0.conv1"][:, 0], store["a"].grad, rtol=1e-4, atol=1e-6)


class Wrapped(torch.nn.Module):
    """``net`` behind data-dependent control flow: FX cannot trace it, taps are read with hooks."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x) * 1.0 if bool(x.sum() > -1e30) else self.net(x)


@pytest.mark.parametrize("traced", [True, False], ids=["fx", "hooks"])
def test_taps_the_model_overwrites_in_place_keep_their_values_and_gradients(resnet, tmp_path, traced):
    """``bn1`` feeds an in-place ReLU and ``bn2`` an in-place ``+=``: the taps read the BN outputs."""
    import copy

    model = resnet if traced else Wrapped(resnet)
    prefix = "" if traced else "net."
    taps = [prefix + "layer1.0.bn1", prefix + "layer2.1.bn2"]
    assert TappedModel(model, taps).traceable is traced
    reference = copy.deepcopy(resnet)  # the same model going on with a copy of each tapped output
    store = {}
    hooks = [reference.get_submodule(t.removeprefix(prefix)).register_forward_hook(
        lambda m, i, o, t=t: store.setdefault(t, o).clone()) for t in taps]
    x = torch.randn(2, 3, 64, 64)
    try:
        with torch.enable_grad():
            logits = reference(x)
            for t in taps:
                store[t].retain_grad()
            (logits[0, 3] + logits[1, 5]).backward()
    finally:
        for h in hooks:
            h.remove()
    assert store[taps[0]].min() < 0  # what an in-place ReLU would have clamped
    with torch.no_grad():
        out_logits, values = TappedModel(model, taps)(x)
    torch.testing.assert_close(out_logits, logits.detach())
    for t in taps:
        torch.testing.assert_close(values[t], store[t].detach())
    backend = open_backend("eager", source_of(model, size=(64, 64)), tmp_path, taps=taps)
    grads = backend.tap_gradients(x, fixed([[3], [5]])).grads
    for t in taps:
        torch.testing.assert_close(grads[t][:, 0], store[t].grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_backends_agree(method, resnet, tmp_path):
    source = source_of(resnet, size=(64, 64))
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    targets = [[1, 2], [3, 4], [0, 9]]
    maps = {}
    for name in BACKENDS:
        backend = open_backend(name, source, tmp_path / name, taps=["layer3", "layer4"])
        maps[name], _ = get_method(method).run(backend, x, fixed(targets), tap="layer4")
    scale = maps["eager"].abs().max()
    assert scale > 0
    for name in BACKENDS[1:]:
        torch.testing.assert_close(maps[name], maps["eager"], rtol=1e-4, atol=1e-5 * scale)


def test_gradcam_at_the_earlier_tap_through_every_backend(resnet, tmp_path):
    source = source_of(resnet, size=(64, 64))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    maps = {}
    for name in BACKENDS:
        backend = open_backend(name, source, tmp_path / name, taps=["layer3", "layer4"])
        maps[name], _ = get_method("gradcam").run(backend, x, fixed([[1], [2]]), tap="layer3")
    for name in BACKENDS[1:]:
        torch.testing.assert_close(maps[name], maps["eager"], rtol=1e-4, atol=1e-6)


def test_artifact_metadata_and_dynamic_batch(resnet, tmp_path):
    names = [f"class{i}" for i in range(10)]
    source = ModelSource("torch", "resnet18-test", module=resnet, preprocess=source_of(resnet, size=(64, 64)).preprocess, class_names=names)
    prepared = prepare_model(source, taps=["layer4"])
    path = export_prepared(prepared, format="torchscript", out=tmp_path / "m.pt")
    module, meta, cam = ts_export.load(path)
    assert meta.taps == ["layer4"] and meta.tap_shapes == {"layer4": [512, 2, 2]}
    assert meta.class_names == names and meta.num_classes == 10 and meta.has_head
    assert meta.cam_tap == "layer4" and meta.cam_linear == "fc"
    torch.testing.assert_close(cam, resnet.fc.weight)
    assert meta.preprocess.input_size == (64, 64)
    assert set(meta.parity) == {"logits", "layer4"} and max(meta.parity.values()) < 1e-3
    for batch in (1, 5):
        logits, taps = module(torch.randn(batch, 3, 64, 64))
        assert logits.shape == (batch, 10) and taps["layer4"].shape == (batch, 512, 2, 2)

    onnx_path = export_prepared(prepared, format="onnx", out=tmp_path / "m.onnx")
    props = {p.key for p in onnx.load(str(onnx_path)).metadata_props}
    assert {"camshaft", "camshaft.cam_head", "camshaft.head"} <= props

    from camshaft.exporters import pt2 as pt2_export

    program, head, meta, cam = pt2_export.load(export_prepared(prepared, format="pt2", out=tmp_path / "m.pt2"))
    assert meta.format == "pt2" and meta.taps == ["layer4"] and meta.class_names == names and meta.has_head
    assert meta.cam_tap == "layer4" and max(meta.parity.values()) < 1e-3 and meta.exporter.startswith("torch.export")
    torch.testing.assert_close(cam, resnet.fc.weight)
    for batch in (1, 5):
        logits, a = program(torch.randn(batch, 3, 64, 64))
        assert logits.shape == (batch, 10) and a.shape == (batch, 512, 2, 2)
        assert head(a)[0].shape == (batch, 10)  # the head travels in the archive: first tap -> logits


@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "pt2"])
def test_export_refuses_to_write_when_parity_fails(fmt, tmp_path):
    prepared = prepare_model(source_of(TinyCam()), taps=["features"])
    target = tmp_path / f"model.{fmt}"
    with pytest.raises(ParityError, match="nothing written"):
        export_prepared(prepared, format=fmt, out=target, rtol=-1.0)  # nothing can pass a negative tolerance
    assert list(tmp_path.iterdir()) == []


def test_artifact_without_split_serves_forward_only(resnet, tmp_path):
    source = source_of(resnet, size=(64, 64))
    backend = open_backend("onnxruntime", source, tmp_path, taps=["layer4.0.conv1"])
    assert "tap_gradients" not in backend.capabilities
    with pytest.raises(CapabilityError, match="eager"):
        check_backend(get_method("gradcam"), backend)


@pytest.fixture
def foreign_onnx(tmp_path):
    """An ONNX file exported by plain torch, without camshaft metadata."""
    path = tmp_path / "plain.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TinyCam().eval(), (torch.randn(1, 3, 8, 8),), str(path), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "b"}})
    return ModelSource("onnx", str(path), path=path)


def test_foreign_onnx_file_serves_cam_from_its_graph(foreign_onnx, tmp_path):
    with pytest.warns(UserWarning, match="no camshaft metadata"):
        backend = open_backend("onnxruntime", foreign_onnx, tmp_path)
    assert backend.info.cam_tap == backend.info.taps[0] and backend.info.preprocess.input_size == (8, 8)
    x = torch.randn(2, 3, 8, 8)
    maps, _ = get_method("cam").run(backend, x, fixed([[0, 2], [1, 1]]), tap=backend.info.cam_tap)
    torch.testing.assert_close(maps, closed_form_cam(x, torch.tensor([[0, 2], [1, 1]])), rtol=1e-5, atol=1e-5)
    with pytest.raises(CapabilityError, match="eager"):
        check_backend(get_method("gradcam"), backend)


def test_a_foreign_onnx_file_with_a_fixed_batch_of_1_runs_any_batch(tmp_path):
    path = tmp_path / "fixed.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TinyCam().eval(), (torch.randn(1, 3, 8, 8),), str(path), dynamo=False)  # torch's default
        backend = open_backend("onnxruntime", ModelSource("onnx", str(path), path=path), tmp_path)
    x = torch.randn(3, 3, 8, 8)
    targets = torch.tensor([[0], [2], [1]])
    maps, _ = get_method("cam").run(backend, x, fixed(targets.tolist()), tap=backend.info.cam_tap)
    torch.testing.assert_close(maps, closed_form_cam(x, targets), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_an_artifact_refuses_another_input_size_clearly(tmp_path, fmt):
    from camshaft.engine.backends import backend_factory

    path = export_prepared(prepare_model(source_of(TinyCam()), taps=["features"]), format=fmt, out=tmp_path / f"m.{fmt}")
    source = ModelSource(fmt, str(path), path=path)
    name = {"onnx": "onnxruntime", "pt2": "pt2"}[fmt]
    options = dict(taps=None, device=torch.device("cpu"), dtype=torch.float32, workdir=tmp_path)
    with pytest.raises(ConfigError, match=r"exported for 8x8 inputs; it cannot take 16x12.*--input-size 16,12"):
        backend_factory(name)(source, preprocess={"input_size": (16, 12)}, **options)
    backend = backend_factory(name)(source, preprocess={"input_size": (8, 8)}, **options)  # its own size is fine
    assert backend.forward(torch.zeros(2, 3, 8, 8)).logits.shape == (2, 3)


def test_a_file_named_onnx_that_is_not_one_is_named(tmp_path, capsys):
    path = tmp_path / "weights.onnx"
    torch.save(TinyCam().state_dict(), path)
    with pytest.raises(ConfigError, match=r"weights.onnx is not an ONNX model \(InvalidProtobuf"):
        open_backend("onnxruntime", ModelSource("onnx", str(path), path=path), tmp_path)
    assert main(["inspect", str(path)]) == 2
    assert "weights.onnx is not an ONNX model (DecodeError" in capsys.readouterr().err


def test_onnx_runtime_threads_do_not_spin_between_runs(foreign_onnx):
    """Spinning threads would take the CPU from decoding and torch work between runs."""
    from camshaft.engine.backends.onnx_backend import open_session

    options = open_session(foreign_onnx.path, torch.device("cpu")).get_session_options()
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        assert options.get_session_config_entry(key) == "0"


def test_foreign_onnx_taps_are_graph_tensors(foreign_onnx, tmp_path):
    with pytest.raises(UnknownNameError, match="4-D tensor"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        open_backend("onnxruntime", foreign_onnx, tmp_path, taps=["layer4"])


def test_artifact_rejects_taps_it_was_not_exported_with(resnet, tmp_path):
    path = export_prepared(prepare_model(source_of(resnet, size=(64, 64)), taps=["layer4"]), format="onnx", out=tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="layer3"):
        open_backend("onnxruntime", ModelSource("onnx", str(path), path=path), tmp_path, taps=["layer3"])


class FunctionalRelu(torch.nn.Module):
    """Like densenet: the tap is a functional relu whose FX name ('relu') is also an ONNX value name."""

    def __init__(self, hidden: int = 4):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, hidden, 3, padding=1)
        self.fc = torch.nn.Linear(hidden, 3)

    def forward(self, x):
        a = torch.nn.functional.relu(self.conv(x))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(a, 1).flatten(1))


def test_tap_names_never_collide_with_onnx_value_names(tmp_path):
    backend = open_backend("onnxruntime", source_of(FunctionalRelu()), tmp_path, taps=["relu"])
    maps, _ = get_method("gradcam").run(backend, torch.randn(2, 3, 8, 8), fixed([[0], [1]]), tap="relu")
    assert maps.shape == (2, 1, 8, 8)


def test_a_large_head_is_embedded_only_when_asked_or_for_a_run(tmp_path, monkeypatch):
    monkeypatch.setattr("camshaft.exporters.onnx.HEAD_LIMIT_BYTES", 0)  # no MB-sized models in tests
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.Flatten(), torch.nn.Linear(2 * 8 * 8, 10))
    prepared = prepare_model(source_of(model), taps=["0"])
    with pytest.warns(UserWarning, match="not embedding it"):
        path = export_prepared(prepared, format="onnx", out=tmp_path / "big.onnx")
    backend = open_backend("onnxruntime", ModelSource("onnx", str(path), path=path), tmp_path)
    assert "tap_gradients" not in backend.capabilities
    forced = export_prepared(prepared, format="onnx", out=tmp_path / "forced.onnx", head=True)
    backend = open_backend("onnxruntime", ModelSource("onnx", str(forced), path=forced), tmp_path)
    assert "tap_gradients" in backend.capabilities
    # a run that opens the torch model on onnxruntime exports into its work folder: the head goes along
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning about its size
        backend = open_backend("onnxruntime", source_of(model), tmp_path / "run", taps=["0"])
    assert "tap_gradients" in backend.capabilities
    x = torch.randn(2, 3, 8, 8)
    maps, _ = get_method("gradcam").run(backend, x, fixed([[3], [7]]), tap="0")
    eager, _ = get_method("gradcam").run(open_backend("eager", source_of(model), tmp_path), x, fixed([[3], [7]]), tap="0")
    torch.testing.assert_close(maps, eager, rtol=1e-4, atol=1e-5)


def test_memory_format_auto_is_channels_last_for_convnets_only():
    from camshaft.engine.backends.base import resolve_memory_format

    conv, mlp = TinyCam(), torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    assert resolve_memory_format("auto", conv) == torch.channels_last
    assert resolve_memory_format("auto", torch.jit.script(conv)) == torch.channels_last  # scripted modules too
    exported = torch.export.export(TinyCam().eval(), (torch.zeros(1, 3, 4, 4),)).module()  # aten ops, no modules
    assert resolve_memory_format("auto", exported) == torch.channels_last
    assert resolve_memory_format("auto", mlp) == torch.contiguous_format
    assert resolve_memory_format("contiguous", conv) == torch.contiguous_format
    with pytest.raises(UnknownNameError, match="channels_last"):
        resolve_memory_format("nhwc", conv)


@pytest.mark.parametrize("name", ["eager", "torchscript"])
def test_channels_last_changes_no_result_and_hands_back_plain_tensors(name, resnet, tmp_path):
    from camshaft.engine.backends import backend_factory

    source = source_of(resnet, size=(64, 64))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    opened = {
        fmt: backend_factory(name)(
            source, taps=["layer3", "layer4"], preprocess={}, device=torch.device("cpu"), dtype=torch.float32,
            workdir=tmp_path / fmt, memory_format=fmt,
        )
        for fmt in ("channels_last", "contiguous")
    }
    assert opened["channels_last"].memory_format == torch.channels_last
    assert opened["contiguous"].memory_format == torch.contiguous_format
    if name == "eager":  # the weights are laid out as the images (no conversion at every call)
        weights = [p for p in opened["channels_last"].module.parameters() if p.dim() == 4]
        assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    out = {fmt: b.tap_gradients(x, fixed([[1, 2], [3, 4]])) for fmt, b in opened.items()}
    grads = {fmt: b.input_gradients(x, fixed([[1], [3]])) for fmt, b in opened.items()}
    for o in (out["channels_last"], grads["channels_last"]):
        tensors = [*o.taps.values(), *(o.grads or {}).values(), *([o.input_grads] if o.input_grads is not None else [])]
        assert tensors and all(t.is_contiguous() for t in tensors)
    torch.testing.assert_close(out["channels_last"].logits, out["contiguous"].logits, rtol=1e-4, atol=1e-4)
    for tap in ("layer3", "layer4"):
        torch.testing.assert_close(out["channels_last"].grads[tap], out["contiguous"].grads[tap], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads["channels_last"].input_grads, grads["contiguous"].input_grads, rtol=1e-4, atol=1e-6)


class _ViewsItsFeatures(nn.Module):
    """Flattens a 4-d feature map with ``view``, which a channels-last tensor does not allow."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        a = torch.relu(self.conv(x))
        return self.fc(a.view(a.shape[0], -1))


def test_a_model_that_cannot_run_channels_last_runs_in_the_default_layout(tmp_path):
    model = _ViewsItsFeatures().eval()
    backend = open_backend("eager", source_of(model, size=(8, 8)), tmp_path, taps=["conv"])
    assert backend.memory_format == torch.contiguous_format
    assert model.conv.weight.is_contiguous()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(backend.forward(x).logits, model(x))


def test_pt2_files_load_without_unpickling(tmp_path, monkeypatch):
    """torch.export.load may fall back to full unpickling; camshaft forces weights-only loads."""
    from camshaft.exporters import pt2 as pt2_export

    path = export_prepared(prepare_model(source_of(TinyCam()), taps=["features"]), format="pt2", out=tmp_path / "m.pt2")
    seen = []
    real = torch.export.load

    def spy(*args, **kwargs):
        seen.append(os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.export, "load", spy)
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    program, head, meta, _ = pt2_export.load(path)
    assert seen and all(v == "1" for v in seen) and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    assert meta.taps == ["features"] and program(torch.zeros(2, 3, 8, 8))[0].shape == (2, 3)

    def pickled(*args, **kwargs):
        import pickle

        raise pickle.UnpicklingError("Weights only load failed")

    monkeypatch.setattr(torch.export, "load", pickled)
    with pytest.raises(ConfigError, match="does not unpickle model files"):
        pt2_export.load(path)


class _RunsCode:
    """Unpickling it writes a file: proof that loading ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def _with_stored_object(src: Path, dst: Path, marker: Path, kind: str) -> None:
    """A copy of the archive ``src`` with a pickled object among its constants, as torch writes them."""
    import json
    import pickle
    import zipfile

    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        root = a.namelist()[0].split("/")[0]
        for name in a.namelist():
            data = a.read(name)
            if name.endswith("data/constants/model_constants_config.json"):
                config = json.loads(data)
                config["config"]["planted"] = {"path_name": f"{kind}_0", "is_param": False, "use_pickle": True,
                                               "tensor_meta": None}
                data = json.dumps(config).encode()
            b.writestr(name, data)
        b.writestr(f"{root}/data/constants/{kind}_0", pickle.dumps(_RunsCode(marker)))


@pytest.mark.parametrize("kind", ["opaque_obj", "custom_obj"])
def test_a_pt2_file_storing_python_objects_is_refused_before_anything_is_unpickled(tmp_path, kind):
    """torch.export.load reads a stored "opaque object" with plain pickle.loads, whatever torch.load
    is told; camshaft reads the archive's configs first."""
    from camshaft.exporters import pt2 as pt2_export

    path = export_prepared(prepare_model(source_of(TinyCam()), taps=["features"]), format="pt2", out=tmp_path / "m.pt2")
    evil, marker = tmp_path / "evil.pt2", tmp_path / "ran.txt"
    _with_stored_object(path, evil, marker, kind)
    if kind == "opaque_obj":  # the attack is real: torch itself runs the code
        with contextlib.suppress(Exception), pt2_export.weights_only():
            torch.export.load(str(evil))
        assert marker.read_text() == "code ran"
        marker.unlink()
    with pytest.raises(ConfigError, match="stores Python objects that loading it would unpickle"):
        pt2_export.load(evil)
    assert main(["inspect", str(evil)]) == 2
    assert not marker.exists()
    pt2_export.load(path)  # camshaft's own export passes


def test_pt2_export_of_data_dependent_control_flow_fails_clearly(tmp_path):
    prepared = prepare_model(source_of(Untraceable()), taps=["features"])
    with pytest.raises(ConfigError, match="torch.export cannot export 'Untraceable'.*use --format torchscript or onnx"):
        export_prepared(prepared, format="pt2", out=tmp_path / "u.pt2")
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("name", ["eager", "torchscript"])
def test_cuda_graphs_are_refused_on_the_cpu_with_the_reason(name, tmp_path):
    with pytest.raises(ConfigError, match=f"CUDA graphs need a CUDA device; the {name} backend runs on cpu"):
        open_backend(name, source_of(TinyCam().eval()), tmp_path, cuda_graphs=True)


def test_a_graphed_forward_needs_a_cuda_input_and_no_autograd():
    from camshaft.engine.backends.graphs import Graphed

    graphed = Graphed(lambda x: x + 1)
    with pytest.raises(ConfigError, match="need a CUDA device; the input is on cpu"), torch.no_grad():
        graphed(torch.ones(2))
    assert graphed.captures == 0


def test_torchscript_folds_batch_norms_of_the_trunk_gradient_methods_run_too(tmp_path):
    """On the CPU both the forward and the trunk below the tap run frozen (norms folded into the
    convolutions): Grad-CAM then costs what CAM costs, and the gradients are unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    source = source_of(model)
    ts = open_backend("torchscript", source, tmp_path / "ts", taps=["2"])
    eager = open_backend("eager", source_of(model), tmp_path / "eager", taps=["2"])
    trunk, _ = ts._split
    assert "batch_norm" not in str(trunk.inlined_graph) and "batch_norm" not in str(ts._full.inlined_graph)
    x = torch.randn(2, 3, 8, 8)
    select = lambda logits: torch.tensor([[0, 2], [1, 0]])  # noqa: E731
    got, want = ts.tap_gradients(x, select), eager.tap_gradients(x, select)
    torch.testing.assert_close(got.grads["2"], want.grads["2"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.taps["2"], want.taps["2"], rtol=1e-4, atol=1e-5)
