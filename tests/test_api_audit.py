"""The Python API as a notebook uses it: paths as str or Path, lists or tuples or one number where the CLI
takes them, a clear ConfigError naming the argument otherwise, and a convenient ``Results``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

import camshaft
from camshaft.demo.shapes import write_demo_dataset
from camshaft.exporters import torchscript
from camshaft.errors import ConfigError, ModelSourceError
from camshaft.writers.overlay import normalize_map
from conftest import run_cli

FAST = {"scheduler": "sync", "workers": 1, "progress": False}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("data"), n=4, seed=0).parent / "images"


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    camshaft.explain(None, str(data), out=str(out), targets="top:2", **FAST)
    return out


def test_explain_takes_one_number_and_lists_as_the_cli_does(data, tmp_path, capsys):
    out = tmp_path / "api"
    camshaft.explain(Path("demo"), data, out=out, method=["cam"], targets=[0, "square"], input_size=48, mean=0.5,
                     std=np.array([0.25, 0.25, 0.25]), **FAST)
    api = camshaft.load_results(out)
    assert api.attrs["preprocess"] == {"input_size": [48, 48], "mean": [0.5] * 3, "std": [0.25] * 3,
                                       "resize": "stretch"}
    assert api.targets.tolist() == [[0, 1]] * 4
    code, _, err = run_cli(capsys, "explain", "demo", data, "--out", tmp_path / "cli", "--method", "cam",
                           "--targets", "0,square", "--input-size", "48", "--mean", "0.5", "--std", "0.25",
                           "--scheduler", "sync", "--workers", "1", "--no-progress")
    assert code == 0, err
    cli = camshaft.load_results(tmp_path / "cli")
    assert cli.attrs["preprocess"] == api.attrs["preprocess"]
    np.testing.assert_array_equal(cli.maps[:], api.maps[:])
    again = camshaft.explain("demo", str(data), out=str(out), method="cam", targets="0,square", input_size=(48, 48),
                             mean=(0.5, 0.5, 0.5), std=[0.25] * 3, **FAST)
    assert again.explained == 0  # the same job: resumed, not started over


@pytest.mark.parametrize(
    "argument, value",
    [
        ("model", nn.Linear(2, 2)),
        ("model", 3),
        ("data", None),
        ("out", None),
        ("method", None),
        ("method", 3),
        ("targets", 3),
        ("targets", []),
        ("mean", object()),
        ("weights", 3),
        ("metrics", [1]),
    ],
)
def test_explain_refuses_a_wrong_type_naming_the_argument(data, tmp_path, argument, value):
    kwargs = {"model": None, "data": data, "out": tmp_path / "run", argument: value}
    with pytest.raises(ConfigError, match=argument):
        camshaft.explain(kwargs.pop("model"), kwargs.pop("data"), **kwargs, **FAST)
    assert not (tmp_path / "run").exists()


def test_a_model_path_is_a_file_path(data, tmp_path):
    with pytest.raises(ModelSourceError, match="no such file"):
        camshaft.explain(tmp_path / "missing.pt", data, out=tmp_path / "run", **FAST)
    with pytest.raises(ModelSourceError, match="no such file"):
        camshaft.inspect(tmp_path / "missing.pt")


def test_export_takes_one_tap_as_a_string_and_a_square_size(tmp_path):
    out = camshaft.export(None, format="torchscript", taps="features", input_size=48, out=tmp_path / "demo.pt")
    _, meta, _ = torchscript.load(out)
    assert meta.taps == ["features"] and meta.preprocess.input_size == (48, 48)
    with pytest.raises(ConfigError, match="model"):
        camshaft.export(nn.Linear(2, 2), format="onnx", out=tmp_path / "m.onnx")


def test_inspect_a_live_module_in_train_mode_leaves_it_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(4),
                          nn.Linear(4, 2))
    model[0].eval()  # a mixed state, restored as it was
    stats = model[4].running_mean.clone()
    report = camshaft.inspect(model, input_size=[16, 16])
    assert report.num_classes == 2 and report.default_tap == "1"
    assert model.training and model[4].training and not model[0].training
    assert torch.equal(model[4].running_mean, stats)
    with pytest.raises(ConfigError, match="weights"):
        camshaft.inspect(model, weights="w.pt")


def test_results_read_maps_by_index_or_path(run, data, monkeypatch):
    results = camshaft.load_results(run)
    stored = np.asarray(zarr.open_group(run / "maps.zarr", mode="r")["maps"][:])
    table = results.table
    n = len(table)
    for index, path in zip(table["index"], table["path"]):
        np.testing.assert_array_equal(results.map(path), stored[index])
        np.testing.assert_array_equal(results.map(Path(path)), stored[index])
        np.testing.assert_array_equal(results.map(np.int64(index)), stored[index])
        np.testing.assert_allclose(results.map(index).max(axis=(1, 2)), table.set_index("index").loc[index, "map_max"])
    monkeypatch.chdir(data)
    relative = Path(table["path"][1]).relative_to(data)
    np.testing.assert_array_equal(results.map(relative), stored[1])
    np.testing.assert_array_equal(results.map(-1, upsample=True), results.map(n - 1, upsample=True))
    normalized = results.map(0, normalize=True)
    np.testing.assert_array_equal(normalized, np.stack([normalize_map(m) for m in stored[0]]))
    assert normalized.max() == 1.0
    assert results.class_names == ["circle", "square", "triangle", "cross", "ring"]
    for wrong in (n, -n - 1, 1.0, "nope.jpg"):
        with pytest.raises(ConfigError, match="nope.jpg" if wrong == "nope.jpg" else f"0..{n - 1}"):
            results.map(wrong)


def test_load_results_refuses_a_non_path():
    with pytest.raises(ConfigError, match="out must be a path"):
        camshaft.load_results(None)


def test_dir_lists_the_lazy_api():
    assert set(camshaft.__all__) <= set(dir(camshaft))


def test_job_counts_of_the_wrong_type_are_refused_by_name(data, tmp_path):
    from camshaft.engine.job import ExplainJob
    from camshaft.engine.jobfile import load_job

    with pytest.raises(ConfigError, match=r"batch_size must be an integer, received '4'; workers must be an integer"):
        ExplainJob(model=None, data=data, out=tmp_path / "o", batch_size="4", workers=True)
    job = tmp_path / "job.toml"
    job.write_text(f'data = "{data}"\nout = "o"\npartition-size = "3"\n')
    with pytest.raises(ConfigError, match="partition_size must be an integer, received '3'"):
        load_job(job)
    assert not (tmp_path / "o").exists()


def test_preprocess_and_model_specs_of_the_wrong_type_are_config_errors():
    from camshaft.models.sources import resolve_model
    from camshaft.preprocess import Preprocess

    with pytest.raises(ConfigError, match="input_size must be a sequence of numbers, received 64"):
        Preprocess(input_size=64)
    with pytest.raises(ConfigError, match=r"received Linear \(a live nn.Module: give its package.module:factory\)"):
        resolve_model(nn.Linear(2, 2))
    assert resolve_model(Path("demo")).spec == "demo"


def test_actmax_takes_one_spec_and_one_number_and_refuses_a_dict_config(tmp_path):
    from camshaft.engine.actmax import RenderConfig

    summary = camshaft.actmax(Path("demo"), "class:0,3", out=tmp_path / "am", input_size=32, mean=0.5,
                              config=RenderConfig(steps=1, device="cpu"), progress=False)
    assert [r["spec"] for r in summary.rows] == ["class:0", "class:3"]
    with pytest.raises(ConfigError, match="config must be a RenderConfig"):
        camshaft.actmax(None, ["class:0"], out=tmp_path / "am2", config={"steps": 3})
    assert not (tmp_path / "am2").exists()


def test_feature_maps_take_one_channel_and_refuse_a_text_top(data):
    image = sorted(data.rglob("*.png"))[0]
    fm = camshaft.feature_maps(Path("demo"), image, channels=3)
    assert fm.channels == [3] and fm.maps.shape[0] == 1
    for kwargs, message in (({"top": "4"}, "--top must be a positive integer, received '4'"),
                            ({"channels": ["a"]}, r"channels must be channel indices \(integers\)")):
        with pytest.raises(ConfigError, match=message):
            camshaft.feature_maps(None, image, **kwargs)


def test_results_repr_is_one_line(run):
    text = repr(camshaft.load_results(run))
    assert text == f"Results({str(run)!r}: gradcam on 4 images, 4 ok; maps (4, 2, 12, 12))"


def test_feature_maps_take_the_preprocessing_as_the_other_functions_do(data):
    image = sorted(data.rglob("*.png"))[0]
    fm = camshaft.feature_maps(None, image, channels=[0], input_size=48, mean=0.5)
    assert fm.preprocess.input_size == (48, 48) and fm.preprocess.mean == (0.5, 0.5, 0.5)
    old = camshaft.feature_maps(None, image, channels=[0], preprocess={"input_size": (48, 48), "mean": (0.5,) * 3})
    np.testing.assert_array_equal(fm.maps, old.maps)
    with pytest.raises(ConfigError, match="give preprocess or input_size/mean/std/resize, not both"):
        camshaft.feature_maps(None, image, input_size=48, preprocess={"resize": "stretch"})
