"""--class-names: a user's names for a model's classes, read, checked and carried to every output."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

import camshaft
from camshaft.demo.model import CLASS_NAMES
from camshaft.demo.shapes import write_demo_dataset
from camshaft.engine.job import ExplainJob
from camshaft.engine.jobfile import load_job
from camshaft.errors import ConfigError
from camshaft.exporters.onnx import read_metadata
from camshaft.models.classes import read_class_names

NAMES = ("ball", "box", "tri", "plus", "donut")  # the demo model's five classes, renamed


@pytest.fixture(autouse=True)
def _no_reexec(monkeypatch):
    monkeypatch.setenv("CAMSHAFT_NO_REEXEC", "1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_demo_dataset(root, n=4, seed=0)
    return root / "images"


@pytest.fixture
def names(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("\n".join(NAMES) + "\n\n")  # trailing blank lines end the file
    return path


def _table(out):
    return pq.read_table(out / "results.parquet").to_pandas()


@pytest.mark.parametrize(
    "name, text",
    [
        ("a.txt", "ball\r\n box \ntri\nplus\ndonut"),  # CRLF, stray spaces, no final newline
        ("a.json", json.dumps(list(NAMES))),
        ("a.json", json.dumps({str(i): n for i, n in reversed(list(enumerate(NAMES)))})),
        ("a.json", json.dumps({str(i): [f"n0{i}", n] for i, n in enumerate(NAMES)})),  # imagenet_class_index.json
    ],
)
def test_the_accepted_formats(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert read_class_names(path) == NAMES


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("a.txt", b"ball\n\nbox\n", "line 2 is blank"),
        ("a.txt", b"ball\nbox\nball\n", r"repeated names \['ball'\]"),
        ("a.txt", b"\n\n", "no names"),
        ("a.txt", b"caf\xe9\n", "not UTF-8"),
        ("a.json", b"[\"a\", ", "not valid JSON"),
        ("a.json", b"{\"0\": \"a\", \"2\": \"b\"}", "from 0 to 1 without gaps"),
        ("a.json", b"{\"cat\": 0}", "must be class indices"),
        ("a.json", b"[1, 2]", "expected a JSON list of names"),
        ("a.json", b"[\"a\", \" \"]", "class 1 has an empty name"),
    ],
)
def test_bad_files_are_refused_with_the_reason(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        read_class_names(path)


def test_export_stores_the_names_and_explain_on_the_file_can_replace_them(tmp_path, capsys, data, names):
    artifact = tmp_path / "m.onnx"
    code, _, err = run_cli(capsys, "export", "demo", "--format", "onnx", "--out", artifact, "--class-names", names)
    assert code == 0, err
    meta, _, _ = read_metadata({p.key: p.value for p in onnx.load(str(artifact)).metadata_props})
    assert meta.class_names == list(NAMES)
    code, out, err = run_cli(capsys, "inspect", artifact)
    assert code == 0 and "classes: 5 (ball, box, tri, plus, donut)\n" in out, err

    code, _, err = run_cli(capsys, "explain", artifact, data, "--out", tmp_path / "a", "--backend", "onnxruntime",
                           "--targets", "donut,box", "--no-progress")
    assert code == 0, err
    table = _table(tmp_path / "a")
    assert table["targets"].map(list).tolist() == [[4, 1]] * 4
    assert table["target_names"].map(list).tolist() == [["donut", "box"]] * 4
    assert set(table["top5_names"][0]) == set(NAMES)

    other = tmp_path / "other.json"
    other.write_text(json.dumps(list("ABCDE")))
    code, _, err = run_cli(capsys, "explain", artifact, data, "--out", tmp_path / "b", "--backend", "onnxruntime",
                           "--targets", "E,B", "--class-names", other, "--no-progress")
    assert code == 0, err
    table = _table(tmp_path / "b")
    assert table["targets"].map(list).tolist() == [[4, 1]] * 4
    assert table["target_names"].map(list).tolist() == [["E", "B"]] * 4
    assert camshaft.load_results(tmp_path / "b").attrs["class_names"] == list("ABCDE")


def test_an_eager_run_takes_the_names_and_a_rerun_with_others_does_not_reuse_the_old_table(tmp_path, data, names):
    out = tmp_path / "run"
    camshaft.explain("demo", data, out=out, class_names=names, progress=False)
    assert {n for row in _table(out)["target_names"] for n in row} <= set(NAMES)
    renamed = tmp_path / "renamed.txt"
    renamed.write_text("\n".join(n.upper() for n in NAMES))
    summary = camshaft.explain("demo", data, out=out, class_names=renamed, progress=False)
    assert summary.explained == 4  # the table's names changed: nothing is reused
    assert {n for row in _table(out)["target_names"] for n in row} <= {n.upper() for n in NAMES}
    assert camshaft.explain("demo", data, out=out, class_names=renamed, progress=False).explained == 0


def test_a_wrong_count_fails_before_any_work(tmp_path, capsys, data):
    two = tmp_path / "two.txt"
    two.write_text("a\nb\n")
    for argv in (
        ("explain", "demo", data, "--out", tmp_path / "e", "--no-progress"),
        ("export", "demo", "--format", "torchscript", "--out", tmp_path / "e.pt"),
        ("actmax", "demo", "--objective", "class:0", "--out", tmp_path / "e", "--steps", "1", "--no-progress"),
    ):
        code, _, err = run_cli(capsys, *argv, "--class-names", two)
        assert code == 2 and "2 class names for demo, which has 5 classes" in err, (argv, err)
    assert not any(p.name.startswith("e") for p in tmp_path.iterdir())


def test_a_bad_file_fails_the_job_with_the_other_problems(tmp_path, data):
    with pytest.raises(ConfigError, match=r"batch size must be .*; class names file not found: .*nowhere.txt"):
        ExplainJob(model="demo", data=data, out=tmp_path / "o", class_names=tmp_path / "nowhere.txt", batch_size=0)


def test_job_files_take_the_path_relative_to_themselves(tmp_path, data, names):
    job = tmp_path / "nightly.toml"
    job.write_text(f'data = "{data}"\nout = "o"\nclass-names = "names.txt"\n')
    assert load_job(job).class_names == names.resolve()


def test_actmax_objectives_and_table_use_the_names(tmp_path, capsys, names):
    out = tmp_path / "am"
    code, _, err = run_cli(capsys, "actmax", "demo", "--objective", "class:donut,ball", "--out", out, "--steps", "1",
                           "--input-size", "32", "--class-names", names, "--no-progress", "--device", "cpu")
    assert code == 0, err
    table = _table(out)
    assert table["target"].tolist() == [4, 0] and table["target_name"].tolist() == ["donut", "ball"]
    assert CLASS_NAMES[4] != "donut"  # the model's own names were replaced


def test_an_onnx_file_from_elsewhere_gets_names_only_from_the_user(tmp_path):
    import warnings

    import torch
    from conftest import TinyCam, open_backend

    from camshaft.models.sources import resolve_model

    path = tmp_path / "plain.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TinyCam().eval(), (torch.randn(1, 3, 8, 8),), str(path), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "b"}})
    (tmp_path / "three.txt").write_text("red\ngreen\nblue\n")
    (tmp_path / "four.txt").write_text("red\ngreen\nblue\ncyan\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no camshaft metadata: ImageNet preprocessing assumed
        assert open_backend("onnxruntime", resolve_model(str(path)), tmp_path).info.class_names is None
        named = open_backend("onnxruntime", resolve_model(str(path), class_names=tmp_path / "three.txt"), tmp_path)
        assert named.info.class_names == ("red", "green", "blue")
        with pytest.raises(ConfigError, match="4 class names for .*plain.onnx, which has 3 classes"):
            open_backend("onnxruntime", resolve_model(str(path), class_names=tmp_path / "four.txt"), tmp_path)


def test_numeric_class_names_in_folder_order_are_read_as_names_for_labels(data, tmp_path):
    """An ImageFolder tree of numeric folders (1..5) sorted as text, as torchvision does: the label "3" is the
    class named "3". It was read as index 3 first: the class named "4", a silently wrong target."""
    import shutil

    from camshaft.report.scan import label_indices

    numeric = ["1", "10", "2", "3", "4"]  # text order of the folders 1, 2, 3, 4, 10
    names = tmp_path / "numeric.txt"
    names.write_text("\n".join(numeric) + "\n")
    tree = tmp_path / "tree"
    for i, image in enumerate(sorted(p for p in data.rglob("*") if p.is_file())[:4]):
        (tree / ["3", "10", "1", "2"][i]).mkdir(parents=True)
        shutil.copy(image, tree / ["3", "10", "1", "2"][i] / image.name)
    camshaft.explain(None, tree, out=tmp_path / "run", class_names=names, targets="label", labels_from_folders=True,
                     progress=False)
    table = _table(tmp_path / "run")
    assert (table["status"] == "ok").all()
    assert [t[0] for t in table["targets"]] == [numeric.index(label) for label in table["label"]]
    assert list(table["label"]) == ["1", "10", "2", "3"]  # listed in path order
    np.testing.assert_array_equal(label_indices(table, numeric), [0, 1, 2, 3])
    # --targets digits stay indices: "3" is index 3 (the class named "3" here too), "1" is index 1 ("10")
    assert camshaft.explain(None, tree, out=tmp_path / "t", class_names=names, targets="1", progress=False).ok == 4
    assert {t[0] for t in _table(tmp_path / "t")["targets"]} == {1}
