"""An actmax run from model spec to output folder: resolve, parse, validate, render, write.

Everything is validated (flags, specs against the model's classes and tap shapes, start images)
before the output folder is touched.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from camshaft.engine.actmax.outputs import write_outputs
from camshaft.engine.actmax.render import RenderConfig, forward_fn, render, tap_shapes
from camshaft.engine.actmax.spec import parse_objectives
from camshaft.errors import ConfigError, ImageDecodeError
from camshaft.models.classes import check_count, read_class_names
from camshaft.models.prepared import check_graph_taps
from camshaft.models.sources import ModelSource, kind_name, resolve_model
from camshaft.models.taps import plan_taps
from camshaft.preprocess import RESIZE_MODES, Preprocess, crop_problem, overrides, prepare
from camshaft.writers.atomic import out_folder_problem

__all__ = ["ActmaxJob", "ActmaxSummary", "actmax", "load_init", "run_actmax"]


@dataclass(frozen=True)
class ActmaxJob:
    """Everything ``camshaft actmax`` needs; the CLI's flags map onto these fields."""

    model: str | None  # architecture, module:factory or "demo" (None); only torch models
    objectives: tuple[str, ...]  # specs, e.g. ("class:0-9", "-channel:layer4:7")
    out: Path  # output folder
    config: RenderConfig = field(default_factory=RenderConfig)
    weights: Path | None = None
    class_names: Path | None = None  # a file of class names replacing the model's (camshaft.models.classes)
    init: Path | None = None  # an image or a folder of images to start from (DeepDream on a photo)
    input_size: tuple[int, int] | None = None  # preprocessing overrides (None = the model's)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    resize: str | None = None  # how --init images are fitted to the input size
    crop_fraction: float | None = None  # center-crop of --init images: the centred fraction kept
    columns: int | None = None  # grid columns (default: about square, or one row per objective)

    def __post_init__(self):
        problems = []
        if isinstance(self.objectives, str) or not self.objectives:
            problems.append(f"give objectives as a list of specs, received {self.objectives!r}")
        if self.weights is not None and not Path(self.weights).is_file():
            problems.append(f"weights file not found: {self.weights}")
        if self.class_names is not None:
            try:
                read_class_names(self.class_names)
            except ConfigError as e:
                problems.append(str(e))
        if self.init is not None and not Path(self.init).exists():
            problems.append(f"initial image or folder not found: {self.init}")
        if self.resize is not None and self.resize not in RESIZE_MODES:
            problems.append(f"unknown resize mode {self.resize!r} (choose from {', '.join(RESIZE_MODES)})")
        if self.crop_fraction is not None and (why := crop_problem(self.crop_fraction, self.resize)) is not None:
            problems.append(why)
        if self.columns is not None and self.columns < 1:
            problems.append(f"columns must be at least 1, received {self.columns}")
        if (why := out_folder_problem(self.out)) is not None:
            problems.append(f"--out {self.out}: {why}")
        if problems:
            raise ConfigError("invalid actmax job: " + "; ".join(problems))


@dataclass(frozen=True)
class ActmaxSummary:
    out: Path
    rows: list[dict]  # the rows of results.parquet
    seconds: float


def load_init(path: Path, preprocess: Preprocess) -> torch.Tensor:
    """An image or a folder of images -> (M, 3, H, W) in [0, 1] at the model's input size.

    The folder of an earlier actmax run gives the images its table lists, in its order (not its
    grid.png): a render goes on from where that run stopped.
    """
    from camshaft.data.decode import load_rgb
    from camshaft.data.sources import list_images

    images, problems = [], []
    for file in _earlier_run(path) or [record.path for record in list_images(path)]:
        try:
            images.append(prepare(load_rgb(file), preprocess)[0].float() / 255.0)
        except ImageDecodeError as e:
            problems.append(f"{file}: {e}")
    if problems:
        raise ConfigError("cannot read initial images: " + "; ".join(problems))
    return torch.stack(images)


