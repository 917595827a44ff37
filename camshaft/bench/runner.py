"""Run a benchmark: for each model and batch size, build every workload and time them together.

All workloads of one group (model, input size, batch) — the limits, camshaft's methods on each
backend, the peers, the pipeline — are timed round-robin in the same process, so every ratio
compares numbers taken under the same load, allocator and thread settings.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from camshaft.bench import limits, peers
from camshaft.bench.cases import (
    Case,
    Group,
    bench_options,
    cases,
    evaluations_per_image,
    forward_batch,
    gradient_kind,
    groups,
    input_batch,
    method_tap,
    method_workload,
    tap_channels,
    target_count,
    variants,
)
from camshaft.bench.machine import machine_info
from camshaft.bench.pipeline import jpeg_size, pipeline_workload, write_jpegs
from camshaft.bench.report import BenchReport
from camshaft.bench.settings import BenchSettings
from camshaft.bench.timing import TimingConfig, round_robin
from camshaft.bench.workload import Figure, Skipped, Workload
from camshaft.engine.backends import Backend, backend_factory
from camshaft.engine.backends.base import LIVE_BACKENDS, resolve_device, resolve_dtype
from camshaft.engine.methods import get_method
from camshaft.errors import CamshaftError, ConfigError
from camshaft.models.sources import ModelSource, resolve_model
from camshaft.preprocess import Preprocess

Log = Callable[[str], None]


@dataclass(frozen=True)
class Recheck:
    """Time a group again while figures of it look regressed: a drop counts only if it persists.

    On a shared machine one round can be slowed by another tenant; timing the whole group again
    (limits included, so each ratio keeps both its terms from the same rounds) and keeping the best
    of all its rounds clears such a drop, while a real one survives every pass.
    """

    suspects: Callable[[dict], set[str]]  # a report's JSON form -> the keys of the figures that dropped
    passes: int = 1  # extra passes at most


def run_bench(
    settings: BenchSettings,
    *,
    workdir: Path,
    log: Log = lambda _: None,
    progress: Callable[[BenchReport], None] | None = None,
    recheck: Recheck | None = None,
) -> BenchReport:
    """Measure everything ``settings`` asks for; artifacts and pipeline outputs go under ``workdir``.

    ``progress`` is handed the report (marked incomplete) after each group is measured, so a run
    stopped part-way (a time limit, a crash) can still leave the figures it took. ``recheck``: a
    group with figures that dropped (against a previous run) is timed again before it is kept.

    Raises:
        ConfigError: targets some model cannot serve, found before any model is timed.
    """
    check_targets(settings, workdir=Path(workdir))
    cudnn = torch.backends.cudnn.benchmark
    if resolve_device(settings.device).type == "cuda":
        # shapes are fixed within a group: every workload alike (limits, methods, peers) gets
        # cuDNN's autotuned kernels, as a long batch job would
        torch.backends.cudnn.benchmark = True
    try:
        report = BenchReport(settings.to_dict(), machine_info(settings.device, settings.dtype), complete=False)

        def measured() -> None:
            if progress is not None:
                progress(report)

        for model in settings.models:
            bench_model(
                model,
                settings,
                workdir=Path(workdir) / slug(model),
                report=report,
                log=log,
                measured=measured,
                recheck=recheck,
            )
    finally:
        torch.backends.cudnn.benchmark = cudnn
    report.complete = True
    return report


def check_targets(settings: BenchSettings, *, workdir: Path) -> None:
    """Every model has the classes the targets name, checked before any model is timed.

    A model file's classes are read by opening it on its format's backend, on the CPU at its own input size (a
    file that does not open is left to the run, which skips it with the reason).

    Raises:
        ConfigError: the targets some model cannot serve.
    """
    from camshaft.engine.targets import Targets
    from camshaft.models.sources import num_classes_of

    problems = []
    for model in settings.models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            source = resolve_model(model)
        if source.module is not None:
            classes = num_classes_of(source.module)
        else:
            classes = _file_classes(source, Path(workdir) / slug(model) / "classes")
        for text in settings.targets if classes is not None else ():
            try:
                Targets.parse(text, num_classes=classes)
            except ConfigError as e:
                problems.append(f"{model}: {e}")
    if problems:
        raise ConfigError("; ".join(problems))


def _file_classes(source: ModelSource, workdir: Path) -> int | None:
    """The classes of a model file, from its metadata and graph as its backend opens them (None: it does not open)."""
    from camshaft.engine.backends.registry import FILE_BACKENDS

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            backend = backend_factory(FILE_BACKENDS[source.kind])(
                source, taps=None, preprocess={}, device=torch.device("cpu"),
                dtype=torch.float32, workdir=workdir,
            )
    except (CamshaftError, KeyError):
        return None
    return backend.info.num_classes


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


class ModelBench:
    """What one model's groups share: the source, the opened backends, the limits' frozen copy."""

    def __init__(self, model: str, settings: BenchSettings, workdir: Path, log: Log):
        self.spec, self.settings, self.workdir, self.log = model, settings, workdir, log
        self.device, self.dtype = resolve_device(settings.device), resolve_dtype(settings.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random weights are fine for throughput
            self.source = resolve_model(model)
        self.preprocess = {"input_size": tuple(settings.input_size)}
        self.backends = {name: self._open(name) for name in settings.backends}
        self.plain = limits.frozen_copy(self.source.module).to(self.device) if self.source.kind == "torch" else None
        self.onnx = self._export_onnx()
        self.split = self._split()

    def _open(self, name: str) -> Backend | Skipped:
        self.log(f"{self.spec}: opening the {name} backend")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return backend_factory(name)(
                    self._own_copy() if name in LIVE_BACKENDS else self.source,
                    taps=None,
                    preprocess=self.preprocess,
                    device=self.device,
                    dtype=self.dtype,
                    workdir=self.workdir / name,
                    fold=True,  # as `camshaft explain` opens it
                    cuda_graphs=self.settings.cuda_graphs,
                )
        except CamshaftError as e:
            return Skipped(
                f"{slug(self.spec)}/{name}", f"the {name} backend cannot open {self.spec!r}: {e}", role="backend"
            )

    def _own_copy(self) -> ModelSource:
        """The source with a copy of its model: the eager and inductor backends change the model they open
        (device, channels-last weights), and the limits, the other backends and the peers must get the model
        as a user hands it over."""
        if self.source.module is None:
            return self.source
        return dataclasses.replace(self.source, module=copy.deepcopy(self.source.module))

    def _export_onnx(self) -> Path | str:
        if self.plain is None or self.dtype != torch.float32:
            return "no plain ONNX limit for this model or dtype"
        self.log(f"{self.spec}: exporting the plain model to ONNX for the limit")
        self.workdir.mkdir(parents=True, exist_ok=True)
        return limits.export_plain_onnx(self.plain, self.settings.input_size, self.workdir / "plain.onnx")

    def _split(self):
        """(trunk, head) of the limits' copy, split at the tap gradient methods read by default."""
        if self.plain is None:
            return None
        from camshaft.models.prepared import prepare_model

        pre = (self.source.preprocess or Preprocess()).replace(**self.preprocess)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = prepare_model(ModelSource("torch", self.spec, module=self.plain, preprocess=pre), preprocess=pre)
        split = prepared.split
        return None if split is None else (split.trunk.to(self.device), split.head.to(self.device))

    def artifact(self, backend: str) -> tuple[str, Path | None]:
        """(model, weights) that make ``camshaft.explain`` run the same model on ``backend``."""
        if backend in LIVE_BACKENDS or self.source.kind != "torch":
            if self.source.kind == "torch" and self.spec != "demo" and ":" not in self.spec:
                weights = self.workdir / "weights.pt"
                if not weights.exists():
                    self.workdir.mkdir(parents=True, exist_ok=True)
                    torch.save(self.source.module.state_dict(), weights)
                return self.spec, weights
            return self.spec, None
        found = sorted(p for p in (self.workdir / backend).glob("*") if p.suffix in (".onnx", ".pt"))
        return (str(found[0]), None) if found else (self.spec, None)


