"""What a benchmark run measures: one frozen description, validated before any work starts.

``BenchSettings.preset(quick=...)`` gives the defaults: *full* is the issue's headline setting
(resnet50, batch 16, 224 px); *quick* is tiny (the built-in demo CNN, batch 2, 64 px, fewer rounds) so that CI
proves the machinery works without measuring anything meaningful. ``FULL_MODELS``,
``FULL_BATCH_SIZES`` and ``FULL_TARGETS`` are the matrix the pytest suites cover in full mode.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from camshaft.bench.timing import TimingConfig
from camshaft.errors import ConfigError

FULL_MODELS = ("resnet18", "resnet50", "vgg16_bn", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny")
FULL_BATCH_SIZES = (1, 16, 64)
FULL_TARGETS = ("top:1", "top:5")
BACKENDS = ("eager", "torchscript", "onnxruntime")


@dataclass(frozen=True)
class BenchSettings:
    models: tuple[str, ...] = ("resnet50",)  # architecture names, 'demo', artifact files, pkg.mod:factory
    methods: tuple[str, ...] = ()  # empty: every registered method
    backends: tuple[str, ...] = BACKENDS
    batch_sizes: tuple[int, ...] = (16,)
    targets: tuple[str, ...] = ("top:1",)  # top:K or explicit classes (no labels in a benchmark)
    input_size: tuple[int, int] = (224, 224)
    device: str = "cpu"
    dtype: str = "float32"
    cuda_graphs: bool = False  # camshaft's torch backends replay CUDA graphs; the limit gets graphed variants
    peers: bool = True  # time peer libraries that are installed
    pipeline: bool = False  # also time decode + explain + write on generated JPEGs
    pipeline_batches: int = 16  # images per pipeline run = this × batch size (partitions of 4 batches)
    decode: str = "auto"  # the pipeline's decoders: auto (explain's default) | processes | threads | device
    actmax: bool = False  # also time activation maximization (N classes at once) against its limit
    actmax_classes: int = 8
    actmax_size: int = 128
    actmax_steps: int = 64
    timing: TimingConfig = TimingConfig(warmup=2, repeats=3)
    quick: bool = False
    seed: int = 0

    def __post_init__(self):
        problems = _problems(self)
        if problems:
            raise ConfigError("invalid benchmark settings: " + "; ".join(problems))

    @classmethod
    def preset(cls, *, quick: bool) -> BenchSettings:
        if quick:
            return cls(
                models=("demo",),
                batch_sizes=(2,),
                input_size=(64, 64),
                pipeline_batches=2,
                actmax_classes=2,
                actmax_size=32,
                actmax_steps=4,
                timing=TimingConfig(warmup=1, repeats=2),
                quick=True,
            )
        return cls()

    def replace(self, **changes) -> BenchSettings:
        """A copy with the given fields changed; None keeps the current value."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def method_names(self) -> tuple[str, ...]:
        from camshaft.engine.methods import method_names

        return self.methods or tuple(method_names())

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["methods"] = list(self.method_names())
        return d


def _problems(s: BenchSettings) -> list[str]:
    """Every invalid field, each saying what was received and the valid choices."""
    from camshaft.data.workers import DECODERS
    from camshaft.engine.backends import backend_names
    from camshaft.engine.backends.base import DTYPES, resolve_device
    from camshaft.engine.methods import method_names

    from camshaft.bench.cases import short_name

    problems = [p for spec in s.models for p in [model_problem(spec)] if p]
    if not s.models:
        problems.append("no model given")
    names: dict[str, list[str]] = {}
    for spec in s.models:
        names.setdefault(short_name(spec), []).append(spec)
    problems += [
        f"models {' and '.join(specs)} share the name {name!r}, which keys their figures (and --compare matches "
        "figures by key): give the files different names (a link will do)"
        for name, specs in names.items()
        if len(specs) > 1
    ]
    unknown = [m for m in s.methods if m not in method_names()]
    if unknown:
        problems.append(f"unknown methods {unknown}; valid: {', '.join(method_names())}")
    unknown = [b for b in s.backends if b not in backend_names()]
    if unknown or not s.backends:
        problems.append(f"unknown or no backends {unknown}; valid: {', '.join(backend_names())}")
    if not s.batch_sizes or min(s.batch_sizes) < 1:
        problems.append(f"batch sizes must be positive, received {list(s.batch_sizes)}")
    problems += [p for t in s.targets for p in [targets_problem(t)] if p]
    if not s.targets:
        problems.append("no targets given")
    if len(s.input_size) != 2 or min(s.input_size) < 8:
        problems.append(f"input size must be two integers of at least 8 pixels, received {s.input_size}")
    if s.dtype not in DTYPES:
        problems.append(f"unknown dtype {s.dtype!r}; valid: {', '.join(DTYPES)}")
    for name in ("pipeline_batches", "actmax_classes", "actmax_steps"):
        if getattr(s, name) < 1:
            problems.append(f"{name.replace('_', ' ')} must be at least 1, received {getattr(s, name)}")
    if s.decode not in DECODERS:
        problems.append(f"unknown decode {s.decode!r}; valid: {', '.join(DECODERS)}")
    if s.actmax_size < 16:
        problems.append(f"actmax size must be at least 16 pixels, received {s.actmax_size}")
    try:
        device = resolve_device(s.device)
    except ConfigError as e:
        problems.append(str(e))
    else:
        if s.cuda_graphs and device.type != "cuda":
            problems.append(f"CUDA graphs need a CUDA device; this benchmark runs on {device}")
    return problems


def model_problem(spec: str) -> str | None:
    """Why ``spec`` names no model camshaft can load, without loading it (None: it looks valid)."""
    from camshaft.models.sources import DEMO, classification_models

    if ":" in spec and not Path(spec).is_file():
        import importlib

        module, _, name = spec.partition(":")
        try:
            found = hasattr(importlib.import_module(module), name)
        except ImportError as e:
            return f"model {spec!r}: cannot import {module!r} ({e})"
        return None if found else f"model {spec!r}: {module!r} has no {name!r}"
    if spec == DEMO or Path(spec).is_file() or spec in classification_models():
        return None
    return (
        f"unknown model {spec!r}: not 'demo', a torchvision architecture (e.g. resnet50), a file, or pkg.module:factory"
    )


def targets_problem(text: str) -> str | None:
    from camshaft.engine.targets import Targets

    try:
        parsed = Targets.parse(text)
    except ConfigError as e:
        return str(e)
    if parsed.kind == "label":
        return "--targets label needs dataset labels; a benchmark uses top:K or explicit classes"
    return None
