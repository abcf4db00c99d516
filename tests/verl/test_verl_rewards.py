"""entrorl's rewards as verl's custom_reward_function, loaded the way verl loads it."""

from __future__ import annotations

import pytest

reward_module = pytest.importorskip("verl.trainer.ppo.reward", reason="verl is not installed; run 'make test-verl'")

from types import SimpleNamespace  # noqa: E402

from omegaconf import OmegaConf  # noqa: E402

from entrorl.rewards import get_reward  # noqa: E402

CASES = [
    ("The sum is \\boxed{12}.", "12"),
    ("so the answer is 0.5", "1/2"),
    ("The answer is 7", "8"),
    ("no number at all", "3"),
    ("\\boxed{\\frac{3}{6}}", "0.5"),
    ("The answer is SEVEN", "seven"),
]


def _verl_reward_fn(name: str, reward_kwargs: dict | None = None):
    """The function verl loads, returning the score of the ``{"score", "acc"}`` it gives verl."""
    section = {"path": "pkg://entrorl.integrations.verl", "name": name}
    if reward_kwargs is not None:
        section["reward_kwargs"] = reward_kwargs
    fn = reward_module.get_custom_reward_fn(OmegaConf.create({"reward": {"custom_reward_function": section}}))

    def score(**arguments):
        result = fn(**arguments)
        assert set(result) == {"score", "acc"} and result["acc"] in (0.0, 1.0), result
        return result["score"]

    return score


@pytest.mark.parametrize("reward, name, kwargs", [
    ("math", "compute_score", {"reward": "math"}),
    ("math", "math_score", None),
    ("exact_match", "compute_score", {"reward": "exact_match"}),
    ("exact_match", "exact_match_score", None),
])
def test_verl_loaded_reward_scores_like_entrorl(reward, name, kwargs):
    fn = _verl_reward_fn(name, kwargs)
    direct = get_reward(reward)
    scores = [fn(data_source="gsm8k", solution_str=completion, ground_truth=answer, extra_info={"prompt": "q"})
              for completion, answer in CASES]
    expected = [float(direct("q", completion, answer)) for completion, answer in CASES]
    assert scores == expected
    assert all(isinstance(score, float) for score in scores)
    assert 0.0 < sum(scores) < len(scores)  # the cases separate right from wrong


def test_reward_options_and_verl_manager_keywords():
    fn = _verl_reward_fn("compute_score", {"reward": "math", "reward_options": {"tolerance": 0.2}})
    assert fn(data_source="d", solution_str="The answer is 1.1", ground_truth="1",
              reward_router_address=None, reward_model_tokenizer=None) == 1.0
    strict = _verl_reward_fn("compute_score", {"reward": "math"})
    assert strict(data_source="d", solution_str="The answer is 1.1", ground_truth="1") == 0.0


def test_bad_reward_settings_are_clear_errors():
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) \['tolerance'\].*reward_options"):
        _verl_reward_fn("compute_score", {"reward": "math", "tolerance": 0.1})(data_source="d", solution_str="1", ground_truth="1")
    with pytest.raises(ValueError, match="unknown reward 'maths'"):
        _verl_reward_fn("compute_score", {"reward": "maths"})(data_source="d", solution_str="1", ground_truth="1")


_SEEN: list[tuple] = []


def _recording_reward(prompt, completion, answer, **metadata):
    """A plain entrorl reward function that records what it is given."""
    _SEEN.append((prompt, completion, answer, metadata))
    return 1


