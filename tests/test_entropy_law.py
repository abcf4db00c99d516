"""Tests for entrorl.analysis.law: the entropy–performance law R = -a exp(H) + b (arXiv 2505.22617, Eq. 6)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from entrorl.analysis import EntropyLawFit, LawForecast, fit_entropy_law, forecast_entropy_law
from entrorl.analysis.law import CONSTANT_ENTROPY_TOLERANCE

A_TRUE, B_TRUE = 0.35, 0.95  # ceiling b - a = 0.60
SIGMA = 0.005  # reward noise in the noisy runs


def law(h, a=A_TRUE, b=B_TRUE):
    return -a * np.exp(h) + b


def synthetic_run(n_steps=200, *, noise=SIGMA, seed=0):
    """Entropy decaying over training as in a typical GRPO run, reward on the law plus noise."""
    t = np.arange(n_steps)
    h = 0.1 + 1.4 * np.exp(-t / 40.0)
    rng = np.random.default_rng(seed)
    return h, law(h) + rng.normal(0.0, noise, n_steps)


# --------------------------------------------------------------------------------------------
# fit_entropy_law
# --------------------------------------------------------------------------------------------


def test_fit_recovers_a_and_b_exactly_without_noise():
    h = np.linspace(0.2, 1.8, 25)
    fit = fit_entropy_law(h, law(h))
    assert isinstance(fit, EntropyLawFit)
    assert fit.a == pytest.approx(A_TRUE, abs=1e-9)
    assert fit.b == pytest.approx(B_TRUE, abs=1e-9)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.n_points == 25
    assert fit.ceiling == fit.b - fit.a
    assert fit.ceiling == pytest.approx(B_TRUE - A_TRUE, abs=1e-9)
    np.testing.assert_allclose(fit.predict(h), law(h), atol=1e-12)
    assert fit.predict(0.0) == pytest.approx(fit.ceiling, abs=1e-15)  # H = 0 gives the ceiling


def test_fit_with_two_points_is_the_line_through_them():
    h = np.array([1.0, 0.5])
    r = np.array([0.2, 0.4])
    fit = fit_entropy_law(h, r)
    # slope of r on exp(h): (0.4 - 0.2) / (e^0.5 - e^1) = -a
    a = -(0.4 - 0.2) / (math.exp(0.5) - math.exp(1.0))
    assert fit.a == pytest.approx(a, rel=1e-12)
    assert fit.b == pytest.approx(0.2 + a * math.exp(1.0), rel=1e-12)


def test_fit_with_noise_is_least_squares_on_exp_entropy():
    h, r = synthetic_run()
    fit = fit_entropy_law(h, r)
    assert 0.99 < fit.r2 < 1.0
    assert fit.a == pytest.approx(A_TRUE, abs=0.01)
    assert fit.b == pytest.approx(B_TRUE, abs=0.01)
    assert fit.ceiling == fit.b - fit.a
    # the same numbers as an independent least-squares line of r on x = exp(h)
    slope, intercept = np.polyfit(np.exp(h), r, 1)
    assert fit.a == pytest.approx(-slope, abs=1e-10)
    assert fit.b == pytest.approx(intercept, abs=1e-10)
    resid = r - fit.predict(h)
    assert fit.r2 == pytest.approx(1 - resid @ resid / np.sum((r - r.mean()) ** 2), abs=1e-12)


def test_fit_is_not_linear_in_entropy():
    # data on the law must not be fitted as well by the wrong model; a fit on exp(H) must beat
    # a straight line in H on curved data (guards against regressing on H instead of exp(H))
    h = np.linspace(0.0, 3.0, 30)
    fit = fit_entropy_law(h, law(h))
    slope, intercept = np.polyfit(h, law(h), 1)
    lin_resid = law(h) - (slope * h + intercept)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert np.max(np.abs(lin_resid)) > 0.1


def test_r2_is_nan_for_constant_reward():
    fit = fit_entropy_law([1.0, 0.8, 0.5], [0.4, 0.4, 0.4])
    assert math.isnan(fit.r2)
    assert (fit.a, fit.b, fit.ceiling) == (0.0, 0.4, 0.4)
    d = fit.to_dict()
    assert d["r2"] is None
    json.dumps(d, allow_nan=False)


def test_fit_accepts_lists_and_tensors():
    h = [1.2, 0.9, 0.6, 0.3]
    r = list(law(np.array(h)))
    ref = fit_entropy_law(np.array(h), np.array(r))
    assert fit_entropy_law(h, r) == ref
    torch = pytest.importorskip("torch")
    ht = torch.tensor(h, dtype=torch.float64, requires_grad=True)
    got = fit_entropy_law(ht, torch.tensor(r, dtype=torch.float64))
    assert got.a == pytest.approx(ref.a, abs=1e-12) and got.b == pytest.approx(ref.b, abs=1e-12)
    np.testing.assert_allclose(got.predict(ht), ref.predict(np.array(h)), atol=1e-12)
    got16 = fit_entropy_law(ht.to(torch.bfloat16), torch.tensor(r, dtype=torch.bfloat16))
    assert got16.a == pytest.approx(ref.a, abs=0.05)


def test_fit_to_dict_is_json():
    h = np.linspace(0.2, 1.8, 10)
    fit = fit_entropy_law(h, law(h))
    d = fit.to_dict()
    assert set(d) == {"a", "b", "r2", "ceiling", "ceiling_applies", "n_points"}
    back = json.loads(json.dumps(d, allow_nan=False))
    assert back["a"] == pytest.approx(A_TRUE) and back["n_points"] == 10
    assert (back["a"], back["b"], back["r2"], back["ceiling"]) == (fit.a, fit.b, fit.r2, fit.ceiling)
    assert back["b"] == pytest.approx(B_TRUE) and back["ceiling"] == pytest.approx(B_TRUE - A_TRUE)


@pytest.mark.parametrize(
    ("entropy", "reward", "fragment"),
    [
        ([1.0], [0.5], "at least 2"),
        ([1.0, 0.5, 0.2], [0.5, 0.6], "same length"),
        ([1.0, float("nan")], [0.5, 0.6], "finite"),
        ([1.0, 0.5], [0.5, float("inf")], "finite"),
        ([0.7, 0.7, 0.7], [0.1, 0.2, 0.3], "entropy is the same"),
        ([1.0, 800.0], [0.1, 0.2], "overflows"),
        ([[1.0, 0.5]], [[0.1, 0.2]], "1-D"),
        (0.5, 0.2, "1-D"),  # a single number is not a run of steps
        (["a", "b"], [0.1, 0.2], "sequence of numbers"),
    ],
)
def test_fit_validation(entropy, reward, fragment):
    with pytest.raises(ValueError, match=fragment):
        fit_entropy_law(entropy, reward)


def test_the_first_non_finite_point_is_named():
    nan, inf = float("nan"), float("inf")
    with pytest.raises(ValueError, match=r"point 1 is \(entropy=nan, reward=0\.2\)"):
        fit_entropy_law([1.0, nan, 0.5, inf], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match=r"point 2 is \(entropy=0\.5, reward=-inf\)"):
        fit_entropy_law([1.0, 0.8, 0.5, 0.2], [0.1, 0.2, -inf, nan])


def test_a_forecast_refuses_an_entropy_whose_exp_overflows_after_the_fitted_points():
    """The fitted prefix is fine, a later point's exp(H) is not: refused, not predicted as -inf."""
    with pytest.raises(ValueError, match=r"exp\(entropy\) overflows at point 4 \(entropy 800\)"):
        forecast_entropy_law([1.0, 0.8, 0.6, 0.4, 800.0], [0.1, 0.2, 0.3, 0.4, 0.5], min_points=4)



