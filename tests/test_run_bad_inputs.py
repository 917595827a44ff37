"""A folder (or manifest) full of bad inputs never stops a run: one row per image, errors explained.

Every non-hidden image file gets exactly one row; unreadable ones get an ``error`` row with a short
reason, NaN maps and target -1; every readable kind (grey, CMYK, palette, 16-bit, RGBA, EXIF-rotated,
1x1, very wide) is explained. The results do not depend on the batch size or the decode threads.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import camshaft
from camshaft.demo.shapes import CLASS_NAMES, render_sample
from camshaft.errors import ConfigError

EXIF_ORIENTATION = 0x0112

# file name -> the reason its error row must give (regex), or None for a readable image
EXPECTED = {
    "a_ok.jpg": None,
    "b_ok.png": None,
    "c_ok.jpg": None,
    "corrupt.jpg": r"not an image|corrupt",
    "truncated.jpg": r"truncated",
    "truncated.png": r"truncated",
    "empty.jpg": r"empty file \(0 bytes\)",
    "text.png": r"not an image",
    "grey_l.png": None,
    "cmyk.jpg": None,
    "palette_transparent.png": None,
    "grey16.png": None,
    "rgba.png": None,
    "exif_rotated.jpg": None,  # stored 120 x 80, Orientation=6: seen as 80 x 120
    "tiny_1x1.png": None,
    "wide_400x40.png": None,
    "sub/deeper/nested.jpg": None,
}
HIDDEN = [".hidden.png", ".cache/in_hidden_folder.png"]


def _jpeg_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _write_bad_folder(root: Path) -> Path:
    """Every file of EXPECTED and HIDDEN under ``root``, from seeded demo images."""
    rng = np.random.default_rng(0)
    shapes = [render_sample(rng, label=i % len(CLASS_NAMES))[0] for i in range(6)]  # RGB 96 x 96
    for rel in [*EXPECTED, *HIDDEN]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
    shapes[0].save(root / "a_ok.jpg", quality=95)
    shapes[1].save(root / "b_ok.png")
    shapes[2].save(root / "c_ok.jpg", quality=95)
    jpg, png = _jpeg_bytes(shapes[3]), _png_bytes(shapes[4])
    app0_end = 4 + int.from_bytes(jpg[4:6], "big")  # SOI + the JFIF APP0 segment
    noise = rng.integers(0, 256, len(jpg) - app0_end, dtype=np.uint8).tobytes()
    (root / "corrupt.jpg").write_bytes(jpg[:app0_end] + noise)
    (root / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.png").write_text("these are not the pixels you are looking for\n")
    shapes[5].convert("L").save(root / "grey_l.png")
    shapes[5].convert("CMYK").save(root / "cmyk.jpg", quality=95)
    shapes[0].convert("P").save(root / "palette_transparent.png", transparency=0)
    grey16 = np.asarray(shapes[1].convert("L")).astype(np.uint16) * 257
    Image.fromarray(grey16).save(root / "grey16.png")
    shapes[2].convert("RGBA").save(root / "rgba.png")
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # rotate 90 degrees clockwise to display
    shapes[3].resize((120, 80)).save(root / "exif_rotated.jpg", exif=exif, quality=95)
    Image.new("RGB", (1, 1), (200, 30, 30)).save(root / "tiny_1x1.png")
    shapes[4].resize((400, 40)).save(root / "wide_400x40.png")
    shapes[5].save(root / "sub/deeper/nested.jpg", quality=95)
    for rel in HIDDEN:
        shapes[0].save(root / rel)
    # the kinds are what their names say (guards the fixture itself)
    modes = {"grey_l.png": "L", "cmyk.jpg": "CMYK", "palette_transparent.png": "P", "grey16.png": "I;16", "rgba.png": "RGBA"}
    for name, mode in modes.items():
        with Image.open(root / name) as im:
            assert im.mode == mode, name
    return root


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _explain(data, out, **kw):
    return camshaft.explain(None, data, out=out, progress=False, **kw)


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    """The bad folder explained once with overlays at batch size 4: (folder, out, summary, snapshot)."""
    folder = _write_bad_folder(tmp_path_factory.mktemp("bad"))
    before = _snapshot(folder)
    out = tmp_path_factory.mktemp("out") / "run"
    summary = _explain(folder, out, overlays=True, batch_size=4)
    return folder, out, summary, before


def _rows_by_name(table, folder: Path) -> dict[str, dict]:
    return {Path(r["path"]).relative_to(folder).as_posix(): r for r in table.to_dict("records")}


def test_every_file_has_one_row_with_its_status_and_reason(bad_run):
    folder, out, summary, _ = bad_run
    table = camshaft.load_results(out).table
    assert table["index"].tolist() == list(range(len(EXPECTED)))
    assert sorted(table["path"]) == sorted(str(folder / rel) for rel in EXPECTED)  # hidden ones skipped
    rows = _rows_by_name(table, folder)
    for name, reason in EXPECTED.items():
        row = rows[name]
        if reason is None:
            assert row["status"] == "ok", (name, row["error"])
            assert pd.isna(row["error"])
        else:
            assert row["status"] == "error", name
            assert re.search(reason, row["error"]), (name, row["error"])
    failed = sorted(n for n, r in EXPECTED.items() if r)
    assert (summary.images, summary.ok, summary.failed) == (len(EXPECTED), len(EXPECTED) - len(failed), len(failed))
    assert sorted(Path(p).relative_to(folder).as_posix() for p, _ in summary.errors) == failed


def test_maps_and_targets_finite_for_ok_nan_for_errors(bad_run):
    _, out, _, _ = bad_run
    res = camshaft.load_results(out)
    maps, targets, table = res.maps[:], res.targets, res.table  # (N, K, h, w), (N, K)
    assert maps.shape == (len(EXPECTED), 1, 12, 12) and maps.dtype == np.float32  # demo: 96 px / 8
    assert targets.shape == (len(EXPECTED), 1) and targets.dtype == np.int32
    ok = (table["status"] == "ok").to_numpy()
    assert np.isfinite(maps[ok]).all()
    assert np.isnan(maps[~ok]).all()
    assert ((targets[ok] >= 0) & (targets[ok] < len(CLASS_NAMES))).all()
    assert (targets[~ok] == -1).all()
    assert [list(t) for t in table.loc[ok, "targets"]] == targets[ok].tolist()  # table agrees with store
    assert table.loc[ok, "map_max"].map(lambda v: np.isfinite(v).all()).all()
    assert table.loc[~ok, ["targets", "map_max", "top5_classes"]].isna().all().all()


def test_one_overlay_per_ok_image(bad_run):
    _, out, summary, _ = bad_run
    table = camshaft.load_results(out).table
    names = sorted(os.listdir(out / "overlays"))
    assert all(n.endswith(".png") and not n.startswith(".") for n in names)  # no temporary files left
    assert len(names) == summary.ok
    assert sorted(int(n[:6]) for n in names) == table.loc[table["status"] == "ok", "index"].tolist()


def test_recorded_sizes_are_as_displayed(bad_run):
    folder, out, _, _ = bad_run
    rows = _rows_by_name(camshaft.load_results(out).table, folder)
    sizes = {name: (rows[name]["width"], rows[name]["height"]) for name in ("exif_rotated.jpg", "tiny_1x1.png", "wide_400x40.png", "a_ok.jpg")}
    assert sizes == {"exif_rotated.jpg": (80, 120), "tiny_1x1.png": (1, 1), "wide_400x40.png": (400, 40), "a_ok.jpg": (96, 96)}


def test_sizes_read_back_as_integers_with_failed_rows(bad_run):
    # numpy integers have no missing value: pandas read the int32 columns as float64 once a row lacked a size
    table = camshaft.load_results(bad_run[1]).table
    assert table["width"].isna().any()  # an unreadable file has no size
    for column in ("width", "height"):
        assert table[column].dtype == "Int32", column
        assert all(isinstance(v, (int, np.integer)) for v in table[column].dropna()), column


def test_inputs_unchanged(bad_run):
    folder, _, _, before = bad_run
    assert _snapshot(folder) == before


def test_upsampled_maps_have_the_original_size(bad_run):
    folder, out, _, _ = bad_run
    res = camshaft.load_results(out)
    rows = _rows_by_name(res.table, folder)
    for name in ("exif_rotated.jpg", "tiny_1x1.png", "wide_400x40.png", "grey16.png"):
        row = rows[name]
        up = res.map(row["index"], upsample=True)
        assert up.shape == (1, row["height"], row["width"]) and up.dtype == np.float32, name
        assert np.isfinite(up).all(), name
        assert res.map(row["index"]).shape == (1, 12, 12)
    bad = rows["empty.jpg"]
    assert np.isnan(res.map(bad["index"])).all()  # native maps of an error row: NaN
    with pytest.raises(ConfigError, match=r"has no maps: empty file \(0 bytes\)"):
        res.map(bad["index"], upsample=True)


@pytest.mark.parametrize("batch_size, workers", [(1, 1), (7, 3)])
def test_results_do_not_depend_on_batch_size(bad_run, tmp_path, batch_size, workers):
    folder, out, _, _ = bad_run
    ref = camshaft.load_results(out)
    got = camshaft.load_results(_explain(folder, tmp_path / "run", batch_size=batch_size, workers=workers).out)
    cols = ["path", "status", "error", "width", "height"]
    assert got.table[cols].equals(ref.table[cols])
    np.testing.assert_array_equal(got.targets, ref.targets)
    np.testing.assert_allclose(got.maps[:], ref.maps[:], rtol=1e-5, atol=1e-6)  # NaN rows match NaN rows


# --- CSV manifest ---------------------------------------------------------------------------------

# (path relative to the manifest, label, class index explained for --targets label or the error)
MANIFEST = [
    ("imgs/0.png", "circle", 0),
    ("imgs/1.jpg", "square", 1),
    ("imgs/2.png", "triangle", 2),
    ("imgs/3.png", "cross", 3),
    ("imgs/4.jpg", "ring", 4),
    ("imgs/missing.png", "circle", r"^file not found$"),
    ("imgs/0.png", "hexagon", r"label 'hexagon' is not a class of the model"),
    ("imgs/1.jpg", "", r"no label for this image"),
    ("imgs/2.png", "3", 3),  # a class index works as a label, even one the image does not show
]


@pytest.fixture
def manifest(tmp_path) -> Path:
    root = tmp_path / "dataset"
    (root / "imgs").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(len(CLASS_NAMES)):
        render_sample(rng, label=i)[0].save(root / "imgs" / f"{i}.{'jpg' if i in (1, 4) else 'png'}")
    lines = ["path,label", *(f"{p},{label}" for p, label, _ in MANIFEST)]
    path = root / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_manifest_targets_label(manifest, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths resolve against the manifest's folder, not the cwd
    res = camshaft.load_results(_explain(manifest, tmp_path / "run", targets="label", batch_size=4).out)
    table = res.table
    assert table["path"].tolist() == [str(manifest.parent / p) for p, _, _ in MANIFEST]
    assert table["label"].fillna("").tolist() == [label for _, label, _ in MANIFEST]
    for (_, label, want), row, stored in zip(MANIFEST, table.to_dict("records"), res.targets, strict=True):
        if isinstance(want, int):
            assert row["status"] == "ok", (label, row["error"])
            assert list(row["targets"]) == [want] and stored.tolist() == [want]
            assert list(row["target_names"]) == [CLASS_NAMES[want]]
        else:
            assert row["status"] == "error", label
            assert re.search(want, row["error"]), (label, row["error"])
            assert stored.tolist() == [-1]


def test_manifest_label_maps_match_explicit_classes(manifest, tmp_path):
    """The map for an image's label equals that class's map when every class is explained."""
    by_label = camshaft.load_results(_explain(manifest, tmp_path / "label", targets="label", batch_size=4).out)
    every = camshaft.load_results(_explain(manifest, tmp_path / "all", targets="0,1,2,3,4", batch_size=3).out)
    assert every.targets.shape == (len(MANIFEST), 5)
    for i, (_, _, want) in enumerate(MANIFEST):
        if isinstance(want, int):
            np.testing.assert_allclose(by_label.maps[i][0], every.maps[i][want], rtol=1e-5, atol=1e-6)
