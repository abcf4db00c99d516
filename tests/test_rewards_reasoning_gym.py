"""reasoning-gym entries survive a data file: the JSON form of an entry keeps what JSON cannot hold (tuples, sets,
non-string keys), so a task's verifier scores a written-and-loaded record exactly like the generated one."""

from __future__ import annotations

import json

import pytest

from entrorl.data import PromptRecord, load_prompts, write_jsonl
from entrorl.rewards import get_reward, reasoning_gym_records
from entrorl.rewards.reasoning_gym import entry_from_json, entry_to_json


def test_entry_json_form_round_trips_tuples_sets_and_keys():
    entry = {
        "answer": "1 2\n3 4",
        "metadata": {"input": ((1, 2), (3, 4)), "colours": {3, 1}, "by_size": {2: ["a"], (1, 2): "b"}, "plain": [1, [2]],
                     "cells": [(0, 1), (2, 3)], "mixed_keys": {"a": 1, 2: (3,)}},
    }
    written = json.loads(json.dumps(entry_to_json(entry)))
    restored = entry_from_json(written)
    assert restored == entry
    assert type(restored["metadata"]["input"]) is tuple and type(restored["metadata"]["input"][0]) is tuple
    assert type(restored["metadata"]["plain"]) is list
    assert [type(cell) for cell in restored["metadata"]["cells"]] == [tuple, tuple]
    assert type(restored["metadata"]["colours"]) is set
    assert entry_from_json({"__tuple__": "not a list", "other": 1}) == {"__tuple__": "not a list", "other": 1}
    assert entry_from_json({"__tuple__": "not a list"}) == {"__tuple__": "not a list"}
    assert entry_from_json({"__dict_items__": [[[1, 2], "b"]]}) == {(1, 2): "b"}  # a key written as a plain list
    frozen = {"m": {frozenset({1}): "a"}, "s": {frozenset({2, 3})}, "f": frozenset({4})}  # hashable inside sets and keys
    restored = entry_from_json(json.loads(json.dumps(entry_to_json(frozen))))
    assert restored == frozen and type(restored["f"]) is frozenset


def test_equal_sets_have_one_json_form_whatever_their_insertion_order():
    """1 and 9 share a slot of a small set's table, so {1, 9} and {9, 1} iterate in different orders; a record
    written twice must read the same."""
    assert list({1, 9}) != list({9, 1})
    assert json.dumps(entry_to_json({1, 9})) == json.dumps(entry_to_json({9, 1})) == '{"__set__": [1, 9]}'


@pytest.mark.parametrize("task", ["arc_agi", "basic_arithmetic"])
def test_a_written_and_loaded_record_scores_its_reference_in_full(tmp_path, task):
    """ARC's grids are tuples of tuples and its verifier compares them with ==: after a JSON round trip without the
    JSON form the reference answer scored 0.05."""
    generated = reasoning_gym_records(task, size=2, seed=0)
    path = tmp_path / f"{task}.jsonl"
    write_jsonl([PromptRecord(prompt=r["prompt"], answer=r["answer"], meta=r["meta"], source=f"{task}[{i}]")
                 for i, r in enumerate(generated)], path)
    reward = get_reward("reasoning_gym", task=task)
    for record in load_prompts(path):
        assert reward(record.prompt, f"<answer>{record.answer}</answer>", record.answer, **record.meta) == 1.0
        assert reward(record.prompt, "<answer>certainly wrong</answer>", record.answer, **record.meta) < 1.0


def test_a_verifier_that_accepts_any_answer_is_detected(monkeypatch):
    """reasoning-gym 0.1.25's game_of_life_halting scores any answer 1.0 (stood in for here by a verifier patched to
    do so, so that the test does not hang on that bug); basic_arithmetic's verifier tells answers apart."""
    from entrorl.rewards import reasoning_gym
    from entrorl.rewards.reasoning_gym import verifier_accepts_nonsense

    records = reasoning_gym_records("basic_arithmetic", size=3, seed=0)
    assert not verifier_accepts_nonsense("basic_arithmetic", records)
    assert not verifier_accepts_nonsense("basic_arithmetic", [])
    monkeypatch.setattr(reasoning_gym.ReasoningGymReward, "__call__", lambda self, *args, **meta: 1.0)
    assert verifier_accepts_nonsense("basic_arithmetic", records)


