"""Overlay convention: ReLU + max-normalise (+ square), bicubic upsampling, jet, 0.6/0.4 blend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camshaft.errors import ConfigError, UnknownNameError
from camshaft.writers.overlay import colorize, normalize_map, overlay, render_grid, upsample_map

REPO = Path(__file__).resolve().parents[1]


def _image(width: int = 140, height: int = 70) -> Image.Image:
    a = np.zeros((height, width, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    a[..., 1] = 100
    a[..., 2] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
    return Image.fromarray(a)


# --- normalize_map ------------------------------------------------------------------------------


def test_normalize_relu_and_max():
    m = np.array([[-2.0, 0.0], [1.0, 4.0]])
    got = normalize_map(m)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, [[0.0, 0.0], [0.25, 1.0]])
    np.testing.assert_array_equal(m, [[-2.0, 0.0], [1.0, 4.0]])  # input untouched


def test_normalize_square():
    got = normalize_map(np.array([[-1.0, 1.0, 2.0]]), square=True)
    np.testing.assert_allclose(got, [[0.0, 0.25, 1.0]])


@pytest.mark.parametrize("m", [np.zeros((3, 3)), -np.ones((2, 5))])
def test_normalize_zero_map_stays_zero(m):
    got = normalize_map(m)
    assert not np.isnan(got).any()
    assert (got == 0).all()


def test_normalize_non_finite_count_as_zero():
    got = normalize_map(np.array([[np.nan, 2.0, np.inf, 1.0]]))
    np.testing.assert_array_equal(got, [[0.0, 1.0, 0.0, 0.5]])


# --- upsample_map -------------------------------------------------------------------------------


def test_upsample_constant_map_is_constant():
    got = upsample_map(np.full((3, 4), 0.5, np.float32), (50, 30))
    assert got.shape == (30, 50) and got.dtype == np.float32
    np.testing.assert_allclose(got, 0.5, atol=1e-5)


def test_upsample_is_clipped_to_unit_range():
    m = np.zeros((6, 6), np.float32)
    m[::2, ::2] = 1.0  # a checkerboard makes bicubic overshoot and undershoot
    got = upsample_map(m, (60, 60))
    assert got.min() >= 0.0 and got.max() <= 1.0


def test_upsample_rejects_bad_input():
    with pytest.raises(ConfigError, match=r"non-empty 2-D array \(h, w\), got shape \(1, 2, 2\)"):
        upsample_map(np.zeros((1, 2, 2)), (4, 4))
    with pytest.raises(ConfigError, match=r"size must be \(width, height\) >= \(1, 1\)"):
        upsample_map(np.zeros((2, 2)), (0, 4))


# --- colorize -----------------------------------------------------------------------------------


def test_colorize_jet_endpoints():
    got = colorize(np.array([[0.0, 1.0]]))
    assert got.shape == (1, 2, 3) and got.dtype == np.uint8
    r0, g0, b0 = got[0, 0].tolist()
    r1, g1, b1 = got[0, 1].tolist()
    assert (r0, g0) == (0, 0) and b0 in (127, 128)  # dark blue
    assert (g1, b1) == (0, 0) and r1 in (127, 128)  # dark red


def test_colorize_unknown_colormap():
    reason = r"unknown colormap 'no-such-map'; valid choices: .*Common: jet"
    with pytest.raises(UnknownNameError, match=reason):
        colorize(np.zeros((2, 2)), cmap="no-such-map")


def test_matplotlib_is_lazy_and_pyplot_never_imported():
    code = (
        "import sys, numpy as np\n"
        "from camshaft.writers import overlay\n"
        "assert 'matplotlib' not in sys.modules\n"
        "overlay.colorize(np.zeros((2, 2)))\n"
        "assert 'matplotlib' in sys.modules and 'matplotlib.pyplot' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-c", code]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# --- overlay ------------------------------------------------------------------------------------


def test_overlay_alpha_zero_is_the_image():
    image = _image()
    got = overlay(image, np.random.default_rng(0).random((7, 7)), alpha=0.0)
    assert got.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(got), np.asarray(image))


def test_overlay_alpha_one_is_the_colour_map():
    heatmap = np.random.default_rng(1).normal(size=(7, 7))
    got = overlay(_image(), heatmap, alpha=1.0, square=True)
    expected = colorize(upsample_map(normalize_map(heatmap, square=True), (140, 70)))
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_overlay_default_blend_is_six_tenths_image():
    image = _image()
    heatmap = np.random.default_rng(2).random((5, 5))
    got = np.asarray(overlay(image, heatmap)).astype(float)
    heat = colorize(upsample_map(normalize_map(heatmap), (140, 70))).astype(float)
    np.testing.assert_allclose(got, 0.6 * np.asarray(image) + 0.4 * heat, atol=0.5 + 1e-6)


def test_overlay_keeps_original_non_square_size():
    got = overlay(_image(140, 70), np.ones((7, 7)))
    assert got.size == (140, 70)
    got = overlay(np.zeros((33, 90, 3), np.uint8), np.ones((4, 4)))  # arrays too
    assert got.size == (90, 33)


def test_overlay_peak_lands_in_the_right_region():
    low = np.zeros((7, 7), np.float32)
    low[1, 5] = 1.0  # row 1, column 5 of a 7x7 grid
    up = upsample_map(normalize_map(low), (140, 70))
    y, x = np.unravel_index(np.argmax(up), up.shape)
    assert 100 <= x < 120 and 10 <= y < 20  # the cell's 20x10 pixel block
    grey = Image.new("RGB", (140, 70), (128, 128, 128))
    red_minus_blue = np.asarray(overlay(grey, low)).astype(int) @ np.array([1, 0, -1])
    y, x = np.unravel_index(np.argmax(red_minus_blue), red_minus_blue.shape)
    assert 100 <= x < 120 and 10 <= y < 20


def test_overlay_normalises_a_float64_map_beyond_float32_range_in_float64():
    # a float32 cast before normalising made 1e39 an infinity (counted as 0): an all-blue overlay
    heatmap = np.zeros((7, 7))
    heatmap[1, 5] = 1e39
    heatmap[5, 1] = 5e38
    got = overlay(_image(), heatmap, alpha=1.0)
    np.testing.assert_array_equal(np.asarray(got), colorize(upsample_map(normalize_map(heatmap), (140, 70))))
    red_minus_blue = np.asarray(got).astype(int) @ np.array([1, 0, -1])
    y, x = np.unravel_index(np.argmax(red_minus_blue), red_minus_blue.shape)
    assert 100 <= x < 120 and 10 <= y < 20


def test_overlay_colours_a_band_of_rows_at_a_time_with_the_same_pixels(monkeypatch):
    """Bands of rows bound the float temporaries of a large photo; they must not shift or seam the blend."""
    import camshaft.writers.overlay as module

    image = _image(150, 97)
    heat = np.random.default_rng(5).random((7, 9)).astype(np.float32)
    whole = np.asarray(overlay(image, heat))
    monkeypatch.setattr(module, "_BAND_PIXELS", 150 * 10 + 7)  # 10 rows a band, the last one of 7 rows
    np.testing.assert_array_equal(np.asarray(overlay(image, heat)), whole)


def test_overlay_of_a_large_image_holds_a_few_bytes_per_pixel():
    """Not a timing: the peak of numpy's allocations. Whole-image float temporaries took ~44 bytes per pixel."""
    import tracemalloc

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1500, 2000, 3), dtype=np.uint8))
    heat = np.random.default_rng(1).random((7, 7)).astype(np.float32)
    tracemalloc.start()
    try:
        overlay(image, heat)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak / (1500 * 2000) < 20


