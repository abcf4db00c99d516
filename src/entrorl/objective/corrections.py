"""Corrections for the mismatch between the sampler's policy (e.g. vLLM) and the trainer's.

``k_t = pi_train_old(y_t) / pi_rollout(y_t) = exp(old_log_prob - rollout_log_prob)``; the weights are detached
and multiply the per-token loss. Weighted tokens stay in the normaliser.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from entrorl.objective.batch import PolicyBatch, fraction, masked_mean
from entrorl.objective.parts import Correction, Metrics, register_part

__all__ = ["TruncatedIS", "IcePop"]


def _mismatch_log_ratio(batch: PolicyBatch) -> torch.Tensor:
    """``log k_t`` at the valid tokens, 0 elsewhere; not clamped (``exp`` of it is taken after a clamp to +-20)."""
    log_ratio = batch.old_log_prob.detach() - batch.rollout_log_prob.detach()
    return torch.where(batch.mask, log_ratio, torch.zeros_like(log_ratio))


@register_part(
    "tis",
    description="truncated importance sampling: weight min(pi_train / pi_rollout, C)",
    paper="Yao et al. 2025, 'Your efficient RL framework secretly brings you off-policy RL training'",
)
class TruncatedIS(Correction):
    """``w_t = min(k_t, C)`` per token, or ``w_i = min(prod_t k_t, C)`` for every token of sequence i with
    ``level="sequence"``."""

    rollout_is_threshold: float = Field(2.0, gt=0.0, description="truncation C = 2 (verl's default)")
    level: Literal["token", "sequence"] = Field("token", description="ratio per token or per sequence")

    def __call__(self, batch: PolicyBatch, metrics: Metrics) -> torch.Tensor:
        log_ratio = _mismatch_log_ratio(batch)
        if self.level == "sequence":  # the product of the token ratios: their log-ratios summed, then clamped
            log_ratio = log_ratio.sum(dim=-1, keepdim=True).expand_as(log_ratio)
        ratio = log_ratio.clamp(-20.0, 20.0).exp()
        weight = ratio.clamp(max=self.rollout_is_threshold)
        metrics["correction/tis_weight_mean"] = float(masked_mean(weight, batch.mask))
        metrics["correction/tis_truncated_frac"] = fraction(ratio > self.rollout_is_threshold, batch.mask)
        return weight


@register_part(
    "icepop",
    description="weight each token by its train/rollout probability ratio, zeroing those whose ratio leaves [alpha, beta]",
    paper="Ring-1T, arXiv 2510.18855 (IcePop)",
)
class IcePop(Correction):
    """``M(k) = k`` if ``alpha <= k <= beta`` else 0: tokens with too large a mismatch get no gradient."""

    icepop_low: float = Field(0.5, gt=0.0, description="alpha = 0.5 (IcePop, as used in INTELLECT-3)")
    icepop_high: float = Field(5.0, gt=0.0, description="beta = 5 (IcePop, as used in INTELLECT-3)")

    @model_validator(mode="after")
    def _check_band(self) -> "IcePop":
        if not self.icepop_low < self.icepop_high:
            raise ValueError(f"icepop_low must be < icepop_high, got {self.icepop_low} >= {self.icepop_high}")
        if not self.icepop_low <= 1.0 <= self.icepop_high:  # a token the trainer and the sampler agree on is kept
            raise ValueError(f"the band [icepop_low, icepop_high] = [{self.icepop_low}, {self.icepop_high}] must hold 1: "
                             "without it, every token whose probability the trainer and the sampler agree on is masked")
        return self

    def __call__(self, batch: PolicyBatch, metrics: Metrics) -> torch.Tensor:
        ratio = _mismatch_log_ratio(batch).clamp(-20.0, 20.0).exp()
        inside = (ratio >= self.icepop_low) & (ratio <= self.icepop_high)
        metrics["correction/icepop_masked_frac"] = fraction(~inside, batch.mask)
        return torch.where(inside, ratio, torch.zeros_like(ratio))
