"""The policy-objective core (``entrorl.objective``) checked against formulas written out in this file.

Sections:
  1. loss aggregation (verl's four ``loss_agg_mode`` names)
  2. the ``ppo_clip`` surrogate (decoupled eps, dual-clip, gradients, clip metrics)
  3. the surrogates of named methods: grpo, dapo, dr_grpo, gspo, cispo, kl_cov
  4. regularisers: entropy_bonus, adaptive_entropy, kl_ref / kl_estimate
  5. configuration and error messages
  6. the method registry, custom parts, describe()
  7. every registered method on a full batch and on an empty batch

Every reference below is computed independently of the library (numpy loops or plain torch), so a wrong
formula in the library makes the comparison fail.
"""

from __future__ import annotations

import math
import re
import warnings
from decimal import Decimal
from fractions import Fraction
from typing import ClassVar

import numpy as np
import pytest
import torch
from pydantic import Field

from entrorl.advantages import compute_advantages
from entrorl.objective import (
    LOSS_AGG_MODES,
    ObjectiveConfig,
    PolicyBatch,
    Selector,
    aggregate_loss,
    available_methods,
    get_method,
    build_objective,
    kl_estimate,
    methods_markdown_table,
    register_part,
)
from entrorl.tokens import token_stats

# float(loss) on a tensor that requires grad is intended throughout (values are compared, not backpropagated).
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")

F64 = torch.float64
ALL_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
# Ragged lengths for B = 6, T = 10: a full row, a one-token row and an empty row.
LENGTHS = (10, 7, 1, 0, 4, 9)
T = 10

EXPECTED_METHODS = {
    "grpo", "dapo", "dual_clip", "dr_grpo", "clip_cov", "kl_cov", "forking_tokens", "low_entropy_tokens",
    "clip_b", "clip_v", "psr", "nsr", "w_reinforce", "entropy_advantage", "entropy_bonus", "adaptive_entropy",
    "kl_ref", "lopti_reweight", "cispo", "gspo", "tis", "icepop", "rft", "unlikely_reward", "passk_advantage",
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ragged_mask(lengths=LENGTHS, width: int = T) -> torch.Tensor:
    return torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(F64).numpy()


def ref_aggregate(loss, mask, mode, *, loss_scale_factor=None, batch_num_tokens=None, global_batch_size=None, dp_size=1):
    """The four modes with explicit per-row loops over the valid tokens only."""
    loss, mask = np.asarray(loss, dtype=float), np.asarray(mask, dtype=bool)
    rows = [loss[i][mask[i]] for i in range(loss.shape[0])]
    if mode == "token-mean":
        count = mask.sum() if batch_num_tokens is None else batch_num_tokens
        return sum(float(r.sum()) for r in rows) / count * dp_size
    nonempty = [r for r in rows if r.size > 0]
    n_seq = len(nonempty) if global_batch_size is None else global_batch_size
    if mode == "seq-mean-token-mean":
        return sum(float(r.mean()) for r in nonempty) / n_seq * dp_size
    if mode == "seq-mean-token-sum":
        return sum(float(r.sum()) for r in nonempty) / n_seq * dp_size
    if mode == "seq-mean-token-sum-norm":
        scale = loss.shape[1] if loss_scale_factor is None else loss_scale_factor
        return sum(float(r.sum()) for r in nonempty) / n_seq / scale * dp_size
    raise AssertionError(mode)


def ref_ppo(ratio, adv, eps_low, eps_high, c=None):
    """max(-A r, -A clip(r)) and, with dual-clip, min(that, -c A) where A < 0."""
    loss = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps_low, 1 + eps_high))
    if c is not None:
        loss = np.where(adv < 0, np.minimum(loss, -c * adv), loss)
    return loss


def make_batch(seed: int, *, spread: float = 0.4, lengths=LENGTHS, width: int = T, dtype=F64, per_seq_adv: bool = False):
    """A batch with a leaf ``log_prob``; ratios exp(N(0, spread)) cover both clip sides for spread 0.4."""
    g = _gen(seed)
    b = len(lengths)
    old = -3.0 * torch.rand(b, width, generator=g, dtype=dtype)
    log_prob = (old + spread * torch.randn(b, width, generator=g, dtype=dtype)).requires_grad_()
    adv = torch.randn(b, generator=g, dtype=dtype) if per_seq_adv else torch.randn(b, width, generator=g, dtype=dtype)
    return PolicyBatch(log_prob=log_prob, old_log_prob=old, advantages=adv, mask=_ragged_mask(lengths, width))


def grad_of(loss: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True, retain_graph=True)
    return torch.zeros_like(leaf) if grad is None else grad


def full_batch(seed: int, *, empty: bool = False, B: int = 4, width: int = 8, V: int = 13):
    """Every PolicyBatch field, from logits through token_stats (float32, differentiable log-prob and entropy)."""
    g = _gen(seed)
    logits = (2.0 * torch.randn(B, width, V, generator=g)).requires_grad_()
    targets = torch.randint(V, (B, width), generator=g)
    stats = token_stats(logits, targets, need=("logprob", "entropy", "disc", "disc_centered"))
    old = stats.logprob.detach() + 0.3 * torch.randn(B, width, generator=g)
    mask = torch.zeros(B, width, dtype=torch.bool) if empty else _ragged_mask((8, 5, 1, 0), width)
    batch = PolicyBatch(
        log_prob=stats.logprob,
        old_log_prob=old,
        advantages=torch.randn(B, width, generator=g),
        mask=mask,
        entropy=stats.entropy,
        disc=stats.disc,
        disc_centered=stats.disc_centered,
        ref_log_prob=stats.logprob.detach() + 0.5 * torch.randn(B, width, generator=g),
        rollout_log_prob=old + 0.3 * torch.randn(B, width, generator=g),
    )
    return logits, batch


# ---------------------------------------------------------------------------------------------------------
# 1. aggregation
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ALL_MODES)
def test_aggregation_matches_formula_on_ragged_masks(mode):
    assert tuple(LOSS_AGG_MODES) == ALL_MODES
    loss = torch.randn(6, T, generator=_gen(1), dtype=F64)
    mask = _ragged_mask()
    got = aggregate_loss(loss, mask, mode)
    assert got.dim() == 0
    assert float(got) == pytest.approx(ref_aggregate(_np(loss), mask.numpy(), mode), rel=1e-12, abs=1e-14)
    # a 0/1 float mask is the same as a bool mask
    assert float(aggregate_loss(loss, mask.to(F64), mode)) == pytest.approx(float(got), rel=1e-12, abs=1e-14)


def test_aggregation_modes_differ_as_documented():
    """Hand-computed: rows [1, 2, 3] and [10], T = 4."""
    loss = torch.tensor([[1.0, 2.0, 3.0, 99.0], [10.0, 99.0, 99.0, 99.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert float(aggregate_loss(loss, mask, "token-mean")) == pytest.approx(16 / 4)
    assert float(aggregate_loss(loss, mask, "seq-mean-token-mean")) == pytest.approx((2 + 10) / 2)
    assert float(aggregate_loss(loss, mask, "seq-mean-token-sum")) == pytest.approx((6 + 10) / 2)
    assert float(aggregate_loss(loss, mask, "seq-mean-token-sum-norm")) == pytest.approx((6 + 10) / 2 / 4)
    assert float(aggregate_loss(loss, mask, "seq-mean-token-sum-norm", loss_scale_factor=8)) == pytest.approx(1.0)


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_num_tokens": 57.0},
        {"global_batch_size": 11.0},
        {"dp_size": 4},
        {"batch_num_tokens": 100.0, "global_batch_size": 16.0, "dp_size": 2, "loss_scale_factor": 32.0},
    ],
)
def test_aggregation_global_normalisers(mode, kwargs):
    """batch_num_tokens replaces sum(m) (token-mean only), global_batch_size the sequence count, dp_size scales."""
    loss = torch.randn(6, T, generator=_gen(2), dtype=F64)
    mask = _ragged_mask()
    got = aggregate_loss(loss, mask, mode, **kwargs)
    assert float(got) == pytest.approx(ref_aggregate(_np(loss), mask.numpy(), mode, **kwargs), rel=1e-12, abs=1e-14)


@pytest.mark.parametrize(("name", "value", "said"), [
    ("dp_size", -1, "dp_size must be"), ("dp_size", 0, "dp_size must be"), ("dp_size", 2.5, "dp_size must be"),
    ("dp_size", True, "dp_size must be"),
    ("batch_num_tokens", -6, "batch_num_tokens must be a finite number >= 0"),
    ("batch_num_tokens", float("nan"), "batch_num_tokens must be a finite number >= 0"),
    ("batch_num_tokens", True, "batch_num_tokens must be a finite number >= 0"),
    ("global_batch_size", -2, "global_batch_size must be a finite number >= 0"),
    ("global_batch_size", float("inf"), "global_batch_size must be a finite number >= 0"),
])
def test_counts_that_would_turn_zero_or_poison_the_loss_are_refused_before_any_part_moves(name, value, said):
    """A negative dp_size or count turns the loss's sign, dp_size 0 zeroes it, a NaN count makes it NaN: refused, by
    the objective before its stateful parts measure anything, and by aggregate_loss itself."""
    objective = build_objective("adaptive_entropy")
    batch = make_batch(64)
    batch.step = 0
    before = objective.state_dict()
    with pytest.raises(ValueError, match=re.escape(said)):
        objective(batch, **{name: value})
    assert objective.state_dict() == before
    with pytest.raises(ValueError, match=re.escape(said)):
        aggregate_loss(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), "token-mean", **{name: value})
    with pytest.raises(ValueError, match=r"dp_size=2 without batch_num_tokens: under data parallelism the token-mean"):
        build_objective("dapo")(make_batch(65), dp_size=2)
    with pytest.raises(ValueError, match=r"dp_size=2 without global_batch_size: .* seq-mean-token-mean loss"):
        build_objective("grpo")(make_batch(65), dp_size=2, batch_num_tokens=10)
    # a count of 0 (an empty batch everywhere) and a numpy integer are counts
    assert float(aggregate_loss(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), "token-mean", batch_num_tokens=0,
                                dp_size=np.int64(2))) == 12.0


@pytest.mark.parametrize("mode", ALL_MODES)
def test_aggregation_ignores_non_finite_masked_values(mode):
    loss = torch.randn(6, T, generator=_gen(3), dtype=F64)
    mask = _ragged_mask()
    poisoned = loss.clone()
    poisoned[~mask] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=F64).repeat(100)[: int((~mask).sum())]
    poisoned.requires_grad_()
    got = aggregate_loss(poisoned, mask, mode)
    assert torch.isfinite(got)
    assert float(got.detach()) == pytest.approx(ref_aggregate(_np(loss), mask.numpy(), mode), rel=1e-12, abs=1e-14)
    grad = grad_of(got, poisoned)
    assert torch.isfinite(grad).all()
    assert (grad[~mask] == 0).all()
    assert (grad[mask] != 0).all()


@pytest.mark.parametrize("mode", ALL_MODES)
def test_aggregation_empty_mask_gives_attached_zero(mode):
    loss = torch.randn(3, 5, generator=_gen(4), dtype=F64)
    loss[0, 0] = float("nan")
    loss.requires_grad_()
    got = aggregate_loss(loss, torch.zeros(3, 5, dtype=torch.bool), mode)
    assert float(got) == 0.0
    assert got.requires_grad
    grad = grad_of(got, loss)
    assert torch.equal(grad, torch.zeros_like(loss))
    # responses of no tokens at all (padded width 0): Dr. GRPO's default divisor is that width
    empty = torch.zeros(3, 0, dtype=F64, requires_grad=True)
    got = aggregate_loss(empty, torch.zeros(3, 0, dtype=torch.bool), mode)
    assert float(got) == 0.0 and got.requires_grad


@pytest.mark.parametrize("method", ["grpo", "dr_grpo"])
def test_a_batch_of_responses_without_tokens_gives_an_attached_zero(method):
    log_prob = torch.zeros(2, 0, requires_grad=True)
    batch = PolicyBatch(log_prob=log_prob, old_log_prob=log_prob.detach(), advantages=torch.ones(2),
                        mask=torch.zeros(2, 0, dtype=torch.bool))
    loss = build_objective(method)(batch).loss
    assert float(loss) == 0.0 and loss.requires_grad


@pytest.mark.parametrize("method, kwargs", [
    ("dapo+kl_ref", {"batch_num_tokens": 50, "dp_size": 2}),
    ("grpo+entropy_bonus", {"global_batch_size": 9, "dp_size": 4}),
    ("dr_grpo", {"global_batch_size": 7, "dp_size": 3}),
])
def test_objective_passes_the_global_normalisers_to_every_aggregation(method, kwargs):
    """Data-parallel training (verl's global_batch_info): the policy loss and the regularisers' terms are divided by
    the global token / sequence counts given and multiplied by dp_size."""
    _, batch = full_batch(15)
    objective = build_objective(method)
    out = objective(batch, **kwargs)
    mask = batch.mask.numpy()
    ratio = np.exp(_np(batch.log_prob) - _np(batch.old_log_prob))
    eps_high = 0.28 if method.startswith("dapo") else 0.2
    expected = ref_aggregate(ref_ppo(ratio, _np(batch.advantages), 0.2, eps_high), mask, objective.loss_agg_mode, **kwargs)
    if "kl_ref" in method:
        expected += 1e-3 * ref_aggregate(_ref_kl(_np(batch.log_prob), _np(batch.ref_log_prob), "k3"), mask, "token-mean", **kwargs)
    if "entropy_bonus" in method:
        expected -= 1e-3 * ref_aggregate(_np(batch.entropy), mask, objective.loss_agg_mode, **kwargs)
    assert float(out.loss) == pytest.approx(expected, rel=1e-5)


def test_aggregation_unknown_mode_lists_modes():
    with pytest.raises(ValueError) as info:
        aggregate_loss(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), "token-sum-of-squares")
    for mode in ALL_MODES:
        assert mode in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# 2. the ppo_clip surrogate
# ---------------------------------------------------------------------------------------------------------


def _ppo_case(seed=10):
    batch = make_batch(seed)
    ratio = np.exp(_np(batch.log_prob) - _np(batch.old_log_prob))
    adv, mask = _np(batch.advantages), batch.mask.numpy()
    return batch, ratio, adv, mask


@pytest.mark.parametrize(
    ("method", "eps_low", "eps_high", "c"),
    [("dapo", 0.2, 0.28, None), ("dual_clip", 0.2, 0.2, 3.0)],
)
def test_ppo_clip_loss_gradient_and_metrics(method, eps_low, eps_high, c):
    batch, ratio, adv, mask = _ppo_case()
    objective = build_objective(method, loss_agg_mode="token-mean")
    surrogate = objective.surrogate
    assert (surrogate.clip_ratio_low, surrogate.clip_ratio_high, surrogate.clip_ratio_c) == (eps_low, eps_high, c)
    out = objective(batch)

    per_token = ref_ppo(ratio, adv, eps_low, eps_high, c)
    n = mask.sum()
    assert float(out.loss) == pytest.approx(per_token[mask].sum() / n, rel=1e-12)

    # which tokens have zero gradient, by hand
    low = (adv < 0) & (ratio < 1 - eps_low)
    high = (adv > 0) & (ratio > 1 + eps_high)
    dual = (adv < 0) & (ratio > c) if c is not None else np.zeros_like(mask)
    clipped = (low | high | dual) & mask
    assert low[mask].any() and high[mask].any() and (~clipped[mask]).any()

    grad = _np(grad_of(out.loss, batch.log_prob))
    expected = np.where(mask & ~clipped, -adv * ratio / n, 0.0)
    np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-15)
    assert (grad[clipped] == 0).all()

    m = out.metrics
    assert m["clip/ppo_low_frac"] == pytest.approx((low & mask).sum() / n, abs=1e-12)
    assert m["clip/ppo_high_frac"] == pytest.approx((high & mask).sum() / n, abs=1e-12)
    assert m["clip/ppo_frac"] == pytest.approx(clipped.sum() / n, abs=1e-12)


def test_dual_clip_caps_huge_ratio_with_negative_advantage():
    # token 0: A < 0, r = e^5 ~ 148 -> dual-clip caps the loss at -3 A; token 1: A > 0, r = e^5 -> clipped at 1.2
    # token 2: A < 0, r = 2 (< c) -> loss -A r, not capped
    log_prob = torch.tensor([[5.0, 5.0, math.log(2.0)]], dtype=F64).requires_grad_()
    old = torch.zeros(1, 3, dtype=F64)
    adv = torch.tensor([[-1.5, 2.0, -1.0]], dtype=F64)
    batch = PolicyBatch(log_prob=log_prob, old_log_prob=old, advantages=adv, mask=torch.ones(1, 3, dtype=torch.bool))

    surrogate_out = build_objective("dual_clip").surrogate(batch, adv, {})
    np.testing.assert_allclose(_np(surrogate_out.per_token_loss), [[3 * 1.5, -2.0 * 1.2, 2.0]], rtol=1e-12)
    # token 0's dual bound and token 1's clip range are active: both are clipped (no gradient), token 2 is not
    assert surrogate_out.clipped.tolist() == [[True, True, False]]

    plain = build_objective("grpo").surrogate(batch, adv, {})
    assert float(plain.per_token_loss[0, 0]) == pytest.approx(1.5 * math.exp(5.0), rel=1e-12)

    out = build_objective("dual_clip")(batch)
    grad = _np(grad_of(out.loss, log_prob))
    np.testing.assert_allclose(grad, [[0.0, 0.0, 1.0 * 2.0 / 3]], rtol=1e-12, atol=1e-15)
    assert out.metrics["clip/dual_frac"] == pytest.approx(1 / 3)
    assert out.metrics["clip/ppo_frac"] == pytest.approx(2 / 3)