def test_a_reward_sees_the_prompt_and_extra_info_as_its_metadata():
    _SEEN.clear()
    fn = _verl_reward_fn("compute_score", {"reward": f"{__name__}:_recording_reward"})
    assert fn(data_source="gsm8k", solution_str="4", ground_truth="4", extra_info={"prompt": 12, "index": 3}) == 1.0
    assert fn(data_source="gsm8k", solution_str="5", ground_truth="4", extra_info={"data_source": "own"}) == 1.0
    assert fn(data_source="gsm8k", solution_str="6", ground_truth="4") == 1.0
    assert fn(data_source="gsm8k", solution_str="7", ground_truth="4", extra_info={"prompt": None}) == 1.0
    assert _SEEN == [
        ("12", "4", "4", {"index": 3, "data_source": "gsm8k"}),  # the prompt as text, verl's data_source added
        ("", "5", "4", {"data_source": "own"}),  # extra_info's own data_source is kept
        ("", "6", "4", {"data_source": "gsm8k"}),
        ("", "7", "4", {"data_source": "gsm8k"}),  # Parquet's None for a row without the field: no prompt
    ]


def test_compute_score_without_a_reward_name_scores_with_math():
    fn = _verl_reward_fn("compute_score", {})
    direct = get_reward("math")
    assert [fn(data_source="d", solution_str=c, ground_truth=a) for c, a in CASES] == [
        float(direct("", c, a)) for c, a in CASES]
    assert fn(data_source="d", solution_str="\\boxed{\\frac{3}{6}}", ground_truth="0.5") == 1.0  # exact_match says 0


def test_reasoning_gym_score_scores_with_the_task_verifier():
    pytest.importorskip("reasoning_gym")
    from entrorl.rewards import reasoning_gym_records

    record = reasoning_gym_records("basic_arithmetic", size=1, seed=0)[0]
    fn = _verl_reward_fn("reasoning_gym_score", {"reward_options": {"task": "basic_arithmetic"}})
    extra_info = {"prompt": record["prompt"], **record["meta"]}
    assert fn(data_source="rg", solution_str=record["answer"], ground_truth=record["answer"], extra_info=extra_info) == 1.0
    assert fn(data_source="rg", solution_str="-1", ground_truth=record["answer"], extra_info=extra_info) == 0.0


def test_the_caller_s_extra_info_is_left_as_it_was():
    _SEEN.clear()
    fn = _verl_reward_fn("compute_score", {"reward": f"{__name__}:_recording_reward"})
    extra_info = {"prompt": "q", "index": 3}
    fn(data_source="gsm8k", solution_str="4", ground_truth="4", extra_info=extra_info)
    fn(data_source="gsm8k", solution_str="4", ground_truth="4", extra_info=extra_info)
    assert extra_info == {"prompt": "q", "index": 3}
    assert [seen[0] for seen in _SEEN] == ["q", "q"]


def test_scores_reach_verl_as_plain_floats():
    """The math reward returns a verdict object; verl is handed a plain float of its value."""
    fn = _verl_reward_fn("math_score")
    direct = get_reward("math")("", "\\boxed{12}", "12")
    score = fn(data_source="d", solution_str="\\boxed{12}", ground_truth="12")
    assert type(score) is float and score == float(direct) == 1.0


def _gsm8k_reward(prompt, completion, answer, **meta):
    """A reward written as the README says, given verl's GSM8K rows (whose extra_info holds an 'answer')."""
    return float(completion.split()[-1] == answer)


def _verdict_reward(prompt, completion, answer, **meta):
    return SimpleNamespace(score=0.75, reason="partly")


def _nan_reward(prompt, completion, answer, **meta):
    return float("nan")


def test_compute_score_scores_as_entrorl_train_does(caplog):
    """extra_info's own 'answer' (GSM8K's worked solution) does not collide with the reward's; an object's .score is
    the score; a NaN scores 0 (with a warning), never reaching verl's advantages."""
    gsm8k = {"split": "train", "index": 0, "answer": "3 + 4 = 7 #### 72", "question": "How many?"}
    fn = _verl_reward_fn("compute_score", {"reward": f"{__name__}:_gsm8k_reward"})
    assert fn(data_source="openai/gsm8k", solution_str="so 72", ground_truth="72", extra_info=gsm8k) == 1.0
    fn = _verl_reward_fn("compute_score", {"reward": f"{__name__}:_verdict_reward"})
    assert fn(data_source="d", solution_str="x", ground_truth="y") == 0.75
    fn = _verl_reward_fn("compute_score", {"reward": f"{__name__}:_nan_reward"})
    assert fn(data_source="d", solution_str="x", ground_truth="y") == 0.0
    assert "_nan_reward' failed on 1 of 1 samples (scored 0)" in caplog.text and "non-finite value nan" in caplog.text


