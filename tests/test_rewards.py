"""Tests for entrorl.rewards: answer extraction and equivalence, exact match, reasoning-gym verifiers,
DAPO overlong shaping, the registry / spec resolution and the robust batch runner."""

from __future__ import annotations

import json
import math
import pickle
import re
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

from entrorl.rewards import (
    MATH_INSTRUCTION,
    REASONING_GYM_INSTRUCTION,
    MathReward,
    ReasoningGymReward,
    RewardResult,
    RewardRunner,
    available_rewards,
    check_reward_spec,
    exact_match,
    extract_boxed,
    extract_final_answer,
    extract_reasoning_gym_answer,
    get_reward,
    math_equal,
    overlong_penalties,
    overlong_penalty,
    reasoning_gym_records,
    register_reward,
)
from entrorl.rewards import base as rewards_base

# --------------------------------------------------------------------------------------------
# math
# --------------------------------------------------------------------------------------------

# (completion, reference, expected reward with default options)
MATH_CASES = [
    # the contract's cases
    (r"So $x = \boxed{\frac{1}{2}}$.", "0.5", 1.0),
    ("Dividing, we get 1/2", r"\frac12", 1.0),
    (r"The total is \boxed{96}", "96", 1.0),
    ("The answer is 3.14159", r"\pi", 1.0),  # a decimal approximating pi to its written digits
    ("The answer is 3.15", r"\pi", 0.0),  # neither pi rounded nor cut to two decimals
    (r"The roots are \boxed{1, 2, 3}", "3,1,2", 1.0),
    (r"The solution set is \boxed{\{1, 2, 3\}}", "{3, 1, 2}", 1.0),
    # sets: a missing root is wrong
    (r"\boxed{1, 2}", "3,1,2", 0.0),
    # garbage and empty completions
    ("", "5", 0.0),
    ("   \n  ", "5", 0.0),
    (r"asdf }{ \boxed{", "5", 0.0),
    ("no numbers at all, just words", "5", 0.0),
    ("junk " * 2000, "5", 0.0),
    (r"\boxed{}", "5", 0.0),
    (r"\boxed{@#$%^&}", "5", 0.0),
    # nested braces
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", 1.0),
    (r"\boxed{\frac{1}{\frac{1}{2}}}", "2", 1.0),
    # negative numbers
    ("The answer is -7.", "-7", 1.0),
    ("The answer is -7.", "7", 0.0),
    (r"x = \boxed{-\frac{3}{4}}", "-0.75", 1.0),
    # LaTeX vs plain
    (r"\boxed{\dfrac{2}{3}}", "2/3", 1.0),
    (r"\boxed{\sqrt{2}}", "2^{1/2}", 1.0),
    ("We expand. The answer is $(x+1)^2$.", "x^2+2x+1", 1.0),
    (r"\boxed{0.6667}", "2/3", 1.0),  # 2/3 rounded to four decimals
    (r"\boxed{0.67}", "2/3", 0.0),  # two significant digits are too few to count as an approximation
    # other formats and extractors
    (r"1,000 apples in all, so \boxed{1000}", "1,000", 1.0),
    ("reasoning...\n#### 72", "72", 1.0),
    ("<answer>42</answer>", "42", 1.0),
    ("I computed 17, then 18", "18", 1.0),
    ("The answer is: **12**", "12", 1.0),
    (r"\boxed{x = 3}", "3", 1.0),
    (r"\boxed{\text{(B)}}", "B", 1.0),
    (r"\boxed{5}", r"The final result is $\boxed{5}$", 1.0),
    (r"\boxed{\infty}", r"\infty", 1.0),
    (r"\boxed{a}", "b", 0.0),
    # the last box counts
    (r"first \boxed{3}, corrected: \boxed{4}", "4", 1.0),
    (r"first \boxed{3}, corrected: \boxed{4}", "3", 0.0),
]


@pytest.fixture(scope="module")
def math_reward():
    return get_reward("math")


@pytest.mark.parametrize(("completion", "reference", "expected"), MATH_CASES)
def test_math_reward_table(math_reward, completion, reference, expected):
    assert math_reward("prompt", completion, reference) == expected


def test_math_pi_approximation_rule_and_tolerance():
    assert get_reward("math")("", "The answer is 3.14159", r"\pi") == 1.0
    # without the approximation rule only the relative tolerance can accept a decimal for pi
    assert get_reward("math", approximation_digits=0)("", "The answer is 3.14159", r"\pi") == 0.0
    assert get_reward("math", approximation_digits=0, tolerance=1e-6)("", "The answer is 3.14159", r"\pi") == 1.0
    assert get_reward("math", approximation_digits=0, numeric_tolerance=1e-6)("", r"\boxed{3.14159}", r"\pi") == 1.0
    assert math_equal("3.14159", r"\pi", approximation_digits=0, tolerance=1e-6)
    assert not math_equal("3.14159", r"\pi", approximation_digits=0)
    assert math_equal("3.14159", r"\pi")
    # tolerance is relative
    assert math_equal("1000001", "1000000", tolerance=1e-5)
    assert not math_equal("1.00001", "1", tolerance=1e-6)


def test_math_reward_returns_floats_and_never_raises(math_reward):
    for completion, answer in [(None, "5"), (r"\boxed{2}", None), (12, "12"), (r"\boxed{2}", ["3", "2"])]:
        value = math_reward("", completion, answer)
        assert isinstance(value, float)
    assert math_reward("", r"\boxed{2}", ["3", "2"]) == 1.0  # any of several references
    assert math_reward("", r"\boxed{2}", np.array(["3", "2"], dtype=object)) == 1.0  # a Parquet / pandas list column
    assert math_reward("", r"\boxed{nan}", float("nan")) == 0.0  # a missing answer as a data frame spells it


def test_math_timeout_option_bounds_pathological_answers():
    reward = get_reward("math", timeout=1)
    assert reward("", r"\boxed{10^{10^{10}}}", "5") == 0.0


def test_math_works_off_the_main_thread(math_reward):
    # Math-Verify's signal-based timeouts only work in the main thread; the reward must disable them.
    out = []
    thread = threading.Thread(target=lambda: out.append(math_reward("", r"\boxed{\frac{1}{2}}", "0.5")))
    thread.start()
    thread.join()
    assert out == [1.0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"\boxed{\frac{a}{b}}", r"\frac{a}{b}"),
        (r"a \boxed{1} b \boxed{\{2\}}", r"\{2\}"),
        (r"\boxed 7 apples", "7"),
        (r"\fbox{3}", "3"),
        (r"\boxed{1} then \boxed{2", "1"),  # an unclosed last box falls back to the previous one
        (r"\boxed{\boxed{2}+1}", r"\boxed{2}+1"),  # a box inside a box is content of the outer one
        (r"\boxed{3} and \boxed{x^{\boxed{2}}} end", r"x^{\boxed{2}}"),
        ("nothing here", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so $\boxed{x^2}$ is it", "x^2"),
        ("Thus the answer is $\\frac{1}{2}$.", r"\frac{1}{2}"),
        ("Final Answer: 3.5.", "3.5"),
        ("The answer is\n$$\n-4\n$$", "-4"),
        ("The answer is\n\\[\n-4\n\\]", "-4"),
        ("value 1,234,567 total", "1234567"),
        ("temperatures -3 and \u22125", "-5"),
        ("ratio is 3 / 4", "3/4"),
        ("", None),
        ("words only", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_math_reward_config_validation():
    with pytest.raises(ValueError, match="tolerance"):
        get_reward("math", tolerance=-1.0)
    with pytest.raises(ValueError, match="not both"):
        MathReward(tolerance=1e-6, numeric_tolerance=1e-6)
    with pytest.raises(ValueError, match="accepted options"):
        get_reward("math", tolerence=1e-6)


def test_math_instruction_mentions_boxed():
    assert r"\boxed{}" in MATH_INSTRUCTION


# --------------------------------------------------------------------------------------------
# exact match
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("Paris", "paris", 1.0),
        ("  PARIS \n", "Paris ", 1.0),
        ("The answer is Paris.", "Paris", 1.0),
        (r"It is \boxed{Paris}", "paris", 1.0),
        ("<answer>New York</answer>", "new york", 1.0),
        ("I think it is Paris", "Paris", 0.0),
        ("42", "42", 1.0),
        ("first 41, then 42", "42", 1.0),
        ("The answer is 42", "42.0", 0.0),  # no numeric equivalence here
        ("", "x", 0.0),
        ("Paris", None, 0.0),
        ("Lyon", ["Paris", "Lyon"], 1.0),
        ("Lyon", ("Paris", "Lyon"), 1.0),  # a tuple lists references too
        ("Lyon", np.array(["Paris", "Lyon"], dtype=object), 1.0),  # and an array (a Parquet / pandas list column)
        ("Lyon", np.array("Lyon"), 1.0),  # a 0-d array is the one answer it holds
        ("The answer is 0.1", np.array([0.1, 7.0], dtype=np.float32), 1.0),  # each item read as it is alone: 0.1
        ("nan", float("nan"), 0.0),  # NaN is how a data frame spells a missing answer: no reference, no match
        ("nan", np.float64("nan"), 0.0),
        ("nan", np.array([np.nan]), 0.0),
        ("nan", [float("nan")], 0.0),
        ("7", [float("nan"), "7"], 1.0),
        ("None", ["Paris", None], 0.0),  # a missing reference is not the text "None"
        ("Straße", "STRASSE", 1.0),  # case-folded, not only lower-cased
        ("STRASSE", "Straße", 1.0),
        ("Caf\u00e9", "cafe\u0301", 1.0),  # one character or a letter and its combining accent: the same text (NFC)
        ("CAFE\u0301", "caf\u00e9", 1.0),
        ("cafe", "caf\u00e9", 0.0),
        ("\u03b1\u0345\u0301", "\u03b1\u0301\u0345", 1.0),  # casefold turns U+0345 into iota: NFC before it too
        (None, "x", 0.0),
        ("", "", 0.0),  # a blank reference is no reference: an empty answer must not earn the reward
        ("   ", "", 0.0),
        ("", " ", 0.0),
        ("", [""], 0.0),
        ("x", ["", "x"], 1.0),
        # a reference read as `math` reads it: its last box, or what follows GSM8K's ####
        ("so 72", "Half of 144 is 72.\n#### 72", 1.0),
        ("\\boxed{5}", "\\boxed{5}", 1.0),
        ("#### 72", "#### 72", 1.0),
        ("so 73", "#### 72", 0.0),
        ("x", "####", 0.0),  # an empty #### is no reference
        # a completion equal to its reference as a whole, whatever its extracted answer
        ("5 apples", "5 apples", 1.0),
        ("x = 5", "x = 5", 1.0),
        ("The answer is 5.", "The answer is 5.", 1.0),
        ("$5", "$5", 1.0),
    ],
)
def test_exact_match(completion, answer, expected):
    assert exact_match("prompt", completion, answer) == expected
    assert get_reward("exact_match") is exact_match


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [("The answer is 42", 42, 1.0), ("It is 7", [3, 7], 1.0), ("x = 2.5", 2.5, 1.0), ("x = 3", 4, 0.0)],
)
def test_exact_match_compares_a_numeric_reference_by_its_text_and_returns_a_float(completion, answer, expected):
    score = exact_match("prompt", completion, answer)
    assert type(score) is float and score == expected
    assert type(exact_match("prompt", "Paris", "paris")) is float and type(exact_match("prompt", "a", "b")) is float


