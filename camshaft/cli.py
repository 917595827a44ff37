"""The ``camshaft`` command: demo, explain, export, inspect."""

from __future__ import annotations

import argparse
import os
import warnings
import sys
from pathlib import Path

# glibc returns large freed blocks to the kernel and faults them back on every forward; raising
# its thresholds made CPU forwards ~30% faster here (shared/DESIGN.md). It must be set before the
# process starts, so the CLI re-executes itself once with it.
GLIBC_TUNING = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"


def _tune_allocator(argv: list[str]) -> None:
    if sys.platform != "linux" or "GLIBC_TUNABLES" in os.environ or os.environ.get("CAMSHAFT_NO_REEXEC"):
        return
    env = {**os.environ, "GLIBC_TUNABLES": GLIBC_TUNING}
    try:
        os.execve(sys.executable, [sys.executable, "-m", "camshaft", *argv], env)
    except OSError:
        return  # keep going untuned rather than fail


def _size(text: str) -> tuple[int, int]:
    parts = [p for p in text.split(",") if p]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values, default=0) < 1:
        raise argparse.ArgumentTypeError(f"expected H or H,W (positive integers), received {text!r}")
    return (values[0], values[-1])


def _triple(text: str) -> tuple[float, float, float]:
    try:
        values = [float(p) for p in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(f"expected one number or R,G,B, received {text!r}")
    return tuple(values * 3) if len(values) == 1 else tuple(values)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {text!r}")
    return value


def _add_model(p: argparse.ArgumentParser, *, optional: bool = False) -> None:
    help_ = "torchvision architecture (resnet50), pkg.module:factory, a TorchScript .pt or an ONNX .onnx file"
    if optional:
        p.add_argument("model", nargs="?", default=None, help=help_ + " (default: the built-in demo model)")
    else:
        p.add_argument("model", help=help_ + "; 'demo' for the built-in model")
    p.add_argument("--weights", type=Path, help="local state_dict for an architecture or factory (loaded with weights_only=True)")


def _add_preprocess(p: argparse.ArgumentParser) -> None:
    from camshaft.preprocess import RESIZE_MODES

    g = p.add_argument_group("preprocessing (default: from the model or artifact)")
    g.add_argument("--input-size", type=_size, metavar="H[,W]", help="model input size")
    g.add_argument("--mean", type=_triple, metavar="R,G,B", help="normalisation mean on [0,1] pixels")
    g.add_argument("--std", type=_triple, metavar="R,G,B", help="normalisation std on [0,1] pixels")
    g.add_argument("--resize", choices=RESIZE_MODES, help="how images are fitted to the input size")


def build_parser() -> argparse.ArgumentParser:
    from camshaft import __version__
    from camshaft.engine.backends import backend_names
    from camshaft.engine.backends.base import DTYPES
    from camshaft.engine.methods import method_names
    from camshaft.exporters import FORMATS

    parser = argparse.ArgumentParser(prog="camshaft", description="Batch explanations (CAM, Grad-CAM) for image classifiers.")
    parser.add_argument("--version", action="version", version=f"camshaft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="explain generated images with the built-in model, no download")
    demo.add_argument("--out", type=Path, default=Path("camshaft-demo"), help="output folder (default: camshaft-demo)")
    demo.add_argument("--images", type=_positive, default=24, help="how many images to generate (default: 24)")
    demo.add_argument("--method", choices=method_names(), default="gradcam")
    demo.add_argument("--seed", type=int, default=0)

    ex = sub.add_parser("explain", help="explain every image of a folder or manifest")
    _add_model(ex)
    ex.add_argument("data", type=Path, help="image folder (recursive), a CSV manifest (path[,label][,x0,y0,x1,y1]) or one image")
    ex.add_argument("--out", type=Path, required=True, help="output folder")
    ex.add_argument("--method", choices=method_names(), default="gradcam")
    ex.add_argument("--targets", default="top:1", help="top:K, label, or classes as 3,17,tabby (default: top:1)")
    ex.add_argument("--tap", help="layer to explain (default: the CAM tap or the last feature map)")
    ex.add_argument("--backend", choices=backend_names(), default="eager")
    ex.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    ex.add_argument("--dtype", choices=list(DTYPES), default="float32", help="autocast dtype (mixed precision)")
    ex.add_argument("--batch-size", type=_positive, default=32)
    ex.add_argument("--workers", type=_positive, default=4, help="decode threads")
    ex.add_argument("--overlays", action="store_true", help="write one PNG overlay per image and target")
    ex.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_preprocess(ex)

    exp = sub.add_parser("export", help="export a tapped model to TorchScript or ONNX (parity-checked)")
    _add_model(exp)
    exp.add_argument("--format", choices=FORMATS, required=True)
    exp.add_argument("--tap", action="append", help="layer to expose (repeatable; default: the last feature map)")
    exp.add_argument("--out", type=Path, required=True, help="artifact path")
    exp.add_argument("--rtol", type=float, default=1e-3, help="parity tolerance relative to each output's scale")
    exp.add_argument(
        "--head",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ONNX: embed the differentiable head so gradient methods run from the file "
        "(default: only when the head is small next to the model)",
    )
    _add_preprocess(exp)

    ins = sub.add_parser("inspect", help="list layers with shapes, the default tap and the CAM head")
    _add_model(ins, optional=True)
    ins.add_argument("--input-size", type=_size, metavar="H[,W]", help="input size for the shapes")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The console entry point; re-executes with a tuned allocator only when run as a program."""
    if argv is None:
        argv = sys.argv[1:]
        _tune_allocator(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    from camshaft.errors import CamshaftError

    original = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *_: f"camshaft: warning: {message}\n"
    try:
        return COMMANDS[args.command](args)
    except CamshaftError as e:
        print(f"camshaft {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = original


def _preprocess(args) -> dict:
    return {"input_size": args.input_size, "mean": args.mean, "std": args.std, "resize": args.resize}


def _explain(args) -> int:
    from camshaft.api import explain

    summary = explain(
        args.model,
        args.data,
        out=args.out,
        method=args.method,
        targets=args.targets,
        tap=args.tap,
        weights=args.weights,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        overlays=args.overlays,
        workers=args.workers,
        **_preprocess(args),
        progress=not args.no_progress,
    )
    _print_summary(summary)
    return 0


def _print_summary(s) -> None:
    print(
        f"{s.method} on {s.backend}, tap {s.tap}: {s.ok} images explained, {s.failed} failed, "
        f"{s.seconds:.1f} s ({s.images_per_second:.1f} images/s)"
    )
    for path, reason in s.errors[:10]:
        print(f"  failed: {path}: {reason}")
    if len(s.errors) > 10:
        print(f"  ... and {len(s.errors) - 10} more (see the table)")
    print(f"maps:     {s.maps_path}")
    print(f"table:    {s.table_path}")
    if s.overlays_dir.exists():
        print(f"overlays: {s.overlays_dir}")


def _demo(args) -> int:
    from camshaft.api import explain
    from camshaft.demo.shapes import write_demo_dataset

    manifest = write_demo_dataset(args.out / "data", n=args.images, seed=args.seed)
    print(f"generated {args.images} images of shapes on clutter: {manifest.parent}")
    summary = explain(None, manifest, out=args.out / "results", method=args.method, overlays=True)
    _print_summary(summary)
    print("open the overlays: the heatmaps should sit on the shapes")
    return 0


def _export(args) -> int:
    from camshaft.api import export

    path = export(
        args.model,
        format=args.format,
        out=args.out,
        taps=args.tap,
        weights=args.weights,
        rtol=args.rtol,
        **_preprocess(args),
        head=args.head,
    )
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def _inspect(args) -> int:
    from camshaft.api import inspect
    from camshaft.models.sources import resolve_model

    source = resolve_model(args.model, weights=args.weights)
    if source.kind != "torch":
        return _inspect_artifact(source)
    report = inspect(source, input_size=args.input_size)
    tap = report.default_tap
    tap_node = [x.name for x in report.layers if x.name == tap or x.name.startswith(f"{tap}.")][-1:]
    linear = report.cam_head.linear if report.cam_head else None
    width = max(len(x.name) for x in report.layers)
    for layer in report.layers:
        shape = "x".join(map(str, layer.shape[1:])) if layer.shape else "-"
        mark = f"<- default tap ({tap})" if [layer.name] == tap_node else ("<- CAM head" if layer.name == linear else "")
        print(f"{layer.name:<{width}}  {layer.kind:<22} {shape:<14} {mark}".rstrip())
    print(f"\nclasses: {report.num_classes}")
    print(f"default tap: {report.default_tap}")
    if report.cam_head:
        print(f"CAM head: global average pool of {report.cam_head.tap} -> {report.cam_head.linear} {tuple(report.cam_head.weight.shape)}")
    else:
        print("CAM head: none (the tap is not followed by global average pooling and one linear layer); use gradcam")
    return 0


def _inspect_artifact(source) -> int:
    from camshaft.exporters import onnx as onnx_export
    from camshaft.exporters import torchscript as ts_export

    if source.kind == "onnx":
        import onnx

        model = onnx.load(str(source.path), load_external_data=False)
        meta, cam, head = onnx_export.read_metadata({p.key: p.value for p in model.metadata_props})
    else:
        _, meta, cam = ts_export.load(source.path)
    if meta is None:
        print(f"{source.path}: {source.kind} file without camshaft metadata")
        if source.kind == "onnx":
            _inspect_foreign_onnx(source.path)
        return 0
    print(f"{source.path}: camshaft {meta.format} artifact of {meta.source} (camshaft {meta.camshaft_version})")
    print(f"preprocess: {meta.preprocess.to_dict()}")
    for tap in meta.taps:
        print(f"tap {tap}: {'x'.join(map(str, meta.tap_shapes[tap]))}")
    print(f"classes: {meta.num_classes}" + (f" ({', '.join(meta.class_names[:5])}, ...)" if meta.class_names else ""))
    print(f"CAM head: {meta.cam_linear + ' on ' + meta.cam_tap if meta.cam_tap else 'none'}")
    print(f"gradients (split head): {'yes' if meta.has_head else 'no'}")
    print("parity (max abs error): " + ", ".join(f"{k} {v:.2e}" for k, v in meta.parity.items()))
    return 0


def _inspect_foreign_onnx(path) -> None:
    from camshaft.models.onnx_graph import open_foreign, spatial_tensors

    import onnx

    for name, shape in spatial_tensors(onnx.load(str(path))).items():
        print(f"{name}  {'x'.join(map(str, shape[1:]))}")
    try:
        graph = open_foreign(path, None)
        print(f"default tap / CAM head: global average pool of {graph.cam_tap} -> linear {tuple(graph.cam_weight.shape)}")
    except Exception as e:  # noqa: BLE001 - informative only
        print(f"CAM head: none ({e})")
    print("taps are tensor names (--tap NAME); set --mean/--std/--resize to the model's preprocessing")


COMMANDS = {"demo": _demo, "explain": _explain, "export": _export, "inspect": _inspect}

if __name__ == "__main__":
    sys.exit(main())
