"""Opening a backend for a model source: eager torch, TorchInductor, TorchScript, torch.export (.pt2) or ONNX Runtime.

A torch model asked to run on TorchScript or ONNX Runtime is exported first (with the parity
check) into the run's work folder, so every backend serves the same taps and head.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from camshaft.engine.backends.base import CUDA_GRAPHS_BACKENDS, ModelInfo, register_backend, resolve_memory_format
from camshaft.engine.backends.compiled import Compiled, check_compiler, grid_linears
from camshaft.engine.backends.onnx_backend import OnnxBackend, open_session
from camshaft.engine.backends.torch_backend import TorchBackend
from camshaft.errors import ConfigError
from camshaft.exporters import onnx as onnx_export
from camshaft.exporters import pt2 as pt2_export
from camshaft.exporters import torchscript as ts_export
from camshaft.exporters.metadata import ArtifactMeta
from camshaft.models.fold import fold_graphs
from camshaft.models.onnx_graph import open_foreign
from camshaft.models.prepared import prepare_model
from camshaft.models.sources import ModelSource, kind_name
from camshaft.preprocess import Preprocess


FILE_BACKENDS = {"onnx": "onnxruntime", "torchscript": "torchscript", "pt2": "pt2"}  # file kind -> its backend
ARTIFACT_NAMES = {"onnxruntime": "model.onnx", "torchscript": "model.torchscript.pt", "pt2": "model.pt2"}


def auto_backend(source: ModelSource) -> str:
    """The backend ``auto`` stands for: eager for a torch model, the backend of its format for an exported file."""
    return "eager" if source.kind == "torch" else FILE_BACKENDS[source.kind]


def _check_taps(meta: ArtifactMeta, taps: Sequence[str] | None, path: Path) -> None:
    unknown = [t for t in taps or () if t not in meta.taps]
    if unknown:
        raise ConfigError(
            f"{path} was exported with taps {meta.taps}; it cannot serve {unknown}. "
            "Re-export with those taps (camshaft export --tap ...) or use the eager backend"
        )


def _check_size(exported: tuple[int, int] | None, preprocess: dict, path: Path) -> None:
    """ONNX and .pt2 files take the input size they were exported for only (a TorchScript file any)."""
    asked = preprocess.get("input_size")
    if exported is not None and asked is not None and tuple(asked) != tuple(exported):
        raise ConfigError(
            f"{path} was exported for {exported[0]}x{exported[1]} inputs; it cannot take {asked[0]}x{asked[1]}. "
            f"Leave --input-size out, or re-export the model with --input-size {asked[0]},{asked[1]}"
        )


def _info(meta: ArtifactMeta, cam: torch.Tensor | None, preprocess: dict, source: ModelSource) -> ModelInfo:
    """The artifact's metadata, with the run's preprocessing and the user's class names (--class-names) on top."""
    pre = meta.preprocess.replace(**preprocess)
    names = source.class_names or meta.class_names
    return ModelInfo(
        taps=tuple(meta.taps),
        num_classes=meta.num_classes,
        preprocess=pre,
        class_names=tuple(names) if names else None,
        cam_weight=cam,
        cam_tap=meta.cam_tap,
        source=str(source.spec),
        tap_shapes={t: tuple(s) for t, s in meta.tap_shapes.items()},
    )


def _artifact(source: ModelSource, fmt: str, *, taps, preprocess: dict, workdir: Path | None) -> Path:
    """The artifact path for ``source``: itself, or a fresh export of a torch model."""
    if source.kind == fmt:
        return source.path
    if source.kind != "torch":
        raise ConfigError(f"{source.spec!r} is {kind_name(source.kind)}; it cannot run on the {fmt} backend")
    from camshaft.exporters import export_prepared

    if workdir is None:
        raise ConfigError(f"the {fmt} backend needs a work folder to export {source.spec!r} into")
    pre = (source.preprocess or Preprocess()).replace(**preprocess)
    prepared = prepare_model(source, taps=taps, preprocess=pre)
    # the run's own file: an ONNX one carries the head whatever its size (VGG's classifier), for gradient methods
    return export_prepared(prepared, format=fmt, out=workdir / ARTIFACT_NAMES[FILE_BACKENDS[fmt]], head=True)


