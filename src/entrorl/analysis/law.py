"""The entropy–performance law of RL fine-tuning, fitted and used to forecast.

Cui et al., "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models"
(arXiv 2505.22617, Eq. 6) observe that, over a training run, validation performance ``R`` and
policy entropy ``H`` (mean token entropy, nats) follow

    R = -a * exp(H) + b

with run-specific constants ``a`` and ``b``. Performance is bought with entropy, and once entropy
is spent (``H -> 0``) the run tops out at the predicted ceiling ``R(0) = b - a``; the conversion rate
is ``dR/dH = -a * exp(H)``. The paper fits the law on the first steps of a run (about 15% of
training) and predicts the rest of the run to about 1% RMSE.

The law is linear in ``(a, b)`` once ``x = exp(H)`` is taken as the regressor, ``R = b + (-a) x``,
so ordinary least squares of ``R`` on ``x`` gives the exact least-squares fit; no iterative
non-linear solver is needed.

The ceiling is a forecast only under the law's premise that reward is bought with entropy,
``a > 0`` (reward rises as entropy falls). A fit with ``a <= 0`` still describes the points, but
``b - a`` is then no ceiling: :attr:`EntropyLawFit.ceiling_applies` says which case holds.

Inputs may be lists, numpy arrays or torch tensors (read through ``.detach().cpu()``; torch is
not imported here). Sequences for :func:`forecast_entropy_law` must be ordered by training step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from entrorl._checks import is_real_number

__all__ = ["EntropyLawFit", "LawForecast", "fit_entropy_law", "forecast_entropy_law", "CONSTANT_ENTROPY_TOLERANCE",
           "MIN_POINTS_FOR_R2"]

CONSTANT_ENTROPY_TOLERANCE = 1e-9
"""exp(H) counts as constant when its spread ``max - min`` is at most this share of ``max |exp(H)|``: below it the
slope is decided by rounding, not by the data."""

MIN_POINTS_FOR_R2 = 3
"""A line through 2 points fits them exactly, so R² is reported (not ``nan``) only from this many points on."""


def _json_float(value: float) -> float | None:
    """A float for JSON: non-finite values (nan, inf) become ``None``."""
    value = float(value)
    return value if math.isfinite(value) else None


def _as_array(values: Any) -> Any:
    """Torch tensors (detected without importing torch) as numpy; anything else unchanged."""
    if hasattr(values, "detach"):
        values = values.detach().cpu()
        if hasattr(values, "double"):  # also covers bfloat16, which numpy cannot read
            values = values.double().numpy()
    return values


def _as_vector(values: Any, name: str) -> np.ndarray:
    """``values`` as a 1-D float64 array (lists, numpy arrays, torch tensors)."""
    values = _as_array(values)
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a sequence of numbers; got {type(values).__name__}") from err
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per training step); got shape {arr.shape}")
    return arr


def _check_pair(entropy: Any, reward: Any) -> tuple[np.ndarray, np.ndarray]:
    h = _as_vector(entropy, "entropy")
    r = _as_vector(reward, "reward")
    if h.shape != r.shape:
        raise ValueError(
            f"entropy and reward must have the same length (one pair per evaluation step); "
            f"got {h.size} entropy values and {r.size} reward values"
        )
    if h.size < 2:
        raise ValueError(
            f"the entropy–performance law has two parameters and needs at least 2 (entropy, reward) "
            f"points; got {h.size}. Log entropy and reward at more steps."
        )
    if not np.all(np.isfinite(h)) or not np.all(np.isfinite(r)):
        bad = int(np.flatnonzero(~(np.isfinite(h) & np.isfinite(r)))[0])
        raise ValueError(
            f"entropy and reward must be finite; point {bad} is (entropy={float(h[bad])!r}, "
            f"reward={float(r[bad])!r}). Drop the steps with missing or diverged values."
        )
    return h, r


@dataclass(frozen=True)
class EntropyLawFit:
    """A least-squares fit of ``R = -a * exp(H) + b`` (arXiv 2505.22617, Eq. 6).

    Attributes:
        a: the entropy-to-performance conversion coefficient (``dR/dH = -a exp(H)``).
        b: the offset.
        r2: coefficient of determination ``1 - SS_res / SS_tot`` on the fitted points, in [0, 1];
            ``nan`` when the rewards have zero variance (``SS_tot = 0``) or with fewer than
            :data:`MIN_POINTS_FOR_R2` points (a line through two points says nothing about the law).
        ceiling: the fitted curve at zero entropy, ``b - a``; a forecast only when
            :attr:`ceiling_applies`.
        n_points: number of points fitted.
    """

    a: float
    b: float
    r2: float
    ceiling: float
    n_points: int

    @property
    def ceiling_applies(self) -> bool:
        """Whether ``ceiling`` is a forecast: the law's premise ``a > 0`` (reward rises as entropy is spent).
        With ``a <= 0`` reward did not fall with ``exp(H)`` and the law forecasts no ceiling."""
        return bool(self.a > 0.0)

    def predict(self, entropy: Any) -> np.ndarray:
        """Predicted reward ``-a * exp(H) + b`` for each entropy value (same shape as the input)."""
        h = np.asarray(_as_array(entropy), dtype=np.float64)
        return self.b - self.a * np.exp(h)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able types; a non-finite ``r2`` becomes ``None``."""
        return {
            "a": float(self.a),
            "b": float(self.b),
            "r2": _json_float(self.r2),
            "ceiling": float(self.ceiling),
            "ceiling_applies": self.ceiling_applies,
            "n_points": int(self.n_points),
        }


