"""entrorl's rewards as a verl ``custom_reward_function``.

verl loads ``reward.custom_reward_function.name`` from the module at ``reward.custom_reward_function.path``
and calls it as ``fn(data_source, solution_str, ground_truth, extra_info=None, **reward_kwargs)``::

    reward.custom_reward_function.path=pkg://entrorl.integrations.verl
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.reward=math

``compute_score`` scores with the entrorl reward named by ``reward`` (a registered name such as ``math``,
``exact_match``, ``reasoning_gym``, or ``package.module:function``) and its ``reward_options``; the shortcuts
``math_score``, ``exact_match_score`` and ``reasoning_gym_score`` fix the reward so that ``name`` alone selects
it. The entrorl reward sees ``prompt = extra_info["prompt"]`` (or ``""``), ``completion = solution_str``,
``answer = ground_truth`` and ``extra_info`` as its metadata (reasoning-gym reads ``extra_info["entry"]``); its
``answer`` and ``completion`` (GSM8K's worked solution is ``extra_info["answer"]``) are left out for a reward whose own
arguments they would collide with. It is scored as ``entrorl train`` scores a sample (:class:`entrorl.rewards.RewardRunner`):
a reward that cannot be called with that metadata is refused (``ValueError``), one that returns an object with
``.score`` (a judge's verdict) gives that score, and one that raises, fails, or returns no finite number scores 0,
logged the first time, so that verl never gets a NaN reward; a reward that fails on
:data:`FAILURES_IN_A_ROW` samples in a row, at the start or later (a judge that went down), stops the run
(``RuntimeError``) instead of training on zeros. It returns ``{"score": the reward, "acc": 1.0 or 0.0}``: verl logs
``acc`` as the samples' accuracy (``val-core/<source>/acc/mean@n``, DAPO's ``filter_groups.metric=acc``), which is
the reward's verdict (full marks for ``reasoning_gym`` and ``code``, whose wrong answers may get partial credit), not
the score verl would take for it from a bare number.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Mapping
from functools import partial
from typing import Any

from entrorl.rewards import RewardRunner, get_reward
from entrorl.rewards.base import error_headline

__all__ = ["compute_score", "math_score", "exact_match_score", "reasoning_gym_score"]

# Keyword arguments verl's reward managers add on their own (reward-model routing); entrorl rewards ignore them.
_VERL_MANAGER_KWARGS = ("reward_router_address", "reward_model_tokenizer")

# extra_info keys that would collide with the reward's own arguments (prompt is taken as the prompt)
_ARGUMENT_NAMES = ("completion", "answer")

_RUNNERS: dict[tuple[str, str], RewardRunner] = {}
_LOCK = threading.Lock()  # over the runners built and the failures counted
# (runner key, extra_info's keys) -> the keys left out for that reward (checked once per set of keys)
_LEFT_OUT: dict[tuple[tuple[str, str], tuple[str, ...]], tuple[str, ...]] = {}


def _reward_runner(reward: str, options: Mapping[str, Any]) -> tuple[tuple[str, str], RewardRunner]:
    """The runner of ``reward`` with ``options``, built once (verl scores a batch's samples from a pool of threads:
    a judge would load its model in each)."""
    key = (reward, repr(sorted(options.items())))
    if key not in _RUNNERS:
        with _LOCK:
            if key not in _RUNNERS:
                _RUNNERS[key] = RewardRunner(get_reward(reward, **dict(options)), name=reward)
    return key, _RUNNERS[key]


def _callable_meta(key: tuple[str, str], runner: RewardRunner, meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` as the reward can take it: whole, else without the keys named like its own arguments; ``ValueError``
    (:meth:`RewardRunner.check_arguments`) when neither fits it."""
    keys = tuple(sorted(meta))
    if (key, keys) not in _LEFT_OUT:
        present = [name for name in _ARGUMENT_NAMES if name in meta]
        # the fewest keys that make it callable: each alone, then both
        candidates = [(), *((name,) for name in present), *([tuple(present)] if len(present) > 1 else [])]
        for left_out in candidates:
            try:
                runner.check_arguments([{name: value for name, value in meta.items() if name not in left_out}])
            except ValueError:
                if left_out == candidates[-1]:
                    try:  # what the call would say, without the keys left out anyway
                        inspect.signature(runner.fn).bind("prompt", "completion", "answer",
                                                          **dict.fromkeys(sorted(set(meta) - set(left_out))))
                        cause = "it cannot take them"
                    except TypeError as error:
                        cause = str(error)
                    raise ValueError(
                        f"the reward {runner.name!r} cannot be called as fn(prompt, completion, answer, **meta) with the "
                        f"keys of verl's extra_info and its data_source {list(keys)}: {cause}; give it a **meta "
                        "parameter (with '/' after its first three parameters if a key shares their names)") from None
                continue
            _LEFT_OUT[key, keys] = left_out
            break
    return {name: value for name, value in meta.items() if name not in _LEFT_OUT[key, keys]}


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    *,
    reward: str = "math",
    reward_options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """verl's ``compute_score``: the entrorl reward ``reward`` (built once per option set) of ``solution_str``
    against ``ground_truth``. Raises ``ValueError`` for an unknown reward or option, and ``TypeError`` for a
    keyword that neither entrorl nor verl's reward managers define."""
    unknown = sorted(set(kwargs) - set(_VERL_MANAGER_KWARGS))
    if unknown:
        raise TypeError(
            f"compute_score got unknown keyword(s) {unknown}; entrorl reward options go in "
            "reward_kwargs.reward_options, the reward's name in reward_kwargs.reward"
        )
    meta = dict(extra_info or {})
    prompt = meta.pop("prompt", None)
    prompt = "" if prompt is None else prompt  # Parquet fills a field a row lacks with None: no prompt, not "None"
    if isinstance(prompt, (list, tuple)):  # chat messages: the user's last turn, as entrorl train gives a reward
        turns = [m.get("content") for m in prompt if isinstance(m, Mapping) and m.get("role") == "user"]
        prompt = turns[-1] if turns and isinstance(turns[-1], str) else ""
    meta.setdefault("data_source", data_source)
    key, runner = _reward_runner(reward, reward_options or {})
    meta = _callable_meta(key, runner, meta)
    result = runner([prompt if isinstance(prompt, str) else str(prompt)], [solution_str], [ground_truth], [meta])
    _stop_a_reward_that_keeps_failing(key, bool(result.failed[0]), result.first_error)
    return {"score": float(result.exact_scores[0]), "acc": float(result.correct[0])}