def open_eager(source: ModelSource, *, fold: bool = False, cuda_graphs: bool = False, **options) -> TorchBackend:
    """The model itself, tapped.

    The backend follows the live model: weights changed in place show in the next call. With
    ``fold``, for a model nobody else holds (one camshaft loaded itself), batch norms are folded
    into the convolutions of the backend's graphs once (``fold_batchnorms``): faster, and frozen. On the
    CPU, linear layers run through oneDNN as 1x1 convolutions (``camshaft.models.cpu_linear``).
    """
    parts = _live_parts(source, fold=fold, **options)
    return TorchBackend(name="eager", **parts, cuda_graphs=cuda_graphs, cpu_linears=True)


def _live_parts(
    source: ModelSource, *, taps=None, preprocess: dict, device, dtype, memory_format="auto", fold: bool = False, **_
) -> dict:
    """The tapped live model, its split and info: what the eager and inductor backends run."""
    if source.kind != "torch":
        raise ConfigError(
            f"the eager backend needs a torch model; {source.spec!r} is {kind_name(source.kind)} "
            f"(use --backend {FILE_BACKENDS.get(source.kind, 'torchscript')}, or auto, the default)"
        )
    pre = (source.preprocess or Preprocess()).replace(**preprocess)
    p = prepare_model(source, taps=taps, preprocess=pre)
    layout = resolve_memory_format(memory_format, p.module)
    # the model's 4-d weights in the layout its images come in: a convolution would otherwise
    # convert its weight at every call (the model's values are unchanged, as with .to(device))
    if layout == torch.channels_last:
        p.module.to(device, memory_format=layout)
    else:
        p.module.to(device)
    tapped = p.tapped.to(device)
    if layout == torch.channels_last and memory_format == "auto" and not _runs_channels_last(tapped, pre, device):
        layout = torch.contiguous_format  # e.g. a model that views a 4-d activation as 2-d
        p.module.to(memory_format=layout)
    split = None
    if p.split is not None:
        split = (p.split.trunk.to(device), p.split.head.to(device))
    if fold:  # the graphs only: the model handed over keeps its layers
        graphs = [tapped.graph_module, tapped.leaf_module] if tapped.traceable else []
        graphs += [part.gm for part in split or ()]  # the trunk and head of gradient methods
        fold_graphs(graphs, memory_format=layout)
    info = dataclasses.replace(
        p.info, cam_weight=None if p.info.cam_weight is None else p.info.cam_weight.to(device)
    )
    return dict(
        info=info,
        full=tapped,
        device=device,
        dtype=dtype,
        split=split,
        leaf_forward=lambda x: tapped(x, leaf_first=True),
        owner=p.module,
        memory_format=layout,
    )


def open_inductor(source: ModelSource, *, device, cuda_graphs: bool = False, **options) -> TorchBackend:
    """The eager backend, or the pt2 backend for a .pt2 file, with its forward-only graphs compiled by
    TorchInductor (``compiled.py``).

    Batch norms are folded and the weights frozen into the compiled code: the backend does not follow
    later changes of the model's weights. Gradients and hooks run uncompiled, on the model or program.
    """
    if cuda_graphs:
        raise ConfigError(CUDA_GRAPHS_BACKENDS)
    device = torch.device(device)
    if source.kind not in ("torch", "pt2"):
        raise ConfigError(
            f"the inductor backend compiles a torch model or a .pt2 program; {source.spec!r} is "
            f"{kind_name(source.kind)} (use --backend {FILE_BACKENDS.get(source.kind, 'torchscript')}, "
            "or auto, the default)"
        )
    check_compiler(device)
    if source.kind == "pt2":
        parts = _pt2_parts(source, device=device, **options)
    else:  # folded whatever was asked: the compiled code freezes the weights anyway
        parts = _live_parts(source, device=device, **{**options, "fold": True})
    linears = grid_linears(device)
    if parts["split"] is not None:
        trunk, head = parts["split"]
        parts["split"] = (Compiled(trunk, grid_linears=linears), head)
    parts["grad_forward"] = parts["full"]  # input gradients: the uncompiled graph, autograd through it
    parts["full"] = Compiled(parts["full"], grid_linears=linears)
    # not around compiled code: dynamo would trace that mode, and its counter would recompile every call
    return TorchBackend(name="inductor", **parts, cpu_linears=False)