def fit_entropy_law(entropy: Any, reward: Any) -> EntropyLawFit:
    """Fit ``R = -a * exp(H) + b`` by ordinary least squares (arXiv 2505.22617, Eq. 6).

    With ``x = exp(H)`` the model is the straight line ``R = b + s x`` with ``s = -a``, so the
    closed-form least-squares solution is exact:
    ``s = sum((x - x̄)(R - R̄)) / sum((x - x̄)^2)``, ``b = R̄ - s x̄``, ``a = -s``.
    Everything is computed on the centred values ``x - x̄`` and ``R - R̄`` (residuals
    ``(R - R̄) - s (x - x̄)``), so no large intercept cancels against a large slope, and
    ``R² = 1 - SS_res / SS_tot`` stays in [0, 1] as it must for least squares with an intercept.
    exp(H) whose spread is at most :data:`CONSTANT_ENTROPY_TOLERANCE` of its size counts as
    constant: no slope is fitted.

    Args:
        entropy: ``[N]`` policy entropies (nats), one per evaluation point.
        reward: ``[N]`` performance (e.g. validation accuracy) at the same points.

    Returns:
        :class:`EntropyLawFit` with ``a``, ``b``, ``r2`` (``nan`` below :data:`MIN_POINTS_FOR_R2`
        points), ``ceiling = b - a`` and ``n_points``.

    Raises:
        ValueError: fewer than 2 points, unequal lengths, non-finite values, entropy so large that
            ``exp(H)`` overflows, or an entropy that does not change beyond rounding (the slope is
            then undefined).
    """
    h, r = _check_pair(entropy, reward)
    with np.errstate(over="ignore"):
        x = np.exp(h)
    if not np.all(np.isfinite(x)):
        raise ValueError(
            f"exp(entropy) overflows (max entropy {h.max():g}); entropy must be in nats and "
            f"below ~700 — pass the mean per-token entropy, not a sum over tokens"
        )
    spread = float(np.ptp(x))
    if spread <= CONSTANT_ENTROPY_TOLERANCE * float(np.max(np.abs(x))):
        raise ValueError(
            f"entropy is the same at all {h.size} points ({h[0]:g}: exp(H) spreads by {spread:.3g}, within "
            f"{CONSTANT_ENTROPY_TOLERANCE:g} of its size), so the law's slope is undefined; fit over training "
            f"steps at which entropy changes"
        )
    n = int(h.size)
    if np.all(r == r[0]):
        # constant reward: the flat line b = R fits exactly, and r2 is undefined (SS_tot = 0)
        b = float(r[0])
        return EntropyLawFit(a=0.0, b=b, r2=float("nan"), ceiling=b, n_points=n)
    # least squares on exp(H - max H), in (0, 1]: the same line, whose sums of squares cannot overflow however large
    # exp(H) is (squares of exp(H) overflow above H ~ 355); the slope is scaled back by exp(-max H)
    scaled = np.exp(h - h.max())
    s_mean, r_mean = float(scaled.mean()), float(r.mean())
    sc, rc = scaled - s_mean, r - r_mean
    scaled_slope = float(np.dot(sc, rc)) / float(np.dot(sc, sc))
    b = r_mean - scaled_slope * s_mean
    a = -scaled_slope * math.exp(-float(h.max()))
    if n < MIN_POINTS_FOR_R2:
        r2 = float("nan")
    else:
        resid = rc - scaled_slope * sc
        r2 = min(1.0, max(0.0, 1.0 - float(np.dot(resid, resid)) / float(np.dot(rc, rc))))
    return EntropyLawFit(a=a, b=b, r2=r2, ceiling=b - a, n_points=n)