# A reward that fails on this many samples in a row (a misconfiguration: reasoning_gym without the entry in extra_info;
# a judge that cannot be reached, from the start or since it went down) stops the run, as entrorl train stops after
# reward.max_failing_steps steps whose every sample failed: verl would otherwise train on zeros.
FAILURES_IN_A_ROW = 1024
_FAILURES: dict[tuple[str, str], tuple[int, str]] = {}  # runner key -> (failures in a row, the first one's headline)


def _stop_a_reward_that_keeps_failing(key: tuple[str, str], failed: bool, error: str | None) -> None:
    """Count ``key``'s failures in a row (a success starts the count again); raise once they reach
    :data:`FAILURES_IN_A_ROW`."""
    with _LOCK:
        if not failed:
            _FAILURES.pop(key, None)
            return
        failures, first = _FAILURES.get(key, (0, error_headline(error or "no message")))
        _FAILURES[key] = (failures + 1, first)
    if failures + 1 >= FAILURES_IN_A_ROW:
        raise RuntimeError(f"the reward {key[0]!r} failed on each of the last {failures + 1} samples verl has given it: "
                           f"stopping rather than training on zeros; the first of them failed with: {first}")


math_score = partial(compute_score, reward="math")
math_score.__doc__ = "verl ``compute_score`` with entrorl's ``math`` reward."
exact_match_score = partial(compute_score, reward="exact_match")
exact_match_score.__doc__ = "verl ``compute_score`` with entrorl's ``exact_match`` reward."
reasoning_gym_score = partial(compute_score, reward="reasoning_gym")
reasoning_gym_score.__doc__ = "verl ``compute_score`` with entrorl's ``reasoning_gym`` reward (option ``task``)."
