"""Tests for entrorl.advantages: every estimator against an independent numpy / hand-worked reference."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from entrorl import advantages as adv
from entrorl.advantages import (
    AdvantageInfo,
    available_advantages,
    compute_advantages,
    expand_to_tokens,
    get_advantage_fn,
    group_mean_std,
    register_advantage,
    unlikeliness_shaped_rewards,
)

ALL_NAMES = [
    "grpo",
    "dr_grpo",
    "rloo",
    "reinforce_pp",
    "reinforce_pp_baseline",
    "w_reinforce",
    "signed_reward",
    "psr",
    "nsr",
    "passk",
    "unlikely",
]


# --------------------------------------------------------------------------------------------------
# helpers: random batches with shuffled, arbitrary group ids, and plain-numpy references
# --------------------------------------------------------------------------------------------------


def make_batch(seed: int, sizes=(5, 1, 8, 3, 2, 6, 1, 4), binary: bool = False):
    """Groups of the given sizes, ids arbitrary (negative, large), samples shuffled so groups interleave."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(-1000, 10**6), size=len(sizes), replace=False)
    gid = np.concatenate([np.full(s, i) for s, i in zip(sizes, ids)])
    n = gid.size
    r = rng.integers(0, 2, size=n).astype(np.float64) if binary else rng.normal(size=n) * 2.0 + 0.3
    perm = rng.permutation(n)
    gid, r = gid[perm], r[perm]
    lengths = rng.integers(1, 50, size=n)
    logp = -rng.uniform(0.05, 3.0, size=n)
    return r, gid, lengths, logp


def t(x, dtype=None):
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def groups_of(gid):
    out = {}
    for i, g in enumerate(gid.tolist()):
        out.setdefault(g, []).append(i)
    return out


def ref_grpo(r, gid, eps=1e-6, norm=True):
    a = np.empty_like(r)
    for idx in groups_of(gid).values():
        x = r[idx]
        if len(idx) == 1:
            mean, std = 0.0, 1.0
        else:
            mean, std = x.mean(), x.std(ddof=1)
        a[idx] = (x - mean) / (std + eps) if norm else x - mean
    return a


def ref_rloo(r, gid):
    a = np.empty_like(r)
    for idx in groups_of(gid).values():
        for i in idx:
            others = [j for j in idx if j != i]
            a[i] = r[i] - (np.mean(r[others]) if others else 0.0)
    return a


def ref_token_whiten(x, lengths, eps=1e-8):
    tokens = np.repeat(x, lengths)  # every token of response i carries x_i (gamma = 1)
    return (x - tokens.mean()) / (tokens.std(ddof=1) + eps)


def ref_passk_bruteforce(correct, gid, k):
    """Advantage of response i = mean over k-subsets containing i of (max reward - R_bar), / (sigma + 1e-6),
    where R_bar / sigma are the mean / population std of the max reward over all k-subsets."""
    a = np.zeros(len(correct))
    for idx in groups_of(gid).values():
        subsets = list(itertools.combinations(idx, k))
        rew = {s: float(max(correct[j] for j in s)) for s in subsets}
        vals = np.array(list(rew.values()))
        r_bar, sigma = vals.mean(), vals.std()
        if sigma == 0:
            continue
        for i in idx:
            a[i] = (np.mean([v for s, v in rew.items() if i in s]) - r_bar) / (sigma + 1e-6)
    return a


def ref_unlikely_ranks(logp, gid):
    rank = np.empty(len(logp))
    for idx in groups_of(gid).values():
        order = np.argsort(logp[idx], kind="stable")
        rank[np.asarray(idx)[order]] = np.arange(len(idx)) / len(idx)
    return rank


# --------------------------------------------------------------------------------------------------
# group statistics and token expansion
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_group_mean_std_matches_numpy(seed):
    r, gid, _, _ = make_batch(seed)
    mean, std, count = group_mean_std(t(r), t(gid))
    assert mean.dtype == torch.float64 and std.dtype == torch.float64 and count.dtype == torch.int64
    for idx in groups_of(gid).values():
        np.testing.assert_allclose(mean.numpy()[idx], r[idx].mean(), rtol=1e-12)
        np.testing.assert_array_equal(count.numpy()[idx], len(idx))
        expected_std = r[idx].std(ddof=1) if len(idx) > 1 else 0.0  # unbiased; singleton -> 0
        np.testing.assert_allclose(std.numpy()[idx], expected_std, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_mean_std_keeps_dtype_and_is_exact_on_constant_groups(dtype):
    vals = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.2], dtype=dtype)
    mean, std, count = group_mean_std(vals, torch.tensor([4, 4, 4, 9, 9]))
    assert mean.dtype == dtype
    assert torch.equal(mean[:3], vals[:3])  # exactly the value, not sum/3
    assert torch.equal(std[:3], torch.zeros(3))
    assert count.tolist() == [3, 3, 3, 2, 2]


def test_expand_to_tokens_zero_outside_mask():
    a = torch.tensor([1.5, -2.0, 0.25])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    out = expand_to_tokens(a, mask)
    expected = torch.tensor([[1.5, 1.5, 0, 0], [-2.0, -2.0, -2.0, -2.0], [0, 0, 0, 0]])
    assert out.shape == (3, 4) and out.dtype == torch.float32
    assert torch.equal(out, expected)
    assert torch.equal(expand_to_tokens(a, mask.float()), expected)  # 0/1 numeric mask too
    assert torch.equal(expand_to_tokens(a, -mask.long()), expected)  # any nonzero number is valid
    wide = expand_to_tokens(a.double() / 3, mask)  # float64 advantages stay float64, to the last bit
    assert wide.dtype == torch.float64 and torch.equal(wide, expected.double() / 3)
    with pytest.raises(ValueError, match=r"mask must be \[n, T\]"):
        expand_to_tokens(a, mask[:2])