# --------------------------------------------------------------------------------------------
# reasoning-gym
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arithmetic_records():
    return reasoning_gym_records("basic_arithmetic", size=5, seed=7, instruction=REASONING_GYM_INSTRUCTION)


def test_reasoning_gym_records_shape_and_determinism(arithmetic_records):
    assert len(arithmetic_records) == 5
    for rec in arithmetic_records:
        assert set(rec) == {"prompt", "answer", "meta"}
        assert rec["prompt"] == f"{rec['meta']['entry']['question'].rstrip()}\n\n{REASONING_GYM_INSTRUCTION}"
        assert rec["answer"] == rec["meta"]["entry"]["answer"]
        assert rec["meta"]["task"] == "basic_arithmetic"
    again = reasoning_gym_records("basic_arithmetic", size=5, seed=7, instruction=REASONING_GYM_INSTRUCTION)
    assert [r["prompt"] for r in again] == [r["prompt"] for r in arithmetic_records]
    other = reasoning_gym_records("basic_arithmetic", size=5, seed=8)
    assert [r["answer"] for r in other] != [r["answer"] for r in arithmetic_records]


def test_reasoning_gym_end_to_end_basic_arithmetic(arithmetic_records):
    reward = get_reward("reasoning_gym", task="basic_arithmetic")
    for rec in arithmetic_records:
        good = f"Let me compute step by step.\n<answer>{rec['answer']}</answer>"
        assert reward(rec["prompt"], good, rec["answer"], **rec["meta"]) == 1.0
        wrong = str(int(rec["answer"]) + 1)
        assert reward(rec["prompt"], f"<answer>{wrong}</answer>", rec["answer"], **rec["meta"]) < 1.0
        # fallbacks when the tags are missing (not in strict mode)
        assert reward(rec["prompt"], f"work...\nThe answer is {rec['answer']}", rec["answer"], **rec["meta"]) == 1.0
        assert reward(rec["prompt"], "", rec["answer"], **rec["meta"]) == 0.0


def test_reasoning_gym_second_task_and_task_from_meta():
    records = reasoning_gym_records("leg_counting", size=5, seed=3)
    reward = get_reward("reasoning_gym")  # task read from meta["task"]
    for rec in records:
        assert reward(rec["prompt"], f"<answer>{rec['answer']}</answer>", rec["answer"], **rec["meta"]) == 1.0
        assert reward(rec["prompt"], "<answer>-1</answer>", rec["answer"], **rec["meta"]) < 1.0


def test_reasoning_gym_partial_credit_is_not_a_correct_answer(arithmetic_records):
    """reasoning-gym gives an answer that contains the reference len(reference) / len(answer) of the credit; such an
    answer is wrong, so the runner counts only full marks as correct unless told otherwise."""
    rec = arithmetic_records[0]
    doubled = rec["answer"] * 2  # contains the reference: half the credit
    args = ([rec["prompt"]] * 2, [f"<answer>{rec['answer']}</answer>", f"<answer>{doubled}</answer>"], [rec["answer"]] * 2,
            [rec["meta"]] * 2)
    result = RewardRunner(get_reward("reasoning_gym", task="basic_arithmetic"))(*args)
    assert result.scores.tolist() == [1.0, 0.5] and result.correct.tolist() == [True, False]
    assert RewardRunner(get_reward("reasoning_gym", task="basic_arithmetic"), correct_threshold=0.5)(*args).correct.all()
    # the code reward scores the share of test cases passed: correct means all of them
    assert RewardRunner(get_reward("code")).correct_threshold == 1.0
    assert RewardRunner(get_reward("exact_match")).correct_threshold == 0.5


def test_reasoning_gym_strict_mode_needs_tags(arithmetic_records):
    rec = arithmetic_records[0]
    strict = get_reward("reasoning_gym", task="basic_arithmetic", strict=True)
    assert strict("", f"The answer is {rec['answer']}", rec["answer"], **rec["meta"]) == 0.0
    assert strict("", f"<answer>{rec['answer']}</answer>", rec["answer"], **rec["meta"]) == 1.0


def test_reasoning_gym_errors_surface(arithmetic_records):
    reward = get_reward("reasoning_gym", task="basic_arithmetic")
    with pytest.raises(ValueError, match="meta\\['entry'\\]"):
        reward("", "<answer>1</answer>", "1")
    rec = reasoning_gym_records("leg_counting", size=1, seed=0)[0]
    with pytest.raises(ValueError, match="leg_counting"):
        reward("", "<answer>1</answer>", rec["answer"], **rec["meta"])
    with pytest.raises(ValueError, match="unknown reasoning-gym task 'no_such_task'"):
        get_reward("reasoning_gym", task="no_such_task")
    with pytest.raises(ValueError, match="unknown reasoning-gym task"):
        check_reward_spec("reasoning_gym", task="no_such_task")
    with pytest.raises(ValueError, match="unknown reasoning-gym task 'leg_countin'; did you mean 'leg_counting'\\? available"):
        check_reward_spec("reasoning_gym", task="leg_countin")
    with pytest.raises(ValueError, match="task must be a dataset name, got ''"):
        get_reward("reasoning_gym", task="")
    with pytest.raises(ValueError, match="strict must be a bool, got 'yes'"):
        get_reward("reasoning_gym", task="basic_arithmetic", strict="yes")
    with pytest.raises(ValueError, match="config must be a mapping, got list"):
        get_reward("reasoning_gym", task="basic_arithmetic", config=[("max_terms", 3)])
    check_reward_spec("reasoning_gym", task="basic_arithmetic")


def test_reasoning_gym_reward_pickles(arithmetic_records):
    reward = pickle.loads(pickle.dumps(get_reward("reasoning_gym", task="basic_arithmetic")))
    rec = arithmetic_records[1]
    assert reward("", f"<answer>{rec['answer']}</answer>", rec["answer"], **rec["meta"]) == 1.0
    assert isinstance(reward, ReasoningGymReward)


@pytest.mark.parametrize(
    ("completion", "strict", "expected"),
    [
        ("think <answer> 12 </answer> more <answer>13</answer>", False, "13"),
        ("<answer>\nmulti\nline\n</answer>", False, "multi\nline"),
        (r"so \boxed{7}", False, "7"),
        (r"so \boxed{ 7 }", False, "7"),  # a box's content is stripped like a tag's
        ("The answer is  cat ", False, "cat"),
        ("blah\nAnswer: cat\n", False, "cat"),
        ("step one\nfinal line\n\n", False, "final line"),
        ("step one\nfinal line", True, None),
        ("", False, None),
        (None, False, None),
        ("<answer>5</answer> and then <answer>", False, "5"),  # an opening tag after the last closing one is ignored
        ("<answer>5</answer> (final) </answer>", True, "5"),  # a stray closing tag: the pair is the first one after
        ("<answer>a <answer>b</answer>", True, "a <answer>b"),  # ... its opening tag, as reasoning-gym reads it
        (r"\boxed{5} </answer>", False, "5"),  # a closing tag without an opening one is no answer
        (r"\boxed{} The answer is 7", False, "7"),  # an empty box is no answer
        (r"The answer is 3. Actually \boxed{4}", False, "4"),  # a box wins over the answer phrase
        ("Answer: LET US GO AS HE ATTENDS", False, "LET US GO AS HE ATTENDS"),  # the rest of the line, clauses too
        ("The answer is 42.\nCheck: fine", False, "42"),  # without the sentence's period
        ("Answer: ...", False, "..."),
        (r"\boxed{\text{son}}", False, "son"),  # without the markup around the whole answer
        ("work\n\n**42**", False, "42"),
        ("Final answer: $42$", False, "42"),
        ("**Final Answer:** $\\text{son}$.", False, "son"),
        ("<think>guess 3</think>\n42", False, "42"),  # after the reasoning block
        ("<think>The answer is 3</think>", False, None),  # a guess while thinking is no answer
        ("<think>so \\boxed{3}</think> done", False, "done"),
        ("<think>so \\boxed{3}</think>", False, "3"),
        ("The answer is **42**.", False, "42"),  # the bold around the answer, not only the phrase's
        ("**Final Answer: 42**", False, "42"),
        ("**The answer is 42.**", False, "42"),
        ("Some steps.\n\n**Answer**: 42", False, "42"),
        ("Answer:\n42\n\nDone.", False, "42"),  # the lines under a phrase that ends its line, up to a blank one
        ("Reasoning.\n\n**Final Answer:**\n1 2\n3 4\n\nThis satisfies all rules.", False, "1 2\n3 4"),
    ],
)
def test_extract_reasoning_gym_answer(completion, strict, expected):
    assert extract_reasoning_gym_answer(completion, strict=strict) == expected


# --------------------------------------------------------------------------------------------
# overlong shaping
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        (0, 0.0),
        (6, 0.0),
        (7, 0.0),  # = max_length - cache_length
        (8, -0.25),
        (9, -0.5),
        (10, -0.75),
        (11, -1.0),  # = max_length
        (12, -1.0),
        (1000, -1.0),
    ],
)
def test_overlong_penalty_boundaries(length, expected):
    assert overlong_penalty(length, max_length=11, cache_length=4) == expected


