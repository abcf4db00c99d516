"""Data selection for RL: DAPO dynamic sampling and pass-rate band filtering.

* **Dynamic sampling** (DAPO, arXiv 2503.14476): a group whose sampled answers all got the same reward
  has zero group-normalised advantage and gives no gradient signal; DAPO drops such groups and samples
  more prompts until the batch is full. :func:`informative_groups` marks, per sample, whether its group
  is worth keeping; :func:`group_pass_rates` gives each group's share of correct samples.
* **Pass-rate filtering**: keep the prompts whose base-model pass rate lies in a band such as
  ``[0.1, 0.5]`` or ``(1/16, 15/16)`` (:func:`filter_by_pass_rate`, :func:`parse_band`).

Comparisons are exact: rewards are compared with ``==``; pass rates with ``<`` / ``<=`` against the band
edges. Compute pass rates as ``correct / n`` (one correctly rounded division) and write edges as
fractions (``"1/16"``): both give the same double, so a prompt solved 1 time in 16 sits exactly on the
edge ``1/16``. Rates of a narrower floating type (a float32 tensor, ``correct.float().mean(1)``) are compared with
the edges rounded to that type, so that 7 of 10 in float32 sits on the edge ``0.7`` too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from entrorl._checks import as_tensor, in_float64, is_real_number, rounded_like
from entrorl.data.records import PromptRecord

__all__ = ["filter_by_pass_rate", "group_pass_rates", "informative_groups", "parse_band", "pass_rate_band_mask"]


def _check_pair(values: Any, group_ids: Any, fn: str, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    v = as_tensor(values)
    g = as_tensor(group_ids)
    if v.dim() != 1:
        raise ValueError(f"{fn}: {what} must be 1-D (one value per sample), got shape {tuple(v.shape)}")
    if g.dim() != 1 or g.shape[0] != v.shape[0]:
        raise ValueError(
            f"{fn}: group_ids must be 1-D with one id per sample ({v.shape[0]}), got shape {tuple(g.shape)}"
        )
    if g.is_floating_point() or g.is_complex() or g.dtype == torch.bool:
        raise ValueError(f"{fn}: group_ids must be integers, got dtype {g.dtype}")
    if g.device != v.device:
        raise ValueError(f"{fn}: {what} is on {v.device} but group_ids is on {g.device}")
    return v, g


def informative_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per sample, ``True`` when the rewards of its group are not all equal (exact equality).

    These are the samples DAPO's dynamic sampling keeps; a group of one sample is never informative.
    Group ids are arbitrary integers, and a group's samples need not be contiguous. Returns a bool
    tensor shaped like ``rewards`` on its device. NaN rewards are rejected.
    """
    r, g = _check_pair(rewards, group_ids, "informative_groups", "rewards")
    if r.is_complex():
        raise ValueError(f"informative_groups: rewards must be real, got dtype {r.dtype}")
    if r.is_floating_point():
        if torch.isnan(r).any():
            raise ValueError("informative_groups: rewards contain NaN; expected finite (or infinite) numbers")
        r = in_float64(r)  # on the CPU for an Apple GPU, which has no float64
    else:
        r = r.to(torch.int64)
    home = rewards.device if torch.is_tensor(rewards) else r.device
    if r.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=home)
    g = g.to(r.device)
    _, inv = torch.unique(g, return_inverse=True)
    k = int(inv.max().item()) + 1
    hi = torch.zeros(k, dtype=r.dtype, device=r.device).scatter_reduce(0, inv, r, "amax", include_self=False)
    lo = torch.zeros(k, dtype=r.dtype, device=r.device).scatter_reduce(0, inv, r, "amin", include_self=False)
    return (hi != lo)[inv].to(home)