def _earlier_run(path: Path) -> list[Path] | None:
    """The images an actmax run's results.parquet in folder ``path`` lists, in its order; None if none."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = Path(path) / "results.parquet"
    if not Path(path).is_dir() or not table.is_file():
        return None
    try:
        names = pq.read_table(table, columns=["image"]).column("image").to_pylist()
    except (OSError, KeyError, ValueError, pa.ArrowException):  # some other table: the folder's images
        return None
    return [Path(path) / name for name in names if name] or None


def _torch_model(job: ActmaxJob) -> ModelSource:
    source = resolve_model(job.model, weights=job.weights, class_names=job.class_names,
                           preprocess={"input_size": job.input_size, "mean": job.mean, "std": job.std})
    if source.kind != "torch":
        raise ConfigError(
            f"actmax differentiates the model w.r.t. its input and runs only live torch models; "
            f"{source.spec!r} is {kind_name(source.kind)}. Use the architecture name or module:factory "
            "with --weights instead"
        )
    return source


def run_actmax(job: ActmaxJob, *, progress: bool = True) -> ActmaxSummary:
    """Run ``job``: nothing is written unless every setting and objective is valid."""
    start = time.perf_counter()
    source = _torch_model(job)
    pre = (source.preprocess or Preprocess()).replace(input_size=job.input_size, mean=job.mean,
                                                      std=job.std, resize=job.resize, crop=job.crop_fraction)
    source.check_input_size(pre.input_size)
    try:
        _, num_classes = tap_shapes(forward_fn(source.module, []), pre, torch.device("cpu"))
    except ConfigError:
        raise
    except (RuntimeError, AssertionError, ValueError) as e:  # a model checks its input size as it likes
        h, w = pre.input_size
        raise ConfigError(f"{job.model or 'demo'} does not run at input size {h}x{w} (choose --input-size): {e}") from e
    if job.class_names is not None:  # the user's names must fit; the model's own are kept only when they do
        check_count(source.class_names, num_classes, model=job.model or "demo")
    names = source.class_names if source.class_names and len(source.class_names) == num_classes else None
    objectives = parse_objectives(job.objectives, class_names=names, num_classes=num_classes)
    taps = sorted(set().union(*(o.taps for o in objectives)))
    if taps and source.path is not None:  # a graph converted from a file: tapped by node, not module path
        check_graph_taps(source, plan_taps(source.module), taps)
    init = None if job.init is None else load_init(job.init, pre)
    n = len(objectives) * job.config.copies
    if init is not None and init.shape[0] not in (1, n):
        raise ConfigError(f"--init holds {init.shape[0]} images; give 1 or one per image ({n})")
    rendering = render(source.module, objectives, preprocess=pre, config=job.config, init=init,
                       progress=progress)
    diverged = ~(rendering.images.flatten(1).isfinite().all(1) & rendering.values.isfinite())
    if diverged.any():
        warnings.warn(f"{int(diverged.sum())} of {len(diverged)} images diverged (NaN or infinite values; written "
                      "grey): lower --lr, the weights or --relu-leak", stacklevel=2)
    rows = write_outputs(job.out, rendering, class_names=names, columns=job.columns)
    return ActmaxSummary(Path(job.out), rows, time.perf_counter() - start)


def actmax(model: str | Path | None, objectives: str | Sequence[str], *, out: str | Path,
           config: RenderConfig | None = None, weights: str | Path | None = None,
           class_names: str | Path | None = None, init: str | Path | None = None,
           input_size: int | tuple[int, int] | None = None, mean: float | tuple[float, float, float] | None = None,
           std: float | tuple[float, float, float] | None = None, resize: str | None = None,
           crop_fraction: float | None = None, columns: int | None = None, progress: bool = True) -> ActmaxSummary:
    """Visualize ``objectives`` (spec strings, or one) of ``model``; writes PNGs, grid and table to ``out``.

    ``input_size`` (H, W) or one number for a square; ``mean``/``std`` (R, G, B) or one number;
    ``resize`` and ``crop_fraction`` fit ``init`` images to the input as ``camshaft.explain`` fits its images.
    """
    if isinstance(objectives, str):
        objectives = (objectives,)  # one spec (its commas are its own: class:0,3)
    if config is not None and not isinstance(config, RenderConfig):
        raise ConfigError(f"config must be a RenderConfig (camshaft.engine.actmax.RenderConfig(steps=...)), "
                          f"received {type(config).__name__}")
    pre = overrides(input_size, mean, std)
    job = ActmaxJob(model=model, objectives=tuple(objectives), out=Path(out), config=config or RenderConfig(),
                    weights=None if weights is None else Path(weights),
                    class_names=None if class_names is None else Path(class_names),
                    init=None if init is None else Path(init),
                    resize=resize, crop_fraction=crop_fraction, columns=columns, **pre)
    return run_actmax(job, progress=progress)
