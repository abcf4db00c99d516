"""entrorl's named methods as verl policy-loss modes ``entrorl_<method>``.

Select one with ``actor_rollout_ref.actor.policy_loss.loss_mode=entrorl_clip_b``. The loss is the entrorl
objective of that method (:func:`entrorl.objective.build_objective`), evaluated on verl's tensors:

* parameters: the method's defaults (from its paper), then verl's own keys where the method has a parameter of
  the same name (``actor.clip_ratio_low`` / ``clip_ratio_high`` / ``clip_ratio_c``, ``policy_loss.clip_cov_ratio``
  / ``clip_cov_lb`` / ``clip_cov_ub`` / ``kl_cov_ratio`` / ``ppo_kl_coef``: in verl, verl's config wins, its
  defaults included, and the first call warns once naming each of the method's own settings it replaced), then the
  mapping ``policy_loss.entrorl`` (any parameter of the method, by name; an unknown name is an error listing the
  valid ones). verl's ``PolicyLossConfig`` rejects unknown keys, so give the section the
  type :class:`EntrorlPolicyLossConfig` (``policy_loss._target_=entrorl.integrations.verl.EntrorlPolicyLossConfig``).
* aggregation: verl's ``loss_agg_mode`` argument and ``global_batch_info`` (``dp_size``, ``batch_num_tokens``,
  ``global_batch_size``, ``loss_scale_factor``), so the loss is normalised by the global token / sequence counts
  like verl's built-in losses.
* ``response_mask`` may be bool (verl's engine path) or 0/1 numbers (older actors).
* ``rollout_is_weights`` (verl's train/rollout mismatch correction) multiply the per-token policy loss before
  aggregation, as in verl's built-in losses. A method with its own correction (``tis``, ``icepop``) computes its
  weights from ``rollout_log_prob`` instead, and refuses verl's weights rather than apply both.
* entropy, S and D (``forking_tokens``, ``low_entropy_tokens``, ``clip_b``, ``clip_v``, ``entropy_advantage``,
  ``entropy_bonus``, ``adaptive_entropy``), reference log-probs (``kl_ref``) and rollout log-probs (``tis``,
  ``icepop``) are not among verl's loss arguments: the actor extension (:mod:`entrorl.integrations.verl.actor`)
  supplies them through :mod:`entrorl.integrations.verl.channel`, or a caller passes them as keyword arguments.

The metrics are entrorl's, prefixed ``actor/`` (``actor/select/clip_b_frac``), plus verl's usual
``actor/pg_clipfrac`` (PPO's clipped branch, as verl's ``vanilla`` counts it), ``actor/pg_clipfrac_lower`` (dual-clip;
0 without it) and ``actor/ppo_kl`` where the method has a clipped surrogate. Every call reports the same metric names
(those the method emits on a non-empty batch; a statistic without tokens reads 0), since verl's data-parallel
aggregation needs as many values of each metric from every rank. verl averages a policy loss's metrics over
micro-batches, which is right for fractions and token means only. With the step's global counts the loss terms
(``actor/loss/*``, ``actor/reg/entropy_bonus``, ``actor/kl/ref``) are partial sums and ``actor/ratio/max`` is a
maximum: they are reported where the actor extension retypes them to verl's sum and max aggregations, and left out
elsewhere. ``actor/tokens/valid`` is the step's global count of valid tokens (verl's ``batch_num_tokens``).

verl's own entropy bonus (``entropy_coeff``) and KL loss (``kl_loss_coef``) are refused next to a method that has its
own, which would count twice; so are verl's rollout-correction bypass mode next to ``tis`` / ``icepop`` (old and
rollout log-probs would be the same tensor) and verl KL types that ``kl_ref`` has no estimator for. verl releases
before 0.9 are refused: they aggregate ``seq-mean-token-sum-norm`` differently.
"""

from __future__ import annotations

import difflib
import functools
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import ConfigDict

from entrorl.objective import LOSS_AGG_MODES, Correction, Objective, PolicyBatch, available_methods, build_objective
from entrorl.objective.aggregation import check_loss_scale_factor
from entrorl.objective.parts import Metrics
from entrorl.objective.regularizers import VERL_KL_NAMES
from entrorl.integrations.verl.channel import TOKEN_FIELDS, current_token_fields, record_metric_aggregations
from verl.trainer.ppo.core_algos import register_policy_loss
from verl.workers.config import PolicyLossConfig

