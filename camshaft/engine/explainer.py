"""The pure core of a run: explain a list of image records into table rows and map arrays.

Knows nothing of Dask or files on disk beyond reading images: the pipeline hands it partitions.
One ``Explainer`` per process holds the backend; a lock serialises device work so that several
partitions can decode (in a pool of worker processes they share) while one computes.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from camshaft.data.sources import ImageRecord, path_text
from camshaft.data.workers import Decoder, Resized, decoder
from camshaft.engine.backends import Backend, backend_factory
from camshaft.engine.backends.base import AUTO, LIVE_BACKENDS, TAP_GRADIENTS, resolve_device, resolve_dtype
from camshaft.engine.job import ExplainJob
from camshaft.engine.methods import Method, check_backend, get_method
from camshaft.engine.postprocess import map_stats
from camshaft.engine.shared import SharedBatch
from camshaft.engine.targets import Targets, class_index
from camshaft.errors import Interrupted
from camshaft.models.sources import ModelSource, resolve_model
from camshaft.preprocess import Geometry, Preprocess, normalize


@dataclass
class Decoded:
    record: ImageRecord
    index: int
    pixels: np.ndarray | torch.Tensor | None = None  # uint8 (H, W, 3); on the device when decoded there
    geometry: Geometry | None = None
    error: str | None = None
    resized: Resized | None = None  # a JPEG the device is to decode (`Decoder.finish`)


# a partition's time, summed over partitions in a run's summary (partitions overlap, so the sums
# can exceed the run's wall time): the first four are `Explainer.explain`'s, then the shard writes
STAGES = ("waiting_for_decode", "waiting_for_device", "decoding_on_device", "explaining", "writing")


@dataclass
class PartitionOutput:
    """Per method: rows (one per record, in order) and arrays aligned with them (NaN / -1 where failed)."""

    rows: dict[str, list[dict]]
    maps: dict[str, np.ndarray]  # (n, K, h, w) float32
    targets: np.ndarray  # (n, K) int32, shared by the methods
    metrics: dict[str, object] = field(default_factory=dict)  # method -> faithfulness rows (DataFrame)
    exemplars: object = None  # the partition's top-k exemplar table (DataFrame), if asked for
    stages: dict[str, float] = field(default_factory=dict)  # seconds: see `Explainer.explain`


@dataclass
class Launched:
    """A batch whose device work is queued and whose results are on their way to the host."""

    batch: list[Decoded]
    good: list[Decoded]  # the ones explained (decoded, and with a label where the targets need one)
    rows: dict[int, dict]  # base rows by index
    targets: torch.Tensor | None = None  # (n, K); these four are host tensors, valid once `ready` is reached
    top_classes: torch.Tensor | None = None  # (n, 5)
    top_scores: torch.Tensor | None = None
    maps: dict[str, torch.Tensor] = field(default_factory=dict)  # method -> (n, K, h, w) float32
    metrics: dict[str, list] = field(default_factory=dict)  # method -> faithfulness frames (computed)
    ready: torch.cuda.Event | None = None  # recorded after the copies on a GPU; None: already on the host


@dataclass
class MethodRun:
    """One method of a job: where it reads (tap), its options, the shape of its maps."""

    method: Method
    tap: str | None
    options: dict
    map_shape: tuple[int, int, int] = (0, 0, 0)  # (K, h, w), from a probe

    @property
    def name(self) -> str:
        return self.method.name


@dataclass
class Explainer:
    job: ExplainJob
    source: ModelSource
    backend: Backend
    runs: list[MethodRun]
    targets: Targets
    decoder: Decoder
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    metric_specs: tuple = ()  # faithfulness curves to compute in the same pass
    exemplar_specs: tuple = ()  # taps (and channels) whose top images to gather in the same pass

    @property
    def gradients(self) -> bool:
        """Whether the shared forward must carry tap gradients (a method of the job needs them)."""
        return any(TAP_GRADIENTS in r.method.needs for r in self.runs)

    @property
    def preprocess(self) -> Preprocess:
        return self.backend.info.preprocess

    def explain(
        self, records: list[ImageRecord], indices: list[int], *, stop: Callable[[], bool] | None = None
    ) -> PartitionOutput:
        """Decode ``records`` in the decode pool and explain them in batches on the device as they arrive.

        Decoding runs ahead while a batch is on the device: each batch starts as soon as its own
        images are decoded, not after the whole partition. The device takes one batch at a time
        (``self.lock``), so concurrent partitions interleave batches. A batch's results are collected
        after the next batch is queued, so that a GPU need not wait for the host in between. With
        ``--decode device`` a batch's JPEGs are decoded on the device first, under the same lock.
        ``indices`` are the records' rows in the run; outputs follow the order of ``records``.
        ``stop()`` is asked before each batch: true raises :class:`Interrupted` (a run stopped by Ctrl-C).
        """
        n, k = len(records), self.targets.k
        maps = {r.name: np.full((n, *r.map_shape), np.nan, dtype=np.float32) for r in self.runs}
        targets = np.full((n, k), -1, dtype=np.int32)
        position = {index: i for i, index in enumerate(indices)}
        rows: dict[str, dict[int, dict]] = {r.name: {} for r in self.runs}
        metrics: dict[str, list] = {r.name: [] for r in self.runs}
        collector = self._exemplar_collector()  # per call: partitions may run concurrently
        backoff = BackOff(functools.partial(self._launch, exemplars=collector))
        order: list[int] = []  # the indices of the records taken so far (not their images: memory stays flat)
        # where this partition's time went: a run decode-bound waits for decode, a device-bound one
        # for the device (the other partition holds it)
        stages = dict.fromkeys(STAGES[:4], 0.0)
        clock = time.perf_counter
        readable = [r.path for r in records if not r.error]  # all queued now, yielded in order
        resized = self.decoder.map(readable, self.preprocess)
        arriving = (self._decoded(r, i, resized) for r, i in zip(records, indices, strict=True))
        pending: list[Launched] = []  # the previous batch: collected once the next one is queued behind it

        def collect() -> None:
            t = clock()
            for part in pending:
                self._absorb(self._collect(part), rows, maps, targets, metrics, position)
            stages["explaining"] += clock() - t  # the device's work, up to its results on the host

        try:
            while True:
                if stop is not None and stop():
                    raise Interrupted(f"stopped after {len(order)} of {n} images")
                t0 = clock()
                batch = list(itertools.islice(arriving, self.job.batch_size))
                t1 = clock()
                if not batch:
                    break
                order += [d.index for d in batch]
                with self.lock:
                    t2 = t3 = clock()
                    if self.decoder.kind == "device":  # the JPEGs left to the device
                        batch = self._finish(batch)
                        t3 = clock()
                    launched = backoff(batch)  # one part per out-of-memory split
                    stages["explaining"] += clock() - t3
                stages["decoding_on_device"] += t3 - t2
                stages["waiting_for_decode"] += t1 - t0
                stages["waiting_for_device"] += t2 - t1
                collect()
                pending = launched
            collect()
        finally:
            resized.close()  # on an error, the partition's images still queued are dropped
        ordered = {name: [by_index[i] for i in order] for name, by_index in rows.items()}
        tables = {name: _concat(parts) for name, parts in metrics.items()} if self.metric_specs else {}
        exemplars = collector.table() if collector is not None else None
        return PartitionOutput(ordered, maps, targets, tables, exemplars, stages)

    @staticmethod
    def _absorb(collected, rows: dict, maps: dict, targets: np.ndarray, metrics: dict, position: dict) -> None:
        """One collected batch into the partition's rows, maps, targets and metrics."""
        batch_rows, batch_maps, batch_targets, batch_metrics = collected
        for name, parts in batch_metrics.items():
            metrics[name].extend(parts)
        for name, by_index in batch_rows.items():
            rows[name].update(by_index)
        for name, by_index in batch_maps.items():
            for index, m in by_index.items():
                maps[name][position[index]] = m
        for index, t in batch_targets.items():
            targets[position[index]] = t

    def _exemplar_collector(self):
        if not self.exemplar_specs:
            return None
        from camshaft.report.exemplars import ExemplarCollector

        return ExemplarCollector(self.exemplar_specs, k=self.job.exemplar_k)

    def probe(self, images: int | None = None) -> None:
        """The (K, h, w) of every method's maps, from one black image (before any real work). The inductor
        backend compiles for the first batch size it sees, and pads smaller batches to it: it is probed with a
        full batch (or the run's ``images``, when fewer), so that it compiles once, for the run's batches,
        before the clock starts."""
        n = 1
        if self.backend.name == "inductor":
            n = self.job.batch_size if images is None else max(1, min(self.job.batch_size, images))
        with self.lock:
            for r, (maps, _) in zip(self.runs, self._black_batch(n), strict=True):
                r.map_shape = tuple(maps.shape[1:])
        if self.backend.device.type == "cuda":
            self._warm_up()
        self.decoder.start()

    def _black_batch(self, n: int) -> list:
        """Every method's ``(maps, output)`` for ``n`` black images, targets class 0 (caller holds the lock).

        The exemplar taps go through a throwaway collector too: a tap that is no (C, h, w) map or a
        channel out of range is refused here, before any image is read, not by the first partition.
        """
        x = torch.zeros(n, 3, *self.preprocess.input_size, device=self.backend.device)
        zeros = torch.zeros(n, self.targets.k, dtype=torch.long, device=self.backend.device)
        shared = SharedBatch(self.backend, x, lambda logits: zeros, gradients=self.gradients)
        results = [r.method.explain(shared, x, shared._select, tap=r.tap, options=r.options) for r in self.runs]
        collector = self._exemplar_collector()
        if collector is not None:
            collector.update(shared.forward(x).taps, list(range(n)), input_size=self.preprocess.input_size)
        return results

    def _warm_up(self) -> None:
        """Run a full batch of black images before the clock starts (on a GPU, where it is cheap):
        the caching allocator takes its blocks, and a TorchScript module profiles and optimizes
        itself on its first two calls of a shape, which would otherwise land in the first partition."""
        out_of_memory = False
        with self.lock:
            try:
                for _ in range(2 if self.backend.name == "torchscript" else 1):
                    self._black_batch(self.job.batch_size)
            except torch.OutOfMemoryError:  # the run's back-off will find the batch size that fits
                out_of_memory = True
        if out_of_memory:  # outside the handler: its traceback no longer holds the tensors
            torch.cuda.empty_cache()

    @staticmethod
    def _decoded(record: ImageRecord, index: int, resized: Iterator[Resized]) -> Decoded:
        """The record's image from the decode pool (whose results follow the readable records)."""
        if record.error:
            return Decoded(record, index, error=record.error)
        r = next(resized)
        if r.error:
            return Decoded(record, index, error=r.error)
        if r.encoded is not None:
            return Decoded(record, index, resized=r)
        return Decoded(record, index, r.pixels, r.geometry)

    def _finish(self, batch: list[Decoded]) -> list[Decoded]:
        """The batch with the JPEGs left to the device decoded there (the caller holds the lock)."""
        todo = [d for d in batch if d.resized is not None]
        if not todo:
            return batch
        done = iter(self.decoder.finish([d.record.path for d in todo], [d.resized for d in todo], self.preprocess))
        out = []
        for d in batch:
            if d.resized is not None:
                r = next(done)
                d = Decoded(d.record, d.index, r.pixels, r.geometry, r.error)
            out.append(d)
        return out

    def _label(self, d: Decoded) -> int | None:
        info = self.backend.info
        if d.record.label is None:
            return None
        return class_index(d.record.label, class_names=info.class_names, num_classes=info.num_classes, names_first=True)

    def _launch(self, batch: list[Decoded], *, exemplars=None) -> list[Launched]:
        """Queue one batch's device work, every method on one shared forward (the caller holds the lock).

        On a GPU the input goes up from pinned memory and the results come down into it without
        waiting, so the next batch can be queued while this one computes: ``_collect`` waits.
        """
        rows = {d.index: base_row(d) for d in batch}
        good = [d for d in batch if d.error is None]
        labels = None
        if self.targets.kind == "label":
            for d in good:
                if self._label(d) is None:
                    reason = "no label for this image" if d.record.label is None else f"label {d.record.label!r} is not a class of the model"
                    rows[d.index].update(status="error", error=f"{reason} (--targets label)")
            good = [d for d in good if self._label(d) is not None]
            # pinned on a GPU: the selector's copy to the device then does not wait for the GPU
            labels = torch.tensor([self._label(d) for d in good], dtype=torch.long,
                                  pin_memory=self.backend.device.type == "cuda")
        if not good:
            return [Launched(batch, good, rows)]
        device = self.backend.device
        cuda = device.type == "cuda"
        if all(isinstance(d.pixels, np.ndarray) for d in good):
            # stacked as stored (one copy, no gather) and uploaded as one block; NCHW is a channels-last view of it
            pixels = torch.empty((len(good), *good[0].pixels.shape), dtype=torch.uint8, pin_memory=cuda)
            np.stack([d.pixels for d in good], out=pixels.numpy())
        else:  # decoded on the device (a file its decoder refused comes from Pillow, on the host)
            pixels = torch.stack([torch.as_tensor(d.pixels).to(device) for d in good])
        layout = self.backend.memory_format
        x = normalize(pixels.permute(0, 3, 1, 2), self.preprocess, device=device, memory_format=layout)
        shared = SharedBatch(self.backend, x, self.targets.selector(labels), gradients=self.gradients)
        results = {r.name: r.method.explain(shared, x, shared._select, tap=r.tap, options=r.options) for r in self.runs}
        out = next(iter(results.values()))[1]
        probs = torch.softmax(out.logits, dim=-1)
        top = probs.topk(min(5, probs.shape[-1]), dim=-1)

        def host(t: torch.Tensor) -> torch.Tensor:  # one copy per batch and field, not a sync per image
            return t.detach().to("cpu", non_blocking=True)  # into pinned memory from a GPU

        launched = Launched(
            batch, good, rows, host(out.targets), host(top.indices), host(top.values),
            {name: host(maps.float()) for name, (maps, _) in results.items()},
        )
        ids = [d.index for d in good]
        if self.metric_specs:
            from camshaft.report.metrics import metric_rows

            for name, (maps, _) in results.items():
                launched.metrics[name] = [metric_rows(self.backend, x, maps, out.targets, ids, specs=self.metric_specs)]
        if exemplars is not None:  # last: a batch retried after out-of-memory is never counted twice
            exemplars.update(shared.forward(x).taps, ids, geometries=[d.geometry for d in good],
                             input_size=self.preprocess.input_size)
        if cuda:
            launched.ready = torch.cuda.Event()
            # on the device's stream: Event.record() alone records on the current device's (cuda:0 for cuda:1)
            launched.ready.record(torch.cuda.current_stream(self.backend.device))
        return [launched]

    def _collect(self, launched: Launched):
        """Wait for a launched batch's results (the device is free for others meanwhile) and tabulate them.

        Returns rows {method: {index: row}}, maps {method: {index: (K, h, w)}}, targets {index: (K,)}
        and metrics {method: [frames]}.
        """
        batch, good, rows = launched.batch, launched.good, launched.rows
        if not good:
            return {r.name: dict(rows) for r in self.runs}, {}, {}, {}
        if launched.ready is not None:
            launched.ready.synchronize()
        targets_np = launched.targets.numpy().astype(np.int32)
        top_classes, top_scores = launched.top_classes.tolist(), launched.top_scores.tolist()
        names = self.backend.info.class_names
        # NaN or infinite scores (float16 overflow, a broken checkpoint) explain nothing: such an image
        # is a failure with its reason, never an 'ok' row of NaN maps
        finite = torch.isfinite(launched.top_scores).all(dim=1).tolist()
        for i, d in enumerate(good):
            if not finite[i]:
                rows[d.index].update(status="error", error=self._not_finite("the model's scores are"))
                continue
            t = targets_np[i].tolist()
            rows[d.index].update(
                status="ok",
                top5_classes=top_classes[i],
                top5_names=[names[c] for c in top_classes[i]] if names else None,
                top5_scores=top_scores[i],
                targets=t,
                target_names=[names[c] for c in t] if names else None,
            )
        all_rows, all_maps = {}, {}
        geometries = {d.index: d.geometry for d in batch}
        metrics = dict(launched.metrics)
        for name, maps in launched.maps.items():
            maps_np = maps.numpy()
            maps_finite = np.isfinite(maps_np.reshape(len(good), -1)).all(axis=1)
            all_maps[name] = {}
            all_rows[name] = {d.index: dict(rows[d.index]) for d in batch}
            failed = []
            for i, d in enumerate(good):
                if finite[i] and not maps_finite[i]:  # the scores were fine: the map's own arithmetic overflowed
                    all_rows[name][d.index].update(status="error", error=self._not_finite(f"the {name} map is"))
                if not (finite[i] and maps_finite[i]):
                    failed.append(d.index)
                    continue
                all_maps[name][d.index] = maps_np[i]
                all_rows[name][d.index].update(map_stats(maps_np[i], geometries[d.index], self.preprocess.input_size))
            if failed and name in metrics:  # a failed image has no faithfulness curves (they would be NaN)
                metrics[name] = [f[~f["index"].isin(failed)] for f in metrics[name]]
        chosen = {d.index: targets_np[i] for i, d in enumerate(good) if finite[i]}
        return all_rows, all_maps, chosen, metrics

    def _not_finite(self, what: str) -> str:
        hint = " (float16 overflows: try --dtype bfloat16)" if self.backend.dtype == torch.float16 else ""
        return f"{what} not finite (NaN or infinity){hint}"