def test_ppo_clip_metrics_leave_out_tokens_with_zero_advantage():
    """A token with A = 0 (every group's reward equal, a common case in GRPO) has loss 0 and no gradient whatever its
    ratio, and is clipped on neither side nor by the dual bound: only the A > 0 token above 1 + eps_high and the A < 0
    tokens below 1 - eps_low or above c count in the clip fractions."""
    ratios = [2.0, 0.5, 5.0, 2.0, 0.5, 5.0, 1.1]
    adv = torch.tensor([[0.0, 0.0, 0.0, 1.0, -1.0, -2.0, 0.5]], dtype=F64)
    log_prob = torch.tensor([[math.log(r) for r in ratios]], dtype=F64, requires_grad=True)
    batch = PolicyBatch(log_prob=log_prob, old_log_prob=torch.zeros(1, 7, dtype=F64), advantages=adv,
                        mask=torch.ones(1, 7, dtype=torch.bool))
    out = build_objective("dual_clip", loss_agg_mode="token-mean")(batch)
    per_token = ref_ppo(np.array(ratios), _np(adv)[0], 0.2, 0.2, 3.0)
    np.testing.assert_allclose(per_token, [0, 0, 0, -1.2, 0.8, 6.0, -0.55], rtol=1e-12, atol=1e-15)
    assert float(out.loss) == pytest.approx(per_token.sum() / 7, rel=1e-12)
    np.testing.assert_allclose(_np(grad_of(out.loss, log_prob)), [[0, 0, 0, 0, 0, 0, -0.5 * 1.1 / 7]], rtol=1e-12, atol=1e-15)
    assert out.metrics["clip/ppo_high_frac"] == pytest.approx(1 / 7)
    assert out.metrics["clip/ppo_low_frac"] == pytest.approx(1 / 7)
    assert out.metrics["clip/dual_frac"] == pytest.approx(1 / 7)
    assert out.metrics["clip/ppo_frac"] == pytest.approx(3 / 7)


@pytest.mark.parametrize("method", [{"surrogate": "unclipped"}, "grpo"], ids=["unclipped", "grpo"])
def test_log_ratio_is_clamped_at_twenty_before_the_exponential(method):
    """As verl does, log r is clamped to [-20, 20] before exp: a float32 token with log r = 100 and A < 0 (which PPO
    does not clip) costs -A e^20, finite, and its gradient is 0 (the clamp is active), instead of an infinite loss."""
    log_prob = torch.tensor([[0.0, -1.0]], requires_grad=True)
    batch = PolicyBatch(log_prob=log_prob, old_log_prob=torch.tensor([[-100.0, -1.0]]),
                        advantages=torch.tensor([[-1.0, 1.0]]), mask=torch.ones(1, 2, dtype=torch.bool))
    out = build_objective(method, loss_agg_mode="token-mean")(batch)
    assert float(out.loss) == pytest.approx((math.exp(20.0) - 1.0) / 2, rel=1e-6)
    grad = grad_of(out.loss, log_prob)
    assert torch.isfinite(grad).all() and float(grad[0, 0]) == 0.0


@pytest.mark.parametrize("c", [1.0, 0.5, -3.0])
def test_dual_clip_bound_must_exceed_one(c):
    with pytest.raises(ValueError, match="clip_ratio_c"):
        build_objective("dual_clip", clip_ratio_c=c)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        build_objective("grpo", clip_ratio_c=c)


# ---------------------------------------------------------------------------------------------------------
# 3. surrogates of the named methods
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "mode", "eps_high"),
    [("grpo", "seq-mean-token-mean", 0.2), ("dapo", "token-mean", 0.28), ("dr_grpo", "seq-mean-token-sum-norm", 0.2)],
)
def test_method_is_ppo_clip_with_its_aggregation(method, mode, eps_high):
    batch = make_batch(20)
    objective = build_objective(method)
    assert objective.loss_agg_mode == mode
    out = objective(batch)
    ratio = np.exp(_np(batch.log_prob) - _np(batch.old_log_prob))
    per_token = ref_ppo(ratio, _np(batch.advantages), 0.2, eps_high)
    expected = ref_aggregate(per_token, batch.mask.numpy(), mode)
    assert float(out.loss) == pytest.approx(expected, rel=1e-12)
    # Dr. GRPO with a constant normaliser (the maximum generation length)
    if method == "dr_grpo":
        out = build_objective("dr_grpo", loss_scale_factor=4096)(batch)
        expected = ref_aggregate(per_token, batch.mask.numpy(), mode, loss_scale_factor=4096)
        assert float(out.loss) == pytest.approx(expected, rel=1e-12)


def _gspo_batch():
    """Per-sequence advantages; rows 0, 2, 4 have tiny log-ratios (inside 3e-4 / 4e-4), rows 1, 5 are shifted out."""
    g = _gen(30)
    b = len(LENGTHS)
    old = -2.0 * torch.rand(b, T, generator=g, dtype=F64)
    noise = 1e-5 * torch.randn(b, T, generator=g, dtype=F64)
    shift = torch.tensor([0.0, 0.01, 0.0, 0.0, 0.0, -0.02], dtype=F64).unsqueeze(1)
    log_prob = (old + noise + shift).requires_grad_()
    adv = torch.tensor([1.0, 0.7, -0.5, 2.0, -1.2, -0.9], dtype=F64)
    return PolicyBatch(log_prob=log_prob, old_log_prob=old, advantages=adv, mask=_ragged_mask())


def test_gspo_sequence_ratio_clip_and_token_gradient():
    batch = _gspo_batch()
    objective = build_objective("gspo")
    assert (objective.surrogate.clip_ratio_low, objective.surrogate.clip_ratio_high) == (3e-4, 4e-4)
    assert objective.loss_agg_mode == "seq-mean-token-mean"

    mask = batch.mask.numpy()
    log_r = _np(batch.log_prob) - _np(batch.old_log_prob)
    adv_seq = _np(batch.advantages)[:, 0]
    lengths = mask.sum(1)
    s = np.array([np.exp(log_r[i][mask[i]].mean()) if lengths[i] else 1.0 for i in range(len(lengths))])
    seq_loss = np.maximum(-adv_seq * s, -adv_seq * np.clip(s, 1 - 3e-4, 1 + 4e-4))
    clipped_seq = (-adv_seq * np.clip(s, 1 - 3e-4, 1 + 4e-4)) > (-adv_seq * s)
    valid = lengths > 0
    assert clipped_seq[valid].any() and (~clipped_seq[valid]).any()

    # the token ratio has the value of the sequence ratio on every valid token
    surrogate_out = objective.surrogate(batch, batch.advantages, {})
    ratio = _np(surrogate_out.ratio)
    for i in np.flatnonzero(valid):
        np.testing.assert_allclose(ratio[i][mask[i]], s[i], rtol=1e-12)

    out = objective(batch)
    n_seq = valid.sum()
    assert float(out.loss) == pytest.approx(seq_loss[valid].sum() / n_seq, rel=1e-12)

    # d loss / d log pi_t = -A_i s_i / (n_seq |y_i|) on unclipped sequences, 0 on clipped ones and on padding
    grad = _np(grad_of(out.loss, batch.log_prob))
    expected = np.zeros_like(grad)
    for i in np.flatnonzero(valid & ~clipped_seq):
        expected[i][mask[i]] = -adv_seq[i] * s[i] / (n_seq * lengths[i])
    np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-15)
    clipped_tokens = (clipped_seq[:, None] & mask).sum() / mask.sum()
    assert out.metrics["clip/gspo_frac"] == pytest.approx(clipped_tokens)


def test_gspo_log_sequence_ratio_is_clamped_above_at_ten_only():
    """As verl does, log s is clamped at 10 from above only: a sequence with log s = 12 and A < 0 costs -A e^10 with
    no gradient, while one with log s = -12 and A > 0 keeps its tiny ratio e^-12 and its token-wise gradient
    -A s / (n_seq |y|). The old/new KL metric is the mean of the unclamped token log-ratios."""
    lengths = (3, 2, 0)
    mask = _ragged_mask(lengths, 4)
    old = -torch.rand(3, 4, generator=_gen(32), dtype=F64)
    shift = torch.tensor([12.0, -12.0, 0.0], dtype=F64).unsqueeze(1)
    log_prob = (old + shift).requires_grad_()
    adv = torch.tensor([-1.5, 2.0, 1.0], dtype=F64)
    batch = PolicyBatch(log_prob=log_prob, old_log_prob=old, advantages=adv, mask=mask)
    objective = build_objective("gspo")
    out = objective(batch)
    expected_loss = (1.5 * math.exp(10.0) - 2.0 * math.exp(-12.0)) / 2
    assert float(out.loss) == pytest.approx(expected_loss, rel=1e-10)
    expected_grad = np.zeros((3, 4))
    expected_grad[1, :2] = -2.0 * math.exp(-12.0) / (2 * 2)
    np.testing.assert_allclose(_np(grad_of(out.loss, log_prob)), expected_grad, rtol=1e-9, atol=1e-30)
    assert out.metrics["kl/old_new"] == pytest.approx(-(12.0 * 3 - 12.0 * 2) / 5, rel=1e-9)
    assert out.metrics["ratio/max"] == pytest.approx(math.exp(10.0), rel=1e-10)
    assert out.metrics["clip/gspo_frac"] == 0.0


@pytest.mark.parametrize("overrides", [{"method": "dual_clip"}, {"method": "gspo"}, {"method": "dapo"}], ids=str)
def test_surrogates_never_mark_padding_as_clipped(overrides):
    """SurrogateOutput.clipped names valid tokens only (a custom selector reads it): padding holding a large
    advantage of the clipped sequence's sign is not reported as clipped."""
    batch = _gspo_batch() if overrides["method"] == "gspo" else make_batch(33, spread=1.0, per_seq_adv=True)
    surrogate_out = build_objective(overrides["method"]).surrogate(batch, batch.advantages, {})
    assert surrogate_out.clipped[batch.mask].any()
    assert not surrogate_out.clipped[~batch.mask].any()


@pytest.mark.parametrize("method", ["gspo", "dapo", "grpo"])
def test_half_precision_log_probs_are_computed_in_float32(method):
    """GSPO's clip range (3e-4) is finer than bfloat16's resolution near r = 1 (2^-7): bfloat16 log-probs give the
    loss, gradient and clip fraction of the same values in float32, and the gradient reaches the bfloat16 leaf."""
    g = _gen(31)
    old = (-0.3 * torch.rand(8, 16, generator=g)).to(torch.bfloat16)
    log_prob = (old.float() + 2e-3 * torch.randn(8, 16, generator=g)).to(torch.bfloat16).requires_grad_()
    adv = torch.randn(8, generator=g)
    mask = _ragged_mask((16, 12, 16, 3, 9, 16, 1, 14), 16)
    half = build_objective(method)(PolicyBatch(log_prob=log_prob, old_log_prob=old, advantages=adv, mask=mask))
    wide_leaf = log_prob.detach().float().requires_grad_()
    wide = build_objective(method)(PolicyBatch(log_prob=wide_leaf, old_log_prob=old.float(), advantages=adv, mask=mask))
    assert float(half.loss) == pytest.approx(float(wide.loss), rel=1e-6, abs=1e-9)
    grad = grad_of(half.loss, log_prob)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.float(), grad_of(wide.loss, wide_leaf).to(torch.bfloat16).float())
    clip_key = next(key for key in wide.metrics if key.startswith("clip/") and key.endswith("frac"))
    assert half.metrics[clip_key] == pytest.approx(wide.metrics[clip_key])
    if method == "gspo":
        assert 0 < wide.metrics[clip_key] < 1  # the case that bfloat16 arithmetic got wrong: some sequences clipped


def test_cispo_loss_and_gradient_never_clipped_to_zero():
    batch = make_batch(40, spread=0.6)
    objective = build_objective("cispo")
    eps_low, eps_high = objective.surrogate.clip_ratio_low, objective.surrogate.clip_ratio_high
    assert objective.loss_agg_mode == "token-mean"
    out = objective(batch)

    mask = batch.mask.numpy()
    log_prob, adv = _np(batch.log_prob), _np(batch.advantages)
    ratio = np.exp(log_prob - _np(batch.old_log_prob))
    weight = np.clip(ratio, 1 - eps_low, 1 + eps_high)
    assert (ratio[mask] > 1 + eps_high).any()  # some IS weights are clipped ...
    n = mask.sum()
    assert float(out.loss) == pytest.approx((-weight * adv * log_prob)[mask].sum() / n, rel=1e-12)

    grad = _np(grad_of(out.loss, batch.log_prob))
    np.testing.assert_allclose(grad, np.where(mask, -weight * adv / n, 0.0), rtol=1e-10, atol=1e-15)
    assert (grad[mask] != 0).all()  # ... yet no token loses its gradient
    # a tighter lower bound clips the weight of low-ratio tokens too, still without zeroing their gradient
    out = build_objective("cispo", clip_ratio_low=0.2)(batch)
    weight = np.clip(ratio, 0.8, 1 + eps_high)
    np.testing.assert_allclose(_np(grad_of(out.loss, batch.log_prob)), np.where(mask, -weight * adv / n, 0.0), rtol=1e-10)


