"""Running partition tasks on a Dask scheduler: ``sync``, ``threads`` (default) or a cluster.

Locally, two partitions run at once: one decodes on threads while the other holds the device.
On a dask.distributed cluster, each worker loads the model once and runs whole partitions; the
tasks of a worker that dies are rescheduled on the others (a partition is idempotent).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import dask
from dask.callbacks import Callback

from camshaft.errors import ConfigError
from camshaft.pipeline.tasks import forget_stop, run_partition, stop_event

LOCAL = ("threads", "sync")
PARALLEL_PARTITIONS = 2


class _Progress(Callback):
    def __init__(self, on_done: Callable[[dict], None]):
        super().__init__()
        self.on_done = on_done

    def _posttask(self, key, result, dsk, state, worker_id):
        if isinstance(result, dict) and "partition" in result:
            self.on_done(result)


def run_tasks(ctx, work: list, *, scheduler, on_done: Callable[[dict], None]) -> list[dict]:
    """Run ``run_partition(ctx, part, records)`` for each ``(part, records)`` in ``work``.

    ``scheduler``: threads, sync, a dask.distributed address or a connected ``Client``."""
    if isinstance(scheduler, str) and scheduler in LOCAL:
        # records (and the context) handed over as they are: dask would walk every ImageRecord's fields looking
        # for collections, about 30 us an image (30 s before the first image of a 10^6-image run)
        shared = dask.delayed(ctx, traverse=False)
        tasks = [dask.delayed(run_partition, pure=False)(shared, part, dask.delayed(records, traverse=False))
                 for part, records in work]
        stop = stop_event(ctx.out)
        stop.clear()
        try:
            with _Progress(on_done):
                results = list(dask.compute(*tasks, scheduler=scheduler, num_workers=PARALLEL_PARTITIONS))
        except BaseException:  # Ctrl-C (or a failed partition): the one still in flight stops at its next batch
            stop.set()  # kept until the next run into the folder: a partition still in flight must see it
            raise
        forget_stop(ctx.out, stop)  # every partition ended: a service explaining into a new folder per request
        return results  # must not keep one event per folder for as long as it lives
    return _distributed(ctx, work, scheduler, on_done)


def _distributed(ctx, work: list, scheduler, on_done) -> list[dict]:
    with connected(scheduler) as client:
        from dask.distributed import as_completed

        futures = [client.submit(run_partition, ctx, part, records, pure=False, retries=2) for part, records in work]
        results = []
        try:
            for future in as_completed(futures, loop=client.loop):  # this client's, whichever one is the default
                summary = future.result()
                future.release()  # or a worker lost later takes this result along and the cluster runs it again
                on_done(summary)
                results.append(summary)
        except BaseException:  # Ctrl-C (or a failed partition): closing the client cancels only the queued ones
            _disown(ctx)
            raise
        return results


def _disown(ctx) -> None:
    """Make the partitions still running on workers stop at their next batch and write nothing (their run
    no longer owns the folder): a worker cannot be told otherwise, and the same command resumes them."""
    if ctx.run_id is not None:
        with contextlib.suppress(OSError):  # a full disk: the error that stopped the run is the one to tell
            ctx.state.claim(f"{ctx.run_id} stopped")


@contextlib.contextmanager
def connected(scheduler) -> Iterator:
    """``scheduler`` as :func:`run_tasks` takes it: a local name as it is, an address as a connected
    ``Client`` (closed on leaving; a ``Client`` given stays open). A run connects before it touches its
    output folder, so an unreachable cluster is refused while the previous results are still there."""
    if isinstance(scheduler, str) and scheduler in LOCAL:
        yield scheduler
        return
    try:
        from dask.distributed import Client
    except ImportError as e:
        raise ConfigError(
            f"--scheduler {scheduler!r} needs dask.distributed: pip install 'camshaft[distributed]'"
        ) from e
    if isinstance(scheduler, Client):
        yield scheduler
        return
    try:
        client = Client(scheduler, timeout="30s", set_as_default=False)  # the caller's own client stays the default
    except OSError as e:
        raise ConfigError(
            f"cannot reach the dask.distributed scheduler at {scheduler!r} ({e}): start it (dask scheduler), "
            "check the address, or use --scheduler threads"
        ) from e
    try:
        yield client
    finally:
        client.close()


def check_scheduler(scheduler: str) -> None:
    """Fail fast on a scheduler that is neither local nor a plausible address."""
    if scheduler in LOCAL or "://" in scheduler or ":" in scheduler:
        return
    raise ConfigError(
        f"unknown scheduler {scheduler!r}: use threads, sync or a dask.distributed address such as tcp://host:8786"
    )
