"""Similarity of two maps of the same image, row by row: rank correlation and top-region IoU.

Both work on maps flattened to rows (n, N) over the same cells.

- Spearman rank correlation: the Pearson correlation of the cells' ranks (ties get their average
  rank). 1 for maps that order the cells alike; NaN when a map is constant, except that two
  identical maps always give exactly 1.
- Top-region IoU: each map's top region is its ``ceil(fraction * N)`` highest cells (ties to the
  lower cell index); the IoU of the two regions, in [0, 1].
"""

from __future__ import annotations

import math

import numpy as np


def average_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 0..N-1 of each row of a (n, N), ties sharing their average rank; float64."""
    a = np.nan_to_num(np.asarray(a, dtype=np.float64), nan=-np.inf)
    n, size = a.shape
    order = np.argsort(a, axis=1, kind="stable")
    s = np.take_along_axis(a, order, axis=1)
    new_group = np.ones_like(s, dtype=bool)
    new_group[:, 1:] = s[:, 1:] != s[:, :-1]
    group = np.cumsum(new_group, axis=1) - 1 + (np.arange(n) * size)[:, None]  # unique per row
    position = np.broadcast_to(np.arange(size, dtype=np.float64), s.shape)
    mean = np.bincount(group.ravel(), position.ravel(), minlength=n * size) / np.maximum(np.bincount(group.ravel(), minlength=n * size), 1)
    ranks = np.empty_like(s)
    np.put_along_axis(ranks, order, mean[group], axis=1)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rank correlation (n,) of the rows of a and b (n, N); see the module docstring."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denom = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.clip((ra * rb).sum(axis=1) / denom, -1.0, 1.0)
    rho = np.where(denom > 0, rho, np.nan)
    return np.where(_same(a, b), 1.0, rho)


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rows (n,) where a and b hold the same values (NaN equal to NaN)."""
    fill = lambda m: np.nan_to_num(np.asarray(m, dtype=np.float64), nan=-np.inf)  # noqa: E731
    return (fill(a) == fill(b)).all(axis=1)


def top_region(a: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean (n, N): each row's ``ceil(fraction * N)`` highest cells, ties to the lower index."""
    a = np.nan_to_num(np.asarray(a, dtype=np.float64), nan=-np.inf)
    count = min(a.shape[1], max(1, math.ceil(fraction * a.shape[1] - 1e-9)))
    order = np.argsort(-a, axis=1, kind="stable")[:, :count]
    region = np.zeros(a.shape, dtype=bool)
    np.put_along_axis(region, order, True, axis=1)
    return region


def top_iou(a: np.ndarray, b: np.ndarray, *, fraction: float = 0.1) -> np.ndarray:
    """IoU (n,) of the top regions of the rows of a and b (n, N)."""
    ra, rb = top_region(a, fraction), top_region(b, fraction)
    return (ra & rb).sum(axis=1) / (ra | rb).sum(axis=1)
