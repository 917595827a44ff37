"""One Dask task: explain one partition and write its shard (maps chunk, table rows, overlays).

Tasks receive a picklable context (the job, the output folder) and a list of records, never live
objects; each process builds its explainer once and keeps it. The done-marker is written last, so
a task killed at any moment leaves a partition that the next run simply recomputes. A task whose
run no longer owns the folder (Ctrl-C on a cluster run, or another run took the folder over while a
worker still ran it) stops at its next batch and writes nothing.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from camshaft.data.sources import ImageRecord, path_text
from camshaft.engine.explainer import STAGES, Explainer, build_explainer
from camshaft.engine.job import ExplainJob
from camshaft.errors import Interrupted
from camshaft.pipeline.plan import Partition, file_key
from camshaft.pipeline.state import MAPS_FILE, OVERLAYS_DIR, TABLE_FILE, RunState
from camshaft.writers import maps_store
from camshaft.writers.atomic import atomic_path
from camshaft.writers.pngs import overlay_names, write_overlays
from camshaft.writers.table import SCHEMA, write_table


@dataclass(frozen=True)
class TaskContext:
    job: ExplainJob  # as the workers must run it (models they can load by path)
    out: Path
    map_shapes: tuple[tuple[int, int, int], ...]  # per method of the job, in order
    reuse: bool  # an update: copy unchanged images from the previous run
    model: str = ""  # the model's content fingerprint: a file replaced at the same path is another model
    previous_id: str | None = None  # names the previous run kept aside for this update
    run_id: str | None = None  # the run these tasks belong to (None: not checked): see RunState.claim

    @property
    def state(self) -> RunState:
        return RunState(self.out, self.job.methods)

    @property
    def key(self) -> str:
        return f"{self.job!r} {self.model}"


_EXPLAINERS: dict[str, Explainer] = {}
_PREVIOUS: dict[str, object] = {}  # previous_id and path -> (rows, maps) of a method, or a table
_LOCK = threading.Lock()
# a dask.distributed worker outlives its runs (a nightly job's model changes every night) and no run tells
# it when it ended: it keeps the explainers (models) it built, and the previous rows of updates, of the
# latest runs only
KEEP_ON_WORKERS = 2
_BUILT: list[str] = []  # keys of the explainers this process built for tasks, oldest first
_UPDATES: list[str] = []  # previous_id of the updates whose previous rows this process read, oldest first
_STOPS: dict[Path, threading.Event] = {}


def stop_event(out: Path) -> threading.Event:
    """The run into ``out`` (one at a time: the run lock) stops when this is set (Ctrl-C in the main
    thread, or another partition failed): its partitions still running in this process end at their
    next batch, unfinished (redone when the run resumes)."""
    with _LOCK:
        return _STOPS.setdefault(Path(out), threading.Event())


def forget_stop(out: Path, event: threading.Event) -> None:
    """Drop the stop event of a run into ``out`` that ended with none of its partitions left running."""
    with _LOCK:
        if _STOPS.get(Path(out)) is event:
            del _STOPS[Path(out)]


def register(ctx: TaskContext, explainer: Explainer) -> None:
    """Hand this process's explainer to the tasks that run here (local schedulers)."""
    with _LOCK:
        _EXPLAINERS[ctx.key] = explainer


def _explainer(ctx: TaskContext) -> Explainer:
    with _LOCK:
        if ctx.key not in _EXPLAINERS:  # a dask.distributed worker: load the model once
            explainer = build_explainer(ctx.job, workdir=None)
            for run, shape in zip(explainer.runs, ctx.map_shapes, strict=True):
                run.map_shape = shape
            _EXPLAINERS[ctx.key] = explainer
            for key in _latest(_BUILT, ctx.key):
                _EXPLAINERS.pop(key, None)
        return _EXPLAINERS[ctx.key]


def _latest(order: list[str], key: str) -> list[str]:
    """Note ``key`` as the newest in ``order``; returns the keys beyond ``KEEP_ON_WORKERS`` (to forget)."""
    if key in order:
        order.remove(key)
    order.append(key)
    dropped = order[:-KEEP_ON_WORKERS]
    del order[:-KEEP_ON_WORKERS]
    return dropped


def release(ctx: TaskContext) -> None:
    """Forget what this process kept for the run of ``ctx`` (at its end, local schedulers)."""
    with _LOCK:
        _EXPLAINERS.pop(ctx.key, None)
        for key in [k for k in _PREVIOUS if k.startswith(f"{ctx.previous_id} ")]:
            del _PREVIOUS[key]


