"""Entropy dynamics: the first-order theory of how one update moves a softmax policy's entropy.

Everything here is about one categorical distribution ``p = softmax(z / T)`` over a vocabulary (the last
dimension; any leading dimensions are batch dimensions), with natural logs throughout:

* ``H   = -sum_v p_v log p_v``                              entropy
* ``S_v = p_v (log p_v + H)``                               entropy discriminator (arXiv 2602.03392);
  ``S_v > 0`` exactly when ``p_v > exp(-H)`` (a "confident" token)
* ``E_p[S] = sum_v p_v S_v = sum_v p_v^2 (log p_v + H)``    its on-policy expectation ("dynamic baseline")
* ``D_v = S_v - E_p[S]``                                    centred discriminator; ``sum_v p_v D_v = 0``

and the theorems that turn them into predictions, all first order in the step size:

* single logit ``z_k -> z_k + eps``:        ``dH = -eps S_k + O(eps^2)``        (Thm 3.2, arXiv 2602.03392)
* one policy-gradient step on token ``k``, ``dz = alpha (e_k - p)``, ``alpha = eta r A``:
  ``dH = -alpha D_k + O(alpha^2)``                                                (Thm 3.3, arXiv 2602.03392)
* any logit change ``dz``:  ``dH = -Cov_{a~p}(log p(a), dz(a)) + O(|dz|^2)``      (Lemma 1, arXiv 2505.22617)
  - vanilla (tabular softmax) PG, ``dz_a = eta p(a) A(a)``                         (Thm 1, arXiv 2505.22617)
  - natural PG, ``dz_a = eta A(a)``                                                (Thm 2, arXiv 2505.22617)

The identity that ties them together: ``Cov_{a~p}(log p(a), x(a)) = sum_v S_v (x_v - E_p[x])``, so with
``x = eps e_k`` Lemma 1 is Theorem 3.2 and with ``x = alpha (e_k - p)`` it is Theorem 3.3.

It also holds the batch-level covariance diagnostics of arXiv 2505.22617 (token covariance, Eq. 10, and
its concentration in a few tokens, Table 1).

The dense helpers (:func:`entropy`, :func:`vocab_discriminator`, ...) materialise ``[..., V]`` tensors and
are meant for small vocabularies, tests and the laboratory; the chunked, memory-lean per-token statistics
of a real model live in :mod:`entrorl.tokens`.

Temperature conventions (read these once)
-----------------------------------------
``logits`` are always the *raw* logits ``z``; functions with a ``temperature`` argument use
``p = softmax(z / T)``. The theorems are statements about the logits *of the softmax*, i.e. the scaled
logits ``theta = z / T``:

* :func:`predicted_entropy_change_logit` and :func:`predicted_entropy_change_pg` take ``epsilon`` / ``alpha``
  in scaled-logit units (the change of ``z_k / T``). A change ``eps`` of the raw logit ``z_k`` is
  ``eps / T`` there. :func:`pg_step_alpha` returns alpha in these units and takes the temperature into
  account: for the surrogate ``r A log p_k`` with the raw logits as (tabular) parameters,
  ``d log p_k / dz = (e_k - p) / T``, so the raw step is ``eta r A (e_k - p) / T`` and the scaled step is
  ``eta r A (e_k - p) / T^2``: ``alpha = eta r A / T^2``.
* :func:`predicted_entropy_change_logits` takes ``delta_logits`` in *raw* units (the same units as
  ``logits``) and divides by ``T`` itself, so that
  ``measured_entropy_change(z, z + dz, T) ~= predicted_entropy_change_logits(z, dz, T)``.
* :func:`predicted_entropy_change_vanilla_pg` / :func:`predicted_entropy_change_natural_pg` are about the
  tabular softmax whose parameters are the scaled logits ``theta = z / T``; the update (``eta p A`` or
  ``eta A``) is applied to ``theta``. Calling them with ``(z, ..., temperature=T)`` is exactly calling them
  with ``(z / T, ...)``; the raw-logit update is ``T`` times the theta update.

Numerics: ``-inf`` logits (masked / top-k / top-p filtered entries) have ``p = 0`` and contribute 0 to
every sum; the results and their gradients stay finite. A row whose every entry is ``-inf`` gives zeros. A
``+inf`` or NaN logit makes its row NaN (it describes no distribution). ``float64`` inputs
are computed in ``float64``, every other dtype in ``float32``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from entrorl._checks import as_bool_mask, in_float64

__all__ = [
    "entropy",
    "vocab_discriminator",
    "expected_discriminator",
    "centered_vocab_discriminator",
    "token_discriminators",
    "predicted_entropy_change_logit",
    "predicted_entropy_change_pg",
    "pg_step_alpha",
    "top_token_count",
    "predicted_entropy_change_logits",
    "predicted_entropy_change_vanilla_pg",
    "predicted_entropy_change_natural_pg",
    "measured_entropy_change",
    "token_covariance",
    "CovarianceConcentration",
    "covariance_concentration",
    "batch_predicted_entropy_change",
]

TensorOrNumber = torch.Tensor | float | int


# ----------------------------------------------------------------------------------------------------
# internal helpers


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (t > 0.0) or math.isinf(t):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _log_policy(logits: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p, p)`` of ``softmax(logits / T)``, with ``log p = 0`` and ``p = 0`` at masked (``-inf``) entries and at
    entries whose ``log p`` overflows to ``-inf``.

    Every ``p * f(log p)`` is then an exact 0 at a masked entry, and so is the gradient through it; an all-``-inf``
    row gets zeros throughout, gradient included. A ``+inf`` or NaN logit is not a distribution: its row
    comes out NaN, as in :func:`entrorl.tokens.token_stats`.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() == 0:
        raise ValueError("logits must have at least one dimension (the vocabulary, last)")
    t = _check_temperature(temperature)
    x = logits.to(_compute_dtype(logits.dtype))
    if t != 1.0:
        x = x / t
    masked = x == float("-inf")
    # masked entries enter the softmax as the lowest finite number: an all-masked row is then a finite uniform row
    # (zeroed below) instead of 0/0, whose NaN would reach the gradient
    logp = torch.log_softmax(torch.where(masked, torch.finfo(x.dtype).min, x), dim=-1)
    # an entry so far below the row's largest that its log p overflows to -inf (finite logits 6e38 apart in float32)
    # has p = 0 too: left as -inf, 0 * -inf would make the row NaN
    masked = masked | torch.isneginf(logp)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(masked, zero, logp)
    p = torch.where(masked, zero, logp.exp())
    return logp, p


def _entropy_from(logp: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return -(p * logp).sum(dim=-1)


def _disc_from(logp: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    h = _entropy_from(logp, p)
    return p * (logp + h.unsqueeze(-1))


def _covariance_with_log_policy(logp: torch.Tensor, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``Cov_{a~p}(log p(a), x(a)) = sum_v S_v (x_v - E_p[x])`` over the last dimension.

    Entries with ``p = 0`` carry no weight whatever ``x`` holds there (even a non-finite value).
    """
    x = x.to(logp.dtype)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    x = torch.where(p > 0, x, zero)
    s = _disc_from(logp, p)
    ex = (p * x).sum(dim=-1, keepdim=True)
    return (s * (x - ex)).sum(dim=-1)