def test_kl_cov_unclipped_surrogate_and_top_k_penalty():
    batch = make_batch(50, spread=0.8)
    objective = build_objective("kl_cov", kl_cov_ratio=0.1)
    assert objective.surrogate.name == "unclipped"
    surrogate_out = objective.surrogate(batch, batch.advantages, {})
    mask = batch.mask.numpy()
    log_prob, old, adv = _np(batch.log_prob), _np(batch.old_log_prob), _np(batch.advantages)
    ratio = np.exp(log_prob - old)
    np.testing.assert_allclose(_np(surrogate_out.per_token_loss)[mask], (-adv * ratio)[mask], rtol=1e-12)
    assert not surrogate_out.clipped.any()

    # top max(1, floor(k N)) tokens by C_t = (log pi - mean log pi)(A - mean A) get + beta |log r|
    n = mask.sum()
    cov = (log_prob - log_prob[mask].mean()) * (adv - adv[mask].mean())
    k = max(1, int(0.1 * n))
    top = np.argsort(-np.where(mask, cov, -np.inf), axis=None)[:k]
    penalty = np.zeros_like(log_prob)
    penalty.flat[top] = np.abs(log_prob - old).flat[top]
    out = objective(batch)
    assert float(out.loss) == pytest.approx(((-adv * ratio + penalty)[mask]).sum() / n, rel=1e-10)
    assert out.metrics["select/kl_cov_frac"] == pytest.approx(k / n)

    # strictly on-policy the penalty is zero: the loss is the unclipped one and a warning says so
    on_policy = PolicyBatch(batch.log_prob, batch.log_prob.detach(), batch.advantages, batch.mask)
    on_policy_objective = build_objective("kl_cov")
    on_policy_objective(on_policy)
    on_policy_objective(on_policy)
    with pytest.warns(UserWarning, match="on-policy"):
        out = on_policy_objective(on_policy)
    assert float(out.loss) == pytest.approx(float((-adv)[mask].sum() / n), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# 4. regularisers
# ---------------------------------------------------------------------------------------------------------


def _logit_batch(seed: int, B: int = 3, width: int = 6, V: int = 9):
    g = _gen(seed)
    logits = (1.5 * torch.randn(B, width, V, generator=g, dtype=F64)).requires_grad_()
    targets = torch.randint(V, (B, width), generator=g)
    mask = _ragged_mask((6, 3, 1), width)
    adv = torch.randn(B, width, generator=g, dtype=F64)
    return logits, targets, mask, adv


def test_entropy_bonus_value_and_gradient_through_entropy():
    logits, targets, mask, adv = _logit_batch(60)
    coeff = 0.05
    stats = token_stats(logits, targets, need=("logprob", "entropy"))
    old = stats.logprob.detach()
    batch = PolicyBatch(log_prob=stats.logprob, old_log_prob=old, advantages=adv.float(), mask=mask, entropy=stats.entropy)
    objective = build_objective("entropy_bonus", entropy_coeff=coeff)
    out = objective(batch)
    grad = grad_of(out.loss, logits)

    # plain-torch reference from the same logits, in float64
    z = logits.detach().clone().requires_grad_()
    log_p = torch.log_softmax(z, dim=-1)
    lp = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    ratio = torch.exp(lp - old.to(F64))
    ppo = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    m = mask.to(F64)
    reference = (ppo * m).sum() / m.sum() - coeff * (entropy * m).sum() / m.sum()
    reference.backward()
    assert float(out.loss) == pytest.approx(float(reference), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad.to(F64), z.grad, rtol=1e-4, atol=1e-6)
    assert out.metrics["reg/entropy_bonus"] == pytest.approx(coeff * float((entropy * m).sum() / m.sum()), rel=1e-5)

    # the bonus's own gradient is -c d agg(H) / d logits: non-zero, and it is the whole difference
    no_bonus = build_objective("entropy_bonus", entropy_coeff=0.0)(batch)
    diff = grad - grad_of(no_bonus.loss, logits)
    z2 = logits.detach().clone().requires_grad_()
    log_p2 = torch.log_softmax(z2, dim=-1)
    (-coeff * ((-(log_p2.exp() * log_p2).sum(-1)) * m).sum() / m.sum()).backward()
    torch.testing.assert_close(diff.to(F64), z2.grad, rtol=1e-4, atol=1e-7)
    assert diff.abs().max() > 1e-4


@pytest.mark.parametrize("method", ["entropy_bonus", "adaptive_entropy"])
def test_entropy_regularisers_reject_detached_entropy(method):
    batch = make_batch(61)
    batch.entropy = torch.rand(batch.log_prob.shape, generator=_gen(0), dtype=F64)  # no gradient
    with pytest.raises(ValueError, match="entropy"):
        build_objective(method)(batch)


def test_adaptive_entropy_controller_moves_once_per_step():
    """Mini-batches, epochs and micro-batches of one step share PolicyBatch.step: the coefficient moves once per step,
    by the token-weighted mean entropy of all of the step's batches, and every batch of a step gets the same bonus."""
    delta, target = 5e-4, 0.2
    objective = build_objective("adaptive_entropy", delta=delta, entropy_coeff=2e-3)
    # entropy level of each batch of each step; in the first step the first batch decides the bonus for all three
    steps = [[0.5, 0.1, 0.1], [0.1, 0.5, 0.05], [0.5, 0.5]]
    c, verdict = 2e-3, None
    for step, levels in enumerate(steps):
        entropy_sum = tokens = 0.0
        for index, level in enumerate(levels):
            batch, entropy = _entropy_batch(level, seed=200 + 10 * step + index)
            batch.step = step
            measured = float(entropy.detach()[batch.mask].mean())
            if verdict is None and index == 0:
                first_verdict = measured < target
            below = verdict if verdict is not None else first_verdict
            out = objective(batch)
            assert out.metrics["reg/adaptive_entropy_controller_coeff"] == pytest.approx(c, abs=1e-15)
            assert out.metrics["reg/adaptive_entropy_coeff"] == pytest.approx(c if below else 0.0, abs=1e-15)
            entropy_sum += measured * int(batch.mask.sum())
            tokens += int(batch.mask.sum())
        verdict = entropy_sum / tokens < target
        c = min(5e-3, max(0.0, c + delta if verdict else c - delta))
    # each step's token-weighted mean entropy was above the target (0.23, 0.22, 0.5): the coefficient went down thrice
    assert verdict is False and c == pytest.approx(2e-3 - 3 * delta)
    objective.end_step()
    assert objective.regularizers[0].coefficient == pytest.approx(c)
    # state taken mid-step carries the step's measurement so far
    batch, _ = _entropy_batch(0.1, seed=300)
    batch.step = 3
    objective(batch)
    twin = build_objective("adaptive_entropy", delta=delta, entropy_coeff=2e-3)
    twin.load_state_dict(objective.state_dict())
    for model in (objective, twin):
        follow, _ = _entropy_batch(0.1, seed=301)
        follow.step = 4
        assert model(follow).metrics["reg/adaptive_entropy_controller_coeff"] == pytest.approx(c + delta)


def test_adaptive_entropy_shared_over_processes_decides_and_moves_by_every_process_s_tokens():
    """share_measurement with a total over two processes (here the other one's numbers added by hand): the first
    step is decided by both processes' first micro-batches, and the step closes with both processes' entropy, so the
    coefficient moves as for the whole batch, not as this process's tokens alone would move it."""
    delta, target = 5e-4, 0.2
    objective = build_objective("adaptive_entropy", delta=delta, entropy_coeff=2e-3)
    controller = objective.regularizers[0]
    other = {"held": (0.0, 0.0), "first": (0.6 * 30, 30.0)}  # the other process: 30 tokens at 0.6 in its first batch

    def total(local):
        assert local.dtype == torch.float64 and local.shape == (4,)
        return local + torch.tensor([*other["held"], *other["first"]], dtype=torch.float64)

    batch, entropy = _entropy_batch(0.1, seed=400)  # this process: below the target
    batch.step = 0
    tokens = int(batch.mask.sum())
    mine = float(entropy.detach()[batch.mask].double().sum())
    controller.share_measurement(batch, total)
    out = objective(batch)
    both = (mine + 0.6 * 30) / (tokens + 30)
    assert (both < target) is False and out.metrics["reg/adaptive_entropy_coeff"] == 0.0  # alone it would be on
    # the next step's first micro-batch closes step 0 with both processes' sums: 0.6 on 30 tokens again, above
    other.update(held=(0.6 * 30, 30.0), first=(0.0, 0.0))
    follow, _ = _entropy_batch(0.1, seed=401)
    follow.step = 1
    controller.share_measurement(follow, total)
    assert controller.coefficient == pytest.approx(2e-3 - delta)  # this process alone measured 0.1: it would rise
    assert objective(follow).metrics["reg/adaptive_entropy_coeff"] == 0.0


def test_adaptive_entropy_s_first_step_tests_the_whole_batch_when_given_it():
    """The first step's verdict is the step's own: given PolicyBatch.population (the whole step batch, as a trainer
    splitting the step passes it), its token-mean entropy decides, not the first piece's. Here the first piece sits
    at 0.1 (below the target 0.2) and the whole batch at 0.3: the bonus stays off for every piece. The objective reads
    the population only until a step has been measured."""
    objective = build_objective("adaptive_entropy", entropy_coeff=2e-3)
    assert objective.takes_step_statistics
    pieces = [_entropy_batch(level, seed=600 + index)[0] for index, level in enumerate((0.1, 0.5))]
    whole = PolicyBatch(log_prob=torch.cat([p.log_prob.detach() for p in pieces]),
                        old_log_prob=torch.cat([p.old_log_prob for p in pieces]),
                        advantages=torch.cat([p.advantages for p in pieces]), mask=torch.cat([p.mask for p in pieces]),
                        entropy=torch.cat([p.entropy.detach() for p in pieces]))
    whole_entropy = float(whole.entropy[whole.mask].mean())
    assert 0.2 < whole_entropy < 0.5
    start = 0
    for piece in pieces:
        rows = torch.arange(start, start + len(piece.mask))
        start += len(piece.mask)
        piece.step, piece.population, piece.rows = 0, whole, rows
        assert objective(piece).metrics["reg/adaptive_entropy_coeff"] == 0.0
    alone = build_objective("adaptive_entropy", entropy_coeff=2e-3)  # without the population: the first piece decides
    first, _ = _entropy_batch(0.1, seed=600)
    first.step = 0
    assert alone(first).metrics["reg/adaptive_entropy_coeff"] == pytest.approx(2e-3)
    objective.end_step()
    assert not objective.takes_step_statistics


def test_adaptive_entropy_s_first_verdict_is_the_whole_batch_s_masked_mean_strictly_below_the_target():
    """1[e < target] over the whole batch's valid tokens only: its padding (entropy 0, or 10) takes no part, and a
    batch whose mean is exactly the target is not below it (bonus off), while one just under it is (bonus on). The
    piece's own entropy (0.1, well below) does not decide once the whole batch is given."""
    target, coeff = 0.5, 2e-3
    for valid_level, padding, expected in ((0.5, 0.0, 0.0), (0.5 - 1e-6, 10.0, coeff)):
        objective = build_objective("adaptive_entropy", target_entropy=target, entropy_coeff=coeff)
        piece, _ = _entropy_batch(0.1, seed=650)
        assert not piece.mask.all()  # padding to leave out
        whole = PolicyBatch(log_prob=piece.log_prob.detach(), old_log_prob=piece.old_log_prob,
                            advantages=piece.advantages, mask=piece.mask,
                            entropy=torch.where(piece.mask, torch.full_like(piece.entropy.detach(), valid_level),
                                                torch.full_like(piece.entropy.detach(), padding)))
        piece.step, piece.population, piece.rows = 0, whole, torch.arange(len(piece.mask))
        assert objective(piece).metrics["reg/adaptive_entropy_coeff"] == pytest.approx(expected, abs=0.0)


def test_adaptive_entropy_end_step_closes_the_step_at_once():
    """end_step() (what the trainer calls after a step's updates) moves the coefficient as the next step's first batch
    would, and reports the step's entropy; a second call does nothing."""
    explicit = build_objective("adaptive_entropy", delta=1e-3)
    lazy = build_objective("adaptive_entropy", delta=1e-3)
    for step in range(3):
        batch, entropy = _entropy_batch(0.1, seed=400 + step)
        batch.step = step
        lazy(batch)
        explicit(batch)
        closed = explicit.end_step()
        assert closed["reg/adaptive_entropy_step_entropy"] == pytest.approx(float(entropy.detach()[batch.mask].mean()))
        assert closed["reg/adaptive_entropy_next_coeff"] == pytest.approx(1e-3 * (step + 1))
        assert explicit.end_step() == {}
    follow, _ = _entropy_batch(0.1, seed=500)
    follow.step = 3
    assert lazy(follow).metrics == explicit(follow).metrics


def test_adaptive_entropy_measures_the_token_mean_of_the_whole_step():
    """e_k is the token-mean entropy of all of step k's valid tokens (arXiv 2505.22312): not the mean of the batches'
    means, nor the loss aggregation's mean over sequences. Here 4 tokens at 0.1 and 1 at 0.5 in two rows, then a
    batch of 1 token at 0.5: e = 1.4 / 6, above the target 0.2 (the means of means would be 0.34 and 0.33)."""
    objective = build_objective("adaptive_entropy", loss_agg_mode="seq-mean-token-mean", entropy_coeff=2e-3, delta=1e-3)
    first = PolicyBatch(log_prob=torch.zeros(2, 4, dtype=F64, requires_grad=True), old_log_prob=torch.zeros(2, 4, dtype=F64),
                        advantages=torch.ones(2, 4, dtype=F64), mask=_ragged_mask((4, 1), 4),
                        entropy=torch.tensor([[0.1] * 4, [0.5, 9.0, 9.0, 9.0]], dtype=F64, requires_grad=True), step=0)
    second = PolicyBatch(log_prob=torch.zeros(1, 4, dtype=F64, requires_grad=True), old_log_prob=torch.zeros(1, 4, dtype=F64),
                         advantages=torch.ones(1, 4, dtype=F64), mask=_ragged_mask((1,), 4),
                         entropy=torch.tensor([[0.5, 9.0, 9.0, 9.0]], dtype=F64, requires_grad=True), step=0)
    objective(first)
    objective(second)
    closed = objective.end_step()
    assert closed["reg/adaptive_entropy_step_entropy"] == pytest.approx(1.4 / 6, rel=1e-12)
    assert closed["reg/adaptive_entropy_next_coeff"] == pytest.approx(1e-3)


def _entropy_batch(level: float, seed: int) -> tuple[PolicyBatch, torch.Tensor]:
    batch = make_batch(seed)
    g = _gen(seed + 1000)
    entropy = (level * (1.0 + 0.1 * (torch.rand(batch.log_prob.shape, generator=g, dtype=F64) - 0.5))).requires_grad_()
    batch.entropy = entropy
    return batch, entropy


def test_adaptive_entropy_controller_sequence_and_state_round_trip():
    """Batches without a step are each a step: the bonus of a call is on when the previous call's entropy was below
    the target (the first call tests its own), and the coefficient moves by delta after each call."""
    delta, c_max, target = 1e-4, 2.5e-4, 0.2
    objective = build_objective("adaptive_entropy", max_coeff=c_max)
    part = objective.regularizers[0]
    assert (part.target_entropy, part.delta, part.entropy_coeff, part.min_coeff) == (target, delta, 0.0, 0.0)

    levels = [0.1, 0.1, 0.1, 0.1, 0.5, 0.5, 0.5, 0.5, 0.05, 0.05]
    c, verdict = 0.0, None  # the reference controller (Skywork-OR1)
    for step, level in enumerate(levels):
        batch, entropy = _entropy_batch(level, seed=70 + step)
        mask = batch.mask
        measured = float(entropy.detach()[mask].mean())
        below = verdict if verdict is not None else measured < target
        active = c if below else 0.0

        out = objective(batch)
        assert out.metrics["reg/adaptive_entropy_coeff"] == pytest.approx(active, abs=1e-15)
        assert out.metrics["reg/adaptive_entropy_controller_coeff"] == pytest.approx(c, abs=1e-15)
        assert float(out.loss - out.policy_loss) == pytest.approx(-active * measured, abs=1e-15)
        # the gradient wrt H is -active / N on valid tokens (token-mean)
        np.testing.assert_allclose(
            _np(grad_of(out.loss, entropy)), np.where(mask.numpy(), -active / int(mask.sum()), 0.0), atol=1e-18
        )
        verdict = measured < target  # the step ends at the next call
        c = min(c_max, max(0.0, c + delta if verdict else c - delta))
        if step == 3:
            assert c == pytest.approx(c_max)  # clipped at the top
        if step == 8:
            assert active == 0.0  # the entropy is low again, but the previous step's was above the target

    state = objective.state_dict()
    restored = build_objective("adaptive_entropy", max_coeff=c_max)
    restored.load_state_dict(state)
    batch, _ = _entropy_batch(0.1, seed=99)
    a, b = objective(batch), restored(batch)
    assert float(a.loss) == float(b.loss) and a.metrics == b.metrics
    assert a.metrics["reg/adaptive_entropy_controller_coeff"] == pytest.approx(c)

    fresh = build_objective("adaptive_entropy")
    assert fresh.regularizers[0].coefficient == 0.0  # the state did not leak into a new objective
    with pytest.raises(ValueError):
        fresh.load_state_dict({"regularizer/no_such_part": {"coefficient": 1.0}})



def test_adaptive_entropy_restored_state_keeps_the_verdict_of_the_last_step():
    """The bonus of a step follows the previous step's entropy (arXiv 2505.22312), and that verdict is state: a step
    above the target turns the bonus off for the next step, even on an objective restored from a checkpoint whose
    next batch has low entropy (it must not judge by that batch, as a first step would)."""
    objective = build_objective("adaptive_entropy", entropy_coeff=2e-3, delta=1e-3)
    high, _ = _entropy_batch(0.5, seed=600)
    high.step = 0
    objective(high)
    objective.end_step()
    restored = build_objective("adaptive_entropy", entropy_coeff=2e-3, delta=1e-3)
    restored.load_state_dict(objective.state_dict())
    for model in (objective, restored):
        low, entropy = _entropy_batch(0.05, seed=601)
        low.step = 1
        out = model(low)
        assert out.metrics["reg/adaptive_entropy_controller_coeff"] == pytest.approx(1e-3)
        assert out.metrics["reg/adaptive_entropy_below_target"] == 0.0
        assert out.metrics["reg/adaptive_entropy_coeff"] == 0.0
        assert float(out.loss) == float(out.policy_loss)
        grad = grad_of(out.loss, entropy)
        assert not grad.any()


def test_adaptive_entropy_state_is_a_snapshot_independent_of_the_objectives():
    """state_dict() taken mid-step does not change as the objective goes on, and two objectives restored from one state
    measure their own steps: neither counts the other's tokens."""
    objective = build_objective("adaptive_entropy", entropy_coeff=2e-3, delta=1e-3)
    first, entropy = _entropy_batch(0.1, seed=610)
    first.step = 0
    objective(first)
    state = objective.state_dict()
    saved = {key: dict(value, measuring=dict(value["measuring"])) for key, value in state.items()}
    objective(first)  # a second mini-batch of the same step
    assert state == saved
    a = build_objective("adaptive_entropy", entropy_coeff=2e-3, delta=1e-3)
    b = build_objective("adaptive_entropy", entropy_coeff=2e-3, delta=1e-3)
    a.load_state_dict(state)
    b.load_state_dict(state)
    high, _ = _entropy_batch(0.5, seed=611)
    high.step = 0
    a(high)  # a's step now holds 0.1 and 0.5; b's still only the first batch
    assert state == saved
    measured = float(entropy.detach()[first.mask].mean())
    assert b.end_step()["reg/adaptive_entropy_step_entropy"] == pytest.approx(measured, rel=1e-12)
    assert a.end_step()["reg/adaptive_entropy_step_entropy"] > 0.2


@pytest.mark.parametrize("method", ["entropy_bonus", "adaptive_entropy"])
def test_entropy_regularisers_evaluate_without_autograd(method):
    """Under torch.no_grad (evaluation) neither the log-probs nor the entropies carry a gradient: that is no detached
    entropy by mistake, and the loss is the policy loss minus c times the aggregated entropy."""
    logits, targets, mask, adv = _logit_batch(62)
    with torch.no_grad():
        stats = token_stats(logits, targets, need=("logprob", "entropy"))
        batch = PolicyBatch(log_prob=stats.logprob, old_log_prob=stats.logprob, advantages=adv, mask=mask,
                            entropy=stats.entropy)
        out = build_objective(method, entropy_coeff=0.05, target_entropy=100.0, max_coeff=0.05)(batch) \
            if method == "adaptive_entropy" \
            else build_objective(method, entropy_coeff=0.05)(batch)
    m = mask.to(F64)
    expected = float((-adv * m).sum() / m.sum() - 0.05 * (stats.entropy * m).sum() / m.sum())
    assert float(out.loss) == pytest.approx(expected, rel=1e-9)

def _ref_kl(log_prob: np.ndarray, ref: np.ndarray, kind: str) -> np.ndarray:
    if kind == "k1":
        return log_prob - ref
    if kind == "k2":
        return 0.5 * (log_prob - ref) ** 2
    u = ref - log_prob
    return np.exp(u) - u - 1.0


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimators_match_formulas(kind):
    g = _gen(80)
    log_prob = (-2.0 * torch.rand(4, 7, generator=g, dtype=F64)).requires_grad_()
    ref = (log_prob.detach() + 0.8 * torch.randn(4, 7, generator=g, dtype=F64)).requires_grad_()
    got = kl_estimate(log_prob, ref, kind)
    np.testing.assert_allclose(_np(got), _ref_kl(_np(log_prob), _np(ref), kind), rtol=1e-12, atol=1e-14)
    # gradients: k1 -> 1, k2 -> delta, k3 -> 1 - exp(ref - log pi); none reaches ref, even one that carries a gradient
    grad = _np(grad_of(got.sum(), log_prob))
    delta = _np(log_prob) - _np(ref)
    expected = {"k1": np.ones_like(delta), "k2": delta, "k3": 1.0 - np.exp(-delta)}[kind]
    np.testing.assert_allclose(grad, expected, rtol=1e-12, atol=1e-14)
    assert not grad_of(got.sum(), ref).any()


def test_kl_estimates_k2_k3_non_negative_and_unknown_rejected():
    g = _gen(81)
    log_prob = -5.0 * torch.rand(50, 20, generator=g, dtype=F64)
    ref = -5.0 * torch.rand(50, 20, generator=g, dtype=F64)
    for kind in ("k2", "k3"):
        assert (kl_estimate(log_prob, ref, kind) >= 0).all()
    assert (kl_estimate(log_prob, ref, "k1") < 0).any()  # k1 can be negative
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(log_prob, ref, "k4")


def test_k3_is_clamped_to_ten_like_verls_low_var_kl():
    """k3 = exp(-delta) + delta - 1 is clamped to [-10, 10] (verl's low_var_kl): delta = -15 would give ~3.3e6 and
    delta = 30 gives 29; both are 10, with no gradient through the clamp. delta = -1000, whose exp(-delta) overflows
    even float64, is 10 too, with a zero (not NaN) gradient: -delta is clamped to [-20, 20] before the exponential."""
    log_prob = torch.tensor([-15.0, 30.0, 0.5, -1000.0], dtype=F64, requires_grad=True)
    got = kl_estimate(log_prob, torch.zeros(4, dtype=F64), "k3")
    np.testing.assert_allclose(_np(got), [10.0, 10.0, math.exp(-0.5) + 0.5 - 1.0, 10.0], rtol=1e-12)
    np.testing.assert_allclose(_np(grad_of(got.sum(), log_prob)), [0.0, 0.0, 1.0 - math.exp(-0.5), 0.0], rtol=1e-12)


@pytest.mark.parametrize("verl_name, kind", [("kl", "k1"), ("mse", "k2"), ("mse+", "k2"), ("k2+", "k2"),
                                             ("low_var_kl", "k3")])
def test_kl_ref_takes_verl_s_estimator_names(verl_name, kind):
    """A recipe from verl can keep its kl_loss_type: the same estimator, the same loss."""
    batch = make_batch(84)
    batch.ref_log_prob = batch.old_log_prob + 0.5 * torch.randn(batch.log_prob.shape, generator=_gen(85), dtype=F64)
    by_verl_name = build_objective("grpo+kl_ref", kl_loss_type=verl_name)
    assert by_verl_name.regularizers[0].kl_loss_type == kind
    assert float(by_verl_name(batch).loss) == float(build_objective("grpo+kl_ref", kl_loss_type=kind)(batch).loss)


@pytest.mark.parametrize("verl_name", ["low_var_kl+", "k3+", "k1+", "abs", "full"])
def test_kl_ref_names_verl_s_estimators_it_has_no_equivalent_of(verl_name):
    with pytest.raises(ValueError, match=rf"verl's '{re.escape(verl_name)}' has no estimator here.*choose k1, k2 or k3"):
        build_objective("grpo+kl_ref", kl_loss_type=verl_name)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_ref_regulariser(kind):
    assert build_objective("kl_ref").regularizers[0].kl_loss_coef == 1e-3
    assert build_objective("kl_ref").regularizers[0].kl_loss_type == "k3"
    batch = make_batch(82)
    batch.ref_log_prob = batch.old_log_prob + 0.5 * torch.randn(batch.log_prob.shape, generator=_gen(83), dtype=F64)
    beta = 0.2
    out = build_objective("kl_ref", kl_loss_type=kind, kl_loss_coef=beta)(batch)
    mask = batch.mask.numpy()
    kl = _ref_kl(_np(batch.log_prob), _np(batch.ref_log_prob), kind)
    ratio = np.exp(_np(batch.log_prob) - _np(batch.old_log_prob))
    policy = ref_ppo(ratio, _np(batch.advantages), 0.2, 0.2)
    expected = policy[mask].mean() + beta * kl[mask].mean()  # token-mean for both
    assert float(out.loss) == pytest.approx(expected, rel=1e-12)
    assert out.metrics["kl/ref"] == pytest.approx(kl[mask].mean(), rel=1e-12)
    with pytest.raises(ValueError, match="ref_log_prob"):
        build_objective("kl_ref")(make_batch(84))


def test_importance_weighted_kl_ref_is_the_ratio_times_the_estimate_with_its_gradient():
    """DeepSeek-V3.2's unbiased KL (arXiv 2512.02556): ``r * k3`` with ``r = pi / pi_old`` differentiable, so that
    on-policy (``r = 1``) the value is k3's but the gradient gains ``k3 * d log pi``."""
    g = _gen(85)
    batch = make_batch(86)
    batch.ref_log_prob = batch.old_log_prob + 0.5 * torch.randn(batch.log_prob.shape, generator=g, dtype=F64)
    mask = batch.mask.numpy()
    weighted = build_objective("kl_ref", importance_weighted=True, kl_loss_coef=1.0).regularizers[0]
    plain = build_objective("kl_ref", kl_loss_coef=1.0).regularizers[0]
    assert plain.importance_weighted is False

    def kl_term(part, batch):
        metrics = {}
        term = part(batch, batch.advantages, lambda values, m: values[m].sum() / m.sum(), metrics)
        return term.scalar, metrics["kl/ref"]

    value, logged = kl_term(weighted, batch)
    k3 = _ref_kl(_np(batch.log_prob), _np(batch.ref_log_prob), "k3")
    ratio = np.exp(_np(batch.log_prob) - _np(batch.old_log_prob))
    assert float(value) == pytest.approx((ratio * k3)[mask].mean(), rel=1e-10) and logged == pytest.approx(float(value))
    # d/d log pi of r k3 = r (k3 + dk3/dlog pi), dk3/dlog pi = 1 - pi_ref / pi
    expected = ratio * (k3 + 1.0 - np.exp(_np(batch.ref_log_prob) - _np(batch.log_prob))) * mask / mask.sum()
    np.testing.assert_allclose(_np(grad_of(value, batch.log_prob)), expected, rtol=1e-9, atol=1e-14)
    # on-policy: the value is k3's, the gradient is not
    on_policy = PolicyBatch(log_prob=batch.log_prob, old_log_prob=batch.log_prob.detach(), advantages=batch.advantages,
                            mask=batch.mask, ref_log_prob=batch.ref_log_prob)
    weighted_value, _ = kl_term(weighted, on_policy)
    plain_value, _ = kl_term(plain, on_policy)
    assert float(weighted_value) == pytest.approx(float(plain_value), rel=1e-12)
    assert not torch.allclose(grad_of(weighted_value, batch.log_prob), grad_of(plain_value, batch.log_prob))


# ---------------------------------------------------------------------------------------------------------
# 5. configuration and errors
# ---------------------------------------------------------------------------------------------------------


def test_unknown_method_lists_available_names():
    with pytest.raises(ValueError) as info:
        build_objective("grpo+no_such_method")
    message = str(info.value)
    assert "no_such_method" in message
    for name in ("grpo", "dapo", "clip_b", "gspo", "icepop"):
        assert name in message


def test_unknown_override_lists_valid_parameters():
    with pytest.raises(ValueError) as info:
        build_objective("clip_b", clip_ratio=0.2)
    message = str(info.value)
    assert "clip_ratio" in message
    for valid in ("clip_ratio_low", "clip_ratio_high", "mu", "loss_agg_mode"):
        assert valid in message


def test_ambiguous_override_names_both_parts():
    with pytest.raises(ValueError) as info:
        build_objective("entropy_advantage+lopti_reweight", alpha=0.1)
    message = str(info.value)
    assert "alpha" in message and "entropy_advantage" in message and "lopti_reweight" in message
    assert "both have it" in message and "shapers: [{name: entropy_advantage, alpha: ...}]" in message
    # set inside the part, it is not ambiguous
    objective = build_objective({"method": "entropy_advantage+lopti_reweight", "shapers": [{"name": "lopti_reweight", "alpha": 0.1}]})
    assert [(s.name, s.alpha) for s in objective.shapers] == [("entropy_advantage", 0.4), ("lopti_reweight", 0.1)]


@pytest.mark.parametrize(
    ("method", "overrides", "param"),
    [
        ("clip_b", {"mu": -1}, "mu"),
        ("dapo", {"clip_ratio_low": "x"}, "clip_ratio_low"),
        ("kl_ref", {"kl_loss_type": "k7"}, "kl_loss_type"),
        ("forking_tokens", {"top_entropy_quantile": 1.5}, "top_entropy_quantile"),
        ("grpo", {"loss_agg_mode": "token-sum-of-squares"}, "loss_agg_mode"),
        ("dr_grpo", {"loss_scale_factor": 0}, "loss_scale_factor"),
        ("kl_ref", {"kl_loss_coef": -0.1}, "kl_loss_coef"),
        ("entropy_advantage", {"kappa": 1.0}, "kappa"),  # kappa > 1 keeps a negative advantage negative
        ("lopti_reweight", {"alpha": 1.5}, "alpha"),
        ("clip_cov", {"clip_cov_ratio": 0.0}, "clip_cov_ratio"),
        ("clip_cov", {"clip_cov_lb": 2.0, "clip_cov_ub": 2.0}, "clip_cov_lb"),  # an empty band
        ("clip_v", {"max_frac": 2.0}, "max_frac"),
        ("icepop", {"icepop_low": 5.0, "icepop_high": 0.5}, "icepop_low"),
        ("icepop", {"icepop_low": 2.0, "icepop_high": 2.0}, "icepop_low"),  # an empty band
        ("icepop", {"icepop_low": 2.0, "icepop_high": 5.0}, "must hold 1"),  # every on-policy token masked
        ("adaptive_entropy", {"min_coeff": 1e-2, "max_coeff": 1e-3}, "min_coeff"),
        ("w_reinforce", {"lam": -0.1}, "lam"),  # a negative lambda would push correct samples down
        ("dapo", {"clip_ratio_low": -0.1}, "clip_ratio_low"),  # a lower clip bound above 1
        ("dapo", {"clip_ratio_high": -0.1}, "clip_ratio_high"),
        ("gspo", {"clip_ratio_low": -3e-4}, "clip_ratio_low"),
        ("cispo", {"clip_ratio_high": -0.1}, "clip_ratio_high"),
    ],
)
def test_bad_parameter_value_names_the_parameter(method, overrides, param):
    with pytest.raises(ValueError, match=param):
        build_objective(method, **overrides)


def test_malformed_batches_and_normalisers_are_refused():
    """A field of another shape would broadcast silently, integer log-probs or advantages would truncate, float row
    indices cannot index a population, and a non-positive loss_scale_factor would flip or blow up the loss."""
    batch = make_batch(16)
    fields = {"log_prob": batch.log_prob, "old_log_prob": batch.old_log_prob, "advantages": batch.advantages,
              "mask": batch.mask}
    with pytest.raises(ValueError, match=r"PolicyBatch.entropy must be a tensor of shape \(6, 10\)"):
        PolicyBatch(**fields, entropy=torch.ones(6, 1, dtype=F64))
    with pytest.raises(ValueError, match="PolicyBatch.advantages must be floating point"):
        PolicyBatch(**{**fields, "advantages": torch.ones(6, 10, dtype=torch.long)})
    with pytest.raises(ValueError, match="rows must be 6 integer row indices"):
        PolicyBatch(**fields, population=batch, rows=torch.arange(6, dtype=F64))
    for factor in (0.0, -4.0, float("nan"), float("inf"), True, 10**400, Fraction(1, 10**400)):  # inf: a loss of 0
        with pytest.raises(ValueError, match="loss_scale_factor must be a finite number > 0"):
            aggregate_loss(batch.log_prob, batch.mask, "seq-mean-token-sum-norm", loss_scale_factor=factor)


def test_invalid_config_key_rejected():
    with pytest.raises(ValueError, match="selector"):
        build_objective({"method": "grpo", "selector": ["clip_b"]})  # 'selectors' is the key
    with pytest.raises(ValueError):
        build_objective({"method": "grpo", "loss_agg_mode": "mean"})
    with pytest.raises(ValueError):
        build_objective({"method": "dapo", "selectors": [{"name": "clip_b", "no_such_param": 1}]})
    with pytest.raises(ValueError):
        build_objective({"method": "dapo", "selectors": [{"name": "no_such_selector"}]})


def test_dict_config_parts_merge_onto_methods():
    # a part the method lacks is appended, keeping the method's own parts and settings
    objective = build_objective({"method": "forking_tokens", "selectors": [{"name": "clip_b", "mu": 3}]})
    assert [s.name for s in objective.selectors] == ["forking_tokens", "clip_b"]
    assert objective.selectors[1].mu == 3.0
    assert objective.surrogate.clip_ratio_high == 0.28
    # the same part name updates its parameters instead of adding a second copy
    objective = build_objective({"method": "clip_b", "selectors": [{"name": "clip_b", "mu": 3}]})
    assert [(s.name, s.mu) for s in objective.selectors] == [("clip_b", 3.0)]
    # explicit surrogate parameters merge onto the method's surrogate
    objective = build_objective({"method": "dapo", "surrogate": {"name": "ppo_clip", "clip_ratio_c": 3.0}})
    s = objective.surrogate
    assert (s.name, s.clip_ratio_low, s.clip_ratio_high, s.clip_ratio_c) == ("ppo_clip", 0.2, 0.28, 3.0)
    # params and loss_agg_mode in the config
    objective = build_objective({"method": "dapo", "params": {"clip_ratio_high": 0.3}, "loss_agg_mode": "seq-mean-token-sum"})
    assert objective.surrogate.clip_ratio_high == 0.3 and objective.loss_agg_mode == "seq-mean-token-sum"
    # a config with no method: the parts alone
    objective = build_objective(ObjectiveConfig(surrogate="cispo", selectors=["clip_b"]))
    assert [p.name for p in objective.parts] == ["cispo", "clip_b"]
    # an explicit part's parameters override the method's own values for them
    objective = build_objective({"method": "dapo", "surrogate": {"name": "ppo_clip", "clip_ratio_high": 0.3}})
    assert (objective.surrogate.clip_ratio_low, objective.surrogate.clip_ratio_high) == (0.2, 0.3)
    objective = build_objective({"method": "tis", "correction": {"name": "tis", "rollout_is_threshold": 3.0}})
    assert objective.correction.rollout_is_threshold == 3.0
    # with no method, the aggregation is the surrogate's own recommendation (GSPO's sequence mean, arXiv 2507.18071)
    assert build_objective({"surrogate": "gspo"}).loss_agg_mode == "seq-mean-token-mean"
    assert build_objective({"surrogate": "ppo_clip"}).loss_agg_mode == "token-mean"


def test_later_method_does_not_override_first_surrogate():
    """ObjectiveConfig: 'the first [method] gives the surrogate and aggregation, the others add their shapers,
    regularisers, selectors and correction'. DAPO + Clip-Cov's selector must stay DAPO's clip-higher."""
    with pytest.warns(UserWarning, match=r"'clip_cov' after 'dapo' trains with dapo's clip_ratio_low=0.2, "
                                         r"clip_ratio_high=0.28, not its own clip_ratio_low=1.0, clip_ratio_high=1.0"):
        objective = build_objective("dapo+clip_cov")
    assert [p.name for p in objective.parts] == ["ppo_clip", "clip_cov"]
    assert (objective.surrogate.clip_ratio_low, objective.surrogate.clip_ratio_high) == (0.2, 0.28)
    assert objective.loss_agg_mode == "token-mean"
    with pytest.warns(UserWarning, match="'clip_cov' after 'grpo'"):
        objective = build_objective("grpo+clip_cov")
    assert (objective.surrogate.clip_ratio_low, objective.surrogate.clip_ratio_high) == (0.2, 0.2)
    assert objective.loss_agg_mode == "seq-mean-token-mean"
    with pytest.warns(UserWarning, match=r"trains with grpo's surrogate 'ppo_clip', not its own 'unclipped'.*"
                                         r"'surrogate': 'unclipped'"):
        objective = build_objective("grpo+kl_cov")
    assert objective.surrogate.name == "ppo_clip" and objective.loss_agg_mode == "seq-mean-token-mean"


def test_a_later_methods_own_surrogate_is_set_aside_with_a_warning_unless_the_user_chose_one():
    """KL-Cov's recipe is unclipped and Clip-Cov's clips at 1: after another method they run with its surrogate,
    which is said once; the advice given builds that method's own surrogate, and choosing the surrogate's settings
    or the surrogate itself is taken as deliberate. A method whose surrogate is the composition's says nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build_objective("grpo+clip_cov", clip_ratio_low=1.0, clip_ratio_high=1.0).surrogate.clip_ratio_high == 1.0
        assert build_objective({"method": "grpo+kl_cov", "surrogate": "unclipped"}).surrogate.name == "unclipped"
        assert build_objective("dapo+clip_b+forking_tokens").surrogate.clip_ratio_high == 0.28
        # the 80/20 selector is trained with DAPO's clip-higher in its paper, but the selector is the method
        assert build_objective("grpo+forking_tokens").surrogate.clip_ratio_high == 0.2
        assert build_objective("gspo+low_entropy_tokens").surrogate.name == "gspo"
        assert build_objective("dapo+kl_cov", clip_ratio_high=0.3).surrogate.clip_ratio_high == 0.3
    with pytest.warns(UserWarning) as caught:
        build_objective("dapo+kl_cov+clip_cov")
    assert [str(w.message).split(" after")[0] for w in caught] == ["'kl_cov'", "'clip_cov'"]


@pytest.mark.parametrize("first", ["kl_cov", "gspo", "rft"])
def test_the_surrogate_the_set_aside_warning_offers_is_the_later_method_s_own_with_its_parameters(first):
    """After a method with another surrogate, Clip-Cov's own is PPO-clip at 1/1, not PPO-clip's defaults: the
    warning's advice names those parameters, and following it builds Clip-Cov's surrogate, silently."""
    import ast

    with pytest.warns(UserWarning, match=r"'surrogate': \{'name': 'ppo_clip', 'clip_ratio_low': 1.0, "
                                         r"'clip_ratio_high': 1.0\}") as caught:
        build_objective(f"{first}+clip_cov")
    offered = ast.literal_eval(re.search(r"'surrogate': (\{.*?\})\}", str(caught[0].message))[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        followed = build_objective({"method": f"{first}+clip_cov", "surrogate": offered})
    assert followed.describe()["surrogate"] == build_objective("clip_cov").describe()["surrogate"]


def test_selectors_that_together_keep_no_token_are_refused():
    """forking_tokens keeps the top rho_f of the entropies, low_entropy_tokens the bottom 1 - rho_l: with
    rho_f <= rho_l nothing is left to train; with rho_f > rho_l the band between them is."""
    with pytest.raises(ValueError, match="together they keep no token"):
        build_objective("forking_tokens+low_entropy_tokens")
    with pytest.raises(ValueError, match="together they keep no token"):
        build_objective({"method": "forking_tokens+low_entropy_tokens",
                         "selectors": [{"name": "low_entropy_tokens", "top_entropy_quantile": 0.5}]})
    band = build_objective({"method": "forking_tokens+low_entropy_tokens",
                            "selectors": [{"name": "forking_tokens", "top_entropy_quantile": 0.6}]})
    _, batch = full_batch(3)
    out = band(batch)
    kept = 1.0 - out.metrics["select/dropped_frac"]
    assert 0.3 < kept < 0.5  # about the 0.6 - 0.2 band of the valid tokens


@pytest.mark.parametrize("method", ["rft+nsr", "nsr+rft", "grpo+rft"])
def test_selectors_that_keep_opposite_advantage_signs_are_refused(method):
    """rft keeps the tokens with A > 0 and nsr's advantage_sign those with A <= 0: together nothing, whatever the
    advantages (the policy loss 0 at every step). Psr's keep='positive' with rft overlaps (A > 0) and is accepted."""
    if method == "grpo+rft":
        config = {"method": method, "selectors": [{"name": "advantage_sign", "keep": "negative"}]}
    else:
        config = method
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="together they keep no token whatever the advantages"):
            build_objective(config)
        kept = build_objective({"method": "grpo+rft", "selectors": [{"name": "advantage_sign", "keep": "positive"}]})
    assert sorted(part.name for part in kept.selectors) == ["advantage_sign", "rejection_sampling"]


