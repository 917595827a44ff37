"""``camshaft explain``: explain every image of a folder or manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

from camshaft.commands.common import add_model, add_preprocess, positive, preprocess, print_summary

HELP = "explain every image of a folder or manifest"
RESUMABLE = True  # Ctrl-C keeps the finished partitions; the same command resumes


def add_arguments(p: argparse.ArgumentParser) -> None:
    from camshaft.data.workers import DECODERS
    from camshaft.engine.backends.base import DTYPES, backend_choices
    from camshaft.engine.methods import method_names

    add_model(p)
    p.add_argument(
        "data",
        type=Path,
        help="image folder (recursive), a CSV or Parquet manifest (path[,label][,x0,y0,x1,y1]) or one image",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--method",
        type=_methods,
        default=("gradcam",),
        help=f"one or several (comma-separated: they share forwards), from {', '.join(method_names())} (default: gradcam)",
    )
    p.add_argument("--targets", default="top:1", help="top:K, label, or classes as 3,17,tabby (default: top:1)")
    p.add_argument("--tap", help="layer to explain (default: the CAM tap or the last feature map)")
    p.add_argument(
        "--backend",
        choices=backend_choices(),
        default="auto",
        help="runtime (default: auto: eager for a torch model; a file from camshaft export runs on the "
        "backend of its format: torchscript (.pt), pt2 (.pt2) or onnxruntime (.onnx)); inductor: a torch "
        "model or .pt2 file compiled by torch.compile, faster for some models, slower for others "
        "(camshaft bench tells)",
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="autocast dtype (mixed precision)")
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay the forward from CUDA graphs: one launch instead of hundreds (GPU; eager, torchscript, pt2)",
    )
    p.add_argument(
        "--batch-size", type=positive, default=32, help="images per batch (default 32; halved on out-of-memory)"
    )
    p.add_argument(
        "--workers",
        type=positive,
        help="decode workers, shared by the partitions "
        "(default: usable cores - 1, at least 2; --decode device: at most 4)",
    )
    p.add_argument(
        "--decode",
        choices=list(DECODERS),
        default="auto",
        help="decode in worker processes (the GPU's default: its driving thread keeps the GIL) or threads (CPU's); "
        "device: plain JPEGs decoded and resized on the device (nvJPEG on a GPU), other files in threads",
    )
    p.add_argument("--overlays", action="store_true", help="write one PNG overlay per image and target")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("dataset-scale runs")
    g.add_argument("--partition-size", type=positive, default=256, help="images per Dask task and shard (default 256)")
    g.add_argument(
        "--scheduler",
        default="threads",
        help="threads (default: decoding overlaps compute), sync (debugging), or a dask.distributed address",
    )
    resume = g.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="overwrite", action="store_false", help="skip finished work in --out (default)")
    resume.add_argument("--overwrite", dest="overwrite", action="store_true", help="start over in --out")
    p.set_defaults(overwrite=False)
    a = p.add_argument_group("audit extras, gathered in the same pass (see camshaft report)")
    a.add_argument("--metrics", type=_names, default=(), help="faithfulness curves: deletion,insertion")
    a.add_argument("--metric-steps", type=positive, default=50, help="steps of the deletion/insertion curves (default 50)")
    a.add_argument("--exemplars", action="append", default=[], metavar="TAP[:C,...]", help="gather the dataset's top images per channel of TAP (repeatable)")
    a.add_argument("--exemplar-k", type=positive, default=8, help="top images kept per channel (default 8)")
    g.add_argument("--labels-from-folders", action="store_true", help="DATA is an ImageFolder tree: label = class folder")
    add_preprocess(p)
    add_method_options(p)


def add_method_options(p: argparse.ArgumentParser) -> None:
    """One flag per method option, from the registry (default None: the method's own default)."""
    from camshaft.engine.methods import all_options

    options = all_options()
    if not options:
        return
    g = p.add_argument_group("method options")
    for name, (option, methods) in sorted(options.items()):
        g.add_argument(
            f"--{name.replace('_', '-')}",
            dest=f"option_{name}",
            metavar=name.upper(),
            type=_cli_type(option.parse),
            default=None,
            help=f"{option.help} (default: {option.default}; {', '.join(methods)})",
        )


def _cli_type(parse):
    """argparse shows only ArgumentTypeError messages: pass the parser's own message through."""

    def convert(text: str):
        try:
            return parse(text)
        except (ValueError, TypeError) as e:
            raise argparse.ArgumentTypeError(str(e)) from e

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _names(text: str) -> tuple[str, ...]:
    from camshaft.engine.job import split_names

    return split_names(text)


def _methods(text: str) -> tuple[str, ...]:
    from camshaft.engine.methods import method_names

    names = _names(text)
    unknown = [m for m in names if m not in method_names()]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method {', '.join(unknown) or repr(text)} (choose from {', '.join(method_names())})")
    return names


def method_options(args, methods: tuple[str, ...]) -> dict:
    """The method options given on the command line; one meant for another method is an error."""
    from camshaft.engine.methods import all_options
    from camshaft.errors import ConfigError

    given = {k.removeprefix("option_"): v for k, v in vars(args).items() if k.startswith("option_") and v is not None}
    options = all_options()
    wrong = [f"--{k.replace('_', '-')} (for {', '.join(options[k][1])})" for k in given if not set(methods) & set(options[k][1])]
    if wrong:
        raise ConfigError(f"method {', '.join(methods)} does not take {', '.join(wrong)}")
    return given


def run(args) -> int:
    from camshaft.api import explain

    summary = explain(
        args.model,
        args.data,
        out=args.out,
        method=args.method[0] if len(args.method) == 1 else args.method,
        targets=args.targets,
        tap=args.tap,
        weights=args.weights,
        class_names=args.class_names,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        cuda_graphs=args.cuda_graphs,
        batch_size=args.batch_size,
        overlays=args.overlays,
        workers=args.workers,
        decode=args.decode,
        progress=not args.no_progress,
        options=method_options(args, args.method),
        partition_size=args.partition_size,
        scheduler=args.scheduler,
        overwrite=args.overwrite,
        labels_from_folders=args.labels_from_folders,
        metrics=args.metrics,
        metric_steps=args.metric_steps,
        exemplars=tuple(args.exemplars),
        exemplar_k=args.exemplar_k,
        **preprocess(args),
    )
    print_summary(summary)
    return 0
