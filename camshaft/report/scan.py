"""One streaming pass over a run's maps: per (image, target) statistics and per-class mean maps.

Maps are read a Zarr chunk of rows at a time (never all at once), so memory stays bounded by one
chunk plus one (h, w) sum per class, whatever the number of images.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from camshaft.engine.targets import class_index
from camshaft.report.boxes import run_boxes
from camshaft.report.frames import frames
from camshaft.report.spatial import SpatialSpec, spatial_metrics
from camshaft.results import Results


@dataclass
class MeanMaps:
    """Running sums of max-normalised maps per explained class (the seeds' ReLU / max)."""

    shape: tuple[int, int]
    sums: dict[int, np.ndarray] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)

    def add(self, maps: np.ndarray, targets: np.ndarray) -> None:
        """Add maps (n, h, w) explaining classes ``targets`` (n,)."""
        targets = np.asarray(targets).reshape(-1)
        order = np.argsort(targets, kind="stable")  # each class's maps in a run, in their order: the same sums
        norm = normalize_maps(np.asarray(maps)[order])  # one gather, not one mask of every map per class
        classes, starts, counts = np.unique(targets[order], return_index=True, return_counts=True)
        for c, start, count in zip(classes.tolist(), starts.tolist(), counts.tolist(), strict=True):
            total = norm[start : start + count].sum(axis=0)
            self.sums[c] = self.sums[c] + total if c in self.sums else total.astype(np.float64)
            self.counts[c] = self.counts.get(c, 0) + count

    def mean(self, c: int) -> np.ndarray:
        """The mean normalised map (h, w) of class ``c``."""
        return (self.sums[c] / self.counts[c]).astype(np.float32)


def normalize_maps(maps: np.ndarray) -> np.ndarray:
    """``normalize_map`` over a stack (n, h, w): ReLU, then each map divided by its maximum."""
    m = np.maximum(np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0), 0.0)
    peak = m.reshape(len(m), -1).max(axis=1) if m.size else np.zeros(len(m), np.float32)
    return m / np.where(peak > 0, peak, 1.0)[:, None, None]


def label_indices(table: pd.DataFrame, class_names) -> np.ndarray:
    """The label of each row as a class index; -1 where there is none or it is not a class."""
    num = len(class_names) if class_names else None
    labels = table["label"]
    distinct = pd.unique(labels.dropna())  # a dataset repeats its labels: look each up once, not once per image
    found = {label: class_index(str(label), class_names=class_names, num_classes=num, names_first=True)
             for label in distinct}
    lookup = {label: -1 if idx is None else idx for label, idx in found.items()}
    return labels.map(lookup).fillna(-1).to_numpy(dtype=np.int64)


