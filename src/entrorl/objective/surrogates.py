"""Per-token policy losses ("surrogates"). Notation: ``r = exp(log pi - log pi_old)``, ``A`` the advantage."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field, model_validator

from entrorl.objective.batch import PolicyBatch, fraction, masked_mean, policy_ratio
from entrorl.objective.parts import Metrics, Surrogate, SurrogateOutput, register_part

__all__ = ["PPOClip", "Unclipped", "CISPO", "GSPO", "LogLikelihood"]


def _ratio_metrics(metrics: Metrics, ratio: torch.Tensor, log_ratio: torch.Tensor, batch: PolicyBatch) -> None:
    """``ratio``: the surrogate's own; ``log_ratio``: each token's, as :func:`policy_ratio` gives it, clamped to +-20
    as for PPO's loss (and by verl for its ppo_kl), for every surrogate alike (GSPO's own ratio is not clamped so):
    finite where a log-prob is -inf."""
    mask = batch.mask
    metrics["ratio/mean"] = float(masked_mean(ratio.detach(), mask))
    # no token: 0, below any ratio, so that a maximum taken over micro-batches (verl's) is the others'
    metrics["ratio/max"] = float(ratio.detach()[mask].max()) if mask.any() else 0.0
    metrics["kl/old_new"] = float(masked_mean(-log_ratio.detach(), mask))


@register_part(
    "ppo_clip",
    description="PPO clipped surrogate max(-A r, -A clip(r, 1-eps_low, 1+eps_high)), optional dual-clip",
    paper="arXiv 1707.06347; decoupled clip: DAPO arXiv 2503.14476; dual-clip: arXiv 1912.09729",
)
class PPOClip(Surrogate):
    """``L = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))``; with dual-clip, for ``A < 0``:
    ``L = min(L, -A c)``. A token whose clipped branch is active has zero gradient (reported as clipped)."""

    clip_ratio_low: float = Field(0.2, ge=0.0, description="eps_low; 0.2 (GRPO arXiv 2402.03300, DAPO arXiv 2503.14476)")
    clip_ratio_high: float = Field(0.2, ge=0.0, description="eps_high; 0.2, or 0.28 for clip-higher (DAPO arXiv 2503.14476)")
    clip_ratio_c: float | None = Field(None, description="dual-clip bound c > 1 for A < 0 (3.0 in arXiv 1912.09729 / verl); None = off")

    @model_validator(mode="after")
    def _check_dual_clip(self) -> "PPOClip":
        if self.clip_ratio_c is not None and not self.clip_ratio_c > 1.0:
            raise ValueError(f"clip_ratio_c must be > 1 (dual-clip lower bound), got {self.clip_ratio_c}")
        return self

    def __call__(self, batch: PolicyBatch, advantages: torch.Tensor, metrics: Metrics) -> SurrogateOutput:
        ratio, log_ratio = policy_ratio(batch)
        unclipped = -advantages * ratio
        clipped_loss = -advantages * ratio.clamp(1.0 - self.clip_ratio_low, 1.0 + self.clip_ratio_high)
        loss = torch.maximum(unclipped, clipped_loss)
        clipped = clipped_loss.detach() > unclipped.detach()
        mask = batch.mask
        if self.clip_ratio_c is not None:
            dual_bound = -advantages * self.clip_ratio_c
            dual_active = (advantages < 0) & (dual_bound < loss.detach())
            loss = torch.where(advantages < 0, torch.minimum(loss, dual_bound), loss)
            clipped = clipped | dual_active
            metrics["clip/dual_frac"] = fraction(dual_active, mask)
        metrics["clip/ppo_frac"] = fraction(clipped, mask)
        metrics["clip/ppo_low_frac"] = fraction((ratio.detach() < 1.0 - self.clip_ratio_low) & (advantages < 0), mask)
        metrics["clip/ppo_high_frac"] = fraction((ratio.detach() > 1.0 + self.clip_ratio_high) & (advantages > 0), mask)
        _ratio_metrics(metrics, ratio, log_ratio, batch)
        return SurrogateOutput(per_token_loss=loss, clipped=clipped & mask, ratio=ratio.detach())


@register_part(
    "unclipped",
    description="importance-weighted policy gradient -A r with no clipping (the base of KL-Cov)",
    paper="arXiv 2505.22617 (KL-Cov loss)",
)
class Unclipped(Surrogate):
    """``L = -A r``: no token is clipped. KL-Cov uses it, controlling the update with its KL term instead."""

    def __call__(self, batch: PolicyBatch, advantages: torch.Tensor, metrics: Metrics) -> SurrogateOutput:
        ratio, log_ratio = policy_ratio(batch)
        _ratio_metrics(metrics, ratio, log_ratio, batch)
        return SurrogateOutput(
            per_token_loss=-advantages * ratio, clipped=torch.zeros_like(batch.mask), ratio=ratio.detach()
        )


@register_part(
    "cispo",
    description="clipped IS-weight policy optimisation: -sg(clip(r, 1-eps_low, 1+eps_high)) A log pi",
    paper="arXiv 2506.13585 (MiniMax-M1)",
)
class CISPO(Surrogate):
    """``L = -sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * log pi``. The IS weight is clipped, never the
    update, so every token keeps its gradient (low-probability "fork" tokens included). The paper sets no
    lower bound in practice; ``clip_ratio_low = 1`` makes the lower bound 0."""

    clip_ratio_low: float = Field(1.0, ge=0.0, description="lower IS bound 1 - eps_low; 1.0 = none (arXiv 2506.13585)")
    clip_ratio_high: float = Field(0.28, ge=0.0, description="upper IS bound 1 + eps_high; 0.28 as in Trinity-RFT's CISPO")

    def __call__(self, batch: PolicyBatch, advantages: torch.Tensor, metrics: Metrics) -> SurrogateOutput:
        ratio, log_ratio = policy_ratio(batch)
        weight = ratio.detach().clamp(1.0 - self.clip_ratio_low, 1.0 + self.clip_ratio_high)
        metrics["clip/cispo_frac"] = fraction(weight != ratio.detach(), batch.mask)
        _ratio_metrics(metrics, ratio, log_ratio, batch)
        return SurrogateOutput(
            per_token_loss=-weight * advantages * batch.log_prob,
            clipped=torch.zeros_like(batch.mask),
            ratio=ratio.detach(),
        )


@register_part(
    "gspo",
    description="sequence-level ratio s = exp(mean_t log r), clipped PPO-style, gradient token-wise",
    paper="arXiv 2507.18071 (GSPO)",
)
class GSPO(Surrogate):
    """``s_i = exp((1/|y_i|) sum_t log r_{i,t})``; token ratio ``s_{i,t} = sg(s_i) pi_t / sg(pi_t)`` (same value,
    token-wise gradient); ``L = max(-A s_{i,t}, -A clip(s_{i,t}, 1 - eps_low, 1 + eps_high))``. The paper's
    aggregation is ``seq-mean-token-mean``. ``log s`` is clamped at 10 as verl does."""

    clip_ratio_low: float = Field(3e-4, ge=0.0, description="eps_low = 3e-4 (arXiv 2507.18071, Sec. 5.1)")
    clip_ratio_high: float = Field(4e-4, ge=0.0, description="eps_high = 4e-4 (arXiv 2507.18071, Sec. 5.1)")

    recommended_loss_agg_mode: ClassVar[str] = "seq-mean-token-mean"

    def __call__(self, batch: PolicyBatch, advantages: torch.Tensor, metrics: Metrics) -> SurrogateOutput:
        mask = batch.mask
        log_ratio = torch.where(mask, batch.log_prob - batch.old_log_prob.detach(), torch.zeros_like(batch.log_prob))
        lengths = mask.sum(dim=-1, keepdim=True).clamp(min=1)
        seq_log_ratio = (log_ratio.sum(dim=-1, keepdim=True) / lengths).detach()
        token_log_ratio = (seq_log_ratio + batch.log_prob - batch.log_prob.detach()).clamp(max=10.0)
        ratio = token_log_ratio.exp()
        unclipped = -advantages * ratio
        clipped_loss = -advantages * ratio.clamp(1.0 - self.clip_ratio_low, 1.0 + self.clip_ratio_high)
        loss = torch.maximum(unclipped, clipped_loss)
        clipped = (clipped_loss.detach() > unclipped.detach()) & mask
        metrics["clip/gspo_frac"] = fraction(clipped, mask)
        _ratio_metrics(metrics, ratio, policy_ratio(batch)[1], batch)
        return SurrogateOutput(per_token_loss=loss, clipped=clipped, ratio=ratio.detach())


@register_part(
    "log_likelihood",
    description="-A log pi with no ratio: REINFORCE / weighted likelihood (SFT when A = 1)",
    paper="arXiv 2304.06767 (RAFT: reward-ranked fine-tuning)",
)
class LogLikelihood(Surrogate):
    """``L = -A log pi``. With ``A = 1`` on reference demonstrations it is supervised fine-tuning; with the
    ``psr`` advantages (1 for correct samples, 0 otherwise) and the ``rejection_sampling`` selector, which takes the
    wrong samples out of the normaliser, it is rejection-sampling fine-tuning (RAFT / RFT, the ``rft`` method)."""

    def __call__(self, batch: PolicyBatch, advantages: torch.Tensor, metrics: Metrics) -> SurrogateOutput:
        ratio, log_ratio = policy_ratio(batch)
        _ratio_metrics(metrics, ratio, log_ratio, batch)
        return SurrogateOutput(
            per_token_loss=-advantages * batch.log_prob, clipped=torch.zeros_like(batch.mask), ratio=ratio.detach()
        )
