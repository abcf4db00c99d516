"""Reward functions: the protocol, a registry of named rewards, and the batch runner.

A reward function is a plain callable::

    def my_reward(prompt: str, completion: str, answer: str | None, **meta) -> float: ...

``answer`` is the reference answer of the prompt (``None`` when the data has none) and ``meta`` is the
per-record metadata dict (for example ``{"entry": ..., "task": ...}`` for reasoning-gym records). It
returns a float (``bool``, ``int`` and numpy / 0-d torch scalars are accepted too), or an object with a
numeric ``.score`` and an optional ``.reason`` string saying why it scored what it did (the ``math``
reward's :class:`~entrorl.rewards.math.MathVerdict` is a float that carries ``.reason``).

Rewards are looked up by *spec* with :func:`get_reward`:

* a registered name (``"math"``, ``"exact_match"``, ``"reasoning_gym"`` or one added with
  :func:`register_reward`); keyword arguments configure a registered *factory*
  (``get_reward("math", tolerance=1e-6)``);
* an import path ``"package.module:function"`` (or ``"package.module:Class"``): the object is
  imported; with keyword arguments (or when it is a class, or a factory registered with
  ``register_reward(..., factory=True)``) it is called with them and must return the reward
  callable, otherwise it *is* the reward callable.

:class:`RewardRunner` scores a batch: it calls the reward on every sample, never lets an exception
escape (a failing sample gets reward 0 and is counted), adds the DAPO overlong penalty when
configured and returns a :class:`RewardResult` of tensors plus flat metrics and the per-sample reasons.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math
import numbers
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from entrorl._checks import visible_controls
from entrorl.evaluation import DEFAULT_THRESHOLD
from entrorl.rewards.shaping import overlong_penalty, validate_overlong

__all__ = [
    "RewardFn",
    "error_headline",
    "RewardResult",
    "RewardRunner",
    "available_rewards",
    "check_reward_spec",
    "get_reward",
    "register_reward",
]

logger = logging.getLogger(__name__)

_FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # rewards are kept in float32


@runtime_checkable
class RewardFn(Protocol):
    """``f(prompt, completion, answer, **meta) -> float`` (or an object with ``.score`` and ``.reason``)."""

    def __call__(self, prompt: str, completion: str, answer: str | None, /, **meta: Any) -> float: ...


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    name: str
    description: str
    obj: Callable[..., Any]
    factory: bool
    validate: Callable[..., None] | None


_REGISTRY: dict[str, _Entry] = {}

# Marker set on registered callables so an import-path spec pointing at one knows its kind.
_KIND_ATTR = "__entrorl_reward_kind__"


def register_reward(
    name: str,
    *,
    description: str,
    factory: bool = False,
    validate: Callable[..., None] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a reward function (or, with ``factory=True``, a reward factory).

    A factory is called with the keyword arguments given to :func:`get_reward` and returns the
    reward callable (a class whose instances are callable is a factory too). ``validate``, if
    given, is called with the same keyword arguments by :func:`check_reward_spec` and must raise
    ``ValueError`` for bad ones without doing anything expensive.

    Raises ``ValueError`` if ``name`` is already registered or is not a valid name (non-empty, no
    ``":"``, which marks import paths).
    """
    if not isinstance(name, str) or not name.strip() or ":" in name or name != name.strip():
        raise ValueError(f"invalid reward name {name!r}: a non-empty string without ':' or surrounding spaces")
    if not isinstance(description, str):
        raise TypeError("description must be a string")

    def decorator(obj: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(obj):
            raise TypeError(f"register_reward({name!r}) decorates a callable, got {type(obj).__name__}")
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = _Entry(name, description, obj, bool(factory), validate)
        try:
            setattr(obj, _KIND_ATTR, "factory" if factory else "function")
        except (AttributeError, TypeError):  # builtins, slotted objects: the registry still knows
            pass
        return obj

    return decorator


def reference_answers(answer: Any) -> list[Any]:
    """The reference answers ``answer`` gives: the items of a list, tuple or one-dimensional array (a Parquet or pandas
    column of several accepted answers arrives as a numpy array), else ``answer`` alone; missing ones (None, NaN,
    pandas' NA: how a data frame spells a missing answer) left out."""
    if isinstance(answer, np.ndarray):  # its items as numpy scalars: a float32 0.1 reads "0.1", as it does alone
        answers = list(answer) if answer.ndim == 1 else [answer[()] if answer.ndim == 0 else answer]
    else:
        answers = list(answer) if isinstance(answer, (list, tuple)) else [answer]
    return [item for item in answers if not _missing(item)]


def _missing(value: Any) -> bool:
    return (value is None or type(value).__name__ == "NAType"
            or (isinstance(value, (float, np.floating)) and math.isnan(value)))


def available_rewards() -> list[tuple[str, str]]:
    """``(name, description)`` of every registered reward, sorted by name."""
    return [(e.name, e.description) for e in sorted(_REGISTRY.values(), key=lambda e: e.name)]


def _unknown_name_error(spec: str) -> ValueError:
    names = ", ".join(sorted(_REGISTRY)) or "(none)"
    return ValueError(
        f"unknown reward {spec!r}; registered rewards: {names}; "
        "or give an import path 'package.module:function'"
    )


class _NotFoundAnywhere(ModuleNotFoundError):
    """A reward module found neither on ``sys.path`` nor in the working directory."""


def _import_module_or_from_working_directory(module_name: str) -> Any:
    """``importlib.import_module``, and, when the module's top-level package is nowhere on ``sys.path``, again with
    the working directory appended to it: ``my_rewards.py`` beside the config is found from the ``entrorl`` command
    as from ``python -m entrorl.cli`` (which puts the working directory first). Appended, so it shadows nothing."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top_level, working_directory = module_name.split(".")[0], os.getcwd()
        if exc.name != top_level or working_directory in sys.path or "" in sys.path:
            raise
        sys.path.append(working_directory)
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as again:
            if again.name == top_level:  # not there either: leave sys.path as it was
                sys.path.remove(working_directory)
                raise _NotFoundAnywhere(f"{again}; looked for on sys.path, then in the working directory "
                                        f"{working_directory}") from None
            raise


def import_named_module(module_name: str, what: str) -> Any:
    """The module ``module_name`` (looked for on ``sys.path``, then in the working directory); ``ValueError`` naming
    ``what`` asked for it and why it could not be imported."""
    try:
        return _import_module_or_from_working_directory(module_name)
    except Exception as exc:  # ImportError, or the module's own code failing
        kind = "ModuleNotFoundError" if isinstance(exc, _NotFoundAnywhere) else type(exc).__name__
        raise ValueError(f"{what}: cannot import module {module_name!r} ({kind}: {exc})") from exc


def import_named_modules(names: Any, what: str) -> list[str]:
    """Import each module of ``names``, a list of ``package.module`` names, in order; returns the names without the
    spaces around them. ``ValueError`` naming ``what`` (the setting or option) for anything but such a list, and for
    a module that cannot be imported."""
    if isinstance(names, str) or not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{what}: expected a list of module names, got {names!r}")
    for name in names:
        if not name.strip() or ":" in name:
            raise ValueError(f"{what}: {name!r} is not a module name (write 'package.module')")
        import_named_module(name.strip(), what)
    return [name.strip() for name in names]


def _found_elsewhere(top_level: str, directory: Path) -> bool:
    """Whether importing ``top_level`` finds a module or package other than the one in ``directory`` (the standard
    library's ``test`` before a folder ``test`` there)."""
    try:
        spec = importlib.util.find_spec(top_level)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    here = (directory / top_level).resolve()
    places = [spec.origin] if spec.origin not in (None, "namespace", "built-in", "frozen") else []
    places += list(spec.submodule_search_locations or [])
    return not any(Path(place).resolve() in (here, here.with_suffix(".py")) or here in Path(place).resolve().parents
                   for place in places)


def _import_path_of_file(file: Path, attribute: str) -> str:
    """The spec that imports ``attribute`` of the Python file ``file``: its dotted path from the working directory when
    the file is under it (a package's ``__init__.py`` by the package's) and that path imports it, else its name with
    its folder on PYTHONPATH (a folder name that is no identifier, or that another module answers to)."""
    path = Path(os.path.abspath(file))
    parts = list(path.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    working_directory = Path(os.getcwd())
    try:
        dotted = list(Path(*parts).relative_to(working_directory).parts)
    except ValueError:  # outside the working directory
        dotted = []
    if dotted and all(part.isidentifier() for part in dotted) and not _found_elsewhere(dotted[0], working_directory):
        return f"'{'.'.join(dotted)}:{attribute}' (from the working directory)"
    return f"'{parts[-1]}:{attribute}' with {Path(*parts).parent} on PYTHONPATH"


def import_callable(spec: str, what: str = "reward") -> Any:
    """The callable named by an import path ``'package.module:attribute'`` (dotted attributes allowed);
    ValueError naming ``what`` (reward, judge, embedder) and what went wrong."""
    module_name, _, attr_path = spec.rpartition(":")  # the last colon: a Windows file path has one after its drive
    module_name, attr_path = module_name.strip(), attr_path.strip()
    if not module_name or not attr_path:
        raise ValueError(f"{what} spec {spec!r}: an import path must look like 'package.module:function'")
    try:
        obj: Any = import_named_module(module_name, f"{what} spec {spec!r}")
    except ValueError:
        if not (module_name.endswith(".py") or "/" in module_name or "\\" in module_name):
            raise
        raise ValueError(f"{what} spec {spec!r}: name the module by its import path, not by its file: "
                         + _import_path_of_file(Path(module_name), attr_path)) from None
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ValueError(f"{what} spec {spec!r}: module {module_name!r} has no attribute {attr_path!r}") from exc
    if not callable(obj):
        raise ValueError(f"{what} spec {spec!r}: {attr_path!r} is not callable (it is a {type(obj).__name__})")
    return obj


def _registered_kind(obj: Any) -> str | None:
    """The kind :func:`register_reward` marked ``obj`` itself with, never the one an instance inherits from its
    registered class (``loose = MathReward(tolerance=1e-3)`` is a reward, not a factory; an instance registered as a
    factory keeps its own mark)."""
    if inspect.isclass(obj) or inspect.isroutine(obj):
        return getattr(obj, _KIND_ATTR, None)
    return getattr(obj, "__dict__", {}).get(_KIND_ATTR)


def _is_factory(obj: Any, kwargs: Mapping[str, Any]) -> bool:
    kind = _registered_kind(obj)
    if kind is not None:
        return kind == "factory"
    return inspect.isclass(obj) or bool(kwargs)


def _plain_function_error(spec: str, kwargs: Mapping[str, Any]) -> ValueError:
    return ValueError(
        f"reward {spec!r} is a plain reward function, called as fn(prompt, completion, answer, **meta), which takes "
        f"no options, so {', '.join(map(repr, sorted(kwargs)))} cannot be given; options configure a reward factory "
        "(a class, a function registered with register_reward(..., factory=True), or a function that takes the "
        "options and returns the reward function)"
    )


def _is_unmarked_reward_function(obj: Any, signature: inspect.Signature) -> bool:
    """Whether ``obj`` is a function (neither a class nor registered as a factory) shaped like a reward: its first three
    parameters are positional and required, as ``prompt, completion, answer`` are. Given options, it was taken for a
    factory only because of them (a factory's options have defaults, or are not three required positionals)."""
    if inspect.isclass(obj) or _registered_kind(obj) is not None:
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    first = list(signature.parameters.values())[:3]
    return len(first) == 3 and all(p.kind in positional and p.default is inspect.Parameter.empty for p in first)


def _check_options(spec: str, obj: Callable[..., Any], kwargs: Mapping[str, Any]) -> None:
    """Raise ValueError if ``kwargs`` cannot be passed to factory ``obj`` (saying so plainly when ``obj`` is in fact a
    reward function, which takes no options)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # no introspectable signature: let the call decide
        return
    try:
        sig.bind(**kwargs)
    except TypeError as exc:
        if _is_unmarked_reward_function(obj, sig):
            raise _plain_function_error(spec, kwargs) from None
        accepted = [
            p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ] + list(getattr(obj, "extra_options", ()))  # a factory's options taken through **kwargs
        raise ValueError(f"invalid options for reward {spec!r}: {exc}; accepted options: {accepted}") from exc


def _resolve(spec: Any, kwargs: Mapping[str, Any]) -> tuple[Callable[..., Any], bool, Callable[..., None] | None]:
    """(object, is_factory, validate) for a spec; raises ValueError for unknown / bad specs."""
    if callable(spec) and not isinstance(spec, str):  # as its import path would be: a class or a factory is built
        return spec, _is_factory(spec, kwargs), None
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a reward spec is a registered name or 'package.module:function', got {spec!r}")
    spec = spec.strip()
    if ":" in spec:
        obj = import_callable(spec)
        return obj, _is_factory(obj, kwargs), None
    entry = _REGISTRY.get(spec)
    if entry is None:
        raise _unknown_name_error(spec)
    return entry.obj, entry.factory, entry.validate


def get_reward(spec: str | RewardFn, **kwargs: Any) -> RewardFn:
    """The reward callable for ``spec`` (a registered name or ``"package.module:function"``).

    ``kwargs`` configure a factory (``get_reward("reasoning_gym", task="basic_arithmetic")``).
    Raises ``ValueError`` for an unknown name (listing the registered ones), an import path that
    cannot be imported or is not callable, options a plain reward function does not take, or
    options the factory does not accept.
    """
    obj, is_factory, _ = _resolve(spec, kwargs)
    if not is_factory:
        if kwargs:
            raise _plain_function_error(str(spec), kwargs)
        return obj
    _check_options(str(spec), obj, kwargs)
    fn = obj(**kwargs)
    if not callable(fn):
        raise ValueError(f"reward factory {spec!r} returned a non-callable {type(fn).__name__}")
    return fn


def check_reward_spec(spec: str, **kwargs: Any) -> None:
    """Validate a reward spec (and factory options) without building anything heavy.

    Registered names: the name must exist, ``kwargs`` must fit the factory's signature, and the
    reward's own validator runs (for ``reasoning_gym`` this imports reasoning-gym to check the task
    name — about two seconds). Import paths: the module is imported and the target must be callable
    (nothing is called). Raises ``ValueError`` on any problem.
    """
    obj, is_factory, validate = _resolve(spec, kwargs)
    if not is_factory:
        if kwargs:
            raise _plain_function_error(str(spec), kwargs)
        return
    _check_options(str(spec), obj, kwargs)
    if validate is not None:
        validate(**kwargs)


# --------------------------------------------------------------------------------------------
# runner
# --------------------------------------------------------------------------------------------


def error_headline(first_error: str | None) -> str:
    """The first line of a reward's ``first_error`` (which sample failed, and how); its traceback follows that line.
    Empty for no error."""
    return (first_error or "").partition("\n")[0]


@dataclass
class RewardResult:
    """Rewards of one batch.

    * ``scores`` — float32 ``[n]``, what the reward function returned (0 where it failed);
    * ``rewards`` — float32 ``[n]``, ``scores + penalties`` (the training reward; a failed sample's overlong
      penalty still applies, since it depends on the response's length only: a reward that fails on overlong
      answers must not let them escape their penalty);
    * ``correct`` — bool ``[n]``, ``exact_scores >= correct_threshold`` on the samples that did not fail;
    * ``errors`` / ``first_error`` — how many samples failed (raised, or returned a non-numeric or
      non-finite value) and the first failure: a one-line summary (which sample, the exception's type and
      message, or what was wrong with the value returned), then, for a reward that raised, its traceback;
    * ``penalties`` — float32 ``[n]``, the overlong penalty (zeros when not configured);
    * ``failed`` — bool ``[n]``, which samples failed;
    * ``score_failed`` — bool ``[n]``, which samples' own (main) reward failed, so that their score says nothing
      (``failed`` less an extra reward's failures; ``failed`` when not given);
    * ``reasons`` — per sample, the reason the reward gave (``.reason`` of its return value; None for a
      plain number) or, for a failed sample, what went wrong;
    * ``extras`` — the scores of each extra reward added by :meth:`with_extra`, by name;
    * ``exact_scores`` — float64 ``[n]``, the scores before float32 rounds them, which thresholds are compared with
      (rounded, 0.49999999 would reach 0.5 and a partial credit of 1 - 1e-8 full marks); ``scores`` when not given;
    * ``statuses`` / ``status_names`` — per sample, the ``.status`` the main reward gave (the ``code`` reward's
      ``passed``, ``timeout``, ...; None for a plain number or a failure), and every status the reward declares
      (its ``statuses`` attribute), whose shares :meth:`metrics` reports.
    """

    scores: torch.Tensor
    rewards: torch.Tensor
    correct: torch.Tensor
    errors: int = 0
    first_error: str | None = None
    penalties: torch.Tensor | None = None
    failed: torch.Tensor | None = None
    reasons: list[str | None] | None = None
    extras: dict[str, torch.Tensor] | None = None
    score_failed: torch.Tensor | None = None
    exact_scores: torch.Tensor | None = None
    statuses: list[str | None] | None = None
    status_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n = self.scores.shape[0]
        if self.exact_scores is None:
            self.exact_scores = self.scores.double()
        if self.penalties is None:
            self.penalties = torch.zeros(n, dtype=torch.float32)
        if self.failed is None:
            self.failed = torch.zeros(n, dtype=torch.bool)
        if self.score_failed is None:
            self.score_failed = self.failed
        if self.extras is None:
            self.extras = {}
        if self.reasons is None:
            self.reasons = [None] * n
        elif len(self.reasons) != n:
            raise ValueError(f"RewardResult: {len(self.reasons)} reasons for {n} scores")
        if self.statuses is None:
            self.statuses = [None] * n
        elif len(self.statuses) != n:
            raise ValueError(f"RewardResult: {len(self.statuses)} statuses for {n} scores")

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def correct_at(self, threshold: float) -> torch.Tensor:
        """Which samples' score reaches ``threshold`` (an estimator's own ``correct_threshold``); one whose reward
        failed never does, whatever the threshold (its 0 is no score), as in ``correct``."""
        assert self.score_failed is not None and self.exact_scores is not None
        return (self.exact_scores >= threshold) & ~self.score_failed

    def with_extra(self, name: str, weight: float, extra: "RewardResult") -> "RewardResult":
        """These samples with ``weight`` times ``extra``'s scores added to their training reward (a format or length
        reward next to the correctness one); ``scores`` and ``correct`` stay this result's, failures add up."""
        assert self.failed is not None and extra.failed is not None and self.reasons is not None
        extra_scores, extra_failed, extra_reasons = extra.scores, extra.failed, list(extra.reasons or [""] * len(extra.failed))
        extra_first_error = extra.first_error
        rewards = self.rewards.double() + weight * extra_scores.double()  # in float64: a weight of 1e39 is inf in float32
        overflow = rewards.abs() > _FLOAT32_MAX
        if overflow.any():  # the weighted sum would be inf in float32: a failure of the extra reward, scored 0
            extra_scores, extra_failed = torch.where(overflow, torch.zeros_like(extra_scores), extra_scores), extra_failed | overflow
            said = f"{weight:g} x its score is beyond float32's range"
            extra_reasons = [said if over else reason for reason, over in zip(extra_reasons, overflow.tolist())]
            rewards = torch.where(overflow, self.rewards.double(), rewards)
            extra_first_error = extra_first_error or f"for sample {int(overflow.nonzero()[0])}: {said}"
        failed = self.failed | extra_failed
        reasons = [own if own_failed or not failed_extra else f"extra reward {name!r}: {extra_reason}"  # which failed
                   for own, own_failed, failed_extra, extra_reason
                   in zip(self.reasons, self.failed.tolist(), extra_failed.tolist(), extra_reasons)]
        return RewardResult(
            scores=self.scores, rewards=rewards.to(self.rewards.dtype), correct=self.correct,
            errors=int(failed.sum()),
            first_error=self.first_error or (f"extra reward {name!r}: {extra_first_error}" if extra_first_error else None),
            penalties=self.penalties, failed=failed, reasons=reasons,
            extras={**(self.extras or {}), name: extra_scores}, score_failed=self.score_failed,
            exact_scores=self.exact_scores, statuses=self.statuses, status_names=self.status_names,
        )

    def select(self, rows: torch.Tensor | Sequence[int]) -> "RewardResult":
        """The samples ``rows`` only (row numbers, or a boolean mask over the samples): ``errors`` counts their
        failures; ``first_error`` stays the whole batch's first failure when one of them failed (None otherwise)."""
        rows = torch.as_tensor(rows)
        if rows.dtype == torch.bool:  # a mask: as long as the batch, its true rows (as_tensor(long) read it as 0s and 1s)
            if rows.shape != self.scores.shape:
                raise ValueError(f"select: a mask of shape {tuple(rows.shape)} for {self.scores.numel()} samples")
            rows = rows.nonzero().flatten()
        rows = rows.to(torch.long)
        assert self.penalties is not None and self.failed is not None and self.reasons is not None
        assert self.score_failed is not None and self.exact_scores is not None and self.statuses is not None
        failed = self.failed[rows]
        return RewardResult(
            scores=self.scores[rows], rewards=self.rewards[rows], correct=self.correct[rows], errors=int(failed.sum()),
            first_error=self.first_error if bool(failed.any()) else None, penalties=self.penalties[rows], failed=failed,
            reasons=[self.reasons[i] for i in rows.tolist()], extras={name: v[rows] for name, v in (self.extras or {}).items()},
            score_failed=self.score_failed[rows], exact_scores=self.exact_scores[rows],
            statuses=[self.statuses[i] for i in rows.tolist()],
            status_names=self.status_names,
        )

    @staticmethod
    def concat(parts: Sequence["RewardResult"]) -> "RewardResult":
        """The samples of ``parts`` one after the other; ``first_error`` is the first part's that has one."""
        return RewardResult(
            scores=torch.cat([p.scores for p in parts]),
            rewards=torch.cat([p.rewards for p in parts]),
            correct=torch.cat([p.correct for p in parts]),
            errors=sum(p.errors for p in parts),
            first_error=next((p.first_error for p in parts if p.first_error is not None), None),
            penalties=torch.cat([p.penalties for p in parts]),
            failed=torch.cat([p.failed for p in parts]),
            reasons=[reason for p in parts for reason in p.reasons],
            extras={name: torch.cat([p.extras[name] for p in parts]) for name in (parts[0].extras or {})},
            score_failed=torch.cat([p.score_failed for p in parts]),
            exact_scores=torch.cat([p.exact_scores for p in parts]),
            statuses=[status for p in parts for status in p.statuses],
            status_names=parts[0].status_names,
        )

    def metrics(self) -> dict[str, float]:
        """Flat scalar metrics: ``reward/mean``, ``reward/score_mean``, ``reward/accuracy``,
        ``reward/errors``, ``reward/overlong_penalty_mean``, ``reward/extra/<name>_mean`` per extra reward and
        ``reward/status/<name>``, the share of samples with each status the reward declares (means are 0.0 for an
        empty batch)."""

        def mean(t: torch.Tensor) -> float:
            return float(t.double().mean()) if t.numel() else 0.0  # a float32 sum of large rewards could overflow

        assert self.penalties is not None
        return {
            "reward/mean": mean(self.rewards),
            "reward/score_mean": mean(self.scores),
            "reward/accuracy": mean(self.correct),
            "reward/errors": float(self.errors),
            "reward/overlong_penalty_mean": mean(self.penalties),
            **{f"reward/extra/{name}_mean": mean(scores) for name, scores in (self.extras or {}).items()},
            **{f"reward/status/{name}": (self.statuses.count(name) / len(self.statuses) if self.statuses else 0.0)
               for name in self.status_names},
        }


# Exceptions a reward call lets through: the user or the interpreter asked to stop.
_PASS_THROUGH = (KeyboardInterrupt, SystemExit, GeneratorExit)


def _score_and_reason(value: Any) -> tuple[Any, str | None]:
    """The score part of a reward's return value and its reason: a number has no reason; an object
    with ``.score`` gives that and its ``.reason`` (when it is a string)."""
    reason = getattr(value, "reason", None)
    reason = reason if isinstance(reason, str) else None
    if isinstance(value, numbers.Real):
        return value, reason
    if hasattr(value, "score"):
        return value.score, reason
    return value, None


def _as_float(value: Any) -> float:
    """``value`` as a float; TypeError for non-numeric values (strings and None included)."""
    if isinstance(value, (bool, numbers.Real)):
        return float(value)
    item = getattr(value, "item", None)  # numpy scalars (np.bool_ too), 1-element arrays / tensors
    if callable(item):
        try:
            inner = item()
        except (ValueError, RuntimeError) as exc:
            raise TypeError(f"returned a non-scalar {type(value).__name__}") from exc
        if isinstance(inner, (bool, numbers.Real)):
            return float(inner)
    raise TypeError(f"returned a non-numeric value of type {type(value).__name__}: {value!r:.200}")


def _says_failed(value: Any) -> bool:
    """Whether a returned value carries a ``failed`` flag that is true: a Python or numpy boolean (not a method or
    any other object that happens to be named so)."""
    flag = getattr(value, "failed", False)
    return isinstance(flag, (bool, np.bool_)) and bool(flag)


class RewardRunner:
    """Score a batch with one reward function, robustly.

    ``fn`` is a reward callable (or a spec string, resolved with :func:`get_reward`). ``overlong``
    configures DAPO's soft overlong punishment: ``{"max_length": L_max, "cache_length": L_cache,
    "penalty_factor": 1.0}`` (see :func:`entrorl.rewards.overlong_penalty`); the penalty of each
    sample's response length is added to its score. A sample is ``correct`` when its score is
    ``>= correct_threshold``; by default the reward's own ``correct_threshold`` attribute when it has one
    (a verifier that gives wrong answers partial credit sets 1.0), else 0.5.

    A reward call that raises, or returns something that is not a finite number, gives that sample
    a score of 0; it is counted in ``errors`` and the first failure is kept in ``first_error`` (its first
    line, a summary, is logged as a warning once per runner unless ``warn`` is false, for a caller that reports the
    whole run's count itself; the traceback is not); its reason says so.
    A reward may return an object with ``.score`` and ``.reason`` instead of a number: the reason is
    kept in ``RewardResult.reasons``; with ``.failed`` true as well (a judge's timeout or error) the sample
    counts as failed, like one that raised (and its ``.details``, a judge's traceback, follow the first failure's
    line in ``first_error``). Nothing raised by
    the reward function propagates, ``BaseException`` subclasses included, except
    ``KeyboardInterrupt``, ``SystemExit`` and ``GeneratorExit``. A reward with a
    ``score_batch(prompts, completions, answers, metas)`` method (a judge) gets the whole batch in one call;
    other rewards are called sample by sample, in ``fn.parallel_calls`` threads at once when the reward says it gains
    from them (the ``code`` reward: each call waits on a sandboxed process), else one after the other; when such a
    batch is interrupted, the samples not started are dropped and ``fn.stop_calls()``, when the reward has it, stops
    those running. Calls are not time-limited: a reward that may hang must bound itself. ``first_sample`` numbers the
    batch's samples in ``first_error`` from that index, for a caller that scores a longer list in parts, or
    ``sample_numbers`` gives each its own (the sample of its prompt, for a caller that writes samples so numbered), and
    ``sources`` (the data row of each sample, ``file:line``) names each failing sample's row there too.
    """

    def __init__(
        self,
        fn: RewardFn | str,
        *,
        overlong: Mapping[str, Any] | None = None,
        correct_threshold: float | None = None,
        name: str | None = None,
        warn: bool = True,
    ) -> None:
        if name is None:  # what the warnings call it: the spec it was made from, else the function's own name
            name = fn if isinstance(fn, str) else getattr(fn, "__name__", type(fn).__name__)
        if isinstance(fn, str):
            fn = get_reward(fn)
        if not callable(fn):
            raise TypeError(f"fn must be a reward callable, got {type(fn).__name__}")
        if correct_threshold is None:
            correct_threshold = getattr(fn, "correct_threshold", DEFAULT_THRESHOLD)
        if not isinstance(correct_threshold, numbers.Real) or not math.isfinite(correct_threshold):
            raise ValueError(f"correct_threshold must be a finite number, got {correct_threshold!r}")
        self.fn, self.name = fn, str(name)
        self.parallel_calls = getattr(fn, "parallel_calls", 1)
        if isinstance(self.parallel_calls, bool) or not isinstance(self.parallel_calls, int) or self.parallel_calls < 1:
            raise ValueError(f"the reward's parallel_calls must be a whole number >= 1, got {self.parallel_calls!r}")
        statuses = getattr(fn, "statuses", ())
        if not isinstance(statuses, (list, tuple)) or not all(isinstance(status, str) and status for status in statuses):
            raise ValueError(f"the reward's statuses must be a list or tuple of names, got {statuses!r}")
        self.status_names = tuple(statuses)
        self.overlong = validate_overlong(overlong) if overlong is not None else None
        self.correct_threshold = float(correct_threshold)
        self._warned = not warn

    def __repr__(self) -> str:
        return (
            f"RewardRunner(fn={getattr(self.fn, '__name__', self.fn)!r}, overlong={self.overlong}, "
            f"correct_threshold={self.correct_threshold})"
        )

    def check_arguments(self, metas: Sequence[Mapping[str, Any] | None]) -> None:
        """Raise ``ValueError`` now, before any sampling, when the reward function cannot be called as
        ``fn(prompt, completion, answer, **meta)`` with these samples' meta keys: every sample would fail and
        score 0. Typical causes: no ``**meta`` parameter while the data has extra columns, or a meta column
        named like one of the first three parameters. Rewards with ``score_batch`` and callables without an
        inspectable signature are not checked."""
        if callable(getattr(self.fn, "score_batch", None)):
            return
        try:
            signature = inspect.signature(self.fn)
        except (TypeError, ValueError):
            return
        for keys in dict.fromkeys(tuple(sorted(meta or {})) for meta in metas):
            try:
                signature.bind("prompt", "completion", "answer", **dict.fromkeys(keys))
            except TypeError as exc:
                name = getattr(self.fn, "__name__", type(self.fn).__name__)
                raise ValueError(
                    f"the reward {name!r} cannot be called as fn(prompt, completion, answer, **meta) with the data's "
                    f"meta columns {list(keys)}: {exc}. Give it a **meta parameter (and put '/' after its first three "
                    "parameters if a column shares their names), or choose the columns it gets (data.meta_columns in a "
                    "training configuration; for eval and data audit, a data file without the others)."
                ) from None

    def _score_batch(self, prompts, completions, answers, metas) -> list[Any] | None:
        """All values from the reward's ``score_batch(prompts, completions, answers, metas)`` in one call, when
        it has one (a judge batches its model calls that way); None to score sample by sample instead, also
        when the batch call raises or returns the wrong number of values (each sample's failure is then its own)."""
        score_batch = getattr(self.fn, "score_batch", None)
        if not callable(score_batch):
            return None
        try:
            values = list(score_batch(list(prompts), list(completions), list(answers), list(metas)))
        except _PASS_THROUGH:
            raise
        except BaseException:  # noqa: BLE001 - retried sample by sample, where the failure is recorded
            return None
        return values if len(values) == len(completions) else None

    def _call_each(self, prompts, completions, answers, metas) -> list[tuple[Any, tuple[BaseException, str] | None]]:
        """Per sample, ``(value, None)`` or ``(None, (exception, traceback))``; in ``parallel_calls`` threads."""

        def call(i: int) -> tuple[Any, tuple[BaseException, str] | None]:
            try:
                return self.fn(prompts[i], completions[i], answers[i], **(metas[i] or {})), None
            except _PASS_THROUGH:
                raise
            except BaseException as exc:  # noqa: BLE001 - a reward must never kill the run (Math-Verify's
                # TimeoutException, for one, derives from BaseException)
                return None, (exc, traceback.format_exc())

        workers = min(self.parallel_calls, len(completions))
        if workers <= 1:
            return [call(i) for i in range(len(completions))]
        pool = ThreadPoolExecutor(workers, thread_name_prefix="entrorl-reward")
        try:
            outcomes = list(pool.map(call, range(len(completions))))
        except BaseException:
            # Ctrl-C (or a reward's SystemExit): the samples not started are dropped and those running are asked to
            # stop (the code reward kills its programs), instead of running to their ends first
            pool.shutdown(wait=False, cancel_futures=True)
            stop_calls = getattr(self.fn, "stop_calls", None)
            if callable(stop_calls):
                stop_calls()
            raise
        pool.shutdown()
        return outcomes

    @staticmethod
    def _sample_name(number: int, sources: Sequence[str | None] | None, row: int) -> str:
        """"sample 3", with its data row when the caller knows it: "sample 3 (code.jsonl:12)"."""
        source = " ".join(str(sources[row]).split()) if sources is not None and sources[row] else ""
        return f"sample {number} ({source})" if source else f"sample {number}"

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        answers: Sequence[str | None] | None = None,
        metas: Sequence[Mapping[str, Any] | None] | None = None,
        lengths: Sequence[int] | None = None,
        *,
        first_sample: int = 0,
        sources: Sequence[str | None] | None = None,
        sample_numbers: Sequence[int] | None = None,
    ) -> RewardResult:
        n = len(completions)
        if answers is None:
            answers = [None] * n
        if metas is None:
            metas = [None] * n
        sizes = {"prompts": len(prompts), "completions": n, "answers": len(answers), "metas": len(metas)}
        if lengths is not None:
            sizes["lengths"] = len(lengths)
        if sources is not None:
            sizes["sources"] = len(sources)
        if sample_numbers is not None:
            sizes["sample_numbers"] = len(sample_numbers)
        if len(set(sizes.values())) > 1:
            raise ValueError(f"RewardRunner: inputs have different lengths: {sizes}")
        sample_number = range(first_sample, first_sample + n) if sample_numbers is None else sample_numbers  # in first_error
        if self.overlong is not None and lengths is None:
            raise ValueError("RewardRunner: `lengths` (response token counts) are required when overlong is set")

        scores = [0.0] * n
        reasons: list[str | None] = [None] * n
        statuses: list[str | None] = [None] * n
        failed = [False] * n
        errors = 0
        first_error: str | None = None
        batch_values = self._score_batch(prompts, completions, answers, metas)
        if batch_values is not None:
            outcomes = [(value, None) for value in batch_values]
        else:
            outcomes = self._call_each(prompts, completions, answers, metas)
        for i, (value, raised) in enumerate(outcomes):
            if raised is not None:
                exc, trace = raised
                errors += 1
                failed[i] = True
                reasons[i] = f"reward raised {type(exc).__name__}: {exc}"[:300]
                if first_error is None:
                    headline = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                    sample = self._sample_name(sample_number[i], sources, i)
                    first_error = f"reward raised for {sample}: {headline}\n{trace}"
                continue
            try:
                if _says_failed(value):  # a score that says it is none (a judge's timeout)
                    raise ValueError(f"failed: {getattr(value, 'reason', None) or 'no reason given'}")
                value, reasons[i] = _score_and_reason(value)
                score = _as_float(value)
                if not math.isfinite(score):
                    raise ValueError(f"returned a non-finite value {score!r}")
                if abs(score) > _FLOAT32_MAX:  # kept in float32, it would be inf
                    raise ValueError(f"returned {score!r}, beyond float32's range (+-{_FLOAT32_MAX:.4g})")
            except Exception as exc:  # noqa: BLE001 - odd return values are counted, not raised
                errors += 1
                failed[i] = True
                reasons[i] = f"reward {exc}"[:300]
                if first_error is None:  # with what a failed score tells of its failure (a judge's traceback)
                    details = getattr(value, "details", None)
                    first_error = f"reward for {self._sample_name(sample_number[i], sources, i)} {exc}" + (
                        f"\n{details}" if isinstance(details, str) and details else "")
                continue
            scores[i] = score
            try:
                status = getattr(outcomes[i][0], "status", None)
            except Exception:  # noqa: BLE001 - a status that cannot be read is none; the score stands
                status = None
            statuses[i] = status if isinstance(status, str) else None

        if first_error is not None and not self._warned:
            self._warned = True
            logger.warning(  # one line: the traceback is the caller's to keep (the trainer's reward_errors.log)
                "reward %r failed on %d of %d samples (scored 0); first failure: %s", self.name, errors, n,
                visible_controls(error_headline(first_error)),
            )

        exact_scores = torch.tensor(scores, dtype=torch.float64)
        score_t = exact_scores.float()
        if self.overlong is not None:
            assert lengths is not None
            pen = [overlong_penalty(length, **self.overlong) for length in lengths]  # a fractional length is refused
            pen_t = torch.tensor(pen, dtype=torch.float32)
        else:
            pen_t = torch.zeros(n, dtype=torch.float32)
        failed_t = torch.tensor(failed, dtype=torch.bool)
        return RewardResult(
            scores=score_t,
            rewards=score_t + pen_t,
            correct=(exact_scores >= self.correct_threshold) & ~failed_t,  # a failure is wrong at any threshold, 0 or below too
            errors=errors,
            first_error=first_error,
            penalties=pen_t,
            failed=failed_t,
            reasons=reasons,
            exact_scores=exact_scores,
            statuses=statuses,
            status_names=self.status_names,
        )