def ok_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The explained images, sorted by index."""
    return table[table["status"] == "ok"].sort_values("index").reset_index(drop=True)


def chunks(rows: pd.DataFrame, step: int) -> Iterator[tuple[int, int, pd.DataFrame]]:
    """(lo, hi, rows with lo <= index < hi) over Zarr-aligned row ranges holding explained images."""
    index = rows["index"].to_numpy()
    start = 0
    while start < len(index):
        lo = int(index[start]) // step * step
        hi = lo + step
        stop = int(np.searchsorted(index, hi, side="left"))
        yield lo, hi, rows.iloc[start:stop]
        start = stop


def read_step(maps, *, rows: int = 256) -> int:
    """Rows read at a time: a whole number of Zarr chunks, about ``rows`` images."""
    chunk = max(int(maps.chunks[0]), 1)
    return chunk * max(1, rows // chunk)


def scan(results: Results, *, spec: SpatialSpec, boxes: bool = True) -> tuple[pd.DataFrame, MeanMaps]:
    """Per (image, target) rows of statistics, and the per-class mean maps, in one pass."""
    attrs = results.attrs
    pre = results.preprocess
    maps = results.maps
    _, k, h, w = maps.shape
    names = attrs.get("class_names")
    rows = ok_rows(results.table)
    box_all = run_boxes(rows, attrs.get("data")) if boxes else None
    labels = label_indices(rows, names)
    targets_all = results.targets
    means = MeanMaps((h, w))
    parts = []
    for lo, hi, part in chunks(rows, read_step(maps)):
        sel = part["index"].to_numpy() - lo
        block = np.asarray(maps[lo : min(hi, maps.shape[0])])[sel]  # (n, K, h, w)
        tgt = targets_all[part["index"].to_numpy()]  # (n, K)
        fr = frames(list(zip(part["width"], part["height"], strict=True)), pre, (h, w))
        rep = lambda a: np.repeat(a, k, axis=0)  # noqa: E731  per image -> per (image, target)
        fr_k = type(fr)(rep(fr.scale), rep(fr.offset), rep(fr.content), fr.map_shape)
        box_k = None if box_all is None else rep(box_all[part.index.to_numpy()])
        flat = block.reshape(-1, h, w)
        stats = spatial_metrics(flat, fr_k, box_k, spec)
        means.add(flat, tgt.reshape(-1))
        parts.append(_rows(part, tgt, labels[part.index.to_numpy()], stats, names, box_k))
    columns = ["index", "path", "k", "target", "target_name", "label", "label_index", "top1", "correct", "score"]
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    return table, means


def _rows(part: pd.DataFrame, targets: np.ndarray, labels: np.ndarray, stats: dict, names, boxes) -> pd.DataFrame:
    """Rows of one chunk; ``boxes`` (n * K, 4) or None."""
    n, k = targets.shape
    top1 = np.array([c[0] if len(c) else -1 for c in part["top5_classes"]], dtype=np.int64)
    score = target_scores(part["top5_classes"], part["top5_scores"], targets).reshape(-1)
    flat_t = targets.reshape(-1)
    lab = np.repeat(labels, k)
    out = pd.DataFrame(
        {
            "index": np.repeat(part["index"].to_numpy(), k),
            "path": np.repeat(part["path"].to_numpy(), k),
            "k": np.tile(np.arange(k), n),
            "target": flat_t,
            "target_name": [names[t] if names and 0 <= t < len(names) else str(t) for t in flat_t],
            "label": np.repeat(part["label"].to_numpy(), k),
            "label_index": lab,
            "top1": np.repeat(top1, k),
            "correct": np.where(lab >= 0, np.repeat(top1, k) == lab, np.nan),
            "score": np.asarray(score, dtype=np.float64),
        }
    )
    for name, values in stats.items():
        out[name] = values
    if boxes is not None:
        for j, name in enumerate(("box_x0", "box_y0", "box_x1", "box_y1")):
            out[name] = boxes[:, j]
    return out


def target_scores(classes, scores, targets: np.ndarray) -> np.ndarray:
    """The softmax probability (n, K) of each target when it is among its image's top 5, else NaN: one
    comparison over the chunk (a Python call per map cost seconds per 10^5 images)."""
    cls, prob = _padded(classes, -1, np.int64), _padded(scores, np.nan, np.float64)
    if not cls.size:
        return np.full(np.shape(targets), np.nan)
    hit = cls[:, None, :] == np.asarray(targets, dtype=np.int64)[:, :, None]  # (n, K, width)
    first = np.take_along_axis(prob, hit.argmax(axis=2), axis=1)  # (n, K): the first top-5 entry that is the target
    return np.where(hit.any(axis=2), first, np.nan)


def _padded(lists, fill, dtype) -> np.ndarray:
    """A column of lists as an array (n, longest), shorter lists padded with ``fill``."""
    lists = list(lists)
    width = max((len(v) for v in lists), default=0)
    if width and all(len(v) == width for v in lists):  # the usual case: one copy in C
        return np.stack(lists).astype(dtype, copy=False)
    out = np.full((len(lists), width), fill, dtype)
    for i, v in enumerate(lists):
        out[i, : len(v)] = v
    return out
