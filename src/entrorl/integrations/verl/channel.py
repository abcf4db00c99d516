"""The channel that carries per-token statistics from verl's actor to entrorl's policy losses.

verl calls a policy loss with a fixed set of keyword arguments (``old_log_prob``, ``log_prob``, ``advantages``,
``response_mask``, ``loss_agg_mode``, ``config``, ``rollout_is_weights``): there is no argument for the token
entropy, the entropy discriminator S or its centred form D that methods such as ``clip_b`` or
``forking_tokens`` need. The actor extension (:mod:`entrorl.integrations.verl.actor`) computes them for each
micro-batch and opens this channel around verl's loss call; the ``entrorl_<method>`` losses read it.

Code that calls an ``entrorl_<method>`` loss itself can pass the same tensors as keyword arguments instead,
or open the channel with :func:`provide_token_fields`.

The channel also runs the other way. verl's ``ppo_loss`` types every metric a policy loss returns as a per-micro-batch
mean, while loss terms normalised by the step's global counts are partial sums and a maximum is a maximum. Inside
:func:`collect_metric_aggregations` an ``entrorl_<method>`` loss records which of its metrics verl must sum or take
the maximum of, so that the actor extension can retype them after verl's loss returns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch

__all__ = ["TOKEN_FIELDS", "METRIC_AGGREGATIONS", "provide_token_fields", "current_token_fields",
           "collect_metric_aggregations", "record_metric_aggregations"]

# The PolicyBatch fields verl's loss call does not carry, each [B, T] like log_prob.
TOKEN_FIELDS = ("entropy", "disc", "disc_centered", "ref_log_prob", "rollout_log_prob")

# How a metric combines over micro-batches and ranks, by the names of verl's ``AggregationType`` values.
METRIC_AGGREGATIONS = ("sum", "max")

_CURRENT: ContextVar[dict[str, torch.Tensor] | None] = ContextVar("entrorl_verl_token_fields", default=None)
_AGGREGATIONS: ContextVar[dict[str, str] | None] = ContextVar("entrorl_verl_metric_aggregations", default=None)


def _check_fields(fields: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    unknown = sorted(set(fields) - set(TOKEN_FIELDS))
    if unknown:
        raise ValueError(f"unknown per-token field(s) {unknown}; the channel carries {list(TOKEN_FIELDS)}")
    checked = {}
    for name, value in fields.items():
        if value is None:
            continue
        if not torch.is_tensor(value) or value.dim() != 2:
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"per-token field {name!r} must be a [B, T] tensor like log_prob, got {shape}")
        checked[name] = value
    return checked


@contextlib.contextmanager
def provide_token_fields(**fields: torch.Tensor | None) -> Iterator[dict[str, torch.Tensor]]:
    """Make ``entropy`` / ``disc`` / ``disc_centered`` / ``ref_log_prob`` / ``rollout_log_prob`` (``[B, T]``
    tensors aligned with verl's ``log_prob``; ``None`` entries are left out) visible to every ``entrorl_<method>``
    loss called inside the ``with`` block. Nested blocks see the inner fields only; the outer ones return on exit.
    """
    token = _CURRENT.set(_check_fields(fields))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


def current_token_fields() -> dict[str, torch.Tensor]:
    """The fields of the innermost open :func:`provide_token_fields` block (empty outside any block)."""
    return dict(_CURRENT.get() or {})


@contextlib.contextmanager
def collect_metric_aggregations() -> Iterator[dict[str, str]]:
    """Collect, from every ``entrorl_<method>`` loss called inside the block, ``{metric: "sum" | "max"}`` for the
    metrics that verl must sum over micro-batches (partial sums of the step's loss) or take the maximum of. The
    loss reports those metrics only inside such a block, since verl's own mean of them would be wrong."""
    token = _AGGREGATIONS.set({})
    try:
        yield _AGGREGATIONS.get()
    finally:
        _AGGREGATIONS.reset(token)


def record_metric_aggregations(aggregations: dict[str, str]) -> bool:
    """Record ``aggregations`` in the innermost :func:`collect_metric_aggregations` block; False outside any."""
    unknown = sorted(set(aggregations.values()) - set(METRIC_AGGREGATIONS))
    if unknown:
        raise ValueError(f"unknown metric aggregation(s) {unknown}; the channel carries {list(METRIC_AGGREGATIONS)}")
    collected = _AGGREGATIONS.get()
    if collected is None:
        return False
    collected.update(aggregations)
    return True
