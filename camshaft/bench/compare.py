"""Compare a run with a previous one: which figures dropped beyond a threshold.

Figures are matched by key. By default the *ratio to the limit* is compared (for the pipeline too:
its ratio to its method would fall when the method alone got faster): both were measured in the same
run, so a busier or slower machine moves numerator and denominator together and a drop means
camshaft got slower, not the machine. A figure without a limit (a model file) is compared by its
throughput, and only on the same machine. ``throughput``
compares images/s (evaluations/s for multi-forward methods), meaningful on the same machine only.
Limits and peers are never flagged: they are not camshaft's to regress. A figure the previous run
measured and this run skipped is flagged (a method that stopped working must not pass a nightly
job). Runs on another device type, dtype or CUDA-graph setting are not the same measurements (a
figure's key leaves those out): nothing is compared. Raw throughput is compared on the same
machine only (CPU or device, cores, torch threads). Other differences (versions, rounds) are listed.
Several earlier runs make one baseline (`baseline`): each figure's median over them. A folder of
saved runs (a nightly job's history) gives its newest runs of the same work (`history`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from camshaft.errors import ConfigError

METRICS = ("ratio", "throughput")
SAME_WORK = ("device", "dtype", "cuda_graphs")  # figures taken with other values measure other work
SAME_MACHINE = ("cpu", "device_name", "usable_cores", "torch_threads")  # needed to compare raw throughput


@dataclass(frozen=True)
class Change:
    key: str
    metric: str  # the JSON field compared
    previous: float
    current: float

    @property
    def relative(self) -> float:
        """current / previous - 1 (negative: slower)."""
        return self.current / self.previous - 1.0


@dataclass(frozen=True)
class Comparison:
    threshold: float
    regressions: tuple[Change, ...]
    improvements: tuple[Change, ...]
    unchanged: int
    missing: tuple[str, ...]  # in the previous run, not in this one
    new: tuple[str, ...]  # in this run only
    lost: tuple[tuple[str, str], ...] = ()  # (key, why): measured in the previous run, skipped in this one
    differences: tuple[str, ...] = ()  # what the runs were measured with that differs, e.g. "dtype: a -> b"
    refused: str = ""  # why nothing could be compared (other work or another machine), "" if compared
    runs: int = 1  # earlier runs in the baseline (several: each figure's median over them; see `baseline`)
    elsewhere: tuple[str, ...] = ()  # figures without a limit (raw throughput) the other run took on another machine
    switched: tuple[str, ...] = ()  # figures measured in both runs by different numbers (a limit in one run only)

    @property
    def compared(self) -> int:
        return len(self.regressions) + len(self.improvements) + self.unchanged

    @property
    def ok(self) -> bool:
        """No regression or lost figure, and something was compared (a nightly job must not pass on nothing)."""
        return not self.regressions and not self.lost and self.compared > 0


def _field(figure: dict, metric: str) -> str | None:
    if figure.get("role") not in ("method", "pipeline"):
        return None
    return "evaluations_per_second" if metric == "throughput" else "ratio_to_limit"


def _positive(value) -> bool:
    return isinstance(value, int | float) and value > 0


def _values(data: dict, metric: str) -> dict[str, tuple[str, float]]:
    out = {}
    for f in data.get("figures", []):
        name = _field(f, metric)
        if name and not _positive(f.get(name)) and metric == "ratio":
            name = "evaluations_per_second"  # no limit to divide by (a model file): its throughput, then
        if name and _positive(f.get(name)):
            out[f["key"]] = (name, float(f[name]))
    return out


def compare(previous: dict, current: dict, *, threshold: float = 0.1, metric: str = "ratio") -> Comparison:
    """Changes of ``metric`` from ``previous`` to ``current``; a drop beyond ``threshold`` regresses."""
    if metric not in METRICS:
        raise ConfigError(f"unknown comparison metric {metric!r}; valid: {', '.join(METRICS)}")
    if not 0 < threshold < 1:
        raise ConfigError(f"threshold must be between 0 and 1 (a fraction, 0.1 = 10%), received {threshold}")
    before, after = _values(previous, metric), _values(current, metric)
    diffs = differences(previous, current)
    fields = SAME_WORK + (SAME_MACHINE if metric == "throughput" else ())
    refused = [_said(d) for d in diffs if d[0] in fields]
    regressions, improvements, unchanged = [], [], 0
    common = before.keys() & after.keys()
    both = {k for k in common if before[k][0] == after[k][0]}  # the same field in both
    switched = tuple(sorted(common - both))
    elsewhere: tuple[str, ...] = ()
    if any(d[0] in SAME_MACHINE for d in diffs):  # raw throughput means something on the same machine only
        elsewhere = tuple(sorted(k for k in both if before[k][0] == "evaluations_per_second"))
        both -= set(elsewhere)
    skipped = {x.get("key"): x.get("reason", "") for x in current.get("skipped", []) if isinstance(x, dict)}
    lost = tuple((k, skipped[k]) for k in sorted(before.keys() - after.keys()) if k in skipped and not refused)
    if refused:  # nothing is compared, so nothing is missing or new either
        both, switched, elsewhere, before, after = set(), (), (), {}, {}
    for key in sorted(both):
        (name, old), (_, new) = before[key], after[key]
        change = Change(key, name, old, new)
        if change.relative < -threshold:
            regressions.append(change)
        elif change.relative > threshold:
            improvements.append(change)
        else:
            unchanged += 1
    return Comparison(
        threshold,
        tuple(regressions),
        tuple(improvements),
        unchanged,
        tuple(sorted(before.keys() - common)),
        tuple(sorted(after.keys() - common)),
        lost,
        tuple(map(_said, diffs)),
        "; ".join(refused),
        int(previous.get("baseline_runs", 1)),
        elsewhere,
        switched,
    )


COMPARED = ("ratio_to_limit", "evaluations_per_second")  # the numbers `compare` reads


def baseline(runs: list[dict]) -> dict:
    """One baseline from several earlier runs: each figure's compared numbers are their median over the
    runs that measured it, so one run that happened to be fast (or slow) does not set the bar.

    The newest run (by ``created``) gives the settings, machine and skipped list; a figure any run
    measured is kept. Runs of other work (device type, dtype, CUDA graphs) cannot be combined.
    """
    if len(runs) == 1:
        return runs[0]
    newest = max(runs, key=lambda r: str(r.get("created", "")))
    for run in runs:
        other = [_said(d) for d in differences(run, newest) if d[0] in SAME_WORK]
        if other:
            raise ConfigError(f"the baseline runs measured different work ({'; '.join(other)}); "
                              "combine runs of the same device, dtype and CUDA-graph setting")
    figures: dict[str, dict] = {}
    values: dict[tuple[str, str], list[float]] = {}
    for run in sorted(runs, key=lambda r: str(r.get("created", ""))):  # the newest copy of each figure last
        for f in run["figures"]:
            figures[f["key"]] = dict(f)
            for name in COMPARED:
                if _positive(f.get(name)):
                    values.setdefault((f["key"], name), []).append(float(f[name]))
    for (key, name), numbers in values.items():
        figures[key][name] = statistics.median(numbers)
    return {**newest, "figures": list(figures.values()), "baseline_runs": len(runs)}


def work_of(settings: dict) -> dict:
    """What makes two runs' figures the same measurements: device type, dtype, CUDA graphs."""
    device = settings.get("device")
    return {"device": None if device is None else str(device).split(":")[0], "dtype": settings.get("dtype"),
            "cuda_graphs": bool(settings.get("cuda_graphs"))}