# --------------------------------------------------------------------------------------------
# forecast_entropy_law
# --------------------------------------------------------------------------------------------


def test_forecast_without_noise_is_exact():
    h, r = synthetic_run(noise=0.0)
    fc = forecast_entropy_law(h, r)
    assert fc.n_fit == 30  # ceil(0.15 * 200)
    assert fc.rmse < 1e-12
    assert abs(fc.final_error) < 1e-12
    assert fc.predicted_ceiling == pytest.approx(B_TRUE - A_TRUE, abs=1e-9)


def test_forecast_on_the_law_with_noise_has_rmse_at_noise_level():
    h, r = synthetic_run()
    fc = forecast_entropy_law(h, r)
    assert isinstance(fc, LawForecast)
    assert fc.n_fit == 30
    # the fit uses exactly the first n_fit points, and predicts exactly the rest
    assert fc.fit == fit_entropy_law(h[:30], r[:30])
    np.testing.assert_array_equal(fc.predicted, fc.fit.predict(h[30:]))
    np.testing.assert_array_equal(fc.actual, r[30:])
    assert fc.rmse == pytest.approx(np.sqrt(np.mean((fc.predicted - fc.actual) ** 2)), rel=1e-12)
    assert 0.5 * SIGMA < fc.rmse < 2.0 * SIGMA
    assert fc.final_error == pytest.approx(fc.fit.predict(h[-1]) - r[-1], abs=1e-15)
    assert abs(fc.final_error) < 4 * SIGMA
    assert fc.predicted_ceiling == fc.fit.ceiling
    assert fc.predicted_ceiling == pytest.approx(B_TRUE - A_TRUE, abs=0.02)
    assert fc.reached == r.max()


