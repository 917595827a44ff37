"""Small defects found in a README walkthrough: messages, reprs and the inspect table."""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from camshaft.api import feature_maps, inspect
from camshaft.cli import main
from camshaft.engine.actmax.job import ActmaxJob, _torch_model
from camshaft.engine.backends.registry import _artifact, open_eager
from camshaft.engine.featmaps import FeatureMaps
from camshaft.engine.targets import Targets
from camshaft.errors import ConfigError
from camshaft.models.prepared import prepare_model
from camshaft.models.sources import ModelSource, kind_name, load_weights
from camshaft.preprocess import Preprocess


# --- a model kind in a sentence ---------------------------------------------------------------------


def test_each_kind_reads_naturally():
    assert [kind_name(k) for k in ("onnx", "torchscript", "pt2", "torch")] == [
        "an ONNX file", "a TorchScript file", "a .pt2 file", "a torch model"]


def test_messages_name_the_kind_with_the_right_article(tmp_path):
    onnx, script, pt2 = (ModelSource(k, f"m.{k}", path=tmp_path / f"m.{k}") for k in ("onnx", "torchscript", "pt2"))
    with pytest.raises(ConfigError, match=r"'m.onnx' is an ONNX file, not a torch model"):
        prepare_model(onnx)
    with pytest.raises(ConfigError, match=r"'m.torchscript' is a TorchScript file; it cannot run on the onnx backend"):
        _artifact(script, "onnx", taps=None, preprocess={}, workdir=tmp_path)
    with pytest.raises(ConfigError, match=r"'m.pt2' is a \.pt2 file \(use --backend pt2, or auto"):
        open_eager(pt2, preprocess={}, device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ConfigError, match=r"inspect reads torch models; 'm.onnx' is an ONNX file$"):
        inspect(onnx)


def test_actmax_names_the_kind_with_the_right_article(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"")  # only its suffix is read before the refusal
    job = ActmaxJob(model=str(path), objectives=("class:0",), out=tmp_path / "out")
    with pytest.raises(ConfigError, match=r"is an ONNX file\. Use the architecture name"):
        _torch_model(job)


# --- class names in a --targets error -----------------------------------------------------------------


def test_unknown_targets_add_an_ellipsis_only_when_names_are_left_out():
    five = ["circle", "square", "triangle", "cross", "ring"]
    with pytest.raises(ConfigError, match=r"names such as circle, square, triangle, cross, ring$"):
        Targets.parse("hexagon", class_names=five, num_classes=5)
    with pytest.raises(ConfigError, match=r"names such as circle, square, triangle, cross, ring, \.\.\.$"):
        Targets.parse("hexagon", class_names=[*five, "star"], num_classes=6)


# --- FeatureMaps in a notebook ------------------------------------------------------------------------


def test_feature_maps_repr_is_one_short_line():
    maps = FeatureMaps("layer4", list(range(16)), np.zeros((16, 7, 7), np.float32), Image.new("RGB", (64, 48)),
                       None, Preprocess())
    assert repr(maps) == "FeatureMaps('layer4': 16 channels, maps (16, 7, 7), image 64x48)"


# --- the random-weights warning -----------------------------------------------------------------------

NO_WEIGHTS = ("resnet18: no weights given (--weights, or weights= in Python), using random weights: "
              "results are meaningless")


def test_the_no_weights_warning_names_both_ways_and_points_at_the_caller(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(image)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inspect("resnet18", input_size=32)
        feature_maps("resnet18", image, input_size=32, top=2)
    mine = [w for w in caught if str(w.message) == NO_WEIGHTS]
    assert len(mine) == 2, [str(w.message) for w in caught]
    assert {w.filename for w in mine} == {__file__}


# --- the inspect table ------------------------------------------------------------------------------


def test_inspect_heads_its_table_with_aligned_column_names(capsys, monkeypatch):
    monkeypatch.setenv("CAMSHAFT_NO_REEXEC", "1")
    assert main(["inspect"]) == 0  # the demo model
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["layer", "type", "output", "shape"]
    row = next(r for r in rows if r.startswith("features.0 "))
    assert row.index("Conv2d") == header.index("type") and row.index("16x96x96") == header.index("output shape")


# --- weights of other shapes ----------------------------------------------------------------------------


def test_weights_of_other_shapes_are_listed_as_text(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(torch.nn.Sequential(*(torch.nn.Linear(3, 3) for _ in range(3))).state_dict(), path)
    model = torch.nn.Sequential(*(torch.nn.Linear(2, 2) for _ in range(3)))
    with pytest.raises(ConfigError) as e:
        load_weights(model, path)
    assert str(e.value).endswith(
        "other shapes for 0.weight (3, 3) (the model's: (2, 2)), 0.bias (3,) (the model's: (2,)), "
        "1.weight (3, 3) (the model's: (2, 2)), 1.bias (3,) (the model's: (2,)) and 2 more")


def test_output_into_a_closed_pipe_ends_quietly(monkeypatch, capsys):
    """``camshaft inspect resnet18 | head -1``: was a BrokenPipeError traceback."""
    read, write = os.pipe()
    os.close(read)  # the reader has gone
    pipe = os.fdopen(write, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", pipe)
    monkeypatch.setenv("CAMSHAFT_NO_REEXEC", "1")
    try:
        assert main(["inspect", "demo"]) == 141  # 128 + SIGPIPE, as a shell reports a reader that left
    finally:
        monkeypatch.undo()
        pipe.close()
    assert "Traceback" not in capsys.readouterr().err