def _no_meta_reward(prompt, completion, answer):
    return 1.0


def _positional_reward(prompt, completion, answer, /, **meta):
    return float(meta.get("answer") == "worked")


def test_compute_score_refuses_a_reward_that_cannot_take_its_meta_and_keeps_what_one_can():
    """A reward without **meta is refused, as entrorl train refuses it, not scored 0 on every sample; one whose first
    three parameters are positional-only still sees extra_info's answer."""
    fn = _verl_reward_fn("compute_score", {"reward": f"{__name__}:_no_meta_reward"})
    with pytest.raises(ValueError, match="cannot be called as fn\\(prompt, completion, answer, \\*\\*meta\\)"):
        fn(data_source="d", solution_str="x", ground_truth="y")
    fn = _verl_reward_fn("compute_score", {"reward": f"{__name__}:_positional_reward"})
    assert fn(data_source="d", solution_str="x", ground_truth="y", extra_info={"answer": "worked"}) == 1.0


def _gold_reward(prompt, completion, gold, **meta):
    return float(meta.get("answer") == "worked")


_BUILT: list[int] = []


def _slow_factory(tag: str = ""):
    """A reward that takes a while to build (a judge loading its model)."""
    import time

    _BUILT.append(1)
    time.sleep(0.2)
    return lambda prompt, completion, answer, /, **meta: 1.0


