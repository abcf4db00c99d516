"""The data audit: grouping sampled answers, hard versus wrong verdicts, the pass-rate histogram, band
selection, rows written back in the input's format, the output files, and ``entrorl data audit`` end to
end on a data set with planted wrong references."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from entrorl.cli import app
from entrorl.data import PromptRecord, load_prompts
from entrorl.data.audit import (
    VERDICTS,
    AuditThresholds,
    audit_prompt,
    band_selection,
    canonical_answer,
    classify,
    group_answers,
    pass_rate_histogram,
    verdict_counts,
    write_selected_rows,
)
from entrorl.rewards import MathReward, ReasoningGymReward, RewardRunner, exact_match, get_reward
from entrorl.rollout import SamplingParams
from entrorl.trainer.audit import (
    AuditResult,
    TooLongPrompt,
    answer_tools,
    audit_records,
    default_audit_dir,
    write_audit_outputs,
)

THRESHOLDS = AuditThresholds(consensus=0.5, low_pass_rate=0.25)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def numeric_equal(a: str, b: str) -> bool:
    return float(a) == float(b)


# --------------------------------------------------------------------------------------------------
# grouping and verdicts
# --------------------------------------------------------------------------------------------------


def test_correct_samples_form_one_reference_group_whatever_their_spelling():
    answers = ["4", "4.0", "7", None, "4", "7", "7"]
    correct = [True, True, False, True, True, False, False]
    groups = group_answers(answers, correct)
    assert [(g.answer, g.count, g.matches_reference) for g in groups] == [("4", 3, True), ("7", 3, False)]
    assert groups[0].spellings == ("4", "4.0")  # the unanswered correct sample joins no group
    # a single correct sample is a group too
    single = group_answers(["7", "4", "7"], [False, True, False])
    assert [(g.answer, g.count, g.matches_reference) for g in single] == [("7", 2, False), ("4", 1, True)]


def test_an_answer_that_is_the_reference_joins_the_reference_group_even_when_the_reward_rejected_it():
    """A reward stricter than its answer extraction (a format rule) scores the reference's own answer 0: such samples
    are the reference's group (same canonical spelling, or equivalent to the reference), so a model that agrees with
    the reference makes the prompt hard, never looks_wrong. Without a reference, the reward alone decides."""
    answers = ["7", " 7 ", "7", "9"]
    correct = [False, False, False, False]
    assert audit_prompt(answers, correct).verdict == "looks_wrong"  # the reward's judgement alone
    audit = audit_prompt(answers, correct, reference="7")
    assert (audit.verdict, audit.majority_answer, audit.majority_share, audit.majority_matches_reference) == (
        "hard", "7", 0.75, True)
    assert audit.pass_rate == 0.0  # the pass rate is still the reward's
    groups = group_answers(["1/2", "0.5", "3", "0.5"], [True, False, False, False], reference="1/2",
                           equivalent=lambda a, b: {a, b} <= {"1/2", "0.5"})
    assert [(g.answer, g.count, g.matches_reference) for g in groups] == [("0.5", 3, True), ("3", 1, False)]
    calls = []

    def counting(a, b):
        calls.append((a, b))
        return False

    group_answers(["3", "3 ", "4", "3"], [False] * 4, reference="5", equivalent=counting)
    # once per canonical spelling, the answer first, as a reward asks its checker
    assert [call for call in calls if call[1] == "5"] == [("3", "5"), ("4", "5")]



def test_a_rejected_answer_is_the_reference_by_canonical_spelling_whichever_spelling_comes_first():
    """'Paris ' and 'PARIS' are the reference 'Paris' up to whitespace and case, without any equivalence: rejected by
    the reward, they still join the reference group, also when a spelling other than the reference's comes first."""
    groups = group_answers(["Paris ", "PARIS", "Rome", "Paris"], [False] * 4, reference="Paris")
    assert [(g.answer, g.count, g.matches_reference, g.spellings) for g in groups] == [
        ("Paris ", 3, True, ("Paris ", "PARIS", "Paris")), ("Rome", 1, False, ("Rome",))]
    audit = audit_prompt(["  paris", "Rome", "paris  "], [False] * 3, reference="Paris", thresholds=THRESHOLDS)
    assert (audit.majority_matches_reference, audit.majority_share, audit.verdict) == (True, 2 / 3, "hard")

def test_wrong_answers_group_by_canonical_spelling_then_by_equivalence():
    answers = ["X = 2", "x  =  2", "0.5", "1/2", ".5", "9", "oops"]
    correct = [False] * 7
    plain = group_answers(answers, correct)
    assert [(g.answer, g.count) for g in plain] == [("X = 2", 2), ("0.5", 1), ("1/2", 1), (".5", 1), ("9", 1), ("oops", 1)]

    def fractional(a: str, b: str) -> bool:
        return abs(eval(a) - eval(b)) < 1e-12  # raises on "X = 2" and "oops": not equivalent

    merged = group_answers(answers, correct, equivalent=fractional)
    assert [(g.answer, g.count) for g in merged] == [("0.5", 3), ("X = 2", 2), ("9", 1), ("oops", 1)]
    assert merged[0].spellings == ("0.5", "1/2", ".5")
    assert canonical_answer("  X \t=\n 2 ") == "x = 2"


def test_ties_go_to_the_group_seen_first_and_bad_inputs_are_refused():
    groups = group_answers(["b", "a", "a", "b", "c"], [False] * 5)
    assert [(g.answer, g.count) for g in groups] == [("b", 2), ("a", 2), ("c", 1)]
    with pytest.raises(ValueError, match="3 answers but 2 correctness flags"):
        group_answers(["1", "2", "3"], [True, False])
    with pytest.raises(TypeError, match="answer 1 is a int"):
        group_answers(["1", 2], [True, False])
    with pytest.raises(ValueError, match="no samples"):
        audit_prompt([], [])


def test_a_tie_between_groups_goes_to_the_group_whose_first_sample_came_first():
    """A group spelled two ways is ordered by its earliest sample, not its latest."""
    groups = group_answers(["b", "a", "a", "B"], [False] * 4)
    assert [(g.answer, g.count, g.spellings) for g in groups] == [("b", 2, ("b", "B")), ("a", 2, ("a",))]


def test_a_correct_sample_without_an_extracted_answer_counts_toward_the_pass_rate():
    """The pass rate counts every correct sample, answered or not; the majority share counts answered ones."""
    audit = audit_prompt(["4", None, "7", "7"], [True, True, False, False], thresholds=THRESHOLDS)
    assert (audit.n_correct, audit.pass_rate, audit.majority_answer, audit.majority_share) == (2, 0.5, "7", 0.5)
    assert (audit.n_unanswered, audit.verdict) == (1, "ok")


def test_a_group_is_named_by_its_most_frequent_spelling_not_its_first():
    """Correct and wrong groups alike take the spelling most of their samples used, whichever came first."""
    groups = group_answers(["4.0", "x = 2", "4", "X = 2", "4", "X = 2"], [True, False, True, False, True, False])
    assert [(g.answer, g.count, g.matches_reference, g.spellings) for g in groups] == [
        ("4", 3, True, ("4", "4.0")), ("X = 2", 3, False, ("X = 2", "x = 2"))]


def test_wrong_answers_are_one_vote_only_when_the_equivalence_holds_both_ways():
    """A checker need not be symmetric (math_equal takes '(2,3)' for the reference '3, 2', not the reverse): two wrong
    answers are one vote only when each counts as the other, so that which of them is the larger group does not
    decide it."""

    def prefix_of(answer: str, reference: str) -> bool:
        return reference.startswith(answer)

    for answers in (["12", "1", "12"], ["1", "12", "1"]):
        groups = group_answers(answers, [False] * 3, equivalent=prefix_of)
        assert sorted((g.answer, g.count) for g in groups) == sorted((a, answers.count(a)) for a in set(answers))
    groups = group_answers(["0.5", "1/2", "0.5"], [False] * 3, equivalent=lambda a, b: {a, b} <= {"0.5", "1/2"})
    assert [(g.answer, g.count, g.spellings) for g in groups] == [("0.5", 3, ("0.5", "1/2"))]


def test_an_answer_the_math_reward_rejects_is_not_the_reference_by_the_reverse_equivalence():
    """The reference is the ordered pair (2,3) and every sample answers 3, 2: the math reward rejects them all
    (math_equal('3, 2', '(2,3)') is false), and the audit asks its equivalence the same way round, so the prompt looks
    wrong (every sample holds one answer the reward calls wrong), as it does for the answer (3, 2)."""
    reward = MathReward()
    extract, equivalent = answer_tools(reward)
    for answer in ("3, 2", "(3, 2)"):
        completions = [f"The answer is \\boxed{{{answer}}}"] * 4
        correct = [float(reward("Find the point (x, y).", c, "(2,3)")) >= 0.5 for c in completions]
        assert correct == [False] * 4
        audit = audit_prompt([extract(c) for c in completions], correct, equivalent=equivalent, thresholds=THRESHOLDS,
                             reference="(2,3)")
        assert (audit.majority_matches_reference, audit.verdict) == (False, "looks_wrong"), answer


def test_a_strict_reasoning_gym_reward_s_audit_reads_only_the_answer_tags_it_reads():
    """With strict=True the reasoning_gym reward reads only <answer> tags: 'The answer is 7' holds no answer, so four
    such samples are no consensus (hard), not a wrong majority answer 7."""
    pytest.importorskip("reasoning_gym")
    from entrorl.rewards.reasoning_gym import reasoning_gym_records

    record = reasoning_gym_records("basic_arithmetic", size=1, seed=0)[0]
    for strict, expected in ((True, ("hard", None)), (False, ("looks_wrong", "7"))):
        runner = RewardRunner(get_reward("reasoning_gym", task="basic_arithmetic", strict=strict))
        extract, _ = answer_tools(runner.fn)
        completions = ["The answer is 7"] * 4
        scored = runner([record["prompt"]] * 4, completions, [record["answer"]] * 4, [record["meta"]] * 4)
        assert scored.correct.tolist() == [False] * 4 and record["answer"] != "7"
        audit = audit_prompt([extract(c) for c in completions], scored.correct.tolist(), thresholds=THRESHOLDS,
                             reference=record["answer"])
        assert (audit.verdict, audit.majority_answer) == expected, strict


def test_the_largest_wrong_answer_gathers_its_equivalents_first():
    """Wrong answers are merged largest group first: with an equivalence that is not transitive (answers within 1 of
    each other), the most common answer takes in both neighbours even when a neighbour was seen first."""

    def within_one(a: str, b: str) -> bool:
        return abs(float(a) - float(b)) <= 1

    groups = group_answers(["1", "3", "2", "2", "2"], [False] * 5, equivalent=within_one)
    assert [(g.answer, g.count, g.spellings) for g in groups] == [("2", 5, ("2", "1", "3"))]


def test_an_empty_extracted_answer_is_an_answer_not_a_missing_one():
    """Only samples without an extracted answer (None) are unanswered; an empty answer (an empty answer tag) is one
    the model gave, and forms a group."""
    audit = audit_prompt(["", "", None, "3"], [False] * 4, thresholds=THRESHOLDS)
    assert audit.n_unanswered == 1 and audit.to_dict()["n_unanswered"] == 1
    assert [(g.answer, g.count) for g in audit.groups] == [("", 2), ("3", 1)]
    assert (audit.majority_answer, audit.majority_share, audit.verdict) == ("", 0.5, "looks_wrong")


@pytest.mark.parametrize(
    ("pass_rate", "share", "matches", "verdict"),
    [
        (0.0, 1.0, False, "looks_wrong"),
        (0.25, 0.5, False, "looks_wrong"),  # both thresholds are inclusive
        (0.25, 0.4375, False, "hard"),  # no consensus
        (0.0, 0.0, False, "hard"),  # nothing extracted at all
        (0.1875, 0.75, True, "hard"),  # the consensus is the reference (impossible at this rate, but safe)
        (0.3125, 0.6875, False, "ok"),  # solved often enough
        (1.0, 1.0, True, "ok"),
    ],
)
def test_classify_boundaries(pass_rate, share, matches, verdict):
    assert classify(pass_rate, share, matches, THRESHOLDS) == verdict


def test_thresholds_and_classify_reject_bad_values():
    with pytest.raises(ValueError, match="consensus must be in"):
        AuditThresholds(consensus=0.0)
    with pytest.raises(ValueError, match="low_pass_rate must be in"):
        AuditThresholds(low_pass_rate=1.0)
    with pytest.raises(ValueError, match="consensus must be a number"):
        AuditThresholds(consensus=True)
    with pytest.raises(ValueError, match="consensus must be a number"):
        AuditThresholds(consensus=np.True_)
    assert AuditThresholds(consensus=np.float32(0.75)).consensus == 0.75  # any real number, numpy's too
    assert classify(np.float32(0.0), np.float32(1.0), False, THRESHOLDS) == "looks_wrong"
    with pytest.raises(ValueError, match="pass_rate must be a number in"):
        classify(1.5, 0.5, False, THRESHOLDS)
    with pytest.raises(ValueError, match="majority_share must be a number in"):
        classify(0.0, -0.25, False, THRESHOLDS)


def sixteen(counts: dict[str | None, int], reference: str) -> tuple[list[str | None], list[bool]]:
    """Sixteen samples with the given answer counts; a sample is correct when its answer is the reference."""
    answers = [answer for answer, count in counts.items() for _ in range(count)]
    assert len(answers) == 16
    return answers, [answer == reference for answer in answers]


# reference, answer counts over 16 samples, expected verdict, expected pass rate, majority, share
TABLE = [
    ("4", {"4": 16}, "ok", 1.0, "4", 1.0),
    ("4", {"4": 5, "3": 11}, "ok", 5 / 16, "3", 11 / 16),  # consensus on 3, but solved 5 times: not low
    ("5", {"3": 15, "5": 1}, "looks_wrong", 1 / 16, "3", 15 / 16),
    ("10", {"8": 8, None: 8}, "looks_wrong", 0.0, "8", 0.5),
    ("2", {"1": 7, "2": 4, "3": 5}, "hard", 4 / 16, "1", 7 / 16),
    ("9", {"0": 2, "1": 2, "2": 2, "3": 2, "4": 2, "5": 2, "6": 2, "7": 2}, "hard", 0.0, "0", 2 / 16),
    ("7", {None: 16}, "hard", 0.0, None, 0.0),
]


