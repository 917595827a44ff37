"""Objectives for activation maximization: per-image losses read from logits and taps by name.

An objective maps :class:`Activations` of B images to a loss per image, (B,); lower is better.
Objectives never install hooks: the render loop runs a tapped model and hands them what they read.
They form a small algebra — ``-obj``, ``a + b``, ``a - b``, ``2 * obj`` — kept as a weighted sum of
terms, so every combination has a spec string the CLI parser reads back (``class:3+-0.5*l2``).

A term may also belong to a :class:`Family`: terms of one kind (class logits, channels of one
tap, ...) that differ only in a parameter. :class:`LossPlan` computes each family for all the
images of a batch in one go (a gather for N class logits), so a step costs the same few operations
for 8 objectives or 512; on a GPU, where small steps are bound by kernel launches, the per-objective
loop would launch more kernels than the network itself.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from camshaft.errors import ConfigError

__all__ = [
    "Activations",
    "Family",
    "LossPlan",
    "Objective",
    "Term",
    "channel",
    "class_logit",
    "class_prob",
    "direction",
    "layer_norm",
    "neuron",
]

Check = Callable[[Mapping[str, tuple[int, ...]], int], "list[str]"]  # (tap shapes, num classes) -> problems


@dataclass(frozen=True)
class Activations:
    """What objectives read for a group of images (float32; the images before transforms)."""

    logits: torch.Tensor  # (B, N)
    taps: Mapping[str, torch.Tensor]  # tap -> (B, C, h, w) or (B, C)
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]

    def rows(self, start: int, stop: int) -> Activations:
        """The images ``start:stop`` only (views, no copies)."""
        return Activations(self.logits[start:stop], {k: v[start:stop] for k, v in self.taps.items()},
                           self.images[start:stop])

    def tap(self, name: str) -> torch.Tensor:
        if name not in self.taps:
            raise ConfigError(f"tap {name!r} was not recorded; recorded taps: {', '.join(self.taps) or 'none'}")
        return self.taps[name]


def pick(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The rows ``rows`` of ``t`` (a copy), or all of them (``t`` itself) for None."""
    return t if rows is None else t[rows]


def _no_params(params: list, device: torch.device, group: int) -> None:
    return None


@dataclass(frozen=True, eq=False)
class Family:
    """Terms of one kind that :class:`LossPlan` computes for many images at once.

    ``prepare(params, device, group)`` turns the per-image parameters (a term's ``param``, one per
    image) into what ``loss`` reads, once per batch; ``group`` is the number of consecutive images
    that share an objective. ``loss(activations, rows, prepared)`` is the (R,) loss of the images
    ``rows`` (a LongTensor; None: all images, in order). Row for row it must equal the terms' own
    ``fn``. Terms with equal ``key`` are computed together: the key names everything the loss
    captures (the tap, say).
    """

    key: Hashable
    loss: Callable[[Activations, "torch.Tensor | None", Any], torch.Tensor] = field(repr=False)
    prepare: Callable[[list, torch.device, int], Any] = field(default=_no_params, repr=False)


@dataclass(frozen=True, eq=False)
class Term:
    """One named loss: ``fn(activations) -> (B,)``, the taps it reads and the class it targets."""

    spec: str  # as the CLI writes it, e.g. "channel:layer3:7"
    fn: Callable[[Activations], torch.Tensor] = field(repr=False)
    taps: frozenset[str] = frozenset()
    target: int | None = None  # the class whose probability measures success
    check: Check | None = field(default=None, repr=False)
    family: Family | None = field(default=None, repr=False)  # computed with its kind across images
    param: Any = field(default=None, repr=False)  # this term's parameter within its family


