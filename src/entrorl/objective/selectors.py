"""Token selectors: which tokens to drop from the update (no loss, no gradient).

Every selector computes its statistic over the valid tokens (the ``mask``) of the batch it is given, as verl
and the released code of the 80/20 and Clip-Cov papers do per (micro-)batch, and returns the bool tensor of
tokens it drops. Clip_B and Clip_V, whose released code takes its statistics over the whole training batch before
mini-batching, decide over ``PolicyBatch.population`` when a trainer gives it (with the estimator's advantages of
that batch, before any shaper, as that code does). Whether a dropped token still counts in the loss normaliser
follows each paper's released code and is the ``keep_in_normaliser`` parameter.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, PrivateAttr, model_validator

from entrorl._checks import in_float64
from entrorl.dynamics import token_covariance
from entrorl.objective.batch import PolicyBatch, fraction, masked_mean, masked_population_std, masked_quantile
from entrorl.objective.parts import Metrics, Selector, SurrogateOutput, register_part

__all__ = ["AdvantageSign", "RejectionSampling", "ClipCov", "ForkingTokens", "LowEntropyTokens", "ClipB", "ClipV"]

# Below this, a statistic's spread is treated as zero and the z-score selectors drop nothing.
_MIN_STD = 1e-12


@register_part(
    "advantage_sign",
    description="train on positive-advantage (PSR) or negative-advantage (NSR) tokens only",
    paper="arXiv 2506.01347",
)
class AdvantageSign(Selector):
    """``keep="positive"`` drops tokens with ``A < 0`` (positive sample reinforcement);
    ``keep="negative"`` drops tokens with ``A > 0`` (negative sample reinforcement). The released code
    keeps every token in the token-mean normaliser (the other samples simply have zero advantage)."""

    keep: Literal["positive", "negative"] = Field("positive", description="which sign of advantage to train on (arXiv 2506.01347)")
    keep_in_normaliser: bool = Field(True, description="dropped tokens stay in the normaliser, as in the released code")

    def __call__(self, batch: PolicyBatch, advantages: torch.Tensor, surrogate: SurrogateOutput, metrics: Metrics) -> torch.Tensor:
        drop = (advantages < 0) if self.keep == "positive" else (advantages > 0)
        drop = drop & batch.mask
        metrics["select/advantage_sign_frac"] = fraction(drop, batch.mask)
        return drop


@register_part(
    "rejection_sampling",
    description="fine-tune on the accepted samples only (A > 0), the loss normalised by their tokens",
    paper="arXiv 2304.06767 (RAFT)",
)
class RejectionSampling(Selector):
    """Rejection-sampling fine-tuning (RAFT): the samples the reward accepts, ``A > 0`` (the ``psr`` estimator's 1
    for a correct sample), are the step's fine-tuning set, and every token of the others is dropped and leaves the
    normaliser. With the ``log_likelihood`` surrogate and ``token-mean`` the loss is then supervised fine-tuning on
    them, ``-sum_{t accepted} A_t log pi_t / #accepted tokens``, whatever share of the batch they are; with the
    rejected tokens in the normaliser the update would shrink with the batch's accuracy. The decision is each
    token's own; given ``PolicyBatch.population`` the trainer counts the accepted tokens of its whole batch, so that
    splitting it into micro-batches leaves the update as it is."""

    step_statistics: ClassVar[bool] = True
    keep_in_normaliser: bool = Field(False, description="rejected samples leave the normaliser: fine-tuning on the "
                                                        "accepted ones alone (arXiv 2304.06767)")

    def decide(self, batch: PolicyBatch, advantages: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return ((advantages.to(batch.mask.device) <= 0) & batch.mask,)

    def __call__(self, batch: PolicyBatch, advantages: torch.Tensor, surrogate: SurrogateOutput, metrics: Metrics) -> torch.Tensor:
        (drop,) = self.decision(batch, advantages)
        metrics["select/rejection_sampling_frac"] = fraction(drop, batch.mask)
        return drop


@register_part(
    "clip_cov",
    description="drop a random max(1, floor(r N)) of the tokens with lb < Cov < ub (not PPO-clipped)",
    paper="arXiv 2505.22617 (Clip-Cov)",
)
class ClipCov(Selector):
    """Clip-Cov. With ``C_t = (log pi_t - mean log pi)(A_t - mean A)`` over the valid tokens, the candidates are
    the valid tokens with ``clip_cov_lb < C_t < clip_cov_ub`` that the surrogate has not already clipped; a
    uniformly random ``min(max(1, floor(clip_cov_ratio * N)), #candidates)`` of them are dropped. The floor is that of
    the floating-point product, as verl computes it (``int(r * N)``): a ratio whose double lies just below its decimal
    value, such as 0.29, drops 28 of 100 tokens, not 29.

    Random, not top-k: the paper samples within the covariance band. The paper's Eq. 12 gives a dropped token a
    loss of 0 inside the mean over all tokens, and the released code multiplies its loss by zero: either way it stays
    in the token-mean normaliser (``keep_in_normaliser=True``); ``False`` divides by the kept tokens instead.
    ``seed`` gives the selector its own generator; without it the global torch generator is used.
    """

    clip_cov_ratio: float = Field(2e-4, gt=0.0, le=1.0, description="r, fraction of tokens dropped; 2e-4 (arXiv 2505.22617)")
    clip_cov_lb: float = Field(1.0, description="lower covariance bound w_low = 1 (arXiv 2505.22617)")
    clip_cov_ub: float = Field(5.0, description="upper covariance bound w_high = 5 (arXiv 2505.22617)")
    keep_in_normaliser: bool = Field(True, description="dropped tokens stay in the normaliser, as in Eq. 12 and the released code (arXiv 2505.22617)")
    seed: int | None = Field(None, description="seed of a private generator for the random choice; None = global RNG")

    @model_validator(mode="after")
    def _check_band(self) -> "ClipCov":
        if not self.clip_cov_lb < self.clip_cov_ub:
            raise ValueError(f"clip_cov_lb ({self.clip_cov_lb}) must be below clip_cov_ub ({self.clip_cov_ub}): "
                             "no covariance lies in an empty band, so nothing would ever be dropped")
        return self

    _generator: torch.Generator | None = PrivateAttr(default=None)

    def _rng(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    @property
    def stateful(self) -> bool:
        return self.seed is not None  # without a seed it draws from torch's global generator, which trainers restore

    def state_dict(self) -> dict[str, Any]:
        if self._generator is None:
            return {}
        return {"generator": self._generator.get_state(), "device": str(self._generator.device)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            self._generator = None  # not drawn from yet: the next call seeds it afresh
        if "generator" in state:
            if self.seed is None:
                raise ValueError(f"{self.kind} '{self.name}': the saved state holds the random state of a private "
                                 "generator (a seed was given), but this one has no seed and draws from torch's global "
                                 "generator; give it the seed it was saved with")
            device = torch.device(state.get("device", "cpu"))  # a CUDA generator's state only fits a CUDA generator
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"{self.kind} '{self.name}': the saved random state belongs to a CUDA generator; "
                                 "load it where CUDA is available")
            self._rng(device).set_state(state["generator"])

    def __call__(self, batch: PolicyBatch, advantages: torch.Tensor, surrogate: SurrogateOutput, metrics: Metrics) -> torch.Tensor:
        mask = batch.mask
        cov = token_covariance(batch.log_prob.detach(), advantages, mask)
        candidates = mask & ~surrogate.clipped & (cov > self.clip_cov_lb) & (cov < self.clip_cov_ub)
        drop = torch.zeros_like(mask)
        n_valid = int(mask.sum())
        candidate_index = candidates.flatten().nonzero().squeeze(-1)
        if n_valid and candidate_index.numel():
            n_drop = min(max(1, int(self.clip_cov_ratio * n_valid)), candidate_index.numel())
            generator = self._rng(candidate_index.device)
            order = torch.randperm(candidate_index.numel(), generator=generator, device=candidate_index.device)
            drop.view(-1)[candidate_index[order[:n_drop]]] = True
        metrics["select/clip_cov_frac"] = fraction(drop, mask)
        metrics["select/clip_cov_candidates_frac"] = fraction(candidates, mask)
        return drop


class _EntropyQuantileSelector(Selector):
    requires: ClassVar[tuple[str, ...]] = ("entropy",)
    keep_high: ClassVar[bool] = True

    top_entropy_quantile: float = Field(  # rho = 0 would keep the top entropy's token(s), not none: refused
        0.2, gt=0.0, le=1.0, description="rho, share of highest-entropy tokens (forks), in (0, 1]; 0.2 (arXiv 2506.01939)"
    )
    keep_in_normaliser: bool = Field(False, description="the paper normalises by the number of kept tokens (arXiv 2506.01939, Eq. 6)")

    def __call__(self, batch: PolicyBatch, advantages: torch.Tensor, surrogate: SurrogateOutput, metrics: Metrics) -> torch.Tensor:
        mask = batch.mask
        entropy = batch.entropy.detach()
        threshold = masked_quantile(entropy, mask, 1.0 - self.top_entropy_quantile)
        # tokens tied at the threshold are kept on either side: when most entropies are equal (0 wherever top-k /
        # top-p sampling left one candidate), dropping them would leave the other side nothing to train on
        kept = (entropy >= threshold) if self.keep_high else (entropy <= threshold)
        drop = ~kept & mask
        metrics[f"select/{self.name}_frac"] = fraction(drop, mask)
        metrics[f"select/{self.name}_threshold"] = float(threshold) if mask.any() else 0.0
        return drop


@register_part(
    "forking_tokens",
    description="train only on the top-rho highest-entropy tokens of the batch (the 80/20 rule)",
    paper="arXiv 2506.01939",
)
class ForkingTokens(_EntropyQuantileSelector):
    """Keep tokens with ``H_t >= tau``, ``tau`` the ``(1 - rho)`` quantile (linear interpolation) of the valid
    tokens' entropies; the rest are dropped and leave the normaliser (the paper's Eq. 6 divides by the
    number of kept tokens). ``rho = 1`` keeps every token. Tokens tied at ``tau`` are all kept, as in the paper's
    rule and TRL's ``top_entropy_quantile``: when most entropies are equal (exactly 0 wherever top-k / top-p sampling
    left one candidate) more than ``rho`` is kept, and ``select/forking_tokens_frac`` shows the share really dropped."""


@register_part(
    "low_entropy_tokens",
    description="the 80/20 ablation: train only on the bottom 1-rho lowest-entropy tokens",
    paper="arXiv 2506.01939",
)
class LowEntropyTokens(_EntropyQuantileSelector):
    """The mirror of ``forking_tokens``: keep tokens with ``H_t <= tau`` (the same ``tau``, the ``(1 - rho)``
    quantile), the low-entropy majority; the rest are dropped and leave the normaliser. The paper shows that training
    on these alone fails. The two selectors partition the tokens, except that tokens tied at ``tau`` are kept by
    both: when at least ``1 - rho`` of the entropies share the lowest value (0 wherever top-k / top-p sampling left
    one candidate) those tokens are kept, where dropping them would leave no token to train on. ``rho = 1`` (the
    threshold is then the lowest entropy) is refused."""

    keep_high: ClassVar[bool] = False

    @model_validator(mode="after")
    def _keeps_some(self) -> "LowEntropyTokens":
        if self.top_entropy_quantile >= 1.0:
            raise ValueError("top_entropy_quantile = 1 would drop every token but those at the lowest entropy (all are "
                             "forks at rho = 1): low_entropy_tokens needs rho < 1")
        return self


@register_part(
    "clip_b",
    description="drop tokens whose entropy discriminator S is a batch outlier (negative-advantage, low-S side)",
    paper="arXiv 2602.03392 (Clip_B)",
)
class ClipB(Selector):
    """Clip_B. ``S_t = p_t (log p_t + H_t)`` over the valid tokens, mean ``S̄`` and population std ``σ``.

    * ``mode="released"`` (default, the authors' code): drop tokens with ``A < 0`` and ``S - S̄ < -mu σ``
      (penalising a low-probability token lowers entropy: Thm 3.3).
    * ``mode="paper"``: drop every token with ``S - S̄ ∉ [-mu σ, mu_high σ]`` (``mu_high`` defaults to ``mu``).

    Dropped tokens leave the normaliser (the code zeroes the response mask). ``σ < 1e-12`` drops nothing.
    Given ``PolicyBatch.population`` (the step's whole batch), ``S̄``, ``σ`` and the decision are taken there, over
    all valid tokens of the training batch under the sampling policy, as the released code does before mini-batching.
    """

    requires: ClassVar[tuple[str, ...]] = ("disc",)
    step_statistics: ClassVar[bool] = True

    mu: float = Field(2.5, gt=0.0, description="mu in sigma units; 2.5, swept 2-3 (arXiv 2602.03392)")
    mode: Literal["released", "paper"] = Field("released", description="released code (one-sided, A<0) or the paper's two-sided band")
    mu_high: float | None = Field(None, gt=0.0, description="upper bound mu^+ of the paper's band; None = mu")
    keep_in_normaliser: bool = Field(False, description="dropped tokens leave the normaliser, as in the released code")

    @model_validator(mode="after")
    def _upper_bound_needs_the_band(self) -> "ClipB":
        if self.mu_high is not None and self.mode == "released":
            raise ValueError("clip_b: mu_high is the upper edge of the paper's two-sided band, and mode='released' "
                             "(one-sided) has none; set mode='paper' to use it, or leave mu_high out")
        return self

    def decide(self, batch: PolicyBatch, advantages: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # float64 (on the CPU for an Apple GPU): equal values must give a zero std
        disc = in_float64(batch.require("disc", "selector 'clip_b'"))
        mask, advantages = batch.mask.to(disc.device), advantages.to(disc.device)
        mean = masked_mean(disc, mask)
        std = masked_population_std(disc, mask)
        deviation = disc - mean
        if float(std) < _MIN_STD:
            drop = torch.zeros_like(mask)
        elif self.mode == "released":
            drop = (advantages < 0) & (deviation < -self.mu * std)
        else:
            upper = self.mu if self.mu_high is None else self.mu_high
            drop = (deviation < -self.mu * std) | (deviation > upper * std)
        return (drop & mask).to(batch.mask.device), mean, std

    def __call__(self, batch: PolicyBatch, advantages: torch.Tensor, surrogate: SurrogateOutput, metrics: Metrics) -> torch.Tensor:
        mask = batch.mask
        drop, mean, std = self.decision(batch, advantages)
        metrics["select/clip_b_frac"] = fraction(drop, mask)
        # shares of every valid token, as every fraction (so that micro-batches combine by their token counts)
        metrics["select/clip_b_frac_pos"] = fraction(drop & (advantages > 0), mask)
        metrics["select/clip_b_frac_neg"] = fraction(drop & (advantages < 0), mask)
        metrics["clip_b/disc_mean"] = float(mean)
        metrics["clip_b/disc_std"] = float(std)
        return drop


@register_part(
    "clip_v",
    description="drop non-positive-advantage tokens whose centred discriminator D is an outlier, capped at max_frac",
    paper="arXiv 2602.03392 (Clip_V)",
)
class ClipV(Selector):
    """Clip_V. ``D_t = S_t - E_{v~p_t}[S_v]`` (centred on the token's own vocabulary), ``σ_D`` its population std
    over the valid tokens. Candidates: tokens with ``A <= 0`` and ``D < -mu σ_D``; at most
    ``max(1, floor(max_frac N))`` of them (the floor of the floating-point product, as for Clip-Cov) are dropped, the
    most negative ``D`` first. The threshold is on the raw
    ``D`` (its batch mean is ~0 on-policy, Cor. 3.5), as in the released code. Dropped tokens leave the
    normaliser. Given ``PolicyBatch.population`` (the step's whole batch), ``σ_D``, the cap and the choice are taken
    over the whole training batch, as the released code does before mini-batching."""

    requires: ClassVar[tuple[str, ...]] = ("disc_centered",)
    step_statistics: ClassVar[bool] = True

    mu: float = Field(8.5, gt=0.0, description="mu in sigma units; 8.5, swept 7.5-8.5 (arXiv 2602.03392)")
    max_frac: float = Field(1e-4, gt=0.0, le=1.0, description="cap on the dropped share of tokens; 1e-4 (released code)")
    keep_in_normaliser: bool = Field(False, description="dropped tokens leave the normaliser, as in the released code")

    def decide(self, batch: PolicyBatch, advantages: torch.Tensor) -> tuple[torch.Tensor, ...]:
        centered = in_float64(batch.require("disc_centered", "selector 'clip_v'"))
        mask, advantages = batch.mask.to(centered.device), advantages.to(centered.device)
        std = masked_population_std(centered, mask)
        drop = torch.zeros_like(mask)
        if float(std) >= _MIN_STD:
            candidates = mask & (advantages <= 0) & (centered < -self.mu * std)
            candidate_index = candidates.flatten().nonzero().squeeze(-1)
            cap = max(1, int(self.max_frac * int(mask.sum())))
            if candidate_index.numel() > cap:
                most_negative = centered.flatten()[candidate_index].topk(cap, largest=False).indices
                candidate_index = candidate_index[most_negative]
            drop.view(-1)[candidate_index] = True
        return drop.to(batch.mask.device), std

    def __call__(self, batch: PolicyBatch, advantages: torch.Tensor, surrogate: SurrogateOutput, metrics: Metrics) -> torch.Tensor:
        mask = batch.mask
        drop, std = self.decision(batch, advantages)
        metrics["select/clip_v_frac"] = fraction(drop, mask)
        metrics["clip_v/disc_centered_std"] = float(std)
        return drop