def test_overlong_penalty_dapo_values_and_factor():
    kw = {"max_length": 20480, "cache_length": 4096}
    assert overlong_penalty(16384, **kw) == 0.0
    assert overlong_penalty(16385, **kw) == pytest.approx(-1 / 4096)
    assert overlong_penalty(18432, **kw) == -0.5
    assert overlong_penalty(20480, **kw) == -1.0
    assert overlong_penalty(20481, **kw) == -1.0
    assert overlong_penalty(18432, **kw, penalty_factor=0.5) == -0.25
    assert overlong_penalty(30000, **kw, penalty_factor=2.0) == -2.0
    assert overlong_penalty(5, max_length=10, cache_length=10) == -0.5  # cache = whole budget
    lengths = [0, 16384, 16385, 18432, 20480, 20481]
    expected = torch.tensor([overlong_penalty(n, **kw) for n in lengths], dtype=torch.float32)
    torch.testing.assert_close(overlong_penalties(lengths, **kw), expected)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_length": 10, "cache_length": 0},
        {"max_length": 10, "cache_length": 11},
        {"max_length": 10, "cache_length": -1},
        {"max_length": 0, "cache_length": 0},
        {"max_length": 10.5, "cache_length": 2},
        {"max_length": 10, "cache_length": 2, "penalty_factor": -1.0},
        {"max_length": 10, "cache_length": 2, "penalty_factor": float("nan")},
        {"max_length": 10, "cache_length": 2, "penalty_factor": float("inf")},
        {"max_length": 10, "cache_length": 2, "penalty_factor": True},
        {"max_length": True, "cache_length": 1},
    ],
)
def test_overlong_penalty_validation(kwargs):
    with pytest.raises(ValueError):
        overlong_penalty(5, **kwargs)


def test_overlong_penalty_takes_a_numpy_factor_and_refuses_a_numpy_flag():
    """Any real number is a factor (a numpy float32 from a config array too); a numpy boolean is refused like True."""
    assert overlong_penalty(10, max_length=10, cache_length=2, penalty_factor=np.float32(0.5)) == -0.5
    with pytest.raises(ValueError, match="penalty_factor"):
        overlong_penalty(5, max_length=10, cache_length=2, penalty_factor=np.True_)


@pytest.mark.parametrize("length", [-1, 8.5, 8.0, True, "8"])
def test_overlong_penalty_rejects_a_length_that_is_not_a_token_count(length):
    """A length is a whole number of tokens, >= 0 (as overlong_penalties refuses float and bool lengths)."""
    with pytest.raises(ValueError, match="length"):
        overlong_penalty(length, max_length=10, cache_length=2)


def test_the_runner_refuses_a_fractional_length_instead_of_truncating_it():
    runner = RewardRunner(lambda prompt, completion, answer, **meta: 1.0, overlong={"max_length": 10, "cache_length": 4})
    with pytest.raises(ValueError, match="length"):
        runner(["p"], ["c"], lengths=[8.9])  # not the penalty of 8 tokens
    assert runner(["p"], ["c"], lengths=[9]).penalties.tolist() == [-0.75]  # (10 - 4 - 9) / 4


@pytest.mark.parametrize("cache_length", [1, 3, 7])
@pytest.mark.parametrize("penalty_factor", [0.1, 0.3, 0.7, 1.3])
def test_overlong_penalty_at_max_length_is_exactly_minus_the_factor(cache_length, penalty_factor):
    """Continuous at L_max: the ramp ends at exactly -penalty_factor, the value beyond it (the difference is divided by
    cache_length before it is scaled, so that it is -1 there, exactly)."""
    settings = dict(max_length=9, cache_length=cache_length, penalty_factor=penalty_factor)
    assert overlong_penalty(9, **settings) == -penalty_factor
    assert overlong_penalty(10, **settings) == -penalty_factor
    assert overlong_penalty(9 - cache_length, **settings) == 0.0
    assert overlong_penalties([9 - cache_length, 9, 10], **settings).tolist() == torch.tensor(
        [0.0, -penalty_factor, -penalty_factor], dtype=torch.float32).tolist()


def test_overlong_penalty_factor_zero_turns_the_penalty_off():
    for length in (0, 8, 10, 11, 50):
        assert overlong_penalty(length, max_length=10, cache_length=4, penalty_factor=0) == 0.0
    assert overlong_penalties([0, 8, 50], max_length=10, cache_length=4, penalty_factor=0.0).tolist() == [0.0, 0.0, 0.0]
    runner = RewardRunner(_fragile_reward, overlong={"max_length": 10, "cache_length": 4, "penalty_factor": 0})
    assert runner(["p"], ["a"], ["a"], None, [50]).rewards.tolist() == [1.0]


@pytest.mark.parametrize(
    ("lengths", "match"),
    [
        ([1.0, 2.0], "integers"),
        (torch.tensor([True, False]), "integers"),
        ([[1, 2], [3, 4]], "1-d"),
        ([3, -1], ">= 0"),
    ],
)
def test_overlong_penalties_refuse_what_is_not_a_list_of_token_counts(lengths, match):
    with pytest.raises(ValueError, match=match):
        overlong_penalties(lengths, max_length=10, cache_length=4)


@pytest.mark.parametrize(
    ("overlong", "match"),
    [
        ({"max_length": 10}, "missing"),
        ({"cache_length": 2}, "missing"),
        ({}, "missing"),  # an empty section is a mistake, not "no overlong penalty" (that is None)
        ([("max_length", 10), ("cache_length", 2)], "mapping"),
    ],
)
def test_runner_refuses_an_overlong_config_without_its_lengths_or_not_a_mapping(overlong, match):
    with pytest.raises(ValueError, match=match):
        RewardRunner(_fragile_reward, overlong=overlong)


# --------------------------------------------------------------------------------------------
# runner
# --------------------------------------------------------------------------------------------


def _fragile_reward(prompt, completion, answer, **meta):
    if completion == "boom":
        raise RuntimeError("kaboom in the reward")
    if completion == "nan":
        return float("nan")
    if completion == "inf":
        return math.inf
    if completion == "none":
        return None
    if completion == "str":
        return "1.0"
    if completion == "numpy str":
        return np.str_("1.0")
    return 1.0 if completion == answer else 0.0


def test_runner_survives_a_raising_reward():
    runner = RewardRunner(_fragile_reward)
    res = runner(["p"] * 4, ["a", "boom", "b", "boom"], ["a", "a", "a", "a"], [{}] * 4, [1, 2, 3, 4])
    assert isinstance(res, RewardResult)
    assert res.errors == 2
    assert "kaboom in the reward" in res.first_error
    assert "RuntimeError" in res.first_error and "Traceback" in res.first_error
    assert "sample 1" in res.first_error
    torch.testing.assert_close(res.scores, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(res.rewards, res.scores)
    assert res.correct.tolist() == [True, False, False, False]
    assert res.failed.tolist() == [False, True, False, True]
    assert res.scores.dtype == torch.float32 and res.correct.dtype == torch.bool


class _ConcurrentReward:
    """Scores 1 only when ``parallel_calls`` calls wait at the barrier together; raises for "boom"."""

    def __init__(self, parallel_calls: int) -> None:
        self.parallel_calls = parallel_calls
        self.barrier = threading.Barrier(parallel_calls, timeout=10)

    def __call__(self, prompt, completion, answer, **meta):
        self.barrier.wait()
        if completion == "boom":
            raise RuntimeError(f"kaboom in sample {prompt}")
        return 1.0


def test_a_reward_that_asks_for_parallel_calls_gets_them_in_order():
    reward = _ConcurrentReward(4)
    result = RewardRunner(reward)([str(i) for i in range(8)], ["a", "boom", "a", "a", "a", "a", "boom", "a"])
    assert result.scores.tolist() == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0]  # each in its place
    assert result.failed.tolist() == [False, True, False, False, False, False, True, False]
    assert result.errors == 2 and "kaboom in sample 1" in result.first_error and "Traceback" in result.first_error
    assert "sample 1:" in result.first_error.splitlines()[0]


def test_first_error_names_the_failing_sample_s_data_row_when_given():
    result = RewardRunner(_fragile_reward)(["p"] * 3, ["a", "boom", "b"], ["a"] * 3, sources=["d.jsonl:1", "d.jsonl:7", None])
    assert result.first_error.splitlines()[0].startswith("reward raised for sample 1 (d.jsonl:7): RuntimeError")
    with pytest.raises(ValueError, match="different lengths"):
        RewardRunner(_fragile_reward)(["p"], ["a"], ["a"], sources=[])
    odd = RewardRunner(_fragile_reward)(["p"], ["boom"], ["a"], sources=["odd\nname.jsonl:3"])
    assert rewards_base.error_headline(odd.first_error) == "reward raised for sample 0 (odd name.jsonl:3): RuntimeError: kaboom in the reward"


class _StatusReward:
    statuses = ("passed", "timeout", "wrong_answer")

    def __call__(self, prompt, completion, answer, **meta):
        if completion == "boom":
            raise RuntimeError("no verdict")
        return RewardVerdict(float(completion == "ok"), "timeout" if completion == "slow" else
                             "passed" if completion == "ok" else "wrong_answer")


class RewardVerdict(float):
    def __new__(cls, score, status):
        verdict = super().__new__(cls, score)
        verdict.status, verdict.reason = status, None
        return verdict


def test_the_shares_of_a_reward_s_declared_statuses_are_step_metrics():
    result = RewardRunner(_StatusReward())(["p"] * 5, ["ok", "slow", "slow", "no", "boom"])
    assert result.statuses == ["passed", "timeout", "timeout", "wrong_answer", None]
    metrics = result.metrics()
    assert (metrics["reward/status/passed"], metrics["reward/status/timeout"], metrics["reward/status/wrong_answer"]
            ) == (0.2, 0.4, 0.2)
    kept = RewardResult.concat([result.select([1, 2]), result.select([0])])
    assert kept.statuses == ["timeout", "timeout", "passed"] and kept.metrics()["reward/status/timeout"] == 2 / 3
    with_extra = result.with_extra("extra", 0.5, RewardRunner(_StatusReward())(["p"] * 5, ["ok"] * 5))
    assert with_extra.statuses == result.statuses  # the main reward's verdicts
    assert not any(key.startswith("reward/status/") for key in RewardRunner(_fragile_reward)(["p"], ["a"]).metrics())
    assert "reward/status/timeout" in RewardRunner(get_reward("code", workers=1))(
        ["p"], ["no program"], ['{"cases": [{"input": "", "output": "1"}]}']).metrics()


class _LazyStatus(float):
    @property
    def status(self):
        raise RuntimeError("lazy status failed")


