"""Verifiable rewards for RL fine-tuning (layer 2: imports torch and the standard library only at import
time; math-verify and reasoning-gym are imported lazily when a reward first needs them).

* :mod:`~entrorl.rewards.base` — the reward protocol ``f(prompt, completion, answer, **meta) -> float``,
  the registry (:func:`register_reward`, :func:`get_reward`, :func:`available_rewards`,
  :func:`check_reward_spec`) and :class:`RewardRunner`, which scores a batch robustly into a
  :class:`RewardResult`;
* :mod:`~entrorl.rewards.math` — final-answer extraction and equivalence checking (the ``math`` reward);
* :mod:`~entrorl.rewards.exact` — the ``exact_match`` reward;
* :mod:`~entrorl.rewards.reasoning_gym` — reasoning-gym tasks and their verifiers (the ``reasoning_gym``
  reward, :func:`reasoning_gym_records`);
* :mod:`~entrorl.rewards.shaping` — DAPO's soft overlong punishment;
* :mod:`~entrorl.rewards.judge` — reward-model / LLM-as-judge rewards (the ``judge`` reward);
* :mod:`~entrorl.rewards.diversity` — DRA-GRPO diversity-aware reward adjustment;
* :mod:`~entrorl.rewards.code` — the ``code`` reward: a program run against test cases in the sandbox
  of :mod:`~entrorl.rewards.sandbox`.
"""

from entrorl.rewards.base import (
    RewardFn,
    RewardResult,
    RewardRunner,
    available_rewards,
    check_reward_spec,
    error_headline,
    get_reward,
    register_reward,
)
from entrorl.rewards.code import CodeOptions, CodeReward, CodeVerdict, extract_code, parse_tests
from entrorl.rewards.diversity import diversity_adjusted_rewards, diversity_weights, load_embedder
from entrorl.rewards.exact import exact_match
from entrorl.rewards.judge import JudgeReward, JudgeScore
from entrorl.rewards.math import (
    MATH_INSTRUCTION,
    MathOptions,
    MathReward,
    extract_boxed,
    extract_final_answer,
    math_equal,
)
from entrorl.rewards.reasoning_gym import (
    REASONING_GYM_INSTRUCTION,
    ReasoningGymReward,
    extract_reasoning_gym_answer,
    reasoning_gym_answer_readings,
    reasoning_gym_records,
)
from entrorl.rewards.shaping import overlong_penalties, overlong_penalty

__all__ = [
    "CodeOptions",
    "CodeReward",
    "CodeVerdict",
    "MATH_INSTRUCTION",
    "REASONING_GYM_INSTRUCTION",
    "MathOptions",
    "JudgeReward",
    "JudgeScore",
    "MathReward",
    "ReasoningGymReward",
    "RewardFn",
    "RewardResult",
    "RewardRunner",
    "available_rewards",
    "error_headline",
    "check_reward_spec",
    "diversity_adjusted_rewards",
    "diversity_weights",
    "exact_match",
    "extract_code",
    "extract_boxed",
    "extract_final_answer",
    "extract_reasoning_gym_answer",
    "reasoning_gym_answer_readings",
    "get_reward",
    "load_embedder",
    "math_equal",
    "overlong_penalties",
    "overlong_penalty",
    "parse_tests",
    "reasoning_gym_records",
    "register_reward",
]
