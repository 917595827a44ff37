"""Reading a run back: the results table as a data frame and the maps, upsampled on request."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from camshaft.engine.postprocess import to_original
from camshaft.pipeline.state import MAPS_FILE, TABLE_FILE
from camshaft.errors import ConfigError
from camshaft.preprocess import Preprocess, geometry
from camshaft.writers.maps_store import MAPS, TARGETS, open_maps


@dataclass
class Results:
    """A finished run: ``table`` (one row per image) and lazily read ``maps`` (images, K, h, w)."""

    out: Path
    table: pd.DataFrame
    group: object  # the Zarr group

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

    def map(self, index: int, *, upsample: bool = False, normalize: bool = False) -> np.ndarray:
        """Maps of image ``index``: (K, h, w), or (K, H0, W0) placed on the original image."""
        maps = np.asarray(self.maps[index])
        if not upsample:
            return maps
        row = self.table.set_index("index").loc[index]
        if row["status"] != "ok":
            raise ConfigError(f"image {index} ({row['path']}) has no maps: {row['error']}")
        pre = self.preprocess
        geom = geometry((int(row["width"]), int(row["height"])), pre)
        return np.stack([to_original(m, geom, pre.input_size, normalize=normalize) for m in maps])


def load_results(out: str | Path) -> Results:
    """Open the results of ``camshaft explain`` written to ``out``."""
    out = Path(out)
    table, maps = out / TABLE_FILE, out / MAPS_FILE
    missing = [str(p) for p in (table, maps) if not p.exists()]
    if missing:
        methods = sorted(p.parent.name for p in out.glob(f"*/{TABLE_FILE}"))
        if methods:
            raise ConfigError(f"{out} holds a run of several methods: load one of {', '.join(str(out / m) for m in methods)}")
        raise ConfigError(f"{out} is not a finished camshaft run: missing {', '.join(missing)}")
    return Results(out, pd.read_parquet(table), open_maps(maps))
