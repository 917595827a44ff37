"""Dataset exemplars: for chosen taps and channels, the k images that most activate each channel.

``ExemplarCollector`` keeps one ``TopK`` per tap and is fed the taps of every batch, by the explain
pass or by ``compute_exemplars`` afterwards. ``exemplars.parquet`` has one row per
(tap, channel, rank): ``tap, channel, rank, index, score, map`` (the channel's activation map,
row-major, ``map_h`` x ``map_w``), best first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from camshaft.engine.postprocess import shown_cells
from camshaft.errors import ConfigError
from camshaft.models.layout import as_maps
from camshaft.preprocess import Geometry, geometry, normalize
from camshaft.report.rerun import image_batches, open_run_backend
from camshaft.report.scan import ok_rows
from camshaft.report.topk import TopK
from camshaft.results import load_results
from camshaft.writers.atomic import atomic_path

EXEMPLARS_FILE = "exemplars.parquet"
COLUMNS = ["tap", "channel", "rank", "index", "score", "map", "map_h", "map_w", "reduce"]


@dataclass(frozen=True)
class ExemplarSpec:
    """A tap and its channels (None: every channel; the report shows the most active ones)."""

    tap: str
    channels: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.channels is not None:  # a channel given twice would list each of its images twice
            object.__setattr__(self, "channels", tuple(dict.fromkeys(int(c) for c in self.channels)))

    @classmethod
    def parse(cls, text: str) -> ExemplarSpec:
        """``TAP`` or ``TAP:C1,C2,...`` (channel indices)."""
        tap, sep, rest = text.strip().rpartition(":")
        if not sep:
            return cls(text.strip())
        parts = [p.strip() for p in rest.split(",") if p.strip()]
        if not tap or not parts or not all(p.isdigit() for p in parts):
            raise ConfigError(f"exemplars {text!r}: expected TAP or TAP:C1,C2,... with channel indices, e.g. layer4:0,7,12")
        return cls(tap, tuple(int(p) for p in parts))


class ExemplarCollector:
    """One running top-k per tap; ``update(taps, indices)`` per batch, then ``table()`` or ``write()``."""

    def __init__(self, specs: Sequence[ExemplarSpec], *, k: int = 8, reduce: str = "max"):
        taps = [s.tap for s in specs]
        if not specs:
            raise ConfigError("exemplars: give at least one tap")
        twice = sorted({t for t in taps if taps.count(t) > 1})
        if twice:
            raise ConfigError(f"exemplars: taps {twice} given more than once; give each tap once, its channels "
                              f"together (e.g. {twice[0]}:0,7)")
        self.accumulators = {s.tap: TopK(k=k, channels=s.channels, reduce=reduce) for s in specs}

    def update(self, taps: Mapping[str, torch.Tensor], indices: Sequence[int], *,
               geometries: Sequence[Geometry] | None = None, input_size: tuple[int, int] | None = None) -> None:
        """Add a batch: ``taps`` maps each tap to its activations (B, C, h, w).

        With the model's ``input_size``, channels-last maps and a transformer's tokens are read as
        (B, C, h, w) too (``camshaft.models.layout``). With the images' ``geometries`` as well, only the
        cells that show an image score it: letterbox padding never does (as in the table's map statistics).
        """
        missing = [t for t in self.accumulators if t not in taps]
        if missing:
            raise ConfigError(f"the batch has no activations for taps {missing}; it has {sorted(taps)}")
        for tap, acc in self.accumulators.items():
            a = taps[tap] if input_size is None else as_maps(taps[tap], input_size)
            shown = None
            if geometries is not None and a.dim() == 4:
                shown = _shown(geometries, input_size, tuple(a.shape[2:]))
            try:
                acc.update(a, indices, shown=shown)
            except ConfigError as e:
                raise ConfigError(f"exemplars of tap {tap!r}: {e}") from e

    def table(self) -> pd.DataFrame:
        """One row per tap, channel and rank; no rows where no image was added (a partition of bad files).

        An image whose score is NaN (a NaN anywhere in its map) is never an exemplar: ``TopK`` ranks
        it last, and here it is left out, so a channel may have fewer than k rows.
        """
        rows = []
        for tap, acc in self.accumulators.items():
            if acc.empty:
                continue
            r = acc.result()
            h, w = r.maps.shape[2:]
            for c, channel in enumerate(r.channels):
                for rank in range(r.scores.shape[1]):
                    if torch.isnan(r.scores[c, rank]):
                        continue  # ranked after every number: nothing after it either
                    rows.append(
                        {
                            "tap": tap,
                            "channel": channel,
                            "rank": rank,
                            "index": int(r.indices[c, rank]),
                            "score": float(r.scores[c, rank]),
                            "map": r.maps[c, rank].reshape(-1).numpy().astype(np.float32),
                            "map_h": h,
                            "map_w": w,
                            "reduce": acc.reduce,
                        }
                    )
        return pd.DataFrame(rows, columns=COLUMNS)

    def write(self, run_dir: str | Path) -> Path:
        """Write ``exemplars.parquet`` into ``run_dir`` atomically."""
        return write_exemplars(self.table(), run_dir)


def _shown(geometries: Sequence[Geometry], input_size: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor | None:
    """(B, h, w) bool of the cells that show each image; None when all do (no letterbox padding)."""
    masks = np.stack([shown_cells(g, input_size, shape) for g in geometries])
    return None if masks.all() else torch.from_numpy(masks)


def merge_tables(tables: Sequence[pd.DataFrame], *, k: int) -> pd.DataFrame:
    """Exemplar tables of partitions -> the table of the whole pass (best k per tap and channel).

    Ties go to the lower image index, as in ``TopK``; NaN scores are never ranked.
    """
    rows = pd.concat([t for t in tables if len(t)], ignore_index=True) if any(len(t) for t in tables) else pd.DataFrame()
    if not rows.empty:
        rows = rows[rows["score"].notna()]
    if rows.empty:
        return pd.DataFrame(columns=COLUMNS)
    rows = rows.sort_values(["tap", "channel", "score", "index"], ascending=[True, True, False, True], kind="stable")
    rows = rows.groupby(["tap", "channel"], sort=False).head(k).copy()
    rows["rank"] = rows.groupby(["tap", "channel"], sort=False).cumcount()
    return rows.reset_index(drop=True)


def write_exemplars(table: pd.DataFrame, run_dir: str | Path) -> Path:
    """Write an exemplar table as ``run_dir/exemplars.parquet``, atomically."""
    path = Path(run_dir) / EXEMPLARS_FILE
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)
    return path


def compute_exemplars(
    run_dir: str | Path,
    *,
    specs: Sequence[ExemplarSpec],
    k: int = 8,
    reduce: str = "max",
    batch_size: int = 32,
    device: str | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Exemplars of a finished run: one pass re-reading its images; written to ``exemplars.parquet``."""
    results = load_results(run_dir)
    collector = ExemplarCollector(specs, k=k, reduce=reduce)
    backend = open_run_backend(results, taps=[s.tap for s in specs], device=device)
    pre = results.preprocess
    rows = ok_rows(results.table)
    sizes = dict(zip(rows["index"], zip(rows["width"], rows["height"], strict=True), strict=True))
    bar = tqdm(total=len(rows), unit="img", desc="exemplars", disable=not progress)
    for indices, images in image_batches(rows, pre, batch_size=batch_size):
        out = backend.forward(normalize(images, pre, device=backend.device))
        geometries = [geometry((int(sizes[i][0]), int(sizes[i][1])), pre) for i in indices]
        collector.update(out.taps, indices, geometries=geometries, input_size=pre.input_size)
        bar.update(len(indices))
    bar.close()
    collector.write(run_dir)
    return collector.table()


def load_exemplars(run_dir: str | Path) -> pd.DataFrame | None:
    """A run's ``exemplars.parquet``, or None when it has none."""
    path = Path(run_dir) / EXEMPLARS_FILE
    return pd.read_parquet(path) if path.exists() else None


def shown_channels(table: pd.DataFrame, tap: str, *, limit: int) -> list[int]:
    """The ``limit`` channels of ``tap`` with the highest best score (all when fewer)."""
    best = table[(table["tap"] == tap) & (table["rank"] == 0)].sort_values(["score", "channel"], ascending=[False, True])
    return best["channel"].head(limit).astype(int).tolist()
