"""Registered parts an objective is composed of, and their registry.

Five kinds of part, called in this order by :class:`entrorl.objective.Objective`:

* ``shaper``      rewrites the per-token advantages (``entropy_advantage``, ``lopti_reweight``, ...)
* ``surrogate``   the per-token policy loss from ratio and advantage (``ppo_clip``, ``cispo``, ``gspo``, ...)
* ``regularizer`` adds per-token terms (``kl_cov``) or a scalar term (``entropy_bonus``, ``kl_ref``, ...)
* ``selector``    drops tokens: no loss, no gradient (``clip_b``, ``forking_tokens``, ``clip_cov``, ...)
* ``correction``  weights tokens for train/rollout mismatch (``tis``, ``icepop``)

A part is a pydantic model: its fields are its parameters, each with the paper's default and a
description naming the paper, so bad values fail when the objective is built. A user adds a part with
the :func:`register_part` decorator and composes it by name; the loop is never edited.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, field_validator

from entrorl._checks import refuse_booleans_for_numbers, validation_message
from entrorl.objective.batch import PolicyBatch

__all__ = [
    "PART_KINDS",
    "Part",
    "Shaper",
    "Surrogate",
    "SurrogateOutput",
    "Regularizer",
    "RegularizerTerm",
    "Selector",
    "Correction",
    "Metrics",
    "register_part",
    "get_part_class",
    "available_parts",
    "make_part",
]

PART_KINDS = ("shaper", "surrogate", "regularizer", "selector", "correction")

Metrics = dict[str, float]

_REGISTRY: dict[str, dict[str, type["Part"]]] = {kind: {} for kind in PART_KINDS}


class Part(BaseModel):
    """Base of every part. Subclasses declare their parameters as pydantic fields."""

    # no parameter is meaningful at inf or NaN (a coefficient of inf or NaN makes the loss so); None turns a bound off
    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True, arbitrary_types_allowed=True,
                              allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info) -> Any:
        """pydantic would take ``True`` as 1 for a number (``clip_ratio_low=True`` a clip ratio of 1)."""
        return refuse_booleans_for_numbers(value, cls.model_fields[info.field_name].annotation)

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()

    def check_batch(self, batch: PolicyBatch) -> None:
        for field_name in self.requires:
            batch.require(field_name, f"{self.kind} '{self.name}'")

    def params(self) -> dict[str, Any]:
        return self.model_dump()

    @property
    def stateful(self) -> bool:
        """Whether the part keeps state of its own across steps (an adaptive coefficient, a private generator), which a
        checkpoint must hold for a resumed run to go on as the uninterrupted one; its ``state_dict`` may still be empty
        before the state first moves. By default, whether the part defines its own ``state_dict``."""
        return type(self).state_dict is not Part.state_dict

    def state_dict(self) -> dict[str, Any]:
        """Mutable state to checkpoint (adaptive coefficients, RNG); empty for stateless parts."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.kind} '{self.name}' is stateless but a state {sorted(state)} was given")

    def end_step(self) -> Metrics:
        """Called once a training step's updates are done; parts that act once per step act here (and also when
        the first batch of a later step arrives, for callers that never call it). Returns metrics."""
        return {}


class Shaper(Part):
    kind: ClassVar[str] = "shaper"

    def __call__(self, batch: PolicyBatch, advantages: torch.Tensor, metrics: Metrics) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class SurrogateOutput:
    """Per-token loss ``[B, T]`` and the tokens whose gradient the surrogate itself clipped to zero."""

    per_token_loss: torch.Tensor
    clipped: torch.Tensor
    ratio: torch.Tensor


class Surrogate(Part):
    kind: ClassVar[str] = "surrogate"

    def __call__(self, batch: PolicyBatch, advantages: torch.Tensor, metrics: Metrics) -> SurrogateOutput:
        raise NotImplementedError


@dataclass
class RegularizerTerm:
    """``per_token`` is added to the policy loss before aggregation; ``scalar`` to the aggregated loss. ``covers``,
    for a term on chosen tokens (KL-Cov's), are those tokens: the objective reports the share of them that the
    selectors leave in training as ``select/<name>_frac``, the tokens whose loss carries the term."""

    per_token: torch.Tensor | None = None
    scalar: torch.Tensor | None = None
    covers: torch.Tensor | None = None


class Regularizer(Part):
    kind: ClassVar[str] = "regularizer"
    #: Metrics this regulariser reports as aggregated like the loss (``aggregate``), not as token means: a trainer
    #: that splits an update combines them the way it combines the loss.
    aggregated_metrics: ClassVar[tuple[str, ...]] = ()

    @property
    def reads_step_statistics(self) -> bool:
        """Whether the coming call reads ``PolicyBatch.population`` (the step's whole batch) when given it."""
        return False

    def __call__(
        self,
        batch: PolicyBatch,
        advantages: torch.Tensor,
        aggregate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        metrics: Metrics,
    ) -> RegularizerTerm:
        raise NotImplementedError


