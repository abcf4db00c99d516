"""The entropy laboratory's built-in tasks: generation, held-out splits, demonstrations and verifiers."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import pytest

from entrorl.data.records import PromptRecord
from entrorl.lab.tasks import (
    RG_ARITHMETIC_CONFIG,
    TASKS,
    CountdownTask,
    RgArithmeticTask,
    SumChainTask,
    Task,
    TaskExample,
    available_tasks,
    get_task,
    sft_corpus,
)
from entrorl.lab.tiny_model import DEFAULT_ALPHABET
from entrorl.rewards import RewardRunner

NAMES = ["sum_chain", "countdown", "rg_arithmetic"]
SEEDS = [0, 1, 2, 7, 123]
MAX_PROMPT, MAX_COMPLETION = 40, 60
FORMAT = re.compile(r"(?:\S+ )*#\S+")  # steps separated by single spaces, then "#<answer>"


def _examples(name: str, n: int = 40, seed: int = 0, split: str = "train") -> list[TaskExample]:
    return get_task(name).examples(n, seed=seed, split=split)


def _score(task: Task, example: TaskExample, completion) -> float:
    return task.score(example.prompt, completion, example.answer, **example.meta)


# --------------------------------------------------------------------------------------------
# registry and arguments
# --------------------------------------------------------------------------------------------


def test_registry_and_get_task():
    assert sorted(TASKS) == sorted(NAMES) == available_tasks()
    for name in NAMES:
        task = get_task(name)
        assert isinstance(task, Task) and task.name == name and task.description
        assert task is TASKS[name]
    with pytest.raises(ValueError, match="unknown lab task 'nope'.*countdown.*rg_arithmetic.*sum_chain"):
        get_task("nope")
    with pytest.raises(ValueError, match="unknown lab task"):
        get_task(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown lab task"):
        get_task(["sum_chain"])  # type: ignore[arg-type]


@pytest.mark.parametrize("name", NAMES)
def test_examples_arguments(name):
    task = get_task(name)
    assert task.examples(0, seed=0, split="train") == []
    with pytest.raises(ValueError, match="split"):
        task.examples(3, seed=0, split="test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be"):
        task.examples(-1, seed=0, split="train")
    with pytest.raises(ValueError, match="seed"):
        task.examples(3, seed="0", split="train")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# demonstrations and verifiers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_demonstrations_score_one(name):
    task = get_task(name)
    rng = random.Random(0)
    for seed in SEEDS:
        for split in ("train", "eval"):
            for example in task.examples(30, seed=seed, split=split):
                for _ in range(3):
                    demo = task.demonstration(example, rng)
                    assert demo.endswith(f"#{example.answer}"), (example.prompt, demo)
                    assert _score(task, example, demo) == 1.0, (example.prompt, demo)
                    assert task(example.prompt, demo, example.answer, **example.meta) == 1.0


@pytest.mark.parametrize("name", NAMES)
def test_wrong_demonstrations_score_zero(name):
    task = get_task(name)
    rng = random.Random(1)
    for seed in SEEDS:
        for example in task.examples(30, seed=seed, split="train"):
            for _ in range(4):
                wrong = task.wrong_demonstration(example, rng)
                assert FORMAT.fullmatch(wrong), wrong
                assert _score(task, example, wrong) == 0.0, (example.prompt, wrong)


@pytest.mark.parametrize("name", NAMES)
def test_format_alphabet_and_lengths(name):
    task = get_task(name)
    alphabet = set(DEFAULT_ALPHABET)
    rng = random.Random(2)
    for split in ("train", "eval"):
        for example in task.examples(200, seed=5, split=split):
            assert 0 < len(example.prompt) <= MAX_PROMPT and set(example.prompt) <= alphabet, example.prompt
            assert example.prompt.endswith("=") and "#" not in example.prompt
            assert isinstance(example.answer, str) and example.answer
            json.dumps(example.meta)  # JSON-able
            for completion in (task.demonstration(example, rng), task.wrong_demonstration(example, rng)):
                assert 0 < len(completion) <= MAX_COMPLETION, completion
                assert set(completion) <= alphabet, completion
                assert FORMAT.fullmatch(completion), completion
                assert completion.count("#") == 1


GARBAGE = [
    "",
    " ",
    "#",
    "##",
    "# ",
    "abc",
    "#abc",
    "#-",
    "#+",
    "\n#\n",
    "=== ### ===",
    "7+3=10 10+5",
    "<eos><pad>",
    "#" * 200,
    "\x00\x01",
]


@pytest.mark.parametrize("name", NAMES)
def test_garbage_and_truncated_completions_score_zero(name):
    task = get_task(name)
    rng = random.Random(3)
    for example in task.examples(25, seed=11, split="train"):
        for garbage in [*GARBAGE, None, 17, b"#1"]:
            assert _score(task, example, garbage) == 0.0, (example.prompt, garbage)
        demo = task.demonstration(example, rng)
        for cut in range(len(demo)):  # every strict prefix misses (part of) the final answer
            assert _score(task, example, demo[:cut]) == 0.0, (example.prompt, demo[:cut])
        assert _score(task, example, demo + " #") == 0.0
        # an answer that merely contains the reference: reasoning-gym gives partial credit, the others 0
        for padded in (demo + "0", f"#{example.answer}.5", "#" + "9" * 30):
            assert _score(task, example, padded) < 1.0
            if name != "rg_arithmetic":
                assert _score(task, example, padded) == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_score_after_json_round_trip_of_meta(name):
    task = get_task(name)
    rng = random.Random(4)
    for record in task.records(20, seed=3, split="eval"):
        meta = json.loads(json.dumps(record.meta))
        example = TaskExample(record.prompt, record.answer, record.meta)
        demo = task.demonstration(example, rng)
        assert task.score(record.prompt, demo, record.answer, **meta) == 1.0
        assert task.score(record.prompt, task.wrong_demonstration(example, rng), record.answer, **meta) == 0.0


def test_sum_chain_scores_the_final_answer_only():
    task = get_task("sum_chain")
    meta = {"terms": [7, 3, 5, 2]}
    assert task.score("7+3+5+2=", "7+3=10 10+5=15 15+2=17 #17", "17", **meta) == 1.0
    assert task.score("7+3+5+2=", "#17", "17", **meta) == 1.0
    assert task.score("7+3+5+2=", "7+3=10 10+5=15 15+2=17 # 17 ", "17", **meta) == 1.0
    assert task.score("7+3+5+2=", "7+3=10 10+5=15 15+2=17 #18", "17", **meta) == 0.0
    assert task.score("7+3+5+2=", "#17 #16", "17", **meta) == 0.0  # the last '#' counts
    assert task.score("7+3+5+2=", "#16 #17", "17", **meta) == 1.0
    # the problem is read from the prompt when meta lacks the terms, and from the answer as a last resort
    assert task.score("7+3+5+2=", "#17", None) == 1.0
    assert task.score("what?", "#17", "17") == 1.0
    with pytest.raises(ValueError, match="cannot tell the problem"):
        task.score("what?", "#17", None)


def test_sum_chain_wrong_demonstration_is_a_small_propagated_slip():
    task = get_task("sum_chain")
    rng = random.Random(5)
    for example in task.examples(100, seed=2, split="train"):
        wrong = task.wrong_demonstration(example, rng)
        final = int(wrong.rsplit("#", 1)[1])
        assert final - int(example.answer) in (-2, -1, 1, 2), (example.prompt, wrong)
        steps = wrong.rsplit("#", 1)[0].split()
        assert len(steps) == len(example.meta["terms"]) - 1


# --------------------------------------------------------------------------------------------
# countdown's strict derivation check
# --------------------------------------------------------------------------------------------

COUNTDOWN_META = {"numbers": [3, 5, 7], "target": 22}
COUNTDOWN_CASES = [
    # valid derivations (several solutions, either operand order, robust whitespace)
    ("3*5=15 15+7=22 #22", 1.0),
    ("5*3=15 7+15=22 #22", 1.0),
    ("3*5=15  15+7=22  # 22", 1.0),
    ("7+3=10 5*10=50 50-28=22 #22", 0.0),  # 28 is not available
    # correct final answer with bogus or missing steps
    ("7+15=22 #22", 0.0),  # 15 is not given
    ("#22", 0.0),
    ("hello #22", 0.0),
    ("3+5=8 8+7=22 #22", 0.0),  # wrong arithmetic claiming the target
    ("3*5=15 15+7=22 22*1=22 #22", 0.0),  # 1 is not available
    ("15+7=22 3*5=15 #22", 0.0),  # uses a result before it exists
    ("3*5=15 15+7=22 22-7=15 #22", 0.0),  # reuses 7, does not end at the target
    ("3*5=15 15+7=22 #21", 0.0),  # final answer wrong
    ("3*5=15 15+7=22", 0.0),  # no final answer
    ("3*5=15 15+7=22 #22 #22", 0.0),  # '#22' is not a step
    # reuse of a number / unused number
    ("5*5=25 25-3=22 #22", 0.0),
    ("3*5=15 #15", 0.0),
    ("3*5=15 15+5=20 20+2=22 #22", 0.0),
    # wrong arithmetic that propagates
    ("3*5=16 16+7=23 #23", 0.0),
    ("3*5=16 16+7=22 #22", 0.0),
    ("3*5=16 15+7=22 #22", 0.0),  # a step's wrong result, then its true value used as if it were available
    # operators and formats outside the grammar
    ("3x5=15 15+7=22 #22", 0.0),
    ("3*5=15 15+7=22.0 #22", 0.0),
    ("(3*5)+7=22 #22", 0.0),
    ("3*5=15,15+7=22 #22", 0.0),
]


@pytest.mark.parametrize(("completion", "expected"), COUNTDOWN_CASES)
def test_countdown_derivations(completion, expected):
    task = get_task("countdown")
    assert task.score("3 5 7>22=", completion, "22", **COUNTDOWN_META) == expected
    assert task.score("3 5 7>22=", completion, "22") == expected  # the problem read from the prompt


def test_countdown_positive_intermediates_and_problem_errors():
    task = get_task("countdown")
    assert task.score("5 5 2>2=", "5-5=0 0+2=2 #2", "2") == 0.0  # zero intermediate
    assert task.score("5 5 2>2=", "5-2=3 3-5=2 #2", "2") == 0.0  # 3-5 is not 2 (nor positive)
    assert task.score("5 5 2>2=", "5+5=10 10/2=5 #5", "5") == 0.0  # no division
    assert task.score("5 5 2>5=", "5+5=10 10/2=5 #5", "5") == 0.0  # no division, even with the right answer
    with pytest.raises(ValueError, match="cannot tell the problem"):
        task.score("garbage", "#22", "22")


def test_countdown_problems_are_solvable_and_prefer_several_solutions():
    task = get_task("countdown")
    examples = task.examples(400, seed=0, split="train")
    for example in examples:
        numbers, target = example.meta["numbers"], example.meta["target"]
        assert len(numbers) == 3 and example.answer == str(target) and example.meta["solutions"] >= 1
        assert sum(1 for x in numbers if x > 9) <= 1 and all(1 <= x <= 25 for x in numbers)
        assert 1 <= target <= task.max_target
        assert example.prompt == " ".join(map(str, numbers)) + f">{target}="
    several = sum(example.meta["solutions"] >= 2 for example in examples) / len(examples)
    assert several > 0.5
    assert any(max(e.meta["numbers"]) > 9 for e in examples) and any(max(e.meta["numbers"]) <= 9 for e in examples)


def test_countdown_check_derivation_directly():
    assert CountdownTask.check_derivation([2, 2, 9], 36, "2*2=4 4*9=36 #36")
    assert CountdownTask.check_derivation([2, 2, 9], 36, "9*2=18 18*2=36 #36")
    assert not CountdownTask.check_derivation([2, 2, 9], 36, "9*2=18 18+18=36 #36")


# --------------------------------------------------------------------------------------------
# determinism, splits, diversity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_examples_are_deterministic(name):
    task = get_task(name)
    a = task.examples(60, seed=4, split="train")
    assert a == task.examples(60, seed=4, split="train")
    assert a[:25] == task.examples(25, seed=4, split="train")  # a prefix of a longer call
    assert [e.prompt for e in a] != [e.prompt for e in task.examples(60, seed=5, split="train")]
    assert len({e.prompt for e in a}) == len(a)  # no repeats within a call
    if name != "sum_chain":  # (a sum chain's prompts are orderings of its canonical multiset)
        assert len({task.canonical(e) for e in a}) == len(a)
    example = a[0]
    assert task.demonstration(example, random.Random(9)) == task.demonstration(example, random.Random(9))
    assert task.wrong_demonstration(example, random.Random(9)) == task.wrong_demonstration(example, random.Random(9))


def test_examples_stay_a_prefix_of_a_longer_call_once_the_split_runs_out():
    """rg_arithmetic with 2-term sums has a few dozen held-out problems: a call for more repeats them, and the shorter
    call's repeats are the longer call's (the point from which repeats are allowed does not depend on n)."""
    task = RgArithmeticTask(config={**RG_ARITHMETIC_CONFIG, "max_terms": 2, "operators": ["+"], "allow_parentheses": False})
    short = [e.prompt for e in task.examples(40, seed=0, split="eval")]
    long = [e.prompt for e in task.examples(120, seed=0, split="eval")]
    assert len(set(long)) < 40 and short == long[:40]


def test_a_split_without_problems_has_none_and_says_so_when_asked_for_some():
    """No countdown problem with target 1 falls in a 2% held-out share: the split has 0 problems, and asking it for
    examples names the split, not the sampler's internals."""
    task = CountdownTask(max_target=1, eval_fraction=0.02)
    assert task.num_problems("eval") == 0 and task.num_problems("train") > 0
    assert task.examples(0, seed=0, split="eval") == []
    with pytest.raises(ValueError, match=r"the eval split of countdown holds no problem with these settings "
                                         r"\(eval_fraction 0\.02\): there is nothing to draw 1 problem"):
        task.examples(1, seed=0, split="eval")


