"""The maps store: a Zarr group with ``maps`` (images, K, h, w) and ``targets`` (images, K).

Maps stay at their native resolution (one cell per feature-map position); the group's attributes
record the method, tap, targets and preprocessing so readers can upsample them onto the images.
Rows of images that failed to decode hold NaN maps and target -1. dask and xarray read it directly
(``dask.array.from_zarr(path, component="maps")``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

MAPS, TARGETS = "maps", "targets"


class MapsStore:
    """Writes batches of maps into rows of a Zarr store created on the first batch."""

    def __init__(self, path: Path, *, n_images: int, chunk: int, attrs: dict):
        self.path, self.n_images, self.chunk, self.attrs = Path(path), n_images, chunk, attrs
        self._group = None

    def _create(self, k: int, h: int, w: int) -> None:
        group = zarr.open_group(str(self.path), mode="w")
        chunk = min(self.chunk, max(self.n_images, 1))
        group.create_array(MAPS, shape=(self.n_images, k, h, w), chunks=(chunk, k, h, w), dtype="float32", fill_value=np.nan)
        group.create_array(TARGETS, shape=(self.n_images, k), chunks=(chunk, k), dtype="int32", fill_value=-1)
        group.attrs.update({**self.attrs, "map_shape": [h, w], "k": k})
        self._group = group

    def write(self, rows: np.ndarray, maps: np.ndarray, targets: np.ndarray) -> None:
        """Write ``maps`` (n, K, h, w) and ``targets`` (n, K) at the given row indices."""
        if len(rows) == 0:
            return
        if self._group is None:
            self._create(*maps.shape[1:])
        lo, hi = int(rows.min()), int(rows.max()) + 1
        if hi - lo == len(rows):  # contiguous rows: one region write
            order = np.argsort(rows)
            self._group[MAPS][lo:hi] = maps[order]
            self._group[TARGETS][lo:hi] = targets[order]
        else:
            self._group[MAPS].set_orthogonal_selection((rows,), maps)
            self._group[TARGETS].set_orthogonal_selection((rows,), targets)

    def ensure(self, k: int, h: int, w: int) -> None:
        """Create an empty store when no image could be explained at all."""
        if self._group is None:
            self._create(k, h, w)


def open_maps(path: Path):
    """The Zarr group of a run's maps, read-only."""
    return zarr.open_group(str(path), mode="r")
