"""Explanation drift: the same images explained by two runs (yesterday's and today's model).

Images are matched by path; target slots k by position (the k-th target of each run). Per
(image, k): ``rank_corr`` (Spearman over map cells), ``top_iou`` (IoU of the top ``top`` share of the
cells, 10% by default), whether the top-1 prediction changed, and ``drift = 1 - rank_corr``. Maps of
different shapes or geometry are compared on the first run's grid: the second is sampled bilinearly
at the places of each image that the first run's cells show (``on_cells_of``). Maps are read a chunk
at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from camshaft.errors import ConfigError
from camshaft.report.frames import Frames, frames
from camshaft.report.scan import chunks, ok_rows, read_step
from camshaft.report.similarity import spearman, top_iou
from camshaft.results import Results, load_results

READ_BYTES = 256 << 20  # run B's maps held at once, at most (at least those of a chunk of A's rows)


@dataclass(frozen=True)
class DriftThresholds:
    """When a nightly job should alert; None switches a check off."""

    min_rank_corr: float | None = None  # mean rank correlation below this alerts
    min_iou: float | None = None  # mean top-region IoU below this alerts
    max_changed: float | None = None  # share of images whose top-1 prediction changed above this alerts

    def alerts(self, summary: dict) -> list[str]:
        """One line per threshold crossed by a drift summary."""
        out = []
        if self.min_rank_corr is not None and not summary["mean_rank_corr"] >= self.min_rank_corr:
            out.append(f"mean rank correlation {summary['mean_rank_corr']:.4f} < {self.min_rank_corr}")
        if self.min_iou is not None and not summary["mean_top_iou"] >= self.min_iou:
            out.append(f"mean top-region IoU {summary['mean_top_iou']:.4f} < {self.min_iou}")
        if self.max_changed is not None and not summary["prediction_changed"] <= self.max_changed:
            out.append(f"share of changed predictions {summary['prediction_changed']:.4f} > {self.max_changed}")
        return out


@dataclass
class Drift:
    """``images``: one row per matched (image, k), most changed first; ``classes``; ``summary``."""

    images: pd.DataFrame
    classes: pd.DataFrame
    summary: dict


def drift(run_a: str | Path | Results, run_b: str | Path | Results, *, top: float = 0.1) -> Drift:
    """Compare the maps of two runs over the images they share (matched by path)."""
    a = run_a if isinstance(run_a, Results) else load_results(run_a)
    b = run_b if isinstance(run_b, Results) else load_results(run_b)
    rows_a, rows_b = ok_rows(a.table), ok_rows(b.table)
    pairs = rows_a.merge(rows_b, on="path", suffixes=("_a", "_b"))
    if pairs.empty:
        raise ConfigError(f"the runs {a.out} and {b.out} share no explained image (images are matched by path)")
    pairs = pairs.rename(columns={"index_a": "index"}).sort_values("index").reset_index(drop=True)
    k = min(a.maps.shape[1], b.maps.shape[1])
    names = a.attrs.get("class_names")
    parts = [_compare(a, b, part, ma, mb, top) for part, ma, mb in _blocks(a, b, pairs, k)]
    images = pd.concat(parts, ignore_index=True)
    images["target_name"] = [names[t] if names and 0 <= t < len(names) else str(t) for t in images["target_a"]]
    images = images.sort_values(["prediction_changed", "rank_corr", "index", "k"], ascending=[False, True, True, True], na_position="last")
    return Drift(images.reset_index(drop=True), _classes(images), _summary(images, rows_a, rows_b))


Block = tuple[pd.DataFrame, np.ndarray, np.ndarray]


def _blocks(a: Results, b: Results, pairs: pd.DataFrame, k: int) -> Iterator[Block]:
    """(pairs, their maps in run A (n, k, h, w), in run B) a chunk of A's rows at a time.

    B's rows are read for many of A's chunks at once (up to ``READ_BYTES``): when B lists the images in
    another order, the pairs of one A chunk are spread over all of B's chunks, and reading B per A chunk
    decoded the whole of B once per A chunk (hours at 10^6 images). Now each B chunk is decoded once per
    group of A chunks: once in all for a run whose maps fit in ``READ_BYTES``.
    """
    step = read_step(a.maps)
    row = int(np.prod(b.maps.shape[1:])) * 4  # float32 bytes of an image's maps in B
    group = step * max(1, READ_BYTES // (row * step))
    for _, _, rows in chunks(pairs, group):
        mb_rows = np.asarray(b.maps.get_orthogonal_selection((rows["index_b"].to_numpy(),)))[:, :k]
        done = 0
        for _, _, part in chunks(rows, step):
            ma = np.asarray(a.maps.get_orthogonal_selection((part["index"].to_numpy(),)))[:, :k]  # (n, k, h, w)
            yield part, ma, mb_rows[done : done + len(part)]
            done += len(part)


def _compare(a: Results, b: Results, part: pd.DataFrame, ma: np.ndarray, mb: np.ndarray, top: float) -> pd.DataFrame:
    k = ma.shape[1]
    ia, ib = part["index"].to_numpy(), part["index_b"].to_numpy()
    sizes = list(zip(part["width_a"], part["height_a"], strict=True))
    fr_a, fr_b = frames(sizes, a.preprocess, ma.shape[2:]), frames(sizes, b.preprocess, mb.shape[2:])
    same = ma.shape[2:] == mb.shape[2:]
    same = same and np.allclose(fr_a.scale, fr_b.scale) and np.allclose(fr_a.offset, fr_b.offset)
    if not same:
        mb = on_cells_of(fr_a, fr_b, mb)
    n = len(part)
    fa, fb = ma.reshape(n * k, -1), mb.reshape(n * k, -1)
    ta = np.stack([np.asarray(t[:k]) for t in part["targets_a"]]).reshape(-1)
    tb = np.stack([np.asarray(t[:k]) for t in part["targets_b"]]).reshape(-1)
    top1_a = np.array([c[0] for c in part["top5_classes_a"]])
    top1_b = np.array([c[0] for c in part["top5_classes_b"]])
    rank = spearman(fa, fb)
    return pd.DataFrame(
        {
            "index": np.repeat(ia, k),
            "index_b": np.repeat(ib, k),
            "path": np.repeat(part["path"].to_numpy(), k),
            "label": np.repeat(part["label_a"].to_numpy(), k),
            "k": np.tile(np.arange(k), n),
            "target_a": ta,
            "target_b": tb,
            "top1_a": np.repeat(top1_a, k),
            "top1_b": np.repeat(top1_b, k),
            "prediction_changed": np.repeat(top1_a != top1_b, k),
            "rank_corr": rank,
            "top_iou": top_iou(fa, fb, fraction=top),
            "drift": 1.0 - rank,
        }
    )


def on_cells_of(fr_a: Frames, fr_b: Frames, mb: np.ndarray) -> np.ndarray:
    """Maps (n, k, h_b, w_b) of run B sampled bilinearly at the centres of run A's cells: (n, k, h_a, w_a).

    A cell centre goes to the original image through A's geometry and into B's grid through B's, so
    runs that place images differently (input size, stretch / center-crop / letterbox) compare the
    same places of each image. Past the edge of B's grid the nearest cell counts.
    """
    (ha, wa), (hb, wb) = fr_a.map_shape, fr_b.map_shape
    i, j = np.mgrid[0:ha, 0:wa]
    uv = np.stack([j + 0.5, i + 0.5], axis=-1).reshape(1, -1, 2)  # (1, P, 2) A's cell centres, cell units
    xy = (uv - fr_a.offset[:, None]) / fr_a.scale[:, None]  # (n, P, 2) original pixels
    grid = 2.0 * (xy * fr_b.scale[:, None] + fr_b.offset[:, None]) / np.array([wb, hb]) - 1.0  # B's grid, in [-1, 1]
    grid = torch.from_numpy(grid.reshape(-1, ha, wa, 2)).float()
    t = torch.from_numpy(np.ascontiguousarray(mb, dtype=np.float32))
    return F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False).numpy()


def _classes(images: pd.DataFrame) -> pd.DataFrame:
    """Per class of the first run's target: mean similarity and share of changed predictions."""
    g = images.groupby(["target_a", "target_name"], sort=True)
    out = g.agg(
        maps=("rank_corr", "size"),
        mean_rank_corr=("rank_corr", "mean"),
        mean_top_iou=("top_iou", "mean"),
        prediction_changed=("prediction_changed", "mean"),
    ).reset_index()
    out = out.rename(columns={"target_a": "class", "target_name": "class_name"})
    return out.sort_values(["mean_rank_corr", "class"]).reset_index(drop=True)


def _summary(images: pd.DataFrame, rows_a: pd.DataFrame, rows_b: pd.DataFrame) -> dict:
    per_image = images.drop_duplicates("index")
    return {
        "images_a": int(len(rows_a)),
        "images_b": int(len(rows_b)),
        "matched": int(len(per_image)),
        "mean_rank_corr": float(images["rank_corr"].mean()),
        "median_rank_corr": float(images["rank_corr"].median()),
        "mean_top_iou": float(images["top_iou"].mean()),
        "mean_drift": float(images["drift"].mean()),
        "prediction_changed": float(per_image["prediction_changed"].mean()),
        "changed_images": int(per_image["prediction_changed"].sum()),
    }
