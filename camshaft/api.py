"""The Python API, mirroring the CLI: ``explain``, ``export``, ``inspect``, ``load_results``,
``feature_maps`` and ``actmax``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from camshaft.engine.actmax import actmax
from camshaft.engine.featmaps import FeatureMaps, feature_maps
from camshaft.engine.job import ExplainJob
from camshaft.pipeline.run import RunSummary, run_explain
from camshaft.exporters import FORMATS, check_artifact_path, export_prepared
from camshaft.models.inspect import ModelReport, describe
from camshaft.models.prepared import prepare_model
from camshaft.models.sources import ModelSource, resolve_model
from camshaft.preprocess import Preprocess
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
    model: str | None,
    data: str | Path,
    *,
    out: str | Path,
    method: str | Sequence[str] = "gradcam",
    targets: str = "top:1",
    tap: str | None = None,
    weights: str | Path | None = None,
    class_names: str | Path | None = None,
    backend: str = "eager",
    device: str | None = None,
    dtype: str = "float32",
    cuda_graphs: bool = False,
    batch_size: int = 32,
    overlays: bool = False,
    input_size: tuple[int, int] | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    resize: str | None = None,
    workers: int | None = None,
    decode: str = "auto",
    options: dict | None = None,
    partition_size: int = 256,
    scheduler: str = "threads",
    overwrite: bool = False,
    labels_from_folders: bool = False,
    metrics: tuple[str, ...] = (),
    metric_steps: int = 50,
    exemplars: tuple[str, ...] = (),
    exemplar_k: int = 8,
    progress: bool = True,
) -> RunSummary:
    """Explain every image of ``data`` (folder or CSV manifest) with ``model``; see ``ExplainJob``.

    ``options`` are the methods' own settings, e.g. ``{"window": (32, 32)}`` for occlusion.
    Several methods (``method=["cam", "gradcam"]``) share the forwards they can and write one run
    directory each, ``out/METHOD``. ``metrics`` (deletion, insertion) and ``exemplars`` (taps) are
    gathered in the same pass and written beside the results for ``camshaft report``.
    Rerunning into the same ``out`` resumes (finished partitions are skipped) or, when the dataset
    changed, explains only new and changed images; ``overwrite=True`` starts over.
    """
    job = ExplainJob(
        model=model,
        data=Path(data),
        out=Path(out),
        method=method if isinstance(method, str) else tuple(method),
        targets=targets,
        tap=tap,
        weights=None if weights is None else Path(weights),
        class_names=None if class_names is None else Path(class_names),
        backend=backend,
        device=device,
        dtype=dtype,
        cuda_graphs=cuda_graphs,
        batch_size=batch_size,
        overlays=overlays,
        input_size=input_size,
        mean=mean,
        std=std,
        resize=resize,
        workers=workers,
        decode=decode,
        options=dict(options or {}),
        partition_size=partition_size,
        scheduler=scheduler,
        overwrite=overwrite,
        labels_from_folders=labels_from_folders,
        metrics=metrics if isinstance(metrics, str) else tuple(metrics),
        metric_steps=metric_steps,
        exemplars=exemplars if isinstance(exemplars, str) else tuple(exemplars),
        exemplar_k=exemplar_k,
    )
    return run_explain(job, progress=progress)


def export(
    model: str,
    *,
    format: str,
    out: str | Path,
    taps: Sequence[str] | None = None,
    weights: str | Path | None = None,
    class_names: str | Path | None = None,
    input_size: tuple[int, int] | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    resize: str | None = None,
    rtol: float = 1e-3,
    head: bool | None = None,
) -> Path:
    """Export ``model`` with ``taps`` to a TorchScript or ONNX artifact at ``out`` (parity-checked).

    ``head``: whether an ONNX file carries the differentiable head for gradient methods
    (default: when the head is small next to the model).
    """
    if format not in FORMATS:
        from camshaft.errors import UnknownNameError

        raise UnknownNameError("export format", format, FORMATS)
    check_artifact_path(format, out)
    source = resolve_model(model, weights=weights, class_names=class_names)
    pre = (source.preprocess or Preprocess()).replace(input_size=input_size, mean=mean, std=std, resize=resize)
    prepared = prepare_model(source, taps=taps, preprocess=pre)
    return export_prepared(prepared, format=format, out=out, rtol=rtol, head=head)


def inspect(
    model: str | ModelSource | None, *, weights: str | Path | None = None, input_size: tuple[int, int] | None = None
) -> ModelReport:
    """Layers with output shapes, the default tap and the CAM head of a torch model."""
    source = model if isinstance(model, ModelSource) else resolve_model(model, weights=weights)
    if source.kind != "torch":
        from camshaft.errors import ConfigError

        raise ConfigError(f"inspect reads torch models; {source.spec!r} is a {source.kind} file")
    size = input_size or (source.preprocess or Preprocess()).input_size
    return describe(source.module, input_size=tuple(size))
