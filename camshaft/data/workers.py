"""Decode and resize images off the device thread: in worker processes or threads.

Threads of one process share the GIL. Pillow parses a JPEG's markers in Python, so decode threads
hold the GIL for part of every image, and the thread that drives the device gives the GIL up on
every operator it launches and must win it back after. On this project's 2-core test machine
(``scripts/gil_contention.py``), 16 decode threads slowed a loop of small torch operators 100-fold
and 4 threads 11-fold, where 16 decode *processes* (which add only CPU contention) slowed it
2.8-fold and 4 processes 1.8-fold. That is the regime of a GPU run, whose device thread launches
hundreds of small operators per batch, so a GPU run decodes in processes (``auto``). The
processes import neither torch nor the model: they return uint8 arrays, decoded under the Pillow
settings of the process they serve (``Image.MAX_IMAGE_PIXELS``, ``ImageFile.LOAD_TRUNCATED_IMAGES``,
which a script may have changed). A CPU run decodes in
threads: its device thread spends its time inside long operators, which give the GIL up, and
threads skip the copies between processes (3-5% faster there).

``device`` decoding reads each file in a thread and, for the plain JPEGs
:mod:`camshaft.data.jpeg` recognises, leaves the decoding and resizing to the device
(:mod:`camshaft.data.device_decode`, called by the device thread through :meth:`Decoder.finish`);
the other files are decoded in the threads as usual. Reading a file and its header costs the
device thread about a tenth of what a decode thread costs it per image (``gil_contention.py``:
16-31 small operators lost per image against 123-286), so threads suffice there, in tasks of
``READ_CHUNK`` files, and ``READERS`` of them by default.

The pools are shared by every partition of a process (and by later runs in it: a bench or a
notebook starts them once), so the worker count is a total, not per partition. Inside a daemonic
process, such as a dask.distributed worker, which may not start children, decoding uses threads.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import repeat
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile

from camshaft.data.decode import load_rgb
from camshaft.data.jpeg import JpegInfo, read_encoded
from camshaft.errors import CamshaftError, ImageDecodeError
from camshaft.preprocess import Geometry, Preprocess, resize_rgb

if TYPE_CHECKING:
    import torch

__all__ = [
    "DECODERS", "Decoder", "Resized", "decode_resized", "decoder", "default_workers", "read_for_device", "usable_cores",
]

DECODERS = ("auto", "processes", "threads", "device")
CHUNK = 4  # images per message to a worker process: fewer round trips, still several workers per batch
READ_CHUNK = 8  # files per task of a thread that only reads them (--decode device)


@dataclass(frozen=True)
class Resized:
    """One image ready for the model, or the reason it is not, or a JPEG for the device to decode."""

    pixels: np.ndarray | torch.Tensor | None = None  # (H, W, 3) uint8; a tensor on the device when decoded there
    geometry: Geometry | None = None
    error: str | None = None
    encoded: np.ndarray | None = None  # the file's bytes, for `Decoder.finish`
    header: JpegInfo | None = None


def read_for_device(path: str, pre: Preprocess) -> Resized:
    """A plain JPEG's bytes, for the device to decode; any other file decoded and resized here."""
    found = read_encoded(path)
    if found is None:
        return decode_resized(path, pre)
    return Resized(encoded=found[0], header=found[1])


def decode_resized(path: str, pre: Preprocess) -> Resized:
    """Decode one file and resize it for the model; a bad file gives its reason, never raises."""
    try:
        image = load_rgb(path)
    except ImageDecodeError as e:
        return Resized(error=str(e))
    pixels, geom = resize_rgb(image, pre)
    return Resized(pixels, geom)


def _pillow_settings() -> tuple[int | None, bool]:
    """This process's Pillow settings that decide whether a file decodes (a script may change them)."""
    return Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES


def _decode_resized_as_here(path: str, pre: Preprocess, settings: tuple[int | None, bool]) -> Resized:
    """:func:`decode_resized` in a worker process, under the Pillow settings of the process it serves."""
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = settings
    return decode_resized(path, pre)


def _read_for_device_many(paths: Sequence[str], pre: Preprocess) -> list[Resized]:
    return [read_for_device(p, pre) for p in paths]


def _ready() -> int:
    """A worker's first task: importing this module (to unpickle it) readies the worker for images."""
    return os.getpid()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """All usable cores but one (the device thread's), at least 2."""
    return max(2, usable_cores() - 1)


