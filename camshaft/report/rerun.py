"""Going back to a run's model and images: reopen the backend, re-read the images in batches.

Used by the work done after a run (faithfulness metrics, dataset exemplars). The model comes from
the run's attributes (``model_spec``, ``weights``, ``backend``, ``preprocess``), so it is the one the
run explained, with the same preprocessing.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from camshaft.data.decode import load_rgb
from camshaft.data.sources import file_path
from camshaft.engine.backends import backend_factory
from camshaft.engine.backends.base import resolve_device
from camshaft.engine.backends.registry import auto_backend
from camshaft.errors import CamshaftError
from camshaft.models.sources import resolve_model
from camshaft.pipeline.state import ARTIFACTS_DIR
from camshaft.preprocess import Preprocess, prepare
from camshaft.results import Results


def open_run_backend(results: Results, *, taps: Sequence[str] | None = None, device: str | None = None):
    """The run's model on its backend (eager for torch models), with the run's preprocessing."""
    attrs = results.attrs
    pre = results.preprocess
    overrides = {"input_size": tuple(pre.input_size), "mean": tuple(pre.mean), "std": tuple(pre.std),
                 "resize": pre.resize, "crop": pre.crop}
    source = resolve_model(attrs.get("model_spec"), weights=attrs.get("weights"), preprocess=overrides)
    name = auto_backend(source)  # eager, or an exported file's own backend
    wanted = list(taps) if taps else ([attrs["tap"]] if attrs.get("tap") else None)
    return backend_factory(name)(
        source,
        taps=wanted,
        preprocess=overrides,
        device=resolve_device(device),
        dtype=torch.float32,
        workdir=Path(results.out) / ARTIFACTS_DIR,
    )


def _decode(path: str, pre: Preprocess) -> torch.Tensor | None:
    try:
        return prepare(load_rgb(path), pre)[0]
    except CamshaftError as e:
        warnings.warn(f"skipping {path}: {e}", stacklevel=3)
        return None


def image_batches(rows: pd.DataFrame, pre: Preprocess, *, batch_size: int, workers: int = 2) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(indices (B,), uint8 images (B, 3, H, W)) for ``rows`` (columns index, path), in order.

    The next batch decodes on threads while the caller works on this one. Images that no longer
    decode are skipped with a warning.
    """
    index, paths = rows["index"].to_numpy(), [file_path(p) for p in rows["path"]]
    starts = range(0, len(paths), batch_size)
    with ThreadPoolExecutor(workers) as pool:
        submit = lambda s: [pool.submit(_decode, p, pre) for p in paths[s : s + batch_size]]  # noqa: E731
        pending = submit(0) if len(paths) else []
        for s in starts:
            batch = [f.result() for f in pending]
            pending = submit(s + batch_size) if s + batch_size < len(paths) else []
            keep = [i for i, t in enumerate(batch) if t is not None]
            if keep:
                yield index[s : s + batch_size][keep], torch.stack([batch[i] for i in keep])
