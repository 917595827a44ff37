"""Compare a run with a previous one: which figures dropped beyond a threshold.

Figures are matched by key. By default the *ratio to the limit* is compared (the pipeline's ratio
to its method): both were measured in the same run, so a busier or slower machine moves numerator
and denominator together and a drop means camshaft got slower, not the machine. ``throughput``
compares images/s (evaluations/s for multi-forward methods), meaningful on the same machine only.
Limits and peers are never flagged: they are not camshaft's to regress.
"""

from __future__ import annotations

from dataclasses import dataclass

from camshaft.errors import ConfigError

METRICS = ("ratio", "throughput")


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

    @property
    def compared(self) -> int:
        return len(self.regressions) + len(self.improvements) + self.unchanged

    @property
    def ok(self) -> bool:
        """No regression, and something was compared (a nightly job must not pass on nothing)."""
        return not self.regressions and self.compared > 0


def _field(figure: dict, metric: str) -> str | None:
    if figure.get("role") not in ("method", "pipeline"):
        return None
    if metric == "throughput":
        return "evaluations_per_second"
    return "ratio_to_method" if figure["role"] == "pipeline" else "ratio_to_limit"


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
    regressions, improvements, unchanged = [], [], 0
    both = {k for k in before.keys() & after.keys() if before[k][0] == after[k][0]}  # the same field in both
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
        tuple(sorted(before.keys() - both)),
        tuple(sorted(after.keys() - both)),
    )


def format_comparison(c: Comparison) -> str:
    lines = [
        f"compared with the previous run (threshold {c.threshold:.0%}): {len(c.regressions)} regressions, "
        f"{len(c.improvements)} improvements, {c.unchanged} within the threshold, "
        f"{len(c.missing)} figures no longer measured, {len(c.new)} new"
    ]
    if not c.compared:
        lines.append("  NOTHING COMPARED: no figure of camshaft's was measured in both runs "
                     "(a failure for a nightly job)")
    for tag, changes in (("REGRESSION", c.regressions), ("improved", c.improvements)):
        lines += [
            f"  {tag} {x.key}: {x.metric} {x.previous:.3g} -> {x.current:.3g} ({x.relative:+.1%})" for x in changes
        ]
    return "\n".join(lines)
