"""Tests for entrorl.evaluation: unbiased pass@k, Avg@k, summaries and polarisation."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest

from entrorl.evaluation import (
    EvalSummary,
    Polarisation,
    avg_at_k,
    default_ks,
    pass_at_k,
    pass_at_k_curve,
    polarisation,
    summarize_samples,
)


def exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """The definition, in exact rational arithmetic: 1 - C(n-c, k) / C(n, k)."""
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


# --------------------------------------------------------------------------------------------
# pass_at_k
# --------------------------------------------------------------------------------------------


def test_pass_at_k_matches_exact_combinatorial_formula_for_all_small_cases():
    checked = 0
    for n in range(1, 21):
        for c in range(0, n + 1):
            for k in range(1, n + 1):
                got = pass_at_k(n, c, k)
                want = exact_pass_at_k(n, c, k)
                assert got == float(want), (n, c, k, got, float(want))  # the nearest float to the estimate
                checked += 1
    assert checked == sum(n * (n + 1) for n in range(1, 21))


def test_pass_at_1_is_the_fraction_correct():
    for n in range(1, 21):
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == c / n  # exactly Avg@n's value: the two are one number
    summary = summarize_samples([[1, 0, 0, 1], [0, 0, 0, 0]])
    assert summary.pass_at_k[1] == summary.avg_at_n == 0.25


def test_pass_at_k_is_one_when_too_few_wrong_answers_to_fill_k_draws():
    for n in range(1, 21):
        for c in range(n + 1):
            for k in range(n - c + 1, n + 1):  # n - c < k
                assert pass_at_k(n, c, k) == 1.0


def test_pass_at_k_is_zero_without_correct_answers_and_not_the_biased_estimate():
    assert pass_at_k(16, 0, 8) == 0.0
    assert math.copysign(1.0, pass_at_k(16, 0, 8)) == 1.0  # +0.0, not -0.0
    # the naive 1 - (1 - c/n)^k is biased; the estimator must not be it
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5, abs=1e-15)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 1, 2) != pytest.approx(1 - (1 - 1 / 4) ** 2)


def test_pass_at_k_scalar_returns_python_float():
    assert type(pass_at_k(10, 3, 2)) is float
    assert type(pass_at_k(np.int64(10), np.int64(3), np.int64(2))) is float
    assert pass_at_k(10.0, 3.0, 2.0) == pass_at_k(10, 3, 2)  # whole-number floats are accepted


def test_pass_at_k_vectorised_matches_scalar_calls():
    triples = [(n, c, k) for n in range(1, 13) for c in range(n + 1) for k in range(1, n + 1)]
    n_arr, c_arr, k_arr = (np.array(col) for col in zip(*triples))
    got = pass_at_k(n_arr, c_arr, k_arr)
    assert isinstance(got, np.ndarray) and got.shape == (len(triples),)
    want = np.array([pass_at_k(n, c, k) for n, c, k in triples])
    np.testing.assert_array_equal(got, want)


def test_pass_at_k_broadcasts():
    got = pass_at_k(10, np.arange(11), 3)
    assert got.shape == (11,)
    np.testing.assert_allclose(got, [float(exact_pass_at_k(10, c, 3)) for c in range(11)], atol=1e-14)

    n = np.array([[8], [16]])
    k = np.array([1, 2, 4])
    got = pass_at_k(n, 4, k)
    assert got.shape == (2, 3)
    for i, nn in enumerate((8, 16)):
        for j, kk in enumerate((1, 2, 4)):
            assert got[i, j] == pytest.approx(float(exact_pass_at_k(nn, 4, kk)), abs=1e-14)
    assert pass_at_k(np.array([], dtype=int), np.array([], dtype=int), 1).shape == (0,)

    got = pass_at_k(10, 3, np.array([1, 2, 4]))  # scalar n and c, an array of ks
    assert isinstance(got, np.ndarray) and got.shape == (3,)
    np.testing.assert_allclose(got, [float(exact_pass_at_k(10, 3, kk)) for kk in (1, 2, 4)], atol=1e-14)


def test_pass_at_k_is_stable_for_large_n():
    got = pass_at_k(1024, 3, 512)
    assert math.isfinite(got) and 0.0 <= got <= 1.0
    assert abs(got - float(exact_pass_at_k(1024, 3, 512))) <= 1e-12
    # (C(n, k) alone would overflow a float here)
    for n, c, k in [(100_000, 10, 1_000), (100_000, 1, 1), (5_000, 4_000, 2_500), (1024, 1000, 1)]:
        got = pass_at_k(n, c, k)
        assert abs(got - float(exact_pass_at_k(n, c, k))) <= 1e-12, (n, c, k)
    # a tiny pass@k keeps its relative accuracy
    assert pass_at_k(100_000, 1, 1) == pytest.approx(1e-5, rel=1e-12, abs=0.0)


@pytest.mark.parametrize(("n", "c", "k"), [(10**6, 1, 1), (10**7, 1, 1), (123_457, 1, 1), (10**6, 2, 3)])
def test_tiny_pass_at_k_is_accurate_to_a_few_ulps(n, c, k):
    want = float(exact_pass_at_k(n, c, k))
    assert want < 1e-4
    assert pass_at_k(n, c, k) == want


@pytest.mark.parametrize(
    ("n", "c", "k", "fragment"),
    [
        (3, 5, 1, "c=5, n=3"),
        (3, -1, 1, "c=-1, n=3"),
        (3, 1, 4, "k=4, n=3"),
        (3, 1, 0, "k=0, n=3"),
        (3, 1.5, 1, "c=1.5"),
        (float("nan"), 1, 1, "n=nan"),
        ("ten", 1, 1, "dtype"),
    ],
)
def test_pass_at_k_rejects_invalid_values(n, c, k, fragment):
    with pytest.raises(ValueError, match=fragment):
        pass_at_k(n, c, k)


def test_pass_at_k_error_names_the_array_index():
    with pytest.raises(ValueError, match=r"c=7, n=4 \(at index \(2,\)\)"):
        pass_at_k(4, np.array([0, 1, 7]), 1)
    with pytest.raises(ValueError, match="broadcast"):
        pass_at_k(np.array([4, 4]), np.array([1, 2, 3]), 1)


# --------------------------------------------------------------------------------------------
# Avg@k, pass@k curves, summaries
# --------------------------------------------------------------------------------------------

# 4 problems x 4 samples. Correct counts c = [1, 4, 0, 2].
HAND = np.array(
    [
        [1, 0, 0, 0],  # c = 1
        [1, 1, 1, 1],  # c = 4
        [0, 0, 0, 0],  # c = 0
        [0, 1, 0, 1],  # c = 2
    ],
    dtype=bool,
)
# Per problem, pass@k = 1 - C(4 - c, k) / C(4, k):
#   k=1: c/4                        -> [1/4, 1, 0, 1/2]        mean 7/16
#   k=2: 1 - C(4-c, 2)/6            -> [1 - 3/6, 1, 0, 1 - 1/6] mean (1/2 + 1 + 0 + 5/6)/4 = 7/12
#   k=3: 1 - C(4-c, 3)/4            -> [1 - 1/4, 1, 0, 1]       mean 11/16
#   k=4: 1 if c > 0                 -> [1, 1, 0, 1]             mean 3/4
HAND_PASS = {1: 7 / 16, 2: 7 / 12, 3: 11 / 16, 4: 3 / 4}


def test_avg_at_k():
    assert avg_at_k(HAND) == pytest.approx(7 / 16, abs=1e-15)  # 7 correct of 16 samples
    assert avg_at_k(HAND[0]) == 0.25
    assert avg_at_k([0.2, 0.5, 0.9, 1.0]) == 0.75  # rewards: 3 of 4 are >= 0.5
    assert avg_at_k([0.2, 0.5, 0.9, 1.0], threshold=1.0) == 0.25
    with pytest.raises(ValueError, match="shape"):
        avg_at_k(np.zeros((2, 2, 2), dtype=bool))
    for empty in ([], np.zeros((3, 0), dtype=bool)):
        with pytest.raises(ValueError, match="non-empty"):
            avg_at_k(empty)
    with pytest.raises(ValueError, match="outside"):
        avg_at_k([-0.5, 1.0])


def test_torch_tensors_that_require_grad_are_accepted():
    torch = pytest.importorskip("torch")
    rewards = torch.tensor([[0.2, 0.5, 0.9, 1.0]], requires_grad=True)
    assert avg_at_k(rewards) == 0.75
    pol = polarisation(torch.tensor([0.0, 0.5, 1.0], requires_grad=True), bins=2)
    np.testing.assert_array_equal(pol.histogram, [1, 2])



def test_bfloat16_tensors_are_read_like_any_other_floats():
    """numpy has no bfloat16: such rewards and pass rates (a bf16 model's) are widened, not refused with a TypeError."""
    torch = pytest.importorskip("torch")
    rewards = torch.tensor([[0.25, 0.5, 1.0, 0.0]], dtype=torch.bfloat16)
    assert avg_at_k(rewards) == 0.5
    assert summarize_samples(rewards).avg_at_n == 0.5
    pol = polarisation(torch.tensor([0.0, 0.5, 1.0], dtype=torch.bfloat16), bins=2)
    np.testing.assert_array_equal(pol.histogram, [1, 2])



def test_bfloat16_pass_rates_keep_values_below_the_half_precision_range():
    """A bfloat16 rate of 1e-10 (bfloat16 reaches 1e-38, float16 only 6e-8) is a mixed problem, not a zero: bfloat16 is
    widened to float32, which holds every bfloat16 value exactly."""
    torch = pytest.importorskip("torch")
    rates = torch.tensor([1e-10, 1.0], dtype=torch.bfloat16)
    pol = polarisation(rates, bins=4)
    assert (pol.frac_zero, pol.frac_one, pol.frac_mixed) == (0.0, 0.5, 0.5)
    np.testing.assert_array_equal(pol.histogram, [1, 0, 0, 1])
    assert avg_at_k(torch.tensor([1e-10, 1.0], dtype=torch.bfloat16), threshold=1e-12) == 1.0

def test_pass_at_k_curve_on_hand_example():
    counts = HAND.sum(axis=1)
    curve = pass_at_k_curve(counts, 4, [1, 2, 3, 4, 2])
    assert list(curve) == [1, 2, 3, 4]  # order kept, duplicate dropped
    for k, want in HAND_PASS.items():
        assert curve[k] == pytest.approx(want, abs=1e-15), k


def test_pass_at_k_curve_refuses_ks_that_are_not_a_sequence():
    """A string would be read character by character (the ks 1 and 2 for "12"), a bare number not at all."""
    for ks in ("12", b"12", 2):
        with pytest.raises(ValueError, match="ks must be a sequence of whole numbers"):
            pass_at_k_curve([1, 2], 4, ks)
    assert pass_at_k_curve([1, 2], 4, np.array([2])) == pass_at_k_curve([1, 2], 4, (2,))


def test_pass_at_k_curve_keeps_the_order_the_ks_are_given_in():
    counts = HAND.sum(axis=1)
    curve = pass_at_k_curve(counts, 4, [4, 1, 2])
    assert list(curve) == [4, 1, 2]
    assert list(summarize_samples(HAND, ks=(3, 1)).pass_at_k) == [3, 1]
    for k in (4, 1, 2):
        assert curve[k] == pytest.approx(HAND_PASS[k], abs=1e-15), k


def test_pass_at_k_curve_rejects_k_larger_than_n():
    with pytest.raises(ValueError, match=r"k=8 exceeds n=4"):
        pass_at_k_curve([1, 2], 4, [1, 8])
    with pytest.raises(ValueError, match="k >= 1"):
        pass_at_k_curve([1, 2], 4, [0])
    with pytest.raises(ValueError, match="empty"):
        pass_at_k_curve([], 4, [1])
    with pytest.raises(ValueError, match="empty"):
        pass_at_k_curve([1], 4, [])
    with pytest.raises(ValueError, match=r"k=5 exceeds n=4"):  # one past n
        pass_at_k_curve([1, 2], 4, [5])
    for k in (2.5, True):
        with pytest.raises(ValueError, match="whole numbers"):
            pass_at_k_curve([1, 2], 4, [k])


def test_default_ks():
    assert default_ks(1) == (1,)
    assert default_ks(4) == (1, 2, 4)
    assert default_ks(6) == (1, 2, 4, 6)
    assert default_ks(32) == (1, 2, 4, 8, 16, 32)
    with pytest.raises(ValueError, match="n must be >= 1"):
        default_ks(0)


def test_summarize_samples_on_hand_example():
    s = summarize_samples(HAND, ks=(1, 2, 3, 4))
    assert isinstance(s, EvalSummary)
    assert (s.n_problems, s.n_samples) == (4, 4)
    assert s.avg_at_n == pytest.approx(7 / 16, abs=1e-15)
    assert s.pass_at_k == pytest.approx(HAND_PASS, abs=1e-15)
    np.testing.assert_array_equal(s.pass_rates, [0.25, 1.0, 0.0, 0.5])
    pol = s.polarisation
    assert (pol.frac_zero, pol.frac_one, pol.frac_mixed) == (0.25, 0.25, 0.5)
    # rates 0.25 -> bin 2, 1.0 -> bin 9 (last, closed), 0.0 -> bin 0, 0.5 -> bin 5
    np.testing.assert_array_equal(pol.histogram, [1, 0, 1, 0, 0, 1, 0, 0, 0, 1])

    d = s.to_dict()
    assert json.loads(json.dumps(d, allow_nan=False))["pass_at_k"]["2"] == pytest.approx(7 / 12)
    assert d["pass_rates"] == [0.25, 1.0, 0.0, 0.5]
    assert d["polarisation"]["histogram"] == [1, 0, 1, 0, 0, 1, 0, 0, 0, 1]
    assert d["threshold"] == 0.5

    coarse = summarize_samples(HAND, ks=(1,), bins=4).polarisation
    # rates 0.25, 1.0, 0.0, 0.5 over [0, .25) [.25, .5) [.5, .75) [.75, 1]
    np.testing.assert_array_equal(coarse.histogram, [1, 1, 1, 1])
    np.testing.assert_array_equal(coarse.bin_edges, [0.0, 0.25, 0.5, 0.75, 1.0])


def test_summarize_samples_default_ks_and_rewards_with_threshold():
    rewards = np.array(
        [
            [0.0, 0.5, 1.0, 0.49],  # correct at threshold 0.5: [F, T, T, F] -> c = 2; at 1.0: c = 1
            [0.3, 0.2, 0.1, 0.0],  # c = 0 either way
        ]
    )
    s = summarize_samples(rewards)
    assert tuple(s.pass_at_k) == (1, 2, 4)
    np.testing.assert_array_equal(s.pass_rates, [0.5, 0.0])
    assert s.avg_at_n == 0.25
    # pass@2 = mean(1 - C(2,2)/C(4,2), 0) = (5/6) / 2
    assert s.pass_at_k[2] == pytest.approx(5 / 12, abs=1e-15)

    strict = summarize_samples(rewards, threshold=1.0)
    np.testing.assert_array_equal(strict.pass_rates, [0.25, 0.0])
    assert strict.threshold == 1.0


def test_avg_at_n_is_the_share_of_correct_samples_rounded_once():
    """Avg@n is (correct samples) / (all samples), not a mean of per-problem means rounded on the way: for counts
    [3, 0, 3, 3, 2, 0, 3] of n = 5 it is 14/35 = 0.4 exactly (the mean of the pass rates gives 0.39999999999999997)."""
    counts = [3, 0, 3, 3, 2, 0, 3]
    correct = np.array([[j < c for j in range(5)] for c in counts])
    s = summarize_samples(correct, ks=(1,))
    assert s.avg_at_n == 0.4 and s.to_dict()["avg_at_n"] == 0.4
    assert avg_at_k(correct) == 0.4


def test_summary_to_dict_keeps_pass_rates_unrounded():
    correct = np.array([[True, False, False], [True, True, False]])
    d = summarize_samples(correct, ks=(1, 3)).to_dict()
    assert d["pass_rates"] == [1 / 3, 2 / 3]
    assert d["pass_at_k"][1] == pytest.approx(0.5, abs=1e-15) and d["avg_at_n"] == 0.5


def test_summarize_samples_validation():
    with pytest.raises(ValueError, match=r"k=8 exceeds n=4"):
        summarize_samples(HAND, ks=(1, 8))
    with pytest.raises(ValueError, match=r"\[P, n\]"):
        summarize_samples(HAND[0])
    with pytest.raises(ValueError, match="outside"):
        summarize_samples(np.array([[0.0, 2.0]]))
    with pytest.raises(ValueError, match="non-finite"):
        summarize_samples(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="threshold"):
        summarize_samples(HAND, threshold=0.0)


# --------------------------------------------------------------------------------------------
# polarisation
# --------------------------------------------------------------------------------------------


def test_polarisation_counts_on_hand_example():
    rates = [0.0, 0.0, 0.05, 0.1, 0.3, 0.55, 0.99, 1.0, 1.0, 1.0]
    pol = polarisation(rates)
    assert isinstance(pol, Polarisation)
    assert pol.n_problems == 10
    assert pol.frac_zero == 0.2  # two exact zeros
    assert pol.frac_one == 0.3  # three exact ones
    assert pol.frac_mixed == 0.5
    # bins [0,.1): 0, 0, .05 | [.1,.2): .1 | [.3,.4): .3 | [.5,.6): .55 | [.9,1]: .99, 1, 1, 1
    np.testing.assert_array_equal(pol.histogram, [3, 1, 0, 1, 0, 1, 0, 0, 0, 4])
    assert pol.histogram.sum() == 10
    np.testing.assert_allclose(pol.bin_edges, np.linspace(0, 1, 11))


def test_polarisation_rates_on_edges_fall_in_the_bin_they_open():
    # n = 10 samples per prompt: every pass rate c/10 sits on an edge of a 10-bin histogram
    pol = polarisation([c / 10 for c in range(11)], bins=10)
    np.testing.assert_array_equal(pol.histogram, [1, 1, 1, 1, 1, 1, 1, 1, 1, 2])
    # computed rates a rounding error off an edge count as on it
    just_below = [np.nextafter(0.3, 0.0), np.nextafter(0.7, 0.0), 0.1 * 3]  # 0.29999999999999993, ...
    assert just_below[0] * 10 < 3
    pol = polarisation(just_below, bins=10)
    np.testing.assert_array_equal(pol.histogram, [0, 0, 0, 2, 0, 0, 0, 1, 0, 0])
    # but a rate clearly inside a bin stays there
    pol = polarisation([0.2999, 0.7001], bins=10)
    np.testing.assert_array_equal(pol.histogram, [0, 0, 1, 0, 0, 0, 0, 1, 0, 0])
    # 4 bins over rates k/8
    pol = polarisation([k / 8 for k in range(9)], bins=4)
    np.testing.assert_array_equal(pol.histogram, [2, 2, 2, 3])
    np.testing.assert_array_equal(pol.bin_edges, [0.0, 0.25, 0.5, 0.75, 1.0])


def test_polarisation_tolerance_only_covers_rounding_errors():
    """Only a rounding error puts a rate on the edge above it: 0.3 - 5e-8 is in [0.2, 0.3), 0.3 - 1e-12 in [0.3, 0.4)."""
    pol = polarisation([0.3 - 5e-8, 0.3 - 1e-12, 0.8 - 5e-8], bins=10)
    np.testing.assert_array_equal(pol.histogram, [0, 0, 1, 1, 0, 0, 0, 1, 0, 0])


def test_polarisation_bin_edges_are_exactly_i_over_bins():
    for bins in (3, 5, 7, 10):
        edges = polarisation([0.5], bins=bins).bin_edges
        assert [float(edge) for edge in edges] == [i / bins for i in range(bins + 1)], bins
    assert polarisation([0.5], bins=5).to_dict()["bin_edges"] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


def test_polarisation_to_dict_is_json():
    d = polarisation([0.0, 0.5, 1.0], bins=2).to_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == {
        "n_problems": 3,
        "frac_zero": pytest.approx(1 / 3),
        "frac_one": pytest.approx(1 / 3),
        "frac_mixed": pytest.approx(1 / 3),
        "histogram": [1, 2],
        "bin_edges": [0.0, 0.5, 1.0],
    }


@pytest.mark.parametrize(
    ("rates", "bins", "fragment"),
    [
        ([], 10, "empty"),
        ([0.5, 1.2], 10, r"\[0, 1\]"),
        ([-0.1], 10, r"\[0, 1\]"),
        ([np.nan], 10, "finite"),
        ([0.5], 0, "bins"),
        ([0.5], 2.5, "bins"),
        ([0.5], True, "bins"),
        ([[1.0, 0.0], [1.0, 1.0]], 10, r"one pass rate per problem .* shape \(2, 2\).*correct.mean\(axis=1\)"),
        ([True, False, True], 10, r"got booleans"),
    ],
)
def test_polarisation_validation(rates, bins, fragment):
    with pytest.raises(ValueError, match=fragment):
        polarisation(rates, bins=bins)


# --------------------------------------------------------------------------------------------
# boundaries and input types
# --------------------------------------------------------------------------------------------


def test_pass_at_k_error_for_a_bad_k_names_the_array_index():
    with pytest.raises(ValueError, match=r"k=5, n=4 \(at index \(1,\)\)"):
        pass_at_k(4, 1, np.array([1, 5]))



def test_pass_at_k_errors_for_one_problem_name_no_array_index():
    """With scalar n, c and k there is no index to name: the message ends with the offending values."""
    with pytest.raises(ValueError, match=r"got c=5, n=4$"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match=r"got k=5, n=4\. Draw more samples"):
        pass_at_k(4, 1, 5)

def test_numeric_strings_and_complex_numbers_are_not_read_as_rewards():
    """Only booleans and real numbers are rewards: "0.7" (a CSV column read as text) or 0.7+0j is refused, not
    parsed or cast."""
    for bad in (np.array(["0.7", "0.2"]), np.array([0.7 + 0j, 0.2])):
        with pytest.raises(ValueError, match="must hold booleans or rewards in"):
            avg_at_k(bad)
        with pytest.raises(ValueError, match="must hold booleans or rewards in"):
            summarize_samples(bad[None, :])


def test_summarize_samples_refuses_empty_matrices_by_shape():
    for shape in ((0, 4), (2, 0)):
        with pytest.raises(ValueError, match=rf"non-empty \[P, n\] matrix .*got shape \({shape[0]}, {shape[1]}\)"):
            summarize_samples(np.zeros(shape, dtype=bool))


def test_tensors_on_an_accelerator_are_moved_to_the_cpu_first():
    """A tensor on a GPU has no numpy view until it is copied to the CPU; the metrics make that copy."""

    class AcceleratorTensor:  # behaves like a CUDA tensor: .numpy() only after .cpu()
        def __init__(self, values, on_cpu=False):
            self.values, self.on_cpu = values, on_cpu

        def detach(self):
            return self

        def cpu(self):
            return AcceleratorTensor(self.values, on_cpu=True)

        def numpy(self):
            if not self.on_cpu:
                raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")
            return np.asarray(self.values)

    assert avg_at_k(AcceleratorTensor([[0.2, 0.5, 0.9, 1.0]])) == 0.75
    np.testing.assert_array_equal(polarisation(AcceleratorTensor([0.0, 0.5, 1.0]), bins=2).histogram, [1, 2])


def test_polarisation_edge_tolerance_is_one_billionth_of_a_bin():
    """A rate with rate * bins within 1e-9 below an edge is on the edge; 2e-9 below it is not."""
    pol = polarisation([(3 - 5e-10) / 10, (3 - 2e-9) / 10, (7 - 5e-10) / 10, (7 - 2e-9) / 10], bins=10)
    np.testing.assert_array_equal(pol.histogram, [0, 0, 1, 1, 0, 0, 1, 1, 0, 0])


def test_polarisation_counts_only_exact_zeros_and_ones():
    pol = polarisation([1.0 - 1e-12, 1e-12, 1.0, 0.0, 0.5], bins=10)
    assert (pol.frac_zero, pol.frac_one, pol.frac_mixed) == (0.2, 0.2, 0.6)
    np.testing.assert_array_equal(pol.histogram, [2, 0, 0, 0, 0, 1, 0, 0, 0, 2])


def test_polarisation_frac_mixed_is_the_share_of_mixed_problems_rounded_once():
    """frac_mixed is (P - zeros - ones) / P, not 1 - zeros/P - ones/P (which gives 0.33333333333333337 for 1 of 3)."""
    assert polarisation([0.0, 0.5, 1.0]).frac_mixed == 1 / 3
    assert polarisation([0.0] * 3 + [0.5] * 3 + [1.0]).frac_mixed == 3 / 7


def test_polarisation_refuses_a_rate_a_rounding_error_above_one():
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        polarisation([0.5, 1.0 + 1e-12])


def test_pass_at_k_accepts_unsigned_integer_counts():
    assert pass_at_k(np.uint16(10), np.uint8(3), np.uint32(2)) == pass_at_k(10, 3, 2)
    counts = np.array([1, 4, 0, 2], dtype=np.uint8)
    assert pass_at_k_curve(counts, 4, [2]) == pytest.approx({2: HAND_PASS[2]}, abs=1e-15)


def test_pass_at_k_curve_refuses_a_number_of_samples_that_is_not_a_whole_number():
    """As pass_at_k does: n = 4.5 is not read as 4; an array of ns is not one n."""
    with pytest.raises(ValueError, match="n must hold whole numbers"):
        pass_at_k_curve([1, 2], 4.5, [1])
    with pytest.raises(ValueError, match="n must be one number"):
        pass_at_k_curve([1, 2], [4, 4], [1])
    assert pass_at_k_curve([1, 2], np.int64(4), [1]) == pass_at_k_curve([1, 2], 4.0, [1]) == {1: pytest.approx(0.375)}


def test_default_ks_takes_a_numpy_integer_and_refuses_floats_and_flags():
    assert default_ks(np.int64(8)) == default_ks(8) == (1, 2, 4, 8)
    assert default_ks(np.uint8(6)) == (1, 2, 4, 6)
    for bad in (8.0, True, "8"):
        with pytest.raises(ValueError, match="n must be"):
            default_ks(bad)


@pytest.mark.parametrize("rates", [np.array(["0.5", "1"]), np.array([0.5 + 0.9j, 1.0])])
def test_polarisation_refuses_text_and_complex_pass_rates(rates):
    """As avg_at_k and summarize_samples do: text is not parsed, nor an imaginary part dropped."""
    with pytest.raises(ValueError, match="pass rates must be real numbers"):
        polarisation(rates)


def test_ks_given_as_text_are_refused_not_parsed():
    with pytest.raises(ValueError, match="ks must hold whole numbers"):
        pass_at_k_curve([1, 2], 4, ["1", "2"])
    with pytest.raises(ValueError, match="ks must hold whole numbers"):
        summarize_samples(np.array([[True, False]]), ks=["2"])


def test_a_float32_reward_at_the_threshold_counts_as_correct_as_the_advantage_estimators_count_it():
    """A float32 0.7 is 0.69999999: widened to float64 before the comparison it fell below a threshold of 0.7, so a
    sample trained as correct (the estimators compare the tensor with the threshold in its own precision) was
    evaluated as wrong."""
    import torch

    from entrorl.advantages import compute_advantages

    rewards = torch.tensor([[0.7, 0.3]])
    assert compute_advantages("psr", rewards[0], torch.tensor([0, 0]), correct_threshold=0.7).tolist() == [1.0, 0.0]
    assert avg_at_k(rewards, threshold=0.7) == 0.5
    assert summarize_samples(rewards, threshold=0.7).pass_at_k[1] == 0.5
    assert avg_at_k(np.array([[0.7, 0.3]]), threshold=0.7) == 0.5  # float64 as before
    for dtype in (torch.bfloat16, torch.float16):  # widened to float32 on the way: the threshold is still theirs
        half = rewards.to(dtype)
        assert compute_advantages("psr", half[0], torch.tensor([0, 0]), correct_threshold=0.7).tolist() == [1.0, 0.0]
        assert avg_at_k(half, threshold=0.7) == 0.5, dtype
    assert avg_at_k(np.array([[0.7, 0.3]], dtype=np.float32), threshold=0.7) == 0.5


def test_pass_rates_in_single_precision_land_in_the_bins_of_their_exact_values():
    """7/10 as a float32 tensor's mean is 1e-8 below 0.7: it went to [0.6, 0.7), where the float64 rate goes to
    [0.7, 0.8)."""
    import torch

    correct = torch.tensor([[1] * 7 + [0] * 3, [1] * 9 + [0] * 1, [1] * 3 + [0] * 7])
    expected = [0, 0, 0, 1, 0, 0, 0, 1, 0, 1]
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        assert polarisation(correct.to(dtype).mean(dim=1)).histogram.tolist() == expected, dtype
    assert polarisation(np.array([0.6999, 0.7])).histogram.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 0, 0]
    # a half-precision rate just below an edge (101/1024 is exact in float16) stays below it
    for rate in (101 / 1024, 51 / 512):
        assert polarisation(torch.tensor([rate], dtype=torch.float16)).histogram.tolist()[:2] == [1, 0], rate
    assert polarisation(np.array([0.7], dtype=np.float32)).histogram.tolist()[7] == 1
