"""Named methods (compositions of parts with the papers' defaults), configs, and ``build_objective``."""

from __future__ import annotations

import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from entrorl._checks import did_you_mean, refuse_booleans_for_numbers, validation_message
from entrorl.advantages import advantage_info
from entrorl.objective.aggregation import LOSS_AGG_MODES, check_loss_agg_mode, check_loss_scale_factor
from entrorl.objective.core import Objective
from entrorl.objective.parts import Part, get_part_class, make_part

__all__ = [
    "MethodSpec",
    "MethodInfo",
    "PartSpec",
    "ObjectiveConfig",
    "register_method",
    "get_method",
    "method_modules",
    "available_methods",
    "build_objective",
    "methods_markdown_table",
]

PartRef = tuple[str, dict[str, Any]]  # (part name, parameter overrides)


@dataclass(frozen=True)
class MethodSpec:
    """A named method: which parts, with which parameters, and the advantage estimator it is paired with.

    ``advantage_estimator`` is what a trainer uses by default for this method (see :mod:`entrorl.advantages`).
    ``surrogate_is_the_method``: the surrogate is part of what the method does (KL-Cov's unclipped loss, Clip-Cov's
    clip range of 1), so that after another method, whose surrogate replaces it, the composition says so.
    """

    name: str
    description: str
    paper: str
    surrogate: PartRef = ("ppo_clip", {})
    shapers: tuple[PartRef, ...] = ()
    regularizers: tuple[PartRef, ...] = ()
    selectors: tuple[PartRef, ...] = ()
    correction: PartRef | None = None
    loss_agg_mode: str = "token-mean"
    advantage_estimator: str = "grpo"
    notes: str = ""
    surrogate_is_the_method: bool = False

    def part_refs(self) -> list[tuple[str, PartRef]]:
        """``(kind, reference)`` of each part the method names: its surrogate, shapers, regularizers, selectors and
        correction, in that order."""
        return [("surrogate", self.surrogate), *(("shaper", ref) for ref in self.shapers),
                *(("regularizer", ref) for ref in self.regularizers), *(("selector", ref) for ref in self.selectors),
                *([("correction", self.correction)] if self.correction is not None else [])]


@dataclass(frozen=True)
class MethodInfo:
    name: str
    description: str
    paper: str
    params: dict[str, Any]
    loss_agg_mode: str
    advantage_estimator: str
    parts: dict[str, Any] = field(default_factory=dict)
    notes: str = ""


_METHODS: dict[str, MethodSpec] = {}
_REGISTERED_BY: dict[str, str] = {}  # method name -> the module whose code registered it


def register_method(spec: MethodSpec) -> MethodSpec:
    """Register a named method; its parts must already be registered. Refused with ``ValueError``, the registry left
    as it was: an empty name, one with spaces around it, a ``+`` (which composes methods) or another character than
    letters, digits, ``_``, ``-`` and ``.``, one starting with ``-`` or made of dots alone, a name another method
    has, and a spec :func:`build_objective` cannot build (a parameter its part does not have, a value out of range):
    every listing of the methods builds each one."""
    if not isinstance(spec.name, str) or not spec.name or spec.name != spec.name.strip():
        raise ValueError(f"a method's name must be a non-empty string without spaces around it, got {spec.name!r}")
    if spec.name in _METHODS and _METHODS[spec.name] != spec:
        raise ValueError(f"a method named '{spec.name}' is already registered")
    if "+" in spec.name or "," in spec.name:
        raise ValueError(f"method names may not contain '+' (it composes methods) or ',' (it separates them in "
                         f"entrorl lab --methods): {spec.name!r}")
    if not re.fullmatch(r"[\w.\-]+", spec.name) or spec.name.startswith("-") or not spec.name.strip("."):
        raise ValueError(f"a method's name is made of letters, digits, '_', '-' and '.', starts with no '-' and is not "
                         f"dots alone (it names the laboratory's folders, verl's loss modes and the reports' rows): "
                         f"{spec.name!r}")
    try:
        advantage_info(spec.advantage_estimator)
    except ValueError as error:
        raise ValueError(f"method '{spec.name}': advantage_estimator: {error}") from None
    check_loss_agg_mode(spec.loss_agg_mode)
    for kind, ref in spec.part_refs():
        get_part_class(kind, ref[0])
    previous = _METHODS.get(spec.name)
    _METHODS[spec.name] = spec
    registrant = sys._getframe(1).f_globals.get("__name__", "")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build_objective(spec.name)
    except (ValueError, TypeError) as error:
        if previous is None:
            del _METHODS[spec.name]
        else:
            _METHODS[spec.name] = previous
        raise ValueError(f"method '{spec.name}' cannot be built: {error}") from None
    if _REGISTERED_BY.get(spec.name) in (None, "__main__"):  # a module that registers it too can be imported elsewhere
        _REGISTERED_BY[spec.name] = registrant
    return spec


