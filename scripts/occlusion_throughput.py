"""Occlusion throughput against its limit, measured in the same run.

For each model (random weights): the plain batched forward (images/s through the eager backend,
batches of ``--positions-per-forward`` images: the limit), plain occlusion and incremental occlusion
(evaluations/s: occluded variants + the unoccluded forward, per second) and captum's ``Occlusion``
at each ``--captum-ppe`` (its ``perturbations_per_eval``). Workloads are timed round-robin, best of
``--repeats`` rounds after one warm-up, so a shared machine's drifting load hits them alike.

    python scripts/occlusion_throughput.py [--models resnet18,vgg16_bn] [--repeats 2] [--json out.json]

The process re-executes itself once with camshaft's glibc malloc setting (shared/DESIGN.md), so
every workload runs under the same allocator.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
import torchvision

from camshaft.cli import GLIBC_TUNING
from camshaft.engine.backends import backend_factory
from camshaft.engine.methods import get_method
from camshaft.engine.occlusion import Grid
from camshaft.models.sources import ModelSource
from camshaft.preprocess import Preprocess


def _tuned_allocator() -> None:
    if sys.platform == "linux" and os.environ.get("GLIBC_TUNABLES") != GLIBC_TUNING:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": GLIBC_TUNING})


def _backend(name: str, size: int):
    """The eager backend of a random-weight model, and a copy of the model as a user has it (the
    backend lays its weights out channels-last; captum gets the model in its default layout)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    peer = copy.deepcopy(model)
    pre = Preprocess(input_size=(size, size), resize="stretch")
    source = ModelSource("torch", name, module=model, preprocess=pre)
    cpu = torch.device("cpu")
    backend = backend_factory("eager")(source, taps=None, preprocess={}, device=cpu, dtype=torch.float32, workdir=None)
    return backend, peer


def _captum(model, x, targets, *, window, stride, ppe):
    from captum.attr import Occlusion

    with torch.no_grad():
        return Occlusion(model).attribute(
            x, sliding_window_shapes=(3, *window), strides=(3, *stride), baselines=0.0,
            target=targets[:, 0].tolist(), perturbations_per_eval=ppe,
        )


def _rounds(workloads: dict, *, repeats: int, warmup: int) -> tuple[dict, dict]:
    """Wall and process-CPU seconds per call of each workload: ``warmup`` untimed rounds, then ``repeats``.

    Each round calls every workload once, starting one workload later than the round before, so
    that no workload always follows the same neighbour.

    CPU seconds (all threads of this process) are less disturbed by other tenants than wall time.
    """
    wall: dict[str, list[float]] = {k: [] for k in workloads}
    cpu: dict[str, list[float]] = {k: [] for k in workloads}
    names = list(workloads)
    for r in range(warmup + repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # each round starts one later
            start, start_cpu = time.perf_counter(), time.process_time()
            workloads[name]()
            if r >= warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def measure(name: str, args) -> dict:
    backend, peer = _backend(name, args.size)
    grid = Grid(size=(args.size, args.size), window=(args.window,) * 2, stride=(args.stride,) * 2)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.images, 3, args.size, args.size, generator=gen)
    batch = torch.randn(args.positions_per_forward, 3, args.size, args.size, generator=gen)
    method = get_method("occlusion")
    select = lambda logits: logits.topk(1).indices  # noqa: E731
    opts = dict(window=grid.window, stride=grid.stride, positions_per_forward=args.positions_per_forward)
    maps = {}

    def occlusion(mode):
        def run():
            maps[mode] = method.run(backend, x, select, tap=None, options={**opts, "occlusion_mode": mode})[0]

        return run

    workloads = {"forward": lambda: backend.forward(batch), "plain": occlusion("plain"), "incremental": occlusion("incremental")}
    targets = backend.forward(x).logits.topk(1).indices
    for ppe in args.captum_ppe:
        workloads[f"captum_ppe{ppe}"] = lambda ppe=ppe: _captum(peer, x, targets, window=grid.window, stride=grid.stride, ppe=ppe)
    seconds, cpu_seconds = _rounds(workloads, repeats=args.repeats, warmup=args.warmup)
    evaluations = args.images * (grid.count + 1)
    rate = {k: (len(batch) if k == "forward" else evaluations) / min(v) for k, v in seconds.items()}
    cpu_rate = {k: (len(batch) if k == "forward" else evaluations) / min(v) for k, v in cpu_seconds.items()}
    return {
        "model": name,
        "positions": grid.count,
        "images": args.images,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "per_second": rate,
        "per_cpu_second": cpu_rate,
        "ratio_to_forward": {k: v / rate["forward"] for k, v in rate.items() if k != "forward"},
        "cpu_ratio_to_forward": {k: v / cpu_rate["forward"] for k, v in cpu_rate.items() if k != "forward"},
        "incremental_max_abs_diff": float((maps["incremental"] - maps["plain"]).abs().max()),
        "plain_max_abs": float(maps["plain"].abs().max()),
    }


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=_list, default=["resnet18", "vgg16_bn"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--images", type=int, default=1, help="images per occlusion run")
    p.add_argument("--positions-per-forward", type=int, default=64)
    p.add_argument("--captum-ppe", type=lambda s: [int(v) for v in _list(s)], default=[16, 64])
    p.add_argument("--repeats", type=int, default=2, help="timed rounds (the best is kept)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for name in args.models:
        r = measure(name, args)
        results.append(r)
        print(f"\n{name} @ {args.size}px, window {args.window}, stride {args.stride}: {r['positions']} positions")
        print(f"  forward limit: {r['per_second']['forward']:.2f} images/s "
              f"({r['per_cpu_second']['forward']:.2f} per CPU-second)")
        for k, v in r["per_second"].items():
            if k != "forward":
                print(f"  {k:>16}: {v:7.2f} evaluations/s   x{r['ratio_to_forward'][k]:.2f} of the forward limit"
                      f"   (CPU time: x{r['cpu_ratio_to_forward'][k]:.2f})")
        print(f"  raw wall seconds per call (rounds): { {k: [round(s, 2) for s in v] for k, v in r['seconds'].items()} }")
        print(f"  raw CPU seconds per call (rounds): { {k: [round(s, 2) for s in v] for k, v in r['cpu_seconds'].items()} }")
        print(f"  incremental vs plain: max |diff| {r['incremental_max_abs_diff']:.2e} (max |map| {r['plain_max_abs']:.2e})")
    env = {"threads": args.threads, "glibc_tunables": os.environ.get("GLIBC_TUNABLES"), "torch": torch.__version__}
    env["load_average"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"\n{env}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": results}, f, indent=2)


if __name__ == "__main__":
    _tuned_allocator()
    main()
