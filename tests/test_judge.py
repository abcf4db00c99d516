"""The judge reward: batching, timeouts, the LRU / SQLite cache, and local model judges (a tiny causal LM
asked yes/no, a tiny sequence-classification reward model) checked against direct model computations."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

import pytest
import torch

from entrorl.rewards import RewardRunner, check_reward_spec, get_reward
from entrorl.rewards.judge import (
    JUDGE_TIMEOUT_REASON,
    CausalLMJudge,
    JudgeCache,
    JudgeReward,
    JudgeScore,
    RewardModelJudge,
    load_model_judge,
)


class RecordingJudge:
    """Scores ``len(completion) + 10 * (answer in completion)``, recording every call's samples."""

    def __init__(self):
        self.calls: list[list[tuple]] = []

    def __call__(self, samples):
        self.calls.append(list(samples))
        return [len(c) + 10.0 * (a is not None and a in c) for _, c, a in samples]


def expected_score(completion, answer):
    return len(completion) + 10.0 * (answer is not None and answer in completion)


PROMPTS = [f"q{i}" for i in range(7)]
COMPLETIONS = ["a", "bb", "the 4", "ccc", "dddd", "5", "x y z"]
ANSWERS = ["1", "2", "4", None, "9", "5", "y"]


# --------------------------------------------------------------------------------------------------
# batching and cache
# --------------------------------------------------------------------------------------------------


def test_scores_a_batch_in_chunks_of_batch_size():
    judge = RecordingJudge()
    reward = JudgeReward(judge, batch_size=3)
    scores = reward.score_batch(PROMPTS, COMPLETIONS, ANSWERS)
    assert [len(call) for call in judge.calls] == [3, 3, 1]
    assert [s.score for s in scores] == [expected_score(c, a) for c, a in zip(COMPLETIONS, ANSWERS)]
    assert all(s.reason is None for s in scores)
    # the samples reach the judge in order, as (prompt, completion, answer)
    assert [sample for call in judge.calls for sample in call] == list(zip(PROMPTS, COMPLETIONS, ANSWERS))


def test_cache_hits_are_not_rejudged_and_duplicates_are_judged_once():
    judge = RecordingJudge()
    reward = JudgeReward(judge, batch_size=4)
    first = reward.score_batch(PROMPTS, COMPLETIONS, ANSWERS)
    assert reward.stats() == {"hits": 0, "misses": 7, "judged": 7, "timeouts": 0, "errors": 0}
    again = reward.score_batch(PROMPTS, COMPLETIONS, ANSWERS)
    assert again == first and len(judge.calls) == 2
    assert reward.stats()["hits"] == 7 and reward.stats()["judged"] == 7
    # a batch holding one new sample three times judges it once; the key includes the answer
    judge.calls.clear()
    mixed = reward.score_batch(["q0", "new", "new", "new"], ["a", "zz", "zz", "zz"], ["other", "z", "z", "z"])
    assert judge.calls == [[("q0", "a", "other"), ("new", "zz", "z")]]
    assert [s.score for s in mixed] == [1.0, 12.0, 12.0, 12.0]


def test_lru_evicts_the_least_recently_used_entry():
    cache = JudgeCache(max_entries=2)
    cache.put_many({"a": 1.0, "b": 2.0})
    assert cache.get("a") == 1.0  # refreshes a: b is now the oldest
    cache.put_many({"c": 3.0})
    assert len(cache) == 2
    assert cache.get("b") is None and cache.get("a") == 1.0 and cache.get("c") == 3.0
    assert (cache.hits, cache.misses) == (3, 1)


def test_lru_storing_an_entry_again_makes_it_the_most_recent():
    """An entry written again (a new score for the key) is the most recently used, so the next eviction takes
    the oldest other entry."""
    cache = JudgeCache(max_entries=2)
    cache.put_many({"a": 1.0, "b": 2.0})
    cache.put_many({"a": 5.0})  # a is now newer than b
    cache.put_many({"c": 3.0})
    assert cache.get("b") is None and cache.get("a") == 5.0 and cache.get("c") == 3.0


def test_a_disk_hit_counts_as_a_hit_and_enters_the_memory_cache(tmp_path):
    """A score found only in the SQLite file is a hit, not a miss, and is then served from memory."""
    path = tmp_path / "judge.sqlite"
    writer = JudgeCache(path=path)
    writer.put_many({"k": 0.5})
    writer.close()
    reader = JudgeCache(max_entries=4, path=path)
    assert len(reader) == 0
    assert reader.get("k") == 0.5
    assert (reader.hits, reader.misses) == (1, 0) and len(reader) == 1
    reader.close()  # without the file, the entry is still served from the in-memory LRU
    assert reader.get("k") == 0.5 and (reader.hits, reader.misses) == (2, 0)


def test_a_cached_score_of_zero_is_reused(tmp_path):
    """0.0 is a score like any other: a sample the judge scored 0 is a cache hit next time, in memory and on disk."""
    calls = []

    def never_right(samples):
        calls.append(list(samples))
        return [0.0] * len(samples)

    path = str(tmp_path / "judge.sqlite")
    reward = JudgeReward(never_right, judge_id="never-right", cache_path=path)
    assert reward.score_batch(["p", "q"], ["a", "b"]) == [JudgeScore(0.0)] * 2
    assert reward.score_batch(["p", "q"], ["a", "b"]) == [JudgeScore(0.0)] * 2
    assert len(calls) == 1 and reward.stats()["hits"] == 2
    again = JudgeReward(never_right, judge_id="never-right", cache_path=path)
    assert again.score_batch(["p", "q"], ["a", "b"]) == [JudgeScore(0.0)] * 2
    assert len(calls) == 1 and again.stats() == {"hits": 2, "misses": 0, "judged": 0, "timeouts": 0, "errors": 0}


class ClassJudge:
    @classmethod
    def score(cls, samples):
        return [1.0] * len(samples)