def test_audit_of_a_hand_made_table_gives_exact_verdicts_rates_and_majorities():
    audits = []
    for reference, counts, verdict, rate, majority, share in TABLE:
        answers, correct = sixteen(counts, reference)
        audit = audit_prompt(answers, correct, thresholds=THRESHOLDS)
        assert (audit.verdict, audit.pass_rate, audit.majority_answer, audit.majority_share) == (verdict, rate, majority, share)
        assert audit.n_unanswered == counts.get(None, 0)
        audits.append(audit)
    assert verdict_counts(audits) == {"ok": 2, "hard": 3, "looks_wrong": 2}
    assert verdict_counts([]) == dict.fromkeys(VERDICTS, 0)

    histogram = pass_rate_histogram(audits)
    expected = [0] * 17
    for c in (16, 5, 1, 0, 4, 0, 0):
        expected[c] += 1
    assert list(histogram.counts) == expected
    assert histogram.by_verdict["looks_wrong"][1] == 1 and histogram.by_verdict["looks_wrong"][0] == 1
    assert histogram.by_verdict["hard"][0] == 2 and histogram.by_verdict["hard"][4] == 1
    assert histogram.by_verdict["ok"][16] == 1 and histogram.by_verdict["ok"][5] == 1
    assert sum(histogram.by_verdict["ok"]) + sum(histogram.by_verdict["hard"]) + sum(histogram.by_verdict["looks_wrong"]) == 7
    as_dict = histogram.to_dict()
    assert as_dict["n_prompts"] == 7 and as_dict["frac_zero"] == 3 / 7 and as_dict["frac_one"] == 1 / 7
    assert as_dict["bins"][1] == {"correct": 1, "pass_rate": 1 / 16, "prompts": 1, "ok": 0, "hard": 0, "looks_wrong": 1}


def test_the_consensus_threshold_is_configurable():
    answers, correct = sixteen({"3": 6, "5": 1, "1": 9}, "5")  # majority "1" holds 9/16
    assert audit_prompt(answers, correct).verdict == "looks_wrong"
    assert audit_prompt(answers, correct, thresholds=AuditThresholds(consensus=0.6)).verdict == "hard"
    assert audit_prompt(answers, correct, thresholds=AuditThresholds(low_pass_rate=0.0)).verdict == "ok"


def test_a_tie_for_the_most_common_answer_is_no_consensus():
    """Two samples answering 5 and 9 agree on nothing: a share of 1/2 meets consensus 0.5, but neither answer is the
    majority. One answer strictly most common at the same share still is (unanswered samples form no group)."""
    split = audit_prompt(["5", "9"], [False, False], thresholds=THRESHOLDS)
    assert (split.verdict, split.majority_share, split.majority_tied) == ("hard", 0.5, True)
    assert split.to_dict()["majority_tied"] is True
    answers, correct = sixteen({"3": 8, "4": 8}, "7")
    assert audit_prompt(answers, correct, thresholds=THRESHOLDS).verdict == "hard"
    answers, correct = sixteen({"3": 8, None: 8}, "7")
    single = audit_prompt(answers, correct, thresholds=THRESHOLDS)
    assert (single.verdict, single.majority_tied) == ("looks_wrong", False)
    answers, correct = sixteen({"3": 8, "4": 7, "7": 1}, "7")
    assert audit_prompt(answers, correct, thresholds=THRESHOLDS).verdict == "looks_wrong"
    assert classify(0.0, 1.0, False, THRESHOLDS, majority_tied=True) == "hard"
    assert classify(0.0, 1.0, False, THRESHOLDS) == "looks_wrong"
    # the two largest groups tie even when a smaller group follows them
    three = audit_prompt(["5", "9", "5", "9", "1"], [False] * 5, thresholds=AuditThresholds(consensus=0.4))
    assert (three.majority_answer, three.majority_share, three.majority_tied, three.verdict) == ("5", 0.4, True, "hard")


def test_histogram_needs_one_sample_count():
    one = audit_prompt(["1"], [True])
    two = audit_prompt(["1", "2"], [True, False])
    with pytest.raises(ValueError, match=r"different sample counts \[1, 2\]"):
        pass_rate_histogram([one, two])
    with pytest.raises(ValueError, match="no audited prompts"):
        pass_rate_histogram([])


def test_histogram_shares_use_the_first_and_last_bins():
    """frac_zero counts prompts never solved and frac_one prompts always solved, over all prompts."""
    audits = [audit_prompt(["1", "1"], [True, True]), audit_prompt(["1", "1"], [True, True]),
              audit_prompt(["1", "2"], [True, False]), audit_prompt(["2", "2"], [False, False])]
    histogram = pass_rate_histogram(audits)
    assert histogram.counts == (1, 1, 2)
    assert (histogram.frac_zero, histogram.frac_one) == (1 / 4, 2 / 4)


@pytest.mark.skipif(sys.platform != "linux", reason="the code reward's sandbox is Linux-only")
def test_code_prompts_are_never_called_wrong_from_a_number_in_the_programs():
    """The math extractor, the fallback, read the last number of each program ("range(1, n + 1)" gave 1): four
    different wrong programs agreed on 1 and the prompt looked wrong."""
    from entrorl.rewards import get_reward

    extract, _ = answer_tools(get_reward("code", workers=1))
    assert extract("```python\nn = int(input())\nprint(sum(range(1, n + 1)))\n```") is None


def test_math_answer_tools_count_equivalent_spellings_together():
    extract, equivalent = answer_tools(MathReward())
    completions = ["so \\boxed{\\frac{1}{2}}", "The answer is 0.5", "#### 1/2", "it is 3", "no idea"]
    answers = [extract(c) for c in completions]
    assert answers == ["\\frac{1}{2}", "0.5", "1/2", "3", None]
    audit = audit_prompt(answers, [False] * 5, equivalent=equivalent)
    assert (audit.majority_share, audit.groups[0].count, len(audit.groups)) == (3 / 5, 3, 2)
    extract_exact, same = answer_tools(exact_match)
    assert extract_exact("Paris") == "Paris" and same("Paris ", "paris") and not same("0.5", "1/2")
    assert extract_exact(" Paris\n") == "Paris" and extract_exact(" \n") is None
    # the math reward's own options decide which answers are one
    _, within_tolerance = answer_tools(MathReward(tolerance=0.1))
    assert within_tolerance("1.0", "1.05") and not equivalent("1.0", "1.05")
    # reasoning-gym answers are read as its reward reads them: the <answer> tags first, else the last line
    extract_tagged, _ = answer_tools(ReasoningGymReward())
    assert extract_tagged("\\boxed{12}\n<answer>13</answer>") == "13" and extract_tagged("step one\nfinal line") == "final line"
    # the audit extracts answers the way the reward does: a boxed-only reward sees no answer in unboxed text
    extract_boxed_only, _ = answer_tools(MathReward(extractors=["boxed"]))
    assert [extract_boxed_only(c) for c in completions] == ["\\frac{1}{2}", None, None, None, None]


def test_default_thresholds_are_a_consensus_of_half_and_a_low_pass_rate_of_a_quarter():
    """Without thresholds, a prompt solved 4 times in 16 is still rarely solved (4/16 <= 0.25) and a wrong answer held by
    half the samples is a consensus."""
    assert (AuditThresholds().consensus, AuditThresholds().low_pass_rate) == (0.5, 0.25)
    answers, correct = sixteen({"4": 4, "3": 8, "1": 4}, "4")
    judged = audit_prompt(answers, correct)
    assert (judged.pass_rate, judged.majority_answer, judged.majority_share, judged.verdict) == (0.25, "3", 0.5, "looks_wrong")
    answers, correct = sixteen({"4": 5, "3": 11}, "4")
    assert audit_prompt(answers, correct).verdict == "ok"


def test_thresholds_that_are_not_finite_are_refused_as_not_numbers():
    for name in ("consensus", "low_pass_rate"):
        for value in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match=f"AuditThresholds: {name} must be a number, got {value!r}"):
                AuditThresholds(**{name: value})


def test_canonical_spelling_folds_case_beyond_ascii():
    """Case folding, not lower-casing: 'STRASSE' and 'Straße' are one wrong answer."""
    assert canonical_answer(" Straße ") == canonical_answer("STRASSE") == "strasse"
    # as exact_match: one character or a letter and its accent, marks in either order (NFC on both sides of casefold)
    assert canonical_answer("caf\u00e9") == canonical_answer("CAFE\u0301")
    assert canonical_answer("\u03b1\u0345\u0301") == canonical_answer("\u03b1\u0301\u0345")
    groups = group_answers(["STRASSE", "Straße", "Berlin"], [False] * 3)
    assert [(g.answer, g.count, g.spellings) for g in groups] == [("STRASSE", 2, ("STRASSE", "Straße")), ("Berlin", 1, ("Berlin",))]


def test_the_equivalence_compares_the_most_frequent_spellings_of_both_groups():
    """Each wrong group is represented by its most frequent spelling, not its first sample, on both sides of the call."""
    calls = []

    def recorded(a: str, b: str) -> bool:
        calls.append((a, b))
        return False

    groups = group_answers(["X", "x", "x", "x", "Y", "y", "y"], [False] * 7, equivalent=recorded)
    assert calls == [("x", "y")]
    assert [(g.answer, g.count, g.spellings) for g in groups] == [("x", 4, ("x", "X")), ("y", 3, ("y", "Y"))]


def test_a_tie_is_decided_by_a_groups_earliest_sample_even_in_a_rarer_spelling():
    """The group of 'b' (spelled 'B' once, first of all samples, then 'b' twice) ties with 'a' (three samples from the
    second on): its earliest sample came first, although its most frequent spelling came last."""
    groups = group_answers(["B", "a", "a", "b", "b", "a"], [False] * 6)
    assert [(g.answer, g.count, g.spellings) for g in groups] == [("b", 3, ("b", "B")), ("a", 3, ("a",))]



def test_a_merged_group_is_named_and_compared_by_its_first_seen_spelling_on_ties():
    """'a'/'A' (samples 1, 2) is the largest wrong group and takes in 'b' (sample 0): three spellings once each, so the
    merged group is named by the one seen first, 'b', and is 'b' when later compared with 'c'."""
    calls = []

    def letters_ab(x: str, y: str) -> bool:
        calls.append((x, y))
        return {x.lower(), y.lower()} <= {"a", "b"}

    groups = group_answers(["b", "a", "A", "c"], [False] * 4, equivalent=letters_ab)
    assert calls == [("a", "b"), ("b", "a"), ("b", "c")]  # both ways, the second only when the first holds
    assert [(g.answer, g.count, g.spellings) for g in groups] == [("b", 3, ("b", "a", "A")), ("c", 1, ("c",))]

def test_a_tie_between_the_reference_and_a_wrong_answer_is_reported_as_tied():
    """majority_tied says another group is as large as the majority's, whether or not the majority is the reference."""
    judged = audit_prompt(["5", "9", "5", "9"], [True, False, True, False], thresholds=THRESHOLDS)
    assert (judged.majority_answer, judged.majority_matches_reference, judged.majority_tied) == ("5", True, True)
    assert judged.to_dict()["majority_tied"] is True
    assert audit_prompt(["5", "9", "5"], [True, False, True]).majority_tied is False


def test_correctness_flags_may_be_numpy_booleans_or_zeros_and_ones():
    """A numpy mask (e.g. ``scores >= 0.5``) or 0/1 integers judge the samples as a list of bools does."""
    import numpy as np

    answers = ["4", "4.0", "7", None, "7"]
    flags = [True, True, False, True, False]
    expected = audit_prompt(answers, flags)
    assert [(g.answer, g.count, g.matches_reference) for g in expected.groups] == [("4", 2, True), ("7", 2, False)]
    for given in (np.array(flags), [int(f) for f in flags], torch.tensor(flags).numpy().tolist()):
        assert audit_prompt(answers, given) == expected


# --------------------------------------------------------------------------------------------------
# band selection and writing rows back
# --------------------------------------------------------------------------------------------------


def records_of(count: int) -> list[PromptRecord]:
    return [PromptRecord(prompt=f"p{i}", answer=str(i), source=f"mem:{i}") for i in range(count)]


def test_band_selection_reuses_the_band_notation_with_exact_edges():
    rates = [0 / 16, 1 / 16, 2 / 16, 8 / 16, 9 / 16, 15 / 16, 16 / 16]
    records = records_of(len(rates))
    assert band_selection(records, rates, "(1/16, 15/16)").keep == (False, False, True, True, True, False, False)
    assert band_selection(records, rates, "[1/16,15/16]").keep == (False, True, True, True, True, True, False)
    closed = band_selection(records, rates, "[0.1,0.5]")
    assert closed.keep == (False, False, True, True, False, False, False)
    assert (closed.kept, closed.dropped) == (2, 5)
    with pytest.raises(ValueError, match="parse_band"):
        band_selection(records, rates, "0.1-0.5")
    with pytest.raises(ValueError, match="7 records but 6 pass rates"):
        band_selection(records, rates[:6], "[0, 1]")


def test_band_selection_marks_each_row_by_its_own_pass_rate_when_a_record_repeats():
    """keep[i] follows pass_rates[i], also when the same record object stands at two positions (a prompt listed
    twice, sampled twice)."""
    from entrorl.data import pass_rate_band_mask

    record = records_of(1)[0]
    assert band_selection([record, record], [0.0, 0.5], "[0.4, 0.6]").keep == (False, True)
    assert pass_rate_band_mask([record] * 3, [0.4, 0.5, 0.6], low=0.4, high=0.6, inclusive=(False, True)).tolist() == [
        False, True, True]


def test_a_band_that_keeps_no_row_drops_every_row():
    selection = band_selection(records_of(3), [0.0, 1.0, 0.0], "(0, 1)")
    assert (selection.keep, selection.kept, selection.dropped) == ((False, False, False), 0, 3)
    everything = band_selection(records_of(3), [0.0, 1.0, 0.5], "[0, 1]")
    assert (everything.kept, everything.dropped) == (3, 0)


def test_more_keep_flags_than_records_are_refused(tmp_path):
    data = tmp_path / "set.jsonl"
    data.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": "2"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="2 records but 3 keep flags"):
        write_selected_rows(data, load_prompts(data), [True, False, True], tmp_path / "kept.jsonl")
    assert not (tmp_path / "kept.jsonl").exists()


def test_json_copy_writes_non_ascii_text_as_it_is(tmp_path):
    """The copied JSON holds the characters themselves (UTF-8), not \\u escapes."""
    rows = [{"prompt": "ünï → ∑", "answer": "π"}, {"prompt": "b", "answer": "2"}]
    data = tmp_path / "set.json"
    data.write_text(json.dumps(rows), encoding="utf-8")
    out = write_selected_rows(data, load_prompts(data), [True, False], tmp_path / "kept.json")
    text = out.read_bytes().decode("utf-8")
    assert "ünï → ∑" in text and "\\u" not in text and json.loads(text) == rows[:1]