def test_examples_are_deterministic_across_processes():
    script = (
        "import json\n"
        "from entrorl.lab.tasks import get_task, sft_corpus\n"
        "out = {n: [e.prompt for e in get_task(n).examples(20, seed=3, split='eval')] "
        "for n in ('sum_chain', 'countdown', 'rg_arithmetic')}\n"
        "out['sft'] = sft_corpus('countdown', 5, seed=1)\n"
        "print(json.dumps(out))\n"
    )
    # another process with another string-hash seed than this one's (random unless set)
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "0" if os.environ.get("PYTHONHASHSEED") != "0" else "1"},
    )
    there = json.loads(done.stdout)
    here = {n: [e.prompt for e in get_task(n).examples(20, seed=3, split="eval")] for n in NAMES}
    assert {n: there[n] for n in NAMES} == here
    assert [tuple(pair) for pair in there["sft"]] == sft_corpus("countdown", 5, seed=1)


@pytest.mark.parametrize("name", NAMES)
def test_train_and_eval_are_disjoint(name):
    task = get_task(name)
    train, held_out = set(), set()
    for seed in range(4):
        for example in task.examples(300, seed=seed, split="train"):
            assert task.split_of(task.canonical(example)) == "train"
            train.add(task.canonical(example))
        for example in task.examples(150, seed=seed, split="eval"):
            assert task.split_of(task.canonical(example)) == "eval"
            held_out.add(task.canonical(example))
    assert train and held_out and not train & held_out


