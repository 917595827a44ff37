"""What an actmax run leaves in its folder: one PNG per image, a labelled grid, ``results.parquet``.

Every file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from camshaft.engine.actmax.render import Rendering, as_saved
from camshaft.writers.atomic import atomic_path
from camshaft.writers.overlay import render_grid

__all__ = ["SCHEMA", "image_name", "result_rows", "write_outputs"]

SCHEMA = pa.schema(
    [
        ("index", pa.int64()),  # the image's row in the rendering
        ("objective", pa.int64()),  # which objective (index // copies)
        ("copy", pa.int32()),
        ("spec", pa.string()),  # the objective's spec string, as the CLI reads it
        ("value", pa.float64()),  # -loss of the objective on the final image as saved (what was maximised)
        ("target", pa.int32()),  # class objectives: the class
        ("target_name", pa.string()),
        ("target_prob", pa.float64()),  # softmax probability of the target on the saved PNG
        ("image", pa.string()),  # the PNG's file name
    ]
)


def image_name(index: int, spec: str, copy: int | None = None) -> str:
    """``0003_channel_layer3_7.png``: sortable and safe on every file system."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec).strip("_")[:60] or "objective"
    return f"{index:04d}_{safe}" + ("" if copy is None else f"_copy{copy}") + ".png"


def to_pil(image) -> Image.Image:
    """(3, H, W) float in [0, 1] -> an RGB image, rounded as ``as_saved`` rounds (what was measured)."""
    a = np.clip(np.rint(as_saved(image.nan_to_num(0.5)).permute(1, 2, 0).numpy() * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(a)


def result_rows(r: Rendering, class_names: Sequence[str] | None = None) -> list[dict]:
    rows = []
    for i in range(r.images.shape[0]):
        j, copy = divmod(i, r.copies)
        o = r.objectives[j]
        prob = float(r.target_probs[i])
        rows.append({
            "index": i, "objective": j, "copy": copy, "spec": o.spec, "value": float(r.values[i]),
            "target": o.target,
            "target_name": None if o.target is None or not class_names else class_names[o.target],
            "target_prob": None if math.isnan(prob) else prob,
            "image": image_name(j, o.spec, copy if r.copies > 1 else None),
        })
    return rows


def _save(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _label(row: dict) -> str:
    """``class:circle p=1.00`` for a class objective, the spec otherwise."""
    kind = row["spec"].partition(":")[0]
    p = "" if row["target_prob"] is None else f" p={row['target_prob']:.2f}"  # None: a diverged image
    if row["target_name"] and row["spec"] == f"{kind}:{row['target']}":
        return f"{kind}:{row['target_name']}{p}"
    return row["spec"] + p


def write_outputs(out: Path, r: Rendering, *, class_names: Sequence[str] | None = None,
                  columns: int | None = None) -> list[dict]:
    """Write the PNGs, ``grid.png`` and ``results.parquet`` into ``out``; returns the rows.

    An earlier run's images that this one did not write again are removed (only those its table
    lists: other files in ``out`` are the user's).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = result_rows(r, class_names)
    earlier = _listed_images(out / "results.parquet")
    pictures = [to_pil(im) for im in r.images]
    for row, picture in zip(rows, pictures):
        _save(picture, out / row["image"])
    cols = columns or (r.copies if r.copies > 1 else math.ceil(math.sqrt(len(rows))))
    _save(render_grid(pictures, columns=cols, labels=[_label(row) for row in rows]), out / "grid.png")
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    with atomic_path(out / "results.parquet") as tmp:
        pq.write_table(table, tmp)
    for name in earlier - {row["image"] for row in rows}:
        (out / name).unlink(missing_ok=True)
    return rows


def _listed_images(table: Path) -> set[str]:
    """The image files an earlier run's table lists (plain names in the folder; none if unreadable)."""
    try:
        names = pq.read_table(table, columns=["image"]).column("image").to_pylist()
    except (OSError, ValueError, KeyError, pa.ArrowException):
        return set()
    return {n for n in names if isinstance(n, str) and n == Path(n).name and n.endswith(".png")}
