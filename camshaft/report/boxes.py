"""Object boxes for a run's images: from the results table, or from the manifest the run recorded.

Runs write each image's box into the table's ``box`` column. For older runs without it, the run's
attributes name its data (``attrs["data"]``): a manifest with ``x0,y0,x1,y1`` columns gives them,
images matched by absolute path.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from camshaft.data.sources import list_images, path_text
from camshaft.errors import ConfigError


def run_boxes(rows: pd.DataFrame, data: str | os.PathLike | None) -> np.ndarray | None:
    """Boxes (n, 4) of ``rows`` (NaN where none); None when the run has no boxes at all."""
    if "box" in rows.columns and rows["box"].notna().any():
        return np.stack([np.asarray(b, dtype=np.float64) if b is not None and len(b) == 4 else np.full(4, np.nan) for b in rows["box"]])
    return manifest_boxes(data, rows["path"].tolist())


def manifest_boxes(data: str | os.PathLike | None, paths: Sequence[str]) -> np.ndarray | None:
    """Boxes (n, 4) (x0, y0, x1, y1, original pixels) for ``paths``, NaN rows where none is given.

    Returns None when ``data`` is not a manifest with boxes. A manifest that has gone missing
    since the run warns and gives None: the report then has no localization section.
    """
    if data is None or not str(data).lower().endswith((".csv", ".parquet")):
        return None
    if not os.path.exists(data):
        warnings.warn(f"the run's manifest {data} no longer exists: no boxes, no localization metrics", stacklevel=2)
        return None
    try:
        records = list_images(data)
    except ConfigError as e:
        warnings.warn(f"cannot read boxes from the run's manifest: {e}", stacklevel=2)
        return None
    by_path = {path_text(os.path.normpath(r.path)): r.box for r in records if r.box is not None}
    if not by_path:
        return None
    out = np.full((len(paths), 4), np.nan)
    for i, path in enumerate(paths):
        box = by_path.get(os.path.normpath(os.path.abspath(path)))
        if box is not None:
            out[i] = box
    return out
