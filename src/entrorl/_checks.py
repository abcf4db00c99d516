"""Argument checks shared by every layer of the package (no dependencies beyond the standard library)."""

from __future__ import annotations

import numbers
from typing import Any


def check_int(value: Any, name: str, *, minimum: int | None = None) -> int:
    """``value`` as an ``int`` when it is an integer (a Python or numpy integer, not a ``bool``) of at least
    ``minimum``; otherwise ``ValueError`` naming ``name`` and the value given.

    A float, even a whole one such as ``2.0``, is refused: a count given as a float is usually a slip upstream.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (minimum is not None and value < minimum):
        raise ValueError(f"{name} must be {_integer_kind(minimum)}, got {value!r}")
    return int(value)


def _integer_kind(minimum: int | None) -> str:
    if minimum is None:
        return "an integer"
    if minimum == 0:
        return "a non-negative integer"
    if minimum == 1:
        return "a positive integer"
    return f"an integer >= {minimum}"