# --------------------------------------------------------------------------------------------------
# estimators against references on random, shuffled batches
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_matches_reference(seed):
    r, gid, _, _ = make_batch(seed)
    got = compute_advantages("grpo", t(r), t(gid))
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), ref_grpo(r, gid), rtol=1e-5, atol=1e-6)
    got = compute_advantages("grpo", t(r), t(gid), epsilon=0.5)
    np.testing.assert_allclose(got.numpy(), ref_grpo(r, gid, eps=0.5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_with_the_batch_s_std_divides_each_group_s_centred_rewards_by_one_std(seed):
    """std_scope='batch' (Lite PPO, arXiv 2508.08221; TRL's scale_rewards='batch'): A = (R - mean_g) / (std_batch +
    eps), the unbiased std of every reward; a singleton keeps the mean-0 convention; a group of equal rewards gets 0."""
    r, gid, _, _ = make_batch(seed)
    r[gid == gid[0]] = 0.7  # one group of equal rewards
    expected = ref_grpo(r, gid, norm=False) / (r.std(ddof=1) + 1e-6)
    expected[gid == gid[0]] = 0.0
    got = compute_advantages("grpo", t(r), t(gid), std_scope="batch")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="std_scope='batch' says which std to divide by"):  # and there is none
        compute_advantages("grpo", t(r), t(gid), std_scope="batch", norm_adv_by_std_in_grpo=False)


def test_grpo_with_the_batch_s_std_on_equal_or_single_rewards_and_a_scope_it_does_not_know():
    assert compute_advantages("grpo", t([0.5, 0.5, 0.5, 0.5]), t([0, 0, 1, 1]), std_scope="batch").tolist() == [0.0] * 4
    # no std to divide by (one reward, or equal singletons): 1, as for a singleton group under the group scope
    assert compute_advantages("grpo", t([2.0]), t([0]), std_scope="batch").tolist() == [pytest.approx(2.0 / (1 + 1e-6))]
    assert compute_advantages("grpo", t([0.5, 0.5]), t([0, 1]), std_scope="batch").tolist() == [
        pytest.approx(0.5 / (1 + 1e-6))] * 2
    with pytest.raises(ValueError, match="std_scope must be 'group' or 'batch', got 'prompt'"):
        compute_advantages("grpo", t([1.0, 0.0]), t([0, 0]), std_scope="prompt")


@pytest.mark.parametrize("seed", [0, 3])
def test_dr_grpo_and_grpo_without_std(seed):
    r, gid, _, _ = make_batch(seed)
    expected = ref_grpo(r, gid, norm=False)
    np.testing.assert_allclose(compute_advantages("dr_grpo", t(r), t(gid)).numpy(), expected, rtol=1e-5, atol=1e-6)
    got = compute_advantages("grpo", t(r), t(gid), norm_adv_by_std_in_grpo=False)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 4])
def test_rloo_matches_leave_one_out(seed):
    r, gid, _, _ = make_batch(seed)
    got = compute_advantages("rloo", t(r), t(gid))
    np.testing.assert_allclose(got.numpy(), ref_rloo(r, gid), rtol=1e-5, atol=1e-6)


def test_rloo_hand_example():
    # group {3, 0, 1}: 3 - 0.5 = 2.5, 0 - 2 = -2, 1 - 1.5 = -0.5
    got = compute_advantages("rloo", torch.tensor([3.0, 0.0, 1.0]), torch.tensor([7, 7, 7]))
    assert torch.allclose(got, torch.tensor([2.5, -2.0, -0.5]))


@pytest.mark.parametrize("seed", [0, 5])
def test_reinforce_pp_token_weighted_whitening(seed):
    r, gid, lengths, _ = make_batch(seed)
    got = compute_advantages("reinforce_pp", t(r), t(gid), lengths=t(lengths))
    np.testing.assert_allclose(got.numpy(), ref_token_whiten(r, lengths), rtol=1e-5, atol=1e-6)
    # without lengths every sample weighs 1; the two must differ (the weighting really is applied)
    unweighted = compute_advantages("reinforce_pp", t(r), t(gid))
    np.testing.assert_allclose(unweighted.numpy(), ref_token_whiten(r, np.ones_like(lengths)), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, unweighted, atol=1e-3)


def test_reinforce_pp_hand_example():
    # R = [1, 0], lengths [3, 1]: tokens 1,1,1,0 -> mean 0.75, unbiased var (3*0.0625 + 0.5625)/3 = 0.25
    # -> std 0.5, A = [0.25/0.5, -0.75/0.5] = [0.5, -1.5]
    got = compute_advantages("reinforce_pp", torch.tensor([1.0, 0.0]), torch.tensor([0, 1]), lengths=torch.tensor([3, 1]))
    assert torch.allclose(got, torch.tensor([0.5, -1.5]), atol=1e-6)


@pytest.mark.parametrize("seed", [0, 6])
def test_reinforce_pp_baseline(seed):
    r, gid, lengths, _ = make_batch(seed)
    centred = ref_grpo(r, gid, norm=False)  # singleton: baseline 0
    got = compute_advantages("reinforce_pp_baseline", t(r), t(gid), lengths=t(lengths))
    np.testing.assert_allclose(got.numpy(), ref_token_whiten(centred, lengths), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["reinforce_pp", "reinforce_pp_baseline"])
def test_reinforce_pp_epsilon_is_added_to_the_token_std(name):
    r, gid, lengths, _ = make_batch(9)
    x = r if name == "reinforce_pp" else ref_grpo(r, gid, norm=False)
    got = compute_advantages(name, t(r), t(gid), lengths=t(lengths), epsilon=0.5)
    np.testing.assert_allclose(got.numpy(), ref_token_whiten(x, lengths, eps=0.5), rtol=1e-5, atol=1e-6)