class Decoder:
    """An ordered, streaming ``map`` of :func:`decode_resized` (or :func:`read_for_device`) over a shared pool."""

    def __init__(self, kind: str, workers: int, *, device: str = "cpu"):
        if kind not in DECODERS:
            raise CamshaftError(f"unknown decoder {kind!r} (choose from {', '.join(DECODERS)})")
        if kind == "auto":
            kind = "processes" if str(device).startswith("cuda") else "threads"
        if kind == "processes" and multiprocessing.current_process().daemon:
            kind = "threads"  # a daemonic process (a dask.distributed worker) may not have children
        self.kind, self.workers, self.device = kind, workers, str(device)

    @property
    def description(self) -> str:
        """Who decodes, for a run's summary: "15 processes", "2 threads", "cuda:0 (JPEG) + 4 threads"."""
        if self.kind == "device":
            return f"{self.device} (JPEG) + {self.workers} threads"
        return f"{self.workers} {self.kind}"

    @property
    def pool_kind(self) -> str:
        return "threads" if self.kind == "device" else self.kind

    def start(self) -> None:
        """Start the pool and its workers now (before a run's clock), not on the first image."""
        pool = _pool(self.pool_kind, self.workers)
        if self.kind == "processes":  # a process pool starts one worker per task submitted while none is idle
            try:
                for future in [pool.submit(_ready) for _ in range(self.workers)]:
                    future.result()
            except BrokenProcessPool as e:
                _drop(self.pool_kind, self.workers, pool)
                raise CamshaftError(
                    "the decode worker processes could not start. Worker processes import the main module: "
                    "a script that calls camshaft must do so under `if __name__ == \"__main__\":`. Or decode "
                    "in threads (decode=\"threads\", --decode threads)"
                ) from e

    def map(self, paths: Sequence[str], pre: Preprocess) -> Iterator[Resized]:
        """Every path decoded and resized, in order, each yielded as soon as it and those before it are.

        Every image is queued now, so a pool shared by partitions decodes them first come, first served.
        """
        pool = _pool(self.pool_kind, self.workers)
        try:
            if self.kind == "device":  # reading is quick: a task per file would cost more than the read
                chunks = [paths[i : i + READ_CHUNK] for i in range(0, len(paths), READ_CHUNK)]
                results = itertools.chain.from_iterable(pool.map(_read_for_device_many, chunks, repeat(pre)))
            elif self.kind == "processes":  # a worker process has its own Pillow, with the default settings
                settings = repeat(_pillow_settings())
                results = pool.map(_decode_resized_as_here, paths, repeat(pre), settings, chunksize=CHUNK)
            else:
                results = pool.map(decode_resized, paths, repeat(pre))
        except BrokenProcessPool as e:
            raise self._died(pool) from e
        return self._guarded(results, pool)

    def finish(self, paths: Sequence[str], resized: Sequence[Resized], pre: Preprocess) -> list[Resized]:
        """The JPEGs left to the device (``device`` decoding) decoded and resized there; others as they are.

        Called by the thread that drives the device, with ``paths`` those of ``resized``.
        """
        todo = [i for i, r in enumerate(resized) if r.encoded is not None]
        if not todo:
            return list(resized)
        import torch

        from camshaft.data.device_decode import decode_on_device

        done = decode_on_device(
            [(paths[i], resized[i].encoded, resized[i].header) for i in todo], pre, torch.device(self.device)
        )
        out = list(resized)
        for i, r in zip(todo, done, strict=True):
            out[i] = r
        return out

    def _guarded(self, results: Iterator[Resized], pool: Executor) -> Iterator[Resized]:
        try:
            yield from results
        except BrokenProcessPool as e:
            raise self._died(pool) from e

    def _died(self, pool: Executor) -> CamshaftError:
        _drop(self.pool_kind, self.workers, pool)  # the next run starts a fresh pool
        return CamshaftError(
            "a decode worker process died (killed, out of memory, or crashed in an image decoder); finished "
            "partitions are kept: rerun the same command to resume, or decode in threads (--decode threads)"
        )


_POOLS: dict[tuple[str, int], Executor] = {}
_LOCK = threading.Lock()


READERS = 4  # default threads of device decoding: they only read files, and every one takes the GIL


def decoder(kind: str, workers: int | None, *, device: str = "cpu") -> Decoder:
    """The decoder of ``kind`` for ``device`` with ``workers`` workers.

    None: :func:`default_workers`, or for ``device`` decoding at most ``READERS`` threads.
    """
    if workers is None:
        workers = min(READERS, default_workers()) if kind == "device" else default_workers()
    return Decoder(kind, workers, device=device)


def _pool(kind: str, workers: int) -> Executor:
    with _LOCK:
        pool = _POOLS.get((kind, workers))
        if pool is None:
            if kind == "processes":
                pool = ProcessPoolExecutor(workers, mp_context=_context())
            else:
                pool = ThreadPoolExecutor(workers, thread_name_prefix="camshaft-decode")
            _POOLS[(kind, workers)] = pool
        return pool


def _drop(kind: str, workers: int, pool: Executor) -> None:
    """Forget a broken pool (not a fresh one that another partition already put in its place)."""
    with _LOCK:
        if _POOLS.get((kind, workers)) is pool:
            del _POOLS[(kind, workers)]
    pool.shutdown(wait=False, cancel_futures=True)


def _context():
    """forkserver where there is one: forking a process that runs threads (Dask's, CUDA's) is unsafe."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
