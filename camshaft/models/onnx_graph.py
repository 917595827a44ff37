"""ONNX files camshaft did not write: tap intermediate tensors by name, find a CAM head.

A tap is any tensor of the graph (``camshaft inspect model.onnx`` lists the 4-D ones); it becomes
an extra output. The default tap is the CAM head's, else the last 4-D tensor larger than 1x1. The
CAM head is found by pattern: tap -> GlobalAveragePool (or ReduceMean over H, W) ->
Flatten/Reshape/Squeeze -> Gemm or MatMul (+ Add) producing the first graph output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import external_data_helper, numpy_helper, shape_inference

from camshaft.errors import ConfigError, UnknownNameError

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


def spatial_tensors(model: onnx.ModelProto) -> dict[str, tuple]:
    """Tensors with a 4-D shape (N, C, h, w) in execution order, by name."""
    inferred = shape_inference.infer_shapes(model)
    shapes = {v.name: _dims(v) for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    out = {}
    for node in inferred.graph.node:
        for name in node.output:
            if len(shapes.get(name, ())) == 4:
                out[name] = shapes[name]
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
    logits = model.graph.output[0].name
    spatial = spatial_tensors(model)
    head = _cam_head(model, logits)
    if not taps:
        default = head[0] if head is not None else default_tap(model, spatial)
        if default is None:
            raise ConfigError(f"{path}: no 4-D tensor larger than 1x1 to pick a default tap; name one with --tap "
                              f"(4-D tensors: {', '.join(list(spatial)[-8:]) or 'none'})")
        taps = [default]
    for t in taps:
        if t not in spatial:
            raise UnknownNameError("ONNX tap", t, list(spatial), hint="a tap is a 4-D tensor of the graph")
    outputs = {o.name for o in model.graph.output}
    for t in taps:
        if t not in outputs:
            model.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    order = list(spatial)
    taps = sorted(taps, key=order.index)
    in_dims = _dims(model.graph.input[0])
    size = tuple(in_dims[2:]) if len(in_dims) == 4 and all(isinstance(d, int) and d > 0 for d in in_dims[2:]) else None
    out_dims = _dims(shape_inference.infer_shapes(onnx.load(str(path))).graph.output[0])
    num_classes = out_dims[-1] if out_dims and isinstance(out_dims[-1], int) else None
    if num_classes is None:
        raise ConfigError(f"{path}: cannot tell the number of classes from the first output {logits!r}")
    cam_w, cam_tap = (head[1], head[0]) if head is not None and head[0] in taps else (None, None)
    shapes = {t: tuple(spatial[t][1:]) for t in taps}
    batch = in_dims[0] if in_dims and isinstance(in_dims[0], int) and in_dims[0] > 0 else None
    return ForeignGraph(model, logits, taps, shapes, num_classes, size, cam_w, cam_tap, batch)


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
    """``(tap, weight (N, C))`` when logits = W · mean_hw(tap) + b, else None."""
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
    if current is None or not _is_global_mean(current, {**_constants(model), **inits}):
        return None
    return current.input[0], torch.from_numpy(np.array(weight, dtype=np.float32, copy=True))


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


def _is_global_mean(node, inits) -> bool:
    if node.op_type == "GlobalAveragePool":
        return True
    if node.op_type == "ReduceMean":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        axes = attrs.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1] in inits:
            axes = inits[node.input[1]].tolist()
        return axes is not None and sorted(int(a) % 4 for a in axes) == [2, 3]
    return False
