"""The tensors a policy objective consumes, and masked reductions over them."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from entrorl._checks import as_bool_mask

__all__ = ["PolicyBatch", "OPTIONAL_FIELDS", "policy_ratio", "masked_mean", "masked_population_std", "masked_quantile", "sorted_quantile", "fraction"]

# How to obtain each optional field; used in the error raised when a method needs one the batch lacks.
OPTIONAL_FIELDS: dict[str, str] = {
    "entropy": "entrorl.tokens.token_stats(logits, targets, mask=mask, need=('logprob', 'entropy')).entropy",
    "disc": "entrorl.tokens.token_stats(logits, targets, mask=mask, need=('logprob', 'disc')).disc",
    "disc_centered": "entrorl.tokens.token_stats(logits, targets, mask=mask, need=('logprob', 'disc_centered')).disc_centered",
    "ref_log_prob": "the log-probs of the sampled tokens under the frozen reference model (token_stats on its logits)",
    "rollout_log_prob": "the log-probs the sampler (e.g. vLLM) reported for the sampled tokens",
}


@dataclass
class PolicyBatch:
    """Per-token tensors of one (mini-)batch of responses, all ``[B, T]``.

    Half-precision (bfloat16 / float16) tensors are taken in float32: near ``r = 1`` bfloat16's resolution (2^-7)
    is coarser than a clip range such as GSPO's 3e-4, so ratios, clipping and means are computed in float32; the
    gradient still reaches the tensors given. Shapes, dtypes and the mask are checked, values are not: NaN at a valid
    token makes the loss NaN, as in torch's own losses, which is what a trainer's guard against non-finite losses
    (entrorl's skips such a step and counts it) sees; padding may hold anything.

    Attributes:
        log_prob: log-probs of the sampled tokens under the policy being trained (carries the gradient).
        old_log_prob: log-probs under the policy that produced the rollouts (detached); ``r = exp(log_prob - old_log_prob)``.
        advantages: per-token advantages ``[B, T]`` (a per-sequence ``[B]`` tensor is broadcast over tokens).
        mask: valid response tokens; bool (0/1 tensors are accepted and converted).
        entropy: full-vocabulary token entropy H_t of the trained policy (differentiable for an entropy bonus).
        disc: entropy discriminator ``S = p (log p + H)`` of the sampled tokens (arXiv 2602.03392).
        disc_centered: ``D = S - E_{v~p}[S_v]`` (arXiv 2602.03392, Thm 3.3).
        ref_log_prob: log-probs under a frozen reference policy (for ``kl_ref``).
        rollout_log_prob: log-probs reported by the sampler (for TIS / IcePop).
        step: the training step the batch belongs to (the trainer's step, TRL's optimizer step): parts that act once
            per step, such as the adaptive entropy controller, tell steps apart by it; None treats every call as a step.
        population: the step's whole batch (detached, under the policy that sampled it) when this batch is a
            mini- or micro-batch of it, with ``rows``, this batch's row indices in it. Selectors whose reference
            code takes its statistics over the whole training batch (Clip_B, Clip_V) decide there.
    """

    log_prob: torch.Tensor
    old_log_prob: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    entropy: torch.Tensor | None = None
    disc: torch.Tensor | None = None
    disc_centered: torch.Tensor | None = None
    ref_log_prob: torch.Tensor | None = None
    rollout_log_prob: torch.Tensor | None = None
    step: int | None = None
    population: PolicyBatch | None = None
    rows: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not torch.is_tensor(self.log_prob) or self.log_prob.dim() != 2:
            raise ValueError(
                f"PolicyBatch.log_prob must be a [B, T] tensor, got {type(self.log_prob).__name__} "
                f"with shape {tuple(getattr(self.log_prob, 'shape', ()))}"
            )
        shape = tuple(self.log_prob.shape)
        if not torch.is_tensor(self.mask) or tuple(self.mask.shape) != shape:
            raise ValueError(f"PolicyBatch.mask must be a tensor of shape {shape}, got {tuple(getattr(self.mask, 'shape', ()))}")
        self.mask = as_bool_mask(self.mask, "PolicyBatch.mask").contiguous()  # selectors write through a flat view
        if torch.is_tensor(self.advantages) and self.advantages.dim() == 1 and self.advantages.shape[0] == shape[0]:
            self.advantages = self.advantages.unsqueeze(-1).expand(shape)
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name in ("mask", "step", "population", "rows") or value is None:
                continue
            if not torch.is_tensor(value) or tuple(value.shape) != shape:
                per_sequence = f" or ({shape[0]},), one per sequence" if field.name == "advantages" else ""
                raise ValueError(
                    f"PolicyBatch.{field.name} must be a tensor of shape {shape} (like log_prob){per_sequence}, "
                    f"got {tuple(getattr(value, 'shape', ())) if torch.is_tensor(value) else type(value).__name__}"
                )
            if not value.is_floating_point():
                raise ValueError(f"PolicyBatch.{field.name} must be floating point, got {value.dtype}")
            if value.dtype in (torch.bfloat16, torch.float16):  # differentiable: the gradient reaches the original
                setattr(self, field.name, value.float())

        if self.population is not None:
            rows = self.rows
            if not torch.is_tensor(rows) or rows.dim() != 1 or rows.shape[0] != shape[0] or rows.is_floating_point():
                raise ValueError(f"PolicyBatch.rows must be {shape[0]} integer row indices into the population, got "
                                 f"{tuple(rows.shape) if torch.is_tensor(rows) else type(rows).__name__}")
            if self.population.log_prob.shape[1] != shape[1]:
                raise ValueError(f"PolicyBatch.population has {self.population.log_prob.shape[1]} token columns, the batch "
                                 f"{shape[1]}: a mini-batch must keep the population's width")

    @property
    def num_valid(self) -> int:
        return int(self.mask.sum())

    def require(self, field_name: str, needed_by: str) -> torch.Tensor:
        """The optional field, or a ValueError naming it and saying how to compute it."""
        value = getattr(self, field_name)
        if value is None:
            raise ValueError(
                f"{needed_by} needs PolicyBatch.{field_name}, which this batch does not have. "
                f"Compute it with {OPTIONAL_FIELDS[field_name]} and pass {field_name}=... to PolicyBatch."
            )
        return value


# verl clamps the log-ratio to this range before exponentiating, so one wild token cannot overflow.
_LOG_RATIO_BOUND = 20.0


def policy_ratio(batch: PolicyBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r, log r)`` with ``r = pi / pi_old``, differentiable through ``log_prob``; ``r = 1`` at padding whatever the
    log-probs hold there (NaN included), with no gradient."""
    log_ratio = torch.where(batch.mask, batch.log_prob - batch.old_log_prob.detach(), torch.zeros_like(batch.log_prob))
    log_ratio = log_ratio.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    return log_ratio.exp(), log_ratio


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` (0 for an empty mask)."""
    count = mask.sum()
    return torch.where(mask, values, torch.zeros_like(values)).sum() / count.clamp(min=1)


def masked_population_std(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population standard deviation (denominator n) of ``values`` over ``mask``."""
    mean = masked_mean(values, mask)
    return masked_mean((values - mean).square(), mask).sqrt()


def masked_quantile(values: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of the valid values with linear interpolation (``numpy.quantile``'s default).

    Sorting instead of ``torch.quantile`` lifts that function's 16M-element limit.
    """
    valid = values[mask].detach()
    valid = valid if valid.dtype == torch.float64 else valid.float()
    if valid.numel() == 0:
        return torch.tensor(float("nan"), device=values.device)
    return sorted_quantile(valid.sort().values, q)


def sorted_quantile(ordered: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of the non-empty, ascending 1-D ``ordered``, with linear interpolation (``numpy.quantile``'s
    default): one sort serves several quantiles, at any size."""
    position = q * (ordered.numel() - 1)
    lower = int(position)
    upper = min(lower + 1, ordered.numel() - 1)
    weight = position - lower
    return ordered[lower] + (ordered[upper] - ordered[lower]) * weight


def fraction(selected: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of the valid tokens that are selected (0.0 for an empty mask)."""
    count = int(mask.sum())
    return float((selected & mask).sum()) / count if count else 0.0
