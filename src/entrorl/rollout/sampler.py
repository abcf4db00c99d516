"""Batched sampling from a Hugging Face causal LM with a KV cache, keeping the sampler's log-probs.

The loop is the plain one: one prefill over the left-padded prompts, then one cached forward per new
token, run either by :class:`~entrorl.rollout.static_cache.StaticCacheDecoder` (Llama-family models, a
preallocated cache) or by the model's own forward. Temperature, top-k and top-p are applied to the last
position's logits; the log-prob of each sampled token under that *processed* distribution is kept
(``sampler_log_probs``), which is what TIS and IcePop compare with the trainer's log-probs. With top-k or top-p the
two differ even between identical weights, by the mass the filter kept. At temperature 0 (greedy, a draw without a
density) the log-prob kept is the token's under the temperature-1 distribution after top-k / top-p.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from entrorl._checks import check_int, widest_float
from entrorl.modeling import (cache_argument, check_stop_tokens_can_be_sampled, left_pad, length_dependent_rope, logits_to_keep,
                              output_cache, reset_dynamic_rope, stop_token_ids)
from entrorl.rollout.static_cache import StaticCacheDecoder, static_cache_unsupported_reason

__all__ = ["Rollouts", "SamplingParams", "HFSampler", "leaves_tokens_out", "process_logits", "sample_from_log_probs", "DECODERS", "forked_rng", "private_seed"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``top_k = 0`` and ``top_p = 1`` disable those filters; ``temperature = 0`` is greedy."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_new_tokens", check_int(self.max_new_tokens, "max_new_tokens", minimum=1))
        if not (math.isfinite(self.temperature) and self.temperature >= 0):  # NaN compares as neither
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "top_k", check_int(self.top_k, "top_k", minimum=0))


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

    def completion_ids(self) -> list[list[int]]:
        """Each response's token ids without its padding (its EOS kept), as lists."""
        ids, mask = self.response_ids.cpu(), self.response_mask.cpu()
        return [row[keep].tolist() for row, keep in zip(ids, mask)]

    def summed_sampler_log_probs(self) -> list[float]:
        """Each response's log-probability under the sampler: the sum of its tokens' ``sampler_log_probs``."""
        return (self.sampler_log_probs.float() * self.response_mask).sum(-1).tolist()

    def select(self, index: torch.Tensor | Sequence[int]) -> "Rollouts":
        """The rows ``index`` names: row numbers, or a boolean mask over the rows."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            if index.shape != (len(self),):
                raise ValueError(f"a boolean mask selecting rollouts needs one entry per row ({len(self)}), got shape "
                                 f"{tuple(index.shape)}")
            index = index.nonzero().flatten()
        index = index.long()
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


def leaves_tokens_out(*, top_k: int | None, top_p: float | None, vocab_size: int | None = None,
                      min_p: float | None = None) -> bool:
    """Whether sampling with these settings draws from a truncated distribution: top-p below 1, a min-p, or a top-k
    below the vocabulary's ``vocab_size`` tokens (when it is known; :func:`process_logits` applies top-k only below
    it)."""
    top_k = top_k or 0
    return (top_p is not None and top_p < 1.0) or (min_p or 0) > 0 or 0 < top_k < (vocab_size or top_k + 1)


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on ``[B, V]`` logits; filtered entries become ``-inf``.

    A row that the division by a temperature close to 0 overflows to ``inf`` (which would give NaN probabilities) is
    shifted by its maximum first (softmax does not see the shift): its most likely token is 0 and every other one
    ``-inf``, as the limit says."""
    scores = logits.float()
    if params.temperature > 0 and params.temperature != 1.0:
        scaled = scores / params.temperature
        if params.temperature < 1.0:
            overflowed = (torch.isinf(scaled) & torch.isfinite(scores)).any(dim=-1, keepdim=True)
            if bool(overflowed.any()):
                shifted = (scores - scores.amax(dim=-1, keepdim=True)) / params.temperature
                scaled = torch.where(overflowed, shifted, scaled)
        scores = scaled
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


