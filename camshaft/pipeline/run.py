"""Run an explain job over a dataset: plan partitions, resume or update, schedule, assemble.

The first run of a job plans the dataset into partitions and runs one Dask task per partition.
Rerunning the same command skips finished partitions (resume). Rerunning it after the dataset
changed explains only new or changed files and copies the rest from the previous results
(update), unless the model or the job changed, which starts over. ``overwrite`` always starts over.
"""

from __future__ import annotations

import contextlib
import shutil
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from camshaft.data.sources import list_images
from camshaft.engine.explainer import STAGES, Explainer, build_explainer
from camshaft.engine.job import ExplainJob
from camshaft.errors import ConfigError
from camshaft.exporters.metadata import version
from camshaft.pipeline import plan as planning
from camshaft.pipeline.lock import run_lock
from camshaft.pipeline.schedule import LOCAL, check_scheduler, connected, run_tasks
from camshaft.pipeline.state import ARTIFACTS_DIR, MAPS_FILE, OVERLAYS_DIR, TABLE_FILE, RunState
from camshaft.pipeline.tasks import TaskContext, load_summary, register, release
from camshaft.writers import maps_store
from camshaft.writers.atomic import atomic_path, write_json
from camshaft.writers.table import assemble


@dataclass
class RunSummary:
    out: Path
    images: int
    ok: int
    failed: int
    seconds: float
    method: str
    tap: str | None
    backend: str
    mode: str = "fresh"  # fresh | resume | update
    explained: int = 0  # images computed in this run (the others were resumed or reused)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    result_dirs: list[Path] = field(default_factory=list)  # one run directory per method
    # seconds per stage summed over this run's partitions (they overlap): see explainer.STAGES
    stages: dict[str, float] = field(default_factory=dict)
    decoding: str = ""  # who decoded the images, e.g. "15 processes"

    @property
    def images_per_second(self) -> float:
        return self.explained / self.seconds if self.seconds > 0 else float("nan")

    @property
    def maps_path(self) -> Path:
        return self.result_dirs[0] / MAPS_FILE

    @property
    def table_path(self) -> Path:
        return self.result_dirs[0] / TABLE_FILE

    @property
    def overlays_dir(self) -> Path:
        return self.result_dirs[0] / OVERLAYS_DIR


def run_explain(job: ExplainJob, *, progress: bool = True) -> RunSummary:
    """Explain every image of ``job.data`` into ``job.out``.

    All validation happens before any image is read; a job that fails it leaves no output folder.
    One run at a time writes into an output folder: a second one is refused (``ConfigError``).
    """
    out = Path(job.out)
    created = None if out.exists() else next(p for p in [*reversed(out.parents), out] if not p.exists())
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot write into --out {str(out)!r}: {e.strerror or e}; choose a writable folder") from e
    with run_lock(out):
        return _run(job, out, created=created, progress=progress)


def _run(job: ExplainJob, out: Path, *, created: Path | None, progress: bool) -> RunSummary:
    """``created``: the topmost folder this run made for ``out`` (a refused job removes it again)."""
    artifacts = out / ARTIFACTS_DIR
    had = set(artifacts.iterdir()) if artifacts.is_dir() else None  # a refused job takes back its export
    with contextlib.ExitStack() as stack:  # a cluster's client, open for the whole run
        try:
            check_scheduler(job.scheduler)
            # connected before anything in ``out`` changes: an unreachable cluster leaves the last results alone
            scheduler = stack.enter_context(connected(job.scheduler))
            records = list_images(job.data, labels_from_folders=job.labels_from_folders, exclude=out)
            if job.targets.strip() == "label" and not any(r.label is not None for r in records):
                raise ConfigError(f"--targets label needs labels, and {job.data} has none: "
                                  "use a manifest with a label column")
            explainer = build_explainer(job, workdir=out / ARTIFACTS_DIR)
            job = explainer.job  # its backend named (``auto`` resolved for the model)
            explainer.probe(images=len(records))
        except Exception:
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            elif had is None:
                shutil.rmtree(artifacts, ignore_errors=True)
            else:
                for path in set(artifacts.iterdir()) - had if artifacts.is_dir() else ():
                    path.unlink(missing_ok=True)
            raise
        state = RunState(out, job.methods)
        model = planning.model_fingerprint(explainer)
        identity = {
            "job": planning.job_fingerprint(explainer, model),
            "listing": planning.listing_fingerprint(records),
            "partition_size": job.partition_size,
            "overlays": job.overlays,  # asked for later: an update writes them, reusing every map
            "methods": list(job.methods),
        }
        run_id = uuid.uuid4().hex  # this run's: a late task of an earlier one commits nothing from now on
        mode = _prepare(state, job, identity, explainer, len(records), run_id=run_id)
        return _execute(state, job, explainer, records, mode, model=model, progress=progress,
                        scheduler=scheduler, run_id=run_id)