def test_reinforce_pp_hand_example_with_epsilon():
    # as the hand example: std 0.5, so A = [0.25, -0.75] / (0.5 + 0.5)
    got = compute_advantages(
        "reinforce_pp", torch.tensor([1.0, 0.0]), torch.tensor([0, 1]), lengths=torch.tensor([3, 1]), epsilon=0.5
    )
    assert torch.allclose(got, torch.tensor([0.25, -0.75]), atol=1e-6)


def test_reinforce_pp_equal_returns_over_tokens_give_zeros_whatever_a_zero_length_sample_holds():
    # the samples with tokens all return 0.3; the zero-length one (5.0) has no token and does not count
    got = compute_advantages(
        "reinforce_pp", torch.tensor([0.3, 5.0, 0.3]), torch.tensor([0, 1, 2]), lengths=torch.tensor([2, 0, 3]), epsilon=0.0
    )
    assert torch.equal(got, torch.zeros(3))


def test_reinforce_pp_zero_length_sample_gets_zero():
    got = compute_advantages(
        "reinforce_pp", torch.tensor([1.0, 0.0, 5.0]), torch.tensor([0, 0, 1]), lengths=torch.tensor([2, 2, 0])
    )
    assert got[2] == 0.0
    # the zero-length sample does not enter the statistics: tokens 1,1,0,0 -> mean .5, std sqrt(1/3)
    assert torch.allclose(got[:2], torch.tensor([0.5, -0.5]) / math.sqrt(1 / 3), atol=1e-6)


@pytest.mark.parametrize(
    "rewards,lam,expected",
    [
        ([1.0, 0.0, 1.0, 0.0], 0.1, [0.1, -1.0, 0.1, -1.0]),  # 0/1 rewards
        ([1.0, -1.0, -1.0, 1.0], 0.1, [0.1, -1.0, -1.0, 0.1]),  # +-1 rewards
        ([1.0, 0.0, 0.5, 0.49], 0.3, [0.3, -1.0, 0.3, -1.0]),  # threshold 0.5 is inclusive
    ],
)
def test_w_reinforce(rewards, lam, expected):
    got = compute_advantages("w_reinforce", torch.tensor(rewards), torch.tensor([0, 0, 1, 1]), lam=lam)
    assert got.dtype == torch.float32
    assert torch.allclose(got, torch.tensor(expected))


