"""Evaluation metrics for sampled answers: Avg@k, the unbiased Pass@k, and pass-rate polarisation.

Everything here works on plain numbers (numpy + the standard library): a boolean / reward matrix
``correct[P, n]`` holding, for each of ``P`` problems, whether each of its ``n`` samples was right.

* **Avg@n** — the mean accuracy over samples, i.e. ``c / n`` per problem averaged over problems
  (the pass@1 estimate).
* **Pass@k** — the unbiased estimator of Chen et al. 2021 (Codex, arXiv 2107.03374):
  ``pass@k = 1 - C(n - c, k) / C(n, k)`` for a problem with ``c`` correct answers among ``n >= k``
  samples, averaged over problems. It is computed exactly, from integer binomial coefficients with one
  rounding to float at the end (``1`` when ``n - c < k``).
* **Polarisation** — the histogram of per-problem pass rates, with the share of problems that are
  never solved (rate exactly 0) and always solved (rate exactly 1). RL fine-tuning tends to push
  pass rates to the two ends; these prompts give GRPO-style advantages no signal.

Rewards: a matrix of booleans is used as is. A numeric matrix is read as rewards in ``[0, 1]``
(e.g. a test-case pass rate) and a sample counts as correct when its reward is ``>= threshold``
(default ``0.5``). Numeric values outside ``[0, 1]`` are rejected rather than guessed at.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from entrorl._checks import rounded_like

__all__ = [
    "DEFAULT_THRESHOLD",
    "EvalSummary",
    "Polarisation",
    "avg_at_k",
    "default_ks",
    "pass_at_k",
    "pass_at_k_curve",
    "polarisation",
    "summarize_samples",
]

#: A numeric reward counts as a correct answer when it is at least this large.
DEFAULT_THRESHOLD = 0.5

# Pass rates within this distance of a bin edge are put on the edge (so that 3/10 lands in
# [0.3, 0.4) whatever the rounding of 3/10 * bins).
_EDGE_TOL = 1e-9


# --------------------------------------------------------------------------------------------
# pass@k
# --------------------------------------------------------------------------------------------


def _as_int_array(value: Any, name: str) -> np.ndarray:
    """``value`` (numbers, an array, or a tensor on any device) as an int64 array; it must hold finite, integer-valued
    numbers."""
    arr = np.asarray(_from_tensor(value))
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        whole = np.zeros(arr.shape, dtype=bool)
        whole[finite] = arr[finite] == np.round(arr[finite])
        if not np.all(whole):
            bad = arr[~whole].flat[0]
            raise ValueError(
                f"pass_at_k: {name} must hold whole numbers (counts); got {name}={float(bad)!r}"
            )
        return arr.astype(np.int64)
    raise ValueError(
        f"pass_at_k: {name} must be an integer or an array of integers; got dtype {arr.dtype}"
    )


def _pass_at_k_scalar(n: int, c: int, k: int) -> float:
    """``1 - C(n-c, k) / C(n, k)`` for validated ints, computed exactly in integers and rounded once to a float: the
    nearest float to the estimate, ``c / n``'s at ``k = 1`` and accurate when pass@k is tiny (where a floating
    ``1 - prod`` would cancel)."""
    if n - c < k:
        return 1.0
    if c == 0:
        return 0.0
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def pass_at_k(n: Any, c: Any, k: Any) -> float | np.ndarray:
    """Unbiased pass@k of Chen et al. 2021 (arXiv 2107.03374) for one or many problems.

    ``pass@k = 1 - C(n - c, k) / C(n, k)``: the probability that at least one of ``k`` samples
    drawn without replacement from ``n`` samples, ``c`` of them correct, is correct. Computed exactly
    (integer binomials, one rounding to float): ``1.0`` if ``n - c < k``, ``0.0`` if ``c = 0``.

    Args:
        n: number of samples drawn for the problem (int or integer array).
        c: number of those samples that are correct, ``0 <= c <= n``.
        k: the k of pass@k, ``1 <= k <= n``.

    The three arguments broadcast against each other (numpy rules). Returns a Python ``float``
    when all three are scalars, otherwise an ``ndarray`` of float64 with the broadcast shape.
    At ``k = 1`` the estimate is ``c / n``.

    Raises:
        ValueError: if a value is not a whole number, if ``c`` is outside ``[0, n]``, or if ``k``
            is outside ``[1, n]`` (the message names the offending values).
    """
    scalar = np.ndim(n) == 0 and np.ndim(c) == 0 and np.ndim(k) == 0
    n_arr = _as_int_array(n, "n")
    c_arr = _as_int_array(c, "c")
    k_arr = _as_int_array(k, "k")
    try:
        n_b, c_b, k_b = np.broadcast_arrays(n_arr, c_arr, k_arr)
    except ValueError as err:
        raise ValueError(
            f"pass_at_k: n, c and k must broadcast together; got shapes "
            f"{n_arr.shape}, {c_arr.shape}, {k_arr.shape}"
        ) from err

    bad_c = (c_b < 0) | (c_b > n_b)
    if np.any(bad_c):
        idx = tuple(int(j) for j in np.argwhere(bad_c)[0])
        where = f" (at index {idx})" if not scalar else ""
        raise ValueError(
            f"pass_at_k needs 0 <= c <= n (c correct answers among n samples); "
            f"got c={int(c_b[idx])}, n={int(n_b[idx])}{where}"
        )
    bad_k = (k_b < 1) | (k_b > n_b)
    if np.any(bad_k):
        idx = tuple(int(j) for j in np.argwhere(bad_k)[0])
        where = f" (at index {idx})" if not scalar else ""
        raise ValueError(
            f"pass_at_k needs 1 <= k <= n (pass@k is only defined for k up to the number of "
            f"samples); got k={int(k_b[idx])}, n={int(n_b[idx])}{where}. "
            f"Draw more samples per problem or ask for a smaller k."
        )

    if scalar:
        return _pass_at_k_scalar(int(n_b), int(c_b), int(k_b))

    shape = n_b.shape
    if n_b.size == 0:
        return np.zeros(shape, dtype=np.float64)
    triples = np.stack([n_b.ravel(), c_b.ravel(), k_b.ravel()], axis=1)
    unique, inverse = np.unique(triples, axis=0, return_inverse=True)
    values = np.array([_pass_at_k_scalar(int(a), int(b), int(d)) for a, b, d in unique])
    return values[inverse.reshape(-1)].reshape(shape)


# --------------------------------------------------------------------------------------------
# correctness matrices, Avg@k, pass@k curves
# --------------------------------------------------------------------------------------------


def _from_tensor(value: Any) -> Any:
    """A torch tensor (recognised without importing torch) as a numpy array, widened to float32 when numpy has no type
    for its own (bfloat16, float8); anything else as given."""
    if not hasattr(value, "detach"):
        return value
    value = value.detach().cpu()
    try:
        return value.numpy()
    except TypeError:
        return value.float().numpy()


def _as_correct(correct: Any, threshold: float, *, name: str = "correct") -> np.ndarray:
    """Boolean correctness from booleans or from rewards in [0, 1] (correct iff reward >= threshold)."""
    if not (0.0 < float(threshold) <= 1.0):
        raise ValueError(f"threshold must lie in (0, 1]; got threshold={threshold!r}")
    arr = np.asarray(_from_tensor(correct))
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must hold booleans or rewards in [0, 1]; got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds non-finite values (nan/inf); score every sample first")
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ValueError(
            f"{name} holds rewards outside [0, 1] (min {arr.min():g}, max {arr.max():g}); "
            f"pass booleans (e.g. rewards > 0) or rescale the rewards to [0, 1]"
        )
    # in the rewards' own precision, as the advantage estimators compare a tensor with the threshold: a float32
    # reward of 0.7 is a little below the float64 0.7
    return arr >= rounded_like(np.array([float(threshold)]), correct)[0]


def avg_at_k(correct: Any, *, threshold: float = DEFAULT_THRESHOLD) -> float:
    """Avg@k: the mean accuracy over samples (the pass@1 estimate ``c / n``).

    ``correct`` is a boolean / reward array of shape ``[n]`` (one problem) or ``[P, n]``
    (``P`` problems with ``n`` samples each, giving the mean over problems of ``c / n``).
    Rewards count as correct when ``>= threshold``.
    """
    arr = _as_correct(correct, threshold)
    if arr.ndim not in (1, 2) or arr.size == 0:
        raise ValueError(
            f"avg_at_k expects a non-empty array of shape [n] or [P, n]; got shape {arr.shape}"
        )
    return float(np.mean(arr))


def _check_ks(ks: Iterable[Any], n: int) -> list[int]:
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Iterable):  # "12" would be read as the ks 1 and 2
        raise ValueError(f"ks must be a sequence of whole numbers such as (1, 4), got {ks!r}")
    out: list[int] = []
    for k in ks:
        if isinstance(k, (bool, np.bool_, str, bytes)) or not float(k).is_integer():
            raise ValueError(f"ks must hold whole numbers; got k={k!r}")
        k = int(k)
        if k < 1:
            raise ValueError(f"pass@k needs k >= 1; got k={k}")
        if k > n:
            raise ValueError(
                f"k={k} exceeds n={n} samples per problem: pass@k is only defined for k <= n. "
                f"Draw at least {k} samples per problem or drop k={k}."
            )
        if k not in out:
            out.append(k)
    if not out:
        raise ValueError("ks is empty; ask for at least one k, e.g. ks=(1,)")
    return out


def default_ks(n: int) -> tuple[int, ...]:
    """The ks reported when none are given: powers of two up to ``n``, and ``n`` itself."""
    try:
        if isinstance(n, (bool, np.bool_)):
            raise TypeError
        n = operator.index(n)  # a numpy integer too; not a float or a flag
    except TypeError:
        raise ValueError(f"n must be an integer >= 1; got n={n!r}") from None
    if n < 1:
        raise ValueError(f"n must be >= 1; got n={n}")
    ks = [1 << j for j in range(n.bit_length()) if (1 << j) <= n]
    if ks[-1] != n:
        ks.append(n)
    return tuple(ks)


def pass_at_k_curve(correct_counts: Any, n: int, ks: Iterable[int]) -> dict[int, float]:
    """Mean unbiased pass@k over problems, for each ``k`` in ``ks``.

    Args:
        correct_counts: ``[P]`` numbers of correct samples per problem.
        n: samples per problem (the same for every problem).
        ks: the ks to report; each must satisfy ``1 <= k <= n``.

    Returns ``{k: mean_p pass_at_k(n, c_p, k)}`` with the ks in the order given (duplicates dropped).
    """
    counts = _as_int_array(correct_counts, "correct_counts").reshape(-1)
    if counts.size == 0:
        raise ValueError("pass_at_k_curve: correct_counts is empty; pass one count per problem")
    if np.ndim(n) != 0:
        raise ValueError(f"pass_at_k_curve: n must be one number of samples per problem; got shape {np.shape(n)}")
    n = int(_as_int_array(n, "n"))
    ks_checked = _check_ks(ks, n)
    return {k: float(np.mean(pass_at_k(n, counts, k))) for k in ks_checked}


# --------------------------------------------------------------------------------------------
# polarisation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Polarisation:
    """How the per-problem pass rates spread over [0, 1].

    Attributes:
        n_problems: number of problems.
        frac_zero: share of problems with pass rate exactly 0 (never solved).
        frac_one: share with pass rate exactly 1 (always solved).
        frac_mixed: the rest, ``1 - frac_zero - frac_one`` (the prompts GRPO can learn from).
        histogram: counts over ``bins`` equal-width bins ``[i/bins, (i+1)/bins)``; the last bin
            is closed, so rate 0 falls in the first bin and rate 1 in the last.
        bin_edges: the ``bins + 1`` edges, ``0`` to ``1``.
    """

    n_problems: int
    frac_zero: float
    frac_one: float
    frac_mixed: float
    histogram: np.ndarray = field(repr=False)
    bin_edges: np.ndarray = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able types (lists, ints, floats)."""
        return {
            "n_problems": int(self.n_problems),
            "frac_zero": float(self.frac_zero),
            "frac_one": float(self.frac_one),
            "frac_mixed": float(self.frac_mixed),
            "histogram": [int(x) for x in self.histogram],
            "bin_edges": [float(x) for x in self.bin_edges],
        }