def test_a_status_that_cannot_be_read_is_none_and_statuses_must_be_names():
    result = RewardRunner(lambda prompt, completion, answer, **meta: _LazyStatus(1.0))(["p"], ["c"])
    assert result.scores.tolist() == [1.0] and result.statuses == [None] and result.errors == 0

    class Spelled:
        statuses = "passed"  # a string is no list of names: it was read as six statuses, one per letter

        def __call__(self, prompt, completion, answer, **meta):
            return 1.0

    with pytest.raises(ValueError, match="statuses must be a list or tuple of names, got 'passed'"):
        RewardRunner(Spelled())


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4"])
def test_a_reward_s_parallel_calls_must_be_a_whole_number(bad):
    reward = _ConcurrentReward(1)
    reward.parallel_calls = bad
    with pytest.raises(ValueError, match="parallel_calls must be a whole number >= 1"):
        RewardRunner(reward)


def test_the_code_reward_runs_its_workers_samples_at_once():
    assert get_reward("code", workers=3).parallel_calls == 3
    assert 1 <= get_reward("code").parallel_calls <= 8
    with pytest.raises(ValueError, match="workers must be a whole number >= 1, got 0"):
        get_reward("code", workers=0)


@pytest.mark.parametrize("threshold", [0.0, -1.0])
def test_a_failed_sample_is_wrong_at_any_threshold(threshold):
    """A sample the reward failed on scores 0 and counts as wrong: with a threshold of 0 or below, where a score of 0
    passes, it still does not (Avg@n, Pass@k and dynamic sampling would count a broken reward as right answers)."""
    runner = RewardRunner(_fragile_reward, correct_threshold=threshold)
    res = runner(["p"] * 3, ["a", "boom", "b"], ["a"] * 3, [{}] * 3, [1, 2, 3])
    assert res.failed.tolist() == [False, True, False] and res.scores.tolist() == [1.0, 0.0, 0.0]
    assert res.correct.tolist() == [True, False, True]


def test_a_failing_reward_is_logged_in_one_line_and_its_traceback_kept_in_first_error(caplog):
    """The terminal of `train`, `eval` and `data audit` gets one line per runner (which sample, the exception); the
    traceback stays in ``first_error``, which the trainer keeps in reward_errors.log."""
    runner = RewardRunner(_fragile_reward)
    with caplog.at_level("WARNING", logger="entrorl.rewards.base"):
        res = runner(["p"] * 3, ["a", "boom", "boom"], ["a"] * 3, [{}] * 3, [1, 2, 3])
    (record,) = caplog.records
    assert "\n" not in record.getMessage() and "Traceback" not in record.getMessage()
    assert "failed on 2 of 3 samples" in record.getMessage()
    assert "sample 1: RuntimeError: kaboom in the reward" in record.getMessage()
    headline, _, traceback_text = res.first_error.partition("\n")
    assert headline == "reward raised for sample 1: RuntimeError: kaboom in the reward"
    assert traceback_text.startswith("Traceback") and "_fragile_reward" in traceback_text


def test_a_runner_warns_once_however_many_batches_fail(caplog):
    runner = RewardRunner(_fragile_reward)
    with caplog.at_level("WARNING", logger="entrorl.rewards.base"):
        for _ in range(3):
            assert runner(["p"], ["boom"], ["a"], [{}], [1]).errors == 1
    assert len(caplog.records) == 1


def test_first_error_numbers_the_failing_sample_from_first_sample():
    """A caller scoring a longer list in parts names the failing sample by its place in the whole list."""
    runner = RewardRunner(_fragile_reward)
    raised = runner(["p"] * 3, ["a", "a", "boom"], ["a"] * 3, first_sample=10)
    assert rewards_base.error_headline(raised.first_error).startswith("reward raised for sample 12: RuntimeError")
    returned = runner(["p"] * 2, ["a", "nan"], ["a"] * 2, first_sample=4)
    assert returned.first_error.startswith("reward for sample 5 returned a non-finite value")


def test_the_first_line_of_first_error_holds_a_multi_line_message_whole():
    def reward(prompt, completion, answer, **meta):
        raise ValueError("bad answer\n  expected 4\n  got 5")

    res = RewardRunner(reward)(["p"], ["c"], ["a"], [{}], [1])
    headline, _, traceback_text = res.first_error.partition("\n")
    assert headline == "reward raised for sample 0: ValueError: bad answer expected 4 got 5"
    assert rewards_base.error_headline(res.first_error) == headline and traceback_text.startswith("Traceback")
    assert rewards_base.error_headline(None) == "" and rewards_base.error_headline("") == ""


def test_a_failed_sample_still_takes_its_overlong_penalty():
    runner = RewardRunner(_fragile_reward, overlong={"max_length": 10, "cache_length": 4})
    res = runner(["p"] * 3, ["boom", "nan", "a"], ["a"] * 3, [{}] * 3, [9, 12, 9])
    assert res.failed.tolist() == [True, True, False] and res.scores.tolist() == [0.0, 0.0, 1.0]
    assert res.penalties.tolist() == [-0.75, -1.0, -0.75]
    assert res.rewards.tolist() == [-0.75, -1.0, 0.25]


def test_reward_results_concatenate_and_select_samples():
    runner = RewardRunner(_fragile_reward, overlong={"max_length": 11, "cache_length": 4})
    first = runner(["p"] * 2, ["a", "b"], ["a"] * 2, [{}] * 2, [1, 12])
    second = runner(["p"] * 3, ["boom", "a", "boom"], ["a"] * 3, [{}] * 3, [1, 1, 1])
    both = RewardResult.concat([first, second])
    assert both.scores.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0] and both.rewards.tolist() == [1.0, -1.0, 0.0, 1.0, 0.0]
    assert both.errors == 2 and both.failed.tolist() == [False, False, True, False, True]
    assert both.first_error == second.first_error and both.reasons[2].startswith("reward raised RuntimeError")
    kept = both.select([1, 3])
    assert kept.rewards.tolist() == [-1.0, 1.0] and kept.errors == 0 and kept.first_error is None
    assert kept.penalties.tolist() == [-1.0, 0.0] and kept.reasons == [both.reasons[1], both.reasons[3]]
    assert both.select(torch.tensor([4])).errors == 1 and both.select([4]).first_error == second.first_error
    assert both.select([2]).reasons == [both.reasons[2]] and both.select([4, 0]).reasons == [both.reasons[4], None]
    assert len(both) == 5 and len(kept) == 2
    masked = both.select(torch.tensor([False, True, False, True, False]))  # a mask: its true rows, not rows 0 and 1
    assert masked.rewards.tolist() == kept.rewards.tolist() and masked.reasons == kept.reasons
    assert both.select([True, False, False, False, True]).errors == 1
    with pytest.raises(ValueError, match="a mask of shape \\(2,\\) for 5 samples"):
        both.select([True, False])


def test_concatenated_results_keep_the_first_failing_part_s_first_error():
    runner = RewardRunner(_fragile_reward)
    first = runner(["p"] * 2, ["a", "boom"], ["a"] * 2, [{}] * 2, [1, 1])
    second = runner(["p"] * 2, ["nan", "boom"], ["a"] * 2, [{}] * 2, [1, 1])
    assert first.first_error != second.first_error
    both = RewardResult.concat([first, second])
    assert both.first_error == first.first_error and both.errors == 3


def test_a_result_refuses_reasons_of_another_length():
    with pytest.raises(ValueError, match="2 reasons for 3 scores"):
        RewardResult(scores=torch.zeros(3), rewards=torch.zeros(3), correct=torch.zeros(3, dtype=torch.bool),
                     reasons=[None, None])


def test_extra_rewards_add_to_the_training_reward_only():
    main = RewardRunner(_fragile_reward)(["p"] * 3, ["a", "b", "boom"], ["a"] * 3, [{}] * 3, [1, 1, 1])
    extra = RewardRunner(lambda prompt, completion, answer, **meta: float(len(completion)))(["p"] * 3, ["a", "bb", "ccc"],
                                                                                              ["a"] * 3, [{}] * 3)
    both = main.with_extra("length", 0.5, extra)
    assert both.rewards.tolist() == [1.5, 1.0, 1.5] and both.scores.tolist() == main.scores.tolist()
    assert both.correct.tolist() == main.correct.tolist() and both.errors == 1 == both.select([0, 1, 2]).errors
    failing_extra = RewardRunner(_fragile_reward)(["p"] * 3, ["boom", "a", "a"], ["a"] * 3, [{}] * 3)
    mixed = main.with_extra("fragile", 1.0, failing_extra)
    assert mixed.errors == 2 == mixed.select([0, 1, 2]).errors
    # sample 0 only the extra failed on (its reason names it), sample 2 the main reward (its own reason)
    assert mixed.reasons[0] == f"extra reward 'fragile': {failing_extra.reasons[0]}" and failing_extra.reasons[0]
    assert mixed.reasons[2] == main.reasons[2] and mixed.reasons[2].startswith("reward raised")
    assert both.metrics()["reward/extra/length_mean"] == pytest.approx(2.0)
    assert both.select([2]).extras["length"].tolist() == [3.0]
    assert RewardResult.concat([both, both]).extras["length"].tolist() == [1.0, 2.0, 3.0] * 2


def test_a_score_or_a_weighted_extra_beyond_float32_s_range_is_a_failure_not_an_inf_reward():
    """Rewards are kept in float32: 1e39 was stored as inf, and the advantages then refused the step's rewards."""
    huge = RewardRunner(lambda prompt, completion, answer, **meta: 1e39 if completion == "big" else 1.0, name="huge")
    result = huge(["p"] * 2, ["big", "small"], ["a"] * 2, [{}] * 2)
    assert result.failed.tolist() == [True, False] and result.rewards.tolist() == [0.0, 1.0] and result.errors == 1
    assert result.reasons[0].startswith("reward returned 1e+39, beyond float32's range")
    main = RewardRunner(lambda prompt, completion, answer, **meta: 1.0)(["p"] * 2, ["a", "b"], ["a"] * 2, [{}] * 2)
    extra = RewardRunner(lambda prompt, completion, answer, **meta: 3e38)(["p"] * 2, ["a", "b"], ["a"] * 2, [{}] * 2)
    both = main.with_extra("large", 2.0, extra)  # 2 x 3e38 overflows
    assert both.rewards.tolist() == [1.0, 1.0] and both.failed.tolist() == [True, True] and both.errors == 2
    assert both.reasons[0] == "extra reward 'large': 2 x its score is beyond float32's range"
    assert both.extras["large"].tolist() == [0.0, 0.0]
    assert both.first_error == "extra reward 'large': for sample 0: 2 x its score is beyond float32's range"
    # the sum is taken in float64: a product beyond float32 with a total within it, and a weight beyond it times 0
    negative = RewardRunner(lambda prompt, completion, answer, **meta: -3e38)(["p"], ["a"], ["a"], [{}])
    assert negative.with_extra("large", 2.0, extra.select([0])).rewards.tolist() == [pytest.approx(3e38, rel=1e-6)]
    zero = RewardRunner(lambda prompt, completion, answer, **meta: 0.0)(["p"], ["a"], ["a"], [{}])
    heavy = main.select([0]).with_extra("zero", 1e39, zero)
    assert heavy.rewards.tolist() == [1.0] and heavy.failed.tolist() == [False]