@pytest.mark.parametrize("section,first,second", [
    ("selectors", {"name": "advantage_sign", "keep": "positive"}, {"name": "advantage_sign", "keep": "negative"}),
    ("regularizers", {"name": "entropy_bonus", "entropy_coeff": 0.01}, {"name": "entropy_bonus", "entropy_coeff": 0.02}),
    ("shapers", "entropy_advantage", "entropy_advantage"),
])
def test_a_part_named_twice_in_one_list_is_refused(section, first, second):
    """The lists merge by name: a second entry of one part kept only the last entry's settings, the first lost
    without a word (and two methods that set one part differently are refused)."""
    with pytest.raises(ValueError, match=rf"{section} names '\w+' more than once"):
        build_objective({"method": "dapo", section: [first, second]})
    # a part a method brought is still set by the list, as documented
    objective = build_objective({"method": "psr", "selectors": [{"name": "advantage_sign", "keep": "negative"}]})
    assert [part.params()["keep"] for part in objective.selectors] == ["negative"]


def test_the_selectors_overlap_is_judged_on_the_values_the_parts_accept():
    """"0.5" is a valid top_entropy_quantile for either selector: the check compared the raw values (a TypeError)."""
    objective = build_objective({"method": "grpo", "selectors": [
        {"name": "forking_tokens", "top_entropy_quantile": "0.5"}, {"name": "low_entropy_tokens", "top_entropy_quantile": 0.2}]})
    assert [part.top_entropy_quantile for part in objective.selectors] == [0.5, 0.2]
    with pytest.raises(ValueError, match="together they keep no token"):
        build_objective({"method": "grpo", "selectors": [{"name": "forking_tokens", "top_entropy_quantile": "0.2"},
                                                         {"name": "low_entropy_tokens", "top_entropy_quantile": "0.5"}]})


