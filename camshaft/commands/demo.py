"""``camshaft demo``: explain generated images with the built-in model, no download."""

from __future__ import annotations

import argparse
from pathlib import Path

from camshaft.commands.common import positive, print_summary

HELP = "explain generated images with the built-in model, no download"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from camshaft.engine.methods import method_names

    p.add_argument("--out", type=Path, default=Path("camshaft-demo"), help="output folder (default: camshaft-demo)")
    p.add_argument("--images", type=positive, default=24, help="how many images to generate (default: 24)")
    p.add_argument("--method", choices=method_names(), default="gradcam", help="(default: gradcam)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated images (default: 0)")


def run(args) -> int:
    from camshaft.api import explain
    from camshaft.demo.shapes import write_demo_dataset

    manifest = write_demo_dataset(args.out / "data", n=args.images, seed=args.seed)
    print(f"generated {args.images} images of shapes on clutter: {manifest.parent}")
    summary = explain(None, manifest, out=args.out / "results", method=args.method, overlays=True)
    print_summary(summary)
    print("open the overlays: the heatmaps should sit on the shapes")
    return 0