class Objective:
    """A weighted sum of terms; ``objective(activations)`` is the per-image loss (B,)."""

    def __init__(self, terms: Sequence[tuple[float, Term]]):
        if not terms:
            raise ConfigError("an objective needs at least one term")
        self.terms = tuple((float(w), t) for w, t in terms)

    @classmethod
    def of(cls, term: Term) -> Objective:
        return cls([(1.0, term)])

    def __call__(self, acts: Activations) -> torch.Tensor:
        total = None
        for w, t in self.terms:
            if w != 0.0:
                loss = t.fn(acts) if w == 1.0 else w * t.fn(acts)
                total = loss if total is None else total + loss
        if total is None:  # every weight was zero
            total = acts.images.new_zeros(acts.images.shape[0])
        return total  # (B,)

    @property
    def taps(self) -> frozenset[str]:
        return frozenset().union(*(t.taps for _, t in self.terms))

    @property
    def target(self) -> int | None:
        """The class of the class terms, when they name exactly one."""
        targets = {t.target for _, t in self.terms if t.target is not None}
        return targets.pop() if len(targets) == 1 else None

    @property
    def spec(self) -> str:
        return "+".join(_term_spec(w, t) for w, t in self.terms)

    def check(self, shapes: Mapping[str, tuple[int, ...]], num_classes: int) -> list[str]:
        """Problems of this objective on a model with these tap shapes (per image) and classes."""
        missing = sorted(self.taps - set(shapes))
        problems = [f"{self.spec}: tap {t!r} is not recorded" for t in missing]
        for _, t in self.terms:
            if t.check is not None and not (t.taps - set(shapes)):
                problems += [f"{self.spec}: {p}" for p in t.check(shapes, num_classes)]
        return problems

    def __neg__(self) -> Objective:
        return Objective([(-w, t) for w, t in self.terms])

    def __add__(self, other) -> Objective:
        if isinstance(other, (int, float)) and other == 0:
            return self  # sum(objectives) starts at 0
        if not isinstance(other, Objective):
            return NotImplemented
        return Objective([*self.terms, *other.terms])

    __radd__ = __add__

    def __sub__(self, other) -> Objective:
        return self + (-other) if isinstance(other, Objective) else NotImplemented

    def __mul__(self, weight) -> Objective:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            return NotImplemented
        return Objective([(w * weight, t) for w, t in self.terms])

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return f"Objective({self.spec!r})"


class LossPlan:
    """The per-image losses of a batch: image ``i`` takes objective ``i // group``'s loss.

    Terms of a :class:`Family` are computed once for all the images that carry them, weighted per
    image; other terms objective by objective, as ``Objective.__call__`` does. The plan's tensors
    (indices, parameters, weights) are made once, on ``device``, so a step copies nothing to it.
    """

    def __init__(self, objectives: Sequence[Objective], group: int, device: torch.device):
        self.group, self.size = group, len(objectives) * group
        families: dict[Hashable, tuple[Family, list[int], list, list[float]]] = {}
        self._loose: list[Objective | None] = []  # per objective: its terms of no family
        for j, o in enumerate(objectives):
            own = []
            for w, t in o.terms:
                if w == 0.0:
                    continue
                if t.family is None:
                    own.append((w, t))
                    continue
                _, rows, params, weights = families.setdefault(t.family.key, (t.family, [], [], []))
                rows.extend(range(j * group, (j + 1) * group))
                params.extend([t.param] * group)
                weights.extend([w] * group)
            self._loose.append(Objective(own) if own else None)
        self._families = []
        for family, rows, params, weights in families.values():
            index = None if rows == list(range(self.size)) else torch.tensor(rows, device=device)
            if all(w == weights[0] for w in weights):
                weight = weights[0]
            else:
                weight = torch.tensor(weights, dtype=torch.float32, device=device)
            self._families.append((family, index, family.prepare(params, device, group), weight))

    def __call__(self, acts: Activations) -> torch.Tensor:
        total = None
        for family, rows, prepared, weight in self._families:
            loss = family.loss(acts, rows, prepared)
            if not (isinstance(weight, float) and weight == 1.0):
                loss = loss * weight
            if rows is None:
                total = loss if total is None else total + loss
            else:
                total = (acts.logits.new_zeros(self.size) if total is None else total).index_add(0, rows, loss)
        if any(self._loose):
            g, pieces = self.group, []
            for j, rest in enumerate(self._loose):
                pieces.append(rest(acts.rows(j * g, (j + 1) * g)) if rest else acts.logits.new_zeros(g))
            rest = torch.cat(pieces)
            total = rest if total is None else total + rest
        if total is None:  # no term at all (weights of 0): zero, still a function of the images to differentiate
            return acts.images.flatten(1).sum(1) * 0.0
        return total  # (B,)