def test_empty_and_repeated_method_names_are_refused_and_near_misses_get_a_suggestion():
    for method in ("", "dapo+", "dapo++clip_b", ["dapo", " "]):
        with pytest.raises(ValueError, match="has an empty name"):
            build_objective(method)
    with pytest.raises(ValueError, match="unknown method 'clipcov'; did you mean 'clip_cov'\\?"):
        build_objective("dapo+clipcov")
    for method in ("grpo+grpo", "dapo+clip_cov+ clip_cov", ["kl_cov", "kl_cov"]):
        with pytest.raises(ValueError, match="names '(grpo|clip_cov|kl_cov)' more than once"):
            build_objective(method)


@pytest.mark.parametrize("composition, dropped", [
    ("gspo+dapo", "dapo"), ("dapo+cispo", "cispo"), ("grpo+dapo", "dapo"), ("dapo+dual_clip", "dual_clip"),
    ("dapo+clip_b+dr_grpo", "dr_grpo"), ("dapo+grpo", "grpo"),
])
def test_a_later_method_that_would_only_change_the_surrogate_is_refused(composition, dropped):
    """A later method keeps only its shapers, regularisers, selectors and correction: one made of a surrogate alone
    (CISPO, DAPO's clip-higher, dual-clip, Dr. GRPO's aggregation) would vanish without a trace."""
    before = composition.rsplit("+", 1)[0]
    with pytest.raises(ValueError, match=rf"'{dropped}' adds nothing after '{re.escape(before)}'"):
        build_objective(composition)


def test_the_refusal_of_a_surrogate_only_method_says_what_would_work():
    """Each piece of advice builds: put the method first when the composition starts with parts it can follow, give
    the composition so far the settings when the surrogates are of one kind, else choose one."""
    with pytest.raises(ValueError, match=re.escape("put 'dapo' first ('dapo+clip_b')")):
        build_objective("clip_b+dapo")
    assert build_objective("dapo+clip_b").describe()
    with pytest.raises(ValueError, match=re.escape("build_objective('dapo+clip_b', loss_agg_mode='seq-mean-token-sum-norm')")):
        build_objective("dapo+clip_b+dr_grpo")
    assert build_objective("dapo+clip_b", loss_agg_mode="seq-mean-token-sum-norm").selectors[0].name == "clip_b"
    # GRPO with dual-clip: the surrogate's setting alone, GRPO keeping its own aggregation
    with pytest.raises(ValueError, match=re.escape("the settings that differ: build_objective('grpo', clip_ratio_c=3.0) "
                                                   "(it keeps the aggregation of 'grpo', 'seq-mean-token-mean'; add "
                                                   "loss_agg_mode='token-mean' for that of 'dual_clip')")):
        build_objective("grpo+dual_clip")
    assert build_objective("grpo", clip_ratio_c=3.0).loss_agg_mode == build_objective("grpo").loss_agg_mode
    advice = "the settings that differ: build_objective('dapo', clip_ratio_c=3.0)"
    with pytest.raises(ValueError, match=re.escape(advice)) as refused:
        build_objective("dapo+dual_clip")
    assert "aggregation" not in str(refused.value).split(";")[-1]  # both token-mean: nothing more to say
    # GRPO with DAPO's clip-higher: DAPO's aggregation is named, not imposed
    with pytest.raises(ValueError, match=re.escape("build_objective('grpo', clip_ratio_high=0.28) (it keeps the aggregation "
                                                   "of 'grpo', 'seq-mean-token-mean'; add loss_agg_mode='token-mean' "
                                                   "for that of 'dapo')")):
        build_objective("grpo+dapo")
    with pytest.raises(ValueError, match="choose one of 'dapo' and 'cispo'") as refused:
        build_objective("dapo+cispo")
    assert "first" not in str(refused.value).split(";")[-1]  # 'cispo+dapo' is refused as well: no such advice
    # in a configuration, the same settings under params
    with pytest.raises(ValueError, match=re.escape("(in a configuration: method: {method: dapo, params: {clip_ratio_c: 3.0}})")):
        build_objective("dapo+dual_clip")
    assert build_objective({"method": "dapo", "params": {"clip_ratio_c": 3.0}}).surrogate.clip_ratio_c == 3.0
    # a later method on grpo's advantages, every method's default, brings no advantages of its own to train with
    with pytest.raises(ValueError) as refused:
        build_objective("w_reinforce+dual_clip")
    assert "for its advantages" not in str(refused.value) and "put 'dual_clip' first" in str(refused.value)


@pytest.mark.parametrize("later, estimator", [("unlikely_reward", "unlikely"), ("passk_advantage", "passk")])
def test_a_later_method_that_brings_only_its_advantages_is_refused_naming_the_estimator(later, estimator):
    """SPEC's unlikely_reward / passk_advantage are GRPO with another advantage estimator: after 'dapo' they would add
    nothing to the loss, and the way to what was meant is the estimator, not a loss setting that changes nothing."""
    with pytest.raises(ValueError, match=f"'{later}' adds nothing after 'dapo'") as refused:
        build_objective(f"dapo+{later}")
    advice = str(refused.value).split("; ", 1)[1]
    assert advice == f"for its advantages, train 'dapo' with the '{estimator}' advantage estimator (a trainer's advantage.name)"
    assert get_method(later).advantage_estimator == estimator
    assert build_objective(later).describe()


def test_string_list_and_dict_compositions_agree():
    variants = [
        build_objective("dapo+clip_b+forking_tokens"),
        build_objective(["dapo", "clip_b", "forking_tokens"]),
        build_objective({"method": "dapo+clip_b+forking_tokens"}),
        build_objective({"method": ["dapo", "clip_b", "forking_tokens"]}),
        build_objective(ObjectiveConfig(method="dapo + clip_b + forking_tokens")),
        build_objective(["dapo+clip_b", "forking_tokens"]),
    ]
    described = [o.describe() for o in variants]
    assert all(d == described[0] for d in described)
    assert [p.name for p in variants[0].parts] == ["ppo_clip", "clip_b", "forking_tokens"]
    _, batch = full_batch(90)
    losses = [float(o(batch).loss) for o in variants]
    assert all(loss == losses[0] for loss in losses)


def test_advantage_shapers_apply_in_the_composition_s_order():
    """Each shaper takes the advantages the one before it left: 'entropy_advantage+lopti_reweight' reweighs the
    entropy-shaped advantages, the reverse adds the entropy term to reweighted ones; the two differ."""
    import dataclasses

    _, batch = full_batch(91)

    def one_after_the_other(first: str, second: str) -> torch.Tensor:
        shaped = build_objective(first)(batch).advantages.detach()
        return build_objective(second)(dataclasses.replace(batch, advantages=shaped)).advantages

    for first, second in (("entropy_advantage", "lopti_reweight"), ("lopti_reweight", "entropy_advantage")):
        composed = build_objective(f"{first}+{second}")(batch).advantages
        torch.testing.assert_close(composed, one_after_the_other(first, second), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(one_after_the_other("entropy_advantage", "lopti_reweight"),
                              one_after_the_other("lopti_reweight", "entropy_advantage"))


def test_compositions_that_would_undo_a_method_are_refused():
    """Two methods giving one part different settings, or each bringing a rollout correction, cannot both hold: the
    composition is refused instead of keeping one silently (so is a method named twice); the config's explicit parts
    still override."""
    with pytest.raises(ValueError, match=r"'nsr' and 'psr' both use the selector 'advantage_sign'.*keep='negative'"):
        build_objective("nsr+psr")
    with pytest.raises(ValueError, match=r"'tis' and 'icepop' each bring a rollout correction"):
        build_objective("dapo+tis+icepop")
    for repeated in ("nsr+nsr", "dapo+tis+tis"):
        with pytest.raises(ValueError, match="more than once"):
            build_objective(repeated)
    assert build_objective({"method": "dapo+tis", "correction": {"name": "icepop"}}).correction.name == "icepop"
    assert build_objective({"method": "nsr", "selectors": [{"name": "advantage_sign", "keep": "positive"}]}).selectors[0].keep == "positive"


def test_overrides_reach_the_right_part():
    assert build_objective("clip_b", mu=3.0).selectors[0].mu == 3.0
    assert build_objective("clip_v", mu=7.5).selectors[0].mu == 7.5
    objective = build_objective("dapo+clip_b+forking_tokens", mu=2.0, top_entropy_quantile=0.5, clip_ratio_high=0.3)
    by_name = {p.name: p for p in objective.parts}
    assert by_name["clip_b"].mu == 2.0
    assert by_name["forking_tokens"].top_entropy_quantile == 0.5
    assert by_name["ppo_clip"].clip_ratio_high == 0.3 and by_name["ppo_clip"].clip_ratio_low == 0.2
    assert build_objective("grpo", loss_agg_mode="token-mean").loss_agg_mode == "token-mean"
    assert build_objective("dapo", loss_agg_mode="seq-mean-token-sum-norm").loss_agg_mode == "seq-mean-token-sum-norm"
    assert build_objective("dr_grpo", loss_scale_factor=512).loss_scale_factor == 512
    # overrides do not leak into the registry's defaults
    assert build_objective("clip_b").selectors[0].mu == 2.5
    assert build_objective("dapo").surrogate.clip_ratio_high == 0.28


# ---------------------------------------------------------------------------------------------------------
# 6. registry
# ---------------------------------------------------------------------------------------------------------

PAPER_REF = re.compile(r"arXiv \d{4}\.\d{4,5}|[A-Z][A-Za-z-]+ et al\.? \(?\d{4}")


def test_available_methods_are_exactly_the_catalogue():
    infos = available_methods()
    names = [info.name for info in infos]
    assert len(names) == len(set(names))
    assert set(names) == EXPECTED_METHODS
    for info in infos:
        assert PAPER_REF.search(info.paper), (info.name, info.paper)
        assert info.description.strip(), info.name
        assert info.loss_agg_mode in ALL_MODES
        assert info.params or info.name in ("grpo", "rft")


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("grpo", {"clip_ratio_low": 0.2, "clip_ratio_high": 0.2}),
        ("dapo", {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28}),
        ("dual_clip", {"clip_ratio_c": 3.0}),
        ("clip_b", {"mu": 2.5}),
        ("clip_v", {"mu": 8.5, "max_frac": 1e-4}),
        ("clip_cov", {"clip_cov_ratio": 2e-4, "clip_cov_lb": 1.0, "clip_cov_ub": 5.0}),
        ("kl_cov", {"kl_cov_ratio": 2e-3, "ppo_kl_coef": 1.0}),
        ("forking_tokens", {"top_entropy_quantile": 0.2}),
        ("low_entropy_tokens", {"top_entropy_quantile": 0.2}),
        ("entropy_advantage", {"alpha": 0.4, "kappa": 2.0}),
        ("adaptive_entropy", {"target_entropy": 0.2, "delta": 1e-4, "max_coeff": 5e-3}),
        ("kl_ref", {"kl_loss_coef": 1e-3}),
        ("w_reinforce", {"lam": 0.1}),
        ("lopti_reweight", {"alpha": 0.3}),
        ("gspo", {"clip_ratio_low": 3e-4, "clip_ratio_high": 4e-4}),
        ("tis", {"rollout_is_threshold": 2.0}),
        ("icepop", {"icepop_low": 0.5, "icepop_high": 5.0}),
        ("cispo", {"clip_ratio_low": 1.0, "clip_ratio_high": 0.28}),
    ],
)
def test_method_paper_defaults(method, expected):
    info = {i.name: i for i in available_methods()}[method]
    for key, value in expected.items():
        assert info.params[key] == pytest.approx(value), (method, key)


def test_method_aggregation_defaults():
    modes = {i.name: i.loss_agg_mode for i in available_methods()}
    assert modes["grpo"] == "seq-mean-token-mean"
    assert modes["gspo"] == "seq-mean-token-mean"
    assert modes["dapo"] == "token-mean"
    assert modes["dr_grpo"] == "seq-mean-token-sum-norm"