def test_w_reinforce_default_is_plus_point_one_minus_one():
    got = compute_advantages("w_reinforce", torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    assert got.tolist() == pytest.approx([0.1, -1.0])


def test_psr_nsr():
    r = torch.tensor([1.0, 0.0, -1.0, 1.0, 0.7])
    g = torch.tensor([0, 0, 1, 1, 2])
    assert compute_advantages("psr", r, g).tolist() == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert compute_advantages("nsr", r, g).tolist() == [0.0, -1.0, -1.0, 0.0, 0.0]
    assert compute_advantages("nsr", r, g, correct_threshold=0.8).tolist() == [0.0, -1.0, -1.0, 0.0, -1.0]
    # W-REINFORCE interpolates: lam=1 is PSR + NSR, lam=0 is NSR
    w1 = compute_advantages("w_reinforce", r, g, lam=1.0)
    assert torch.equal(w1, compute_advantages("psr", r, g) + compute_advantages("nsr", r, g))
    assert torch.equal(compute_advantages("w_reinforce", r, g, lam=0.0), compute_advantages("nsr", r, g))
    # the +1 / -1 reward of the paper is W-REINFORCE with lam = 1
    assert compute_advantages("signed_reward", r, g).tolist() == [1.0, -1.0, -1.0, 1.0, 1.0]
    assert compute_advantages("signed_reward", r, g, correct_threshold=0.8).tolist() == [1.0, -1.0, -1.0, 1.0, -1.0]
    assert compute_advantages("psr", r, g, correct_threshold=0.8).tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert compute_advantages("w_reinforce", r, g, correct_threshold=-1.0).tolist() == pytest.approx([0.1] * 5)
    assert torch.equal(compute_advantages("signed_reward", r, g), w1)


# --------------------------------------------------------------------------------------------------
# pass@k
# --------------------------------------------------------------------------------------------------


def test_passk_hand_example_n4_neg2_k2():
    # N = 4, N_neg = 2, k = 2:
    #   C(4,2) = 6 subsets, C(2,2) = 1 of them all-wrong -> R_bar = 1 - 1/6 = 5/6
    #   sigma = sqrt(5/6 * 1/6) = sqrt(5)/6 ~= 0.372678
    #   A_pos = (1/6) / sigma = 1/sqrt(5) ~= 0.447214
    #   A_neg = (1/6 - C(1,1)/C(3,1)) / sigma = (1/6 - 1/3) / (sqrt(5)/6) = -1/sqrt(5)
    got = compute_advantages("passk", torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([5, 5, 5, 5]), k=2)
    sigma = math.sqrt(5) / 6
    a_pos = (1 / 6) / (sigma + 1e-6)
    a_neg = (1 / 6 - 1 / 3) / (sigma + 1e-6)
    assert a_pos == pytest.approx(0.4472136, abs=1e-5)
    assert torch.allclose(got.double(), torch.tensor([a_pos, a_neg, a_neg, a_pos], dtype=torch.float64), atol=1e-6)


def test_passk_hand_example_n4_neg3_k2():
    # N_neg = 3: R_bar = 1 - C(3,2)/C(4,2) = 1/2, sigma = 1/2, A_pos = 1, A_neg = (1/2 - 2/3)/(1/2) = -1/3
    got = compute_advantages("passk", torch.tensor([0.0, 0.0, 1.0, 0.0]), torch.tensor([1, 1, 1, 1]), k=2)
    assert torch.allclose(got, torch.tensor([-1 / 3, -1 / 3, 1.0, -1 / 3]), atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_passk_matches_bruteforce_subsets(k):
    r, gid, _, _ = make_batch(11, sizes=(6, 5, 7, 4, 6, 5), binary=True)
    got = compute_advantages("passk", t(r), t(gid), k=k)
    np.testing.assert_allclose(got.numpy(), ref_passk_bruteforce(r >= 0.5, gid, k), rtol=1e-5, atol=1e-5)
    # the expected per-response subset reward averages to R_bar: advantages sum to 0 in every group
    for idx in groups_of(gid).values():
        assert abs(float(got[idx].double().sum())) < 1e-4


def test_passk_small_sigma_matches_bruteforce_with_its_epsilon():
    # N = 12, N_neg = 4, k = 4: a single failing 4-subset out of 495, sigma ~= 0.045, where the 1e-6 shows
    correct = np.array([0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0, 1, 0, 0, 1, 0, 1, 1], dtype=np.float64)
    gid = np.array([3] * 12 + [8] * 6)
    got = compute_advantages("passk", t(correct), t(gid), k=4)
    np.testing.assert_allclose(got.numpy(), ref_passk_bruteforce(correct >= 0.5, gid, 4), rtol=1e-6, atol=1e-7)
    q, sigma = 1 / 495, math.sqrt(1 / 495 * 494 / 495)
    assert float(got[1]) == pytest.approx(q / (sigma + 1e-6), rel=1e-6)
    assert float(got[0]) == pytest.approx((q - 1 / math.comb(11, 3)) / (sigma + 1e-6), rel=1e-6)


def test_passk_k1_equals_population_std_grpo():
    # k = 1: R_bar = pass rate p, A_pos = (1-p)/sigma, A_neg = -p/sigma with population std
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    got = compute_advantages("passk", r, torch.zeros(5, dtype=torch.long), k=1)
    expected = (r - r.mean()) / (r.std(unbiased=False) + 1e-6)
    assert torch.allclose(got, expected, atol=1e-6)


def test_passk_degenerate_groups_are_zero():
    r = torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    got = compute_advantages("passk", r, g, k=2)
    # all correct, all wrong, and N_neg = 1 < k (every 2-subset passes): all exactly 0
    assert torch.equal(got, torch.zeros(12))


def test_passk_counts_a_sample_correct_from_the_correct_threshold():
    # rewards in [0, 1] (partial credit): with threshold 0.7 only 1.0 and 0.75 are correct -> N = 4, N_neg = 2, k = 2,
    # the hand example above (A_pos = 1/sqrt(5), A_neg = -1/sqrt(5)); with the default 0.5, 0.6 is correct too
    r = torch.tensor([1.0, 0.6, 0.3, 0.75])
    g = torch.zeros(4, dtype=torch.long)
    a = 1 / 6 / (math.sqrt(5) / 6 + 1e-6)
    got = compute_advantages("passk", r, g, k=2, correct_threshold=0.7)
    assert torch.allclose(got.double(), torch.tensor([a, -a, -a, a], dtype=torch.float64), atol=1e-6)
    expected = compute_advantages("passk", torch.tensor([1.0, 1.0, 0.0, 1.0]), g, k=2)
    assert torch.equal(compute_advantages("passk", r, g, k=2), expected)


@pytest.mark.parametrize("name", ["psr", "nsr", "signed_reward", "w_reinforce", "passk"])
def test_given_verdicts_decide_what_is_correct_whatever_the_rewards(name):
    """``correct`` (the reward's own verdicts) replaces ``rewards >= correct_threshold``: rewards that shaping moved
    across the threshold change nothing; estimators that do not split right from wrong ignore it."""
    r = torch.tensor([0.2, 0.9, 0.1, 0.95])  # shaped: the first and third are right, the others wrong
    g = torch.zeros(4, dtype=torch.long)
    correct = torch.tensor([True, False, True, False])
    given = compute_advantages(name, r, g, correct=correct, **({"k": 2} if name == "passk" else {}))
    assert torch.equal(given, compute_advantages(name, correct.float(), g, **({"k": 2} if name == "passk" else {})))
    assert not torch.equal(given, compute_advantages(name, r, g, **({"k": 2} if name == "passk" else {})))


def test_given_verdicts_are_checked_and_ignored_by_estimators_that_do_not_judge():
    r, g = torch.tensor([0.2, 0.9]), torch.zeros(2, dtype=torch.long)
    assert torch.equal(compute_advantages("grpo", r, g, correct=torch.tensor([True, True])), compute_advantages("grpo", r, g))
    with pytest.raises(ValueError, match="correct must be a boolean tensor"):
        compute_advantages("psr", r, g, correct=torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="correct"):
        compute_advantages("psr", r, g, correct=torch.tensor([True]))
    with pytest.raises(ValueError, match="correct_threshold must be a finite number"):
        compute_advantages("psr", r, g, correct=torch.tensor([True, False]), correct_threshold=math.nan)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_reward_at_the_threshold_is_correct_in_the_reward_s_own_precision(dtype):
    """A float32 (or bfloat16) 0.7 is 0.699999988 in float64: compared in the rewards' own precision, as the reward
    runner compares it, it reaches a threshold of 0.7; Python floats are compared exactly."""
    g = torch.zeros(2, dtype=torch.long)
    at = torch.tensor([0.7, 0.3], dtype=dtype)
    assert compute_advantages("psr", at, g, correct_threshold=0.7).tolist() == [1.0, 0.0]
    assert compute_advantages("nsr", at, g, correct_threshold=0.7).tolist() == [0.0, -1.0]
    assert compute_advantages("psr", [0.7, 0.69999], g, correct_threshold=0.7).tolist() == [1.0, 0.0]


def test_passk_group_smaller_than_k_raises():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    g = torch.tensor([0, 0, 0, 0, 42])
    with pytest.raises(ValueError, match=r"group 42 has 1 sample.*k = 4"):
        compute_advantages("passk", r, g)
    with pytest.raises(ValueError, match=r"group 0 has 4 sample.*k = 5"):
        compute_advantages("passk", r, g, k=5)
    with pytest.raises(ValueError, match="positive integer"):
        compute_advantages("passk", r, g, k=0)


# --------------------------------------------------------------------------------------------------
# unlikeliness reward
# --------------------------------------------------------------------------------------------------


def test_unlikeliness_hand_example():
    # group A (id 9): rewards [1, 0, 1, 1] at positions 0, 2, 4, 6, log-probs [-0.1, -3.0, -0.7, -1.5]
    #   ascending: -3.0 (rank 0), -1.5 (1), -0.7 (2), -0.1 (3); G = 4, beta = 0.25
    #   R' = [1 - .25*3/4, 0, 1 - .25*2/4, 1 - .25*1/4] = [0.8125, 0, 0.875, 0.9375]
    # group B (id -2): rewards [1, 1] at positions 1, 3, equal log-probs: tie broken by index
    #   -> position 1 rank 0 (R' = 1), position 3 rank 1 (R' = 1 - .25/2 = 0.875)
    # position 5: singleton, rank 0 -> R' = R
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.5, 1.0])
    g = torch.tensor([9, -2, 9, -2, 9, 3, 9])
    lp = torch.tensor([-0.1, -0.4, -3.0, -0.4, -0.7, -1.0, -1.5])
    shaped = unlikeliness_shaped_rewards(r, g, lp)
    expected = torch.tensor([0.8125, 1.0, 0.0, 0.875, 0.875, 0.5, 0.9375], dtype=torch.float64)
    assert torch.allclose(shaped, expected, atol=1e-12)
    # the most likely correct sample gets 1 - beta (G - 1)/G
    assert shaped[0] == pytest.approx(1 - 0.25 * 3 / 4)
    assert unlikeliness_shaped_rewards(r, g, lp, beta_rank=0.5)[0] == pytest.approx(1 - 0.5 * 3 / 4)