def test_a_sample_failing_in_the_main_and_an_extra_reward_is_one_failure_told_by_the_main_one():
    main = RewardRunner(_fragile_reward)(["p"] * 3, ["boom", "a", "b"], ["a"] * 3, [{}] * 3)
    extra = RewardRunner(_fragile_reward)(["p"] * 3, ["nan", "boom", "a"], ["a"] * 3, [{}] * 3)
    both = main.with_extra("fragile", 1.0, extra)
    assert both.errors == 2 and both.failed.tolist() == [True, True, False]
    assert both.reasons[0] == main.reasons[0] and both.reasons[1] == f"extra reward 'fragile': {extra.reasons[1]}"
    assert both.first_error == main.first_error != extra.first_error



def test_an_extra_reward_s_failure_is_the_first_error_when_the_main_reward_had_none():
    main = RewardRunner(_fragile_reward)(["p"] * 2, ["a", "b"], ["a"] * 2, [{}] * 2)
    extra = RewardRunner(_fragile_reward)(["p"] * 2, ["a", "boom"], ["a"] * 2, [{}] * 2)
    assert main.first_error is None and extra.first_error is not None
    both = main.with_extra("fragile", 1.0, extra)
    assert both.errors == 1 and both.failed.tolist() == [False, True]
    assert both.first_error == f"extra reward 'fragile': {extra.first_error}"

def test_extra_rewards_add_their_weighted_scores_and_keep_each_name():
    main = RewardRunner(_fragile_reward)(["p"] * 2, ["a", "b"], ["a"] * 2, [{}] * 2)
    overlong = {"max_length": 10, "cache_length": 4}
    length = RewardRunner(lambda prompt, completion, answer, **meta: float(len(completion)), overlong=overlong)(
        ["p"] * 2, ["a", "bb"], ["a"] * 2, [{}] * 2, [20, 20])
    unit = RewardRunner(lambda prompt, completion, answer, **meta: 1.0)(["p"] * 2, ["a", "b"], ["a"] * 2, [{}] * 2)
    both = main.with_extra("length", 0.5, length).with_extra("unit", 2.0, unit)
    assert both.rewards.tolist() == [1.0 + 0.5 + 2.0, 0.0 + 1.0 + 2.0]  # the extra's scores, not its penalties
    assert set(both.extras) == {"length", "unit"} and both.extras["length"].tolist() == [1.0, 2.0]
    assert set(both.metrics()) >= {"reward/extra/length_mean", "reward/extra/unit_mean"}


def test_check_arguments_refuses_meta_a_reward_cannot_take():
    def strict(prompt, completion, answer):
        return 0.0

    def keyword_prompt(prompt, completion, answer, **meta):
        return 0.0

    def positional_only(prompt, completion, answer, /, **meta):
        return 0.0

    RewardRunner(strict).check_arguments([{}, None])
    with pytest.raises(ValueError, match=r"reward 'strict'.*\['level'\].*unexpected keyword"):
        RewardRunner(strict).check_arguments([{}, {"level": 1}])
    with pytest.raises(ValueError, match=r"\['prompt'\].*multiple values"):
        RewardRunner(keyword_prompt).check_arguments([{"prompt": "a column named prompt"}])
    RewardRunner(positional_only).check_arguments([{"prompt": "x", "answer": "y", "level": 2}])


def test_check_arguments_refuses_a_reward_needing_a_meta_column_some_samples_lack():
    def needs_level(prompt, completion, answer, level, **meta):
        return float(level)

    RewardRunner(needs_level).check_arguments([{"level": 1}, {"level": 2, "task": "t"}])
    with pytest.raises(ValueError, match=r"reward 'needs_level'.*\[\].*missing a required argument: 'level'"):
        RewardRunner(needs_level).check_arguments([{"level": 1}, {}])


def test_check_arguments_leaves_rewards_that_score_whole_batches_alone():
    class Batched:
        def __call__(self, prompt, completion, answer):
            return 0.0

        def score_batch(self, prompts, completions, answers, metas):
            return [0.0] * len(completions)

    runner = RewardRunner(Batched())
    runner.check_arguments([{"level": 1}])
    assert runner(["p"], ["c"], ["a"], [{"level": 1}]).errors == 0


@pytest.mark.parametrize("bad", ["nan", "inf", "none", "str", "numpy str"])
def test_runner_counts_bad_return_values(bad):
    res = RewardRunner(_fragile_reward)(["p", "p"], [bad, "x"], ["x", "x"], [{}, {}], [1, 1])
    assert res.errors == 1
    assert res.scores.tolist() == [0.0, 1.0]
    assert "sample 0" in res.first_error and "non-" in res.first_error
    assert torch.isfinite(res.rewards).all()


def test_runner_accepts_bool_int_numpy_and_tensor_returns():
    values = [True, 0, 1, np.float32(0.25), np.int64(1), np.bool_(True), torch.tensor(0.75), np.array([0.5])]

    def reward(prompt, completion, answer, **meta):
        return values[meta["i"]]

    n = len(values)
    res = RewardRunner(reward)(["p"] * n, ["c"] * n, [None] * n, [{"i": i} for i in range(n)], [1] * n)
    assert res.errors == 0, res.first_error
    torch.testing.assert_close(res.scores, torch.tensor([1.0, 0.0, 1.0, 0.25, 1.0, 1.0, 0.75, 0.5]))


def test_runner_overlong_and_metrics():
    runner = RewardRunner(
        _fragile_reward, overlong={"max_length": 11, "cache_length": 4, "penalty_factor": 1.0}, correct_threshold=0.5
    )
    res = runner(["p"] * 4, ["a", "a", "b", "boom"], ["a"] * 4, [{}] * 4, [7, 9, 12, 3])
    torch.testing.assert_close(res.scores, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(res.penalties, torch.tensor([0.0, -0.5, -1.0, 0.0]))
    torch.testing.assert_close(res.rewards, torch.tensor([1.0, 0.5, -1.0, 0.0]))
    assert res.correct.tolist() == [True, True, False, False]
    metrics = res.metrics()
    assert metrics == pytest.approx(
        {
            "reward/mean": 0.125,
            "reward/score_mean": 0.5,
            "reward/accuracy": 0.5,
            "reward/errors": 1.0,
            "reward/overlong_penalty_mean": -0.375,
        }
    )
    assert all(isinstance(v, float) for v in metrics.values())
    # rewards near float32's largest value: their mean is one of them, not an overflowed sum's inf
    huge = RewardRunner(lambda prompt, completion, answer, **meta: 3e38)(["p"] * 4, ["a"] * 4, ["a"] * 4)
    assert huge.metrics()["reward/mean"] == pytest.approx(3e38, rel=1e-6)


def test_runner_input_validation_and_empty_batch():
    with pytest.raises(ValueError, match="different lengths"):
        RewardRunner(_fragile_reward)(["p"], ["a", "b"], ["a", "b"], [{}, {}], [1, 2])
    with pytest.raises(ValueError, match="lengths"):
        runner = RewardRunner(_fragile_reward, overlong={"max_length": 10, "cache_length": 2})
        runner(["p"], ["a"], ["a"], [{}], None)
    with pytest.raises(ValueError, match="unknown overlong"):
        RewardRunner(_fragile_reward, overlong={"max_length": 10, "cache_len": 2})
    with pytest.raises(ValueError, match="cache_length"):
        RewardRunner(_fragile_reward, overlong={"max_length": 10, "cache_length": 20})
    with pytest.raises(ValueError, match="different lengths"):
        RewardRunner(_fragile_reward)(["p", "p"], ["a", "b"], ["a", "b"], [{}, {}], [1])
    res = RewardRunner(_fragile_reward)([], [], [], [], [])
    assert res.scores.shape == (0,) and res.errors == 0 and res.first_error is None
    assert res.metrics()["reward/mean"] == 0.0


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), "0.5"])
def test_runner_refuses_a_threshold_that_is_not_a_finite_number(threshold):
    with pytest.raises(ValueError, match="correct_threshold"):
        RewardRunner(_fragile_reward, correct_threshold=threshold)


def test_an_explicit_threshold_of_zero_is_kept_not_replaced_by_the_default():
    """correct_threshold=0.0 is a threshold (every non-negative score is correct), not a missing one."""
    class PartialCredit:
        correct_threshold = 1.0

        def __call__(self, prompt, completion, answer, **meta):
            return {"right": 1.0, "partial": 0.25}.get(completion, 0.0)

    completions = ["right", "partial", "wrong"]
    runner = RewardRunner(PartialCredit(), correct_threshold=0.0)
    assert runner.correct_threshold == 0.0
    assert runner(["p"] * 3, completions, ["a"] * 3).correct.tolist() == [True, True, True]
    assert RewardRunner(PartialCredit())(["p"] * 3, completions, ["a"] * 3).correct.tolist() == [True, False, False]


def test_accuracy_is_the_share_of_correct_samples_and_score_mean_the_mean_score():
    """reward/accuracy counts samples at or above the threshold; partial credit moves score_mean, not accuracy."""
    scores = {"a": 0.75, "b": 0.5, "c": 0.25, "d": 0.0}
    runner = RewardRunner(lambda prompt, completion, answer, **meta: scores[completion])
    result = runner(["p"] * 4, list(scores), [None] * 4)
    assert result.correct.tolist() == [True, True, False, False]  # 0.5, the default threshold, is correct
    metrics = result.metrics()
    assert metrics["reward/accuracy"] == 0.5 and metrics["reward/score_mean"] == pytest.approx(0.375)