def group_pass_rates(correct: torch.Tensor, group_ids: torch.Tensor) -> dict[int, float]:
    """``{group id: correct samples / samples}`` for every group, keys in increasing order.

    ``correct`` is a bool tensor (a numeric one holding only 0 and 1 is accepted). Each rate is the
    single division ``c / n``, so e.g. 1 of 16 gives exactly ``1/16``.
    """
    c, g = _check_pair(correct, group_ids, "group_pass_rates", "correct")
    if c.dtype != torch.bool:
        if c.is_complex() or not bool(((c == 0) | (c == 1)).all()):
            raise ValueError(
                "group_pass_rates: correct must be a bool tensor (or hold only 0 and 1); "
                "threshold numeric rewards first, e.g. rewards >= 0.5"
            )
        c = c != 0
    if c.numel() == 0:
        return {}
    uniq, inv, counts = torch.unique(g, return_inverse=True, return_counts=True)
    hits = torch.zeros(uniq.shape[0], dtype=torch.int64, device=c.device).scatter_add(0, inv, c.to(torch.int64))
    return {
        int(gid): int(h) / int(n)
        for gid, h, n in zip(uniq.tolist(), hits.tolist(), counts.tolist())
    }


def _check_bound(value: Any, name: str) -> float:
    if not is_real_number(value):
        raise ValueError(f"filter_by_pass_rate: {name} must be a number in [0, 1], got {value!r}")
    v = float(value)
    if not (0.0 <= v <= 1.0):
        raise ValueError(f"filter_by_pass_rate: {name} must be in [0, 1], got {value!r}")
    return v


def _check_band(low: float, high: float, inclusive: tuple[bool, bool], fn: str, text: str = "") -> None:
    shown = f" in {text!r}" if text else ""
    if low > high:
        raise ValueError(f"{fn}: the lower edge {low!r} exceeds the upper edge {high!r}{shown}; expected low <= high")
    if low == high and not (inclusive[0] and inclusive[1]):
        raise ValueError(
            f"{fn}: the band{shown} is empty (low == high == {low!r} with an open edge); "
            "use [x, x] to select exactly x"
        )


def _not_real(values: Any) -> str | None:
    """None when every value is a real number (an integer or float array, or a sequence of Python / numpy numbers);
    else the first value that is not one (a flag, text), quoted. A value that is itself a sequence is left to the
    shape check."""
    if isinstance(values, np.ndarray):
        if values.dtype.kind in "iuf":
            return None
        values = values.ravel().tolist()
    if not isinstance(values, Sequence) or isinstance(values, str):
        return None
    for value in values:
        if isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, str):
            continue
        if not is_real_number(value):
            return f"{value!r}, {type(value).__name__}"
    return None


def filter_by_pass_rate(
    records: Sequence[PromptRecord],
    pass_rates: Sequence[float] | np.ndarray | torch.Tensor,
    *,
    low: float,
    high: float,
    inclusive: tuple[bool, bool] = (True, True),
) -> list[PromptRecord]:
    """The records whose pass rate lies in the band from ``low`` to ``high``, in their original order.

    ``pass_rates[i]`` belongs to ``records[i]``; each must be a number in ``[0, 1]``.
    ``inclusive=(True, False)`` is the band ``[low, high)``, and so on. Requires
    ``0 <= low <= high <= 1`` and a non-empty band. Comparisons are exact (see the module notes).
    """
    records = list(records)
    in_band = pass_rate_band_mask(records, pass_rates, low=low, high=high, inclusive=inclusive)
    return [records[i] for i in np.flatnonzero(in_band).tolist()]


def pass_rate_band_mask(
    records: Sequence[PromptRecord],
    pass_rates: Sequence[float] | np.ndarray | torch.Tensor,
    *,
    low: float,
    high: float,
    inclusive: tuple[bool, bool] = (True, True),
) -> np.ndarray:
    """``mask[i]``: whether ``pass_rates[i]`` lies in the band, as a bool array with one entry per record (the records
    name a bad rate in the error). Arguments and errors as :func:`filter_by_pass_rate`'s."""
    lo = _check_bound(low, "low")
    hi = _check_bound(high, "high")
    if (
        not isinstance(inclusive, (tuple, list))
        or len(inclusive) != 2
        or not all(isinstance(b, (bool, np.bool_)) for b in inclusive)
    ):
        raise ValueError(
            f"filter_by_pass_rate: inclusive must be a pair of booleans (low edge, high edge), got {inclusive!r}"
        )
    inc = (bool(inclusive[0]), bool(inclusive[1]))
    _check_band(lo, hi, inc, "filter_by_pass_rate")
    given = pass_rates
    if isinstance(pass_rates, torch.Tensor):
        pass_rates = pass_rates.detach().cpu()
        if pass_rates.is_floating_point():  # numpy has no bfloat16; float64 holds every float rate exactly
            pass_rates = pass_rates.double()
        pass_rates = pass_rates.numpy()
    try:
        if (wrong := _not_real(pass_rates)) is not None:  # np.asarray(..., float64) would read "0.5" and True as rates
            raise TypeError(f"got {wrong}")
        rates = np.asarray(pass_rates, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"filter_by_pass_rate: pass_rates must be numbers ({exc})") from None
    if rates.ndim != 1:
        raise ValueError(f"filter_by_pass_rate: pass_rates must be 1-D, got shape {rates.shape}")
    if rates.shape[0] != len(records):
        raise ValueError(
            f"filter_by_pass_rate: {len(records)} records but {rates.shape[0]} pass rates; "
            "expected one pass rate per record"
        )
    bad = np.flatnonzero(~((rates >= 0.0) & (rates <= 1.0)))  # also catches NaN
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"filter_by_pass_rate: pass rate {float(rates[i])!r} of record {i} ({records[i].source}) is not in [0, 1]"
        )
    lo, hi = _edges_in_the_precision_of(given, lo, hi)
    above = rates >= lo if inc[0] else rates > lo
    below = rates <= hi if inc[1] else rates < hi
    return above & below