# ----------------------------------------------------------------------------------------------------
# dense per-distribution quantities


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy ``H = -sum_v p_v log p_v`` of ``p = softmax(logits / T)``; shape ``logits.shape[:-1]``.

    Dense helper (materialises ``[..., V]``); differentiable; finite for ``-inf`` entries (``p = 0``).
    """
    logp, p = _log_policy(logits, temperature)
    return _entropy_from(logp, p)


def vocab_discriminator(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy discriminator of every vocabulary entry, ``S_v = p_v (log p_v + H)``; shape ``[..., V]``.

    Definition of arXiv 2602.03392 (used in its Theorem 3.2): ``S_v > 0`` iff ``p_v > exp(-H)``.
    Masked (``-inf``) entries have ``S_v = 0``. Note ``sum_v S_v = 0``.
    """
    logp, p = _log_policy(logits, temperature)
    return _disc_from(logp, p)


def expected_discriminator(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """On-policy expectation ``E_{v~p}[S_v] = sum_v p_v S_v = sum_v p_v^2 (log p_v + H)``; shape ``[...]``.

    The "dynamic baseline" of Theorem 3.3 of arXiv 2602.03392.
    """
    logp, p = _log_policy(logits, temperature)
    return (p * _disc_from(logp, p)).sum(dim=-1)


def centered_vocab_discriminator(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Centred discriminator of every vocabulary entry, ``D_v = S_v - E_{u~p}[S_u]``; shape ``[..., V]``.

    ``sum_v p_v D_v = 0`` (Corollary 3.4 of arXiv 2602.03392). Masked entries get ``-E_p[S]`` like any
    other entry would: the value is the D a token *would* have if sampled, and a masked token is never
    sampled (it carries ``p = 0`` in every expectation).
    """
    logp, p = _log_policy(logits, temperature)
    s = _disc_from(logp, p)
    return s - (p * s).sum(dim=-1, keepdim=True)


def token_discriminators(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S_k, D_k)`` of the sampled tokens ``k = tokens`` (shape ``logits.shape[:-1]``), dense version.

    ``S_k = p_k (log p_k + H)`` and ``D_k = S_k - sum_v p_v S_v`` (arXiv 2602.03392, Thms 3.2 / 3.3). For
    large vocabularies use :func:`entrorl.tokens.token_stats`, which never builds ``[N, V]`` temporaries.
    """
    logp, p = _log_policy(logits, temperature)
    s = _disc_from(logp, p)
    es = (p * s).sum(dim=-1)
    idx = tokens.long().unsqueeze(-1)
    s_k = torch.gather(s, -1, idx).squeeze(-1)
    return s_k, s_k - es


# ----------------------------------------------------------------------------------------------------
# first-order predictions


def predicted_entropy_change_logit(disc: TensorOrNumber, epsilon: TensorOrNumber) -> TensorOrNumber:
    """First-order entropy change when one logit moves: ``dH = -epsilon * S_k + O(epsilon^2)``.

    Theorem 3.2 of arXiv 2602.03392: perturbing ``z_k -> z_k + epsilon`` (a logit of the softmax, i.e. a
    *scaled* logit ``z / T``) changes the entropy by ``-epsilon * S_k`` to first order. ``disc`` is
    ``S_k``. Raising a confident token (``S_k > 0``) lowers the entropy; raising an unlikely one raises it.
    """
    return -epsilon * disc


def predicted_entropy_change_pg(disc_centered: TensorOrNumber, alpha: TensorOrNumber) -> TensorOrNumber:
    """First-order entropy change of one policy-gradient step on the sampled token k: ``dH = -alpha * D_k``.

    Theorem 3.3 of arXiv 2602.03392: the surrogate ``r A log p_k`` moves the (scaled, tabular) logits by
    ``dz = alpha (e_k - p)`` with ``alpha = eta r A`` (see :func:`pg_step_alpha`), and
    ``dH = -alpha (S_k - E_{v~p}[S_v]) + O(alpha^2) = -alpha D_k + O(alpha^2)``. On policy,
    ``E_{k~p}[D_k] = 0`` (Corollary 3.4): entropy falls on average only through a correlation between
    the advantage and ``D``.
    """
    return -alpha * disc_centered


def pg_step_alpha(
    lr: TensorOrNumber,
    advantages: TensorOrNumber,
    ratio: TensorOrNumber | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Step size ``alpha = lr * ratio * A / T^2`` of Theorem 3.3 (arXiv 2602.03392), detached.

    ``ratio`` (the importance ratio ``r = pi / pi_old``) defaults to 1 (on-policy). With ``T = 1`` this is
    the paper's ``alpha = eta r A``. With a sampling temperature ``T`` the raw logits move by
    ``lr r A (e_k - p) / T`` and the softmax's own logits ``z / T`` by ``lr r A (e_k - p) / T^2``, so the
    returned alpha (in scaled-logit units, as :func:`predicted_entropy_change_pg` expects) carries
    ``1 / T^2``. Any loss-aggregation factor (e.g. ``1 / N`` of a token-mean) belongs in ``lr`` or ``A``.
    """
    t = _check_temperature(temperature)
    a = torch.as_tensor(advantages).detach()
    if not a.is_floating_point():
        a = a.to(torch.get_default_dtype())
    alpha = a * (lr.detach() if isinstance(lr, torch.Tensor) else lr)
    if ratio is not None:
        r = torch.as_tensor(ratio).detach()
        alpha = alpha * r
    if t != 1.0:
        alpha = alpha / (t * t)
    return alpha


def predicted_entropy_change_logits(
    logits: torch.Tensor, delta_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """First-order entropy change for an arbitrary logit change: ``dH ~= -Cov_{a~p}(log p(a), dz(a) / T)``.

    Lemma 1 of arXiv 2505.22617 (general softmax). ``delta_logits`` is the change of the *raw* logits,
    in the same units as ``logits``; the softmax sees ``delta_logits / T``, so the prediction is
    ``-Cov_{a~p}(log p(a), delta_logits(a)) / T`` with ``p = softmax(logits / T)``. It is what
    :func:`measured_entropy_change` ``(logits, logits + delta_logits, T)`` returns, to first order.
    Entries with ``p = 0`` (``-inf`` logits) carry no weight. Shape ``[...]``.
    """
    t = _check_temperature(temperature)
    logp, p = _log_policy(logits, t)
    delta = delta_logits.to(logp.dtype)
    if t != 1.0:
        delta = delta / t
    return -_covariance_with_log_policy(logp, p, delta)


def predicted_entropy_change_vanilla_pg(
    logits: torch.Tensor, action_advantages: torch.Tensor, lr: TensorOrNumber, temperature: float = 1.0
) -> torch.Tensor:
    """Entropy change of one exact vanilla policy-gradient step of a tabular softmax, to first order.

    Theorem 1 of arXiv 2505.22617: the update ``dtheta_a = lr * p(a) * A(a)`` of the softmax logits
    ``theta`` gives ``dH ~= -lr * Cov_{a~p}(log p(a), p(a) A(a))``. ``action_advantages`` has the
    vocabulary shape ``[..., V]`` (one advantage per action). With ``temperature = T`` the policy is
    ``softmax(logits / T)`` and ``theta = logits / T`` (same as passing ``logits / T`` with ``T = 1``).
    """
    logp, p = _log_policy(logits, temperature)
    adv = action_advantages.to(logp.dtype)
    return -lr * _covariance_with_log_policy(logp, p, p * torch.where(p > 0, adv, torch.zeros_like(adv)))


def predicted_entropy_change_natural_pg(
    logits: torch.Tensor, action_advantages: torch.Tensor, lr: TensorOrNumber, temperature: float = 1.0
) -> torch.Tensor:
    """Entropy change of one exact natural policy-gradient step of a tabular softmax, to first order.

    Theorem 2 of arXiv 2505.22617: the update ``dtheta_a = lr * A(a)`` gives
    ``dH ~= -lr * Cov_{a~p}(log p(a), A(a))``: probable actions with high advantage (or improbable ones
    with low advantage) lower the entropy. Same shapes and temperature convention as
    :func:`predicted_entropy_change_vanilla_pg`.
    """
    logp, p = _log_policy(logits, temperature)
    return -lr * _covariance_with_log_policy(logp, p, action_advantages)


def measured_entropy_change(
    logits_before: torch.Tensor, logits_after: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Exact entropy change ``H(softmax(after / T)) - H(softmax(before / T))``; shape ``[...]``."""
    return entropy(logits_after, temperature) - entropy(logits_before, temperature)


# ----------------------------------------------------------------------------------------------------
# batch-level covariance diagnostics (arXiv 2505.22617)


def _valid_mask(mask: torch.Tensor | None, shape: torch.Size, device: torch.device, *, caller: str) -> torch.Tensor:
    """``mask`` as booleans of ``shape``: of that shape, or of as many dimensions with 1 where it is the same for
    every token along one (``[B, 1]``: one flag per sequence). ``ValueError`` otherwise: a ``[B]`` mask would
    broadcast along the token axis, masking columns instead of sequences."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    m = as_bool_mask(torch.as_tensor(mask, device=device), f"{caller}: mask")
    if m.shape != shape:
        if m.dim() != len(shape) or any(size not in (1, full) for size, full in zip(m.shape, shape)):
            raise ValueError(f"{caller}: mask has shape {tuple(m.shape)}, the tokens {tuple(shape)}; give one flag per "
                             "token, or [B, 1] for one per sequence")
        m = torch.broadcast_to(m, shape)
    return m


def _refuse_fewer_axes(values: torch.Tensor, shape: torch.Size, *, caller: str, what: str) -> None:
    """A ``[B]`` tensor beside ``[B, T]`` tokens would broadcast along the token axis (silently, when ``B == T``):
    per-sequence values must be given as ``[B, 1]``, as a mask's are."""
    if 0 < values.dim() < len(shape):
        raise ValueError(f"{caller}: {what} has shape {tuple(values.shape)}, the tokens {tuple(shape)}; give one value "
                         "per token, or [B, 1] for one per sequence")


def token_covariance(
    logprob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Per-token centred product of Eq. 10 of arXiv 2505.22617, detached float32.

    ``C_t = (log p_t - mean(log p)) * (A_t - mean(A))`` where both means are over the valid tokens
    (``mask`` true / 1) of the tensors given: the batch, or micro-batch, on which the statistic is
    taken (the reference Clip-Cov / KL-Cov code centres per micro-batch). Not a covariance itself: its mean
    over the valid tokens is the (population) covariance of log-prob and advantage across tokens.

    ``logprob`` is ``[B, T]`` or ``[N]`` (any shape works); ``advantages`` has the same shape or broadcasts
    to it (e.g. ``[B, 1]`` sequence advantages; a ``[B]`` one is refused, since it would broadcast along the tokens); ``mask`` is bool or 0/1 of the same shape (or ``[B, 1]``, one
    flag per sequence), or ``None`` for all valid. The result is 0 outside the mask (whatever the inputs hold there, NaN included), and all
    zeros for an empty mask.
    """
    lp = in_float64(logprob)  # on the CPU for an Apple GPU, which has no float64
    adv = torch.as_tensor(advantages, device=lp.device).detach().to(torch.float64)
    _refuse_fewer_axes(adv, lp.shape, caller="token_covariance", what="advantages")
    lp, adv = torch.broadcast_tensors(lp, adv)
    m = _valid_mask(mask, lp.shape, lp.device, caller="token_covariance")
    zero = torch.zeros((), dtype=torch.float64, device=lp.device)
    lp = torch.where(m, lp, zero)
    adv = torch.where(m, adv, zero)
    n = m.sum().clamp(min=1).to(torch.float64)
    mean_lp = lp.sum() / n
    mean_adv = adv.sum() / n
    cov = torch.where(m, (lp - mean_lp) * (adv - mean_adv), zero)
    return cov.to(device=logprob.device, dtype=torch.float32)


def _percent_key(q: float) -> str:
    return f"{float(q):g}"


@dataclass
class CovarianceConcentration:
    """How much of the token covariance sits in the top few tokens (Table 1 of arXiv 2505.22617).

    * ``overall_mean``: mean of ``C`` over the valid tokens.
    * ``top_means[q]``: mean of ``C`` over the top ``q`` percent of valid tokens by ``C`` (``q = 0.02``
      means 0.02%, i.e. 2 tokens in 10,000); ``top_counts[q]`` is how many tokens that was:
      ``max(1, floor(n * q / 100))``.
    * ``ratios[q]``: ``top_means[q] / overall_mean``; ``nan`` when ``overall_mean <= 0``, because the ratio
      is a "times the mean" concentration factor only for a positive mean: a zero mean makes it infinite
      and a negative one flips its sign, and neither says anything about concentration.
    * ``n_tokens``: number of valid tokens. With none, every mean and ratio is ``nan``.

    The paper reports, for Qwen2.5-7B at step 1: top 0.02% 5.654, top 0.2% 3.112, top 2% 1.385,
    top 20% 0.351, all tokens 0.003 (over 1000x concentration).
    """

    overall_mean: float
    top_means: dict[float, float]
    ratios: dict[float, float]
    n_tokens: int
    top_counts: dict[float, int] = field(default_factory=dict)

    def to_dict(self, prefix: str = "cov/") -> dict[str, float]:
        """Flat float metrics: ``cov/mean``, ``cov/n_tokens``, ``cov/top_{q}pct_mean``, ``cov/top_{q}pct_ratio``.

        ``q`` is written with ``%g`` (``0.02`` -> ``top_0.02pct``, ``2.0`` -> ``top_2pct``). Values are
        Python floats (``nan`` where undefined, which ``json.dumps`` writes as ``NaN``).
        """
        out: dict[str, float] = {f"{prefix}mean": float(self.overall_mean), f"{prefix}n_tokens": float(self.n_tokens)}
        for q, value in self.top_means.items():
            key = _percent_key(q)
            out[f"{prefix}top_{key}pct_mean"] = float(value)
            out[f"{prefix}top_{key}pct_ratio"] = float(self.ratios[q])
        return out


def top_token_count(n_tokens: int, percent: float) -> int:
    """How many tokens "the top ``percent``%" of ``n_tokens`` is: ``min(n, max(1, floor(n * q / 100)))``, the
    small tolerance keeping a product that float rounding leaves just short of an integer (``10000 * 0.57 / 100`` is
    ``56.99999999999999``) from flooring to the integer below."""
    return min(n_tokens, max(1, math.floor(n_tokens * float(percent) / 100.0 + 1e-9)))


def covariance_concentration(
    cov: torch.Tensor,
    mask: torch.Tensor | None = None,
    top_percents: Sequence[float] = (0.02, 0.2, 2.0, 20.0),
) -> CovarianceConcentration:
    """Concentration of the token covariance ``C`` (e.g. from :func:`token_covariance`) in its top tokens.

    ``top_percents`` are percentages in ``(0, 100]``. For each ``q`` the top
    ``k = max(1, floor(n * q / 100))`` valid tokens by ``C`` are averaged (ties do not matter: the mean of
    the ``k`` largest values is unique). Statistics are computed in float64. See
    :class:`CovarianceConcentration` for the fields and why a ratio is ``nan`` when the mean is ``<= 0``.
    """
    values = in_float64(cov)
    m = _valid_mask(mask, values.shape, values.device, caller="covariance_concentration")
    valid = values[m]
    n = int(valid.numel())
    top_means: dict[float, float] = {}
    ratios: dict[float, float] = {}
    counts: dict[float, int] = {}
    overall = float(valid.mean()) if n > 0 else float("nan")
    for q in top_percents:
        qf = float(q)
        if not (0.0 < qf <= 100.0):
            raise ValueError(f"top_percents must lie in (0, 100], got {q!r}")
        if n == 0:
            top_means[qf], ratios[qf], counts[qf] = float("nan"), float("nan"), 0
            continue
        k = top_token_count(n, qf)
        top = float(torch.topk(valid, k, sorted=False).values.mean())
        top_means[qf] = top
        counts[qf] = k
        ratios[qf] = top / overall if overall > 0 else float("nan")
    return CovarianceConcentration(
        overall_mean=overall, top_means=top_means, ratios=ratios, n_tokens=n, top_counts=counts
    )


def batch_predicted_entropy_change(
    disc_centered: torch.Tensor,
    alpha: TensorOrNumber,
    mask: torch.Tensor | None,
    reduction: str = "mean",
) -> torch.Tensor:
    """First-order predicted entropy change of a batch: sum or mean of ``-alpha_t D_t`` over valid tokens.

    Applies Theorem 3.3 of arXiv 2602.03392 token by token (``alpha_t = lr r_t A_t``, see
    :func:`pg_step_alpha`; scalar or per-token) and aggregates over the valid tokens: ``"mean"`` predicts
    the change of the token-mean entropy of the batch (compare with the measured mean entropy change),
    ``"sum"`` the summed change. It is a first-order, tabular prediction: each position's logits are
    treated as independent parameters moved only by their own token's gradient. In a network, shared
    parameters couple positions, so compare its sign and its correlation with the measured change rather
    than expecting equality. An empty mask gives 0. Detached, float32 (float64 for float64 input).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    d = disc_centered.detach()
    d = d.to(_compute_dtype(d.dtype))
    a = torch.as_tensor(alpha, dtype=d.dtype, device=d.device).detach()  # a Python float straight to d's precision
    _refuse_fewer_axes(a, d.shape, caller="batch_predicted_entropy_change", what="alpha")
    per_token = -a * d
    m = _valid_mask(mask, per_token.shape, per_token.device, caller="batch_predicted_entropy_change")
    zero = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
    total = torch.where(m, per_token, zero).sum()
    if reduction == "sum":
        return total
    return total / m.sum().clamp(min=1).to(total.dtype)
