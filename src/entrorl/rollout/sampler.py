"""Batched sampling from a Hugging Face causal LM with a KV cache, keeping the sampler's log-probs.

The loop is the plain one: one prefill over the left-padded prompts, then one cached forward per new
token. Temperature, top-k and top-p are applied to the last position's logits; the log-prob of each
sampled token under that *processed* distribution is kept (``sampler_log_probs``), which is what TIS and
IcePop compare with the trainer's log-probs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Rollouts", "SamplingParams", "HFSampler", "process_logits"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``top_k = 0`` and ``top_p = 1`` disable those filters; ``temperature = 0`` is greedy."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class Rollouts:
    """Sampled responses, one row per sample.

    ``prompt_ids`` are left-padded ``[B, P]`` with ``prompt_mask``; ``response_ids`` right-padded ``[B, R]`` with
    ``response_mask`` (True up to and including EOS); ``sampler_log_probs`` ``[B, R]`` float32 (0 on padding);
    ``lengths`` ``[B]``; ``truncated`` ``[B]`` (no EOS within ``max_new_tokens``).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    sampler_log_probs: torch.Tensor
    lengths: torch.Tensor
    truncated: torch.Tensor

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def select(self, index: torch.Tensor | Sequence[int]) -> "Rollouts":
        index = torch.as_tensor(index, dtype=torch.long)
        return Rollouts(**{name: getattr(self, name)[index] for name in self.__dataclass_fields__})

    @staticmethod
    def concat(parts: Sequence["Rollouts"], pad_token_id: int) -> "Rollouts":
        """Concatenate rollouts, re-padding prompts on the left and responses on the right."""
        prompt_width = max(p.prompt_ids.shape[1] for p in parts)
        response_width = max(p.response_ids.shape[1] for p in parts)

        def pad(tensor: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
            missing = width - tensor.shape[1]
            if missing == 0:
                return tensor
            filler = torch.full((tensor.shape[0], missing), value, dtype=tensor.dtype, device=tensor.device)
            return torch.cat([filler, tensor] if left else [tensor, filler], dim=1)

        return Rollouts(
            prompt_ids=torch.cat([pad(p.prompt_ids, prompt_width, pad_token_id, True) for p in parts]),
            prompt_mask=torch.cat([pad(p.prompt_mask, prompt_width, False, True) for p in parts]),
            response_ids=torch.cat([pad(p.response_ids, response_width, pad_token_id, False) for p in parts]),
            response_mask=torch.cat([pad(p.response_mask, response_width, False, False) for p in parts]),
            sampler_log_probs=torch.cat([pad(p.sampler_log_probs, response_width, 0.0, False) for p in parts]),
            lengths=torch.cat([p.lengths for p in parts]),
            truncated=torch.cat([p.truncated for p in parts]),
        )


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on ``[B, V]`` logits; filtered entries become ``-inf``."""
    scores = logits.float()
    if params.temperature > 0 and params.temperature != 1.0:
        scores = scores / params.temperature
    if params.top_k and params.top_k < scores.shape[-1]:
        kth = scores.topk(params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the mass before it already reaches top_p (the most likely token always stays)
        remove_sorted = (cumulative - sorted_scores.softmax(dim=-1)) >= params.top_p
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


class HFSampler:
    """Samples responses from a causal LM (any ``transformers`` model with a KV cache).

    Args:
        model: the policy (sampling runs under ``torch.no_grad`` in eval mode; the mode is restored).
        eos_token_id: id (or ids) that end a response.
        pad_token_id: id used for padding.
        batch_size: rows per generation call (memory bound); prompts are processed in chunks of this size.
    """

    def __init__(self, model: torch.nn.Module, *, eos_token_id: int | Sequence[int], pad_token_id: int, batch_size: int = 64):
        self.model = model
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if not eos:
            raise ValueError("HFSampler needs at least one eos_token_id")
        self.eos_token_ids = torch.tensor(eos, dtype=torch.long)
        self.pad_token_id = int(pad_token_id)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, progress=None) -> Rollouts:
        """Sample one response per prompt (repeat a prompt to sample a group). ``progress`` is called with the
        number of prompts finished after each chunk."""
        if not prompts:
            raise ValueError("generate() got no prompts")
        was_training = self.model.training
        self.model.eval()
        try:
            parts = []
            for start in range(0, len(prompts), self.batch_size):
                parts.append(self._generate_chunk(prompts[start : start + self.batch_size], params))
                if progress is not None:
                    progress(min(start + self.batch_size, len(prompts)))
        finally:
            self.model.train(was_training)
        return parts[0] if len(parts) == 1 else Rollouts.concat(parts, self.pad_token_id)

    def _generate_chunk(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Rollouts:
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        if width == 0:
            raise ValueError("every prompt must have at least one token")
        prompt_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        prompt_mask = torch.zeros((len(prompts), width), dtype=torch.bool)
        for row, ids in enumerate(prompts):
            if ids:
                prompt_ids[row, width - len(ids) :] = torch.as_tensor(list(ids), dtype=torch.long)
                prompt_mask[row, width - len(ids) :] = True
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        eos_ids = self.eos_token_ids.to(device)

        attention = prompt_mask.long()
        positions = (attention.cumsum(dim=-1) - 1).clamp(min=0)
        output = self.model(
            input_ids=prompt_ids, attention_mask=attention, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        cache = output.past_key_values
        next_logits = output.logits[:, -1, :]
        next_position = positions[:, -1:] + 1

        batch = len(prompts)
        tokens = torch.full((batch, params.max_new_tokens), self.pad_token_id, dtype=torch.long, device=device)
        log_probs = torch.zeros((batch, params.max_new_tokens), dtype=torch.float32, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        for step in range(params.max_new_tokens):
            scores = process_logits(next_logits, params)
            step_log_probs = scores.log_softmax(dim=-1)
            if params.temperature == 0:
                sampled = scores.argmax(dim=-1)
            else:
                sampled = torch.multinomial(step_log_probs.exp(), 1).squeeze(-1)
            sampled = torch.where(finished, torch.full_like(sampled, self.pad_token_id), sampled)
            tokens[:, step] = sampled
            log_probs[:, step] = torch.where(finished, 0.0, step_log_probs.gather(-1, sampled[:, None]).squeeze(-1))
            lengths += (~finished).long()
            finished |= torch.isin(sampled, eos_ids)
            if bool(finished.all()) or step == params.max_new_tokens - 1:
                break
            attention = torch.cat([attention, torch.ones((batch, 1), dtype=attention.dtype, device=device)], dim=-1)
            output = self.model(
                input_ids=sampled[:, None],
                attention_mask=attention,
                position_ids=next_position,
                past_key_values=cache,
                use_cache=True,
            )
            cache = output.past_key_values
            next_logits = output.logits[:, -1, :]
            next_position = next_position + 1

        used = int(lengths.max())
        tokens, log_probs = tokens[:, :used], log_probs[:, :used]
        response_mask = torch.arange(used, device=device)[None, :] < lengths[:, None]
        return Rollouts(
            prompt_ids=prompt_ids.cpu(),
            prompt_mask=prompt_mask.cpu(),
            response_ids=tokens.cpu(),
            response_mask=response_mask.cpu(),
            sampler_log_probs=log_probs.cpu(),
            lengths=lengths.cpu(),
            truncated=(~finished).cpu(),
        )
