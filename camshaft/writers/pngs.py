"""PNG overlays, one per image and target, in the seeds' convention (see ``overlay``)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from camshaft.engine.postprocess import to_original
from camshaft.writers.overlay import overlay


def overlay_name(index: int, path: str, target: int, class_names) -> str:
    """``000012_cat_class-281-tabby.png``: sortable, unique per image and target."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(path).stem)[:40]
    label = f"class-{target}"
    if class_names:
        label += "-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", class_names[target])[:30]
    return f"{index:06d}_{stem}_{label}.png"


def write_overlays(folder: Path, items, info) -> list[Path]:
    """Write overlays for ``items`` = [(decoded, maps (K, h, w), row)]; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for d, maps, row in items:
        for k, target in enumerate(row["targets"]):
            heat = to_original(np.asarray(maps[k]), d.geometry, info.preprocess.input_size)
            path = folder / overlay_name(d.index, d.record.path, target, info.class_names)
            tmp = path.with_name(f".{path.name}.tmp")
            overlay(d.image, heat).save(tmp, format="PNG")
            os.replace(tmp, path)
            written.append(path)
    return written
