"""The model resolver: architectures, factories, files, safe weight loading, clear errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import TinyCam

from camshaft.errors import ConfigError, ModelSourceError
from camshaft.models.inspect import describe
from camshaft.models.sources import load_weights, resolve_model


def make_tiny():
    """A factory for the module:factory source (this test module is importable by pytest)."""
    return TinyCam()


class Payload:
    """An arbitrary object: torch.load(weights_only=True) must refuse to unpickle it."""


def test_torchvision_name_with_local_weights(tmp_path):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = resolve_model("resnet18").module
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    loaded = resolve_model("resnet18", weights=path)
    for (k, a), (_, b) in zip(reference.state_dict().items(), loaded.module.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert loaded.class_names and len(loaded.class_names) == 1000


def test_random_weights_warn():
    with pytest.warns(UserWarning, match="random weights"):
        resolve_model("resnet18")


def test_weights_are_never_unpickled(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": Payload()}, path)
    with pytest.raises(ConfigError, match="weights_only=True"):
        load_weights(TinyCam(), path)


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"other.weight": torch.zeros(1)}, path)
    with pytest.raises(ConfigError, match="missing .*features.0.weight.*unexpected .*other.weight"):
        load_weights(TinyCam(), path)


def test_module_factory_with_weights(tmp_path):
    reference = TinyCam()
    with torch.no_grad():
        reference.fc.bias.fill_(7.0)
    path = tmp_path / "tiny.pth"
    torch.save(reference.state_dict(), path)
    source = resolve_model("test_model_sources:make_tiny", weights=path)
    assert source.kind == "torch"
    assert torch.equal(source.module.fc.bias, torch.full((3,), 7.0))


def test_files_are_recognised(tmp_path):
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"not checked here")
    assert resolve_model(str(onnx_path)).kind == "onnx"
    import camshaft

    for fmt, suffix in (("torchscript", "pt"), ("pt2", "pt2")):  # written by camshaft export: run as they are
        path = camshaft.export("demo", format=fmt, out=tmp_path / f"m.{suffix}")
        assert resolve_model(str(path)).kind == fmt
    ts_path = tmp_path / "foreign.pt"  # from elsewhere: a torch model converted from the file (test_foreign_files)
    torch.jit.save(torch.jit.script(TinyCam()), str(ts_path))
    with pytest.warns(UserWarning, match="carries no camshaft metadata"):
        assert resolve_model(str(ts_path), preprocess={"input_size": (8, 8)}).kind == "torch"
    pt2_path = tmp_path / "foreign.pt2"
    torch.export.save(torch.export.export(TinyCam().eval(), (torch.zeros(1, 3, 4, 4),)), str(pt2_path))
    with pytest.raises(ConfigError, match="exported for batches of exactly 1"):
        resolve_model(str(pt2_path))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"junk")
    with pytest.raises(ModelSourceError, match="not an ONNX file"):
        resolve_model(str(junk))


def test_unknown_spec_lists_everything_tried():
    with pytest.raises(ModelSourceError) as info:
        resolve_model("resnet1800")
    message = str(info.value)
    assert "no such file" in message and "module:factory" in message and "torchvision architecture" in message


def test_bad_factory_is_explained():
    with pytest.raises(ModelSourceError, match="cannot import"):
        resolve_model("no_such_module_xyz:build")


def test_weights_for_a_file_are_refused(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"x")
    with pytest.raises(ConfigError, match="--weights"):
        resolve_model(str(path), weights=tmp_path / "w.pth")


@pytest.mark.parametrize(
    ("name", "tap", "cam"),
    [
        ("resnet18", "layer4", "fc"),
        ("vgg11_bn", "features", None),
        ("mobilenet_v3_small", "features", None),
        ("efficientnet_b0", "features", "classifier.1"),
        ("convnext_tiny", "features", None),
        ("densenet121", "relu", "classifier"),
    ],
)
def test_default_tap_and_cam_head_of_torchvision_architectures(name, tap, cam):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = resolve_model(name).module
    report = describe(model, input_size=(64, 64))
    assert report.default_tap == tap
    assert (report.cam_head.linear if report.cam_head else None) == cam
    assert report.num_classes == 1000


def test_a_fine_tuned_torchvision_checkpoint_keeps_its_class_count(tmp_path):
    torch.manual_seed(0)
    import torchvision

    tuned = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    path = tmp_path / "tuned.pth"
    torch.save(tuned.state_dict(), path)
    source = resolve_model("mobilenet_v3_small", weights=path)
    assert source.module.classifier[-1].out_features == 10 and source.class_names is None
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(source.module(x), tuned(x))


def test_weights_of_other_shapes_are_named(tmp_path):
    other = TinyCam()
    other.features[0] = torch.nn.Conv2d(3, 2, 3, padding=1, bias=False)  # another kernel size
    path = tmp_path / "w.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(ConfigError, match=r"other shapes for features.0.weight \(2, 3, 3, 3\) \(the model's: \(2, 3, 1, 1\)\)"):
        load_weights(TinyCam(), path)


class Wrapper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.module = TinyCam()

    def forward(self, x):
        return self.module(x)


def test_a_model_whose_top_module_is_named_module_loads_its_own_state(tmp_path):
    reference = Wrapper()
    path = tmp_path / "w.pth"
    torch.save(reference.state_dict(), path)
    model = Wrapper()
    load_weights(model, path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_a_checkpoint_or_text_in_the_wrong_place_is_named(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(TinyCam().state_dict(), path)
    with pytest.raises(ModelSourceError, match=r"a torch.save checkpoint \(weights\), not a model.*--weights"):
        resolve_model(str(path))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ConfigError, match=r"weights_only=True .*: KeyError: 101 \(is it a torch.save checkpoint\?\)\. Save a plain state_dict"):
        load_weights(TinyCam(), text)


def test_an_input_size_beyond_memory_is_one_clear_error(tmp_path, capsys, monkeypatch):
    """A petabyte image fails to allocate on any machine, whatever its overcommit policy."""
    from conftest import run_cli

    from camshaft.demo.shapes import write_demo_dataset

    monkeypatch.setenv("CAMSHAFT_NO_REEXEC", "1")
    write_demo_dataset(tmp_path / "data", n=1)
    huge = "10000000"
    for argv in (
        ("explain", "demo", tmp_path / "data" / "images", "--out", tmp_path / "out", "--no-progress"),
        ("inspect", "demo"),
        ("export", "demo", "--format", "onnx", "--out", tmp_path / "out.onnx"),
        ("actmax", "demo", "--objective", "class:0", "--out", tmp_path / "out", "--no-progress"),
    ):
        code, _, err = run_cli(capsys, *argv, "--input-size", huge)
        assert code == 2 and f"a {huge}x{huge} input needs more memory than cpu has" in err, (argv, err)
        assert "Traceback" not in err
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())


@pytest.mark.parametrize("env", [{"CAMSHAFT_NO_REEXEC": "1"}, {}], ids=["console-script", "re-executed"])
def test_the_command_imports_a_module_factory_from_the_current_folder(tmp_path, env):
    """``camshaft inspect mymodels:build`` in the folder of mymodels.py works whether or not the CLI re-executes
    itself as ``python -m camshaft`` (which puts the current folder on the path; the console script did not)."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    script = shutil.which("camshaft") or str(Path(sys.executable).parent / "camshaft")
    if not os.path.exists(script):
        pytest.skip("the camshaft console script is not installed")
    (tmp_path / "mymodels.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))\n"
    )
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CAMSHAFT_NO_REEXEC", "GLIBC_TUNABLES")}
    done = subprocess.run([script, "inspect", "mymodels:build"], cwd=tmp_path, env={**clean, **env},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "CAM head: global average pool of 1 -> 4 (3, 4)" in done.stdout
