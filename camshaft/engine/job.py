"""The explain job: one frozen description of a run, validated before any work starts."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from pathlib import Path

from camshaft.data.workers import DECODERS
from camshaft.engine.backends.base import AUTO, CUDA_GRAPHS_BACKENDS, DTYPES, backend_choices, resolve_device
from camshaft.engine.methods import get_method, method_names
from camshaft.errors import ConfigError
from camshaft.models.classes import read_class_names
from camshaft.preprocess import RESIZE_MODES, crop_problem


def split_names(text: str) -> tuple[str, ...]:
    """``a, b,c`` -> ``("a", "b", "c")``: comma-separated names, as the CLI, job files and the API take them."""
    return tuple(m.strip() for m in text.split(",") if m.strip())


INTEGERS = ("batch_size", "partition_size", "metric_steps", "exemplar_k", "workers")


def _integer(value, *, optional: bool = False) -> bool:
    return (optional and value is None) or (isinstance(value, numbers.Integral) and not isinstance(value, bool))


@dataclass(frozen=True)
class ExplainJob:
    """Everything ``camshaft explain`` needs; the CLI's flags map onto these fields."""

    model: str | None  # architecture name, module:factory, .pt / .onnx file; None = demo model
    data: Path  # folder (recursive) or CSV manifest
    out: Path  # output folder: maps.zarr, results.parquet, overlays/
    method: str | tuple[str, ...] = "gradcam"  # several: they share the forwards they can
    targets: str = "top:1"  # top:K | label | comma-separated classes
    tap: str | None = None  # default: the CAM tap, else the model's last feature map
    weights: Path | None = None  # local state_dict for architectures and factories
    class_names: Path | None = None  # a file of class names replacing the model's (camshaft.models.classes)
    backend: str = AUTO  # auto (eager for a torch model, a file's own format) | eager | torchscript | pt2 | onnxruntime
    device: str | None = None  # cpu | cuda[:N]; None = cuda when available
    dtype: str = "float32"  # float16 / bfloat16 autocast on CUDA
    cuda_graphs: bool = False  # forward-only parts replayed from CUDA graphs (eager, torchscript, pt2 on CUDA)
    batch_size: int = 32
    overlays: bool = False
    input_size: tuple[int, int] | None = None  # preprocessing overrides (None = the model's)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    resize: str | None = None
    crop_fraction: float | None = None  # center-crop: the centred fraction kept (torchvision's eval: 0.875)
    workers: int | None = None  # decode workers, shared by the partitions (None: see `default_workers`)
    decode: str = "auto"  # processes | threads | device | auto (processes for a GPU): see camshaft.data.workers
    options: dict = field(default_factory=dict)  # the method's options (see `Method.options`)
    partition_size: int = 256  # images per Dask task and per shard
    scheduler: str = "threads"  # threads | sync | a dask.distributed scheduler address
    overwrite: bool = False  # start over instead of resuming / updating an earlier run in `out`
    labels_from_folders: bool = False  # ImageFolder tree: label = top-level folder name
    metrics: tuple[str, ...] = ()  # faithfulness curves computed in the same pass: deletion, insertion
    metric_steps: int = 50
    exemplars: tuple[str, ...] = ()  # TAP or TAP:C1,C2: the dataset's top images per channel, same pass
    exemplar_k: int = 8

    def __post_init__(self):
        # comma-separated text, as the CLI takes it (job files and the API pass strings too)
        if isinstance(self.method, str) and "," in self.method:
            object.__setattr__(self, "method", split_names(self.method))
        if isinstance(self.metrics, str):
            object.__setattr__(self, "metrics", split_names(self.metrics))
        if isinstance(self.exemplars, str):  # one TAP or TAP:C1,C2 (its commas are channels)
            object.__setattr__(self, "exemplars", (self.exemplars,))
        wrong = [f"{name} must be an integer, received {getattr(self, name)!r}" for name in INTEGERS
                 if not _integer(getattr(self, name), optional=name == "workers")]
        if wrong:  # the checks below compare them with numbers
            raise ConfigError("invalid explain job: " + "; ".join(wrong))
        problems = []
        unknown = [m for m in self.methods if m not in method_names()]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            problems.append(f"unknown or repeated methods {list(self.methods)} (choose from {', '.join(method_names())})")
        else:
            taken = {o.name for m in self.methods for o in get_method(m).options}
            stray = sorted(set(self.options) - taken)
            if stray:
                problems.append(f"options {stray} belong to none of the methods {list(self.methods)}")
            for m in self.methods:
                try:
                    self.options_for(m)
                except ConfigError as e:
                    problems.append(str(e))
        if self.backend not in backend_choices():
            problems.append(f"unknown backend {self.backend!r} (choose from {', '.join(backend_choices())})")
        if self.dtype not in DTYPES:
            problems.append(f"unknown dtype {self.dtype!r} (choose from {', '.join(DTYPES)})")
        if self.batch_size < 1:
            problems.append(f"batch size must be at least 1, received {self.batch_size}")
        if self.cuda_graphs:
            problems += self._check_cuda_graphs()
        if self.workers is not None and self.workers < 1:
            problems.append(f"workers must be at least 1, received {self.workers}")
        if self.decode not in DECODERS:
            problems.append(f"unknown decode {self.decode!r} (choose from {', '.join(DECODERS)})")
        if self.partition_size < 1:
            problems.append(f"partition size must be at least 1, received {self.partition_size}")
        problems += self._check_extras()
        if self.backend == "inductor":
            problems += self._check_compiler()
        if not self.scheduler:
            problems.append("scheduler must be threads, sync or a dask.distributed address (tcp://host:8786)")
        if self.resize is not None and self.resize not in RESIZE_MODES:
            problems.append(f"unknown resize mode {self.resize!r} (choose from {', '.join(RESIZE_MODES)})")
        if self.crop_fraction is not None and (why := crop_problem(self.crop_fraction, self.resize)) is not None:
            problems.append(why)
        if not Path(self.data).exists():
            problems.append(f"data not found: {self.data}")
        if self.weights is not None and not Path(self.weights).is_file():
            problems.append(f"weights file not found: {self.weights}")
        if self.class_names is not None:
            try:
                read_class_names(self.class_names)
            except ConfigError as e:
                problems.append(str(e))
        if problems:
            raise ConfigError("invalid explain job: " + "; ".join(problems))

    def _check_cuda_graphs(self) -> list[str]:
        onnx = self.backend == AUTO and str(self.model).lower().endswith(".onnx")
        if self.backend in ("onnxruntime", "inductor") or onnx:
            return [CUDA_GRAPHS_BACKENDS]
        try:
            device = resolve_device(self.device)
        except ConfigError as e:
            return [str(e)]
        return [] if device.type == "cuda" else [f"CUDA graphs need a CUDA device; this run is on {device}"]

    def _check_compiler(self) -> list[str]:
        """The inductor backend's code generator: a C++ compiler (CPU) or Triton (GPU)."""
        from camshaft.engine.backends.compiled import check_compiler

        try:
            device = resolve_device(self.device)
        except ConfigError:
            return []  # a bad device is refused with its reason where the backend opens it
        try:
            check_compiler(device)
        except ConfigError as e:
            return [str(e)]
        return []

    def _check_extras(self) -> list[str]:
        """Problems with the metrics and exemplars requested (parsed by the report package)."""
        problems = []
        try:
            self.metric_specs()
            self.exemplar_specs()
        except ConfigError as e:
            problems.append(str(e))
        if self.exemplar_k < 1:
            problems.append(f"exemplar k must be at least 1, received {self.exemplar_k}")
        return problems

    def metric_specs(self) -> tuple:
        from camshaft.report.faithfulness import parse_metrics

        return parse_metrics(",".join(self.metrics), steps=self.metric_steps) if self.metrics else ()

    def exemplar_specs(self) -> tuple:
        from camshaft.report.exemplars import ExemplarSpec

        return tuple(ExemplarSpec.parse(t) for t in self.exemplars)

    @property
    def methods(self) -> tuple[str, ...]:
        return (self.method,) if isinstance(self.method, str) else tuple(self.method)

    def options_for(self, method: str) -> dict:
        """The options (of ``options``) that ``method`` declares, completed with its defaults."""
        declared = {o.name for o in get_method(method).options}
        return get_method(method).resolve_options({k: v for k, v in self.options.items() if k in declared})

    def preprocess_overrides(self) -> dict:
        """The preprocessing fields given, as ``Preprocess.replace`` takes them (None keeps the model's)."""
        return {"input_size": self.input_size, "mean": self.mean, "std": self.std, "resize": self.resize,
                "crop": self.crop_fraction}