def test_sum_chain_canonical_problem_ignores_term_order():
    task = get_task("sum_chain")
    a = TaskExample("7+3+5+2=", "17", {"terms": [7, 3, 5, 2], "problem": "2+3+5+7"})
    assert task.canonical(a) == "2+3+5+7"
    for example in task.examples(100, seed=0, split="eval"):
        assert task.canonical(example) == "+".join(map(str, sorted(example.meta["terms"])))
    # every reordering of an eval problem is also eval: no train prompt is a shuffled eval problem
    train_prompts = {e.prompt for e in task.examples(5000, seed=0, split="train")}
    for example in task.examples(200, seed=0, split="eval"):
        assert example.prompt not in train_prompts


def test_rg_arithmetic_problems_differing_only_by_redundant_parentheses_share_a_split():
    """reasoning-gym writes one problem with and without redundant parentheses (``8*2`` and ``(8*2)``): the canonical
    problem is the parse tree, so no eval problem is a train problem in other parentheses."""
    task = get_task("rg_arithmetic")
    same = [TaskExample(f"{e}=", "16", {"problem": e}) for e in ("8*2", "(8*2)", "((8)*2)")]
    assert len({task.canonical(example) for example in same}) == 1
    assert task.canonical(TaskExample("(2+3)*4=", "20", {"problem": "(2+3)*4"})) != task.canonical(
        TaskExample("2+3*4=", "14", {"problem": "2+3*4"}))
    train_examples = [e for seed in range(2) for e in task.examples(1500, seed=seed, split="train")]
    train_prompts, train = {e.prompt for e in train_examples}, {task.canonical(e) for e in train_examples}
    held_out = task.examples(500, seed=0, split="eval")
    assert not {task.canonical(e) for e in held_out} & train
    assert not {e.prompt for e in held_out} & train_prompts


@pytest.mark.parametrize("task", [CountdownTask(), SumChainTask(min_terms=3, max_terms=3)])
def test_split_is_drawn_without_repetition_until_exhausted(task):
    size = task.num_problems("eval")
    assert size and size < task.num_problems("train")
    everything = task.examples(size + 10, seed=0, split="eval")
    key = task.canonical if isinstance(task, CountdownTask) else (lambda e: e.prompt)
    assert len({key(e) for e in everything[:size]}) == size
    assert len({key(e) for e in everything}) == size  # then the pool refills


def test_sum_chain_term_counts_and_diversity():
    task = get_task("sum_chain")
    examples = task.examples(600, seed=0, split="train")
    counts = {k: sum(len(e.meta["terms"]) == k for e in examples) for k in (3, 4, 5)}
    assert counts[5] == 0 and all(250 <= counts[k] <= 350 for k in (3, 4)), counts  # the lab's default: 3-4 terms
    wide = SumChainTask(max_terms=5).examples(600, seed=0, split="train")
    counts = {k: sum(len(e.meta["terms"]) == k for e in wide) for k in (3, 4, 5)}
    assert all(150 <= c <= 250 for c in counts.values()), counts
    assert all(1 <= t <= 9 for e in examples for t in e.meta["terms"])
    four = TaskExample("7+3+5+2=", "17", {"terms": [7, 3, 5, 2], "problem": "2+3+5+7"})
    rng = random.Random(0)
    demos = [task.demonstration(four, rng) for _ in range(50)]
    assert len(set(demos)) >= 5
    assert len({d.split()[0] for d in demos}) >= 3  # a real fork at the very first step
    assert all(task.score(four.prompt, d, "17", **four.meta) == 1.0 for d in demos)


def test_countdown_demonstrations_cover_several_solutions():
    task = get_task("countdown")
    rng = random.Random(0)
    multi = [e for e in task.examples(200, seed=1, split="train") if e.meta["solutions"] >= 2]
    assert multi
    for example in multi[:30]:
        demos = {task.demonstration(example, rng) for _ in range(40)}
        assert len(demos) >= 2, example.prompt


# --------------------------------------------------------------------------------------------
# reasoning-gym
# --------------------------------------------------------------------------------------------