def bench_model(
    model: str,
    settings: BenchSettings,
    *,
    workdir: Path,
    report: BenchReport,
    log: Log,
    measured: Callable[[], None] = lambda: None,
    recheck: Recheck | None = None,
) -> None:
    mb = ModelBench(model, settings, workdir, log)
    report.skipped += [s for s in mb.backends.values() if isinstance(s, Skipped)]
    if isinstance(mb.onnx, str) and "onnxruntime" in settings.backends:
        log(f"{model}: {mb.onnx}")
    for group in groups(settings):
        if group.model != model:
            continue
        items = group_workloads(mb, group)
        todo = [w for w in items if isinstance(w, Workload)]
        report.skipped += [s for s in items if isinstance(s, Skipped)]
        log(f"{group.key}: timing {len(todo)} workloads round-robin ({settings.timing.repeats} rounds)")
        figures, failed = measure(todo, settings.timing, device=mb.device)
        if recheck is not None:
            figures = confirm(figures, todo, recheck, report=report, timing=settings.timing, device=mb.device,
                              log=lambda m, k=group.key: log(f"{k}: {m}"))
        report.figures += figures
        report.skipped += failed
        measured()
    if settings.actmax and mb.source.kind == "torch":
        bench_actmax(mb, report, recheck)
        measured()


