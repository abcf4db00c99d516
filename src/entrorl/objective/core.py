"""The policy objective: one function that turns a :class:`PolicyBatch` into a loss, calling its parts."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from entrorl.objective.aggregation import aggregate_loss, check_loss_agg_mode, check_normalisers
from entrorl.objective.batch import PolicyBatch, fraction, masked_mean
from entrorl.objective.parts import Correction, Metrics, Part, Regularizer, Selector, Shaper, Surrogate

__all__ = ["Objective", "ObjectiveOutput"]


@dataclass
class ObjectiveOutput:
    """``loss``: the scalar to backpropagate. ``metrics``: flat ``namespace/name`` floats.
    ``trained_mask``: valid tokens that were not dropped (they carry gradient). ``loss_mask``: the tokens
    counted by the normaliser. ``advantages``: the advantages after shaping (detached)."""

    loss: torch.Tensor
    metrics: Metrics
    trained_mask: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor
    policy_loss: torch.Tensor = field(repr=False, default=None)


class Objective:
    """A composed policy objective. Build it with :func:`entrorl.objective.build_objective`.

    Call it on a :class:`PolicyBatch`; for data-parallel training pass the global normalisers
    (``batch_num_tokens``, ``global_batch_size``, ``dp_size``, as verl's ``global_batch_info``): the counts of the
    tokens (sequences) that stay in the policy loss's normaliser (:meth:`normaliser_mask`). Where a selector leaves
    tokens out of it (rft, Clip_B, Clip_V), the terms taken over every valid token (``kl_ref``, the entropy bonus)
    need their own counts, ``valid_num_tokens`` / ``valid_batch_size`` (by default the same). ``name`` joins the
    methods composed (``custom`` for none), ``label`` adds the parts a config added to them (``grpo+entropy_bonus``):
    what reports call it.

    A call with gradients off (``torch.no_grad()``, ``torch.inference_mode()``: a validation or metrics-only pass,
    which no update follows) leaves the parts' state as it found it: the adaptive entropy controller's measurement,
    a seeded selector's generator.
    """

    def __init__(
        self,
        *,
        surrogate: Surrogate,
        shapers: list[Shaper] = (),
        regularizers: list[Regularizer] = (),
        selectors: list[Selector] = (),
        correction: Correction | None = None,
        loss_agg_mode: str = "token-mean",
        loss_scale_factor: float | None = None,
        name: str = "custom",
        label: str | None = None,
    ) -> None:
        self.surrogate = surrogate
        self.shapers = list(shapers)
        self.regularizers = list(regularizers)
        self.selectors = list(selectors)
        self.correction = correction
        self.loss_agg_mode = check_loss_agg_mode(loss_agg_mode)
        self.loss_scale_factor = loss_scale_factor
        self.name = name
        self.label = name if label is None else label

    @property
    def parts(self) -> list[Part]:
        correction = [self.correction] if self.correction is not None else []
        return [*self.shapers, self.surrogate, *self.regularizers, *self.selectors, *correction]

    @property
    def required_fields(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f for part in self.parts for f in part.requires))

    def filtered_sampling_caveats(self, filters: str, temperature: str) -> list[str]:
        """What goes wrong for this objective when the sampler draws from a truncated distribution (top-k, top-p,
        min-p: ``filters`` names the settings, ``temperature`` the one the statistics are taken at): a rollout
        correction's ratio becomes the probability the filter kept, and H, S and D describe another distribution
        than the one the tokens came from."""
        caveats = []
        if "rollout_log_prob" in self.required_fields:
            caveats.append(
                f"method {self.label!r} compares the trainer's log-probs (the full distribution at {temperature}) with "
                f"the sampler's, which {filters} make those of the filtered distribution: their ratio is then the "
                "probability the filter kept, not only the sampler/trainer mismatch (TIS weights below 1; IcePop may "
                "mask most tokens)")
        statistics = sorted({"entropy", "disc", "disc_centered"} & set(self.required_fields))
        if statistics:
            caveats.append(
                f"method {self.label!r} reads {', '.join(statistics)} of the full distribution at {temperature}, while "
                f"{filters} draw the tokens from a truncated one: its entropy is lower than the one the method sees, "
                "and D's batch mean is no longer about 0 (Cor. 3.5 of arXiv 2602.03392 holds for tokens drawn from the "
                "full distribution)")
        return caveats

    def __call__(
        self,
        batch: PolicyBatch,
        *,
        batch_num_tokens: float | None = None,
        global_batch_size: float | None = None,
        dp_size: int = 1,
        valid_num_tokens: float | None = None,
        valid_batch_size: float | None = None,
    ) -> ObjectiveOutput:
        kept = None if torch.is_grad_enabled() or not self.stateful else copy.deepcopy(self.state_dict())
        try:
            return self._loss(batch, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
                              dp_size=dp_size, valid_num_tokens=valid_num_tokens, valid_batch_size=valid_batch_size)
        finally:
            if kept is not None:  # no update follows a call without gradients
                self.load_state_dict(kept)

    def _loss(self, batch: PolicyBatch, *, batch_num_tokens: float | None, global_batch_size: float | None,
              dp_size: int, valid_num_tokens: float | None, valid_batch_size: float | None) -> ObjectiveOutput:
        # before any stateful part moves
        batch_num_tokens, global_batch_size, dp_size = check_normalisers(batch_num_tokens, global_batch_size, dp_size)
        valid_num_tokens, valid_batch_size, _ = check_normalisers(valid_num_tokens, valid_batch_size, 1,
                                                                  names=("valid_num_tokens", "valid_batch_size"))
        needed, count = (("batch_num_tokens", batch_num_tokens) if self.loss_agg_mode == "token-mean"
                         else ("global_batch_size", global_batch_size))
        if dp_size > 1 and count is None:
            raise ValueError(f"dp_size={dp_size} without {needed}: under data parallelism the {self.loss_agg_mode} loss "
                             f"is normalised by the count over every process; give it ({needed}=...)")
        for part in self.parts:
            part.check_batch(batch)
        mask = batch.mask
        metrics: Metrics = {}
        aggregate = partial(
            aggregate_loss,
            mode=self.loss_agg_mode,
            loss_scale_factor=self.loss_scale_factor,
            batch_num_tokens=batch_num_tokens,
            global_batch_size=global_batch_size,
            dp_size=dp_size,
        )
        aggregate_valid = partial(  # the regularisers' terms, over every valid token
            aggregate,
            batch_num_tokens=batch_num_tokens if valid_num_tokens is None else valid_num_tokens,
            global_batch_size=global_batch_size if valid_batch_size is None else valid_batch_size,
        )

        # 1. advantages, reshaped by each shaper in turn
        # padding may hold anything (even NaN): zero it so no NaN can reach a gradient through 0 * NaN
        advantages = torch.where(mask, batch.advantages.detach().to(batch.log_prob.dtype), 0.0)
        for shaper in self.shapers:
            advantages = torch.where(mask, shaper(batch, advantages, metrics), 0.0)

        # 2. the per-token policy loss
        surrogate = self.surrogate(batch, advantages, metrics)
        per_token_loss = surrogate.per_token_loss

        # 3. regularisers: per-token terms join the policy loss, scalar terms wait for aggregation
        scalar_terms = []
        covered: dict[str, torch.Tensor] = {}
        for regularizer in self.regularizers:
            term = regularizer(batch, advantages, aggregate_valid, metrics)
            if term.per_token is not None:
                per_token_loss = per_token_loss + term.per_token
            if term.scalar is not None:
                scalar_terms.append(term.scalar)
            if term.covers is not None:
                covered[regularizer.name] = term.covers

        # 4. token selection: dropped tokens lose loss and gradient; some also leave the normaliser
        dropped = torch.zeros_like(mask)
        left_normaliser = torch.zeros_like(mask)
        for selector in self.selectors:
            drop = selector(batch, advantages, surrogate, metrics) & mask
            dropped |= drop
            if not selector.keep_in_normaliser:
                left_normaliser |= drop

        # 5. train/rollout mismatch weights
        if self.correction is not None:
            per_token_loss = per_token_loss * self.correction(batch, metrics).detach()

        # 6. aggregate
        trained = mask & ~dropped
        loss_mask = mask & ~left_normaliser
        per_token_loss = torch.where(trained, per_token_loss, torch.zeros_like(per_token_loss))
        for name, covers in covered.items():  # a dropped token's term is gone with its loss
            metrics[f"select/{name}_frac"] = fraction(covers & trained, mask)
        policy_loss = aggregate(per_token_loss, loss_mask)
        loss = policy_loss + sum(scalar_terms) if scalar_terms else policy_loss

        metrics["loss/policy"] = float(policy_loss.detach())
        metrics["loss/total"] = float(loss.detach())
        metrics["tokens/valid"] = float(mask.sum())
        metrics["select/dropped_frac"] = fraction(dropped, mask)
        metrics["advantages/mean"] = float(masked_mean(advantages.detach(), mask))
        return ObjectiveOutput(
            loss=loss,
            metrics=metrics,
            trained_mask=trained,
            loss_mask=loss_mask,
            advantages=advantages.detach(),
            policy_loss=policy_loss,
        )

    @property
    def aggregated_metrics(self) -> frozenset[str]:
        """The metrics that regularisers report aggregated like the loss (``loss_agg_mode``) over the valid tokens. Besides
        them and the losses (``loss/*``), metrics are statistics of the valid tokens (fractions, token means), counts
        (``tokens/*``) or maxima."""
        return frozenset().union(*(r.aggregated_metrics for r in self.regularizers))

    @property
    def takes_step_statistics(self) -> bool:
        """Whether a part reads the whole step batch (``PolicyBatch.population``) when given it: a selector deciding
        over it, or a regulariser that needs it for the coming step (the adaptive entropy controller's first)."""
        return (any(selector.step_statistics for selector in self.selectors)
                or any(regularizer.reads_step_statistics for regularizer in self.regularizers))

    def normaliser_mask(self, population: PolicyBatch) -> torch.Tensor:
        """The population's tokens that stay in the loss normaliser once the selectors deciding over it have
        dropped theirs: what a trainer weighs its micro-batches by, so that they add up to the whole batch's loss."""
        mask = population.mask
        for selector in self.selectors:
            if selector.step_statistics and not selector.keep_in_normaliser:
                mask = mask & ~selector.population_decision(population)[0]
        return mask

    def end_step(self) -> dict[str, float]:
        """Tell the parts that a training step's updates are done (the adaptive entropy controller moves its
        coefficient); returns their metrics."""
        metrics: dict[str, float] = {}
        for part in self.parts:
            metrics.update(part.end_step())
        return metrics

    @property
    def stateful(self) -> bool:
        """Whether a part keeps state across steps (see :attr:`entrorl.objective.parts.Part.stateful`)."""
        return any(part.stateful for part in self.parts)

    def state_dict(self) -> dict[str, Any]:
        """Mutable state of the parts (adaptive coefficients, RNG states), keyed ``kind/name``."""
        return {f"{part.kind}/{part.name}": state for part in self.parts if (state := part.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put every part in the state ``state`` describes; a part without an entry goes back to its initial state
        (``state_dict`` leaves out parts that have none yet)."""
        by_key = {f"{part.kind}/{part.name}": part for part in self.parts}
        unknown = sorted(set(state) - set(by_key))
        if unknown:
            raise ValueError(f"objective state has entries {unknown} for parts this objective lacks; it has {sorted(by_key)}")
        for key, part in by_key.items():
            part.load_state_dict(state.get(key, {}))  # a part left out had no state yet: back to its initial one

    def describe(self) -> dict[str, Any]:
        """The full composition as plain data, a valid config: ``build_objective(obj.describe())`` rebuilds it."""

        def spec(part: Part) -> dict[str, Any]:
            return {"name": part.name, **part.params()}

        return {
            "surrogate": spec(self.surrogate),
            "shapers": [spec(p) for p in self.shapers],
            "regularizers": [spec(p) for p in self.regularizers],
            "selectors": [spec(p) for p in self.selectors],
            "correction": spec(self.correction) if self.correction is not None else None,
            "loss_agg_mode": self.loss_agg_mode,
            "loss_scale_factor": self.loss_scale_factor,
        }

    def __repr__(self) -> str:
        names = [f"{part.kind}:{part.name}" for part in self.parts]
        return f"Objective({self.name!r}, {', '.join(names)}, loss_agg_mode={self.loss_agg_mode!r})"