def test_rg_arithmetic_uses_reasoning_gyms_verifier(monkeypatch):
    from reasoning_gym.arithmetic.basic_arithmetic import BasicArithmeticDataset

    task = get_task("rg_arithmetic")
    example = task.examples(1, seed=0, split="train")[0]
    assert example.meta["entry"]["answer"] == example.answer
    assert example.prompt == example.meta["entry"]["metadata"]["expression"] + "="

    calls = []
    original = BasicArithmeticDataset.score_answer

    def spy(self, answer, entry):
        calls.append((answer, entry["answer"]))
        return original(self, answer, entry)

    monkeypatch.setattr(BasicArithmeticDataset, "score_answer", spy)
    assert _score(task, example, f"#{example.answer}") == 1.0
    assert calls == [(example.answer, example.answer)]

    # reasoning-gym gives partial credit to an answer containing the reference: exact match would not
    padded = f"9{example.answer}"
    assert _score(task, example, f"#{padded}") == pytest.approx(len(example.answer) / len(padded))
    assert 0.0 < _score(task, example, f"#{padded}") < 1.0
    # ... but that answer is wrong: the lab's evaluations (RewardRunner on the task) count only full marks
    from entrorl.lab.runner import task_reward
    from entrorl.rewards import RewardRunner

    scored = RewardRunner(task_reward("rg_arithmetic"))([example.prompt] * 2, [f"#{example.answer}", f"#{padded}"],
                                                        [example.answer] * 2, [example.meta] * 2)
    assert scored.correct.tolist() == [True, False] and float(scored.scores[1]) > 0.5 - 1e-9

    # what reasoning-gym says goes, whatever the answer
    monkeypatch.setattr(BasicArithmeticDataset, "score_answer", lambda self, answer, entry: 0.25)
    assert _score(task, example, "#anything") == 0.25
    assert _score(task, example, "no marker") == 0.0  # nothing to hand to the verifier

    def boom(self, answer, entry):
        raise RuntimeError("verifier failure")

    monkeypatch.setattr(BasicArithmeticDataset, "score_answer", boom)
    assert _score(task, example, f"#{example.answer}") == 0.0


def test_rg_arithmetic_problems_are_short_and_stepwise():
    task = get_task("rg_arithmetic")
    rng = random.Random(0)
    for example in task.examples(300, seed=2, split="train"):
        entry = example.meta["entry"]
        assert entry["metadata"]["source_dataset"] == "basic_arithmetic"
        assert entry["metadata"]["num_terms"] in (2, 3)
        demo = task.demonstration(example, rng)
        steps = demo.rsplit("#", 1)[0].split()
        # one step per operation: the local evaluator agrees with reasoning-gym's answer
        assert len(steps) == entry["metadata"]["num_terms"] - 1, (example.prompt, demo)
    # answers without the meta entry: the reference answer alone is enough for basic_arithmetic
    assert task.score("2*3=", "#6", "6") == 1.0
    with pytest.raises(ValueError, match="entry"):
        task.score("2*3=", "#6", None)


# --------------------------------------------------------------------------------------------
# records and the pretraining corpus
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_records(name):
    task = get_task(name)
    examples = task.examples(5, seed=8, split="eval")
    records = task.records(5, seed=8, split="eval")
    assert len(records) == 5
    for i, (record, example) in enumerate(zip(records, examples)):
        assert isinstance(record, PromptRecord)
        assert record.prompt == example.prompt and record.answer == example.answer
        assert record.meta == {**example.meta, "task": name}
        assert record.source == f"{name}:eval:{i}"
        json.dumps(record.meta)


@pytest.mark.parametrize("name", NAMES)
def test_sft_corpus(name):
    task = get_task(name)
    pairs = sft_corpus(task, 60, seed=0, wrong_fraction=0.3, demos_per_problem=2)
    assert pairs == sft_corpus(name, 60, seed=0, wrong_fraction=0.3, demos_per_problem=2)
    examples = {e.prompt: e for e in task.examples(60, seed=0, split="train")}
    assert {prompt for prompt, _ in pairs} == set(examples)
    scores = [_score(task, examples[prompt], completion) for prompt, completion in pairs]
    correct, wrong = scores.count(1.0), scores.count(0.0)
    assert correct == 120 and correct + wrong == len(pairs)
    assert 5 <= wrong <= 35
    per_problem = {}
    for prompt, completion in pairs:
        if _score(task, examples[prompt], completion) == 1.0:
            per_problem.setdefault(prompt, []).append(completion)
    if name != "rg_arithmetic":  # sum chains and countdowns mostly have several solutions
        assert sum(len(set(c)) == 2 for c in per_problem.values()) >= 30
    other = {e.prompt: e for e in task.examples(20, seed=1, split="train")}
    clean = sft_corpus(task, 20, seed=1, wrong_fraction=0.0)
    assert len(clean) == 40 and all(_score(task, other[p], c) == 1.0 for p, c in clean)
    assert len(sft_corpus(task, 20, seed=1, wrong_fraction=1.0, demos_per_problem=1)) == 40


def test_sft_corpus_arguments():
    with pytest.raises(ValueError, match="wrong_fraction"):
        sft_corpus("sum_chain", 3, seed=0, wrong_fraction=1.5)
    with pytest.raises(ValueError, match="demos_per_problem"):
        sft_corpus("sum_chain", 3, seed=0, demos_per_problem=-1)
    with pytest.raises(ValueError, match="unknown lab task"):
        sft_corpus("nope", 3, seed=0)
    with pytest.raises(ValueError, match="task must be"):
        sft_corpus(3, 3, seed=0)  # type: ignore[arg-type]
    assert sft_corpus("sum_chain", 0, seed=0) == []


# --------------------------------------------------------------------------------------------
# derivations replayed, sampling weights, boundaries
# --------------------------------------------------------------------------------------------


def test_sum_chain_demonstrations_are_chained_reductions():
    """Every step of a sum_chain demonstration adds two terms still remaining (given or earlier results), its result
    replaces them, and the last result is the total: the steps are one valid pairwise reduction."""
    task = get_task("sum_chain")
    rng = random.Random(6)
    for example in task.examples(60, seed=3, split="train"):
        for _ in range(3):
            demo = task.demonstration(example, rng)
            remaining = list(example.meta["terms"])
            for step in demo.rsplit("#", 1)[0].split():
                match = re.fullmatch(r"(\d+)\+(\d+)=(\d+)", step)
                assert match, (example.prompt, demo)
                a, b, result = map(int, match.groups())
                assert result == a + b, (example.prompt, demo)
                remaining.remove(a)
                assert b in remaining, (example.prompt, demo)
                remaining.remove(b)
                remaining.append(result)
            assert remaining == [int(example.answer)], (example.prompt, demo)


def test_sum_chain_reads_a_negative_reference_answer():
    """Without terms in meta or a parseable prompt, the reference answer is the problem, negative ones included."""
    task = get_task("sum_chain")
    assert task.score("what?", "#-3", "-3") == 1.0
    assert task.score("what?", "#3", "-3") == 0.0
    assert task.score("what?", "2+1=3 #-12", " -12 ") == 1.0