def _edges_in_the_precision_of(rates: Any, low: float, high: float) -> tuple[float, float]:
    """The band's edges rounded to the floating type of ``rates`` (a float32 7/10 sits on the edge 0.7 as a float32
    does), except where the rounding would move the band past what it means: an edge rounded onto 0 or 1 (the rates
    0 and 1 are exact in every type, and the edge excluded them) keeps its value, and so do both edges of a band that
    the rounding would close (narrower than the type's step)."""
    rounded_low, rounded_high = (float(edge) for edge in rounded_like(np.array([low, high]), rates))
    if low < high and rounded_low >= rounded_high:
        return low, high
    return tuple(raw if rounded in (0.0, 1.0) and raw != rounded else rounded
                 for raw, rounded in ((low, rounded_low), (high, rounded_high)))


_BAND_RE = re.compile(r"^\s*([\[(])\s*([^,\[\]()]*?)\s*,\s*([^,\[\]()]*?)\s*([\])])\s*$")


def _parse_edge(token: str, text: str, which: str) -> float:
    compact = "".join(token.split())
    if not compact:
        raise ValueError(f"parse_band: the {which} edge of {text!r} is missing; expected e.g. '[0.1, 0.5]'")
    try:
        value = Fraction(compact)
    except (ValueError, ZeroDivisionError):
        raise ValueError(
            f"parse_band: cannot read the {which} edge {token!r} of {text!r}; "
            "expected a decimal (0.1) or a fraction (1/16)"
        ) from None
    if not (0 <= value <= 1):
        raise ValueError(f"parse_band: the {which} edge {token!r} of {text!r} is outside [0, 1]")
    out = float(value)
    assert math.isfinite(out)
    return out


def parse_band(text: str) -> tuple[float, float, tuple[bool, bool]]:
    """Read a pass-rate band written in interval notation.

    ``"[0.1, 0.5]"`` -> ``(0.1, 0.5, (True, True))``; ``"(1/16, 15/16)"`` -> ``(0.0625, 0.9375,
    (False, False))``; ``"[0, 1/2)"`` -> ``(0.0, 0.5, (True, False))``. Edges are decimals or
    fractions in ``[0, 1]``; ``[`` / ``]`` include the edge, ``(`` / ``)`` exclude it. The result
    unpacks into :func:`filter_by_pass_rate` as ``low, high, inclusive``. ``ValueError`` otherwise.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_band: expected a string such as '[0.1, 0.5]', got {type(text).__name__}")
    m = _BAND_RE.match(text)
    if m is None:
        raise ValueError(
            f"parse_band: cannot read {text!r}; expected an interval with brackets, e.g. '[0.1, 0.5]', "
            "'(1/16, 15/16)' or '[0, 0.5)'"
        )
    open_, low_s, high_s, close = m.groups()
    low = _parse_edge(low_s, text, "lower")
    high = _parse_edge(high_s, text, "upper")
    inclusive = (open_ == "[", close == "]")
    _check_band(low, high, inclusive, "parse_band", text)
    return low, high, inclusive
