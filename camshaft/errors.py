"""Every error camshaft raises on purpose, in one place.

Messages say what was wrong, what was received, the valid choices and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable


def _choices(choices: Iterable[str], limit: int = 40) -> str:
    items = list(choices)
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


class Interrupted(Exception):
    """A run was told to stop (Ctrl-C) between two batches: the partition in flight is dropped, unfinished."""


class CamshaftError(Exception):
    """Base class of camshaft's own errors."""


class ConfigError(CamshaftError, ValueError):
    """A flag, job field or argument is invalid; raised before any work starts."""


class UnknownNameError(ConfigError):
    """A name (method, backend, tap, architecture) is not among the valid choices."""

    def __init__(self, kind: str, received: str, choices: Iterable[str], hint: str = ""):
        self.kind, self.received, self.choices = kind, received, list(choices)
        msg = f"unknown {kind} {received!r}; valid choices: {_choices(self.choices)}"
        super().__init__(msg + (f". {hint}" if hint else ""))


class ModelSourceError(CamshaftError, ValueError):
    """A model specification could not be resolved; lists every interpretation tried."""

    def __init__(self, spec: str, tried: list[str]):
        self.spec, self.tried = spec, tried
        lines = "\n".join(f"  - {t}" for t in tried)
        super().__init__(f"could not load model {spec!r}; tried:\n{lines}")


class CapabilityError(CamshaftError, TypeError):
    """A method asked a backend for something it cannot compute."""


class ParityError(CamshaftError, RuntimeError):
    """An exported artifact disagrees with the eager model beyond tolerance."""


class ImageDecodeError(CamshaftError, ValueError):
    """An input image could not be read; the reason goes into the results table."""
