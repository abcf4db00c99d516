"""Built-in reasoning tasks of the entropy laboratory.

A lab task generates short, procedurally made problems for a tiny character-level model, knows how to
write *correct* completions (picked at random among many valid solution paths, so that a model
pretrained on them starts with real entropy at real decision points) and plausible *wrong* ones (so the
pretrained model is imperfect), and scores completions with a verifier.

Completion format: short step tokens separated by single spaces, then ``" #<answer>"``::

    sum_chain       "7+3+5+2="   ->  "5+2=7 3+7=10 10+7=17 #17"     (any pairwise reduction order)
    countdown       "3 5 7>22="  ->  "3*5=15 15+7=22 #22"           (any valid derivation)
    rg_arithmetic   "(4+-2)*3="  ->  "4+-2=2 2*3=6 #6"              (reasoning-gym's verifier)

The final answer is whatever follows the *last* ``#``. Scores are 1.0 / 0.0 (``rg_arithmetic`` returns
reasoning-gym's score, which gives partial credit to an answer that merely contains the reference).
Scoring never raises on a malformed completion.

Held-out problems: each task partitions its problem space with a hash of the canonical problem
(:meth:`Task.canonical`), so an ``eval`` problem never appears in ``train`` for any seed. Within one
call to :meth:`Task.examples` problems are drawn without repetition until the split is exhausted.

    task = get_task("countdown")
    examples = task.examples(100, seed=0, split="train")
    pairs = sft_corpus(task, 1000, seed=0)            # (prompt, completion) pairs for pretraining
    records = task.records(64, seed=0, split="eval")  # PromptRecords for the trainer
    task.score(r.prompt, completion, r.answer, **r.meta)
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import combinations_with_replacement, permutations
from typing import Any, Literal

from entrorl._checks import check_int, is_real_number
from entrorl.data.records import PromptRecord
from entrorl.evaluation import DEFAULT_THRESHOLD

__all__ = [
    "TASKS",
    "CountdownTask",
    "RgArithmeticTask",
    "SumChainTask",
    "Task",
    "TaskExample",
    "available_tasks",
    "get_task",
    "sft_corpus",
]

Split = Literal["train", "eval"]
_SPLITS = ("train", "eval")
ANSWER_MARKER = "#"


@dataclass(frozen=True)
class TaskExample:
    """One problem: the ``prompt`` given to the model, the reference ``answer`` and the JSON-able
    ``meta`` the verifier needs (always including ``"problem"``, the problem's text; :meth:`Task.canonical` gives the
    form the train/eval partition hashes, the same string for most tasks)."""

    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _final_answer(completion: Any) -> str | None:
    """The text after the last answer marker, stripped; None when there is no marker."""
    if not isinstance(completion, str):
        return None
    index = completion.rfind(ANSWER_MARKER)
    if index == -1:
        return None
    return completion[index + 1 :].strip()


_INT = re.compile(r"-?[0-9]{1,12}")  # ASCII digits: int() would read any script's


def _parse_int(text: str | None) -> int | None:
    if text is None or not _INT.fullmatch(text):
        return None
    return int(text)


def _check_split(split: Any) -> Split:
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return split


class _WeightedPool:
    """Weighted sampling without replacement over a fixed list of integer weights (a Fenwick tree):
    each draw is proportional to the weights of the items not drawn yet; when every item has been
    drawn the pool refills (so repeats appear only after the whole pool is used)."""

    def __init__(self, weights: Sequence[int]) -> None:
        self._weights = [int(w) for w in weights]
        if any(w <= 0 for w in self._weights):
            raise ValueError("a weighted pool needs positive weights")
        size = len(self._weights)
        tree = [0] * (size + 1)
        for i, w in enumerate(self._weights, start=1):
            tree[i] += w
            parent = i + (i & -i)
            if parent <= size:
                tree[parent] += tree[i]
        self._template = tree
        self._top = 1 << (size.bit_length() - 1) if size else 0  # an empty split's pool is never drawn from
        self._total_template = sum(self._weights)
        self.reset()

    def __len__(self) -> int:
        return len(self._weights)

    def fresh(self) -> _WeightedPool:
        """A copy with every item available again (the tree template is shared, read-only)."""
        pool = copy.copy(self)
        pool.reset()
        return pool

    def reset(self) -> None:
        self._tree = list(self._template)
        self._left = list(self._weights)
        self._total = self._total_template

    def draw(self, rng: random.Random) -> int:
        if self._total <= 0:
            self.reset()
        target = rng.randrange(self._total)
        position, step, tree = 0, self._top, self._tree
        while step:
            nxt = position + step
            if nxt < len(tree) and tree[nxt] <= target:
                position = nxt
                target -= tree[nxt]
            step >>= 1
        index = position  # 0-based item index
        weight = self._left[index]
        self._left[index] = 0
        self._total -= weight
        i = index + 1
        while i < len(tree):
            tree[i] -= weight
            i += i & -i
        return index


# --------------------------------------------------------------------------------------------
# the task protocol
# --------------------------------------------------------------------------------------------


class Task:
    """A lab task: problem generation with held-out splits, demonstrations and a verifier.

    Subclasses implement :meth:`_generate` (``n`` examples of a split from an ``rng``),
    :meth:`demonstration`, :meth:`wrong_demonstration` and :meth:`score`. A task is also a reward
    function: ``task(prompt, completion, answer, **meta)`` is ``task.score(...)``.
    """

    name: str = ""
    description: str = ""
    #: A completion is correct when its score reaches this (see ``RewardRunner``).
    correct_threshold: float = DEFAULT_THRESHOLD
    #: Fraction of the canonical problem space held out for the ``eval`` split.
    eval_fraction: float = 0.2

    def __init__(self, *, eval_fraction: float | None = None) -> None:
        if eval_fraction is not None:
            if not is_real_number(eval_fraction):
                raise ValueError(f"eval_fraction must be a number, got {eval_fraction!r}")
            if not 0.0 < float(eval_fraction) < 1.0:
                raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
            self.eval_fraction = float(eval_fraction)
        self.__name__ = self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    # -- splits --------------------------------------------------------------------------------

    def split_of(self, canonical: str) -> Split:
        """The split a canonical problem belongs to (a stable hash, the same in every process)."""
        digest = hashlib.blake2b(f"{self.name}\x00{canonical}".encode(), digest_size=8).digest()
        return "eval" if int.from_bytes(digest, "big") / 2.0**64 < self.eval_fraction else "train"

    def canonical(self, example: TaskExample) -> str:
        """The canonical form of ``example``'s problem (what the train/eval partition hashes)."""
        return str(example.meta["problem"])

    def num_problems(self, split: Split) -> int | None:
        """How many distinct examples ``split`` can provide before :meth:`examples` repeats itself
        (None when the problem space is not enumerated, i.e. the task has no ``_pool``)."""
        _check_split(split)
        pool = getattr(self, "_pool", None)
        return None if pool is None else len(pool(split)[0])

    # -- generation ----------------------------------------------------------------------------

    def examples(self, n: int, *, seed: int, split: Split) -> list[TaskExample]:
        """``n`` problems of ``split``, deterministic for ``(seed, split)`` (a prefix of a longer call
        with the same seed); distinct until the split's problems run out."""
        n = check_int(n, "n", minimum=0)
        seed = check_int(seed, "seed")
        _check_split(split)
        if n == 0:
            return []
        if self.num_problems(split) == 0:
            raise ValueError(f"the {split} split of {self.name} holds no problem with these settings (eval_fraction "
                             f"{self.eval_fraction}): there is nothing to draw {n} problem(s) from")
        rng = random.Random(f"entrorl.lab:{self.name}:{split}:{seed}")
        return self._generate(n, rng, split, seed)

    def _generate(self, n: int, rng: random.Random, split: Split, seed: int) -> list[TaskExample]:
        raise NotImplementedError

    def records(self, n: int, *, seed: int, split: Split) -> list[PromptRecord]:
        """:meth:`examples` as :class:`PromptRecord` objects (``meta["task"]`` is the task name)."""
        return [
            PromptRecord(
                prompt=example.prompt,
                answer=example.answer,
                meta={**example.meta, "task": self.name},
                source=f"{self.name}:{split}:{i}",
            )
            for i, example in enumerate(self.examples(n, seed=seed, split=split))
        ]

    # -- completions ---------------------------------------------------------------------------

    def demonstration(self, example: TaskExample, rng: random.Random) -> str:
        """One correct completion, chosen at random among the valid ones."""
        raise NotImplementedError

    def wrong_demonstration(self, example: TaskExample, rng: random.Random) -> str:
        """A plausible but wrong completion (scores 0)."""
        raise NotImplementedError

    def score(self, prompt: str, completion: str, answer: str | None, /, **meta: Any) -> float:
        """The verifier: 1.0 for a correct completion, else 0.0. Never raises on a bad completion."""
        raise NotImplementedError

    def __call__(self, prompt: str, completion: str, answer: str | None, /, **meta: Any) -> float:
        # a meta column named like one of the three would collide with them in a subclass's score that takes them by
        # keyword too (the built-in tasks' take them by position only): no task reads such a column
        meta = {key: value for key, value in meta.items() if key not in ("prompt", "completion", "answer")}
        return self.score(prompt, completion, answer, **meta)


