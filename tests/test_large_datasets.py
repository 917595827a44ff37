"""Costs that grow with the dataset (audit of 2026-12-03, 30,000 images of the demo model).

- The local schedulers hand each partition its records as they are: dask walked every record's fields
  (about 30 us an image, 30 s before the first image of 10^6).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from camshaft.pipeline import schedule


@dataclass
class _Record:
    """A record that counts how often something reads its field (dask reads every field of a dataclass)."""

    path: str
    reads = 0

    def __getattribute__(self, name):
        if name == "path":
            _Record.reads += 1
        return object.__getattribute__(self, name)


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_the_local_schedulers_hand_the_records_over_unwalked(monkeypatch, tmp_path, scheduler):
    records = [_Record(f"/data/{i}.jpg") for i in range(6)]
    work = [(0, records[:3]), (1, records[3:])]
    seen = []

    def run_partition(ctx, part, recs):
        seen.append((ctx, part, all(a is b for a, b in zip(recs, work[part][1], strict=True))))
        return {"partition": part}

    monkeypatch.setattr(schedule, "run_partition", run_partition)
    _Record.reads = 0
    context = SimpleNamespace(out=tmp_path)
    results = schedule.run_tasks(context, work, scheduler=scheduler, on_done=lambda result: None)
    assert results == [{"partition": 0}, {"partition": 1}]
    assert sorted(p for _, p, _ in seen) == [0, 1] and all(ctx is context and same for ctx, _, same in seen)
    assert _Record.reads == 0  # dask read every field of every record, looking for collections