def test_unlikeliness_ranks_among_all_samples_of_the_group_wrong_ones_included():
    """The released code ranks all G samples (argsort of argsort): a wrong sample more likely than every correct one
    spares them the top rank (docs/rewards-judges.md's example)."""
    shaped = unlikeliness_shaped_rewards(torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.zeros(4, dtype=torch.long),
                                         torch.tensor([-1.0, -0.5, -3.0, -4.0]))
    assert shaped.tolist() == [0.875, 0.0, 0.9375, 0.0]


@pytest.mark.parametrize("seed", [0, 7])
def test_unlikely_matches_reference(seed):
    r, gid, _, logp = make_batch(seed, binary=True)
    logp[:4] = logp[0]  # some ties
    rank = ref_unlikely_ranks(logp, gid)
    shaped = r * (1 - 0.25 * rank)
    np.testing.assert_allclose(unlikeliness_shaped_rewards(t(r), t(gid), t(logp)).numpy(), shaped, rtol=1e-12)
    got = compute_advantages("unlikely", t(r), t(gid), seq_log_prob=t(logp))
    np.testing.assert_allclose(got.numpy(), ref_grpo(shaped, gid), rtol=1e-5, atol=1e-6)
    got = compute_advantages("unlikely", t(r), t(gid), seq_log_prob=t(logp), epsilon=0.5)
    np.testing.assert_allclose(got.numpy(), ref_grpo(shaped, gid, eps=0.5), rtol=1e-5, atol=1e-6)


def test_unlikeliness_ranks_float64_log_probs_at_full_precision():
    # log-probs 1e-12 apart are not a tie: the second sample is the less likely one (rank 0) whatever its index
    lp = torch.tensor([-0.5, -0.5 - 1e-12], dtype=torch.float64)
    shaped = unlikeliness_shaped_rewards(torch.ones(2), torch.zeros(2, dtype=torch.long), lp)
    assert shaped.tolist() == [1.0 - 0.25 / 2, 1.0]
    # given as a list, as rewards may be: read in float64 as well, not rounded to a tie
    assert unlikeliness_shaped_rewards([1.0, 1.0], [0, 0], lp.tolist()).tolist() == shaped.tolist()
    as_list = compute_advantages("unlikely", [1.0, 1.0, 0.0], [0, 0, 0], seq_log_prob=lp.tolist() + [-1.0])
    assert torch.equal(as_list, compute_advantages("unlikely", [1.0, 1.0, 0.0], [0, 0, 0],
                                                   seq_log_prob=torch.cat([lp, lp.new_tensor([-1.0])])))


def test_unlikeliness_accepts_beta_rank_one():
    # beta_rank = 1, the top of its range: R' = R (1 - rank/G), the least likely sample keeps its reward
    lp = torch.tensor([-0.1, -3.0, -0.7, -1.5])  # ranks 3, 0, 2, 1
    shaped = unlikeliness_shaped_rewards(torch.ones(4), torch.zeros(4, dtype=torch.long), lp, beta_rank=1.0)
    assert shaped.tolist() == pytest.approx([0.25, 1.0, 0.5, 0.75])
    got = compute_advantages("unlikely", torch.ones(4), torch.zeros(4, dtype=torch.long), seq_log_prob=lp, beta_rank=1.0)
    assert torch.isfinite(got).all() and int(got.argmax()) == 1
    assert unlikeliness_shaped_rewards(torch.ones(4), torch.zeros(4, dtype=torch.long), lp,
                                       beta_rank=np.float32(1.0)).tolist() == shaped.tolist()  # numpy's numbers too
    with pytest.raises(ValueError, match="beta_rank"):
        unlikeliness_shaped_rewards(torch.ones(4), torch.zeros(4, dtype=torch.long), lp, beta_rank=np.True_)


