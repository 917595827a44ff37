"""End to end: decode + explain + write on generated JPEGs, through ``camshaft.explain``.

A pipeline run times itself (``RunSummary.seconds``: from the first decode to the last write), so
resolving the model and exporting artifacts, which ``explain`` does before it starts the clock,
are not counted. Non-eager backends are handed the artifact their method workloads already
exported, and the eager backend the same weights, so the pipeline explains the same model.
"""

from __future__ import annotations

import itertools
import shutil
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from camshaft.bench.cases import Case, bench_options, target_count
from camshaft.bench.workload import Workload
from camshaft.engine.methods import get_method


def write_jpegs(folder: Path, *, n: int, size: int, seed: int = 0, quality: int = 90) -> Path:
    """``n`` smooth random colour JPEGs of ``size`` × ``size`` pixels in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        coarse = rng.integers(0, 256, size=(max(2, size // 16), max(2, size // 16), 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        noisy = np.clip(np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3)), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=quality)
    return folder


def jpeg_size(input_size: tuple[int, int]) -> int:
    """Generated images are a little larger than the input (the default center-crop has work to do)."""
    return int(round(max(input_size) * 8 / 7))


def pipeline_workload(
    case: Case,
    *,
    model: str,
    weights: Path | None,
    data: Path,
    n: int,
    workdir: Path,
    device: str,
    dtype: str,
    decode: str = "auto",
    cuda_graphs: bool = False,
) -> Workload:
    """``camshaft.explain`` of the ``n`` images in ``data`` for ``case``; each call writes a fresh folder."""
    method = get_method(case.method)
    options = bench_options(method, case.variant)
    runs = itertools.count()

    def fn() -> float:
        out = workdir / f"run-{next(runs)}"
        from camshaft.api import explain

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            summary = explain(
                model,
                data,
                out=out,
                method=case.method,
                targets=case.targets,
                weights=weights,
                backend=case.backend,
                device=device,
                dtype=dtype,
                batch_size=case.group.batch,
                partition_size=4 * case.group.batch,  # several partitions: decoding overlaps compute as at scale
                input_size=case.group.input_size,
                options=options,
                decode=decode,
                cuda_graphs=cuda_graphs,
                progress=False,
            )
        shutil.rmtree(out, ignore_errors=True)
        attrs["stages"] = summary.stages  # the last run's: where a slow pipeline spends its time
        attrs["decoding"] = summary.decoding
        if summary.failed:
            raise RuntimeError(f"pipeline benchmark: {summary.failed} images failed, e.g. {summary.errors[0]}")
        return float(summary.seconds)

    k = target_count(case.targets)
    attrs = {**case.attrs(), "k": k, "images_in_run": n}
    return Workload(f"{case.key}/pipeline", "pipeline", fn, n, n * k, n, attrs)
