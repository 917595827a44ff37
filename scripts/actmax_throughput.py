"""Throughput of multi-class activation maximization: N classes as one batch vs one at a time.

    python scripts/actmax_throughput.py                       # resnet18, 128 px, 64 classes, 256 steps
    python scripts/actmax_throughput.py --steps 16 --loop-classes 8 --json out.json

Both runs use the same model, settings and allocator in the same process; a short warm-up runs
first, and CUDA is synchronised before each clock read. ``--loop-classes`` times the one-at-a-time
loop on the first K classes only (its seconds per class do not depend on N). Random weights are
fine: the work per step does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# glibc's default malloc returns large blocks to the kernel on every forward (shared/DESIGN.md);
# both runs get the tuned setting, as the CLI does.
from camshaft.cli import GLIBC_TUNING  # light: imports no torch


def _reexec_tuned() -> None:
    if sys.platform == "linux" and "GLIBC_TUNABLES" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": GLIBC_TUNING})


def _timed(fn, device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--classes", type=int, default=64)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--loop-classes", type=int, help="time the one-at-a-time loop on this many classes (default: all)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--exact", action=argparse.BooleanOptionalAction, default=None,
                   help="batch-size-invariant runs (default: camshaft's, on the CPU only)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    _reexec_tuned()

    import torch
    import torchvision

    from camshaft.engine.actmax import RenderConfig, class_logit, render
    from camshaft.engine.backends.base import resolve_device
    from camshaft.preprocess import Preprocess

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    pre = Preprocess(input_size=(args.size, args.size))
    objectives = [class_logit(c) for c in range(args.classes)]
    cfg = {"device": str(device), "dtype": args.dtype, "steps": args.steps, "batch_size": args.classes, "exact": args.exact}
    render(model, objectives[:2], preprocess=pre, config=RenderConfig(**{**cfg, "steps": 2}))  # warm-up

    batch = _timed(lambda: render(model, objectives, preprocess=pre, config=RenderConfig(**cfg)), device)
    k = args.loop_classes or args.classes
    loop = _timed(lambda: [render(model, [o], preprocess=pre, config=RenderConfig(**{**cfg, "seed": c}))
                           for c, o in enumerate(objectives[:k])], device)
    result = {
        "model": args.model, "size": args.size, "classes": args.classes, "steps": args.steps, "loop_classes": k,
        "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
        "exact": device.type == "cpu" if args.exact is None else args.exact,
        "batch_seconds": batch, "batch_seconds_per_class": batch / args.classes,
        "loop_seconds": loop, "loop_seconds_per_class": loop / k,
        "speedup": (loop / k) / (batch / args.classes),
    }
    print(f"{args.model} {args.size} px, {args.steps} steps, {device} {args.dtype}, {result['threads']} threads, "
          f"exact kernels: {result['exact']}")
    print(f"  {args.classes} classes as one batch: {batch:8.1f} s  = {result['batch_seconds_per_class']:.2f} s per class")
    print(f"  one class at a time ({k} classes): {loop:8.1f} s  = {result['loop_seconds_per_class']:.2f} s per class")
    print(f"  speed-up of the batch: {result['speedup']:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