def test_a_judge_whose_cache_id_others_share_is_warned_about_with_a_persistent_cache(tmp_path):
    """The default cache id is the callable's qualified name: every lambda, every partial of one function, every
    instance of one class and every closure one factory makes share it, so a SQLite cache would serve one's scores
    to another. Without a file the cache is the instance's own; a judge_id, a plain function or a closure-free
    nested one is not warned about."""
    import functools
    import warnings

    path = str(tmp_path / "judge.sqlite")

    def threshold_judge(samples, threshold):
        return [float(len(c) > threshold) for _, c, _ in samples]

    def make_judge(threshold):
        def judge(samples):
            return threshold_judge(samples, threshold)
        return judge

    def plain(samples):
        return [1.0] * len(samples)

    shared = {"a lambda": (lambda samples: [1.0] * len(samples), "lambda"),
              "a partial": (functools.partial(threshold_judge, threshold=3), "partial object"),
              "an instance": (RecordingJudge(), "RecordingJudge object"),
              "a closure": (make_judge(3), "from that call's values"),
              "a bound method": (RecordingJudge().__call__, "method of a RecordingJudge object")}
    for what, (judge, reason) in shared.items():
        with pytest.warns(UserWarning, match="give judge_id= a name of its own") as caught:
            JudgeReward(judge, cache_path=path)
        assert reason in str(caught[0].message) and path in str(caught[0].message), what
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            JudgeReward(judge)  # in memory only
            JudgeReward(judge, judge_id=f"{what}-v1", cache_path=path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        JudgeReward(plain, cache_path=path)
        JudgeReward(expected_score, cache_path=path)
        JudgeReward(JudgeCache.key, cache_path=path)  # a static method names what it does
        JudgeReward(ClassJudge.score, cache_path=path)  # so does a class method: no instance's settings


def test_a_cache_file_that_cannot_be_used_is_named_and_one_held_later_is_passed_by(tmp_path, monkeypatch, caplog):
    """A cache_path that is no SQLite database, or that another process holds longer than the wait, is refused naming
    the file (not a bare sqlite3 traceback); one that another process holds once the run has started costs no score:
    the judge judges, and its scores are kept in memory, with one warning."""
    import sqlite3

    from entrorl.rewards import judge as judge_module

    not_a_database = tmp_path / "notes.txt"
    not_a_database.write_text("these are notes, not a database\n" * 100)
    with pytest.raises(ValueError, match=rf"judge cache_path {not_a_database} cannot be used: file is not a database"):
        JudgeReward(RecordingJudge(), cache_path=str(not_a_database), judge_id="recording")
    monkeypatch.setattr(judge_module, "_SQLITE_WAIT_S", 0.05)
    path = tmp_path / "cache.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    with pytest.raises(ValueError, match=rf"judge cache_path {path} cannot be used: database is locked \(.*over 0.05 s\)"):
        JudgeReward(RecordingJudge(), cache_path=str(path), judge_id="recording")
    holder.execute("ROLLBACK")

    judge = RecordingJudge()
    reward = JudgeReward(judge, cache_path=str(path), cache_size=0, judge_id="recording")
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the file from now on
    with caplog.at_level("WARNING"):
        scores = reward.score_batch(["p", "q"], ["a", "b"], [None, None])
        again = reward.score_batch(["p"], ["a"], [None])
    assert [score.failed for score in scores + again] == [False] * 3 and len(judge.calls) == 2
    assert caplog.text.count(f"judge cache {path}: database is locked") == 1
    assert "kept in memory" not in caplog.text  # cache_size 0: nowhere
    holder.execute("ROLLBACK")
    holder.close()
    time.sleep(0.1)  # past the wait's length, the file is tried again
    reward.score_batch(["p"], ["a"], [None])  # and it is free: the score is written
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM judge_scores").fetchone()[0] == 1


def test_cache_size_zero_judges_every_time():
    judge = RecordingJudge()
    reward = JudgeReward(judge, cache_size=0)
    reward.score_batch(["p"], ["c"], ["a"])
    reward.score_batch(["p"], ["c"], ["a"])
    assert len(judge.calls) == 2 and reward.stats()["hits"] == 0


def test_cache_key_depends_on_every_field():
    base = JudgeCache.key("j", "p", "c", "a")
    assert len(base) == 64 and base == JudgeCache.key("j", "p", "c", "a")
    variants = [JudgeCache.key("k", "p", "c", "a"), JudgeCache.key("j", "q", "c", "a"), JudgeCache.key("j", "p", "d", "a"),
                JudgeCache.key("j", "p", "c", None), JudgeCache.key("j", "pc", "", "a")]
    assert len({base, *variants}) == 6
    # no reference answer is not the reference answer "None" (the template fills them differently)
    assert JudgeCache.key("j", "p", "c", None) != JudgeCache.key("j", "p", "c", "None")


def test_disk_cache_persists_across_instances_and_separates_judges(tmp_path):
    path = tmp_path / "cache" / "judge.sqlite"
    first = RecordingJudge()
    JudgeReward(first, judge_id="rule-v1", cache_path=str(path)).score_batch(PROMPTS, COMPLETIONS, ANSWERS)
    second = RecordingJudge()
    reward = JudgeReward(second, judge_id="rule-v1", cache_path=str(path))
    scores = reward.score_batch(PROMPTS, COMPLETIONS, ANSWERS)
    assert second.calls == [] and reward.stats()["hits"] == 7
    assert [s.score for s in scores] == [expected_score(c, a) for c, a in zip(COMPLETIONS, ANSWERS)]
    third = RecordingJudge()
    JudgeReward(third, judge_id="rule-v2", cache_path=str(path)).score_batch(PROMPTS, COMPLETIONS, ANSWERS)
    assert sum(len(call) for call in third.calls) == 7


# --------------------------------------------------------------------------------------------------
# timeouts and failures
# --------------------------------------------------------------------------------------------------


def test_slow_chunk_times_out_to_zero_and_the_rest_is_scored():
    release = threading.Event()

    def judge(samples):
        if any("slow" in completion for _, completion, _ in samples):
            release.wait(10)
        return [float(len(completion)) for _, completion, _ in samples]

    reward = JudgeReward(judge, batch_size=2, timeout_s=0.2)
    started = time.perf_counter()
    scores = reward.score_batch(["p"] * 4, ["ab", "abc", "slow", "x"], None)
    elapsed = time.perf_counter() - started
    release.set()
    assert elapsed < 2.0
    assert scores[:2] == [JudgeScore(2.0), JudgeScore(3.0)]
    assert scores[2:] == [JudgeScore(0.0, JUDGE_TIMEOUT_REASON, failed=True)] * 2
    assert reward.stats()["timeouts"] == 2
    # a timeout is not cached: the next call judges those samples again (now fast)
    again = reward.score_batch(["p"] * 2, ["slow", "x"], None)
    assert again == [JudgeScore(4.0), JudgeScore(1.0)]


def test_judge_errors_and_bad_outputs_score_zero_with_a_reason():
    def raising(samples):
        raise RuntimeError("service unavailable")

    scores = JudgeReward(raising).score_batch(["p", "q"], ["a", "b"])
    assert scores == [JudgeScore(0.0, "judge error: RuntimeError: service unavailable", failed=True)] * 2
    for bad, message in ((lambda s: [1.0], "returned 1 scores for 2 samples"), (lambda s: [1.0, math.nan], "nan"),
                         (lambda s: ["1", "2"], "not a finite number"), (lambda s: None, "not a list"),
                         # iterable, but no scores in order: a dict's keys would have been the scores
                         (lambda s: {0: 0.5, 1: 0.75}, "returned a dict, not a list of 2 scores"),
                         (lambda s: "01", "returned a str, not a list of 2 scores")):
        reward = JudgeReward(bad)
        scores = reward.score_batch(["p", "q"], ["a", "b"])
        assert all(s.score == 0.0 and s.failed and message in s.reason for s in scores), (message, scores)
        assert reward.stats()["errors"] == 2 and len(reward.cache) == 0


def test_infinite_scores_and_more_scores_than_samples_are_errors():
    """An infinite score is no score, and a judge returning more scores than samples is misaligned: neither is
    trusted nor cached."""
    for bad, message in ((lambda s: [1.0, math.inf], "not a finite number"), (lambda s: [1.0, -math.inf], "not a finite number"),
                         (lambda s: [1.0, 2.0, 3.0], "returned 3 scores for 2 samples")):
        reward = JudgeReward(bad)
        scores = reward.score_batch(["p", "q"], ["a", "b"])
        assert all(s.score == 0.0 and s.failed and message in s.reason for s in scores), (message, scores)
        assert reward.stats()["errors"] == 2 and len(reward.cache) == 0


def test_default_batch_size_is_8_and_default_cache_holds_4096_entries():
    judge = RecordingJudge()
    reward = JudgeReward(judge)
    reward.score_batch([f"q{i}" for i in range(9)], [f"c{i}" for i in range(9)])
    assert [len(call) for call in judge.calls] == [8, 1]
    assert reward.cache.max_entries == 4096 and JudgeCache().max_entries == 4096


def test_identical_samples_of_a_failed_chunk_all_fail():
    """A sample repeated in the batch is judged once; when that call fails or times out, every copy gets the
    failed score."""
    calls = []

    def raising(samples):
        calls.append(list(samples))
        raise RuntimeError("service unavailable")

    failed = JudgeScore(0.0, "judge error: RuntimeError: service unavailable", failed=True)
    reward = JudgeReward(raising, batch_size=4)
    assert reward.score_batch(["p", "p", "q", "p"], ["a", "a", "b", "a"]) == [failed] * 4
    assert calls == [[("p", "a", None), ("q", "b", None)]] and reward.stats()["errors"] == 2
    release = threading.Event()
    slow = JudgeReward(lambda samples: [float(release.wait(10))] * len(samples), timeout_s=0.05)
    scores = slow.score_batch(["p", "p", "q"], ["a", "a", "b"])
    release.set()
    assert scores == [JudgeScore(0.0, JUDGE_TIMEOUT_REASON, failed=True)] * 3


def test_without_a_timeout_the_judge_runs_in_the_callers_thread():
    """timeout_s=None calls the judge directly (a judge may rely on thread-local state); a timeout runs it in a
    worker thread."""
    seen = []

    def judge(samples):
        seen.append(threading.get_ident())
        return [1.0] * len(samples)

    JudgeReward(judge).score_batch(["p"], ["a"])
    JudgeReward(judge, timeout_s=5).score_batch(["p"], ["a"])
    assert seen[0] == threading.get_ident() and seen[1] != threading.get_ident()


def test_a_judge_error_under_a_timeout_keeps_its_reason():
    """An exception raised in the worker thread reaches the sample's reason as it does without a timeout."""
    def raising(samples):
        raise RuntimeError("service unavailable")

    reward = JudgeReward(raising, timeout_s=5)
    failed = JudgeScore(0.0, "judge error: RuntimeError: service unavailable", failed=True)
    assert reward.score_batch(["p"], ["a"]) == [failed]
    assert reward.stats()["errors"] == 1 and reward.stats()["timeouts"] == 0


@pytest.mark.parametrize("timeout_s", [None, 5])
@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_in_the_judge_stops_the_run(timeout_s, interrupt):
    """Ctrl-C or sys.exit() inside a judge call is not turned into a score of 0: it propagates to the caller."""
    def judge(samples):
        raise interrupt

    reward = JudgeReward(judge, timeout_s=timeout_s)
    with pytest.raises(interrupt):
        reward.score_batch(["p"], ["a"])
    assert reward.stats()["errors"] == 0


def test_a_call_within_a_fractional_timeout_is_scored():
    """A judge that answers well within a timeout of under a second is scored, not timed out."""
    def judge(samples):
        time.sleep(0.02)
        return [2.0] * len(samples)

    reward = JudgeReward(judge, timeout_s=0.9)
    assert reward.score_batch(["p"], ["a"]) == [JudgeScore(2.0)] and reward.stats()["timeouts"] == 0


def test_a_judge_that_never_returns_does_not_keep_the_process_alive():
    """After a timeout the late call is left running in the background; the interpreter still exits."""
    script = (
        "import threading\n"
        "from entrorl.rewards.judge import JudgeReward\n"
        "never = threading.Event()\n"
        "reward = JudgeReward(lambda samples: [float(never.wait())] * len(samples), timeout_s=0.05)\n"
        "print(reward('p', 'c').reason)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == JUDGE_TIMEOUT_REASON, done.stderr


def test_numpy_and_zero_dim_tensor_scores_are_accepted():
    """A judge may return a list of numpy scalars or 0-d tensors (one per sample), as well as a tensor."""
    reward = JudgeReward(lambda samples: [torch.tensor(0.5), np.float32(0.25), np.int64(3), torch.tensor(True)])
    assert [s.score for s in reward.score_batch(["p"] * 4, ["a", "b", "c", "d"])] == [0.5, 0.25, 3.0, 1.0]
    assert reward.stats()["errors"] == 0


def test_a_single_sample_call_passes_its_answer_to_the_judge():
    """reward(prompt, completion, answer) judges (prompt, completion, answer), reference answer included."""
    judge = RecordingJudge()
    assert JudgeReward(judge)("q", "the 4", "4") == JudgeScore(expected_score("the 4", "4"))
    assert judge.calls == [[("q", "the 4", "4")]]


def test_tensor_outputs_and_single_sample_call():
    reward = JudgeReward(lambda samples: torch.tensor([[0.25]] * len(samples)))
    assert [s.score for s in reward.score_batch(["p", "q"], ["a", "b"])] == [0.25, 0.25]
    assert reward("p", "a", None, task="ignored") == JudgeScore(0.25)


def test_works_inside_reward_runner_with_reasons():
    judge = RecordingJudge()
    runner = RewardRunner(JudgeReward(judge, batch_size=3), correct_threshold=5.0)
    result = runner(PROMPTS, COMPLETIONS, ANSWERS, [{"k": 1}] * 7)
    assert [len(call) for call in judge.calls] == [3, 3, 1]  # the runner hands the judge the whole batch
    assert result.scores.tolist() == [expected_score(c, a) for c, a in zip(COMPLETIONS, ANSWERS)]
    assert result.correct.tolist() == [s >= 5.0 for s in result.scores.tolist()]
    release = threading.Event()
    slow = JudgeReward(lambda samples: [float(release.wait(10))] * len(samples), timeout_s=0.05)
    result = RewardRunner(slow)(["p", "q"], ["a", "b"])
    release.set()
    # a judge that timed out or failed gave no score: the runner counts the samples as failed rewards, which the
    # trainer's reward/errors, reward_errors.log and reward.max_failing_steps stop see
    assert result.scores.tolist() == [0.0, 0.0] and result.errors == 2 and result.failed.tolist() == [True, True]
    assert result.reasons == [f"reward failed: {JUDGE_TIMEOUT_REASON}"] * 2
    assert result.first_error == f"reward for sample 0 failed: {JUDGE_TIMEOUT_REASON}"

    def unreachable(samples):
        raise ConnectionError("judge API unreachable")

    result = RewardRunner(JudgeReward(unreachable))(["p"] * 3, ["a", "b", "c"], ["x"] * 3)
    assert result.errors == 3 and "ConnectionError: judge API unreachable" in result.first_error
    # the judge's traceback follows the first failure's line, as a reward's that raised does (reward_errors.log)
    headline, _, details = result.first_error.partition("\n")
    assert headline == "reward for sample 0 failed: judge error: ConnectionError: judge API unreachable"
    assert details.startswith("Traceback (most recent call last):") and "in unreachable" in details
    for timeout in (None, 5.0):  # raised in the judge's own thread too
        judged = RewardRunner(JudgeReward(unreachable, timeout_s=timeout))(["p"], ["a"], ["x"])
        assert "in unreachable" in judged.first_error
    assert RewardRunner(JudgeReward(lambda samples: [True, False]))(["p", "q"], ["a", "b"]).scores.tolist() == [1.0, 0.0]


# --------------------------------------------------------------------------------------------------
# registry and option checks
# --------------------------------------------------------------------------------------------------


def test_registered_as_judge_and_options_are_validated(tmp_path, tiny_model_dir):
    reward = get_reward("judge", judge=RecordingJudge(), batch_size=2, timeout_s=5)
    assert isinstance(reward, JudgeReward) and reward.batch_size == 2 and reward.timeout_s == 5.0
    check_reward_spec("judge", judge=str(tiny_model_dir), template="Q {prompt} A {completion}?", kind="yes_no")
    check_reward_spec("judge", judge="json:dumps")
    bad = [
        ({"judge": RecordingJudge(), "batch_size": 0}, "batch_size must be a positive integer"),
        ({"judge": RecordingJudge(), "timeout_s": -1}, "timeout_s must be a positive number"),
        ({"judge": RecordingJudge(), "timeout_s": 0}, "timeout_s must be a positive number"),
        ({"judge": RecordingJudge(), "timeout_s": math.inf}, "timeout_s must be a positive number"),
        ({"judge": RecordingJudge(), "timeout_s": True}, "timeout_s must be a positive number"),
        ({"judge": RecordingJudge(), "judge_id": ""}, "judge_id must be a non-empty string"),
        ({"judge": "json:dumps", "template": "{completion}"}, "not to an imported callable"),
        ({"judge": str(tiny_model_dir), "max_length": 0}, "max_length must be a positive integer"),
        ({"judge": RecordingJudge(), "cache_size": -1}, "cache_size must be a non-negative integer, got -1"),
        ({"judge": RecordingJudge(), "template": "{completion}"}, "apply to a model directory judge"),
        ({"judge": str(tmp_path / "missing")}, "neither an existing model directory nor an import path"),
        ({"judge": str(tmp_path)}, "no config.json"),
        ({"judge": "no_such_module_xyz:judge"}, "cannot import"),
        ({"judge": str(tiny_model_dir), "template": "{prompt} {oops}"}, "only use the fields"),
        ({"judge": str(tiny_model_dir), "template": "{prompt}"}, "must contain the field '{completion}'$"),
        # escaped, it is text once filled in: the judge would not see the completion, every sample the same score
        ({"judge": str(tiny_model_dir), "template": "{prompt} {{completion}}"},
         r"must contain the field '\{completion\}' \('\{\{completion\}\}' is the text '\{completion\}' once filled in\)$"),
        ({"judge": str(tiny_model_dir), "template": "{prompt} {completion.x}"}, "only use the fields"),
        ({"judge": str(tiny_model_dir), "kind": "classifier"}, "kind must be one of"),
        ({"judge": str(tiny_model_dir), "colour": "red"}, r"unknown judge option\(s\) \['colour'\]; the judge's "
         r"options: judge, judge_id, .*cache_path and, for a model directory, kind, template, yes, no, label, "
         r"max_length, device$"),
    ]
    for options, message in bad:
        with pytest.raises(ValueError, match=message):
            check_reward_spec("judge", **options)
    # without a judge, the options listed are a model directory's too (taken through **model_options)
    with pytest.raises(ValueError, match=r"missing a required argument: 'judge'; accepted options: \['judge', "
                                         r".*'cache_path', 'kind', 'template', 'yes', 'no', 'label', 'max_length', "
                                         r"'device'\]"):
        check_reward_spec("judge", template="{completion}")


def test_mismatched_batch_lengths_are_rejected():
    with pytest.raises(ValueError, match="same length"):
        JudgeReward(RecordingJudge()).score_batch(["p"], ["a", "b"])
    with pytest.raises(ValueError, match="same length"):
        JudgeReward(RecordingJudge()).score_batch(["p", "q"], ["a", "b"], ["x"])


# --------------------------------------------------------------------------------------------------
# local model judges
# --------------------------------------------------------------------------------------------------

TEMPLATE = "Q: {prompt}\nA: {completion}\nRef: {answer}\nOK?"


def continuation_log_prob(model, tokenizer, question: str, continuation: str) -> float:
    """log P(continuation | question) from one unpadded forward pass."""
    question_ids = tokenizer(question)["input_ids"]
    answer_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([question_ids + answer_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(float(log_probs[len(question_ids) - 1 + k, token]) for k, token in enumerate(answer_ids))


def test_causal_lm_yes_no_judge_matches_direct_computation(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from entrorl.modeling import load_tokenizer

    torch.set_num_threads(1)
    reward = get_reward("judge", judge=str(tiny_model_dir), template=TEMPLATE, batch_size=3)
    assert isinstance(reward.judge, CausalLMJudge) and reward.judge_id.startswith("yes-no:")
    prompts = ["1+2=", "7+8=", "9+9=", "0+0="]
    completions = ["3", "fifteen or so", "18", ""]
    answers = ["3", "15", None, "0"]
    scores = [s.score for s in reward.score_batch(prompts, completions, answers)]

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = load_tokenizer(tiny_model_dir)
    for score, prompt, completion, answer in zip(scores, prompts, completions, answers):
        question = TEMPLATE.format(prompt=prompt, completion=completion, answer="(none)" if answer is None else answer)
        log_yes = continuation_log_prob(model, tokenizer, question, " yes")
        log_no = continuation_log_prob(model, tokenizer, question, " no")
        assert score == pytest.approx(math.exp(log_yes) / (math.exp(log_yes) + math.exp(log_no)), rel=1e-4)
        assert 0.0 < score < 1.0
    # padding inside a batch does not change a sample's score
    alone = [reward.judge([(p, c, a)])[0] for p, c, a in zip(prompts, completions, answers)]
    assert scores == pytest.approx(alone, rel=1e-4)  # padded batch against rows alone: other matmul shapes


def test_causal_lm_judge_keeps_the_end_of_a_question_longer_than_max_length(tiny_model_dir):
    """The question is cut once, to max_length less the longer answer (" yes", 4 characters; " no", 3), so that both
    answers are scored after the same question: P(yes | q) / (P(yes | q) + P(no | q))."""
    from transformers import AutoModelForCausalLM

    from entrorl.modeling import load_tokenizer

    torch.set_num_threads(1)
    judge = load_model_judge(tiny_model_dir, template="{prompt} {completion}?", max_length=20)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = load_tokenizer(tiny_model_dir)
    long_completion = "the sum of these two numbers is clearly twelve"
    question_ids = tokenizer(f"1+2= {long_completion}?")["input_ids"][-(20 - 4):]
    assert (len(judge.yes_ids), len(judge.no_ids)) == (4, 3)
    log_p = {}
    for word in (" yes", " no"):
        answer_ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([question_ids + answer_ids])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
        start = ids.shape[1] - len(answer_ids)
        log_p[word] = sum(float(log_probs[start - 1 + k, token]) for k, token in enumerate(answer_ids))
    expected = 1.0 / (1.0 + math.exp(log_p[" no"] - log_p[" yes"]))
    assert judge([("1+2=", long_completion, None)])[0] == pytest.approx(expected, rel=1e-4)


def test_causal_lm_judge_rejects_identical_answers(tiny_model_dir):
    with pytest.raises(ValueError, match="must encode to different"):
        load_model_judge(tiny_model_dir, kind="yes_no", yes="y", no="y")


def test_causal_lm_judge_refuses_a_max_length_without_room_for_the_question(tiny_model_dir):
    """" yes" is four characters: max_length 4 leaves no token for the question and is refused; 5 is accepted."""
    with pytest.raises(ValueError, match="leaves no room for the question"):
        load_model_judge(tiny_model_dir, kind="yes_no", max_length=4)
    assert load_model_judge(tiny_model_dir, kind="yes_no", max_length=5).max_length == 5


def test_label_applies_to_reward_models_only(tiny_model_dir):
    """A yes/no judge has no label to pick: the option is refused by name, not with a constructor TypeError."""
    with pytest.raises(ValueError, match="applies to reward-model judges only"):
        load_model_judge(tiny_model_dir, kind="yes_no", label=0)


def save_tiny_gpt2(directory):
    """A tiny GPT-2 (learned absolute position embeddings) with the character tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from entrorl.lab.tiny_model import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=128,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


def test_causal_lm_judge_with_absolute_positions_matches_direct_computation_in_a_padded_batch(tmp_path):
    """With left padding, each row's positions start at 0 at its first real token: a model with absolute
    position embeddings scores a short question in a batch with a long one as it scores it alone."""
    torch.set_num_threads(1)
    model, tokenizer = save_tiny_gpt2(tmp_path)
    judge = load_model_judge(tmp_path, template=TEMPLATE)
    samples = [("1+2=", "3", "3"), ("what is seven plus eight", "it is fifteen or so", "15")]
    scores = judge(samples)
    for score, (prompt, completion, answer) in zip(scores, samples):
        question = TEMPLATE.format(prompt=prompt, completion=completion, answer=answer)
        log_yes = continuation_log_prob(model, tokenizer, question, " yes")
        log_no = continuation_log_prob(model, tokenizer, question, " no")
        assert score == pytest.approx(1.0 / (1.0 + math.exp(log_no - log_yes)), rel=1e-4)


def test_a_yes_no_judge_reads_at_most_the_models_context_by_default(tmp_path):
    """Without max_length the question is cut to the model's max_position_embeddings (128 here), so a question
    longer than the context is scored from its end instead of overrunning the position embeddings."""
    torch.set_num_threads(1)
    save_tiny_gpt2(tmp_path)
    judge = load_model_judge(tmp_path, template=TEMPLATE)
    assert judge.max_length == 128
    sample = ("p", "x" * 300, None)
    assert judge([sample]) == pytest.approx(load_model_judge(tmp_path, template=TEMPLATE, max_length=128)([sample]), rel=1e-5)


def test_a_reward_model_reads_at_most_the_models_context_by_default(tmp_path):
    torch.set_num_threads(1)
    save_tiny_reward_model(tmp_path, 1)
    judge = load_model_judge(tmp_path)
    assert isinstance(judge, RewardModelJudge) and judge.max_length == 128
    sample = ("p", "y" * 150 + " so the answer is 4", None)
    assert judge([sample]) == pytest.approx(load_model_judge(tmp_path, max_length=128)([sample]), rel=1e-5)


def test_auto_kind_finds_a_classification_architecture_listed_after_another(tmp_path):
    import json

    torch.set_num_threads(1)
    save_tiny_reward_model(tmp_path, 1)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["Qwen2Model", "Qwen2ForSequenceClassification"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert isinstance(load_model_judge(tmp_path), RewardModelJudge)


def test_model_judges_with_other_settings_do_not_share_cached_scores(tmp_path, tiny_model_dir):
    """A setting that changes the scores (the yes/no judge's template, answer words or max_length; the reward
    model's label or max_length) changes the cache key: a shared cache file never hands one setting's scores to
    another, while the same setting is served from it."""
    torch.set_num_threads(1)
    cache_path = str(tmp_path / "judge.sqlite")
    reward_model_dir = tmp_path / "reward-model"
    save_tiny_reward_model(reward_model_dir, 3)
    settings = [(tiny_model_dir, {"template": TEMPLATE}), (tiny_model_dir, {"template": TEMPLATE + " "}),
                (tiny_model_dir, {"template": TEMPLATE, "yes": " ok"}),
                (tiny_model_dir, {"template": TEMPLATE, "max_length": 40}),
                (reward_model_dir, {}), (reward_model_dir, {"label": 0}), (reward_model_dir, {"max_length": 16})]
    for directory, options in settings:
        reward = JudgeReward(str(directory), cache_path=cache_path, **options)
        reward.score_batch(["1+2="], ["3"], ["3"])
        assert reward.stats()["judged"] == 1, options
    for directory, options in settings:
        reward = JudgeReward(str(directory), cache_path=cache_path, **options)
        reward.score_batch(["1+2="], ["3"], ["3"])
        assert reward.stats()["judged"] == 0 and reward.stats()["hits"] == 1, options


def test_an_explicit_judge_id_names_a_model_judge_in_the_cache(tmp_path, tiny_model_dir):
    """judge_id replaces the model's default id in cache keys: scores cached under that id by another judge are
    reused."""
    cache_path = str(tmp_path / "judge.sqlite")
    remote = JudgeReward(lambda samples: [0.75] * len(samples), judge_id="verifier-v1", cache_path=cache_path)
    remote.score_batch(["p"], ["a"])
    reward = JudgeReward(str(tiny_model_dir), judge_id="verifier-v1", cache_path=cache_path)
    assert reward.judge_id == "verifier-v1"
    assert reward("p", "a") == JudgeScore(0.75) and reward.stats()["judged"] == 0


def save_tiny_reward_model(directory, num_labels: int, chat_template: str | None = None):
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from entrorl.lab.tiny_model import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = chat_template
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, num_labels=num_labels)
    torch.manual_seed(0)
    model = Qwen2ForSequenceClassification(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


@pytest.mark.parametrize("num_labels", [1, 3])
def test_reward_model_judge_matches_direct_computation(tmp_path, num_labels):
    torch.set_num_threads(1)
    model, tokenizer = save_tiny_reward_model(tmp_path, num_labels)
    reward = JudgeReward(str(tmp_path), batch_size=2)
    assert isinstance(reward.judge, RewardModelJudge)
    prompts, completions = ["2+2=", "3+3=", "10+10=", "1+1="], ["4", "six", "20 is the sum", "a b c d e f g h"]
    scores = [s.score for s in reward.score_batch(prompts, completions)]
    for score, prompt, completion in zip(scores, prompts, completions):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tokenizer(prompt + completion)["input_ids"]])).logits[0]
        expected = float(logits[0]) if num_labels == 1 else float(torch.softmax(logits, -1)[-1])
        assert score == pytest.approx(expected, rel=1e-4, abs=1e-6)
    if num_labels == 3:
        first = JudgeReward(str(tmp_path), label=0).score_batch(prompts, completions)
        assert all(0 < s.score < 1 for s in first) and [s.score for s in first] != scores
        for label in (3, -1, True, 1.0):
            with pytest.raises(ValueError, match=r"label must be an integer in \[0, 3\)"):
                JudgeReward(str(tmp_path), label=label)


def test_reward_model_judge_keeps_the_end_of_a_long_input(tmp_path):
    """Beyond max_length the judge reads the last tokens, where the completion's answer is: cut from the right,
    completions ending CORRECT and WRONG after a long prompt scored the same."""
    torch.set_num_threads(1)
    model, tokenizer = save_tiny_reward_model(tmp_path, 1)
    prompt = "x" * 40
    reward = JudgeReward(str(tmp_path), max_length=32)
    right, wrong = (reward(prompt, " so the answer is " + ending).score for ending in ("CORRECT", "WRONG"))
    assert right != pytest.approx(wrong, rel=1e-6)
    with torch.no_grad():
        ids = tokenizer(prompt + " so the answer is CORRECT")["input_ids"][-32:]
        assert right == pytest.approx(float(model(input_ids=torch.tensor([ids])).logits[0, 0]), rel=1e-4)


def test_reward_model_judge_uses_the_chat_template(tmp_path):
    torch.set_num_threads(1)
    template = "{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}{% endfor %}"
    model, tokenizer = save_tiny_reward_model(tmp_path, 1, chat_template=template)
    score = JudgeReward(str(tmp_path))("2+2=", "4").score
    with torch.no_grad():
        expected = float(model(input_ids=torch.tensor([tokenizer("<u>2+2=<a>4")["input_ids"]])).logits[0, 0])
        plain = float(model(input_ids=torch.tensor([tokenizer("2+2=4")["input_ids"]])).logits[0, 0])
    assert score == pytest.approx(expected, rel=1e-4) and score != pytest.approx(plain, rel=1e-4)


def test_reward_model_judge_with_a_chat_template_adds_no_second_bos(tmp_path):
    """A chat template writes the special tokens itself: the judge's input holds the template's BOS once, even
    when the tokenizer also adds one to plain text."""
    from tokenizers.processors import TemplateProcessing

    torch.set_num_threads(1)
    template = "{{ bos_token }}{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}{% endfor %}"
    model, tokenizer = save_tiny_reward_model(tmp_path, 1, chat_template=template)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tokenizer.bos_token_id)])
    tokenizer.save_pretrained(tmp_path)
    ids = tokenizer("<u>2+2=<a>4")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    score = JudgeReward(str(tmp_path))("2+2=", "4").score
    with torch.no_grad():
        expected = float(model(input_ids=torch.tensor([ids])).logits[0, 0])
        doubled = float(model(input_ids=torch.tensor([[tokenizer.bos_token_id, *ids]])).logits[0, 0])
    assert score == pytest.approx(expected, rel=1e-4) and score != pytest.approx(doubled, rel=1e-4)


# --------------------------------------------------------------------------------------------------
# option checks, empty inputs and cache identity
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["{} {completion}", "{0} {completion}", "{completion} {", "{completion} }"])
def test_a_template_with_positional_fields_or_unpaired_braces_is_refused_by_name(tiny_model_dir, template):
    """A positional field ({} or {0}) and an unpaired brace fail str.format with IndexError / ValueError: both are
    reported as a bad template, like an unknown named field."""
    with pytest.raises(ValueError, match="only use the fields"):
        check_reward_spec("judge", judge=str(tiny_model_dir), template=template)


def test_a_template_that_is_not_a_string_is_refused_by_name(tiny_model_dir):
    with pytest.raises(ValueError, match="template must be a string, got int"):
        check_reward_spec("judge", judge=str(tiny_model_dir), template=5)


def test_load_model_judge_refuses_an_unknown_kind_a_missing_config_and_foreign_options(tmp_path, tiny_model_dir):
    """load_model_judge checks its own arguments: an unknown kind is not silently read as a yes/no judge, a
    directory without config.json is named, and yes/no options given to a reward model are refused by name
    (also through JudgeReward, whose option check cannot know the model's kind before loading it)."""
    with pytest.raises(ValueError, match="kind must be one of"):
        load_model_judge(tiny_model_dir, kind="classifier")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"not a model directory \(no config.json\)"):
        load_model_judge(empty, kind="yes_no")
    reward_model_dir = tmp_path / "reward-model"
    save_tiny_reward_model(reward_model_dir, 1)
    with pytest.raises(ValueError, match=r"\['template'\] do not apply to a reward-model judge"):
        load_model_judge(reward_model_dir, template=TEMPLATE)
    with pytest.raises(ValueError, match=r"\['yes'\] do not apply to a reward-model judge"):
        JudgeReward(str(reward_model_dir), yes=" ok")


def test_model_judges_score_an_empty_list_as_an_empty_list(tmp_path, tiny_model_dir):
    reward_model_dir = tmp_path / "reward-model"
    save_tiny_reward_model(reward_model_dir, 1)
    assert load_model_judge(tiny_model_dir, template=TEMPLATE)([]) == []
    assert load_model_judge(reward_model_dir)([]) == []


def test_metas_of_another_length_are_rejected():
    with pytest.raises(ValueError, match=r"metas \(1\) must have the same length"):
        JudgeReward(RecordingJudge()).score_batch(["p", "q"], ["a", "b"], None, [{}])
    assert len(JudgeReward(RecordingJudge()).score_batch(["p", "q"], ["a", "b"], None, [{}, None])) == 2


def test_a_reward_model_without_a_pad_token_in_its_config_scores_a_padded_batch(tmp_path):
    """The classification head pools each row's last non-pad token, so it needs the pad id; a config without one
    gets the tokenizer's, and rows of different lengths in one batch score as they do alone."""
    import json

    torch.set_num_threads(1)
    model, tokenizer = save_tiny_reward_model(tmp_path, 1)
    config = json.loads((tmp_path / "config.json").read_text())
    config["pad_token_id"] = None
    (tmp_path / "config.json").write_text(json.dumps(config))
    reward = JudgeReward(str(tmp_path))
    prompts, completions = ["2+2=", "10+10="], ["4", "20 is the sum of them"]
    scores = reward.score_batch(prompts, completions)
    assert reward.stats()["errors"] == 0
    for score, prompt, completion in zip(scores, prompts, completions):
        with torch.no_grad():
            expected = float(model(input_ids=torch.tensor([tokenizer(prompt + completion)["input_ids"]])).logits[0, 0])
        assert score == JudgeScore(pytest.approx(expected, rel=1e-4))


def test_a_two_label_reward_model_scores_the_probability_of_the_last_label(tmp_path):
    """A binary classifier (bad / good) is scored by the softmax probability of its last label, not by a logit."""
    torch.set_num_threads(1)
    model, tokenizer = save_tiny_reward_model(tmp_path, 2)
    prompts, completions = ["2+2=", "3+3="], ["4", "six"]
    scores = [s.score for s in JudgeReward(str(tmp_path)).score_batch(prompts, completions)]
    for score, prompt, completion in zip(scores, prompts, completions):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tokenizer(prompt + completion)["input_ids"]])).logits[0]
        assert score == pytest.approx(float(torch.softmax(logits, -1)[1]), rel=1e-4)
        assert 0.0 < score < 1.0


def test_callables_with_the_same_name_in_different_modules_do_not_share_cached_scores(tmp_path):
    """The default judge_id is the callable's module and qualified name: two judges called `score` in two modules
    keep their own entries in a shared cache file."""
    def score_one(samples):
        return [1.0] * len(samples)

    def score_two(samples):
        return [2.0] * len(samples)

    score_two.__qualname__ = score_one.__qualname__
    score_two.__module__ = "other_package.judges"
    path = str(tmp_path / "judge.sqlite")
    assert JudgeReward(score_one, cache_path=path)("p", "a") == JudgeScore(1.0)
    other = JudgeReward(score_two, cache_path=path)
    assert other.judge_id == f"callable:other_package.judges.{score_one.__qualname__}"
    assert other("p", "a") == JudgeScore(2.0) and other.stats()["judged"] == 1


def test_a_completion_with_a_lone_surrogate_is_scored_not_a_crash():
    """Text decoded with errors='surrogateescape' can hold a lone surrogate, which UTF-8 cannot encode: the cache key
    still takes it, so the judge scores the sample (a judge never kills the run); valid text keeps the key it had."""
    reward = JudgeReward(lambda samples: [1.0] * len(samples))
    assert reward.score_batch(["p"], ["bad \udc80 byte"]) == [JudgeScore(1.0)]
    assert JudgeCache.key("j", "p", "é", None) == hashlib.sha256('["j","p","é",null]'.encode()).hexdigest()


def test_a_cache_file_held_by_another_process_costs_one_wait_not_one_per_sample(tmp_path, monkeypatch):
    """Once the file failed, lookups and writes leave it alone for the wait's length (here 0.2 s): 40 new samples
    wait once, not 41 times; after that length of time the file is tried again and the new scores are written."""
    import sqlite3

    from entrorl.rewards import judge as judge_module

    monkeypatch.setattr(judge_module, "_SQLITE_WAIT_S", 0.2)
    path = tmp_path / "cache.sqlite"
    reward = JudgeReward(lambda samples: [1.0] * len(samples), judge_id="constant", cache_path=str(path))
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    started = time.perf_counter()
    scores = reward.score_batch(["p"] * 40, [f"completion {i}" for i in range(40)])
    elapsed = time.perf_counter() - started
    holder.execute("ROLLBACK")
    holder.close()
    assert [score.score for score in scores] == [1.0] * 40 and elapsed < 0.2 * 5
    time.sleep(0.25)
    reward.score_batch(["p"], ["one more"])
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM judge_scores").fetchone()[0] == 1


def _save_reward_model_tokenizer_padding_on_the_left(directory):
    """A GPT-2 reward model (absolute positions) whose tokenizer pads on the left, as chat models' often do."""
    import json

    from transformers import GPT2Config, GPT2ForSequenceClassification

    from entrorl.lab.tiny_model import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=128,
                        pad_token_id=tokenizer.pad_token_id, num_labels=1)
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    saved = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**saved, "padding_side": "left"}))
    return model, tokenizer


