"""The report on awkward inputs: tiny boxes, class names with dollars, boxes reaching into letterbox
padding, the drift's top-region share, best and worst examples with no quality, a report rerun into
its own folder.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from PIL import Image

import camshaft
from camshaft.cli import main
from camshaft.demo.shapes import write_demo_dataset
from camshaft.engine.backends import backend_names
from camshaft.models.sources import ModelSource
from camshaft.preprocess import Preprocess
from camshaft.report import DriftThresholds, ReportOptions, audit, build_report, drift, plots
from camshaft.report import html as h
from camshaft.report import rerun
from camshaft.report.frames import frames
from camshaft.report.similarity import top_region
from camshaft.report.spatial import SpatialSpec, spatial_metrics
from camshaft.report.thumbs import overlay_thumb
from camshaft.writers.maps_store import create_store, write_rows


@pytest.fixture(scope="module", autouse=True)
def _no_reexec():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAMSHAFT_NO_REEXEC", "1")
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audit2")
    manifest = write_demo_dataset(root / "data", n=8, seed=3)
    camshaft.explain(None, manifest, out=root / "run", progress=False, batch_size=8)
    return root / "run"


def _copy_with_maps(run: Path, dest: Path, change) -> Path:
    """A copy of ``run`` whose maps are ``change(maps)``."""
    shutil.copytree(run, dest)
    group = zarr.open_group(dest / "maps.zarr", mode="r+")
    group["maps"][:] = change(group["maps"][:])
    return dest


def _pre(size=(4, 4), resize="stretch") -> Preprocess:
    return Preprocess(input_size=size, mean=(0, 0, 0), std=(1, 1, 1), resize=resize)


@pytest.mark.parametrize("box", [(40, 40, 41, 41), (30, 30, 30, 30)])
def test_a_box_thinner_than_a_thumbnail_pixel_is_outlined(tmp_path, box):
    Image.new("RGB", (1000, 800), (90, 120, 30)).save(tmp_path / "big.png")
    out = tmp_path / "ov.png"
    assert overlay_thumb(out, str(tmp_path / "big.png"), np.ones((2, 2), np.float32), _pre(), size=176, box=box)
    assert Image.open(out).size == (176, 141)


def test_class_names_are_drawn_as_text_not_mathtext(tmp_path):
    path = plots.class_bars(tmp_path / "bars.png", [r"$\frac$", "US$ 5 or $10"], np.array([0.2, 0.3]), title="t")
    assert path.exists()


def test_energy_in_box_counts_no_letterbox_padding():
    # an 8x4 image letterboxed into 4x4: content rows 1..3; the box reaches 4 px above the image
    fr = frames([(8, 4)], _pre(resize="letterbox"), (4, 4))
    m = np.zeros((1, 4, 4))
    m[0, 0, :] = 1.0  # 4 units of mass in the padding row above the image
    m[0, 1, 0] = 1.0  # 1 unit in the image, inside the box
    stats = spatial_metrics(m, fr, np.array([[0.0, -4.0, 8.0, 4.0]]), SpatialSpec(tolerance=0))
    assert stats["energy_in_box"][0] == pytest.approx(1 / 5)


def test_drift_uses_the_top_region_share_it_is_given(run, tmp_path):
    rng = np.random.default_rng(0)
    other = _copy_with_maps(run, tmp_path / "noisy", lambda m: m + rng.normal(0, m.std(), m.shape).astype(m.dtype))
    for top in (0.1, 0.5):
        d = drift(run, other, top=top).images.sort_values(["index", "k"])
        a = camshaft.load_results(run).maps[:][:, 0].reshape(len(d), -1)
        b = camshaft.load_results(other).maps[:][:, 0].reshape(len(d), -1)
        ra, rb = top_region(a, top), top_region(b, top)
        expected = (ra & rb).sum(axis=1) / (ra | rb).sum(axis=1)
        np.testing.assert_allclose(d["top_iou"].to_numpy(), expected)


def _best_section(page: str) -> str:
    return page.split("Best examples", 1)[1].split("Worst examples", 1)[0]


def test_an_empty_map_is_not_a_best_example(run, tmp_path):
    def empty_first(m):
        m[0] = 0.0
        return m

    emptied = _copy_with_maps(run, tmp_path / "emptied", empty_first)
    report = build_report(emptied, out=tmp_path / "report")
    target = int(report.audit.images.set_index("index").loc[0, "target"])
    page = (tmp_path / "report" / f"class_{target}.html").read_text(encoding="utf-8")
    assert "img/ov_0_0.png" not in _best_section(page)
    assert "nan" not in _best_section(page)


def test_a_report_rerun_into_its_folder_keeps_nothing_of_the_last_one(run, tmp_path):
    out = tmp_path / "report"
    build_report(run, out=out, compare=run)
    assert (out / "tables" / "drift_summary.json").exists()
    (out / "class_999.html").write_text("an old class page")
    (out / "notes.txt").write_text("the user's")
    build_report(run, out=out)
    tables = sorted(p.name for p in (out / "tables").iterdir())
    assert not [t for t in tables if t.startswith("drift_")]
    assert "drift_" not in (out / "index.html").read_text(encoding="utf-8")
    assert not (out / "class_999.html").exists()
    assert (out / "notes.txt").exists()
    assert sorted(re.findall(r'href="(class_\d+\.html)"', (out / "index.html").read_text(encoding="utf-8")))


def test_a_class_whose_every_map_is_empty_is_flagged(run, tmp_path):
    targets = camshaft.load_results(run).targets[:, 0]
    c = int(targets[0])

    def negative_class(m):
        m[targets == c] = -np.abs(m[targets == c]) - 1.0  # Grad-CAM's ReLU leaves nothing
        return m

    a = audit(_copy_with_maps(run, tmp_path / "negative", negative_class))
    row = a.classes.set_index("class").loc[c]
    assert row["flags"] == "empty" and row["severity"] == 1.0
    assert a.flagged_classes["class"].iloc[0] == c
    assert a.summary["flagged_classes"] == 1


def test_figure_alt_text_is_the_plain_text_of_its_caption():
    caption = '#3 <a href="class_1.html">cat &amp; dog</a> <i>(label &lt;script&gt;)</i>'
    caption += '<br><span title="p">f.png</span>'
    img = re.search(r'<img [^>]*alt="([^"]*)"', h.figure("img/a.png", caption)).group(1)
    assert img == "#3 cat &amp; dog (label &lt;script&gt;) f.png"


def test_a_report_folder_that_is_a_file_is_refused_before_any_work(run, tmp_path, capsys):
    (tmp_path / "report.html").write_text("")
    code = main(["report", str(run), "--out", str(tmp_path / "report.html"), "--metrics", "deletion", "--no-progress"])
    assert code != 0
    assert "is a file; the report is a folder" in capsys.readouterr().err
    assert not (run / "metrics.parquet").exists()


KINDS = [("torch", "eager"), ("torchscript", "torchscript"), ("onnx", "onnxruntime"), ("pt2", "pt2")]


@pytest.mark.parametrize(("kind", "backend"), KINDS)
def test_metrics_reopen_every_kind_of_model_on_its_backend(run, monkeypatch, kind, backend):
    opened = []
    source = ModelSource(kind, f"model.{kind}", path=Path(f"model.{kind}"))
    monkeypatch.setattr(rerun, "resolve_model", lambda spec, weights=None, preprocess=None: source)
    monkeypatch.setattr(rerun, "backend_factory", lambda name: lambda *args, **kw: opened.append(name))
    rerun.open_run_backend(camshaft.load_results(run), device="cpu")
    assert opened == [backend] and backend in backend_names()


def _card_tone(page: str, label: str) -> str:
    card = re.search(rf'<div class="card ([a-z]*)"><div class="v">[^<]*</div><div class="k">{label}</div>', page)
    return card.group(1)


def test_drift_cards_are_judged_each_by_its_own_threshold(run, tmp_path):
    rng = np.random.default_rng(0)
    other = _copy_with_maps(run, tmp_path / "noisy", lambda m: m + rng.normal(0, m.std(), m.shape).astype(m.dtype))
    options = ReportOptions(thresholds=DriftThresholds(min_rank_corr=-1.0, min_iou=1.0))  # only the IoU alerts
    report = build_report(run, out=tmp_path / "report", compare=other, options=options)
    assert len(report.alerts) == 1 and "IoU" in report.alerts[0]
    page = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    assert _card_tone(page, "mean rank correlation") == "good"
    assert _card_tone(page, "mean top-10% IoU") == "bad"
    build_report(run, out=tmp_path / "plain", compare=other)  # no threshold: no verdict
    page = (tmp_path / "plain" / "index.html").read_text(encoding="utf-8")
    assert _card_tone(page, "mean rank correlation") == ""


def _fake_run(out: Path, pre: Preprocess, shape: tuple[int, int], sizes, f) -> Path:
    """A run without a model: each cell holds ``f`` at the original pixel its centre shows."""
    h, w = shape
    fr = frames(sizes, pre, shape)
    i, j = np.mgrid[0:h, 0:w]
    xy = (np.stack([j + 0.5, i + 0.5], -1).reshape(1, -1, 2) - fr.offset[:, None]) / fr.scale[:, None]
    maps = f(xy[..., 0], xy[..., 1]).reshape(len(sizes), 1, h, w).astype(np.float32)
    geometry = {"input_size": list(pre.input_size), "mean": [0, 0, 0], "std": [1, 1, 1], "resize": pre.resize}
    attrs = {"preprocess": geometry}
    create_store(out / "maps.zarr", n_images=len(sizes), map_shape=(1, h, w), chunk=8, attrs=attrs)
    write_rows(out / "maps.zarr", 0, maps, np.zeros((len(sizes), 1), np.int32))
    n = len(sizes)
    table = {
        "index": range(n), "path": [f"/data/{i}.png" for i in range(n)], "status": "ok", "error": None, "label": None,
        "width": [s[0] for s in sizes], "height": [s[1] for s in sizes],
        "top5_classes": [np.array([0])] * n, "top5_scores": [np.array([1.0])] * n, "targets": [np.array([0])] * n,
    }
    pd.DataFrame(table).to_parquet(out / "results.parquet", index=False)
    return out


def test_drift_compares_the_same_places_of_images_placed_differently(tmp_path):
    def f(x, y):  # two bumps on the original image
        return np.exp(-((x - 110) ** 2 + (y - 40) ** 2) / 1250) + 0.3 * np.exp(-((x - 30) ** 2 + (y - 70) ** 2) / 800)

    sizes = [(160, 96), (100, 140)]
    stretch = _fake_run(tmp_path / "stretch", _pre((96, 160)), (12, 20), sizes, f)
    letterbox = _fake_run(tmp_path / "letterbox", _pre((96, 96), "letterbox"), (12, 12), sizes, f)
    d = drift(stretch, letterbox).images  # the letterboxed maps show the same function
    assert (d["rank_corr"] > 0.99).all()


@pytest.mark.parametrize(
    ("flag", "value", "range_"),
    [("--flag-border", "1.5", "(0, 1)"), ("--flag-entropy", "0", "(0, 1)"), ("--border", "0.5", "(0, 0.5)"),
     ("--tolerance", "-1", "[0, inf)")],
)
def test_report_flags_out_of_range_name_the_flag(flag, value, range_, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "report"), flag, value])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"argument {flag}: expected a number in {range_}, received '{value}'" in err
    assert not (tmp_path / "report").exists()


def test_pointing_game_points_with_the_cells_that_show_the_image():
    from camshaft.report.spatial import distribution, pointing

    # an 8x4 image letterboxed into 4x4: content rows 1..3; the map is hottest in the padding above
    fr = frames([(8, 4)], _pre(resize="letterbox"), (4, 4))
    m = np.zeros((1, 4, 4))
    m[0, 0, 0], m[0, 2, 0] = 5.0, 1.0  # padding; then the cell centred at (1, 3) original pixels
    empty = distribution(m)[1]
    assert pointing(m, fr, np.array([[0.0, 2.0, 2.0, 4.0]]), empty, tolerance=0)[0] == 1.0
    m[0, 2, 0], m[0, 1, 3] = 0.0, 1.0  # the image's top-right cell, centred at (7, 1)
    assert pointing(m, fr, np.array([[6.0, 0.0, 8.0, 1.0]]), empty, tolerance=0)[0] == 1.0
    # a 32x4 image letterboxed into 32x32, a 4x4 map: content v in [1.75, 2.25], both rows' centres outside
    thin, m = frames([(32, 4)], _pre((32, 32), "letterbox"), (4, 4)), np.zeros((1, 4, 4))
    np.testing.assert_allclose(thin.content, [[0, 1.75, 4, 2.25]])
    m[0, 0, 0], m[0, 1, 2] = 5.0, 1.0  # the padding; then a row-1 cell centred at (20, -2), clamped to (20, 0)
    assert pointing(m, thin, np.array([[16.0, 0.0, 24.0, 0.5]]), distribution(m)[1], tolerance=0)[0] == 1.0


def test_undefined_numbers_read_as_a_dash_not_nan(run, tmp_path):
    def empty_and_constant(m):
        m = m.copy()
        m[0], m[1] = 0.0, 1.0  # an empty map (no entropy) and a constant one (no rank correlation)
        return m

    other = _copy_with_maps(run, tmp_path / "odd", empty_and_constant)
    build_report(other, out=tmp_path / "report", compare=run)
    text = " ".join(h.text_of(p.read_text()) for p in (tmp_path / "report").glob("*.html"))
    assert "entropy –" in text and not re.search(r"\bnan\b", text, flags=re.IGNORECASE)