class _VerifierFailingOn:
    """A reasoning-gym dataset whose verifier raises on every answer but ``accepted``."""

    def __init__(self, accepted=None):
        self.accepted = accepted

    def score_answer(self, answer, entry):
        if answer != self.accepted:
            raise ValueError("cannot parse")
        return 1.0


def test_a_verifier_failing_on_the_reference_too_raises_and_on_the_answer_alone_scores_0(monkeypatch):
    """A verifier that fails on the model's answer scores it 0; one that fails on the reference as well says the entry
    is broken, and that must reach the reward runner (counted as an error), not pass for a wrong answer."""
    from entrorl.rewards.reasoning_gym import ReasoningGymReward

    meta = {"entry": {"question": "q", "answer": "7", "metadata": {}}, "task": "basic_arithmetic", "config": {}}
    monkeypatch.setattr(ReasoningGymReward, "_scorer", lambda self, task, config: _VerifierFailingOn(accepted="7"))
    assert ReasoningGymReward()("q", "<answer>x</answer>", "7", **meta) == 0.0
    monkeypatch.setattr(ReasoningGymReward, "_scorer", lambda self, task, config: _VerifierFailingOn())
    with pytest.raises(ValueError, match="cannot parse"):
        ReasoningGymReward()("q", "<answer>7</answer>", "7", **meta)


class _VerifierAcceptingAnything:
    """A reasoning-gym dataset whose verifier gives full marks to any answer, None included."""

    def score_answer(self, answer, entry):
        return 1.0


def test_a_completion_without_an_answer_scores_0_whatever_the_verifier_says(monkeypatch):
    from entrorl.rewards.reasoning_gym import ReasoningGymReward

    meta = {"entry": {"question": "q", "answer": "7", "metadata": {}}, "task": "basic_arithmetic", "config": {}}
    monkeypatch.setattr(ReasoningGymReward, "_scorer", lambda self, task, config: _VerifierAcceptingAnything())
    assert ReasoningGymReward()("q", "", "7", **meta) == 0.0
    assert ReasoningGymReward()("q", "<answer>x</answer>", "7", **meta) == 1.0


def test_the_verifier_is_built_with_the_rewards_config_else_the_records(monkeypatch):
    """An explicit config wins over the record's, even an empty one (the task's defaults); without one the record's
    config is used. The task comes from the entry's source_dataset when neither the reward nor the record names it."""
    from entrorl.rewards.reasoning_gym import ReasoningGymReward

    built = []

    def scorer(self, task, config):
        built.append((task, dict(config)))
        return _VerifierAcceptingAnything()

    monkeypatch.setattr(ReasoningGymReward, "_scorer", scorer)
    entry = {"question": "q", "answer": "7", "metadata": {"source_dataset": "basic_arithmetic"}}
    meta = {"entry": entry, "task": "basic_arithmetic", "config": {"max_terms": 3}}
    for config in (None, {}, {"max_terms": 4}):
        assert ReasoningGymReward(config=config)("q", "<answer>7</answer>", "7", **meta) == 1.0
    assert ReasoningGymReward()("q", "<answer>7</answer>", "7", entry=entry) == 1.0
    assert built == [("basic_arithmetic", {"max_terms": 3}), ("basic_arithmetic", {}), ("basic_arithmetic", {"max_terms": 4}),
                     ("basic_arithmetic", {})]


def test_each_config_gets_its_own_verifier_built_once():
    from entrorl.rewards.reasoning_gym import ReasoningGymReward

    reward = ReasoningGymReward()
    default = reward._scorer("basic_arithmetic", {})
    assert reward._scorer("basic_arithmetic", {}) is default
    assert reward._scorer("basic_arithmetic", {"max_terms": 3}).config.max_terms == 3
    with pytest.raises(TypeError, match="no_such_option"):  # a bad config fails when the reward is made, not mid-run
        ReasoningGymReward("basic_arithmetic", config={"no_such_option": 1})


def test_an_entry_and_a_config_written_as_json_strings_are_read():
    """A CSV or Parquet column holds the entry, and the task's config, as JSON text."""
    record = reasoning_gym_records("basic_arithmetic", size=1, seed=0, min_terms=2, max_terms=2)[0]
    reward = get_reward("reasoning_gym", task="basic_arithmetic")
    completion = f"<answer>{record['answer']}</answer>"
    for config in (json.dumps(record["meta"]["config"]), "{}"):
        meta = {**record["meta"], "entry": json.dumps(record["meta"]["entry"]), "config": config}
        assert reward(record["prompt"], completion, record["answer"], **meta) == 1.0
    with pytest.raises(ValueError, match=r"meta\['config'\] must be a mapping of the task's options, got list"):
        reward(record["prompt"], completion, record["answer"], **{**record["meta"], "config": [["min_terms", 2]]})


