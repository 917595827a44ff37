"""Job files for nightly runs: ``camshaft run JOB.toml`` with the fields of ``camshaft explain``.

Keys are the CLI's flags (``batch-size`` or ``batch_size``); ``[options]`` holds the method's
options; relative paths are taken from the job file's folder. Every problem is reported at once,
before any work starts.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from camshaft.engine.job import ExplainJob
from camshaft.errors import ConfigError

PATHS = ("data", "out", "weights", "class_names")
PAIRS = {"input_size": 2, "mean": 3, "std": 3}


def load_job(path: str | Path) -> ExplainJob:
    """Read and validate a TOML job file into an ``ExplainJob``."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read job file {path}: {e}") from e
    fields = {f.name for f in dataclasses.fields(ExplainJob)}
    values = {key.replace("-", "_"): value for key, value in raw.items()}
    problems = [f"unknown key {k!r}" for k in sorted(set(values) - fields)]
    missing = [k for k in ("data", "out") if k not in values]
    problems += [f"missing key {k!r}" for k in missing]
    if "model" in values and not isinstance(values["model"], str):
        problems.append("model must be a string")
    for key in PATHS:
        if isinstance(values.get(key), str):
            values[key] = (path.parent / values[key]).resolve()
    if isinstance(values.get("model"), str) and (path.parent / values["model"]).exists():
        values["model"] = str((path.parent / values["model"]).resolve())
    for key, n in PAIRS.items():
        value = values.get(key)
        if isinstance(value, (int, float)):
            values[key] = (value,) * n
        elif isinstance(value, list):
            values[key] = tuple(value) if len(value) == n else problems.append(f"{key} needs {n} values, got {value}")
    if "options" in values and not isinstance(values["options"], dict):
        problems.append("[options] must be a table of the method's options")
    if problems:
        raise ConfigError(f"job file {path}: " + "; ".join(p for p in problems if p))
    values.setdefault("model", None)  # the built-in demo model
    if isinstance(values.get("method"), list):
        values["method"] = tuple(values["method"])
    try:
        return ExplainJob(**values)
    except TypeError as e:
        raise ConfigError(f"job file {path}: {e}") from e