def bench_actmax(mb: ModelBench, report: BenchReport, recheck: Recheck | None = None) -> None:
    from camshaft.bench.actmax import actmax_workloads

    s = mb.settings
    group = Group(mb.spec, (s.actmax_size, s.actmax_size), s.actmax_classes)
    items = actmax_workloads(
        mb.source.module,
        classes=s.actmax_classes,
        size=s.actmax_size,
        steps=s.actmax_steps,
        device=mb.device,
        dtype=s.dtype,
        key=f"{group.key}",
        attrs=group.attrs(),
        peers=s.peers,
    )
    report.skipped += [w for w in items if isinstance(w, Skipped)]
    mb.log(f"{group.key}: timing activation maximization ({s.actmax_steps} steps, {s.actmax_classes} classes)")
    todo = [w for w in items if isinstance(w, Workload)]
    figures, failed = measure(todo, s.timing, device=mb.device)
    if recheck is not None:
        figures = confirm(figures, todo, recheck, report=report, timing=s.timing, device=mb.device,
                          log=lambda m: mb.log(f"{group.key} actmax: {m}"))
    report.figures += figures
    report.skipped += failed


def group_workloads(mb: ModelBench, group: Group) -> list[Workload | Skipped]:
    s = mb.settings
    x = input_batch(group, device=mb.device, seed=s.seed)
    out: list[Workload | Skipped] = limit_workloads(mb, group, x)
    method_cases = cases(s, group)
    for case in method_cases:
        backend = mb.backends[case.backend]
        out.append(
            Skipped(case.key, backend.reason, role="method")
            if isinstance(backend, Skipped)
            else method_workload(case, backend, x)
        )
    if s.peers:
        out += peer_workloads(mb, group, x)
    if s.pipeline:
        ready = {w.key for w in out if isinstance(w, Workload) and w.role == "method"}
        out += pipeline_workloads(mb, group, [c for c in method_cases if c.key in ready])
    return out


