"""Measure the pipeline at dataset scale: peak memory and end-to-end vs method-only throughput.

    python scripts/pipeline_scale.py --images 2000 20000

Each size runs in a fresh process (peak RSS is per process): it generates small JPEGs with the
demo generator, runs ``camshaft.explain`` (demo model, Grad-CAM) over them, then times the method
alone on the same images already decoded, and prints one JSON line per size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def generate(folder: Path, n: int, size: int) -> None:
    import numpy as np

    from camshaft.demo.shapes import render_sample

    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        image, _, _ = render_sample(rng, size=size)
        image.save(sub / f"{i:06d}.jpg", quality=90)


def method_only(images: list[Path], batch_size: int) -> float:
    """Images/s of Grad-CAM on tensors already decoded and preprocessed (the limit of the pipeline)."""
    import torch

    from camshaft.data.decode import load_rgb
    from camshaft.engine.backends import backend_factory
    from camshaft.engine.methods import get_method
    from camshaft.engine.targets import Targets
    from camshaft.models.sources import resolve_model
    from camshaft.preprocess import normalize, prepare

    source = resolve_model("demo")
    backend = backend_factory("eager")(source, taps=None, preprocess={}, device=torch.device("cpu"), dtype=torch.float32, workdir=None)
    pre = backend.info.preprocess
    batch = torch.stack([prepare(load_rgb(p), pre)[0] for p in images[:batch_size]])
    x = normalize(batch, pre)
    method, select = get_method("gradcam"), Targets.parse("top:1").selector()
    method.run(backend, x, select, tap=backend.info.taps[-1])
    rounds = max(3, len(images) // batch_size // 10)
    start = time.perf_counter()
    for _ in range(rounds):
        method.run(backend, x, select, tap=backend.info.taps[-1])
    return rounds * batch_size / (time.perf_counter() - start)


def measure(n: int, size: int, batch_size: int, partition_size: int) -> dict:
    import camshaft

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        generate(folder, n, size)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        summary = camshaft.explain(None, folder, out=Path(tmp) / "out", batch_size=batch_size, partition_size=partition_size, progress=False)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        limit = method_only(sorted(folder.rglob("*.jpg")), batch_size)
    e2e = summary.images / summary.seconds
    return {
        "images": n,
        "ok": summary.ok,
        "seconds": round(summary.seconds, 2),
        "end_to_end_images_per_s": round(e2e, 1),
        "method_only_images_per_s": round(limit, 1),
        "ratio": round(e2e / limit, 3),
        "peak_rss_mb": round(peak / 1024, 1),
        "rss_before_run_mb": round(rss_before / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--size", type=int, default=96, help="side of the generated images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--partition-size", type=int, default=512)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size here
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.size, args.batch_size, args.partition_size)))
        return
    for n in args.images:  # a fresh process per size: peak RSS must not carry over
        cmd = [sys.executable, __file__, "--one", str(n), "--size", str(args.size), "--batch-size", str(args.batch_size), "--partition-size", str(args.partition_size)]
        subprocess.run(cmd, check=True, env={**os.environ})


if __name__ == "__main__":
    main()
