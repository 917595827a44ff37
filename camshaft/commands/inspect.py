"""``camshaft inspect``: layers with shapes, the default tap and the CAM head; artifact metadata."""

from __future__ import annotations

import argparse

from camshaft.commands.common import add_model, size
from camshaft.errors import ConfigError

HELP = "list layers with shapes, the default tap and the CAM head"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model(p, optional=True, class_names=False)
    p.add_argument("--input-size", type=size, metavar="H[,W]", help="input size for the shapes")


def run(args) -> int:
    from camshaft.api import inspect
    from camshaft.models.sources import resolve_model
    from camshaft.preprocess import Preprocess

    source = resolve_model(args.model, weights=args.weights, preprocess={"input_size": args.input_size})
    if source.kind != "torch":
        return _inspect_artifact(source)
    report = inspect(source, input_size=args.input_size)
    tap = report.default_tap
    tap_node = [x.name for x in report.layers if x.name == tap or x.name.startswith(f"{tap}.")][-1:]
    linear = report.cam_head.linear if report.cam_head else None
    width = max(len("layer"), *(len(x.name) for x in report.layers))
    print(f"{'layer':<{width}}  {'type':<22} {'output shape':<14}".rstrip())
    h, w = args.input_size or (source.preprocess or Preprocess()).input_size
    for layer in report.layers:
        shape = "x".join(map(str, layer.shape[1:])) if layer.shape else "-"
        marks = [_layout(layer.shape[1:], (h, w))] if layer.shape else []
        marks = [m for m in marks if m]
        if [layer.name] == tap_node:
            marks.append(f"<- default tap ({tap})")
        elif layer.name == linear:
            marks.append("<- CAM head")
        print(f"{layer.name:<{width}}  {layer.kind:<22} {shape:<14} {' '.join(marks)}".rstrip())
    print(f"\nclasses: {report.num_classes}" + _names(source.class_names))
    if report.default_tap is None:
        print(f"default tap: none (no feature map larger than 1x1 at a {h}x{w} input; choose a larger --input-size)")
    else:
        print(f"default tap: {report.default_tap}")
    if report.default_tap is None:
        print("CAM head: none (no default tap)")
    elif report.cam_head:
        print(f"CAM head: global average pool of {report.cam_head.tap} -> {report.cam_head.linear} {tuple(report.cam_head.weight.shape)}")
    else:
        print("CAM head: none (the tap is not followed by global average pooling and one linear layer); use gradcam")
    return 0


def _layout(shape, size) -> str:
    """How a map of this per-image shape is read, where it is not plainly (C, h, w); without the input ``size``
    (an ONNX file's symbolic sizes) tokens only."""
    from camshaft.models.layout import channels_last, token_grid

    if size is not None and channels_last(shape, size):
        return "(channels last: h x w x C)"
    grid = token_grid(shape[0]) if len(shape) == 2 and isinstance(shape[0], int) else None
    if grid is not None:
        skip, side = grid
        return f"(tokens: {'1 + ' if skip else ''}{side}x{side})"
    return ""


def _names(names) -> str:
    """`` (tench, goldfish, ...)``: the first class names, where the model has them."""
    if not names:
        return ""
    return f" ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"


def _inspect_artifact(source) -> int:
    from camshaft.exporters import onnx as onnx_export
    from camshaft.exporters import torchscript as ts_export
    from camshaft.models.sources import kind_name

    if source.kind == "onnx":
        import onnx

        try:
            model = onnx.load(str(source.path), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - protobuf's decode errors have no common public type
            raise ConfigError(f"{source.path} is not an ONNX model ({type(e).__name__}: {e})") from e
        meta, cam, head = onnx_export.read_metadata({p.key: p.value for p in model.metadata_props})
    elif source.kind == "pt2":
        from camshaft.exporters import pt2 as pt2_export

        _, _, meta, cam = pt2_export.load(source.path)
    else:
        _, meta, cam = ts_export.load(source.path)
    if meta is None:
        print(f"{source.path}: {kind_name(source.kind)} without camshaft metadata")
        if source.kind == "onnx":
            _inspect_foreign_onnx(source.path)
        return 0
    print(f"{source.path}: camshaft {meta.format} artifact of {meta.source} (camshaft {meta.camshaft_version})")
    print(f"preprocess: {meta.preprocess.to_dict()}")
    for tap in meta.taps:
        print(f"tap {tap}: {'x'.join(map(str, meta.tap_shapes[tap]))}")
    print(f"classes: {meta.num_classes}" + _names(meta.class_names))
    print(f"CAM head: {meta.cam_linear + ' on ' + meta.cam_tap if meta.cam_tap else 'none'}")
    print(f"gradients (split head): {'yes' if meta.has_head else 'no'}")
    print("parity (max abs error): " + ", ".join(f"{k} {v:.2e}" for k, v in meta.parity.items()))
    return 0


def _inspect_foreign_onnx(path) -> None:
    from camshaft.models.onnx_graph import open_foreign, spatial_tensors

    import onnx

    for name, shape in spatial_tensors(onnx.load(str(path)), tokens=True).items():
        mark = _layout(shape[1:], None)
        print(f"{name}  {'x'.join(map(str, shape[1:]))}{'  ' + mark if mark else ''}")
    try:
        graph = open_foreign(path, None)
    except ConfigError as e:  # informative only: no default tap, or no class count
        print(f"default tap: none ({e})")
    else:
        if graph.channels_last_input:
            print("input: channels last (N, H, W, 3); camshaft feeds it its (N, 3, H, W) batches transposed")
        print(f"default tap: {graph.taps[0]}")
        if graph.cam_weight is None:
            print("CAM head: none")
        else:
            print(f"CAM head: global average pool of {graph.cam_tap} -> linear {tuple(graph.cam_weight.shape)}")
    print("taps are tensor names (--tap NAME); set --mean/--std/--resize to the model's preprocessing")