def test_forecast_error_is_large_when_the_run_leaves_the_law():
    h, r = synthetic_run()
    # after the fitted prefix, performance stalls (a different law: a = 0) while entropy keeps falling
    off = r.copy()
    off[30:] = r[29] + np.random.default_rng(1).normal(0.0, SIGMA, off.size - 30)
    on = forecast_entropy_law(h, r)
    fc = forecast_entropy_law(h, off)
    assert fc.fit == on.fit  # same prefix, same fit
    assert fc.rmse > 10 * SIGMA
    assert fc.rmse > 10 * on.rmse
    assert fc.final_error > 10 * SIGMA  # the law promised more than the run delivered
    assert fc.reached == pytest.approx(off.max())


def test_forecast_prefix_size_rule():
    h, r = synthetic_run(100)
    assert forecast_entropy_law(h, r).n_fit == 15  # ceil(0.15 * 100)
    assert forecast_entropy_law(h[:20], r[:20]).n_fit == 3  # ceil(0.15 * 20)
    assert 0.07 * 100 > 7  # 7.000000000000001 in floating point ...
    assert forecast_entropy_law(h, r, fit_fraction=0.07).n_fit == 7  # ... but 7% of 100 is 7
    assert forecast_entropy_law(h[:10], r[:10]).n_fit == 3  # min_points beats ceil(1.5) = 2
    assert forecast_entropy_law(h[:10], r[:10], min_points=5).n_fit == 5
    assert forecast_entropy_law(h, r, fit_fraction=0.5).n_fit == 50


def test_forecast_with_nothing_held_out():
    h, r = synthetic_run(20)
    fc = forecast_entropy_law(h, r, fit_fraction=1.0)
    assert fc.n_fit == 20
    assert fc.predicted.shape == (0,) and fc.actual.shape == (0,)
    assert math.isnan(fc.rmse)
    assert fc.final_error == pytest.approx(fc.fit.predict(h[-1]) - r[-1])
    d = fc.to_dict()
    assert d["rmse"] is None and d["predicted"] == []
    json.dumps(d, allow_nan=False)


def test_forecast_to_dict_is_json():
    h, r = synthetic_run(40)
    fc = forecast_entropy_law(h, r)
    back = json.loads(json.dumps(fc.to_dict(), allow_nan=False))
    assert back["n_fit"] == 6
    assert len(back["predicted"]) == len(back["actual"]) == 34
    assert back["fit"]["a"] == pytest.approx(fc.fit.a)
    assert back["predicted_ceiling"] == pytest.approx(fc.predicted_ceiling)
    assert back["predicted"] == fc.predicted.tolist() and back["actual"] == fc.actual.tolist() == r[6:].tolist()
    assert (back["rmse"], back["final_error"], back["reached"]) == (fc.rmse, fc.final_error, fc.reached)