def _term_spec(weight: float, term: Term) -> str:
    if weight == 1.0:
        return term.spec
    if weight == -1.0:
        return "-" + term.spec
    return f"{_number(weight)}*{term.spec}"


def _number(value: float) -> str:
    """The shortest text that reads back to ``value`` exactly, with no '+' (it joins terms in a spec)."""
    short = f"{value:g}"
    return (short if float(short) == value else repr(value)).replace("e+", "e")


def _class_check(c: int) -> Check:
    def check(_shapes, num_classes):
        return [] if 0 <= c < num_classes else [f"class {c} is out of range 0..{num_classes - 1}"]

    return check


def _layout_problem(tap: str, shape) -> str | None:
    """Why a tap of this per-image shape has no channels: tokens x features that tile no square (tokens that
    do reach objectives as (C, h, w) maps: ``render``'s ``_channels_first``)."""
    if len(shape) == 2:
        return (f"tap {tap!r} has per-image shape {tuple(shape)}: tokens x features that tile no square grid "
                "(T = h*h, or 1 + h*h with a class token), not channels (C, h, w) or units (N,); channel, neuron "
                "and direction objectives need those (class, prob and layer objectives work)")
    return None


def _channel_check(tap: str, c: int, yx: tuple[int, int] | None = None) -> Check:
    def check(shapes, _num_classes):
        shape = shapes[tap]  # (C, h, w) or (C,)
        layout = _layout_problem(tap, shape)
        if layout:
            return [layout]
        if yx is not None and len(shape) == 1:
            return [f"neuron needs a spatial tap (C, h, w); tap {tap!r} has units {tuple(shape)}: "
                    f"use channel:{tap}:{c} for unit {c}"]
        if not 0 <= c < shape[0]:
            return [f"channel {c} is out of range 0..{shape[0] - 1} of tap {tap!r}"]
        if yx is not None and (len(shape) != 3 or not (0 <= yx[0] < shape[1] and 0 <= yx[1] < shape[2])):
            return [f"position {yx} is outside tap {tap!r} of shape {tuple(shape)} (C, h, w)"]
        return []

    return check


def _indices(params: list, device: torch.device, group: int) -> torch.Tensor:
    return torch.tensor(params, dtype=torch.long, device=device)


def _numbered(params: list, device: torch.device, group: int) -> tuple[torch.Tensor, ...]:
    """(row numbers 0..R-1, then one LongTensor per parameter position) for advanced indexing."""
    table = torch.tensor(params, dtype=torch.long, device=device).view(len(params), -1)
    return (torch.arange(len(params), device=device), *table.unbind(1))


_CLASS_LOGIT = Family(
    "class_logit", lambda a, rows, c: -pick(a.logits, rows).gather(1, c[:, None]).squeeze(1), _indices
)
_CLASS_PROB = Family(
    "class_prob",
    lambda a, rows, c: -torch.log_softmax(pick(a.logits, rows), dim=-1).gather(1, c[:, None]).squeeze(1),
    _indices,
)


def class_logit(c: int) -> Objective:
    """Maximise the logit of class ``c`` (Simonyan et al. 2013)."""
    return Objective.of(Term(f"class:{c}", lambda a: -a.logits[:, c], target=c, check=_class_check(c),
                             family=_CLASS_LOGIT, param=c))


def class_prob(c: int) -> Objective:
    """Maximise the probability of class ``c``, as its log-softmax (no vanishing gradient at 0)."""
    fn = lambda a: -torch.log_softmax(a.logits, dim=-1)[:, c]
    return Objective.of(Term(f"prob:{c}", fn, target=c, check=_class_check(c), family=_CLASS_PROB, param=c))


def _mean_per_image(t: torch.Tensor) -> torch.Tensor:
    """(R, ...) -> (R,): the mean over everything but the first axis (a scalar per image as it is)."""
    return t.reshape(t.shape[0], -1).mean(1)