def base_row(d: Decoded) -> dict:
    size = d.geometry.original_size if d.geometry else (None, None)
    r = d.record
    return {
        "index": d.index,
        "path": path_text(r.path),  # a name that is not UTF-8: its odd bytes as \xNN (file_path reverses)
        "status": "error" if d.error else "ok",
        "error": d.error,
        "label": None if r.label is None else path_text(r.label),  # a folder's name, maybe not UTF-8
        "width": size[0],
        "height": size[1],
        "file_size": r.size,
        "mtime_ns": r.mtime_ns,
        "box": list(r.box) if r.box else None,
    }


def build_explainer(job: ExplainJob, *, workdir) -> Explainer:
    """Everything that can be checked before the first image: model, backend, method, targets."""
    source = resolve_model(job.model, weights=job.weights, class_names=job.class_names,
                           preprocess=job.preprocess_overrides())
    if job.backend == AUTO:  # the job the run records and fingerprints names the backend that runs
        from camshaft.engine.backends.registry import auto_backend

        job = replace(job, backend=auto_backend(source))
    device, dtype = resolve_device(job.device), resolve_dtype(job.dtype)
    methods = [get_method(m) for m in job.methods]
    _check_input_size(source, methods, job)
    if source.kind == "torch" and job.backend not in LIVE_BACKENDS and any(m.validate for m in methods):
        _validate_before_export(source, methods, job)
    backend = backend_factory(job.backend)(
        source,
        taps=[job.tap] if job.tap else None,
        preprocess=job.preprocess_overrides(),
        device=device,
        dtype=dtype,
        workdir=workdir,  # only written when a torch model must be exported first
        fold=True,  # the model was loaded here, and nothing else holds it
        cuda_graphs=job.cuda_graphs,
    )
    info = backend.info
    runs = []
    for method in methods:
        tap = _method_tap(method, job, info)
        check_backend(method, backend, tap=tap)
        runs.append(MethodRun(method, tap, job.options_for(method.name)))
    exemplar_specs = job.exemplar_specs()
    missing = [e.tap for e in exemplar_specs if e.tap not in info.taps]
    if missing:  # reopen with the exemplar taps too; the methods keep the taps resolved above
        method_taps = [r.tap for r in runs if r.tap] or list(info.taps)
        backend = backend_factory(job.backend)(
            source,
            taps=list(dict.fromkeys([*method_taps, *missing])),
            preprocess=job.preprocess_overrides(),
            device=device,
            dtype=dtype,
            workdir=workdir,
            fold=True,
            cuda_graphs=job.cuda_graphs,
        )
        for r in runs:
            check_backend(r.method, backend, tap=r.tap)
    targets = Targets.parse(job.targets, class_names=info.class_names, num_classes=info.num_classes)
    return Explainer(
        job, source, backend, runs, targets, decoder(job.decode, job.workers, device=str(device)),
        metric_specs=job.metric_specs(), exemplar_specs=exemplar_specs,
    )


