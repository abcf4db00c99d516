"""Sampling-based evaluation of a model on prompts: Avg@n, unbiased Pass@k, polarisation, fork tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from entrorl._checks import check_int
from entrorl.data import PromptRecord
from entrorl.evaluation import EvalSummary, summarize_samples
from entrorl.modeling import bucketed_response_token_stats
from entrorl.rewards import RewardRunner
from entrorl.rollout import HFSampler, SamplingParams, private_seed
from entrorl.trainer.diagnostics import top_fork_tokens
from entrorl.trainer.precision import float16_range_note

__all__ = ["EvaluationResult", "evaluate_model"]


@dataclass
class EvaluationResult:
    summary: EvalSummary
    forks: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    reward_errors: int = 0
    first_reward_error: str | None = None

    correct_threshold: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        """The summary as JSON-able types, with the reward's correctness threshold and its failures (samples
        that scored 0 because the reward raised: Avg@n and Pass@k count them as wrong)."""
        return {**self.summary.to_dict(), "threshold": self.correct_threshold, "reward_errors": self.reward_errors}

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        metrics = {f"{prefix}avg_at_n": self.summary.avg_at_n, f"{prefix}n": float(self.summary.n_samples),
                   f"{prefix}reward_errors": float(self.reward_errors)}
        metrics.update({f"{prefix}pass_at_{k}": value for k, value in self.summary.pass_at_k.items()})
        metrics[f"{prefix}frac_solved_none"] = self.summary.polarisation.frac_zero
        metrics[f"{prefix}frac_solved_all"] = self.summary.polarisation.frac_one
        return metrics


class NonFiniteLogProbs(ValueError):
    """The model gave inf or NaN log-probs to tokens it sampled: its samples say nothing."""


def refuse_non_finite_log_probs(rollouts, model: torch.nn.Module | None = None, *, dtype_setting: str = "--dtype") -> None:
    """:class:`NonFiniteLogProbs` when a sampled token's log-prob is inf or NaN: NaN logits draw token 0 at every
    position, and every sample would be scored wrong. A ``model`` in float16 is said to be one (its range is a likely
    cause), with ``dtype_setting``, what loads it in another type."""
    broken = int((~torch.isfinite(rollouts.sampler_log_probs[rollouts.response_mask])).sum())
    if broken:
        raise NonFiniteLogProbs(f"the model gives inf or NaN log-probs to {broken} of its "
                                f"{int(rollouts.response_mask.sum())} sampled tokens (weights that overflow, or a broken "
                                "checkpoint)" + ("" if model is None else float16_range_note(model, dtype_setting)))


@torch.no_grad()
def evaluate_model(
    model,
    tokenizer,
    records: list[PromptRecord],
    prompt_ids: list[list[int]],
    reward: RewardRunner,
    *,
    n: int,
    ks: list[int] | None,
    sampling: SamplingParams,
    seed: int,
    batch_size: int = 64,
    top_forks: int = 0,
    keep_samples: bool = False,
    progress=None,
    scoring_batch_size: int | None = None,
    dtype_setting: str = "--dtype",
) -> EvaluationResult:
    """Sample ``n`` responses per prompt with a private seed (the caller's RNG state is left untouched), score
    them, and summarise. With ``top_forks`` the highest-entropy response positions are decoded in context (their
    entropy at the sampling temperature, or at temperature 1 for greedy sampling). With ``keep_samples`` the result
    lists every sample (prompt, completion with its token ids and their log-probability under the sampler, reference
    answer, reward, correctness, length, truncation, the reward's reason), prompt by prompt. The samples depend on
    ``batch_size`` (one random number per row of a batch per token). The fork tokens' entropies are computed in
    pieces of ``scoring_batch_size`` rows (default ``batch_size``), as many as the caller can score in one forward.
    Inf or NaN log-probs raise :class:`NonFiniteLogProbs`, naming ``dtype_setting`` when the model is in float16."""
    if not records:
        raise ValueError("evaluate_model: no prompts to evaluate")
    n = check_int(n, "evaluate_model: n", minimum=1)
    batch_size = check_int(batch_size, "evaluate_model: batch_size", minimum=1)
    piece_rows = batch_size if scoring_batch_size is None else check_int(
        scoring_batch_size, "evaluate_model: scoring_batch_size", minimum=1)
    if len(prompt_ids) != len(records):
        raise ValueError(f"evaluate_model: {len(records)} records but {len(prompt_ids)} tokenized prompts; expected one each")
    sampler = HFSampler.for_model(model, tokenizer, batch_size=batch_size)
    repeated_ids = [ids for ids in prompt_ids for _ in range(n)]
    repeated = [record for record in records for _ in range(n)]
    with private_seed(seed, next(model.parameters()).device):
        rollouts = sampler.generate(repeated_ids, sampling, progress=progress)
    refuse_non_finite_log_probs(rollouts, model, dtype_setting=dtype_setting)
    completion_ids = rollouts.completion_ids()
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    result = reward([r.prompt for r in repeated], completions, [r.answer for r in repeated], [r.meta for r in repeated],
                    rollouts.lengths.tolist(), sources=[r.source for r in repeated],
                    sample_numbers=[row % n for row in range(len(repeated))])  # as the samples file numbers them
    summary = summarize_samples(result.correct.view(len(records), n).numpy(), ks=ks)
    samples = []
    if keep_samples:
        sequence_log_probs = rollouts.summed_sampler_log_probs()
        for row, record in enumerate(repeated):
            samples.append({
                "source": record.source, "sample": row % n, "prompt": record.prompt, **record.conversation(),
                "completion": completions[row],
                "completion_ids": completion_ids[row], "sampler_log_prob": sequence_log_probs[row],
                # the score the threshold was compared with (float64, the penalty added), not the float32 training reward
                "answer": record.answer, "reward": float(result.exact_scores[row] + result.penalties[row].double()),
                "correct": bool(result.correct[row]),
                "length": int(rollouts.lengths[row]), "truncated": bool(rollouts.truncated[row]),
                "reason": result.reasons[row] if result.reasons else None,
            })
    forks = []
    if top_forks:
        was_training = model.training
        model.eval()
        pieces = torch.arange(len(repeated)).split(piece_rows)
        entropy = torch.cat([bucketed_response_token_stats(
            model, rollouts.prompt_ids[piece], rollouts.prompt_mask[piece], rollouts.response_ids[piece],
            rollouts.response_mask[piece], temperature=sampling.temperature or 1.0, need=("entropy",),
        ).entropy.float().cpu() for piece in pieces])
        model.train(was_training)
        forks = top_fork_tokens(tokenizer, rollouts.prompt_ids, rollouts.prompt_mask, rollouts.response_ids,
                                rollouts.response_mask, entropy, k=top_forks,
                                sources=[record.source for record in repeated])
    return EvaluationResult(summary=summary, forks=forks, samples=samples, reward_errors=result.errors, first_reward_error=result.first_error,
                            correct_threshold=reward.correct_threshold)