class Selector(Part):
    """Chooses tokens to drop. Every selector sees the batch's full valid mask, so the order of
    selectors does not matter: the dropped set is the union of what each one drops.

    ``keep_in_normaliser``: whether a dropped token still counts in the loss normaliser (papers differ).
    """

    kind: ClassVar[str] = "selector"
    #: The reference code takes this selector's statistics over the whole training batch: given
    #: ``PolicyBatch.population`` it decides there (once per population) and keeps the batch's rows.
    step_statistics: ClassVar[bool] = False
    keep_in_normaliser: bool = False

    _decided: tuple[Any, Any] | None = PrivateAttr(default=None)  # (population, its decision)

    def __call__(
        self, batch: PolicyBatch, advantages: torch.Tensor, surrogate: SurrogateOutput, metrics: Metrics
    ) -> torch.Tensor:
        raise NotImplementedError

    def end_step(self) -> Metrics:
        self._decided = None  # the step's population is done with: do not hold its tensors into the next step
        return {}

    def decide(self, batch: PolicyBatch, advantages: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """For a selector with ``step_statistics``: its drop mask over ``batch``'s valid tokens, then the statistics
        it logs."""
        raise NotImplementedError(f"selector '{self.name}' does not decide over a population")

    def population_decision(self, population: PolicyBatch) -> tuple[torch.Tensor, ...]:
        """:meth:`decide` over the population (with its own advantages), computed once for each population and
        reused by its mini- and micro-batches."""
        if self._decided is None or self._decided[0] is not population:
            self._decided = (population, self.decide(population, population.advantages))
        return self._decided[1]

    def decision(self, batch: PolicyBatch, advantages: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """:meth:`decide` on ``batch``, or, when it carries its step's population, the population's decision on the
        batch's rows (the statistics stay the population's)."""
        if batch.population is None:
            return self.decide(batch, advantages)
        drop, *statistics = self.population_decision(batch.population)
        return (drop[batch.rows.to(drop.device)] & batch.mask, *statistics)


class Correction(Part):
    """Detached per-token weights for the mismatch between the trainer's and the sampler's policy."""

    kind: ClassVar[str] = "correction"
    requires: ClassVar[tuple[str, ...]] = ("rollout_log_prob",)

    def __call__(self, batch: PolicyBatch, metrics: Metrics) -> torch.Tensor:
        raise NotImplementedError


def register_part(name: str, *, description: str, paper: str = "") -> Callable[[type[Part]], type[Part]]:
    """Class decorator registering a part under ``name`` for its kind (its base class). ``paper`` (the arXiv id)
    is also appended to the class's docstring, so that ``help()`` on the part cites its source. Refused: an empty
    name or one with spaces around it (``ValueError``), a parameter without a default (``TypeError``)."""

    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"a part's name must be a non-empty string without spaces around it, got {name!r}")

    def decorate(cls: type[Part]) -> type[Part]:
        kind = cls.kind
        if kind not in _REGISTRY:
            raise TypeError(f"{cls.__name__} must subclass one of Shaper, Surrogate, Regularizer, Selector, Correction")
        required = [field_name for field_name, info in cls.model_fields.items() if info.is_required()]
        if required:  # a method names a part without its parameters: each needs the paper's value as its default
            raise TypeError(f"{kind} '{name}' ({cls.__name__}): parameter(s) {required} have no default; every "
                            "parameter needs the paper's default value")
        if name in _REGISTRY[kind] and _REGISTRY[kind][name] is not cls:
            raise ValueError(f"a {kind} named '{name}' is already registered ({_REGISTRY[kind][name].__name__})")
        cls.name = name
        cls.description = description
        cls.paper = paper
        if paper and paper not in (cls.__doc__ or ""):
            cls.__doc__ = f"{inspect.cleandoc(cls.__doc__)}\n\nPaper: {paper}." if cls.__doc__ else f"Paper: {paper}."
        _REGISTRY[kind][name] = cls
        return cls

    return decorate


def get_part_class(kind: str, name: str) -> type[Part]:
    if kind not in _REGISTRY:
        raise ValueError(f"unknown part kind '{kind}'; kinds are {list(PART_KINDS)}")
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        raise ValueError(f"unknown {kind} '{name}'; registered {kind}s: {sorted(_REGISTRY[kind])}") from None


@dataclass(frozen=True)
class PartInfo:
    kind: str
    name: str
    description: str
    paper: str
    params: dict[str, Any] = field(default_factory=dict)
    param_docs: dict[str, str] = field(default_factory=dict)


def part_info(cls: type[Part]) -> PartInfo:
    fields_ = cls.model_fields
    return PartInfo(
        kind=cls.kind,
        name=cls.name,
        description=cls.description,
        paper=cls.paper,
        params={key: info.default for key, info in fields_.items()},
        param_docs={key: info.description or "" for key, info in fields_.items()},
    )


def available_parts(kind: str | None = None) -> list[PartInfo]:
    """Every registered part of ``kind`` (one of ``PART_KINDS``; None: of every kind), sorted by name."""
    if kind is not None and kind not in _REGISTRY:
        raise ValueError(f"unknown part kind '{kind}'; kinds are {list(PART_KINDS)}")
    kinds = PART_KINDS if kind is None else (kind,)
    return [part_info(cls) for k in kinds for _, cls in sorted(_REGISTRY[k].items())]


def make_part(kind: str, name: str, params: dict[str, Any]) -> Part:
    """Instantiate a registered part, naming the bad parameter and the valid ones on error."""
    cls = get_part_class(kind, name)
    valid = list(cls.model_fields)
    unknown = [key for key in params if key not in cls.model_fields]
    if unknown:
        raise ValueError(f"{kind} '{name}' has no parameter(s) {unknown}; its parameters are {valid}")
    try:
        return cls(**params)
    except ValidationError as error:
        problems = "; ".join(  # a check across parameters has no location and its input is every parameter
            f"{'.'.join(str(p) for p in item['loc'])}: {validation_message(item)} (got {item.get('input')!r})"
            if item["loc"] else validation_message(item) for item in error.errors()
        )
        raise ValueError(f"{kind} '{name}': invalid parameter value — {problems}") from None
