"""Run an explain job over a dataset: decode on threads, explain on the device, write as we go.

Decoding and preprocessing of the next batches run on a thread pool while the device explains the
current one. Every image gets a row in the results table; one that cannot be read gets an error
row and the run goes on.
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from camshaft.data.decode import load_rgb
from camshaft.data.sources import ImageRecord, list_images
from camshaft.engine.backends import Backend, backend_factory
from camshaft.engine.backends.base import resolve_device, resolve_dtype
from camshaft.engine.job import ExplainJob
from camshaft.engine.methods import Method, check_backend, get_method
from camshaft.engine.postprocess import map_stats
from camshaft.engine.targets import Targets, class_index
from camshaft.errors import CamshaftError, ConfigError
from camshaft.exporters.metadata import version
from camshaft.models.sources import resolve_model
from camshaft.preprocess import Geometry, Preprocess, normalize, prepare
from camshaft.writers.maps_store import MapsStore
from camshaft.writers.pngs import write_overlays
from camshaft.writers.table import write_table

MAPS_FILE, TABLE_FILE, OVERLAYS_DIR = "maps.zarr", "results.parquet", "overlays"


@dataclass
class RunSummary:
    out: Path
    images: int
    ok: int
    failed: int
    seconds: float
    method: str
    tap: str
    backend: str
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    @property
    def maps_path(self) -> Path:
        return self.out / MAPS_FILE

    @property
    def table_path(self) -> Path:
        return self.out / TABLE_FILE

    @property
    def overlays_dir(self) -> Path:
        return self.out / OVERLAYS_DIR


@dataclass
class Decoded:
    record: ImageRecord
    index: int
    tensor: torch.Tensor | None = None  # uint8 (3, H, W)
    geometry: Geometry | None = None
    image: object = None  # the original PIL image, kept for overlays
    error: str | None = None


def _setup(job: ExplainJob, out: Path):
    """Everything that can be checked before the first image: records, backend, method, targets."""
    records = list_images(job.data)
    source = resolve_model(job.model, weights=job.weights)
    device, dtype = resolve_device(job.device), resolve_dtype(job.dtype)
    method = get_method(job.method)
    if job.targets.strip() == "label" and not any(r.label is not None for r in records):
        raise ConfigError(f"--targets label needs labels, and {job.data} has none: use a manifest with a label column")
    backend = backend_factory(job.backend)(
        source,
        taps=[job.tap] if job.tap else None,
        preprocess=job.preprocess_overrides(),
        device=device,
        dtype=dtype,
        workdir=out / "artifacts",  # only written when a torch model must be exported first
    )
    info = backend.info
    tap = None
    if method.uses_tap:
        tap = job.tap or (info.cam_tap if method.name == "cam" and info.cam_tap else info.taps[-1])
    check_backend(method, backend, tap=tap)
    targets = Targets.parse(job.targets, class_names=info.class_names, num_classes=info.num_classes)
    return records, backend, method, tap, targets


def run_explain(job: ExplainJob, *, progress: bool = True) -> RunSummary:
    """Explain every image of ``job.data``; results land in ``job.out``.

    All validation happens before any image is read; a job that fails it leaves no output folder.
    """
    out = Path(job.out)
    existed = out.exists()
    try:
        records, backend, method, tap, targets = _setup(job, out)
    except Exception:
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        raise
    out.mkdir(parents=True, exist_ok=True)
    info = backend.info
    store = MapsStore(out / MAPS_FILE, n_images=len(records), chunk=job.batch_size, attrs=_attrs(job, info, tap, targets))
    rows: list[dict] = []
    start = time.perf_counter()
    bar = tqdm(total=len(records), unit="img", desc=f"{method.name} ({backend.name})", disable=not progress)
    with ThreadPoolExecutor(job.workers) as pool:
        pending: list[Future] = []
        options = method.resolve_options(job.options)
        explain = BackOff(lambda b: _explain_batch(b, backend, method, targets, tap, options, store, info.preprocess))
        for batch in _prefetch(pool, records, job.batch_size, info.preprocess, keep_images=job.overlays):
            batch_rows, maps = explain(batch)
            rows.extend(batch_rows)
            if job.overlays:
                items = [(d, maps[d.index], rows_by[d.index]) for rows_by in [{r["index"]: r for r in batch_rows}] for d in batch if d.index in maps]
                pending.append(pool.submit(write_overlays, out / OVERLAYS_DIR, items, info))
            bar.update(len(batch))
        for f in pending:
            f.result()
    bar.close()
    h, w = info.tap_shapes.get(tap, (0, 1, 1))[1:] if tap else info.preprocess.input_size
    store.ensure(targets.k, h, w)
    write_table(rows, out / TABLE_FILE)
    errors = [(r["path"], r["error"]) for r in rows if r["status"] != "ok"]
    return RunSummary(out, len(rows), len(rows) - len(errors), len(errors), time.perf_counter() - start, method.name, tap, backend.name, errors)


def _attrs(job: ExplainJob, info, tap: str, targets: Targets) -> dict:
    return {
        "method": job.method,
        "options": {k: _jsonable(v) for k, v in get_method(job.method).resolve_options(job.options).items()},
        "tap": tap,
        "targets": str(targets),
        "model": info.source,
        "model_spec": job.model or "demo",  # what resolve_model() takes to reload it
        "weights": None if job.weights is None else str(Path(job.weights).resolve()),
        "data": str(Path(job.data).resolve()),
        "backend": job.backend,
        "preprocess": info.preprocess.to_dict(),
        "class_names": list(info.class_names) if info.class_names else None,
        "camshaft_version": version(),
    }


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def _decode(record: ImageRecord, index: int, pre: Preprocess, keep_image: bool) -> Decoded:
    try:
        image = load_rgb(record.path)
    except CamshaftError as e:
        return Decoded(record, index, error=str(e))
    tensor, geom = prepare(image, pre)
    return Decoded(record, index, tensor, geom, image if keep_image else None)


def _prefetch(pool, records, batch_size: int, pre: Preprocess, *, keep_images: bool, depth: int = 2) -> Iterator[list[Decoded]]:
    """Batches of decoded images; the next ``depth`` batches decode while one is explained."""
    starts = list(range(0, len(records), batch_size))
    queue: list[list[Future]] = []
    for s in starts[: depth + 1]:
        queue.append([pool.submit(_decode, r, s + i, pre, keep_images) for i, r in enumerate(records[s : s + batch_size])])
    for n, s in enumerate(starts):
        batch = [f.result() for f in queue[n]]
        nxt = n + depth + 1
        if nxt < len(starts):
            s2 = starts[nxt]
            queue.append([pool.submit(_decode, r, s2 + i, pre, keep_images) for i, r in enumerate(records[s2 : s2 + batch_size])])
        queue[n] = []
        yield batch


class BackOff:
    """Run ``fn`` on batches, halving them on out-of-memory; later batches keep the size that fit."""

    def __init__(self, fn):
        self.fn, self.limit = fn, None

    def __call__(self, batch: list) -> tuple[list[dict], dict]:
        rows: list[dict] = []
        maps: dict = {}
        i = 0
        while i < len(batch):
            part = batch[i : i + (self.limit or len(batch))]
            try:
                r, m = self.fn(part)
            except torch.OutOfMemoryError:
                if len(part) == 1:
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.limit = len(part) // 2
                warnings.warn(f"out of memory at batch size {len(part)}; continuing with {self.limit}", stacklevel=2)
                continue
            rows.extend(r)
            maps.update(m)
            i += len(part)
        return rows, maps


def _label_index(d: Decoded, info) -> int | None:
    if d.record.label is None:
        return None
    return class_index(d.record.label, class_names=info.class_names, num_classes=info.num_classes)


def _explain_batch(batch: list[Decoded], backend: Backend, method: Method, targets: Targets, tap, options, store, pre):
    """Explain the decodable images of ``batch``: one table row per image, maps by index."""
    info = backend.info
    rows = {d.index: _base_row(d) for d in batch}
    good = [d for d in batch if d.error is None]
    labels = None
    if targets.kind == "label":
        keep = []
        for d in good:
            if _label_index(d, info) is None:
                reason = "no label for this image" if d.record.label is None else f"label {d.record.label!r} is not a class of the model"
                rows[d.index].update(status="error", error=f"{reason} (--targets label)")
            else:
                keep.append(d)
        good = keep
        labels = torch.tensor([_label_index(d, info) for d in good], dtype=torch.long)
    if not good:
        return list(rows.values()), {}
    x = normalize(torch.stack([d.tensor for d in good]), pre, device=backend.device)
    maps, out = method.run(backend, x, targets.selector(labels), tap=tap, options=options)
    maps_np = maps.detach().float().cpu().numpy()
    targets_np = out.targets.cpu().numpy().astype(np.int32)
    probs = torch.softmax(out.logits, dim=-1)
    top = probs.topk(min(5, probs.shape[-1]), dim=-1)
    names = info.class_names
    for i, d in enumerate(good):
        t = targets_np[i].tolist()
        rows[d.index].update(
            status="ok",
            top5_classes=top.indices[i].tolist(),
            top5_names=[names[c] for c in top.indices[i].tolist()] if names else None,
            top5_scores=top.values[i].tolist(),
            targets=t,
            target_names=[names[c] for c in t] if names else None,
            **map_stats(maps_np[i], d.geometry, pre.input_size),
        )
    store.write(np.array([d.index for d in good]), maps_np, targets_np)
    return [rows[d.index] for d in batch], {d.index: maps_np[i] for i, d in enumerate(good)}


def _base_row(d: Decoded) -> dict:
    size = d.geometry.original_size if d.geometry else (None, None)
    return {
        "index": d.index,
        "path": d.record.path,
        "status": "error" if d.error else "ok",
        "error": d.error,
        "label": d.record.label,
        "width": size[0],
        "height": size[1],
    }