def test_countdown_every_given_number_must_be_used():
    """A derivation that reaches the target while leaving a given number unused is rejected."""
    assert CountdownTask.check_derivation([3, 5, 7], 22, "3*5=15 15+7=22 #22")
    assert not CountdownTask.check_derivation([3, 5, 7], 15, "3*5=15 #15")
    assert not CountdownTask.check_derivation([2, 3, 11], 6, "2*3=6 #6")
    task = get_task("countdown")
    assert task.score("3 5 7>15=", "3*5=15 #15", "15") == 0.0
    assert task.score("3 5 7>15=", "5*3=15 #15", "15", numbers=[3, 5, 7], target=15) == 0.0


def test_countdown_targets_reach_max_target():
    """Targets run up to and including ``max_target``: the enumerated problems of both splits together have every
    target from 1 to max_target and none above."""
    task = CountdownTask(max_target=12)
    targets = set()
    for split in ("train", "eval"):
        examples = task.examples(task.num_problems(split), seed=0, split=split)
        targets |= {e.meta["target"] for e in examples}
    assert targets == set(range(1, 13))


def test_countdown_sampling_follows_the_documented_weights():
    """With ``max_weight=1`` every problem of a number kind is equally likely and the two kinds (all numbers below 10,
    or one from 10-25) are equally likely overall: the sample's share of each kind and its mean number of solutions
    match those of the enumerated pool weighted that way."""
    task = CountdownTask(max_weight=1)
    pool = task.examples(task.num_problems("train"), seed=0, split="train")
    kinds = {big: [e.meta["solutions"] for e in pool if (max(e.meta["numbers"]) > 9) == big] for big in (False, True)}
    expected_solutions = 0.5 * sum(kinds[False]) / len(kinds[False]) + 0.5 * sum(kinds[True]) / len(kinds[True])
    sample = [e for seed in range(20) for e in task.examples(100, seed=seed, split="train")]
    share_big = sum(max(e.meta["numbers"]) > 9 for e in sample) / len(sample)
    mean_solutions = sum(e.meta["solutions"] for e in sample) / len(sample)
    assert abs(share_big - 0.5) < 0.05, share_big
    assert abs(mean_solutions - expected_solutions) < 0.1, (mean_solutions, expected_solutions)


def test_rg_arithmetic_follows_operator_precedence_and_uses_every_operator():
    """Multiplication binds tighter than + and - in the step-by-step demonstrations, and the generated problems use
    every operator of the configuration."""
    task = get_task("rg_arithmetic")
    rng = random.Random(0)
    for expression, steps in (("2+3*4", "3*4=12 2+12=14 #14"), ("2*3-4", "2*3=6 6-4=2 #2"),
                              ("(2+3)*4", "2+3=5 5*4=20 #20"), ("8-2*3", "2*3=6 8-6=2 #2")):
        example = TaskExample(f"{expression}=", steps.rsplit("#", 1)[1], {"problem": expression})
        assert task.demonstration(example, rng) == steps
    operators = set()
    for example in task.examples(200, seed=1, split="train"):
        for step in task.demonstration(example, rng).rsplit("#", 1)[0].split():
            operators.add(re.fullmatch(r"-?\d+([+\-*])-?\d+=-?\d+", step).group(1))
    assert operators == set(RG_ARITHMETIC_CONFIG["operators"])


def test_sft_corpus_demonstrations_of_a_problem_differ_while_it_has_enough():
    """Per problem, ``demos_per_problem`` correct demonstrations that differ from each other when the problem has at
    least that many (a sum of distinct terms has at least 12 reduction orders)."""
    task = get_task("sum_chain")
    pairs = sft_corpus(task, 40, seed=0, wrong_fraction=0.0, demos_per_problem=4)
    demos = {}
    for prompt, completion in pairs:
        demos.setdefault(prompt, []).append(completion)
    distinct_terms = [p for p in demos if len(set(p[:-1].split("+"))) == len(p[:-1].split("+"))]
    assert len(distinct_terms) >= 10
    for prompt in distinct_terms:
        assert len(demos[prompt]) == 4 and len(set(demos[prompt])) == 4, demos[prompt]


# --------------------------------------------------------------------------------------------
# constructor arguments, reference answers, wrong demonstrations in detail
# --------------------------------------------------------------------------------------------


def test_integer_arguments_reject_booleans_and_out_of_range_values():
    """Counts and seeds must be real integers (not booleans); sum_chain's term counts and eval_fraction are bounded."""
    task = get_task("sum_chain")
    with pytest.raises(ValueError, match="seed"):
        task.examples(3, seed=True, split="train")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be"):
        task.examples(True, seed=0, split="train")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_terms"):
        SumChainTask(min_terms=1)
    with pytest.raises(ValueError, match="max_terms"):
        SumChainTask(max_terms=8)
    assert SumChainTask(max_terms=7).max_terms == 7
    for fraction in (0, 0.0, 1, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="eval_fraction"):
            SumChainTask(eval_fraction=fraction)


def test_eval_fraction_sets_the_share_of_held_out_problems():
    """``eval_fraction`` is the share of canonical problems in the eval split: a larger fraction holds out more."""
    for fraction in (0.2, 0.5, 0.8):
        task = SumChainTask(min_terms=3, max_terms=3, eval_fraction=fraction)
        multisets = {task.canonical(e) for e in task.examples(task.num_problems("eval"), seed=0, split="eval")}
        share = len(multisets) / 165  # 3-multisets of 1..9
        assert abs(share - fraction) < 0.1, (fraction, share)


def test_sum_chain_reference_comes_from_the_terms_before_the_answer():
    """The terms (from meta, else from an ``a+b+...=`` prompt) define the problem; the answer is only a last resort,
    and an empty term list or a one-number prompt does not count as terms."""
    task = get_task("sum_chain")
    assert task.score("7+3+5+2=", "#17", "18", terms=[7, 3, 5, 2]) == 1.0
    assert task.score("7+3+5+2=", "#18", "18", terms=[7, 3, 5, 2]) == 0.0
    assert task.score("7+3+5+2=", "#17", "18") == 1.0
    assert task.score("7+3=", "#10", None, terms=[]) == 1.0  # empty terms: read the prompt
    assert task.score("12=", "#5", "5") == 1.0  # a single number is no sum: read the answer
    assert task.score("12=", "#12", "5") == 0.0