def test_a_reward_model_scores_each_sample_of_a_batch_as_alone_whatever_its_tokenizer_pads(tmp_path):
    """Rows are padded on the right whatever side the tokenizer pads: a short sample keeps the positions it has
    alone (a model with absolute position embeddings scored it with shifted ones before)."""
    torch.set_num_threads(1)
    model, tokenizer = _save_reward_model_tokenizer_padding_on_the_left(tmp_path)
    prompts, completions = ["2+2=", "what is three plus three?"], ["4", "six, I think"]
    batch = [s.score for s in JudgeReward(str(tmp_path), batch_size=4).score_batch(prompts, completions)]
    for score, prompt, completion in zip(batch, prompts, completions):
        with torch.no_grad():
            alone = float(model(input_ids=torch.tensor([tokenizer(prompt + completion)["input_ids"]])).logits[0, 0])
        assert score == pytest.approx(alone, rel=1e-4, abs=1e-6)


def _tokenizer_ending_turns_with_eos(alphabet: str):
    """A character tokenizer without a pad token (ids: <eos> 0, <unk> 1, then ``alphabet``) whose chat template ends
    each turn with EOS, as many reward models' do."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<eos>", "<unk>", *dict.fromkeys(alphabet)])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=False))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>",
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    return tokenizer


def test_a_reward_model_reads_a_final_eos_its_tokenizer_also_pads_with(tmp_path):
    """A tokenizer without a pad token pads with EOS; a chat template that ends each turn with EOS then put the pad id
    at the end of the text, and the head pooled the token before it. Each row is read at its own last token, in a
    batch of rows of other lengths too, and when the batch uses every id of the vocabulary (then one row at a
    time)."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    torch.set_num_threads(1)
    tokenizer = _tokenizer_ending_turns_with_eos("abc0123456789+= <>")
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, num_labels=1)
    config.pad_token_id = None
    torch.manual_seed(0)
    model = Qwen2ForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    def own_score(prompt, completion):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": completion}], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids[-1] == tokenizer.eos_token_id
        with torch.no_grad():
            return float(model(input_ids=torch.tensor([ids])).logits[0, 0])  # one row, no pad id: its last token

    reward = JudgeReward(str(tmp_path), batch_size=8, cache_size=0)
    prompts, completions = ["2+2=", "10+1=", "1+1="], ["4", "11 abc", "abc 0123456789 x"]  # the last uses every id
    for batch in ([0], [0, 1], [0, 1, 2]):
        scores = reward.score_batch([prompts[i] for i in batch], [completions[i] for i in batch])
        assert [s.score for s in scores] == pytest.approx([own_score(prompts[i], completions[i]) for i in batch],
                                                          rel=1e-4, abs=1e-6)