@pytest.mark.parametrize(
    ("kwargs", "n", "fragment"),
    [
        ({"fit_fraction": 0.0}, 20, "fit_fraction"),
        ({"fit_fraction": 1.5}, 20, "fit_fraction"),
        ({"min_points": 1}, 20, "min_points"),
        ({"min_points": 2.5}, 20, "min_points"),
        ({"min_points": 10}, 5, "only 5"),
        ({"min_points": 6}, 5, "only 5"),  # one point more than the run has
        ({"fit_fraction": float("nan")}, 20, "fit_fraction"),
        ({}, 1, "at least 2"),
    ],
)
def test_forecast_validation(kwargs, n, fragment):
    h, r = synthetic_run(20)
    with pytest.raises(ValueError, match=fragment):
        forecast_entropy_law(h[:n], r[:n], **kwargs)


def test_reached_is_the_best_reward_of_the_whole_run_fitted_points_included():
    # the best reward of this run lies in its fitted prefix (the first 3 of 10 points)
    h = np.linspace(1.0, 0.1, 10)
    r = law(h)
    r[1] = 0.9
    fc = forecast_entropy_law(h, r)
    assert fc.n_fit == 3
    assert fc.reached == 0.9 and fc.to_dict()["reached"] == 0.9


def test_the_forecast_keeps_its_own_copy_of_the_measured_rewards():
    h, r = synthetic_run(40)
    fc = forecast_entropy_law(h, r)
    expected = r[fc.n_fit:].copy()
    r[:] = 0.0  # the caller reuses its array
    np.testing.assert_array_equal(fc.actual, expected)


def test_forecast_reports_a_flat_prefix():
    h = np.array([0.8, 0.8, 0.8, 0.6, 0.4, 0.2])
    with pytest.raises(ValueError, match="entropy is the same"):
        forecast_entropy_law(h, law(h))


# --------------------------------------------------------------------------------------------
# numerical edge cases and the law's premise
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entropy",
    [
        [0.5, 0.5 + 1e-15, 0.5],  # a spread far below rounding of exp(H)
        [0.5, float(np.nextafter(0.5, 1.0)), 0.5],  # one ulp
        [0.5, 0.5 + 1e-12, 0.5 - 1e-12, 0.5],
        [10.0, 10.0 + 1e-12, 10.0],  # exp(H) ~ 2e4: the spread is above 1e-9 in absolute terms, not relative ones
        [-800.0, -900.0, -1000.0],  # exp(H) underflows to 0 at every point
    ],
)
def test_entropy_constant_up_to_rounding_is_not_fitted(entropy):
    with pytest.raises(ValueError, match="entropy is the same"):
        fit_entropy_law(entropy, [0.1, 0.2, 0.3, 0.4][: len(entropy)])


@pytest.mark.parametrize("base", [0.5, 10.0])
@pytest.mark.parametrize(("step", "fitted"), [(5e-10, False), (2e-9, True)])
def test_the_constant_entropy_tolerance_is_1e_9_of_exp_entropy(base, step, fitted):
    # exp(H) counts as constant when max - min is at most CONSTANT_ENTROPY_TOLERANCE = 1e-9 of max exp(H): for a small
    # step d, exp(H + d) / exp(H) - 1 ~ d, so a step of half the tolerance is not fitted, one of twice it is, whatever
    # the size of exp(H)
    entropy = [base, base + step, base]
    reward = [0.1, 0.2, 0.3]
    if fitted:
        assert fit_entropy_law(entropy, reward).n_points == 3
    else:
        with pytest.raises(ValueError, match="entropy is the same"):
            fit_entropy_law(entropy, reward)


def test_r2_of_a_reward_uncorrelated_with_exp_entropy_stays_in_0_1():
    # the reward is made orthogonal to exp(H) after centring: the least-squares slope is ~0 and R² ~0, never below 0
    # however the residuals round
    rng = np.random.default_rng(0)
    for _ in range(200):
        h = rng.uniform(0.1, 1.5, 6)
        xc = np.exp(h) - np.exp(h).mean()
        rc = rng.uniform(0.0, 1.0, 6)
        rc -= rc.mean()
        fit = fit_entropy_law(h, 0.5 + rc - (xc @ rc) / (xc @ xc) * xc)
        assert 0.0 <= fit.r2 <= 1.0
        assert fit.r2 == pytest.approx(0.0, abs=1e-12)


