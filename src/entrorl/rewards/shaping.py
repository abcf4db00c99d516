"""Reward shaping: DAPO's soft overlong punishment (arXiv 2503.14476).

With ``L_max = max_length`` and ``L_cache = cache_length`` (the last ``L_cache`` tokens of the budget
form a punishment interval)::

    R_len(y) = 0                                      if |y| <= L_max - L_cache
             = ((L_max - L_cache) - |y|) / L_cache    if L_max - L_cache < |y| <= L_max
             = -1                                     if |y| > L_max

scaled by ``penalty_factor`` and added to the task reward. The penalty is continuous: it is 0 at
``L_max - L_cache`` and ``-penalty_factor`` at ``L_max``. DAPO uses ``L_max = 20480``,
``L_cache = 4096``, ``penalty_factor = 1.0`` (generation budget 20480 tokens).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from entrorl._checks import as_tensor, check_int, in_float64, is_real_number

__all__ = ["overlong_penalty", "overlong_penalties", "validate_overlong"]

_OVERLONG_KEYS = ("max_length", "cache_length", "penalty_factor")


def _check(max_length: Any, cache_length: Any, penalty_factor: Any) -> tuple[int, int, float]:
    max_length = check_int(max_length, "max_length", minimum=1)
    cache_length = check_int(cache_length, "cache_length")
    if not 0 < cache_length <= max_length:
        raise ValueError(f"cache_length must lie in (0, max_length={max_length}], got {cache_length}")
    if (
        not is_real_number(penalty_factor)
        or not math.isfinite(penalty_factor)
        or penalty_factor < 0
    ):
        raise ValueError(f"penalty_factor must be a finite number >= 0, got {penalty_factor!r}")
    return max_length, cache_length, float(penalty_factor)


def overlong_penalty(length: int, *, max_length: int, cache_length: int, penalty_factor: float = 1.0) -> float:
    """DAPO soft overlong penalty (<= 0) of a response of ``length`` tokens.

    ``0`` if ``length <= max_length - cache_length``; ``((max_length - cache_length) - length) /
    cache_length * penalty_factor`` up to ``max_length``; ``-penalty_factor`` beyond. Raises
    ``ValueError`` unless ``0 < cache_length <= max_length``, ``length >= 0`` and
    ``penalty_factor >= 0``.
    """
    max_length, cache_length, factor = _check(max_length, cache_length, penalty_factor)
    length = check_int(length, "length", minimum=0)
    expected = max_length - cache_length
    if length <= expected:
        return 0.0
    if length > max_length:
        return -factor
    return (expected - length) / cache_length * factor


def overlong_penalties(
    lengths: Sequence[int] | torch.Tensor, *, max_length: int, cache_length: int, penalty_factor: float = 1.0
) -> torch.Tensor:
    """:func:`overlong_penalty` of every length, as a float32 tensor ``[n]``."""
    max_length, cache_length, factor = _check(max_length, cache_length, penalty_factor)
    t = as_tensor(lengths)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() != 1:
        raise ValueError("lengths must be a 1-d sequence of integers")
    if t.numel() and int(t.min()) < 0:
        raise ValueError("lengths must be >= 0")
    expected = max_length - cache_length
    pen = ((expected - in_float64(t)) / cache_length * factor).clamp(min=-factor, max=0.0)
    return pen.to(device=t.device, dtype=torch.float32)


def validate_overlong(config: Mapping[str, Any]) -> dict[str, Any]:
    """Check an overlong-shaping config ``{"max_length", "cache_length", "penalty_factor"?}`` and
    return it as a plain dict with all three keys. Raises ``ValueError`` for unknown or missing keys
    or bad values."""
    if not isinstance(config, Mapping):
        raise ValueError(f"overlong config must be a mapping, got {type(config).__name__}")
    unknown = set(config) - set(_OVERLONG_KEYS)
    if unknown:
        raise ValueError(f"unknown overlong option(s) {sorted(unknown)}; accepted: {list(_OVERLONG_KEYS)}")
    missing = {"max_length", "cache_length"} - set(config)
    if missing:
        raise ValueError(f"overlong config is missing {sorted(missing)}")
    max_length, cache_length, factor = _check(
        config["max_length"], config["cache_length"], config.get("penalty_factor", 1.0)
    )
    return {"max_length": max_length, "cache_length": cache_length, "penalty_factor": factor}
