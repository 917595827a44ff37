"""Faithfulness metrics of a run: collected batch by batch, written as ``metrics.parquet``.

``MetricsCollector`` is what a pass over the data calls (the explain pass, or ``compute_metrics``
afterwards): ``update(backend, x, maps, targets, indices)`` per batch, then ``write(run_dir)``.
The file has one row per (image, target): ``index, k, target`` and, per metric, ``<kind>_auc`` and
``<kind>_curve`` (the n + 1 scores); the specs are in the file's metadata.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from camshaft.errors import ConfigError
from camshaft.preprocess import normalize
from camshaft.report.faithfulness import CurveSpec, area, curves
from camshaft.report.rerun import image_batches, open_run_backend
from camshaft.report.scan import ok_rows
from camshaft.results import load_results
from camshaft.writers.atomic import atomic_path

METRICS_FILE = "metrics.parquet"
_META_KEY = b"camshaft.metrics"


class MetricsCollector:
    """Curves and areas for every (image, target) seen, one batch at a time."""

    def __init__(self, specs: Sequence[CurveSpec]):
        kinds = [s.kind for s in specs]
        if not specs or len(set(kinds)) != len(kinds):
            raise ConfigError(f"give each metric once, received {kinds}")
        self.specs = tuple(specs)
        self._parts: list[pd.DataFrame] = []

    def update(self, backend, x: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor, indices: Sequence[int]) -> None:
        """Add the images ``indices`` (B,) of the batch ``x`` with their maps (B, K, h, w) and targets (B, K)."""
        self._parts.append(metric_rows(backend, x, maps, targets, indices, specs=self.specs))

    def table(self) -> pd.DataFrame:
        if not self._parts:
            return pd.DataFrame(columns=["index", "k", "target"])
        return pd.concat(self._parts, ignore_index=True).sort_values(["index", "k"]).reset_index(drop=True)

    def write(self, run_dir: str | Path) -> Path:
        """Write ``metrics.parquet`` into ``run_dir`` atomically (temporary name, then rename)."""
        return write_metrics(self.table(), run_dir, self.specs)


def metric_rows(
    backend, x: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor, indices: Sequence[int], *, specs: Sequence[CurveSpec]
) -> pd.DataFrame:
    """The rows of one batch, one per (image, target): ``index, k, target, <kind>_auc, <kind>_curve``.

    Pure: the same inputs give the same rows, nothing is kept (safe to retry after out-of-memory).
    """
    b, k = targets.shape
    rows = pd.DataFrame(
        {
            "index": np.repeat(np.asarray(indices, dtype=np.int64), k),
            "k": np.tile(np.arange(k, dtype=np.int32), b),
            "target": targets.reshape(-1).cpu().numpy().astype(np.int32),
        }
    )
    for spec in specs:
        c = curves(backend, x, maps, targets, spec=spec)  # (B, K, n + 1)
        rows[f"{spec.kind}_auc"] = area(c).reshape(-1).cpu().numpy().astype(np.float32)
        rows[f"{spec.kind}_curve"] = list(c.reshape(b * k, -1).cpu().numpy().astype(np.float32))
    return rows


def write_metrics(table: pd.DataFrame, run_dir: str | Path, specs: Sequence[CurveSpec]) -> Path:
    """Write metrics rows (from one collector, or the concatenated tables of partitions) atomically."""
    path = Path(run_dir) / METRICS_FILE
    if len(table):  # a batch retried after out-of-memory may have left its rows twice
        table = table.drop_duplicates(["index", "k"], keep="last").sort_values(["index", "k"]).reset_index(drop=True)
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    meta = json.dumps([{**asdict(s), "baseline": s.resolved_baseline} for s in specs])
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), _META_KEY: meta.encode()})
    with atomic_path(path) as tmp:
        pq.write_table(arrow, tmp)
    return path


def compute_metrics(
    run_dir: str | Path,
    *,
    specs: Sequence[CurveSpec],
    batch_size: int = 16,
    device: str | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Faithfulness metrics of a finished run, written to ``run_dir/metrics.parquet`` and returned.

    Re-reads the images ``batch_size`` at a time and reopens the run's model (see ``rerun``);
    the maps come from the run, so the numbers are those of the explanations it stored.
    """
    results = load_results(run_dir)
    collector = MetricsCollector(specs)
    backend = open_run_backend(results, device=device)
    pre = results.preprocess
    rows = ok_rows(results.table)
    targets_all = results.targets  # (images, K): small, read once
    bar = tqdm(total=len(rows), unit="img", desc="metrics", disable=not progress)
    for indices, images in image_batches(rows, pre, batch_size=batch_size):
        x = normalize(images, pre, device=backend.device)
        maps = torch.from_numpy(np.asarray(results.maps.get_orthogonal_selection((indices,))))
        targets = torch.from_numpy(targets_all[indices].astype(np.int64))
        collector.update(backend, x, maps.to(backend.device), targets.to(backend.device), indices)
        bar.update(len(indices))
    bar.close()
    collector.write(run_dir)
    return collector.table()


def load_metrics(run_dir: str | Path) -> tuple[pd.DataFrame, list[dict]] | None:
    """``metrics.parquet`` of a run and its specs, or None when the run has none."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return None
    table = pq.read_table(path)
    meta = (table.schema.metadata or {}).get(_META_KEY)
    return table.to_pandas(), json.loads(meta) if meta else []