def test_records_keep_the_config_and_a_missing_answer_and_refuse_bad_sizes_and_seeds(monkeypatch):
    import reasoning_gym

    records = reasoning_gym_records("basic_arithmetic", size=2, seed=0, min_terms=2, max_terms=2)
    assert [r["meta"]["config"] for r in records] == [{"min_terms": 2, "max_terms": 2}] * 2
    for size in (0, -1, True, 1.0):
        with pytest.raises(ValueError, match="size must be a positive integer"):
            reasoning_gym_records("basic_arithmetic", size=size, seed=0)
    for seed in (None, "0", True):
        with pytest.raises(ValueError, match="seed must be an integer"):
            reasoning_gym_records("basic_arithmetic", size=1, seed=seed)
    # tasks whose answers are checked without a reference have none: None, not the text "None"
    monkeypatch.setattr(reasoning_gym, "create_dataset", lambda task, size, seed, **config: [{"question": "q", "metadata": {}}] * size)
    assert reasoning_gym_records("basic_arithmetic", size=1, seed=0)[0]["answer"] is None


def test_a_verifier_is_probed_on_every_record_asked_for(monkeypatch):
    from entrorl.rewards import reasoning_gym
    from entrorl.rewards.reasoning_gym import verifier_accepts_nonsense

    records = reasoning_gym_records("basic_arithmetic", size=3, seed=0)
    first = records[0]["answer"]
    monkeypatch.setattr(reasoning_gym.ReasoningGymReward, "__call__", lambda self, prompt, completion, answer, **meta:
                        1.0 if answer == first else 0.0)
    assert verifier_accepts_nonsense("basic_arithmetic", records, probes=1)
    assert not verifier_accepts_nonsense("basic_arithmetic", records)


def test_a_marker_whose_items_are_not_a_list_is_a_plain_dict():
    """Only the JSON form's own shape, {marker: [...]}, is read back as a tuple, a set or a dict with other keys."""
    for marker in ("__tuple__", "__set__", "__frozenset__", "__dict_items__"):
        assert entry_from_json({marker: "ab"}) == {marker: "ab"}
        assert entry_from_json({marker: {"k": [1]}}) == {marker: {"k": [1]}}


def test_records_are_the_datasets_entries_of_the_seed_given():
    import reasoning_gym

    records = reasoning_gym_records("basic_arithmetic", size=2, seed=1)
    assert [r["answer"] for r in records] == ["-4", "3"]
    assert [r["prompt"] for r in records] == ["Calculate 5 - 3 - 6.", "Calculate 2 - -1."]
    dataset = reasoning_gym.create_dataset("basic_arithmetic", size=2, seed=1)
    assert [entry_from_json(r["meta"]["entry"]) for r in records] == [dataset[0], dataset[1]]


def test_the_instruction_follows_the_question_after_one_blank_line_and_an_empty_one_adds_nothing():
    """base_conversion's questions end in a newline: it is dropped before the blank line."""
    (record,) = reasoning_gym_records("base_conversion", size=1, seed=0, instruction="Go.")
    question = record["meta"]["entry"]["question"]
    assert question.endswith("base-14\n")
    assert record["prompt"] == f"{question.rstrip()}\n\nGo." and record["prompt"].endswith("base-14\n\nGo.")
    (bare,) = reasoning_gym_records("base_conversion", size=1, seed=0, instruction="")
    assert bare["prompt"] == question


def test_records_hold_every_entry_asked_for_and_answers_as_text(monkeypatch):
    import reasoning_gym

    monkeypatch.setattr(reasoning_gym, "create_dataset", lambda task, size, seed, **config:
                        [{"question": f"q{i}", "answer": i, "metadata": {}} for i in range(size)])
    records = reasoning_gym_records("basic_arithmetic", size=1001, seed=0)
    assert len(records) == 1001 and records[-1]["prompt"] == "q1000"
    assert [r["answer"] for r in records[:3]] == ["0", "1", "2"]


