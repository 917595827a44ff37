"""The results table: one Parquet row per input image, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        ("index", pa.int64()),  # the image's row in the maps store
        ("path", pa.string()),
        ("status", pa.string()),  # ok | error
        ("error", pa.string()),
        ("label", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
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
    path = Path(path)
    rows = sorted(rows, key=lambda r: r["index"])
    table = pa.Table.from_pylist([{f: r.get(f) for f in SCHEMA.names} for r in rows], schema=SCHEMA)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
