"""Model-free map statistics, by hand: coverage, concentration, border mass, box metrics, flags."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from camshaft.errors import ConfigError
from camshaft.preprocess import Preprocess
from camshaft.report.boxes import manifest_boxes, run_boxes
from camshaft.report.flags import FlagRules, flag_classes, flag_images
from camshaft.report.frames import coverage, frames
from camshaft.report.spatial import SpatialSpec, border_mass, box_mass, distribution, entropy, pointing, spatial_metrics, top_mass


def _pre(size=(4, 4), resize="stretch") -> Preprocess:
    return Preprocess(input_size=size, mean=(0, 0, 0), std=(1, 1, 1), resize=resize)


def test_coverage_is_the_share_of_each_cell_in_the_box():
    cover = coverage(np.array([[0.5, 0.0, 2.0, 1.0], [-3.0, 1.5, 9.0, 9.0]]), (2, 2))
    np.testing.assert_allclose(cover[0], [[0.5, 1.0], [0.0, 0.0]])
    np.testing.assert_allclose(cover[1], [[0.0, 0.0], [0.5, 0.5]])  # clipped to the grid


def test_entropy_and_top_mass():
    maps = np.array([np.ones((2, 2)), [[1, 0], [0, 0]], [[1, 1], [0, 0]], [[3, 1], [-5, np.nan]], np.zeros((2, 2))])
    p, empty = distribution(maps)
    assert empty.tolist() == [False, False, False, False, True]
    np.testing.assert_allclose(p[3], [[0.75, 0.25], [0.0, 0.0]])  # ReLU, NaN as 0
    h = entropy(p, empty)
    np.testing.assert_allclose(h[:3], [1.0, 0.0, 0.5])  # ln 2 / ln 4
    assert h[3] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4))
    assert np.isnan(h[4])
    t = top_mass(p, empty, fraction=0.25)  # ceil(0.25 * 4) = 1 cell
    np.testing.assert_allclose(t[:4], [0.25, 1.0, 0.5, 0.75])
    assert top_mass(p, empty, fraction=0.3)[0] == pytest.approx(0.5)  # ceil(1.2) = 2 cells


def test_border_mass_of_a_uniform_map():
    fr = frames([(40, 40)], _pre(), (4, 4))
    p, empty = distribution(np.ones((1, 4, 4)))
    assert border_mass(p, fr, empty, border=0.25)[0] == pytest.approx(0.75)  # inner 2x2 of 4x4
    assert border_mass(p, fr, empty, border=0.1)[0] == pytest.approx(1 - 0.8**2)


def test_border_mass_counts_the_letterbox_padding_as_outside():
    # an 8x4 image letterboxed into 4x4: content rows 1..3 of the 4x4 map
    fr = frames([(8, 4)], _pre(resize="letterbox"), (4, 4))
    np.testing.assert_allclose(fr.content, [[0, 1, 4, 3]])
    p, empty = distribution(np.ones((1, 4, 4)))
    # inner box (1, 1.5, 3, 2.5) covers 2 cells' area out of 16
    assert border_mass(p, fr, empty, border=0.25)[0] == pytest.approx(1 - 2 / 16)


def test_boxes_go_through_the_center_crop_geometry():
    # an 8x4 image center-cropped to 4x4 shows original x in [2, 6); one cell per pixel
    fr = frames([(8, 4)], _pre(resize="center-crop"), (4, 4))
    p, empty = distribution(np.ones((1, 4, 4)))
    left_half = fr.to_cells(np.array([[2.0, 0.0, 4.0, 4.0]]))
    np.testing.assert_allclose(left_half, [[0, 0, 2, 4]])
    assert box_mass(p, left_half, empty)[0] == pytest.approx(0.5)
    assert box_mass(p, fr.to_cells(np.array([[0.0, 0.0, 3.0, 4.0]])), empty)[0] == pytest.approx(0.25)  # partly unseen


def test_pointing_game_with_tolerance():
    m = np.zeros((1, 4, 4))
    m[0, 0, 3] = 1.0  # cell (row 0, col 3): centre (35, 5) on a 40x40 image
    fr = frames([(40, 40)], _pre(), (4, 4))
    p, empty = distribution(m)
    np.testing.assert_allclose(fr.cell_centres(np.array([3])), [[35.0, 5.0]])
    assert pointing(m, fr, np.array([[30.0, 0, 40, 10]]), empty, tolerance=0)[0] == 1.0
    assert pointing(m, fr, np.array([[0.0, 0, 10, 10]]), empty, tolerance=15)[0] == 0.0  # 35 > 10 + 15
    assert pointing(m, fr, np.array([[0.0, 0, 10, 10]]), empty, tolerance=25)[0] == 1.0
    assert np.isnan(pointing(m, fr, np.full((1, 4), np.nan), empty, tolerance=0)[0])  # no box
    none = np.zeros((1, 4, 4))
    assert pointing(none, fr, np.array([[0.0, 0, 40, 40]]), distribution(none)[1], tolerance=0)[0] == 0.0  # empty misses


def test_spatial_metrics_energy_in_box_in_original_pixels():
    m = np.zeros((2, 2, 2))
    m[0] = [[3.0, 1.0], [0.0, 0.0]]
    m[1] = [[0.0, 0.0], [0.0, 2.0]]
    fr = frames([(10, 10), (10, 10)], _pre((2, 2)), (2, 2))
    boxes = np.array([[0.0, 0.0, 5.0, 5.0], [2.5, 2.5, 10.0, 10.0]])  # top-left cell; 3/4 of the grid
    out = spatial_metrics(m, fr, boxes, SpatialSpec())
    np.testing.assert_allclose(out["energy_in_box"], [0.75, 1.0])
    np.testing.assert_allclose(out["pointing"], [1.0, 1.0])
    assert set(spatial_metrics(m, fr, None, SpatialSpec())) == {"empty", "entropy", "top_mass", "border_mass"}


def test_boxes_come_from_the_table_or_else_the_manifest(tmp_path):
    table = pd.DataFrame({"path": ["a.png", "b.png"], "box": [[1.0, 2.0, 3.0, 4.0], None]})
    np.testing.assert_allclose(run_boxes(table, None), [[1, 2, 3, 4], [np.nan] * 4])
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,x0,y0,x1,y1\na.png,x,1,2,3,4\nb.png,y,,,,\n")
    old = pd.DataFrame({"path": [str(tmp_path / "b.png"), str(tmp_path / "a.png")]})  # a table without boxes
    np.testing.assert_allclose(run_boxes(old, manifest), [[np.nan] * 4, [1, 2, 3, 4]])  # matched by path
    assert run_boxes(old, tmp_path) is None  # a folder has no boxes
    with pytest.warns(UserWarning, match="no longer exists"):
        assert manifest_boxes(tmp_path / "gone.csv", ["a.png"]) is None


def test_spec_is_validated():
    with pytest.raises(ConfigError, match=r"border must lie in \(0, 0.5\), received 0.5"):
        SpatialSpec(border=0.5)
    with pytest.raises(ConfigError, match="border must lie in"):
        FlagRules(border=1.5)


def test_flags_fire_and_sort_worst_first():
    images = pd.DataFrame(
        {
            "index": [0, 1, 2, 3],
            "path": ["a", "b", "c", "d"],
            "k": 0,
            "target": [0, 0, 1, 1],
            "target_name": ["x", "x", "y", "y"],
            "border_mass": [0.6, 0.8, 0.2, np.nan],
            "entropy": [0.5, 0.99, 0.5, np.nan],
            "empty": [False, False, False, True],
        }
    )
    flags = flag_images(images, FlagRules(border=0.5, entropy=0.95))
    assert list(zip(flags["index"], flags["flag"], strict=True)) == [(3, "empty"), (1, "diffuse"), (1, "border-heavy"), (0, "border-heavy")]
    np.testing.assert_allclose(flags["severity"], [1.0, 0.8, 0.6, 0.2])
    classes = pd.DataFrame({"class": [0, 1], "mean_border_mass": [0.75, 0.2], "mean_entropy": [0.745, 0.5]})
    out = flag_classes(classes, FlagRules(border=0.5, entropy=0.95))
    assert out["flags"].tolist() == ["border-heavy", ""]
    np.testing.assert_allclose(out["severity"], [0.5, -0.6])