def test_a_task_that_is_not_a_name_is_refused_as_such():
    with pytest.raises(ValueError, match="task must be a dataset name, got 3"):
        get_reward("reasoning_gym", task=3)
    with pytest.raises(ValueError, match=r"task must be a dataset name, got \['basic_arithmetic'\]"):
        reasoning_gym_records(["basic_arithmetic"], size=1, seed=0)


def test_partial_credit_for_the_nonsense_answer_is_not_full_marks(monkeypatch):
    from entrorl.rewards import reasoning_gym
    from entrorl.rewards.reasoning_gym import NONSENSE_ANSWER, verifier_accepts_nonsense

    records = reasoning_gym_records("basic_arithmetic", size=2, seed=0)
    seen = []

    def nearly_full(self, prompt, completion, answer, **meta):
        seen.append(completion)
        return 0.99

    monkeypatch.setattr(reasoning_gym.ReasoningGymReward, "__call__", nearly_full)
    assert not verifier_accepts_nonsense("basic_arithmetic", records)
    assert seen[0] == f"<answer>{NONSENSE_ANSWER}</answer>"
    monkeypatch.setattr(reasoning_gym.ReasoningGymReward, "__call__", lambda self, *args, **meta: 1.0000000000000002)
    assert verifier_accepts_nonsense("basic_arithmetic", records)  # above full marks is full marks


def test_five_records_are_probed_by_default(monkeypatch):
    """The verifier is asked about the first five records: a sixth that it scores right is not looked at."""
    from entrorl.rewards import reasoning_gym
    from entrorl.rewards.reasoning_gym import verifier_accepts_nonsense

    records = [{"prompt": f"q{i}", "answer": str(i), "meta": {}} for i in range(6)]
    for rejected, accepted in ((4, False), (5, True)):
        monkeypatch.setattr(reasoning_gym.ReasoningGymReward, "__call__", lambda self, prompt, completion, answer, **meta:
                            0.0 if answer == str(rejected) else 1.0)
        assert verifier_accepts_nonsense("basic_arithmetic", records) is accepted


def test_an_arc_entry_written_as_json_text_scores_its_reference_in_full():
    """A CSV column holds the entry's JSON form as text: its tuples are rebuilt before ARC's verifier compares grids."""
    record = reasoning_gym_records("arc_agi", size=1, seed=0)[0]
    reward = get_reward("reasoning_gym", task="arc_agi")
    meta = {**record["meta"], "entry": json.dumps(record["meta"]["entry"])}
    assert reward(record["prompt"], f"<answer>{record['answer']}</answer>", record["answer"], **meta) == 1.0


def test_the_rewards_name_says_its_task():
    assert get_reward("reasoning_gym", task="basic_arithmetic").__name__ == "reasoning_gym[basic_arithmetic]"
    assert get_reward("reasoning_gym").__name__ == "reasoning_gym"


def test_a_null_config_is_the_tasks_defaults_and_a_record_naming_no_task_is_refused():
    record = reasoning_gym_records("basic_arithmetic", size=1, seed=1)[0]
    reward = get_reward("reasoning_gym")
    completion = f"<answer>{record['answer']}</answer>"
    assert reward(record["prompt"], completion, record["answer"], **{**record["meta"], "config": None}) == 1.0
    entry = record["meta"]["entry"]
    for nameless in ({k: v for k, v in entry.items() if k != "metadata"}, {**entry, "metadata": None},
                     {**entry, "metadata": {"source_dataset": 3}}):
        with pytest.raises(ValueError, match=r"reasoning_gym reward without a task needs meta\['task'\]"):
            reward(record["prompt"], completion, record["answer"], entry=nameless)


def test_the_instruction_asks_for_the_answer_tags_that_strict_mode_reads():
    from entrorl.rewards import REASONING_GYM_INSTRUCTION
    from entrorl.rewards.reasoning_gym import extract_reasoning_gym_answer

    assert "<answer></answer> tags" in REASONING_GYM_INSTRUCTION
    assert extract_reasoning_gym_answer(REASONING_GYM_INSTRUCTION, strict=True) == "42"  # its own example


