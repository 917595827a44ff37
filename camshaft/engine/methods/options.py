"""Parsers for method options given on the command line (they raise ValueError with the fix)."""

from __future__ import annotations


def positive_int(text: str | int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"expected a positive integer, received {text!r}")
    return value


def non_negative_float(text: str | float) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"expected a number >= 0, received {text!r}")
    return value
