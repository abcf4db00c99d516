"""The entropy-dynamics theorems, checked by finite differences in float64 (entrorl.dynamics)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from entrorl import dynamics as dyn
from entrorl.tokens import token_stats

F64 = torch.float64
EPSILONS = (1e-3, 1e-4)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_logits(rows: int, vocab: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=_gen(seed), dtype=F64) * scale


def _np_entropy(z: np.ndarray) -> float:
    z = z - z.max()
    p = np.exp(z) / np.exp(z).sum()
    return float(-(p * np.log(p)).sum())


def _chosen_tokens(logits_row: torch.Tensor) -> list[int]:
    """Most likely, least likely and a middle token: both signs of S, both ends of p."""
    order = torch.argsort(logits_row)
    return [int(order[-1]), int(order[0]), int(order[len(order) // 2])]


def _assert_second_order(measured: dict[float, float], predicted: dict[float, float], c2: float = 5.0) -> None:
    """|measured - predicted| <= c2 eps^2, and the error shrinks quadratically (relative error linearly).

    A first-order mistake (wrong sign, missing term) leaves an error ~ eps, whose ratio between the two
    step sizes is ~10 instead of >= ~100, and which exceeds c2 eps^2 for any sizeable prediction.
    """
    e_big, e_small = EPSILONS
    err_big = abs(measured[e_big] - predicted[e_big])
    err_small = abs(measured[e_small] - predicted[e_small])
    for eps, err in ((e_big, err_big), (e_small, err_small)):
        assert err <= c2 * eps * eps, (eps, err, measured[eps], predicted[eps])
    # relative error shrinks linearly: the absolute error by ~100 between the two eps (10x each side
    # of the relative one). Allow slack, and a float64 noise floor for (rare) near-zero curvature.
    noise = 1e-13
    if err_small > noise:
        assert err_big / err_small > 50.0, (err_big, err_small)
    rel_big = err_big / max(abs(predicted[e_big]), 1e-300)
    rel_small = err_small / max(abs(predicted[e_small]), 1e-300)
    if err_small > noise:
        assert rel_big / rel_small > 5.0, (rel_big, rel_small)
    # the prediction is not trivially zero: it carries the first-order change
    assert abs(predicted[e_small]) > 10 * err_small or abs(predicted[e_small]) < 1e-14


# ------------------------------------------------------------------------------------------------------
# basic quantities


def test_entropy_and_discriminator_against_numpy():
    z = _random_logits(4, 7, seed=0)
    h = dyn.entropy(z)
    s = dyn.vocab_discriminator(z)
    es = dyn.expected_discriminator(z)
    for i in range(z.shape[0]):
        zi = z[i].numpy()
        p = np.exp(zi - zi.max())
        p /= p.sum()
        hi = -(p * np.log(p)).sum()
        si = p * (np.log(p) + hi)
        assert h[i].item() == pytest.approx(hi, abs=1e-13)
        np.testing.assert_allclose(s[i].numpy(), si, atol=1e-14)
        assert es[i].item() == pytest.approx(float((p * si).sum()), abs=1e-14)
        # sum_v S_v = 0 (S is p-weighted log p centred at -H)
        assert abs(s[i].sum().item()) < 1e-13
    assert h.shape == (4,) and s.shape == (4, 7) and es.shape == (4,)


def test_leading_dimensions_and_dtypes():
    z = torch.randn(2, 3, 11, generator=_gen(1), dtype=F64)
    assert dyn.entropy(z).shape == (2, 3)
    assert dyn.vocab_discriminator(z).shape == (2, 3, 11)
    assert dyn.expected_discriminator(z).shape == (2, 3)
    assert dyn.centered_vocab_discriminator(z).shape == (2, 3, 11)
    tokens = torch.randint(0, 11, (2, 3), generator=_gen(2))
    s_k, d_k = dyn.token_discriminators(z, tokens)
    assert s_k.shape == (2, 3) and d_k.shape == (2, 3)
    for narrow in (torch.int16, torch.int32):  # token ids of any integer dtype index the vocabulary
        s_n, d_n = dyn.token_discriminators(z, tokens.to(narrow))
        assert torch.equal(s_n, s_k) and torch.equal(d_n, d_k)
    assert dyn.entropy(z.float()).dtype == torch.float32
    assert dyn.entropy(z.to(torch.bfloat16)).dtype == torch.float32
    assert dyn.entropy(z).dtype == F64


def test_entropy_is_differentiable():
    z = _random_logits(3, 9, seed=3).requires_grad_(True)
    dyn.entropy(z).sum().backward()
    # dH/dz_k = -S_k (Theorem 3.2 is exactly this derivative)
    torch.testing.assert_close(z.grad, -dyn.vocab_discriminator(z.detach()), atol=1e-13, rtol=0)


def test_centred_discriminator_brute_force_double_loop():
    z = torch.tensor([0.3, -1.2, 2.0, 0.0, -0.4], dtype=F64)
    V = z.numel()
    p = [math.exp(float(v)) for v in z]
    total = sum(p)
    p = [x / total for x in p]
    H = 0.0
    for v in range(V):
        H -= p[v] * math.log(p[v])
    S = [p[v] * (math.log(p[v]) + H) for v in range(V)]
    D_brute = []
    for k in range(V):
        baseline = 0.0
        for v in range(V):
            baseline += p[v] * S[v]
        D_brute.append(S[k] - baseline)
    D = dyn.centered_vocab_discriminator(z)
    np.testing.assert_allclose(D.numpy(), np.array(D_brute), atol=1e-15)
    # and the p^2 form: sum_v p_v S_v = sum_v p_v^2 (log p_v + H)
    es2 = sum(p[v] ** 2 * (math.log(p[v]) + H) for v in range(V))
    assert dyn.expected_discriminator(z).item() == pytest.approx(es2, abs=1e-15)
    s_k, d_k = dyn.token_discriminators(z.expand(V, V), torch.arange(V))
    np.testing.assert_allclose(s_k.numpy(), np.array(S), atol=1e-15)
    np.testing.assert_allclose(d_k.numpy(), np.array(D_brute), atol=1e-15)


# ------------------------------------------------------------------------------------------------------
# Theorem 3.2 (arXiv 2602.03392): single-logit perturbation


@pytest.mark.parametrize("vocab", [5, 50, 1000])
def test_theorem_3_2_single_logit(vocab):
    z = _random_logits(3, vocab, seed=10 + vocab)
    S = dyn.vocab_discriminator(z)
    h0 = dyn.entropy(z)
    checked_signs = set()
    for row in range(z.shape[0]):
        for k in _chosen_tokens(z[row]):
            measured, predicted = {}, {}
            for eps in EPSILONS:
                z1 = z[row].clone()
                z1[k] += eps
                measured[eps] = (dyn.entropy(z1) - h0[row]).item()
                predicted[eps] = float(dyn.predicted_entropy_change_logit(S[row, k], eps))
                # a flipped sign would be off by 2 eps |S|: make sure the test can see that
                assert abs(measured[eps] + predicted[eps]) > 10 * abs(measured[eps] - predicted[eps])
            _assert_second_order(measured, predicted)
            checked_signs.add(bool(S[row, k] > 0))
    assert checked_signs == {True, False}


def test_theorem_3_2_negative_epsilon():
    z = _random_logits(1, 20, seed=4)[0]
    S = dyn.vocab_discriminator(z)
    k = int(z.argmax())
    measured, predicted = {}, {}
    for eps in EPSILONS:
        z1 = z.clone()
        z1[k] -= eps
        measured[eps] = (dyn.entropy(z1) - dyn.entropy(z)).item()
        predicted[eps] = float(dyn.predicted_entropy_change_logit(S[k], -eps))
    assert predicted[EPSILONS[0]] > 0  # penalising the confident token raises the entropy
    _assert_second_order(measured, predicted)


# ------------------------------------------------------------------------------------------------------
# Theorem 3.3: one policy-gradient step on the sampled token


@pytest.mark.parametrize("vocab", [5, 50, 1000])
def test_theorem_3_3_pg_step(vocab):
    z = _random_logits(3, vocab, seed=20 + vocab)
    p = torch.softmax(z, dim=-1)
    D = dyn.centered_vocab_discriminator(z)
    S = dyn.vocab_discriminator(z)
    h0 = dyn.entropy(z)
    for row in range(z.shape[0]):
        for k in _chosen_tokens(z[row]):
            e_k = torch.zeros(vocab, dtype=F64)
            e_k[k] = 1.0
            for sign in (1.0, -1.0):  # positive and negative advantage
                measured, predicted = {}, {}
                for a in EPSILONS:
                    alpha = sign * a
                    z1 = z[row] + alpha * (e_k - p[row])
                    measured[a] = (dyn.entropy(z1) - h0[row]).item()
                    predicted[a] = float(dyn.predicted_entropy_change_pg(D[row, k], alpha))
                    # using S_k instead of D_k is a first-order error the test must see ...
                    wrong = float(dyn.predicted_entropy_change_logit(S[row, k], alpha))
                    if abs(wrong - predicted[a]) > 1e-3 * a:
                        assert abs(measured[a] - wrong) > 10 * abs(measured[a] - predicted[a])
                _assert_second_order(measured, predicted)


def test_pg_step_alpha_and_autograd_step():
    assert float(dyn.pg_step_alpha(1e-3, 2.0)) == pytest.approx(2e-3)
    assert float(dyn.pg_step_alpha(1e-3, 2.0, ratio=0.5)) == pytest.approx(1e-3)
    adv = torch.tensor([1.0, -2.0], dtype=F64)
    ratio = torch.tensor([1.1, 0.9], dtype=F64, requires_grad=True)
    alpha = dyn.pg_step_alpha(0.1, adv, ratio)
    assert not alpha.requires_grad
    torch.testing.assert_close(alpha, torch.tensor([0.11, -0.18], dtype=F64))
    # with temperature: the raw logits follow the gradient of r A log softmax(z / T)[k]
    for T in (1.0, 0.7, 1.5):
        z = _random_logits(1, 30, seed=5)[0]
        k = int(torch.argsort(z)[20])
        lr, A, r = 1.0, 0.8, 1.05
        S_k, D_k = dyn.token_discriminators(z, torch.tensor(k), temperature=T)
        measured, predicted = {}, {}
        for scale in EPSILONS:
            zz = z.clone().requires_grad_(True)
            (r * A * torch.log_softmax(zz / T, dim=-1)[k]).backward()
            z1 = z + scale * lr * zz.grad
            measured[scale] = dyn.measured_entropy_change(z, z1, temperature=T).item()
            alpha = dyn.pg_step_alpha(scale * lr, A, ratio=r, temperature=T)
            predicted[scale] = float(dyn.predicted_entropy_change_pg(D_k, alpha))
        _assert_second_order(measured, predicted)


# ------------------------------------------------------------------------------------------------------
# Corollary 3.4: on-policy expectation of D is zero


@pytest.mark.parametrize("vocab", [2, 5, 50, 1000])
def test_corollary_3_4_on_policy_mean_is_zero(vocab):
    z = _random_logits(8, vocab, seed=30 + vocab, scale=3.0)
    p = torch.softmax(z, dim=-1)
    D = dyn.centered_vocab_discriminator(z)
    S = dyn.vocab_discriminator(z)
    torch.testing.assert_close((p * D).sum(-1), torch.zeros(8, dtype=F64), atol=1e-12, rtol=0)
    # ... while S itself is not centred under p (so the check is not vacuous)
    assert (p * S).sum(-1).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------------
# Lemma 1, Theorems 1 and 2 (arXiv 2505.22617)


@pytest.mark.parametrize("vocab", [5, 50, 1000])
def test_lemma_1_general_logit_change(vocab):
    z = _random_logits(4, vocab, seed=40 + vocab)
    direction = torch.randn(4, vocab, generator=_gen(41), dtype=F64)
    h0 = dyn.entropy(z)
    for row in range(4):
        measured, predicted = {}, {}
        for eps in EPSILONS:
            dz = eps * direction[row]
            measured[eps] = (dyn.entropy(z[row] + dz) - h0[row]).item()
            predicted[eps] = dyn.predicted_entropy_change_logits(z[row], dz).item()
        _assert_second_order(measured, predicted)
    # covariance form against a direct E[XY] - E[X]E[Y]
    p = torch.softmax(z, -1)
    logp = torch.log_softmax(z, -1)
    cov = (p * logp * direction).sum(-1) - (p * logp).sum(-1) * (p * direction).sum(-1)
    torch.testing.assert_close(dyn.predicted_entropy_change_logits(z, direction), -cov, atol=1e-12, rtol=0)


def test_lemma_1_reduces_to_theorems_3_2_and_3_3():
    z = _random_logits(2, 13, seed=6)
    p = torch.softmax(z, -1)
    S = dyn.vocab_discriminator(z)
    D = dyn.centered_vocab_discriminator(z)
    for k in range(13):
        e_k = torch.zeros_like(z)
        e_k[:, k] = 1.0
        torch.testing.assert_close(dyn.predicted_entropy_change_logits(z, 0.3 * e_k), -0.3 * S[:, k])
        torch.testing.assert_close(dyn.predicted_entropy_change_logits(z, 0.3 * (e_k - p)), -0.3 * D[:, k])


@pytest.mark.parametrize("vocab", [5, 50, 1000])
def test_theorems_1_and_2_vanilla_and_natural_pg(vocab):
    z = _random_logits(3, vocab, seed=50 + vocab)
    A = torch.randn(3, vocab, generator=_gen(51), dtype=F64)
    # make the advantage correlate with probability in one row (a collapse-prone update)
    A[0] = A[0] + z[0]
    p = torch.softmax(z, -1)
    h0 = dyn.entropy(z)
    for row in range(3):
        for kind, update, predict in (
            ("vanilla", lambda lr, r: lr * p[r] * A[r], dyn.predicted_entropy_change_vanilla_pg),
            ("natural", lambda lr, r: lr * A[r], dyn.predicted_entropy_change_natural_pg),
        ):
            measured, predicted = {}, {}
            for lr in EPSILONS:
                measured[lr] = (dyn.entropy(z[row] + update(lr, row)) - h0[row]).item()
                predicted[lr] = predict(z[row], A[row], lr).item()
            _assert_second_order(measured, predicted)
    # the two theorems are different statements: each one's prediction misses the other's update
    lr = 1e-4
    meas_vanilla = (dyn.entropy(z[0] + lr * p[0] * A[0]) - h0[0]).item()
    pred_natural = dyn.predicted_entropy_change_natural_pg(z[0], A[0], lr).item()
    pred_vanilla = dyn.predicted_entropy_change_vanilla_pg(z[0], A[0], lr).item()
    assert abs(meas_vanilla - pred_natural) > 100 * abs(meas_vanilla - pred_vanilla)
    # rewarding probable actions (A grows with z) lowers the entropy under natural PG
    assert dyn.predicted_entropy_change_natural_pg(z[0], z[0], lr).item() < 0


# ------------------------------------------------------------------------------------------------------
# sign facts


def test_sign_of_s_is_sign_of_p_minus_exp_minus_h():
    z = torch.randn(200, 40, generator=_gen(60), dtype=F64) * torch.rand(200, 1, generator=_gen(61), dtype=F64) * 5
    p = torch.softmax(z, -1)
    h = dyn.entropy(z)
    S = dyn.vocab_discriminator(z)
    margin = p.log() + h.unsqueeze(-1)
    clear = margin.abs() > 1e-9
    assert clear.sum() > 7000
    assert torch.equal((S > 0)[clear], (p > torch.exp(-h).unsqueeze(-1))[clear])
    assert (S > 0).any() and (S < 0).any()


# ------------------------------------------------------------------------------------------------------
# temperature


@pytest.mark.parametrize("T", [0.3, 0.7, 1.0, 2.5])
def test_temperature_equals_scaled_logits(T):
    z = _random_logits(3, 17, seed=70)
    dz = torch.randn(3, 17, generator=_gen(71), dtype=F64)
    A = torch.randn(3, 17, generator=_gen(72), dtype=F64)
    zs = z / T
    pairs = [
        (dyn.entropy(z, T), dyn.entropy(zs)),
        (dyn.vocab_discriminator(z, T), dyn.vocab_discriminator(zs)),
        (dyn.expected_discriminator(z, T), dyn.expected_discriminator(zs)),
        (dyn.centered_vocab_discriminator(z, T), dyn.centered_vocab_discriminator(zs)),
        (dyn.measured_entropy_change(z, z + dz, T), dyn.measured_entropy_change(zs, zs + dz / T)),
        # Lemma 1 takes the raw-logit change and divides by T itself
        (dyn.predicted_entropy_change_logits(z, dz, T), dyn.predicted_entropy_change_logits(zs, dz / T)),
        # Theorems 1-2 act on the softmax's own logits theta = z / T
        (dyn.predicted_entropy_change_vanilla_pg(z, A, 0.1, T), dyn.predicted_entropy_change_vanilla_pg(zs, A, 0.1)),
        (dyn.predicted_entropy_change_natural_pg(z, A, 0.1, T), dyn.predicted_entropy_change_natural_pg(zs, A, 0.1)),
    ]
    for with_t, on_scaled in pairs:
        torch.testing.assert_close(with_t, on_scaled, atol=1e-12, rtol=1e-10)
    if T != 1.0:  # the temperature is really used
        assert (dyn.entropy(z, T) - dyn.entropy(z)).abs().max() > 1e-3


@pytest.mark.parametrize("T", [0.5, 2.0])
def test_temperature_lemma_1_matches_measured_raw_change(T):
    z = _random_logits(2, 30, seed=73)
    direction = torch.randn(2, 30, generator=_gen(74), dtype=F64)
    for row in range(2):
        measured, predicted = {}, {}
        for eps in EPSILONS:
            dz = eps * direction[row]
            measured[eps] = dyn.measured_entropy_change(z[row], z[row] + dz, T).item()
            predicted[eps] = dyn.predicted_entropy_change_logits(z[row], dz, T).item()
        _assert_second_order(measured, predicted, c2=5.0 / T**2)
    # forgetting the 1/T would be a first-order error
    wrong = dyn.predicted_entropy_change_logits(z[0] / T, 1e-4 * direction[0]).item()
    right = dyn.predicted_entropy_change_logits(z[0], 1e-4 * direction[0], T).item()
    assert abs(wrong - right) > 0.1 * abs(right)


def test_invalid_temperature():
    z = torch.zeros(4, dtype=F64)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            dyn.entropy(z, bad)
        # the step size too: a negative T would pass through T^2 unnoticed, T = 0 would divide by zero
        with pytest.raises(ValueError, match="temperature"):
            dyn.pg_step_alpha(0.1, torch.tensor([1.0, -2.0]), temperature=bad)
        with pytest.raises(ValueError, match="temperature"):
            dyn.predicted_entropy_change_logits(z, torch.ones(4, dtype=F64), bad)


def test_logits_must_be_a_tensor_with_a_vocabulary_dimension():
    with pytest.raises(ValueError, match="at least one dimension"):
        dyn.entropy(torch.tensor(1.0, dtype=F64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        dyn.entropy(np.zeros(4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        dyn.vocab_discriminator([0.0, 1.0])


def test_low_precision_logit_change_is_divided_by_the_temperature_at_full_precision():
    """float64 logits are computed in float64: a bfloat16 delta_logits is converted before it is divided by T."""
    z = _random_logits(2, 30, seed=75)
    delta = torch.randn(2, 30, generator=_gen(76), dtype=F64).to(torch.bfloat16)
    got = dyn.predicted_entropy_change_logits(z, delta, 0.7)
    assert got.dtype == F64
    torch.testing.assert_close(got, dyn.predicted_entropy_change_logits(z, delta.double(), 0.7), atol=1e-14, rtol=0)


# ------------------------------------------------------------------------------------------------------
# -inf (masked) and huge logits


def _masked_logits():
    z = _random_logits(3, 12, seed=80)
    masked = torch.zeros(3, 12, dtype=torch.bool)
    masked[0, [1, 4, 5]] = True
    masked[1, 0] = True
    masked[2, [2, 3, 7, 8, 9, 10]] = True
    return z.masked_fill(masked, float("-inf")), z, masked


def test_masked_logits_are_finite_and_equal_the_restricted_distribution():
    zm, z, masked = _masked_logits()
    H = dyn.entropy(zm)
    S = dyn.vocab_discriminator(zm)
    ES = dyn.expected_discriminator(zm)
    D = dyn.centered_vocab_discriminator(zm)
    for t in (H, S, ES, D):
        assert torch.isfinite(t).all()
    assert (S[masked] == 0).all()
    for row in range(3):
        keep = ~masked[row]
        sub = z[row][keep]
        assert H[row].item() == pytest.approx(_np_entropy(sub.numpy()), abs=1e-13)
        torch.testing.assert_close(S[row][keep], dyn.vocab_discriminator(sub))
        torch.testing.assert_close(D[row][keep], dyn.centered_vocab_discriminator(sub))
        assert ES[row].item() == pytest.approx(dyn.expected_discriminator(sub).item(), abs=1e-14)
    # Corollary 3.4 still holds
    p = torch.softmax(zm, -1)
    torch.testing.assert_close((p * D).sum(-1), torch.zeros(3, dtype=F64), atol=1e-12, rtol=0)
    # gradients stay finite
    zg = zm.clone().requires_grad_(True)
    dyn.entropy(zg).sum().backward()
    assert torch.isfinite(zg.grad).all()
    assert (zg.grad[masked] == 0).all()


def test_theorems_hold_on_unmasked_entries():
    zm, _, masked = _masked_logits()
    p = torch.softmax(zm, -1)
    S = dyn.vocab_discriminator(zm)
    D = dyn.centered_vocab_discriminator(zm)
    h0 = dyn.entropy(zm)
    for row in range(3):
        for k in torch.nonzero(~masked[row]).flatten().tolist()[:4]:
            e_k = torch.zeros(12, dtype=F64)
            e_k[k] = 1.0
            m32, p32, m33, p33 = {}, {}, {}, {}
            for eps in EPSILONS:
                m32[eps] = (dyn.entropy(zm[row] + eps * e_k) - h0[row]).item()
                p32[eps] = float(dyn.predicted_entropy_change_logit(S[row, k], eps))
                z1 = zm[row] + eps * (e_k - p[row])  # -inf + 0 stays -inf
                m33[eps] = (dyn.entropy(z1) - h0[row]).item()
                p33[eps] = float(dyn.predicted_entropy_change_pg(D[row, k], eps))
            _assert_second_order(m32, p32)
            _assert_second_order(m33, p33)
    # Lemma 1 with arbitrary (finite or not) values at masked entries: they carry no weight
    direction = torch.randn(3, 12, generator=_gen(81), dtype=F64)
    garbage = direction.masked_fill(masked, float("nan"))
    pred = dyn.predicted_entropy_change_logits(zm, 1e-4 * garbage)
    assert torch.isfinite(pred).all()
    meas = dyn.measured_entropy_change(zm, zm + 1e-4 * direction.masked_fill(masked, 0.0))
    torch.testing.assert_close(pred, meas, atol=1e-7, rtol=0)
    A = torch.randn(3, 12, generator=_gen(82), dtype=F64).masked_fill(masked, float("inf"))
    assert torch.isfinite(dyn.predicted_entropy_change_natural_pg(zm, A, 1e-3)).all()
    assert torch.isfinite(dyn.predicted_entropy_change_vanilla_pg(zm, A, 1e-3)).all()


def test_masked_logit_perturbation_changes_nothing():
    zm, _, masked = _masked_logits()
    k = int(torch.nonzero(masked[0])[0])
    z1 = zm[0].clone()
    z1[k] += 1e-3
    assert dyn.measured_entropy_change(zm[0], z1).item() == 0.0
    assert dyn.vocab_discriminator(zm)[0, k].item() == 0.0


def test_fully_masked_row_gives_zeros():
    z = torch.full((2, 5), float("-inf"), dtype=F64)
    z[1, 2] = 0.0  # a single allowed token: p = 1, H = 0
    assert torch.equal(dyn.entropy(z), torch.zeros(2, dtype=F64))
    assert torch.equal(dyn.vocab_discriminator(z), torch.zeros(2, 5, dtype=F64))
    assert torch.isfinite(dyn.centered_vocab_discriminator(z)).all()
    # ... and so do the gradients through every helper, as tokens.token_stats gives for the same row
    delta = torch.randn(2, 5, generator=_gen(83), dtype=F64)
    for quantity in (dyn.entropy, dyn.vocab_discriminator, dyn.centered_vocab_discriminator,
                     lambda logits: dyn.predicted_entropy_change_logits(logits, delta),
                     lambda logits: dyn.predicted_entropy_change_natural_pg(logits, delta, 0.1),
                     lambda logits: dyn.predicted_entropy_change_vanilla_pg(logits, delta, 0.1)):
        zg = z.clone().requires_grad_(True)
        quantity(zg).sum().backward()
        assert torch.equal(zg.grad[0], torch.zeros(5, dtype=F64))
        assert torch.isfinite(zg.grad).all()


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_plus_inf_or_nan_logit_gives_nan_not_a_distribution(bad):
    # masking is -inf only: a +inf (an overflow) or NaN logit must not pass for a masked row's H = 0
    z = _random_logits(2, 6, seed=84)
    z[0, 2] = bad
    H = dyn.entropy(z)
    assert torch.isnan(H[0]) and torch.isfinite(H[1])
    stats = token_stats(z, torch.tensor([2, 3]))
    assert torch.isnan(stats.entropy[0]) and torch.isfinite(stats.entropy[1])


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_huge_logits_are_finite(dtype):
    z = torch.tensor([[1e4, -1e4, 0.0, 1e4], [-1e4, -1e4, -1e4, -1e4 + 1.0]], dtype=dtype)
    H = dyn.entropy(z)
    S = dyn.vocab_discriminator(z)
    D = dyn.centered_vocab_discriminator(z)
    dz = torch.ones_like(z)
    for t in (H, S, D, dyn.expected_discriminator(z), dyn.predicted_entropy_change_logits(z, dz)):
        assert torch.isfinite(t).all()
    assert H[0].item() == pytest.approx(math.log(2), abs=1e-6)
    p1 = torch.softmax(torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=F64), -1)
    assert H[1].item() == pytest.approx(float(-(p1 * p1.log()).sum()), abs=1e-6)
    assert torch.isfinite(dyn.entropy(z, temperature=0.05)).all()
    # a -inf entry has p = 0 even beside logits far below zero: the row is the distribution of its finite entries
    zm = torch.tensor([[-1e5, -1e5 + 1.0, float("-inf")]], dtype=dtype)
    p2 = torch.softmax(torch.tensor([0.0, 1.0], dtype=F64), -1)
    assert dyn.entropy(zm).item() == pytest.approx(float(-(p2 * p2.log()).sum()), abs=1e-6)
    S_restricted = dyn.vocab_discriminator(torch.tensor([0.0, 1.0], dtype=F64))
    torch.testing.assert_close(dyn.vocab_discriminator(zm)[0, :2].double(), S_restricted, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------------
# token covariance (Eq. 10) and its concentration (Table 1)


def _np_token_cov(lp: np.ndarray, adv: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = np.zeros_like(lp, dtype=np.float64)
    if mask.sum() == 0:
        return out
    mlp = lp[mask].mean()
    ma = adv[mask].mean()
    out[mask] = (lp[mask] - mlp) * (adv[mask] - ma)
    return out


@pytest.mark.parametrize("mask_kind", ["random", "all", "single", "empty", "int", "nonzero"])
def test_token_covariance_against_numpy(mask_kind):
    g = np.random.default_rng(90)
    lp = -np.abs(g.normal(size=(4, 9))) * 2
    adv = g.normal(size=(4, 9))
    if mask_kind in ("random", "int", "nonzero"):
        mask = g.random((4, 9)) < 0.6
    elif mask_kind == "all":
        mask = np.ones((4, 9), dtype=bool)
    elif mask_kind == "single":
        mask = np.zeros((4, 9), dtype=bool)
        mask[2, 5] = True
    else:
        mask = np.zeros((4, 9), dtype=bool)
    # garbage outside the mask must not leak in
    lp_in = np.where(mask, lp, np.nan)
    mask_t = torch.tensor(mask.astype(np.int64)) if mask_kind == "int" else torch.tensor(mask)
    lp_t = torch.tensor(lp_in, requires_grad=True)
    if mask_kind == "nonzero":  # a value other than 0 and 1 is no verdict on a token: refused, as PolicyBatch does
        with pytest.raises(ValueError, match="mask must be bool or hold only 0 and 1, got -2"):
            dyn.token_covariance(lp_t, torch.tensor(adv), torch.tensor(np.where(mask, -2, 0)))
        return
    c = dyn.token_covariance(lp_t, torch.tensor(adv), mask_t)
    assert c.dtype == torch.float32 and not c.requires_grad and c.shape == (4, 9)
    ref = _np_token_cov(lp, adv, mask)
    np.testing.assert_allclose(c.numpy(), ref, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(c).all()
    if mask_kind in ("single", "empty"):
        assert torch.equal(c, torch.zeros(4, 9))
    else:
        assert c.abs().max() > 0.01
        # mean of C over valid tokens is the population covariance of (log p, A)
        assert c[torch.tensor(mask)].double().mean().item() == pytest.approx(
            float(np.cov(lp[mask], adv[mask], bias=True)[0, 1]), abs=1e-6
        )


def test_token_covariance_flat_and_broadcast_advantages():
    g = torch.Generator().manual_seed(91)
    lp = -torch.rand(3, 5, generator=g, dtype=F64)
    seq_adv = torch.tensor([[1.0], [-0.5], [2.0]], dtype=F64)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    c = dyn.token_covariance(lp, seq_adv, mask)
    ref = _np_token_cov(lp.numpy(), np.broadcast_to(seq_adv.numpy(), (3, 5)), mask.numpy())
    np.testing.assert_allclose(c.numpy(), ref, rtol=1e-6, atol=1e-7)
    c_flat = dyn.token_covariance(lp[mask], seq_adv.expand(3, 5)[mask], torch.ones(int(mask.sum()), dtype=torch.bool))
    np.testing.assert_allclose(c_flat.numpy(), ref[mask.numpy()], rtol=1e-6, atol=1e-7)
    # a sign convention check: confident + rewarded tokens carry positive covariance
    c2 = dyn.token_covariance(torch.tensor([-0.1, -3.0]), torch.tensor([1.0, -1.0]), None)
    assert (c2 > 0).all()


def test_covariance_concentration_hand_example():
    n = 10_000
    cov = torch.zeros(n)
    cov[:5000] = 0.01
    cov[5000:] = -0.002  # overall mean = (50 - 10) / 10000 = 0.004 before the planted tokens
    cov[17] = 100.0
    cov[4242] = 60.0  # top 0.02% = exactly these 2 tokens: mean 80
    cov[100:118] = 10.0  # top 0.2% = 20 tokens: 100 + 60 + 18 * 10 = 340 -> mean 17
    # padding outside the mask must be ignored (including huge values)
    padded = torch.cat([cov, torch.full((50,), 1e6)])
    mask = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(50, dtype=torch.bool)])
    out = dyn.covariance_concentration(padded, mask)
    vals = cov.double()
    expected_mean = float(vals.mean())
    assert out.n_tokens == n
    assert out.overall_mean == pytest.approx(expected_mean, rel=1e-12)
    assert out.top_counts == {0.02: 2, 0.2: 20, 2.0: 200, 20.0: 2000}
    assert out.top_means[0.02] == pytest.approx(80.0, rel=1e-12)
    assert out.top_means[0.2] == pytest.approx((100 + 60 + 18 * 10) / 20, rel=1e-6)
    assert out.top_means[2.0] == pytest.approx((160 + 180 + 180 * 0.01) / 200, rel=1e-6)
    top20 = torch.sort(vals, descending=True).values[:2000].mean().item()
    assert out.top_means[20.0] == pytest.approx(top20, rel=1e-12)
    assert out.ratios[0.02] == pytest.approx(80.0 / expected_mean, rel=1e-9)
    assert out.ratios[0.02] > 1000  # the paper's ">1000x"
    d = out.to_dict()
    assert d["cov/top_0.02pct_mean"] == pytest.approx(80.0)
    assert d["cov/top_0.02pct_ratio"] == pytest.approx(80.0 / expected_mean, rel=1e-9)
    assert d["cov/mean"] == pytest.approx(expected_mean)
    assert d["cov/n_tokens"] == float(n)
    assert set(d) == {
        "cov/mean", "cov/n_tokens",
        "cov/top_0.02pct_mean", "cov/top_0.02pct_ratio", "cov/top_0.2pct_mean", "cov/top_0.2pct_ratio",
        "cov/top_2pct_mean", "cov/top_2pct_ratio", "cov/top_20pct_mean", "cov/top_20pct_ratio",
    }
    assert all(type(v) is float for v in d.values())
    json.loads(json.dumps(d))


def test_covariance_concentration_edge_cases():
    # at least one token, ratio nan for a non-positive mean
    out = dyn.covariance_concentration(torch.tensor([3.0, -1.0, -2.0]), torch.tensor([1, 1, 1]))
    assert out.top_counts[0.02] == 1 and out.top_means[0.02] == 3.0
    assert out.overall_mean == 0.0 and math.isnan(out.ratios[0.02])
    out = dyn.covariance_concentration(torch.tensor([-3.0, -1.0]), None, top_percents=(50.0,))
    assert out.top_means[50.0] == -1.0 and math.isnan(out.ratios[50.0])
    # the flat metrics carry the same nan ratio (not top / mean = 1.0), and a zero mean gives nan, not an error
    assert out.to_dict()["cov/top_50pct_mean"] == -1.0 and math.isnan(out.to_dict()["cov/top_50pct_ratio"])
    zero_mean = dyn.covariance_concentration(torch.tensor([3.0, -1.0, -2.0]), None, top_percents=(50.0,)).to_dict()
    assert zero_mean["cov/mean"] == 0.0 and zero_mean["cov/top_50pct_mean"] == 3.0
    assert math.isnan(zero_mean["cov/top_50pct_ratio"])
    # empty
    out = dyn.covariance_concentration(torch.tensor([1.0, 2.0]), torch.tensor([False, False]))
    assert out.n_tokens == 0 and math.isnan(out.overall_mean) and math.isnan(out.top_means[2.0])
    assert out.to_dict()["cov/n_tokens"] == 0.0
    for bad in (0.0, -2.0, 100.5, 150.0):
        with pytest.raises(ValueError, match="top_percents"):
            dyn.covariance_concentration(torch.tensor([1.0]), None, top_percents=(bad,))
    # the top 100% is every valid token
    out = dyn.covariance_concentration(torch.tensor([3.0, -1.0, 1.0, 7.0]), torch.tensor([1, 1, 1, 0]),
                                       top_percents=(100.0,))
    assert out.top_counts[100.0] == 3 and out.top_means[100.0] == pytest.approx(1.0) and out.ratios[100.0] == 1.0
    # end to end with token_covariance: 10000 tokens, two confident rewarded outliers
    lp = torch.full((100, 100), -1.0)
    adv = torch.zeros(100, 100)
    lp[3, 7], adv[3, 7] = -0.01, 5.0
    lp[50, 1], adv[50, 1] = -0.02, 5.0
    c = dyn.token_covariance(lp, adv, torch.ones(100, 100, dtype=torch.bool))
    out = dyn.covariance_concentration(c, torch.ones(100, 100))
    assert out.top_counts[0.02] == 2
    assert out.top_means[0.02] == pytest.approx(float(c[3, 7] + c[50, 1]) / 2, rel=1e-6)
    assert out.ratios[0.02] > 1000


# ------------------------------------------------------------------------------------------------------
# batch prediction


def test_batch_predicted_entropy_change():
    D = torch.tensor([[0.1, -0.2, 0.3], [0.05, 9.0, -0.4]], dtype=F64)
    alpha = torch.tensor([[1.0, 2.0, -1.0], [0.5, 7.0, 1.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 1]])
    total = -(0.1 * 1 - 0.2 * 2 - 0.3 + 0.05 * 0.5 - 0.4)
    assert dyn.batch_predicted_entropy_change(D, alpha, mask, "sum").item() == pytest.approx(total)
    assert dyn.batch_predicted_entropy_change(D, alpha, mask).dtype == F64  # float64 in, float64 out
    assert dyn.batch_predicted_entropy_change(D.float(), alpha, mask).dtype == torch.float32
    assert dyn.batch_predicted_entropy_change(D, alpha, mask).item() == pytest.approx(total / 5)
    assert dyn.batch_predicted_entropy_change(D, 0.5, mask, "sum").item() == pytest.approx(
        -0.5 * (0.1 - 0.2 + 0.3 + 0.05 - 0.4)
    )
    assert dyn.batch_predicted_entropy_change(D, alpha, torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError):
        dyn.batch_predicted_entropy_change(D, alpha, mask, "max")


def test_batch_prediction_matches_tabular_batch_update():
    # independent positions (tabular): each row's logits get its own token's PG step; the mean entropy
    # change over valid rows matches the batch prediction to second order
    z = _random_logits(16, 40, seed=100)
    tokens = torch.multinomial(torch.softmax(z, -1), 1, generator=_gen(101)).squeeze(-1)
    adv = torch.randn(16, generator=_gen(102), dtype=F64)
    mask = torch.ones(16, dtype=torch.bool)
    mask[[3, 9]] = False
    _, D_k = dyn.token_discriminators(z, tokens)
    p = torch.softmax(z, -1)
    e = torch.nn.functional.one_hot(tokens, 40).to(F64)
    measured, predicted = {}, {}
    for lr in EPSILONS:
        alpha = dyn.pg_step_alpha(lr, adv)
        z1 = z + alpha.unsqueeze(-1) * (e - p)
        dh = dyn.measured_entropy_change(z, z1)
        measured[lr] = dh[mask].mean().item()
        predicted[lr] = dyn.batch_predicted_entropy_change(D_k, alpha, mask).item()
    _assert_second_order(measured, predicted)


def test_top_token_counts_are_floored():
    """The top q% of n tokens are max(1, floor(n q / 100)): 2% of 1234 is 24.68, so 24 tokens."""
    assert dyn.top_token_count(1234, 2.0) == 24
    concentration = dyn.covariance_concentration(torch.arange(1234, dtype=F64), None, top_percents=(2.0,))
    assert concentration.top_counts[2.0] == 24


def test_top_token_count_is_exact_despite_float_rounding_and_zero_for_no_tokens():
    """0.57% of 10,000 tokens is 57 and 2.3% of 3,000 is 69 exactly, although n * q / 100 evaluates just below
    the integer in floating point; the top q% of no tokens is no token."""
    assert dyn.top_token_count(10_000, 0.57) == 57
    assert dyn.top_token_count(3_000, 2.3) == 69
    concentration = dyn.covariance_concentration(torch.arange(10_000, dtype=F64), None, top_percents=(0.57,))
    assert concentration.top_counts[0.57] == 57
    assert dyn.top_token_count(0, 2.0) == 0
    assert dyn.top_token_count(1, 0.02) == 1 and dyn.top_token_count(7, 100.0) == 7


def test_covariance_concentration_keeps_float64_precision():
    """Means are taken in float64: values of a float64 covariance that differ below float32 resolution stay apart."""
    cov = torch.tensor([1.0 + 1e-10, 1.0, 1.0, 1.0], dtype=F64)
    out = dyn.covariance_concentration(cov, None, top_percents=(25.0,))
    assert out.top_means[25.0] == 1.0 + 1e-10
    assert out.overall_mean == pytest.approx(1.0 + 2.5e-11, abs=1e-15, rel=0)
    assert out.overall_mean != 1.0


def test_batch_prediction_of_low_precision_input_is_float32():
    """bfloat16 / float16 discriminators give a float32 batch prediction, with alpha kept at full precision."""
    D = torch.tensor([[0.1, -0.2, 0.3], [0.05, 9.0, -0.4]])
    alpha = torch.tensor([[1.001, 2.003, -1.007], [0.5, 7.0, 1.0009]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 1]])
    for dtype in (torch.bfloat16, torch.float16):
        low = D.to(dtype)
        expected = -(alpha * low.double())[mask.bool()]
        for reduction, want in (("sum", expected.sum()), ("mean", expected.mean())):
            got = dyn.batch_predicted_entropy_change(low, alpha, mask, reduction)
            assert got.dtype == torch.float32
            assert got.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-7)


def test_pg_step_alpha_is_the_signed_product():
    """alpha = lr * r * A / T^2 for either sign of lr and A, and a floating-point alpha for integer inputs."""
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    ratio = torch.tensor([0.9, 1.2, 1.0], dtype=F64)
    for lr in (1e-2, -1e-2):
        for T in (1.0, 0.6):
            torch.testing.assert_close(dyn.pg_step_alpha(lr, adv, ratio, temperature=T), lr * ratio * adv / T**2)
    integer = dyn.pg_step_alpha(1, torch.tensor([1, -2]))
    assert integer.is_floating_point()
    torch.testing.assert_close(integer, torch.tensor([1.0, -2.0], dtype=integer.dtype))


@pytest.mark.parametrize("mask_shape", [(4,), (6,), (4, 2), (1, 4, 6)])
def test_a_mask_that_is_not_per_token_or_per_sequence_is_refused(mask_shape):
    """A [B] mask would broadcast along the token axis (masking columns, not sequences): refused, as are shapes that
    do not broadcast, by each function that takes a mask."""
    values = torch.randn(4, 6, generator=torch.Generator().manual_seed(111), dtype=F64)
    mask = torch.ones(mask_shape, dtype=torch.bool)
    for name, call in (("token_covariance", lambda: dyn.token_covariance(values, values, mask)),
                       ("covariance_concentration", lambda: dyn.covariance_concentration(values, mask)),
                       ("batch_predicted_entropy_change", lambda: dyn.batch_predicted_entropy_change(values, 0.1, mask))):
        with pytest.raises(ValueError, match=rf"{name}: mask has shape {re.escape(str(mask_shape))}, the tokens \(4, 6\)"):
            call()


def test_sequence_level_mask_broadcasts_over_tokens():
    """A mask shaped [B, 1] (one flag per sequence) counts every token of a valid sequence: the same results as the
    expanded [B, T] mask in the covariance, its concentration and the batch prediction (a mean over B * T' tokens)."""
    g = torch.Generator().manual_seed(110)
    lp = -torch.rand(4, 6, generator=g, dtype=F64) * 3
    adv = torch.randn(4, 6, generator=g, dtype=F64)
    seq_mask = torch.tensor([[True], [False], [True], [True]])
    full_mask = seq_mask.expand(4, 6)
    c = dyn.token_covariance(lp, adv, seq_mask)
    torch.testing.assert_close(c, dyn.token_covariance(lp, adv, full_mask), atol=0, rtol=0)
    ref = _np_token_cov(lp.numpy(), adv.numpy(), full_mask.numpy())
    np.testing.assert_allclose(c.numpy(), ref, rtol=1e-6, atol=1e-7)
    conc = dyn.covariance_concentration(c, seq_mask, top_percents=(10.0,))
    assert conc.n_tokens == 18 and conc.top_counts[10.0] == 1
    assert conc.overall_mean == pytest.approx(float(c[full_mask].double().mean()), rel=1e-12)
    D = torch.randn(4, 6, generator=g, dtype=F64)
    got = dyn.batch_predicted_entropy_change(D, 0.5, seq_mask)
    assert got.item() == pytest.approx(-0.5 * D[full_mask].mean().item(), rel=1e-12)


def test_token_covariance_centres_float64_input_without_float32_rounding():
    """Means and centring are taken in float64: sequence-level log-probs near -1000 that differ by 1e-4 (below the
    float32 resolution there) still give the exact centred products, rounded to float32 only at the end."""
    lp = torch.tensor([1e-4, -2e-4, 3e-4, 0.0], dtype=F64) - 1000.0
    adv = torch.tensor([1.0, -1.0, 2.0, 0.0], dtype=F64)
    c = dyn.token_covariance(lp, adv, None)
    centred_lp = np.array([1e-4, -2e-4, 3e-4, 0.0]) - 0.5e-4
    expected = centred_lp * (adv.numpy() - 0.5)
    np.testing.assert_allclose(c.numpy(), expected, rtol=1e-6, atol=0)


def test_batch_prediction_of_float64_input_is_exact_in_float64():
    """float64 discriminators and step sizes are combined in float64: no rounding of alpha to float32."""
    D = torch.tensor([[0.1, -0.2, 0.3], [0.05, 9.0, -0.4]], dtype=F64)
    alpha = torch.full((2, 3), 1.0 / 3.0, dtype=F64) + torch.tensor([0.0, 1e-9, 2e-9], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    per_token = -(alpha * D)[mask.bool()]
    got_sum = dyn.batch_predicted_entropy_change(D, alpha, mask, "sum")
    got_mean = dyn.batch_predicted_entropy_change(D, alpha, mask)
    assert got_sum.dtype == F64 and got_mean.dtype == F64
    assert got_sum.item() == pytest.approx(per_token.sum().item(), rel=1e-14, abs=0)
    assert got_mean.item() == pytest.approx(per_token.mean().item(), rel=1e-14, abs=0)
    for bad in ("none", "max", ""):
        with pytest.raises(ValueError, match="reduction"):
            dyn.batch_predicted_entropy_change(D, alpha, mask, bad)


def test_natural_and_vanilla_pg_predictions_are_exact_in_float64_and_follow_the_logits_dtype():
    """Theorems 1-2 against the direct E[XY] - E[X]E[Y] covariance in float64 (advantages not rounded to float32),
    and float32 logits give a float32 prediction whatever the advantages' dtype."""
    z = _random_logits(3, 9, seed=111)
    A = torch.randn(3, 9, generator=_gen(112), dtype=F64) / 3.0
    p = torch.softmax(z, -1)
    logp = torch.log_softmax(z, -1)

    def cov(x):
        return (p * logp * x).sum(-1) - (p * logp).sum(-1) * (p * x).sum(-1)

    natural = dyn.predicted_entropy_change_natural_pg(z, A, 0.1)
    vanilla = dyn.predicted_entropy_change_vanilla_pg(z, A, 0.1)
    assert natural.dtype == F64 and vanilla.dtype == F64
    torch.testing.assert_close(natural, -0.1 * cov(A), atol=1e-15, rtol=1e-13)
    torch.testing.assert_close(vanilla, -0.1 * cov(p * A), atol=1e-15, rtol=1e-13)
    for predict in (dyn.predicted_entropy_change_natural_pg, dyn.predicted_entropy_change_vanilla_pg):
        low = predict(z.float(), A, 0.1)
        assert low.dtype == torch.float32
        torch.testing.assert_close(low, predict(z.float(), A.float(), 0.1))


def test_masked_entries_of_the_centred_discriminator_are_minus_the_baseline():
    """D at a masked (-inf) entry is the D a token with p = 0 would have: S = 0, so D = -E_p[S] (not 0)."""
    zm, _, masked = _masked_logits()
    D = dyn.centered_vocab_discriminator(zm)
    ES = dyn.expected_discriminator(zm)
    assert (ES.abs() > 1e-3).all()
    for row in range(3):
        torch.testing.assert_close(D[row][masked[row]], -ES[row].expand(int(masked[row].sum())), atol=1e-15, rtol=0)
    s_k, d_k = dyn.token_discriminators(zm, torch.tensor([1, 0, 2]))
    assert torch.equal(s_k, torch.zeros(3, dtype=F64))
    torch.testing.assert_close(d_k, -ES, atol=1e-15, rtol=0)


def test_dense_quantities_are_differentiable_by_finite_differences():
    """The dense functions' gradients w.r.t. the logits (with a temperature) agree with finite differences."""
    z = _random_logits(2, 5, seed=113).requires_grad_(True)
    A = torch.randn(2, 5, generator=_gen(114), dtype=F64)
    tokens = torch.tensor([1, 4])
    for quantity in (
        lambda x: dyn.entropy(x, 0.7),
        lambda x: dyn.vocab_discriminator(x, 0.7),
        lambda x: dyn.expected_discriminator(x, 0.7),
        lambda x: dyn.centered_vocab_discriminator(x, 0.7),
        lambda x: dyn.token_discriminators(x, tokens, 0.7),
        lambda x: dyn.predicted_entropy_change_logits(x, A, 0.7),
        lambda x: dyn.predicted_entropy_change_vanilla_pg(x, A, 0.3, 0.7),
        lambda x: dyn.predicted_entropy_change_natural_pg(x, A, 0.3, 0.7),
    ):
        assert torch.autograd.gradcheck(quantity, (z,), fast_mode=True)


def test_token_discriminators_reject_out_of_range_token_ids():
    """A token id outside [0, V) is an error, never silently read from another vocabulary entry."""
    z = _random_logits(2, 5, seed=115)
    for bad in (torch.tensor([0, 5]), torch.tensor([7, 1])):
        with pytest.raises((RuntimeError, IndexError)):
            dyn.token_discriminators(z, bad)


def test_covariance_concentration_of_no_tokens_counts_zero():
    """With no valid token the top q% is no token: count 0, mean and ratio nan, for every q."""
    out = dyn.covariance_concentration(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3, dtype=torch.bool))
    assert out.top_counts == {0.02: 0, 0.2: 0, 2.0: 0, 20.0: 0}
    assert all(math.isnan(v) for v in out.top_means.values()) and all(math.isnan(v) for v in out.ratios.values())


def test_a_python_float_step_size_keeps_float64_precision_and_a_tensor_learning_rate_is_detached():
    """A Python-float alpha meets float64 discriminators at float64 (not first rounded to float32): 3 x 1/3 is 1 to
    the last bit; pg_step_alpha is detached whatever carries a gradient, the learning rate included."""
    discriminators = torch.tensor([3.0], dtype=torch.float64)
    predicted = dyn.batch_predicted_entropy_change(discriminators, 1.0 / 3.0, None, "sum")
    assert predicted.dtype == torch.float64 and predicted.item() == -1.0
    lr = torch.tensor(0.1, requires_grad=True)
    alpha = dyn.pg_step_alpha(lr, torch.tensor([1.0, -2.0], requires_grad=True), ratio=torch.ones(2, requires_grad=True))
    assert not alpha.requires_grad
    torch.testing.assert_close(alpha, torch.tensor([0.1, -0.2]))


def test_a_masked_entry_contributes_zero_beside_a_logit_near_the_float32_maximum():
    """A -inf entry has p = 0 and log p taken as 0, whatever the other logits: next to a logit of 3e38 (its log p
    would overflow to -inf) the row is still the one-hot distribution of its finite entries, H = 0 and S = 0."""
    z = torch.tensor([[3e38, 0.0, float("-inf")]])
    assert dyn.entropy(z).item() == 0.0
    assert torch.equal(dyn.vocab_discriminator(z).abs(), torch.zeros(1, 3))
    assert dyn.predicted_entropy_change_logits(z, torch.ones(1, 3)).item() == 0.0


def test_an_infinite_advantage_where_p_underflows_to_zero_leaves_the_vanilla_pg_gradient_finite():
    """Theorem 1's update is p(a) A(a): an action whose probability underflows to 0 carries no weight even with an
    infinite advantage, in the prediction (the covariance of the other two actions) and in its gradient."""
    z = torch.tensor([0.0, 1.0, -1000.0], dtype=F64, requires_grad=True)
    advantages = torch.tensor([0.5, -1.0, float("inf")], dtype=F64)
    predicted = dyn.predicted_entropy_change_vanilla_pg(z, advantages, 0.1)
    predicted.backward()
    p = torch.softmax(z.detach()[:2], -1)
    logp = p.log()
    x = p * advantages[:2]
    expected = -0.1 * ((p * logp * x).sum() - (p * logp).sum() * (p * x).sum())
    assert predicted.item() == pytest.approx(expected.item(), rel=1e-12)
    assert torch.isfinite(z.grad).all() and z.grad[2].item() == 0.0


def test_per_sequence_values_given_without_their_token_axis_are_refused():
    """A [B] tensor of advantages (token_covariance) or step sizes (batch_predicted_entropy_change) beside [B, T]
    tokens would broadcast along the token axis, silently when B == T: refused, as a [B] mask is; [B, 1] is one value
    per sequence, and a scalar one for all."""
    logprob = -torch.arange(1.0, 10.0, dtype=torch.float64).reshape(3, 3) / 10
    per_sequence = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    with pytest.raises(ValueError,
                       match=r"token_covariance: advantages has shape \(3,\), the tokens \(3, 3\); .*\[B, 1\]"):
        dyn.token_covariance(logprob, per_sequence, None)
    expected = dyn.token_covariance(logprob, per_sequence[:, None].expand(3, 3).clone(), None)
    torch.testing.assert_close(dyn.token_covariance(logprob, per_sequence[:, None], None), expected)
    with pytest.raises(ValueError, match=r"batch_predicted_entropy_change: alpha has shape \(3,\)"):
        dyn.batch_predicted_entropy_change(logprob, per_sequence, None, "sum")
    column = dyn.batch_predicted_entropy_change(logprob, per_sequence[:, None], None, "sum")
    assert float(column) == pytest.approx(float(-(per_sequence[:, None] * logprob).sum()), rel=1e-12)
    scalar = dyn.batch_predicted_entropy_change(logprob, 0.5, None, "sum")
    assert float(scalar) == pytest.approx(float(-0.5 * logprob.sum()))


def test_finite_logits_too_far_apart_for_float32_give_an_exact_zero_entropy():
    """log p = -6e38 overflows float32 to -inf; that entry's p is 0 and it drops out, as a masked one does, instead
    of 0 * -inf making the row NaN."""
    z = torch.tensor([[3e38, -3e38]])
    assert dyn.entropy(z).item() == 0.0 and dyn.vocab_discriminator(z).tolist() == [[0.0, 0.0]]
    z = torch.tensor([[3e38, -3e38, 3e38]], requires_grad=True)
    h = dyn.entropy(z)
    h.sum().backward()
    assert h.item() == pytest.approx(math.log(2)) and torch.isfinite(z.grad).all()


def test_the_diagnostics_refuse_a_mask_that_is_not_0_or_1():
    """A mask value of 0.5 counted as a valid token in the dynamics' diagnostics, where PolicyBatch, token_stats and
    aggregate_loss refuse it."""
    log_prob, advantages = torch.randn(2, 3), torch.randn(2, 3)
    half = torch.tensor([[1.0, 0.5, 0.0], [1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match=r"token_covariance: mask.*0\.5"):
        dyn.token_covariance(log_prob, advantages, half)
    whole = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert torch.equal(dyn.token_covariance(log_prob, advantages, whole), dyn.token_covariance(log_prob, advantages,
                                                                                                whole.bool()))