def test_methods_pair_with_their_papers_advantage_estimators():
    """Dr. GRPO drops the std division (arXiv 2503.20783), PSR / NSR / RFT train on 1 / -1 / 1-or-0 samples
    (arXiv 2506.01347, 2304.06767), W-REINFORCE on +1 / -1 rewards with no baseline; the rest use GRPO's."""
    estimators = {i.name: i.advantage_estimator for i in available_methods()}
    special = {"dr_grpo": "dr_grpo", "psr": "psr", "nsr": "nsr", "rft": "psr", "w_reinforce": "signed_reward",
               "unlikely_reward": "unlikely", "passk_advantage": "passk"}
    assert estimators == {name: special.get(name, "grpo") for name in EXPECTED_METHODS}


def test_every_part_cites_its_paper_in_its_help():
    """help(ClipB) shows the formula and where it comes from: each of entrorl's parts' docstrings carries its
    ``paper`` (parts other tests register for themselves cite none)."""
    import inspect

    from entrorl.objective.parts import PART_KINDS, _REGISTRY

    parts = [cls for kind in PART_KINDS for cls in _REGISTRY[kind].values() if cls.__module__.startswith("entrorl.")]
    assert len(parts) >= 20
    for cls in parts:
        assert cls.paper and cls.paper in inspect.getdoc(cls), cls.__name__


def test_markdown_table_has_a_row_per_method():
    table = methods_markdown_table()
    lines = table.strip().splitlines()
    assert lines[0].startswith("| method |")
    assert len(lines) == 2 + len(EXPECTED_METHODS)
    for name in EXPECTED_METHODS:
        assert sum(line.startswith(f"| `{name}` |") for line in lines) == 1


@register_part("test_drop_long_ratio", description="test-only: drop tokens with r > ratio_limit", paper="none")
class _DropLongRatio(Selector):
    """A tiny custom selector: drops tokens whose ratio exceeds ``ratio_limit``, leaving the normaliser."""

    ratio_limit: float = Field(1.5, gt=1.0)
    calls: ClassVar[int] = 0

    def __call__(self, batch, advantages, surrogate, metrics):
        type(self).calls += 1
        drop = (surrogate.ratio > self.ratio_limit) & batch.mask
        metrics["select/test_drop_long_ratio_frac"] = float(drop.sum()) / max(1, int(batch.mask.sum()))
        return drop


def test_custom_part_composes_by_name():
    batch = make_batch(100)
    objective = build_objective({"method": "dapo", "selectors": ["test_drop_long_ratio"]}, ratio_limit=1.3)
    assert objective.selectors[0].ratio_limit == 1.3
    out = objective(batch)
    assert _DropLongRatio.calls >= 1

    mask = batch.mask.numpy()
    ratio = np.exp(_np(batch.log_prob) - _np(batch.old_log_prob))
    kept = mask & ~(ratio > 1.3)
    assert kept.sum() < mask.sum()
    per_token = ref_ppo(ratio, _np(batch.advantages), 0.2, 0.28)
    assert float(out.loss) == pytest.approx(per_token[kept].sum() / kept.sum(), rel=1e-12)
    grad = _np(grad_of(out.loss, batch.log_prob))
    assert (grad[mask & ~kept] == 0).all()
    assert out.metrics["select/dropped_frac"] == pytest.approx((mask & ~kept).sum() / mask.sum())
    with pytest.raises(ValueError, match="ratio_limit"):
        build_objective({"method": "dapo", "selectors": [{"name": "test_drop_long_ratio", "ratio_limit": 0.5}]})


@pytest.mark.parametrize("method", sorted(EXPECTED_METHODS) + ["dapo+clip_b+forking_tokens", "dr_grpo+kl_ref+tis"])
def test_describe_round_trips(method):
    objective = build_objective(method, loss_scale_factor=64) if method.startswith("dr_grpo") else build_objective(method)
    rebuilt = build_objective(objective.describe())
    assert rebuilt.describe() == objective.describe()
    _, batch = full_batch(110)
    torch.manual_seed(0)
    first = objective(batch).loss
    torch.manual_seed(0)
    second = rebuilt(batch).loss
    assert float(first) == float(second)


# ---------------------------------------------------------------------------------------------------------
# 7. every method
# ---------------------------------------------------------------------------------------------------------

METRIC_KEY = re.compile(r"[a-z0-9_]+/[a-z0-9_]+")


def _check_output(out, logits):
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    grad = grad_of(out.loss, logits)
    assert torch.isfinite(grad).all()
    for key, value in out.metrics.items():
        assert METRIC_KEY.fullmatch(key), key
        assert type(value) is float, (key, type(value))
        assert math.isfinite(value), key
    return grad


@pytest.mark.parametrize("method", sorted(EXPECTED_METHODS))
def test_every_method_full_and_empty_batch(method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kl_cov's on-policy warning is not under test here
        logits, batch = full_batch(120)
        torch.manual_seed(0)
        full = build_objective(method)(batch)
        grad = _check_output(full, logits)
        assert grad.abs().sum() > 0

        logits, batch = full_batch(121, empty=True)
        out = build_objective(method)(batch)
        grad = _check_output(out, logits)
        assert float(out.loss) == 0.0
        assert torch.equal(grad, torch.zeros_like(grad))
        # the same metric keys either way: a data-parallel run (verl) gathers every key from every rank
        assert set(out.metrics) == set(full.metrics)


@pytest.mark.parametrize("method", sorted(EXPECTED_METHODS))
def test_every_method_ignores_padding_values(method):
    """Whatever the padded positions hold, the loss and the gradient at valid positions are the same."""
    _, batch = full_batch(130)
    g = _gen(131)
    pad = ~batch.mask

    def leafed(b: PolicyBatch, garbage: bool) -> tuple[PolicyBatch, torch.Tensor, torch.Tensor]:
        def fill(x: torch.Tensor, scale: float) -> torch.Tensor:
            x = x.detach().clone()
            if garbage:
                x[pad] = scale * torch.randn(int(pad.sum()), generator=g)
            return x

        log_prob = fill(b.log_prob, 3.0).requires_grad_()
        entropy = fill(b.entropy, 2.0).abs().requires_grad_()
        new = PolicyBatch(
            log_prob=log_prob,
            old_log_prob=fill(b.old_log_prob, 3.0),
            advantages=fill(b.advantages, 5.0),
            mask=b.mask,
            entropy=entropy,
            disc=fill(b.disc, 4.0),
            disc_centered=fill(b.disc_centered, 4.0),
            ref_log_prob=fill(b.ref_log_prob, 3.0),
            rollout_log_prob=fill(b.rollout_log_prob, 3.0),
        )
        return new, log_prob, entropy

    results = []
    for garbage in (False, True):
        clean, log_prob, entropy = leafed(batch, garbage)
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = build_objective(method)(clean)
        grads = torch.autograd.grad(out.loss, (log_prob, entropy), allow_unused=True)
        grads = [torch.zeros_like(log_prob) if x is None else x for x in grads]
        results.append((float(out.loss), [x[batch.mask] for x in grads], grads))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6, abs=1e-7)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for grad in results[1][2]:
        assert torch.isfinite(grad).all()
        assert (grad[pad] == 0).all()


def test_adaptive_entropy_does_not_move_on_an_empty_batch():
    objective = build_objective("adaptive_entropy", entropy_coeff=1e-3)
    log_prob = torch.zeros(2, 3, requires_grad=True)
    entropy = torch.full((2, 3), 0.05, requires_grad=True)
    empty = PolicyBatch(log_prob=log_prob, old_log_prob=log_prob.detach(), advantages=torch.ones(2, 3),
                        mask=torch.zeros(2, 3, dtype=torch.bool), entropy=entropy)
    out = objective(empty)
    assert objective.state_dict() == {"regularizer/adaptive_entropy": {"coefficient": 1e-3, "below_target": None,
                                                                       "measuring": None}}
    # the same keys as a batch with tokens (a data-parallel run gathers every key from every rank)
    assert {key: out.metrics[key] for key in out.metrics if key.startswith("reg/adaptive")} == {
        "reg/adaptive_entropy_coeff": 0.0, "reg/adaptive_entropy_controller_coeff": 1e-3,
        "reg/adaptive_entropy_below_target": 0.0}


