"""Advantage shapers: per-token rewrites of the advantage before the surrogate sees it."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from entrorl.objective.batch import PolicyBatch, masked_mean
from entrorl.objective.parts import Metrics, Shaper, register_part

__all__ = ["EntropyAdvantage", "LoptiReweight", "PositiveScale"]


@register_part(
    "entropy_advantage",
    description="A + min(alpha H, |A| / kappa) with H detached: an entropy bonus inside the advantage",
    paper="arXiv 2506.14758",
)
class EntropyAdvantage(Shaper):
    """``A' = A + min(alpha * sg(H_t), |A| / kappa)``. The bonus is >= 0, at most ``|A|/kappa`` (so for
    ``kappa > 1`` it never flips the sign of a negative advantage) and zero where ``A = 0``."""

    requires: ClassVar[tuple[str, ...]] = ("entropy",)

    alpha: float = Field(0.4, ge=0.0, description="alpha = 0.4 with GRPO, 0.1 with PPO (arXiv 2506.14758)")
    kappa: float = Field(2.0, gt=1.0, description="kappa = 2 (arXiv 2506.14758)")

    def __call__(self, batch: PolicyBatch, advantages: torch.Tensor, metrics: Metrics) -> torch.Tensor:
        entropy = batch.entropy.detach().to(advantages.dtype)
        bonus = torch.minimum(self.alpha * entropy, advantages.abs() / self.kappa)
        metrics["shape/entropy_advantage_bonus"] = float(masked_mean(bonus, batch.mask))
        metrics["shape/entropy_advantage_capped_frac"] = float(
            masked_mean(((self.alpha * entropy) > advantages.abs() / self.kappa).float(), batch.mask)
        )
        return advantages + bonus


@register_part(
    "lopti_reweight",
    description="advantage reweighting (alpha pi_old + 1 - alpha) A: low-probability tokens count less",
    paper="arXiv 2505.12929",
)
class LoptiReweight(Shaper):
    """``A' = (alpha * pi_old(y_t) + 1 - alpha) * A``, ``pi_old = exp(old_log_prob)``: damps the large
    gradients of low-probability tokens."""

    alpha: float = Field(0.3, ge=0.0, le=1.0, description="alpha = 0.3 (arXiv 2505.12929)")

    def __call__(self, batch: PolicyBatch, advantages: torch.Tensor, metrics: Metrics) -> torch.Tensor:
        old_prob = batch.old_log_prob.detach().to(advantages.dtype).exp()
        weight = self.alpha * old_prob + (1.0 - self.alpha)
        metrics["shape/lopti_weight_mean"] = float(masked_mean(weight, batch.mask))
        return advantages * weight


@register_part(
    "positive_scale",
    description="scale positive advantages by lambda (W-REINFORCE: lambda PSR + NSR)",
    paper="arXiv 2506.01347",
)
class PositiveScale(Shaper):
    """``A' = lam * A`` where ``A > 0``, unchanged elsewhere: the objective ``lam * L_PSR + L_NSR``. On the
    paper's +1 / -1 rewards with no baseline (the ``signed_reward`` estimator) this gives W-REINFORCE's ``+lam`` /
    ``-1`` advantages; the ``w_reinforce`` estimator's advantages already hold ``lam``, and scaling them again gives
    ``lam ** 2``."""

    lam: float = Field(0.1, ge=0.0, description="lambda = 0.1 (arXiv 2506.01347, Eq. 9)")

    def __call__(self, batch: PolicyBatch, advantages: torch.Tensor, metrics: Metrics) -> torch.Tensor:
        positive = advantages > 0
        metrics["shape/positive_scale_frac"] = float(masked_mean(positive.to(advantages.dtype), batch.mask))
        return torch.where(positive, advantages * self.lam, advantages)
