"""list_images: folders, CSV manifests, single files, and every ConfigError with its message."""

from __future__ import annotations

import os

import pytest

from camshaft.data.sources import IMAGE_EXTENSIONS, ImageRecord, is_image_file, list_images
from camshaft.errors import ConfigError


def _touch(root, rel: str) -> str:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"x")  # contents do not matter: listing never decodes
    return path


def test_extensions_case_insensitive():
    names = "jpg jpeg jpe jfif png bmp gif tif tiff webp avif ppm pgm pbm pnm".split()
    assert {f".{n}" for n in names} == IMAGE_EXTENSIONS
    assert is_image_file("A.JPG") and is_image_file("b.TiFf") and not is_image_file("c.txt")


def test_folder_recursive_sorted_hidden_skipped(tmp_path):
    for rel in ["b/2.png", "b/1.JPG", "a.jpeg", "c/d/e.webp", "z.gif", "notes.txt", "b/readme.md",
                ".hidden.png", "b/.also_hidden.jpg", ".git/x.png", "c/.cache/y.png"]:
        _touch(tmp_path, rel)
    records = list_images(tmp_path)
    root = str(tmp_path)
    assert [r.path for r in records] == [
        os.path.join(root, p) for p in ["a.jpeg", "b/1.JPG", "b/2.png", "c/d/e.webp", "z.gif"]
    ]
    assert all(r.label is None and r.box is None for r in records)
    assert list_images(str(tmp_path)) == records  # deterministic, str or Path


def test_folder_paths_are_absolute(tmp_path, monkeypatch):
    _touch(tmp_path, "data/a.png")
    monkeypatch.chdir(tmp_path)
    assert [r.path for r in list_images("data")] == [str(tmp_path / "data" / "a.png")]


def test_single_image_file(tmp_path):
    path = _touch(tmp_path, "one.PNG")
    (record,) = list_images(path)
    assert record.path == path and record.size == os.path.getsize(path) and record.mtime_ns > 0


def test_manifest_relative_absolute_labels_boxes(tmp_path):
    elsewhere = _touch(tmp_path, "other/abs.jpg")
    manifest = tmp_path / "sets" / "val.csv"
    manifest.parent.mkdir()
    manifest.write_text(
        "path,label,x0,y0,x1,y1\n"
        "imgs/cat.jpg,281,1,2,30.5,40\n"
        f"{elsewhere},dog,,,,\n"
        "../up.png,,0,0,5,5\n"
        "missing.png,007,,,,\n"
    )
    records = list_images(manifest)
    base = str(tmp_path / "sets")
    outside = f"outside the dataset root {base}: not read"
    assert [(r.path, r.label, r.box, r.error) for r in records] == [
        (os.path.join(base, "imgs", "cat.jpg"), "281", (1.0, 2.0, 30.5, 40.0), None),
        (elsewhere, "dog", None, outside),  # nothing outside the manifest's folder is read
        (str(tmp_path / "up.png"), None, (0.0, 0.0, 5.0, 5.0), outside),
        (os.path.join(base, "missing.png"), "007", None, None),  # labels stay strings
    ]
    assert records[3].size is None  # missing: an error row later, not here