def test_jsonl_rows_are_copied_byte_for_byte_and_the_input_is_untouched(tmp_path):
    data = tmp_path / "set.jsonl"
    lines = [
        '{"prompt": "a", "answer": 1, "id": 7, "tags": ["x"]}',
        "",
        '{"id": 8, "answer": "2", "prompt": "b",   "extra": null}',
        '{"prompt": "ünï", "answer": "3", "nested": {"k": [1, 2]}}',
    ]
    data.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    before = digest(data)
    records = load_prompts(data)
    out = write_selected_rows(data, records, [False, True, True], tmp_path / "out" / "new" / "kept.jsonl")
    assert out.read_bytes() == (lines[2] + "\n" + lines[3] + "\n").encode()
    assert digest(data) == before
    with pytest.raises(ValueError, match="refusing to write over the input"):
        write_selected_rows(data, records, [True] * 3, data)
    mask = torch.tensor([False, True, True]).numpy()  # flags as a numpy mask of numpy booleans
    again = write_selected_rows(data, records, mask, tmp_path / "out" / "mask.jsonl")
    assert again.read_bytes() == out.read_bytes()
    with pytest.raises(ValueError, match="3 records but 2 keep flags"):
        write_selected_rows(data, records, [True, True], tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match="record 0 comes from 'mem:0'"):
        write_selected_rows(data, records_of(1), [True], tmp_path / "x.jsonl")



def test_the_input_is_never_written_over_when_its_path_is_spelled_another_way(tmp_path):
    """The input is recognised as the file it is, not by the text of its path: through '..' or through a link."""
    data = tmp_path / "set.jsonl"
    data.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": "2"}\n', encoding="utf-8")
    before = digest(data)
    records = load_prompts(data)
    (tmp_path / "sub").mkdir()
    link = tmp_path / "link.jsonl"
    link.symlink_to(data)
    for same_file in (tmp_path / "sub" / ".." / "set.jsonl", link):
        with pytest.raises(ValueError, match="refusing to write over the input"):
            write_selected_rows(data, records, [True, False], same_file)
    assert digest(data) == before

def test_a_failed_copy_leaves_neither_the_target_nor_a_temporary_file(tmp_path, monkeypatch):
    """The rows are written to a temporary file that replaces the target in one step: when that step fails, the
    folder holds what it held before."""
    data = tmp_path / "set.jsonl"
    data.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": "2"}\n', encoding="utf-8")
    records = load_prompts(data)

    def full_disk(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="disk full"):
        write_selected_rows(data, records, [True, False], tmp_path / "kept.jsonl")
    assert sorted(os.listdir(tmp_path)) == ["set.jsonl"]


def test_jsonl_and_json_copies_drop_the_bom_and_accept_an_upper_case_extension(tmp_path):
    """The copied first line loses the input's byte order mark; '.JSONL' is written like '.jsonl'. A JSON file with a
    byte order mark (which load_prompts reads) is copied too."""
    data = tmp_path / "SET.JSONL"
    lines = ['{"prompt": "a", "answer": "1"}', '{"prompt": "b", "answer": "2"}']
    data.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    out = write_selected_rows(data, load_prompts(data), [True, False], tmp_path / "kept.jsonl")
    assert out.read_bytes() == (lines[0] + "\n").encode()
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]
    document = tmp_path / "bom.json"
    document.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    out = write_selected_rows(document, load_prompts(document), [False, True], tmp_path / "kept.json")
    assert json.loads(out.read_bytes()) == rows[1:]


def test_csv_copy_keeps_the_header_after_leading_blank_lines(tmp_path):
    """Blank lines before the header are skipped: the header, not an empty line, heads the copy."""
    data = tmp_path / "gaps.csv"
    data.write_text("\n\nprompt,answer\na,1\n\nb,2\n", encoding="utf-8")
    out = write_selected_rows(data, load_prompts(data), [False, True], tmp_path / "kept.csv")
    assert out.read_text(encoding="utf-8") == "prompt,answer\nb,2\n"


def test_csv_copy_keeps_line_breaks_inside_quoted_fields_byte_for_byte(tmp_path):
    """A quoted field holding a Windows line break (or a lone carriage return) is copied as it is: the kept rows load
    back with the prompts the input had."""
    data = tmp_path / "crlf.csv"
    data.write_bytes(b'prompt,answer\r\n"line one\r\nline two",1\r\n"a\rb",2\r\nplain,3\r\n')
    records = load_prompts(data)
    assert [record.prompt for record in records] == ["line one\r\nline two", "a\rb", "plain"]
    out = write_selected_rows(data, records, [True, True, False], tmp_path / "kept.csv")
    assert [record.prompt for record in load_prompts(out)] == ["line one\r\nline two", "a\rb"]



def test_csv_copy_ends_every_row_with_one_kind_of_line_break(tmp_path):
    """Rows are ended by '\n' whether or not a field holds a carriage return (those rows are quoted in full); line
    breaks inside quoted fields are kept as they are."""
    data = tmp_path / "crlf.csv"
    data.write_bytes(b'prompt,answer\r\n"line one\r\nline two",1\r\n"a\rb",2\r\nplain,3\r\n')
    out = write_selected_rows(data, load_prompts(data), [True, True, True], tmp_path / "kept.csv")
    assert out.read_bytes() == b'prompt,answer\n"line one\r\nline two","1"\n"a\rb","2"\nplain,3\n'

def test_csv_copy_keeps_a_prompt_longer_than_the_csv_modules_default_field_limit(tmp_path):
    """A prompt of 200 000 characters (the csv module refuses fields over 131 072 by default) is copied whole."""
    data = tmp_path / "long.csv"
    data.write_text("prompt,answer\n" + "x" * 200_000 + ",1\nshort,2\n", encoding="utf-8")
    out = write_selected_rows(data, load_prompts(data), [True, False], tmp_path / "kept.csv")
    assert [len(record.prompt) for record in load_prompts(out)] == [200_000]


def test_json_csv_and_parquet_rows_keep_every_column(tmp_path):
    rows = [{"question": "q0", "solution": "1", "level": 1}, {"question": "q1,\n\"two\"", "solution": "2", "level": 2},
            {"question": "q2", "solution": "3", "level": 3}]
    cols = dict(prompt_column="question", answer_column="solution")
    keep = [True, True, False]

    wrapped = tmp_path / "set.json"
    wrapped.write_text(json.dumps({"version": 3, "data": rows}))
    out = write_selected_rows(wrapped, load_prompts(wrapped, **cols), keep, tmp_path / "kept.json")
    assert json.loads(out.read_text()) == {"version": 3, "data": rows[:2]}
    plain = tmp_path / "list.json"
    plain.write_text(json.dumps(rows))
    out = write_selected_rows(plain, load_prompts(plain, **cols), [False, False, True], tmp_path / "kept_list.json")
    assert json.loads(out.read_text()) == rows[2:]

    table = tmp_path / "set.csv"
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["question", "solution", "level"])
        writer.writeheader()
        writer.writerows(rows)
    before = digest(table)
    out = write_selected_rows(table, load_prompts(table, **cols), [False, True, True], tmp_path / "kept.csv")
    with out.open(newline="") as handle:
        assert list(csv.DictReader(handle)) == [{k: str(v) for k, v in row.items()} for row in rows[1:]]
    assert digest(table) == before

    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    frame = tmp_path / "set.parquet"
    pq.write_table(pa.Table.from_pylist(rows), frame)
    out = write_selected_rows(frame, load_prompts(frame, **cols), [True, False, True], tmp_path / "kept.parquet")
    assert pq.read_table(out).to_pylist() == [rows[0], rows[2]]


def test_arrow_rows_are_written_as_arrow_and_read_back_identically(tmp_path):
    """An Arrow IPC file stays a file and a stream (a datasets shard) a stream, with its schema (metadata included);
    keeping no row at all gives an empty table, for Parquet too."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from entrorl.data.loading import read_arrow_ipc

    rows = [{"prompt": f"p{i}", "answer": str(i), "level": i, "tags": ["t"] * i} for i in range(4)]
    table = pa.Table.from_pylist(rows).replace_schema_metadata({"origin": "test"})
    for name, writer, is_stream in (("file.arrow", pa.ipc.new_file, False), ("stream.arrow", pa.ipc.new_stream, True)):
        data = tmp_path / name
        with pa.OSFile(str(data), "wb") as sink, writer(sink, table.schema) as out:
            out.write_table(table)
        before = digest(data)
        records = load_prompts(data)
        out = write_selected_rows(data, records, [True, False, False, True], tmp_path / "kept" / name)
        written, written_is_stream = read_arrow_ipc(out)
        assert written_is_stream is is_stream and written.schema.equals(table.schema, check_metadata=True)
        assert written.to_pylist() == [rows[0], rows[3]]
        kept = load_prompts(out)
        assert [(r.prompt, r.answer, r.meta) for r in kept] == [(r.prompt, r.answer, r.meta) for r in (records[0], records[3])]
        empty = write_selected_rows(data, records, [False] * 4, tmp_path / "none" / name)
        assert read_arrow_ipc(empty)[0].num_rows == 0 and read_arrow_ipc(empty)[0].schema.equals(table.schema)
        assert digest(data) == before

    frame = tmp_path / "set.parquet"
    pq.write_table(table, frame)
    empty = write_selected_rows(frame, load_prompts(frame), [False] * 4, tmp_path / "none.parquet")
    assert pq.read_table(empty).num_rows == 0 and pq.read_table(empty).schema.names == table.schema.names
    umask = os.umask(0)
    os.umask(umask)
    assert empty.stat().st_mode & 0o777 == 0o666 & ~umask  # written atomically, with a plain file's mode


# --------------------------------------------------------------------------------------------------
# output files from a hand-made result (no model)
# --------------------------------------------------------------------------------------------------


def hand_made_result(data: Path) -> AuditResult:
    records = load_prompts(data)
    audits, completions, answers = [], [], []
    for record, (reference, counts, *_rest) in zip(records, TABLE):
        assert record.answer == reference
        sample_answers, correct = sixteen(counts, reference)
        audits.append(audit_prompt(sample_answers, correct, thresholds=THRESHOLDS))
        answers.append(sample_answers)
        completions.append([f"so {a}" if a is not None else "hmm" for a in sample_answers])
    return AuditResult(records=records, audits=audits, completions=completions, answers=answers, too_long=[], n=16,
                       thresholds=THRESHOLDS)


def test_outputs_hold_the_histogram_the_suspects_the_band_and_the_summary(tmp_path):
    data = tmp_path / "table.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"problem {i}", "answer": row[0], "row": i}) + "\n" for i, row in enumerate(TABLE)))
    before = digest(data)
    result = hand_made_result(data)
    outputs = write_audit_outputs(result, data, band="[0, 1/2]", thresholds=THRESHOLDS, settings={"model": "m"})
    assert outputs.directory == tmp_path / "table.audit" == default_audit_dir(data)
    assert digest(data) == before

    suspects = [json.loads(line) for line in outputs.suspected_wrong.read_text().splitlines()]
    assert [s["prompt"] for s in suspects] == ["problem 2", "problem 3"]
    assert suspects[0]["reference"] == "5" and suspects[0]["majority_answer"] == "3"
    assert suspects[0]["majority_share"] == 15 / 16 and suspects[0]["pass_rate"] == 1 / 16
    assert suspects[0]["sample_answers"][0] == {"answer": "3", "count": 15, "correct": False, "spellings": ["3"]}
    assert suspects[0]["majority_examples"] == ["so 3", "so 3"]
    assert suspects[0]["source"] == f"{data}:3"
    assert len(outputs.per_prompt.read_text().splitlines()) == 7

    # in [0, 1/2]: rows 1..6 (rates 5/16, 1/16, 0, 4/16, 0, 0); rows 2 and 3 look wrong and are dropped
    kept = [json.loads(line)["row"] for line in outputs.filtered.read_text().splitlines()]
    assert kept == [1, 4, 5, 6]
    summary = json.loads(outputs.summary_json.read_text())
    assert summary["counts"] == {"ok": 2, "hard": 3, "looks_wrong": 2, "too_long": 0}
    assert summary["band"] | {"file": None} == {
        "band": "[0, 1/2]", "in_band": 6, "out_of_band": 1, "dropped_as_wrong": 2, "dropped_too_long": 0, "kept": 4,
        "dropped": 3, "keep_wrong": False, "file": None,
    }
    assert summary["settings"] == {"model": "m"} and summary["n"] == 16 and summary["thresholds"] == {"consensus": 0.5, "low_pass_rate": 0.25}
    histogram = json.loads(outputs.histogram_json.read_text())
    assert [b["prompts"] for b in histogram["bins"]][:6] == [3, 1, 0, 0, 1, 1]
    assert outputs.histogram_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = write_audit_outputs(result, data, tmp_path / "keep", band="[0, 1/2]", keep_wrong=True, plot=False)
    assert [json.loads(line)["row"] for line in again.filtered.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert again.histogram_png is None and not (tmp_path / "keep" / "pass_rate_histogram.png").exists()
    with pytest.raises(ValueError, match="parse_band"):
        write_audit_outputs(result, data, tmp_path / "bad", band="[0.5]")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="would be written inside the input"):
        write_audit_outputs(result, data, data)
    with pytest.raises(ValueError, match="exists and is not a directory"):
        write_audit_outputs(result, data, outputs.summary_json)
    assert digest(data) == before


@pytest.mark.parametrize("name", ["audit.jsonl", "summary.json", "suspected_wrong.jsonl", "data.jsonl"])
def test_an_input_named_like_an_audit_file_in_the_output_directory_is_never_overwritten(tmp_path, name):
    """--out naming the input's own folder is allowed while no file the audit writes there is the input: an input
    called audit.jsonl (or summary.json, suspected_wrong.jsonl) is refused, untouched; an input of another name is
    left alone beside the audit's files."""
    from entrorl.trainer.audit import check_audit_output

    folder = tmp_path / "d"
    folder.mkdir()
    data = folder / name
    rows = [{"prompt": f"problem {i}", "answer": row[0], "row": i} for i, row in enumerate(TABLE)]
    data.write_text(json.dumps(rows) if data.suffix == ".json" else "".join(json.dumps(row) + "\n" for row in rows))
    before = data.read_bytes()
    result = hand_made_result(data)
    if name == "data.jsonl":
        outputs = write_audit_outputs(result, data, folder, plot=False)
        assert outputs.per_prompt == folder / "audit.jsonl" and data.read_bytes() == before
        return
    with pytest.raises(ValueError, match=rf"the audit would write its {name} into .*, over the input"):
        check_audit_output(data, folder)
    with pytest.raises(ValueError, match="over the input"):
        write_audit_outputs(result, data, folder, plot=False)
    assert data.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == [name]


