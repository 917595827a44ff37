"""Explanations that look off: border-heavy, diffuse or empty maps, per image and per class.

- border-heavy: border mass >= ``border`` (a uniform map puts 36% of its mass on the default 10%
  band, a map on the object far less; a planted corner shortcut far more).
- diffuse: normalised entropy >= ``entropy`` (1 is a uniform map).
- empty: the map has no positive mass at all.

Severity puts the worst first: ``(value - threshold) / (1 - threshold)`` in [0, 1], 1 for empty
maps. A class is flagged when the *mean* of its maps crosses a threshold, and empty (severity 1)
when every map of it is empty (its mean map is empty too).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from camshaft.errors import ConfigError

FLAG_COLUMNS = ["index", "path", "k", "target", "target_name", "flag", "value", "threshold", "severity"]


@dataclass(frozen=True)
class FlagRules:
    border: float = 0.5  # border-heavy at or above this border mass
    entropy: float = 0.95  # diffuse at or above this normalised entropy

    def __post_init__(self):
        bad = [f"{n} must lie in (0, 1), received {v}" for n, v in (("border", self.border), ("entropy", self.entropy)) if not 0 < v < 1]
        if bad:
            raise ConfigError("; ".join(bad))

    def checks(self) -> list[tuple[str, str, float]]:
        """(flag name, statistic column, threshold) of the threshold rules."""
        return [("border-heavy", "border_mass", self.border), ("diffuse", "entropy", self.entropy)]


def severity(value, threshold: float):
    return (np.asarray(value, dtype=np.float64) - threshold) / (1.0 - threshold)


def flag_images(images: pd.DataFrame, rules: FlagRules) -> pd.DataFrame:
    """One row per (image, target, flag) that fires, worst first."""
    parts = []
    for name, column, threshold in rules.checks():
        hit = images[images[column] >= threshold]
        parts.append(hit.assign(flag=name, value=hit[column], threshold=threshold, severity=severity(hit[column], threshold)))
    empty = images[images["empty"].astype(bool)]
    parts.append(empty.assign(flag="empty", value=0.0, threshold=np.nan, severity=1.0))
    parts = [p[FLAG_COLUMNS] for p in parts if len(p)]
    if not parts:
        return pd.DataFrame(columns=FLAG_COLUMNS)
    out = pd.concat(parts, ignore_index=True)
    order = ["severity", "index", "k", "flag"]
    return out.sort_values(order, ascending=[False, True, True, True], kind="stable").reset_index(drop=True)


def flag_classes(classes: pd.DataFrame, rules: FlagRules) -> pd.DataFrame:
    """``classes`` with ``flags`` (comma-separated, '' when none) and ``severity`` columns."""
    flags = [[] for _ in range(len(classes))]
    worst = np.full(len(classes), -np.inf)
    for name, column, threshold in rules.checks():
        mean = classes[f"mean_{column}"].to_numpy(dtype=np.float64)
        sev = severity(mean, threshold)
        for i in np.flatnonzero(mean >= threshold):
            flags[i].append(name)
        worst = np.fmax(worst, sev)
    share = classes["empty"].to_numpy(dtype=np.float64) if "empty" in classes else np.zeros(len(classes))
    all_empty = share >= 1.0  # NaN, a class only labels name: no
    for i in np.flatnonzero(all_empty):
        flags[i].append("empty")
    worst = np.where(all_empty, 1.0, worst)
    return classes.assign(flags=[", ".join(f) for f in flags], severity=worst)
