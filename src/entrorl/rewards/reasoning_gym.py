"""Procedural reasoning tasks from reasoning-gym, scored by each task's own verifier.

Records are generated locally (no downloads) with :func:`reasoning_gym_records`; each carries the
reasoning-gym *entry* in its metadata, and the ``reasoning_gym`` reward hands that entry to the task's
``score_answer(answer, entry)``::

    records = reasoning_gym_records("basic_arithmetic", size=100, seed=0)
    reward = get_reward("reasoning_gym", task="basic_arithmetic")
    r = records[0]
    reward(r["prompt"], "... <answer>-4</answer>", r["answer"], **r["meta"])   # -> 1.0

The model's answer is taken from the completion like reasoning-gym's own evaluation does — the last
``<answer>...</answer>`` — and, unless ``strict=True``, falls back (after the last ``</think>``) to the last
``\\boxed{...}``, then what follows "the answer is" / "Answer:", then the last non-empty line, without the markup
around the answer and a final period the reference does not have; a phrase is read two ways, the rest of its line
(a sentence answer) and up to its sentence's end or a clause (a value), and the better score is kept
(:func:`reasoning_gym_answer_readings`). Ask models for answer tags
(:data:`REASONING_GYM_INSTRUCTION`). Scores are the verifier's, in ``[0, 1]`` (several tasks give
partial credit, e.g. ``len(reference) / len(answer)`` when the answer contains the reference).

Some verifiers read their dataset's configuration, so the scorer is built with the same config the
records were generated with (the ``config`` factory option, or ``meta["config"]`` which
:func:`reasoning_gym_records` stores). Entries must reach the verifier unchanged, and JSON has no tuples, sets or
non-string keys (ARC's grids are tuples of tuples, which its verifier compares with ``==``): the records store each
entry in a JSON form that says what each such value was (:func:`entry_to_json`), and the reward rebuilds it
(:func:`entry_from_json`) before scoring, so a data file written as JSON Lines scores exactly like the records.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from entrorl._checks import check_int, did_you_mean
from entrorl.rewards.base import register_reward
from entrorl.rewards.math import extract_answer_phrase, extract_answer_tag, extract_boxed

__all__ = [
    "REASONING_GYM_INSTRUCTION",
    "ReasoningGymReward",
    "available_reasoning_gym_tasks",
    "entry_from_json",
    "entry_to_json",
    "extract_reasoning_gym_answer",
    "reasoning_gym_answer_readings",
    "reasoning_gym_records",
    "verifier_accepts_nonsense",
]

#: The instruction to append to reasoning-gym prompts so answers are extractable.
REASONING_GYM_INSTRUCTION = (
    "Think step by step, then give your final answer inside <answer></answer> tags, "
    "for example <answer>42</answer>. Put only the final answer inside the tags, in the format the "
    "question asks for."
)

_TAG_OPEN, _TAG_CLOSE = "<answer>", "</answer>"


# markers of the values JSON cannot hold as they are; a one-key object {marker: [...]} stands for the value
_TUPLE, _SET, _FROZENSET, _ITEMS = "__tuple__", "__set__", "__frozenset__", "__dict_items__"


def entry_to_json(value: Any) -> Any:
    """``value`` made of what JSON holds: a tuple becomes ``{"__tuple__": [...]}``, a set ``{"__set__": [...]}`` (a
    frozenset ``{"__frozenset__": [...]}``) and a
    dict with a key that is not a string ``{"__dict_items__": [[key, value], ...]}``, recursively; the rest as it is.
    :func:`entry_from_json` undoes it."""
    if isinstance(value, tuple):
        return {_TUPLE: [entry_to_json(item) for item in value]}
    if isinstance(value, (set, frozenset)):
        marker = _FROZENSET if isinstance(value, frozenset) else _SET
        return {marker: [entry_to_json(item) for item in sorted(value, key=repr)]}
    if isinstance(value, Mapping):
        if all(isinstance(key, str) for key in value):
            return {key: entry_to_json(item) for key, item in value.items()}
        return {_ITEMS: [[entry_to_json(key), entry_to_json(item)] for key, item in value.items()]}
    if isinstance(value, list):
        return [entry_to_json(item) for item in value]
    return value


def entry_from_json(value: Any) -> Any:
    """The value :func:`entry_to_json` was given (a tuple's or a set's items, a dict's keys, with their types)."""
    if isinstance(value, Mapping):
        if len(value) == 1:
            (marker, items), = value.items()
            if marker == _TUPLE and isinstance(items, list):
                return tuple(entry_from_json(item) for item in items)
            if marker == _SET and isinstance(items, list):
                return {entry_from_json(item) for item in items}
            if marker == _FROZENSET and isinstance(items, list):
                return frozenset(entry_from_json(item) for item in items)
            if marker == _ITEMS and isinstance(items, list):
                return {_hashable(entry_from_json(key)): entry_from_json(item) for key, item in items}
        return {key: entry_from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [entry_from_json(item) for item in value]
    return value


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def available_reasoning_gym_tasks() -> list[str]:
    """Names of the reasoning-gym datasets installed (imports reasoning-gym, about two seconds)."""
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def _check_task(task: Any) -> str:
    if not isinstance(task, str) or not task:
        raise ValueError(f"reasoning_gym task must be a dataset name, got {task!r}")
    tasks = available_reasoning_gym_tasks()
    if task not in tasks:
        raise ValueError(f"unknown reasoning-gym task {task!r}; {did_you_mean(task, tasks)}available: {', '.join(tasks)}")
    return task


# "The answer is X", "The final answer is: X", "Answer: X", "**Answer**: X", "**Final Answer:** X"
_ANSWER_PHRASE_RE = re.compile(r"(?i)\b(?:the\s+(?:final\s+)?answer\s+is\b\s*:?|(?:final\s+)?answer\b\s*(?:\*+\s*)?:)")
_BLANK_LINE_RE = re.compile(r"\n[ \t]*(?:\n|$)")
# markup around a whole answer, taken off while it wraps the whole of it: **X**, $X$, \(X\), \text{X}
_MARKUP_RES = (re.compile(r"\*\*(?P<inner>(?:(?!\*\*).)+)\*\*", re.DOTALL), re.compile(r"\$(?P<inner>[^$]+)\$"),
               re.compile(r"\\\((?P<inner>(?:(?!\\\)).)+)\\\)", re.DOTALL),
               re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{(?P<inner>[^{}]*)\}"))


def _without_markup(answer: str) -> str:
    """``answer`` without the bold, math delimiters or ``\\text{}`` that wrap all of it."""
    answer = answer.strip()
    for _ in range(3):  # **$\\text{son}$**; a bound, so that a run of 100,000 stars is not taken apart two by two
        for pattern in _MARKUP_RES:
            found = pattern.fullmatch(answer)
            if found and found["inner"].strip():
                answer = found["inner"].strip()
    return answer


def _without_bold_ends(text: str) -> str:
    """``text`` without the bold an answer phrase opened or closed ("** 42" after "**Final Answer:**", "42**" after
    "**Final Answer: 42**"), before its final period too ("42**." is "42."): an unpaired ``**`` at its start or end;
    paired ones are left to :func:`_without_markup` ("**Alice** and **Bob**" stays)."""
    text = text.strip()
    period = "." if text.endswith(".") else ""
    text = text[: len(text) - len(period)].strip()
    if text.count("**") % 2:
        if text.endswith("**"):
            text = text[:-2]
        elif text.startswith("**"):
            text = text[2:]
    return text.strip() + period


def _phrase_readings(text: str) -> list[str]:
    """Readings of the answer after the last "the answer is" / "Answer:" in ``text``: the rest of its line (without
    the bold the phrase opened: "**Final Answer:** 42", "**Final Answer: 42**"), or, when the line ends there, the
    lines under it up to a blank line (a grid); then the math reward's reading of the same phrase's line, which ends
    at a sentence's end or a clause ("-4. I hope it is correct", "42, since 6*7=42")."""
    last = None
    for last in _ANSWER_PHRASE_RE.finditer(text):
        pass
    if last is None:
        return []
    line, _, below = text[last.end():].partition("\n")
    rest = _without_bold_ends(line)
    readings = [rest if rest else _without_bold_ends(_BLANK_LINE_RE.split(below.lstrip(" \t\n"), maxsplit=1)[0])]
    # the same phrase's line only: another phrase ("My answer is 8") would be a second answer, scored as the best
    sentence = extract_answer_phrase(text[last.start():last.end() + len(line)])
    return readings + ([sentence] if sentence else [])


def reasoning_gym_answer_readings(
    completion: str, *, strict: bool = False, keep_final_period: bool = False
) -> list[str]:
    """The model's answer in ``completion``, in the readings the reward scores (it keeps the best score; the first
    reading is :func:`extract_reasoning_gym_answer`'s): the content of the last ``<answer>...</answer>``, each opening
    tag closed by the first closing tag after it, as reasoning-gym's own ``extract_answer`` reads it
    (whitespace-stripped).

    Unless ``strict``, without such a tag, from the text after the last ``</think>`` (the whole text when there is
    none): the last ``\\boxed{}``; else the answer after the last "the answer is" / "Answer:" (the rest of its line, or
    the lines under it when the line ends there, and the phrase up to its sentence's end or a clause); else the last
    non-empty line; then the last ``\\boxed{}`` of the whole text. These are read without the markup wrapping the
    whole answer (``**42**``, ``$42$``, ``\\text{son}``) and without a final ``.`` (the sentence's), also with it when
    ``keep_final_period`` (the reference ends with one). Empty when there is nothing."""
    if not isinstance(completion, str):
        return []
    tagged = extract_answer_tag(completion, case_sensitive=True)
    if tagged is not None:
        return [tagged.strip()]
    if strict:
        return []
    closed = completion.rfind("</think>")
    after = completion[closed + len("</think>"):] if closed >= 0 else completion
    lines = [line for line in after.splitlines() if line.strip()]
    sources = [[extract_boxed(after)], _phrase_readings(after), [lines[-1] if lines else None]]
    if closed >= 0:
        sources.append([extract_boxed(completion)])
    for found in sources:
        readings: list[str] = []
        for reading in filter(None, found):
            answer = _without_markup(reading)
            if answer.endswith(".") and (keep_final_period or not answer.endswith("..")):
                readings.append(_without_markup(answer[:-1]))
            if keep_final_period or not answer.endswith(".") or answer.endswith(".."):
                readings.append(answer)
        readings = [reading for reading in dict.fromkeys(readings) if reading]
        if readings:
            return readings
    return []


def extract_reasoning_gym_answer(
    completion: str, *, strict: bool = False, keep_final_period: bool = False
) -> str | None:
    """The model's answer in ``completion``: the first of :func:`reasoning_gym_answer_readings`, None if there is
    nothing."""
    readings = reasoning_gym_answer_readings(completion, strict=strict, keep_final_period=keep_final_period)
    return readings[0] if readings else None


def reasoning_gym_records(
    task: str, *, size: int, seed: int, instruction: str | None = None, same_in_every_process: bool = False,
    **config: Any
) -> list[dict[str, Any]]:
    """Generate ``size`` records of a reasoning-gym task from ``seed``.

    Within one Python process the same seed gives the same records. Across processes it does for most tasks, but
    some generators iterate over sets of strings, whose order follows the process's string-hash seed (random per
    process unless ``PYTHONHASHSEED`` is set): in reasoning-gym 0.1.19 ransom_note, word_ladder, knight_swap,
    isomorphic_strings, list_functions and polynomial_multiplication write other questions in another process.
    ``same_in_every_process=True`` generates under the hash seed 0 (in a child Python, a few seconds, unless this
    process already runs with ``PYTHONHASHSEED=0``), so that the seed alone decides the records.

    Each record is ``{"prompt": question, "answer": reference answer (str, or None for tasks whose
    answers are checked without one), "meta": {"entry": entry, "task": task, "config": config}}`` (``config`` left out
    when no option is given), the entry in its
    JSON form (:func:`entry_to_json`) and the config's dataclasses (``composite``'s ``DatasetSpec``) as dicts, so that
    the records can be written to a data file as they are.
    ``instruction`` (e.g. :data:`REASONING_GYM_INSTRUCTION`) is appended to every prompt after a blank
    line. ``config`` holds further options of the task's config dataclass (difficulty ranges, ...).
    """
    import reasoning_gym

    _check_task(task)
    size = check_int(size, "size", minimum=1)
    seed = check_int(seed, "seed")
    if not isinstance(same_in_every_process, bool):
        raise TypeError(f"same_in_every_process must be True or False, got {same_in_every_process!r}")
    if same_in_every_process and sys.flags.hash_randomization:
        return _records_under_hash_seed_zero(task, size, seed, instruction, config)
    dataset = reasoning_gym.create_dataset(task, size=size, seed=seed, **_dataset_options(task, config))
    records = []
    for i in range(size):
        entry = dataset[i]
        prompt = entry["question"]
        if instruction:
            prompt = f"{prompt.rstrip()}\n\n{instruction}"
        answer = entry.get("answer")
        meta = {"entry": entry_to_json(entry), "task": task}
        if config:  # none: no empty mapping, which a Parquet file (verl's data) cannot hold
            meta["config"] = _config_as_data(config)
        records.append({"prompt": prompt, "answer": None if answer is None else str(answer), "meta": meta})
    return records


# what the child Python of _records_under_hash_seed_zero runs: arguments from a JSON file, records (or the error) into one
_CHILD_GENERATION = """
import json, sys
from entrorl.rewards.reasoning_gym import reasoning_gym_records
arguments = json.load(open(sys.argv[1], encoding="utf-8"))
try:
    result = {"records": reasoning_gym_records(**arguments.pop("config"), **arguments)}
except Exception as error:
    result = {"error": type(error).__name__, "message": str(error)}
with open(sys.argv[2], "w", encoding="utf-8") as handle:
    json.dump(result, handle)
"""


def _records_under_hash_seed_zero(task: str, size: int, seed: int, instruction: str | None,
                                  config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """:func:`reasoning_gym_records` run in a child Python with ``PYTHONHASHSEED=0`` and this process's import path, in
    a temporary folder; its errors raised again here, as the built-in exception they were (else a ``RuntimeError``
    naming it)."""
    with tempfile.TemporaryDirectory(prefix="entrorl-reasoning-gym-") as folder:
        arguments, result = Path(folder) / "arguments.json", Path(folder) / "result.json"
        arguments.write_text(json.dumps({"task": task, "size": size, "seed": seed, "instruction": instruction,
                                         "config": _config_as_data(dict(config))}), encoding="utf-8")
        # this process's import path, absolute, and where entrorl itself was imported from; run in the temporary
        # folder, so that a file of the working directory named like a module (a reasoning_gym.py) shadows nothing
        package_root = str(Path(__file__).resolve().parents[2])
        paths = [os.path.abspath(path) for path in sys.path if path] + [package_root]
        environment = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
        child = subprocess.run([sys.executable, "-c", _CHILD_GENERATION, str(arguments), str(result)],
                               env=environment, cwd=folder, capture_output=True, text=True, check=False)
        if child.returncode != 0 or not result.is_file():
            raise RuntimeError(f"generating reasoning-gym's {task!r} under PYTHONHASHSEED=0 in a child Python failed "
                               f"(exit {child.returncode}): {child.stderr.strip()[-2000:]}")
        outcome = json.loads(result.read_text(encoding="utf-8"))
    if "error" in outcome:
        kind = getattr(builtins, outcome["error"], None)
        if not (isinstance(kind, type) and issubclass(kind, Exception)) or kind is KeyError:
            raise RuntimeError(f"{outcome['error']}: {outcome['message']}")
        raise kind(outcome["message"])
    return outcome["records"]


def _config_as_data(value: Any) -> Any:
    """A task's options as JSON holds them: ``composite``'s ``DatasetSpec`` objects as dicts of their fields."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _config_as_data(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {key: _config_as_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_config_as_data(item) for item in value]
    return value


def _dataset_options(task: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` as ``reasoning_gym.create_dataset`` takes it: ``composite``'s datasets, read from a file as dicts,
    made ``DatasetSpec`` objects again."""
    options = dict(config)
    if task == "composite" and isinstance(options.get("datasets"), list):
        from reasoning_gym.composite import DatasetSpec

        options["datasets"] = [DatasetSpec(**spec) if isinstance(spec, Mapping) else spec for spec in options["datasets"]]
    return options


def _without_empty_options(task: str, config: Mapping[str, Any]) -> Mapping[str, Any]:
    """``config`` read from data without the empty (None) options that ``task``'s config does not take as None: a
    Parquet file (verl's data) gives each row every option name any row has, those it lacks as None, its own task's
    included. An option whose default is None keeps its None."""
    from reasoning_gym.factory import DATASETS

    config_class = DATASETS.get(task, (None, None))[1]
    if config_class is None or not dataclasses.is_dataclass(config_class):
        return config
    none_by_default = {field.name for field in dataclasses.fields(config_class) if field.default is None}
    return {key: value for key, value in config.items() if value is not None or key in none_by_default}


#: an answer no task can be right with, to check that a task's verifier tells answers apart
NONSENSE_ANSWER = "entrorl: not an answer"


def verifier_accepts_nonsense(task: str, records: list[dict[str, Any]], *, probes: int = 5) -> bool:
    """Whether the task's verifier gives full marks to :data:`NONSENSE_ANSWER` on every one of the first ``probes``
    records (as :func:`reasoning_gym_records` makes them): such a reward says nothing about the model's answers
    (``game_of_life_halting`` in reasoning-gym 0.1.25 scores any answer 1.0)."""
    reward = ReasoningGymReward(task)
    checked = records[:probes]
    return bool(checked) and all(
        reward(record["prompt"], f"{_TAG_OPEN}{NONSENSE_ANSWER}{_TAG_CLOSE}", record["answer"], **record["meta"]) >= 1.0
        for record in checked
    )


def _validate_reasoning_gym(
    task: str | None = None, *, strict: bool = False, config: Mapping[str, Any] | None = None
) -> None:
    if task is not None:
        _check_task(task)
    if not isinstance(strict, bool):
        raise ValueError(f"strict must be a bool, got {strict!r}")
    if config is not None and not isinstance(config, Mapping):
        raise ValueError(f"config must be a mapping, got {type(config).__name__}")


@register_reward(
    "reasoning_gym",
    description="reasoning-gym task verifier (option task=<dataset name>); the record's entry must be in "
    "meta['entry']; the answer is read from <answer></answer> tags",
    factory=True,
    validate=_validate_reasoning_gym,
)
class ReasoningGymReward:
    """The ``reasoning_gym`` reward: ``score_answer(extracted answer, meta["entry"])`` of the task.

    ``task`` — the dataset name; ``None`` reads it from ``meta["task"]`` (mixed-task data). A record
    whose ``meta["task"]`` differs from ``task`` raises (the runner counts it as an error).
    ``strict`` — only ``<answer>`` tags count (as in reasoning-gym's own evaluation).
    ``config`` — the task config the records were generated with (default: ``meta["config"]``, a mapping or its JSON
    text, as ``meta["entry"]`` may be).

    A completion with no extractable answer scores 0.0; so does an answer the verifier chokes on.
    A missing or malformed entry raises ``ValueError``. Data laid out as verl's (the entry, task and config inside
    an ``extra_info`` object) is read from there.

    Only full marks count as correct (``correct_threshold = 1.0``, for accuracy, Pass@k and dynamic sampling):
    several verifiers give a wrong answer partial credit, e.g. ``len(reference) / len(answer)`` = 0.5 for
    ``33`` against ``3``. The training reward keeps the partial credit.
    """

    correct_threshold = 1.0

    def __init__(
        self, task: str | None = None, *, strict: bool = False, config: Mapping[str, Any] | None = None
    ) -> None:
        _validate_reasoning_gym(task, strict=strict, config=config)
        self.task = task
        self.strict = strict
        self.config = dict(config) if config is not None else None
        self._scorers: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self.__name__ = f"reasoning_gym[{task}]" if task else "reasoning_gym"
        if task is not None:
            self._scorer(task, self.config or {})  # fail now on a bad config, not mid-run

    def __repr__(self) -> str:
        return f"ReasoningGymReward(task={self.task!r}, strict={self.strict}, config={self.config})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_scorers"] = {}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _scorer(self, task: str, config: Mapping[str, Any]) -> Any:
        key = (task, repr(sorted(_config_as_data(config).items())))
        with self._lock:
            dataset = self._scorers.get(key)
            if dataset is None:
                import reasoning_gym

                dataset = reasoning_gym.create_dataset(task, size=1, seed=0, **_dataset_options(task, config))
                self._scorers[key] = dataset
        return dataset

    def __call__(self, prompt: str, completion: str, answer: str | None, /, **meta: Any) -> float:
        if "entry" not in meta and isinstance(meta.get("extra_info"), Mapping):  # verl's layout of the same data
            meta = {**meta, **meta["extra_info"]}
        entry = meta.get("entry")
        if isinstance(entry, str):
            entry = json.loads(entry)
        if isinstance(entry, Mapping):
            entry = entry_from_json(entry)
        if not isinstance(entry, Mapping):
            raise ValueError(
                "the reasoning_gym reward needs the reasoning-gym entry dict in meta['entry']: the data needs an "
                "'entry' column (`entrorl data reasoning-gym TASK` writes such a file; reasoning_gym_records puts it "
                "in each record's meta)"
            )
        meta_task = meta.get("task")
        task = self.task or meta_task
        if task is None:
            source = (entry.get("metadata") or {}).get("source_dataset")
            task = source if isinstance(source, str) else None
        if task is None:
            raise ValueError("reasoning_gym reward without a task needs meta['task']")
        if self.task is not None and meta_task is not None and meta_task != self.task:
            raise ValueError(f"record is from reasoning-gym task {meta_task!r} but the reward scores {self.task!r}")
        config = self.config if self.config is not None else (meta.get("config") or {})
        if isinstance(config, str):  # a column written as JSON text (a CSV file, a converted table)
            config = json.loads(config)
        if not isinstance(config, Mapping):
            raise ValueError(f"meta['config'] must be a mapping of the task's options, got {type(config).__name__}")
        scorer = self._scorer(task, _without_empty_options(task, config) if self.config is None else config)

        reference = entry.get("answer")
        keep_final_period = isinstance(reference, str) and reference.rstrip().endswith(".")
        best, choked = 0.0, False
        for predicted in reasoning_gym_answer_readings(completion, strict=self.strict,
                                                       keep_final_period=keep_final_period):
            try:
                # in [0, 1] as documented: a verifier's float sum can pass 1 (spell_backward: nine 1/9 make
                # 1.0000000000000002)
                best = max(best, min(max(float(scorer.score_answer(predicted, dict(entry))), 0.0), 1.0))
            except Exception:
                choked = True
        if choked and best == 0.0:
            # The verifier failed on the model's answer: 0 -- unless it also fails on the reference,
            # which means the entry itself is broken (then the error must surface).
            scorer.score_answer(reference, dict(entry))
        return best
