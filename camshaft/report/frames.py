"""Where each image sits on its map grid: original-image pixels <-> map cells, for many images.

A map (h, w) covers the model input (H, W); cell (i, j) covers input pixels
``[j W/w, (j+1) W/w) x [i H/h, (i+1) H/h)``. ``preprocess.geometry`` places the original image in
the input (stretch, center-crop or letterbox), an affine map per axis. A ``Frames`` holds, for n
images at once, that affine map from original pixels to *cell units* and the box of the input
that shows the image (the content), in cell units.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from camshaft.preprocess import Preprocess, geometry


@dataclass(frozen=True)
class Frames:
    """Per image: ``u = scale * x + offset`` maps original pixels (x, y) to cell units (u, v)."""

    scale: np.ndarray  # (n, 2) float64: (x, y) scale
    offset: np.ndarray  # (n, 2) float64
    content: np.ndarray  # (n, 4) float64: the content box (u0, v0, u1, v1) in cell units
    map_shape: tuple[int, int]  # (h, w)

    def to_cells(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes (n, 4) in original pixels (x0, y0, x1, y1) -> the same boxes in cell units."""
        boxes = np.asarray(boxes, dtype=np.float64)
        lo = boxes[:, :2] * self.scale + self.offset
        hi = boxes[:, 2:] * self.scale + self.offset
        return np.concatenate([lo, hi], axis=1)

    def cell_centres(self, cells: np.ndarray) -> np.ndarray:
        """Flat cell indices (n,) -> their centres (n, 2) in original-image pixels (x, y)."""
        h, w = self.map_shape
        i, j = np.divmod(np.asarray(cells, dtype=np.int64), w)
        uv = np.stack([j + 0.5, i + 0.5], axis=1)
        return (uv - self.offset) / self.scale


def frames(sizes: Sequence[tuple[int, int]], pre: Preprocess, map_shape: tuple[int, int]) -> Frames:
    """Frames of images of original ``sizes`` (W, H) under ``pre``, for maps of ``map_shape``."""
    h, w = map_shape
    H, W = pre.input_size
    cell = np.array([w / W, h / H])  # input pixels -> cell units
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    unique, inverse = np.unique(sizes, axis=0, return_inverse=True)  # datasets repeat sizes
    scale, offset, content = np.ones((len(unique), 2)), np.zeros((len(unique), 2)), np.zeros((len(unique), 4))
    for r, size in enumerate(unique):
        g = geometry((int(size[0]), int(size[1])), pre)
        c, reg = np.asarray(g.content, dtype=np.float64), np.asarray(g.region, dtype=np.float64)
        s = (c[2:] - c[:2]) / (reg[2:] - reg[:2])  # original -> input pixels
        scale[r] = s * cell
        offset[r] = (c[:2] - reg[:2] * s) * cell
        content[r] = np.concatenate([c[:2] * cell, c[2:] * cell])
    inverse = inverse.reshape(-1)
    return Frames(scale[inverse], offset[inverse], content[inverse], (h, w))


def coverage(boxes: np.ndarray, map_shape: tuple[int, int]) -> np.ndarray:
    """The share of each cell's area inside each box: boxes (n, 4) in cell units -> (n, h, w).

    Cells are unit squares; a box reaching past the grid is clipped to it.
    """
    h, w = map_shape
    boxes = np.asarray(boxes, dtype=np.float64)
    cover_x = _overlap(boxes[:, 0], boxes[:, 2], w)  # (n, w)
    cover_y = _overlap(boxes[:, 1], boxes[:, 3], h)  # (n, h)
    return cover_y[:, :, None] * cover_x[:, None, :]


def _overlap(lo: np.ndarray, hi: np.ndarray, cells: int) -> np.ndarray:
    """Length of [lo, hi] inside each unit interval [j, j + 1]: (n,), (n,) -> (n, cells)."""
    j = np.arange(cells, dtype=np.float64)[None, :]
    return np.clip(np.minimum(hi[:, None], j + 1) - np.maximum(lo[:, None], j), 0.0, 1.0)


def inner_box(content: np.ndarray, border: float) -> np.ndarray:
    """The content boxes (n, 4) shrunk by ``border`` of their width / height on every side."""
    content = np.asarray(content, dtype=np.float64)
    size = content[:, 2:] - content[:, :2]
    return np.concatenate([content[:, :2] + border * size, content[:, 2:] - border * size], axis=1)


def clip_boxes(boxes: np.ndarray, content: np.ndarray) -> np.ndarray:
    """Boxes (n, 4) cut to the content boxes (n, 4), same units: the part of each box that shows the image."""
    boxes, content = np.asarray(boxes, dtype=np.float64), np.asarray(content, dtype=np.float64)
    lo = np.maximum(boxes[:, :2], content[:, :2])
    return np.concatenate([lo, np.maximum(lo, np.minimum(boxes[:, 2:], content[:, 2:]))], axis=1)
