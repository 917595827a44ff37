"""Argument types and flag groups shared by the commands."""

from __future__ import annotations

import argparse
from pathlib import Path


def size(text: str) -> tuple[int, int]:
    parts = [p for p in text.split(",") if p]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values, default=0) < 1:
        raise argparse.ArgumentTypeError(f"expected H or H,W (positive integers), received {text!r}")
    return (values[0], values[-1])


def triple(text: str) -> tuple[float, float, float]:
    try:
        values = [float(p) for p in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(f"expected one number or R,G,B, received {text!r}")
    return tuple(values * 3) if len(values) == 1 else tuple(values)


def fraction(text: str) -> float:
    """A number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], e.g. 0.875, received {text!r}")
    return value


def count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, received {text!r}")
    return value


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {text!r}")
    return value


def add_model(
    p: argparse.ArgumentParser, *, optional: bool = False, files: bool = True, class_names: bool = True
) -> None:
    """The model argument, ``--weights`` and ``--class-names``; ``files``: exported files are accepted."""
    help_ = "torchvision architecture (resnet50), pkg.module:factory"
    help_ += (
        ", or a file written by camshaft export (TorchScript .pt, .pt2, ONNX .onnx)"
        if files
        else " (a live torch model: exported files cannot be optimised through)"
    )
    if optional:
        p.add_argument("model", nargs="?", default=None, help=help_ + " (default: the built-in demo model)")
    else:
        p.add_argument("model", help=help_ + "; 'demo' for the built-in model")
    p.add_argument("--weights", type=Path, help="local state_dict for an architecture or factory (loaded with weights_only=True)")
    if class_names:
        p.add_argument(
            "--class-names",
            type=Path,
            metavar="FILE",
            help="the model's class names, replacing its own: one per line (class 0 first), "
            "or a .json list or index -> name object",
        )


def add_preprocess(p: argparse.ArgumentParser) -> None:
    from camshaft.preprocess import RESIZE_MODES

    g = p.add_argument_group("preprocessing (default: from the model or artifact)")
    g.add_argument("--input-size", type=size, metavar="H[,W]", help="model input size")
    g.add_argument("--mean", type=triple, metavar="R,G,B", help="normalisation mean on [0,1] pixels")
    g.add_argument("--std", type=triple, metavar="R,G,B", help="normalisation std on [0,1] pixels")
    g.add_argument("--resize", choices=RESIZE_MODES, help="how images are fitted to the input size")
    g.add_argument(
        "--crop-fraction",
        type=fraction,
        metavar="F",
        help="center-crop: keep this centred fraction of the largest region (torchvision's eval: 0.875 = 224/256; "
        "default 1)",
    )


def preprocess(args) -> dict:
    """The preprocessing flags, keyed as the jobs and the API take them."""
    return {"input_size": args.input_size, "mean": args.mean, "std": args.std, "resize": args.resize,
            "crop_fraction": args.crop_fraction}


def print_summary(s) -> None:
    where = f", tap {s.tap}" if s.tap else ""
    print(
        f"{s.method} on {s.backend}{where}: {images(s.images)}, {s.ok} ok, {s.failed} failed; "
        f"{s.explained} explained in {s.seconds:.1f} s ({s.images_per_second:.1f} images/s)"
        + (f", the rest {'resumed' if s.mode == 'resume' else 'reused'} from earlier work" if s.explained < s.images else "")
    )
    if s.explained and any(s.stages.values()):  # where the time went, summed over the partitions
        print(
            f"time in stages (decoding in {s.decoding}): "
            + ", ".join(
                f"{k.replace('_', ' ')} {v:.2f} s" for k, v in s.stages.items() if v or k != "decoding_on_device"
            )
        )
    for path, reason in s.errors[:10]:  # a name with a newline (or another control character) quoted: one line
        print(f"  failed: {path if path.isprintable() else repr(path)}: {reason}")
    if len(s.errors) > 10:
        print(f"  ... and {len(s.errors) - 10} more (see the table)")
    if len(s.result_dirs) > 1:  # several methods: one run directory each
        names = [s.maps_path.name, s.table_path.name]
        for folder in s.result_dirs:
            overlays = [s.overlays_dir.name] if (folder / s.overlays_dir.name).exists() else []
            print(f"{folder.name}: {folder} ({', '.join(names + overlays)})")
        return
    print(f"maps:     {s.maps_path}")
    print(f"table:    {s.table_path}")
    if s.overlays_dir.exists():
        print(f"overlays: {s.overlays_dir}")


def images(n: int) -> str:
    """'1 image', '24 images'."""
    return f"{n} image" if n == 1 else f"{n} images"