def method_modules(name: str) -> list[str]:
    """The modules, entrorl's own left out, that registered the parts method ``name`` names and the method itself, in
    the order to import them: what a new process (the laboratory's workers) imports to build it. ``__main__`` for one
    registered by a script or an interactive session (and by no module since)."""
    # the parts first: the module that registers the method needs them registered
    modules = [*(get_part_class(kind, ref[0]).__module__ for kind, ref in get_method(name).part_refs()),
               _REGISTERED_BY.get(name, "")]
    return [module for module in dict.fromkeys(modules)
            if module and module != "entrorl" and not module.startswith("entrorl.")]


def get_method(name: str) -> MethodSpec:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method '{name}'; {did_you_mean(name, _METHODS)}available methods: "
                         f"{sorted(_METHODS)}") from None


class PartSpec(BaseModel):
    """A part named in a config: ``{"name": "clip_b", "mu": 3.0}`` or just ``"clip_b"``."""

    model_config = ConfigDict(extra="allow")
    name: str

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ObjectiveConfig(BaseModel):
    """An objective as data (YAML-friendly). ``method`` names a base method, or several joined by ``+``
    (``"dapo+clip_b+forking_tokens"``): the first gives the surrogate and aggregation, the others add their
    shapers, regularisers, selectors and correction (their surrogates are ignored; a later method that brings nothing
    else, as in ``"dapo+dual_clip"``, is refused: write ``build_objective("dapo", clip_ratio_c=3.0)`` for both).
    Explicit parts are merged on top (a part already present gets its parameters updated), and ``params`` overrides
    any parameter by its unique name."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: str | list[str] | None = Field(
        None, description="a method's name, 'a+b+c' or the list [a, b, c]: the first gives the surrogate and the "
        "aggregation, the others add their parts; none: only the parts below (on PPO-clip)")
    surrogate: PartSpec | None = Field(
        None, description="the surrogate in place of the method's: a part's name, or {name: ..., <parameter>: ...}")
    shapers: list[PartSpec] = Field(default_factory=list, description="advantage shapers added (naming one the method "
                                    "already has sets that one's parameters instead of adding it twice)")
    regularizers: list[PartSpec] = Field(default_factory=list, description="loss terms added (entropy bonus, KL), "
                                         "as shapers are")
    selectors: list[PartSpec] = Field(default_factory=list, description="token selectors added (which tokens train), "
                                      "as shapers are")
    correction: PartSpec | None = Field(None, description="the off-policy correction (tis, icepop) in place of the "
                                        "method's")
    loss_agg_mode: str | None = Field(
        None, description="how token losses become the loss, by verl's names: token-mean, seq-mean-token-mean, "
        "seq-mean-token-sum, seq-mean-token-sum-norm (default: the method's)")
    loss_scale_factor: float | None = Field(
        None, gt=0, description="the divisor of seq-mean-token-sum-norm (Dr. GRPO's constant; entrorl train's "
        "default: rollout.max_new_tokens)")
    params: dict[str, Any] = Field(default_factory=dict, description="any parameter of the composed parts by its "
                                   "name, e.g. {mu: 3.0, clip_ratio_high: 0.28} (`entrorl methods METHOD` lists them)")

    @field_validator("loss_scale_factor", mode="before")
    @classmethod
    def _no_boolean_for_the_scale(cls, value: Any) -> Any:
        return refuse_booleans_for_numbers(value, float | None)

    @field_validator("loss_agg_mode")
    @classmethod
    def _check_mode(cls, value: str | None) -> str | None:
        if value is not None and value not in LOSS_AGG_MODES:
            raise ValueError(f"unknown loss_agg_mode '{value}'; choose one of {list(LOSS_AGG_MODES)}")
        return value

    @field_validator("shapers", "regularizers", "selectors")
    @classmethod
    def _each_part_once(cls, parts: list[PartSpec], info: ValidationInfo) -> list[PartSpec]:
        names = [part.name for part in parts]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated and info.context and info.context.get("settings_only"):
            # a checkpoint's settings, read back to compare them: the objective an earlier version built from them,
            # whose later entries of a part updated its first one's parameters
            merged: dict[str, dict[str, Any]] = {}
            for part in parts:
                merged[part.name] = {**merged.get(part.name, {}), **part.params}
            return [PartSpec.model_validate({"name": name, **params}) for name, params in merged.items()]
        if repeated:
            raise ValueError(
                f"{info.field_name} names {', '.join(repr(name) for name in repeated)} more than once; an objective "
                "applies each part once: give it once, with all its settings"
            )
        return parts

    @field_validator("method")
    @classmethod
    def _no_empty_names(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list):  # ["dapo+clip_b", "forking_tokens"] is dapo+clip_b+forking_tokens
            value = [part for name in value for part in str(name).split("+")]
        names = value.split("+") if isinstance(value, str) else value
        if names is not None and (not names or any(not str(name).strip() for name in names)):
            raise ValueError(f"method {value!r} has an empty name: write methods joined by '+', such as 'dapo+clip_b' "
                             "(or leave method out to build the objective from its parts alone)")
        stripped = [str(name).strip() for name in names or ()]
        repeated = sorted({name for name in stripped if stripped.count(name) > 1})
        if repeated:
            raise ValueError(f"method {value!r} names {', '.join(repr(name) for name in repeated)} more than once; "
                             "a composition applies each method once")
        return value

    def method_names(self) -> list[str]:
        if self.method is None:
            return []
        names = self.method.split("+") if isinstance(self.method, str) else list(self.method)
        return [name.strip() for name in names]

    def label(self) -> str:
        """A short name of the objective: its methods then the parts it adds, joined by '+' (``grpo+entropy_bonus``
        for ``{method: grpo, regularizers: [entropy_bonus]}``), or ``custom`` when it names none."""
        parts = [self.surrogate, self.correction, *self.shapers, *self.regularizers, *self.selectors]
        names = [*self.method_names(), *(part.name for part in parts if part is not None)]
        return "+".join(dict.fromkeys(names)) or "custom"


@dataclass
class _Composition:
    surrogate: PartRef | None = None
    shapers: list[PartRef] = field(default_factory=list)
    regularizers: list[PartRef] = field(default_factory=list)
    selectors: list[PartRef] = field(default_factory=list)
    correction: PartRef | None = None
    loss_agg_mode: str | None = None
    origins: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, part) -> the method that brought it

    def _merge(self, kind: str, ref: PartRef, source: str | None) -> None:
        """Add part ``ref`` to ``kind``, or merge its parameters into the same part already there. Two methods
        (``source`` set) that give one part different values cannot both be honoured: that is an error."""
        refs = getattr(self, kind)
        for i, (name, params) in enumerate(refs):
            if name == ref[0]:
                if source is not None:
                    self._refuse_conflicts(kind, name, params, ref[1], source)
                refs[i] = (name, {**params, **ref[1]})
                return
        refs.append((ref[0], dict(ref[1])))
        if source is not None:
            self.origins[(kind, ref[0])] = source

    def _refuse_conflicts(self, kind: str, name: str, current: dict[str, Any], new: dict[str, Any], source: str) -> None:
        clashes = {key: (current[key], value) for key, value in new.items() if key in current and current[key] != value}
        if clashes:
            earlier = self.origins.get((kind, name), "an earlier method")
            said = ", ".join(f"{key}={old!r} against {value!r}" for key, (old, value) in clashes.items())
            raise ValueError(
                f"methods {earlier!r} and {source!r} both use the {kind.rstrip('s')} '{name}' with different settings "
                f"({said}), so they cannot be composed: one would silently undo the other"
            )

    @staticmethod
    def _merge_single(current: PartRef | None, ref: PartRef, *, replace: bool) -> PartRef:
        if current is not None and current[0] == ref[0]:
            return (ref[0], {**current[1], **ref[1]})
        return (ref[0], dict(ref[1])) if current is None or replace else current

    def add(self, refs: dict[str, Any], *, source: str | None = None) -> None:
        """Add one method's parts (``source``: its name) or, with ``source=None``, the config's explicit parts,
        which override and replace what the methods brought."""
        explicit = source is None
        if refs.get("surrogate") is not None and (explicit or self.surrogate is None):
            self.surrogate = self._merge_single(self.surrogate, refs["surrogate"], replace=explicit)
        correction = refs.get("correction")
        if correction is not None:
            if not explicit and self.correction is not None:
                if self.correction[0] != correction[0]:
                    earlier = self.origins.get(("correction", self.correction[0]), "an earlier method")
                    raise ValueError(
                        f"methods {earlier!r} and {source!r} each bring a rollout correction ({self.correction[0]}, "
                        f"{correction[0]}); an objective applies one: compose only one of them, or name it in the "
                        "config's correction"
                    )
                self._refuse_conflicts("correction", correction[0], self.correction[1], correction[1], source)
            if not explicit and self.correction is None:
                self.origins[("correction", correction[0])] = source
            self.correction = self._merge_single(self.correction, correction, replace=explicit)
        for kind in ("shapers", "regularizers", "selectors"):
            for ref in refs.get(kind, ()):
                self._merge(kind, ref, source)
        if refs.get("loss_agg_mode") is not None and (explicit or self.loss_agg_mode is None):
            self.loss_agg_mode = refs["loss_agg_mode"]


def _spec_refs(spec: MethodSpec) -> dict[str, Any]:
    return {
        "surrogate": spec.surrogate,
        "shapers": spec.shapers,
        "regularizers": spec.regularizers,
        "selectors": spec.selectors,
        "correction": spec.correction,
        "loss_agg_mode": spec.loss_agg_mode,
    }


def _config_refs(config: ObjectiveConfig) -> dict[str, Any]:
    def ref(part: PartSpec | None) -> PartRef | None:
        return None if part is None else (part.name, part.params)

    return {
        "surrogate": ref(config.surrogate),
        "shapers": [ref(p) for p in config.shapers],
        "regularizers": [ref(p) for p in config.regularizers],
        "selectors": [ref(p) for p in config.selectors],
        "correction": ref(config.correction),
        "loss_agg_mode": config.loss_agg_mode,
    }


def _to_config(name_or_config: Any) -> ObjectiveConfig:
    if isinstance(name_or_config, ObjectiveConfig):
        return name_or_config
    if isinstance(name_or_config, (str, list, tuple)):
        try:
            return ObjectiveConfig(method=name_or_config if isinstance(name_or_config, str) else list(name_or_config))
        except ValidationError as error:
            raise ValueError("; ".join(validation_message(e) for e in error.errors())) from None
    if isinstance(name_or_config, dict):
        data = dict(name_or_config)
        if "name" in data and "method" not in data:
            data["method"] = data.pop("name")
        try:
            return ObjectiveConfig(**data)
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {validation_message(e)}" for e in error.errors())
            extra = [str(e["loc"][0]) for e in error.errors()  # 'name' beside 'method' is a second name, not a parameter
                     if e["type"] == "extra_forbidden" and len(e["loc"]) == 1 and e["loc"][0] != "name"]
            hint = (f" A method's parameters go under 'params': {{'method': {data.get('method')!r}, 'params': "
                    f"{{{', '.join(repr(key) + ': ...' for key in extra)}}}}}." if extra and "method" in data else "")
            raise ValueError(f"invalid objective config — {problems}. Valid keys: {list(ObjectiveConfig.model_fields)}"
                             f".{hint}") from None
    raise TypeError(f"build_objective takes a method name, a list of names, a dict or an ObjectiveConfig, got {type(name_or_config).__name__}")


_TOP_LEVEL_PARAMS = ("loss_agg_mode", "loss_scale_factor")


def _apply_overrides(comp: _Composition, overrides: dict[str, Any]) -> dict[str, Any]:
    """Route each ``name=value`` to the one part that has a parameter of that name; return top-level ones."""
    slots: list[tuple[str, str, int | None]] = [("surrogate", "surrogate", None)]
    slots += [(kind, kind.rstrip("s"), i) for kind in ("shapers", "regularizers", "selectors") for i in range(len(getattr(comp, kind)))]
    if comp.correction is not None:
        slots.append(("correction", "correction", None))
    top_level = {}
    for key, value in overrides.items():
        if key in _TOP_LEVEL_PARAMS:
            top_level[key] = value
            continue
        owners = []
        for attr, kind, index in slots:
            ref = getattr(comp, attr) if index is None else getattr(comp, attr)[index]
            if key in get_part_class(kind, ref[0]).model_fields:
                owners.append((attr, kind, index, ref))
        if not owners:
            valid = sorted(
                {p for attr, kind, index in slots for p in get_part_class(kind, (getattr(comp, attr) if index is None else getattr(comp, attr)[index])[0]).model_fields}
                | set(_TOP_LEVEL_PARAMS)
            )
            raise ValueError(f"unknown parameter '{key}' for this objective; {did_you_mean(key, valid)}valid parameters: "
                             f"{valid}")
        if len(owners) > 1:
            names = [f"{kind} '{ref[0]}'" for _, kind, _, ref in owners]
            attr, _, _, ref = owners[0]
            example = (f"{attr}: {{name: {ref[0]}, {key}: ...}}" if attr in ("surrogate", "correction")
                       else f"{attr}: [{{name: {ref[0]}, {key}: ...}}]")
            raise ValueError(
                f"parameter '{key}' is ambiguous: {' and '.join(names) if len(names) == 2 else ', '.join(names)} "
                f"{'both' if len(names) == 2 else 'all'} have it; set it inside that part in the config (e.g. {example})"
            )
        attr, _, index, ref = owners[0]
        updated = (ref[0], {**ref[1], key: value})
        if index is None:
            setattr(comp, attr, updated)
        else:
            getattr(comp, attr)[index] = updated
    return top_level


def _only_a_surrogate(refs: dict[str, Any]) -> bool:
    """Whether a method is a surrogate (and an aggregation) and nothing else: no shaper, regulariser, selector or
    correction for a composition to take from it."""
    return not any(refs[kind] for kind in ("shapers", "regularizers", "selectors")) and refs["correction"] is None


def _refuse_if_it_adds_nothing(name: str, refs: dict[str, Any], comp: _Composition, *, before: list[str]) -> None:
    """A later method keeps only its shapers, regularisers, selectors and correction; one that has none and whose
    surrogate or aggregation differ from the first method's (``"dapo+cispo"``, ``"grpo+dapo"``) would be dropped
    without a trace, so it is refused. One with the first method's own surrogate and aggregation changes nothing and
    is accepted (a method named twice is refused before this, by ``ObjectiveConfig``)."""
    if not _only_a_surrogate(refs):
        return
    surrogate = refs["surrogate"] or ("ppo_clip", {})
    same_surrogate = comp.surrogate is not None and comp.surrogate[0] == surrogate[0] and comp.surrogate[1] == surrogate[1]
    if same_surrogate and refs["loss_agg_mode"] in (None, comp.loss_agg_mode):
        return
    first, so_far = before[0], "+".join(before)
    settings = {**surrogate[1], **({"loss_agg_mode": refs["loss_agg_mode"]} if refs["loss_agg_mode"] else {})}
    described = ", ".join(f"{key}={value!r}" for key, value in settings.items())
    options = []
    estimator, first_estimator = get_method(name).advantage_estimator, get_method(first).advantage_estimator
    # what such a method brings may be its advantages (Dr. GRPO's, pass@k's); grpo is every method's default
    if estimator not in (first_estimator, "grpo"):
        options.append(f"for its advantages, train '{so_far}' with the '{estimator}' advantage estimator (a trainer's "
                       f"advantage.name)")
    if not _only_a_surrogate(_spec_refs(get_method(first))):  # a first method that is only a surrogate cannot follow
        options.append(f"put '{name}' first ('{'+'.join([name, *before])}')")
    if comp.surrogate is not None and comp.surrogate[0] == surrogate[0]:
        # advice only where those settings change the composition's own: the surrogate's that differ, or else the
        # aggregation (the first method's stays, so GRPO with dual-clip keeps GRPO's)
        own = make_part("surrogate", comp.surrogate[0], comp.surrogate[1]).params()
        changed = {key: value for key, value in surrogate[1].items() if own.get(key) != value}
        if not changed and refs["loss_agg_mode"] not in (None, comp.loss_agg_mode):
            changed = {"loss_agg_mode": refs["loss_agg_mode"]}
        if changed:
            advice = ", ".join(f"{key}={value!r}" for key, value in changed.items())
            aggregation = refs["loss_agg_mode"]
            kept = ""
            if "loss_agg_mode" not in changed and aggregation not in (None, comp.loss_agg_mode):
                kept = (f" (it keeps the aggregation of '{first}', {comp.loss_agg_mode!r}; add "
                        f"loss_agg_mode={aggregation!r} for that of '{name}')")
            in_yaml = ", ".join(f"{key}: {value}" for key, value in changed.items())
            options.append(f"give the composition the settings that differ: build_objective('{so_far}', {advice}){kept}"
                           f" (in a configuration: method: {{method: {so_far}, params: {{{in_yaml}}}}})")
    if not options:
        options.append(f"choose one of '{first}' and '{name}': both are a surrogate alone")
    raise ValueError(
        f"'{name}' adds nothing after '{so_far}': the first method of a composition gives the surrogate and the loss "
        f"aggregation, the later ones add their shapers, regularisers, selectors and correction, and '{name}' has none "
        f"(it is the surrogate '{surrogate[0]}'{f' with {described}' if described else ''}); " + ", or ".join(options)
    )


class SurrogateSetAsideWarning(UserWarning):
    """A composition's later method trains with the first method's surrogate instead of its own (``dapo+kl_cov``):
    its own category, so that a caller who has already told the user (the laboratory checks its methods before its
    workers build them again) can silence the repeat without silencing other warnings. ``method`` names the method
    whose surrogate is set aside."""

    def __init__(self, message: str, method: str | None = None):
        super().__init__(message)
        self.method = method


def _warn_surrogate_set_aside(name: str, own: PartRef, used: PartRef, *, first: str) -> None:
    """A later method whose recipe has its own surrogate (KL-Cov's unclipped one, Clip-Cov's clip range of 1) loses
    it to the first method's: allowed (the first method gives the surrogate), but said, since the method then does
    not run as its paper does."""
    if own[0] == used[0]:
        defaults = make_part("surrogate", used[0], used[1]).params()
        differ = {key: value for key, value in own[1].items() if defaults.get(key) != value}
        theirs = ", ".join(f"{key}={value!r}" for key, value in differ.items())
        ours = ", ".join(f"{key}={defaults.get(key)!r}" for key in differ)
        told = (f"'{name}' after '{first}' trains with {first}'s {ours}, not its own {theirs}: the first method of a "
                f"composition gives the surrogate; pass {theirs} to train with {name}'s")
    else:
        defaults = make_part("surrogate", own[0], {}).params()
        differ = {key: value for key, value in own[1].items() if defaults.get(key) != value}
        named = repr({"name": own[0], **differ}) if differ else repr(own[0])  # with the recipe's own parameters
        told = (f"'{name}' after '{first}' trains with {first}'s surrogate '{used[0]}', not its own '{own[0]}': the "
                f"first method of a composition gives the surrogate; name the surrogate in the config "
                f"({{'method': ..., 'surrogate': {named}}}) to train with {name}'s")
    warnings.warn(SurrogateSetAsideWarning(told + " (setting the surrogate's parameters silences this)", method=name),
                  stacklevel=3)


def _refuse_selectors_that_keep_nothing(selectors: list[Part]) -> None:
    """Refuse selectors whose drops together cover (next to) every token the policy loss could train on. Read from
    the built parts: their values as validated ("0.5" is 0.5)."""
    by_name = {part.name: part for part in selectors}
    _refuse_disjoint_entropy_bands(by_name)
    _refuse_disjoint_advantage_signs(by_name)


def _refuse_disjoint_entropy_bands(by_name: dict[str, Part]) -> None:
    """``forking_tokens`` keeps the top ``rho_f`` of the entropies and ``low_entropy_tokens`` the bottom ``1 - rho_l``;
    with ``rho_f <= rho_l`` the two keep disjoint tokens (but for ties at the threshold, which both keep) and the
    objective would train on next to none."""
    if "forking_tokens" not in by_name or "low_entropy_tokens" not in by_name:
        return
    high = by_name["forking_tokens"].top_entropy_quantile
    low = by_name["low_entropy_tokens"].top_entropy_quantile
    if high <= low:
        raise ValueError(
            f"forking_tokens keeps the top {high:g} of the token entropies and low_entropy_tokens drops the top {low:g}: "
            "together they keep no token (but those tied exactly at the threshold), so next to nothing would be "
            "trained; use one of them (or give forking_tokens the larger top_entropy_quantile to keep the band between)"
        )


def _refuse_disjoint_advantage_signs(by_name: dict[str, Part]) -> None:
    """``rejection_sampling`` keeps the tokens with ``A > 0`` and ``advantage_sign`` with ``keep="negative"`` those
    with ``A <= 0``: together they keep no token whatever the advantages, and the policy loss is 0 at every step."""
    sign = by_name.get("advantage_sign")
    if "rejection_sampling" in by_name and sign is not None and sign.keep == "negative":
        raise ValueError(
            "rejection_sampling keeps the samples with A > 0 (rft) and advantage_sign with keep='negative' (nsr) drops "
            "them: together they keep no token whatever the advantages, so the policy loss would be 0 at every step; "
            "use one of them"
        )


def build_objective(name_or_config: Any = "grpo", **overrides: Any) -> Objective:
    """Build a policy objective from a method name, ``"a+b+c"``, a list of names, a dict or an ObjectiveConfig.

    Keyword overrides set any parameter of the composed parts by name (``mu=3.0``, ``clip_ratio_high=0.28``),
    or ``loss_agg_mode`` / ``loss_scale_factor``. Unknown names and bad values raise ``ValueError`` listing
    the valid ones.

    >>> objective = build_objective("dapo+clip_b+forking_tokens", mu=2.0)
    >>> out = objective(batch)            # doctest: +SKIP
    >>> out.loss.backward()               # doctest: +SKIP
    """
    config = _to_config(name_or_config)
    comp = _Composition()
    names = config.method_names()
    set_aside: list[tuple[str, PartRef]] = []  # later methods' recipe surrogates, which the first method's replaces
    for position, name in enumerate(names):
        refs = _spec_refs(get_method(name))
        if position > 0:
            _refuse_if_it_adds_nothing(name, refs, comp, before=names[:position])
            if get_method(name).surrogate_is_the_method and refs["surrogate"] != comp.surrogate:
                set_aside.append((name, refs["surrogate"]))
        comp.add(refs, source=name)
    comp.add(_config_refs(config))
    if comp.surrogate is None:
        comp.surrogate = ("ppo_clip", {})
    surrogate_params = get_part_class("surrogate", comp.surrogate[0]).model_fields
    if config.surrogate is None and not any(key in surrogate_params for key in {**config.params, **overrides}):
        for name, own in set_aside:
            _warn_surrogate_set_aside(name, own, comp.surrogate, first=names[0])
    top_level = _apply_overrides(comp, {**config.params, **overrides})

    surrogate_cls = get_part_class("surrogate", comp.surrogate[0])
    default_mode = getattr(surrogate_cls, "recommended_loss_agg_mode", "token-mean")
    given_mode = top_level.get("loss_agg_mode")  # a wrong one ("", 0) is refused, not taken for "the default"
    loss_agg_mode = given_mode if given_mode is not None else comp.loss_agg_mode or default_mode
    loss_scale_factor = top_level.get("loss_scale_factor", config.loss_scale_factor)
    loss_scale_factor = check_loss_scale_factor(loss_scale_factor)

    def build(kind: str, ref: PartRef) -> Part:
        return make_part(kind, ref[0], ref[1])

    surrogate = build("surrogate", comp.surrogate)
    shapers = [build("shaper", ref) for ref in comp.shapers]
    regularizers = [build("regularizer", ref) for ref in comp.regularizers]
    selectors = [build("selector", ref) for ref in comp.selectors]
    _refuse_selectors_that_keep_nothing(selectors)
    if loss_scale_factor is not None and loss_agg_mode != "seq-mean-token-sum-norm":
        warnings.warn(f"loss_scale_factor = {loss_scale_factor:g} has no effect: the loss aggregation is {loss_agg_mode!r}, "
                      "and only 'seq-mean-token-sum-norm' divides by it", UserWarning, stacklevel=2)
    return Objective(
        surrogate=surrogate,
        shapers=shapers,
        regularizers=regularizers,
        selectors=selectors,
        correction=build("correction", comp.correction) if comp.correction is not None else None,
        loss_agg_mode=check_loss_agg_mode(loss_agg_mode),
        loss_scale_factor=loss_scale_factor,
        name="+".join(names) if names else "custom",
        label=config.label(),
    )


def available_methods() -> list[MethodInfo]:
    """Every named method with its description, paper, parameters (with defaults) and aggregation."""
    infos = []
    for name in sorted(_METHODS):
        spec = _METHODS[name]
        objective = build_objective(name)
        params: dict[str, Any] = {}
        parts = {}
        for part in objective.parts:
            parts[f"{part.kind}/{part.name}"] = part.params()
            params.update(part.params())
        infos.append(
            MethodInfo(
                name=name,
                description=spec.description,
                paper=spec.paper,
                params=params,
                loss_agg_mode=objective.loss_agg_mode,
                advantage_estimator=spec.advantage_estimator,
                parts=parts,
                notes=spec.notes,
            )
        )
    return infos


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def methods_markdown_table() -> str:
    """The README's method table, generated from the registry (a test keeps the README equal to it)."""
    lines = [
        "| method | what it does | parts | parameters (defaults) | aggregation | advantages | paper |",
        "|---|---|---|---|---|---|---|",
    ]
    for info in available_methods():
        part_names = " + ".join(f"`{key.split('/', 1)[1]}`" for key in info.parts)
        params_text = ", ".join(f"`{k}={_format_value(v)}`" for k, v in info.params.items() if v is not None)
        lines.append(
            f"| `{info.name}` | {info.description} | {part_names} | {params_text} | `{info.loss_agg_mode}` "
            f"| `{info.advantage_estimator}` | {info.paper} |"
        )
    return "\n".join(lines) + "\n"