def _prepare(state: RunState, job: ExplainJob, identity: dict, explainer: Explainer, n: int, *,
             run_id: str | None = None) -> str:
    """Decide fresh / resume / update from what ``out`` holds, and set the folder up for it.

    ``run_id`` takes the folder over first: tasks of earlier runs still running elsewhere write nothing.
    """
    if run_id is not None:
        state.claim(run_id)
    state.remove_temporaries()  # a killed run's half-written files: never results, never left behind
    stored = state.load()
    before = RunState(state.out, tuple((stored or {}).get("methods") or job.methods))  # the methods on disk
    before.remove_temporaries()  # in their folders, which another set of methods does not look into
    before.restore_interrupted()
    if before.methods != tuple(job.methods):
        before.reset()  # another set of methods: their results go too
        stored = None
    previous = None if job.overwrite else stored
    same_job = previous is not None and previous.get("job") == identity["job"]
    stores = all(maps_store.is_whole(state.method_dir(r.name) / MAPS_FILE, n_images=n, map_shape=r.map_shape)
                 for r in explainer.runs)  # not so when an update was killed as it moved them aside
    if same_job and stores and all(previous.get(k) == v for k, v in identity.items()):
        return "resume"
    reusable = not job.exemplars  # a dataset's exemplars need every image again
    finished = all((state.method_dir(m) / TABLE_FILE).exists() for m in job.methods)
    previous_id = None
    if same_job and reusable and previous.get("complete") and finished:
        mode = "update"
        state.keep_previous()
        previous_id = uuid.uuid4().hex
    elif same_job and reusable and state.previous.exists():  # an interrupted update, and the data changed again
        mode = "update"
        state.clear_partitions()
        # the id of the update that set ``previous`` aside; a complete run.json is older than ``previous`` (an
        # update killed just after the move): its id named other rows, which a cluster worker may still hold
        previous_id = (None if previous.get("complete") else previous.get("previous_id")) or uuid.uuid4().hex
    elif same_job and reusable and _salvage(state, previous, explainer):  # a stopped run, and the data changed
        mode = "update"
        state.keep_previous()
        previous_id = uuid.uuid4().hex
    else:
        mode = "fresh"
        state.reset()
    for run in explainer.runs:
        folder = state.method_dir(run.name)
        folder.mkdir(parents=True, exist_ok=True)
        maps_store.create_store(folder / MAPS_FILE, n_images=n, map_shape=run.map_shape, chunk=job.partition_size, attrs=_attrs(job, explainer, run))
    state.save({**identity, "complete": False, "mode": mode, "images": n, "previous_id": previous_id})
    return mode


def _salvage(state: RunState, stored: dict, explainer: Explainer) -> bool:
    """The finished partitions of a run that stopped part-way, made a finished run's results for an update to
    reuse (False: none finished). A stopped run whose data then changed (a night's new files), or that is rerun
    with other ``--overlays`` or ``--partition-size``, started over from nothing: 30,000 images again for one
    added."""
    try:
        old = planning.plan(int(stored["images"]), int(stored["partition_size"]))
    except (KeyError, TypeError, ValueError):
        return False
    done = [p for p in old if state.is_done(p)]
    names = [run.name for run in explainer.runs]
    shards = {name: [state.rows_path(p, name) for p in done] for name in names}
    if not done or not all(path.exists() for paths in shards.values() for path in paths):
        return False
    if not all((state.method_dir(name) / MAPS_FILE).exists() for name in names):
        return False
    for name in names:
        assemble(shards[name], state.method_dir(name) / TABLE_FILE)
    _assemble_extras(state, explainer, done)
    return True