def limit_workloads(mb: ModelBench, group: Group, x: torch.Tensor) -> list[Workload | Skipped]:
    """The group's limits: the forward variants and gradient limits at its batch ``x``, and again at the batch of
    the forwards of each method that runs larger ones (occlusion, Score-CAM, SmoothGrad: ``forward_batch``)."""
    if mb.plain is None:
        return [Skipped(f"{group.key}/limit", f"limits need a torch model; {mb.spec!r} is a {mb.source.kind} file",
                        role="limit")]
    s = mb.settings
    onnx = mb.onnx if isinstance(mb.onnx, Path) else None

    def forward(x: torch.Tensor, key: str, attrs: dict) -> list[Workload | Skipped]:
        return limits.forward_limits(mb.plain, x, dtype=mb.dtype, onnx_path=onnx, key=key, attrs=attrs,
                                     cuda_graphs=s.cuda_graphs, compiled="inductor" in s.backends)

    out = forward(x, group.key, group.attrs()) + gradient_limits(mb, group, x)
    for n, kinds in sorted(forward_batches(mb, group).items()):
        xn = input_batch(dataclasses.replace(group, batch=n), device=mb.device, seed=s.seed)
        key, attrs = f"{group.key}/forward{n}", {**group.attrs(), "forward_batch": n}
        out += forward(xn, key, attrs)
        if "input" in kinds:
            out += input_backwards(mb, xn, key=key, attrs=attrs)
    return out


def forward_batches(mb: ModelBench, group: Group) -> dict[int, set[str | None]]:
    """Batch sizes other than the group's at which the selected methods run their forwards -> the gradient
    kinds of those methods (``cases.forward_batch``)."""
    backend = _any_backend(mb)
    out: dict[int, set[str | None]] = {}
    for name in mb.settings.method_names():
        method = get_method(name)
        for variant in variants(name):
            try:
                options = bench_options(method, variant)
            except CamshaftError:
                continue  # the method's own entry says why
            tap = method_tap(method, backend) if backend is not None else None
            channels = tap_channels(backend, tap, group.input_size) if tap else None
            n = forward_batch(name, options, group.input_size, group.batch, channels=channels)
            if n != group.batch:
                out.setdefault(n, set()).add(gradient_kind(method))
    return out


def gradient_limits(mb: ModelBench, group: Group, x: torch.Tensor) -> list[Workload | Skipped]:
    kinds = {gradient_kind(get_method(m)) for m in mb.settings.method_names()}
    ks = sorted({target_count(t) for t in mb.settings.targets})
    out: list[Workload | Skipped] = []
    if "tap" in kinds:
        if mb.split is None:
            out.append(
                Skipped(f"{group.key}/head_backward", "the model does not split at its tap", role="head_backward")
            )
        else:
            trunk, head = mb.split
            with torch.no_grad(), limits.autocast(x.device, mb.dtype):
                a = trunk(x).float()
            out += [limits.head_backward(head, a, k=k, dtype=mb.dtype, key=group.key, attrs=group.attrs()) for k in ks]
    if "input" in kinds:
        out += input_backwards(mb, x, key=group.key, attrs=group.attrs())
    return out


def input_backwards(mb: ModelBench, x: torch.Tensor, *, key: str, attrs: dict) -> list[Workload]:
    """The input-gradient limit's variants for every K of the run (the best of them is the limit)."""
    ks = sorted({target_count(t) for t in mb.settings.targets})
    return [
        limits.input_backward(mb.plain, x, k=k, dtype=mb.dtype, key=key, attrs=attrs, variant=v)
        for k in ks
        for v in limits.INPUT_BACKWARD_VARIANTS
    ]


def _any_backend(mb: ModelBench) -> Backend | None:
    return next((b for b in mb.backends.values() if not isinstance(b, Skipped)), None)


