"""Argument checks shared by every layer of the package (no dependencies beyond the standard library)."""

from __future__ import annotations

import operator
from typing import Any


def check_int(value: Any, name: str, *, minimum: int | None = None) -> int:
    """``value`` as an ``int`` when it is an integer of at least ``minimum``; otherwise ``ValueError`` naming ``name``
    and the value given.

    An integer is a Python ``int`` or any single integer that ``operator.index`` reads: a numpy integer, a 0-d
    integer array or tensor. Booleans (Python's, numpy's, a boolean tensor) and floats, even whole ones such as
    ``2.0``, are refused: a count given as a flag or a float is usually a slip upstream.
    """
    number = _as_int(value)
    if number is None or (minimum is not None and number < minimum):
        raise ValueError(f"{name} must be {_integer_kind(minimum)}, got {value!r}")
    return number


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
        return None
    if getattr(value, "ndim", 0) != 0:  # torch reads a one-element tensor of any shape as an index
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _integer_kind(minimum: int | None) -> str:
    if minimum is None:
        return "an integer"
    if minimum == 0:
        return "a non-negative integer"
    if minimum == 1:
        return "a positive integer"
    return f"an integer >= {minimum}"
