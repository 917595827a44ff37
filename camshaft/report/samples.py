"""The few images a report shows, rendered once each into the report's ``img/`` folder.

A ``Sampler`` reads single maps from a run (point reads of the Zarr array) only for the rows the
report shows, and returns relative links; asking twice for the same overlay renders it once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from camshaft.data.sources import file_path
from camshaft.report.thumbs import heat_tile, overlay_thumb, safe_name
from camshaft.results import Results

IMG_DIR = "img"
BOX_COLUMNS = ("box_x0", "box_y0", "box_x1", "box_y1")


class Sampler:
    """Renders overlays of ``results``' maps into ``out/img`` with names starting with ``prefix``."""

    def __init__(self, out: Path, results: Results, *, prefix: str = "ov", size: int = 176):
        self.out, self.results, self.prefix, self.size = Path(out), results, prefix, size
        self.pre = results.preprocess
        self._done: dict[str, str] = {}

    def overlay(self, row: pd.Series) -> str:
        """The overlay of map ``row.k`` of image ``row.index`` (box drawn when the row has one)."""
        name = safe_name(self.prefix, int(row["index"]), int(row["k"])) + ".png"
        if name not in self._done:
            m = np.asarray(self.results.maps[int(row["index"]), int(row["k"])])
            box = [row[c] for c in BOX_COLUMNS] if all(c in row.index for c in BOX_COLUMNS) else None
            overlay_thumb(self.out / IMG_DIR / name, file_path(str(row["path"])), m, self.pre, size=self.size, box=box)
            self._done[name] = f"{IMG_DIR}/{name}"
        return self._done[name]

    def activation(self, index: int, path: str, m: np.ndarray, *, tag: str) -> str:
        """The overlay of an activation map ``m`` (h, w) on image ``index`` (dataset exemplars)."""
        name = safe_name(self.prefix, tag, index) + ".png"
        if name not in self._done:
            overlay_thumb(self.out / IMG_DIR / name, file_path(path), m, self.pre, size=self.size)
            self._done[name] = f"{IMG_DIR}/{name}"
        return self._done[name]


def heat(out: Path, m: np.ndarray, *, name: str, size: int = 176) -> str:
    """A coloured map tile written to ``out/img``; returns its relative link."""
    file = safe_name(name) + ".png"
    heat_tile(Path(out) / IMG_DIR / file, m, size=size)
    return f"{IMG_DIR}/{file}"
