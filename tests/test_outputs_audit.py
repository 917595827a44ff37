"""Audit of the outputs a run writes (README "Outputs"): overlays, maps.zarr, results.parquet, atomic writes.

The model is a hand-set CNN whose CAM is the red channel average-pooled over 4x4 cells, so an image
with a red block has a map whose hot spot is known: every check says where the heat must land on
the *original* image (non-square, EXIF-rotated, stretched, center-cropped or letterboxed).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import camshaft
from camshaft.writers.overlay import colorize, normalize_map, overlay, upsample_map

MODEL = "outputs_audit_models:red_cam"
INPUT = (48, 64)  # (H, W): a non-square model input; the map is (12, 16)
# name -> (displayed size (W, H), red block (x0, y0, x1, y1) in displayed pixels), blocks inside every mode's view
IMAGES = {
    "wide.png": ((100, 60), (52, 14, 68, 32)),
    "tall.png": ((50, 120), (6, 58, 22, 80)),
    "turned.jpg": ((90, 50), (28, 26, 44, 44)),  # stored 50x90 with EXIF orientation 6 (shown turned 90 deg)
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    (folder / "outputs_audit_models.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def red_cam():\n"
        "    conv, fc = nn.Conv2d(3, 1, 1), nn.Linear(1, 2)\n"
        "    with torch.no_grad():\n"
        "        conv.weight.zero_(); conv.weight[0, 0] = 1.0; conv.bias.zero_()\n"
        "        fc.weight.copy_(torch.tensor([[1.0], [-1.0]])); fc.bias.zero_()\n"
        "    return nn.Sequential(conv, nn.AvgPool2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)\n\n"
        "def red_cam_biased():  # the letterbox padding (the mean colour: 0 once normalised) maps to 0.3\n"
        "    model = red_cam()\n"
        "    with torch.no_grad():\n"
        "        model[0].bias.fill_(0.3)\n"
        "    return model\n"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(folder))
        yield MODEL


def _red_block(size, box) -> Image.Image:
    a = np.full((size[1], size[0], 3), (0, 60, 60), np.uint8)  # no red: the map is 0 there
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = (255, 60, 60)
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def spots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spots")
    for name, (size, box) in IMAGES.items():
        image = _red_block(size, box)
        if name == "turned.jpg":
            exif = Image.Exif()
            exif[0x0112] = 6  # displayed = stored turned 90 degrees clockwise
            image.transpose(Image.Transpose.ROTATE_90).save(folder / name, quality=98, exif=exif)
        else:
            image.save(folder / name)
    return folder


def _explain(data, out, *, resize, model=MODEL, overlays=True, **kw):
    kw = {"method": "cam", "targets": "0", "input_size": INPUT, "mean": 0.0, "std": 1.0, "scheduler": "sync", **kw}
    return camshaft.explain(model, data, out=out, resize=resize, overlays=overlays, progress=False, **kw)


def _jet_lut() -> np.ndarray:
    return colorize(np.linspace(0, 1, 256, dtype=np.float32)[None, :])[0].astype(float)  # (256, 3)


def _heat_of(blended: np.ndarray, image: np.ndarray) -> np.ndarray:
    """The [0, 1] heat a 0.6/0.4 jet overlay shows at each pixel (nearest jet colour)."""
    colour = (blended.astype(float) - 0.6 * image.astype(float)) / 0.4
    lut = _jet_lut()
    d = ((colour[..., None, :] - lut[None, None]) ** 2).sum(-1)
    return d.argmin(-1) / 255.0


def _inside(x, y, box, margin):
    x0, y0, x1, y1 = box
    return x0 - margin <= x < x1 + margin and y0 - margin <= y < y1 + margin


def _centroid(heat: np.ndarray) -> tuple[float, float]:
    ys, xs = np.mgrid[: heat.shape[0], : heat.shape[1]] + 0.5  # pixel centres
    w = heat / heat.sum()
    return float((w * xs).sum()), float((w * ys).sum())


def _mass_near(heat: np.ndarray, box, margin: int) -> float:
    x0, y0, x1, y1 = box
    near = heat[max(0, y0 - margin) : y1 + margin, max(0, x0 - margin) : x1 + margin].sum()
    return float(near / heat.sum())


# --- overlays and maps land on the right pixels of the original image ----------------------------


@pytest.mark.parametrize("resize", ["stretch", "center-crop", "letterbox"])
def test_heat_lands_on_the_red_block_of_the_original_image(models, spots, tmp_path, resize):
    _explain(spots, tmp_path / "run", resize=resize)
    results = camshaft.load_results(tmp_path / "run")
    for _, row in results.table.iterrows():
        name = row["path"].rsplit("/", 1)[-1]
        size, box = IMAGES[name]
        assert row["status"] == "ok" and (row["width"], row["height"]) == size, name
        shown = np.asarray(_red_block(size, box))
        png = tmp_path / "run" / "overlays" / f"{row['index']:06d}_{name.split('.')[0]}_class-0.png"
        blended = np.asarray(Image.open(png))
        assert blended.shape == (size[1], size[0], 3), name  # the original (displayed) size
        heat = _heat_of(blended, shown)
        y, x = np.unravel_index(heat.argmax(), heat.shape)
        assert _inside(x, y, box, 2), (name, resize, x, y)
        assert _mass_near(heat, box, 10) > 0.8, (name, resize)  # cells are 4 input px: ~6-10 original px
        centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        np.testing.assert_allclose(_centroid(heat), centre, atol=1.5, err_msg=f"{name} {resize}")
        up = results.map(int(row["index"]), upsample=True, normalize=True)[0]
        assert up.shape == (size[1], size[0])
        y, x = np.unravel_index(up.argmax(), up.shape)
        assert _inside(x, y, box, 2), (name, resize, x, y)
        np.testing.assert_allclose(_centroid(up), centre, atol=1.5, err_msg=f"{name} {resize}")
        assert _inside(row["map_argmax_x"][0], row["map_argmax_y"][0], box, 4), (name, resize)


# --- maps.zarr and results.parquet: rows aligned across partitions, failures mixed in ---------------

N_IMAGES, PARTITION = 8, 3  # partitions of 3, 3, 2
BROKEN = {2: b"not an image", 6: b"\x89PNG\r\n\x1a\n truncated"}


@pytest.fixture(scope="module")
def mixed_run(models, tmp_path_factory):
    """A manifest run of 8 images (two unreadable, one missing) with two targets, over three partitions."""
    root = tmp_path_factory.mktemp("mixed")
    lines = ["path,label,x0,y0,x1,y1"]
    for i in range(N_IMAGES):
        name = f"img{i}.png"
        if i in BROKEN:
            (root / name).write_bytes(BROKEN[i])
        elif i != 4:  # image 4 is listed but missing
            _red_block((40 + 8 * i, 30 + 5 * i), (4 + 3 * i, 2 + 2 * i, 14 + 3 * i, 12 + 2 * i)).save(root / name)
        lines.append(f"{name},c{i % 2},{i},1,{i + 10},11.5")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    out = root / "run"
    _explain(root / "manifest.csv", out, resize="stretch", targets="0,1", partition_size=PARTITION, batch_size=2,
             scheduler="threads")
    return out


def _expected_map(path, pre) -> np.ndarray:
    """The hand-set model's CAM for class 0: the red channel of the model input, mean-pooled over 4x4 cells."""
    from camshaft.data.decode import load_rgb
    from camshaft.preprocess import resize_rgb

    pixels, _ = resize_rgb(load_rgb(path), pre)
    red = pixels[..., 0].astype(np.float64) / 255.0
    h, w = red.shape
    return red.reshape(h // 4, 4, w // 4, 4).mean(axis=(1, 3))


def test_maps_store_is_as_the_readme_says(mixed_run):
    import zarr

    group = zarr.open_group(str(mixed_run / "maps.zarr"), mode="r")
    maps, targets = group["maps"], group["targets"]
    assert maps.shape == (N_IMAGES, 2, 12, 16) and maps.dtype == np.float32
    assert maps.chunks == (PARTITION, 2, 12, 16)  # one chunk per partition
    assert targets.shape == (N_IMAGES, 2) and maps.metadata.zarr_format == 3
    attrs = dict(group.attrs)
    assert attrs["method"] == "cam" and attrs["tap"] and attrs["targets"] == "0,1"
    assert attrs["preprocess"] == {"input_size": list(INPUT), "mean": [0.0] * 3, "std": [1.0] * 3, "resize": "stretch"}
    assert "class_names" in attrs and attrs["map_shape"] == [12, 16] and attrs["k"] == 2


def test_maps_rows_match_the_table_rows_across_partitions(mixed_run):
    results = camshaft.load_results(mixed_run)
    table, maps, targets = results.table, results.maps[:], results.targets
    assert list(table["index"]) == list(range(N_IMAGES))
    assert [p.rsplit("/", 1)[-1] for p in table["path"]] == [f"img{i}.png" for i in range(N_IMAGES)]
    failed = {i for i in range(N_IMAGES) if table["status"][i] != "ok"}
    assert failed == {*BROKEN, 4}
    for i in range(N_IMAGES):
        if i in failed:
            assert np.isnan(maps[i]).all() and (targets[i] == -1).all(), i
            assert table["error"][i] and table["targets"][i] is None, i
            continue
        expected = _expected_map(table["path"][i], results.preprocess)
        np.testing.assert_allclose(maps[i, 0], expected, atol=1e-5, err_msg=f"row {i}")
        np.testing.assert_allclose(maps[i, 1], -expected, atol=1e-5, err_msg=f"row {i}")  # class 1 weighs red by -1
        assert list(targets[i]) == [0, 1] == list(table["targets"][i])
        np.testing.assert_allclose(table["map_max"][i], maps[i].reshape(2, -1).max(axis=1), rtol=1e-6)
        np.testing.assert_allclose(table["map_mean"][i], maps[i].reshape(2, -1).mean(axis=1), rtol=1e-5)


def test_dask_and_xarray_read_the_store_as_the_readme_shows(mixed_run, monkeypatch):
    import dask.array as da

    monkeypatch.chdir(mixed_run.parent)
    arr = da.from_zarr("run/maps.zarr", component="maps")  # the README's line, verbatim
    assert arr.chunks[0] == (3, 3, 2) and arr.dtype == np.float32
    direct = camshaft.load_results(mixed_run).maps[:]
    np.testing.assert_array_equal(arr.compute(), direct)
    xarray = pytest.importorskip("xarray")
    ds = xarray.open_zarr("run/maps.zarr", consolidated=False)  # the README's line, verbatim
    assert ds["maps"].dims == ("image", "k", "y", "x") and ds["targets"].dims == ("image", "k")
    assert ds["maps"].dtype == np.float32 and ds.attrs["method"] == "cam"
    np.testing.assert_array_equal(ds["maps"].values, direct)
    assert ds["targets"].dtype == np.int32  # -1 marks failures: not decoded as a missing value into floats
    np.testing.assert_array_equal(ds["targets"].values, camshaft.load_results(mixed_run).targets)


README_COLUMNS = ["index", "path", "status", "error", "label", "box", "width", "height", "file_size", "mtime_ns",
                  "top5_classes", "top5_names", "top5_scores", "targets", "target_names", "map_max", "map_mean",
                  "map_argmax_x", "map_argmax_y"]


def test_results_table_columns_and_types(mixed_run):
    path = mixed_run / "results.parquet"
    arrow = pq.read_table(path)
    assert arrow.column_names == README_COLUMNS and arrow.num_rows == N_IMAGES
    for name in ["index", "file_size", "mtime_ns", "width", "height"]:
        assert pa.types.is_integer(arrow.schema.field(name).type), name
    for name in ["top5_scores", "map_max", "map_mean", "map_argmax_x", "map_argmax_y", "box"]:
        assert pa.types.is_floating(arrow.schema.field(name).type.value_type), name
    for name in ["top5_classes", "targets"]:
        assert pa.types.is_integer(arrow.schema.field(name).type.value_type), name
    frame = pd.read_parquet(path)
    numeric = frame.select_dtypes(include="number").columns
    assert {"index", "file_size", "mtime_ns", "width", "height"} <= set(numeric)
    for name in frame.columns.difference(numeric):  # the rest: text, or lists (arrays of numbers, not objects)
        for value in frame[name].dropna():
            assert isinstance(value, (str, np.ndarray)), (name, value)
            assert not isinstance(value, np.ndarray) or value.dtype != object or name.endswith("names"), (name, value)
    ok = frame[frame["status"] == "ok"].iloc[0]
    assert ok["label"] == "c0" and list(ok["box"]) == [0.0, 1.0, 10.0, 11.5]
    assert len(ok["top5_classes"]) == len(ok["top5_scores"]) == 2  # two classes: top-5 holds them all
    np.testing.assert_allclose(ok["top5_scores"].sum(), 1.0, rtol=1e-5)
    bad = frame[frame["status"] != "ok"]
    assert set(bad["status"]) == {"error"} and bad["error"].str.len().min() > 0
    assert (bad["file_size"] > 0).sum() == len(BROKEN)  # the missing file has no size; the broken ones do


def test_overlays_of_every_ok_image_and_target_and_none_for_failures(mixed_run):
    names = sorted(p.name for p in (mixed_run / "overlays").iterdir())
    ok = [i for i in range(N_IMAGES) if i not in {*BROKEN, 4}]
    assert names == sorted(f"{i:06d}_img{i}_class-{k}.png" for i in ok for k in (0, 1))
    for i in ok:  # class 1's map is all <= 0: after the ReLU nothing is hot, so the heatmap is jet(0) everywhere
        size = Image.open(mixed_run / "overlays" / f"{i:06d}_img{i}_class-1.png").size
        blended = np.asarray(Image.open(mixed_run / "overlays" / f"{i:06d}_img{i}_class-1.png"))
        image = np.asarray(Image.open(mixed_run.parent / f"img{i}.png").convert("RGB"))
        assert size == (40 + 8 * i, 30 + 5 * i)
        np.testing.assert_array_equal(_heat_of(blended, image), 0.0)


def test_a_hot_letterbox_padding_is_neither_the_argmax_nor_the_overlays_peak(models, tmp_path):
    size, box = (50, 120), (6, 58, 22, 80)
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[box[1] : box[3], box[0] : box[2], 0] = 100  # map: 0.3 - 0.5 + 100/255 = 0.19 < 0.3 on the padding
    Image.fromarray(a).save(tmp_path / "dim.png")
    _explain(tmp_path / "dim.png", tmp_path / "run", resize="letterbox", model="outputs_audit_models:red_cam_biased",
             mean=0.5)
    results = camshaft.load_results(tmp_path / "run")
    row = results.table.iloc[0]
    assert np.nanmax(results.maps[0]) == pytest.approx(0.3, abs=0.005)  # the padding (fill 128), in the store
    content = results.maps[0][0][:, 5:10]  # the image is 20 of 64 input px wide, at x 22..42: cells 5..9
    assert row["map_max"][0] == pytest.approx(content.max()) and row["map_max"][0] < 0.29  # not the padding
    assert _inside(row["map_argmax_x"][0], row["map_argmax_y"][0], box, 4)
    heat = _heat_of(np.asarray(Image.open(next((tmp_path / "run" / "overlays").iterdir()))), a)
    assert heat.max() == 1.0 and _inside(*np.unravel_index(heat.argmax(), heat.shape)[::-1], box, 2)


def test_a_class_listed_twice_gets_an_overlay_for_each_listing(models, spots, tmp_path):
    _explain(spots / "wide.png", tmp_path / "run", resize="stretch", targets="0,1,0")  # as --targets 281,tabby can
    names = sorted(p.name for p in (tmp_path / "run" / "overlays").iterdir())
    assert names == ["000000_wide_class-0.png", "000000_wide_class-0_k2.png", "000000_wide_class-1.png"]
    first, again = (np.asarray(Image.open(tmp_path / "run" / "overlays" / n)) for n in names[:2])
    np.testing.assert_array_equal(first, again)


# --- the overlay itself: jet, blend, degenerate maps ------------------------------------------------

# matplotlib's jet as segments (x, value): the colour at x is the piecewise-linear interpolation
JET = {
    0: [(0, 0), (0.35, 0), (0.66, 1), (0.89, 1), (1, 0.5)],
    1: [(0, 0), (0.125, 0), (0.375, 1), (0.64, 1), (0.91, 0), (1, 0)],
    2: [(0, 0.5), (0.11, 1), (0.34, 1), (0.65, 0), (1, 0)],
}


def test_colours_are_jet():
    values = np.array([0.0, 0.1, 0.25, 0.35, 0.5, 0.66, 0.8, 0.95, 1.0], np.float32)
    got = colorize(values[None, :])[0].astype(float)
    for channel, points in JET.items():
        xs, ys = zip(*points, strict=True)
        np.testing.assert_allclose(got[:, channel], 255 * np.interp(values, xs, ys), atol=5)  # a 256-entry table


def test_the_blend_is_six_tenths_image_and_four_tenths_jet_of_the_upsampled_map():
    image = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    low = np.array([[0.0, 1.0], [2.0, 4.0]], np.float32)
    got = np.asarray(overlay(image, low)).astype(float)
    heat = colorize(upsample_map(normalize_map(low), (50, 30))).astype(float)
    np.testing.assert_allclose(got, 0.6 * image + 0.4 * heat, atol=0.5 + 1e-9)
    assert (np.asarray(overlay(image, low, square=True)) != got).any()  # squaring changes it


@pytest.mark.parametrize("low", [np.zeros((3, 4)), np.full((3, 4), -2.0), np.full((3, 4), np.nan),
                                 np.array([[np.nan, -np.inf], [np.inf, 0.0]])])
def test_maps_with_nothing_hot_show_jet_zero_everywhere(low):
    image = np.full((20, 30, 3), 90, np.uint8)
    np.testing.assert_array_equal(_heat_of(np.asarray(overlay(image, low)), image), 0.0)


def test_a_constant_positive_map_is_uniform_not_noise():
    got = np.asarray(overlay(np.full((20, 30, 3), 90, np.uint8), np.full((3, 4), 7.0)))
    assert (got == got[0, 0]).all()


def test_float64_maps_are_normalised_without_a_float32_cast():
    np.testing.assert_array_equal(normalize_map(np.array([[1e300, 1.0], [0.0, -1.0]])), [[1, 0], [0, 0]])
    np.testing.assert_array_equal(normalize_map(np.array([[1e-60, 5e-61], [0.0, -1.0]])), [[1, 0.5], [0, 0]])
    np.testing.assert_array_equal(normalize_map(np.array([[4, 2]], np.int64)), [[1, 0.5]])


# --- atomic writes: an exception mid-write leaves the old file or none, never half a file -------------


def _rows(n: int, *, start: int = 0) -> list[dict]:
    return [{"index": i, "path": f"/x/{i}.png", "status": "ok", "width": 4, "height": 3, "targets": [0],
             "map_max": [1.0]} for i in range(start, start + n)]


def _only(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_table_write_that_fails_leaves_the_previous_file_and_no_temporary(tmp_path):
    from camshaft.writers.table import write_table

    path = tmp_path / "rows.parquet"
    write_table(_rows(2), path)
    with pytest.raises(pa.ArrowInvalid):
        write_table([*_rows(2), {"index": 2, "path": "/x/2.png", "status": "ok", "width": "wide"}], path)
    assert _only(tmp_path) == ["rows.parquet"] and pq.read_table(path).num_rows == 2


def test_an_assembly_that_fails_on_a_shard_leaves_no_table(tmp_path):
    from camshaft.writers.table import assemble, write_table

    write_table(_rows(2), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 cut short")
    with pytest.raises(pa.ArrowInvalid):
        assemble([tmp_path / "a.parquet", tmp_path / "b.parquet"], tmp_path / "results.parquet")
    assert _only(tmp_path) == ["a.parquet", "b.parquet"]
    write_table(_rows(3, start=2), tmp_path / "b.parquet")
    rows, failed = assemble([tmp_path / "a.parquet", tmp_path / "b.parquet"], tmp_path / "results.parquet")
    assert (rows, failed) == (5, [])
    assert pq.read_table(tmp_path / "results.parquet")["index"].to_pylist() == [0, 1, 2, 3, 4]


def test_an_overlay_that_fails_mid_write_leaves_no_png(tmp_path, monkeypatch):
    from camshaft.preprocess import Preprocess
    from camshaft.writers import pngs

    _red_block((20, 10), (2, 2, 6, 6)).save(tmp_path / "a.png")
    rows = [{"index": 0, "path": str(tmp_path / "a.png"), "status": "ok", "targets": [0, 1]}]
    maps = np.ones((1, 2, 3, 3), np.float32)
    real_save = Image.Image.save

    def save_then_fail(self, fp, *args, **kwargs):
        if str(fp).endswith(".tmp") and "class-1" in str(fp):
            real_save(self, fp, *args, **kwargs)
            with open(fp, "r+b") as f:
                f.truncate(20)  # half a PNG on disk, then the disk fills up
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_fail)
    folder = tmp_path / "overlays"
    with pytest.raises(OSError, match="No space"):
        pngs.write_overlays(folder, rows, maps, preprocess=Preprocess(input_size=(12, 12)), class_names=None)
    assert _only(folder) == ["000000_a_class-0.png"]  # the first, whole; the second not at all
    assert Image.open(folder / "000000_a_class-0.png").size == (20, 10)


def test_a_maps_chunk_write_that_fails_leaves_the_chunk_as_it_was(tmp_path, monkeypatch):
    import zarr.storage._local as local

    from camshaft.writers import maps_store

    if not hasattr(local, "_put") or not hasattr(local, "_atomic_write"):
        pytest.skip("this zarr writes its local chunks another way")
    store = tmp_path / "maps.zarr"
    maps_store.create_store(store, n_images=4, map_shape=(1, 2, 2), chunk=2, attrs={"method": "x"})
    maps_store.write_rows(store, 0, np.ones((2, 1, 2, 2), np.float32), np.zeros((2, 1), np.int32))
    real_put = local._put

    def fail_after_writing(path, value, exclusive=False):
        with local._atomic_write(path, "wb", exclusive=exclusive) as f:
            f.write(value.as_buffer_like()[:3])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(local, "_put", fail_after_writing)
    with pytest.raises(OSError, match="No space"):
        maps_store.write_rows(store, 0, np.full((2, 1, 2, 2), 5.0, np.float32), np.zeros((2, 1), np.int32))
    monkeypatch.setattr(local, "_put", real_put)
    assert not list(store.rglob("*.partial"))
    group = maps_store.open_maps(store)
    np.testing.assert_array_equal(group["maps"][:2], 1.0)
    assert np.isnan(group["maps"][2:]).all()
