"""Reducing a per-token loss ``[B, T]`` to a scalar, with verl's four ``loss_agg_mode`` names.

With ``m`` the loss mask, ``L`` the per-token loss and ``n_seq`` the number of sequences with at least
one token in the mask:

* ``token-mean``               ``sum m L / sum m``                                   (DAPO, arXiv 2503.14476)
* ``seq-mean-token-mean``      ``(1/n_seq) sum_i (sum_t m L / sum_t m)``             (GRPO, arXiv 2402.03300)
* ``seq-mean-token-sum``       ``(1/n_seq) sum_i sum_t m L``
* ``seq-mean-token-sum-norm``  ``(1/n_seq) sum_i sum_t m L / loss_scale_factor``     (Dr. GRPO, arXiv 2503.20783)

``loss_scale_factor`` defaults to ``T`` (the padded response length); Dr. GRPO sets it to a constant
such as the maximum generation length. The ``-norm`` mode divides by ``n_seq`` as Dr. GRPO's formula,
TRL's ``dr_grpo`` and recent verl do (verl 0.8 did not). ``n_seq`` counts only the sequences with a token in
the mask, as verl does; TRL divides by every row of the batch, a fully masked one included (a truncated
completion under ``mask_truncated_completions``): pass ``global_batch_size`` = the row count for TRL's value.

For data-parallel training, ``batch_num_tokens`` / ``global_batch_size`` replace the local token and
sequence counts by global ones and ``dp_size`` undoes the gradient averaging across ranks, as in verl's
``global_batch_info``.
"""

from __future__ import annotations

import math

import torch
from pydantic import TypeAdapter

from entrorl._checks import as_bool_mask, check_int, refuse_booleans_for_numbers

__all__ = ["LOSS_AGG_MODES", "aggregate_loss", "check_loss_agg_mode", "check_loss_scale_factor"]

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
_AS_FLOAT = TypeAdapter(float)


def check_loss_agg_mode(mode: str) -> str:
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode '{mode}'; choose one of {list(LOSS_AGG_MODES)}")
    return mode


def _as_number(value) -> float:
    """``value`` as a float, read as a configuration's number field reads it; NaN when it is none (a boolean, text)."""
    try:
        return _AS_FLOAT.validate_python(refuse_booleans_for_numbers(value, float))
    except ValueError:  # pydantic's ValidationError is one
        return math.nan


def check_loss_scale_factor(value) -> float | None:
    """``value`` as the float that divides ``seq-mean-token-sum-norm``'s sum (None: the response length), read as a
    configuration's number field reads it (``512``, ``"512"``, ``Decimal("512")``, a 0-d tensor); ``ValueError``
    naming it unless that float is finite and > 0 (not a boolean, not a number that rounds to 0 or overflows)."""
    if value is None:
        return None
    scale = _as_number(value)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"loss_scale_factor must be a finite number > 0, got {value!r}")
    return scale


def check_global_count(value, name: str) -> float | None:
    """``value``, a count over the whole batch (``batch_num_tokens``, ``global_batch_size``; None: the micro-batch's
    own), as a float; ``ValueError`` naming ``name`` unless it is a finite number >= 0 (not a boolean): a negative one
    would turn the loss's sign, a NaN make it NaN."""
    if value is None:
        return None
    count = _as_number(value)
    if not (math.isfinite(count) and count >= 0):
        raise ValueError(f"{name} must be a finite number >= 0 (a count over the whole batch), got {value!r}")
    return count


def check_normalisers(batch_num_tokens, global_batch_size, dp_size, *,
                      names: tuple[str, str] = ("batch_num_tokens", "global_batch_size")
                      ) -> tuple[float | None, float | None, int]:
    """The global counts (:func:`check_global_count`, named ``names``) and ``dp_size`` (a whole number >= 1) as
    numbers, each refused naming it otherwise: a negative one would turn the loss's sign, a dp_size of 0 zero it."""
    return (check_global_count(batch_num_tokens, names[0]),
            check_global_count(global_batch_size, names[1]), check_int(dp_size, "dp_size", minimum=1))


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    loss_scale_factor: float | None = None,
    batch_num_tokens: float | None = None,
    global_batch_size: float | None = None,
    dp_size: int = 1,
) -> torch.Tensor:
    """Scalar loss from ``per_token_loss [B, T]`` over ``mask [B, T]`` (see the module docstring).

    Tokens outside the mask contribute nothing, even if their loss is not finite. An empty mask gives
    a zero that is still attached to the graph (zero gradients, no NaN).
    """
    check_loss_agg_mode(mode)
    batch_num_tokens, global_batch_size, dp_size = check_normalisers(batch_num_tokens, global_batch_size, dp_size)
    mask = as_bool_mask(mask, "aggregate_loss: mask")
    masked = torch.where(mask, per_token_loss, torch.zeros_like(per_token_loss))
    # sums and counts in float32 at least: float16 cannot hold one above 65504; the result in the loss's dtype
    wide = torch.promote_types(masked.dtype, torch.float32)
    if mode == "token-mean":
        count = mask.sum().to(wide) if batch_num_tokens is None else torch.as_tensor(float(batch_num_tokens))
        return (masked.sum(dtype=wide) / count.clamp(min=1) * dp_size).to(masked.dtype)
    tokens_per_seq = mask.sum(dim=-1)
    n_seq = ((tokens_per_seq > 0).sum().to(wide) if global_batch_size is None
             else torch.as_tensor(float(global_batch_size), dtype=wide))
    n_seq = n_seq.clamp(min=1)
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(dim=-1, dtype=wide) / tokens_per_seq.clamp(min=1).to(wide)
        return (per_seq.sum() / n_seq * dp_size).to(masked.dtype)
    if mode == "seq-mean-token-sum":
        return (masked.sum(dtype=wide) / n_seq * dp_size).to(masked.dtype)
    # responses of no tokens at all (T = 0): the sum is an empty 0, whatever it is divided by
    scale = float(max(mask.shape[-1], 1)) if loss_scale_factor is None else check_loss_scale_factor(loss_scale_factor)
    return (masked.sum(dtype=wide) / n_seq / scale * dp_size).to(masked.dtype)