def test_a_yes_no_template_that_can_encode_to_nothing_is_refused(tmp_path):
    """With template "{completion}" an empty completion is no token on a tokenizer that adds no BOS: the first answer
    token would follow nothing (a shape error alone, a padding position's prediction in a batch). Refused when the
    judge is built, naming the template."""
    from entrorl.lab.tiny_model import save_tiny_model

    torch.set_num_threads(1)
    directory = save_tiny_model(tmp_path / "lm", seed=0, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                max_position_embeddings=64)
    with pytest.raises(ValueError, match=r"template '\{completion\}' encodes to no token"):
        JudgeReward(str(directory), template="{completion}")
    assert JudgeReward(str(directory), template="Is this right? {completion}")("p", "").score > 0


def test_a_composite_config_reward_model_pools_with_the_pad_id_the_judge_pads_with(tmp_path):
    """judge.py RewardModelJudge._pooled_logits sets the pad id on ``config.get_text_config()``. For a composite config
    whose head reads the top-level ``config.pad_token_id`` (T5GemmaForSequenceClassification: get_text_config() is
    the ``decoder`` sub-config), the head never sees the id the rows are padded with: it pools with the top-level id
    (here the tokenizer's pad = EOS, which ends every row through the chat template), so every row is read at a
    padding position or before its final EOS. Expected: each sample scores as when scored alone (its last token)."""
    import json

    from transformers import T5GemmaConfig, T5GemmaForSequenceClassification
    from transformers.models.t5gemma.configuration_t5gemma import T5GemmaModuleConfig

    torch.set_num_threads(1)
    tokenizer = _tokenizer_ending_turns_with_eos("abcdefghijklmnopqrstuvwxyz0123456789+= ?,<>")
    module = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=128, pad_token_id=0)
    config = T5GemmaConfig(encoder=T5GemmaModuleConfig(**module), decoder=T5GemmaModuleConfig(**module), num_labels=1,
                           pad_token_id=0, eos_token_id=0, is_encoder_decoder=False)
    torch.manual_seed(0)
    model = T5GemmaForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert "ForSequenceClassification" in json.loads((tmp_path / "config.json").read_text())["architectures"][0]

    def alone(prompt, completion):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": completion}], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids[-1] == tokenizer.eos_token_id
        model.config.pad_token_id = None  # one row, no pad id: pooled at its own last token (its final EOS)
        try:
            with torch.no_grad():
                return float(model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0, 0])
        finally:
            model.config.pad_token_id = 0

    prompts, completions = ["2+2=", "what is 10+1?"], ["4", "11, i think"]
    scores = JudgeReward(str(tmp_path), batch_size=8, cache_size=0).score_batch(prompts, completions)
    assert [s.reason for s in scores] == [None, None]
    assert [s.score for s in scores] == pytest.approx([alone(p, c) for p, c in zip(prompts, completions)],
                                                      rel=1e-4, abs=1e-6)