def test_the_overlong_penalty_factor_is_applied_once():
    """rewards = scores + penalties, the penalty already scaled by penalty_factor: beyond max_length it is -factor."""
    runner = RewardRunner(_fragile_reward, overlong={"max_length": 10, "cache_length": 4, "penalty_factor": 0.5})
    result = runner(["p"] * 3, ["a", "a", "b"], ["a"] * 3, None, [6, 8, 12])
    assert result.penalties.tolist() == [0.0, -0.25, -0.5]
    assert result.rewards.tolist() == [1.0, 0.75, -0.5]


def test_runner_refuses_a_reward_that_is_not_callable():
    with pytest.raises(TypeError, match="reward callable"):
        RewardRunner(42)


def test_runner_keeps_the_reason_of_a_returned_object_with_a_score():
    class Verdict:
        def __init__(self, score, reason):
            self.score, self.reason = score, reason

    def reward(prompt, completion, answer, **meta):
        return Verdict(0.75, "close enough") if completion == "x" else Verdict(0.0, None)

    res = RewardRunner(reward)(["p", "p"], ["x", "y"], ["a", "a"])
    assert res.scores.tolist() == [0.75, 0.0] and res.reasons == ["close enough", None] and res.errors == 0

    class ScoreWithReason(float):  # a number that says why, as the math reward's verdict does
        reason = "boxed answer matches"

    def number_reward(prompt, completion, answer, **meta):
        return ScoreWithReason(1.0) if completion == "x" else Verdict(0.5, 42)  # a reason that is no string is dropped

    res = RewardRunner(number_reward)(["p", "p"], ["x", "y"], ["a", "a"])
    assert res.scores.tolist() == [1.0, 0.5] and res.reasons == ["boxed answer matches", None] and res.errors == 0


def test_runner_with_builtin_math_and_spec_string():
    runner = RewardRunner("math")
    completions = [r"\boxed{\frac12}", "the answer is 0.4", ""]
    res = runner(["q"] * 3, completions, ["0.5"] * 3, [{}] * 3, [5] * 3)
    assert res.scores.tolist() == [1.0, 0.0, 0.0] and res.errors == 0


def test_runner_reasoning_gym_metas(arithmetic_records):
    runner = RewardRunner(get_reward("reasoning_gym", task="basic_arithmetic"))
    recs = arithmetic_records
    completions = [f"<answer>{r['answer']}</answer>" for r in recs]
    completions[0] = "<answer>nonsense</answer>"
    prompts, answers, metas = ([r[k] for r in recs] for k in ("prompt", "answer", "meta"))
    res = runner(prompts, completions, answers, metas, [10] * 5)
    assert res.errors == 0
    assert res.scores.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0]


# --------------------------------------------------------------------------------------------
# registry and specs
# --------------------------------------------------------------------------------------------


def test_available_rewards_lists_builtins():
    names = dict(available_rewards())
    assert {"exact_match", "math", "reasoning_gym"} <= set(names)
    assert all(isinstance(d, str) and d for d in names.values())


def test_available_rewards_are_sorted_by_name(registry_sandbox):
    register_reward("aaa_first_by_name", description="registered last")(lambda p, c, a, **m: 0.0)
    names = [name for name, _ in available_rewards()]
    assert names == sorted(names) and names[0] == "aaa_first_by_name"


def test_the_package_exports_the_runner_registry_and_shaping():
    import entrorl.rewards as rewards

    assert set(rewards_base.__all__) | {"overlong_penalty", "overlong_penalties"} <= set(rewards.__all__)
    assert all(hasattr(rewards, name) for name in rewards.__all__)


def test_unknown_name_lists_registered_ones():
    with pytest.raises(ValueError) as info:
        get_reward("maths")
    message = str(info.value)
    assert "'maths'" in message
    for name in ("exact_match", "math", "reasoning_gym"):
        assert name in message
    with pytest.raises(ValueError, match="registered rewards"):
        check_reward_spec("maths")
    with pytest.raises(ValueError):
        get_reward("")


def test_plain_reward_takes_no_options():
    with pytest.raises(ValueError, match="takes no options"):
        get_reward("exact_match", foo=1)
    with pytest.raises(ValueError, match="takes no options"):
        check_reward_spec("exact_match", foo=1)
    check_reward_spec("exact_match")
    check_reward_spec("math", tolerance=1e-6)
    with pytest.raises(ValueError):
        check_reward_spec("math", tolerance=-1)


@pytest.fixture
def registry_sandbox(monkeypatch):
    monkeypatch.setattr(rewards_base, "_REGISTRY", dict(rewards_base._REGISTRY))


def test_register_reward_function_and_factory(registry_sandbox):
    @register_reward("length_bonus", description="test reward")
    def length_bonus(prompt, completion, answer, **meta):
        return len(completion) / 10

    @register_reward("scaled", description="test factory", factory=True)
    def scaled(*, scale: float = 1.0):
        return lambda prompt, completion, answer, **meta: scale * float(completion == answer)

    assert ("length_bonus", "test reward") in available_rewards()
    assert get_reward("length_bonus")("", "abcde", None) == 0.5
    assert get_reward("scaled", scale=3.0)("", "x", "x") == 3.0
    assert get_reward("scaled")("", "x", "x") == 1.0
    with pytest.raises(ValueError, match="already registered"):
        register_reward("length_bonus", description="again")(lambda p, c, a, **m: 0.0)
    with pytest.raises(ValueError, match="accepted options"):
        get_reward("scaled", factor=2)
    for bad_name in ("a:b", " padded", "padded ", "", "  "):
        with pytest.raises(ValueError, match="invalid reward name"):
            register_reward(bad_name, description="")


def test_a_factory_that_returns_no_callable_is_refused(registry_sandbox):
    @register_reward("entrorl_test_broken_factory", description="test factory", factory=True)
    def broken_factory(*, level: int = 1):
        return level

    with pytest.raises(ValueError, match="returned a non-callable int"):
        get_reward("entrorl_test_broken_factory", level=2)


_SPEC_MODULE = textwrap.dedent(
    '''
    from entrorl.rewards import register_reward

    def contains_answer(prompt, completion, answer, **meta):
        return float(answer is not None and answer in completion)

    def make_threshold(*, at: int = 3):
        def reward(prompt, completion, answer, **meta):
            return float(len(completion) >= at)
        return reward

    def make_weighted(threshold=0.5, strict=False, weight=1.0):
        def reward(prompt, completion, answer, **meta):
            return weight * float(len(completion) >= threshold)
        return reward

    class Scaled:
        def __init__(self, scale=2.0):
            self.scale = scale
        def __call__(self, prompt, completion, answer, **meta):
            return self.scale

    @register_reward("entrorl_test_marked_factory", description="x", factory=True)
    def marked_factory():
        return contains_answer

    NOT_CALLABLE = 42

    from entrorl.rewards import MathReward
    loose_math = MathReward(tolerance=1e-3)  # an instance of a registered reward class

    class Builder:
        def __call__(self):
            return contains_answer

    builder = register_reward("entrorl_test_builder_instance", description="x", factory=True)(Builder())
    '''
)


@pytest.fixture
def spec_module(tmp_path, monkeypatch, registry_sandbox):
    (tmp_path / "entrorl_test_user_rewards.py").write_text(_SPEC_MODULE)
    (tmp_path / "entrorl_test_broken_rewards.py").write_text("raise RuntimeError('module is broken')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "entrorl_test_user_rewards"
    for name in ("entrorl_test_user_rewards", "entrorl_test_broken_rewards"):
        sys.modules.pop(name, None)


def test_a_reward_module_in_the_working_directory_is_found_by_the_console_script(tmp_path, monkeypatch):
    """The ``entrorl`` command, unlike ``python -m entrorl.cli``, has no working directory on sys.path: a module beside
    the config is looked for there last (so it shadows nothing installed), and a module found nowhere says where it was
    looked for."""
    (tmp_path / "entrorl_test_cwd_rewards.py").write_text(
        "def parity(prompt, completion, answer, **meta):\n    return float(len(completion) % 2)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "entrorl_test_cwd_rewards", raising=False)
    with pytest.raises(ValueError, match=f"\\(ModuleNotFoundError: No module named .entrorl_test_nowhere.; looked for on "
                                         f"sys.path, then in the working directory {tmp_path}\\)"):
        get_reward("entrorl_test_nowhere:parity")
    assert str(tmp_path) not in sys.path  # a module found nowhere leaves sys.path as it was
    assert get_reward("entrorl_test_cwd_rewards:parity")("", "abc", None) == 1.0
    assert sys.path[-1] == str(tmp_path)
    # a module that is found but fails on an import of its own says so, not that it was looked for
    (tmp_path / "entrorl_test_broken_import.py").write_text("import entrorl_test_missing_dependency\n")
    with pytest.raises(ValueError) as info:
        get_reward("entrorl_test_broken_import:parity")
    assert "No module named 'entrorl_test_missing_dependency')" in str(info.value) and "looked for" not in str(info.value)
    # such a module found on sys.path leaves the working directory out of it
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "entrorl_test_broken_elsewhere.py").write_text("import entrorl_test_missing_dependency\n")
    monkeypatch.setattr(sys, "path", [str(elsewhere)] + [entry for entry in sys.path if entry != str(tmp_path)])
    with pytest.raises(ValueError, match="entrorl_test_missing_dependency"):
        get_reward("entrorl_test_broken_elsewhere:parity")
    assert str(tmp_path) not in sys.path
    sys.modules.pop("entrorl_test_broken_elsewhere", None)
    sys.modules.pop("entrorl_test_broken_import", None)
    sys.modules.pop("entrorl_test_cwd_rewards", None)


def test_an_instance_of_a_registered_reward_class_is_a_reward_not_a_factory(spec_module):
    """``module:loose_math`` names a configured MathReward: it scores as that instance does (its own tolerance), where
    the class's registration mark, inherited by the instance, had it called as a factory with no arguments."""
    reward = get_reward(f"{spec_module}:loose_math")
    assert reward.options.tolerance == 1e-3 and float(reward("", r"\boxed{3.1416}", "3.14159")) == 1.0
    check_reward_spec(f"{spec_module}:loose_math")
    assert RewardRunner(f"{spec_module}:loose_math")(["p"], [r"\boxed{2}"], ["2"]).scores.tolist() == [1.0]
    # an instance registered as a factory itself keeps its mark: it is called to build the reward
    assert get_reward(f"{spec_module}:builder")("", "xyz", "y") == 1.0


def test_options_given_to_a_plain_reward_function_say_that_it_takes_none(spec_module):
    """A plain reward function named by import path is not a factory: options for it are refused as such, not with
    the signature error of calling it with only the options ("missing a required argument: 'prompt'")."""
    for check in (get_reward, check_reward_spec):
        with pytest.raises(ValueError) as info:
            check(f"{spec_module}:contains_answer", k=1)
        message = str(info.value)
        assert f"reward '{spec_module}:contains_answer' is a plain reward function" in message
        assert "takes no options, so 'k' cannot be given" in message and "factory" in message
        assert "missing a required argument" not in message and "accepted options" not in message
    with pytest.raises(ValueError, match="accepted options"):  # a factory given an unknown option: its options listed
        get_reward(f"{spec_module}:make_threshold", k=1)
    with pytest.raises(ValueError, match="accepted options"):
        get_reward(f"{spec_module}:Scaled", k=1)
    # a factory whose three options have defaults is no reward function: a mistyped option lists the right ones
    with pytest.raises(ValueError, match=r"accepted options: \['threshold', 'strict', 'weight'\]"):
        get_reward(f"{spec_module}:make_weighted", treshold=0.2)


def test_import_path_specs(spec_module):
    fn = get_reward(f"{spec_module}:contains_answer")
    assert fn("", "it is 42", "42") == 1.0
    assert get_reward(f"{spec_module}:make_threshold", at=2)("", "abc", None) == 1.0
    assert get_reward(f"{spec_module}:make_threshold", at=5)("", "abc", None) == 0.0
    assert get_reward(f"{spec_module}:Scaled")("", "", None) == 2.0  # a class is a factory
    assert get_reward(f"{spec_module}:Scaled", scale=0.5)("", "", None) == 0.5
    assert get_reward(f"{spec_module}:marked_factory")("", "42", "42") == 1.0  # registered as a factory
    check_reward_spec(f"{spec_module}:contains_answer")
    check_reward_spec(f"{spec_module}:make_threshold", at=4)
    # spaces around a name or the parts of an import path (as YAML or --set may leave them) are not part of it
    assert get_reward(" exact_match ") is get_reward("exact_match")
    assert get_reward(f" {spec_module} : contains_answer ") is fn
    with pytest.raises(ValueError, match="accepted options"):
        check_reward_spec(f"{spec_module}:make_threshold", nope=4)
    # runner with an import-path spec string
    res = RewardRunner(f"{spec_module}:contains_answer")(["p"], ["x 42"], ["42"], [{}], [3])
    assert res.scores.tolist() == [1.0]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("entrorl_test_no_such_module:f", "cannot import module 'entrorl_test_no_such_module'"),
        ("entrorl_test_broken_rewards:f", "module is broken"),
        ("entrorl_test_user_rewards:missing", "has no attribute 'missing'"),
        ("entrorl_test_user_rewards:NOT_CALLABLE", "not callable"),
        ("entrorl_test_user_rewards:", "package.module:function"),
    ],
)
def test_bad_import_path_specs(spec_module, spec, match):
    for check in (get_reward, check_reward_spec):
        with pytest.raises(ValueError, match=match) as info:
            check(spec)
        assert repr(spec) in str(info.value)


