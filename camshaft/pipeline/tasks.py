"""One Dask task: explain one partition and write its shard (maps chunk, table rows, overlays).

Tasks receive a picklable context (the job, the output folder) and a list of records, never live
objects; each process builds its explainer once and keeps it. The done-marker is written last, so
a task killed at any moment leaves a partition that the next run simply recomputes.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from camshaft.data.sources import ImageRecord
from camshaft.engine.explainer import Explainer, build_explainer
from camshaft.engine.job import ExplainJob
from camshaft.pipeline.plan import Partition, file_key
from camshaft.pipeline.state import MAPS_FILE, OVERLAYS_DIR, TABLE_FILE, RunState
from camshaft.writers import maps_store
from camshaft.writers.pngs import write_overlays
from camshaft.writers.table import read_rows, write_table


@dataclass(frozen=True)
class TaskContext:
    job: ExplainJob  # as the workers must run it (models they can load by path)
    out: Path
    map_shape: tuple[int, int, int]
    reuse: bool  # an update: copy unchanged images from the previous run

    @property
    def key(self) -> str:
        return repr(self.job)


_EXPLAINERS: dict[str, Explainer] = {}
_PREVIOUS: dict[str, tuple[dict, object]] = {}
_LOCK = threading.Lock()


def register(ctx: TaskContext, explainer: Explainer) -> None:
    """Hand this process's explainer to the tasks that run here (local schedulers)."""
    with _LOCK:
        _EXPLAINERS[ctx.key] = explainer


def _explainer(ctx: TaskContext) -> Explainer:
    with _LOCK:
        if ctx.key not in _EXPLAINERS:  # a dask.distributed worker: load the model once
            explainer = build_explainer(ctx.job, workdir=None)
            explainer.map_shape = ctx.map_shape
            _EXPLAINERS[ctx.key] = explainer
        return _EXPLAINERS[ctx.key]


def _previous(ctx: TaskContext):
    """The previous run's rows by file key, and its maps group (read once per process)."""
    state = RunState(ctx.out)
    with _LOCK:
        if str(state.previous) not in _PREVIOUS:
            rows = {(r["path"], r["file_size"], r["mtime_ns"]): r for r in read_rows(state.previous / TABLE_FILE)}
            _PREVIOUS[str(state.previous)] = (rows, maps_store.open_maps(state.previous / MAPS_FILE))
        return _PREVIOUS[str(state.previous)]


def run_partition(ctx: TaskContext, part: Partition, records: list[ImageRecord]) -> dict:
    """Explain ``records`` (rows ``part.start:part.stop``) and write the partition's shard."""
    start = time.perf_counter()
    explainer = _explainer(ctx)
    state = RunState(ctx.out)
    indices = list(range(part.start, part.stop))
    k, h, w = ctx.map_shape
    rows: list[dict | None] = [None] * len(records)
    maps = np.full((len(records), k, h, w), np.nan, dtype=np.float32)
    targets = np.full((len(records), k), -1, dtype=np.int32)
    if ctx.reuse:
        old_rows, old_maps = _previous(ctx)
        for i, record in enumerate(records):
            old = old_rows.get(file_key(record))
            if old is not None and record.error is None:
                rows[i] = {**old, "index": indices[i]}
                maps[i], targets[i] = old_maps["maps"][old["index"]], old_maps["targets"][old["index"]]
    todo = [i for i, r in enumerate(rows) if r is None]
    if todo:
        out = explainer.explain([records[i] for i in todo], [indices[i] for i in todo])
        for j, i in enumerate(todo):
            rows[i], maps[i], targets[i] = out.rows[j], out.maps[j], out.targets[j]
    maps_store.write_rows(ctx.out / MAPS_FILE, part.start, maps, targets)
    write_table(rows, state.rows_path(part))
    if ctx.job.overlays:
        info = explainer.backend.info
        write_overlays(ctx.out / OVERLAYS_DIR, rows, maps, preprocess=info.preprocess, class_names=info.class_names)
    failed = [(r["path"], r["error"]) for r in rows if r["status"] != "ok"]
    summary = {
        "partition": part.number,
        "images": len(records),
        "explained": len(todo),
        "reused": len(records) - len(todo),
        "failed": len(failed),
        "errors": failed[:20],
        "seconds": time.perf_counter() - start,
    }
    state.mark_done(part, summary)
    return summary


def load_summary(state: RunState, part: Partition) -> dict:
    return json.loads((state.dir / "done" / f"{part.name}.json").read_text())
