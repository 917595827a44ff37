"""An ONNX file that camshaft did not write, exported to a camshaft ONNX artifact.

The graph is kept as it is; the taps become outputs under camshaft's names (``logits``, ``tap:NAME``)
and the metadata (taps and their shapes, input size, mean/std, class names, CAM head weights) is
added, so that the file runs as any camshaft artifact: no warning about preprocessing, the classes
named, the taps known. The parity check runs the original file and the artifact in ONNX Runtime on
the same inputs. No differentiable head is added (an ONNX graph cannot be differentiated here): the
artifact serves the forward-only methods, as the original file does.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from camshaft.errors import ConfigError, ParityError
from camshaft.exporters import onnx as onnx_export
from camshaft.exporters.metadata import ArtifactMeta, version
from camshaft.models.onnx_graph import open_foreign
from camshaft.preprocess import Preprocess


def export_foreign_onnx(
    path: Path, *, spec: str, out: Path, taps: list[str] | None, preprocess: dict, class_names, rtol: float
) -> Path:
    """Write the ONNX file at ``path`` with ``taps`` as a camshaft artifact at ``out`` (parity-checked)."""
    from camshaft.exporters import _new_folders, _parity, _session, _unflatten
    from camshaft.writers.atomic import atomic_path

    header = onnx.load(str(path), load_external_data=False)
    if any(p.key == onnx_export.META_KEY for p in header.metadata_props):
        raise ConfigError(f"{path} is a camshaft artifact already; to change its taps or preprocessing, export "
                          "the original model again")
    graph = open_foreign(path, list(taps) if taps else None)
    if graph.input_size is not None and preprocess.get("input_size") not in (None, graph.input_size):
        h, w = graph.input_size
        raise ConfigError(f"{path} takes {h}x{w} inputs only; leave out --input-size or give {h},{w}")
    pre = Preprocess(input_size=graph.input_size or (224, 224)).replace(**preprocess)
    if graph.input_size is None and preprocess.get("input_size") is None:
        raise ConfigError(f"{path} takes inputs of any size: give the one it was trained for with --input-size")
    if preprocess.get("mean") is None or preprocess.get("std") is None:
        warnings.warn(f"{path} carries no camshaft metadata: the artifact records ImageNet mean/std unless --mean "
                      "and --std say how the model was trained", stacklevel=3)
    names = list(class_names) if class_names else None
    if names is not None and len(names) != graph.num_classes:
        raise ConfigError(f"{len(names)} class names for the {graph.num_classes} classes of {path}")
    model = _renamed_outputs(graph)
    batch = graph.batch or 1
    gen = torch.Generator().manual_seed(0)
    checks = [torch.randn(batch * n, 3, *pre.input_size, generator=gen) for n in (1, 3)]  # a fixed batch: parts
    original = _session(path)
    logits = original.get_outputs()[0].name
    first_input = original.get_inputs()[0].name

    def reference(x):  # the file as it is: a Keras model's takes (N, H, W, 3)
        x = x.permute(0, 2, 3, 1).contiguous() if graph.channels_last_input else x
        outs = [original.run([logits], {first_input: part.numpy()})[0] for part in x.split(batch)]
        return torch.from_numpy(np.concatenate(outs)), {}

    meta = ArtifactMeta(
        format="onnx",
        source=spec,
        preprocess=pre,
        taps=list(graph.taps),
        tap_shapes={t: list(s) for t, s in graph.tap_shapes.items()},
        num_classes=graph.num_classes,
        class_names=names,
        cam_tap=graph.cam_tap,
        cam_linear=None if graph.cam_tap is None else _producer(header, graph.logits),
        has_head=False,
        exporter=f"camshaft: {path.name} with its taps as outputs",
        camshaft_version=version(),
    )
    with _new_folders(out.parent), atomic_path(out) as tmp:  # the artifact appears whole, or not at all
        onnx.save(model, str(tmp))
        session = _session(tmp)
        wanted = [onnx_export.LOGITS, *map(onnx_export.tap_output, meta.taps)]
        input_name = session.get_inputs()[0].name
        if any(not isinstance(d, int) for shape in meta.tap_shapes.values() for d in shape):
            # a graph that takes any input size has symbolic tap shapes: the artifact records them at its size
            probe = np.zeros((batch, 3, *pre.input_size), dtype=np.float32)
            outs = session.run(wanted[1:], {input_name: probe})
            meta.tap_shapes = {t: list(a.shape[1:]) for t, a in zip(meta.taps, outs, strict=True)}

        def artifact(x):
            parts = [session.run(wanted, {input_name: part.numpy()}) for part in x.split(batch)]
            logits_, taps_ = _unflatten([np.concatenate(col) for col in zip(*parts, strict=True)], meta.taps)
            wrong = {t: list(a.shape[1:]) for t, a in taps_.items() if list(a.shape[1:]) != meta.tap_shapes[t]}
            if wrong:
                raise ParityError(f"tap outputs of shapes {wrong}, not those of the graph {meta.tap_shapes}")
            return logits_, {}  # the original file has no tap outputs to hold them against

        meta.parity = _parity(reference, artifact, checks, rtol=rtol)
        onnx_export.write_metadata(tmp, meta, graph.cam_weight, None)
    return out


def _producer(model: onnx.ModelProto, output: str) -> str:
    """The name of the node computing ``output`` (the CAM head's linear layer: Gemm, or MatMul + Add)."""
    node = next((n for n in model.graph.node if output in n.output), None)
    return (node.name or f"{node.op_type} -> {output}") if node is not None else output


def _renamed_outputs(graph) -> onnx.ModelProto:
    """The graph with exactly camshaft's outputs: ``logits`` then one ``tap:NAME`` per tap (Identity nodes)."""
    model = graph.model
    inferred = {o.name: o for o in model.graph.output}
    wanted = [(graph.logits, onnx_export.LOGITS), *((t, onnx_export.tap_output(t)) for t in graph.taps)]
    taken = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    clash = [name for source, name in wanted if name != source and name in taken]
    if clash:
        raise ConfigError(f"the graph has tensors named {clash} already, the names camshaft gives its outputs")
    del model.graph.output[:]
    for source, name in wanted:
        if source != name:  # an output already named ``logits`` stays as it is
            model.graph.node.append(onnx.helper.make_node("Identity", [source], [name], name=f"camshaft_{name}"))
        elem = inferred[source].type.tensor_type.elem_type if source in inferred else onnx.TensorProto.FLOAT
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem or onnx.TensorProto.FLOAT, None))
    return model