def test_a_reward_model_whose_configuration_has_no_pad_id_of_its_own_scores_as_alone(tmp_path):
    """Gemma 3's composite configuration has no pad id at its top, only in its text part: the judge's pad id is set
    there for the call and the top is left without one afterwards."""
    from transformers import Gemma3Config, Gemma3ForSequenceClassification
    from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig

    from entrorl.lab.tiny_model import build_char_tokenizer

    torch.set_num_threads(1)
    tokenizer = build_char_tokenizer()
    text_config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=128,
                                   pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Gemma3ForSequenceClassification(Gemma3Config(text_config=text_config, num_labels=1)).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reward = JudgeReward(str(tmp_path), batch_size=4, cache_size=0)
    prompts, completions = ["2+2=", "what is 10+1?"], ["4", "11, i think"]
    scores = reward.score_batch(prompts, completions)
    for score, prompt, completion in zip(scores, prompts, completions):
        with torch.no_grad():
            alone = float(model(input_ids=torch.tensor([tokenizer(prompt + completion)["input_ids"]])).logits[0, 0])
        assert score.reason is None and score.score == pytest.approx(alone, rel=1e-4, abs=1e-6)
    configuration = reward.judge.model.config
    assert not hasattr(configuration, "pad_token_id")
    assert configuration.get_text_config().pad_token_id == tokenizer.pad_token_id


