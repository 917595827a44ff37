"""How much decoding slows the thread that drives the device: decode threads, processes, device readers.

The thread that drives a GPU launches many small operators; each gives the GIL up and must win it
back. This script runs such a loop (small in-place torch ops, one thread) alone, then while a
pool of camshaft's decoders works without pause, and prints the loop's rate in each case, with
the images the decoders handled meanwhile and the loop's loss per image (a pipeline handles only
as many images as the device takes, so that figure is the one to compare). ``device`` is
``--decode device``'s pool: threads that only read the files and their headers. It is the
measurement behind ``explain --decode auto`` (processes on a GPU) and the threads of ``device``.

    python scripts/gil_contention.py [--workers 1 4 16] [--seconds 2] [--kinds threads processes device]

On the 2-core CI machine (2026-12-01), alone 570k ops/s; with 1 / 4 / 16 workers:

- decode threads: 395k / 50k / 6.6k ops/s, 123 / 217 / 286 ops lost per image;
- decode processes: 492k / 310k / 163k ops/s, 78 / 245 / 1097 ops lost per image (on 2 cores the
  processes also take CPU time from the loop; on a 16-core GPU host they would not);
- device readers: 107k / 52k / 27k ops/s while handling 18-29k images/s, 16 / 22 / 31 ops lost
  per image.
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


def with_decoding(kind: str, workers: int, paths: list[str], seconds: float) -> tuple[float, float]:
    """The loop's rate while the decoders run flat out, and how many images per second they handle."""
    decoder, pre, stop = Decoder(kind, workers), Preprocess((224, 224)), threading.Event()
    decoder.start()
    done = [0, 0.0, 0.0]  # images handled while the loop ran, the loop's start and end

    def feed():  # keep the pool busy: always a few rounds queued
        while not stop.is_set():
            for _ in decoder.map(paths * 4, pre):
                if done[1] and not done[2]:
                    done[0] += 1

    feeders = [threading.Thread(target=feed, daemon=True) for _ in range(2)]
    for t in feeders:
        t.start()
    time.sleep(0.3)
    done[1] = time.perf_counter()
    rate = small_ops_per_second(seconds)
    done[2] = time.perf_counter()
    stop.set()
    for t in feeders:
        t.join()
    return rate, done[0] / (done[2] - done[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument(
        "--kinds", nargs="+", default=["threads", "processes", "device"],
        help="device: threads that only read the files (the device decodes them)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = jpegs(Path(tmp))
        alone = small_ops_per_second(args.seconds)
        print(f"alone: {alone:,.0f} small ops/s")
        for kind in args.kinds:
            for n in args.workers:
                rate, images = with_decoding(kind, n, paths, args.seconds)
                lost = f"{(alone - rate) / images:5.1f}" if images else "  n/a"  # none: the pool was still starting
                print(
                    f"{n:3d} decode {kind:9s}: {rate:9,.0f} small ops/s while handling {images:7,.0f} images/s: "
                    f"{lost} ops lost per image"
                )


if __name__ == "__main__":
    main()
