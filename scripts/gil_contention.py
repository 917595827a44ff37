"""How much decoding slows the thread that drives the device: decode threads against decode processes.

The thread that drives a GPU launches many small operators; each gives the GIL up and must win it
back. This script runs such a loop (small in-place torch ops, one thread) alone, then while a
pool of camshaft's decoders decodes and resizes JPEGs without pause, and prints the loop's rate
in each case. It is the measurement behind ``explain --decode auto`` (processes on a GPU).

    python scripts/gil_contention.py [--workers 1 4 16] [--seconds 2]

On the 2-core CI machine (2026-12-01): alone 540k ops/s; 1 / 4 / 16 decode threads 339k / 50k /
5.3k; 1 / 4 / 16 decode processes 444k / 303k / 194k (on 2 cores the processes also take CPU time
from the loop; threads take that and the GIL).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from camshaft.data.workers import Decoder
from camshaft.preprocess import Preprocess


def small_ops_per_second(seconds: float) -> float:
    x = torch.zeros(16, 64)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(100):
            x.add_(1)
        n += 100
    return n / (time.perf_counter() - start)


def jpegs(folder: Path, n: int = 64, size: int = 256) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        coarse = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        path = folder / f"{i}.jpg"
        Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC).save(path, quality=90)
        paths.append(str(path))
    return paths


def with_decoding(kind: str, workers: int, paths: list[str], seconds: float) -> float:
    decoder, pre, stop = Decoder(kind, workers), Preprocess((224, 224)), threading.Event()
    decoder.start()

    def feed():  # keep the pool busy: always a few rounds queued
        while not stop.is_set():
            for _ in decoder.map(paths * 4, pre):
                pass

    feeders = [threading.Thread(target=feed, daemon=True) for _ in range(2)]
    for t in feeders:
        t.start()
    time.sleep(0.3)
    rate = small_ops_per_second(seconds)
    stop.set()
    for t in feeders:
        t.join()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = jpegs(Path(tmp))
        print(f"alone: {small_ops_per_second(args.seconds):,.0f} small ops/s")
        for kind in ("threads", "processes"):
            for n in args.workers:
                rate = with_decoding(kind, n, paths, args.seconds)
                print(f"{n:3d} decode {kind:9s}: {rate:,.0f} small ops/s")


if __name__ == "__main__":
    main()
