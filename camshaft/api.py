"""The Python API, mirroring the CLI: ``explain``, ``export``, ``inspect``, ``load_results``,
``feature_maps`` and ``actmax``."""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from camshaft.engine.actmax import actmax
from camshaft.engine.featmaps import FeatureMaps, feature_maps
from camshaft.engine.job import ExplainJob
from camshaft.pipeline.run import RunSummary, run_explain
from camshaft.errors import ConfigError
from camshaft.exporters import FORMATS, check_artifact_path, export_prepared
from camshaft.models.inspect import ModelReport, describe
from camshaft.models.prepared import prepare_model
from camshaft.models.sources import ModelSource, kind_name, model_spec, resolve_model
from camshaft.preprocess import Preprocess, overrides
from camshaft.results import Results, load_results

__all__ = [
    "FeatureMaps",
    "Results",
    "RunSummary",
    "actmax",
    "explain",
    "export",
    "feature_maps",
    "inspect",
    "load_results",
]


def explain(
    model: str | Path | None,
    data: str | Path,
    *,
    out: str | Path,
    method: str | Sequence[str] = "gradcam",
    targets: str | Sequence[int | str] = "top:1",
    tap: str | None = None,
    weights: str | Path | None = None,
    class_names: str | Path | None = None,
    backend: str = "auto",
    device: str | None = None,
    dtype: str = "float32",
    cuda_graphs: bool = False,
    batch_size: int = 32,
    overlays: bool = False,
    input_size: int | tuple[int, int] | None = None,
    mean: float | tuple[float, float, float] | None = None,
    std: float | tuple[float, float, float] | None = None,
    resize: str | None = None,
    crop_fraction: float | None = None,
    workers: int | None = None,
    decode: str = "auto",
    options: dict | None = None,
    partition_size: int = 256,
    scheduler: str = "threads",
    overwrite: bool = False,
    labels_from_folders: bool = False,
    metrics: str | Sequence[str] = (),
    metric_steps: int = 50,
    exemplars: str | Sequence[str] = (),
    exemplar_k: int = 8,
    progress: bool = True,
) -> RunSummary:
    """Explain every image of ``data`` with ``model``; the fields are ``camshaft.engine.job.ExplainJob``'s.

    ``model``: a torchvision architecture, ``package.module:factory``, an exported TorchScript, .pt2 or
    ONNX file, or None for the built-in demo model (a live ``nn.Module`` cannot travel to the run's
    workers: give its ``module:factory``). ``data``: an image folder (recursive), a CSV or Parquet
    manifest, or one image. ``targets``: ``"top:K"``, ``"label"`` or classes by index or name
    (``"3,tabby"`` or ``[3, "tabby"]``). ``input_size`` (H, W) or one number for a square;
    ``mean``/``std`` (R, G, B) or one number for all channels; None keeps the model's. ``crop_fraction``
    (center-crop): the centred fraction of the largest region kept, 0.875 for torchvision's eval transform.
    ``options`` are the methods' own settings, e.g. ``{"window": (32, 32)}`` for occlusion.
    Several methods (``method=["cam", "gradcam"]``) share the forwards they can and write one run
    directory each, ``out/METHOD``. ``metrics`` (deletion, insertion) and ``exemplars`` (taps) are
    gathered in the same pass and written beside the results for ``camshaft report``.
    Rerunning into the same ``out`` resumes (finished partitions are skipped) or, when the dataset
    changed, explains only new and changed images; ``overwrite=True`` starts over.
    """
    job = ExplainJob(
        model=None if model is None else model_spec(model),  # the job holds text: it travels to workers
        data=_path("data", data),
        out=_path("out", out),
        method=_names("method", method),
        targets=_targets(targets),
        tap=tap,
        weights=None if weights is None else _path("weights", weights),
        class_names=None if class_names is None else _path("class_names", class_names),
        backend=backend,
        device=device,
        dtype=dtype,
        cuda_graphs=cuda_graphs,
        batch_size=batch_size,
        overlays=overlays,
        **overrides(input_size, mean, std),
        resize=resize,
        crop_fraction=crop_fraction,
        workers=workers,
        decode=decode,
        options=dict(options or {}),
        partition_size=partition_size,
        scheduler=scheduler,
        overwrite=overwrite,
        labels_from_folders=labels_from_folders,
        metrics=_names("metrics", metrics),
        metric_steps=metric_steps,
        exemplars=_names("exemplars", exemplars),
        exemplar_k=exemplar_k,
    )
    return run_explain(job, progress=progress)


