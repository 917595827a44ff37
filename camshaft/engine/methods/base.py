"""The method registry. A method maps a backend's output for a batch and its targets to maps.

Every method takes ``x`` (B, 3, H, W) and ``targets`` (B, K) and returns low-resolution maps
(B, K, h, w); upsampling, normalisation and colouring are shared post-processing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from camshaft.engine.backends.base import FORWARD, TAP_GRADIENTS, Backend, Output, Selector, require
from camshaft.errors import CapabilityError, UnknownNameError


@dataclass(frozen=True)
class Method:
    name: str
    needs: frozenset[str]  # FORWARD, TAP_GRADIENTS
    compute: Callable[[Backend, Output, str], torch.Tensor]  # (backend, output, tap) -> (B, K, h, w)
    summary: str = ""
    validate: Callable[[Backend, str], None] | None = None  # (backend, tap): raise if unusable

    def run(self, backend: Backend, x: torch.Tensor, select: Selector, *, tap: str) -> tuple[torch.Tensor, Output]:
        """One forward (and one batched backward when needed); ``select`` picks targets from logits."""
        if TAP_GRADIENTS in self.needs:
            out = backend.tap_gradients(x, select)
        else:
            out = backend.forward(x)
            out.targets = select(out.logits)
        return self.compute(backend, out, tap), out


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


def check_backend(method: Method, backend: Backend, *, tap: str | None = None) -> None:
    """Fail before any work when ``backend`` cannot serve ``method`` (at ``tap``)."""
    require(backend, method.needs, method=method.name)
    if tap is not None and tap not in backend.info.taps:
        raise CapabilityError(f"tap {tap!r} is not served by this backend; its taps: {list(backend.info.taps)}")
    if method.validate is not None and tap is not None:
        method.validate(backend, tap)


__all__ = ["FORWARD", "TAP_GRADIENTS", "Method", "register_method", "method_names", "get_method", "check_backend"]