def test_scores_stay_within_0_and_1_and_a_stray_closing_tag_stays_out_of_the_answer():
    """spell_backward's verifier adds 1/9 nine times for a 9-letter answer with one more letter: 1.0000000000000002
    (its own `reward == 1.0` check, meant to take 0.2 off, misses); the reward is the verifier's verdict within [0, 1],
    as documented. A closing tag after the answer's own pair is text after the answer, as reasoning-gym reads it."""
    record = reasoning_gym_records("spell_backward", size=1, seed=0)[0]
    assert record["answer"] == "noremopyh"
    reward = get_reward("reasoning_gym", task="spell_backward")
    assert reward(record["prompt"], "<answer>noremopyhs</answer>", record["answer"], **record["meta"]) == 1.0
    record = reasoning_gym_records("basic_arithmetic", size=1, seed=1)[0]
    assert record["answer"] == "-4"
    reward = get_reward("reasoning_gym", task="basic_arithmetic")
    assert reward(record["prompt"], "<answer>-4</answer> is my answer</answer>", record["answer"], **record["meta"]) == 1.0


def test_verl_s_layout_of_the_data_scores_from_its_extra_info(tmp_path):
    """verl's parquet keeps the entry in ``extra_info`` (what its reasoning_gym_score reads): trained on with
    entrorl, the same file scores the same."""
    import pandas as pd

    generated = reasoning_gym_records("basic_arithmetic", size=3, seed=0)
    rows = [{"data_source": "basic_arithmetic", "prompt": [{"role": "user", "content": r["prompt"]}],
             "reward_model": {"style": "rule", "ground_truth": r["answer"]},
             "extra_info": {"entry": json.dumps(entry_to_json(r["meta"]["entry"])), "task": "basic_arithmetic"}}
            for r in generated]
    path = tmp_path / "train.parquet"
    pd.DataFrame(rows).to_parquet(path)
    reward = get_reward("reasoning_gym")
    for record in load_prompts(path, answer_column="reward_model.ground_truth"):
        assert reward(record.prompt, f"<answer>{record.answer}</answer>", record.answer, **record.meta) == 1.0
        assert reward(record.prompt, "<answer>certainly wrong</answer>", record.answer, **record.meta) < 1.0


def _score(task: str, record: dict, completion: str) -> float:
    return get_reward("reasoning_gym", task=task)(record["prompt"], completion, record["answer"], **record["meta"])


def test_an_answer_phrase_takes_the_rest_of_its_line():
    """The math reward's phrase rule, used here before, ended a text answer at a clause word ("as", "if", "which"):
    caesar_cipher's decrypted sentence 'LET US ... ONE DAY AS HE ATTENDS ...' scored 0."""
    record = reasoning_gym_records("caesar_cipher", size=2, seed=1)[1]
    assert " AS " in record["answer"]
    assert _score("caesar_cipher", record, f"Decrypting each letter...\n\nAnswer: {record['answer']}") == 1.0
    assert _score("caesar_cipher", record, f"The answer is {record['answer']}.") == 1.0  # the sentence's period


@pytest.mark.parametrize(
    ("task", "template"),
    [("family_relationships", "The relation is therefore \\boxed{{\\text{{{a}}}}}"),
     ("basic_arithmetic", "<think>Compute step by step.</think>{a}"),
     ("basic_arithmetic", "Computing step by step gives the result.\n\n**{a}**"),
     ("basic_arithmetic", "Final answer: ${a}$"),
     ("basic_arithmetic", "<think>The answer is 0.</think>\n**Final Answer:** {a}.")],
    ids=["boxed-text", "after-think", "bold-last-line", "dollar-math", "guess-in-think"],
)
def test_the_fallbacks_read_the_answer_without_its_markup(task, template):
    record = reasoning_gym_records(task, size=1, seed=0)[0]
    assert _score(task, record, template.format(a=record["answer"])) == 1.0


def test_a_final_period_is_kept_when_the_reference_has_one():
    record = next(r for r in reasoning_gym_records("knights_knaves", size=4, seed=0) if r["answer"].endswith("."))
    assert _score("knights_knaves", record, f"Answer: {record['answer']}") == 1.0


def test_a_guess_inside_a_closed_reasoning_block_is_no_answer():
    record = reasoning_gym_records("basic_arithmetic", size=1, seed=0)[0]
    assert _score("basic_arithmetic", record, f"<think>The answer is {record['answer']}</think>") == 0.0


