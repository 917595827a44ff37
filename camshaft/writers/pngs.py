"""PNG overlays, one per image and target, in the seeds' convention (see ``overlay``)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from camshaft.data.decode import load_rgb
from camshaft.data.sources import file_path
from camshaft.engine.postprocess import to_original
from camshaft.errors import CamshaftError
from camshaft.preprocess import Preprocess, geometry
from camshaft.writers.atomic import atomic_path
from camshaft.writers.overlay import overlay


def overlay_name(index: int, path: str, target: int, class_names, *, k: int | None = None) -> str:
    """``000012_cat_class-281-tabby.png``: sortable, unique per image and target.

    ``k``, the target's position, is added (``..._k1.png``) for a class listed again among the targets
    (``--targets 281,tabby`` names one class twice): its map would otherwise overwrite the first one's.
    """
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(path).stem)[:40]
    label = f"class-{target}"
    if class_names:
        label += "-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", class_names[target])[:30]
    return f"{index:06d}_{stem}_{label}{'' if k is None else f'_k{k}'}.png"


def overlay_names(index: int, path: str, targets: list, class_names) -> list[str]:
    """The overlay names of one row's targets, in order (``overlay_name``, a repeated class marked by its ``k``)."""
    return [overlay_name(index, path, t, class_names, k=k if t in targets[:k] else None) for k, t in enumerate(targets)]


def write_overlays(folder: Path, rows: list[dict], maps: np.ndarray, *, preprocess: Preprocess, class_names) -> int:
    """Overlays for the ok ``rows`` (maps aligned with them); the image is read again, not kept."""
    written = 0
    for row, image_maps in zip(rows, maps, strict=True):
        if row["status"] != "ok":
            continue
        try:
            image = load_rgb(file_path(row["path"]))  # the row holds the name as text
        except CamshaftError:
            continue  # vanished since it was explained: its row says ok, only the picture is missing
        geom = geometry(image.size, preprocess)
        names = overlay_names(row["index"], row["path"], list(row["targets"]), class_names)
        for k, name in enumerate(names):
            heat = to_original(np.asarray(image_maps[k]), geom, preprocess.input_size)
            with atomic_path(folder / name) as tmp:
                overlay(image, heat).save(tmp, format="PNG")
            written += 1
    return written
