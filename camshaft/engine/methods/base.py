"""The method registry. A method maps a batch and its targets to low-resolution maps.

Every method takes ``x`` (B, 3, H, W), a selector ``logits -> targets (B, K)`` and its options, and
returns maps (B, K, h, w) plus the backend ``Output`` it used (logits and the targets chosen).
Upsampling, normalisation and colouring are shared post-processing. Methods declare what they
need from a backend (``needs``) and their options (``options``: the CLI's flags come from them).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from camshaft.engine.backends.base import FORWARD, INPUT_GRADIENTS, TAP_GRADIENTS, Backend, Output, Selector, require
from camshaft.errors import CapabilityError, ConfigError, UnknownNameError
from camshaft.models.layout import as_maps

RunFn = Callable[[Backend, torch.Tensor, Selector, "str | None", dict], "tuple[torch.Tensor, Output]"]


@dataclass(frozen=True)
class Option:
    """A method option: ``--name`` on the CLI, a keyword in the API."""

    name: str  # python name; the flag is --name-with-dashes
    parse: Callable[[str], Any]  # CLI string -> value
    default: Any
    help: str
    # True: it sets only how much work runs at once (memory); the maps depend on it by float rounding at most,
    # as on the batch size, so a run resumes or updates across a change of it
    memory: bool = False


@dataclass(frozen=True)
class Method:
    name: str
    needs: frozenset[str]  # FORWARD, TAP_GRADIENTS, INPUT_GRADIENTS
    fn: RunFn  # (backend, x, select, tap, options) -> (maps, output)
    summary: str = ""
    validate: Callable[[Backend, str | None], None] | None = None  # raise before any work if unusable
    options: tuple[Option, ...] = ()
    uses_tap: bool = True  # False: maps come from the input, not from a tapped layer
    paper: str = ""
    # (run's maps, input (H, W), options) -> maps whose cell (i, j) covers input pixels
    # [i H/h, (i+1) H/h) x [j W/w, (j+1) W/w), as every output places cells; None: the run's already do
    tiles: Callable[[torch.Tensor, tuple[int, int], dict], torch.Tensor] | None = None
    # the resolved options checked together (occlusion: stride against window); raises ConfigError
    check: Callable[[dict], None] | None = None
    # the resolved options against the model input (H, W), once the model is loaded and before an export or
    # any image (occlusion: a window larger than the input); raises ConfigError
    check_input: Callable[[tuple[int, int], dict], None] | None = None

    def resolve_options(self, given: dict | None) -> dict:
        """Defaults completed with ``given``; unknown names fail with the valid ones."""
        given = dict(given or {})
        valid = {o.name: o for o in self.options}
        unknown = sorted(set(given) - set(valid))
        if unknown:
            raise ConfigError(
                f"method {self.name!r} has no options {unknown}; its options: {', '.join(valid) or 'none'}"
            )
        resolved, problems = {}, []
        for name, o in valid.items():
            value = given.get(name)
            if value is None:  # as an unset CLI flag: the method's own default
                value = o.default
            else:  # parsed as the CLI parses its flags: job files and the API too
                try:
                    value = o.parse(value)
                except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
                    problems.append(f"{name}: {e}")
            resolved[name] = value
        if problems:
            raise ConfigError(f"invalid options of method {self.name!r}: " + "; ".join(problems))
        if self.check is not None:
            self.check(resolved)
        return resolved

    def run(self, backend: Backend, x: torch.Tensor, select: Selector, *, tap: str | None, options: dict | None = None):
        """Maps (B, K, h, w) and the backend output for the batch ``x``."""
        return self.fn(backend, x, select, tap if self.uses_tap else None, self.resolve_options(options))

    def explain(
        self, backend: Backend, x: torch.Tensor, select: Selector, *, tap: str | None, options: dict | None = None
    ):
        """``run``, its maps as outputs place them: cells that tile the input evenly (see ``tiles``)."""
        options = self.resolve_options(options)
        maps, out = self.fn(backend, x, select, tap if self.uses_tap else None, options)
        return (maps if self.tiles is None else self.tiles(maps, tuple(x.shape[-2:]), options)), out


def feature_map(out: Output, tap: str, method: str, size: Sequence[int]) -> torch.Tensor:
    """The tap's activations as (B, C, h, w) feature maps for inputs of ``size`` (H, W); its gradients,
    when the output has them, follow (``camshaft.models.layout``).

    Channels-last maps (B, h, w, C) are moved to (B, C, h, w); a transformer's tokens (B, T, C) are a
    map when they tile a square: T = 1 + h * h (a class token first, dropped: ViT) or T = h * h. Any other
    shape (a flattened or pooled vector) is refused with that shape, by the probe run on a black image
    before any image is read."""
    a = out.taps[tap] = as_maps(out.taps[tap], size)
    if out.grads is not None and tap in out.grads:
        out.grads[tap] = as_maps(out.grads[tap], size, lead=2)
    if a.dim() != 4:
        shape = "x".join(str(n) for n in a.shape[1:]) or "a scalar"
        raise ConfigError(
            f"tap {tap!r} outputs {shape} per image, not a (C, h, w) feature map nor tokens (T, C) that tile a "
            f"square (T = h*h, or 1 + h*h with a class token), which {method} needs: choose a layer with a spatial "
            "output (camshaft inspect MODEL lists the layers and their shapes)"
        )
    return a


def tap_method(
    compute: Callable[[Backend, Output, str, dict], torch.Tensor], *, gradients: bool, name: str = "this method"
) -> RunFn:
    """A method computed from one forward (and one batched backward to the tap when ``gradients``)
    on a tap whose activations are (B, C, h, w) feature maps."""

    def fn(backend: Backend, x: torch.Tensor, select: Selector, tap: str, options: dict):
        if gradients:
            out = backend.tap_gradients(x, select)
        else:
            out = backend.forward(x)
            out.targets = select(out.logits)
        feature_map(out, tap, name, x.shape[-2:])
        return compute(backend, out, tap, options), out

    return fn


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def method_names() -> list[str]:
    return list(_METHODS)


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise UnknownNameError("method", name, _METHODS)
    return _METHODS[name]


def all_options() -> dict[str, tuple[Option, list[str]]]:
    """Every option name -> (the option, the methods that take it), for the CLI."""
    out: dict[str, tuple[Option, list[str]]] = {}
    for m in _METHODS.values():
        for o in m.options:
            out.setdefault(o.name, (o, []))[1].append(m.name)
    return out


def check_backend(method: Method, backend: Backend, *, tap: str | None = None) -> None:
    """Fail before any work when ``backend`` cannot serve ``method`` (at ``tap``)."""
    require(backend, method.needs, method=method.name)
    if method.uses_tap and tap is not None and tap not in backend.info.taps:
        raise CapabilityError(f"tap {tap!r} is not served by this backend; its taps: {list(backend.info.taps)}")
    if method.validate is not None:
        method.validate(backend, tap)


__all__ = [
    "FORWARD",
    "INPUT_GRADIENTS",
    "TAP_GRADIENTS",
    "Method",
    "Option",
    "register_method",
    "method_names",
    "get_method",
    "check_backend",
    "tap_method",
    "feature_map",
    "all_options",
]