@dataclass(frozen=True)
class LawForecast:
    """An early-steps fit of the entropy–performance law, checked against the rest of the run.

    Attributes:
        fit: the law fitted on the first ``n_fit`` points.
        n_fit: number of leading points used for the fit.
        predicted: ``[N - n_fit]`` predicted rewards on the held-out (later) points.
        actual: ``[N - n_fit]`` measured rewards there.
        rmse: root-mean-square error of ``predicted - actual``; ``nan`` with no held-out points.
        final_error: predicted minus actual reward at the last point of the run (an in-sample
            residual when every point was used for the fit).
        predicted_ceiling: ``fit.ceiling = b - a``, the reward forecast at zero entropy (a forecast
            only when ``fit.ceiling_applies``, i.e. ``a > 0``).
        reached: the highest reward measured over the whole run.
    """

    fit: EntropyLawFit
    n_fit: int
    predicted: np.ndarray = field(repr=False)
    actual: np.ndarray = field(repr=False)
    rmse: float
    final_error: float
    predicted_ceiling: float
    reached: float

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able types; a non-finite ``rmse`` becomes ``None``."""
        return {
            "fit": self.fit.to_dict(),
            "n_fit": int(self.n_fit),
            "predicted": [float(v) for v in self.predicted],
            "actual": [float(v) for v in self.actual],
            "rmse": _json_float(self.rmse),
            "final_error": float(self.final_error),
            "predicted_ceiling": float(self.predicted_ceiling),
            "reached": float(self.reached),
        }


def forecast_entropy_law(
    entropy: Any,
    reward: Any,
    *,
    fit_fraction: float = 0.15,
    min_points: int = 3,
) -> LawForecast:
    """Fit the law on the early part of a run and predict the rest (arXiv 2505.22617, Eq. 6).

    The paper fits ``R = -a * exp(H) + b`` on the first ~15% of training and predicts the remaining
    steps to ~1% RMSE. Here the first ``n_fit = max(min_points, ceil(fit_fraction * N))`` points are
    fitted and the remaining ``N - n_fit`` are predicted from their measured entropies.

    Args:
        entropy: ``[N]`` policy entropies, ordered by training step.
        reward: ``[N]`` rewards / validation accuracies at the same steps.
        fit_fraction: share of the run (from its start) used for the fit, in ``(0, 1]``.
        min_points: the fewest points to fit on (at least 2).

    Raises:
        ValueError: invalid ``fit_fraction`` / ``min_points``, fewer than ``n_fit`` points, an entropy
            so large that ``exp(H)`` overflows at any point, or anything :func:`fit_entropy_law`
            rejects on the fitted prefix.
    """
    if not (is_real_number(fit_fraction) and 0.0 < float(fit_fraction) <= 1.0):
        raise ValueError(f"fit_fraction must lie in (0, 1]; got {fit_fraction!r}")
    if not (is_real_number(min_points) and math.isfinite(min_points) and int(min_points) == min_points and min_points >= 2):
        raise ValueError(f"min_points must be an integer >= 2 (the law has 2 parameters); got {min_points!r}")
    h, r = _check_pair(entropy, reward)
    n = int(h.size)
    # round() first so that e.g. 0.15 * 20 = 3.0000000000000004 gives 3, not 4
    n_fit = max(int(min_points), math.ceil(round(float(fit_fraction) * n, 9)))
    if n_fit > n:
        raise ValueError(
            f"the forecast fits on the first {n_fit} points (min_points={min_points}) but the run has "
            f"only {n}; log more evaluation points or lower min_points"
        )
    with np.errstate(over="ignore"):
        overflowing = np.flatnonzero(~np.isfinite(np.exp(h)))
    if overflowing.size:
        raise ValueError(
            f"exp(entropy) overflows at point {int(overflowing[0])} (entropy {float(h[overflowing[0]]):g}); entropy "
            f"must be in nats and below ~700 — pass the mean per-token entropy, not a sum over tokens"
        )
    fit = fit_entropy_law(h[:n_fit], r[:n_fit])
    predicted = fit.predict(h[n_fit:])
    actual = r[n_fit:].copy()
    rmse = float(np.sqrt(np.mean((predicted - actual) ** 2))) if actual.size else float("nan")
    final_error = float(fit.predict(h[-1]) - r[-1])
    return LawForecast(
        fit=fit,
        n_fit=n_fit,
        predicted=predicted,
        actual=actual,
        rmse=rmse,
        final_error=final_error,
        predicted_ceiling=fit.ceiling,
        reached=float(r.max()),
    )