def test_import_rewards_is_light():
    code = (
        "import sys, entrorl.rewards; "
        "heavy = [m for m in ('math_verify', 'reasoning_gym', 'sympy', 'entrorl.trainer', 'entrorl.lab') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


class _NotAnException(BaseException):
    pass


def test_runner_catches_base_exceptions_but_not_interrupts():
    def reward(prompt, completion, answer, **meta):
        if completion == "base":
            raise _NotAnException("timeout-like failure")
        if completion == "interrupt":
            raise KeyboardInterrupt
        if completion == "exit":
            raise SystemExit(3)
        if completion == "generator exit":
            raise GeneratorExit
        return 1.0

    res = RewardRunner(reward)(["p", "p"], ["base", "ok"], [None, None], [{}, {}], [1, 1])
    assert res.errors == 1 and "timeout-like failure" in res.first_error
    assert res.scores.tolist() == [0.0, 1.0]
    with pytest.raises(KeyboardInterrupt):
        RewardRunner(reward)(["p"], ["interrupt"], [None], [{}], [1])
    with pytest.raises(SystemExit):
        RewardRunner(reward)(["p"], ["exit"], [None], [{}], [1])
    with pytest.raises(GeneratorExit):
        RewardRunner(reward)(["p"], ["generator exit"], [None], [{}], [1])

    class InterruptedBatch:  # a judge's batch call interrupted: stopped, not retried sample by sample
        def __call__(self, prompt, completion, answer, **meta):
            return 1.0

        def score_batch(self, prompts, completions, answers, metas):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        RewardRunner(InterruptedBatch())(["p"], ["c"], [None])


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  $\\frac{1}{2}$. ", r"\frac{1}{2}"),
        (r"\(x+1\)", "x+1"),
        ("**42**", "42"),
        ("$a$ and $b$", "$a$ and $b$"),
        ("3.", "3"),
    ],
)
def test_normalize_answer(raw, expected):
    from entrorl.rewards.math import normalize_answer

    assert normalize_answer(raw) == expected


def test_math_reward_fuzz_never_raises(math_reward):
    import random

    rng = random.Random(0)
    alphabet = list("0123456789+-*/^_{}()[]\\$.,= xyz%") + [r"\frac", r"\boxed{", r"\sqrt", r"\pi", "answer is "]
    for _ in range(60):
        completion = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        reference = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
        assert math_reward("", completion, reference) in (0.0, 1.0)
        assert exact_match("", completion, reference) in (0.0, 1.0)


def test_runner_uses_a_batch_method_and_falls_back_to_samples_when_it_fails():
    class Batched:
        def __init__(self, fail_batch: bool):
            self.fail_batch, self.batch_calls, self.sample_calls = fail_batch, 0, 0

        def __call__(self, prompt, completion, answer, **meta):
            self.sample_calls += 1
            if completion == "boom":
                raise RuntimeError("bad sample")
            return float(completion == answer)

        def score_batch(self, prompts, completions, answers, metas):
            self.batch_calls += 1
            if self.fail_batch:
                raise RuntimeError("batch endpoint down")
            return [float(c == a) if c != "nan" else float("nan") for c, a in zip(completions, answers)]

    fine = Batched(fail_batch=False)
    result = RewardRunner(fine)(["p"] * 3, ["1", "2", "nan"], ["1", "1", "1"])
    assert (fine.batch_calls, fine.sample_calls) == (1, 0)
    assert result.scores.tolist() == [1.0, 0.0, 0.0] and result.errors == 1 and "non-finite" in result.reasons[2]
    broken = Batched(fail_batch=True)
    result = RewardRunner(broken)(["p"] * 3, ["1", "boom", "2"], ["1", "1", "1"])
    assert (broken.batch_calls, broken.sample_calls) == (1, 3)
    assert result.scores.tolist() == [1.0, 0.0, 0.0] and result.errors == 1 and "bad sample" in result.reasons[1]


class SampleCountingReward:
    """Exact match, counting the samples it scores one at a time; subclasses add a batch method."""

    sample_calls = 0

    def __call__(self, prompt, completion, answer, **meta):
        self.sample_calls += 1
        return float(completion == answer)


@pytest.mark.parametrize("extra_values", [-1, 1], ids=["too few", "too many"])
def test_runner_scores_sample_by_sample_when_a_batch_method_returns_the_wrong_number_of_values(extra_values):
    class Miscounted(SampleCountingReward):
        def score_batch(self, prompts, completions, answers, metas):
            return [1.0] * (len(completions) + extra_values)

    miscounted = Miscounted()
    result = RewardRunner(miscounted)(["p"] * 3, ["1", "2", "1"], ["1", "1", "1"])
    assert miscounted.sample_calls == 3 and result.scores.tolist() == [1.0, 0.0, 1.0] and result.errors == 0


def test_overlong_penalties_of_many_lengths_equal_the_penalty_of_each_with_any_factor():
    """The tensor form is the scalar form per length, penalty_factor included beyond max_length (-factor, not -1)."""
    lengths = [0, 6, 8, 10, 12, 40]
    settings = dict(max_length=10, cache_length=4, penalty_factor=0.5)
    penalties = overlong_penalties(lengths, **settings).tolist()
    assert penalties == pytest.approx([overlong_penalty(length, **settings) for length in lengths])
    assert penalties[-2:] == pytest.approx([-0.5, -0.5])
    # each penalty is the scalar one rounded to float32 once, not a float32 computation rounded at every operation
    odd = dict(max_length=10, cache_length=3, penalty_factor=0.3)
    assert overlong_penalties(list(range(12)), **odd).tolist() == torch.tensor(
        [overlong_penalty(length, **odd) for length in range(12)], dtype=torch.float32).tolist()


@pytest.mark.parametrize("lengths", [torch.zeros(0, dtype=torch.long), []], ids=["empty tensor", "empty list"])
def test_overlong_penalties_of_no_lengths_are_an_empty_float32_tensor(lengths):
    """A batch without responses has no penalties: [n] with n = 0, whether the lengths come as a tensor or a list."""
    penalties = overlong_penalties(lengths, max_length=10, cache_length=4)
    assert penalties.dtype == torch.float32 and penalties.shape == (0,)


def test_an_overlong_config_is_returned_with_plain_json_numbers_and_the_default_factor():
    """validate_overlong gives a plain dict: integer lengths, a float factor (1.0 when not given), whatever number
    types the config held, so that it can be written to JSON as it is."""
    from entrorl.rewards.shaping import validate_overlong

    config = validate_overlong({"max_length": np.int64(10), "cache_length": 4, "penalty_factor": np.float32(0.5)})
    assert config == {"max_length": 10, "cache_length": 4, "penalty_factor": 0.5}
    assert [type(value) for value in config.values()] == [int, int, float]
    assert json.loads(json.dumps(config)) == config
    assert validate_overlong({"max_length": 10, "cache_length": 4}) == {"max_length": 10, "cache_length": 4,
                                                                        "penalty_factor": 1.0}


