"""The results table: one Parquet row per input image, written atomically.

A run writes one shard per partition and assembles ``results.parquet`` from them at the end.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from camshaft.writers.atomic import atomic_path

SCHEMA = pa.schema(
    [
        ("index", pa.int64()),  # the image's row in the maps store
        ("path", pa.string()),
        ("status", pa.string()),  # ok | error
        ("error", pa.string()),
        ("label", pa.string()),
        ("box", pa.list_(pa.float32())),  # x0, y0, x1, y1 from the manifest, original-image pixels
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("file_size", pa.int64()),  # at listing time: with mtime_ns, how changed files are spotted
        ("mtime_ns", pa.int64()),
        ("top5_classes", pa.list_(pa.int32())),
        ("top5_names", pa.list_(pa.string())),
        ("top5_scores", pa.list_(pa.float32())),  # softmax probabilities
        ("targets", pa.list_(pa.int32())),
        ("target_names", pa.list_(pa.string())),
        ("map_max", pa.list_(pa.float32())),  # per target, raw map values
        ("map_mean", pa.list_(pa.float32())),
        ("map_argmax_x", pa.list_(pa.float32())),  # per target, original-image pixels
        ("map_argmax_y", pa.list_(pa.float32())),
    ]
)


def write_table(rows: list[dict], path: Path) -> None:
    """Write ``rows`` sorted by index to ``path`` via a temporary file and a rename."""
    rows = sorted(rows, key=lambda r: r["index"])
    table = pa.Table.from_pylist([{f: r.get(f) for f in SCHEMA.names} for r in rows], schema=SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


ROW_GROUP = 65_536  # rows per Parquet row group of the final table (not one small group per shard)


def assemble(shards: list[Path], path: Path) -> tuple[int, list[tuple[str, str]]]:
    """Concatenate partition shards (in order) into the final table, atomically, with at most a row
    group's worth of shards in memory; returns the number of rows and the (path, error) of each row
    that failed."""
    rows, written, failed, pending = 0, 0, [], []
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, SCHEMA) as writer:
            for shard in shards:
                table = pq.read_table(shard, schema=SCHEMA)
                rows += table.num_rows
                bad = table.filter(pc.not_equal(table["status"], "ok"))
                failed += zip(bad["path"].to_pylist(), bad["error"].to_pylist(), strict=True)
                pending.append(table)
                if rows - written >= ROW_GROUP:
                    writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP)
                    pending, written = [], rows
            if pending:
                writer.write_table(pa.concat_tables(pending))
    return rows, failed
