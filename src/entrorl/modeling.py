"""Loading local Hugging Face causal LMs and computing per-token statistics of their responses."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from entrorl.tokens import TokenStats, token_stats, token_stats_from_hidden

__all__ = [
    "load_tokenizer", "load_causal_lm", "response_token_stats", "bucketed_response_token_stats", "length_buckets",
    "FUSED_HEAD_MODEL_TYPES", "DTYPES",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Architectures whose logits are exactly ``final_hidden @ lm_head.weight.T`` (no soft-capping or scaling),
# so the statistics can be computed from hidden states without building the logits.
FUSED_HEAD_MODEL_TYPES = frozenset({"qwen2", "qwen3", "llama", "mistral", "qwen2_moe", "qwen3_moe", "phi3", "olmo2"})

# tokenizer classes saved by ``PreTrainedTokenizerFast`` itself; AutoTokenizer would swap in the
# architecture's own tokenizer class and its pre-processing, which a custom tokenizer does not have.
_GENERIC_TOKENIZER_CLASSES = {"PreTrainedTokenizerFast", "TokenizersBackend"}


def _check_model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path} (give a local Hugging Face model directory)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: it is not a Hugging Face model directory")
    return path


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a local model directory; sets ``pad_token = eos_token`` when there is none."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = _check_model_dir(path)
    config_file = path / "tokenizer_config.json"
    declared = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    if declared in _GENERIC_TOKENIZER_CLASSES:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer in {path} has no eos_token: responses could never end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str | Path, *, dtype: str = "float32", disable_dropout: bool = True, trust_remote_code: bool = False):
    """``AutoModelForCausalLM`` from a local directory (never the hub), optionally with dropout off."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight loading and checkpoint writes print a bar per tiny file otherwise
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; choose one of {sorted(DTYPES)}")
    path = _check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[dtype], local_files_only=True, trust_remote_code=trust_remote_code
    )
    if disable_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return model


def _uses_fused_head(model) -> bool:
    return getattr(model.config, "model_type", None) in FUSED_HEAD_MODEL_TYPES and hasattr(model, "model")


def response_token_stats(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    need=("logprob", "entropy"),
    fused_head: bool | None = None,
) -> TokenStats:
    """Statistics of the response tokens under ``model`` (one forward over prompt + response).

    For plain-linear-head architectures the statistics come from the final hidden states and the LM head
    (:func:`token_stats_from_hidden`), so the ``[B, R, V]`` logits are never built; otherwise from logits of
    the response positions only. Differentiable when grad is enabled.
    """
    device = next(model.parameters()).device
    input_ids = torch.cat([prompt_ids, response_ids], dim=1).to(device)
    attention = torch.cat([prompt_mask, response_mask], dim=1).to(device).long()
    positions = (attention.cumsum(dim=-1) - 1).clamp(min=0)
    prompt_width, response_width = prompt_ids.shape[1], response_ids.shape[1]
    targets = response_ids.to(device)
    mask = response_mask.to(device)
    if fused_head is None:
        fused_head = _uses_fused_head(model)
    if fused_head:
        hidden = model.model(input_ids=input_ids, attention_mask=attention, position_ids=positions).last_hidden_state
        hidden = hidden[:, prompt_width - 1 : prompt_width + response_width - 1]
        head = model.get_output_embeddings()
        return token_stats_from_hidden(
            hidden, head.weight, targets, lm_head_bias=head.bias, temperature=temperature, mask=mask, need=need
        )
    logits = model(
        input_ids=input_ids, attention_mask=attention, position_ids=positions, logits_to_keep=response_width + 1
    ).logits[:, :-1]
    return token_stats(logits, targets, temperature=temperature, mask=mask, need=need)


def length_buckets(prompt_lengths: torch.Tensor, response_lengths: torch.Tensor, *, max_buckets: int = 8,
                   overhead_tokens: int = 1024) -> list[torch.Tensor]:
    """Rows grouped by length so that each group's forward pass pads only to its own longest row.

    Rows are sorted by prompt + response length and cut into ``k`` groups of equal size, ``k`` in
    ``1, 2, 4, ... <= max_buckets``, choosing the ``k`` that minimises the padded positions of all groups
    (``sum_g rows_g * (max prompt_g + max response_g)``) plus ``overhead_tokens`` per extra forward pass.
    Returns the row indices of each group (their concatenation is a permutation of all rows).
    """
    rows = prompt_lengths.shape[0]
    order = torch.argsort(prompt_lengths + response_lengths, stable=True)
    best, best_cost = [order], None
    k = 1
    while k <= max(1, min(max_buckets, rows)):
        groups = [group for group in order.chunk(k) if group.numel()]
        padded = sum(group.numel() * int(prompt_lengths[group].max() + response_lengths[group].max()) for group in groups)
        cost = padded + overhead_tokens * (len(groups) - 1)
        if best_cost is None or cost < best_cost:
            best, best_cost = groups, cost
        k *= 2
    return best


def bucketed_response_token_stats(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    need=("logprob", "entropy"),
    max_buckets: int = 8,
    overhead_tokens: int = 1024,
) -> TokenStats:
    """:func:`response_token_stats` computed per length group (:func:`length_buckets`), each group cut to its own
    widths, then put back in the rows' order and padded to the full response width (zeros on padding).

    A row's statistics do not depend on the other rows of its forward pass, so the result is the same as one
    pass over the whole batch (float rounding aside), with fewer padded positions computed: responses of very
    different lengths, as RL rollouts are, waste much of a single padded pass. Differentiable when grad is on.
    """
    prompt_lengths, response_lengths = prompt_mask.sum(-1), response_mask.sum(-1)
    groups = length_buckets(prompt_lengths, response_lengths, max_buckets=max_buckets, overhead_tokens=overhead_tokens)
    width = response_ids.shape[1]
    if len(groups) == 1:
        return response_token_stats(model, prompt_ids, prompt_mask, response_ids, response_mask, temperature=temperature,
                                    need=need)
    parts: dict[str, list[torch.Tensor]] = {}
    for group in groups:
        prompt_width = max(1, int(prompt_lengths[group].max()))
        response_width = max(1, int(response_lengths[group].max()))
        # prompts are left-padded and responses right-padded: keep the last / first columns
        stats = response_token_stats(
            model, prompt_ids[group, -prompt_width:], prompt_mask[group, -prompt_width:], response_ids[group, :response_width],
            response_mask[group, :response_width], temperature=temperature, need=need,
        )
        for name, values in stats.as_dict().items():
            parts.setdefault(name, []).append(torch.nn.functional.pad(values, (0, width - response_width)))
    inverse = torch.argsort(torch.cat(groups))
    return TokenStats(**{name: torch.cat(values)[inverse.to(values[0].device)] for name, values in parts.items()})