def _runs_channels_last(tapped, pre: Preprocess, device) -> bool:
    """Whether the tapped model runs on a channels-last image (``view`` needs contiguous tensors)."""
    x = torch.zeros(1, 3, *pre.input_size, device=device).contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            tapped(x)
    except RuntimeError:
        return False
    return True


def open_torchscript(source: ModelSource, *, taps=None, preprocess: dict, device, dtype, workdir=None,
                     memory_format="auto", cuda_graphs: bool = False, **_):
    path = _artifact(source, "torchscript", taps=taps, preprocess=preprocess, workdir=workdir)
    module, meta, cam = ts_export.load(path, device=device)
    if meta is None:
        raise ConfigError(
            f"{path} is a TorchScript file without camshaft metadata, so its taps are unknown. "
            "Export the original model with `camshaft export` (or explain it with the eager backend)"
        )
    _check_taps(meta, taps, path)
    for p in module.parameters():
        p.requires_grad_(False)
    split = None
    if hasattr(module, "trunk") and hasattr(module, "head"):
        split = (module.trunk, _head_runner(module.head, meta.taps))
    frozen = module
    # frozen: batch norms folded (on a GPU at small batches, 53 fewer launches for resnet50), on a GPU in
    # float32 only; the bench's TorchScript limit is held the same way, under the same autocast
    if device.type == "cpu" or dtype == torch.float32:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # freeze is deprecated upstream but still the fastest CPU path
            frozen = torch.jit.freeze(module)  # a frozen copy: batch norms folded, weights constants
            if split is not None:  # the trunk of gradient methods too (resnet50 b16, 2 cores: 539 -> 472 ms)
                split = (torch.jit.freeze(module.trunk), split[1])
    info = _info(meta, None if cam is None else cam.to(device), preprocess, source)
    return TorchBackend(
        name="torchscript",
        info=info,
        full=frozen,
        device=device,
        dtype=dtype,
        split=split,
        grad_forward=module,
        memory_format=resolve_memory_format(memory_format, module),
        cuda_graphs=cuda_graphs,
    )


def _head_runner(head, taps):
    """``a -> (logits, {tap: activation})`` around a flat head ``a -> [logits, later taps...]``."""
    first, later = taps[0], tuple(taps[1:])

    def run_head(a):
        outs = head(a)
        return outs[0], {first: a, **dict(zip(later, outs[1:], strict=True))}

    return run_head


def open_pt2(source: ModelSource, *, cuda_graphs: bool = False, **options) -> TorchBackend:
    parts = _pt2_parts(source, **options)
    # cpu_linears: its aten.linear calls, as the eager backend's (convnext_tiny b16 cl: 1.33 -> 0.92 s)
    return TorchBackend(name="pt2", **parts, cuda_graphs=cuda_graphs, cpu_linears=True)


