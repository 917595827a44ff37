"""Shared post-processing: statistics of low-resolution maps and their placement on the image."""

from __future__ import annotations

import numpy as np
from PIL import Image

from camshaft.preprocess import Geometry
from camshaft.writers.overlay import normalize_map


def map_stats(maps: np.ndarray, geom: Geometry, input_size: tuple[int, int]) -> dict[str, list[float]]:
    """Per target: max, mean, and the argmax cell's centre in original-image pixels.

    Only cells whose centre shows the image count: with letterbox, cells over the padding are left out
    (a map may be hot there, but that is no place on the image). A map too coarse for any centre to
    fall on the image keeps every cell, and its argmax is clamped to the image.
    """
    k, h, w = maps.shape
    H, W = input_size
    cx = (np.arange(w) + 0.5) * W / w
    cy = (np.arange(h) + 0.5) * H / h
    cells = np.flatnonzero(shown_cells(geom, input_size, (h, w)))
    flat = maps.reshape(k, -1)[:, cells]
    arg = cells[flat.argmax(axis=1)]
    W0, H0 = geom.original_size
    xs, ys = [], []
    for a in arg:
        i, j = divmod(int(a), w)
        x, y = geom.to_original(cx[j], cy[i])
        xs.append(float(np.clip(x, 0, W0)))
        ys.append(float(np.clip(y, 0, H0)))
    return {
        "map_max": flat.max(axis=1).tolist(),
        "map_mean": flat.mean(axis=1).tolist(),
        "map_argmax_x": xs,
        "map_argmax_y": ys,
    }


def shown_cells(geom: Geometry, input_size: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """(h, w) bool: the cells of an (h, w) map whose centre shows the image (with letterbox, not the
    padding); every cell when none does (a map too coarse for the image it is on)."""
    h, w = shape
    H, W = input_size
    cx = (np.arange(w) + 0.5) * W / w
    cy = (np.arange(h) + 0.5) * H / h
    x0, y0, x1, y1 = geom.content
    inside = ((cy >= y0) & (cy < y1))[:, None] & ((cx >= x0) & (cx < x1))[None, :]
    return inside if inside.any() else np.ones((h, w), dtype=bool)


def to_original(m: np.ndarray, geom: Geometry, input_size: tuple[int, int], *, normalize: bool = True) -> np.ndarray:
    """A low-resolution map (h, w) placed on the original image: (H0, W0) float32.

    The map is upsampled bicubically to the model input, cropped to the part showing the image,
    and stretched onto the region of the original image the model saw (zero elsewhere).
    """
    m = normalize_map(m) if normalize else np.asarray(m, dtype=np.float32)
    H, W = input_size
    up = np.asarray(Image.fromarray(m.astype(np.float32), mode="F").resize((W, H), Image.BICUBIC))
    cx0, cy0, cx1, cy1 = (int(round(v)) for v in geom.content)
    rx0, ry0, rx1, ry1 = geom.region
    W0, H0 = geom.original_size
    x0, y0 = max(0, int(np.floor(rx0))), max(0, int(np.floor(ry0)))
    x1, y1 = min(W0, int(np.ceil(rx1))), min(H0, int(np.ceil(ry1)))
    crop = Image.fromarray(up[cy0:cy1, cx0:cx1], mode="F").resize((max(1, x1 - x0), max(1, y1 - y0)), Image.BICUBIC)
    canvas = np.zeros((H0, W0), dtype=np.float32)
    canvas[y0:y1, x0:x1] = np.asarray(crop)
    return np.clip(canvas, 0, 1) if normalize else canvas