def peer_workloads(mb: ModelBench, group: Group, x: torch.Tensor) -> list[Workload | Skipped]:
    backend = _any_backend(mb)
    if mb.source.kind != "torch" or backend is None:
        return []
    out: list[Workload | Skipped] = []
    for name in mb.settings.method_names():
        method = get_method(name)
        try:
            options = bench_options(method)
        except CamshaftError:
            continue  # the method's own entry says why
        tap = method_tap(method, backend)
        channels = tap_channels(backend, tap, group.input_size)
        evals = group.batch * evaluations_per_image(name, options, group.input_size, channels=channels)
        out += peers.peer_workloads(
            name,
            model=mb.source.module,
            tap=tap,
            x=x,
            targets={t: target_count(t) for t in mb.settings.targets},
            options=options,
            evaluations=evals,
            key=f"{group.key}/{name}/peer:{{peer}}/{{targets}}",
            attrs={**group.attrs(), "method": name},
            quick=mb.settings.quick,
        )
    return out


def pipeline_workloads(mb: ModelBench, group: Group, ready: list[Case]) -> list[Workload]:
    n = mb.settings.pipeline_batches * group.batch
    data = write_jpegs(
        mb.workdir / f"jpegs-{group.batch}", n=n, size=jpeg_size(group.input_size), seed=mb.settings.seed
    )
    out = []
    for case in ready:
        model, weights = mb.artifact(case.backend)
        out.append(
            pipeline_workload(
                case,
                model=model,
                weights=weights,
                data=data,
                n=n,
                workdir=mb.workdir / "runs",
                device=mb.settings.device,
                dtype=mb.settings.dtype,
                decode=mb.settings.decode,
                cuda_graphs=mb.settings.cuda_graphs,
            )
        )
    return out


def measure(workloads: list[Workload], config: TimingConfig, *, device) -> tuple[list[Figure], list[Skipped]]:
    """Probe each workload with its first warm-up call, then time the survivors round-robin.

    A workload whose probe raises a camshaft error (it cannot run here) is skipped; any other
    error is recorded as a failure and the rest are still measured.
    """
    ready, skipped = [], []
    for w in workloads:
        try:
            w.fn()
        except CamshaftError as e:
            skipped.append(Skipped(w.key, str(e), role=w.role))
        except Exception as e:  # noqa: BLE001 - one broken workload must not hide the others' figures
            skipped.append(Skipped(w.key, f"{type(e).__name__}: {e}", failed=True, role=w.role))
        else:
            ready.append(w)
    rest = TimingConfig(warmup=max(0, config.warmup - 1), repeats=config.repeats)
    timings = round_robin([w.fn for w in ready], config=rest, device=device)
    return [Figure.of(w, t) for w, t in zip(ready, timings, strict=True)], skipped


def confirm(
    figures: list[Figure],
    workloads: list[Workload],
    recheck: Recheck,
    *,
    report: BenchReport,
    timing: TimingConfig,
    device,
    log: Log,
) -> list[Figure]:
    """``figures`` of one group, timed again (all of them, round-robin) while ``recheck`` finds drops.

    Each pass adds ``timing.repeats`` rounds to every figure (warm already: no warm-up); a figure
    stays the best of its rounds, and ``rechecks`` in its attributes counts the passes.
    """
    by_key = {w.key: w for w in workloads}
    for n in range(1, recheck.passes + 1):
        suspects = recheck.suspects(BenchReport(report.settings, report.machine, figures).to_dict())
        if not suspects:
            break
        named = ", ".join(sorted(suspects)[:3]) + (", ..." if len(suspects) > 3 else "")
        log(f"{len(suspects)} figures dropped beyond the threshold ({named}): timing the group again "
            f"(pass {n} of {recheck.passes}); a drop counts only if it persists")
        rounds = TimingConfig(warmup=0, repeats=timing.repeats)
        try:
            timings = round_robin([by_key[f.key].fn for f in figures], config=rounds, device=device)
        except Exception as e:  # noqa: BLE001 - the first pass's figures stand; the comparison judges them
            log(f"timing again failed ({type(e).__name__}: {e}); keeping the first pass")
            break
        figures = [
            dataclasses.replace(f, seconds=f.seconds + t.seconds, attrs={**f.attrs, "rechecks": n})
            for f, t in zip(figures, timings, strict=True)
        ]
    return figures