def test_a_cache_file_this_process_may_not_write_is_still_read(tmp_path, monkeypatch, caplog):
    """A cache shared read-only (another user's, a precomputed one): its first failed write set the whole file aside
    for 30 s, reads too, and the scores it held were judged again (an API judge paid twice). Root may write any file:
    the check of the permission is made to say no, as it does for another user."""
    import os

    from entrorl.rewards import judge as judge_module

    path = tmp_path / "cache.sqlite"
    writer = JudgeReward(lambda samples: [float(len(c)) for _, c, _ in samples], cache_path=path, judge_id="J")
    writer.score_batch(["p", "p"], ["cached-1", "cached-22"])
    writer.cache.close()
    path.chmod(0o444)
    monkeypatch.setattr(judge_module.os, "access", lambda where, mode: not (Path(where) == path and mode == os.W_OK))
    judge = RecordingJudge()
    with caplog.at_level("WARNING"):
        reward = JudgeReward(judge, cache_path=path, judge_id="J")
    assert "is read-only (this process may not write it): its scores are read, new ones are kept in memory only" \
        in caplog.text
    reward.score_batch(["p"], ["a new sample"])
    judge.calls.clear()
    assert [score.score for score in reward.score_batch(["p", "p"], ["cached-1", "cached-22"])] == [8.0, 9.0]
    assert judge.calls == []
    path.chmod(0o644)
    assert path.stat().st_size > 0 and reward.cache._db.execute("SELECT COUNT(*) FROM judge_scores").fetchone() == (2,)