def test_compute_score_leaves_out_only_the_colliding_key_and_builds_a_reward_once_across_threads():
    """A reward whose arguments collide with extra_info's 'completion' alone still sees its 'answer'; verl scores a
    batch from a pool of threads, and the reward (a judge's model) is built once."""
    import threading

    fn = _verl_reward_fn("compute_score", {"reward": f"{__name__}:_gold_reward"})
    assert fn(data_source="d", solution_str="x", ground_truth="y", extra_info={"answer": "worked", "completion": "c"}) == 1.0
    _BUILT.clear()
    from entrorl.integrations.verl.rewards import compute_score

    threads = [threading.Thread(target=compute_score, args=("d", "x", "y", {}),
                                kwargs={"reward": f"{__name__}:_slow_factory", "reward_options": {"tag": "threads"}})
               for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert _BUILT == [1]


def test_a_prompt_given_as_chat_messages_reaches_the_reward_as_its_last_user_turn():
    _SEEN.clear()
    fn = _verl_reward_fn("compute_score", {"reward": f"{__name__}:_recording_reward"})
    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    fn(data_source="d", solution_str="4", ground_truth="4", extra_info={"prompt": conversation})
    assert _SEEN[0][0] == "2+2?"


def _raising_reward(prompt, completion, answer, **meta):
    raise KeyError("entry")


def test_a_reward_that_never_scores_stops_the_run_instead_of_training_on_zeros(monkeypatch):
    from entrorl.integrations.verl import rewards

    monkeypatch.setattr(rewards, "FAILURES_IN_A_ROW", 3)
    fn = _verl_reward_fn("compute_score", {"reward": f"{__name__}:_raising_reward"})
    assert [fn(data_source="d", solution_str="x", ground_truth="y") for _ in range(2)] == [0.0, 0.0]
    with pytest.raises(RuntimeError, match=r"failed on each of the last 3 samples verl has given it: stopping rather "
                                           r"than training on zeros; the first of them failed with: .*KeyError"):
        fn(data_source="d", solution_str="x", ground_truth="y")


_CALLS = {"count": 0}


def _fails_after_two_successes_and_once_between(prompt, completion, answer, **meta):
    _CALLS["count"] += 1
    if _CALLS["count"] in (1, 3, 4):  # 2: a failure between successes, which starts the count again
        return 1.0
    raise ConnectionError("judge server unreachable")


def test_a_reward_that_breaks_after_scoring_stops_the_run_too(monkeypatch):
    """A judge that goes down mid-run fails on every later sample: the failures in a row count from any point of the
    run, a success starting them again, as entrorl train counts steps whose every sample failed."""
    from entrorl.integrations.verl import rewards

    monkeypatch.setattr(rewards, "FAILURES_IN_A_ROW", 3)
    _CALLS["count"] = 0
    fn = _verl_reward_fn("compute_score", {"reward": f"{__name__}:_fails_after_two_successes_and_once_between"})
    assert [fn(data_source="d", solution_str="x", ground_truth="y") for _ in range(6)] == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    with pytest.raises(RuntimeError, match="failed on each of the last 3 samples .*ConnectionError"):
        fn(data_source="d", solution_str="x", ground_truth="y")


class _CharTokenizer:
    """One token per character."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i)) for i in ids)


def test_verl_logs_the_reward_s_verdict_as_acc_not_a_wrong_answer_s_partial_credit():
    """reasoning_gym gives a wrong answer partial credit (12/13 for one digit too many); verl's reward manager keeps
    compute_score's 'acc' as the sample's accuracy (val-core/<source>/acc/mean@n, DAPO's filter_groups.metric=acc),
    which is the verdict (full marks), the reward keeping the partial credit."""
    import asyncio

    import numpy as np
    import torch
    from verl import DataProto
    from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager

    pytest.importorskip("reasoning_gym")
    from entrorl.rewards import reasoning_gym_records

    record = reasoning_gym_records("basic_arithmetic", size=1, seed=0)[0]
    config = OmegaConf.create({"reward": {"custom_reward_function": {
        "path": "pkg://entrorl.integrations.verl", "name": "reasoning_gym_score",
        "reward_kwargs": {"reward_options": {"task": "basic_arithmetic"}}}}})
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        manager = NaiveRewardManager(config, _CharTokenizer(), reward_module.get_custom_reward_fn(config))
        outcomes = []
        for response in (record["answer"] + "1", record["answer"]):
            ids = torch.tensor([[ord(c) for c in response]])
            data = DataProto.from_dict(
                tensors={"responses": ids, "attention_mask": torch.ones_like(ids),
                         "prompts": torch.zeros(1, 0, dtype=torch.long)},
                non_tensors={"data_source": np.array(["rg"], dtype=object),
                             "reward_model": np.array([{"ground_truth": record["answer"]}], dtype=object),
                             "extra_info": np.array([{"prompt": record["prompt"], **record["meta"]}], dtype=object)})
            outcomes.append(loop.run_until_complete(manager.run_single(data)))
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    wrong, right = outcomes
    assert 0.0 < wrong["reward_score"] < 1.0 and wrong["reward_extra_info"]["acc"] == 0.0
    assert right["reward_score"] == 1.0 and right["reward_extra_info"]["acc"] == 1.0


_FAILURE_NUMBER: list[int] = []


def _numbered_failure(prompt, completion, answer, **meta):
    _FAILURE_NUMBER.append(1)
    raise ValueError(f"failure number {len(_FAILURE_NUMBER)}")


def test_the_stop_quotes_the_first_failure_and_a_refusal_names_the_key_that_blocks_the_call(monkeypatch):
    from entrorl.integrations.verl import rewards

    monkeypatch.setattr(rewards, "FAILURES_IN_A_ROW", 3)
    fn = _verl_reward_fn("compute_score", {"reward": f"{__name__}:_numbered_failure"})
    fn(data_source="d", solution_str="x", ground_truth="y")
    fn(data_source="d", solution_str="x", ground_truth="y")
    with pytest.raises(RuntimeError, match="the first of them failed with: .*failure number 1$"):
        fn(data_source="d", solution_str="x", ground_truth="y")
    fn = _verl_reward_fn("compute_score", {"reward": f"{__name__}:_no_meta_reward"})
    with pytest.raises(ValueError, match="unexpected keyword argument 'data_source'"):  # answer is left out anyway
        fn(data_source="d", solution_str="x", ground_truth="y", extra_info={"answer": "a"})