def test_manifest_path_only_with_bom_and_spaces(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes("\ufeff Path \na.png\n".encode())
    assert [r.path for r in list_images(manifest)] == [str(tmp_path / "a.png")]


def test_record_is_frozen():
    with pytest.raises(AttributeError):
        ImageRecord("a.png").label = "x"


# --- ConfigError, each with its message ----------------------------------------------------------


def test_missing_data(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist; expected a folder of images .*csv"):
        list_images(tmp_path / "nope")


def test_empty_folder(tmp_path):
    _touch(tmp_path, "notes.txt")
    _touch(tmp_path, ".hidden/a.png")
    with pytest.raises(ConfigError, match=r"no images found in folder .*searched recursively"):
        list_images(tmp_path)


def test_unsupported_file(tmp_path):
    path = _touch(tmp_path, "list.txt")
    reason = r"unsupported data .*list\.txt' \(a '\.txt' file\); expected a folder"
    with pytest.raises(ConfigError, match=reason):
        list_images(path)


def test_unsupported_type():
    with pytest.raises(ConfigError, match=r"data must be a path, got int"):
        list_images(3)


def test_manifest_without_path_column(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,label\na.png,1\n")
    with pytest.raises(ConfigError, match=r"has no 'path' column \(columns: \['file', 'label'\]\)"):
        list_images(manifest)


def test_manifest_partial_box_columns(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,x0,y0\na.png,1,2\n")
    with pytest.raises(ConfigError, match=r"lacks \['x1', 'y1'\]"):
        list_images(manifest)


def test_manifest_bad_rows_all_named(tmp_path):
    manifest = tmp_path / "m.csv"
    rows = ["path,label,x0,y0,x1,y1", "a.png,1,,,,", ",2,,,,", "b.png,3,1,2,x,4", "c.png,4,5,0,1,1"]
    manifest.write_text("\n".join(rows) + "\n")
    with pytest.raises(ConfigError, match=r"3 bad row\(s\)") as info:
        list_images(manifest)
    message = str(info.value)
    assert "line 3: empty path" in message
    assert "line 4: box x0,y0,x1,y1 must be four numbers" in message
    assert "line 5: box must have x0 <= x1" in message


def test_manifest_without_rows(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n")
    with pytest.raises(ConfigError, match=r"lists no images"):
        list_images(manifest)


def test_imagefolder_tree_labels_from_folders(tmp_path):
    _touch(tmp_path, "tree/cat/1.png")
    _touch(tmp_path, "tree/dog/sub/2.jpg")
    records = list_images(tmp_path / "tree", labels_from_folders=True)
    assert [(os.path.basename(r.path), r.label) for r in records] == [("1.png", "cat"), ("2.jpg", "dog")]
    _touch(tmp_path, "tree/loose.png")
    with pytest.raises(ConfigError, match="sit at the top"):
        list_images(tmp_path / "tree", labels_from_folders=True)


def test_parquet_manifest(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _touch(tmp_path, "a.png")
    pq.write_table(pa.table({"Path": ["a.png", "b.png"], "label": [3, None], "x0": [1.0, None], "y0": [2.0, None], "x1": [3.0, None], "y1": [4.0, None]}), tmp_path / "m.parquet")
    records = list_images(tmp_path / "m.parquet")
    assert [(os.path.basename(r.path), r.label, r.box) for r in records] == [("a.png", "3", (1.0, 2.0, 3.0, 4.0)), ("b.png", None, None)]


def test_a_name_that_is_not_utf8_is_text_for_the_tables_and_back(tmp_path):
    from camshaft.data.sources import file_path, path_text

    raw = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9 \xff.png")  # Latin-1 bytes: not UTF-8
    _touch(tmp_path, os.path.basename(raw))
    text = path_text(raw)
    assert text.encode("utf-8") and text.endswith("caf\\xe9 \\xff.png")
    assert file_path(text) == raw and os.path.exists(file_path(text))
    assert path_text("/d/caf\u00e9.png") == "/d/caf\u00e9.png" == file_path("/d/caf\u00e9.png")  # UTF-8: unchanged
    literal = _touch(tmp_path, "x\\xff.png")  # a name with a backslash in it, as written
    assert file_path(literal) == literal


def test_the_output_folders_of_camshaft_runs_inside_the_data_are_not_data(tmp_path):
    from camshaft.data.sources import RUN_STATE_DIR
    from camshaft.pipeline.state import STATE_DIR

    assert RUN_STATE_DIR == STATE_DIR
    for rel in ["a.png", "cats/b.png", "runs/monday/overlays/a_0.png", "runs/monday/_camshaft/run.json",
                "multi/gradcam/overlays/a_0.png", "multi/_camshaft/done/p0.json", "multi_but_not/c.png"]:
        _touch(tmp_path, rel)
    names = [os.path.relpath(r.path, tmp_path) for r in list_images(tmp_path)]
    assert names == ["a.png", "cats/b.png", "multi_but_not/c.png"]
    run = tmp_path / "runs" / "monday"  # a run's folder given as the data itself is read: that was asked for
    assert [os.path.relpath(r.path, run) for r in list_images(run)] == ["overlays/a_0.png"]
