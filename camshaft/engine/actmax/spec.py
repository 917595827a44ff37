"""The objective shorthand of the CLI, and the registry of objective kinds it reads.

A spec is a sum of terms joined by ``+``; a term is ``[-][WEIGHT*]KIND[:ARGS]``. A term naming
several units (``class:0-9``, ``channel:layer3:0,5``) expands into one objective per unit; terms of a
sum expand together, a term naming one unit joins each: ``class:0-9+0.1*layer:layer3``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from camshaft.engine.actmax import objectives as O
from camshaft.engine.actmax import regularizers as R
from camshaft.engine.actmax.objectives import Objective
from camshaft.errors import ConfigError

__all__ = [
    "ObjectiveKind",
    "objective_kinds",
    "parse_objective",
    "parse_objectives",
    "register_objective_kind",
    "syntax_help",
]


@dataclass(frozen=True)
class Names:
    """What the parser knows of the model's classes (either may be unknown)."""

    class_names: tuple[str, ...] | None = None
    num_classes: int | None = None


@dataclass(frozen=True)
class ObjectiveKind:
    name: str  # the spec's first field
    syntax: str  # e.g. "class:I[-J][,K|NAME...]"
    build: Callable[[list[str], Names], list[Objective]]  # args after the name -> objectives
    help: str = ""


_KINDS: dict[str, ObjectiveKind] = {}