def test_composite_records_are_written_read_back_and_scored(tmp_path):
    """composite's config holds reasoning-gym DatasetSpec objects: write_jsonl refused them, and a config read back as
    dicts could not build the verifier."""
    from reasoning_gym.composite import DatasetSpec

    specs = [DatasetSpec("basic_arithmetic", 1, {}), DatasetSpec("chain_sum", 1, {})]
    records = reasoning_gym_records("composite", size=4, seed=0, datasets=specs)
    target = tmp_path / "composite.jsonl"
    write_jsonl([PromptRecord(prompt=r["prompt"], answer=r["answer"], meta=r["meta"]) for r in records], target)
    reward = get_reward("reasoning_gym")  # the task and config from each record
    back = load_prompts(target)
    assert [reward(b.prompt, f"<answer>{b.answer}</answer>", b.answer, **b.meta) for b in back] == [1.0] * 4
    assert reward(back[0].prompt, "<answer>-1.5e9</answer>", back[0].answer, **back[0].meta) < 1.0
    from_dicts = reasoning_gym_records("composite", size=4, seed=0, datasets=records[0]["meta"]["config"]["datasets"])
    assert [r["prompt"] for r in from_dicts] == [r["prompt"] for r in records]


@pytest.mark.parametrize(
    "template",
    ["Final Answer: The final answer is {a}. I hope it is correct.",  # Minerva's format: the value, then a sentence
     "So the final answer is {a}. Let me double-check: it holds.", "The answer is {a}, since that is the sum.",
     "The answer is **{a}**.", "**Final Answer: {a}**", "Let me work it out.\n\nAnswer:\n{a}\n\nI hope this helps!"],
)
def test_a_value_after_the_answer_phrase_is_read_up_to_its_sentence_or_clause(template):
    """The rest of the line is one reading of a phrase (a sentence answer), the math reward's reading up to a sentence's
    end or a clause the other; the better score is kept."""
    record = reasoning_gym_records("basic_arithmetic", size=1, seed=0)[0]
    assert _score("basic_arithmetic", record, template.format(a=record["answer"])) == 1.0
    assert _score("basic_arithmetic", record, template.format(a="-123456789")) < 1.0


def test_each_reading_is_scored_and_a_verifier_choking_on_one_does_not_hide_another(monkeypatch):
    from entrorl.rewards import reasoning_gym_answer_readings

    assert reasoning_gym_answer_readings("The answer is 7, since 3+4=7.") == ["7, since 3+4=7", "7"]
    assert reasoning_gym_answer_readings("Answer: Smith has to go..", keep_final_period=True)[:2] == [
        "Smith has to go.", "Smith has to go.."]  # a reference ending with a period: with it and without one
    record = reasoning_gym_records("basic_arithmetic", size=1, seed=0)[0]
    reward = get_reward("reasoning_gym", task="basic_arithmetic")
    scorer = reward._scorer("basic_arithmetic", {})
    original = scorer.score_answer

    def choke_on_long_answers(answer, entry):
        if len(str(answer)) > 12:
            raise ValueError("too long")
        return original(answer, entry)

    monkeypatch.setattr(scorer, "score_answer", choke_on_long_answers)
    completion = f"The answer is {record['answer']}, which I checked twice over."
    assert reward(record["prompt"], completion, record["answer"], **record["meta"]) == 1.0


def test_two_answer_phrases_are_not_two_chances():
    """The second reading came from the math reward's own phrases ("My answer is", "answer ="), so two different
    answers each got the better score: it is read from the same phrase's line now."""
    from entrorl.rewards import reasoning_gym_answer_readings

    assert reasoning_gym_answer_readings("The answer is 7\nMy answer is 8") == ["7"]
    record = reasoning_gym_records("basic_arithmetic", size=1, seed=1)[0]
    right, wrong = record["answer"], str(int(record["answer"]) + 1)
    scores = [_score("basic_arithmetic", record, f"The answer is {first}\nMy answer is {second}")
              for first, second in ((wrong, right), (right, wrong))]
    assert scores != [1.0, 1.0]


def test_the_answer_phrase_is_found_in_linear_time():
    import time

    from entrorl.rewards import reasoning_gym_answer_readings

    started = time.perf_counter()  # one regular-expression call holds the interpreter: timed where it runs
    reasoning_gym_answer_readings("answer" + " " * 40_000 + "x")  # "answer\s*\**\s*:" took 2.3 s
    assert time.perf_counter() - started < 1.0


