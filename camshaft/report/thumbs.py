"""Thumbnails for the report: overlays of sampled maps on their images, and coloured mean maps.

Only the images the report shows are decoded (a sample, never the dataset). The image is reduced
to thumbnail size first and the map placed on the reduced image with the same geometry, so a
large photograph costs no more than a small one.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from camshaft.data.decode import load_rgb
from camshaft.engine.postprocess import to_original
from camshaft.errors import CamshaftError
from camshaft.preprocess import Preprocess, geometry
from camshaft.writers.atomic import atomic_path
from camshaft.writers.overlay import colorize, normalize_map, overlay, upsample_map


def safe_name(*parts) -> str:
    """A file name from parts: letters, digits, '-', '_' and '.' only."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(str(p) for p in parts))


def _save(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def overlay_thumb(path: Path, image_path: str, m: np.ndarray, pre: Preprocess, *, size: int = 176, box=None) -> bool:
    """Write the overlay of map ``m`` (h, w) on the image at ``image_path``, at most ``size`` px.

    ``box`` (x0, y0, x1, y1, original pixels) is outlined in white. Returns False (and writes a
    grey placeholder) when the image can no longer be read.
    """
    try:
        image = load_rgb(image_path)
    except CamshaftError:
        _save(Image.new("RGB", (size, size), (200, 200, 200)), path)
        return False
    w0, h0 = image.size
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    heat = to_original(np.asarray(m, dtype=np.float32), geometry(image.size, pre), pre.input_size)
    out = overlay(image, heat)
    if box is not None and np.all(np.isfinite(box)):
        sx, sy = image.width / w0, image.height / h0
        x0, y0, x1, y1 = (float(v) for v in box)
        x0, y0 = x0 * sx, y0 * sy
        rect = [x0, y0, max(x0, x1 * sx - 1), max(y0, y1 * sy - 1)]  # a box thinner than a thumbnail pixel: a line
        ImageDraw.Draw(out).rectangle(rect, outline=(255, 255, 255), width=2)
    _save(out, path)
    return True


def heat_tile(path: Path, m: np.ndarray, *, size: int = 176) -> None:
    """A map (h, w) normalised, upsampled bicubically and coloured (jet), ``size`` px wide."""
    h, w = np.asarray(m).shape
    height = max(1, round(size * h / w))
    _save(Image.fromarray(colorize(upsample_map(normalize_map(m), (size, height)))), path)