def _pt2_parts(source: ModelSource, *, taps=None, preprocess: dict, device, dtype, workdir=None,
               memory_format="auto", **_) -> dict:
    """The program of a .pt2 file (exported first from a torch model), its head and info."""
    path = _artifact(source, "pt2", taps=taps, preprocess=preprocess, workdir=workdir)
    program, head, meta, cam = pt2_export.load(path, device=device)
    if meta is None:
        raise ConfigError(
            f"{path} is a torch.export archive without camshaft metadata, so its taps are unknown. "
            "Export the original model with `camshaft export --format pt2` (or explain it with the eager backend)"
        )
    _check_taps(meta, taps, path)
    _check_size(meta.preprocess.input_size, preprocess, path)
    for m in (program, head):
        for p in m.parameters() if m is not None else ():
            p.requires_grad_(False)  # gradients are asked of the taps only, never of weights
    taps_ = tuple(meta.taps)
    full = lambda x: pt2_export.unflatten(program(x), taps_)  # noqa: E731
    split = None
    if head is not None:

        def trunk(x):  # the program's first tap (its head part is small, and computed once more)
            return program(x)[1]

        split = (trunk, _head_runner(head, taps_))
    return dict(
        info=_info(meta, None if cam is None else cam.to(device), preprocess, source),
        full=full,
        device=device,
        dtype=dtype,
        split=split,
        memory_format=resolve_memory_format(memory_format, program),
    )


def open_onnxruntime(
    source: ModelSource, *, taps=None, preprocess: dict, device, dtype, workdir=None, cuda_graphs: bool = False, **_
):
    if cuda_graphs:
        raise ConfigError(CUDA_GRAPHS_BACKENDS)
    if dtype != torch.float32:
        raise ConfigError("the onnxruntime backend runs float32 models; export in half precision is not supported yet")
    path = _artifact(source, "onnx", taps=taps, preprocess=preprocess, workdir=workdir)
    session = open_session(path, device)
    meta, cam, head = onnx_export.read_session(session, path)
    if meta is None:
        return _foreign_onnx(path, source, taps=taps, preprocess=preprocess, device=device)
    _check_taps(meta, taps, path)
    _check_size(meta.preprocess.input_size, preprocess, path)
    info = _info(meta, None if cam is None else cam.to(device), preprocess, source)
    batch = session.get_inputs()[0].shape[0]  # a fixed batch size (a file from elsewhere, with taps added)
    outputs = {t: onnx_export.tap_output(t) for t in info.taps}
    return OnnxBackend(session, info, head=head, device=device, tap_outputs=outputs,
                       batch=batch if isinstance(batch, int) and batch > 0 else None)


register_backend("eager", open_eager)
register_backend("inductor", open_inductor)
register_backend("torchscript", open_torchscript)
register_backend("pt2", open_pt2)
register_backend("onnxruntime", open_onnxruntime)


def _foreign_onnx(path: Path, source: ModelSource, *, taps, preprocess: dict, device) -> OnnxBackend:
    """An ONNX file from elsewhere: taps become extra outputs; forward-only methods."""
    graph = open_foreign(path, list(taps) if taps else None)
    _check_size(graph.input_size, preprocess, path)
    if preprocess.get("mean") is None or preprocess.get("std") is None:
        warnings.warn(
            f"{path} carries no camshaft metadata: assuming ImageNet mean/std and center-crop; "
            "set --mean, --std, --resize (and --input-size) to match how the model was trained",
            stacklevel=4,
        )
    pre = Preprocess(input_size=graph.input_size or (224, 224)).replace(**preprocess)
    info = ModelInfo(
        taps=tuple(graph.taps),
        num_classes=graph.num_classes,
        preprocess=pre,
        class_names=tuple(source.class_names) if source.class_names else None,
        cam_weight=None if graph.cam_weight is None else graph.cam_weight.to(device),
        cam_tap=graph.cam_tap,
        source=str(source.spec),
        tap_shapes=graph.tap_shapes,
    )
    session = open_session(graph.model.SerializeToString(), device)
    return OnnxBackend(session, info, head=None, device=device, tap_outputs={t: t for t in info.taps},
                       batch=graph.batch)
