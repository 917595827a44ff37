"""Parsers for method options given on the command line (they raise ValueError with the fix).

They take the CLI's strings and the API's / job files' numbers alike, and refuse rather than round:
``steps=2.5`` is an error, not 2 steps, and ``noise=inf`` or a NaN is refused before any work (it
would only make every map NaN).
"""

from __future__ import annotations

import math
import numbers

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def _integer(text) -> int | None:
    """``text`` as an int when it is a whole number (an int, "12", 12.0), else None; booleans are not."""
    if isinstance(text, bool):
        return None
    if isinstance(text, numbers.Integral):
        return int(text)
    if isinstance(text, numbers.Real):
        return int(text) if math.isfinite(text) and float(text).is_integer() else None
    try:
        return int(str(text).strip())
    except ValueError:
        return None


def positive_int(text: str | int) -> int:
    value = _integer(text)
    if value is None or value < 1:
        raise ValueError(f"expected a positive integer, received {text!r}")
    return value


def seed(text: str | int) -> int:
    """A random seed: any integer ``torch.Generator.manual_seed`` takes."""
    value = _integer(text)
    if value is None or not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise ValueError(f"expected an integer seed between {SEED_RANGE[0]} and {SEED_RANGE[1]}, received {text!r}")
    return value


def finite_float(text: str | float) -> float:
    """A finite number (NaN and infinities refused)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(text, bool) or not math.isfinite(value):
        raise ValueError(f"expected a finite number, received {text!r}")
    return value


def non_negative_float(text: str | float) -> float:
    try:
        value = finite_float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"expected a finite number >= 0, received {text!r}")
    return value