def _execute(
    state: RunState, job: ExplainJob, explainer: Explainer, records, mode: str, *, model: str, progress: bool,
    scheduler=None, run_id: str | None = None,
) -> RunSummary:
    """``scheduler``: what ``run_tasks`` takes (a connected client for a cluster); None: ``job.scheduler``.
    ``run_id``: the id the run claimed the folder with (its tasks check it before they write)."""
    partitions = planning.plan(len(records), job.partition_size)
    todo = [p for p in partitions if not state.is_done(p)]
    stored = state.load() or {}
    reuse = mode == "update" or stored.get("mode") == "update"
    shapes = tuple(run.map_shape for run in explainer.runs)
    worker_job = _worker_job(job, explainer, state)
    ctx = TaskContext(worker_job, Path(worker_job.out), shapes, reuse, model, stored.get("previous_id"), run_id)
    if job.scheduler in LOCAL:
        register(ctx, explainer)
    start = time.perf_counter()
    done_images = len(records) - sum(p.stop - p.start for p in todo)
    names = [run.name for run in explainer.runs]
    bar = tqdm(total=len(records), initial=done_images, unit="img", desc=f"{'+'.join(names)} ({explainer.backend.name})", disable=not progress)
    try:
        summaries = run_tasks(ctx, [(p, records[p.start : p.stop]) for p in todo], scheduler=scheduler or job.scheduler,
                              on_done=lambda s: bar.update(s["images"]))
    finally:
        release(ctx)
        bar.close()
    seconds = time.perf_counter() - start
    state.remove_temporaries()  # of writers that died while others redid their work (cluster workers lost)
    assembled = [assemble([state.rows_path(p, n) for p in partitions], state.method_dir(n) / TABLE_FILE) for n in names]
    images, errors = assembled[0]  # the methods share their images, and the failures among them
    _assemble_extras(state, explainer, partitions)
    state.save({**state.load(), "complete": True})
    state.drop_previous()
    explained = sum(s["explained"] for s in summaries)
    stages = {k: sum(s.get("stages", {}).get(k, 0.0) for s in summaries) for k in STAGES}
    first = explainer.runs[0]
    return RunSummary(
        state.out, images, images - len(errors), len(errors), seconds, "+".join(names), first.tap,
        explainer.backend.name, mode, explained, errors, [state.method_dir(n) for n in names], stages,
        explainer.decoder.description,
    )


def _assemble_extras(state: RunState, explainer: Explainer, partitions) -> None:
    """metrics.parquet per method and exemplars.parquet from the partitions' shards."""
    import pandas as pd

    from camshaft.report.exemplars import merge_tables, write_exemplars
    from camshaft.report.metrics import write_metrics

    def shards(folder: Path) -> list:
        return [pd.read_parquet(folder / f"{p.name}.parquet") for p in partitions if (folder / f"{p.name}.parquet").exists()]

    for run in explainer.runs:
        if explainer.metric_specs:
            parts = [f for f in shards(state.dir / "metrics" / run.name) if len(f)]
            table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["index", "k", "target"])
            write_metrics(table, state.method_dir(run.name), explainer.metric_specs)
        if explainer.exemplar_specs:
            write_exemplars(merge_tables(shards(state.dir / "exemplars"), k=explainer.job.exemplar_k), state.method_dir(run.name))


def _worker_job(job: ExplainJob, explainer: Explainer, state: RunState) -> ExplainJob:
    """The job as a dask.distributed worker must run it: the model and class names this process loaded.

    Workers read the data and write the results themselves, so those are on storage they share; the
    model's weights and the class names are written into the run's folder, so that no worker
    depends on a file only this machine sees, and all of them get what this process validated even
    if the user's files change during the run (a nightly job writing tomorrow's checkpoint).
    """
    if job.scheduler in LOCAL:
        return job
    from camshaft.engine.backends.base import LIVE_BACKENDS
    from camshaft.engine.backends.registry import ARTIFACT_NAMES, FILE_BACKENDS

    # absolute: a worker started in another folder (dask worker, a service) reads and writes the same files
    state = RunState(state.out.absolute(), state.methods)
    job = replace(job, out=state.out, data=Path(job.data).absolute())
    from_file = explainer.source.kind in FILE_BACKENDS or explainer.source.path is not None  # or converted from one
    if from_file:  # an exported model: a path (a name or module:factory stays)
        job = replace(job, model=str(Path(job.model).absolute()))
    if job.class_names is not None:
        path = state.dir / "class_names.json"
        write_json(path, list(explainer.backend.info.class_names))
        job = replace(job, class_names=path)
    source = explainer.source
    if source.kind == "torch" and job.backend not in LIVE_BACKENDS:
        return replace(job, model=str(state.out / ARTIFACTS_DIR / ARTIFACT_NAMES[job.backend]), weights=None)
    if source.kind == "torch" and source.spec != "demo" and not from_file:  # random weights too: the same for all
        path = state.dir / "weights.pt"
        with atomic_path(path) as tmp:
            torch.save(source.module.state_dict(), tmp)
        return replace(job, weights=path)
    return job


def _attrs(job: ExplainJob, explainer: Explainer, run) -> dict:
    info = explainer.backend.info
    return {
        "method": run.name,
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in run.options.items()},
        "tap": run.tap,
        "targets": str(explainer.targets),
        "model": info.source,
        "model_spec": job.model or "demo",  # what resolve_model() takes to reload it
        "weights": None if job.weights is None else str(Path(job.weights).resolve()),
        "data": str(Path(job.data).resolve()),
        "backend": job.backend,
        "preprocess": info.preprocess.to_dict(),
        "class_names": list(info.class_names) if info.class_names else None,
        "camshaft_version": version(),
    }


__all__ = ["RunSummary", "run_explain", "load_summary"]