def polarisation(pass_rates: Any, bins: int = 10) -> Polarisation:
    """Polarisation of per-problem pass rates (each in ``[0, 1]``).

    ``frac_zero`` / ``frac_one`` count rates that are *exactly* 0 / 1. The histogram has ``bins``
    equal-width bins ``[i/bins, (i+1)/bins)``, the last one closed at 1; a rate less than ``1e-9 / bins`` below an
    edge (a rounding error: ``rate * bins`` within 1e-9 of a whole number) is put on the edge, so ``3/10`` lands in
    ``[0.3, 0.4)`` despite rounding; rates given in lower precision (a float32 or bfloat16 tensor) are compared with
    the edges in that precision.
    """
    if isinstance(bins, (bool, np.bool_)) or int(bins) != bins or int(bins) < 1:
        raise ValueError(f"bins must be a positive integer; got bins={bins!r}")
    bins = int(bins)
    given = np.asarray(_from_tensor(pass_rates))
    if given.dtype == np.bool_ or given.ndim > 1:
        raise ValueError(
            f"polarisation takes one pass rate per problem (a 1-D array), got {'booleans' if given.dtype == np.bool_ else 'an array'} "
            f"of shape {given.shape}; for a correctness matrix correct[P, n] pass its row means, correct.mean(axis=1)"
        )
    if given.size and given.dtype.kind not in "iuf":  # text is not parsed, nor a complex part dropped
        raise ValueError(f"polarisation: pass rates must be real numbers; got dtype {given.dtype}")
    rates = given.astype(np.float64).reshape(-1)
    if rates.size == 0:
        raise ValueError("polarisation: pass_rates is empty; pass one pass rate per problem")
    if not np.all(np.isfinite(rates)):
        raise ValueError("polarisation: pass rates must be finite; got nan/inf (score every problem)")
    if rates.min() < 0.0 or rates.max() > 1.0:
        raise ValueError(
            f"polarisation: pass rates must lie in [0, 1]; got min {rates.min():g}, max {rates.max():g}"
        )
    total = rates.size
    n_zero = int(np.count_nonzero(rates == 0.0))
    n_one = int(np.count_nonzero(rates == 1.0))
    # the edges in the precision the rates come in: 7/10 as a float32 tensor's mean is float32's 0.7, 1e-8 below
    # float64's
    edges = rounded_like(np.arange(bins + 1, dtype=np.float64) / bins, pass_rates) - _EDGE_TOL / bins
    idx = np.clip(np.searchsorted(edges, rates, side="right") - 1, 0, bins - 1)
    histogram = np.bincount(idx, minlength=bins).astype(np.int64)
    return Polarisation(
        n_problems=total,
        frac_zero=n_zero / total,
        frac_one=n_one / total,
        frac_mixed=(total - n_zero - n_one) / total,
        histogram=histogram,
        bin_edges=np.arange(bins + 1, dtype=np.float64) / bins,
    )


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSummary:
    """The evaluation of a ``[P, n]`` correctness matrix.

    Attributes:
        n_problems: ``P``.
        n_samples: ``n``, samples per problem.
        avg_at_n: Avg@n, the mean accuracy over all samples (= mean pass rate).
        pass_at_k: ``{k: mean unbiased pass@k}``.
        pass_rates: ``[P]`` per-problem pass rates ``c_p / n``.
        polarisation: the pass-rate polarisation (see :func:`polarisation`).
        threshold: the reward threshold used to call a numeric sample correct.
    """

    n_problems: int
    n_samples: int
    avg_at_n: float
    pass_at_k: dict[int, float]
    pass_rates: np.ndarray = field(repr=False)
    polarisation: Polarisation
    threshold: float = DEFAULT_THRESHOLD

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able types. ``pass_at_k`` keeps int keys (``json.dumps`` writes them as strings)."""
        return {
            "n_problems": int(self.n_problems),
            "n_samples": int(self.n_samples),
            "avg_at_n": float(self.avg_at_n),
            "pass_at_k": {int(k): float(v) for k, v in self.pass_at_k.items()},
            "pass_rates": [float(x) for x in self.pass_rates],
            "polarisation": self.polarisation.to_dict(),
            "threshold": float(self.threshold),
        }


def summarize_samples(
    correct: Any,
    ks: Sequence[int] | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    bins: int = 10,
) -> EvalSummary:
    """Avg@n, pass@k for each k, per-problem pass rates and their polarisation.

    Args:
        correct: ``[P, n]`` booleans, or rewards in ``[0, 1]`` (correct iff ``>= threshold``).
        ks: the ks of pass@k, each ``<= n``; default: powers of two up to ``n``, and ``n``
            (see :func:`default_ks`).
        threshold: reward threshold for numeric input (default 0.5).
        bins: number of histogram bins for the polarisation.
    """
    arr = _as_correct(correct, threshold)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(
            f"summarize_samples expects a non-empty [P, n] matrix (P problems, n samples each); "
            f"got shape {arr.shape}. For a single problem pass correct[None, :]."
        )
    n_problems, n = arr.shape
    counts = arr.sum(axis=1).astype(np.int64)
    ks_checked = _check_ks(default_ks(n) if ks is None else ks, n)
    pass_rates = counts / n
    return EvalSummary(
        n_problems=int(n_problems),
        n_samples=int(n),
        avg_at_n=float(np.mean(arr)),
        pass_at_k=pass_at_k_curve(counts, n, ks_checked),
        pass_rates=pass_rates,
        polarisation=polarisation(pass_rates, bins=bins),
        threshold=float(threshold),
    )