class PreviousRows:
    """The previous run's table, kept as Arrow (about 0.3 kB a row, where Python dicts of every row took
    7 kB: a nightly update of a million images must not hold gigabytes) with its rows' positions by path."""

    def __init__(self, path: Path):
        self.table = pq.read_table(path, schema=SCHEMA)
        self.at: dict[str, int | list[int]] = {}  # path -> position(s): a manifest may list a file twice
        for i, name in enumerate(self.table.column("path").to_pylist()):
            seen = self.at.setdefault(name, i)
            if seen != i:
                self.at[name] = [*(seen if isinstance(seen, list) else [seen]), i]

    def match(self, records: list[ImageRecord]) -> list[dict | None]:
        """For each record, the previous row of the same file, label and box (None: none)."""
        wanted = [path_text(r.path) for r in records]
        positions = sorted({i for name in wanted if name in self.at
                            for i in (self.at[name] if isinstance(self.at[name], list) else [self.at[name]])})
        by_key = {_reuse_key((r["path"], r["file_size"], r["mtime_ns"]), r["label"], r["box"]): r
                  for r in self.table.take(positions).to_pylist()} if positions else {}
        return [by_key.get(_reuse_key(file_key(r), r.label, r.box)) for r in records]


def _previous(ctx: TaskContext, method: str) -> tuple[PreviousRows, object]:
    """The previous run's rows and its maps group (read once per process and update)."""
    folder = ctx.state.previous_dir(method)
    # another update of the same folder has other rows and maps
    return _kept(ctx, folder, lambda: (PreviousRows(folder / TABLE_FILE), maps_store.open_maps(folder / MAPS_FILE)))


def _kept(ctx: TaskContext, path: Path, load):
    """What ``load`` reads of the previous run at ``path``, read once per process and update; the previous runs
    of all but the latest updates forgotten."""
    key = f"{ctx.previous_id} {path}"
    with _LOCK:
        if key not in _PREVIOUS:
            _PREVIOUS[key] = load()
            for old in _latest(_UPDATES, str(ctx.previous_id)):
                for stale in [k for k in _PREVIOUS if k.startswith(f"{old} ")]:
                    del _PREVIOUS[stale]
        return _PREVIOUS[key]


def _reuse_key(file: tuple, label, box) -> tuple:
    """What a previous row must share with a record to be reused: the file and the manifest's label and box.

    Names and labels are compared as the table writes them (:func:`path_text`).
    """
    path, *stat = file
    label = None if label is None else path_text(label)
    return (path_text(path), *stat, label, None if box is None else tuple(float(v) for v in box))


def run_partition(ctx: TaskContext, part: Partition, records: list[ImageRecord]) -> dict:
    """Explain ``records`` (rows ``part.start:part.stop``) and write the partition's shards."""
    start = time.perf_counter()
    state = ctx.state
    _check_owner(ctx, state)
    if state.is_done(part):  # run again on a cluster (its first worker died after the marker): nothing to redo
        return load_summary(state, part)
    explainer = _explainer(ctx)
    indices = list(range(part.start, part.stop))
    names = [r.name for r in explainer.runs]
    rows = {name: [None] * len(records) for name in names}
    maps = {name: np.full((len(records), *shape), np.nan, dtype=np.float32) for name, shape in zip(names, ctx.map_shapes, strict=True)}
    targets = {name: np.full((len(records), explainer.targets.k), -1, dtype=np.int32) for name in names}
    if ctx.reuse:
        for name in names:
            old_rows, old_maps = _previous(ctx, name)
            reused = {}  # row here -> row in the previous run
            for i, (record, old) in enumerate(zip(records, old_rows.match(records), strict=True)):
                if old is not None and record.error is None:
                    rows[name][i] = {**old, "index": indices[i], "_old_index": old["index"]}
                    reused[i] = int(old["index"])
            if reused:  # one read per array (a chunk is decoded once, not once per image)
                wanted = np.array(sorted(set(reused.values())))
                at = {old: j for j, old in enumerate(wanted.tolist())}
                old_block, old_targets = old_maps["maps"].oindex[wanted], old_maps["targets"].oindex[wanted]
                for i, old in reused.items():
                    maps[name][i], targets[name][i] = old_block[at[old]], old_targets[at[old]]
    todo = [i for i in range(len(records)) if any(rows[n][i] is None for n in names)]
    metrics = {name: [_previous_metrics(ctx, name, rows[name], todo)] for name in names} if explainer.metric_specs else {}
    if todo:
        stop = stop_event(ctx.out)
        out = explainer.explain([records[i] for i in todo], [indices[i] for i in todo],
                                stop=lambda: stop.is_set() or not _owns(ctx, state))
        for name in names:
            for j, i in enumerate(todo):
                rows[name][i], maps[name][i], targets[name][i] = out.rows[name][j], out.maps[name][j], out.targets[j]
            if name in metrics:
                metrics[name].append(out.metrics[name])
    _check_owner(ctx, state)  # before its first write: the explaining took a while
    if todo and out.exemplars is not None:
        _write_frame(out.exemplars, state.dir / "exemplars" / f"{part.name}.parquet")
    for name, parts in metrics.items():
        _write_frame(pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts) else pd.DataFrame(), state.dir / "metrics" / name / f"{part.name}.parquet")
    info = explainer.backend.info
    written = time.perf_counter()
    for name in names:
        old_index = [r.pop("_old_index", None) for r in rows[name]]
        folder = state.method_dir(name)
        maps_store.write_rows(folder / MAPS_FILE, part.start, maps[name], targets[name])
        write_table(rows[name], state.rows_path(part, name))
        if ctx.job.overlays:
            render = [j for j, linked in enumerate(_reuse_overlays(ctx, name, rows[name], old_index, info.class_names))
                      if not linked]
            write_overlays(folder / OVERLAYS_DIR, [rows[name][j] for j in render], maps[name][render],
                           preprocess=info.preprocess, class_names=info.class_names)
    stages = {**dict.fromkeys(STAGES, 0.0), **(out.stages if todo else {}), "writing": time.perf_counter() - written}
    first = rows[names[0]]
    failed = [(r["path"], r["error"]) for r in first if r["status"] != "ok"]
    summary = {
        "partition": part.number,
        "images": len(records),
        "explained": len(todo),
        "reused": len(records) - len(todo),
        "failed": len(failed),
        "errors": failed[:20],
        "seconds": time.perf_counter() - start,
        "stages": stages,
    }
    _check_owner(ctx, state)
    state.mark_done(part, summary)
    return summary


