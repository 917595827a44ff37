"""The maps store: a Zarr group with ``maps`` (images, K, h, w) and ``targets`` (images, K).

Maps stay at their native resolution (one cell per feature-map position, or per occlusion window,
or per pixel for input-gradient methods); the group's attributes record the method, tap, targets
and preprocessing so readers can place them on the images. One chunk per partition: each Dask task
writes exactly its own chunk. Rows of images that failed hold NaN maps and target -1. The axes are
named (``image, k, y, x``), so dask (``dask.array.from_zarr(path, component="maps")``) and xarray
(``xarray.open_zarr(path, consolidated=False)``: Zarr v3 has no consolidated metadata) read it
directly.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import zarr

from camshaft.writers.atomic import remove_named

MAPS, TARGETS = "maps", "targets"
# named axes (Zarr v3 dimension_names): xarray.open_zarr reads the store as labelled arrays
MAPS_DIMS, TARGETS_DIMS = ("image", "k", "y", "x"), ("image", "k")
_PARTIAL = re.compile(r".+\.[0-9a-f]{32}\.partial")  # zarr's local store writes a chunk as NAME.UUID.partial first


def create_store(path: Path, *, n_images: int, map_shape: tuple[int, int, int], chunk: int, attrs: dict) -> None:
    """A fresh store for ``n_images`` rows of maps of ``map_shape`` (K, h, w)."""
    k, h, w = map_shape
    group = zarr.open_group(str(path), mode="w")
    rows = max(1, min(chunk, n_images))
    group.create_array(MAPS, shape=(n_images, k, h, w), chunks=(rows, k, h, w), dtype="float32", fill_value=np.nan,
                       dimension_names=MAPS_DIMS)
    group.create_array(TARGETS, shape=(n_images, k), chunks=(rows, k), dtype="int32", fill_value=-1,
                       dimension_names=TARGETS_DIMS)
    group.attrs.update({**attrs, "map_shape": [h, w], "k": k})


def write_rows(path: Path, start: int, maps: np.ndarray, targets: np.ndarray) -> None:
    """Write rows ``start:start + len(maps)`` (a partition: one chunk)."""
    group = zarr.open_group(str(path), mode="r+")
    group[MAPS][start : start + len(maps)] = maps
    group[TARGETS][start : start + len(targets)] = targets


def is_whole(path: Path, *, n_images: int, map_shape: tuple[int, int, int]) -> bool:
    """Whether ``path`` holds a store as :func:`create_store` makes it for these sizes (a resume writes into it;
    an update killed as it moved the last results aside left none, or only its beginning)."""
    try:
        group = zarr.open_group(str(path), mode="r")
        return group[MAPS].shape == (n_images, *map_shape) and group[TARGETS].shape == (n_images, map_shape[0])
    except (OSError, KeyError, ValueError):  # no folder, no group, no array
        return False


def remove_partial_writes(path: Path) -> int:
    """Delete the chunk files that writes killed mid-way left in the store; returns how many."""
    return remove_named(path, "*.partial", _PARTIAL)


def open_maps(path: Path):
    """The Zarr group of a run's maps, read-only."""
    return zarr.open_group(str(path), mode="r")