def test_bold_around_parts_of_an_answer_is_kept_and_bold_the_phrase_opened_is_not():
    from entrorl.rewards import reasoning_gym_answer_readings

    assert reasoning_gym_answer_readings("Answer: **Alice** and **Bob**")[0] == "**Alice** and **Bob**"
    assert reasoning_gym_answer_readings(r"Answer: \(x\) or \(y\)")[0] == r"\(x\) or \(y\)"
    assert reasoning_gym_answer_readings("**Final Answer:** 42") == ["42"]
    assert reasoning_gym_answer_readings("The answer is **42**.") == ["42"]


def test_records_same_in_every_process_do_not_follow_the_string_hash_seed(tmp_path):
    """ransom_note's generator iterates over a set of strings, so its questions follow the process's string-hash seed;
    same_in_every_process=True generates under the hash seed 0, so this process and one started with another hash seed
    write the same records, which the plain call in that process does not; a file of the working directory named like a
    module (reasoning_gym.py) does not reach the child Python that generates them."""
    import os
    import subprocess
    import sys

    pytest.importorskip("reasoning_gym")
    here = reasoning_gym_records("ransom_note", size=3, seed=0, same_in_every_process=True)
    code = ("import json; from entrorl.rewards import reasoning_gym_records as records; print(json.dumps(["
            "records('ransom_note', size=3, seed=0), records('ransom_note', size=3, seed=0, same_in_every_process=True)]))")
    (tmp_path / "reasoning_gym.py").write_text("raise SystemExit('a script of the working directory')\n")
    # -P: no working directory on the path, as for a console script; the child Python it starts is not misled either
    child = subprocess.run([sys.executable, "-P", "-c", code], env={**os.environ, "PYTHONHASHSEED": "1"}, cwd=tmp_path,
                           capture_output=True, text=True, check=True)
    plain, fixed = json.loads(child.stdout.strip().splitlines()[-1])
    assert fixed == here and plain != fixed  # the hash seed 1 writes other questions
    with pytest.raises(TypeError, match="same_in_every_process must be True or False"):
        reasoning_gym_records("ransom_note", size=1, seed=0, same_in_every_process="yes")


def test_records_same_in_every_process_raise_the_child_s_error_as_its_own_type():
    """An option the task's config does not take fails in the child Python; it is raised here as the same kind of
    error, with its message."""
    pytest.importorskip("reasoning_gym")
    with pytest.raises(TypeError) as in_process:
        reasoning_gym_records("basic_arithmetic", size=1, seed=0, no_such_option=1)
    with pytest.raises(TypeError) as in_child:
        reasoning_gym_records("basic_arithmetic", size=1, seed=0, same_in_every_process=True, no_such_option=1)
    assert str(in_child.value) == str(in_process.value)


def _through_parquet(rows, path):
    """Rows as verl reads back the Parquet files of data.train_files: Arrow gives each row every key of the struct
    columns, those it lacked as None."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return pq.read_table(path).to_pylist()


def test_records_of_several_tasks_score_after_a_parquet_round_trip_and_default_ones_can_be_written(tmp_path):
    """verl reads only Parquet: records of two tasks with their own options come back with the other task's option
    names set to None, which the reward leaves out (they reached the task's config as unknown arguments, and every
    sample failed); a record of default options has no empty config mapping, which Parquet cannot write."""
    from entrorl.rewards import RewardRunner

    rows = []
    for task, config in [("basic_arithmetic", {"min_terms": 2, "max_terms": 3}),
                         ("leg_counting", {"min_animals": 2, "max_animals": 3}), ("basic_arithmetic", {}),
                         ("leg_counting", {"max_animals": 4})]:  # min_animals comes back None: its default is not
        for record in reasoning_gym_records(task, size=1, seed=0, **config):
            assert ("config" in record["meta"]) is bool(config)
            rows.append({"reward_model": {"ground_truth": record["answer"]},
                         "extra_info": {"prompt": record["prompt"], **record["meta"]}})
    back = _through_parquet(rows, tmp_path / "train.parquet")
    assert back[1]["extra_info"]["config"]["min_terms"] is None  # what Arrow does to the second task's options
    answers = [row["reward_model"]["ground_truth"] for row in back]
    metas = [{key: value for key, value in row["extra_info"].items() if key != "prompt"} for row in back]
    result = RewardRunner(get_reward("reasoning_gym"), warn=False)([row["extra_info"]["prompt"] for row in back],
                                                                   answers, answers, metas)
    assert result.errors == 0, result.first_error
    assert result.scores.tolist() == [1.0, 1.0, 1.0, 1.0]