def test_sum_chain_wrong_demonstrations_slip_once_or_miscopy_one_time_in_five():
    """A wrong sum_chain demonstration is a chained reduction of the terms with exactly one step, any step, off by 1
    or 2 (its result still positive and carried on), or, about one time in five, all steps right and the final answer
    miscopied by 1 or 2."""
    task = get_task("sum_chain")
    rng = random.Random(8)
    miscopies = total = 0
    slip_steps = set()
    for example in task.examples(100, seed=4, split="train"):
        for _ in range(5):
            wrong = task.wrong_demonstration(example, rng)
            body, final = wrong.rsplit("#", 1)
            remaining, slips = list(example.meta["terms"]), []
            for index, step in enumerate(body.split()):
                a, b, result = map(int, re.fullmatch(r"(\d+)\+(\d+)=(\d+)", step).groups())
                remaining.remove(a)
                remaining.remove(b)
                remaining.append(result)
                assert result >= 1, wrong
                if result != a + b:
                    slips.append(result - (a + b))
                    slip_steps.add(index)
            assert len(remaining) == 1, wrong
            total += 1
            if slips:
                assert len(slips) == 1 and slips[0] in (-2, -1, 1, 2), wrong
                assert int(final) == remaining[0], wrong
            else:
                miscopies += 1
                assert int(final) - int(example.answer) in (-2, -1, 1, 2), wrong
    assert 0.12 <= miscopies / total <= 0.28, miscopies / total
    assert slip_steps == {0, 1, 2}  # the slip can happen at any step


def _countdown_solution_count(numbers, target):
    """Distinct solutions of a 3-number countdown problem, counted independently: expressions ``(a o b) o c`` with
    positive intermediates, the same solution when they differ only by the order of + or * operands."""

    def key(op, left, right):
        return (op, tuple(sorted((left, right), key=repr))) if op in "+*" else (op, (left, right))

    ops = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}
    found = set()
    for i, j, k in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)):
        a, b, c = numbers[i], numbers[j], numbers[k]
        for op1, f1 in ops.items():
            r = f1(a, b)
            if r <= 0:
                continue
            inner = key(op1, a, b)
            for op2, f2 in ops.items():
                for left, right, x, y in ((inner, c, r, c), (c, inner, c, r)):
                    if f2(x, y) == target:
                        found.add(key(op2, left, right))
    return len(found)


def test_countdown_solution_counts_match_an_independent_count():
    """``meta["solutions"]`` is the number of distinct solutions (not capped by ``max_weight``)."""
    task = get_task("countdown")
    examples = task.examples(task.num_problems("train"), seed=2, split="train")  # the whole split
    for example in examples:
        assert example.meta["solutions"] == _countdown_solution_count(example.meta["numbers"], example.meta["target"])
    assert any(example.meta["solutions"] > task.max_weight for example in examples)


def test_countdown_numbers_span_the_documented_ranges_and_are_shown_shuffled():
    """Numbers are 1-9 plus at most one of 10-25 (every value of 10-25 occurs), shown in random order."""
    task = CountdownTask(max_target=30)
    examples = task.examples(task.num_problems("train"), seed=0, split="train")
    big = {x for e in examples for x in e.meta["numbers"] if x > 9}
    assert big == set(range(10, 26))
    unsorted = sum(e.meta["numbers"] != sorted(e.meta["numbers"]) for e in examples[:300])
    assert 150 <= unsorted <= 280, unsorted


def test_countdown_demonstrations_use_every_rendering():
    """A solution's renderings (operand order of + and *) are all used: ``3*5+7`` has four."""
    task = get_task("countdown")
    example = TaskExample("3 5 7>22=", "22", {"numbers": [3, 5, 7], "target": 22, "problem": "3 5 7>22"})
    rng = random.Random(0)
    demos = {task.demonstration(example, rng) for _ in range(80)}
    assert demos == {"3*5=15 15+7=22 #22", "3*5=15 7+15=22 #22", "5*3=15 15+7=22 #22", "5*3=15 7+15=22 #22"}


def test_countdown_wrong_demonstrations_are_misses_slips_or_bogus_hits():
    """Each wrong countdown demonstration is one of the three documented kinds, and each kind occurs: a valid
    derivation of another number; a chained derivation (the second step uses the first step's written result) with
    one step off by 1 or 2, ending at another number; a last step that falsely claims the target."""
    task = get_task("countdown")
    rng = random.Random(3)
    kinds = {"miss": 0, "slip": 0, "bogus": 0}
    for example in task.examples(150, seed=5, split="train"):
        numbers, target = example.meta["numbers"], example.meta["target"]
        wrong = task.wrong_demonstration(example, rng)
        body, final = wrong.rsplit("#", 1)
        final = int(final)
        steps = [re.fullmatch(r"(\d+)([+\-*])(\d+)=(\d+)", s).groups() for s in body.split()]
        assert len(steps) == 2, wrong
        (a, op1, b, r), (x, op2, y, t) = [(int(p), o, int(q), int(v)) for p, o, q, v in steps]
        if final != target and CountdownTask.check_derivation(numbers, final, wrong):
            kinds["miss"] += 1
        elif final == target:
            assert t == target and not CountdownTask.check_derivation(numbers, target, wrong), wrong
            kinds["bogus"] += 1
        else:
            assert t == final and r in (x, y), wrong
            rest = list(numbers)
            rest.remove(a)
            rest.remove(b)
            other = y if x == r else x
            assert other == rest[0], wrong
            ops = {"+": lambda p, q: p + q, "-": lambda p, q: p - q, "*": lambda p, q: p * q}
            errors = [r - ops[op1](a, b), t - ops[op2](x, y)]
            assert sorted(map(abs, errors))[0] == 0 and max(map(abs, errors)) in (1, 2), wrong
            kinds["slip"] += 1
    assert all(count >= 15 for count in kinds.values()), kinds


def test_rg_arithmetic_parser_edge_cases_in_demonstrations():
    """Unary minus on a group subtracts it from 0; an expression that does not parse, or whose value disagrees with
    the reference, gets the bare answer; independent operations are reduced in either order."""
    task = get_task("rg_arithmetic")
    rng = random.Random(0)
    assert task.demonstration(TaskExample("-(2+3)=", "-5", {"problem": "-(2+3)"}), rng) == "2+3=5 0-5=-5 #-5"
    assert task.demonstration(TaskExample("2+3)=", "5", {"problem": "2+3)"}), rng) == "#5"
    assert task.demonstration(TaskExample("2+3=", "6", {"problem": "2+3"}), rng) == "#6"
    product = TaskExample("(1+2)*(3+4)=", "21", {"problem": "(1+2)*(3+4)"})
    assert {task.demonstration(product, rng) for _ in range(30)} == {"1+2=3 3+4=7 3*7=21 #21",
                                                                     "3+4=7 1+2=3 3*7=21 #21"}


