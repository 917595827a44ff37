"""ONNX files camshaft did not write: tap intermediate tensors by name, find a CAM head.

A tap is any 4-D tensor of the graph, or a transformer's tokens that tile a square (``camshaft inspect
model.onnx`` lists them); it becomes an extra output. The default tap is the CAM head's, else the last
4-D tensor larger than 1x1. The CAM head is found by pattern: tap -> GlobalAveragePool (or ReduceMean
over H, W) -> Flatten/Reshape/Squeeze -> Gemm or MatMul (+ Add) producing the first graph output.

A file taking channels-last images (N, H, W, 3) gets a Transpose before its input, so that it takes
camshaft's (N, 3, H, W) batches like any other; its channels-last maps are read by
``camshaft.models.layout``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import external_data_helper, numpy_helper, shape_inference

from camshaft.errors import ConfigError, UnknownNameError
from camshaft.models.layout import channels_last, token_grid

_PASS_THROUGH = {"Flatten", "Reshape", "Squeeze", "Identity", "Dropout"}


@dataclass
class ForeignGraph:
    model: onnx.ModelProto  # with the taps added as outputs
    logits: str
    taps: list[str]
    tap_shapes: dict[str, tuple[int, ...]]
    num_classes: int
    input_size: tuple[int, int] | None
    cam_weight: torch.Tensor | None
    cam_tap: str | None
    batch: int | None = None  # a fixed batch size (torch.onnx.export's default), else None
    channels_last_input: bool = False  # the file takes (N, H, W, 3) (Keras's); ``model`` takes (N, 3, H, W)


def spatial_tensors(model: onnx.ModelProto, *, tokens: bool = False) -> dict[str, tuple]:
    """Tensors with a 4-D shape (N, C, h, w) in execution order, by name; with ``tokens``, a transformer's
    tokens (N, T, C) that tile a square too (``camshaft.models.layout``: read as maps)."""
    inferred = shape_inference.infer_shapes(model)
    shapes = {v.name: _dims(v) for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    out = {}
    for node in inferred.graph.node:
        for name in node.output:
            dims = shapes.get(name, ())
            if len(dims) == 4 or tokens and len(dims) == 3 and isinstance(dims[1], int) and token_grid(dims[1]):
                out[name] = dims
    return out


def check_external_data(path: Path) -> None:
    """Refuse an ONNX file whose weights are stored outside its folder: an absolute path, ``..`` or a link out.

    A model file from elsewhere must not make camshaft read other files (``../../etc/passwd`` as
    weights). onnx and ONNX Runtime refuse such paths too (recent versions), each with its own
    error; this refuses them once, clearly, before anything reads the weights.
    """
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not an ONNX model: whoever opens it says so
        return
    folder = path.absolute().parent.resolve()
    outside = []
    every = getattr(external_data_helper, "_get_all_tensors", None)  # onnx's own walk (subgraphs, attributes)
    for tensor in every(model) if every is not None else model.graph.initializer:
        if not external_data_helper.uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if not _inside(folder, location):
            outside.append(f"{tensor.name!r} in {location!r}")
    if outside:
        more = f" and {len(outside) - 3} more" if len(outside) > 3 else ""
        raise ConfigError(f"{path} stores weights outside its folder ({', '.join(outside[:3])}{more}); camshaft reads "
                          "an ONNX file's external data only from files beside it (a relative path, no links out)")


def _inside(folder: Path, location: str) -> bool:
    if not location or Path(location).is_absolute():
        return False
    try:
        return (folder / location).resolve().is_relative_to(folder)
    except (OSError, ValueError):  # a NUL byte, a link loop
        return False


def open_foreign(path: Path, taps: list[str] | None) -> ForeignGraph:
    model = onnx.load(str(path))
    channels_last_input = _channels_last_input(model, path)
    if channels_last_input:
        model = _with_nchw_input(model)
    logits = model.graph.output[0].name
    tappable = spatial_tensors(model, tokens=True)  # one shape inference: the tokens are taps, not default ones
    spatial = {name: dims for name, dims in tappable.items() if len(dims) == 4}
    in_dims = _dims(model.graph.input[0])
    size = tuple(in_dims[2:]) if len(in_dims) == 4 and all(isinstance(d, int) and d > 0 for d in in_dims[2:]) else None
    head = _cam_head(model, logits)
    if head is not None and head[2]:  # a mean over axes 1, 2: CAM reads that tap channels last, so it must look so
        dims = spatial.get(head[0], ())[1:]
        if size is None or len(dims) != 3 or not all(isinstance(d, int) for d in dims) or not channels_last(dims, size):
            head = None
    if not taps:
        default = head[0] if head is not None else default_tap(model, spatial)
        if default is None:
            raise ConfigError(f"{path}: no 4-D tensor larger than 1x1 to pick a default tap; name one with --tap "
                              f"(4-D tensors: {', '.join(list(spatial)[-8:]) or 'none'})")
        taps = [default]
    for t in taps:
        if t not in tappable:
            raise UnknownNameError("ONNX tap", t, list(tappable), hint="a tap is a 4-D tensor of the graph, or "
                                   "a transformer's tokens (N, T, C) that tile a square (T = h*h, or 1 + h*h)")
    outputs = {o.name for o in model.graph.output}
    for t in taps:
        if t not in outputs:
            model.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    order = list(tappable)
    taps = sorted(taps, key=order.index)
    out_dims = _dims(shape_inference.infer_shapes(onnx.load(str(path))).graph.output[0])
    num_classes = out_dims[-1] if out_dims and isinstance(out_dims[-1], int) else None
    if num_classes is None:
        raise ConfigError(f"{path}: cannot tell the number of classes from the first output {logits!r}")
    cam_w, cam_tap = (head[1], head[0]) if head is not None and head[0] in taps else (None, None)
    shapes = {t: tuple(tappable[t][1:]) for t in taps}
    batch = in_dims[0] if in_dims and isinstance(in_dims[0], int) and in_dims[0] > 0 else None
    return ForeignGraph(model, logits, taps, shapes, num_classes, size, cam_w, cam_tap, batch, channels_last_input)


def _channels_last_input(model: onnx.ModelProto, path: Path) -> bool:
    """Whether the image input is (N, H, W, 3), as a Keras model's exported by tf2onnx; (N, 3, H, W) is False.
    Any other input is refused here, with its shape (ONNX Runtime's own error names index 1 of an input)."""
    first = model.graph.input[0]
    dims = _dims(first)
    shape = "x".join(str(d) for d in dims) or "a scalar"
    if len(dims) != 4:
        raise ConfigError(f"{path}: its input {first.name!r} has shape {shape}; camshaft feeds a classifier one "
                          "batch of RGB images, (N, 3, H, W) or (N, H, W, 3)")
    if dims[1] == 3 or not isinstance(dims[1], int) and dims[3] != 3:
        return False  # channels first, or channels of no fixed count (ONNX Runtime will say if 3 do not fit)
    if dims[3] == 3:
        return True
    raise ConfigError(f"{path}: its input {first.name!r} has shape {shape}, neither (N, 3, H, W) nor (N, H, W, 3): "
                      "camshaft feeds a classifier RGB images (a grey-scale model needs its own input layer)")


def _with_nchw_input(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` taking (N, 3, H, W): a new input, transposed to the (N, H, W, 3) tensor the graph reads."""
    graph = model.graph
    old = graph.input[0]
    taken = {v for n in graph.node for v in (*n.input, *n.output)} | {v.name for v in (*graph.input, *graph.output)}
    name = old.name + "_nchw"
    while name in taken:
        name += "_"
    new = onnx.ValueInfoProto()
    new.CopyFrom(old)
    new.name = name
    for i, j in enumerate((0, 3, 1, 2)):  # (N, H, W, 3) -> (N, 3, H, W), names of symbolic sizes kept
        new.type.tensor_type.shape.dim[i].CopyFrom(old.type.tensor_type.shape.dim[j])
    transpose = onnx.helper.make_node("Transpose", [name], [old.name], perm=[0, 2, 3, 1], name=f"camshaft_{name}")
    graph.input.remove(old)
    graph.input.insert(0, new)
    graph.node.insert(0, transpose)
    return model


def default_tap(model: onnx.ModelProto, spatial: dict[str, tuple]) -> str | None:
    """Without a CAM head, the last 4-D tensor larger than 1x1 (a symbolic size counts as larger), as for a torch
    model; the classifier's pooling is not one: an AveragePool whose output goes only to Flatten/Reshape (VGG's
    adaptive pool to 7x7 exports so), which would otherwise be picked over the feature map it pools."""
    consumers: dict[str, list[str]] = {}
    producers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
        for name in node.output:
            producers[name] = node.op_type

    def pools_for_classifier(name: str) -> bool:
        after = consumers.get(name, [])
        return producers.get(name) == "AveragePool" and bool(after) and set(after) <= {"Flatten", "Reshape"}

    candidates = [
        name for name, dims in spatial.items()
        if not all(isinstance(d, int) and d == 1 for d in dims[2:]) and not pools_for_classifier(name)
    ]
    return candidates[-1] if candidates else None


def _dims(value_info) -> tuple:
    shape = value_info.type.tensor_type.shape
    return tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in shape.dim)


def _cam_head(model: onnx.ModelProto, logits: str):
    """``(tap, weight (N, C), channels last)`` when logits = W · mean_hw(tap) + b, else None; the mean is over
    axes 2, 3 of an (N, C, h, w) tap, or 1, 2 of an (N, h, w, C) one (a Keras model's ReduceMean)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    node = producers.get(logits)
    if node is not None and node.op_type == "Add":  # MatMul + Add
        node = next((producers[i] for i in node.input if i in producers), None)
    if node is None or node.op_type not in ("Gemm", "MatMul"):
        return None
    weight = _linear_weight(node, inits)
    if weight is None:
        return None
    current = producers.get(node.input[0])
    while current is not None and current.op_type in _PASS_THROUGH:
        current = producers.get(current.input[0])
    axes = None if current is None else _global_mean_axes(current, {**_constants(model), **inits})
    if axes is None:
        return None
    return current.input[0], torch.from_numpy(np.array(weight, dtype=np.float32, copy=True)), axes == [1, 2]


def _linear_weight(node, inits) -> np.ndarray | None:
    if node.input[1] not in inits:
        return None
    w = inits[node.input[1]]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Gemm":
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
            return None
        return w if attrs.get("transB", 0) else w.T
    return w.T  # MatMul: x @ W with W (C, N)


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The values of the graph's Constant nodes by output name (torch.onnx gives ReduceMean its axes so)."""
    found = {}
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.output) == 1:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if isinstance(attrs.get("value"), onnx.TensorProto):
                found[node.output[0]] = numpy_helper.to_array(attrs["value"])
            elif "value_ints" in attrs:
                found[node.output[0]] = np.array(attrs["value_ints"])
    return found


def _global_mean_axes(node, inits) -> list[int] | None:
    """The axes ([2, 3] or [1, 2]) a 4-D global mean ``node`` averages, else None."""
    if node.op_type == "GlobalAveragePool":
        return [2, 3]
    if node.op_type == "ReduceMean":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        axes = attrs.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1] in inits:
            axes = inits[node.input[1]].tolist()
        axes = None if axes is None else sorted(int(a) % 4 for a in axes)
        return axes if axes in ([2, 3], [1, 2]) else None
    return None
