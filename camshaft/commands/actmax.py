"""``camshaft actmax``: images that maximise classes, channels, neurons or layers, many at once."""

from __future__ import annotations

import argparse
from pathlib import Path

from camshaft.commands.common import add_model, add_preprocess, count, images, positive, preprocess

HELP = "activation maximization: images that excite classes, channels or neurons (one batch for all)"


def _amount(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, received {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    from camshaft.engine.actmax import RenderConfig, param_names, syntax_help
    from camshaft.engine.backends.base import DTYPES

    d = RenderConfig()
    add_model(p, files=False)
    p.add_argument("--objective", action="append", required=True, metavar="SPEC",
                   help=f"what to maximise, repeatable: {syntax_help()}. Examples: class:0-9, "
                        "channel:layer3:0-63, neuron:layer4:12:3:3, layer:layer3; write a negated spec with '=': "
                        "--objective=-channel:layer4:7")
    p.add_argument("--out", type=Path, required=True, help="output folder: PNGs, grid.png, results.parquet")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=positive, default=d.steps, help=f"optimiser steps (default {d.steps})")
    g.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr})")
    g.add_argument("--param", choices=param_names(), default=d.param, help=f"image parameterization (default {d.param})")
    g.add_argument("--seed", type=int, default=d.seed, help="image i starts from seed + i (default 0)")
    g.add_argument("--init", type=Path,
                   help="start from this image, or a folder with one image per output image (objectives x copies); "
                        "an earlier actmax --out folder gives the images its table lists")
    g.add_argument("--copies", type=positive, default=d.copies, help="images per objective (default 1)")
    g.add_argument("--batch-size", type=positive, default=d.batch_size, help=f"images at once (default {d.batch_size})")
    g.add_argument("--relu-leak", type=_amount, default=d.relu_leak,
                   help=f"dead ReLU channels get this share of the gradient that wakes them (default {d.relu_leak}; "
                        "0: exact ReLU gradients)")
    g.add_argument("--relu-leak-steps", type=count, default=d.relu_leak_steps,
                   help=f"the leak acts in the first this many steps, then gradients are exact (default "
                        f"{d.relu_leak_steps}; Lucid: 16)")
    g = p.add_argument_group("robustness transforms and regularizers")
    g.add_argument("--pad", type=count, default=d.pad, help=f"mirrored frame, pixels (default {d.pad})")
    g.add_argument("--jitter", type=count, default=d.jitter, help=f"random shift, pixels (default {d.jitter})")
    g.add_argument("--scale", type=_amount, default=d.scale, help=f"random zoom 1 +- SCALE (default {d.scale})")
    g.add_argument("--rotate", type=_amount, default=d.rotate, help=f"random rotation +- degrees (default {d.rotate})")
    g.add_argument("--l2", type=_amount, default=d.l2, help=f"L2 decay weight (default {d.l2})")
    g.add_argument("--tv", type=_amount, default=d.tv, help=f"total variation weight (default {d.tv})")
    g.add_argument("--freq", type=_amount, default=d.freq, help=f"high-frequency penalty weight (default {d.freq})")
    g.add_argument("--blur-every", type=count, default=d.blur_every, help="blur every N steps (default 0: never)")
    g.add_argument("--blur-sigma", type=_amount, default=d.blur_sigma, help=f"blur radius, pixels (default {d.blur_sigma})")
    g.add_argument("--diversity", type=_amount, default=d.diversity, help="diversity weight among copies (needs --copies >= 2)")
    g.add_argument("--diversity-tap", help="tap whose Gram matrices diversity compares (default: the objective's)")
    p.add_argument("--exact", action=argparse.BooleanOptionalAction, default=None,
                   help="results never depend on --batch-size (default: on the CPU only, where the model runs on "
                        "fixed groups of 8 images; on CUDA it turns cuDNN off: much slower)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=list(DTYPES), default=d.dtype, help="autocast dtype of the forward (mixed precision)")
    p.add_argument("--columns", type=positive, help="grid columns")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_preprocess(p)


def config(args):
    """The flags as a ``RenderConfig`` (validated there)."""
    from camshaft.engine.actmax import RenderConfig

    fields = ("steps", "lr", "param", "seed", "copies", "batch_size", "relu_leak", "relu_leak_steps", "pad", "jitter",
              "scale", "rotate", "l2", "tv", "freq", "blur_every", "blur_sigma", "diversity", "diversity_tap", "exact",
              "device", "dtype")
    return RenderConfig(**{f: getattr(args, f) for f in fields})


def run(args) -> int:
    from camshaft.engine.actmax import ActmaxJob, run_actmax

    cfg = config(args)
    job = ActmaxJob(model=args.model, objectives=tuple(args.objective), out=args.out, config=cfg,
                    weights=args.weights, class_names=args.class_names, init=args.init, columns=args.columns,
                    **preprocess(args))
    summary = run_actmax(job, progress=not args.no_progress)
    rows = summary.rows
    seconds = summary.seconds
    print(f"actmax: {images(len(rows))} in {seconds:.1f} s ({seconds / len(rows):.2f} s per image)")
    probs = [r["target_prob"] for r in rows if r["target_prob"] is not None]
    if probs:
        reached = sum(p >= 0.9 for p in probs)
        print(f"class objectives: {reached} of {len(probs)} reach p >= 0.9 (lowest {min(probs):.3f})")
    print(f"images:  {summary.out}")
    print(f"grid:    {summary.out / 'grid.png'}")
    print(f"table:   {summary.out / 'results.parquet'}")
    return 0
