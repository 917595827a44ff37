"""Costs that grow with the dataset (audit of 2026-12-03, 30,000 images of the demo model).

- The local schedulers hand each partition its records as they are: dask walked every record's fields
  (about 30 us an image, 30 s before the first image of 10^6).
- An update reads the previous run's metrics once, not once per partition, and links the overlays it reuses.
- A run stopped part-way whose data then changed keeps its finished partitions.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pandas as pd
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


def test_an_update_reads_the_previous_runs_metrics_once_and_keeps_the_reused_rows(tmp_path, monkeypatch):
    """Each partition of an update filtered the previous metrics.parquet itself, reading the whole file (one row
    group): partitions x file size, 12-23 minutes at 10^6 images."""
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq

    import camshaft
    from camshaft.demo.shapes import render_sample, write_demo_dataset

    data = write_demo_dataset(tmp_path / "data", n=8, seed=4).parent / "images"
    out = tmp_path / "run"
    kw = {"partition_size": 2, "progress": False, "metrics": "deletion", "metric_steps": 4, "scheduler": "sync"}
    camshaft.explain(None, data, out=out, **kw)
    before = pd.read_parquet(out / "metrics.parquet")
    files = sorted(data.rglob("*.*"))
    image, _, _ = render_sample(np.random.default_rng(11), size=96)
    image.save(data / "circle" / "0new.png")  # sorts first: every reused image moves one index up
    reads, read_table = [], pq.read_table

    def counting(source, *a, **k):
        if str(source).endswith("metrics.parquet"):
            reads.append(str(source))
        return read_table(source, *a, **k)

    monkeypatch.setattr(pq, "read_table", counting)
    update = camshaft.explain(None, data, out=out, **kw)
    assert (update.mode, update.explained) == ("update", 1)
    assert len(reads) == 1, reads  # once, for all 5 partitions
    after = pd.read_parquet(out / "metrics.parquet")
    paths = {str(p): i for i, p in enumerate(files)}
    new = camshaft.load_results(out).table
    moved = {paths[p]: i for i, p in zip(new["index"], new["path"]) if p in paths}  # old index -> new index
    order = ["index", "k"]
    kept = before.assign(index=before["index"].map(moved)).sort_values(order).reset_index(drop=True)
    reused = after[after["index"].isin(moved.values())].sort_values(order).reset_index(drop=True)
    assert len(kept) == 8 and list(kept["index"]) == sorted(moved.values()) != sorted(moved)
    pd.testing.assert_frame_equal(reused.drop(columns="deletion_curve"), kept.drop(columns="deletion_curve"))
    assert all(np.array_equal(a, b) for a, b in zip(reused["deletion_curve"], kept["deletion_curve"], strict=True))


@pytest.mark.parametrize("change", ["new image", "overlays"])
def test_a_stopped_run_whose_data_changed_keeps_its_finished_partitions(tmp_path, monkeypatch, change):
    """A first run stopped part-way, then rerun after a file was added (or with --overlays): it started over from
    nothing (30,013 images explained again for one added, in the audit)."""
    import numpy as np

    import camshaft
    from camshaft.demo.shapes import render_sample, write_demo_dataset
    from test_pipeline import assert_same_results

    data = write_demo_dataset(tmp_path / "data", n=8, seed=4).parent / "images"
    out = tmp_path / "run"
    kw = {"partition_size": 2, "batch_size": 2, "progress": False, "scheduler": "sync", "metrics": "deletion",
          "metric_steps": 4}
    finished, run_partition = [], schedule.run_partition

    def stopping(ctx, part, records):
        if len(finished) == 2:
            raise KeyboardInterrupt
        finished.append(part)
        return run_partition(ctx, part, records)

    monkeypatch.setattr(schedule, "run_partition", stopping)
    with pytest.raises(KeyboardInterrupt):
        camshaft.explain(None, data, out=out, **kw)
    monkeypatch.undo()
    if change == "new image":
        image, _, _ = render_sample(np.random.default_rng(11), size=96)
        image.save(data / "circle" / "0new.png")
    else:
        kw["overlays"] = True
    again = camshaft.explain(None, data, out=out, **kw)
    n = 9 if change == "new image" else 8
    assert (again.mode, again.images, again.explained) == ("update", n, n - 4)  # 2 partitions of 2 kept
    fresh = camshaft.explain(None, data, out=tmp_path / "fresh", **kw)
    assert_same_results(camshaft.load_results(out), camshaft.load_results(tmp_path / "fresh"))
    metrics = [pd.read_parquet(folder / "metrics.parquet").sort_values(["index", "k"]).reset_index(drop=True)
               for folder in (out, tmp_path / "fresh")]
    pd.testing.assert_frame_equal(metrics[0].drop(columns="deletion_curve"), metrics[1].drop(columns="deletion_curve"),
                                  rtol=1e-5)
    if change == "overlays":
        assert len(list((out / "overlays").glob("*.png"))) == 8


def test_an_update_links_the_overlays_it_reuses_under_their_new_names(tmp_path, monkeypatch):
    """Every overlay was rendered again (their names start with the row index, which an update shifts): an update
    with overlays cost about a full run."""
    import numpy as np

    import camshaft
    from camshaft.demo.shapes import render_sample, write_demo_dataset
    from camshaft.pipeline import tasks

    data = write_demo_dataset(tmp_path / "data", n=6, seed=4).parent / "images"
    out = tmp_path / "run"
    kw = {"partition_size": 2, "progress": False, "scheduler": "sync", "overlays": True, "targets": "top:2"}
    camshaft.explain(None, data, out=out, **kw)
    before = {p.name.split("_", 1)[1]: p.read_bytes() for p in (out / "overlays").glob("*.png")}
    assert len(before) == 12
    image, _, _ = render_sample(np.random.default_rng(11), size=96)
    image.save(data / "circle" / "0new.png")  # sorts first: every reused image moves one index up
    rendered, write = [], tasks.write_overlays

    def counting(folder, rows, *a, **k):
        rendered.extend(r["path"] for r in rows)
        return write(folder, rows, *a, **k)

    monkeypatch.setattr(tasks, "write_overlays", counting)
    update = camshaft.explain(None, data, out=out, **kw)
    assert (update.mode, update.explained) == ("update", 1)
    assert [p.rsplit("/", 1)[-1] for p in rendered] == ["0new.png"]
    after = {p.name: p.read_bytes() for p in (out / "overlays").glob("*.png")}
    assert len(after) == 14 and not (out / "_camshaft" / "previous").exists()
    table = camshaft.load_results(out).table
    for index, path in zip(table["index"], table["path"]):
        names = [n for n in after if n.startswith(f"{index:06d}_")]
        assert len(names) == 2, (index, path)  # its two targets, under its new index
        if not path.endswith("0new.png"):
            assert all(after[n] == before[n.split("_", 1)[1]] for n in names)