# --------------------------------------------------------------------------------------------
# sum_chain
# --------------------------------------------------------------------------------------------


class SumChainTask(Task):
    """Sums of 3-4 one-digit numbers (3-5 with max_terms=5); a solution adds two remaining terms at a time, in any order.

    Prompt ``"7+3+5+2="``; completions ``"7+3=10 10+5=15 15+2=17 #17"``, ``"5+2=7 3+7=10 10+7=17 #17"``,
    ... (any pair of remaining terms, either operand order). The verifier checks the final answer only.
    The canonical problem is the sorted multiset of terms, so no reordering of an eval problem is a
    train prompt. Term counts are drawn uniformly, then the terms.
    """

    name = "sum_chain"

    def __init__(self, *, min_terms: int = 3, max_terms: int = 4, eval_fraction: float | None = None) -> None:
        super().__init__(eval_fraction=eval_fraction)
        min_terms = check_int(min_terms, "min_terms", minimum=2)
        max_terms = check_int(max_terms, "max_terms", minimum=min_terms)
        if max_terms > 7:
            raise ValueError(f"max_terms must be <= 7 (the problem space is enumerated), got {max_terms}")
        self.min_terms, self.max_terms = min_terms, max_terms
        self.description = (f"sums of {min_terms}-{max_terms} one-digit numbers reduced pairwise in any order (many "
                            "valid paths); scored on the final answer")
        self._pools: dict[str, tuple[list[tuple[int, ...]], _WeightedPool]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _canonical_terms(terms: Sequence[int]) -> str:
        return "+".join(str(t) for t in sorted(terms))

    def _pool(self, split: Split) -> tuple[list[tuple[int, ...]], _WeightedPool]:
        with self._lock:
            if split not in self._pools:
                problems: list[tuple[int, ...]] = []
                strata: list[int] = []
                for k in range(self.min_terms, self.max_terms + 1):
                    for multiset in combinations_with_replacement(range(1, 10), k):
                        if self.split_of(self._canonical_terms(multiset)) != split:
                            continue
                        orders = sorted(set(permutations(multiset)))
                        problems.extend(orders)
                        strata.extend([k] * len(orders))
                counts = {k: strata.count(k) for k in set(strata)}
                scale = 1
                for c in counts.values():
                    scale *= c
                # uniform over term counts, uniform over ordered terms within a count
                weights = [scale // counts[k] for k in strata]
                self._pools[split] = (problems, _WeightedPool(weights))
            problems, pool = self._pools[split]
        return problems, pool

    def _generate(self, n: int, rng: random.Random, split: Split, seed: int) -> list[TaskExample]:
        problems, template = self._pool(split)
        pool = template.fresh()
        out = []
        for _ in range(n):
            terms = problems[pool.draw(rng)]
            out.append(self._example(terms))
        return out

    def _example(self, terms: Sequence[int]) -> TaskExample:
        terms = [int(t) for t in terms]
        return TaskExample(
            prompt="+".join(str(t) for t in terms) + "=",
            answer=str(sum(terms)),
            meta={"terms": terms, "problem": self._canonical_terms(terms)},
        )

    @staticmethod
    def _terms(prompt: Any, meta: Mapping[str, Any]) -> list[int] | None:
        terms = meta.get("terms")
        if isinstance(terms, (list, tuple)) and terms and all(isinstance(t, int) for t in terms):
            return [int(t) for t in terms]
        if isinstance(prompt, str) and re.fullmatch(r"[0-9]+(\+[0-9]+)+=", prompt):
            return [int(t) for t in prompt[:-1].split("+")]
        return None

    def _path(self, terms: Sequence[int], rng: random.Random) -> list[tuple[int, int]]:
        """A random pairwise reduction order: the (a, b) operand pairs, each added in that order."""
        remaining = list(terms)
        pairs = []
        while len(remaining) > 1:
            i, j = rng.sample(range(len(remaining)), 2)
            a, b = remaining[i], remaining[j]
            for index in sorted((i, j), reverse=True):
                del remaining[index]
            remaining.append(a + b)
            pairs.append((a, b))
        return pairs

    def demonstration(self, example: TaskExample, rng: random.Random) -> str:
        terms = self._terms(example.prompt, example.meta) or []
        if len(terms) < 2:
            return f"{ANSWER_MARKER}{sum(terms)}"
        steps = [f"{a}+{b}={a + b}" for a, b in self._path(terms, rng)]
        return " ".join(steps) + f" {ANSWER_MARKER}{sum(terms)}"

    def wrong_demonstration(self, example: TaskExample, rng: random.Random) -> str:
        """A slip of +-1 or +-2 in one addition, carried through the later steps (or, one time in
        five, correct steps and a miscopied final answer)."""
        terms = self._terms(example.prompt, example.meta) or [0, 0]
        total = sum(terms)
        if rng.random() < 0.2:
            correct = self.demonstration(example, rng)
            body = correct[: correct.rfind(ANSWER_MARKER)]
            delta = rng.choice([d for d in (-2, -1, 1, 2) if total + d >= 0])
            return f"{body}{ANSWER_MARKER}{total + delta}"
        remaining = list(terms)
        n_steps = len(remaining) - 1
        slip_at = rng.randrange(n_steps)
        steps, value = [], 0
        for step in range(n_steps):
            i, j = rng.sample(range(len(remaining)), 2)
            a, b = remaining[i], remaining[j]
            value = a + b
            if step == slip_at:
                value += rng.choice([d for d in (-2, -1, 1, 2) if a + b + d >= 1])
            for index in sorted((i, j), reverse=True):
                del remaining[index]
            remaining.append(value)
            steps.append(f"{a}+{b}={value}")
        return " ".join(steps) + f" {ANSWER_MARKER}{value}"

    def score(self, prompt: str, completion: str, answer: str | None, /, **meta: Any) -> float:
        terms = self._terms(prompt, meta)
        expected = sum(terms) if terms is not None else _parse_int(answer.strip() if isinstance(answer, str) else None)
        if expected is None:
            raise ValueError("sum_chain cannot tell the problem: no meta['terms'], no 'a+b+...=' prompt, no answer")
        got = _parse_int(_final_answer(completion))
        return 1.0 if got is not None and got == expected else 0.0


# --------------------------------------------------------------------------------------------
# countdown
# --------------------------------------------------------------------------------------------

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_STEP = re.compile(r"([0-9]{1,6})([+\-*])([0-9]{1,6})=([0-9]{1,9})")


@lru_cache(maxsize=4096)
def _countdown_derivations(numbers: tuple[int, ...]) -> dict[int, dict[str, tuple[str, ...]]]:
    """Every derivation of a 3-number countdown problem: ``{value: {canonical solution: renderings}}``.

    A derivation combines two numbers, then the result with the third, with + - * and positive
    intermediate results; renderings differ by which operand is written first (for + and *) and the
    order of equal numbers; the canonical solution sorts the operands of + and *.
    """
    found: dict[int, dict[str, set[str]]] = {}
    count = len(numbers)
    for i in range(count):
        for j in range(count):
            if i == j:
                continue
            rest = [numbers[k] for k in range(count) if k not in (i, j)]
            a, b = numbers[i], numbers[j]
            for op1, f1 in _OPS.items():
                r = f1(a, b)
                if r <= 0:
                    continue
                inner = _canon(op1, a, b)
                (c,) = rest
                for result_first in (True, False):
                    x, y = (r, c) if result_first else (c, r)
                    left, right = (inner, str(c)) if result_first else (str(c), inner)
                    for op2, f2 in _OPS.items():
                        t = f2(x, y)
                        if t <= 0:
                            continue
                        canonical = _canon_str(op2, left, right)
                        text = f"{a}{op1}{b}={r} {x}{op2}{y}={t}"
                        found.setdefault(t, {}).setdefault(canonical, set()).add(text)
    return {t: {k: tuple(sorted(v)) for k, v in sols.items()} for t, sols in found.items()}


def _canon(op: str, a: int, b: int) -> str:
    return _canon_str(op, str(a), str(b))


def _canon_str(op: str, left: str, right: str) -> str:
    if op in "+*":
        left, right = sorted((left, right))
    return f"({left}{op}{right})"


class CountdownTask(Task):
    """Reach a target from three numbers with + - * (each number used once, positive intermediates).

    Prompt ``"3 5 7>22="`` (the numbers in random order, then the target); a completion is one step per
    operation, ``"a op b=r"``, then the answer: ``"3*5=15 15+7=22 #22"``. Problems have at least one
    solution; targets with several solutions are preferred (a problem's weight is its number of
    distinct solutions, capped at ``max_weight``). The verifier accepts only a valid derivation: every
    step's arithmetic right, operands taken from the numbers left (each given number used exactly once,
    results reusable once), the last result the target and the final answer the target.

    Numbers: three from 1-9, or two from 1-9 and one from 10-25 (half of the problems each when
    possible); targets up to ``max_target``. The canonical problem is the sorted numbers and the target.
    """

    name = "countdown"
    description = (
        "reach a target from three numbers with + - * (each used once); several solutions per problem; "
        "the whole derivation is verified"
    )

    def __init__(
        self, *, max_target: int = 100, max_weight: int = 4, eval_fraction: float | None = None
    ) -> None:
        super().__init__(eval_fraction=eval_fraction)
        max_target = check_int(max_target, "max_target", minimum=1)
        max_weight = check_int(max_weight, "max_weight", minimum=1)
        self.max_target, self.max_weight = max_target, max_weight
        self._pools: dict[str, tuple[list[tuple[tuple[int, ...], int, int]], _WeightedPool]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _canonical_problem(numbers: Sequence[int], target: int) -> str:
        return " ".join(str(x) for x in sorted(numbers)) + f">{target}"

    def _pool(self, split: Split) -> tuple[list[tuple[tuple[int, ...], int, int]], _WeightedPool]:
        with self._lock:
            if split not in self._pools:
                small = list(combinations_with_replacement(range(1, 10), 3))
                big = [(a, b, c) for a, b in combinations_with_replacement(range(1, 10), 2) for c in range(10, 26)]
                problems: list[tuple[tuple[int, ...], int, int]] = []
                weights: list[int] = []
                groups = []
                for group in (small, big):
                    rows = []
                    for numbers in group:
                        for target, solutions in sorted(_countdown_derivations(tuple(numbers)).items()):
                            if target > self.max_target:
                                continue
                            if self.split_of(self._canonical_problem(numbers, target)) != split:
                                continue
                            rows.append((tuple(numbers), target, len(solutions)))
                    groups.append(rows)
                # both number kinds equally likely overall: scale each group's weights to a common total
                totals = [sum(min(s, self.max_weight) for _, _, s in rows) for rows in groups]
                for rows, other in ((groups[0], totals[1]), (groups[1], totals[0])):
                    for numbers, target, n_solutions in rows:
                        problems.append((numbers, target, n_solutions))
                        weights.append(min(n_solutions, self.max_weight) * max(other, 1))
                self._pools[split] = (problems, _WeightedPool(weights))
            problems, pool = self._pools[split]
        return problems, pool

    def _generate(self, n: int, rng: random.Random, split: Split, seed: int) -> list[TaskExample]:
        problems, template = self._pool(split)
        pool = template.fresh()
        out = []
        for _ in range(n):
            numbers, target, n_solutions = problems[pool.draw(rng)]
            shown = list(numbers)
            rng.shuffle(shown)
            out.append(
                TaskExample(
                    prompt=" ".join(str(x) for x in shown) + f">{target}=",
                    answer=str(target),
                    meta={
                        "numbers": shown,
                        "target": target,
                        "solutions": n_solutions,
                        "problem": self._canonical_problem(numbers, target),
                    },
                )
            )
        return out

    @staticmethod
    def _problem(prompt: Any, meta: Mapping[str, Any]) -> tuple[list[int], int]:
        numbers, target = meta.get("numbers"), meta.get("target")
        if (
            isinstance(numbers, (list, tuple))
            and numbers
            and all(isinstance(x, int) and not isinstance(x, bool) for x in numbers)
            and isinstance(target, int)
            and not isinstance(target, bool)
        ):
            return [int(x) for x in numbers], int(target)
        if isinstance(prompt, str):
            match = re.fullmatch(r"([0-9]+(?: [0-9]+)+)>([0-9]+)=", prompt)
            if match:
                return [int(x) for x in match.group(1).split()], int(match.group(2))
        raise ValueError("countdown cannot tell the problem: no meta['numbers']/meta['target'], no 'a b c>t=' prompt")

    @staticmethod
    def check_derivation(numbers: Sequence[int], target: int, completion: Any) -> bool:
        """Whether ``completion`` is a valid derivation of ``target`` from ``numbers`` ending with
        ``#target`` (see the class docstring)."""
        if not isinstance(completion, str):
            return False
        index = completion.rfind(ANSWER_MARKER)
        if index == -1:
            return False
        if _parse_int(completion[index + 1 :].strip()) != target:
            return False
        available = list(numbers)
        for token in completion[:index].split():
            match = _STEP.fullmatch(token)
            if match is None:
                return False
            a, op, b, claimed = int(match.group(1)), match.group(2), int(match.group(3)), int(match.group(4))
            for operand in (a, b):
                if operand not in available:
                    return False
                available.remove(operand)
            value = _OPS[op](a, b)
            if value <= 0 or value != claimed:
                return False
            available.append(value)
        return available == [target]

    def score(self, prompt: str, completion: str, answer: str | None, /, **meta: Any) -> float:
        numbers, target = self._problem(prompt, meta)
        return 1.0 if self.check_derivation(numbers, target, completion) else 0.0

    def demonstration(self, example: TaskExample, rng: random.Random) -> str:
        """A solution picked uniformly among the distinct solutions, then one of its renderings."""
        numbers, target = self._problem(example.prompt, example.meta)
        solutions = _countdown_derivations(tuple(sorted(numbers))).get(target)
        if not solutions:
            raise ValueError(f"countdown problem {numbers} > {target} has no solution")
        renderings = solutions[rng.choice(sorted(solutions))]
        return f"{rng.choice(renderings)} {ANSWER_MARKER}{target}"

    def wrong_demonstration(self, example: TaskExample, rng: random.Random) -> str:
        """One of: a valid derivation of another number ("a miss"); a correct solution with a slip of
        +-1 or +-2 in one step, carried on; a derivation of another number whose last step claims the
        target ("a bogus hit")."""
        numbers, target = self._problem(example.prompt, example.meta)
        derivations = _countdown_derivations(tuple(sorted(numbers)))
        misses = sorted(
            (value, text)
            for value, sols in derivations.items()
            if value != target
            for texts in sols.values()
            for text in texts
        )
        kind = rng.choice(("miss", "slip", "bogus")) if misses else "slip"
        if kind == "miss":
            value, text = rng.choice(misses)
            return f"{text} {ANSWER_MARKER}{value}"
        if kind == "bogus":
            value, text = rng.choice(misses)
            head = text[: text.rfind("=") + 1]
            return f"{head}{target} {ANSWER_MARKER}{target}"
        correct = self.demonstration(example, rng)
        (first, second) = correct[: correct.rfind(ANSWER_MARKER)].split()
        a, op1, b, r = _STEP.fullmatch(first).groups()
        x, op2, y, _ = _STEP.fullmatch(second).groups()
        a, b, r, x, y = int(a), int(b), int(r), int(x), int(y)
        slip_first = rng.random() < 0.5
        for delta in rng.sample((-2, -1, 1, 2), 4):
            r2 = r + delta if slip_first else r
            if r2 <= 0:
                continue
            if slip_first:  # the wrong intermediate replaces r in the second step
                x2, y2 = (r2, y) if x == r else (x, r2)
            else:
                x2, y2 = x, y
            t2 = _OPS[op2](x2, y2) + (0 if slip_first else delta)
            if t2 <= 0 or t2 == target:
                continue
            return f"{a}{op1}{b}={r2} {x2}{op2}{y2}={t2} {ANSWER_MARKER}{t2}"
        # every slip was impossible (tiny numbers): miscopy the final answer instead
        return f"{first} {second} {ANSWER_MARKER}{target + 1}"


# --------------------------------------------------------------------------------------------
# rg_arithmetic (reasoning-gym basic_arithmetic, scored by reasoning-gym)
# --------------------------------------------------------------------------------------------

#: Short one-digit expressions with 2-3 terms, + - * and (sometimes redundant) parentheses, no spaces.
RG_ARITHMETIC_CONFIG: dict[str, Any] = {
    "min_terms": 2,
    "max_terms": 3,
    "min_digits": 1,
    "max_digits": 1,
    "operators": ["+", "-", "*"],
    "allow_parentheses": True,
    "allow_negation": False,
    "whitespace": "no_space",
}


def _tokenize(expression: str) -> list[str] | None:
    tokens = re.findall(r"[0-9]+|[-+*()]|\S", expression.replace(" ", ""))
    if any(not (t.isdigit() or t in "+-*()") for t in tokens):
        return None
    return tokens


def _parse_expression(expression: str) -> Any:
    """``expression`` (integers, + - *, parentheses, unary minus) as a tree: ``("num", v)`` or
    ``("bin", op, left, right)``; unary minus on a literal folds into it, on a group is ``0 - group``.
    None if it does not parse."""
    tokens = _tokenize(expression)
    if not tokens:
        return None
    position = 0

    def peek() -> str | None:
        return tokens[position] if position < len(tokens) else None

    def take() -> str:
        nonlocal position
        position += 1
        return tokens[position - 1]

    def expr() -> Any:
        node = term()
        while peek() in ("+", "-"):
            op = take()
            node = ("bin", op, node, term())
        return node

    def term() -> Any:
        node = factor()
        while peek() == "*":
            take()
            node = ("bin", "*", node, factor())
        return node

    def factor() -> Any:
        token = peek()
        if token is None:
            raise ValueError("unexpected end")
        if token == "-":
            take()
            if peek() is not None and peek().isdigit():
                return ("num", -int(take()))
            inner = factor()
            if inner[0] == "num":
                return ("num", -inner[1])
            return ("bin", "-", ("num", 0), inner)
        if token == "(":
            take()
            node = expr()
            if take() != ")":
                raise ValueError("missing )")
            return node
        if token.isdigit():
            return ("num", int(take()))
        raise ValueError(f"unexpected {token!r}")

    try:
        tree = expr()
    except (ValueError, IndexError):
        return None
    return tree if position == len(tokens) else None


def _reducible(node: Any, path: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    if node[0] != "bin":
        return []
    if node[2][0] == "num" and node[3][0] == "num":
        return [path]
    return _reducible(node[2], (*path, 2)) + _reducible(node[3], (*path, 3))


def _at(node: Any, path: tuple[int, ...]) -> Any:
    for index in path:
        node = node[index]
    return node


def _replace(node: Any, path: tuple[int, ...], new: Any) -> Any:
    if not path:
        return new
    parts = list(node)
    parts[path[0]] = _replace(node[path[0]], path[1:], new)
    return tuple(parts)


def _tree_text(tree: Any) -> str:
    """``tree`` written with a pair of parentheses around every operation: one text per parse tree."""
    if tree[0] == "num":
        return str(tree[1])
    _, op, left, right = tree
    return f"({_tree_text(left)}{op}{_tree_text(right)})"


def _reduction_steps(tree: Any, rng: random.Random, *, slip: int = 0, slip_at: int = -1) -> tuple[list[str], int]:
    """Reduce ``tree`` one operation at a time in a random valid order: the steps ``"a op b=r"`` and the
    value. ``slip`` is added to the result of step ``slip_at`` (and carried on)."""
    steps: list[str] = []
    while tree[0] == "bin":
        path = rng.choice(_reducible(tree))
        _, op, left, right = _at(tree, path)
        value = _OPS[op](left[1], right[1])
        if len(steps) == slip_at:
            value += slip
        steps.append(f"{left[1]}{op}{right[1]}={value}")
        tree = _replace(tree, path, ("num", value))
    return steps, tree[1]


class RgArithmeticTask(Task):
    """reasoning-gym's ``basic_arithmetic`` with short one-digit expressions, scored by reasoning-gym.

    The prompt is the entry's expression plus ``"="`` (``"(4+-2)*3="``); demonstrations evaluate one
    operation at a time in a random valid order (``"4+-2=2 2*3=6 #6"``). The score is reasoning-gym's
    ``score_answer(text after the last '#', entry)`` -- 1.0 for the exact answer, partial credit for an
    answer that contains it, 0.0 otherwise; only the exact answer counts as correct (``correct_threshold`` 1.0).
    ``meta`` keeps the entry (JSON-able) and the config. The canonical problem is the expression's parse tree,
    written with parentheses around every operation: reasoning-gym writes the same problem with and without redundant
    parentheses (``8*2`` and ``(8*2)``: same answer, same demonstrations), and both forms must fall in one split.
    """

    name = "rg_arithmetic"
    correct_threshold = 1.0
    description = "reasoning-gym basic_arithmetic (2-3 one-digit terms, + - *, parentheses), reasoning-gym's verifier"
    rg_task = "basic_arithmetic"

    def __init__(self, *, config: Mapping[str, Any] | None = None, eval_fraction: float | None = None) -> None:
        super().__init__(eval_fraction=eval_fraction)
        if config is not None and not isinstance(config, Mapping):
            raise ValueError(f"config must be a mapping, got {type(config).__name__}")
        self.config = json.loads(json.dumps(dict(RG_ARITHMETIC_CONFIG if config is None else config)))
        self._scorers: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _dataset(self, config: Mapping[str, Any], *, seed: int = 0, size: int = 1) -> Any:
        import reasoning_gym

        return reasoning_gym.create_dataset(self.rg_task, size=size, seed=seed, **dict(config))

    def _scorer(self, config: Mapping[str, Any]) -> Any:
        key = json.dumps(dict(config), sort_keys=True)
        with self._lock:
            scorer = self._scorers.get(key)
            if scorer is None:
                scorer = self._scorers[key] = self._dataset(config)
        return scorer

    def _generate(self, n: int, rng: random.Random, split: Split, seed: int) -> list[TaskExample]:
        base = int.from_bytes(hashlib.blake2b(f"{self.name}:{seed}".encode(), digest_size=6).digest(), "big")
        dataset = self._dataset(self.config, seed=base, size=2**31 - 1)
        out: list[TaskExample] = []
        seen: set[str] = set()
        # a repeat is skipped until this many of the split's problems in a row were repeats (the split is then
        # nearly exhausted): a rule of what was drawn so far, not of n, so a shorter call gives a prefix of a longer one
        index, repeats_in_a_row, patience = 0, 0, 2000
        while len(out) < n:
            entry = json.loads(json.dumps(dataset[index]))
            index += 1
            expression = str(entry["metadata"]["expression"]).replace(" ", "")
            tree = _parse_expression(expression)
            if tree is None:
                continue
            canonical = _tree_text(tree)
            if self.split_of(canonical) != split:
                continue
            if canonical in seen:
                repeats_in_a_row += 1
                if repeats_in_a_row <= patience:
                    continue
            else:
                repeats_in_a_row = 0
            seen.add(canonical)
            out.append(
                TaskExample(
                    prompt=f"{expression}=",
                    answer=str(entry["answer"]),
                    meta={"entry": entry, "config": self.config, "rg_task": self.rg_task, "problem": expression},
                )
            )
        return out

    @staticmethod
    def _expression(example: TaskExample) -> str:
        return str(example.meta.get("problem") or example.prompt.rstrip("="))

    def canonical(self, example: TaskExample) -> str:
        expression = self._expression(example)
        tree = _parse_expression(expression)
        return expression if tree is None else _tree_text(tree)

    def demonstration(self, example: TaskExample, rng: random.Random) -> str:
        tree = _parse_expression(self._expression(example))
        if tree is not None:
            steps, value = _reduction_steps(tree, rng)
            if str(value) == example.answer:
                return " ".join([*steps, f"{ANSWER_MARKER}{value}"])
        return f"{ANSWER_MARKER}{example.answer}"

    def wrong_demonstration(self, example: TaskExample, rng: random.Random) -> str:
        """A slip of +-1 or +-2 in one step, carried on; the final number never contains the reference
        (which reasoning-gym would give partial credit)."""
        reference = example.answer
        tree = _parse_expression(self._expression(example))
        if tree is not None:
            n_steps = len(_reduction_steps(tree, random.Random(0))[0])
            for _ in range(8):
                slip_at = rng.randrange(n_steps) if n_steps else -1
                steps, value = _reduction_steps(tree, rng, slip=rng.choice((-2, -1, 1, 2)), slip_at=slip_at)
                if steps and reference not in str(value):
                    return " ".join([*steps, f"{ANSWER_MARKER}{value}"])
        value = _parse_int(reference) or 0
        candidates = [value + d for d in (-3, -2, -1, 1, 2, 3, 10, -10)] + [-value]
        wrong = rng.choice([c for c in candidates if reference not in str(c)])
        return f"{ANSWER_MARKER}{wrong}"

    def score(self, prompt: str, completion: str, answer: str | None, /, **meta: Any) -> float:
        entry = meta.get("entry")
        if isinstance(entry, str):
            entry = json.loads(entry)
        if not isinstance(entry, Mapping):
            if answer is None:
                raise ValueError("rg_arithmetic needs the reasoning-gym entry in meta['entry'] (or an answer)")
            entry = {"question": prompt, "answer": str(answer), "metadata": {}}
        config = meta.get("config")
        scorer = self._scorer(config if isinstance(config, Mapping) else self.config)
        predicted = _final_answer(completion)
        if not predicted:
            return 0.0
        try:
            return float(scorer.score_answer(predicted, dict(entry)))
        except Exception:
            return 0.0


# --------------------------------------------------------------------------------------------
# registry and the pretraining corpus
# --------------------------------------------------------------------------------------------

TASKS: dict[str, Task] = {task.name: task for task in (SumChainTask(), CountdownTask(), RgArithmeticTask())}


def available_tasks() -> list[str]:
    """Names of the built-in lab tasks."""
    return sorted(TASKS)


def get_task(name: str) -> Task:
    """The built-in task called ``name``; ValueError listing the names otherwise."""
    if not isinstance(name, str) or name not in TASKS:
        raise ValueError(f"unknown lab task {name!r}; available: {', '.join(available_tasks())}")
    return TASKS[name]


def sft_corpus(
    task: Task | str,
    n: int,
    *,
    seed: int,
    wrong_fraction: float = 0.3,
    demos_per_problem: int = 2,
) -> list[tuple[str, str]]:
    """(prompt, completion) pairs for supervised pretraining on ``n`` train problems: per problem,
    ``demos_per_problem`` correct demonstrations (different ones while the problem has enough), then,
    with probability ``wrong_fraction``, one wrong demonstration. Deterministic for ``seed``; grouped
    by problem in generation order (shuffle before training)."""
    if isinstance(task, str):
        task = get_task(task)
    if not isinstance(task, Task):
        raise ValueError(f"task must be a Task or a task name, got {type(task).__name__}")
    n = check_int(n, "n", minimum=0)
    seed = check_int(seed, "seed")
    demos_per_problem = check_int(demos_per_problem, "demos_per_problem", minimum=0)
    if (
        not is_real_number(wrong_fraction)
        or not 0.0 <= wrong_fraction <= 1.0
    ):
        raise ValueError(f"wrong_fraction must be a number in [0, 1], got {wrong_fraction!r}")
    rng = random.Random(f"entrorl.lab.sft:{task.name}:{seed}")
    pairs: list[tuple[str, str]] = []
    for example in task.examples(n, seed=seed, split="train"):
        demos: list[str] = []
        for _ in range(8 * demos_per_problem):
            if len(demos) == demos_per_problem:
                break
            demo = task.demonstration(example, rng)
            if demo not in demos:
                demos.append(demo)
        while len(demos) < demos_per_problem:  # the problem has fewer distinct solutions
            demos.append(task.demonstration(example, rng))
        pairs.extend((example.prompt, demo) for demo in demos)
        if rng.random() < wrong_fraction:
            pairs.append((example.prompt, task.wrong_demonstration(example, rng)))
    return pairs
