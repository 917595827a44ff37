"""``camshaft export``: a tapped model as a parity-checked TorchScript, .pt2 or ONNX artifact."""

from __future__ import annotations

import argparse
from pathlib import Path

from camshaft.commands.common import add_model, add_preprocess, preprocess

HELP = "export a tapped model to TorchScript, .pt2 or ONNX (parity-checked)"


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, received {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    from camshaft.exporters import FORMATS

    add_model(p)
    p.add_argument("--format", choices=FORMATS, required=True, help="artifact format")
    p.add_argument(
        "--tap", action="append", help="layer to expose (repeatable; default: the CAM tap or the last feature map)"
    )
    p.add_argument("--out", type=Path, required=True, help="artifact path")
    p.add_argument(
        "--rtol", type=_tolerance, default=1e-3, help="parity tolerance relative to each output's scale (default: 1e-3)"
    )
    p.add_argument(
        "--head",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ONNX: embed the differentiable head so gradient methods run from the file "
        "(default: only when the head is small next to the model)",
    )
    add_preprocess(p)


def run(args) -> int:
    from camshaft.api import export

    path = export(
        args.model,
        format=args.format,
        out=args.out,
        taps=args.tap,
        weights=args.weights,
        class_names=args.class_names,
        rtol=args.rtol,
        head=args.head,
        **preprocess(args),
    )
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