def sample_from_log_probs(log_probs: torch.Tensor, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """One draw per row of ``[B, V]`` normalised log-probs, by inverting the cumulative distribution with one
    uniform number per row: ``uniform`` (``[B, 1]`` in [0, 1)) or, by default, ``torch.rand`` (so seeded like any
    torch sampling). Entries at ``-inf`` are never drawn.

    In float64: a float32 uniform lies on a 2^-24 grid and a float32 running sum over a large vocabulary rounds
    away the small probabilities, so a token below about 6e-8 would be drawn at 0 or about 6e-8, not at its
    probability (on a 152k vocabulary, ~1e-3 of the mass was never drawn and some rare tokens came up 200x too often).
    Pass a float64 ``uniform`` for the same reason.
    """
    cumulative = log_probs.to(widest_float(log_probs.device)).exp().cumsum(dim=-1)
    total = cumulative[:, -1:]
    if uniform is None:
        uniform = torch.rand_like(total)
    # strictly below the total, so that rounding can never step past the last token with probability > 0
    threshold = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    return (cumulative <= threshold).sum(dim=-1)


def forked_rng(device: torch.device | str = "cpu"):
    """``torch.random.fork_rng`` over the CPU's generator and, for a CUDA or an Apple GPU, ``device``'s: the states
    the body leaves are put back afterwards."""
    device = torch.device(device)
    if device.type in ("cuda", "mps"):
        return torch.random.fork_rng(devices=[device], device_type=device.type)
    return torch.random.fork_rng(devices=[])


@contextlib.contextmanager
def private_seed(seed: int, device: torch.device | str = "cpu"):
    """Run the body with torch's generators seeded with ``seed`` (the CPU's, and ``device``'s when it is a CUDA or an
    Apple GPU, where sampling draws), then put back the states they had, so that the caller's random stream goes on
    as if the body had never run."""
    with forked_rng(device):
        torch.manual_seed(seed)
        yield


# pure state-space models, whose padding is handled once, in the prefill (transformers' generate passes them no mask
# at decode steps either)
_DECODE_WITHOUT_MASK = frozenset({"mamba", "falcon_mamba"})


class _TransformersDecoder:
    """Prefill and per-token decode through the model's own forward and its ``DynamicCache`` (any causal LM).

    A ``longrope`` model (:func:`length_dependent_rope`) switches every position of a call to its long factors once
    the call's longest sequence passes the original context; keys cached before then were rotated with the short
    ones, so at that step the cache is rebuilt from the whole sequences, as ``transformers``' generate does for Phi-3
    (every row of the batch then runs on the long factors). Rows are not dropped from a cache built on the long
    factors: the rows left could fall back under the original context, and back to the short factors. A dynamic-NTK
    model starts from its original frequencies (:func:`reset_dynamic_rope`)."""

    def __init__(self, model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
        self.model = model
        self.sequences = prompt_ids  # the prompts and every token fed since, for a rebuild of the cache
        self.attention = prompt_mask.long()
        self.cache = None
        self.cache_argument = cache_argument(model)
        self.next_position = None
        rope = length_dependent_rope(model)
        self.longrope_context = rope[1] if rope is not None and rope[0] == "longrope" else None  # original context
        self.long_factors = False  # whether the cached keys were rotated with longrope's long factors
        # a state-space model's decode step takes no mask: it would scale the one new token by the whole mask
        self.decode_mask = getattr(model.config, "model_type", None) not in _DECODE_WITHOUT_MASK

    def _run_whole_sequences(self) -> torch.Tensor:
        positions = (self.attention.cumsum(dim=-1) - 1).clamp(min=0)
        output = self.model(input_ids=self.sequences, attention_mask=self.attention, position_ids=positions,
                            use_cache=True, **logits_to_keep(self.model, 1))
        self.cache, self.next_position = output_cache(output), positions[:, -1:] + 1
        self.long_factors = self.longrope_context is not None and int(positions.max()) + 1 > self.longrope_context
        return output.logits[:, -1, :]

    def prefill(self) -> torch.Tensor:
        reset_dynamic_rope(self.model)
        return self._run_whole_sequences()

    def select(self, rows: torch.Tensor) -> bool:
        """Keep only ``rows`` of the batch (the cache, the mask, the positions). Only a plain ``DynamicCache`` of
        full-attention layers is cut (other layer kinds may keep state that row selection would not touch);
        for any other cache this returns False and the batch stays whole."""
        from transformers.cache_utils import DynamicCache, DynamicLayer

        layers = getattr(self.cache, "layers", None)
        if (type(self.cache) is not DynamicCache or not layers or any(type(layer) is not DynamicLayer for layer in layers)
                or self.long_factors):
            return False
        self.cache.batch_select_indices(rows)
        self.attention, self.next_position, self.sequences = self.attention[rows], self.next_position[rows], self.sequences[rows]
        return True

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        self.attention = torch.cat([self.attention, self.attention.new_ones((self.attention.shape[0], 1))], dim=-1)
        self.sequences = torch.cat([self.sequences, tokens[:, None]], dim=-1)
        if (self.longrope_context is not None and not self.long_factors
                and int(self.next_position.max()) >= self.longrope_context):  # this call passes the original context
            return self._run_whole_sequences()
        output = self.model(input_ids=tokens[:, None], attention_mask=self.attention if self.decode_mask else None,
                            position_ids=self.next_position, use_cache=True, **{self.cache_argument: self.cache})
        self.cache, self.next_position = output_cache(output), self.next_position + 1
        return output.logits[:, -1, :]


DECODERS = ("auto", "static_cache", "transformers")


class HFSampler:
    """Samples responses from a causal LM (any ``transformers`` model with a KV cache).

    Args:
        model: the policy (sampling runs under ``torch.no_grad`` in eval mode; the mode is restored).
        eos_token_id: id (or ids) that end a response.
        pad_token_id: id used for padding.
        batch_size: rows per generation call (memory bound); prompts are processed in chunks of this size.
        decoder: how the model is run token by token. ``"static_cache"``: :class:`StaticCacheDecoder`, a lean loop
            over the model's own weights with a preallocated KV cache (Llama-family models only; faster on
            small models, whose decode step is mostly per-call overhead: 1.55x the tokens/s of the model's own forward
            at hidden size 64 (2 layers), 1.25x at 256 (4 layers), on one CPU thread); ``"transformers"``: the
            model's own forward with its ``DynamicCache`` (any causal LM); ``"auto"`` (default): the static cache
            whenever the model qualifies (:func:`static_cache_unsupported_reason`), else ``"transformers"``.
        compact: drop finished rows from the decoder once a quarter of its rows have finished, so that a few long
            responses do not keep the whole batch running. The samples are the same either way: every step draws
            one uniform number per row of the batch, dropped rows included.
    """

    def __init__(self, model: torch.nn.Module, *, eos_token_id: int | Sequence[int], pad_token_id: int, batch_size: int = 64,
                 decoder: str = "auto", compact: bool = True):
        self.model = model
        # one id (a Python, numpy or 0-d tensor integer) or several
        single = getattr(eos_token_id, "ndim", None) == 0 or not hasattr(eos_token_id, "__iter__")
        eos = [eos_token_id] if single else list(eos_token_id)
        if not eos:
            raise ValueError("HFSampler needs at least one eos_token_id")
        self.eos_token_ids = torch.tensor([check_int(value, "eos_token_id", minimum=0) for value in eos], dtype=torch.long)
        check_stop_tokens_can_be_sampled(model, self.eos_token_ids.tolist())
        if pad_token_id is None:
            raise ValueError("HFSampler needs a pad_token_id (a tokenizer without a pad token: set one, e.g. its EOS)")
        self.pad_token_id = check_int(pad_token_id, "pad_token_id", minimum=0)
        self.batch_size = check_int(batch_size, "batch_size", minimum=1)
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
        self.decoder = decoder
        self.compact = compact

    @classmethod
    def for_model(cls, model: torch.nn.Module, tokenizer, **kwargs) -> "HFSampler":
        """A sampler that stops at every EOS the model and its tokenizer declare and pads with the tokenizer's pad."""
        return cls(model, eos_token_id=stop_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id, **kwargs)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, progress=None) -> Rollouts:
        """Sample one response per prompt (repeat a prompt to sample a group). ``progress`` is called with the
        number of prompts finished after each chunk."""
        if isinstance(prompts, (str, bytes, Mapping)) or any(isinstance(prompt, (str, bytes)) for prompt in prompts):
            given = "a tokenizer's whole output" if isinstance(prompts, Mapping) else "text"
            raise TypeError(f"generate() takes prompts as token ids, one list per prompt, and got {given}: tokenize them "
                            "first (tokenizer(texts)['input_ids'])")
        if not prompts:
            raise ValueError("generate() got no prompts")
        empty = [index for index, prompt in enumerate(prompts) if len(prompt) == 0]
        if empty:
            raise ValueError(f"every prompt must have at least one token; prompt(s) {empty[:5]} have none")
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

    def _check_vocabulary(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        """ValueError for a prompt token id outside the model's embedding table (a tokenizer of another model), which
        would fail deep in the model as an IndexError."""
        embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        rows = getattr(embeddings, "num_embeddings", None)
        if rows is None:
            return
        if self.pad_token_id >= rows:
            raise ValueError(f"pad_token_id {self.pad_token_id} is outside the model's vocabulary of {rows} ids: a pad "
                             "token added to the tokenizer without model.resize_token_embeddings?")
        outside = prompt_mask.bool() & ((prompt_ids < 0) | (prompt_ids >= rows))
        if bool(outside.any()):
            raise ValueError(f"a prompt holds token id {int(prompt_ids[outside][0])}, outside the model's vocabulary of "
                             f"{rows} ids: a tokenizer of another model?")

    def _make_decoder(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int):
        if self.decoder != "transformers":
            reason = static_cache_unsupported_reason(self.model, prompt_ids.shape[1] + max_new_tokens)
            if reason is None:
                return StaticCacheDecoder(self.model, prompt_ids, prompt_mask, max_new_tokens)
            if self.decoder == "static_cache":
                raise ValueError(f"decoder='static_cache' cannot run this model: {reason}; use decoder='transformers'")
        return _TransformersDecoder(self.model, prompt_ids, prompt_mask)

    def _is_eos(self, tokens: torch.Tensor, eos_ids: torch.Tensor) -> torch.Tensor:
        return tokens == eos_ids[0] if len(eos_ids) == 1 else torch.isin(tokens, eos_ids)

    def _generate_chunk(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Rollouts:
        device = next(self.model.parameters()).device
        prompt_ids, prompt_mask = left_pad(prompts, self.pad_token_id)
        self._check_vocabulary(prompt_ids, prompt_mask)
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        eos_ids = self.eos_token_ids.to(device)

        decoder = self._make_decoder(prompt_ids, prompt_mask, params.max_new_tokens)
        next_logits = decoder.prefill()
        batch = len(prompts)
        tokens = torch.full((batch, params.max_new_tokens), self.pad_token_id, dtype=torch.long, device=device)
        log_probs = torch.zeros((batch, params.max_new_tokens), dtype=torch.float32, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        active = torch.arange(batch, device=device)  # the rows the decoder still holds, in its order
        # rows keep being fed (whatever they sample) after their EOS until the decoder drops them (once a quarter
        # of its rows have finished); everything past a row's EOS is masked out below
        for step in range(params.max_new_tokens):
            step_log_probs = process_logits(next_logits, params).log_softmax(dim=-1)
            if params.temperature == 0:
                sampled = step_log_probs.argmax(dim=-1)
            else:  # one number per row of the whole batch at every step: dropping rows never changes the others' draws
                uniform = torch.rand((batch, 1), dtype=widest_float(device), device=device)[active]
                sampled = sample_from_log_probs(step_log_probs, uniform)
            tokens[active, step] = sampled
            log_probs[active, step] = step_log_probs.gather(-1, sampled[:, None]).squeeze(-1)
            finished[active] |= self._is_eos(sampled, eos_ids)
            if step == params.max_new_tokens - 1 or bool(finished.all()):
                break
            running = (~finished[active]).nonzero().squeeze(-1)
            if self.compact and 4 * len(running) <= 3 * len(active) and decoder.select(running):
                active, sampled = active[running], sampled[running]
            next_logits = decoder.decode(sampled)

        used = step + 1
        tokens, log_probs = tokens[:, :used], log_probs[:, :used]
        eos_hits = self._is_eos(tokens, eos_ids)
        # True up to and including the first EOS of the row
        response_mask = (eos_hits.long().cumsum(dim=-1) - eos_hits.long()) == 0
        return Rollouts(
            prompt_ids=prompt_ids.cpu(),
            prompt_mask=prompt_mask.cpu(),
            response_ids=tokens.masked_fill(~response_mask, self.pad_token_id).cpu(),
            response_mask=response_mask.cpu(),
            sampler_log_probs=log_probs.masked_fill(~response_mask, 0.0).cpu(),
            lengths=response_mask.sum(dim=-1).cpu(),
            truncated=(~eos_hits.any(dim=-1)).cpu(),
        )