def test_r2_needs_three_points():
    fit = fit_entropy_law([1.0, 0.5], [0.2, 0.4])
    assert math.isnan(fit.r2) and fit.to_dict()["r2"] is None
    assert fit_entropy_law([1.0, 0.5, 0.2], law(np.array([1.0, 0.5, 0.2]))).r2 == pytest.approx(1.0)


def test_ceiling_applies_only_when_reward_falls_with_exp_entropy():
    h = np.linspace(1.0, 0.5, 12)
    on_law = fit_entropy_law(h, -0.3 * np.exp(h) + 0.9)
    assert on_law.ceiling_applies and on_law.to_dict()["ceiling_applies"] is True
    rising = fit_entropy_law(h, 0.3 * np.exp(h) - 0.2)  # reward rises with entropy: a < 0
    assert rising.a < 0 and not rising.ceiling_applies
    assert rising.to_dict()["ceiling_applies"] is False
    flat = fit_entropy_law(h, np.full(h.size, 0.4))  # a = 0: reward not bought with entropy
    assert not flat.ceiling_applies


def test_the_forecast_fits_the_first_fraction_rounded_up():
    """n_fit = max(min_points, ceil(fit_fraction N)): 15% of 30 points is 4.5, so 5 points."""
    entropy = np.linspace(1.0, 0.1, 30)
    assert forecast_entropy_law(entropy, 1.0 - 0.3 * np.exp(entropy)).n_fit == 5


def test_the_forecast_can_fit_on_two_points():
    """``min_points=2`` is allowed (the law has two parameters): the forecast then fits the line through the first two
    points and predicts the rest from it."""
    h, r = synthetic_run(20, noise=0.0)
    fc = forecast_entropy_law(h, r, fit_fraction=0.1, min_points=2)
    assert fc.n_fit == 2 and fc.fit.n_points == 2
    assert fc.fit.a == pytest.approx(A_TRUE, rel=1e-9) and fc.fit.b == pytest.approx(B_TRUE, rel=1e-9)
    np.testing.assert_allclose(fc.predicted, law(h[2:]), atol=1e-12)


@pytest.mark.parametrize("entropy", [{"step": 1.0}, [1 + 2j, 0.5], [1.0, object()]])
def test_values_that_are_not_real_numbers_are_refused_as_a_value_error(entropy):
    with pytest.raises(ValueError, match="entropy must be a sequence of numbers"):
        fit_entropy_law(entropy, [0.1, 0.2])


def test_an_overflowing_entropy_is_a_value_error_even_where_warnings_are_errors():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="exp\\(entropy\\) overflows"):
            fit_entropy_law([1.0, 800.0], [0.1, 0.2])
        with pytest.raises(ValueError, match="exp\\(entropy\\) overflows at point 3"):
            forecast_entropy_law([1.0, 0.8, 0.6, 900.0, 800.0], [0.1, 0.2, 0.3, 0.4, 0.5])


def test_the_forecast_names_the_first_point_whose_exp_entropy_overflows():
    with pytest.raises(ValueError, match=r"overflows at point 3 \(entropy 900\)"):
        forecast_entropy_law([1.0, 0.8, 0.6, 900.0, 0.4, 800.0], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])


def test_an_infinite_rmse_is_written_as_null():
    """Held-out rewards so far off the law that the squared error overflows: the RMSE is inf, and JSON gets null."""
    h = np.array([1.0, 0.8, 0.6, 0.4])
    with np.errstate(over="ignore"):  # numpy's own warning about the square that overflows
        fc = forecast_entropy_law(h, np.array([0.1, 0.2, 0.3, 1e200]), min_points=3)
    assert fc.rmse == math.inf
    assert fc.to_dict()["rmse"] is None
    json.dumps(fc.to_dict(), allow_nan=False)