def _method_tap(method, job: ExplainJob, info) -> str | None:
    if not method.uses_tap:
        return None
    return job.tap or (info.cam_tap if method.name == "cam" and info.cam_tap else info.taps[-1])


def _check_input_size(source, methods, job: ExplainJob) -> None:
    """Options that must fit the model input (an occlusion window), checked on the input size the run will use,
    before any export or image. A file's input size is in its metadata, read by its backend: the start-up probe
    checks those (no export runs for a file)."""
    if source.kind != "torch":
        return
    input_size = (source.preprocess or Preprocess()).replace(**job.preprocess_overrides()).input_size
    for method in methods:
        if method.check_input is not None:
            method.check_input(input_size, job.options_for(method.name))


def _validate_before_export(source, methods, job: ExplainJob) -> None:
    """What a method asks of the model itself (CAM: a pooled linear head) is checked on the model as it is,
    before an export to another backend that can take minutes (VGG to ONNX: about a minute here)."""
    from types import SimpleNamespace

    from camshaft.models.prepared import prepare_model

    pre = (source.preprocess or Preprocess()).replace(**job.preprocess_overrides())
    prepared = SimpleNamespace(info=prepare_model(source, taps=[job.tap] if job.tap else None, preprocess=pre).info)
    for method in methods:
        if method.validate is not None:
            method.validate(prepared, _method_tap(method, job, prepared.info))


class BackOff:
    """Run ``fn`` on batches, halving them on out-of-memory; later batches keep the size that fit."""

    def __init__(self, fn):
        self.fn, self.limit = fn, None

    def __call__(self, batch: list):
        results = None
        i = 0
        while i < len(batch):
            part = batch[i : i + (self.limit or len(batch))]
            try:
                r = self.fn(part)
            except torch.OutOfMemoryError:
                if len(part) == 1:
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.limit = len(part) // 2
                warnings.warn(f"out of memory at batch size {len(part)}; continuing with {self.limit}", stacklevel=2)
                continue
            results = r if results is None else _merge(results, r)
            i += len(part)
        return results


def _concat(parts: list):
    import pandas as pd

    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _merge(a, b):
    """Combine the results of two parts of a batch: lists concatenate, dicts merge deeply."""
    if isinstance(a, tuple):
        return tuple(_merge(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, list):
        return a + b
    if isinstance(a, dict):
        return {k: _merge(a[k], b[k]) if k in a and k in b and isinstance(a[k], dict | list) else b.get(k, a.get(k)) for k in {**a, **b}}
    return b


__all__ = ["BackOff", "Decoded", "Explainer", "MethodRun", "PartitionOutput", "build_explainer"]