def _reuse_overlays(ctx: TaskContext, method: str, rows: list[dict], old_index: list, class_names) -> list[bool]:
    """Link the previous run's overlays of the reused ``rows`` under their new names (an overlay's name starts with
    its row's index, which an update shifts); True where a row's overlays were all linked. Rendering them again
    cost an update with overlays about as much as a full run."""
    source = ctx.state.previous_dir(method) / OVERLAYS_DIR
    folder = ctx.state.method_dir(method) / OVERLAYS_DIR
    linked = []
    for row, old in zip(rows, old_index, strict=True):
        if old is None or not ctx.reuse or row["status"] != "ok" or not source.is_dir():
            linked.append(False)
            continue
        targets = list(row["targets"])
        pairs = zip(overlay_names(old, row["path"], targets, class_names),
                    overlay_names(row["index"], row["path"], targets, class_names), strict=True)
        try:
            for before, now in pairs:
                with atomic_path(folder / now) as tmp:
                    os.link(source / before, tmp)
        except OSError:  # not there (the overlays came later), or no hard links here: rendered
            linked.append(False)
        else:
            linked.append(True)
    return linked


def _owns(ctx: TaskContext, state: RunState) -> bool:
    """Whether the run of ``ctx`` still owns its folder (a task of a run that was not given an id: yes)."""
    return ctx.run_id is None or state.owner() == ctx.run_id


def _check_owner(ctx: TaskContext, state: RunState) -> None:
    """Raise :class:`Interrupted` when another run took the folder over: this task's results must not enter it."""
    if not _owns(ctx, state):
        raise Interrupted(f"another run took {ctx.out} over: this partition of an earlier run writes nothing")


def _previous_metrics(ctx: TaskContext, name: str, rows: list, todo: list[int]):
    """Faithfulness rows of the reused images, taken from the previous run, re-indexed."""
    path = ctx.state.previous_dir(name) / "metrics.parquet"
    computed = set(todo)
    reused = {r["_old_index"]: r["index"] for i, r in enumerate(rows) if i not in computed}
    if not ctx.reuse or not path.exists() or not reused:
        return pd.DataFrame()
    # read once per process and update: each partition filtering the file read all of it (one row group)
    table = _kept(ctx, path, lambda: pq.read_table(path))
    wanted = pa.array(list(reused), table.schema.field("index").type)
    old = table.filter(pc.is_in(table.column("index"), value_set=wanted)).to_pandas()  # the rows wanted
    old["index"] = old["index"].map(reused)
    return old


def _write_frame(frame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def load_summary(state: RunState, part: Partition) -> dict:
    return json.loads((state.dir / "done" / f"{part.name}.json").read_text())