def export(
    model: str | Path | None,
    *,
    format: str,
    out: str | Path,
    taps: str | Sequence[str] | None = None,
    weights: str | Path | None = None,
    class_names: str | Path | None = None,
    input_size: int | tuple[int, int] | None = None,
    mean: float | tuple[float, float, float] | None = None,
    std: float | tuple[float, float, float] | None = None,
    resize: str | None = None,
    crop_fraction: float | None = None,
    rtol: float = 1e-3,
    head: bool | None = None,
) -> Path:
    """Export ``model`` with ``taps`` to a TorchScript, ONNX or .pt2 artifact at ``out`` (parity-checked).

    ``model``: a torchvision architecture, ``package.module:factory``, a TorchScript or .pt2 file from
    elsewhere, or None (the demo model); an ONNX file from elsewhere exports to ONNX only (its taps as
    outputs, and metadata). ``taps``: one module path or several (default: the last feature map). ``head``: whether an ONNX
    file carries the differentiable head for gradient methods (default: when the head is small next
    to the model). ``input_size``, ``mean``, ``std``, ``resize`` and ``crop_fraction`` as in ``explain``: the
    artifact carries them.
    """
    if format not in FORMATS:
        from camshaft.errors import UnknownNameError

        raise UnknownNameError("export format", format, FORMATS)
    check_artifact_path(format, _path("out", out))
    given = {**overrides(input_size, mean, std), "resize": resize, "crop": crop_fraction}
    source = resolve_model(model, weights=weights, class_names=class_names, preprocess=given)
    taps = None if taps is None else _names("taps", (taps,) if isinstance(taps, str) else taps)
    if source.kind == "onnx":  # a file from elsewhere: its graph, with taps as outputs and metadata
        from camshaft.exporters.foreign_onnx import export_foreign_onnx

        if format != "onnx":
            raise ConfigError(f"{source.spec!r} is an ONNX file: it exports to ONNX only (its taps as outputs, and "
                              "metadata); export the original torch model to TorchScript or .pt2")
        if head:
            raise ConfigError(f"{source.spec!r} is an ONNX file: camshaft cannot add a differentiable head to it "
                              "(--head); export the original torch model for gradient methods")
        tap_list = None if taps is None else ([taps] if isinstance(taps, str) else list(taps))
        return export_foreign_onnx(source.path, spec=source.spec, out=Path(out), taps=tap_list, preprocess=given,
                                   class_names=source.class_names, rtol=rtol)
    pre = (source.preprocess or Preprocess()).replace(**given)
    prepared = prepare_model(source, taps=taps, preprocess=pre)
    return export_prepared(prepared, format=format, out=out, rtol=rtol, head=head)


def inspect(
    model: str | Path | ModelSource | nn.Module | None,
    *,
    weights: str | Path | None = None,
    input_size: int | tuple[int, int] | None = None,
) -> ModelReport:
    """Layers with output shapes, the default tap and the CAM head of a torch model.

    ``model``: as in ``explain``, a resolved ``ModelSource`` or a live ``nn.Module`` (probed in eval
    mode; each submodule's mode is restored after).
    """
    if isinstance(model, (ModelSource, nn.Module)) and weights is not None:
        raise ConfigError("weights apply to a model name or module:factory; load them into the module yourself")
    if isinstance(model, nn.Module):
        model = ModelSource("torch", type(model).__name__, module=model)
    size = overrides(input_size)["input_size"]
    source = model if isinstance(model, ModelSource) else resolve_model(model, weights=weights,
                                                                          preprocess={"input_size": size})
    if source.kind != "torch":
        raise ConfigError(f"inspect reads torch models; {source.spec!r} is {kind_name(source.kind)}")
    pre = (source.preprocess or Preprocess()).replace(input_size=size)
    source.check_input_size(pre.input_size)
    modes = {m: m.training for m in source.module.modules()}
    try:
        return describe(source.module.eval(), input_size=pre.input_size)
    finally:
        for m, training in modes.items():
            m.training = training


def _path(name: str, value) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{name} must be a path (str or pathlib.Path), received {value!r}")
    return Path(value)


def _names(name: str, value) -> str | tuple[str, ...]:
    """A string as given (the job splits commas where it should), or a sequence of strings as a tuple."""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{name} must be a string or a list of strings, received {value!r}")


def _targets(value) -> str:
    """``top:K``, ``label`` or classes; a list of class indices or names is joined as the CLI takes it."""
    if isinstance(value, str):
        return value
    ok = isinstance(value, Sequence) and all(isinstance(v, (str, numbers.Integral)) for v in value)
    if not ok or not value or any(isinstance(v, bool) for v in value):
        raise ConfigError(
            f"targets must be 'top:K', 'label' or classes as '3,tabby' or [3, 'tabby'], received {value!r}"
        )
    return ",".join(str(v) for v in value)