def test_unlikeliness_with_negative_rewards_still_ranks_the_likely_sample_lower():
    """A negative reward loses the same share of |R| (R (1 + beta rank/G)); multiplying by (1 - beta rank/G) would
    have made the most likely of four -1 rewards the least penalised."""
    r = torch.tensor([-1.0, -1.0, -1.0, -1.0])
    lp = torch.tensor([-0.1, -3.0, -0.7, -1.5])  # ranks 3, 0, 2, 1
    shaped = unlikeliness_shaped_rewards(r, torch.zeros(4, dtype=torch.long), lp)
    assert shaped.tolist() == pytest.approx([-1 - 0.25 * 3 / 4, -1.0, -1 - 0.25 * 2 / 4, -1 - 0.25 / 4])
    assert int(shaped.argmin()) == 0 and int(shaped.argmax()) == 1


def test_unlikely_prefers_the_less_likely_correct_sample():
    r = torch.tensor([1.0, 1.0, 0.0, 0.0])
    g = torch.zeros(4, dtype=torch.long)
    a = compute_advantages("unlikely", r, g, seq_log_prob=torch.tensor([-0.2, -2.0, -1.0, -0.5]))
    plain = compute_advantages("grpo", r, g)
    assert a[1] > a[0] > 0 and a[2] < 0 and a[3] < 0
    assert torch.allclose(plain[0], plain[1])
    # beta_rank = 0 is plain GRPO
    a0 = compute_advantages("unlikely", r, g, seq_log_prob=torch.tensor([-0.2, -2.0, -1.0, -0.5]), beta_rank=0.0)
    assert torch.allclose(a0, plain)


def test_unlikely_requires_seq_log_prob():
    r, g = torch.tensor([1.0, 0.0]), torch.tensor([0, 0])
    with pytest.raises(ValueError, match="needs seq_log_prob.*old"):
        compute_advantages("unlikely", r, g)
    with pytest.raises(ValueError, match="needs seq_log_prob"):
        get_advantage_fn("unlikely")(r, g)
    with pytest.raises(ValueError, match="seq_log_prob has 3 entries but rewards has 2"):
        compute_advantages("unlikely", r, g, seq_log_prob=torch.zeros(3))


# --------------------------------------------------------------------------------------------------
# shared conventions: equal rewards, singletons, permutation, dtypes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [0.1, 1.0 / 3.0, 0.0, 1.0, -7.3])
@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "passk", "reinforce_pp", "reinforce_pp_baseline"])
def test_all_equal_rewards_give_exact_zeros(name, value, dtype):
    # groups of 3, 5 and 4 (interleaved), every reward equal to an awkward float (in float64, sum/3 of
    # three 0.1 is 0.10000000000000002: the mean must be exact, not merely close)
    g = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 1, 1, 2])
    r = torch.full((12,), value, dtype=dtype)
    params = {"k": 2} if name == "passk" else {}
    got = compute_advantages(name, r, g, **params)
    assert torch.equal(got, torch.zeros(12)), got


def test_equal_rewards_per_group_with_zero_epsilon_no_nan():
    r = torch.tensor([0.1, 0.1, 0.1, 0.9, 0.2, 0.9])
    g = torch.tensor([0, 0, 0, 1, 2, 1])  # group 1 constant (0.9), group 0 constant, group 2 singleton
    got = compute_advantages("grpo", r, g, epsilon=0.0)
    assert torch.isfinite(got).all()
    assert torch.equal(got[[0, 1, 2, 3, 5]], torch.zeros(5))
    # the per-group-constant batch also gives zeros for the baseline REINFORCE++ (after centring)
    rb = compute_advantages("reinforce_pp_baseline", r[[0, 1, 2, 3, 5]], g[[0, 1, 2, 3, 5]])
    assert torch.equal(rb, torch.zeros(5))


def test_reinforce_pp_baseline_centres_in_float64_so_rewards_near_float32_s_largest_stay_finite():
    rewards = torch.tensor([3e38, -3e38, 1.5e38])  # centred in float32 they overflowed, and whitened to NaN
    groups = torch.zeros(3, dtype=torch.long)
    got = compute_advantages("reinforce_pp_baseline", rewards, groups)
    torch.testing.assert_close(got, compute_advantages("reinforce_pp", rewards, groups))  # one group: the same


def test_singleton_groups_have_no_baseline():
    r = torch.tensor([0.7, -1.2, 3.0])
    g = torch.tensor([10, 20, 30])
    # grpo: mean 0, std 1 (verl) -> R / (1 + eps)
    assert torch.allclose(compute_advantages("grpo", r, g), r / (1 + 1e-6))
    assert torch.allclose(compute_advantages("grpo", r, g, epsilon=1.0), r / 2)
    assert torch.equal(compute_advantages("dr_grpo", r, g), r)
    assert torch.equal(compute_advantages("rloo", r, g), r)
    # mixed with a real group {1, 0}: mean 0.5, unbiased std sqrt(0.5) -> +-0.5/sqrt(0.5) = +-sqrt(0.5);
    # the singleton passes through
    got = compute_advantages("grpo", torch.tensor([1.0, 5.0, 0.0]), torch.tensor([1, 2, 1]))
    assert torch.allclose(got, torch.tensor([math.sqrt(0.5), 5.0 / (1 + 1e-6), -math.sqrt(0.5)]), atol=1e-5)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_permutation_and_relabel_equivariance(name):
    r, gid, lengths, logp = make_batch(21, sizes=(5, 4, 6, 4), binary=name in {"passk", "psr", "nsr", "w_reinforce", "signed_reward"})
    kw = dict(lengths=t(lengths), seq_log_prob=t(logp))
    base = compute_advantages(name, t(r), t(gid), **kw)
    perm = np.random.default_rng(3).permutation(r.size)
    relabel = {g: i * 13 - 40 for i, g in enumerate(sorted(set(gid.tolist())))}
    gid2 = np.array([relabel[x] for x in gid[perm].tolist()])
    moved = compute_advantages(name, t(r[perm]), t(gid2), lengths=t(lengths[perm]), seq_log_prob=t(logp[perm]))
    assert torch.allclose(moved, base[perm], atol=1e-6)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_output_float32_from_any_input_dtype(name):
    r = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0])  # int rewards
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.int32)
    out = compute_advantages(name, r, g, lengths=torch.arange(1, 9), seq_log_prob=-torch.arange(8) / 8.0)
    assert out.dtype == torch.float32 and out.shape == (8,) and torch.isfinite(out).all()
    empty = compute_advantages(name, torch.empty(0), torch.empty(0, dtype=torch.long), seq_log_prob=torch.empty(0))
    assert empty.shape == (0,) and empty.dtype == torch.float32