__all__ = [
    "LOSS_MODE_PREFIX",
    "MIN_VERL_RELEASE",
    "VERL_KL_LOSS_TYPES",
    "VERL_PARAMETER_SOURCES",
    "EntrorlPolicyLossConfig",
    "check_verl_version",
    "loss_mode_name",
    "config_get",
    "entrorl_parameters",
    "make_policy_loss",
    "register_policy_losses",
    "registered_loss_modes",
]

LOSS_MODE_PREFIX = "entrorl_"

# entrorl parameter -> (verl config section, key): verl's own keys that carry an entrorl parameter.
VERL_PARAMETER_SOURCES: dict[str, tuple[str, str]] = {
    "clip_ratio_low": ("actor", "clip_ratio_low"),
    "clip_ratio_high": ("actor", "clip_ratio_high"),
    "clip_ratio_c": ("actor", "clip_ratio_c"),
    "clip_cov_ratio": ("policy_loss", "clip_cov_ratio"),
    "clip_cov_lb": ("policy_loss", "clip_cov_lb"),
    "clip_cov_ub": ("policy_loss", "clip_cov_ub"),
    "kl_cov_ratio": ("policy_loss", "kl_cov_ratio"),
    "ppo_kl_coef": ("policy_loss", "ppo_kl_coef"),
    "kl_loss_type": ("actor", "kl_loss_type"),
}

# verl's actor.kl_loss_type -> the estimator of entrorl's kl_ref that computes the same per-token value and gradient
# (verl's low_var_kl is k3 clamped to [-10, 10], as entrorl's k3; a '+' suffix gives k2's gradient, which for k2 is k2).
VERL_KL_LOSS_TYPES = {"k1": "k1", "k2": "k2", "k3": "k3", **VERL_KL_NAMES}

# The first verl release whose loss aggregation (seq-mean-token-sum-norm divides by the sequence count) and
# global_batch_info this integration follows; verl 0.8 aggregates differently.
MIN_VERL_RELEASE = (0, 9)

# After this many on-policy mini-batches in a row, KL-Cov's |log r| term has done nothing and the loss says so.
_KL_COV_ON_POLICY_MINI_BATCHES = 3

# How each optional PolicyBatch field reaches the loss inside verl.
_EXTENSION = ("the actor extension (entrorl.integrations.verl.actor; FSDP engines only), turned on for every worker with "
              "+ray_kwargs.ray_init.runtime_env.env_vars.ENTRORL_VERL_ACTOR_EXTENSION='\"1\"'")
_FIELD_SOURCES = {
    "entropy": f"{_EXTENSION} and actor_rollout_ref.model.use_fused_kernels=False (it reads the logits)",
    "disc": f"{_EXTENSION} and actor_rollout_ref.model.use_fused_kernels=False (it reads the logits)",
    "disc_centered": f"{_EXTENSION} and actor_rollout_ref.model.use_fused_kernels=False (it reads the logits)",
    "ref_log_prob": f"{_EXTENSION}, which forwards verl's 'ref_log_prob': verl computes it when "
    "actor_rollout_ref.actor.use_kl_loss=True (set actor_rollout_ref.actor.kl_loss_coef=0 so that verl adds no KL "
    "of its own)",
    "rollout_log_prob": f"{_EXTENSION}, which forwards verl's 'rollout_log_probs': the rollout returns them with "
    "actor_rollout_ref.rollout.calculate_log_probs=True",
}


@dataclass
class EntrorlPolicyLossConfig(PolicyLossConfig):
    """verl's ``policy_loss`` section plus ``entrorl``: parameters of the entrorl method named by ``loss_mode``.

    ``actor_rollout_ref.actor.policy_loss._target_=entrorl.integrations.verl.EntrorlPolicyLossConfig``
    ``+actor_rollout_ref.actor.policy_loss.entrorl.mu=3.0``
    """

    entrorl: dict[str, Any] = field(default_factory=dict)