def test_an_answer_in_the_overlong_interval_is_still_correct():
    """Correct means score >= threshold: the length penalty lowers the reward, not the answer's correctness
    (accuracy, Pass@k and dynamic sampling read it)."""
    runner = RewardRunner(get_reward("exact_match"), overlong={"max_length": 10, "cache_length": 4})
    result = runner(["p"], ["\\boxed{5}"], ["5"], None, [9])  # penalty (6 - 9) / 4 = -0.75
    assert float(result.scores[0]) == 1.0 and float(result.rewards[0]) == pytest.approx(0.25)
    assert bool(result.correct[0])


def test_a_multi_element_tensor_or_array_returned_is_a_failed_sample_said_to_be_non_scalar():
    values = [torch.tensor([0.5, 1.0]), np.array([0.5, 1.0]), 0.25]

    def reward(prompt, completion, answer, **meta):
        return values[meta["i"]]

    res = RewardRunner(reward)(["p"] * 3, ["c"] * 3, None, [{"i": i} for i in range(3)])
    assert res.failed.tolist() == [True, True, False] and res.errors == 2
    assert res.scores.tolist() == [0.0, 0.0, 0.25]
    assert res.reasons[:2] == ["reward returned a non-scalar Tensor", "reward returned a non-scalar ndarray"]
    assert res.first_error == "reward for sample 0 returned a non-scalar Tensor"


def test_a_runner_without_answers_or_metas_calls_the_reward_with_answer_none_and_no_meta():
    seen = []

    def reward(prompt, completion, answer, **meta):
        seen.append((answer, meta))
        return 1.0

    assert RewardRunner(reward)(["p", "q"], ["a", "b"]).errors == 0
    assert seen == [(None, {}), (None, {})]


def test_a_batch_method_failing_with_a_base_exception_falls_back_to_scoring_sample_by_sample():
    class _JudgeTimeout(BaseException):  # as Math-Verify's TimeoutException: not an Exception
        pass

    class Batched(SampleCountingReward):
        def score_batch(self, prompts, completions, answers, metas):
            raise _JudgeTimeout("batch call timed out")

    batched = Batched()
    result = RewardRunner(batched)(["p"] * 2, ["1", "2"], ["1", "1"])
    assert batched.sample_calls == 2 and result.scores.tolist() == [1.0, 0.0] and result.errors == 0


def test_an_extra_reward_leaves_the_main_reason_of_samples_neither_reward_failed():
    class Verdict:
        def __init__(self, score, reason):
            self.score, self.reason = score, reason

    main = RewardRunner(lambda prompt, completion, answer, **meta: Verdict(0.0, "main: wrong answer"))(
        ["p"] * 2, ["a", "b"], ["a"] * 2)
    extra = RewardRunner(lambda prompt, completion, answer, **meta: Verdict(1.0, "format: ok"))(["p"] * 2, ["a", "b"])
    both = main.with_extra("format", 0.5, extra)
    assert both.reasons == ["main: wrong answer", "main: wrong answer"] and both.errors == 0
    assert both.rewards.tolist() == [0.5, 0.5]


def test_a_result_refuses_more_reasons_than_scores():
    with pytest.raises(ValueError, match="3 reasons for 2 scores"):
        RewardResult(scores=torch.zeros(2), rewards=torch.zeros(2), correct=torch.zeros(2, dtype=torch.bool),
                     reasons=[None, None, None])


def test_the_runner_keeps_each_score_exactly_as_returned():
    values = [1 / 3, 0.125, 2 / 3, 0.999]

    def reward(prompt, completion, answer, **meta):
        return values[meta["i"]]

    res = RewardRunner(reward)(["p"] * 4, ["c"] * 4, None, [{"i": i} for i in range(4)])
    assert res.scores.tolist() == torch.tensor(values, dtype=torch.float32).tolist()
    assert res.correct.tolist() == [False, False, True, True]


@pytest.mark.parametrize(("flag", "failed"), [(True, True), (np.bool_(True), True), (False, False), (np.bool_(False), False),
                                              ("yes", False), (1, False)])
def test_a_returned_value_whose_failed_flag_is_a_true_boolean_counts_as_failed(flag, failed):
    """A judge's placeholder score with ``failed`` true (a Python or a numpy boolean) is a failed sample, scored 0 and
    counted; a ``failed`` that is not a boolean (some other object named so) does not make it one."""

    class Score:
        score, reason = 1.0, "judge timeout"

    Score.failed = flag
    result = RewardRunner(lambda prompt, completion, answer, **meta: Score())(["p"], ["c"])
    assert (result.failed.tolist(), result.errors, result.scores.tolist()) == (([True], 1, [0.0]) if failed else ([False], 0, [1.0]))


def test_a_reward_class_or_factory_given_as_an_object_is_built_as_its_import_path_would_be():
    """get_reward(MathReward) builds the reward, as get_reward("entrorl.rewards.math:MathReward") does (the class
    itself, called as fn(prompt, completion, answer), would construct a reward with those as options); a plain
    function or a reward object is returned as it is."""
    from entrorl.rewards.math import MathReward

    built, by_path = get_reward(MathReward), get_reward("entrorl.rewards.math:MathReward")
    assert type(built) is type(by_path) is MathReward
    assert float(built("1+1=", "\\boxed{2}", "2")) == float(by_path("1+1=", "\\boxed{2}", "2")) == 1.0
    assert get_reward(built) is built

    def plain(prompt, completion, answer, **meta):
        return 1.0

    assert get_reward(plain) is plain


def test_an_overlong_budget_of_zero_tokens_is_refused_by_its_own_name():
    """max_length 0 is refused as max_length (a positive integer), before cache_length is checked against it."""
    from entrorl.rewards.shaping import validate_overlong

    with pytest.raises(ValueError, match="max_length must be a positive integer, got 0"):
        overlong_penalty(5, max_length=0, cache_length=1)
    with pytest.raises(ValueError, match="max_length must be a positive integer, got 0"):
        validate_overlong({"max_length": 0, "cache_length": 1})


def test_a_verdict_at_another_threshold_never_counts_a_failed_score_and_follows_selection_and_extras():
    """correct_at(t): scores >= t, except where the reward itself failed (its 0 is no score) — at t <= 0 too; an
    extra reward's failure leaves the main score's verdict standing; select and concat keep which scores failed."""
    main = RewardResult(scores=torch.tensor([-1.0, 0.0, 0.5]), rewards=torch.tensor([-1.0, 0.0, 0.5]),
                        correct=torch.tensor([False, False, True]), failed=torch.tensor([False, True, False]))
    assert main.correct_at(0.0).tolist() == [False, False, True]
    assert main.correct_at(-2.0).tolist() == [True, False, True]
    extra = RewardResult(scores=torch.zeros(3), rewards=torch.zeros(3), correct=torch.zeros(3, dtype=torch.bool),
                         failed=torch.tensor([True, False, True]))
    both = main.with_extra("format", 1.0, extra)
    assert both.failed.tolist() == [True, True, True] and both.correct_at(-2.0).tolist() == [True, False, True]
    assert both.select([2, 1]).correct_at(-2.0).tolist() == [True, False]
    assert RewardResult.concat([both, both.select([1, 0, 2])]).correct_at(-2.0).tolist() == [True, False, True, False, True, True]


@pytest.mark.parametrize(("score", "threshold"), [(0.49999999, 0.5), (0.3, 0.30000001), (1 - 1e-8, 1.0)])
def test_a_score_just_below_the_threshold_is_not_correct_though_float32_rounds_it_up_to_it(score, threshold):
    """Scores are kept in float32, where 0.49999999 is 0.5; correctness compares the score the reward returned."""
    result = RewardRunner(lambda prompt, completion, answer, **meta: score, correct_threshold=threshold)(
        ["p", "p"], ["c", "c"], ["a", "a"])
    assert float(result.scores[0]) >= threshold  # rounded, it would reach the threshold
    assert not result.correct.any() and not result.correct_at(threshold).any()
    assert result.correct_at(score).all()
    picked = RewardResult.concat([result.select([1]), result.with_extra("format", 1.0, result).select([0])])
    assert not picked.correct_at(threshold).any() and picked.correct_at(score).all()


@pytest.mark.parametrize(("spec", "written"), [
    ("my_rewards.py:score", "my_rewards:score"),
    ("./my_rewards.py:score", "my_rewards:score"),
    ("some/folder/my_rewards.py:score", "some.folder.my_rewards:score"),
    ("{cwd}/some/folder/my_rewards.py:score", "some.folder.my_rewards:score"),
    ("pkg/__init__.py:score", "pkg:score"),
])
def test_a_reward_named_by_its_file_is_refused_with_the_import_path_to_write(tmp_path, monkeypatch, spec, written):
    """verl names a custom reward by file and function; entrorl by import path: the error gives the one to write,
    and that one imports the reward from the working directory."""
    for folder in (tmp_path / "some" / "folder", tmp_path, tmp_path / "pkg"):
        folder.mkdir(parents=True, exist_ok=True)
    source = "def score(prompt, completion, answer, **meta):\n    return 1.0\n"
    (tmp_path / "some" / "folder" / "my_rewards.py").write_text(source)
    (tmp_path / "my_rewards.py").write_text(source)
    (tmp_path / "pkg" / "__init__.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [name for name in sys.modules if name.split(".")[0] in ("some", "my_rewards", "pkg")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ValueError, match="name the module by its import path, not by its file: "
                                         + re.escape(f"'{written}' (from the working directory)")):
        check_reward_spec(spec.format(cwd=tmp_path))
    check_reward_spec(written)


@pytest.mark.parametrize("folder", ["test", "v1.2"])
def test_a_reward_file_in_a_folder_no_import_path_reaches_is_named_with_its_folder_for_pythonpath(tmp_path, monkeypatch,
                                                                                                   folder):
    """'test' is the standard library's package and 'v1.2' no identifier: test.my_rewards / v1.2.my_rewards would not
    import the file, so the advice is its folder on PYTHONPATH, and that works."""
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "my_rewards.py").write_text("def score(prompt, completion, answer, **meta):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    with pytest.raises(ValueError, match=re.escape(f"'my_rewards:score' with {tmp_path / folder} on PYTHONPATH")):
        check_reward_spec(f"{folder}/my_rewards.py:score")
    sys.path.insert(0, str(tmp_path / folder))
    check_reward_spec("my_rewards:score")


def test_a_reward_file_outside_the_working_directory_is_named_with_its_folder_for_pythonpath(tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    with pytest.raises(ValueError, match=re.escape(f"'my_rewards:score' with {tmp_path / 'elsewhere'} on PYTHONPATH")):
        check_reward_spec(f"{tmp_path}/elsewhere/my_rewards.py:score")
