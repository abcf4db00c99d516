"""A step's objective metrics from its micro-batches: each micro-batch's weight in its mini-batch, the mini-batch's
value of each metric, the mean over the step's updates (docs/metrics.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["MicroBatchShares", "is_token_statistic", "micro_batch_share", "step_metrics_over_updates",
           "update_metrics_over_micro_batches"]


def micro_batch_share(mask: torch.Tensor, micro: torch.Tensor, mini_batch: torch.Tensor, loss_agg_mode: str) -> float:
    """The weight of micro-batch ``micro``'s loss in mini-batch ``mini_batch``'s: its share of the mini-batch's
    normaliser (``mask``: the valid tokens less those that selectors deciding over the whole batch take out of
    it), tokens for ``token-mean`` and sequences with a token for the ``seq-mean-*`` modes, so that the weighted
    micro-batch losses add up to the mini-batch's loss (exactly, unless a selector deciding per micro-batch takes
    tokens out of the token-mean normaliser)."""
    if len(micro) == len(mini_batch):
        return 1.0
    if loss_agg_mode == "token-mean":
        return int(mask[micro].sum()) / max(1, int(mask[mini_batch].sum()))
    return int(mask[micro].any(-1).sum()) / max(1, int(mask[mini_batch].any(-1).sum()))


@dataclass(frozen=True)
class MicroBatchShares:
    """A micro-batch's weights in its mini-batch: ``loss``, of the loss (its share of the normaliser, see
    :func:`micro_batch_share`); ``aggregated``, of a term aggregated like the loss over the valid tokens (KL to the
    reference, an entropy bonus); ``tokens``, of a statistic of the valid tokens (a fraction, a token mean)."""

    loss: float
    aggregated: float
    tokens: float

    @classmethod
    def of(cls, micro: torch.Tensor, mini_batch: torch.Tensor, *, mask: torch.Tensor, normaliser_mask: torch.Tensor,
           loss_agg_mode: str) -> "MicroBatchShares":
        valid = bool(mask[micro].any())  # a statistic of no token (a placeholder 0) weighs nothing
        return cls(loss=micro_batch_share(normaliser_mask, micro, mini_batch, loss_agg_mode),
                   aggregated=micro_batch_share(mask, micro, mini_batch, loss_agg_mode),
                   tokens=micro_batch_share(mask, micro, mini_batch, "token-mean") if valid else 0.0)

    def weight_of(self, key: str, aggregated: frozenset[str]) -> float:
        """This micro-batch's weight for metric ``key`` (``aggregated``: the metrics aggregated like the loss)."""
        if is_token_statistic(key, aggregated):
            return self.tokens
        return self.aggregated if key in aggregated else self.loss


def is_token_statistic(key: str, aggregated: frozenset[str]) -> bool:
    """Whether metric ``key`` is a statistic of the valid tokens (a fraction, a token mean), not a loss or a term
    aggregated like it."""
    return key not in aggregated and not key.startswith("loss/")


def step_metrics_over_updates(updates: list[list[tuple[dict[str, float], MicroBatchShares]]], *,
                  aggregated: frozenset[str]) -> dict[str, float]:
    """The objective's metrics over a step: each update's micro-batches combined into the mini-batch's value (see
    :func:`update_metrics_over_micro_batches`), then the mean over the updates, as docs/metrics.md says. A statistic of the valid
    tokens (a fraction, a token mean, a maximum) is left out for an update without a valid token, and is NaN when no
    update had one; a loss is 0 for such an update and counts; counts (``tokens/*``) are means per update."""
    per_update = [update_metrics_over_micro_batches(records, aggregated) for records in updates]
    keys = {key for values in per_update for key in values}
    means = {}
    for key in sorted(keys):
        defined = [update[key] for update in per_update if key in update and not math.isnan(update[key])]
        means[key] = sum(defined) / len(defined) if defined else math.nan
    return means


def update_metrics_over_micro_batches(records: list[tuple[dict[str, float], MicroBatchShares]],
                    aggregated: frozenset[str]) -> dict[str, float]:
    """One update's metrics from those of its micro-batches: the policy loss weighted by the loss shares, the
    regularisers' part of the total loss and the other ``aggregated`` metrics by their shares of the valid tokens'
    aggregation, so that they come out as the whole mini-batch's; counts (``tokens/*``) add up and maxima
    (``*/max``) are maxima; every other metric is a statistic of the valid tokens, weighted by the micro-batch's
    count of them (a threshold that each micro-batch took on its own tokens comes out as their token-weighted mean).
    A statistic of no valid token is NaN; a loss of no valid token is its micro-batches' value (0). Non-finite
    values are left out."""
    regularizers = "loss/total - loss/policy"  # aggregated like the regularisers' terms, then added back
    records = [({**record, regularizers: record["loss/total"] - record["loss/policy"]}
                if "loss/total" in record and "loss/policy" in record else record, shares) for record, shares in records]
    aggregated = aggregated | {regularizers}
    keys = {key for record, _ in records for key in record}
    combined = {}
    for key in sorted(keys):
        pairs = [(record[key], shares.weight_of(key, aggregated)) for record, shares in records
                 if key in record and np.isfinite(record[key])]
        total_weight = sum(weight for _, weight in pairs)
        if not pairs:
            combined[key] = math.nan
        elif key.startswith("tokens/"):
            combined[key] = sum(value for value, _ in pairs)
        elif total_weight == 0:  # no valid token in the update: a statistic of them is undefined, a loss is 0
            combined[key] = math.nan if is_token_statistic(key, aggregated) else sum(value for value, _ in pairs) / len(pairs)
        elif key.endswith("/max"):  # a micro-batch without valid tokens reports a placeholder
            combined[key] = max(value for value, weight in pairs if weight > 0)
        else:
            combined[key] = sum(value * weight for value, weight in pairs) / total_weight
    if regularizers in combined:
        combined["loss/total"] = combined["loss/policy"] + combined.pop(regularizers)
    return combined