def test_rg_arithmetic_fallback_wrong_answer_never_contains_the_reference():
    """Without a parseable expression the wrong demonstration is a bare number that does not contain the reference
    (reasoning-gym would give such an answer partial credit)."""
    task = get_task("rg_arithmetic")
    rng = random.Random(0)
    for answer in ("1", "2", "0", "-1", "12"):
        example = TaskExample("?=", answer, {"problem": "?"})
        for _ in range(40):
            wrong = task.wrong_demonstration(example, rng)
            assert wrong.startswith("#") and answer not in wrong[1:], (answer, wrong)


# --------------------------------------------------------------------------------------------
# recorded generations, answer syntax, defaults and rare branches
# --------------------------------------------------------------------------------------------

RECORDED_PROMPTS = {
    ("sum_chain", "train"): ["3+7+5=", "7+1+2+7=", "9+7+7+2=", "4+6+2="],
    ("sum_chain", "eval"): ["8+2+9=", "3+6+4+5=", "3+3+1+5=", "6+9+9="],
    ("countdown", "train"): ["3 8 9>99=", "7 2 11>29=", "23 7 3>19=", "2 5 7>33="],
    ("countdown", "eval"): ["5 2 9>35=", "6 5 8>7=", "15 2 9>4=", "8 1 1>6="],
    ("rg_arithmetic", "train"): ["(-8-8+-4)=", "(9+8+-1)=", "5*(-8--7)=", "(-8-6)--8="],
    ("rg_arithmetic", "eval"): ["(-8--9)=", "-1--1*9=", "((9*-3))+9=", "-6*-9="],
}


@pytest.mark.parametrize(("name", "split"), sorted(RECORDED_PROMPTS))
def test_examples_for_seed_zero_match_the_recorded_prompts(name, split):
    """A seed names the same problems in every version: the split partition, the per-split generator seeds and the
    held-out share are part of what a seed reproduces."""
    task = get_task(name)
    assert [e.prompt for e in task.examples(4, seed=0, split=split)] == RECORDED_PROMPTS[(name, split)]
    assert task.eval_fraction == 0.2


def test_sum_chain_pool_holds_every_ordering_of_every_multiset():
    """The default sum_chain problems are all orderings of 3 or 4 terms from 1-9, split between train and eval."""
    task = SumChainTask()
    assert task.num_problems("train") + task.num_problems("eval") == 9**3 + 9**4


@pytest.mark.parametrize("name", ["sum_chain", "countdown"])
def test_integer_answers_reject_a_plus_sign_and_huge_numbers_without_raising(name):
    """The final answer is a plain integer: ``#+17`` is not 17, surrounding whitespace is fine, and an absurdly long
    number scores 0 instead of raising (Python refuses to parse integers of thousands of digits)."""
    task = get_task(name)
    prompt, steps, answer = ("7+3+5+2=", "", "17") if name == "sum_chain" else ("3 5 7>22=", "3*5=15 15+7=22 ", "22")
    assert task.score(prompt, f"{steps}#{answer}", answer) == 1.0
    assert task.score(prompt, f"{steps}#\t{answer}\n", answer) == 1.0
    assert task.score(prompt, f"{steps}#+{answer}", answer) == 0.0
    assert task.score(prompt, f"{steps}#{answer} {answer}", answer) == 0.0
    assert task.score(prompt, f"{steps}#" + "9" * 5000, answer) == 0.0


def test_sum_chain_single_term_demonstration_is_the_bare_answer():
    """A one-term problem has no step to write: the demonstration is ``#<answer>`` with no leading space."""
    task = get_task("sum_chain")
    assert task.demonstration(TaskExample("5=", "5", {"terms": [5]}), random.Random(0)) == "#5"


def test_sum_chain_wrong_demonstrations_miscopy_the_answer_one_time_in_five():
    """Over many draws the share of wrong demonstrations whose steps are all right (a miscopied answer) is 1/5."""
    task = get_task("sum_chain")
    example = TaskExample("7+3+5+2=", "17", {"terms": [7, 3, 5, 2], "problem": "2+3+5+7"})
    rng = random.Random(12)
    draws = 4000
    miscopies = 0
    for _ in range(draws):
        body = task.wrong_demonstration(example, rng).rsplit("#", 1)[0]
        steps = [tuple(map(int, re.fullmatch(r"(\d+)\+(\d+)=(\d+)", s).groups())) for s in body.split()]
        miscopies += all(a + b == r for a, b, r in steps)
    assert 0.18 <= miscopies / draws <= 0.22, miscopies / draws


def test_countdown_default_problem_space():
    """The registered countdown task has targets up to 100 and caps a problem's weight at 4 solutions."""
    task = get_task("countdown")
    assert (task.max_target, task.max_weight) == (100, 4)
    assert (CountdownTask().max_target, CountdownTask().max_weight) == (100, 4)


def test_countdown_wrong_demonstrations_of_tiny_problems_still_score_zero():
    """When no +-1/+-2 slip of a solution stays positive and misses the target (``1 1 2>1``: ``1*1=1 2-1=1``), the
    wrong demonstration still is wrong, and every result it writes stays positive (no slip to 0)."""
    task = get_task("countdown")
    rng = random.Random(0)
    for numbers, target in (([1, 1, 2], 1), ([1, 2, 2], 1), ([2, 3, 4], 1)):
        example = TaskExample(" ".join(map(str, numbers)) + f">{target}=", str(target),
                              {"numbers": numbers, "target": target})
        for _ in range(150):
            wrong = task.wrong_demonstration(example, rng)
            assert task.score(example.prompt, wrong, example.answer, **example.meta) == 0.0, (numbers, wrong)
            assert all(int(step.rsplit("=", 1)[1]) > 0 for step in wrong.rsplit("#", 1)[0].split()), (numbers, wrong)


def test_rg_arithmetic_negated_parenthesised_number_is_a_literal():
    """``-(5)`` is the number -5 (no ``0-5`` step), while a negated group is subtracted from 0."""
    task = get_task("rg_arithmetic")
    rng = random.Random(0)
    assert task.demonstration(TaskExample("-(5)*2=", "-10", {"problem": "-(5)*2"}), rng) == "-5*2=-10 #-10"
    assert task.demonstration(TaskExample("-(2)=", "-2", {"problem": "-(2)"}), rng) == "#-2"


def test_rg_arithmetic_scores_an_entry_given_as_json_text():
    """``meta["entry"]`` may arrive as JSON text (as stored in a dataset file): it is parsed, not ignored."""
    task = get_task("rg_arithmetic")
    example = task.examples(1, seed=0, split="train")[0]
    entry_text = json.dumps(example.meta["entry"])
    assert task.score(example.prompt, f"#{example.answer}", None, entry=entry_text) == 1.0
    assert task.score(example.prompt, "#12345", None, entry=entry_text) == 0.0