def channel(tap: str, c: int) -> Objective:
    """Maximise the mean of channel ``c`` of ``tap`` over all positions (Olah et al. 2017)."""
    fn = lambda a: -_mean_per_image(a.tap(tap)[:, c])

    def loss(a: Activations, rows, prepared) -> torch.Tensor:
        n, cs = prepared
        return -_mean_per_image(pick(a.tap(tap), rows)[n, cs])

    family = Family(("channel", tap), loss, _numbered)
    return Objective.of(Term(f"channel:{tap}:{c}", fn, frozenset({tap}), check=_channel_check(tap, c),
                             family=family, param=c))


def neuron(tap: str, c: int, y: int | None = None, x: int | None = None) -> Objective:
    """Maximise one unit ``tap[c, y, x]``; without ``y, x`` the centre one (Erhan et al. 2009)."""
    if (y is None) != (x is None):
        raise ConfigError(f"neuron {tap}:{c}: give both y and x or neither, received y={y}, x={x}")

    def fn(a: Activations) -> torch.Tensor:
        t = a.tap(tap)  # (B, C, h, w)
        yy, xx = (t.shape[2] // 2, t.shape[3] // 2) if y is None else (y, x)
        return -t[:, c, yy, xx]

    def loss(a: Activations, rows, prepared) -> torch.Tensor:
        t = pick(a.tap(tap), rows)
        if y is None:  # the centre unit of every image: (rows, channels) and two numbers
            n, cs = prepared
            return -t[n, cs, t.shape[2] // 2, t.shape[3] // 2]
        n, cs, ys, xs = prepared
        return -t[n, cs, ys, xs]

    spec = f"neuron:{tap}:{c}" + ("" if y is None else f":{y}:{x}")
    yx = None if y is None else (y, x)
    family = Family(("neuron", tap, yx is None), loss, _numbered)
    return Objective.of(Term(spec, fn, frozenset({tap}), check=_channel_check(tap, c, yx or (0, 0)),
                             family=family, param=(c,) if yx is None else (c, *yx)))


def _layer_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).pow(2).mean(1)


def layer_norm(tap: str) -> Objective:
    """Maximise the mean squared activation of a whole layer: DeepDream (Mordvintsev et al. 2015)."""
    family = Family(("layer", tap), lambda a, rows, _: -_layer_norm(pick(a.tap(tap), rows)))
    return Objective.of(Term(f"layer:{tap}", lambda a: -_layer_norm(a.tap(tap)), frozenset({tap}), family=family))


def _stacked(params: list, device: torch.device, group: int) -> torch.Tensor:
    return torch.stack(params).to(device)


def direction(tap: str, vector: Sequence[float] | torch.Tensor, *, name: str | None = None) -> Objective:
    """Maximise the projection of ``tap``'s channel vectors on ``vector``, averaged over positions.

    Olah et al. 2017 ("Feature Visualization"); the vector is normalised to unit length.
    """
    v = torch.as_tensor(vector, dtype=torch.float32).flatten()
    norm = float(v.norm())
    if v.numel() == 0 or not norm > 0 or not torch.isfinite(v).all():
        raise ConfigError(f"direction on {tap!r} needs a finite, non-zero vector, received {v.tolist()[:8]}")
    v = v / norm

    def project(t: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """-(mean over positions of t . vector), with ``vectors`` (1 or R, C)."""
        w = vectors.view(*vectors.shape, *([1] * (t.dim() - 2)))
        return -_mean_per_image((t * w).sum(1))

    def fn(a: Activations) -> torch.Tensor:
        t = a.tap(tap)  # (B, C, ...)
        return project(t, v.to(t.device)[None])

    def check(shapes, _num_classes):
        layout = _layout_problem(tap, shapes[tap])
        if layout:
            return [layout]
        c = shapes[tap][0]
        return [] if c == v.numel() else [f"direction has {v.numel()} values, tap {tap!r} has {c} channels"]

    family = Family(("direction", tap), lambda a, rows, vectors: project(pick(a.tap(tap), rows), vectors), _stacked)
    label = name or ",".join(f"{x:.4g}" for x in v.tolist())
    return Objective.of(Term(f"direction:{tap}:{label}", fn, frozenset({tap}), check=check, family=family, param=v))