@functools.lru_cache(maxsize=1)
def check_verl_version() -> str:
    """The installed verl version; raises ``RuntimeError`` for a release before 0.9, whose loss aggregation differs
    from the one entrorl's losses and this integration follow. Checked at the first loss or estimator call, since
    verl swallows errors raised while it imports plugins."""
    import verl
    from packaging.version import InvalidVersion, Version

    version = str(getattr(verl, "__version__", "unknown"))
    try:
        release = Version(version).release
    except InvalidVersion:
        return version
    if release[:2] < MIN_VERL_RELEASE:
        raise RuntimeError(
            f"entrorl's verl integration needs verl >= {'.'.join(map(str, MIN_VERL_RELEASE))} (it aggregates losses like "
            f"verl 0.9), but verl {version} is installed: install the version entrorl's [verl] extra pins"
        )
    return version


def loss_mode_name(method: str) -> str:
    """The verl ``loss_mode`` of an entrorl method: ``entrorl_<method>``."""
    return f"{LOSS_MODE_PREFIX}{method}"


def config_get(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` for a verl dataclass config, an OmegaConf DictConfig, a dict or None."""
    if config is None:
        return default
    if isinstance(config, Mapping) or hasattr(config, "get"):
        try:
            return config.get(key, default)
        except (AttributeError, KeyError):
            return default
    return getattr(config, key, default)


@functools.lru_cache(maxsize=None)
def _method_defaults(method: str) -> dict[str, Any]:
    """The method's own settings (its papers'): every parameter of its parts, and its loss aggregation."""
    objective = build_objective(method)
    defaults = {name: getattr(part, name) for part in objective.parts for name in type(part).model_fields}
    return {**defaults, "loss_agg_mode": objective.loss_agg_mode}


def entrorl_parameters(method: str, config: Any) -> dict[str, Any]:
    """The parameter overrides for ``method`` read from verl's actor ``config`` (see the module docstring).

    verl's keys apply only where the method has that parameter; ``policy_loss.entrorl`` applies as given (its
    names are checked when the objective is built).
    """
    owned = _method_defaults(method).keys() - {"loss_agg_mode"}  # the parameters of the method's parts
    policy_loss = config_get(config, "policy_loss")
    sections = {"actor": config, "policy_loss": policy_loss}
    params: dict[str, Any] = {}
    for name, (section, key) in VERL_PARAMETER_SOURCES.items():
        if name not in owned:
            continue
        value = config_get(sections[section], key)
        if value is None and key in ("clip_ratio_low", "clip_ratio_high"):
            value = config_get(config, "clip_ratio")  # verl's fallback for the decoupled bounds
        if value is not None and name == "kl_loss_type":
            value = _kl_estimator(method, value)
        if value is not None:
            params[name] = value
    explicit = config_get(policy_loss, "entrorl") or {}
    if not isinstance(explicit, Mapping):
        raise ValueError(
            f"actor.policy_loss.entrorl must be a mapping of {method!r} parameters, got {type(explicit).__name__}"
        )
    verl_owned = sorted(key for key in ("loss_agg_mode", "loss_scale_factor") if key in explicit)
    if verl_owned:
        raise ValueError(
            f"actor.policy_loss.entrorl sets {verl_owned}, which verl passes to every policy loss itself: set "
            + " / ".join(f"actor_rollout_ref.actor.{key}" for key in verl_owned) + " instead"
        )
    unknown = sorted(str(key) for key in explicit if str(key) not in owned)
    if unknown:
        hints = [f"{name!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(name, sorted(owned), n=1))
                 else repr(name) for name in unknown]
        raise ValueError(
            f"verl loss_mode {loss_mode_name(method)!r}: unknown parameter{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(hints)} in actor_rollout_ref.actor.policy_loss.entrorl; valid parameters: {sorted(owned)}"
        )
    params.update({str(key): value for key, value in dict(explicit).items()})
    return params


def _where_verl_sets(message: str, settings: dict[str, Any], explicit: frozenset[str]) -> str:
    """Where verl's configuration set each parameter that ``message`` (an objective's error, about one parameter or
    several together) names: its key in ``policy_loss.entrorl`` or the verl key that carries it
    (:data:`VERL_PARAMETER_SOURCES`)."""
    places = []
    for name in settings:
        if not re.search(rf"\b{re.escape(name)}\b", message):
            continue
        if name in explicit or name not in VERL_PARAMETER_SOURCES:
            places.append(f"actor_rollout_ref.actor.policy_loss.entrorl.{name}")
            continue
        section, key = VERL_PARAMETER_SOURCES[name]
        fallback = " (clip_ratio when it is unset)" if key in ("clip_ratio_low", "clip_ratio_high") else ""
        places.append(f"actor_rollout_ref.actor.{'policy_loss.' if section == 'policy_loss' else ''}{key}{fallback}")
    return ("set in " + "; ".join(places) if places
            else "set entrorl parameters in actor_rollout_ref.actor.policy_loss.entrorl")


def _kl_estimator(method: str, kl_loss_type: Any) -> str:
    """kl_ref's estimator for verl's ``actor.kl_loss_type``; a verl type with no entrorl equivalent is refused."""
    estimator = VERL_KL_LOSS_TYPES.get(str(kl_loss_type))
    if estimator is None:
        raise ValueError(
            f"verl loss_mode {loss_mode_name(method)!r} cannot honour actor_rollout_ref.actor.kl_loss_type="
            f"{kl_loss_type!r} (kl_ref has the estimators k1, k2 and k3): set it to low_var_kl (k3), kl (k1) or mse (k2)"
        )
    return estimator


class _VerlRolloutWeights(Correction):
    """verl's precomputed ``rollout_is_weights``, applied where an entrorl correction would be."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    requires: ClassVar[tuple[str, ...]] = ()

    weights: torch.Tensor

    def __call__(self, batch: PolicyBatch, metrics: Metrics) -> torch.Tensor:
        weights = self.weights.detach().to(batch.log_prob.dtype)
        valid = batch.mask
        metrics["correction/verl_is_weight_mean"] = float(weights[valid].mean()) if valid.any() else 1.0
        return weights


@dataclass
class _LossMode:
    """One configured ``entrorl_<method>`` loss in this worker: its objective (stateful parts persist), the metric
    names it reports on every call, and what its runtime checks have seen."""

    method: str
    settings: dict[str, Any]
    objective: Objective
    metric_names: dict[bool, frozenset[str]] = field(default_factory=dict)  # keyed by: verl passes rollout_is_weights
    warned: set[str] = field(default_factory=set)
    on_policy_mini_batches: int = 0
    last_mini_batch: Any = None  # the global counts of the mini-batch the last call belonged to
    mini_batch_seen: int = 0  # the rows (or tokens) of that mini-batch this worker has seen so far


_LOSS_MODES: dict[tuple[str, str], _LossMode] = {}


def _loss_mode_state(method: str, params: dict[str, Any], loss_agg_mode: str, loss_scale_factor: float | None,
                     explicit: frozenset[str] = frozenset()) -> _LossMode:
    """The loss mode for these settings, built once: stateful parts (adaptive coefficients, RNGs) persist. When it
    is built, say once which of the method's own settings verl's configuration replaced (``explicit``: the names set
    in ``policy_loss.entrorl``, which are the user's own choice)."""
    settings = {**params, "loss_agg_mode": loss_agg_mode, "loss_scale_factor": loss_scale_factor}
    key = (method, repr(sorted(settings.items())))
    if key not in _LOSS_MODES:
        try:
            objective = build_objective(method, **settings)
        except ValueError as error:
            raise ValueError(f"verl loss_mode {loss_mode_name(method)!r}: {error} "
                             f"({_where_verl_sets(str(error), settings, explicit)})") from None
        for part in objective.regularizers:
            if part.name == "kl_cov":
                # KL-Cov's own on-policy warning counts calls, and in verl every micro-batch of the (on-policy) first
                # mini-batch of a step is one: the loss counts on-policy mini-batches instead (_check_inputs)
                part.leave_on_policy_warning_to_caller()
        _LOSS_MODES[key] = _LossMode(method=method, settings=settings, objective=objective)
        own = _method_defaults(method)
        replaced = [f"{name} {settings[name]!r} (the method's: {own[name]!r})" for name in sorted(own)
                    if name in settings and name not in explicit and settings[name] != own[name]]
        if replaced:
            warnings.warn(
                f"verl loss_mode {loss_mode_name(method)!r} runs with verl's settings in place of the method's own: "
                f"{'; '.join(replaced)}. To run the method as published, set them in verl's actor config "
                "(actor_rollout_ref.actor.clip_ratio_low / clip_ratio_high / loss_agg_mode, ...) or, for clip_ratio_c and "
                "the method's other parameters, in actor_rollout_ref.actor.policy_loss.entrorl.",
                stacklevel=3,
            )
    return _LOSS_MODES[key]


def _with_verl_weights(objective: Objective, weights: torch.Tensor) -> Objective:
    """``objective`` with verl's ``rollout_is_weights`` in the place of a correction (it has none)."""
    return Objective(
        surrogate=objective.surrogate,
        shapers=objective.shapers,
        regularizers=objective.regularizers,
        selectors=objective.selectors,
        correction=_VerlRolloutWeights(weights=weights),
        loss_agg_mode=objective.loss_agg_mode,
        loss_scale_factor=objective.loss_scale_factor,
        name=objective.name,
        label=objective.label,
    )


def _emitted_metric_names(state: _LossMode, verl_weights: bool) -> frozenset[str]:
    """Every metric the loss mode emits on a non-empty batch: the names of a call of a fresh copy of its objective on
    a small synthetic batch carrying every per-token field (the live objective's state is left alone)."""
    if verl_weights not in state.metric_names:
        objective = build_objective(state.method, **state.settings)
        generator = torch.Generator().manual_seed(0)
        shape = (2, 4)
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            log_prob = (-torch.rand(shape, generator=generator) * 2).requires_grad_(True)
            fields = {
                "entropy": (torch.rand(shape, generator=generator) + 0.1).requires_grad_(True),
                "disc": torch.randn(shape, generator=generator),
                "disc_centered": torch.randn(shape, generator=generator),
                "ref_log_prob": log_prob.detach() - torch.rand(shape, generator=generator),
                "rollout_log_prob": log_prob.detach() + torch.randn(shape, generator=generator) * 0.1,
            }
            batch = PolicyBatch(
                log_prob=log_prob,
                old_log_prob=log_prob.detach() + torch.randn(shape, generator=generator) * 0.1,
                advantages=torch.tensor([[1.0] * shape[1], [-1.0] * shape[1]]),
                mask=torch.ones(shape, dtype=torch.bool),
                **fields,
            )
            if verl_weights:
                objective = _with_verl_weights(objective, torch.ones(shape))
            state.metric_names[verl_weights] = frozenset(objective(batch).metrics)
    return state.metric_names[verl_weights]


def _normalisers(config: Any, loss_agg_mode: str) -> dict[str, Any]:
    info = dict(config_get(config, "global_batch_info") or {})
    unknown = sorted(set(info) - {"dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor"})
    if unknown:
        raise ValueError(f"global_batch_info has keys {unknown} that entrorl's aggregation does not know")
    dp_size = int(info.get("dp_size") or 1)
    needed = "batch_num_tokens" if loss_agg_mode == "token-mean" else "global_batch_size"
    if dp_size > 1 and info.get(needed) is None:
        raise ValueError(
            f"global_batch_info has dp_size={dp_size} but no {needed}: with data parallelism the loss must be "
            "normalised by the global count (verl's actor fills it for every micro-batch)"
        )
    scale = info.get("loss_scale_factor")
    if scale is None:  # absent, or present as None: the actor config's own setting
        scale = config_get(config, "loss_scale_factor")
    return {
        "dp_size": dp_size,
        "batch_num_tokens": info.get("batch_num_tokens"),
        "global_batch_size": info.get("global_batch_size"),
        "loss_scale_factor": _checked_scale(scale, "global_batch_info's loss_scale_factor"
                                            if info.get("loss_scale_factor") is not None
                                            else "actor_rollout_ref.actor.loss_scale_factor"),
    }


def _checked_scale(scale: Any, where: str) -> float | None:
    """``scale`` through :func:`check_loss_scale_factor`, its error naming ``where`` verl's configuration set it."""
    try:
        return check_loss_scale_factor(scale)
    except ValueError as error:
        raise ValueError(f"verl: {error} (from {where})") from None


def _partial_sums(normalisers: dict[str, Any], loss_agg_mode: str) -> bool:
    """Whether the loss of a call is one micro-batch's share of the step's loss (normalised by the global token or
    sequence count, or scaled by the data-parallel size), so that the step's loss is the sum over calls."""
    count = normalisers["batch_num_tokens"] if loss_agg_mode == "token-mean" else normalisers["global_batch_size"]
    return normalisers["dp_size"] > 1 or count is not None


def _metric_aggregations(objective: Objective, names: Any) -> dict[str, str]:
    """The entrorl metrics among ``names`` that do not combine over micro-batches by a mean: the loss terms
    (``loss/*`` and the regularisers' metrics aggregated like the loss) add up, maxima take the maximum."""
    summed = objective.aggregated_metrics
    aggregations = {}
    for name in names:
        if name.startswith("loss/") or name in summed:
            aggregations[name] = "sum"
        elif name.endswith("/max"):
            aggregations[name] = "max"
    return aggregations


def _verl_metrics(metrics: Metrics) -> dict[str, float]:
    out = {f"actor/{key}": float(value) for key, value in metrics.items()}
    # verl's pg_clipfrac counts the tokens where PPO's clipped branch wins; dual-clip is its pg_clipfrac_lower
    if "clip/ppo_low_frac" in metrics and "clip/ppo_high_frac" in metrics:
        clip_fraction = metrics["clip/ppo_low_frac"] + metrics["clip/ppo_high_frac"]
    else:
        clip_fraction = next((metrics[k] for k in ("clip/ppo_frac", "clip/gspo_frac", "clip/cispo_frac") if k in metrics), None)
    if clip_fraction is not None:
        out["actor/pg_clipfrac"] = float(clip_fraction)
        out["actor/pg_clipfrac_lower"] = float(metrics.get("clip/dual_frac", 0.0))
    elif "clip/dual_frac" in metrics:
        out["actor/pg_clipfrac_lower"] = float(metrics["clip/dual_frac"])
    if "kl/old_new" in metrics:
        out["actor/ppo_kl"] = float(metrics["kl/old_new"])
    return out


def _report_metrics(state: _LossMode, objective: Objective, metrics: Metrics, normalisers: dict[str, Any],
                    partial_sums: bool, verl_weights: bool) -> dict[str, float]:
    """The call's metrics as verl should see them: every name the loss mode emits (0 where this batch had no
    tokens for it), ``tokens/valid`` as the step's global count, and the sums and maxima either recorded for the
    actor extension to retype or, where nothing will retype them and verl's mean of them would be wrong, left out."""
    complete = {**{name: 0.0 for name in _emitted_metric_names(state, verl_weights)}, **metrics}
    if normalisers["batch_num_tokens"] is not None and "tokens/valid" in complete:
        complete["tokens/valid"] = float(normalisers["batch_num_tokens"])
    aggregations = _metric_aggregations(objective, complete)
    if not partial_sums:
        aggregations = {name: how for name, how in aggregations.items() if how == "max"}
    if aggregations and not record_metric_aggregations({f"actor/{name}": how for name, how in aggregations.items()}):
        if partial_sums:
            complete = {name: value for name, value in complete.items() if name not in aggregations}
    return _verl_metrics(complete)


def _refuse_verl_duplicates(mode: str, objective: Objective, config: Any) -> None:
    """verl adds its own entropy bonus (``entropy_coeff``) and KL loss (``use_kl_loss`` with ``kl_loss_coef``) to any
    policy loss: with a method that has its own, the term would count twice. verl's rollout-correction bypass mode
    makes the old log-probs the rollout's, so a method's own correction would weigh every token by exp(0) = 1."""
    own_entropy = sorted(part.name for part in objective.regularizers if part.name in ("entropy_bonus", "adaptive_entropy"))
    if own_entropy and config_get(config, "entropy_coeff", 0):
        raise ValueError(
            f"verl loss_mode {mode!r} has its own entropy term ({', '.join(own_entropy)}) and verl adds "
            f"entropy_coeff = {config_get(config, 'entropy_coeff')} times the entropy as well: set "
            "actor_rollout_ref.actor.entropy_coeff=0"
        )
    if "ref_log_prob" in objective.required_fields and config_get(config, "use_kl_loss", False) and config_get(config, "kl_loss_coef", 0):
        raise ValueError(
            f"verl loss_mode {mode!r} has its own KL to the reference (kl_ref, coefficient kl_loss_coef in "
            "policy_loss.entrorl) and verl adds its KL loss as well: keep actor_rollout_ref.actor.use_kl_loss=True (it "
            "makes verl compute the reference log-probs) and set actor_rollout_ref.actor.kl_loss_coef=0"
        )
    rollout_correction = config_get(config_get(config, "policy_loss"), "rollout_correction")
    if objective.correction is not None and config_get(rollout_correction, "bypass_mode", False):
        raise ValueError(
            f"verl loss_mode {mode!r} corrects by pi_old / pi_rollout, which verl's rollout-correction bypass mode makes "
            "1 on every token (it uses the rollout log-probs as the old ones): set "
            "algorithm.rollout_correction.bypass_mode=False"
        )


def _warn_once(state: _LossMode, what: str, message: str) -> None:
    if what not in state.warned:
        state.warned.add(what)
        warnings.warn(message, stacklevel=4)


def _check_inputs(mode: str, state: _LossMode, batch: PolicyBatch, normalisers: dict[str, Any], partial_sums: bool) -> None:
    """Warn once per loss mode about inputs that silently defeat the method, which the loss sees and the
    configuration it is given does not."""
    objective, mask = state.objective, batch.mask
    if not bool(mask.any()):
        return
    positive_scale = next((shaper for shaper in objective.shapers if shaper.name == "positive_scale"), None)
    if positive_scale is not None:
        values = batch.advantages.detach()[mask].unique()
        positive = values[values > 0]
        if positive.numel() == 1 and 0.0 < float(positive) < 1.0 and bool(((values == -1.0) | (values > 0)).all()):
            _warn_once(state, "w_reinforce", (
                f"verl loss_mode {mode!r} scales positive advantages by lam = {positive_scale.lam:g}, and its advantages "
                f"are +{float(positive):g} / -1, the output of adv_estimator=entrorl_w_reinforce, which holds lambda "
                "already: correct samples get lambda squared. Set algorithm.adv_estimator=entrorl_signed_reward, the "
                "method's estimator."))
    if objective.correction is not None and batch.rollout_log_prob is not None:
        old, rollout = batch.old_log_prob.detach()[mask], batch.rollout_log_prob.detach()[mask]
        if torch.equal(old, rollout.to(old.dtype)):
            _warn_once(state, "bypass", (
                f"verl loss_mode {mode!r}: the old and the rollout log-probs are equal on every token, so its "
                f"{objective.correction.name} weights are all 1 and correct nothing; verl's rollout-correction bypass "
                "mode does this: set algorithm.rollout_correction.bypass_mode=False."))
    if any(part.name == "kl_cov" for part in objective.regularizers):
        on_policy = torch.equal(batch.log_prob.detach()[mask], batch.old_log_prob.detach()[mask].to(batch.log_prob.dtype))
        new_mini_batch = _starts_a_mini_batch(state, normalisers, mask, partial_sums)
        if not bool(batch.advantages.detach()[mask].ne(0).any()):
            pass  # advantages all 0: the policy loss moves no weight, so log r = 0 says nothing about the schedule
        elif not on_policy:
            state.on_policy_mini_batches = 0
        elif new_mini_batch:
            state.on_policy_mini_batches += 1
        if state.on_policy_mini_batches >= _KL_COV_ON_POLICY_MINI_BATCHES:
            _warn_once(state, "kl_cov", (
                f"verl loss_mode {mode!r}: log pi == log pi_old in {state.on_policy_mini_batches} mini-batches in a row, "
                "so KL-Cov's |log r| term is zero with zero gradient (a no-op strictly on-policy): use several "
                "mini-batches per step (actor_rollout_ref.actor.ppo_mini_batch_size below data.train_batch_size) or "
                "ppo_epochs > 1."))


def _starts_a_mini_batch(state: _LossMode, normalisers: dict[str, Any], mask: torch.Tensor, partial_sums: bool) -> bool:
    """Whether this call is the first micro-batch of a mini-batch, and remember it in ``state``. The micro-batches of
    one mini-batch share its global counts, and a worker's rows add up to ``global_batch_size / dp_size`` (verl deals
    the rows out evenly; tokens, when only their count is given, to about ``batch_num_tokens / dp_size``), so a call
    opens a new mini-batch when the counts change or when its rows would take the worker past its share: consecutive
    steps with equal counts are told apart. Without global counts every call is one."""
    if not partial_sums:
        return True
    by_rows = normalisers["global_batch_size"] is not None
    size = int(mask.any(dim=-1).sum()) if by_rows else int(mask.sum())  # rows: those with a valid token, as verl counts
    total = normalisers["global_batch_size"] if by_rows else normalisers["batch_num_tokens"]
    share = None if total is None else total / normalisers["dp_size"]
    counts = (normalisers["batch_num_tokens"], normalisers["global_batch_size"])
    starts = counts != state.last_mini_batch or (share is not None and state.mini_batch_seen + size > share)
    state.last_mini_batch = counts
    state.mini_batch_seen = size if starts else state.mini_batch_seen + size
    return starts


def make_policy_loss(method: str):
    """A verl policy-loss function (verl's ``PolicyLossFn`` signature) computing entrorl method ``method``.

    Besides verl's arguments it takes the optional per-token tensors ``entropy``, ``disc``, ``disc_centered``,
    ``ref_log_prob`` and ``rollout_log_prob`` as keywords; those not given are read from the actor extension's
    channel. Returns ``(loss, metrics)`` like verl's built-in losses.
    """
    build_objective(method)  # fail now, not at the first training step, on an unknown method

    def policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: torch.Tensor | None = None,
        **token_fields: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        check_verl_version()
        mode = loss_mode_name(method)
        unknown = sorted(set(token_fields) - set(TOKEN_FIELDS))
        if unknown:
            raise TypeError(f"verl loss_mode {mode!r} got unexpected keyword(s) {unknown}; per-token extras are {list(TOKEN_FIELDS)}")
        if loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"verl loss_mode {mode!r}: loss_agg_mode {loss_agg_mode!r} is not supported; use one of {list(LOSS_AGG_MODES)}")
        normalisers = _normalisers(config, loss_agg_mode)
        params = entrorl_parameters(method, config)  # checks the entrorl section first
        explicit = frozenset(str(key) for key in dict(config_get(config_get(config, "policy_loss"), "entrorl") or {}))
        state = _loss_mode_state(method, params, loss_agg_mode, normalisers.pop("loss_scale_factor"), explicit)
        objective = state.objective
        _refuse_verl_duplicates(mode, objective, config)

        fields = {**current_token_fields(), **{k: v for k, v in token_fields.items() if v is not None}}
        missing = [name for name in objective.required_fields if name not in fields]
        if missing:
            sources = "; ".join(f"{name}: {_FIELD_SOURCES[name]}" for name in missing)
            raise ValueError(
                f"verl loss_mode {mode!r} needs per-token {missing}, which verl's actor does not pass to policy losses. "
                f"Provide them with {sources}. See entrorl's docs/verl.md, 'The actor extension'."
            )
        if rollout_is_weights is not None:
            if objective.correction is not None:
                raise ValueError(
                    f"verl loss_mode {mode!r} applies its own rollout correction ({objective.correction.name}) and verl "
                    "passed rollout_is_weights too: switch verl's rollout correction off "
                    "(algorithm.rollout_correction.rollout_is=null) or use a method without a correction"
                )
            objective = _with_verl_weights(objective, rollout_is_weights)
        batch = PolicyBatch(
            log_prob=log_prob,
            old_log_prob=old_log_prob,
            advantages=advantages,
            mask=response_mask,
            **{name: fields[name] for name in TOKEN_FIELDS if name in fields},
        )
        partial_sums = _partial_sums(normalisers, loss_agg_mode)
        _check_inputs(mode, state, batch, normalisers, partial_sums)
        output = objective(batch, **normalisers)
        metrics = _report_metrics(state, objective, output.metrics, normalisers, partial_sums, rollout_is_weights is not None)
        return output.loss, metrics

    policy_loss.__name__ = policy_loss.__qualname__ = f"compute_policy_loss_{loss_mode_name(method)}"
    policy_loss.__doc__ = f"verl policy loss {loss_mode_name(method)!r}: entrorl's {method!r} objective (see entrorl.integrations.verl.losses)."
    return policy_loss


def register_policy_losses() -> list[str]:
    """Register every entrorl method (including those a user registered before calling this) in verl's
    policy-loss registry as ``entrorl_<method>``; returns the loss modes."""
    modes = []
    for info in available_methods():
        register_policy_loss(loss_mode_name(info.name))(make_policy_loss(info.name))
        modes.append(loss_mode_name(info.name))
    return modes


def registered_loss_modes() -> list[str]:
    """The ``entrorl_<method>`` modes present in verl's registry."""
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

    return sorted(name for name in POLICY_LOSS_REGISTRY if name.startswith(LOSS_MODE_PREFIX))