@pytest.mark.parametrize(("setting", "value"), [("min_points", math.inf), ("min_points", None), ("min_points", math.nan),
                                                ("min_points", "3"), ("fit_fraction", None), ("fit_fraction", "0.5"),
                                                ("fit_fraction", True), ("fit_fraction", math.nan)])
def test_a_forecast_setting_that_is_not_a_valid_number_is_a_value_error_naming_it(setting, value):
    h = np.linspace(1.0, 0.1, 10)
    with pytest.raises(ValueError, match=setting):
        forecast_entropy_law(h, 1.0 - 0.3 * np.exp(h), **{setting: value})


def test_whole_float_and_numpy_settings_are_accepted_by_the_forecast():
    h = np.linspace(1.0, 0.1, 10)
    reward = 1.0 - 0.3 * np.exp(h)
    assert (forecast_entropy_law(h, reward, fit_fraction=np.float32(0.5), min_points=3.0).n_fit
            == forecast_entropy_law(h, reward, fit_fraction=0.5, min_points=np.int64(3)).n_fit == 5)


def test_a_forecast_with_nothing_held_out_warns_of_nothing():
    """Fitted on every point there is no later point: the RMSE is nan by definition, not the mean of an empty array
    (which numpy warns about)."""
    import warnings

    h, r = synthetic_run(20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fc = forecast_entropy_law(h, r, fit_fraction=1.0)
    assert math.isnan(fc.rmse) and fc.n_fit == 20


def test_the_forecast_ceiling_is_b_minus_a_whatever_the_sign_of_a():
    """The predicted ceiling is the fit's ``b - a`` also where the premise fails (a < 0): then b - a lies below b."""
    h = np.linspace(1.0, 0.2, 12)
    reward = 0.3 * np.exp(h) - 0.2  # reward falls as entropy falls: a = -0.3, b = -0.2
    fc = forecast_entropy_law(h, reward, fit_fraction=0.5)
    assert fc.fit.a == pytest.approx(-0.3, rel=1e-9) and not fc.fit.ceiling_applies
    assert fc.predicted_ceiling == fc.fit.ceiling == fc.fit.b - fc.fit.a
    assert fc.predicted_ceiling == pytest.approx(0.1, rel=1e-9)
    assert fc.to_dict()["predicted_ceiling"] == pytest.approx(0.1, rel=1e-9)


def test_entropies_whose_squared_exponential_overflows_are_still_fitted_by_least_squares():
    """exp(H) is finite up to H ~ 709, but the squares of its deviations overflow from H ~ 355: the fit is computed on
    exp(H - max H) and scaled back, so it is the least-squares line (as polyfit on the scaled regressor gives), with
    no warning."""
    import warnings

    h, r = np.array([400.0, 399.0, 398.0]), np.array([0.1, 0.2, 0.3])
    x = np.exp(h - h.max())
    slope, intercept = np.polyfit(x, r, 1)
    resid = r - (slope * x + intercept)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = fit_entropy_law(h, r)
    assert fit.a == pytest.approx(-slope * math.exp(-400.0), rel=1e-9) and fit.a > 0
    assert fit.b == pytest.approx(intercept, rel=1e-9)
    assert fit.r2 == pytest.approx(1 - resid @ resid / np.sum((r - r.mean()) ** 2), rel=1e-9)
    # the same entropies 400 nats lower give the same line in exp(H) units
    low = fit_entropy_law(h - 400.0, r)
    assert low.a * math.exp(-400.0) == pytest.approx(fit.a, rel=1e-9) and low.b == pytest.approx(fit.b, rel=1e-9)


def test_the_first_non_finite_point_is_named_whether_its_entropy_or_its_reward_is_bad():
    """The error names the earliest step with a non-finite value in either series: a bad reward at point 1 comes
    before a bad entropy at point 2."""
    with pytest.raises(ValueError, match=r"point 1 is \(entropy=0\.8, reward=inf\)"):
        fit_entropy_law([1.0, 0.8, float("nan")], [0.1, float("inf"), 0.3])