def test_a_cache_file_whose_writes_fail_as_read_only_goes_on_being_read(tmp_path, caplog):
    judge = RecordingJudge()
    reward = JudgeReward(judge, cache_path=tmp_path / "cache.sqlite", judge_id="J")
    reward.score_batch(["p"], ["held"])
    reward.cache._db.execute("PRAGMA query_only = ON")  # as a file on a read-only mount: every write fails
    with caplog.at_level("WARNING"):
        reward.score_batch(["p"], ["new"])
    assert "is read-only (attempt to write a readonly database)" in caplog.text
    reward.cache._memory.clear()
    judge.calls.clear()
    assert [score.score for score in reward.score_batch(["p", "p"], ["held", "new"])] == [4.0, 3.0]
    assert judge.calls == [[("p", "new", None)]]  # the file's score read; the new one, never written, judged again


def test_the_timeout_covers_a_judge_that_returns_a_lazy_iterable():
    """``return map(call_api, samples)`` returned at once, and its work ran unbounded in the caller's thread."""

    def score_one(sample):
        time.sleep(0.4)
        return 1.0

    reward = JudgeReward(lambda samples: map(score_one, samples), timeout_s=0.2, batch_size=4, judge_id="lazy")
    start = time.monotonic()
    scores = reward.score_batch(["p"] * 4, ["a", "b", "c", "d"])
    assert time.monotonic() - start < 1.0
    assert [score.reason for score in scores] == [JUDGE_TIMEOUT_REASON] * 4
    assert reward.stats()["timeouts"] == 4