def test_the_summary_counts_prompts_too_long_for_the_context_and_wrong_rows_only_within_the_band(tmp_path):
    """A prompt too long to sample is not labelled: it is a prompt of the data but not of the pass rates, and its row is
    dropped from the filtered file. Suspected-wrong rows outside the band are dropped by the band, not counted as
    dropped for looking wrong. The reward's reasons for a 0 are counted per prompt, failures without one left out."""
    data = tmp_path / "table.jsonl"
    rows = [{"prompt": f"problem {i}", "answer": row[0], "row": i} for i, row in enumerate(TABLE)]
    rows.append({"prompt": "a very long problem", "answer": "1", "row": 7})
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    sampled = hand_made_result(data)
    records = load_prompts(data)
    too_long = TooLongPrompt(7, records[7].source, 70, 64)
    reasons = [[None] * 16 for _ in TABLE] + [[]]
    reasons[2] = ["answer 3 differs from reference 5"] * 15 + [None]
    result = AuditResult(records=records, audits=[*sampled.audits, None], completions=[*sampled.completions, []],
                         answers=[*sampled.answers, []], too_long=[too_long], n=16, reasons=reasons, thresholds=THRESHOLDS)
    # (0, 1]: rows 0, 1, 2 and 4 (rates 1, 5/16, 1/16, 4/16); row 2 looks wrong, row 3 looks wrong but is out of the band
    outputs = write_audit_outputs(result, data, band="(0, 1]", thresholds=THRESHOLDS, plot=False)
    assert [json.loads(line)["row"] for line in outputs.filtered.read_text().splitlines()] == [0, 1, 4]
    summary = json.loads(outputs.summary_json.read_text())
    assert (summary["prompts"], summary["audited"]) == (8, 7)
    assert summary["counts"] == {"ok": 2, "hard": 3, "looks_wrong": 2, "too_long": 1}
    assert summary["mean_pass_rate"] == pytest.approx((16 + 5 + 1 + 0 + 4 + 0 + 0) / 16 / 7)
    assert (summary["frac_zero"], summary["frac_one"]) == (3 / 7, 1 / 7)
    assert summary["band"] | {"file": None} == {
        "band": "(0, 1]", "in_band": 4, "out_of_band": 3, "dropped_as_wrong": 1, "dropped_too_long": 1, "kept": 3,
        "dropped": 5, "keep_wrong": False, "file": None,
    }
    assert summary["too_long"] == [{"index": 7, "source": f"{data}:8", "prompt_tokens": 70, "context_length": 64}]
    suspects = [json.loads(line) for line in outputs.suspected_wrong.read_text().splitlines()]
    assert suspects[0]["reject_reasons"] == [["answer 3 differs from reference 5", 15]] and suspects[1]["reject_reasons"] == []
    assert len(outputs.per_prompt.read_text().splitlines()) == 7

    # no prompt fit the context: nothing was sampled, so nothing failed either, and there is nothing to write
    nothing = AuditResult(records=records, audits=[None] * 8, completions=[[] for _ in records], answers=[[] for _ in records],
                          too_long=[TooLongPrompt(i, r.source, 70, 64) for i, r in enumerate(records)], n=16)
    assert nothing.n_sampled == 0 and not nothing.reward_failed_everywhere
    with pytest.raises(ValueError, match="no prompt could be audited"):
        write_audit_outputs(nothing, data, tmp_path / "none")
    assert not (tmp_path / "none").exists()


def one_prompt_result(data: Path, answers, correct, reasons=None) -> AuditResult:
    """An AuditResult for a data file of one prompt, sampled ``len(answers)`` times; completion i is 'c<i>'."""
    records = load_prompts(data)
    judged = audit_prompt(answers, correct, thresholds=THRESHOLDS)
    return AuditResult(records=records, audits=[judged], completions=[[f"c{i}" for i in range(len(answers))]],
                       answers=[list(answers)], too_long=[], n=len(answers), reasons=[reasons] if reasons else [],
                       correct=[list(correct)], thresholds=THRESHOLDS)


def test_majority_examples_are_completions_reaching_any_spelling_of_the_majority_answer(tmp_path):
    """The majority group 'x = 2' is spelled two ways; its first two completions are shown whatever their spelling."""
    data = tmp_path / "one.jsonl"
    data.write_text('{"prompt": "p", "answer": "7"}\n', encoding="utf-8")
    result = one_prompt_result(data, ["X = 2", "9", "x = 2", "x = 2", None], [False] * 5)
    assert result.audits[0].majority_answer == "x = 2"
    outputs = write_audit_outputs(result, data, tmp_path / "out", plot=False)
    (row,) = [json.loads(line) for line in outputs.per_prompt.read_text().splitlines()]
    assert row["majority_examples"] == ["c0", "c2"]


def test_majority_examples_are_judged_as_the_majority_group_was(tmp_path):
    """'5' alone is right (sample 0) and wrong in three sentences (samples 1, 3, 4): the majority is the wrong '5'
    group, so its examples are wrong completions, never the one the reward accepted with the same answer."""
    data = tmp_path / "one.jsonl"
    data.write_text('{"prompt": "p", "answer": "5"}\n', encoding="utf-8")
    result = one_prompt_result(data, ["5", "5", "9", "5", "5"], [True, False, False, False, False])
    assert (result.audits[0].majority_answer, result.audits[0].majority_matches_reference) == ("5", False)
    outputs = write_audit_outputs(result, data, tmp_path / "out", plot=False)
    (row,) = [json.loads(line) for line in outputs.per_prompt.read_text().splitlines()]
    assert row["majority_examples"] == ["c1", "c3"]


def test_the_three_most_common_reasons_for_a_zero_are_kept(tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text('{"prompt": "p", "answer": "7"}\n', encoding="utf-8")
    reasons = ["a"] * 4 + ["b"] * 3 + ["c"] * 2 + ["d"] + [None] * 2
    result = one_prompt_result(data, ["3"] * 12, [False] * 12, reasons)
    outputs = write_audit_outputs(result, data, tmp_path / "out", plot=False)
    (row,) = [json.loads(line) for line in outputs.per_prompt.read_text().splitlines()]
    assert row["reject_reasons"] == [["a", 4], ["b", 3], ["c", 2]]


def test_the_default_band_keeps_rows_neither_never_nor_always_solved(tmp_path):
    """Without a band, rows solved by no sample or by every sample are dropped: the default band is (0, 1)."""
    data = tmp_path / "table.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"problem {i}", "answer": row[0], "row": i}) + "\n" for i, row in enumerate(TABLE)))
    outputs = write_audit_outputs(hand_made_result(data), data, tmp_path / "out", keep_wrong=True, plot=False)
    # pass rates 1, 5/16, 1/16, 0, 4/16, 0, 0
    assert [json.loads(line)["row"] for line in outputs.filtered.read_text().splitlines()] == [1, 2, 4]
    band = json.loads(outputs.summary_json.read_text())["band"]
    assert (band["band"], band["in_band"], band["out_of_band"], band["kept"]) == ("(0, 1)", 3, 4, 3)


def test_the_filtered_copy_keeps_the_inputs_extension_and_an_unplotted_histogram_has_no_file(tmp_path):
    data = tmp_path / "Set.JSONL"
    data.write_text('{"prompt": "p", "answer": "7"}\n', encoding="utf-8")
    result = one_prompt_result(data, ["7", "3"], [True, False])
    outputs = write_audit_outputs(result, data, plot=False)
    assert outputs.filtered == tmp_path / "Set.audit" / "Set.filtered.JSONL"
    summary = json.loads(outputs.summary_json.read_text())
    assert summary["files"]["histogram_png"] is None and summary["files"]["filtered"] == str(outputs.filtered)
    assert sorted(path.name for path in outputs.directory.iterdir()) == [
        "Set.filtered.JSONL", "audit.jsonl", "pass_rate_histogram.json", "summary.json", "suspected_wrong.jsonl"]


def test_a_saved_data_set_is_audited_into_a_new_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": f"problem {i}", "answer": row[0], "row": i} for i, row in enumerate(TABLE)]
    directory = tmp_path / "saved.v2"  # a folder's whole name, dot included, names its outputs
    datasets.Dataset.from_list(rows).save_to_disk(str(directory))
    listing = sorted((path.name, path.stat().st_size) for path in directory.iterdir())
    result = hand_made_result(directory)
    with pytest.raises(ValueError, match="would be written inside the input"):
        write_audit_outputs(result, directory, directory / "audit")
    outputs = write_audit_outputs(result, directory, band="[0, 1/2]", plot=False)
    assert outputs.filtered == tmp_path / "saved.v2.audit" / "saved.v2.filtered"
    assert [row["row"] for row in datasets.load_from_disk(str(outputs.filtered)).to_list()] == [1, 4, 5, 6]
    assert sorted((path.name, path.stat().st_size) for path in directory.iterdir()) == listing


def test_a_saved_dataset_dict_copy_takes_its_train_split_whatever_the_split_order(tmp_path):
    """Rows are located in the 'train' split, the one load_prompts read, even when another split was saved first; the
    copy is a DatasetDict of the same splits, the others as they were."""
    datasets = pytest.importorskip("datasets")
    train = datasets.Dataset.from_list([{"prompt": f"train {i}", "answer": str(i)} for i in range(3)])
    test = datasets.Dataset.from_list([{"prompt": f"test {i}", "answer": str(i)} for i in range(3)])
    directory = tmp_path / "splits"
    datasets.DatasetDict({"test": test, "train": train}).save_to_disk(str(directory))
    out = write_selected_rows(directory, load_prompts(directory), [True, False, True], tmp_path / "kept")
    copy = datasets.load_from_disk(str(out))
    assert isinstance(copy, datasets.DatasetDict) and sorted(copy) == ["test", "train"]
    assert [row["prompt"] for row in copy["train"].to_list()] == ["train 0", "train 2"]
    assert copy["test"].to_list() == test.to_list()
    assert [record.prompt for record in load_prompts(out)] == ["train 0", "train 2"]


def test_a_saved_dataset_dict_copy_keeps_a_split_saved_without_rows(tmp_path):
    """A split saved without rows beside 'train' (which datasets.load_from_disk cannot read as part of the dict) is
    copied as it was, 'train' filtered; the copy reads back as the input does."""
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": f"train {i}", "answer": str(i)} for i in range(3)]
    directory = tmp_path / "mixed"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows).select([])}).save_to_disk(str(directory))
    out = write_selected_rows(directory, load_prompts(directory), [True, False, True], tmp_path / "kept")
    assert sorted(path.name for path in out.iterdir()) == ["dataset_dict.json", "test", "train"]
    assert [record.prompt for record in load_prompts(out)] == ["train 0", "train 2"]
    assert sorted(path.name for path in (out / "test").iterdir()) == sorted(
        path.name for path in (directory / "test").iterdir())


def test_nothing_is_labelled_or_written_when_the_reward_failed_on_every_sample(tmp_path):
    """A reward that raised on every sample (``--reward code`` on math data) scores every answer 0: the prompts would
    all look wrong and the filtered file would be empty. The outputs are refused instead, naming the failure."""
    data = tmp_path / "table.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"problem {i}", "answer": row[0]}) + "\n" for i, row in enumerate(TABLE)))
    result = hand_made_result(data)
    result.reward_errors, result.first_reward_error = 7 * 16, "reward raised for sample 0: KeyError: 'tests'\nTraceback ..."
    assert result.n_sampled == 112 and result.reward_failed_everywhere
    with pytest.raises(ValueError, match=r"the reward failed on all 112 samples \(first failure: reward raised for "
                                         r"sample 0: KeyError: 'tests'\).*no prompt was labelled"):
        write_audit_outputs(result, data, tmp_path / "audit")
    assert not (tmp_path / "audit").exists()
    result.reward_errors = 111  # one sample scored: the audit goes ahead, its summary counting the failures
    outputs = write_audit_outputs(result, data, tmp_path / "audit", plot=False)
    summary = json.loads(outputs.summary_json.read_text())
    assert summary["reward_errors"] == 111 and summary["first_reward_error"] == "reward raised for sample 0: KeyError: 'tests'"


def test_the_audit_output_is_checked_before_sampling(tmp_path):
    from entrorl.trainer.audit import check_audit_output

    data = tmp_path / "set.jsonl"
    data.write_text('{"prompt": "p", "answer": "1"}\n')
    assert check_audit_output(data) == tmp_path / "set.audit" and not (tmp_path / "set.audit").exists()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        check_audit_output(data, a_file)
    with pytest.raises(ValueError, match="set.jsonl is not a directory"):
        check_audit_output(data, data / "audit")
    with pytest.raises(ValueError, match="would be written inside the input"):
        check_audit_output(data, data)
    folder = tmp_path / "saved"
    folder.mkdir()
    with pytest.raises(ValueError, match="would be written inside the input"):
        check_audit_output(folder, folder / "out")
    with pytest.raises(ValueError, match=r"cannot write rows of .*set\.txt \(unsupported format '\.txt'\)"):
        check_audit_output(tmp_path / "set.txt", tmp_path / "audit")


# --------------------------------------------------------------------------------------------------
# through the sampler: context limits and CLI errors (a random-init tiny model)
# --------------------------------------------------------------------------------------------------


def test_prompts_longer_than_the_context_are_reported_not_sampled(tiny_model_dir):
    from entrorl.modeling import load_causal_lm, load_tokenizer

    tokenizer, model = load_tokenizer(tiny_model_dir), load_causal_lm(tiny_model_dir)
    records = [PromptRecord("1+1=", "2", source="mem:1"), PromptRecord("9" * 61, "9", source="mem:2"),
               PromptRecord("2+2=", "4", source="mem:3"), PromptRecord("9" * 60, "9", source="mem:4")]
    ids = [tokenizer(r.prompt)["input_ids"] for r in records]
    calls = []
    rng_before = torch.get_rng_state()
    result = audit_records(model, tokenizer, records, ids, RewardRunner(get_reward("math")), n=3,
                           sampling=SamplingParams(max_new_tokens=4), batch_size=4, progress=lambda d, t: calls.append((d, t)))
    assert torch.equal(torch.get_rng_state(), rng_before)
    # context 64: 61 + 4 > 64 is too long, 60 + 4 fits
    assert [(t.index, t.source, t.prompt_tokens, t.context_length) for t in result.too_long] == [(1, "mem:2", 61, 64)]
    assert result.audits[1] is None and all(result.audits[i].n_samples == 3 for i in (0, 2, 3))
    assert [len(c) for c in result.completions] == [len(c) for c in result.correct] == [3, 0, 3, 3]
    assert [sum(c) for c in result.correct] == [0 if a is None else round(a.pass_rate * a.n_samples) for a in result.audits]
    assert calls == [(3, 9), (6, 9), (9, 9)]  # one prompt (3 rows) per call with batch_size 4
    assert result.counts()["too_long"] == 1 and sum(result.counts().values()) == 4
    assert result.too_long[0].message(4) == ("mem:2: the prompt has 61 tokens; with max_new_tokens=4 it exceeds the "
                                             "model's context of 64 tokens (not sampled)")
    with pytest.raises(ValueError, match="audit_records: n must be a positive integer, got 0"):
        audit_records(model, tokenizer, records, ids, RewardRunner("math"), n=0, sampling=SamplingParams())
    with pytest.raises(ValueError, match="audit_records: batch_size must be a positive integer, got 0"):
        audit_records(model, tokenizer, records, ids, RewardRunner("math"), n=1, sampling=SamplingParams(), batch_size=0)
    with pytest.raises(ValueError, match="4 records but 3 tokenized prompts"):
        audit_records(model, tokenizer, records, ids[:3], RewardRunner("math"), n=1, sampling=SamplingParams())
    with pytest.raises(ValueError, match="no prompts to audit"):
        audit_records(model, tokenizer, [], [], RewardRunner("math"), n=1, sampling=SamplingParams())


