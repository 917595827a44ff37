"""Map statistics that need no model: concentration, border mass, and localization against boxes.

All work on maps at their native resolution (n, h, w), cells taken as unit squares, so every
number is exact and cheap (no upsampling). With ``p = ReLU(m) / sum(ReLU(m))`` (the map's positive
mass as a distribution over the N = h * w cells):

- entropy: ``-sum p log p / log N`` in [0, 1]; 1 is a uniform (diffuse) map, 0 a single cell.
- top mass: the share of mass in the ``ceil(fraction * N)`` heaviest cells (fraction 5%).
- border mass: ``1 - sum p * cover(inner)``, where ``inner`` is the part of the image the model
  saw, shrunk by ``border`` of its width and height on each side and ``cover`` the share of each
  cell inside it: the mass on the image's border band, plus any outside the image (letterbox).
- energy in box: ``sum p * cover(box)`` (Wang et al. 2020, Score-CAM's energy-based pointing game), the box
  cut to the part of the input that shows the image (mass in letterbox padding is in no box).
- pointing game (Zhang et al. 2016): the centre of the map's maximum cell among those that show the
  image, in original pixels, lies inside the box grown by ``tolerance`` pixels on every side (1.0 hit,
  0.0 miss).

A map with no positive mass is *empty*: its distribution statistics are NaN and it misses the
pointing game.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from camshaft.errors import ConfigError
from camshaft.report.frames import Frames, clip_boxes, coverage, inner_box


@dataclass(frozen=True)
class SpatialSpec:
    """Settings of the model-free map statistics."""

    border: float = 0.1  # width of the border band, a fraction of the image's width / height
    tolerance: float = 15.0  # pointing game tolerance, original-image pixels (Zhang et al.)
    top: float = 0.05  # the "top mass" is the share of mass in this fraction of cells

    def __post_init__(self):
        problems = []
        if not 0.0 < self.border < 0.5:
            problems.append(f"border must lie in (0, 0.5), received {self.border}")
        if not self.tolerance >= 0.0:
            problems.append(f"tolerance must be >= 0 pixels, received {self.tolerance}")
        if not 0.0 < self.top <= 1.0:
            problems.append(f"top must lie in (0, 1], received {self.top}")
        if problems:
            raise ConfigError("; ".join(problems))


def distribution(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maps (n, h, w) -> (p (n, h, w) float64 summing to 1 per map, empty (n,) bool).

    NaN and infinities count as 0; an empty map's p is all zero.
    """
    m = np.nan_to_num(np.asarray(maps, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    m = np.maximum(m, 0.0)
    mass = m.sum(axis=(1, 2))
    empty = ~(mass > 0.0)
    return m / np.where(empty, 1.0, mass)[:, None, None], empty


def entropy(p: np.ndarray, empty: np.ndarray) -> np.ndarray:
    """Normalised entropy (n,) of distributions p (n, h, w); NaN for empty maps."""
    n_cells = p.shape[1] * p.shape[2]
    flat = p.reshape(len(p), -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(flat > 0, flat * np.log(flat), 0.0).sum(axis=1)
    h = h / math.log(n_cells) if n_cells > 1 else np.zeros(len(p))
    return np.where(empty, np.nan, np.clip(h, 0.0, 1.0))


def top_mass(p: np.ndarray, empty: np.ndarray, *, fraction: float) -> np.ndarray:
    """Share of mass (n,) in the ``ceil(fraction * N)`` heaviest cells; NaN for empty maps."""
    flat = p.reshape(len(p), -1)
    count = min(flat.shape[1], max(1, math.ceil(fraction * flat.shape[1] - 1e-9)))
    heaviest = -np.partition(-flat, count - 1, axis=1)[:, :count]
    return np.where(empty, np.nan, heaviest.sum(axis=1))


def box_mass(p: np.ndarray, boxes: np.ndarray, empty: np.ndarray) -> np.ndarray:
    """Share of mass (n,) inside boxes (n, 4) given in cell units; NaN for empty maps or NaN boxes."""
    cover = coverage(np.nan_to_num(boxes), p.shape[1:])
    share = (p * cover).sum(axis=(1, 2))
    return np.where(empty | np.isnan(boxes).any(axis=1), np.nan, share)


def border_mass(p: np.ndarray, frames: Frames, empty: np.ndarray, *, border: float) -> np.ndarray:
    """Share of mass (n,) outside the inner part of the image (see the module docstring)."""
    return 1.0 - box_mass(p, inner_box(frames.content, border), empty)


def pointing(maps: np.ndarray, frames: Frames, boxes: np.ndarray, empty: np.ndarray, *, tolerance: float) -> np.ndarray:
    """Pointing game hits (n,) against boxes (n, 4) in original pixels: 1.0, 0.0, NaN (no box).

    The maximum is taken over the cells that show the image (letterbox padding is not the image's map,
    as in the run's ``map_argmax``), its centre clamped to the image.
    """
    flat = np.nan_to_num(np.asarray(maps, dtype=np.float64).reshape(len(maps), -1), nan=-np.inf)
    shown = coverage(frames.content, frames.map_shape).reshape(len(flat), -1) > 0
    xy = frames.cell_centres(np.where(shown, flat, -np.inf).argmax(axis=1))
    image = (frames.content.reshape(-1, 2, 2) - frames.offset[:, None]) / frames.scale[:, None]  # (n, 2, 2): 0, 0, W, H
    xy = np.clip(xy, image[:, 0], image[:, 1])
    boxes = np.asarray(boxes, dtype=np.float64)
    inside = (xy >= boxes[:, :2] - tolerance) & (xy <= boxes[:, 2:] + tolerance)
    hit = np.where(inside.all(axis=1) & ~empty, 1.0, 0.0)
    return np.where(np.isnan(boxes).any(axis=1), np.nan, hit)


def spatial_metrics(maps: np.ndarray, frames: Frames, boxes: np.ndarray | None, spec: SpatialSpec) -> dict[str, np.ndarray]:
    """Every statistic of this module for maps (n, h, w) of n images; boxes (n, 4) or None.

    Returns arrays (n,): empty, entropy, top_mass, border_mass and, with boxes, pointing and
    energy_in_box.
    """
    p, empty = distribution(maps)
    out = {
        "empty": empty,
        "entropy": entropy(p, empty),
        "top_mass": top_mass(p, empty, fraction=spec.top),
        "border_mass": border_mass(p, frames, empty, border=spec.border),
    }
    if boxes is not None:
        boxes = np.asarray(boxes, dtype=np.float64)
        out["pointing"] = pointing(maps, frames, boxes, empty, tolerance=spec.tolerance)
        cells = clip_boxes(frames.to_cells(np.nan_to_num(boxes)), frames.content)  # letterbox padding is in no box
        cells = np.where(np.isnan(boxes), np.nan, cells)
        out["energy_in_box"] = box_mass(p, cells, empty)
    return out