@dataclass(frozen=True)
class History:
    """The runs a folder gives a baseline: ``runs`` as (path, data), oldest first; ``passed`` says what was left out."""

    folder: Path
    runs: tuple[tuple[Path, dict], ...]
    passed: tuple[str, ...]  # e.g. "3 of other work", one line each


def history(folder: str | Path, *, work: dict, keep: int, exclude: tuple[Path, ...] = ()) -> History:
    """The newest ``keep`` complete runs saved in ``folder`` (``*.json``, by their ``created`` time) that
    measured ``work`` (see `work_of`). Files that are not benchmark results, runs stopped part-way, runs of
    other work and the paths in ``exclude`` (this run's own output) are passed over and counted: a
    nightly job's folder collects all of them as settings change over the months."""
    from camshaft.bench.report import load_json

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder of saved runs")
    if keep < 1:
        raise ConfigError(f"the history must keep at least 1 run, received {keep}")
    excluded = {p.resolve() for p in exclude}
    found, other, unreadable, incomplete = [], 0, 0, 0
    for path in sorted(folder.glob("*.json")):
        if path.resolve() in excluded:
            continue
        try:
            data = load_json(path)
        except ConfigError:
            unreadable += 1
            continue
        if data.get("complete") is False:
            incomplete += 1
        elif work_of(data.get("settings") or {}) != work:
            other += 1
        else:
            found.append((path, data))
    found.sort(key=lambda r: str(r[1].get("created", "")))
    older = len(found) - keep
    passed = [f"{n} {what}" for n, what in ((max(older, 0), f"older than the newest {keep}"),
                                            (other, "of other work (device type, dtype or CUDA graphs)"),
                                            (incomplete, "stopped part-way"),
                                            (unreadable, "not camshaft benchmark results")) if n]
    return History(folder, tuple(found[-keep:]), tuple(passed))