def test_unused_data_inputs_are_ignored():
    r, gid, lengths, logp = make_batch(8)
    plain = compute_advantages("grpo", t(r), t(gid))
    with_data = compute_advantages("grpo", t(r), t(gid), lengths=t(lengths), seq_log_prob=t(logp))
    assert torch.equal(plain, with_data)


# --------------------------------------------------------------------------------------------------
# validation and errors
# --------------------------------------------------------------------------------------------------


def test_unknown_estimator_lists_valid_names():
    with pytest.raises(ValueError, match="unknown advantage estimator 'gae'") as e:
        compute_advantages("gae", torch.zeros(2), torch.zeros(2, dtype=torch.long))
    for name in ALL_NAMES:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="valid names: .*rloo"):
        get_advantage_fn("nope")


def test_unknown_param_lists_valid_params():
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) eps for advantage estimator 'grpo'") as e:
        compute_advantages("grpo", torch.zeros(2), torch.zeros(2, dtype=torch.long), eps=0.1)
    assert "norm_adv_by_std_in_grpo=True" in str(e.value) and "epsilon=1e-06" in str(e.value)
    with pytest.raises(ValueError, match=r"valid parameters: \(none\)"):
        compute_advantages("rloo", torch.zeros(2), torch.zeros(2, dtype=torch.long), epsilon=0.1)


@pytest.mark.parametrize(
    "rewards,group_ids,kw,match",
    [
        (torch.zeros(3), torch.zeros(4, dtype=torch.long), {}, "group_ids has 4 entries but rewards has 3"),
        (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), {}, r"rewards must be 1-D .* shape \(2, 3\)"),
        (torch.zeros(3), torch.zeros(3, 1, dtype=torch.long), {}, "group_ids must be 1-D"),
        (torch.tensor([0.0, float("nan"), 1.0]), torch.zeros(3, dtype=torch.long), {}, "rewards has 1 non-finite.*index 1"),
        (torch.tensor([0.0, 1.0, float("inf")]), torch.zeros(3, dtype=torch.long), {}, "non-finite.*index 2"),
        (torch.zeros(3), torch.zeros(3), {}, "group_ids must be an integer tensor"),
        (torch.zeros(3), torch.zeros(3, dtype=torch.bool), {}, "group_ids must be an integer tensor"),
        (torch.zeros(3, dtype=torch.complex64), torch.zeros(3, dtype=torch.long), {}, "rewards must be real numbers"),
        (torch.zeros(3), torch.zeros(3, dtype=torch.long), {"lengths": torch.tensor([1.0, 2.5, 2.0])}, "non-negative integer"),
        (torch.zeros(3), torch.zeros(3, dtype=torch.long), {"lengths": torch.ones(2)}, "lengths has 2 entries"),
        (torch.zeros(3), torch.zeros(3, dtype=torch.long), {"lengths": torch.tensor([1, -1, 2])}, "non-negative integer"),
        (
            torch.zeros(3),
            torch.zeros(3, dtype=torch.long),
            {"seq_log_prob": torch.tensor([0.0, float("nan"), 0.0])},
            "seq_log_prob has 1 non-finite",
        ),
    ],
)
def test_input_validation_messages(rewards, group_ids, kw, match):
    with pytest.raises(ValueError, match=match):
        compute_advantages("grpo", rewards, group_ids, **kw)


@pytest.mark.parametrize("estimator, kw, match", [
    ("grpo", {"norm_adv_by_std_in_grpo": "no"}, "norm_adv_by_std_in_grpo must be True or False, got 'no'"),
    ("grpo", {"norm_adv_by_std_in_grpo": 2}, "norm_adv_by_std_in_grpo must be True or False, got 2"),
    ("w_reinforce", {"lam": -0.1}, "lam must be a finite number >= 0"),
    ("w_reinforce", {"lam": float("inf")}, "lam must be a finite number >= 0"),
    ("w_reinforce", {"lam": True}, r"lam must be a finite number >= 0 \(lam = 0 is NSR\), got True"),
    ("grpo", {"epsilon": True}, "epsilon must be a finite number >= 0, got True"),
    ("reinforce_pp", {"epsilon": np.True_}, "epsilon must be a finite number >= 0"),
    ("psr", {"correct_threshold": None}, "correct_threshold must be a finite number"),
    ("w_reinforce", {"correct_threshold": float("nan")}, "correct_threshold must be a finite number"),
    ("unlikely", {"beta_rank": 5.0}, r"beta_rank must be a number in \[0, 1\]"),
    ("unlikely", {"beta_rank": -0.1}, r"beta_rank must be a number in \[0, 1\]"),
])
def test_settings_outside_their_meaning_are_refused(estimator, kw, match):
    """A truthy string would keep the std on, a None threshold failed inside a comparison, and beta_rank above 1
    ranked a likely correct sample below a wrong one."""
    rewards, group_ids = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        compute_advantages(estimator, rewards, group_ids, seq_log_prob=torch.zeros(4), **kw)


def test_reinforce_pp_rejects_all_zero_lengths():
    with pytest.raises(ValueError, match="lengths sum to zero"):
        compute_advantages("reinforce_pp", torch.tensor([0.0, 1.0]), torch.tensor([0, 0]), lengths=torch.tensor([0, 0]))


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------