def test_overlay_rejects_bad_alpha():
    with pytest.raises(ConfigError, match=r"alpha must lie in \[0, 1\], got 1.5"):
        overlay(_image(), np.ones((2, 2)), alpha=1.5)


# --- render_grid --------------------------------------------------------------------------------


def test_render_grid_layout():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0), (255, 255, 0)]
    tiles = [Image.new("RGB", (10, 8), c) for c in colours]
    grid = render_grid(tiles, columns=2, pad=2)
    assert grid.size == (2 * 10 + 3 * 2, 3 * 8 + 4 * 2)
    a = np.asarray(grid)
    for i, colour in enumerate(colours):
        row, col = divmod(i, 2)
        x, y = 2 + col * 12, 2 + row * 10
        assert (a[y : y + 8, x : x + 10] == colour).all()
    assert (a[-10:, 14:] == 255).all()  # the empty sixth cell stays white


def test_render_grid_labels_add_captions():
    tiles = [Image.new("L", (30, 30), 0) for _ in range(3)]
    plain = render_grid(tiles, columns=3)
    labelled = render_grid(tiles, columns=3, labels=["cat", "a very long label indeed", "7"])
    assert labelled.width == plain.width and labelled.height > plain.height
    caption = np.asarray(labelled)[plain.height - 2 :, :]
    assert (caption < 128).any()  # some text was drawn


def test_render_grid_errors():
    tile = Image.new("RGB", (4, 4))
    with pytest.raises(ConfigError, match=r"columns must be an integer >= 1, got 0"):
        render_grid([tile], columns=0)
    with pytest.raises(ConfigError, match=r"got 1 labels for 2 images"):
        render_grid([tile, tile], columns=2, labels=["a"])
    with pytest.raises(ConfigError, match=r"at least one image"):
        render_grid([], columns=2)