def test_a_model_of_unknown_context_length_has_every_prompt_sampled(tiny_model_dir, monkeypatch):
    import entrorl.trainer.audit
    from entrorl.modeling import load_causal_lm, load_tokenizer

    monkeypatch.setattr(entrorl.trainer.audit, "model_context_length", lambda model: None)
    tokenizer, model = load_tokenizer(tiny_model_dir), load_causal_lm(tiny_model_dir)
    records = [PromptRecord("1+1=", "2", source="mem:1"), PromptRecord("2+2=", "4", source="mem:2")]
    ids = [tokenizer(r.prompt)["input_ids"] for r in records]
    result = audit_records(model, tokenizer, records, ids, RewardRunner("math"), n=2, sampling=SamplingParams(max_new_tokens=2))
    assert result.too_long == [] and [a.n_samples for a in result.audits] == [2, 2]


class _ScoredWithReason(float):
    """A reward value with the reason for its score, as the math reward returns."""

    def __new__(cls, score: float, reason: str):
        value = super().__new__(cls, score)
        value.reason = reason
        return value


def test_each_prompt_is_labelled_from_its_own_samples_across_generation_calls(tiny_model_dir):
    """Two prompts (six rows) per generation call, two calls: every prompt gets its own three samples, scores, answers
    and reasons; reward failures add up over the calls and the first one is kept; the extractor, the equivalence and the
    thresholds given are the ones used."""
    from entrorl.modeling import load_causal_lm, load_tokenizer

    def reward(prompt, completion, answer, **meta):
        if prompt == "2+2=":
            raise ValueError("two fails")
        if prompt == "3+3=":
            raise ValueError("three fails")
        return 1.0 if prompt == "1+1=" else _ScoredWithReason(0.0, f"not {answer}")

    spellings = iter(["7", "07", "8"] * 4)
    tokenizer, model = load_tokenizer(tiny_model_dir), load_causal_lm(tiny_model_dir)
    records = [PromptRecord(f"{a}+{a}=", str(2 * a), source=f"mem:{a}") for a in (1, 2, 3, 4)]
    ids = [tokenizer(r.prompt)["input_ids"] for r in records]
    result = audit_records(model, tokenizer, records, ids, RewardRunner(reward), n=3, sampling=SamplingParams(max_new_tokens=2),
                           batch_size=6, extract=lambda completion: next(spellings), equivalent=lambda a, b: int(a) == int(b),
                           thresholds=AuditThresholds(consensus=0.7))
    assert [a.pass_rate for a in result.audits] == [1.0, 0.0, 0.0, 0.0]
    assert result.answers == [["7", "07", "8"]] * 4
    # "7" and "07" are one answer held by 2 of 3 samples: below the consensus of 0.7, so not a suspected wrong reference
    assert [(len(a.groups), a.majority_share) for a in result.audits[1:]] == [(2, 2 / 3)] * 3
    assert [a.verdict for a in result.audits] == ["ok", "hard", "hard", "hard"]
    assert result.reasons[0] == [None] * 3 and result.reasons[3] == ["not 8"] * 3
    assert all("two fails" in reason for reason in result.reasons[1])
    assert result.reward_errors == 6 and not result.reward_failed_everywhere
    assert "two fails" in result.first_reward_error


def test_cli_reports_malformed_rows_and_bad_options_before_sampling(tmp_path, tiny_model_dir):
    runner = CliRunner()
    data = tmp_path / "broken.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"\n')
    before = digest(data)
    result = runner.invoke(app, ["data", "audit", "--model", str(tiny_model_dir), "--data", str(data)])
    assert result.exit_code == 2 and f"{data}:2" in result.output and "not valid JSON" in result.output
    assert digest(data) == before  # the input is never modified
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n')
    result = runner.invoke(app, ["data", "audit", "--model", str(tiny_model_dir), "--data", str(data)])
    assert result.exit_code == 2 and f"{data}:2" in result.output and "answer column" in result.output
    result = runner.invoke(app, ["data", "audit", "--model", str(tiny_model_dir), "--data", str(data), "--band", "[0.5, 0.1]"])
    assert result.exit_code == 2 and "--band '[0.5, 0.1]': " in result.output and "exceeds the upper edge" in result.output
    result = runner.invoke(app, ["data", "audit", "--model", str(tiny_model_dir), "--data", str(data), "--consensus", "0"])
    assert result.exit_code == 2 and "error: --consensus must be in" in result.output
    result = runner.invoke(app, ["data", "audit", "--model", str(tiny_model_dir), "--data", str(data), "--low-pass-rate", "1"])
    assert result.exit_code == 2 and "error: --low-pass-rate must be in" in result.output
    assert not (tmp_path / "broken.audit").exists()