def test_available_advantages_lists_every_estimator_with_paper_and_defaults():
    infos = {i.name: i for i in available_advantages()}
    assert set(ALL_NAMES) <= set(infos)
    assert all(isinstance(i, AdvantageInfo) and i.description for i in infos.values())
    papers = {
        "grpo": "2402.03300",
        "dr_grpo": "2503.20783",
        "rloo": "2402.14740",
        "reinforce_pp": "2501.03262",
        "reinforce_pp_baseline": "2501.03262",
        "w_reinforce": "2506.01347",
        "psr": "2506.01347",
        "nsr": "2506.01347",
        "signed_reward": "2506.01347",
        "passk": "2508.10751",
        "unlikely": "2506.02355",
    }
    for name, arxiv in papers.items():
        assert arxiv in infos[name].paper, name
    assert infos["grpo"].params == {"norm_adv_by_std_in_grpo": True, "epsilon": 1e-6, "std_scope": "group"}
    assert infos["dr_grpo"].params == {} and infos["rloo"].params == {}
    assert infos["reinforce_pp"].params == {"epsilon": 1e-8}
    assert infos["reinforce_pp_baseline"].params == {"epsilon": 1e-8}
    assert infos["w_reinforce"].params == {"lam": 0.1, "correct_threshold": 0.5}
    assert infos["psr"].params == {"correct_threshold": 0.5} == infos["nsr"].params
    assert infos["passk"].params == {"k": 4, "correct_threshold": 0.5}
    assert infos["unlikely"].params == {"beta_rank": 0.25, "epsilon": 1e-6}
    # data inputs are not parameters; the returned dicts are copies
    infos["grpo"].params["epsilon"] = 1.0
    assert {i.name: i for i in available_advantages()}["grpo"].params["epsilon"] == 1e-6


def test_register_custom_estimator(monkeypatch):
    monkeypatch.setattr(adv, "_REGISTRY", dict(adv._REGISTRY))

    @register_advantage("scaled_dr", description="test", paper="none")
    def scaled_dr(rewards, group_ids, *, lengths=None, scale: float = 2.0):
        return scale * adv.dr_grpo(rewards, group_ids)

    r, g = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1])
    assert torch.allclose(compute_advantages("scaled_dr", r, g, lengths=torch.ones(4), scale=3.0), torch.tensor([1.5, -1.5, 0, 0]))
    assert {i.name: i for i in available_advantages()}["scaled_dr"].params == {"scale": 2.0}
    @register_advantage("float64_dr", description="test", paper="none")
    def float64_dr(rewards, group_ids):
        return adv.dr_grpo(rewards, group_ids).double()

    out = compute_advantages("float64_dr", r, g)
    assert out.dtype == torch.float32 and torch.equal(out, torch.tensor([0.5, -0.5, 0, 0]))
    with pytest.raises(ValueError, match="'grpo' is already registered"):
        register_advantage("grpo", description="dup", paper="none")(scaled_dr)
    with pytest.raises(TypeError, match="has no default"):
        register_advantage("bad1", description="", paper="")(lambda rewards, group_ids, *, k: rewards)
    with pytest.raises(TypeError, match=r"\*\*kwargs"):
        register_advantage("bad2", description="", paper="")(lambda rewards, group_ids, **kw: rewards)
    with pytest.raises(TypeError, match="exactly two positional"):
        register_advantage("bad3", description="", paper="")(lambda rewards, *, k=1: rewards)


def test_rewards_ids_and_lengths_given_as_lists_are_read_as_their_tensors_are():
    """Python floats are float64: a list of rewards gives the advantages of the float64 tensor of it (torch's default
    float32 would make 1 and 1 + 1e-12 one reward), and an empty batch given as empty lists is an empty batch."""
    rewards = [1.0, 1.0 + 1e-12, 0.25, 0.75]
    as_tensors = compute_advantages("grpo", torch.tensor(rewards, dtype=torch.float64), torch.tensor([0, 0, 1, 1]))
    assert torch.equal(compute_advantages("grpo", rewards, [0, 0, 1, 1]), as_tensors)
    assert as_tensors[0] != 0
    assert compute_advantages("grpo", [], []).shape == (0,)
    lengths = compute_advantages("dr_grpo", [1.0, 0.0], [0, 0], lengths=[3, 5])
    assert torch.equal(lengths, compute_advantages("dr_grpo", torch.tensor([1.0, 0.0]), torch.tensor([0, 0]),
                                                   lengths=torch.tensor([3, 5])))


def test_advantage_info_describes_one_estimator_and_names_the_valid_ones_for_an_unknown_name():
    from entrorl.advantages import advantage_info

    assert advantage_info("passk") == next(info for info in available_advantages() if info.name == "passk")
    with pytest.raises(ValueError, match="unknown advantage estimator 'grpoo'; valid names: grpo, "):
        advantage_info("grpoo")


@pytest.mark.parametrize("name,rewards", [
    ("rloo", [3.4e38, -3.4e38]),  # G/(G-1) (R - mean) = 6.8e38
    ("dr_grpo", [3.4e38, -3.4e38, -3.4e38]),  # R - mean = 4.5e38
])
def test_advantages_beyond_float32_are_refused_instead_of_returned_as_inf(name, rewards):
    r = torch.tensor(rewards)
    with pytest.raises(ValueError, match=rf"{name}.*beyond float32's largest value.*\|R\| = 3.4e\+38\): rescale the "
                                         "rewards$"):
        compute_advantages(name, r, torch.zeros(len(rewards), dtype=torch.long))
    # halved, the same rewards give finite advantages
    assert torch.isfinite(compute_advantages(name, r / 2, torch.zeros(len(rewards), dtype=torch.long))).all()


def test_advantages_beyond_float32_through_a_parameter_name_it():
    with pytest.raises(ValueError, match=r"'w_reinforce'.*\(rewards up to \|R\| = 1, lam=1e\+39\): rescale the rewards "
                                         r"or the parameters"):
        compute_advantages("w_reinforce", torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.zeros(4, dtype=torch.long), lam=1e39)
