"""Class names a user supplies for a model (``--class-names FILE``).

A text file with one name per line (class 0 first), or a JSON file holding a list of names or an
object from class index to name (``{"0": "cat", "1": "dog"}``; a value may be a list whose last
item is the name, as in ``imagenet_class_index.json``). Names must be non-empty and distinct:
``--targets`` and objectives look classes up by name.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from camshaft.errors import ConfigError


def read_class_names(path: str | Path) -> tuple[str, ...]:
    """The names in ``path``, checked; a clear ConfigError for anything a user could get wrong."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"class names file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"class names file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"cannot read class names file {path}: {e.strerror or e}") from None
    names = _from_json(text, path) if path.suffix.lower() == ".json" else _from_lines(text, path)
    return check_names(names, where=str(path))


def _from_lines(text: str, path: Path) -> list[str]:
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()  # a trailing blank line is the file's end, not a class
    blank = [i + 1 for i, line in enumerate(lines) if not line]
    if blank:
        raise ConfigError(f"class names file {path}: line {blank[0]} is blank (one class name per line, class 0 first)")
    return lines


def _from_json(text: str, path: Path) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"class names file {path} is not valid JSON: {e.msg} (line {e.lineno})") from None
    if isinstance(data, dict):
        try:
            indexed = {int(k): v for k, v in data.items()}
        except ValueError:
            raise ConfigError(f"class names file {path}: the keys of a JSON object must be class indices") from None
        if sorted(indexed) != list(range(len(indexed))):
            last = len(indexed) - 1
            raise ConfigError(f"class names file {path}: the indices must run from 0 to {last} without gaps")
        data = [_name(indexed[i]) for i in range(len(indexed))]
    if not isinstance(data, list) or not all(isinstance(v, str) for v in data):
        raise ConfigError(f"class names file {path}: expected a JSON list of names or an object from index to name")
    return [v.strip() for v in data]


def _name(value):
    """A value of an index -> name object: the name, or ``[id, name]`` (imagenet_class_index.json)."""
    return value[-1] if isinstance(value, list) and value else value


def check_names(names: Sequence[str], *, where: str) -> tuple[str, ...]:
    names = tuple(names)
    if not names:
        raise ConfigError(f"class names from {where}: no names")
    empty = [i for i, n in enumerate(names) if not n]
    if empty:
        raise ConfigError(f"class names from {where}: class {empty[0]} has an empty name")
    repeated = [n for n, c in Counter(names).items() if c > 1]
    if repeated:
        raise ConfigError(f"class names from {where}: repeated names {repeated[:5]} (classes are looked up by name)")
    return names


def check_count(names: Sequence[str] | None, num_classes: int, *, model: str) -> None:
    """One name per output of the model, or a ConfigError saying how many there are of each."""
    if names is not None and len(names) != num_classes:
        raise ConfigError(f"{len(names)} class names for {model}, which has {num_classes} classes (outputs)")