def register_objective_kind(kind: ObjectiveKind) -> ObjectiveKind:
    if kind.name in _KINDS:
        raise ValueError(f"objective kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


def objective_kinds() -> list[str]:
    return list(_KINDS)


def syntax_help() -> str:
    """Every kind's syntax, for error messages and ``--help``."""
    forms = ", ".join(k.syntax for k in _KINDS.values())
    return f"{forms}; prefix '-' to negate, 'W*' to weight, join terms with '+'"


_TERM = re.compile(r"\s*(-)?\s*(?:((?:\d+\.?\d*|\.\d+)(?:[eE]-?\d+)?)\s*\*)?\s*(\S.*?)\s*")


def parse_objective(text: str, *, class_names: Sequence[str] | None = None,
                    num_classes: int | None = None) -> list[Objective]:
    """One spec -> its objectives (several when a term names several units)."""
    names = Names(None if class_names is None else tuple(class_names), num_classes)
    if not text.strip():
        raise ConfigError(f"empty objective; valid syntax: {syntax_help()}")
    expanded = [_parse_term(text, term, names) for term in text.split("+")]
    counts = {len(e) for e in expanded if len(e) > 1}
    if len(counts) > 1:
        raise ConfigError(f"objective {text!r}: its terms name {sorted(counts)} units; "
                          "terms of a sum must name the same number of units, or one")
    n = counts.pop() if counts else 1
    return [sum(e[i if len(e) > 1 else 0] for e in expanded) for i in range(n)]


def parse_objectives(texts: Sequence[str], *, class_names: Sequence[str] | None = None,
                     num_classes: int | None = None) -> list[Objective]:
    """Several specs -> their objectives in order; every bad spec is named in one error."""
    out, problems = [], []
    for text in texts:
        try:
            out += parse_objective(text, class_names=class_names, num_classes=num_classes)
        except ConfigError as e:
            problems.append(str(e).split("; valid syntax:")[0])
    if problems:
        raise ConfigError("; ".join(problems) + f"; valid syntax: {syntax_help()}")
    return out


def _parse_term(text: str, term: str, names: Names) -> list[Objective]:
    m = _TERM.fullmatch(term)
    if m is None:
        raise ConfigError(f"objective {text!r}: empty term; valid syntax: {syntax_help()}")
    negate, weight, body = m.groups()
    kind_name, _, rest = body.partition(":")
    if "*" in kind_name:  # a weight the pattern did not read as a number
        raise ConfigError(f"objective {text!r}: weight {kind_name.rpartition('*')[0].strip()!r} is not a number "
                          f"(write e.g. 0.5*{kind_name.rpartition('*')[2].strip()}); valid syntax: {syntax_help()}")
    if kind_name not in _KINDS:
        raise ConfigError(f"objective {text!r}: unknown kind {kind_name!r} (kinds: {', '.join(_KINDS)}); "
                          f"valid syntax: {syntax_help()}")
    kind = _KINDS[kind_name]
    try:
        built = kind.build(rest.split(":") if rest else [], names)
    except ConfigError as e:
        raise ConfigError(f"objective {text!r}: {e}; expected {kind.syntax}; valid syntax: {syntax_help()}") from e
    w = (-1.0 if negate else 1.0) * (float(weight) if weight else 1.0)
    if not math.isfinite(w):
        raise ConfigError(f"objective {text!r}: weight {weight} is too large; valid syntax: {syntax_help()}")
    return [w * o for o in built]


def _ints(text: str, what: str) -> list[int]:
    """``3``, ``0-9``, ``1,5,7`` and mixtures -> indices in the order given."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if m is None:
            raise ConfigError(f"{what} {item!r} is not an index or a range I-J")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if hi < lo:
            raise ConfigError(f"{what} range {item!r} is empty")
        out += range(lo, hi + 1)
    if not out:
        raise ConfigError(f"no {what} given")
    return out


def _classes(text: str, names: Names) -> list[int]:
    out, bad = [], []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if names.class_names and item in names.class_names:
            out.append(names.class_names.index(item))
            continue
        if re.fullmatch(r"\d+(-\d+)?", item):
            out += _ints(item, "class")  # a range's own error is more precise than 'unknown'
        else:
            bad.append(item)
    if bad:
        known = f"; class names: {', '.join(names.class_names[:10])}..." if names.class_names else ""
        raise ConfigError(f"unknown classes {bad} (use indices, ranges I-J{' or names' if known else ''}{known})")
    if names.num_classes is not None and (wrong := [c for c in out if c >= names.num_classes]):
        raise ConfigError(f"classes {wrong[:8]} are out of range 0..{names.num_classes - 1}")
    if not out:
        raise ConfigError("no class given")
    return out


def _arity(args: list[str], low: int, high: int) -> None:
    if not low <= len(args) <= high:
        raise ConfigError(f"expected {low}{'' if low == high else f' to {high}'} fields after the kind, "
                          f"received {len(args)}")
    if empty := [i + 1 for i, a in enumerate(args) if not a.strip()]:
        raise ConfigError(f"field {empty[0]} after the kind is empty")


def _class_kind(make: Callable[[int], Objective]) -> Callable[[list[str], Names], list[Objective]]:
    def build(args, names):
        if len(args) < 1 or not args[0]:
            raise ConfigError("expected classes after the kind")
        return [make(c) for c in _classes(":".join(args), names)]

    return build


def _channel(args, _names):
    _arity(args, 2, 2)
    return [O.channel(args[0], c) for c in _ints(args[1], "channel")]


def _neuron(args, _names):
    if len(args) not in (2, 4):
        raise ConfigError(f"expected TAP:C or TAP:C:Y:X, received {len(args)} fields")
    yx = [int(v) for v in args[2:] if re.fullmatch(r"\d+", v)]
    if len(yx) != len(args) - 2:
        raise ConfigError(f"Y and X must be non-negative integers, received {args[2:]}")
    return [O.neuron(args[0], c, *yx) for c in _ints(args[1], "channel")]


def _layer(args, _names):
    _arity(args, 1, 1)
    return [O.layer_norm(args[0])]


def _direction(args, _names):
    if len(args) < 2 or not args[0]:
        raise ConfigError("expected TAP:V1,V2,... or TAP:FILE (.pt or .npy)")
    tap, value = args[0], ":".join(args[1:])
    if Path(value).suffix in (".pt", ".npy"):
        return [O.direction(tap, _load_vector(Path(value)), name=value)]
    try:
        vector = [float(v) for v in value.split(",")]
    except ValueError as e:
        raise ConfigError(f"direction values must be numbers, received {value!r}") from e
    return [O.direction(tap, vector)]


def _load_vector(path: Path) -> torch.Tensor:
    if not path.is_file():
        raise ConfigError(f"direction file not found: {path}")
    if path.suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(path, allow_pickle=False)).float()
    value = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"direction file {path} holds a {type(value).__name__}, expected a tensor")
    return value.float()


def _plain(make: Callable[[], Objective]):
    def build(args, _names):
        _arity(args, 0, 0)
        return [make()]

    return build


def _diversity(args, _names):
    _arity(args, 1, 1)
    return [R.diversity(args[0])]


for _kind in (
    ObjectiveKind("class", "class:I[-J][,K|NAME]", _class_kind(O.class_logit), "class logit"),
    ObjectiveKind("prob", "prob:I[-J][,K|NAME]", _class_kind(O.class_prob), "class log-probability (softmax)"),
    ObjectiveKind("channel", "channel:TAP:C[-D][,E]", _channel, "mean of a channel of a tap"),
    ObjectiveKind("neuron", "neuron:TAP:C[:Y:X]", _neuron, "one unit (the centre one without Y:X)"),
    ObjectiveKind("layer", "layer:TAP", _layer, "mean squared activation of a tap (DeepDream)"),
    ObjectiveKind("direction", "direction:TAP:V1,V2,...|FILE", _direction, "a direction in channel space"),
    ObjectiveKind("l2", "l2", _plain(R.l2), "L2 decay toward grey (regularizer)"),
    ObjectiveKind("tv", "tv", _plain(R.total_variation), "total variation (regularizer)"),
    ObjectiveKind("freq", "freq", _plain(R.frequency_penalty), "high-frequency penalty (regularizer)"),
    ObjectiveKind("diversity", "diversity:TAP", _diversity, "Gram-matrix diversity of copies (regularizer)"),
):
    register_objective_kind(_kind)
