"""``camshaft featmaps``: chosen channels of a tap for one image, as a grid and overlays."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from camshaft.commands.common import add_model, add_preprocess, positive, preprocess
from camshaft.errors import ConfigError
from camshaft.writers.atomic import atomic_path, out_folder_problem

HELP = "render channels of a layer for one image (grid and overlays)"


def _channels(text: str) -> list[int]:
    try:
        channels = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        channels = []
    if not channels:
        raise argparse.ArgumentTypeError(f"expected channel indices such as 0,20,40, received {text!r}")
    return channels


def add_arguments(p: argparse.ArgumentParser) -> None:
    from camshaft.engine.backends.base import backend_choices

    add_model(p, class_names=False)
    p.add_argument("image", type=Path, help="the image")
    p.add_argument("--tap", help="layer (default: the last feature map)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--channels", type=_channels, help="channel indices, e.g. 0,20,40")
    which.add_argument("--top", type=positive, help="the N channels with the highest mean activation (default 16)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--backend",
        choices=backend_choices(),
        default="auto",
        help="runtime (default: auto: eager for a torch model, a file from camshaft export on its format's)",
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    add_preprocess(p)


def _check_out(out: Path) -> None:
    """Refuse, before any work, an ``--out`` that is a file or where nothing can be written."""
    why = out_folder_problem(out)
    if why is not None:
        raise ConfigError(f"--out {str(out)!r}: {why}; choose a writable folder")


def run(args) -> int:
    from camshaft.engine.featmaps import feature_maps

    _check_out(args.out)
    fm = feature_maps(
        args.model,
        args.image,
        tap=args.tap,
        channels=args.channels,
        top=args.top,
        weights=args.weights,
        backend=args.backend,
        device=args.device,
        preprocess=preprocess(args),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    names = [f"overlay_channel_{channel:04d}.png" for channel in fm.channels]
    for name, image in zip([*names, "grid.png"], [*fm.overlays(), fm.grid()], strict=True):
        with atomic_path(args.out / name) as tmp:
            image.save(tmp, format="PNG")
    with atomic_path(args.out / "featmaps.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, fm.maps)
    for stale in args.out.glob("overlay_channel_*.png"):  # an earlier run's other channels
        if re.fullmatch(r"overlay_channel_\d{4,}\.png", stale.name) and stale.name not in names:
            stale.unlink()
    print(f"{fm.tap}: channels {fm.channels}")
    print(f"grid:     {args.out / 'grid.png'}\noverlays: {args.out}/overlay_channel_*.png\narrays:   {args.out / 'featmaps.npy'}")
    return 0
