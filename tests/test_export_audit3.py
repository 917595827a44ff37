"""Export and model-source audit: clear errors for bad checkpoints, factories, inputs and --out paths,
and a parity check that neither NaN nor small outputs can slip through."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

import pytest
from conftest import TinyCam, source_of

from camshaft.cli import main
from camshaft.errors import ConfigError, ModelSourceError, ParityError
from camshaft.exporters import _parity, check_artifact_path, export_prepared
from camshaft.models.prepared import prepare_model
from camshaft.models.sources import load_weights, resolve_model


def test_a_pickled_model_as_weights_names_the_object_without_torchs_advice(tmp_path):
    path = tmp_path / "full.pth"
    torch.save(nn.Sequential(nn.Conv2d(3, 2, 1)), path)
    with pytest.raises(ConfigError, match=r"stores the Python object torch\.nn\.modules\.container\.Sequential") as e:
        load_weights(nn.Sequential(nn.Conv2d(3, 2, 1)), path)
    assert "can still be loaded" not in str(e.value) and "\x1b[" not in str(e.value)
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match=r"UnpicklingError: Unsupported operand .*is it a torch.save") as e:
        load_weights(nn.Sequential(nn.Conv2d(3, 2, 1)), tmp_path / "text.pth")
    assert "weights_only` set to `False` will likely succeed" not in str(e.value)


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module._orig_mod."])
def test_a_checkpoint_of_a_compiled_model_loads(tmp_path, prefix):
    torch.manual_seed(0)
    trained, fresh = TinyCam(), TinyCam()
    nn.init.normal_(trained.fc.weight)
    torch.save({"state_dict": {prefix + k: v for k, v in trained.state_dict().items()}}, tmp_path / "c.pth")
    load_weights(fresh, tmp_path / "c.pth")
    assert torch.equal(fresh.fc.weight, trained.fc.weight)


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "audit3_models.py").write_text(
        "from torch import nn\n"
        "def needs(n):\n    return nn.Linear(n, n)\n"
        "instance = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))\n"
        "number = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "audit3_models"


def test_a_factory_that_needs_arguments_is_refused_before_the_call(factories):
    with pytest.raises(ModelSourceError, match=r"needs\(\) cannot be called without arguments.*'n'"):
        resolve_model(f"{factories}:needs")
    with pytest.raises(ModelSourceError, match="number is a int, not a callable"):
        resolve_model(f"{factories}:number")


def test_a_model_instance_is_accepted_in_place_of_a_factory(factories):
    import audit3_models

    source = resolve_model(f"{factories}:instance")
    assert source.module is audit3_models.instance


class Gray(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pool, self.fc = nn.Conv2d(1, 2, 1), nn.MaxPool2d(4), nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(self.pool(self.conv(x)).mean((2, 3)))


class Pooled(Gray):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)


def test_an_input_the_model_cannot_take_is_a_clear_error_with_an_explicit_tap():
    with pytest.raises(ConfigError, match=r"cannot run on a 8x8 input \(camshaft feeds it RGB images, 3 channels\)"):
        prepare_model(source_of(Gray()), taps=["conv"])
    with pytest.raises(ConfigError, match=r"cannot run on a 2x2 input \(choose another --input-size\)"):
        prepare_model(source_of(Pooled(), size=(2, 2)), taps=["conv"])


class Broken(Pooled):
    def forward(self, x):
        raise RuntimeError("index_put_ is not implemented for this model's own reasons")


def test_a_model_that_fails_for_another_reason_is_not_told_to_change_its_input_size():
    with pytest.raises(ConfigError, match=r"the model failed on a 8x8 test input: index_put_ is not") as caught:
        prepare_model(source_of(Broken()), taps=["conv"])
    assert "--input-size" not in str(caught.value) and "cannot run on" not in str(caught.value)


def test_an_out_that_is_a_folder_or_cannot_be_written_is_refused_first(tmp_path, capsys):
    assert main(["export", "demo", "--format", "torchscript", "--out", str(tmp_path)]) == 2
    assert f"--out {str(tmp_path)!r} is a folder" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="cannot write --out .*Not a directory"):
        check_artifact_path("pt2", tmp_path / "file" / "sub" / "m.pt2")


def test_a_failed_export_leaves_no_folder_behind(tmp_path):
    prepared = prepare_model(source_of(TinyCam()), taps=["features"])
    with pytest.raises(ParityError):
        export_prepared(prepared, format="torchscript", out=tmp_path / "a" / "b" / "m.pt", rtol=-1.0)
    assert list(tmp_path.iterdir()) == []


def _fixed(logits, tap):
    return lambda x: (logits, {"t": tap})


def test_parity_fails_when_the_artifact_gives_nan():
    ref = torch.ones(1, 3)
    with pytest.raises(ParityError, match="logits: max abs error inf"):
        _parity(_fixed(ref, ref), _fixed(torch.tensor([[1.0, math.nan, 1.0]]), ref), [torch.zeros(1)], rtol=1e-3)
    both = torch.tensor([[math.nan, math.inf, 1.0]])  # the same NaN and infinity in both agree
    assert _parity(_fixed(both, ref), _fixed(both.clone(), ref), [torch.zeros(1)], rtol=1e-3) == {"logits": 0, "t": 0}


def test_parity_is_relative_for_outputs_much_smaller_than_one():
    small = torch.full((1, 3), 1e-9)  # randomly initialised MobileNet / EfficientNet logits are this small
    with pytest.raises(ParityError, match="logits"):
        _parity(_fixed(small, small), _fixed(torch.zeros(1, 3), small), [torch.zeros(1)], rtol=1e-3)
    close = small * (1 + 1e-6)
    assert _parity(_fixed(small, small), _fixed(close, small), [torch.zeros(1)], rtol=1e-3)["logits"] < 1e-14


class Histogram(TinyCam):
    """An op no ONNX exporter knows."""

    def forward(self, x):
        a = self.features(x)
        a = a + torch.histc(a, bins=4).sum() * 0
        return self.fc(torch.flatten(self.avgpool(a), 1))


def test_a_model_onnx_cannot_express_is_one_clear_error(tmp_path, capfd):
    prepared = prepare_model(source_of(Histogram()), taps=["features"])
    print("before", flush=True)
    with pytest.raises(ConfigError, match=r"cannot export 'Histogram' to ONNX \(dynamo: .*histc.*use --format") as e:
        export_prepared(prepared, format="onnx", out=tmp_path / "h.onnx")
    print("after", flush=True)
    assert "\n" not in str(e.value) and "\x1b[" not in str(e.value)
    assert list(tmp_path.iterdir()) == []
    out, err = capfd.readouterr()  # the TorchScript-based exporter's C++ graph dump stays off the terminal
    assert out == "before\nafter\n" and "graph" not in err, (out[:300], err[:300])


class _OffHead(nn.Module):
    """A head that disagrees with the model it was split from (as a wrong split would)."""

    def __init__(self, head):
        super().__init__()
        self.inner = head

    def forward(self, a):
        logits, taps = self.inner(a)
        return logits + 1.0, taps


@pytest.mark.parametrize("format", ["onnx", "pt2"])
def test_the_embedded_head_is_parity_checked(tmp_path, format, capsys, monkeypatch):
    monkeypatch.setenv("CAMSHAFT_NO_REEXEC", "1")
    torch.manual_seed(0)
    prepared = prepare_model(source_of(TinyCam()), taps=["features"])
    assert prepared.split is not None
    out = export_prepared(prepared, format=format, out=tmp_path / f"m.{format}")
    assert main(["inspect", str(out)]) == 0
    assert re.search(r"parity \(max abs error\): .*head logits \d", capsys.readouterr().out)  # recorded in the file
    prepared.split.head = _OffHead(prepared.split.head)
    with pytest.raises(ParityError, match="the embedded head .*logits"):
        export_prepared(prepared, format=format, out=tmp_path / f"off.{format}")
    assert not (tmp_path / f"off.{format}").exists()


def test_an_input_too_small_for_any_feature_map_says_so(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("CAMSHAFT_NO_REEXEC", "1")
    assert main(["inspect", "resnet18", "--input-size", "1"]) == 0  # every map 1x1, as the input
    out = capsys.readouterr().out
    assert "default tap: none (no feature map larger than 1x1 at a 1x1 input; choose a larger --input-size)" in out
    assert "CAM head: none (no default tap)" in out and "use gradcam" not in out
    out_file = str(tmp_path / "m.pt")
    assert main(["export", "resnet18", "--input-size", "1", "--format", "torchscript", "--out", out_file]) == 2
    assert "no feature map larger than 1x1 at a 1x1 input; choose a larger --input-size" in capsys.readouterr().err


class _Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def test_a_pt2_of_a_channels_last_live_model_stores_dense_weights_and_loads_without_warnings(tmp_path):
    """The eager backend lays a live model's weights out channels-last; a .pt2 of it stored them as storage
    slices, and loading warned once per weight ('No complete tensor found in the group')."""
    import warnings

    from camshaft.exporters.pt2 import load

    torch.manual_seed(0)
    model = _Convs().eval().to(memory_format=torch.channels_last)
    assert not model.features[0].weight.is_contiguous()
    prepared = prepare_model(source_of(model, size=(12, 12)), taps=("features",), preprocess=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = export_prepared(prepared, format="pt2", out=tmp_path / "m.pt2")  # its parity check loads it
        program, *_ = load(path)
    x = torch.randn(2, 3, 12, 12)
    logits, tap = program(x)  # flat: logits, then the taps
    torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close(tap, model.features(x))
    assert not model.features[0].weight.is_contiguous()  # the user's model keeps its own layout