def differences(previous: dict, current: dict) -> list[tuple[str, object, object]]:
    """What the two runs were measured with that differs, as (name, previous, current); only what both recorded."""
    out = []

    def check(name, old, new):
        if old is not None and new is not None and old != new:
            out.append((name, old, new))

    s0, s1 = previous.get("settings") or {}, current.get("settings") or {}
    m0, m1 = previous.get("machine") or {}, current.get("machine") or {}
    device = lambda s: None if s.get("device") is None else str(s["device"]).split(":")[0]  # noqa: E731
    check("device", device(s0), device(s1))
    for name in ("dtype", "cuda_graphs", "timing", "decode", "pipeline_batches"):
        check(name, s0.get(name), s1.get(name))
    for name in SAME_MACHINE:
        check(name, m0.get(name), m1.get(name))
    glibc = lambda m: None if "glibc_tunables" not in m else ("set" if m["glibc_tunables"] else "unset")  # noqa: E731
    check("GLIBC_TUNABLES", glibc(m0), glibc(m1))
    check("complete", previous.get("complete"), current.get("complete"))  # a run stopped part-way
    for old, new in _limit_variants(previous, current):  # a ratio's denominator measured another way
        out.append(("limit set by", old, new))
    v0, v1 = m0.get("versions") or {}, m1.get("versions") or {}
    for name in sorted(v0.keys() & v1.keys()):
        if v0[name] != v1[name]:
            out.append((name, v0[name], v1[name]))  # installed on one side only shows as None
    return out


def _limit_variants(previous: dict, current: dict) -> list[tuple[str, str]]:
    """(before, after) for each change of the variant that set the limit of figures in both runs (e.g. ONNX
    Runtime missing on one machine: the limit drops to TorchScript's and every ratio rises)."""

    def variants(data: dict) -> dict[str, str]:
        return {f["key"]: f["limit_variant"] for f in data.get("figures", [])
                if isinstance(f, dict) and f.get("role") == "method" and f.get("limit_variant")}

    a, b = variants(previous), variants(current)
    return sorted({(a[k], b[k]) for k in a.keys() & b.keys() if a[k] != b[k]})


def _said(difference: tuple) -> str:
    name, old, new = difference
    return f"{name} {old} -> {new}"


def format_comparison(c: Comparison) -> str:
    lines = [
        f"compared with {'the previous run' if c.runs == 1 else f'the median of {c.runs} previous runs'} "
        f"(threshold {c.threshold:.0%}): {len(c.regressions)} regressions, "
        f"{len(c.improvements)} improvements, {c.unchanged} within the threshold, "
        f"{len(c.missing)} figures no longer measured ({len(c.lost)} skipped in this run), {len(c.new)} new"
    ]
    if c.refused:
        lines.append(f"  NOTHING COMPARED: the runs measured different work or machines ({c.refused}); "
                     "compare runs of the same settings (and, for throughput, the same machine)")
    elif not c.compared:
        lines.append("  NOTHING COMPARED: no figure of camshaft's was measured in both runs "
                     "(a failure for a nightly job)")
    if c.elsewhere:
        lines.append(f"  not compared: {len(c.elsewhere)} figures without a limit (a model file: raw throughput), "
                     "which the runs took on different machines")
    if c.switched:
        lines.append(f"  not compared: {len(c.switched)} figures measured by different numbers in the two runs "
                     "(a ratio to the limit in one, raw throughput in the other)")
    if c.differences and not c.refused:
        lines.append("  the runs differ in: " + "; ".join(c.differences))
    lines += [f"  LOST {key}: measured in the previous run, skipped in this one: {why}" for key, why in c.lost]
    for tag, changes in (("REGRESSION", c.regressions), ("improved", c.improvements)):
        lines += [
            f"  {tag} {x.key}: {x.metric} {x.previous:.3g} -> {x.current:.3g} ({x.relative:+.1%})" for x in changes
        ]
    return "\n".join(lines)