def test_rg_arithmetic_prompts_have_no_spaces_whatever_reasoning_gyms_whitespace():
    """A configuration whose expressions reasoning-gym writes with spaces still gives space-free prompts and
    problems (spaces would clash with the space-separated completion format)."""
    task = RgArithmeticTask(config={**RG_ARITHMETIC_CONFIG, "whitespace": "single"})
    examples = task.examples(3, seed=0, split="train")
    assert " " in examples[0].meta["entry"]["metadata"]["expression"]
    assert [e.prompt for e in examples] == RECORDED_PROMPTS[("rg_arithmetic", "train")][:3]
    assert all(" " not in e.meta["problem"] for e in examples)


def test_sft_corpus_defaults_are_two_demonstrations_and_thirty_percent_wrong():
    assert sft_corpus("sum_chain", 50, seed=0) == sft_corpus("sum_chain", 50, seed=0, wrong_fraction=0.3,
                                                               demos_per_problem=2)


def test_a_sum_chain_task_describes_its_own_term_counts():
    assert get_task("sum_chain").description.startswith("sums of 3-4 one-digit numbers")
    assert SumChainTask(max_terms=5).description.startswith("sums of 3-5 one-digit numbers")


def test_answers_and_steps_in_digits_of_another_script_score_zero():
    """The verifiers read ASCII digits only (int() would read Arabic-Indic ones as the same number)."""
    assert get_task("sum_chain").score("7+3+5+2=", "#\u0661\u0667", "17") == 0.0  # "#١٧"
    assert get_task("sum_chain").score("7+3+5+2=", "#17", "17") == 1.0
    assert get_task("countdown").score("3 5 7>22=", "3*5=15 15+7=22 #\u0662\u0662", "22") == 0.0
    assert get_task("countdown").score("3 5 7>22=", "3*5=\u0661\u0665 15+7=22 #22", "22") == 0.0
    assert get_task("countdown").score("3 5 7>22=", "3*5=15 15+7=22 #22", "22") == 1.0


def test_sum_chain_wrong_demonstrations_of_one_plus_one_are_every_documented_slip_and_miscopy():
    """``1+1``: a slip of -1, +1 or +2 in the one addition (never a result below 1), or the right step and an answer
    miscopied by -2, -1, +1 or +2 (never below 0): exactly these seven completions."""
    task = SumChainTask(min_terms=2, max_terms=2)
    example = TaskExample("1+1=", "2", {"terms": [1, 1], "problem": "1+1"})
    rng = random.Random(0)
    seen = {task.wrong_demonstration(example, rng) for _ in range(400)}
    assert seen == {"1+1=1 #1", "1+1=3 #3", "1+1=4 #4", "1+1=2 #0", "1+1=2 #1", "1+1=2 #3", "1+1=2 #4"}


@pytest.mark.parametrize(("eval_fraction", "split", "big"), [(0.025, "eval", True), (0.995, "train", False)])
def test_countdown_draws_from_the_only_number_kind_a_split_has(eval_fraction, split, big):
    """With targets up to 1 and an extreme held-out share, one split holds problems of one number kind only: it
    draws them (each solvable, target 1) instead of refusing an empty other half."""
    task = CountdownTask(max_target=1, eval_fraction=eval_fraction)
    examples = task.examples(6, seed=0, split=split)
    assert len(examples) == 6
    for example in examples:
        numbers = example.meta["numbers"]
        assert example.meta["target"] == 1 and (max(numbers) >= 10) == big
        assert task.score(example.prompt, task.demonstration(example, random.Random(0)), example.answer, **example.meta) == 1.0


@pytest.mark.parametrize("meta", [{"numbers": [True, 5, 7], "target": 22}, {"numbers": [3, 5, 7], "target": True}])
def test_countdown_meta_with_a_boolean_is_ignored_for_the_prompt(meta):
    """A boolean is no number of the problem: the problem is read from the prompt instead."""
    task = get_task("countdown")
    assert task.score("3 5 7>22=", "3*5=15 15+7=22 #22", "22", **meta) == 1.0


def test_rg_arithmetic_wrong_demonstrations_are_one_slip_carried_on():
    """Each wrong demonstration of a parseable problem has one step per operation, exactly one of them off by 1 or 2,
    later steps computed from the written (wrong) results, and a final number that does not contain the reference."""
    task = get_task("rg_arithmetic")
    rng = random.Random(4)
    ops = {"+": lambda p, q: p + q, "-": lambda p, q: p - q, "*": lambda p, q: p * q}
    stepwise = 0
    examples = task.examples(100, seed=1, split="train")
    for example in examples:
        wrong = task.wrong_demonstration(example, rng)
        body, final = wrong.rsplit("#", 1)
        assert example.answer not in final, wrong
        if not body.strip():
            continue  # every slip happened to contain the reference: a bare wrong number
        steps = [re.fullmatch(r"(-?\d+)([+\-*])(-?\d+)=(-?\d+)", s).groups() for s in body.split()]
        assert len(steps) == len(task.demonstration(example, rng).rsplit("#", 1)[0].split()), wrong
        errors = [int(v) - ops[op](int(a), int(b)) for a, op, b, v in steps]
        assert sorted(map(abs, errors))[-1] in (1, 2) and sum(e != 0 for e in errors) == 1, wrong
        assert steps[-1][3] == final, wrong
        stepwise += 1
    assert stepwise >= 0.9 * len(examples), stepwise


@pytest.mark.parametrize("name", ["sum_chain", "countdown", "rg_arithmetic"])
@pytest.mark.parametrize("column", ["answer", "completion", "prompt"])
def test_a_meta_column_named_like_a_reward_argument_does_not_fail_a_task_s_scoring(name, column):
    """A task's reward takes its three arguments by position only, so a row's meta column named answer, completion
    or prompt (which the argument check lets through, and verl keeps in extra_info) reaches **meta: a correct
    completion scores 1, not a failure on every sample."""
    task = get_task(name)
    example = task.examples(1, seed=0, split="train")[0]
    correct = task.demonstration(example, random.Random(0))
    meta = {**example.meta, column: "some value"}
    runner = RewardRunner(task)
    runner.check_arguments([meta])
    result = runner([example.prompt], [correct], [example.answer], [meta])
    assert not bool(result.failed[0]) and float(result.exact_scores[0]) == 1.0, result.first_error

    class KeywordTask(type(task)):  # a task of one's own whose score takes the three by keyword as well
        def score(self, prompt, completion, answer, **meta):
            return super().score(prompt, completion, answer, **meta)

    assert KeywordTask()(example.prompt, correct, example.answer, **meta) == 1.0
