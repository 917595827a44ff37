"""Timing: warm up, synchronize the device, repeat, keep every sample.

Workloads of one comparison are timed round-robin (one call of each per round) so that a machine
whose load drifts during the run — a shared CPU, a GPU warming up — slows them alike and their
ratios stay meaningful. A figure is the best (shortest) of its rounds: on a contended machine the
minimum is the sample least disturbed by the other tenants.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from camshaft.errors import ConfigError


@dataclass(frozen=True)
class TimingConfig:
    warmup: int = 1  # untimed calls per workload first (allocator, caches, JIT, ORT arenas)
    repeats: int = 3  # timed rounds; each round calls every workload once

    def __post_init__(self):
        problems = []
        if self.warmup < 0:
            problems.append(f"warmup must be 0 or more, received {self.warmup}")
        if self.repeats < 1:
            problems.append(f"repeats must be at least 1, received {self.repeats}")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class Timing:
    """Seconds per call, one sample per timed round."""

    seconds: tuple[float, ...]

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued device work, so the clock reads finished work."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":  # pragma: no cover - not a camshaft device yet
        torch.mps.synchronize()


def time_call(fn: Callable[[], object], *, device=None, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds of one call of ``fn``; a float it returns is taken as its own measurement.

    (A pipeline run times itself so that model loading and export are not counted.)
    """
    synchronize(device)
    start = clock()
    result = fn()
    synchronize(device)
    elapsed = clock() - start
    return float(result) if isinstance(result, float) else elapsed


def round_robin(
    fns: Sequence[Callable[[], object]],
    *,
    config: TimingConfig,
    device=None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[Timing]:
    """Time every ``fns[i]``: ``config.warmup`` untimed calls each, then ``config.repeats`` rounds."""
    for fn in fns:
        for _ in range(config.warmup):
            fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(config.repeats):
        for i, fn in enumerate(fns):
            samples[i].append(time_call(fn, device=device, clock=clock))
    return [Timing(tuple(s)) for s in samples]
