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
        "metadata": {"input": ((1, 2), (3, 4)), "colours": {3, 1}, "by_size": {2: ["a"], (1, 2): "b"}, "plain": [1, [2]]},
    }
    written = json.loads(json.dumps(entry_to_json(entry)))
    restored = entry_from_json(written)
    assert restored == entry
    assert type(restored["metadata"]["input"]) is tuple and type(restored["metadata"]["input"][0]) is tuple
    assert type(restored["metadata"]["plain"]) is list
    assert entry_from_json({"__tuple__": "not a list", "other": 1}) == {"__tuple__": "not a list", "other": 1}
    frozen = {"m": {frozenset({1}): "a"}, "s": {frozenset({2, 3})}, "f": frozenset({4})}  # hashable inside sets and keys
    restored = entry_from_json(json.loads(json.dumps(entry_to_json(frozen))))
    assert restored == frozen and type(restored["f"]) is frozenset


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
