"""Reading a run back: the results table as a data frame and the maps, upsampled on request."""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from camshaft.data.sources import path_text
from camshaft.engine.postprocess import to_original
from camshaft.pipeline.state import MAPS_FILE, TABLE_FILE
from camshaft.errors import ConfigError
from camshaft.preprocess import Preprocess, geometry
from camshaft.writers.maps_store import MAPS, TARGETS, open_maps
from camshaft.writers.overlay import normalize_map


@dataclass
class Results:
    """A finished run: ``table`` (one row per image) and lazily read ``maps`` (images, K, h, w)."""

    out: Path
    table: pd.DataFrame
    group: object  # the Zarr group
    _positions: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __repr__(self) -> str:  # a notebook shows this, not the whole table and store
        ok = int((self.table["status"] == "ok").sum()) if "status" in self.table else len(self.table)
        return (f"Results({str(self.out)!r}: {self.attrs.get('method')} on {len(self.table)} images, {ok} ok; "
                f"maps {tuple(self.maps.shape)})")

    @property
    def maps(self):
        return self.group[MAPS]

    @property
    def targets(self) -> np.ndarray:
        return self.group[TARGETS][:]

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_dict(self.attrs["preprocess"])

    @property
    def class_names(self) -> list[str] | None:
        """The model's class names (index -> name), or None when it has none."""
        return self.attrs.get("class_names")

    def index_of(self, image: int | str | os.PathLike) -> int:
        """The row in ``maps`` of an image given by that index or by its path (as the table lists it, or
        relative to the current folder: the table's paths are absolute)."""
        if isinstance(image, (str, os.PathLike)):
            text = os.fspath(image)
            found = [self._position("path", p) for p in (text, path_text(os.path.abspath(text)))]
            found = [p for p in found if p is not None]
            if not found:
                raise ConfigError(f"no image {os.fspath(image)!r} in {self.out}: see the table's 'path' column")
            return int(self.table["index"].iloc[min(found)])
        n = self.maps.shape[0]
        if not isinstance(image, numbers.Integral) or isinstance(image, bool) or not -n <= image < n:
            raise ConfigError(f"image must be an index in 0..{n - 1} or a path from the table, received {image!r}")
        return int(image) % n

    def map(self, image: int | str | os.PathLike, *, upsample: bool = False, normalize: bool = False) -> np.ndarray:
        """Maps of ``image`` (index or path): (K, h, w), or with ``upsample`` (K, H0, W0) placed on the
        original image. ``normalize``: each map ReLU'd and divided by its maximum, in [0, 1]."""
        index = self.index_of(image)
        maps = np.asarray(self.maps[index])
        if not (upsample or normalize):
            return maps  # NaN for an image that failed
        row = self.table.iloc[self._position("index", index)]
        if row["status"] != "ok":
            raise ConfigError(f"image {index} ({row['path']}) has no maps: {row['error']}")
        if not upsample:
            return np.stack([normalize_map(m) for m in maps])
        pre = self.preprocess
        geom = geometry((int(row["width"]), int(row["height"])), pre)
        return np.stack([to_original(m, geom, pre.input_size, normalize=normalize) for m in maps])

    def _position(self, column: str, value) -> int | None:
        """The first row of the table whose ``column`` is ``value`` (None: none). The lookup is built once per
        table: a scan of the table per call made a loop over a run's images quadratic (hours at 10^6 images)."""
        cached = self._positions.get(column)
        if cached is None or cached[0] is not self.table:
            keys = pd.Series(np.arange(len(self.table)), index=self.table[column].to_numpy())
            cached = self._positions[column] = (self.table, keys[~keys.index.duplicated()])
        found = cached[1].get(value)
        return None if found is None else int(found)


def load_results(out: str | Path) -> Results:
    """Open the results of ``camshaft explain`` written to ``out``."""
    if not isinstance(out, (str, os.PathLike)):
        raise ConfigError(f"out must be a path (str or pathlib.Path), received {out!r}")
    out = Path(out)
    table, maps = out / TABLE_FILE, out / MAPS_FILE
    missing = [str(p) for p in (table, maps) if not p.exists()]
    if missing:
        methods = sorted(p.parent.name for p in out.glob(f"*/{TABLE_FILE}"))
        if methods:
            choices = ", ".join(str(out / m) for m in methods)
            raise ConfigError(f"{out} holds a run of several methods: load one of {choices}")
        raise ConfigError(f"{out} is not a finished camshaft run: missing {', '.join(missing)}")
    return Results(out, _read_table(table), open_maps(maps))


def _read_table(path: Path) -> pd.DataFrame:
    """The table as a data frame; ``width`` and ``height`` are nullable integers (Int32), so that they stay
    integers whatever the run: numpy integers have no missing value, and pandas would read them as float64
    whenever a failed image (unreadable: no size) left them empty."""
    sizes = {"width": pd.Int32Dtype(), "height": pd.Int32Dtype()}
    frame = pq.read_table(path).to_pandas()
    return frame.astype({k: v for k, v in sizes.items() if k in frame.columns})