@pytest.mark.parametrize("cache_path", [5, True, "", "  "])
def test_a_cache_path_that_is_no_path_is_refused_by_name(cache_path):
    with pytest.raises(ValueError, match="cache_path must be the path of a SQLite file or None"):
        check_reward_spec("judge", judge=RecordingJudge(), cache_path=cache_path)


def test_a_cache_path_and_a_model_directory_starting_with_a_tilde_are_in_the_home_folder(tmp_path, monkeypatch):
    """A YAML file has no shell to expand '~': the judge made a folder named '~' in the working directory."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    reward = JudgeReward(RecordingJudge(), cache_path="~/judge.sqlite", judge_id="J")
    reward.score_batch(["p"], ["a"])
    reward.cache.close()
    assert not (work / "~").exists() and (home / "judge.sqlite").is_file()
    (home / "judge-model").mkdir()
    with pytest.raises(ValueError, match=r"judge '~/judge-model' is not a model directory \(no config.json\)"):
        check_reward_spec("judge", judge="~/judge-model")


def test_a_judge_returning_an_endless_generator_is_an_error_read_no_further():
    """Its scores were read until the timeout, then the judge's thread went on reading (and keeping) them for the
    rest of the process; without timeout_s the call never returned."""
    read = [0]
    stop = threading.Event()

    def endless(samples):
        def scores():
            while not stop.is_set() and read[0] < 100_000:  # endless but for a bound that keeps a failure in memory
                read[0] += 1
                yield 1.0
        return scores()

    try:
        for timeout_s in (None, 5.0):
            read[0] = 0
            reward = JudgeReward(endless, timeout_s=timeout_s, judge_id="endless")
            [score] = reward.score_batch(["p"], ["a"])
            assert score.failed and score.reason == "judge error: ValueError: returned more than 1 scores for 1 samples"
            assert read[0] == 2 and reward.stats()["errors"] == 1
    finally:
        stop.set()
    assert [s.score for s in JudgeReward(lambda samples: [0.5] * 3, judge_id="too-many").score_batch(["p"], ["a"])] \
        == [0.0]  # a list of the wrong length still says how many it held


@pytest.mark.skipif(sys.platform == "win32" or not hasattr(os, "geteuid") or os.geteuid() != 0
                    or shutil.which("setpriv") is None, reason="reads the file as another user: needs root and setpriv")
def test_a_read_only_cache_in_wal_mode_in_a_folder_this_process_may_not_write_is_read():
    """SQLite's read-only mode cannot read a database in WAL mode without creating its shared-memory file beside it:
    in a folder the process may not write, the judge refused the cache_path at start instead of reading it."""
    import sqlite3
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="entrorl-judge-wal-"))  # not under pytest's own folder, which only root enters
    try:
        os.chmod(folder, 0o755)
        path = folder / "cache.sqlite"
        writer = JudgeReward(lambda samples: [float(len(c)) for _, c, _ in samples], cache_path=path, judge_id="J")
        writer.cache._db.execute("PRAGMA journal_mode=WAL")
        writer.score_batch(["p"], ["cached"])
        writer.cache.close()
        with contextlib.closing(sqlite3.connect(path)) as check:
            assert check.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        path.chmod(0o444)
        script = ("from entrorl.rewards.judge import JudgeReward\n"
                  "calls = []\n"
                  f"reward = JudgeReward(lambda s: (calls.append(s), [0.0] * len(s))[1], cache_path={str(path)!r}, "
                  "judge_id='J')\n"
                  "print([s.score for s in reward.score_batch(['p'], ['cached'])], len(calls))\n")
        probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                                "import entrorl.rewards.judge"], capture_output=True, timeout=120, cwd=folder)
        if probe.returncode != 0:
            pytest.skip("this interpreter or the project cannot be read by another user here")
        done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                               script], capture_output=True, text=True, timeout=120, cwd=folder,
                              env={"PATH": os.environ.get("PATH", ""), "HOME": str(folder)})
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split() == ["[6.0]", "0"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
