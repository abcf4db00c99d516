"""Token selectors, advantage shapers and mismatch corrections of entrorl.objective, against the papers' math.

Every test builds a small seeded batch, computes what the rule must do with plain numpy (population
statistics over the valid tokens only, exact token sets, hand-written token-mean losses and gradients)
and compares with what the objective did: which tokens lost their gradient, which left the normaliser,
the loss, the gradient w.r.t. ``log_prob`` and the metrics. Padding positions always hold huge garbage
values that would change the result if they leaked into a statistic.

Sources: SPEC §1/§3; Clip_B / Clip_V arXiv 2602.03392 (released Trinity-RFT code); Clip-Cov / KL-Cov
arXiv 2505.22617 (verl); 80/20 arXiv 2506.01939; PSR/NSR arXiv 2506.01347; entropy advantage
arXiv 2506.14758; Lopti arXiv 2505.12929; TIS; IcePop.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

import pytest
import torch

from entrorl.objective import PolicyBatch, available_methods, build_objective
from entrorl.objective.parts import SurrogateOutput
from entrorl.objective.selectors import ClipB
from entrorl.tokens import token_stats

DTYPES = [torch.float32, torch.float64]
FIELDS = (
    "log_prob",
    "old_log_prob",
    "advantages",
    "entropy",
    "disc",
    "disc_centered",
    "ref_log_prob",
    "rollout_log_prob",
)
OPTIONAL = ("entropy", "disc", "disc_centered", "ref_log_prob", "rollout_log_prob")

# Values at padding positions: each would be selected, dominate a statistic or blow up a loss if a
# part looked at it.
GARBAGE = {
    "log_prob": 3.0,
    "old_log_prob": -50.0,
    "advantages": -1.0e3,
    "entropy": 1.0e6,
    "disc": -1.0e6,
    "disc_centered": -1.0e6,
    "ref_log_prob": -1.0e3,
    "rollout_log_prob": -1.0e3,
}


# --------------------------------------------------------------------------------------------------
# helpers: seeded batches whose numpy copy holds exactly the values the tensors hold
# --------------------------------------------------------------------------------------------------


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-13}


def quantize(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """The float64 numpy copy of ``values`` after a round trip through ``dtype``."""
    return torch.as_tensor(np.asarray(values, dtype=np.float64)).to(dtype).double().numpy()


@dataclass
class Case:
    """One batch as numpy arrays (``arrays[name]`` float64, garbage at padding) plus its dtype."""

    arrays: dict[str, np.ndarray]
    mask: np.ndarray
    dtype: torch.dtype

    @property
    def n_valid(self) -> int:
        return int(self.mask.sum())

    def set(self, name: str, index, value) -> None:
        self.arrays[name][index] = value
        self.arrays[name] = quantize(self.arrays[name], self.dtype)

    def batch(self, *, without: tuple[str, ...] = (), entropy_grad: bool = False, mask=None) -> PolicyBatch:
        """A PolicyBatch with a fresh leaf ``log_prob`` (so ``batch.log_prob.grad`` is this call's gradient)."""

        def tensor(name: str) -> torch.Tensor:
            return torch.tensor(self.arrays[name], dtype=self.dtype)

        optional = {name: tensor(name) for name in OPTIONAL if name not in without}
        if entropy_grad and "entropy" in optional:
            optional["entropy"].requires_grad_(True)
        return PolicyBatch(
            log_prob=tensor("log_prob").requires_grad_(True),
            old_log_prob=tensor("old_log_prob"),
            advantages=tensor("advantages"),
            mask=torch.tensor(self.mask) if mask is None else torch.as_tensor(mask),
            **optional,
        )


def random_case(seed: int, dtype: torch.dtype, shape=(6, 20), lengths=None) -> Case:
    """Per-token advantages, ratios in [0.86, 1.16] (no PPO clipping unless a test plants it), distinct
    entropies, S and D; every row has at least ``T // 2`` valid tokens."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    if lengths is None:
        lengths = rng.integers(cols // 2, cols + 1, size=rows)
    mask = np.arange(cols)[None, :] < np.asarray(lengths)[:, None]
    old = rng.uniform(-3.0, -0.05, shape)
    arrays = {
        "old_log_prob": old,
        "log_prob": old + rng.uniform(-0.15, 0.15, shape),
        "advantages": rng.normal(0.0, 1.0, shape),
        "entropy": rng.exponential(1.0, shape),
        "disc": rng.normal(0.0, 0.1, shape),
        "disc_centered": rng.normal(0.0, 0.01, shape),
        "ref_log_prob": old + rng.normal(0.0, 0.1, shape),
        "rollout_log_prob": old + rng.normal(0.0, 0.1, shape),
    }
    for name in FIELDS:
        arrays[name] = quantize(np.where(mask, arrays[name], GARBAGE[name]), dtype)
    return Case(arrays=arrays, mask=mask, dtype=dtype)


def ppo_loss(case: Case, low: float = 0.2, high: float = 0.2, advantages=None) -> np.ndarray:
    """Per-token PPO-clip loss max(-A r, -A clip(r, 1-low, 1+high)); meaningful on valid tokens only."""
    adv = case.arrays["advantages"] if advantages is None else advantages
    ratio = np.exp(np.clip(case.arrays["log_prob"] - case.arrays["old_log_prob"], -20, 20))
    return np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - low, 1 + high))


def ppo_clipped(case: Case, low: float = 0.2, high: float = 0.2) -> np.ndarray:
    adv = case.arrays["advantages"]
    ratio = np.exp(np.clip(case.arrays["log_prob"] - case.arrays["old_log_prob"], -20, 20))
    return case.mask & (-adv * np.clip(ratio, 1 - low, 1 + high) > -adv * ratio)


def ppo_grad(case: Case, low: float = 0.2, high: float = 0.2, advantages=None) -> np.ndarray:
    """d(per-token PPO loss)/d log_prob: -A r where the unclipped branch is active, else 0."""
    adv = case.arrays["advantages"] if advantages is None else advantages
    ratio = np.exp(np.clip(case.arrays["log_prob"] - case.arrays["old_log_prob"], -20, 20))
    clipped = -adv * np.clip(ratio, 1 - low, 1 + high) > -adv * ratio
    return np.where(clipped, 0.0, -adv * ratio)


def check_token_mean(out, batch: PolicyBatch, case: Case, *, kept, count, loss, grad) -> None:
    """``out.loss == sum_kept loss / count`` and ``d out.loss / d log_prob == grad / count`` on kept tokens,
    exactly zero elsewhere (dropped and padding tokens)."""
    tol = tolerances(case.dtype)
    expected_loss = np.where(kept, loss, 0.0).sum() / count
    np.testing.assert_allclose(float(out.loss.detach()), expected_loss, **tol)
    out.loss.backward()
    got = batch.log_prob.grad.double().numpy()
    assert np.all(got[~kept] == 0.0), "a dropped or padding token received gradient"
    np.testing.assert_allclose(got, np.where(kept, grad, 0.0) / count, **tol)


def check_seq_mean_token_mean(out, batch: PolicyBatch, case: Case, *, kept, loss, grad) -> None:
    """``out.loss == (1/G) sum_i (1/|y_i|) sum_{t kept} loss_it`` over the G rows with a valid token (|y_i| their valid
    tokens, dropped ones included), its gradient ``grad_it / (G |y_i|)`` on kept tokens and exactly zero elsewhere."""
    tol = tolerances(case.dtype)
    lengths = case.mask.sum(axis=1, keepdims=True)
    rows = int((lengths > 0).sum())
    per_row = np.where(kept, loss, 0.0).sum(axis=1, keepdims=True) / np.maximum(lengths, 1)
    np.testing.assert_allclose(float(out.loss.detach()), per_row.sum() / rows, **tol)
    out.loss.backward()
    got = batch.log_prob.grad.double().numpy()
    assert np.all(got[~kept] == 0.0), "a dropped or padding token received gradient"
    np.testing.assert_allclose(got, np.where(kept, grad, 0.0) / (rows * np.maximum(lengths, 1)), **tol)


def dropped(out, batch: PolicyBatch) -> np.ndarray:
    return (batch.mask & ~out.trained_mask).numpy()


def assert_clear_of(values: np.ndarray, thresholds, margin: float = 1e-4) -> None:
    """The test is well posed: no valid statistic sits within ``margin`` of a decision threshold."""
    for threshold in np.atleast_1d(thresholds):
        assert np.min(np.abs(values - threshold)) > margin, "test data too close to a threshold"


def population_stats(values: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    valid = values[mask]
    return float(valid.mean()), float(valid.std())  # numpy std is the population std (ddof=0)


def token_cov(case: Case, advantages: np.ndarray | None = None) -> np.ndarray:
    """C_t = (log p_t - mean log p)(A_t - mean A), means over the valid tokens (arXiv 2505.22617, Eq. 10); ``advantages``
    replaces the case's own (a shaper's output)."""
    lp, mask = case.arrays["log_prob"], case.mask
    adv = case.arrays["advantages"] if advantages is None else advantages
    return np.where(mask, (lp - lp[mask].mean()) * (adv - adv[mask].mean()), 0.0)


# 37 valid tokens: a float32 mean of 37 equal values is off by an ulp, so a naive std is ~1e-8, not 0.
CONSTANT_SHAPE, CONSTANT_LENGTHS = (3, 16), [16, 16, 5]


def no_surrogate(batch: PolicyBatch) -> SurrogateOutput:
    zeros = torch.zeros_like(batch.log_prob)
    return SurrogateOutput(per_token_loss=zeros, clipped=torch.zeros_like(batch.mask), ratio=zeros + 1)


# --------------------------------------------------------------------------------------------------
# 1. Clip_B (arXiv 2602.03392)
# --------------------------------------------------------------------------------------------------


def clip_b_case(dtype: torch.dtype) -> Case:
    """A random batch with planted low-S outliers of every advantage sign and one high-S outlier."""
    case = random_case(11, dtype, shape=(8, 16))
    for index, s, a in [
        ((0, 0), -0.60, -1.0),  # A < 0, low S: the released rule drops it
        ((1, 1), -0.50, -0.5),  # A < 0, low S: dropped
        ((2, 2), -0.60, +1.0),  # A > 0, low S: released keeps it, paper mode drops it
        ((3, 3), -0.55, 0.0),  # A = 0, low S: released keeps it
        ((4, 4), +0.60, -1.0),  # A < 0, high S: only the paper's upper bound drops it
    ]:
        case.set("disc", index, s)
        case.set("advantages", index, a)
    return case


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_b_released_drops_exactly_negative_advantage_low_outliers(dtype):
    case = clip_b_case(dtype)
    mu = 2.0
    s, adv, mask = case.arrays["disc"], case.arrays["advantages"], case.mask
    mean, std = population_stats(s, mask)
    assert_clear_of(s[mask] - mean, [-mu * std])
    expected = mask & (adv < 0) & (s - mean < -mu * std)
    assert expected[0, 0] and expected[1, 1] and not expected[2, 2] and not expected[3, 3] and not expected[4, 4]

    batch = case.batch()
    out = build_objective("clip_b", mu=mu)(batch)

    np.testing.assert_array_equal(dropped(out, batch), expected)
    np.testing.assert_array_equal(out.loss_mask.numpy(), mask & ~expected)  # dropped tokens leave the normaliser
    n = case.n_valid
    assert out.metrics["select/clip_b_frac"] == pytest.approx(expected.sum() / n, abs=1e-15)
    assert out.metrics["select/clip_b_frac_neg"] == pytest.approx(expected.sum() / n, abs=1e-15)
    assert out.metrics["select/clip_b_frac_pos"] == 0.0
    assert out.metrics["clip_b/disc_mean"] == pytest.approx(mean, rel=1e-5, abs=1e-7)
    assert out.metrics["clip_b/disc_std"] == pytest.approx(std, rel=1e-5)
    kept = mask & ~expected
    check_token_mean(out, batch, case, kept=kept, count=kept.sum(), loss=ppo_loss(case), grad=ppo_grad(case))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mu, mu_high", [(1.5, 1.0), (2.0, None)])
def test_clip_b_paper_mode_drops_both_tails_whatever_the_advantage(dtype, mu, mu_high):
    case = clip_b_case(dtype)
    s, adv, mask = case.arrays["disc"], case.arrays["advantages"], case.mask
    mean, std = population_stats(s, mask)
    upper = mu if mu_high is None else mu_high
    assert_clear_of(s[mask] - mean, [-mu * std, upper * std])
    expected = mask & ((s - mean < -mu * std) | (s - mean > upper * std))
    assert expected[2, 2] and expected[4, 4] and expected[3, 3]  # A > 0, high S and A = 0 tokens are dropped too

    batch = case.batch()
    out = build_objective("clip_b", mode="paper", mu=mu, mu_high=mu_high)(batch)

    np.testing.assert_array_equal(dropped(out, batch), expected)
    n = case.n_valid
    assert out.metrics["select/clip_b_frac"] == pytest.approx(expected.sum() / n, abs=1e-15)
    assert out.metrics["select/clip_b_frac_pos"] == pytest.approx((expected & (adv > 0)).sum() / n, abs=1e-15)
    assert out.metrics["select/clip_b_frac_neg"] == pytest.approx((expected & (adv < 0)).sum() / n, abs=1e-15)
    assert out.metrics["select/clip_b_frac_pos"] + out.metrics["select/clip_b_frac_neg"] == pytest.approx(
        (expected & (adv != 0)).sum() / n, abs=1e-15)  # shares of every valid token: they add up
    kept = mask & ~expected
    check_token_mean(out, batch, case, kept=kept, count=kept.sum(), loss=ppo_loss(case), grad=ppo_grad(case))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["released", "paper"])
def test_clip_b_hand_worked_population_std_of_centred_s(dtype, mode):
    """S = nine 1s and one 0 (all A < 0): mean 0.9, population std 0.3, the 0 sits at z = -3.
    mu = 2.9 drops it; the sample std (0.316, z = -2.85) or an uncentred S (0 > -0.87) would keep it."""
    case = random_case(12, dtype, shape=(2, 6), lengths=[6, 4])
    s = np.array([1.0] * 9 + [0.0])
    case.arrays["disc"][case.mask] = quantize(s, dtype)
    case.arrays["advantages"] = quantize(np.where(case.mask, -1.0, GARBAGE["advantages"]), dtype)
    expected = np.zeros_like(case.mask)
    expected[1, 3] = True
    batch = case.batch()
    out = build_objective("clip_b", mu=2.9, mode=mode, **({"mu_high": 2.9} if mode == "paper" else {}))(batch)
    np.testing.assert_array_equal(dropped(out, batch), expected)
    assert out.metrics["clip_b/disc_std"] == pytest.approx(0.3, rel=1e-6)
    assert out.metrics["clip_b/disc_mean"] == pytest.approx(0.9, rel=1e-6)


def test_clip_b_refuses_an_upper_bound_without_the_two_sided_band():
    """mu_high is the paper's upper edge: the released (one-sided) rule would ignore it without a word."""
    with pytest.raises(ValueError, match="mu_high is the upper edge of the paper's two-sided band"):
        build_objective("clip_b", mu_high=3.0)
    assert build_objective("clip_b", mode="paper", mu_high=3.0).selectors[0].mu_high == 3.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_b_padding_never_drops_nor_shifts_the_statistics(dtype):
    clean = clip_b_case(dtype)
    for name in FIELDS:  # the same valid tokens, harmless padding
        clean.arrays[name] = np.where(clean.mask, clean.arrays[name], 0.0)
    garbage = clip_b_case(dtype)  # padding: S = -1e6 with A = -1e3, an outlier if it were counted
    outs = []
    for case in (clean, garbage):
        batch = case.batch()
        metrics = {}
        drop = ClipB(mu=2.0)(batch, batch.advantages, no_surrogate(batch), metrics).numpy()
        assert drop.any() and not drop[~case.mask].any()
        outs.append((drop, metrics))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    assert outs[0][1] == outs[1][1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["released", "paper"])