def test_rft_is_supervised_fine_tuning_on_the_correct_samples_alone():
    """rft (RAFT, arXiv 2304.06767): with psr advantages (1 correct / 0 wrong) the loss is the mean NLL of the correct
    samples' tokens: the wrong samples leave the normaliser, so that the update does not shrink with the accuracy."""
    log_prob = torch.tensor([[-0.5, -1.0], [-2.0, -0.1]], requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    advantages = torch.tensor([1.0, 0.0])
    out = build_objective("rft")(PolicyBatch(log_prob=log_prob, old_log_prob=log_prob.detach() - 0.3, advantages=advantages, mask=mask))
    assert float(out.loss) == pytest.approx((0.5 + 1.0) / 2)
    (grad,) = torch.autograd.grad(out.loss, log_prob)
    torch.testing.assert_close(grad, torch.tensor([[-1 / 2, -1 / 2], [0.0, 0.0]]))
    assert out.metrics["select/rejection_sampling_frac"] == pytest.approx(1 / 3)
    assert get_method("rft").advantage_estimator == "psr"


@pytest.mark.parametrize("method", ["grpo", "gspo", "cispo", "kl_cov", "rft"])
def test_a_batch_without_a_valid_token_reports_a_largest_ratio_of_0(method):
    """ratio/max of no token is 0, below any ratio, so that a maximum over micro-batches (verl's) is the others'."""
    log_prob = torch.full((2, 3), -1.0, requires_grad=True)
    batch = PolicyBatch(log_prob=log_prob, old_log_prob=log_prob.detach() + 0.1, advantages=torch.tensor([1.0, -1.0]),
                        mask=torch.zeros(2, 3, dtype=torch.bool))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kl_cov's on-policy note
        assert build_objective(method)(batch).metrics["ratio/max"] == 0.0


@pytest.mark.parametrize("method", ["grpo", "cispo", "gspo", "rft", "kl_cov"])
def test_kl_old_new_is_one_measure_whatever_the_surrogate(method):
    """kl/old_new is the mean log pi_old - log pi of the valid tokens, each clamped to +-20 as PPO's ratio and verl's
    ppo_kl clamp it, for every surrogate (GSPO's was unclamped, PPO's clamped: one key, two meanings), and finite where
    a valid token's log-prob is -inf (a consumer leaving out non-finite values would drop that step's move)."""
    log_prob = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    old = torch.tensor([[29.0, 13.0, -3.0]])  # 30 (clamped to 20), 15 and 0 nats
    batch = PolicyBatch(log_prob=log_prob, old_log_prob=old, advantages=torch.tensor([1.0]),
                        mask=torch.tensor([[True, True, True]]))
    far = PolicyBatch(log_prob=torch.tensor([[float("-inf"), -2.0]]), old_log_prob=torch.tensor([[-1.0, -2.0]]),
                      advantages=torch.tensor([1.0]), mask=torch.tensor([[True, True]]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert build_objective(method)(batch).metrics["kl/old_new"] == pytest.approx(35.0 / 3)
        assert build_objective(method)(far).metrics["kl/old_new"] == pytest.approx(10.0)


def test_kl_cov_s_on_policy_count_leaves_out_calls_without_gradients():
    """A validation pass (no gradients) trains nothing: three of them on-policy do not make KL-Cov warn that it is a
    no-op, which three on-policy training calls do."""
    objective = build_objective("kl_cov")
    log_prob = torch.tensor([[-1.0, -2.0, -0.5, -1.5]], requires_grad=True)
    batch = PolicyBatch(log_prob=log_prob, old_log_prob=log_prob.detach(), advantages=torch.tensor([1.0]),
                        mask=torch.ones(1, 4, dtype=torch.bool))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            for _ in range(4):
                objective(batch)
    with pytest.warns(UserWarning, match="no-op strictly on-policy"):
        for _ in range(3):
            objective(batch)


@pytest.mark.parametrize("correct", [[0], [0, 3], [0, 1, 2, 5, 6]])
def test_rft_s_update_does_not_depend_on_how_many_samples_were_wrong(correct):
    """However many of the batch's samples are correct, rft's loss and gradient are those of supervised fine-tuning
    on the correct ones (token-mean over their tokens, uneven lengths included); with none correct, nothing trains
    and the loss is 0."""
    torch.manual_seed(0)
    rows, width = 8, 6
    log_prob = (-3 * torch.rand(rows, width)).requires_grad_(True)
    mask = torch.arange(width)[None, :] < torch.tensor([6, 2, 5, 3, 6, 1, 4, 6])[:, None]
    rewards = torch.zeros(rows)
    rewards[correct] = 1.0
    advantages = compute_advantages("psr", rewards, group_ids=torch.arange(rows) // 4)
    out = build_objective("rft")(PolicyBatch(log_prob=log_prob, old_log_prob=log_prob.detach(), advantages=advantages, mask=mask))
    (grad,) = torch.autograd.grad(out.loss, log_prob)
    accepted = mask & rewards.bool()[:, None]
    sft_log_prob = log_prob.detach().clone().requires_grad_(True)
    sft_loss = -sft_log_prob[accepted].mean()
    (sft_grad,) = torch.autograd.grad(sft_loss, sft_log_prob)
    assert float(out.loss) == pytest.approx(float(sft_loss), rel=1e-6)
    torch.testing.assert_close(grad, sft_grad)
    none = build_objective("rft")(PolicyBatch(log_prob=log_prob, old_log_prob=log_prob.detach(),
                                              advantages=torch.zeros(rows), mask=mask))
    assert float(none.loss) == 0.0 and none.metrics["select/rejection_sampling_frac"] == 1.0


@pytest.mark.parametrize("method", sorted(EXPECTED_METHODS))
def test_padding_holding_nan_or_huge_values_reaches_neither_loss_nor_gradient(method):
    """Every method's loss and gradient depend only on the masked-in tokens: padding whose old / reference / rollout
    log-probs, entropies and discriminators are NaN or +1000 (exp overflows) changes nothing (lopti_reweight and
    entropy_advantage used to turn it into NaN gradients)."""
    import dataclasses

    def run(poison: float | None):
        torch.manual_seed(0)  # Clip-Cov draws its tokens from the global generator
        logits, batch = full_batch(11)
        if poison is not None:
            fields = {}
            for name in ("old_log_prob", "entropy", "disc", "disc_centered", "ref_log_prob", "rollout_log_prob", "advantages"):
                value = getattr(batch, name)
                fields[name] = torch.where(batch.mask, value, torch.full_like(value, poison))
            batch = dataclasses.replace(batch, **fields)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # KL-Cov's on-policy notice is not what this checks
            out = build_objective(method)(batch)
        out.loss.backward()
        assert (out.advantages[~batch.mask] == 0).all(), "a shaper's advantage at padding reached the output"
        return float(out.loss), logits.grad

    clean_loss, clean_grad = run(None)
    for poison in (float("nan"), 1000.0):
        loss, grad = run(poison)
        assert loss == pytest.approx(clean_loss, rel=1e-6, abs=1e-9), poison
        assert torch.isfinite(grad).all() and torch.allclose(grad, clean_grad, rtol=1e-5, atol=1e-8), poison


@pytest.mark.parametrize("method", sorted(EXPECTED_METHODS) + [{"method": "kl_ref", "params": {"importance_weighted": True}}])
def test_nan_log_probs_at_padding_give_finite_gradients(method):
    """A caller's own log-prob tensor may hold NaN where the mask is off (an unmasked log-softmax of padding): the
    gradient there is 0 and elsewhere finite, for every method (CISPO's used to be NaN at padding)."""
    import dataclasses

    _, batch = full_batch(12)
    log_prob = torch.where(batch.mask, batch.log_prob.detach(), torch.full_like(batch.log_prob, float("nan")))
    log_prob.requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = build_objective(method)(dataclasses.replace(batch, log_prob=log_prob))
    grad = grad_of(out.loss, log_prob)
    assert math.isfinite(float(out.loss)) and torch.isfinite(grad).all(), method
    assert (grad[~batch.mask] == 0).all()


def test_parameters_that_cannot_work_together_are_refused():
    """An empty covariance band would never drop a token; a negative W-REINFORCE lambda would push correct samples
    down (the objective's positive_scale refused it, the estimator did not)."""
    from entrorl import compute_advantages

    with pytest.raises(ValueError, match=r"clip_cov_lb \(5\.0\) must be below clip_cov_ub \(1\.0\)"):
        build_objective("clip_cov", clip_cov_lb=5, clip_cov_ub=1)
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        compute_advantages("w_reinforce", torch.tensor([1.0, 0.0]), group_ids=torch.tensor([0, 0]), lam=-5)
    assert compute_advantages("w_reinforce", torch.tensor([1.0, 0.0]), group_ids=torch.tensor([0, 0]), lam=0).tolist() == [0, -1]


@pytest.mark.parametrize("method", sorted(EXPECTED_METHODS))
def test_gradient_reaches_only_the_trained_log_probs_and_entropies(method):
    """old, reference and rollout log-probs and the advantages are constants of the loss (stop-gradient): even when a
    caller passes them with requires_grad, none gets a gradient and the log-prob gradient is the same."""
    import dataclasses

    _, batch = full_batch(13)
    constants = ("old_log_prob", "ref_log_prob", "rollout_log_prob", "advantages")

    def run(attached: bool):
        fields = {name: getattr(batch, name).detach().clone().requires_grad_(attached) for name in constants}
        log_prob = batch.log_prob.detach().clone().requires_grad_()
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = build_objective(method)(dataclasses.replace(batch, log_prob=log_prob, **fields))
        leaves = [log_prob] + [fields[name] for name in constants if attached]
        grads = torch.autograd.grad(out.loss, leaves, allow_unused=True)
        return grads[0], dict(zip(constants, grads[1:]))

    plain, _ = run(False)
    grad, others = run(True)
    torch.testing.assert_close(grad, plain, rtol=0, atol=0)
    for name, other in others.items():
        assert other is None or not other.any(), f"gradient reached {name}"


def test_a_correction_weighs_the_per_token_regulariser_too():
    """The mismatch weight multiplies each token's whole loss, KL-Cov's |log r| term included (verl multiplies the
    per-token loss, penalty added, by rollout_is_weights): with every k_t = 1/2 the kl_cov+tis loss and gradient are
    half of kl_cov's."""
    batch = make_batch(14)
    batch.rollout_log_prob = batch.old_log_prob + math.log(2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = build_objective("kl_cov", kl_cov_ratio=0.5)(batch)
        weighted = build_objective("kl_cov+tis", kl_cov_ratio=0.5)(batch)
    assert plain.metrics["select/kl_cov_frac"] > 0 and plain.metrics["kl_cov/abs_log_ratio"] > 0
    assert float(weighted.loss) == pytest.approx(0.5 * float(plain.loss), rel=1e-12)
    torch.testing.assert_close(grad_of(weighted.loss, batch.log_prob), 0.5 * grad_of(plain.loss, batch.log_prob))


def test_a_dropped_token_with_minus_infinite_log_prob_costs_nothing():
    """A token the selectors drop has no loss whatever its log-prob: PSR drops the A < 0 token whose log pi is -inf
    (-A log pi would be -inf under CISPO), and the loss stays the kept tokens' (the dropped one stays in the
    normaliser)."""
    log_prob = torch.tensor([[-1.0, float("-inf"), -2.0]], dtype=F64, requires_grad=True)
    batch = PolicyBatch(log_prob=log_prob, old_log_prob=log_prob.detach().nan_to_num(neginf=-3.0),
                        advantages=torch.tensor([[1.0, -1.0, 0.5]], dtype=F64), mask=torch.ones(1, 3, dtype=torch.bool))
    out = build_objective("cispo+psr")(batch)
    assert out.trained_mask.tolist() == [[True, False, True]]
    assert float(out.loss) == pytest.approx(-(1.0 * -1.0 + 0.5 * -2.0) / 3, rel=1e-12)
    grad = grad_of(out.loss, log_prob)
    np.testing.assert_allclose(_np(grad), [[-1.0 / 3, 0.0, -0.5 / 3]], rtol=1e-12)


def test_keyword_overrides_win_over_the_configs_params():
    """build_objective(config, **overrides): the call's keywords are the last word over the config's ``params``."""
    objective = build_objective({"method": "clip_b", "params": {"mu": 2.0, "mode": "paper"}}, mu=3.0)
    assert (objective.selectors[0].mu, objective.selectors[0].mode) == (3.0, "paper")


def test_a_dict_config_may_name_its_method_under_name():
    assert build_objective({"name": "dapo+clip_b"}).describe() == build_objective("dapo+clip_b").describe()
    assert build_objective({"name": "kl_cov"}).surrogate.name == "unclipped"


def test_a_method_name_with_a_plus_cannot_be_registered():
    from entrorl.objective import MethodSpec, register_method

    with pytest.raises(ValueError, match="may not contain '\\+'"):
        register_method(MethodSpec(name="dapo+mine", description="x", paper="arXiv 0000.00000"))
    assert "dapo+mine" not in {info.name for info in available_methods()}


def test_adaptive_entropy_accepts_equal_coefficient_bounds():
    """min_coeff <= max_coeff: equal bounds fix the coefficient, and the controller cannot move it."""
    objective = build_objective("adaptive_entropy", entropy_coeff=1e-3, min_coeff=1e-3, max_coeff=1e-3, delta=1e-3)
    batch, _ = _entropy_batch(0.1, seed=310)
    objective(batch)
    assert objective.end_step()["reg/adaptive_entropy_next_coeff"] == pytest.approx(1e-3)


@pytest.mark.parametrize(("start", "in_force"), [(1e-2, 5e-3), (0.0, 1e-3), (2e-3, 2e-3)])
def test_adaptive_entropy_s_first_step_trains_with_its_starting_coefficient_clipped_to_the_bounds(start, in_force):
    """c_0 is clipped to [min_coeff, max_coeff] like every later c_k: a starting 1e-2 above max_coeff = 5e-3 trained
    the first step at twice the maximum; the default c_0 = 0 below min_coeff = 1e-3 trained it without the bonus."""
    objective = build_objective("adaptive_entropy", entropy_coeff=start, min_coeff=1e-3, max_coeff=5e-3)
    batch, _ = _entropy_batch(0.1, seed=311)  # below the target: the bonus is on at the first step
    out = objective(batch)
    assert out.metrics["reg/adaptive_entropy_coeff"] == pytest.approx(in_force)
    assert objective.regularizers[0].state_dict()["coefficient"] == pytest.approx(in_force)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("importance_weighted", [False, True])
@pytest.mark.parametrize("where_nan", ["log_prob", "ref_log_prob"])
def test_kl_ref_gives_padding_a_zero_gradient_whatever_it_holds(estimator, importance_weighted, where_nan):
    """NaN at padding, in the policy's or the reference's log-probs, reaches neither the KL term nor the gradient, for
    every estimator (k2's backward multiplied the zero upstream gradient by the NaN difference)."""
    log_prob = torch.tensor([[-1.0, -2.0, math.nan if where_nan == "log_prob" else -1.0]], dtype=torch.float64,
                            requires_grad=True)
    batch = PolicyBatch(log_prob=log_prob, old_log_prob=torch.tensor([[-1.1, -2.1, -1.0]], dtype=torch.float64),
                        advantages=torch.ones(1, 3, dtype=torch.float64), mask=torch.tensor([[True, True, False]]),
                        ref_log_prob=torch.tensor([[-1.5, -2.5, math.nan if where_nan == "ref_log_prob" else -1.0]],
                                                  dtype=torch.float64))
    out = build_objective("kl_ref", kl_loss_type=estimator, importance_weighted=importance_weighted)(batch)
    (grad,) = torch.autograd.grad(out.loss, log_prob)
    assert math.isfinite(float(out.loss)) and torch.isfinite(grad).all() and grad[0, 2] == 0.0
    clean = PolicyBatch(log_prob=log_prob.detach()[:, :2].clone().requires_grad_(), old_log_prob=batch.old_log_prob[:, :2],
                        advantages=batch.advantages[:, :2], mask=batch.mask[:, :2], ref_log_prob=batch.ref_log_prob[:, :2])
    expected = build_objective("kl_ref", kl_loss_type=estimator, importance_weighted=importance_weighted)(clean)
    (expected_grad,) = torch.autograd.grad(expected.loss, clean.log_prob)
    torch.testing.assert_close(out.loss, expected.loss)
    torch.testing.assert_close(grad[:, :2], expected_grad)


@pytest.mark.parametrize(("shape", "mode", "expected"), [
    ((16, 4200), "token-mean", 0.5), ((16, 4200), "seq-mean-token-sum", 2100.0),
    ((16, 4200), "seq-mean-token-sum-norm", 0.5), ((1, 70000), "seq-mean-token-mean", 0.5)])
def test_every_aggregation_of_a_float16_loss_over_more_than_65504_tokens_is_exact(shape, mode, expected):
    """float16 holds no sum or count above 65504: they are taken in float32, then the result is given back in float16
    (token-mean and a row's token mean gave 0, the count having become inf; the sums gave inf)."""
    loss, mask = torch.full(shape, 0.5, dtype=torch.float16), torch.ones(shape, dtype=torch.bool)
    result = aggregate_loss(loss, mask, mode)
    assert result.dtype == torch.float16 and float(result) == expected
    # a global batch size (verl's normaliser) neither overflows nor changes the dtype
    if mode != "token-mean":
        scaled = aggregate_loss(loss, mask, mode, global_batch_size=shape[0])
        assert scaled.dtype == torch.float16 and float(scaled) == expected


def test_sequence_level_tis_weight_is_the_truncated_product_of_the_token_ratios():
    """w_i = min(prod_t k_t, C): the token log-ratios are summed first, and only the sum is clamped to +-20 before the
    exponential. log k = [-30, 25] gives e^-5 for both tokens (clamping each token first gave -20 + 20 = 0, w = 1)."""
    from entrorl.objective.corrections import TruncatedIS

    old = torch.tensor([[-31.0, -1.0]], dtype=torch.float64)
    batch = PolicyBatch(log_prob=old.clone().requires_grad_(), old_log_prob=old, advantages=torch.ones(1, 2, dtype=torch.float64),
                        mask=torch.ones(1, 2, dtype=torch.bool), rollout_log_prob=torch.tensor([[-1.0, -26.0]], dtype=torch.float64))
    torch.testing.assert_close(TruncatedIS(level="sequence")(batch, {}), torch.full((1, 2), math.exp(-5.0), dtype=torch.float64))
    far = PolicyBatch(log_prob=old.clone().requires_grad_(), old_log_prob=old, advantages=batch.advantages, mask=batch.mask,
                      rollout_log_prob=torch.tensor([[-1.0, -1.0]], dtype=torch.float64))  # log k = [-30, 0]: clamped at -20
    torch.testing.assert_close(TruncatedIS(level="sequence")(far, {}), torch.full((1, 2), math.exp(-20.0), dtype=torch.float64))
    torch.testing.assert_close(TruncatedIS(level="token")(far, {}), torch.tensor([[math.exp(-20.0), 1.0]], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------
# 8. the objective's plumbing, the registries and the batch's checks
# ---------------------------------------------------------------------------------------------------------


def test_metrics_count_every_valid_token_and_every_dropped_one_whatever_the_normaliser():
    """``tokens/valid`` counts the valid tokens, dropped ones included, and ``select/dropped_frac`` counts every dropped
    token, also those PSR keeps in the normaliser: with A = [1, -1, -2, 3 | -1, pad] PSR drops 3 of 5 tokens."""
    log_prob = torch.zeros(2, 3, dtype=F64, requires_grad=True)
    batch = PolicyBatch(log_prob=log_prob, old_log_prob=torch.zeros(2, 3, dtype=F64),
                        advantages=torch.tensor([[1.0, -1.0, -2.0], [3.0, -1.0, 9.0]], dtype=F64),
                        mask=torch.tensor([[True, True, True], [True, True, False]]))
    out = build_objective("psr")(batch)
    assert out.metrics["tokens/valid"] == 5.0
    assert out.metrics["select/dropped_frac"] == pytest.approx(3 / 5)
    assert out.loss_mask.tolist() == batch.mask.tolist()  # PSR's dropped tokens stay in the normaliser
    assert float(out.loss) == pytest.approx(-(1.0 + 3.0) / 5, rel=1e-12)


def test_policy_loss_metric_leaves_out_the_scalar_regulariser_terms():
    """``loss/policy`` is the aggregated surrogate, ``loss/total`` adds the entropy bonus -c mean(H)."""
    logits, batch = full_batch(140)
    plain = build_objective("grpo", loss_agg_mode="token-mean")(batch)
    out = build_objective("entropy_bonus", entropy_coeff=0.5)(batch)
    mean_entropy = float(batch.entropy[batch.mask].mean())
    assert out.metrics["loss/policy"] == pytest.approx(float(plain.loss), rel=1e-6)
    assert out.metrics["loss/total"] == pytest.approx(float(plain.loss) - 0.5 * mean_entropy, rel=1e-6)
    assert float(out.policy_loss) == pytest.approx(out.metrics["loss/policy"], rel=1e-12)


def test_end_step_gathers_the_metrics_of_every_part():
    """The adaptive controller's end-of-step metrics survive the selectors after it, and those of any other part that
    reports one are kept beside them."""
    from entrorl.objective import Objective, Shaper
    from entrorl.objective.parts import make_part

    objective = build_objective("adaptive_entropy+clip_b")
    batch, _ = _entropy_batch(0.1, seed=311)
    batch.disc = torch.zeros_like(batch.log_prob)
    objective(batch)
    assert "reg/adaptive_entropy_next_coeff" in objective.end_step()

    class Counting(Shaper):
        def __call__(self, batch, advantages, metrics):
            return advantages

        def end_step(self):
            return {"shape/steps_seen": 1.0}

    custom = Objective(surrogate=make_part("surrogate", "ppo_clip", {}), shapers=[Counting()],
                       regularizers=[make_part("regularizer", "adaptive_entropy", {})])
    custom(_entropy_batch(0.1, seed=312)[0])
    assert {"shape/steps_seen", "reg/adaptive_entropy_next_coeff"} <= set(custom.end_step())


def test_a_custom_correction_weight_is_a_constant_of_the_loss():
    """The mismatch weight is detached: even a correction computed from the trained log-probs scales the gradient
    without differentiating through itself (d(w L)/d log pi = w dL/d log pi)."""
    from entrorl.objective import Correction, Objective
    from entrorl.objective.parts import make_part

    class FromLogProb(Correction):
        def __call__(self, batch, metrics):
            return batch.log_prob.exp()

    batch = make_batch(141)
    batch.rollout_log_prob = batch.old_log_prob.clone()
    surrogate = make_part("surrogate", "unclipped", {})
    plain = Objective(surrogate=surrogate)(batch)
    weighted = Objective(surrogate=surrogate, correction=FromLogProb())(batch)
    weight = batch.log_prob.detach().exp()
    count = batch.mask.sum()
    ratio = (batch.log_prob - batch.old_log_prob).detach().exp()
    expected = torch.where(batch.mask, -batch.advantages * ratio * weight, 0.0).sum() / count
    assert float(weighted.loss) == pytest.approx(float(expected), rel=1e-12)
    torch.testing.assert_close(grad_of(weighted.loss, batch.log_prob),
                               torch.where(batch.mask, weight, 0.0) * grad_of(plain.loss, batch.log_prob))


def test_a_regulariser_term_may_give_both_a_per_token_and_a_scalar_part():
    from entrorl.objective import Objective, Regularizer, RegularizerTerm
    from entrorl.objective.parts import make_part

    class Both(Regularizer):
        def __call__(self, batch, advantages, aggregate, metrics):
            return RegularizerTerm(per_token=torch.ones_like(batch.log_prob), scalar=torch.tensor(10.0, dtype=F64))

    batch = make_batch(142)
    surrogate = make_part("surrogate", "ppo_clip", {})
    plain = Objective(surrogate=surrogate)(batch)
    out = Objective(surrogate=surrogate, regularizers=[Both()])(batch)
    assert float(out.loss) == pytest.approx(float(plain.loss) + 1.0 + 10.0, rel=1e-12)


def test_an_objective_built_directly_refuses_an_unknown_aggregation():
    from entrorl.objective import Objective
    from entrorl.objective.parts import make_part

    with pytest.raises(ValueError, match="unknown loss_agg_mode 'mean'"):
        Objective(surrogate=make_part("surrogate", "ppo_clip", {}), loss_agg_mode="mean")


def test_required_fields_name_each_field_once():
    objective = build_objective("entropy_advantage+forking_tokens+entropy_bonus+tis")
    assert objective.required_fields == ("entropy", "rollout_log_prob")
    assert build_objective("grpo").required_fields == ()
    # the entropy terms read H too: declared, so that truncated sampling is warned about and verl's actor supplies it
    assert build_objective("grpo+entropy_bonus+adaptive_entropy").required_fields == ("entropy",)


def test_the_objective_is_named_after_its_whole_composition():
    objective = build_objective(["dapo", "clip_b", "forking_tokens"])
    assert objective.name == "dapo+clip_b+forking_tokens"
    assert repr(objective).startswith("Objective('dapo+clip_b+forking_tokens', surrogate:ppo_clip, selector:clip_b")
    assert build_objective({"surrogate": "cispo"}).name == "custom"


def test_a_stateless_part_refuses_a_saved_state():
    objective = build_objective("dapo+clip_b")
    with pytest.raises(ValueError, match="selector 'clip_b' is stateless but a state \\['x'\\] was given"):
        objective.load_state_dict({"selector/clip_b": {"x": 1}})
    objective.load_state_dict({})  # no state at all is every stateless part's own


def test_a_later_method_with_the_surrogate_but_another_aggregation_is_refused():
    """Dr. GRPO after GRPO is the same ppo_clip with another aggregation: keeping GRPO's would drop it silently."""
    with pytest.raises(ValueError, match=re.escape("build_objective('grpo', loss_agg_mode='seq-mean-token-sum-norm')")):
        build_objective("grpo+dr_grpo")


def test_a_method_parameter_beside_the_method_in_a_dict_config_is_pointed_to_params():
    with pytest.raises(ValueError, match=r"mu: Extra inputs are not permitted.*A method's parameters go under 'params': "
                                         r"\{'method': 'dapo\+clip_b', 'params': \{'mu': \.\.\.\}\}\.$"):
        build_objective({"method": "dapo+clip_b", "mu": 1.0})
    for config in ({"surrogate": {"name": "ppo_clip"}, "mu": 1.0}, {"method": "dapo", "name": "grpo"}):
        with pytest.raises(ValueError) as refused:  # without a method, or a second name: no parameter to point to
            build_objective(config)
        assert "go under 'params'" not in str(refused.value)
    assert build_objective({"method": "dapo+clip_b", "params": {"mu": 1.0}}).name == "dapo+clip_b"


def test_a_dict_config_naming_its_method_twice_is_refused():
    with pytest.raises(ValueError, match="name: Extra inputs are not permitted"):
        build_objective({"method": "dapo", "name": "grpo"})


def test_a_part_name_must_be_exact():
    with pytest.raises(ValueError, match="unknown selector ' clip_b'"):
        build_objective({"method": "dapo", "selectors": [" clip_b"]})


def test_build_objective_refuses_other_types_with_a_type_error():
    with pytest.raises(TypeError, match="got int"):
        build_objective(3)


def test_the_config_itself_refuses_a_non_positive_loss_scale_factor():
    from pydantic import ValidationError

    for factor in (0.0, -1.0, float("inf"), float("nan"), True, np.True_):  # inf trained nothing, True was 1
        with pytest.raises(ValidationError, match="loss_scale_factor"):
            ObjectiveConfig(method="dr_grpo", loss_scale_factor=factor)


@pytest.mark.parametrize("factor", [0.0, float("inf"), float("nan"), True, [1], "abc", 10**400, Fraction(1, 10**400)])
def test_build_objective_names_a_bad_loss_scale_factor(factor):
    with pytest.raises(ValueError, match=r"loss_scale_factor must be a finite number > 0, got "):
        build_objective("dr_grpo", loss_scale_factor=factor)
    assert build_objective("dr_grpo", loss_scale_factor=np.float32(512)).loss_scale_factor == 512.0


@pytest.mark.parametrize("value", [512, "512", " 512 ", Decimal("512"), torch.tensor(512.0), np.int64(512)])
def test_a_loss_scale_factor_reads_alike_as_a_field_a_keyword_and_a_parameter(value):
    """The config's field reads it as pydantic reads a float; the keyword and ``params`` paths did not take a string."""
    built = [build_objective({"method": "dr_grpo", "loss_scale_factor": value}),
             build_objective("dr_grpo", loss_scale_factor=value),
             build_objective({"method": "dr_grpo", "params": {"loss_scale_factor": value}})]
    assert [objective.loss_scale_factor for objective in built] == [512.0] * 3
    for flag in (torch.tensor(True), np.True_):
        with pytest.raises(ValueError, match="loss_scale_factor"):
            ObjectiveConfig(method="dr_grpo", loss_scale_factor=flag)
        with pytest.raises(ValueError, match="loss_scale_factor must be a finite number > 0"):
            build_objective("dr_grpo", loss_scale_factor=flag)
    with pytest.raises(ValueError, match=r"^invalid objective config — loss_scale_factor: expected a number, not a "
                                         r"boolean\. Valid keys"):  # without pydantic's 'Value error, '
        build_objective({"method": "dr_grpo", "loss_scale_factor": True})


@pytest.mark.parametrize("mode", ["", 0, False])
def test_a_wrong_loss_agg_mode_that_reads_as_false_is_refused_not_taken_for_the_default(mode):
    with pytest.raises(ValueError, match="loss_agg_mode"):
        build_objective("dr_grpo", loss_agg_mode=mode)


@pytest.mark.parametrize(("method", "name"), [("grpo+entropy_bonus", "entropy_coeff"), ("grpo+kl_ref", "kl_loss_coef"),
                                              ("kl_cov", "ppo_kl_coef"), ("w_reinforce", "lam"),
                                              ("entropy_advantage", "alpha")])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_coefficient_of_inf_or_nan_is_refused_naming_it(method, name, value):
    """A coefficient of inf or NaN makes the loss so: refused when the objective is built, as every setting is."""
    with pytest.raises(ValueError, match=rf"{name}: Input should be a finite number"):
        build_objective(method, **{name: value})


def test_a_method_whose_surrogate_is_the_compositions_own_is_not_warned_about(monkeypatch):
    """A registered method bringing Clip-Cov's selector with the surrogate the first method already has trains as its
    recipe says: no warning that its surrogate was set aside."""
    from entrorl.objective import MethodSpec, methods, register_method

    monkeypatch.setattr(methods, "_METHODS", dict(methods._METHODS))
    clip_one = ("ppo_clip", {"clip_ratio_low": 1.0, "clip_ratio_high": 1.0})
    register_method(MethodSpec(name="clip_one", description="x", paper="arXiv 0000.00000", surrogate=clip_one))
    register_method(MethodSpec(name="cov_band", description="x", paper="arXiv 0000.00000", surrogate=clip_one,
                               selectors=(("clip_cov", {}),), surrogate_is_the_method=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        objective = build_objective("clip_one+cov_band")
    assert objective.surrogate.clip_ratio_high == 1.0 and [s.name for s in objective.selectors] == ["clip_cov"]


def test_a_method_name_cannot_be_registered_twice_with_another_recipe():
    from entrorl.objective import MethodSpec, register_method

    assert register_method(get_method("dapo")) is get_method("dapo")  # the same recipe again is harmless
    with pytest.raises(ValueError, match="a method named 'dapo' is already registered"):
        register_method(MethodSpec(name="dapo", description="another", paper="arXiv 0000.00000"))
    assert get_method("dapo").surrogate[1]["clip_ratio_high"] == 0.28


def test_a_part_name_cannot_be_registered_twice_and_a_part_needs_a_kind():
    from entrorl.objective.parts import Part, get_part_class

    with pytest.raises(ValueError, match="a selector named 'clip_b' is already registered \\(ClipB\\)"):
        @register_part("clip_b", description="x")
        class _Other(Selector):
            pass
    assert get_part_class("selector", "clip_b").__name__ == "ClipB"
    with pytest.raises(TypeError, match="must subclass one of Shaper"):
        @register_part("kindless", description="x")
        class _Kindless(Part):
            pass


@pytest.mark.parametrize("spec_changes, message", [
    ({"name": ""}, "a method's name must be a non-empty string without spaces around it, got ''"),
    ({"name": " lead"}, "got ' lead'"),
    ({"name": "trail "}, "got 'trail '"),
    ({"name": "m_badparam", "surrogate": ("ppo_clip", {"nope": 1})}, "method 'm_badparam' cannot be built: .*nope"),
    ({"name": "m_badvalue", "selectors": (("clip_b", {"mu": -1.0}),)}, "method 'm_badvalue' cannot be built: .*mu"),
    ({"name": "a,b"}, "or ',' \\(it separates them in entrorl lab --methods\\)"),
    # a name is a folder of the laboratory, a row of its report's tables and a word of its sentences
    ({"name": "a|b"}, "made of letters, digits, '_', '-' and '.'.*'a\\|b'"),
    ({"name": "x`y"}, "made of letters, digits"),
    ({"name": "sub/dir"}, "made of letters, digits"),
    ({"name": ".."}, "is not dots alone"), ({"name": "."}, "is not dots alone"), ({"name": "-x"}, "starts with no '-'"),
    ({"name": "m_estimator", "advantage_estimator": "nope"}, "method 'm_estimator': advantage_estimator: .*'nope'"),
])
def test_a_method_that_cannot_be_built_is_refused_when_registered(monkeypatch, spec_changes, message):
    """Every listing of the methods (``entrorl methods``, the README's table, verl's registration) builds each one: a
    spec that cannot be built is refused at once, and the registry is left as it was."""
    from entrorl.objective import MethodSpec, available_methods, methods, register_method

    monkeypatch.setattr(methods, "_METHODS", dict(methods._METHODS))
    before = dict(methods._METHODS)
    with pytest.raises(ValueError, match=message):
        register_method(MethodSpec(**{"description": "x", "paper": "arXiv 0000.00000", **spec_changes}))
    assert methods._METHODS == before
    assert {info.name for info in available_methods()} == EXPECTED_METHODS


def test_a_part_needs_a_default_for_every_parameter_and_a_plain_name(monkeypatch):
    from pydantic import Field

    from entrorl.objective import parts

    monkeypatch.setattr(parts, "_REGISTRY", {kind: dict(registry) for kind, registry in parts._REGISTRY.items()})
    with pytest.raises(TypeError, match=r"selector 'no_default' \(_NoDefault\): parameter\(s\) \['threshold'\] have no "
                                        "default"):
        @register_part("no_default", description="x")
        class _NoDefault(Selector):
            threshold: float = Field(description="no default")
    for name in ("", " padded"):
        with pytest.raises(ValueError, match="a part's name must be a non-empty string without spaces around it"):
            register_part(name, description="x")
    assert "no_default" not in parts._REGISTRY["selector"]


def test_a_registered_part_keeps_its_docstring_and_cites_its_paper():
    import inspect

    from entrorl.objective.parts import get_part_class

    doc = inspect.getdoc(get_part_class("surrogate", "ppo_clip"))
    assert doc.startswith("``L = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))``")
    assert doc.endswith("Paper: arXiv 1707.06347; decoupled clip: DAPO arXiv 2503.14476; dual-clip: arXiv 1912.09729.")


def test_an_unknown_part_parameter_lists_the_valid_ones():
    from entrorl.objective.parts import make_part

    with pytest.raises(ValueError, match=re.escape("selector 'clip_b' has no parameter(s) ['muu']; its parameters are "
                                                   "['keep_in_normaliser', 'mu', 'mode', 'mu_high']")):
        make_part("selector", "clip_b", {"muu": 2.0})


def test_a_boolean_for_a_numeric_part_parameter_is_refused():
    """pydantic reads True as 1: clip_ratio_low=True would have clipped at a ratio of 1; a switch takes booleans."""
    for flag in (torch.tensor(True), np.array(True)):  # a boolean tensor is the same flag
        with pytest.raises(ValueError, match=r"mu: expected a number, not a boolean"):
            build_objective("clip_b", mu=flag)
    with pytest.raises(ValueError, match=r"clip_ratio_low: expected a number, not a boolean \(got True\)"):
        build_objective("dapo", clip_ratio_low=True)
    with pytest.raises(ValueError, match="expected a number, not a boolean"):
        build_objective("clip_b", mu=False)
    assert build_objective("clip_b", keep_in_normaliser=True).selectors[0].keep_in_normaliser is True


def test_available_parts_lists_every_kind_with_defaults_and_parameter_docs():
    from entrorl.objective import available_parts
    from entrorl.objective.parts import PART_KINDS

    infos = available_parts()
    assert {info.kind for info in infos} == set(PART_KINDS)
    by_key = {(info.kind, info.name): info for info in infos}
    clip_b = by_key[("selector", "clip_b")]
    assert clip_b.params == {"keep_in_normaliser": False, "mu": 2.5, "mode": "released", "mu_high": None}
    assert "arXiv 2602.03392" in clip_b.param_docs["mu"]
    assert by_key[("correction", "tis")].params["rollout_is_threshold"] == 2.0
    assert [info.name for info in available_parts("correction")] == ["icepop", "tis"]
    with pytest.raises(ValueError, match=r"unknown part kind 'bogus'; kinds are \["):
        available_parts("bogus")


def test_a_batch_refuses_a_mask_advantages_or_rows_of_another_shape():
    fields = {"log_prob": torch.zeros(2, 3), "old_log_prob": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match=re.escape("PolicyBatch.mask must be a tensor of shape (2, 3), got (2, 1)")):
        PolicyBatch(**fields, advantages=torch.ones(2, 3), mask=torch.ones(2, 1, dtype=torch.bool))
    for length in (1, 3):  # one advantage per sequence means one per row, not one for all
        with pytest.raises(ValueError, match=re.escape(f"or (2,), one per sequence, got ({length},)")):
            PolicyBatch(**fields, advantages=torch.ones(length), mask=torch.ones(2, 3, dtype=torch.bool))
    population = PolicyBatch(log_prob=torch.zeros(4, 3), old_log_prob=torch.zeros(4, 3), advantages=torch.ones(4),
                             mask=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="rows must be 2 integer row indices into the population, got \\(3,\\)"):
        PolicyBatch(**fields, advantages=torch.ones(2), mask=torch.ones(2, 3, dtype=torch.bool), population=population,
                    rows=torch.arange(3))
    batch = PolicyBatch(**fields, advantages=torch.tensor([1.0, -2.0]), mask=torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert batch.num_valid == 3 and batch.advantages.tolist() == [[1.0] * 3, [-2.0] * 3]


def test_float16_log_probs_are_computed_in_float32():
    """float16 is half precision too: its log-probs are taken in float32, and the gradient reaches the float16 leaf."""
    log_prob = torch.tensor([[-1.0, -2.0]], dtype=torch.float16, requires_grad=True)
    batch = PolicyBatch(log_prob=log_prob, old_log_prob=torch.tensor([[-1.0, -2.5]], dtype=torch.float16),
                        advantages=torch.tensor([1.0]), mask=torch.ones(1, 2, dtype=torch.bool))
    assert batch.log_prob.dtype == batch.old_log_prob.dtype == torch.float32
    out = build_objective("gspo")(batch)
    assert out.loss.dtype == torch.float32
    assert grad_of(out.loss, log_prob).dtype == torch.float16


def test_log_ratio_is_clamped_at_minus_twenty_too():
    """log r = -100 gives r = e^-20 (verl's clamp is two-sided), not e^-100: -A r with A = -1 costs e^-20."""
    log_prob = torch.tensor([[-100.0]], dtype=F64, requires_grad=True)
    batch = PolicyBatch(log_prob=log_prob, old_log_prob=torch.zeros(1, 1, dtype=F64),
                        advantages=torch.tensor([[-1.0]], dtype=F64), mask=torch.ones(1, 1, dtype=torch.bool))
    out = build_objective({"surrogate": "unclipped"})(batch)
    assert float(out.loss) == pytest.approx(math.exp(-20.0), rel=1e-12)
    assert out.metrics["ratio/mean"] == pytest.approx(math.exp(-20.0), rel=1e-12)


@pytest.mark.parametrize("stray", [0.5, 2.0, float("nan")])
def test_a_mask_holding_values_other_than_0_and_1_is_refused(stray):
    """bool() reads 0.5 or 2 as True: a numeric mask is taken only when it holds 0s and 1s, by PolicyBatch and by
    token_stats."""
    from entrorl.tokens import token_stats

    zeros = torch.zeros(2, 3, dtype=F64)
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, stray]], dtype=F64)
    with pytest.raises(ValueError, match="PolicyBatch.mask must be bool or hold only 0 and 1"):
        PolicyBatch(log_prob=zeros, old_log_prob=zeros, advantages=zeros, mask=mask)
    with pytest.raises(ValueError, match="token_stats: mask must be bool or hold only 0 and 1"):
        token_stats(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), mask=mask)
    with pytest.raises(ValueError, match="aggregate_loss: mask must be bool or hold only 0 and 1"):
        aggregate_loss(zeros, mask)
    assert PolicyBatch(log_prob=zeros, old_log_prob=zeros, advantages=zeros, mask=(mask == 1).long()).mask.dtype == torch.bool


def test_a_loss_scale_factor_that_the_aggregation_never_reads_is_said_to_have_no_effect():
    """Only seq-mean-token-sum-norm divides by loss_scale_factor: given with another aggregation, in the library as in
    a configuration or the plugins, it warns."""
    with pytest.warns(UserWarning, match=r"loss_scale_factor = 12 has no effect: the loss aggregation is 'token-mean'"):
        build_objective("dapo", loss_scale_factor=12)
    with pytest.warns(UserWarning, match=r"aggregation is 'seq-mean-token-mean'"):
        build_objective({"method": "grpo", "loss_scale_factor": 12})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build_objective("dr_grpo", loss_scale_factor=12).loss_scale_factor == 12.0


def test_a_part_without_a_docstring_cites_its_paper(monkeypatch):
    from entrorl.objective import parts

    monkeypatch.setattr(parts, "_REGISTRY", {kind: dict(registry) for kind, registry in parts._REGISTRY.items()})

    @register_part("undocumented", description="x", paper="arXiv 0000.00000")
    class _Undocumented(Selector):
        pass

    assert _Undocumented.__doc__ == "Paper: arXiv 0000.00000."


def _stateful_parts_batch(step, *, entropy_scale, requires_grad):
    generator = torch.Generator().manual_seed(100 + (step or 0) + int(10 * entropy_scale))
    log_prob = (-torch.rand(4, 8, generator=generator)).requires_grad_(requires_grad)
    entropy = (torch.rand(4, 8, generator=generator) * entropy_scale).requires_grad_(requires_grad)
    return PolicyBatch(log_prob=log_prob, old_log_prob=log_prob.detach(), advantages=torch.randn(4, generator=generator),
                       mask=torch.ones(4, 8, dtype=torch.bool), entropy=entropy, step=step)


@pytest.mark.parametrize("no_gradients", [torch.no_grad, torch.inference_mode])
def test_a_call_without_gradients_leaves_the_parts_state_as_it_found_it(no_gradients):
    """A validation or metrics-only pass (no update follows) between training steps: the adaptive entropy
    controller took its high-entropy batch for a step (and closed the step being measured), and a seeded Clip-Cov
    drew from its generator, so the training that followed differed from the same training without those passes."""
    methods = {"adaptive_entropy": {"delta": 1e-3},
               "clip_cov": {"seed": 0, "clip_cov_ratio": 0.2, "clip_cov_lb": -100.0, "clip_cov_ub": 100.0}}
    for method, params in methods.items():
        plain, watched = build_objective(method, **params), build_objective(method, **params)
        for step in range(4):
            batch = _stateful_parts_batch(step, entropy_scale=0.1, requires_grad=True)
            alone, beside = plain(batch), watched(batch)
            assert alone.metrics == beside.metrics and torch.equal(alone.trained_mask, beside.trained_mask), (method, step)
            with no_gradients():
                watched(_stateful_parts_batch(None, entropy_scale=2.0, requires_grad=False))
            assert watched.state_dict().keys() == plain.state_dict().keys()
        assert plain.end_step() == watched.end_step()
