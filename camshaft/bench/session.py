"""What the pytest-benchmark suites share over a session: opened models, the limits, the figures.

Each suite test times one workload with pytest-benchmark; ``BenchSession`` builds the workload,
makes sure the limits of its group were measured first (in the same run), and records the figure
so that the session ends with the same table and JSON as ``camshaft bench``.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from camshaft.bench.cases import Case, Group, input_batch, method_workload
from camshaft.bench.machine import machine_info
from camshaft.bench.report import BenchReport
from camshaft.bench.runner import ModelBench, limit_workloads, measure, peer_workloads, pipeline_workloads, slug
from camshaft.bench.settings import BenchSettings
from camshaft.bench.workload import Figure, Skipped, Workload

LIMIT_ROLES = ("limit", "head_backward", "input_backward")


class BenchSession:
    def __init__(self, settings: BenchSettings, *, workdir: Path, keep_models: int = 2):
        self.settings, self.workdir, self.keep = settings, Path(workdir), keep_models
        self.report = BenchReport(settings.to_dict(), machine_info(settings.device, settings.dtype))
        self._models: OrderedDict[str, ModelBench] = OrderedDict()
        self._built: dict[tuple, list] = {}  # (what, group) -> workloads, dropped with their model

    def model(self, spec: str) -> ModelBench:
        """The opened model (backends, limits' copy), the last ``keep_models`` kept open."""
        if spec in self._models:
            self._models.move_to_end(spec)
        else:
            self._models[spec] = ModelBench(spec, self.settings, self.workdir / slug(spec), lambda _: None)
            while len(self._models) > self.keep:
                gone, _ = self._models.popitem(last=False)
                self._built = {k: v for k, v in self._built.items() if k[1].model != gone}
        return self._models[spec]

    def x(self, group: Group):
        return input_batch(group, device=self.model(group.model).device, seed=self.settings.seed)

    # --- workloads ---

    def _cached(self, what: str, group: Group, build) -> list:
        self.model(group.model)
        if (what, group) not in self._built:
            self._built[(what, group)] = build()
        return self._built[(what, group)]

    def limit_workloads(self, group: Group) -> list[Workload | Skipped]:
        return self._cached("limits", group, lambda: self._limit_workloads(group))

    def _limit_workloads(self, group: Group) -> list[Workload | Skipped]:
        return limit_workloads(self.model(group.model), group, self.x(group))

    def method_workload(self, case: Case) -> Workload | Skipped:
        backend = self.model(case.group.model).backends[case.backend]
        return backend if isinstance(backend, Skipped) else method_workload(case, backend, self.x(case.group))

    def peer_workloads(self, group: Group) -> list[Workload | Skipped]:
        return self._cached("peers", group, lambda: peer_workloads(self.model(group.model), group, self.x(group)))

    def pipeline_workload(self, case: Case) -> Workload:
        return pipeline_workloads(self.model(case.group.model), case.group, [case])[0]

    # --- figures ---

    def ensure_limits(self, group: Group) -> None:
        """Measure (round-robin, outside pytest-benchmark) the group's limits not yet recorded."""
        self.ensure(self.limit_workloads(group))

    def ensure(self, items: list[Workload | Skipped]) -> None:
        """Measure those of ``items`` that have no figure yet (a test may time only one workload)."""
        done = {f.key for f in self.report.figures}
        todo = [w for w in items if isinstance(w, Workload) and w.key not in done]
        if todo:
            figures, skipped = measure(todo, self.settings.timing, device=self.model(todo[0].attrs["model"]).device)
            self.report.figures += figures
            self.report.skipped += skipped

    def record(self, workload: Workload, seconds: list[float]) -> Figure:
        from camshaft.bench.timing import Timing

        figure = Figure.of(workload, Timing(tuple(seconds)))
        self.report.figures = [f for f in self.report.figures if f.key != figure.key] + [figure]
        return figure

    def derived(self, key: str) -> dict:
        from camshaft.bench.ratios import derive

        return derive(self.report.figures).get(key, {})
