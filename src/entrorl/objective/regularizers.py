"""Regularisers: terms added to the policy loss (per token before aggregation, or as a scalar after)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, PrivateAttr, field_validator, model_validator

from entrorl._checks import widest_float
from entrorl.dynamics import token_covariance
from entrorl.objective.batch import PolicyBatch, masked_mean, policy_ratio
from entrorl.objective.parts import Metrics, Regularizer, RegularizerTerm, register_part

__all__ = ["EntropyBonus", "AdaptiveEntropy", "KLReference", "KLCov", "kl_estimate"]

Aggregate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_ON_POLICY_WARN_AFTER = 3  # consecutive strictly on-policy steps (or calls) before KL-Cov warns that it does nothing


def _differentiable_entropy(batch: PolicyBatch, needed_by: str) -> torch.Tensor:
    entropy = batch.require("entropy", needed_by)
    if batch.log_prob.requires_grad and not entropy.requires_grad:
        raise ValueError(
            f"{needed_by} needs a differentiable PolicyBatch.entropy (its gradient is the bonus), but the entropy "
            "given carries no gradient: compute it with entrorl.tokens.token_stats under autograd, from the same "
            "logits as log_prob."
        )
    return entropy


@register_part(
    "entropy_bonus",
    description="loss - c * H: a fixed entropy bonus, gradient through H",
    paper="arXiv 2505.22617 (Sec. 4: 1e-4..1e-3 no effect, 1e-2 explodes)",
)
class EntropyBonus(Regularizer):
    """``loss - entropy_coeff * agg(H)`` (aggregated like the policy loss, over all valid tokens)."""

    aggregated_metrics: ClassVar[tuple[str, ...]] = ("reg/entropy_bonus",)
    requires: ClassVar[tuple[str, ...]] = ("entropy",)

    entropy_coeff: float = Field(1e-3, description="c; the seeds and arXiv 2505.22617 find 1e-4..1e-3 inert, 1e-2 explosive")

    def __call__(self, batch: PolicyBatch, advantages: torch.Tensor, aggregate: Aggregate, metrics: Metrics) -> RegularizerTerm:
        entropy = _differentiable_entropy(batch, "regularizer 'entropy_bonus'")
        mean_entropy = aggregate(entropy, batch.mask)
        metrics["reg/entropy_bonus"] = float(self.entropy_coeff * mean_entropy.detach())
        return RegularizerTerm(scalar=-self.entropy_coeff * mean_entropy)


@register_part(
    "adaptive_entropy",
    description="entropy bonus on only while H < target; coefficient steps +-delta, clipped to [min, max]",
    paper="arXiv 2505.22312 (Skywork-OR1)",
)
class AdaptiveEntropy(Regularizer):
    """Skywork-OR1's controller, acting once per training step. With ``e_k`` the token-mean entropy of all of step
    ``k``'s batches and ``c_k`` the coefficient, step ``k`` adds ``-c_k * 1[e_{k-1} < target] * agg(H)`` to the loss
    (the first step, with no earlier measurement, tests its own entropy: that of ``PolicyBatch.population``, the whole
    step batch, when a trainer splitting the step gives it, else that of the step's first batch), and after it
    ``c_{k+1} = clip(c_k + delta if e_k < target else c_k - delta, min_coeff, max_coeff)``. A step is the run of calls
    that share ``PolicyBatch.step``, so mini-batches, epochs and micro-batches move the coefficient once; a batch
    without a step is a step of its own. The coefficient, the entropy of the step being measured and the last
    verdict are state (checkpointed via ``state_dict``)."""

    requires: ClassVar[tuple[str, ...]] = ("entropy",)

    target_entropy: float = Field(0.2, ge=0.0, description="H_tgt = 0.2 nats (arXiv 2505.22312, released scripts)")
    delta: float = Field(1e-4, ge=0.0, description="coefficient step = 1e-4 (released code; the paper text says 5e-3)")
    entropy_coeff: float = Field(0.0, ge=0.0, description="initial coefficient c_0 = 0 (released scripts), clipped "
                                 "to [min_coeff, max_coeff] like every later one")
    min_coeff: float = Field(0.0, ge=0.0, description="lower clip of c = 0")
    max_coeff: float = Field(5e-3, ge=0.0, description="upper clip of c = 5e-3 (released scripts)")

    _coeff: float | None = PrivateAttr(default=None)
    _measuring: dict[str, Any] | None = PrivateAttr(default=None)  # {"step", "entropy_sum", "tokens"} of the open step
    _below_target: bool | None = PrivateAttr(default=None)  # verdict of the last finished step: is the bonus on

    @model_validator(mode="after")
    def _check_bounds(self) -> "AdaptiveEntropy":
        if not self.min_coeff <= self.max_coeff:
            raise ValueError(f"min_coeff must be <= max_coeff, got {self.min_coeff} > {self.max_coeff}")
        return self

    @property
    def reads_step_statistics(self) -> bool:
        return self._below_target is None  # the first step's verdict, before any step has been measured

    @property
    def coefficient(self) -> float:
        """The coefficient in force: ``entropy_coeff`` clipped to ``[min_coeff, max_coeff]`` until the first step
        moves it (so the first step too trains within the bounds)."""
        if self._coeff is None:
            return min(max(self.entropy_coeff, self.min_coeff), self.max_coeff)
        return self._coeff

    def state_dict(self) -> dict[str, Any]:
        return {"coefficient": self.coefficient, "below_target": self._below_target,
                "measuring": None if self._measuring is None else dict(self._measuring)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._coeff = float(state["coefficient"]) if "coefficient" in state else None
        self._below_target = state.get("below_target")
        self._measuring = None if state.get("measuring") is None else dict(state["measuring"])

    def share_measurement(self, batch: PolicyBatch, total: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Under data parallelism, make the controller measure every process's tokens: called on every process, once
        at the first micro-batch ``batch`` of each step and before the loss, with ``total`` summing a tensor over the
        processes (one collective per call, whatever this process holds). The step measured so far closes with the
        entropy sum and token count of every process, so every coefficient moves alike; before any step is decided,
        the first micro-batches of every process decide the first step."""
        measuring = self._measuring
        undecided = self._below_target is None and measuring is None
        first = (0.0, 0.0)
        if undecided and batch.entropy is not None and bool(batch.mask.any()):
            entropy = torch.where(batch.mask, batch.entropy.detach().to(widest_float(batch.mask.device)), 0.0)
            first = (float(entropy.sum()), float(batch.mask.sum()))
        held = (measuring["entropy_sum"], measuring["tokens"]) if measuring is not None else (0.0, 0.0)
        summed = total(torch.tensor([*held, *first], dtype=widest_float(batch.mask.device), device=batch.mask.device)).tolist()
        if summed[1] > 0:
            self._measuring = {"step": None if measuring is None else measuring["step"], "entropy_sum": summed[0],
                               "tokens": summed[1], "first_verdict": None}
            self.end_step()
        if self._below_target is None and summed[3] > 0:
            self._below_target = summed[2] / summed[3] < self.target_entropy

    def end_step(self) -> Metrics:
        """Close the measured step: its entropy decides the next coefficient and whether the bonus is on."""
        if self._measuring is None:
            return {}
        measured = self._measuring["entropy_sum"] / self._measuring["tokens"]
        below = measured < self.target_entropy
        step = self.delta if below else -self.delta
        self._coeff = min(self.max_coeff, max(self.min_coeff, self.coefficient + step))
        self._below_target = below
        self._measuring = None
        return {"reg/adaptive_entropy_step_entropy": measured, "reg/adaptive_entropy_next_coeff": self._coeff}

    def __call__(self, batch: PolicyBatch, advantages: torch.Tensor, aggregate: Aggregate, metrics: Metrics) -> RegularizerTerm:
        entropy = _differentiable_entropy(batch, "regularizer 'adaptive_entropy'")
        if batch.mask.any():
            if self._measuring is not None and (batch.step is None or batch.step != self._measuring["step"]):
                self.end_step()
            tokens = float(batch.mask.sum())
            measured = float(masked_mean(entropy.detach(), batch.mask))
            if self._measuring is None:
                # with no finished step yet, the step itself decides the bonus: its whole batch when given it
                first_verdict = None
                if self._below_target is None:
                    whole = batch.population
                    first_verdict = (measured if whole is None or whole.entropy is None or not whole.mask.any()
                                     else float(masked_mean(whole.entropy.detach(), whole.mask))) < self.target_entropy
                self._measuring = {"step": batch.step, "entropy_sum": 0.0, "tokens": 0.0, "first_verdict": first_verdict}
            self._measuring["entropy_sum"] += measured * tokens
            self._measuring["tokens"] += tokens
        # an empty batch measures nothing and leaves the controller as it is, but reports the same keys (a
        # data-parallel run gathers every key from every rank)
        below_target = self._below_target
        if below_target is None:
            below_target = bool(self._measuring and self._measuring["first_verdict"])
        active = self.coefficient if below_target else 0.0
        metrics["reg/adaptive_entropy_coeff"] = active
        metrics["reg/adaptive_entropy_controller_coeff"] = self.coefficient
        metrics["reg/adaptive_entropy_below_target"] = float(below_target)
        if not batch.mask.any():
            return RegularizerTerm()
        return RegularizerTerm(scalar=-active * aggregate(entropy, batch.mask))


def kl_estimate(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled token, ``delta = log pi - log pi_ref``
    (Schulman, "Approximating KL divergence", 2020):

    * ``k1``: ``delta`` (unbiased, high variance, can be negative)
    * ``k2``: ``delta^2 / 2``
    * ``k3``: ``exp(-delta) + delta - 1`` (unbiased, always >= 0; verl's ``low_var_kl``, clamped to [-10, 10])
    """
    delta = log_prob - ref_log_prob.detach()
    if estimator == "k1":
        return delta
    if estimator == "k2":
        return 0.5 * delta.square()
    if estimator == "k3":
        neg = (-delta).clamp(-20.0, 20.0)
        return (neg.exp() - neg - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"unknown KL estimator '{estimator}'; choose k1, k2 or k3")


# verl's ``kl_loss_type`` names for the estimators (its ``low_var_kl`` is the clamped k3 of kl_estimate; a '+' suffix
# takes k2's gradient, which for k2 itself is k2)
VERL_KL_NAMES = {"kl": "k1", "mse": "k2", "mse+": "k2", "k2+": "k2", "low_var_kl": "k3"}


@register_part(
    "kl_ref",
    description="beta * KL(pi || pi_ref) to a frozen reference policy, estimator k1 / k2 / k3",
    paper="arXiv 2402.03300 (GRPO's KL term, k3)",
)
class KLReference(Regularizer):
    """``+ kl_loss_coef * agg(k(log pi, log pi_ref))`` over the valid tokens.

    With ``importance_weighted`` each token's estimate is multiplied by ``r = pi / pi_old`` (differentiable), the
    unbiased reverse-KL gradient of DeepSeek-V3.2 (arXiv 2512.02556; TRL's ``use_bias_correction_kl``): the tokens
    were sampled from ``pi_old``, and ``r`` reweighs them to ``pi``. Its gradient differs even on-policy, where
    ``r = 1`` but ``grad r = grad log pi``."""

    requires: ClassVar[tuple[str, ...]] = ("ref_log_prob",)
    aggregated_metrics: ClassVar[tuple[str, ...]] = ("kl/ref",)

    kl_loss_coef: float = Field(1e-3, ge=0.0, description="beta = 1e-3 (verl's kl_loss_coef default)")
    kl_loss_type: Literal["k1", "k2", "k3"] = Field(
        "k3", description="estimator; k3 as in GRPO (arXiv 2402.03300); verl's names kl, mse, low_var_kl are k1, k2, k3")
    importance_weighted: bool = Field(False, description="weigh each token's KL by pi / pi_old (DeepSeek-V3.2, arXiv 2512.02556)")

    @field_validator("kl_loss_type", mode="before")
    @classmethod
    def _verl_names(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in VERL_KL_NAMES and (value.endswith("+") or value in ("abs", "full")):
            raise ValueError(f"verl's {value!r} has no estimator here (the straight-through '+' variants, abs and full "
                             "are verl's own); choose k1, k2 or k3 (verl's kl, mse, low_var_kl)")
        return VERL_KL_NAMES.get(value, value) if isinstance(value, str) else value

    def __call__(self, batch: PolicyBatch, advantages: torch.Tensor, aggregate: Aggregate, metrics: Metrics) -> RegularizerTerm:
        # padding may hold anything (NaN included): k2's backward would multiply a zero upstream gradient by it
        zero = torch.zeros((), dtype=batch.log_prob.dtype, device=batch.log_prob.device)
        log_prob = torch.where(batch.mask, batch.log_prob, zero)
        estimate = kl_estimate(log_prob, torch.where(batch.mask, batch.ref_log_prob.detach(), zero), self.kl_loss_type)
        if self.importance_weighted:
            estimate = estimate * policy_ratio(batch)[0]
        kl = aggregate(estimate, batch.mask)
        metrics["kl/ref"] = float(kl.detach())
        return RegularizerTerm(scalar=self.kl_loss_coef * kl)


@register_part(
    "kl_cov",
    description="penalise |log r| on the top max(1, floor(k N)) tokens by covariance",
    paper="arXiv 2505.22617 (KL-Cov)",
)
class KLCov(Regularizer):
    """KL-Cov. With ``C_t = (log pi_t - mean log pi)(A_t - mean A)`` over the valid tokens, the top
    ``max(1, floor(kl_cov_ratio * N))`` tokens by ``C_t`` get ``+ ppo_kl_coef * |log pi - log pi_old|`` added to
    their loss (the released code's KL term). The floor is that of the floating-point product, as the released code
    computes it (``int(k * N)``: 0.29 of 100 tokens selects 28).

    Strictly on-policy (one update per rollout, ``log pi == log pi_old``) the term is zero with zero
    gradient, so KL-Cov reduces to its surrogate: it acts only with several mini-batches or epochs per
    rollout. A warning says so after three training steps in a row (``PolicyBatch.step``; calls, without it) in which
    every selected token had ``log r == 0``: the micro-batches of a step's first, on-policy update are one step, and
    calls whose advantages are all 0 (the policy loss moves no weight then, whatever the schedule) are not counted."""

    kl_cov_ratio: float = Field(2e-3, gt=0.0, le=1.0, description="k = 2e-3 for 7B, 2e-4 for 32B (arXiv 2505.22617)")
    ppo_kl_coef: float = Field(1.0, ge=0.0, description="beta = 1 (arXiv 2505.22617 recipe)")

    _warned_on_policy: bool = PrivateAttr(default=False)
    _on_policy_calls: int = PrivateAttr(default=0)
    _on_policy_steps: set = PrivateAttr(default_factory=set)

    def leave_on_policy_warning_to_caller(self) -> None:
        """Give up the on-policy warning, for a caller that counts on-policy updates in its own units (verl, where
        each micro-batch is a call and ``PolicyBatch.step`` is not known)."""
        self._warned_on_policy = True

    def __call__(self, batch: PolicyBatch, advantages: torch.Tensor, aggregate: Aggregate, metrics: Metrics) -> RegularizerTerm:
        mask = batch.mask
        n_valid = int(mask.sum())
        selected = torch.zeros_like(mask)
        if n_valid:
            cov = token_covariance(batch.log_prob.detach(), advantages, mask)
            n_select = max(1, int(self.kl_cov_ratio * n_valid))
            scores = torch.where(mask, cov, torch.full_like(cov, float("-inf")))
            selected.view(-1)[scores.flatten().topk(n_select).indices] = True
        abs_log_ratio = (batch.log_prob - batch.old_log_prob.detach()).abs()
        penalty = torch.where(selected, self.ppo_kl_coef * abs_log_ratio, torch.zeros_like(abs_log_ratio))
        on_policy = bool(selected.any()) and float(abs_log_ratio.detach()[selected].max()) == 0.0
        # advantages all 0 (every group's rewards equal): the policy loss moves no weight, so log r stays 0 in later
        # updates too; such a batch says nothing about whether the updates are on-policy, and is not counted
        # a call without gradients (a validation pass) trains nothing: not a step of the count
        if n_valid and torch.is_grad_enabled() and bool(advantages.detach()[mask].ne(0).any()):
            self._count_on_policy(on_policy, batch.step)
        metrics["kl_cov/abs_log_ratio"] = float(masked_mean(abs_log_ratio.detach(), mask))
        return RegularizerTerm(per_token=penalty, covers=selected)  # its share: select/kl_cov_frac

    def _count_on_policy(self, on_policy: bool, step: int | None) -> None:
        """Warn once after :data:`_ON_POLICY_WARN_AFTER` steps in a row (calls, without ``step``) of on-policy calls:
        the first update of every rollout batch is on-policy anyway, so only a run of such steps means no effect."""
        self._on_policy_calls = self._on_policy_calls + 1 if on_policy else 0
        if not on_policy:
            self._on_policy_steps.clear()
        elif not self._warned_on_policy:  # said once: no need to keep counting
            self._on_policy_steps.add(step if step is not None else ("call", self._on_policy_calls))
        if len(self._on_policy_steps) >= _ON_POLICY_WARN_AFTER and not self._warned_on_policy:
            warnings.warn(
                "kl_cov: log pi == log pi_old on every selected token, so the KL term is zero with zero gradient "
                "(KL-Cov is a no-op strictly on-policy); use several mini-batches or epochs per rollout.",
                stacklevel=3,
            )
            self._warned_on_policy = True