def test_cli_refuses_prompt_token_ids_past_the_model_s_embedding_in_one_line(tmp_path, tiny_model_dir):
    """A tokenizer given tokens the model was not resized for: the audit, which reports prompts past the context
    rather than refusing them, refused these with a traceback from inside the sampler; eval's one-line refusal now."""
    import shutil

    from entrorl.modeling import load_tokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    tokenizer = load_tokenizer(model)
    tokenizer.add_tokens(["<|fresh|>"], special_tokens=True)
    tokenizer.save_pretrained(model)
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "1+1=<|fresh|>", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"}\n')
    result = CliRunner().invoke(app, ["data", "audit", "--model", str(model), "--data", str(data), "--n", "2",
                                      "--max-new-tokens", "2", "--reward", "exact_match", "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and not isinstance(result.exception, ValueError), result.output
    assert re.search(rf"error: the model's input embedding has \d+ rows .*{re.escape(str(data))}:1: token id",
                     " ".join(result.output.split())), result.output


def test_cli_refuses_unwritable_outputs_and_bad_options_before_loading_the_model(tmp_path, tiny_model_dir, monkeypatch):
    """`eval --out` and `data audit --out` that cannot be written: one line, exit 2, and no model loaded (the sampling
    is not lost after the fact)."""
    import entrorl.modeling

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded although the output cannot be written")

    monkeypatch.setattr(entrorl.modeling, "load_causal_lm", no_loading)
    data = tmp_path / "set.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    common = ["--model", str(tiny_model_dir), "--data", str(data), "--n", "2"]
    cases = [
        (["eval", *common, "--out", str(a_file / "e.json")], "a_file is not a directory"),
        (["eval", *common, "--out", str(tmp_path)], "is a directory; expected the path of a file"),
        (["data", "audit", *common, "--out", str(a_file)], "exists and is not a directory"),
        (["data", "audit", *common, "--out", str(a_file / "audit")], "a_file is not a directory"),
    ]
    if Path("/proc/self").is_dir():
        cases += [(["eval", *common, "--out", "/proc/entrorl_x/e.json"], "/proc/entrorl_x cannot be created"),
                  (["data", "audit", *common, "--out", "/proc/entrorl_audit"], "/proc/entrorl_audit cannot be")]
    for args, message in cases:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (args, result.output, result.exception)
        assert result.output.startswith("error: ") and message in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
    # --top-p is a probability above 0: refused by the option's parser, naming the option, before anything loads
    for command in (["eval"], ["data", "audit"]):
        for value in ("0", "1.5", "nan"):
            result = CliRunner().invoke(app, [*command, *common, "--top-p", value])
            assert result.exit_code == 2 and f"Invalid value for '--top-p': {value} is not in the range 0<x<=1" in \
                " ".join(result.output.replace("│", " ").split()), result.output


def test_cli_audits_an_arrow_file_into_an_arrow_copy(tmp_path, tiny_model_dir):
    pa = pytest.importorskip("pyarrow")
    from entrorl.data.loading import read_arrow_ipc

    table = pa.Table.from_pylist([{"prompt": f"{a}+1=", "answer": str(a + 1), "id": a} for a in range(3)])
    data = tmp_path / "set.arrow"
    with pa.OSFile(str(data), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    result = CliRunner().invoke(app, ["data", "audit", "--model", str(tiny_model_dir), "--data", str(data), "--n", "2",
                                      "--max-new-tokens", "2", "--band", "[0, 1]", "--keep-wrong"])
    assert result.exit_code == 0, result.output
    filtered = tmp_path / "set.audit" / "set.filtered.arrow"
    assert read_arrow_ipc(filtered)[0].equals(table, check_metadata=True)
    assert [(r.prompt, r.answer, r.meta) for r in load_prompts(filtered)] == [(r.prompt, r.answer, r.meta) for r in load_prompts(data)]


REWARDS_MODULE = """
def flaky(prompt, completion, answer, **meta):
    if prompt.startswith("3"):
        raise ValueError("[i]bad[/i] \x1b]0;title\x07thing")
    return 0.0

def broken(prompt, completion, answer, **meta):
    raise KeyError("tests")

def half(prompt, completion, answer, **meta):
    return 0.5

def terminated(prompt, completion, answer, **meta):
    import os, signal, time
    os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's stop while the samples are scored
    time.sleep(5)
    return 1.0

def over_the_cpu_time(prompt, completion, answer, **meta):
    import os, signal, time
    os.kill(os.getpid(), signal.SIGXCPU)  # the soft CPU-time limit reached while the samples are scored
    os.kill(os.getpid(), signal.SIGXCPU)  # and the kernel's repeat a CPU second later
    time.sleep(5)
    return 1.0
"""


@pytest.fixture
def markup_data(tmp_path, monkeypatch):
    """A data file (by a relative path, so that tables print it whole) whose references are rich markup, and rewards
    that fail: ``entrorl_test_audit_rewards:flaky`` on the third prompt with markup in its message, ``:broken``
    everywhere."""
    (tmp_path / "entrorl_test_audit_rewards.py").write_text(REWARDS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": "1+1=", "answer": "[/i]"}, {"prompt": "2+2=", "answer": "[bold]x\x1b[2J"}, {"prompt": "3+3=", "answer": "6"}]
    Path("m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    yield Path("m.jsonl")
    sys.modules.pop("entrorl_test_audit_rewards", None)


def test_cli_audit_counts_a_sample_correct_from_the_threshold_given(markup_data, tiny_model_dir):
    """``--correct-threshold`` decides which rewards count as correct, as in ``eval``; the summary records it."""
    rates = {}
    for threshold in (None, "0.6"):
        out = f"aud-{threshold}"
        result = CliRunner().invoke(app, ["data", "audit", "--model", str(tiny_model_dir), "--data", str(markup_data),
                                          "--n", "2", "--max-new-tokens", "2", "--reward", "entrorl_test_audit_rewards:half",
                                          "--out", out, *(["--correct-threshold", threshold] if threshold else [])])
        assert result.exit_code == 0, result.output
        summary = json.loads((Path(out) / "summary.json").read_text())
        assert json.loads(result.stdout) == summary  # the summary also goes to stdout, as JSON
        rates[summary["settings"]["correct_threshold"]] = summary["mean_pass_rate"]
        # what sampled and scored, for a later look: the model's precision and device, the reward and its options
        assert {key: summary["settings"][key] for key in ("dtype", "device", "batch_size", "reward", "reward_kwargs")} == {
            "dtype": "float32", "device": "cpu", "batch_size": 64, "reward": "entrorl_test_audit_rewards:half",
            "reward_kwargs": {}}
    assert rates == {0.5: 1.0, 0.6: 0.0}  # every reward is 0.5: correct at the default threshold, wrong above it


def test_cli_data_check_samples_and_labels_with_the_options_given_and_records_them(markup_data, tiny_model_dir, monkeypatch):
    """--seed, --n, --consensus, --low-pass-rate, --band and --keep-wrong reach the sampling, the labels and the summary, and the most
    new tokens sampled without --max-new-tokens is the default, recorded as a number: the same seed samples the same
    completions and another seed others; suspected-wrong rows in the band are kept only with --keep-wrong."""
    import entrorl.cli
    import entrorl.trainer.audit

    monkeypatch.setattr(entrorl.cli, "DEFAULT_MAX_NEW_TOKENS", 3)
    monkeypatch.setattr(entrorl.trainer.audit, "answer_tools", lambda reward: (lambda completion: "7", lambda a, b: a == b))

    def run(out: str, *options: str) -> tuple[dict, list[list[str]]]:
        result = CliRunner().invoke(app, ["data", "audit", "--model", str(tiny_model_dir), "--data", str(markup_data),
                                          "--n", "3", "--reward", "entrorl_test_audit_rewards:flaky", "--out", out,
                                          "--band", "[0, 1]", "--consensus", "0.6", "--low-pass-rate", "0.1", *options])
        assert result.exit_code == 0, result.output
        rows = [json.loads(line) for line in (Path(out) / "audit.jsonl").read_text().splitlines()]
        return json.loads((Path(out) / "summary.json").read_text()), [row["majority_examples"] for row in rows]

    kept, examples = run("kept", "--seed", "3", "--keep-wrong")
    assert kept["settings"]["seed"] == 3 and kept["n"] == kept["settings"]["n"] == 3
    assert kept["settings"]["max_new_tokens"] == 3
    assert kept["thresholds"] == {"consensus": 0.6, "low_pass_rate": 0.1}
    assert kept["counts"]["looks_wrong"] == 3  # every sample answers "7", which the reward never accepts
    assert (kept["band"]["band"], kept["band"]["keep_wrong"], kept["band"]["kept"]) == ("[0, 1]", True, 3)
    dropped, same_seed = run("dropped", "--seed", "3")
    assert (dropped["band"]["keep_wrong"], dropped["band"]["kept"], dropped["band"]["dropped_as_wrong"]) == (False, 0, 3)
    assert same_seed == examples
    assert run("other-seed", "--seed", "4", "--keep-wrong")[1] != examples


def test_cli_prints_data_verbatim_and_reward_failures_in_one_line(markup_data, tiny_model_dir, monkeypatch):
    """References, majority answers and reward errors holding rich markup are printed as they are, their control
    characters as escapes (no sequence clears the screen or retitles the terminal); a reward failure is one line on the
    terminal (count, first error), its traceback kept in a file, for `data audit` and `eval` alike."""
    import entrorl.trainer.audit

    monkeypatch.setattr(entrorl.trainer.audit, "answer_tools", lambda reward: (lambda completion: "[/b]7", lambda a, b: a == b))
    result = CliRunner().invoke(app, ["data", "audit", "--model", str(tiny_model_dir), "--data", str(markup_data), "--n", "2",
                                      "--max-new-tokens", "2", "--reward", "entrorl_test_audit_rewards:flaky", "--out", "aud"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "looks wrong 3" in result.output  # every sample answered "[/b]7", which the reward never accepted
    for text in ("[/i]", "[bold]x\\x1b[2J", "[/b]7", "m.jsonl:1"):
        assert text in result.output, text
    assert "\x1b" not in result.output and "\x07" not in result.output  # no escape sequence reaches the terminal
    (line,) = [line for line in result.output.splitlines() if line.startswith("reward errors")]
    assert line == ("reward errors: the reward failed on 2 of 6 samples, which scored 0; first: reward raised for sample "
                    "0 (m.jsonl:3): ValueError: [i]bad[/i] \\x1b]0;title\\x07thing; its traceback is in aud/reward_errors.log")
    log = Path("aud/reward_errors.log").read_text()
    assert "Traceback (most recent call last)" in log and "ValueError: [i]bad[/i] \x1b]0;title\x07thing" in log
    assert json.loads(Path("aud/summary.json").read_text())["reward_errors"] == 2

    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--data", str(markup_data), "--n", "2",
                                      "--max-new-tokens", "2", "--reward", "entrorl_test_audit_rewards:flaky",
                                      "--out", "eval/e.json"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert ("the reward failed on 2 of 6 samples, which scored 0; first: reward raised for sample 0 (m.jsonl:3): "
            "ValueError: [i]bad[/i] \\x1b]0;title\\x07thing; its traceback is in eval/e.reward_errors.log") in result.output
    assert "Traceback (most recent call last)" in Path("eval/e.reward_errors.log").read_text()
    summary = json.loads(Path("eval/e.json").read_text())
    assert summary["reward_errors"] == 2 and summary["reward_errors_log"] == "eval/e.reward_errors.log"
    assert summary["first_reward_error"] == "reward raised for sample 0 (m.jsonl:3): ValueError: [i]bad[/i] \x1b]0;title\x07thing"
    # a later evaluation into the same --out without a failure leaves no earlier traceback beside it
    again = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--data", str(markup_data), "--n", "2",
                                     "--max-new-tokens", "2", "--reward", "exact_match", "--out", "eval/e.json"])
    assert again.exit_code == 0, again.output
    assert not Path("eval/e.reward_errors.log").exists() and "reward_errors_log" not in json.loads(
        Path("eval/e.json").read_text())


def test_ctrl_c_while_eval_or_audit_samples_says_so_and_writes_nothing(markup_data, tiny_model_dir, monkeypatch):
    """A KeyboardInterrupt during the sampling ends eval and data audit with exit 130 and one line saying what became
    of the work, after the progress bar, without a traceback; no output file is written."""
    import entrorl.trainer.audit
    import entrorl.trainer.evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(entrorl.trainer.evaluate, "evaluate_model", interrupted)
    monkeypatch.setattr(entrorl.trainer.audit, "audit_records", interrupted)
    common = ["--model", str(tiny_model_dir), "--data", str(markup_data), "--n", "1", "--max-new-tokens", "2",
              "--reward", "exact_match"]
    for command, out, said in ((["eval"], "e.json", "interrupted while sampling: nothing was written"),
                               (["data", "audit"], "aud", "interrupted while sampling: nothing was written into aud")):
        result = CliRunner().invoke(app, [*command, *common, "--out", out])
        assert result.exit_code == 130, result.output
        assert said in " ".join(result.output.split()) and "Traceback" not in result.output
        assert not Path(out).exists()


def test_ctrl_c_while_eval_or_audit_loads_says_so_and_writes_nothing(markup_data, tiny_model_dir, monkeypatch):
    """Loading a large model takes a while: Ctrl-C then is one line saying nothing was written, exit 130."""
    import entrorl.trainer.checkpoint

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(entrorl.trainer.checkpoint, "resolve_model_directory", interrupted)
    common = ["--model", str(tiny_model_dir), "--data", str(markup_data), "--n", "1", "--reward", "exact_match"]
    for command, out in ((["eval"], "e.json"), (["data", "audit"], "aud")):
        result = CliRunner().invoke(app, [*command, *common, "--out", out])
        assert result.exit_code == 130 and " ".join(result.output.split()) == (
            "interrupted while loading the model and the prompts: nothing was written"), result.output
        assert not Path(out).exists()


def test_sigterm_while_eval_or_audit_samples_says_so_exits_143_and_writes_nothing(markup_data, tiny_model_dir):
    """A job scheduler's SIGTERM while the samples are scored (inside the reward, whose failures are caught and
    scored 0: the signal must not be one of them): one line saying so, exit 128 + 15, no traceback, no output file;
    the process's own SIGTERM handling is put back afterwards."""
    import signal

    common = ["--model", str(tiny_model_dir), "--data", str(markup_data), "--n", "1", "--max-new-tokens", "2",
              "--reward", "entrorl_test_audit_rewards:terminated"]
    before = signal.getsignal(signal.SIGTERM)
    for command, out, said in ((["eval"], "e.json", "terminated (SIGTERM) while sampling: nothing was written"),
                               (["data", "audit"], "aud",
                                "terminated (SIGTERM) while sampling: nothing was written into aud")):
        result = CliRunner().invoke(app, [*command, *common, "--out", out])
        assert result.exit_code == 128 + signal.SIGTERM, result.output
        assert said in " ".join(result.output.split()) and "Traceback" not in result.output
        assert not Path(out).exists()
        assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGXCPU"), reason="no CPU-time limit signal on this system")
def test_a_cpu_time_limit_reached_while_eval_or_audit_samples_stops_it_as_sigterm_does_exit_152(
        markup_data, tiny_model_dir):
    """SIGXCPU (a soft CPU-time limit, which by default ends the process with a core dump and no word) while the
    samples are scored: one line naming the limit, exit 128 + 24, nothing written; the kernel's repeat is no second
    request, and SIGXCPU stays ignored afterwards (the limit is reached: a repeat during Python's shutdown would end
    the process by the signal)."""
    import signal

    common = ["--model", str(tiny_model_dir), "--data", str(markup_data), "--n", "1", "--max-new-tokens", "2",
              "--reward", "entrorl_test_audit_rewards:over_the_cpu_time"]
    for command, out, said in ((["eval"], "e.json", "while sampling: nothing was written"),
                               (["data", "audit"], "aud", "while sampling: nothing was written into aud")):
        signal.signal(signal.SIGXCPU, signal.SIG_DFL)
        result = CliRunner().invoke(app, [*command, *common, "--out", out])
        assert result.exit_code == 128 + signal.SIGXCPU, result.output
        assert (f"terminated (SIGXCPU: the process's CPU-time limit is reached) {said}"
                in " ".join(result.output.split())) and "Traceback" not in result.output, result.output
        assert not Path(out).exists()
        assert signal.getsignal(signal.SIGXCPU) is signal.SIG_IGN


def test_an_eval_interrupted_while_writing_its_files_says_which_are_written(markup_data, tiny_model_dir, monkeypatch):
    """Ctrl-C (or SIGTERM) once the samples are scored, while --samples and --out are written: one line naming the
    file in place and the one not (which still holds an earlier evaluation's summary), exit 130, no temporary file."""
    import entrorl.trainer.checkpoint

    Path("e.json").write_text('{"earlier": true}\n')
    write = entrorl.trainer.checkpoint.atomic_write_text

    def interrupted_at_the_summary(path, text, **kwargs):
        if Path(path).name == "e.json":
            raise KeyboardInterrupt
        write(path, text, **kwargs)

    monkeypatch.setattr(entrorl.trainer.checkpoint, "atomic_write_text", interrupted_at_the_summary)
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--data", str(markup_data), "--n", "1",
                                      "--max-new-tokens", "2", "--reward", "exact_match", "--samples", "s.jsonl",
                                      "--out", "e.json"])
    assert result.exit_code == 130, result.output
    assert " ".join(result.output.split()).endswith(
        "interrupted while writing the results: s.jsonl written, e.json not (it still holds an earlier result)"), \
        result.output
    assert Path("e.json").read_text() == '{"earlier": true}\n' and len(Path("s.jsonl").read_text().splitlines()) == 3
    assert sorted(path.name for path in Path(".").iterdir() if ".tmp" in path.name) == []


def test_an_eval_interrupted_once_its_files_are_in_place_or_without_files_says_so(markup_data, tiny_model_dir,
                                                                                    monkeypatch):
    """A stop landing just after the summary went in (before the command could note it) names both files as
    written, not the summary as 'not written (it still holds an earlier result)'; a stop after the sampling of an
    evaluation asked for no file says that, not an empty list."""
    import entrorl.cli
    import entrorl.trainer.checkpoint

    Path("e.json").write_text('{"earlier": true}\n')
    write = entrorl.trainer.checkpoint.atomic_write_text

    def interrupted_once_in_place(path, text, **kwargs):
        write(path, text, **kwargs)
        if Path(path).name == "e.json":
            raise KeyboardInterrupt

    monkeypatch.setattr(entrorl.trainer.checkpoint, "atomic_write_text", interrupted_once_in_place)
    common = ["eval", "--model", str(tiny_model_dir), "--data", str(markup_data), "--n", "1", "--max-new-tokens", "2",
              "--reward", "exact_match"]
    result = CliRunner().invoke(app, [*common, "--samples", "s.jsonl", "--out", "e.json"])
    assert result.exit_code == 130 and " ".join(result.output.split()).endswith(
        "interrupted after the results were written: s.jsonl, e.json"), result.output
    assert json.loads(Path("e.json").read_text())["n_problems"] == 3

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(entrorl.cli, "_write_evaluation", interrupted)
    result = CliRunner().invoke(app, common)
    assert result.exit_code == 130 and " ".join(result.output.split()).endswith(
        "interrupted after sampling: no file was asked for (--out, --samples)"), result.output


def test_eval_and_audit_of_a_bf16_run_s_checkpoint_load_it_in_bf16_unless_dtype_is_given(markup_data, tiny_model_dir,
                                                                                        monkeypatch):
    """A run trained with model.dtype bfloat16 is sampled in bfloat16, as its own evaluations were, said and recorded;
    --dtype overrides it."""
    import shutil

    import entrorl.trainer.audit
    import entrorl.trainer.evaluate

    checkpoint_model = Path("run") / "checkpoints" / "step_000001" / "model"
    shutil.copytree(tiny_model_dir, checkpoint_model)
    Path("run/config.json").write_text(json.dumps({"model": {"dtype": "bfloat16"}, "rollout": {"max_new_tokens": 2}}))
    loaded = []

    def sample_nothing(policy, *args, **kwargs):
        loaded.append(next(policy.parameters()).dtype)
        raise KeyboardInterrupt  # what is loaded is all this test looks at

    monkeypatch.setattr(entrorl.trainer.evaluate, "evaluate_model", sample_nothing)
    monkeypatch.setattr(entrorl.trainer.audit, "audit_records", sample_nothing)
    common = ["--model", str(checkpoint_model), "--data", str(markup_data), "--n", "1", "--reward", "exact_match"]
    for command in (["eval"], ["data", "audit", "--out", "aud"]):
        result = CliRunner().invoke(app, [*command, *common])
        assert result.exit_code == 130 and "model.dtype = bfloat16" in " ".join(result.output.split()), result.output
        result = CliRunner().invoke(app, [*command, *common, "--dtype", "float32"])
        assert result.exit_code == 130 and "model.dtype" not in result.output, result.output
    assert loaded == [torch.bfloat16, torch.float32] * 2


def test_cli_audit_refuses_to_label_when_the_reward_failed_on_every_sample(markup_data, tiny_model_dir):
    result = CliRunner().invoke(app, ["data", "audit", "--model", str(tiny_model_dir), "--data", str(markup_data), "--n", "2",
                                      "--max-new-tokens", "2", "--reward", "entrorl_test_audit_rewards:broken", "--out", "aud"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert "the reward failed on all 6 samples (first failure: reward raised for sample 0 (m.jsonl:1): KeyError: 'tests')" in line
    assert "no prompt was labelled and no filtered file was written" in line and "aud/reward_errors.log" in line
    assert "Traceback" not in result.output
    assert sorted(path.name for path in Path("aud").iterdir()) == ["reward_errors.log"]


def test_an_audit_into_the_folder_of_an_earlier_one_keeps_no_file_that_is_not_its_own(markup_data, tiny_model_dir):
    """Re-run into the same --out: a run whose reward never failed removes the earlier run's reward_errors.log (its
    summary says 0 errors); one whose reward failed everywhere writes nothing there and says the folder holds an
    earlier audit's files, which it leaves as they were: its traceback goes to a temporary file, which it names."""
    def audit(reward: str):
        return CliRunner().invoke(app, ["data", "audit", "--model", str(tiny_model_dir), "--data", str(markup_data),
                                        "--n", "2", "--max-new-tokens", "2", "--reward",
                                        f"entrorl_test_audit_rewards:{reward}", "--out", "aud", "--band", "[0, 1]"])

    assert audit("flaky").exit_code == 0 and Path("aud/reward_errors.log").is_file()
    result = audit("half")
    assert result.exit_code == 0, result.output
    assert json.loads(Path("aud/summary.json").read_text())["reward_errors"] == 0
    assert not Path("aud/reward_errors.log").exists()
    earlier = {path.name: path.read_bytes() for path in Path("aud").iterdir()}
    result = audit("broken")
    assert result.exit_code == 2, result.output
    line = " ".join(result.output.split())
    assert "no filtered file was written" in line and "aud still holds the files of an earlier audit, summary.json from" in line
    assert {path.name: path.read_bytes() for path in Path("aud").iterdir()} == earlier
    traceback = re.search(r"its traceback is in (\S+) \(aud still holds", line)
    assert traceback and "KeyError: 'tests'" in Path(traceback.group(1)).read_text()
    Path(traceback.group(1)).unlink()


@pytest.mark.parametrize("failing", ["audit.jsonl", "filtered", "summary.json"])
def test_an_audit_that_fails_while_writing_its_files_leaves_the_earlier_audit_s_whole(markup_data, tiny_model_dir,
                                                                                      monkeypatch, failing):
    """A full disk part-way through writing the files: the folder keeps the earlier audit's set as it was (before, the
    histogram files were the new audit's beside the earlier summary), no staging folder is left, and the error names
    the file that could not be written."""
    import errno

    import entrorl.trainer.audit as audit_module

    def audit(n: str):
        return CliRunner().invoke(app, ["data", "audit", "--model", str(tiny_model_dir), "--data", str(markup_data),
                                        "--n", n, "--max-new-tokens", "2", "--reward",
                                        "entrorl_test_audit_rewards:half", "--out", "aud", "--band", "[0, 1]"])

    assert audit("2").exit_code == 0
    earlier = {path.name: path.read_bytes() for path in Path("aud").iterdir()}
    filtered = next(name for name in earlier if ".filtered" in name)
    full = OSError(errno.ENOSPC, "No space left on device")
    if failing == "filtered":
        def write_selected_rows(*args, **kwargs):
            raise full
        monkeypatch.setattr(audit_module, "write_selected_rows", write_selected_rows)
    else:
        write_text = Path.write_text

        def cut_short(path, text, *args, **kwargs):
            if path.name == failing:
                write_text(path, text[: len(text) // 2], *args, **kwargs)
                raise full
            return write_text(path, text, *args, **kwargs)
        monkeypatch.setattr(Path, "write_text", cut_short)
    result = audit("3")
    assert result.exit_code != 0
    named = filtered if failing == "filtered" else failing
    assert f"No space left on device: 'aud/{named}'" in " ".join(result.output.split())
    assert {path.name: path.read_bytes() for path in Path("aud").iterdir()} == earlier


# --------------------------------------------------------------------------------------------------
# end to end: planted wrong references are found, and only those
# --------------------------------------------------------------------------------------------------

EASY = {letter: str(position) for position, letter in enumerate("abcdefghi", start=1)}
HARD = "klmnopqrs"


@pytest.fixture(scope="module")
def letter_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 trained (SFT, 250 steps) to answer "position of c" with the letter's position in the
    alphabet — reliably — and "lucky number of k" with a number drawn uniformly from 10..29: a model that
    is sure of the right answer on some prompts and has no idea on others."""
    from entrorl.lab.base_model import sft_batches, supervised_loss
    from entrorl.lab.tiny_model import build_char_tokenizer, build_tiny_qwen2

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(len(tokenizer), hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                             max_position_embeddings=32, seed=0, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    pairs = [(f"position of {letter}", answer) for letter, answer in EASY.items() for _ in range(30)]
    pairs += [(f"lucky number of {letter}", str(number)) for letter in HARD for number in range(10, 30) for _ in range(2)]
    batches = sft_batches(pairs, tokenizer, batch_size=64, seed=0)
    steps = 250
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20) * max(0.05, 1 - step / steps))
    model.train()
    try:
        for _ in range(steps):
            loss = supervised_loss(model, *next(batches))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    finally:
        torch.set_num_threads(threads)
    directory = tmp_path_factory.mktemp("letter-model")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.slow
def test_audit_finds_exactly_the_planted_wrong_references(tmp_path, letter_model_dir):
    rng = random.Random(3)
    planted = {"c", "f", "h"}
    rows = []
    for letter, position in EASY.items():
        reference = str(int(position) + rng.choice([1, 2, -1])) if letter in planted else position
        if letter == "d":
            reference = "4.0"  # an equivalent spelling of a right answer is not a wrong reference
        rows.append({"id": len(rows), "prompt": f"position of {letter}", "answer": reference, "planted": letter in planted})
    for letter in HARD[:6]:
        rows.append({"id": len(rows), "prompt": f"lucky number of {letter}", "answer": str(rng.randrange(10, 30)), "planted": False})
    rows.append({"id": len(rows), "prompt": "position of " + "z" * 25, "answer": "26", "planted": False})
    data = tmp_path / "letters.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    before = digest(data)
    out = tmp_path / "audit"

    result = CliRunner().invoke(app, ["data", "audit", "--model", str(letter_model_dir), "--data", str(data), "--n", "16",
                                      "--max-new-tokens", "4", "--band", "(1/16, 15/16)", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert digest(data) == before

    audit = {row["source"]: row for row in map(json.loads, (out / "audit.jsonl").read_text().splitlines())}
    verdicts = {audit[f"{data}:{i + 1}"]["prompt"]: audit[f"{data}:{i + 1}"]["verdict"] for i in range(len(rows) - 1)}
    found = {json.loads(line)["prompt"] for line in (out / "suspected_wrong.jsonl").read_text().splitlines()}
    assert found == {f"position of {letter}" for letter in planted}
    for letter in planted:
        suspect = audit[f"{data}:{list(EASY).index(letter) + 1}"]
        assert suspect["majority_answer"] == EASY[letter] and suspect["majority_share"] >= 0.5
        # the math reward's reason for the majority's 0: its answer differs from the (wrong) reference
        (reason, count), *_ = suspect["reject_reasons"]
        assert f"answer {EASY[letter]} differs from reference" in reason and count >= 8
    assert all(verdicts[f"position of {letter}"] == "ok" for letter in EASY if letter not in planted), verdicts
    assert all(verdicts[f"lucky number of {letter}"] == "hard" for letter in HARD[:6]), verdicts

    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"ok": 6, "hard": 6, "looks_wrong": 3, "too_long": 1}
    assert [t["source"] for t in summary["too_long"]] == [f"{data}:{len(rows)}"]
    assert f"{data}:{len(rows)}" in result.output and "looks wrong 3" in result.output

    lines = data.read_text().splitlines()
    expected = [lines[i] for i, row in enumerate(rows[:-1])
                if 1 / 16 < audit[f"{data}:{i + 1}"]["pass_rate"] < 15 / 16 and audit[f"{data}:{i + 1}"]["verdict"] != "looks_wrong"]
    assert (out / "letters.filtered.jsonl").read_text().splitlines() == expected
    assert summary["band"]["kept"] == len(expected)
    assert (out / "pass_rate_histogram.png").read_bytes()[:4] == b"\x89PNG"
    histogram = json.loads((out / "pass_rate_histogram.json").read_text())
    assert sum(b["prompts"] for b in histogram["bins"]) == 15 and histogram["n_samples"] == 16


def test_completions_are_decoded_without_special_tokens(tiny_model_dir):
    """A model that ends every response at once answers nothing: its completions are empty, not the EOS token's text."""
    from entrorl.modeling import load_causal_lm, load_tokenizer

    tokenizer, model = load_tokenizer(tiny_model_dir), load_causal_lm(tiny_model_dir)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    head.bias.data[tokenizer.eos_token_id] = 100.0
    model.lm_head = head
    records = [PromptRecord("1+1=", "2", source="mem:1")]
    ids = [tokenizer(r.prompt)["input_ids"] for r in records]
    result = audit_records(model, tokenizer, records, ids, RewardRunner(exact_match), n=2, sampling=SamplingParams(max_new_tokens=3))
    assert result.completions == [["", ""]] and result.answers == [[None, None]]


def test_the_first_reward_failure_names_its_sample_among_its_prompt_s_samples(tiny_model_dir):
    """Prompts are scored one generation call at a time; the first failure is reported, on the terminal and in
    reward_errors.log, by its data row and its index among that prompt's samples (as `entrorl eval` reports it):
    prompt 3's first sample is sample 0 of mem:3, whichever call scored it."""
    from entrorl.modeling import load_causal_lm, load_tokenizer

    def reward(prompt, completion, answer, **meta):
        if prompt == "3+3=":
            raise ValueError("three fails")
        return 0.0

    tokenizer, model = load_tokenizer(tiny_model_dir), load_causal_lm(tiny_model_dir)
    records = [PromptRecord(f"{a}+{a}=", str(2 * a), source=f"mem:{a}") for a in (1, 2, 3, 4)]
    ids = [tokenizer(r.prompt)["input_ids"] for r in records]
    result = audit_records(model, tokenizer, records, ids, RewardRunner(reward), n=3, sampling=SamplingParams(max_new_tokens=2),
                           batch_size=6)
    assert result.reward_errors == 3
    assert result.first_reward_error.startswith("reward raised for sample 0 (mem:3): ValueError: three fails")


def test_the_pass_rate_bars_scale_to_the_widest_bin_and_show_every_non_empty_bin():
    from entrorl.cli import _histogram_bar

    assert [_histogram_bar(count, 100) for count in (0, 1, 2, 50, 100)] == ["", "#", "#", "#" * 12, "#" * 24]
    assert _histogram_bar(3, 4, width=8) == "#" * 6 and _histogram_bar(0, 0) == ""


def test_a_tie_goes_to_the_group_whose_own_first_sample_came_first():
    """'5' is right alone and wrong inside a sentence (exact_match), so one spelling is in two groups: sample 0 is a
    wrong '5', the wrong '9' group starts at sample 1 and the reference group at sample 3. The tie of two is decided
    by each group's own first sample, not by the first time its spelling appeared anywhere."""
    answers, correct = ["5", "9", "9", "5", "5"], [False, False, False, True, True]
    groups = group_answers(answers, correct)
    assert [(g.answer, g.count, g.matches_reference) for g in groups] == [("9", 2, False), ("5", 2, True), ("5", 1, False)]
    audit = audit_prompt(answers, correct)
    assert (audit.majority_answer, audit.majority_matches_reference) == ("9", False)


def test_the_summary_gives_the_thresholds_the_verdicts_were_given_with(tmp_path):
    """The verdicts come from the audit, so the summary states the audit's thresholds; thresholds given again must be
    those, since the summary cannot describe verdicts given with others."""
    data = tmp_path / "table.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"problem {i}", "answer": row[0], "row": i}) + "\n" for i, row in enumerate(TABLE)))
    result = hand_made_result(data)
    result.thresholds = AuditThresholds(consensus=0.6, low_pass_rate=0.3)
    outputs = write_audit_outputs(result, data, tmp_path / "out", plot=False)
    assert json.loads(outputs.summary_json.read_text())["thresholds"] == {"consensus": 0.6, "low_pass_rate": 0.3}
    with pytest.raises(ValueError, match=r"the verdicts were given with .*low_pass_rate=0.3.*not .*low_pass_rate=0.1"):
        write_audit_outputs(result, data, tmp_path / "other", thresholds=AuditThresholds(low_pass_rate=0.1), plot=False)
    assert not (tmp_path / "other").exists()


def test_the_majority_examples_are_the_majority_group_s_own_samples_also_when_the_reward_rejected_them(tmp_path):
    """Three samples answered the reference '5' and a stricter reward scored them 0: the majority group is the
    reference's, and audit.jsonl shows two of its completions (a hard prompt whose format a person must see)."""
    data = tmp_path / "one.jsonl"
    data.write_text('{"prompt": "p", "answer": "5"}\n', encoding="utf-8")
    answers, correct = ["9", "5", "5", "5"], [False] * 4
    audit = audit_prompt(answers, correct, reference="5")
    assert (audit.majority_answer, audit.majority_matches_reference, audit.groups[0].samples) == ("5", True, (1, 2, 3))
    assert audit.groups[1].samples == (0,)
    result = AuditResult(records=load_prompts(data), audits=[audit], completions=[["c0", "c1", "c2", "c3"]],
                         answers=[answers], too_long=[], n=4, correct=[correct])
    outputs = write_audit_outputs(result, data, tmp_path / "out", plot=False)
    (row,) = [json.loads(line) for line in outputs.per_prompt.read_text().splitlines()]
    assert row["majority_examples"] == ["c1", "c2"]


# --------------------------------------------------------------------------------------------------
# what the command prints, its defaults, and the files named
# --------------------------------------------------------------------------------------------------

TABLE_REWARDS_MODULE = """
def first_right(prompt, completion, answer, **meta):
    if prompt.startswith("3"):
        raise ValueError("three")
    return 1.0 if prompt.startswith("1") else 0.0
"""


def _table_rows(output: str) -> list[list[str]]:
    """The cells of every row of the rich tables printed (lines between vertical bars)."""
    return [[cell.strip() for cell in line.split("│")[1:-1]] for line in output.splitlines() if line.startswith("│")]


def test_cli_data_audit_prints_the_pass_rate_table_the_suspects_and_counts_over_the_prompts_it_sampled(
        tmp_path, tiny_model_dir, monkeypatch):
    """Three prompts fit the context and one does not (63 tokens + 2 > 64): the too-long prompt is listed and the
    others sampled (not refused as `eval` refuses it). The pass-rate table labels its rows c/n and scales its bars to
    the widest bin; the suspects table gives each pass rate as c/n; the closing line counts the kept rows among all
    the rows read; the reward failures are counted among the samples drawn, not those of the too-long prompt."""
    import entrorl.trainer.audit

    (tmp_path / "entrorl_test_data_audit_table_rewards.py").write_text(TABLE_REWARDS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(entrorl.trainer.audit, "answer_tools", lambda reward: (lambda completion: "7", lambda a, b: a == b))
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}, {"prompt": "3+3=", "answer": "6"},
            {"prompt": "9" * 63, "answer": "9"}]
    Path("t.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    try:
        result = CliRunner().invoke(app, ["data", "audit", "--model", str(tiny_model_dir), "--data", "t.jsonl", "--n", "2",
                                          "--max-new-tokens", "2", "--reward", "entrorl_test_data_audit_table_rewards:first_right",
                                          "--out", "aud"])
    finally:
        sys.modules.pop("entrorl_test_data_audit_table_rewards", None)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert ("skipped t.jsonl:4: the prompt has 63 tokens; with max_new_tokens=2 it exceeds the model's context of 64 "
            "tokens (not sampled)") in lines
    cells = _table_rows(result.output)
    histogram = {row[0]: row[1:] for row in cells if row[0] in ("0/2", "1/2", "2/2")}
    assert histogram == {"0/2": ["2", "0", "0", "2", "#" * 24], "1/2": ["0", "0", "0", "0", ""],
                         "2/2": ["1", "1", "0", "0", "#" * 12]}
    assert [row for row in cells if row[0].startswith("t.jsonl:")] == [["t.jsonl:2", "4", "7", "1.00", "0/2"],
                                                                       ["t.jsonl:3", "6", "7", "1.00", "0/2"]]
    assert "ok 1, hard 0, looks wrong 2, too long 1; band (0, 1): kept 0 of 4 rows -> aud/t.filtered.jsonl" in lines
    assert ("reward errors: the reward failed on 2 of 6 samples, which scored 0; first: reward raised for sample 0 "
            "(t.jsonl:3): ValueError: three; its traceback is in aud/reward_errors.log") in lines


def test_cli_lists_the_first_20_prompts_too_long_for_the_context_and_counts_the_others(tmp_path, tiny_model_dir,
                                                                                      monkeypatch):
    """Without --max-new-tokens `data audit` samples up to 256 new tokens, more than the tiny model's context of 64, so no
    prompt fits: the first 20 are listed one per line with the most new tokens used, the others counted in one line,
    and the command stops with exit 2, writing nothing."""
    monkeypatch.chdir(tmp_path)
    Path("long.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(21)))
    said = {}
    for option in ([], ["--max-prompts", "20"]):
        result = CliRunner().invoke(app, ["data", "audit", "--model", str(tiny_model_dir), "--data", "long.jsonl", "--n",
                                          "1", "--reward", "exact_match", "--out", "aud", *option])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        assert "error: no prompt could be audited" in result.output
        said[bool(option)] = [line for line in result.output.splitlines() if line.startswith("skipped")]
    listed = [f"skipped long.jsonl:{i + 1}: the prompt has {len(f'{i}+{i}=')} tokens; with max_new_tokens=256 it exceeds "
              "the model's context of 64 tokens (not sampled)" for i in range(20)]
    assert said[False] == [*listed, "skipped ... and 1 more prompts too long for the context"]
    assert said[True] == listed
    assert not Path("aud").exists()


def test_cli_lists_at_most_20_suspected_wrong_prompts_under_a_title_counting_them_all(tmp_path, tiny_model_dir,
                                                                                     monkeypatch):
    import entrorl.trainer.audit

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(entrorl.trainer.audit, "answer_tools", lambda reward: (lambda completion: "7", lambda a, b: a == b))
    Path("d.jsonl").write_text("".join(json.dumps({"prompt": f"{i}=", "answer": f"r{i}"}) + "\n" for i in range(21)))
    result = CliRunner().invoke(app, ["data", "audit", "--model", str(tiny_model_dir), "--data", "d.jsonl", "--n", "1",
                                      "--max-new-tokens", "1", "--reward", "exact_match", "--out", "aud"])
    assert result.exit_code == 0, result.output
    assert "21 prompts whose reference looks wrong" in result.output and "looks wrong 21" in result.output
    listed = [row[1] for row in _table_rows(result.output) if row[0].startswith("d.jsonl:")]
    assert listed == [f"r{i}" for i in range(20)]


def test_cli_data_audit_defaults_are_16_samples_the_open_band_and_the_documented_thresholds(markup_data, tiny_model_dir):
    """Without --n, --band, --consensus and --low-pass-rate: 16 samples per prompt, the band (0, 1) (a prompt every
    sample solves is dropped), a consensus of 0.5 and a low pass rate of 0.25, as docs/data-audit.md says."""
    result = CliRunner().invoke(app, ["data", "audit", "--model", str(tiny_model_dir), "--data", str(markup_data),
                                      "--max-new-tokens", "1", "--reward", "entrorl_test_audit_rewards:half", "--out", "aud"])
    assert result.exit_code == 0, result.output
    summary = json.loads(Path("aud/summary.json").read_text())
    assert summary["n"] == summary["settings"]["n"] == 16 and summary["counts"]["ok"] == 3
    assert summary["thresholds"] == {"consensus": 0.5, "low_pass_rate": 0.25}
    # every reward is 0.5, correct at the reward's threshold: pass rate 1 everywhere, outside the open band
    assert (summary["band"]["band"], summary["band"]["in_band"], summary["band"]["kept"]) == ("(0, 1)", 0, 0)


@pytest.mark.parametrize("name", ["pass_rate_histogram.png", "reward_errors.log"])
def test_a_saved_data_set_named_like_an_output_file_is_refused_as_output_beside_it(tmp_path, name):
    """A saved data set directory called pass_rate_histogram.png or reward_errors.log, given to data audit with its own folder as
    --out, would have an output file written over it: refused before sampling and before writing, the input untouched."""
    datasets = pytest.importorskip("datasets")
    from entrorl.trainer.audit import check_audit_output

    rows = [{"prompt": f"problem {i}", "answer": row[0], "row": i} for i, row in enumerate(TABLE)]
    data = tmp_path / name
    datasets.Dataset.from_list(rows).save_to_disk(str(data))
    before = sorted(path.name for path in data.iterdir())
    with pytest.raises(ValueError, match=rf"the audit would write its {name} into .*, over the input"):
        check_audit_output(data, tmp_path)
    with pytest.raises(ValueError, match="over the input"):
        write_audit_outputs(hand_made_result(data), data, tmp_path, plot=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == [name] and sorted(p.name for p in data.iterdir()) == before


def test_the_histogram_figure_is_pass_rate_histogram_png_titled_with_the_data_and_its_counts(tmp_path, monkeypatch):
    import entrorl.trainer.audit

    titles = []
    plot = entrorl.trainer.audit.plot_pass_rate_histogram

    def recorded(histogram, path, *, title=""):
        titles.append(title)
        return plot(histogram, path, title=title)

    monkeypatch.setattr(entrorl.trainer.audit, "plot_pass_rate_histogram", recorded)
    data = tmp_path / "one.jsonl"
    data.write_text('{"prompt": "p", "answer": "7"}\n', encoding="utf-8")
    outputs = write_audit_outputs(one_prompt_result(data, ["7", "3"], [True, False]), data, tmp_path / "out")
    assert outputs.histogram_png == tmp_path / "out" / "pass_rate_histogram.png"
    assert outputs.histogram_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(outputs.summary_json.read_text())["files"]["histogram_png"] == str(outputs.histogram_png)
    assert titles == ["one.jsonl: 1 prompts x 2 samples"]


def test_a_sampled_answer_that_is_the_reference_makes_a_prompt_hard_even_when_the_reward_rejects_it(tiny_model_dir):
    """audit_records gives each prompt's reference to its audit: every sample answers the reference '2' and a strict
    reward scores them all 0, so the majority is the reference's answer and the prompt is hard, not wrong."""
    from entrorl.modeling import load_causal_lm, load_tokenizer

    def strict(prompt, completion, answer, **meta):
        return 0.0

    tokenizer, model = load_tokenizer(tiny_model_dir), load_causal_lm(tiny_model_dir)
    records = [PromptRecord("1+1=", "2", source="mem:1")]
    ids = [tokenizer(r.prompt)["input_ids"] for r in records]
    result = audit_records(model, tokenizer, records, ids, RewardRunner(strict), n=3, sampling=SamplingParams(max_new_tokens=1),
                           extract=lambda completion: "2")
    (judged,) = result.audits
    assert (judged.majority_answer, judged.majority_matches_reference, judged.pass_rate, judged.verdict) == ("2", True, 0.0, "hard")


def test_answers_of_any_other_reward_are_one_answer_up_to_case_and_surrounding_spaces():
    def custom(prompt, completion, answer, **meta):
        return 0.0

    extract, same = answer_tools(custom)
    assert extract("so the answer is \\boxed{Paris}") == "Paris" and extract("no idea") is None
    assert same(" Paris ", "paris") and same("PARIS", "Paris") and not same("Paris", "Lyon")


def test_the_default_output_of_the_working_directory_s_data_set_is_beside_it_named_after_it(tmp_path, monkeypatch):
    """`entrorl data audit --data .` inside a saved data set: the outputs go to ../<its name>.audit, and the filtered
    copy is <its name>.filtered, as for `--data ../saved` (not ./.audit inside the input, a hidden .filtered)."""
    datasets = pytest.importorskip("datasets")
    from entrorl.trainer.audit import _filtered_name, check_audit_output

    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"prompt": "1+1=", "answer": "2"}]).save_to_disk(str(saved))
    monkeypatch.chdir(saved)
    for given in (".", "./", "../saved"):
        assert default_audit_dir(given).resolve() == tmp_path / "saved.audit"
        assert check_audit_output(given).resolve() == tmp_path / "saved.audit"
        assert _filtered_name(Path(given)) == "saved.filtered"
    monkeypatch.chdir(saved / "..")
    assert default_audit_dir("saved/..").resolve() == tmp_path.parent / f"{tmp_path.name}.audit"


def test_data_audit_audits_rows_without_a_reference_answer_with_no_require_answer(tmp_path, tiny_model_dir,
                                                                                   monkeypatch):
    """For a reward that checks answers without a reference: refused by default, naming the option; with
    --no-require-answer every row is sampled and audited, and the filtered copy keeps the rows as they were."""
    monkeypatch.chdir(tmp_path)
    Path("d.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n{"prompt": "3+3=", "answer": null}\n')
    common = ["data", "audit", "--model", str(tiny_model_dir), "--data", "d.jsonl", "--n", "2", "--max-new-tokens", "2",
              "--reward", "exact_match", "--band", "[0, 1]", "--out", "aud"]
    refused = CliRunner().invoke(app, common)
    assert refused.exit_code == 2 and "--no-require-answer for entrorl eval and data audit" in " ".join(
        refused.output.split()) and not Path("aud").exists()
    result = CliRunner().invoke(app, [*common, "--no-require-answer"])
    assert result.exit_code == 0, result.output
    audited = [json.loads(line) for line in Path("aud/audit.jsonl").read_text().splitlines()]
    assert len(audited) == 3
    assert Path("aud/d.filtered.jsonl").read_text() == Path("d.jsonl").read_text()  # the band [0, 1] keeps every row


def _small_jsonl(path, n=4):
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(n)))
    return path


def test_audit_refuses_an_input_reached_through_a_link_that_it_would_overwrite(tmp_path):
    """The input is a link (prev.jsonl) to a file named audit.jsonl inside --out: the audit's own audit.jsonl is
    written over it (through os.replace on the resolved path), modifying the input, which the docs say is "only
    read, never modified". The same input given by its real path is refused; through a link it is not, because
    _check_out_dir compares the link's name, not the resolved file's, with the audit's file names."""
    from entrorl.trainer.audit import check_audit_output

    out = tmp_path / "run1.audit"
    out.mkdir()
    real = _small_jsonl(out / "audit.jsonl")
    link = tmp_path / "prev.jsonl"
    link.symlink_to(real)
    with pytest.raises(ValueError):  # as check_audit_output(real, out) does
        check_audit_output(real, out)
    with pytest.raises(ValueError):
        check_audit_output(link, out)


def test_audit_checks_before_sampling_that_the_filtered_copy_can_be_written(tmp_path):
    """check_audit_output promises to check "before sampling that write_audit_outputs can write into out ... and a
    filtered copy that can be written in the input's format". A directory standing where the filtered copy goes
    (out/small.filtered.jsonl) passes the check; the CLI then samples every prompt and only fails at the end
    ("[Errno 21] Is a directory"), leaving audit.jsonl / the histogram / suspected_wrong.jsonl without a summary."""
    from entrorl.trainer.audit import check_audit_output

    data = _small_jsonl(tmp_path / "small.jsonl")
    out = tmp_path / "small.audit"
    (out / "small.filtered.jsonl").mkdir(parents=True)
    with pytest.raises(ValueError):
        check_audit_output(data, out)


def test_filtered_saved_dataset_is_not_left_half_written_when_interrupted(tmp_path, monkeypatch):
    """Every file format's filtered copy is written atomically (old or new content, never part of either); a saved
    data set directory is written with save_to_disk straight into the target. A Ctrl-C while a re-audit writes it
    destroys the earlier, complete filtered copy: its old state.json now points at a truncated shard, and the
    directory reads as an empty data set."""
    import datasets
    import datasets.arrow_writer as arrow_writer

    from entrorl.data import load_prompts
    from entrorl.data.audit import write_selected_rows

    source = tmp_path / "src"
    datasets.Dataset.from_dict({"prompt": [f"p{i}" for i in range(50)],
                                "answer": [str(i) for i in range(50)]}).save_to_disk(str(source))
    records = load_prompts(source)
    target = tmp_path / "src.filtered"
    write_selected_rows(source, records, [i % 2 == 0 for i in range(50)], target)
    assert len(load_prompts(target)) == 25

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(arrow_writer.ArrowWriter, "write_table", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_selected_rows(source, records, [i < 5 for i in range(50)], target)
    monkeypatch.undo()
    # the earlier complete copy is still there (or, at the least, no broken directory is)
    if os.path.exists(target):
        assert [r.prompt for r in load_prompts(target)] == [f"p{i}" for i in range(0, 50, 2)]


def test_an_audit_file_that_is_a_link_to_the_input_does_not_overwrite_the_input(tmp_path, tiny_model_dir, monkeypatch):
    """c33df86 refuses an input reached through a link to one of the audit's files, but not the mirror case: an
    audit output (here --out/audit.jsonl) that is a link to the input. write_atomically follows the link and the
    input is replaced by the audit's rows, though the input 'is never modified'."""
    monkeypatch.chdir(tmp_path)
    data = Path("d.jsonl")
    original = '{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"}\n'
    data.write_text(original)
    Path("aud").mkdir()
    (Path("aud") / "audit.jsonl").symlink_to(data.resolve())
    result = CliRunner().invoke(app, ["data", "audit", "--model", str(tiny_model_dir), "--data", "d.jsonl", "--n", "2",
                                      "--max-new-tokens", "2", "--reward", "exact_match", "--band", "[0, 1]",
                                      "--out", "aud"])
    assert data.read_text() == original, result.output


def test_a_filtered_copy_that_is_a_link_to_the_input_is_refused_before_sampling(tmp_path):
    """out/d.filtered.jsonl is a link to the input d.jsonl: check_audit_output ('found after sampling, it would cost
    the whole audit') lets it pass; write_selected_rows refuses it only after every prompt was sampled."""
    from entrorl.trainer.audit import check_audit_output

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    out = tmp_path / "aud"
    out.mkdir()
    (out / "d.filtered.jsonl").symlink_to(data)
    with pytest.raises(ValueError):
        check_audit_output(data, out)


def test_a_saved_data_set_s_filtered_copy_linked_to_the_input_s_folder_does_not_delete_the_input(tmp_path):
    """write_folder_atomically follows the link out/ds.filtered -> d and replaces d whole, deleting the input d/ds
    (and d/notes.txt) with it. Before c33df86, save_to_disk wrote its three files into d and left the input there;
    write_selected_rows's own guard (_same_path) only compares the input with the target itself."""
    datasets = pytest.importorskip("datasets")
    from entrorl.data import load_prompts
    from entrorl.data.audit import write_selected_rows

    folder = tmp_path / "d"
    source = folder / "ds"
    datasets.Dataset.from_dict({"prompt": [f"p{i}" for i in range(10)],
                                "answer": [str(i) for i in range(10)]}).save_to_disk(str(source))
    (folder / "notes.txt").write_text("mine")
    out = tmp_path / "out"
    out.mkdir()
    (out / "ds.filtered").symlink_to(folder)
    records = load_prompts(source)
    with pytest.raises((ValueError, OSError)):  # refusing is fine; deleting the input is not
        write_selected_rows(source, records, [i < 3 for i in range(10)], out / "ds.filtered")
    assert source.is_dir() and (folder / "notes.txt").read_text() == "mine"


def test_write_audit_outputs_does_not_write_through_a_link_to_the_input(tmp_path):
    """9c3b745 refuses audit outputs that link to the input in check_audit_output (the CLI's pre-sampling check),
    but write_audit_outputs -- the Python API docs/data-audit.md names, 'the input is only read' -- does not run
    that check: out/pass_rate_histogram.json linking to the input gets the histogram written over the input."""
    from entrorl.data import load_prompts
    from entrorl.data.audit import audit_prompt
    from entrorl.trainer.audit import AuditResult, write_audit_outputs

    data = tmp_path / "d.jsonl"
    original = '{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"}\n'
    data.write_text(original)
    records = list(load_prompts(data))
    answers, correct = [["2", "3"], ["4", "4"]], [[True, False], [True, True]]
    audits = [audit_prompt(a, c, reference=r.answer) for a, c, r in zip(answers, correct, records)]
    result = AuditResult(records=records, audits=audits, completions=answers, answers=answers, too_long=[], n=2,
                         correct=correct)
    out = tmp_path / "aud"
    out.mkdir()
    (out / "pass_rate_histogram.json").symlink_to(data)
    try:
        write_audit_outputs(result, data, out, band="[0, 1]")
    except (ValueError, OSError):
        pass  # refusing is fine
    assert data.read_text() == original
