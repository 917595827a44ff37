"""A nightly update keeps the previous run's table compact, and reuses rows of a file listed twice."""

from __future__ import annotations

import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
from test_pipeline import assert_same_results

import camshaft
from camshaft.data.sources import ImageRecord
from camshaft.demo.shapes import write_demo_dataset
from camshaft.pipeline.tasks import PreviousRows
from camshaft.writers.table import SCHEMA, assemble


def test_a_file_listed_twice_with_other_labels_is_reused_twice(tmp_path):
    manifest = write_demo_dataset(tmp_path / "data", n=4, seed=7)
    lines = manifest.read_text().splitlines()
    path, label, *box = lines[1].split(",")
    other = lines[2].split(",")[1]
    lines.append(",".join([path, other, *box]))  # the same file, another label
    manifest.write_text("\n".join(lines) + "\n")
    run = lambda out: camshaft.explain(None, manifest, out=out, targets="label", partition_size=2,  # noqa: E731
                                       progress=False)
    assert run(tmp_path / "run").explained == 5
    third = lines[3].split(",")
    lines.append(",".join([third[0], other, *third[2:]]))  # a new row (a file with another label): the rest is reused
    manifest.write_text("\n".join(lines) + "\n")
    update = run(tmp_path / "run")
    assert (update.mode, update.explained, update.images) == ("update", 1, 6)
    assert_same_results(camshaft.load_results(tmp_path / "run"), camshaft.load_results(run(tmp_path / "fresh").out))


def _table(n: int) -> pa.Table:
    rows = [{"index": i, "path": f"class_{i % 10}/image_{i:07d}.jpg", "status": "ok", "width": 640, "height": 480,
             "file_size": 50_000 + i, "mtime_ns": 1_700_000_000_000_000_000 + i, "top5_classes": [1, 2, 3, 4, 5],
             "top5_names": ["a", "b", "c", "d", "e"], "top5_scores": [0.5, 0.2, 0.1, 0.1, 0.1], "targets": [1, 2, 3],
             "target_names": ["a", "b", "c"], "map_max": [1.0, 2.0, 3.0], "map_mean": [0.1, 0.2, 0.3],
             "map_argmax_x": [1.0, 2.0, 3.0], "map_argmax_y": [4.0, 5.0, 6.0]} for i in range(n)]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def test_the_previous_table_is_held_as_arrow_not_as_python_rows(tmp_path):
    """Was: every previous row as a Python dict, about 7 kB each (7 GB for a million images, per method)."""
    n = 20_000
    pq.write_table(_table(n), tmp_path / "previous.parquet")
    tracemalloc.start()
    try:
        previous = PreviousRows(tmp_path / "previous.parquet")
        python_heap = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert python_heap / n < 1024, f"{python_heap / n:.0f} bytes of Python objects per previous row"
    records = [ImageRecord(f"class_{i % 10}/image_{i:07d}.jpg", size=size, mtime_ns=mtime) for i, size, mtime in
               ((5, 50_005, 1_700_000_000_000_000_005), (6, 1, 1_700_000_000_000_000_006), (n + 1, 0, 0))]
    found = previous.match(records)
    assert found[0]["index"] == 5 and found[1] is None and found[2] is None  # unchanged, resized, new


def test_assembling_the_table_streams_the_shards_and_counts_the_failures(tmp_path, monkeypatch):
    shards = []
    for part in range(3):
        table = _table(4).set_column(0, "index", pa.array(range(4 * part, 4 * part + 4), pa.int64()))
        if part == 1:
            table = table.set_column(2, "status", pa.array(["ok", "error", "ok", "ok"]))
            table = table.set_column(3, "error", pa.array([None, "truncated file", None, None]))
        pq.write_table(table, tmp_path / f"{part}.parquet")
        shards.append(tmp_path / f"{part}.parquet")
    rows, failed = assemble(shards, tmp_path / "results.parquet")
    assert rows == 12 and failed == [("class_1/image_0000001.jpg", "truncated file")]
    assert pq.read_table(tmp_path / "results.parquet")["index"].to_pylist() == list(range(12))
    assert assemble([], tmp_path / "empty.parquet") == (0, []) and pq.read_table(tmp_path / "empty.parquet").num_rows == 0
    monkeypatch.setattr("camshaft.writers.table.ROW_GROUP", 8)  # shards gather into row groups, not one group each
    assemble(shards, tmp_path / "grouped.parquet")
    groups = pq.ParquetFile(tmp_path / "grouped.parquet").metadata
    assert [groups.row_group(i).num_rows for i in range(groups.num_row_groups)] == [8, 4]