@pytest.mark.parametrize("mu", [2.5, 0.5])
def test_clip_b_constant_discriminator_drops_nothing(dtype, mode, mu):
    """All S equal: zero spread, no outlier, nothing dropped (the std < 1e-12 rule), for any mu."""
    case = random_case(3, dtype, shape=CONSTANT_SHAPE, lengths=CONSTANT_LENGTHS)
    case.arrays["disc"] = quantize(np.where(case.mask, 0.1, GARBAGE["disc"]), dtype)
    case.arrays["advantages"] = quantize(np.where(case.mask, -1.0, GARBAGE["advantages"]), dtype)
    batch = case.batch()
    out = build_objective("clip_b", mu=mu, mode=mode)(batch)
    assert not dropped(out, batch).any()
    assert out.metrics["select/clip_b_frac"] == 0.0
    np.testing.assert_array_equal(out.loss_mask.numpy(), case.mask)


# --------------------------------------------------------------------------------------------------
# 2. Clip_V (arXiv 2602.03392)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_v_cap_keeps_only_the_most_negative_candidates(dtype):
    """N = 20000 valid tokens, max_frac = 1e-4: at most max(1, int(2.0)) = 2 tokens, the most negative D."""
    rows, cols, length = 50, 410, 400
    rng = np.random.default_rng(5)
    case = random_case(5, dtype, shape=(rows, cols), lengths=[length] * rows)
    assert case.n_valid == 20_000
    d = rng.normal(0.0, 1.0, (rows, cols))
    adv = np.where(rng.random((rows, cols)) < 0.5, -1.0, 1.0)
    planted = {(3, 7): (-50.0, -1.0), (10, 0): (-60.0, -0.5), (20, 399): (-70.0, -1.0), (30, 100): (-80.0, -2.0),
               (40, 5): (-90.0, 0.0)}  # A = 0 counts as non-positive
    for index, (value, a) in planted.items():
        d[index], adv[index] = value, a
    d[(45, 45)], adv[(45, 45)] = -100.0, 1.0  # most negative of all, but A > 0: never dropped
    case.arrays["disc_centered"] = quantize(np.where(case.mask, d, GARBAGE["disc_centered"]), dtype)
    case.arrays["advantages"] = quantize(np.where(case.mask, adv, -1.0), dtype)  # padding: A < 0, D = -1e6

    d = case.arrays["disc_centered"]
    _, std = population_stats(d, case.mask)
    candidates = case.mask & (case.arrays["advantages"] <= 0) & (d < -8.5 * std)
    assert {tuple(i) for i in np.argwhere(candidates)} == set(planted)  # five candidates, none from the bulk
    expected = np.zeros_like(case.mask)
    expected[40, 5] = expected[30, 100] = True  # D = -90 and -80

    batch = case.batch()
    out = build_objective("clip_v")(batch)  # defaults: mu = 8.5, max_frac = 1e-4

    np.testing.assert_array_equal(dropped(out, batch), expected)
    np.testing.assert_array_equal(out.loss_mask.numpy(), case.mask & ~expected)
    assert out.metrics["select/clip_v_frac"] == pytest.approx(2 / 20_000, abs=1e-15)
    assert out.metrics["clip_v/disc_centered_std"] == pytest.approx(std, rel=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_v_candidates_are_non_positive_advantage_raw_d_outliers(dtype):
    """No cap binding (max_frac = 1): the dropped set is exactly {A <= 0, D < -mu std(D)}, with the threshold on
    the raw D (not D - mean D, as in the released code), std the population std over valid tokens."""
    case = random_case(8, dtype, shape=(8, 16))
    case.arrays["disc_centered"] = quantize(np.where(case.mask, case.arrays["disc_centered"] - 0.004, -1e6), dtype)
    case.set("advantages", (0, 0), 0.0)
    case.set("disc_centered", (0, 0), -0.05)
    case.set("advantages", (1, 0), 1.0)
    case.set("disc_centered", (1, 0), -0.06)
    d, adv, mask = case.arrays["disc_centered"], case.arrays["advantages"], case.mask
    mu = 1.5
    mean, std = population_stats(d, mask)
    assert_clear_of(d[mask], [-mu * std], margin=1e-6)
    expected = mask & (adv <= 0) & (d < -mu * std)
    centred_rule = mask & (adv <= 0) & (d - mean < -mu * std)
    assert expected[0, 0] and expected.sum() >= 3
    assert (expected != centred_rule).any()  # the data tell the raw and the centred threshold apart
    assert (mask & (adv > 0) & (d < -mu * std)).any()  # and contain A > 0 outliers, which must be kept

    batch = case.batch()
    out = build_objective("clip_v", mu=mu, max_frac=1.0)(batch)

    np.testing.assert_array_equal(dropped(out, batch), expected)
    kept = mask & ~expected
    check_token_mean(out, batch, case, kept=kept, count=kept.sum(), loss=ppo_loss(case), grad=ppo_grad(case))


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_v_hand_worked_population_std_and_raw_threshold(dtype):
    """D = nine 0s and one -1 (all A <= 0): population std 0.3. With mu = 3.25 the raw rule drops the -1
    (-1 < -0.975); the sample std (-1 > -1.028) or a centred D (-0.9 > -0.975) would keep it."""
    case = random_case(13, dtype, shape=(2, 6), lengths=[6, 4])
    case.arrays["disc_centered"][case.mask] = quantize([0.0] * 9 + [-1.0], dtype)
    case.arrays["advantages"] = quantize(np.where(case.mask, 0.0, GARBAGE["advantages"]), dtype)
    expected = np.zeros_like(case.mask)
    expected[1, 3] = True
    batch = case.batch()
    out = build_objective("clip_v", mu=3.25, max_frac=1.0)(batch)
    np.testing.assert_array_equal(dropped(out, batch), expected)
    assert out.metrics["clip_v/disc_centered_std"] == pytest.approx(0.3, rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_v_constant_d_drops_nothing(dtype):
    """All D equal: zero spread, no outlier (the std < 1e-12 rule), even though the raw D is negative."""
    case = random_case(4, dtype, shape=CONSTANT_SHAPE, lengths=CONSTANT_LENGTHS)
    case.arrays["disc_centered"] = quantize(np.where(case.mask, -0.1, GARBAGE["disc_centered"]), dtype)
    case.arrays["advantages"] = quantize(np.where(case.mask, -1.0, GARBAGE["advantages"]), dtype)
    batch = case.batch()
    out = build_objective("clip_v", max_frac=0.5)(batch)
    assert not dropped(out, batch).any()


# --------------------------------------------------------------------------------------------------
# 3. Clip-Cov (arXiv 2505.22617)
# --------------------------------------------------------------------------------------------------

CLIP_COV_PPO = {"clip_ratio_low": 0.2, "clip_ratio_high": 0.2}


def clip_cov_case(dtype: torch.dtype) -> tuple[Case, np.ndarray, np.ndarray]:
    """A batch where half of the tokens with covariance in (1, 5) are PPO-clipped (ratio beyond 1 +- 0.4 with
    the advantage's sign), and some others have an out-of-band ratio of the *other* sign (not clipped).
    Returns the case, the expected candidate set and the PPO-clipped set."""
    case = random_case(21, dtype, shape=(6, 40))
    rng = np.random.default_rng(21)
    case.arrays["log_prob"] = quantize(np.where(case.mask, rng.uniform(-4.0, -0.05, case.mask.shape), 3.0), dtype)
    case.arrays["advantages"] = quantize(np.where(case.mask, rng.normal(0.0, 1.5, case.mask.shape), -1e3), dtype)
    cov = token_cov(case)
    assert_clear_of(cov[case.mask], [1.0, 5.0])
    band = np.argwhere(case.mask & (cov > 1.0) & (cov < 5.0))
    lp, adv = case.arrays["log_prob"], case.arrays["advantages"]
    old = lp - rng.uniform(-0.1, 0.1, lp.shape)  # ratios within [0.9, 1.1]
    for k, (i, j) in enumerate(band):
        sign = np.sign(adv[i, j])
        if k % 2 == 0:  # clipped: r = e^{+-0.4} on the side where PPO clips
            old[i, j] = lp[i, j] - 0.4 * sign
        elif k % 4 == 1:  # out of band on the side where PPO does not clip: still a candidate
            old[i, j] = lp[i, j] + 0.4 * sign
    case.arrays["old_log_prob"] = quantize(np.where(case.mask, old, -50.0), dtype)
    clipped = ppo_clipped(case)
    candidates = case.mask & ~clipped & (cov > 1.0) & (cov < 5.0)
    assert (clipped & (cov > 1.0) & (cov < 5.0)).sum() >= 10
    return case, candidates, clipped


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_cov_drops_the_right_number_of_unclipped_band_tokens(dtype):
    case, candidates, clipped = clip_cov_case(dtype)
    n = case.n_valid
    ratio = 0.05
    n_drop = min(max(1, int(ratio * n)), int(candidates.sum()))
    assert 1 < n_drop < candidates.sum()
    for seed in range(20):
        batch = case.batch()
        out = build_objective("clip_cov", clip_cov_ratio=ratio, seed=seed, **CLIP_COV_PPO)(batch)
        drop = dropped(out, batch)
        assert drop.sum() == n_drop
        assert not (drop & ~candidates).any(), "dropped a token outside lb < C < ub, or a PPO-clipped one"
        assert not (drop & clipped).any()
        assert out.metrics["select/clip_cov_frac"] == pytest.approx(n_drop / n, abs=1e-15)
        assert out.metrics["select/clip_cov_candidates_frac"] == pytest.approx(candidates.sum() / n, abs=1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_cov_drops_every_candidate_when_the_budget_exceeds_them(dtype):
    """ratio N above #candidates: the dropped set is exactly the candidate set (deterministic)."""
    case, candidates, _ = clip_cov_case(dtype)
    assert int(0.5 * case.n_valid) > candidates.sum()
    batch = case.batch()
    out = build_objective("clip_cov", clip_cov_ratio=0.5, seed=0, **CLIP_COV_PPO)(batch)
    np.testing.assert_array_equal(dropped(out, batch), candidates)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keep_in_normaliser", [None, False])
def test_clip_cov_normaliser(dtype, keep_in_normaliser):
    """Default (released code): dropped tokens count in the normaliser, loss = sum_kept / N_valid.
    ``keep_in_normaliser=False`` (the paper's formula): loss = sum_kept / #kept."""
    case, _, _ = clip_cov_case(dtype)
    extra = {} if keep_in_normaliser is None else {"keep_in_normaliser": keep_in_normaliser}
    batch = case.batch()
    out = build_objective("clip_cov", clip_cov_ratio=0.05, seed=3, **CLIP_COV_PPO, **extra)(batch)
    drop = dropped(out, batch)
    kept = case.mask & ~drop
    assert drop.any()
    if keep_in_normaliser is None:
        np.testing.assert_array_equal(out.loss_mask.numpy(), case.mask)
        count = case.n_valid
    else:
        np.testing.assert_array_equal(out.loss_mask.numpy(), kept)
        count = kept.sum()
    check_token_mean(out, batch, case, kept=kept, count=count, loss=ppo_loss(case), grad=ppo_grad(case))


def test_clip_cov_choice_is_seeded_and_random_not_top_k():
    case, candidates, _ = clip_cov_case(torch.float64)
    cov = token_cov(case)

    def choice(seed):
        batch = case.batch()
        return dropped(build_objective("clip_cov", clip_cov_ratio=0.05, seed=seed, **CLIP_COV_PPO)(batch), batch)

    first = choice(7)
    np.testing.assert_array_equal(first, choice(7))  # a fresh objective with the same seed: the same tokens
    subsets = {tuple(np.flatnonzero(choice(seed))) for seed in range(8)}
    assert len(subsets) >= 4, "different seeds should pick different subsets"
    n_drop = first.sum()
    top_k = set(np.argsort(np.where(candidates, cov, -np.inf).ravel())[::-1][:n_drop])
    assert any(set(s) != top_k for s in subsets), "the choice looks like top-k by covariance"
    covered = set().union(*subsets)
    assert len(covered) > n_drop


# --------------------------------------------------------------------------------------------------
# 4. KL-Cov (arXiv 2505.22617)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_cov_penalises_exactly_the_top_covariance_tokens(dtype):
    case = random_case(31, dtype, shape=(6, 30))
    case.set("log_prob", (0, 0), case.arrays["old_log_prob"][0, 0] + 0.5)  # r = 1.65: no PPO clipping in KL-Cov
    case.set("advantages", (0, 0), 1.0)
    n, ratio, coef = case.n_valid, 0.05, 0.7
    k = max(1, int(ratio * n))
    cov = token_cov(case)
    order = np.argsort(np.where(case.mask, cov, -np.inf).ravel())[::-1]
    assert cov.ravel()[order[k - 1]] - cov.ravel()[order[k]] > 1e-5
    top = np.zeros(case.mask.size, dtype=bool)
    top[order[:k]] = True
    top = top.reshape(case.mask.shape)

    batch = case.batch()
    out = build_objective("kl_cov", kl_cov_ratio=ratio, ppo_kl_coef=coef)(batch)

    assert out.metrics["select/kl_cov_frac"] == pytest.approx(k / n, abs=1e-15)
    abs_log_ratio = np.abs(case.arrays["log_prob"] - case.arrays["old_log_prob"])
    np.testing.assert_allclose(out.metrics["kl_cov/abs_log_ratio"], abs_log_ratio[case.mask].mean(), **tolerances(dtype))
    np.testing.assert_array_equal(out.trained_mask.numpy(), case.mask)
    np.testing.assert_array_equal(out.loss_mask.numpy(), case.mask)
    log_ratio = case.arrays["log_prob"] - case.arrays["old_log_prob"]
    adv, r = case.arrays["advantages"], np.exp(np.clip(log_ratio, -20, 20))
    loss = -adv * r + np.where(top, coef * np.abs(log_ratio), 0.0)
    grad = -adv * r + np.where(top, coef * np.sign(log_ratio), 0.0)
    check_token_mean(out, batch, case, kept=case.mask, count=n, loss=loss, grad=grad)


def test_kl_cov_default_ratio_selects_at_least_one_token():
    case = random_case(32, torch.float64, shape=(4, 20))
    assert int(2e-3 * case.n_valid) == 0
    out = build_objective("kl_cov")(case.batch())
    assert out.metrics["select/kl_cov_frac"] == pytest.approx(1 / case.n_valid, abs=1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_cov_on_policy_warns_and_reduces_to_the_plain_surrogate(dtype):
    case = random_case(33, dtype, shape=(5, 20))
    case.arrays["old_log_prob"] = case.arrays["log_prob"].copy()
    batch = case.batch()
    objective = build_objective("kl_cov", kl_cov_ratio=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one on-policy call (the first update of any rollout) is normal: no warning
        out = objective(batch)
        objective(batch)
    with pytest.warns(UserWarning, match="on-policy"):  # the third in a row means KL-Cov never acts
        objective(batch)
    adv = case.arrays["advantages"]
    check_token_mean(out, batch, case, kept=case.mask, count=case.n_valid, loss=-adv, grad=-adv)


def test_kl_cov_counts_on_policy_steps_not_the_micro_batches_of_one():
    """A step's first update is on-policy and may be split into many micro-batches: no warning as long as a later
    update of each step is off-policy; three steps in a row with nothing off-policy warn."""
    import dataclasses

    case = random_case(34, torch.float32, shape=(5, 20))
    case.arrays["old_log_prob"] = case.arrays["log_prob"].copy()
    on_policy = case.batch()
    off_policy = dataclasses.replace(on_policy, old_log_prob=on_policy.old_log_prob - 0.1)
    objective = build_objective("kl_cov", kl_cov_ratio=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in (1, 2, 3):
            for _ in range(4):  # four micro-batches of the on-policy mini-batch
                objective(dataclasses.replace(on_policy, step=step))
            objective(dataclasses.replace(off_policy, step=step))  # the step's second mini-batch
    fresh = build_objective("kl_cov", kl_cov_ratio=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in (1, 2):
            fresh(dataclasses.replace(on_policy, step=step))
            fresh(dataclasses.replace(on_policy, step=step))
    with pytest.warns(UserWarning, match="on-policy"):
        fresh(dataclasses.replace(on_policy, step=3))
    # advantages all 0 (every group's rewards equal) move no weight in any update: not counted either way
    silent = dataclasses.replace(on_policy, advantages=torch.zeros_like(on_policy.advantages))
    quiet = build_objective("kl_cov", kl_cov_ratio=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(1, 6):
            quiet(dataclasses.replace(silent, step=step))
        quiet(dataclasses.replace(on_policy, step=6))
        quiet(dataclasses.replace(on_policy, step=7))
        quiet(dataclasses.replace(silent, step=8))  # nor does it reset the count of on-policy steps
    with pytest.warns(UserWarning, match="on-policy"):
        quiet(dataclasses.replace(on_policy, step=9))


# --------------------------------------------------------------------------------------------------
# 5. Forking tokens / low-entropy tokens (arXiv 2506.01939)
# --------------------------------------------------------------------------------------------------

DAPO_CLIP = (0.2, 0.28)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rho", [0.2, 0.5, 0.1])
def test_forking_and_low_entropy_tokens_partition_at_the_quantile(dtype, rho):
    # 50 valid tokens: the (1 - rho) quantile falls between two entropies (0.8 * 49 = 39.2, ...)
    case = random_case(41, dtype, shape=(4, 16), lengths=[16, 11, 14, 9])
    h, mask = case.arrays["entropy"], case.mask
    threshold = float(np.quantile(h[mask], 1.0 - rho))  # numpy's default: linear interpolation
    assert_clear_of(h[mask], [threshold], margin=1e-6)
    high = mask & (h >= threshold)
    assert high.sum() == 49 - int(np.floor((1.0 - rho) * 49))  # sorted positions above (1 - rho) * (n - 1)

    kept_sets = {}
    for name, kept in (("forking_tokens", high), ("low_entropy_tokens", mask & ~high)):
        batch = case.batch()
        out = build_objective(name, top_entropy_quantile=rho)(batch)
        np.testing.assert_array_equal(out.trained_mask.numpy(), kept)
        np.testing.assert_array_equal(out.loss_mask.numpy(), kept)  # normalised by the kept count
        assert out.metrics[f"select/{name}_threshold"] == pytest.approx(threshold, rel=1e-6)
        assert out.metrics[f"select/{name}_frac"] == pytest.approx(1 - kept.sum() / case.n_valid, abs=1e-15)
        check_token_mean(
            out, batch, case, kept=kept, count=kept.sum(), loss=ppo_loss(case, *DAPO_CLIP), grad=ppo_grad(case, *DAPO_CLIP)
        )
        kept_sets[name] = kept
    assert not (kept_sets["forking_tokens"] & kept_sets["low_entropy_tokens"]).any()
    np.testing.assert_array_equal(kept_sets["forking_tokens"] | kept_sets["low_entropy_tokens"], mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rho, n_high", [(1.0, 6), (0.2, 2)])
def test_forking_threshold_on_a_data_point_keeps_that_token(dtype, rho, n_high):
    """When the quantile lands exactly on an entropy (rho = 1: the minimum; rho = 0.2 with 6 tokens: the 5th),
    ``H >= tau`` keeps that token, and so does low_entropy_tokens' ``H <= tau``. 0.1 and 1.1 are not float32
    numbers: a float64 batch must not lose them."""
    values = np.array([0.7, 0.1, 1.3, 0.3, 1.1, 0.9])
    case = random_case(42, dtype, shape=(2, 4), lengths=[4, 2])
    case.arrays["entropy"] = quantize(np.where(case.mask, 0.0, GARBAGE["entropy"]), dtype)
    case.arrays["entropy"][case.mask] = quantize(values, dtype)
    h = case.arrays["entropy"]
    threshold = float(np.quantile(h[case.mask], 1.0 - rho))
    assert threshold in h[case.mask]
    high = case.mask & (h >= threshold)
    assert high.sum() == n_high

    fork = build_objective("forking_tokens", top_entropy_quantile=rho)(case.batch())
    np.testing.assert_array_equal(fork.trained_mask.numpy(), high)
    if rho < 1.0:  # low_entropy_tokens refuses rho = 1, which would keep only the lowest entropy's tokens
        low = build_objective("low_entropy_tokens", top_entropy_quantile=rho)(case.batch())
        np.testing.assert_array_equal(low.trained_mask.numpy(), case.mask & (h <= threshold))
        assert (low.trained_mask.numpy() & high).sum() == 1  # the token at tau, on both sides


@pytest.mark.parametrize("dtype", DTYPES)
def test_entropies_tied_at_the_threshold_are_kept_by_both_selectors(dtype):
    """Most entropies exactly 0 (top-k / top-p sampling left one candidate): the (1 - rho) quantile is 0. Forks keep
    every token; the low-entropy ablation keeps the zeros (it dropped every token, and trained on nothing)."""
    case = random_case(44, dtype, shape=(4, 10), lengths=[10, 7, 10, 3])
    zeros = np.zeros(case.mask.shape, dtype=bool)
    zeros[case.mask] = np.arange(case.n_valid) % 6 != 0  # 25 of 30 valid tokens: more than 1 - rho = 0.8
    case.arrays["entropy"] = np.where(zeros, 0.0, case.arrays["entropy"]).astype(case.arrays["entropy"].dtype)
    assert zeros.sum() == 25 and case.n_valid == 30
    fork = build_objective("forking_tokens", top_entropy_quantile=0.2)(case.batch())
    np.testing.assert_array_equal(fork.trained_mask.numpy(), case.mask)
    low = build_objective("low_entropy_tokens", top_entropy_quantile=0.2)(case.batch())
    np.testing.assert_array_equal(low.trained_mask.numpy(), zeros)
    assert low.metrics["select/low_entropy_tokens_threshold"] == 0.0
    assert low.metrics["select/low_entropy_tokens_frac"] == pytest.approx(5 / 30)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forking_rho_one_keeps_every_token_and_equals_dapo(dtype):
    case = random_case(43, dtype, shape=(5, 12))
    batch = case.batch()
    out = build_objective("forking_tokens", top_entropy_quantile=1.0)(batch)
    np.testing.assert_array_equal(out.trained_mask.numpy(), case.mask)
    reference = build_objective("dapo")(case.batch())
    np.testing.assert_allclose(float(out.loss.detach()), float(reference.loss.detach()), **tolerances(dtype))


# --------------------------------------------------------------------------------------------------
# 6. PSR / NSR (arXiv 2506.01347)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["psr", "nsr"])
def test_psr_nsr_drop_by_advantage_sign_and_keep_the_normaliser(dtype, method):
    case = random_case(51, dtype, shape=(6, 14))
    case.set("advantages", (0, 0), 0.0)
    adv, mask = case.arrays["advantages"], case.mask
    expected = mask & ((adv < 0) if method == "psr" else (adv > 0))
    batch = case.batch()
    out = build_objective(method)(batch)
    np.testing.assert_array_equal(dropped(out, batch), expected)
    assert out.trained_mask[0, 0]  # A = 0 is dropped by neither
    np.testing.assert_array_equal(out.loss_mask.numpy(), mask)
    assert out.metrics["select/advantage_sign_frac"] == pytest.approx(expected.sum() / case.n_valid, abs=1e-15)
    kept = mask & ~expected
    check_token_mean(out, batch, case, kept=kept, count=case.n_valid, loss=ppo_loss(case), grad=ppo_grad(case))


# --------------------------------------------------------------------------------------------------
# 7. Advantage shapers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_entropy_advantage_is_a_capped_detached_bonus(dtype):
    case = random_case(61, dtype, shape=(2, 6), lengths=[6, 6])
    case.arrays["advantages"] = quantize([[1.0, 1.0, -1.0, -1.0, 0.0, 2.0], [-3.0, 0.5, 0.0, -0.2, 4.0, -1.0]], dtype)
    case.arrays["entropy"] = quantize([[0.5, 3.0, 0.5, 3.0, 2.0, 0.0], [1.0, 0.1, 0.0, 9.0, 2.5, 1.25]], dtype)
    case.arrays["old_log_prob"] = case.arrays["log_prob"].copy()  # r = 1: the gradient is -A' / N
    adv, h = case.arrays["advantages"], case.arrays["entropy"]
    alpha, kappa = 0.4, 2.0
    shaped = adv + np.minimum(alpha * h, np.abs(adv) / kappa)
    np.testing.assert_allclose(shaped[0], [1.2, 1.5, -0.8, -0.5, 0.0, 2.0], rtol=1e-6)  # hand-worked

    batch = case.batch(entropy_grad=True)
    out = build_objective("entropy_advantage")(batch)

    np.testing.assert_allclose(out.advantages.double().numpy(), shaped, **tolerances(dtype))
    assert out.metrics["shape/entropy_advantage_bonus"] == pytest.approx((shaped - adv).mean(), rel=1e-6)
    # the cap |A| / kappa binds where alpha H exceeds it: (0, 1), (0, 3), (0, 4) and (1, 3)
    assert out.metrics["shape/entropy_advantage_capped_frac"] == pytest.approx(4 / 12)
    assert np.all(out.advantages.numpy()[adv == 0] == 0)
    assert np.all(out.advantages.numpy()[adv < 0] < 0)
    check_token_mean(out, batch, case, kept=case.mask, count=case.n_valid, loss=-shaped, grad=-shaped)
    entropy_grad = batch.entropy.grad
    assert entropy_grad is None or not entropy_grad.any(), "gradient flowed into the entropy"


@pytest.mark.parametrize("dtype", DTYPES)
def test_lopti_reweight_and_w_reinforce_advantages(dtype):
    case = random_case(62, dtype, shape=(4, 10))
    adv, old, mask = case.arrays["advantages"], case.arrays["old_log_prob"], case.mask
    tol = tolerances(dtype)

    out = build_objective("lopti_reweight")(case.batch())
    lopti = (0.3 * np.exp(old) + 0.7) * adv
    np.testing.assert_allclose(out.advantages.double().numpy()[mask], lopti[mask], **tol)
    out = build_objective("lopti_reweight", alpha=0.8)(case.batch())
    np.testing.assert_allclose(out.advantages.double().numpy()[mask], ((0.8 * np.exp(old) + 0.2) * adv)[mask], **tol)

    batch = case.batch()
    out = build_objective("w_reinforce")(batch)
    scaled = np.where(adv > 0, 0.1 * adv, adv)
    np.testing.assert_allclose(out.advantages.double().numpy()[mask], scaled[mask], **tol)
    check_token_mean(
        out, batch, case, kept=mask, count=case.n_valid,
        loss=ppo_loss(case, advantages=scaled), grad=ppo_grad(case, advantages=scaled),
    )

    # shapers compose in order, each rewriting what the one before gave: Lopti's weight times the entropy advantage
    entropy = case.arrays["entropy"]
    out = build_objective("entropy_advantage+lopti_reweight")(case.batch())
    chained = (0.3 * np.exp(old) + 0.7) * (adv + np.minimum(0.4 * entropy, np.abs(adv) / 2.0))
    np.testing.assert_allclose(out.advantages.double().numpy()[mask], chained[mask], **tol)


# --------------------------------------------------------------------------------------------------
# 8. Train/rollout mismatch corrections: TIS, IcePop
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_tis_token_level_weight(dtype):
    case = random_case(71, dtype, shape=(5, 16))
    rng = np.random.default_rng(71)
    mismatch = rng.uniform(-1.0, 1.5, case.mask.shape)  # k in [0.37, 4.5]
    case.arrays["rollout_log_prob"] = quantize(np.where(case.mask, case.arrays["old_log_prob"] - mismatch, -1e3), dtype)
    k = np.exp(np.where(case.mask, case.arrays["old_log_prob"] - case.arrays["rollout_log_prob"], 0.0))
    weight = np.minimum(k, 2.0)
    assert (case.mask & (k > 2.0)).any() and (case.mask & (k < 2.0)).any()

    batch = case.batch()
    out = build_objective("tis")(batch)

    np.testing.assert_array_equal(out.loss_mask.numpy(), case.mask)
    assert out.metrics["correction/tis_weight_mean"] == pytest.approx(weight[case.mask].mean(), rel=1e-5)
    assert out.metrics["correction/tis_truncated_frac"] == pytest.approx((case.mask & (k > 2)).sum() / case.n_valid)
    check_token_mean(
        out, batch, case, kept=case.mask, count=case.n_valid, loss=weight * ppo_loss(case), grad=weight * ppo_grad(case)
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_tis_sequence_level_weight(dtype):
    case = random_case(72, dtype, shape=(6, 16))
    rng = np.random.default_rng(72)
    mismatch = rng.normal(0.0, 0.08, case.mask.shape)
    case.arrays["rollout_log_prob"] = quantize(np.where(case.mask, case.arrays["old_log_prob"] - mismatch, -1e3), dtype)
    log_k = np.where(case.mask, case.arrays["old_log_prob"] - case.arrays["rollout_log_prob"], 0.0).sum(-1)
    threshold = 1.1
    weight = np.minimum(np.exp(log_k), threshold)[:, None] * np.ones_like(case.mask, dtype=float)
    assert (np.exp(log_k) > threshold).any() and (np.exp(log_k) < threshold).any()

    batch = case.batch()
    out = build_objective("tis", level="sequence", rollout_is_threshold=threshold)(batch)
    check_token_mean(
        out, batch, case, kept=case.mask, count=case.n_valid, loss=weight * ppo_loss(case), grad=weight * ppo_grad(case)
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_icepop_zeroes_tokens_outside_the_band(dtype):
    case = random_case(73, dtype, shape=(3, 8), lengths=[8, 8, 5])
    ks = np.array([[0.3, 0.49, 0.51, 1.0, 2.0, 4.9, 5.1, 8.0], [1.2, 0.8, 0.45, 6.0, 3.0, 1.0, 0.2, 0.7]])
    planted = np.ones(case.mask.shape)
    planted[:2] = ks
    case.arrays["rollout_log_prob"] = quantize(
        np.where(case.mask, case.arrays["old_log_prob"] - np.log(planted), -1e3), dtype
    )
    k = np.exp(np.where(case.mask, case.arrays["old_log_prob"] - case.arrays["rollout_log_prob"], 0.0))
    inside = (k >= 0.5) & (k <= 5.0)
    weight = np.where(inside, k, 0.0)
    zeroed = case.mask & ~inside
    assert zeroed.sum() == 7

    batch = case.batch()
    out = build_objective("icepop")(batch)

    np.testing.assert_array_equal(out.loss_mask.numpy(), case.mask)  # zeroed tokens stay in the normaliser
    assert out.metrics["correction/icepop_masked_frac"] == pytest.approx(zeroed.sum() / case.n_valid, abs=1e-15)
    # J_IcePop (arXiv 2510.18855): (1/G) sum_i (1/|y_i|) sum_t M(k_it) min(r A, clip(r) A)
    check_seq_mean_token_mean(out, batch, case, kept=case.mask & inside, loss=weight * ppo_loss(case),
                              grad=weight * ppo_grad(case))
    batch = case.batch()
    composed = build_objective("dapo+icepop", clip_ratio_high=0.2)(batch)  # composed, the first method's aggregation
    check_token_mean(composed, batch, case, kept=case.mask & inside, count=case.n_valid,
                     loss=weight * ppo_loss(case), grad=weight * ppo_grad(case))


# --------------------------------------------------------------------------------------------------
# 9. Composition, empty batches, missing fields
# --------------------------------------------------------------------------------------------------


def composition_case(dtype: torch.dtype) -> Case:
    case = clip_b_case(dtype)
    case.set("entropy", (0, 0), 40.0)  # a clip_b drop that forking_tokens would keep
    # a kept (high-entropy, ordinary S) token with r = 1.25, A > 0: clipped at 1.2, not at 1.28
    case.set("entropy", (5, 0), 50.0)
    case.set("advantages", (5, 0), 1.0)
    case.set("log_prob", (5, 0), case.arrays["old_log_prob"][5, 0] + np.log(1.25))
    return case


@pytest.mark.parametrize("dtype", DTYPES)
def test_dapo_clip_b_forking_drops_the_union(dtype):
    case = composition_case(dtype)
    alone = {}
    for name, overrides in (("clip_b", {"mu": 2.0}), ("forking_tokens", {})):
        batch = case.batch()
        alone[name] = dropped(build_objective(name, **overrides)(batch), batch)
    union = alone["clip_b"] | alone["forking_tokens"]
    assert alone["clip_b"].any() and (alone["clip_b"] & ~alone["forking_tokens"]).any()

    objective = build_objective("dapo+clip_b+forking_tokens", mu=2.0)
    assert (objective.surrogate.clip_ratio_low, objective.surrogate.clip_ratio_high) == DAPO_CLIP
    batch = case.batch()
    out = objective(batch)
    np.testing.assert_array_equal(dropped(out, batch), union)
    kept = case.mask & ~union
    np.testing.assert_array_equal(out.loss_mask.numpy(), kept)
    assert kept[5, 0]
    check_token_mean(
        out, batch, case, kept=kept, count=kept.sum(), loss=ppo_loss(case, *DAPO_CLIP), grad=ppo_grad(case, *DAPO_CLIP)
    )

    reordered = build_objective("dapo+forking_tokens+clip_b", mu=2.0)(case.batch())
    assert [p.name for p in build_objective("dapo+forking_tokens+clip_b").selectors] == ["forking_tokens", "clip_b"]
    np.testing.assert_array_equal(reordered.trained_mask.numpy(), out.trained_mask.numpy())
    np.testing.assert_array_equal(reordered.loss_mask.numpy(), out.loss_mask.numpy())
    assert float(reordered.loss.detach()) == float(out.loss.detach())


@pytest.mark.parametrize(
    "name, clip",
    [
        ("dapo+clip_b+forking_tokens", (0.2, 0.28)),
        ("dapo+clip_v", (0.2, 0.28)),
        ("dapo+clip_cov", (0.2, 0.28)),
        ("grpo+clip_cov", (0.2, 0.2)),
    ],
)
def test_the_first_method_gives_the_surrogate(name, clip):
    """ObjectiveConfig: 'the first [method] gives the surrogate and aggregation, the others add their shapers,
    regularisers, selectors and correction' (Clip-Cov's own clip range of 1 is set aside, with a warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if "clip_cov" in name else "error")
        objective = build_objective(name)
    assert objective.surrogate.name == "ppo_clip"
    assert (objective.surrogate.clip_ratio_low, objective.surrogate.clip_ratio_high) == clip


@pytest.mark.parametrize("info", available_methods(), ids=lambda info: info.name)
def test_empty_mask_gives_zero_loss_and_zero_finite_gradients(info):
    case = random_case(91, torch.float32, shape=(3, 7))
    empty = np.zeros_like(case.mask)
    batch = case.batch(entropy_grad=True, mask=empty)
    out = build_objective(info.name)(batch)
    assert torch.isfinite(out.loss) and float(out.loss.detach()) == 0.0
    assert not out.trained_mask.any() and not out.loss_mask.any()
    assert all(np.isfinite(v) for v in out.metrics.values())
    out.loss.backward()
    for tensor in (batch.log_prob, batch.entropy):
        if tensor.grad is not None:
            assert torch.isfinite(tensor.grad).all() and not tensor.grad.any()


@pytest.mark.parametrize(
    "method, field, names_token_stats",
    [
        ("clip_v", "disc_centered", True),
        ("clip_b", "disc", True),
        ("forking_tokens", "entropy", True),
        ("low_entropy_tokens", "entropy", True),
        ("entropy_advantage", "entropy", True),
        ("tis", "rollout_log_prob", False),
        ("icepop", "rollout_log_prob", False),
        ("kl_ref", "ref_log_prob", False),
    ],
)
def test_missing_field_raises_a_value_error_naming_it(method, field, names_token_stats):
    batch = random_case(92, torch.float32, shape=(2, 5)).batch(without=(field,))
    with pytest.raises(ValueError, match=field) as error:
        build_objective(method)(batch)
    assert method in str(error.value)
    if names_token_stats:
        assert "token_stats" in str(error.value)


@pytest.mark.parametrize("method, params", [
    ("clip_cov", {"clip_cov_ratio": 0.05, "clip_cov_lb": -10.0, "clip_cov_ub": 10.0, "seed": 0}),
    ("kl_cov", {"kl_cov_ratio": 0.05}),
    ("clip_v", {"mu": 0.5, "max_frac": 0.05}),
])
def test_a_transposed_mask_gives_what_its_contiguous_copy_gives(method, params):
    """A mask built time-major and transposed is a valid [B, T] mask: the selectors that write their drops through a
    flat view of it raised 'view size is not compatible'."""
    case = random_case(93, torch.float64, shape=(6, 40))
    transposed = torch.tensor(case.mask.T.copy()).t()
    assert not transposed.is_contiguous()
    out = build_objective(method, **params)(case.batch(mask=transposed))
    reference = build_objective(method, **params)(case.batch())
    if method != "kl_cov":  # a selector: it dropped something (kl_cov penalises its tokens instead)
        assert out.trained_mask.any() and not out.trained_mask[torch.tensor(case.mask)].all()
    torch.testing.assert_close(out.trained_mask, reference.trained_mask)
    torch.testing.assert_close(out.loss, reference.loss)


# --------------------------------------------------------------------------------------------------
# 10. bfloat16 logits
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("clip_b", {"mu": 1.0}),
        ("clip_v", {"mu": 1.0, "max_frac": 0.1}),
        ("forking_tokens", {}),
        ("dapo+clip_b+clip_v+forking_tokens", {}),
    ],
)
def test_bf16_logits_through_token_stats(name, overrides):
    gen = torch.Generator().manual_seed(101)
    rows, cols, vocab = 4, 12, 64
    logits = (3.0 * torch.randn(rows, cols, vocab, generator=gen)).to(torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, vocab, (rows, cols), generator=gen)
    mask = torch.arange(cols)[None, :] < torch.tensor([12, 9, 7, 11])[:, None]
    stats = token_stats(logits, targets, mask=mask, need=("logprob", "entropy", "disc", "disc_centered"))
    assert stats.logprob.dtype == torch.float32
    noise = 0.05 * torch.randn(rows, cols, generator=gen)
    batch = PolicyBatch(
        log_prob=stats.logprob,
        old_log_prob=torch.where(mask, stats.logprob.detach() + noise, torch.zeros(())),
        advantages=torch.randn(rows, cols, generator=gen),
        mask=mask,
        entropy=stats.entropy,
        disc=stats.disc,
        disc_centered=stats.disc_centered,
    )
    out = build_objective(name, **overrides)(batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(logits.grad.float()).all() and logits.grad.any()
    gone = mask & ~out.trained_mask
    assert gone.any()
    assert not logits.grad[gone].any(), "a dropped token's logits received gradient"


def test_clip_cov_random_state_round_trips_with_its_device(monkeypatch):
    """The saved state names its generator's device; a resumed objective draws what the original draws next."""
    case, _, _ = clip_cov_case(torch.float64)
    objective = build_objective("clip_cov", clip_cov_ratio=0.05, seed=5, **CLIP_COV_PPO)
    objective(case.batch())
    state = objective.state_dict()
    assert state["selector/clip_cov"]["device"] == "cpu"
    resumed = build_objective("clip_cov", clip_cov_ratio=0.05, seed=5, **CLIP_COV_PPO)
    resumed.load_state_dict(state)
    batch = case.batch()
    np.testing.assert_array_equal(dropped(resumed(batch), batch), dropped(objective(case.batch()), case.batch()))
    cuda_state = {"selector/clip_cov": {**state["selector/clip_cov"], "device": "cuda:0"}}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA generator"):
        build_objective("clip_cov", clip_cov_ratio=0.05, seed=5, **CLIP_COV_PPO).load_state_dict(cuda_state)


def test_a_seeded_clip_cov_state_is_refused_by_an_unseeded_clip_cov():
    """The saved random state of a private generator has nowhere to go in a Clip-Cov that draws from torch's global
    generator: refused, naming the part and the cause, not an AttributeError."""
    case, _, _ = clip_cov_case(torch.float64)
    seeded = build_objective("clip_cov", clip_cov_ratio=0.05, seed=1, **CLIP_COV_PPO)
    seeded(case.batch())
    with pytest.raises(ValueError, match=r"selector 'clip_cov': the saved state holds the random state of a private "
                                         r"generator .* give it the seed it was saved with"):
        build_objective("clip_cov", clip_cov_ratio=0.05, **CLIP_COV_PPO).load_state_dict(seeded.state_dict())


@pytest.mark.parametrize("ratio, expected", [(0.29, 28), (0.57, 56), (0.3, 30), (0.25, 25)])
def test_clip_cov_and_kl_cov_counts_are_the_floor_of_the_float_product_as_in_verl(ratio, expected):
    """``int(r * N)``, as verl computes it: 0.29 and 0.57 are doubles just below their decimals, so of 100 tokens,
    all inside Clip-Cov's band, 28 and 56 are dropped (and selected by KL-Cov), not 29 and 57."""
    assert int(ratio * 100) == expected
    half = 50
    log_prob = torch.tensor([[-1.0] * half + [-3.0] * half], dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([[2.0] * half + [-2.0] * half], dtype=torch.float64)  # every C_t = 2
    mask = torch.ones(1, 100, dtype=torch.bool)
    batch = PolicyBatch(log_prob=log_prob, old_log_prob=log_prob.detach(), advantages=advantages, mask=mask)
    out = build_objective("clip_cov", clip_cov_ratio=ratio, seed=0)(batch)
    assert int((mask & ~out.trained_mask).sum()) == expected
    off_policy = PolicyBatch(log_prob=log_prob, old_log_prob=log_prob.detach() - 0.1, advantages=advantages, mask=mask)
    assert build_objective("kl_cov", kl_cov_ratio=ratio)(off_policy).metrics["select/kl_cov_frac"] == expected / 100


def test_restoring_a_state_taken_before_the_first_draw_reseeds_clip_cov():
    """A state saved before the generator existed (empty) restores a generator that has not drawn yet: what an
    evaluation or a skipped update that saved and restored the state leaves behind."""
    case, _, _ = clip_cov_case(torch.float64)
    objective = build_objective("clip_cov", clip_cov_ratio=0.05, seed=5, **CLIP_COV_PPO)
    saved = objective.state_dict()
    assert saved == {}
    first = dropped(objective(case.batch()), case.batch())
    objective.load_state_dict(saved)
    np.testing.assert_array_equal(dropped(objective(case.batch()), case.batch()), first)


# --------------------------------------------------------------------------------------------------
# statistics over the whole step batch (PolicyBatch.population)
# --------------------------------------------------------------------------------------------------


def _pieces(batch: PolicyBatch, population: PolicyBatch | None, size: int) -> list[PolicyBatch]:
    """``batch`` cut into pieces of ``size`` rows, each told its rows in ``population`` when given."""
    rows = torch.arange(batch.log_prob.shape[0])
    pieces = []
    for piece in rows.split(size):
        fields = {name: getattr(batch, name)[piece] for name in FIELDS if getattr(batch, name) is not None}
        fields["log_prob"] = fields["log_prob"].detach().requires_grad_(True)
        pieces.append(PolicyBatch(mask=batch.mask[piece], population=population,
                                  rows=None if population is None else piece, **fields))
    return pieces


@pytest.mark.parametrize(("method", "params", "case_of"), [
    ("clip_b", {"mu": 1.0}, lambda: clip_b_case(torch.float64)),
    ("clip_b", {"mu": 1.5, "mode": "paper"}, lambda: clip_b_case(torch.float64)),
    ("clip_v", {}, None),
])
def test_whole_batch_selectors_decide_over_the_population(method, params, case_of):
    """Clip_B's mean and std and Clip_V's std and cap are taken over the whole training batch in the released code:
    pieces that carry the population drop exactly the whole batch's tokens, while pieces deciding on their own
    rows do not."""
    if case_of is None:  # Clip_V: five candidates in five rows, a cap of two over the whole batch
        rng = np.random.default_rng(5)
        case = random_case(5, torch.float64, shape=(50, 410), lengths=[400] * 50)
        d = rng.normal(0.0, 1.0, (50, 410))
        adv = np.where(rng.random((50, 410)) < 0.5, -1.0, 1.0)
        for index, value in {(3, 7): -50.0, (10, 0): -60.0, (20, 399): -70.0, (30, 100): -80.0, (40, 5): -90.0}.items():
            d[index], adv[index] = value, -1.0
        case.arrays["disc_centered"] = np.where(case.mask, d, GARBAGE["disc_centered"])
        case.arrays["advantages"] = np.where(case.mask, adv, -1.0)
        size = 10
    else:
        case, size = case_of(), 1
    objective = build_objective(method, **params)
    whole_batch = case.batch()
    expected = dropped(objective(whole_batch), whole_batch)
    assert expected.any()
    population = case.batch()
    for population_given in (population, None):
        pieces = _pieces(case.batch(), population_given, size)
        got = np.concatenate([dropped(objective(piece), piece) for piece in pieces])
        if population_given is not None:
            np.testing.assert_array_equal(got, expected)
        else:
            assert (got != expected).any()  # the pieces' own statistics decide otherwise: the population matters


def test_population_needs_the_rows_of_the_batch():
    case = random_case(3, torch.float64, shape=(4, 6))
    population = case.batch()
    with pytest.raises(ValueError, match="rows must be 2 integer row indices"):
        _ = PolicyBatch(**{name: getattr(population, name)[:2] for name in FIELDS}, mask=population.mask[:2],
                        population=population)
    with pytest.raises(ValueError, match="keep the population's width"):
        _ = PolicyBatch(**{name: getattr(population, name)[:2, :3] for name in FIELDS}, mask=population.mask[:2, :3],
                        population=population, rows=torch.arange(2))


@pytest.mark.parametrize("selector", ["forking_tokens", "low_entropy_tokens"])
def test_a_zero_entropy_share_is_refused(selector):
    """rho = 0 does not mean 'no token': the threshold is then the largest entropy, and H >= tau keeps its token(s)."""
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        build_objective(selector, top_entropy_quantile=0.0)


def test_low_entropy_tokens_refuses_to_drop_every_token():
    with pytest.raises(ValueError, match="would drop every token but those at the lowest entropy"):
        build_objective("low_entropy_tokens", top_entropy_quantile=1.0)
    assert build_objective("forking_tokens", top_entropy_quantile=1.0).selectors[0].top_entropy_quantile == 1.0


# --------------------------------------------------------------------------------------------------
# 11. Values exactly on a boundary, counts with a fraction
# --------------------------------------------------------------------------------------------------


def exact_batch(log_prob, advantages, mask, **fields) -> PolicyBatch:
    """An on-policy float64 batch from nested lists."""

    def tensor(values):
        return torch.tensor(values, dtype=torch.float64)

    return PolicyBatch(log_prob=tensor(log_prob).requires_grad_(True), old_log_prob=tensor(log_prob),
                       advantages=tensor(advantages), mask=torch.tensor(mask), **{name: tensor(v) for name, v in fields.items()})


def dropped_count(batch: PolicyBatch, out) -> int:
    return int((batch.mask & ~out.trained_mask).sum())


def test_clip_cov_drops_the_floor_of_r_n():
    """|I_clip| = floor(r N) (arXiv 2505.22617, Eq. 11): every C_t is 2, inside (1, 5); r N = 3.5 drops 3."""
    batch = exact_batch([[-1.0] * 5 + [-3.0] * 5], [[2.0] * 5 + [-2.0] * 5], [[True] * 10])
    assert dropped_count(batch, build_objective("clip_cov", clip_cov_ratio=0.35, seed=0)(batch)) == 3


def test_clip_cov_band_excludes_its_bounds():
    """Candidates have lb < C_t < ub, strictly: every C_t here is exactly 1 = lb."""
    batch = exact_batch([[-1.0, -3.0, -1.0, -3.0]], [[1.0, -1.0, 1.0, -1.0]], [[True] * 4])
    out = build_objective("clip_cov", clip_cov_ratio=0.5, seed=0)(batch)
    assert dropped_count(batch, out) == 0 and out.metrics["select/clip_cov_candidates_frac"] == 0.0


def test_clip_v_caps_at_the_floor_of_max_frac_of_the_valid_tokens():
    """At most max(1, floor(max_frac N)) drops, N the valid tokens (not the padded width), most negative D first."""
    padded = exact_batch([[0.0] * 8], [[-1.0] * 8], [[True] * 4 + [False] * 4],
                         disc_centered=[[-3.0, -2.0, -1.0, 6.0, -99.0, -99.0, -99.0, -99.0]])
    out = build_objective("clip_v", mu=0.1, max_frac=0.5)(padded)
    assert (padded.mask & ~out.trained_mask).tolist() == [[True, True] + [False] * 6]
    fractional = exact_batch([[0.0] * 10], [[-1.0] * 10], [[True] * 10],
                             disc_centered=[[-5.0, -4.0, -3.0, -2.0, -1.0, 3.0, 3.0, 3.0, 3.0, 3.0]])
    assert dropped_count(fractional, build_objective("clip_v", mu=0.1, max_frac=0.35)(fractional)) == 3  # not round(3.5)


def test_adaptive_entropy_at_its_target_is_not_below_it():
    """The bonus is on only while H < target (arXiv 2505.22312): H exactly at the target steps the coefficient down."""
    objective = build_objective("adaptive_entropy", target_entropy=0.25, entropy_coeff=2e-3, delta=1e-3)
    for step in (0, 1):
        batch = exact_batch([[0.0, 0.0]], [[1.0, -1.0]], [[True, True]], entropy=[[0.25, 0.25]])
        batch.entropy.requires_grad_(True)
        batch.step = step
        out = objective(batch)
    assert out.metrics["reg/adaptive_entropy_below_target"] == 0.0
    assert out.metrics["reg/adaptive_entropy_controller_coeff"] == pytest.approx(1e-3)


def test_entropy_bonus_is_aggregated_like_the_policy_loss():
    """seq-mean-token-mean: the bonus is c times the mean over sequences of each one's mean entropy, (1 + 3) / 2, not
    the token mean 7 / 5."""
    batch = exact_batch([[0.0] * 4] * 2, [[0.0] * 4] * 2, [[True] * 4, [True, False, False, False]],
                        entropy=[[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    batch.entropy.requires_grad_(True)
    out = build_objective("entropy_bonus", entropy_coeff=1.0, loss_agg_mode="seq-mean-token-mean")(batch)
    assert float(out.loss) == pytest.approx(-2.0)


def test_kl_ref_is_aggregated_like_the_policy_loss():
    """GRPO's KL term is averaged like its loss (arXiv 2402.03300, Eq. 3): with seq-mean-token-mean the k1 estimates
    [1, 1, 1, 1] and [3] give (1 + 3) / 2, not the token mean 7 / 5."""
    batch = exact_batch([[0.0] * 4] * 2, [[0.0] * 4] * 2, [[True] * 4, [True, False, False, False]],
                        ref_log_prob=[[-1.0] * 4, [-3.0, 0.0, 0.0, 0.0]])
    out = build_objective("grpo+kl_ref", kl_loss_type="k1", kl_loss_coef=1.0)(batch)
    assert out.metrics["kl/ref"] == pytest.approx(2.0) and float(out.loss) == pytest.approx(2.0)


def test_icepop_band_includes_its_bounds():
    """IcePop keeps k in [alpha, beta], closed: k = 1 exactly with alpha = 1 is kept."""
    log_prob = [[-1.0, -2.0]]
    batch = exact_batch(log_prob, [[1.0, 1.0]], [[True, True]], rollout_log_prob=log_prob)
    out = build_objective("icepop", icepop_low=1.0, icepop_high=5.0)(batch)
    assert out.metrics["correction/icepop_masked_frac"] == 0.0


# --------------------------------------------------------------------------------------------------
# 12. Budgets on small batches, the quantile, shaped advantages, populations in sequence
# --------------------------------------------------------------------------------------------------


def test_default_budgets_drop_one_token_when_the_fraction_of_n_rounds_to_zero():
    """Clip-Cov drops max(1, floor(r N)) (arXiv 2505.22617) and Clip_V at most max(1, floor(max_frac N)): with the
    default r = 2e-4 and max_frac = 1e-4 a batch of 10 tokens still loses exactly one."""
    clip_cov_batch = exact_batch([[-1.0] * 5 + [-3.0] * 5], [[2.0] * 5 + [-2.0] * 5], [[True] * 10])  # every C_t = 2
    assert dropped_count(clip_cov_batch, build_objective("clip_cov", seed=0)(clip_cov_batch)) == 1
    clip_v_batch = exact_batch([[0.0] * 10], [[-1.0] * 10], [[True] * 10],
                               disc_centered=[[-5.0, -4.0, -3.0, -2.0, -1.0, 3.0, 3.0, 3.0, 3.0, 3.0]])
    out = build_objective("clip_v", mu=0.1)(clip_v_batch)
    assert dropped(out, clip_v_batch).tolist() == [[True] + [False] * 9]  # the most negative D


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_quantile_is_numpys_linear_interpolation_over_the_valid_values(dtype):
    """The forking threshold tau is the (1 - rho) quantile with linear interpolation between order statistics
    (numpy.quantile's default), over the valid tokens only, for positions with any fractional part."""
    from entrorl.objective.batch import masked_quantile

    case = random_case(41, dtype, shape=(5, 9))
    entropy, mask = case.arrays["entropy"], case.mask
    values = torch.tensor(entropy, dtype=dtype)
    for q in np.linspace(0.0, 1.0, 41):
        got = float(masked_quantile(values, torch.tensor(mask), float(q)))
        np.testing.assert_allclose(got, np.quantile(entropy[mask], q), **tolerances(dtype))
    # the selector keeps exactly the tokens at or above that threshold
    rho = 0.37
    tau = np.quantile(entropy[mask], 1.0 - rho)
    assert_clear_of(entropy[mask], [tau])
    batch = case.batch()
    out = build_objective("forking_tokens", top_entropy_quantile=rho)(batch)
    np.testing.assert_array_equal(dropped(out, batch), mask & (entropy < tau))


def test_kl_cov_under_forking_tokens_reports_the_tokens_whose_loss_carries_its_term():
    """Composed with forking_tokens, KL-Cov chooses its top-k by covariance over every valid token, and the 80/20
    selector then drops the loss (the term with it) of the low-entropy ones: select/kl_cov_frac is the share of the
    chosen tokens that stay in training, those whose gradient carries sign(log r), not of every chosen one."""
    case = random_case(7, torch.float64, shape=(6, 20))
    ratio, rho = 0.2, 0.2
    mask, h = case.mask, case.arrays["entropy"]
    cov = token_cov(case)
    n_chosen = int(np.floor(ratio * case.n_valid))
    chosen = np.zeros_like(mask)
    chosen.flat[np.argsort(np.where(mask, cov, -np.inf).ravel())[::-1][:n_chosen]] = True
    kept = mask & (h >= np.quantile(h[mask], 1.0 - rho))
    assert 0 < (chosen & kept).sum() < n_chosen  # the selector drops some chosen tokens, not all
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kl_cov composed after grpo trains with grpo's surrogate
        objective = build_objective("grpo+forking_tokens+kl_cov", kl_cov_ratio=ratio, top_entropy_quantile=rho,
                                    loss_agg_mode="token-mean")
    batch = case.batch()
    out = objective(batch)
    assert out.metrics["select/kl_cov_frac"] == pytest.approx((chosen & kept).sum() / case.n_valid, abs=1e-15)
    log_ratio = case.arrays["log_prob"] - case.arrays["old_log_prob"]
    check_token_mean(out, batch, case, kept=kept, count=kept.sum(),
                     loss=ppo_loss(case) + np.where(chosen, np.abs(log_ratio), 0.0),
                     grad=ppo_grad(case) + np.where(chosen, np.sign(log_ratio), 0.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_cov_ratio_one_penalises_every_valid_token_and_no_padding(dtype):
    """top-k by covariance ranks the valid tokens only: with kl_cov_ratio = 1 every valid token is among the top
    N, including those with a negative C_t, which padding (C = 0 there) must not displace."""
    case = random_case(42, dtype, shape=(6, 12))
    assert (token_cov(case)[case.mask] < 0).any() and (~case.mask).any()
    batch = case.batch()
    out = build_objective("kl_cov", kl_cov_ratio=1.0, ppo_kl_coef=1.0)(batch)
    assert out.metrics["select/kl_cov_frac"] == 1.0
    log_ratio = case.arrays["log_prob"] - case.arrays["old_log_prob"]
    adv = case.arrays["advantages"]
    check_token_mean(out, batch, case, kept=case.mask, count=case.n_valid,
                     loss=-adv * np.exp(log_ratio) + np.abs(log_ratio),
                     grad=-adv * np.exp(log_ratio) + np.sign(log_ratio))


@pytest.mark.parametrize("dtype", DTYPES)
def test_covariance_methods_rank_tokens_by_the_shaped_advantages(dtype):
    """A shaper rewrites the advantage every later part sees: Clip-Cov's band and KL-Cov's top-k take C_t from the
    shaped advantages (here W-REINFORCE's lambda A on A > 0), not from the raw ones."""
    case = random_case(43, dtype, shape=(6, 30))
    rng = np.random.default_rng(43)
    case.arrays["log_prob"] = quantize(np.where(case.mask, rng.uniform(-4.0, -0.05, case.mask.shape), 3.0), dtype)
    case.arrays["advantages"] = quantize(np.where(case.mask, rng.normal(0.0, 2.0, case.mask.shape), -1e3), dtype)
    case.arrays["old_log_prob"] = quantize(
        np.where(case.mask, case.arrays["log_prob"] - rng.uniform(-0.1, 0.1, case.mask.shape), -50.0), dtype)
    lam = 0.1
    raw = case.arrays["advantages"]
    shaped = np.where(raw > 0, lam * raw, raw)
    cov, raw_cov = token_cov(case, shaped), token_cov(case)
    assert_clear_of(cov[case.mask], [1.0, 5.0])

    band = case.mask & (cov > 1.0) & (cov < 5.0)  # clip_cov's surrogate (clip 1 / 1) clips nothing here
    assert (band != (case.mask & (raw_cov > 1.0) & (raw_cov < 5.0))).any()  # well posed: the shaping matters
    batch = case.batch()
    out = build_objective({"method": "clip_cov", "shapers": [{"name": "positive_scale", "lam": lam}],
                           "params": {"clip_cov_ratio": 1.0, "seed": 0}})(batch)
    np.testing.assert_array_equal(dropped(out, batch), band)

    k = 12
    top = np.zeros_like(case.mask)
    top.flat[np.argsort(-np.where(case.mask, cov, -np.inf), axis=None, kind="stable")[:k]] = True
    raw_top = np.zeros_like(case.mask)
    raw_top.flat[np.argsort(-np.where(case.mask, raw_cov, -np.inf), axis=None, kind="stable")[:k]] = True
    assert (top != raw_top).any()
    assert_clear_of(np.sort(cov[case.mask])[::-1][k - 1:k], np.sort(cov[case.mask])[::-1][k:k + 1], margin=1e-6)
    batch = case.batch()
    out = build_objective({"method": "kl_cov", "shapers": [{"name": "positive_scale", "lam": lam}],
                           "params": {"kl_cov_ratio": k / case.n_valid + 1e-9}})(batch)
    log_ratio = case.arrays["log_prob"] - case.arrays["old_log_prob"]
    ratio = np.exp(log_ratio)
    check_token_mean(out, batch, case, kept=case.mask, count=case.n_valid,
                     loss=-shaped * ratio + np.where(top, np.abs(log_ratio), 0.0),
                     grad=-shaped * ratio + np.where(top, np.sign(log_ratio), 0.0))


def test_whole_batch_selectors_keeping_dropped_tokens_in_the_normaliser_weigh_every_token():
    """Objective.normaliser_mask removes a population's dropped tokens only for selectors whose dropped tokens leave
    the normaliser: with keep_in_normaliser=True every valid token still counts."""
    case = clip_b_case(torch.float64)
    population = case.batch()
    leaving = build_objective("clip_b", mu=1.0)
    drop = dropped(leaving(case.batch()), case.batch())
    assert drop.any()
    np.testing.assert_array_equal(leaving.normaliser_mask(population).numpy(), case.mask & ~drop)
    staying = build_objective("clip_b", mu=1.0, keep_in_normaliser=True)
    np.testing.assert_array_equal(staying.normaliser_mask(population).numpy(), case.mask)


def test_a_new_population_gets_its_own_decision_without_end_step():
    """A caller that never calls end_step still gets each step's decision from that step's population, not a
    decision kept from an earlier one."""
    objective = build_objective("clip_b", mu=1.0)
    first, second = clip_b_case(torch.float64), random_case(44, torch.float64, shape=(8, 16))
    second.set("disc", (5, 5), -0.8)
    second.set("advantages", (5, 5), -1.0)
    expected = {}
    for name, case in (("first", first), ("second", second)):
        whole = case.batch()
        expected[name] = dropped(build_objective("clip_b", mu=1.0)(whole), whole)
    assert (expected["first"] != expected["second"]).any()
    for name, case in (("first", first), ("second", second)):
        population = case.batch()
        pieces = _pieces(case.batch(), population, 2)
        got = np.concatenate([dropped(objective(piece), piece) for piece in pieces])
        np.testing.assert_array_equal(got, expected[name])


# --------------------------------------------------------------------------------------------------
# 13. Closed and open bands at their edges, metrics over the valid tokens, population lifetime
# --------------------------------------------------------------------------------------------------


def test_icepop_band_includes_its_upper_bound():
    """M(k) = k for alpha <= k <= beta (closed on both sides): k = 1 exactly with beta = 1 keeps its weight."""
    log_prob = [[-1.0, -2.0]]
    batch = exact_batch(log_prob, [[1.0, -0.5]], [[True, True]], rollout_log_prob=log_prob)
    out = build_objective("icepop", icepop_low=0.5, icepop_high=1.0)(batch)
    assert out.metrics["correction/icepop_masked_frac"] == 0.0
    assert float(out.loss.detach()) == pytest.approx((-1.0 + 0.5) / 2, rel=1e-12)
    np.testing.assert_allclose(grad_of_log_prob(out, batch), [[-0.5, 0.25]], rtol=1e-12)


def grad_of_log_prob(out, batch: PolicyBatch) -> np.ndarray:
    (grad,) = torch.autograd.grad(out.loss, batch.log_prob)
    return grad.numpy()


def test_tis_weight_at_its_threshold_is_not_counted_as_truncated():
    """w = min(k, C): k = C exactly is the weight itself, not a truncation."""
    log_prob = [[-1.0, -2.0, -0.5]]
    batch = exact_batch(log_prob, [[1.0, -1.0, 0.5]], [[True] * 3], rollout_log_prob=log_prob)
    out = build_objective("tis", rollout_is_threshold=1.0)(batch)
    assert out.metrics["correction/tis_truncated_frac"] == 0.0
    assert out.metrics["correction/tis_weight_mean"] == 1.0


def test_correction_fractions_are_shares_of_the_valid_tokens():
    """Padding has k = 1: with C = 0.5 (TIS), or sampler log-probs 3 below the trainer's (IcePop's band [0.5, 5]),
    every valid token is truncated / masked, and the reported share is exactly 1, not inflated by the padded
    positions."""
    log_prob = [[-1.0, -2.0, 0.0, 0.0], [-0.5, 0.0, 0.0, 0.0]]
    mask = [[True, True, False, False], [True, False, False, False]]
    batch = exact_batch(log_prob, [[1.0, -1.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]], mask, rollout_log_prob=log_prob)
    tis = build_objective("tis", rollout_is_threshold=0.5)(batch)
    assert tis.metrics["correction/tis_truncated_frac"] == 1.0
    assert tis.metrics["correction/tis_weight_mean"] == 0.5
    far = [[-4.0, -5.0, 0.0, 0.0], [-3.5, 0.0, 0.0, 0.0]]  # ratio e^3 on every valid token, 1 on the padding
    far_batch = exact_batch(log_prob, [[1.0, -1.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]], mask, rollout_log_prob=far)
    icepop = build_objective("icepop", icepop_low=0.5, icepop_high=5.0)(far_batch)
    assert icepop.metrics["correction/icepop_masked_frac"] == 1.0


def test_clip_cov_band_excludes_its_upper_bound():
    """Candidates have lb < C_t < ub, strictly: every C_t here is exactly 5 = ub."""
    batch = exact_batch([[-1.0, -3.0, -1.0, -3.0]], [[5.0, -5.0, 5.0, -5.0]], [[True] * 4])
    out = build_objective("clip_cov", clip_cov_ratio=0.5, seed=0)(batch)
    assert dropped_count(batch, out) == 0 and out.metrics["select/clip_cov_candidates_frac"] == 0.0
    # just inside the band, the same budget drops 2 of the 4
    inside = exact_batch([[-1.0, -3.0, -1.0, -3.0]], [[4.5, -4.5, 4.5, -4.5]], [[True] * 4])
    assert dropped_count(inside, build_objective("clip_cov", clip_cov_ratio=0.5, seed=0)(inside)) == 2


@pytest.mark.parametrize("mode", ["released", "paper"])
def test_clip_b_keeps_tokens_exactly_at_mu_sigma(mode):
    """S = [1, -1, 1, -1]: mean 0, population std 1, every deviation exactly +-1. The paper keeps
    S - mean in [-mu sigma, mu sigma] (closed) and the released code keeps A < 0 tokens with z >= -mu sigma: mu = 1
    drops nothing; mu = 0.5 drops both tails (paper) or the A < 0 low ones (released)."""
    extra = {"mode": mode, **({"mu_high": None} if mode == "paper" else {})}

    def run(mu):
        batch = exact_batch([[0.0] * 4], [[-1.0, -1.0, 1.0, -1.0]], [[True] * 4], disc=[[1.0, -1.0, 1.0, -1.0]])
        out = build_objective("clip_b", mu=mu, **extra)(batch)
        assert out.metrics["clip_b/disc_std"] == 1.0 and out.metrics["clip_b/disc_mean"] == 0.0
        return dropped(out, batch).tolist()

    assert run(1.0) == [[False] * 4]
    assert run(0.5) == ([[True] * 4] if mode == "paper" else [[False, True, False, True]])


def test_clip_b_tiny_but_real_spread_still_drops_its_outlier():
    """Only a spread below 1e-12 counts as none: S = nine 0s and one -1e-7 (std 3e-8) is the hand-worked z = -3 case
    scaled down, and mu = 2.9 drops the low token."""
    case = random_case(12, torch.float64, shape=(2, 6), lengths=[6, 4])
    case.arrays["disc"][case.mask] = [0.0] * 9 + [-1e-7]
    case.arrays["advantages"] = np.where(case.mask, -1.0, GARBAGE["advantages"])
    batch = case.batch()
    out = build_objective("clip_b", mu=2.9)(batch)
    expected = np.zeros_like(case.mask)
    expected[1, 3] = True
    np.testing.assert_array_equal(dropped(out, batch), expected)
    assert out.metrics["clip_b/disc_std"] == pytest.approx(3e-8, rel=1e-9)


def test_float64_entropies_that_coincide_in_float32_stay_apart():
    """The forking threshold is taken in the entropies' own float64: with H = [1, 1 + 1e-12, 2, 3, 4] and rho = 0.75
    the 0.25 quantile is the token at 1 + 1e-12, kept, and the token at exactly 1 is dropped."""
    entropy = [[1.0, 1.0 + 1e-12, 2.0, 3.0, 4.0]]
    batch = exact_batch([[-1.0] * 5], [[1.0] * 5], [[True] * 5], entropy=entropy)
    out = build_objective("forking_tokens", top_entropy_quantile=0.75)(batch)
    assert out.trained_mask.tolist() == [[False, True, True, True, True]]
    assert out.metrics["select/forking_tokens_threshold"] == 1.0 + 1e-12


def test_lopti_weight_mean_is_over_the_valid_tokens():
    """The logged mean weight (alpha pi_old + 1 - alpha) is over the valid tokens; padding (pi_old = e^-50) would pull
    it towards 1 - alpha."""
    case = random_case(62, torch.float64, shape=(4, 10), lengths=[10, 4, 6, 5])
    out = build_objective("lopti_reweight")(case.batch())
    weight = 0.3 * np.exp(case.arrays["old_log_prob"]) + 0.7
    assert out.metrics["shape/lopti_weight_mean"] == pytest.approx(weight[case.mask].mean(), rel=1e-12)


def test_positive_scale_reports_the_share_of_valid_tokens_it_scaled():
    case = random_case(63, torch.float64, shape=(4, 10), lengths=[10, 4, 6, 5])
    out = build_objective("w_reinforce")(case.batch())
    advantages = np.broadcast_to(case.arrays["advantages"], case.mask.shape)
    assert out.metrics["shape/positive_scale_frac"] == pytest.approx((advantages[case.mask] > 0).mean(), rel=1e-12)


def test_entropy_advantage_metrics_are_over_the_valid_tokens():
    """shape/entropy_advantage_bonus and _capped_frac are means over the valid tokens: padding (A = 0 there, H = 1e6)
    would add zero bonuses and count as capped."""
    case = random_case(64, torch.float64, shape=(4, 10), lengths=[10, 4, 6, 5])
    adv, h, mask = case.arrays["advantages"], case.arrays["entropy"], case.mask
    out = build_objective("entropy_advantage")(case.batch())
    bonus = np.minimum(0.4 * h, np.abs(adv) / 2.0)
    capped = 0.4 * h > np.abs(adv) / 2.0
    assert 0 < capped[mask].sum() < case.n_valid  # well posed: both branches occur
    assert out.metrics["shape/entropy_advantage_bonus"] == pytest.approx(bonus[mask].mean(), rel=1e-12)
    assert out.metrics["shape/entropy_advantage_capped_frac"] == pytest.approx(capped[mask].mean(), rel=1e-6)  # a float32 share


@pytest.mark.parametrize("method", ["entropy_advantage", "lopti_reweight"])
def test_shaped_advantages_keep_the_log_prob_dtype(method):
    """Float64 entropies or old log-probs next to float32 log-probs do not turn the advantages into float64: a shaper
    returns the dtype it was given."""
    case = random_case(65, torch.float64, shape=(3, 8))
    batch = case.batch()
    batch.log_prob = batch.log_prob.detach().float().requires_grad_()
    out = build_objective(method)(batch)
    assert out.advantages.dtype == torch.float32

def test_advantages_mean_metric_is_of_the_shaped_advantages():
    """``advantages/mean`` reports the advantages the surrogate trained on: after W-REINFORCE's lambda A on A > 0."""
    case = random_case(63, torch.float64, shape=(4, 10))
    adv = case.arrays["advantages"]
    out = build_objective("w_reinforce")(case.batch())
    shaped = np.where(adv > 0, 0.1 * adv, adv)
    assert (shaped[case.mask].mean() - adv[case.mask].mean()) < -0.01  # well posed: the shaping moves the mean
    assert out.metrics["advantages/mean"] == pytest.approx(shaped[case.mask].mean(), rel=1e-12)


def test_ratio_metrics_are_over_the_valid_tokens():
    """ratio/max, ratio/mean and kl/old_new = mean(log pi_old - log pi) over the valid tokens only: here every valid
    ratio is below 1, so padding (r = 1 there) must not set the maximum."""
    old = [[-1.0, -2.0, -0.5, -0.5], [-1.5, -1.0, -1.0, -1.0]]
    log_prob = [[-1.1, -2.3, 5.0, 5.0], [-1.6, 7.0, 7.0, 7.0]]
    mask = [[True, True, False, False], [True, False, False, False]]
    batch = PolicyBatch(log_prob=torch.tensor(log_prob, dtype=torch.float64, requires_grad=True),
                        old_log_prob=torch.tensor(old, dtype=torch.float64),
                        advantages=torch.ones(2, 4, dtype=torch.float64), mask=torch.tensor(mask))
    out = build_objective("dapo")(batch)
    assert out.metrics["ratio/max"] == pytest.approx(np.exp(-0.1), rel=1e-12)
    assert out.metrics["ratio/mean"] == pytest.approx(np.exp([-0.1, -0.3, -0.1]).mean(), rel=1e-12)
    assert out.metrics["kl/old_new"] == pytest.approx((0.1 + 0.3 + 0.1) / 3, rel=1e-12)


def test_cispo_clip_fraction_counts_weights_clipped_on_either_side():
    """clip/cispo_frac is the share of tokens whose IS weight was clipped, below 1 - eps_low or above 1 + eps_high."""
    log_ratio = np.log([[0.5, 1.0, 1.5, 1.1]])
    batch = PolicyBatch(log_prob=torch.tensor(log_ratio - 1.0, requires_grad=True),
                        old_log_prob=torch.full((1, 4), -1.0, dtype=torch.float64),
                        advantages=torch.ones(1, 4, dtype=torch.float64), mask=torch.ones(1, 4, dtype=torch.bool))
    out = build_objective("cispo", clip_ratio_low=0.2)(batch)
    assert out.metrics["clip/cispo_frac"] == 0.5


def test_kl_cov_judges_on_policy_by_its_selected_tokens():
    """The warning is about the KL term: it does nothing when every *selected* token has log r = 0, even if other
    tokens are off-policy (the penalty touches only the selected ones)."""
    import dataclasses

    case = random_case(35, torch.float64, shape=(4, 20))
    top = np.unravel_index(np.argmax(np.where(case.mask, token_cov(case), -np.inf)), case.mask.shape)
    old = case.arrays["log_prob"] - 0.1
    old[top] = case.arrays["log_prob"][top]
    case.arrays["old_log_prob"] = np.where(case.mask, old, GARBAGE["old_log_prob"])
    batch = case.batch()
    objective = build_objective("kl_cov")  # k N < 1: one token, the top-covariance one
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in (1, 2):
            out = objective(dataclasses.replace(batch, step=step))
    assert out.metrics["select/kl_cov_frac"] == pytest.approx(1 / case.n_valid)
    with pytest.warns(UserWarning, match="on-policy"):
        objective(dataclasses.replace(batch, step=3))



def test_kl_cov_is_not_on_policy_while_any_selected_token_moved():
    """Several selected tokens, only one of them with log r = 0: the KL term still acts on the others, so three
    such steps in a row are no reason to warn."""
    import dataclasses

    case = random_case(36, torch.float64, shape=(4, 20))
    order = np.argsort(np.where(case.mask, token_cov(case), -np.inf), axis=None)[::-1]
    old = np.where(case.mask, case.arrays["log_prob"] - 0.1, GARBAGE["old_log_prob"])
    top = np.unravel_index(order[0], case.mask.shape)
    old[top] = case.arrays["log_prob"][top]
    case.arrays["old_log_prob"] = old
    batch = case.batch()
    k = 3
    objective = build_objective("kl_cov", kl_cov_ratio=(k + 0.5) / case.n_valid)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in (1, 2, 3, 4):
            out = objective(dataclasses.replace(batch, step=step))
    assert out.metrics["select/kl_cov_frac"] == pytest.approx(k / case.n_valid)


def test_kl_cov_on_policy_warning_is_given_once():
    """The no-op warning is said once, after the third on-policy step, not again at every later step."""
    import dataclasses

    case = random_case(37, torch.float64, shape=(4, 20))
    case.arrays["old_log_prob"] = case.arrays["log_prob"].copy()
    batch = case.batch()
    objective = build_objective("kl_cov", kl_cov_ratio=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 8):
            objective(dataclasses.replace(batch, step=step))
    assert [str(w.message)[:7] for w in caught] == ["kl_cov:"]

def test_adaptive_entropy_first_batch_at_its_target_is_not_below_it():
    """With no finished step, the first batch decides the bonus: H exactly at the target keeps it off."""
    objective = build_objective("adaptive_entropy", target_entropy=0.25, entropy_coeff=2e-3)
    batch = exact_batch([[0.0, 0.0]], [[1.0, -1.0]], [[True, True]], entropy=[[0.25, 0.25]])
    batch.entropy.requires_grad_(True)
    out = objective(batch)
    assert out.metrics["reg/adaptive_entropy_below_target"] == 0.0
    assert out.metrics["reg/adaptive_entropy_coeff"] == 0.0
    assert float(out.loss.detach()) == float(out.policy_loss.detach())


def test_end_step_releases_the_step_population():
    """A selector deciding over the step's population keeps it only until end_step: afterwards the population's
    tensors can be freed."""
    import gc
    import weakref

    objective = build_objective("clip_b", mu=1.0)
    case = clip_b_case(torch.float64)
    population = case.batch()
    alive = weakref.ref(population)
    for piece in _pieces(case.batch(), population, 2):
        objective(piece)
    del piece, population
    gc.collect()
    assert alive() is not None  # held for the step's other mini- and micro-batches
    objective.end_step()
    gc.collect()
    assert alive() is None


# --------------------------------------------------------------------------------------------------
# 14. Whole-batch selectors next to per-batch ones, and the quantile's edge cases
# --------------------------------------------------------------------------------------------------


def test_only_whole_batch_selectors_decide_over_the_population_and_leave_its_normaliser():
    """``takes_step_statistics`` holds when any selector decides over the whole batch (Clip_B), not for per-batch
    selectors alone nor for none; ``normaliser_mask`` removes only the whole-batch selectors' drops: the 80/20 and
    PSR selectors decide per micro-batch, so they neither ask the population nor shrink its normaliser."""
    case = clip_b_case(torch.float64)
    population = case.batch()
    composed = build_objective("dapo+clip_b+forking_tokens+psr", mu=1.0)
    assert composed.takes_step_statistics
    assert not build_objective("dapo+forking_tokens").takes_step_statistics
    assert not build_objective("grpo").takes_step_statistics
    clip_b_drop = dropped(build_objective("clip_b", mu=1.0)(case.batch()), case.batch())
    assert clip_b_drop.any()
    np.testing.assert_array_equal(composed.normaliser_mask(population).numpy(), case.mask & ~clip_b_drop)
    np.testing.assert_array_equal(build_objective("dapo+forking_tokens").normaliser_mask(population).numpy(), case.mask)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_micro_batches_add_up_to_the_whole_batch_with_a_regulariser_over_every_valid_token(mode):
    """rft leaves its dropped tokens out of the policy loss's normaliser, while kl_ref and the entropy bonus average
    over every valid token: one global count for both made the micro-batches' losses add up to another loss than the
    whole batch's (1.194 against 1.129 here). The terms over every valid token take valid_num_tokens /
    valid_batch_size."""
    generator = torch.Generator().manual_seed(0)
    log_prob = torch.randn(6, 8, generator=generator, dtype=torch.float64) * 0.5 - 1.0
    fields = dict(log_prob=log_prob, old_log_prob=log_prob + 0.2 * torch.randn(6, 8, generator=generator,
                                                                                dtype=torch.float64),
                  advantages=torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0], dtype=torch.float64),
                  mask=torch.ones(6, 8, dtype=torch.bool), ref_log_prob=log_prob - 0.5,
                  entropy=torch.rand(6, 8, generator=generator, dtype=torch.float64))
    fields["mask"][0, 6:] = fields["mask"][3, 3:] = False
    population = PolicyBatch(**fields)

    def objective():
        return build_objective("rft+kl_ref+entropy_bonus", kl_loss_coef=0.5, entropy_coeff=0.1, loss_agg_mode=mode)

    whole = objective()(population)
    kept = objective().normaliser_mask(population)
    counts = ({"batch_num_tokens": float(kept.sum()), "valid_num_tokens": float(population.mask.sum())}
              if mode == "token-mean" else
              {"global_batch_size": float(kept.any(-1).sum()), "valid_batch_size": float(population.mask.any(-1).sum())})
    split, total = objective(), 0.0
    for rows in (torch.arange(0, 3), torch.arange(3, 6)):
        micro = PolicyBatch(**{name: value[rows] for name, value in fields.items()}, population=population, rows=rows)
        total += float(split(micro, **counts).loss)
    assert float(whole.loss_mask.sum()) < float(population.mask.sum())  # rft left tokens out of the normaliser
    assert total == pytest.approx(float(whole.loss), rel=1e-12)
    with pytest.raises(ValueError, match="valid_num_tokens"):
        objective()(population, valid_num_tokens=-1.0)


def test_a_population_decision_drops_only_valid_tokens_of_the_batch():
    """A mini-batch takes the population's decision on its rows, restricted to its own valid tokens: a token the
    population drops but the mini-batch masks out is not among the selector's drops."""
    case = clip_b_case(torch.float64)
    population = case.batch()
    selector = build_objective("clip_b", mu=1.0).selectors[0]
    whole_drop = selector.decide(population, population.advantages)[0]
    assert bool(whole_drop[0, 0]) and bool(whole_drop[1, 1])
    rows = torch.tensor([0, 1])
    mask = population.mask[rows].clone()
    mask[0, 0] = False  # the first planted outlier is padding in this mini-batch
    piece = PolicyBatch(**{name: getattr(population, name)[rows] for name in FIELDS}, mask=mask, population=population,
                        rows=rows)
    surrogate = SurrogateOutput(per_token_loss=torch.zeros_like(mask, dtype=torch.float64),
                                clipped=torch.zeros_like(mask), ratio=torch.ones_like(mask, dtype=torch.float64))
    drop = selector(piece, piece.advantages, surrogate, {})
    np.testing.assert_array_equal(drop.numpy(), whole_drop[rows].numpy() & mask.numpy())
    assert not bool(drop[0, 0]) and bool(drop[1, 1])


def test_masked_quantile_of_no_values_is_nan_and_never_carries_a_gradient():
    from entrorl.objective.batch import masked_quantile

    values = torch.tensor([[3.0, 1.0, 2.0]], requires_grad=True)
    assert torch.isnan(masked_quantile(values, torch.zeros(1, 3, dtype=torch.bool), 0.5))
    threshold = masked_quantile(values, torch.tensor([[True, True, False]]), 0.25)
    assert float(threshold) == pytest.approx(1.5) and not threshold.requires_grad
    assert float(masked_quantile(values, torch.ones(1, 3, dtype=torch.bool), 1.0)) == 3.0


def test_the_80_20_methods_train_with_dapos_clip_higher():
    """The 80/20 paper (arXiv 2506.01939) trains both its method and its ablation on DAPO's clip-higher 0.2 / 0.28."""
    for method in ("forking_tokens", "low_entropy_tokens"):
        surrogate = build_objective(method).surrogate
        assert (surrogate.name, surrogate.clip_ratio_low, surrogate.clip_ratio_high) == ("ppo_clip", 0.2, 0.28)


# --------------------------------------------------------------------------------------------------
# 14. Parts called on their own: drops within the mask, detached weights, Clip_V's closed edge
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, params", [
    ("psr", {}),
    ("nsr", {}),
    ("forking_tokens", {}),
    ("low_entropy_tokens", {}),
    ("clip_cov", {"clip_cov_ratio": 1.0, "clip_cov_lb": -1e9, "clip_cov_ub": 1e9, "seed": 0}),
    ("clip_b", {"mode": "paper", "mu": 0.5}),
    ("clip_v", {"mu": 0.5, "max_frac": 1.0}),
])
def test_a_selector_returns_only_valid_tokens_among_its_drops(method, params):
    """Each selector's own output (not only the objective's) names tokens of the mask: the padding holds garbage
    (A = -1e3, H = 1e6, S = D = -1e6) that every rule would select, yet no padded position is returned."""
    case = random_case(21, torch.float64, shape=(4, 12), lengths=[12, 7, 3, 9])
    batch = case.batch()
    selector = build_objective(method, **params).selectors[0]
    drop = selector(batch, batch.advantages, no_surrogate(batch), {})
    assert drop.dtype == torch.bool and drop.shape == batch.mask.shape
    assert drop.any()
    assert not (drop & ~batch.mask).any(), "a padded position was returned as dropped"


@pytest.mark.parametrize("method, level", [("tis", "token"), ("tis", "sequence"), ("icepop", None)])
def test_correction_weights_are_detached_even_from_log_probs_that_carry_gradient(method, level):
    """k_t = exp(old_log_prob - rollout_log_prob) is a constant weight: given log-probs that require grad, the
    weights carry none, and their values are min(k, C) (token), min(prod k, C) (sequence) or k inside [0.5, 5]."""
    old = torch.tensor([[-1.0, -2.0, -0.5, 7.0]], dtype=torch.float64, requires_grad=True)
    rollout = torch.tensor([[-1.5, -0.5, -0.5, -9.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, True, False]])
    batch = PolicyBatch(log_prob=old.detach().clone().requires_grad_(True), old_log_prob=old,
                        advantages=torch.ones(1, 4, dtype=torch.float64), mask=mask, rollout_log_prob=rollout)
    params = {} if level is None else {"level": level}
    weight = build_objective(method, **params).correction(batch, {})
    assert not weight.requires_grad and weight.grad_fn is None
    k = np.exp([0.5, -1.5, 0.0])  # the valid tokens; the padded log-ratio (16) stays out of the sequence's product
    expected = {"token": np.minimum(k, 2.0), "sequence": np.full(3, min(np.exp(-1.0), 2.0)),
                None: np.where((k >= 0.5) & (k <= 5.0), k, 0.0)}[level]
    np.testing.assert_allclose(weight.numpy()[0, :3], expected, rtol=1e-12)


def test_clip_v_keeps_tokens_exactly_at_minus_mu_sigma():
    """D = [1, -1, 1, -1] (all A <= 0): population std 1, and the released code drops A <= 0 tokens with
    D < -mu std, strictly: mu = 1 puts both -1 tokens exactly on the edge and keeps them; mu = 0.5 drops them."""

    def run(mu):
        batch = exact_batch([[0.0] * 4], [[-1.0, 0.0, -1.0, -1.0]], [[True] * 4], disc_centered=[[1.0, -1.0, 1.0, -1.0]])
        out = build_objective("clip_v", mu=mu, max_frac=1.0)(batch)
        assert out.metrics["clip_v/disc_centered_std"] == 1.0
        return dropped(out, batch).tolist()

    assert run(1.0) == [[False] * 4]
    assert run(0.5) == [[False, True, False, True]]
