"""Reward-model and LLM-as-judge rewards, batched, time-limited and cached (the ``judge`` reward).

A *judge* scores a list of samples at once::

    judge(samples: list[tuple[prompt, completion, answer]]) -> list[float]

It is either any such callable (an API client, a rule, a remote service) or a local Hugging Face model
directory, loaded with :func:`load_model_judge`:

* a **reward model** (``config.json`` names a ``*ForSequenceClassification`` architecture): the input is
  the prompt and completion (through the tokenizer's chat template when it has one, else
  ``prompt + completion``); the score is the logit when the head has one label, else the softmax
  probability of the last label (or of ``label``);
* a **causal LM asked a yes/no question**: ``template`` is filled with the prompt, completion and
  reference answer, and the score is ``P(yes) / (P(yes) + P(no)) = sigmoid(log P(yes) - log P(no))``,
  where ``P(yes)`` is the model's probability of the whole continuation ``yes`` after the question
  (teacher-forced, so multi-token answers are scored exactly). This is the "P(yes)" scoring of
  generative verifiers (e.g. GenRM, arXiv 2408.15240).

:class:`JudgeReward` wraps a judge for training:

* **batching** — :meth:`JudgeReward.score_batch` sends the distinct, uncached samples of a batch to the
  judge in chunks of ``batch_size``;
* **timeout** — each chunk's call runs in a worker thread; if it takes longer than ``timeout_s`` its
  samples score 0 with the reason ``"judge timeout"`` and the run continues (Python cannot stop a thread:
  the late call finishes in the background and its result is discarded). A call that raises or returns
  malformed scores gives its samples 0 with the reason ``"judge error: ..."``. Either way the scores are marked
  failed, so the reward runner counts them as a reward that raised (``reward/errors``, ``reward_errors.log``, the
  trainer's stop after ``reward.max_failing_steps``); a judge may return booleans (1 / 0);
* **cache** — scores are kept in an in-memory LRU of ``cache_size`` entries and, with ``cache_path``, in
  an SQLite file shared across runs, keyed by the SHA-256 of ``(judge_id, prompt, completion, answer)``.
  Timeouts and errors are never cached.

Called on one sample (``reward(prompt, completion, answer, **meta)``) it returns a :class:`JudgeScore`
(``.score``, ``.reason``), so it works wherever a reward function does; a runner that finds
``score_batch`` should call it once per batch instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import itertools
import json
import logging
import math
import numbers
import os
import sqlite3
import string
import threading
import time
import traceback
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from entrorl._checks import check_int, is_real_number
from entrorl.modeling import encode_prompt, left_pad, logits_to_keep
from entrorl.rewards.base import import_callable, register_reward

__all__ = [
    "DEFAULT_JUDGE_TEMPLATE",
    "JUDGE_TIMEOUT_REASON",
    "CausalLMJudge",
    "JudgeCache",
    "JudgeFn",
    "JudgeReward",
    "JudgeScore",
    "RewardModelJudge",
    "check_judge_options",
    "load_model_judge",
]

logger = logging.getLogger(__name__)

Sample = tuple[str, str, "str | None"]
JudgeFn = Callable[[list[Sample]], Sequence[float]]

JUDGE_TIMEOUT_REASON = "judge timeout"

DEFAULT_JUDGE_TEMPLATE = (
    "Question:\n{prompt}\n\nReference answer:\n{answer}\n\nResponse:\n{completion}\n\n"
    "Is the response a correct answer to the question? Answer yes or no.\nAnswer:"
)


@dataclass(frozen=True)
class JudgeScore:
    """The judge's score of one sample; ``reason`` says why it is not a judged score (timeout, error), and then
    ``failed`` is True: :class:`~entrorl.rewards.RewardRunner` counts the sample as a failed reward (``reward/errors``,
    the first one in ``reward_errors.log``, with ``details``: the judge's traceback when it raised), as it does a reward
    that raises."""

    score: float
    reason: str | None = None
    failed: bool = False
    details: str | None = field(default=None, compare=False, repr=False)


# --------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------


_SQLITE_WAIT_S = 30.0  # how long a process waits for another that holds the judge cache's SQLite file


class JudgeCache:
    """Scores by sample key: an in-memory LRU of ``max_entries`` (0 = none) in front of an optional
    SQLite file ``path`` (table ``judge_scores(key, score)``, created if missing).

    ``hits`` / ``misses`` count :meth:`get` lookups (a disk hit is a hit and refreshes the LRU). Processes that share
    the file wait up to :data:`_SQLITE_WAIT_S` for one another; a file that cannot be opened is a ``ValueError`` naming
    it, and one that fails later (held longer by another process) is passed by for the next :data:`_SQLITE_WAIT_S`, with
    a warning the first time: the judge scores on, its scores are kept in memory only (not at all with ``max_entries``
    0) until the file is tried again.
    """

    def __init__(self, max_entries: int = 4096, path: str | Path | None = None) -> None:
        self.max_entries = check_int(max_entries, "cache_size", minimum=0)
        self.path = Path(path).expanduser() if path is not None else None
        self.hits = 0
        self.misses = 0
        self._memory: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._warned = False
        self._passed_by_until = -math.inf  # after a failure the file is left alone until then (time.monotonic)
        # a file this process may not write (or whose writes fail as read-only) is still read: its scores are not
        # judged again
        self._writable = True
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writable = not self.path.exists() or os.access(self.path, os.W_OK)
            try:
                if self._writable:
                    self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=_SQLITE_WAIT_S)
                    self._db.execute("CREATE TABLE IF NOT EXISTS judge_scores (key TEXT PRIMARY KEY, score REAL NOT NULL)")
                    self._db.commit()
                else:
                    self._db = self._open_read_only()
                    self._say_read_only("this process may not write it")
            except sqlite3.Error as error:
                if self._db is not None:
                    self._db.close()
                raise ValueError(f"judge cache_path {self.path} cannot be used: {error} (a file that is not a SQLite "
                                 f"database, or one another process held for over {_SQLITE_WAIT_S:g} s)") from None

    @staticmethod
    def key(judge_id: str, prompt: str, completion: str, answer: str | None) -> str:
        """SHA-256 hex digest of the JSON list ``[judge_id, prompt, completion, answer]``."""
        payload = json.dumps([judge_id, prompt, completion, answer], ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()  # text with a lone surrogate too

    def __len__(self) -> int:
        return len(self._memory)

    def _remember(self, key: str, score: float) -> None:
        if self.max_entries == 0:
            return
        self._memory[key] = score
        self._memory.move_to_end(key)
        while len(self._memory) > self.max_entries:
            self._memory.popitem(last=False)

    def get(self, key: str) -> float | None:
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                self.hits += 1
                return self._memory[key]
            if self._db is not None and self._file_in_use():
                row = self._on_disk(lambda db: db.execute("SELECT score FROM judge_scores WHERE key = ?",
                                                          (key,)).fetchone())
                if row is not None:
                    self.hits += 1
                    self._remember(key, float(row[0]))
                    return float(row[0])
            self.misses += 1
            return None

    def put_many(self, items: Mapping[str, float]) -> None:
        with self._lock:
            for key, score in items.items():
                self._remember(key, score)
            if self._db is not None and items and self._writable and self._file_in_use():
                self._on_disk(lambda db: (db.executemany("INSERT OR REPLACE INTO judge_scores (key, score) VALUES (?, ?)",
                                                         list(items.items())), db.commit()))

    def _file_in_use(self) -> bool:
        """Whether lookups and writes go to the SQLite file now: not for :data:`_SQLITE_WAIT_S` after it failed, so
        that a file another process holds costs one wait, not one per sample."""
        return time.monotonic() >= self._passed_by_until

    def _on_disk(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        """``work`` on the SQLite file; None, with a warning the first time, when the file fails (held by another
        process for over :data:`_SQLITE_WAIT_S`): the cache is then memory only for the next :data:`_SQLITE_WAIT_S`,
        after which the file is tried again."""
        assert self._db is not None
        try:
            return work(self._db)
        except sqlite3.Error as error:
            with contextlib.suppress(sqlite3.Error):
                self._db.rollback()
            if _is_read_only(error):  # only writing fails: read on
                self._writable = False
                self._say_read_only(str(error))
                return None
            self._passed_by_until = time.monotonic() + _SQLITE_WAIT_S
            if not self._warned:
                self._warned = True
                kept = " and kept in memory" if self.max_entries else ""  # cache_size 0 keeps none
                logger.warning("judge cache %s: %s; the scores go on being judged%s", self.path, error, kept)
            return None

    def _open_read_only(self) -> sqlite3.Connection:
        """The file, read only; as unchanging when SQLite cannot read it otherwise (a database in WAL mode, in a folder
        this process may not write, needs a shared-memory file beside it that it cannot create)."""
        uri = self.path.resolve().as_uri()
        try:
            return self._readable_connection(f"{uri}?mode=ro")
        except sqlite3.OperationalError as error:
            if not _is_read_only(error):
                raise
        return self._readable_connection(f"{uri}?mode=ro&immutable=1")

    @staticmethod
    def _readable_connection(uri: str) -> sqlite3.Connection:
        """A connection to ``uri`` whose scores table could be read (closed again when it could not)."""
        db = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=_SQLITE_WAIT_S)
        try:
            db.execute("SELECT score FROM judge_scores LIMIT 1").fetchall()
        except sqlite3.Error:
            db.close()
            raise
        return db

    def _say_read_only(self, why: str) -> None:
        kept = "kept in memory only" if self.max_entries else "not kept"  # cache_size 0 keeps none
        logger.warning("judge cache %s is read-only (%s): its scores are read, new ones are %s", self.path, why, kept)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


# --------------------------------------------------------------------------------------------
# local model judges
# --------------------------------------------------------------------------------------------


def _fill(template: str, prompt: str, completion: str, answer: str | None) -> str:
    return template.format(prompt=prompt, completion=completion, answer="(none)" if answer is None else answer)


def _check_template(template: Any) -> str:
    if not isinstance(template, str):
        raise ValueError(f"template must be a string, got {type(template).__name__}")
    try:
        template.format(prompt="", completion="", answer="")
    except (KeyError, IndexError, ValueError, AttributeError) as error:
        raise ValueError(
            f"template may only use the fields {{prompt}}, {{completion}} and {{answer}} (double other braces): {error!r}"
        ) from None
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    if "completion" not in fields:  # ("{{completion}}" is the text "{completion}": the judge would not see it)
        raise ValueError("template must contain the field '{completion}'" + (
            " ('{{completion}}' is the text '{completion}' once filled in)" if "{{completion}}" in template else ""))
    return template


_YES_NO_SCORING = 2  # 2: one cut of a long question for both answers


class CausalLMJudge:
    """A causal LM asked ``template`` and scored ``P(yes) / (P(yes) + P(no))`` (see the module docstring).

    ``yes`` / ``no`` are the answer continuations (default ``" yes"`` / ``" no"``), encoded without
    special tokens and appended to the encoded question; a question longer than ``max_length`` minus the longer
    answer keeps its last tokens (one cut for both, so that both are scored after the same question). Scores are in
    (0, 1).
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        template: str = DEFAULT_JUDGE_TEMPLATE,
        yes: str = " yes",
        no: str = " no",
        max_length: int | None = None,
        device: str = "cpu",
    ) -> None:
        from transformers import AutoModelForCausalLM

        from entrorl.modeling import load_tokenizer, quiet_progress_bars

        self.directory = Path(directory)
        self.template = _check_template(template)
        self.tokenizer = load_tokenizer(self.directory)
        with quiet_progress_bars():
            self.model = AutoModelForCausalLM.from_pretrained(self.directory, dtype=torch.float32, local_files_only=True)
        self.model = self.model.to(device).eval()
        self.device = torch.device(device)
        self.yes_ids = self.tokenizer(yes, add_special_tokens=False)["input_ids"]
        self.no_ids = self.tokenizer(no, add_special_tokens=False)["input_ids"]
        if not self.yes_ids or not self.no_ids or self.yes_ids == self.no_ids:
            raise ValueError(f"yes={yes!r} and no={no!r} must encode to different, non-empty token sequences")
        if not encode_prompt(self.tokenizer, _fill(self.template, "", "", "")):
            raise ValueError(f"template {template!r} encodes to no token when its fields are empty (an empty completion), "
                             "and the tokenizer starts a text with none (no BOS): the answers' first token would have "
                             "nothing to follow; put fixed text in the template (an instruction, a question)")
        self.max_length = max_length or int(getattr(self.model.config, "max_position_embeddings", 4096))
        if self.max_length <= max(len(self.yes_ids), len(self.no_ids)):
            raise ValueError(f"max_length {self.max_length} leaves no room for the question")
        self.pad_id = self.tokenizer.pad_token_id
        # the scoring's version is part of the key, so that a cache file never serves a score computed another way
        digest = hashlib.sha256(json.dumps([template, yes, no, self.max_length, _YES_NO_SCORING]).encode()).hexdigest()[:16]
        self.judge_id = f"yes-no:{self.directory.resolve()}:{digest}"

    @torch.no_grad()
    def __call__(self, samples: list[Sample]) -> list[float]:
        if not samples:
            return []
        sequences, answer_lengths = [], []
        room = self.max_length - max(len(self.yes_ids), len(self.no_ids))  # one cut, so both answers follow one question
        for prompt, completion, answer in samples:
            kept = encode_prompt(self.tokenizer, _fill(self.template, prompt, completion, answer))[-room:]
            for continuation in (self.yes_ids, self.no_ids):
                sequences.append(kept + continuation)
                answer_lengths.append(len(continuation))
        # Left padding puts every answer at the end of its row, so only the last `keep` logits are needed
        # (the position before the answer and the answer's own positions): memory O(rows x keep x vocab).
        keep = max(answer_lengths) + 1
        ids, mask = left_pad(sequences, self.pad_id)
        mask, width = mask.long(), ids.shape[1]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=positions.to(self.device),
                            **logits_to_keep(self.model, keep)).logits[:, -keep:].float().cpu()
        # logits[:, j] sits at position width - keep + j and predicts the token after it
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, width - keep + 1 :, None]).squeeze(-1)
        totals = torch.stack([log_probs[row, keep - 1 - n :].sum() for row, n in enumerate(answer_lengths)])
        return torch.sigmoid(totals[0::2] - totals[1::2]).tolist()


_NO_PAD_ID_ATTRIBUTE = object()  # a composite configuration may have no pad id of its own (Gemma 3's)


class RewardModelJudge:
    """A sequence-classification reward model; the score is the logit (one label) or the softmax
    probability of ``label`` (default: the last label). Input: the tokenizer's chat template over
    ``[user: prompt, assistant: completion]`` when it has one, else ``prompt + completion``. An input longer than
    ``max_length`` tokens keeps its last ``max_length``: the end of the completion, where the answer is (as the
    yes/no judge keeps the end of its question)."""

    def __init__(self, directory: str | Path, *, label: int | None = None, max_length: int | None = None, device: str = "cpu"):
        from transformers import AutoModelForSequenceClassification

        from entrorl.modeling import load_tokenizer, quiet_progress_bars

        self.directory = Path(directory)
        self.tokenizer = load_tokenizer(self.directory)
        self.tokenizer.truncation_side = "left"
        with quiet_progress_bars():
            self.model = AutoModelForSequenceClassification.from_pretrained(self.directory, dtype=torch.float32,
                                                                            local_files_only=True)
        self.model = self.model.to(device).eval()
        self._pooling_lock = threading.Lock()
        self.device = torch.device(device)
        n_labels = int(self.model.config.num_labels)
        if label is not None and not (isinstance(label, int) and not isinstance(label, bool) and 0 <= label < n_labels):
            raise ValueError(f"label must be an integer in [0, {n_labels}), got {label!r}")
        self.label = label if label is not None else n_labels - 1
        self.n_labels = n_labels
        self.max_length = max_length or int(getattr(self.model.config, "max_position_embeddings", 4096))
        # the cache key names how inputs are cut and pooled, so that scores cached when they were cut from the right,
        # or pooled before a final EOS or after left padding, are not reused
        self.judge_id = f"reward-model:{self.directory.resolve()}:{self.label}:{self.max_length}:keep-end:own-last-token"

    @torch.no_grad()
    def __call__(self, samples: list[Sample]) -> list[float]:
        if not samples:
            return []
        chat = bool(getattr(self.tokenizer, "chat_template", None))
        if chat:  # the template writes the special tokens itself
            texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                                                        tokenize=False) for prompt, completion, _ in samples]
        else:
            texts = [prompt + completion for prompt, completion, _ in samples]
        rows = self.tokenizer(texts, truncation=True, max_length=self.max_length, add_special_tokens=not chat)["input_ids"]
        pad_id = self._pad_id_outside(rows)
        if pad_id is None:  # the rows use every id of the vocabulary: one at a time, unpadded
            logits = torch.cat([self._pooled_logits([row], None) for row in rows])
        else:
            logits = self._pooled_logits(rows, pad_id)
        if self.n_labels == 1:
            return logits[:, 0].tolist()
        return torch.softmax(logits, dim=-1)[:, self.label].tolist()

    def _pooled_logits(self, rows: list[list[int]], pad_id: int | None) -> torch.Tensor:
        """The head's logits for ``rows``, each at its own last token. The head pools each row's last token that is
        not the configured pad id: rows padded on the right (their positions as when scored alone) with ``pad_id``,
        an id none of them contains, end at their own last token, an EOS the tokenizer also pads with included.
        ``pad_id`` None: one row, unpadded, pooled at its last token."""
        width = max(len(row) for row in rows)
        ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        # a head reads the pad id from the model's configuration or from its text part's (a composite model's)
        configs = list({id(config): config for config in (self.model.config, self.model.config.get_text_config())}.values())
        with self._pooling_lock:  # a timed-out call still running in its thread must not see this call's pad id
            configured = [getattr(config, "pad_token_id", _NO_PAD_ID_ATTRIBUTE) for config in configs]
            try:
                for config in configs:
                    config.pad_token_id = pad_id
                return self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.float()
            finally:
                for config, value in zip(configs, configured):
                    if value is _NO_PAD_ID_ATTRIBUTE:
                        del config.pad_token_id
                    else:
                        config.pad_token_id = value

    def _pad_id_outside(self, rows: list[list[int]]) -> int | None:
        """A token id of the vocabulary that none of ``rows`` contains: the tokenizer's pad id when it is free, else
        the smallest free id; None when they use every id."""
        used = {token for row in rows for token in row}
        preferred = self.tokenizer.pad_token_id
        if preferred is not None and preferred not in used:
            return preferred
        vocabulary = self.model.get_input_embeddings().num_embeddings
        return next((token for token in range(min(len(used) + 1, vocabulary)) if token not in used), None)


_MODEL_KINDS = ("auto", "reward_model", "yes_no")


def load_model_judge(directory: str | Path, *, kind: str = "auto", **options: Any) -> CausalLMJudge | RewardModelJudge:
    """A judge from a local model directory: ``kind="reward_model"`` (:class:`RewardModelJudge`),
    ``"yes_no"`` (:class:`CausalLMJudge`), or ``"auto"`` (a reward model when ``config.json`` names a
    ``*ForSequenceClassification`` architecture). ``options`` go to the judge class."""
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{directory} is not a model directory (no config.json)")
    if kind not in _MODEL_KINDS:
        raise ValueError(f"kind must be one of {_MODEL_KINDS}, got {kind!r}")
    if kind == "auto":
        architectures = json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or []
        kind = "reward_model" if any(a.endswith("ForSequenceClassification") for a in architectures) else "yes_no"
    if kind == "reward_model":
        unknown = set(options) - {"label", "max_length", "device"}
        if unknown:
            raise ValueError(f"option(s) {sorted(unknown)} do not apply to a reward-model judge")
        return RewardModelJudge(directory, **options)
    if "label" in options:
        raise ValueError("option 'label' applies to reward-model judges only")
    return CausalLMJudge(directory, **options)


# --------------------------------------------------------------------------------------------
# the reward
# --------------------------------------------------------------------------------------------


class _JudgeTimeout(Exception):
    pass


def _is_read_only(error: sqlite3.Error) -> bool:
    """Whether SQLite refused a write to a read-only database (its error code, else its message)."""
    code = getattr(error, "sqlite_errorcode", None)
    return (code is not None and code & 0xFF == sqlite3.SQLITE_READONLY) or (
        "readonly" in str(error).replace("-", "").replace(" ", "").lower())


def _judge_scores(judge: JudgeFn, samples: list[Sample], timeout_s: float | None) -> list[float]:
    """The judge's scores of ``samples``, within ``timeout_s`` (``_JudgeTimeout`` past it): the call and the reading of
    what it returns, which a judge returning a generator or ``map`` does lazily."""
    if timeout_s is None:
        return _scores_of(judge(samples), len(samples))
    outcome: dict[str, Any] = {}
    finished = threading.Event()

    def run() -> None:
        try:
            outcome["value"] = _scores_of(judge(samples), len(samples))
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = error
        finally:
            finished.set()

    # A daemon thread: a judge that never returns must not keep the interpreter alive at exit.
    threading.Thread(target=run, name="entrorl-judge", daemon=True).start()
    if not finished.wait(timeout_s):
        raise _JudgeTimeout
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _scores_of(value: Any, expected: int) -> list[float]:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().reshape(-1).tolist()
    if isinstance(value, (Mapping, str, bytes, set, frozenset)):  # iterable, but their items are no scores in order
        raise ValueError(f"returned a {type(value).__name__}, not a list of {expected} scores")
    lazy = not hasattr(value, "__len__")  # a generator, map, ...: read no further than one score too many
    try:
        scores = list(itertools.islice(value, expected + 1) if lazy else value)
    except TypeError:
        raise ValueError(f"returned {type(value).__name__}, not a list of {expected} scores") from None
    if lazy and len(scores) > expected:
        raise ValueError(f"returned more than {expected} scores for {expected} samples")
    if len(scores) != expected:
        raise ValueError(f"returned {len(scores)} scores for {expected} samples")
    out = []
    for score in scores:
        if hasattr(score, "item") and not isinstance(score, numbers.Real):
            score = score.item()
        if not isinstance(score, numbers.Real) or not math.isfinite(score):  # a bool is a verdict: 1 or 0
            raise ValueError(f"returned {score!r}, not a finite number")
        out.append(float(score))
    return out


_MODEL_OPTIONS = ("kind", "template", "yes", "no", "label", "max_length", "device")


def check_judge_options(
    judge: JudgeFn | str,
    *,
    judge_id: str | None = None,
    batch_size: int = 8,
    timeout_s: float | None = None,
    cache_size: int = 4096,
    cache_path: str | None = None,
    **model_options: Any,
) -> None:
    """Validate the options of :class:`JudgeReward` without loading a model or calling the judge.
    Raises ``ValueError`` naming the bad option."""
    check_int(batch_size, "batch_size", minimum=1)
    if timeout_s is not None and (
        not is_real_number(timeout_s) or not timeout_s > 0 or not math.isfinite(timeout_s)
    ):
        raise ValueError(f"timeout_s must be a positive number of seconds or None, got {timeout_s!r}")
    check_int(cache_size, "cache_size", minimum=0)
    if cache_path is not None and (not isinstance(cache_path, (str, os.PathLike)) or not str(cache_path).strip()):
        raise ValueError(f"cache_path must be the path of a SQLite file or None, got {cache_path!r}")
    if judge_id is not None and (not isinstance(judge_id, str) or not judge_id):
        raise ValueError(f"judge_id must be a non-empty string, got {judge_id!r}")
    unknown = set(model_options) - set(_MODEL_OPTIONS)
    if unknown:
        raise ValueError(f"unknown judge option(s) {sorted(unknown)}; the judge's options: judge, judge_id, batch_size, "
                         f"timeout_s, cache_size, cache_path and, for a model directory, {', '.join(_MODEL_OPTIONS)}")
    if callable(judge):
        if model_options:
            raise ValueError(f"option(s) {sorted(model_options)} apply to a model directory judge, not to a callable")
        return
    if not isinstance(judge, str) or not judge.strip():
        raise ValueError(f"judge must be a callable, a model directory or 'package.module:callable', got {judge!r}")
    directory = Path(judge).expanduser()
    if directory.is_dir():
        if not (directory / "config.json").is_file():
            raise ValueError(f"judge {judge!r} is not a model directory (no config.json)")
        if model_options.get("kind", "auto") not in _MODEL_KINDS:
            raise ValueError(f"kind must be one of {_MODEL_KINDS}, got {model_options['kind']!r}")
        if "template" in model_options:
            _check_template(model_options["template"])
        if "max_length" in model_options and model_options["max_length"] is not None:
            check_int(model_options["max_length"], "max_length", minimum=1)
        return
    if ":" not in judge:
        raise ValueError(f"judge {judge!r} is neither an existing model directory nor an import path 'package.module:callable'")
    if model_options:
        raise ValueError(f"option(s) {sorted(model_options)} apply to a model directory judge, not to an imported callable")
    import_callable(judge, "judge")


def _callable_id(judge: Any) -> str:
    name = getattr(judge, "__qualname__", None) or type(judge).__qualname__
    return f"callable:{getattr(judge, '__module__', None) or type(judge).__module__}.{name}"


def _shared_id_reason(judge: Any) -> str | None:
    """Why :func:`_callable_id` of ``judge`` may be another judge's too, or ``None``: a lambda, a function made inside
    another around that call's values (they are not in the name), an instance of a callable class, a method bound to
    one, or a ``functools.partial`` (their settings are not in the type's name)."""
    name = getattr(judge, "__qualname__", None)
    if name is None:
        return f"it is a {type(judge).__qualname__} object, named by its type whatever its settings"
    if "<lambda>" in name:
        return "it is a lambda, and every lambda of its module gets that name"
    if inspect.ismethod(judge) and not isinstance(judge.__self__, type):
        return f"it is a method of a {type(judge.__self__).__qualname__} object, named by its class whatever the object's settings"
    if "<locals>" in name and getattr(judge, "__closure__", None):
        return "it is made inside a function from that call's values, and each one made there gets that name"
    return None


@register_reward(
    "judge",
    description="reward model / LLM-as-judge (local HF model or callable): batched, time-limited, cached",
    factory=True,
    validate=check_judge_options,
)
class JudgeReward:
    """A judge as a reward: batched, time-limited and cached (see the module docstring).

    ``judge`` is a callable ``judge(list of (prompt, completion, answer)) -> list of float``, an import
    path ``"package.module:callable"`` to one, or a local model directory (:func:`load_model_judge`,
    configured by ``kind``, ``template``, ``yes``, ``no``, ``label``, ``max_length``, ``device``).
    ``judge_id`` names the judge in cache keys (default: the callable's qualified name or the model's
    path and settings); change it when the judge changes behind the same name. ``timeout_s = None``
    calls the judge in the caller's thread, without a limit. ``cache_size = 0`` turns the in-memory
    cache off; ``cache_path`` adds a persistent SQLite cache.
    """

    #: the options taken through ``**model_options`` (a model directory's), which the signature does not list
    extra_options = _MODEL_OPTIONS

    def __init__(
        self,
        judge: JudgeFn | str,
        *,
        judge_id: str | None = None,
        batch_size: int = 8,
        timeout_s: float | None = None,
        cache_size: int = 4096,
        cache_path: str | None = None,
        **model_options: Any,
    ) -> None:
        check_judge_options(judge, judge_id=judge_id, batch_size=batch_size, timeout_s=timeout_s,
                            cache_size=cache_size, cache_path=cache_path, **model_options)
        if isinstance(judge, str):
            directory = Path(judge).expanduser()
            judge = (load_model_judge(str(directory), **model_options) if directory.is_dir()
                     else import_callable(judge, "judge"))
        self.judge = judge
        self.judge_id = judge_id or getattr(judge, "judge_id", None) or _callable_id(judge)
        if cache_path is not None and judge_id is None and not hasattr(judge, "judge_id") and (why := _shared_id_reason(judge)):
            warnings.warn(f"the judge's cache id {self.judge_id!r} may be another judge's ({why}): scores that one cached "
                          f"in {cache_path} would be reused for this one; give judge_id= a name of its own", stacklevel=2)
        self.batch_size = batch_size
        self.timeout_s = None if timeout_s is None else float(timeout_s)
        self.cache = JudgeCache(cache_size, cache_path)
        self.judged = 0
        self.timeouts = 0
        self.errors = 0

    def __repr__(self) -> str:
        return f"JudgeReward(judge_id={self.judge_id!r}, batch_size={self.batch_size}, timeout_s={self.timeout_s})"

    def stats(self) -> dict[str, int]:
        """Counters since construction: cache ``hits`` / ``misses``, samples ``judged`` (sent to the
        judge), and samples lost to ``timeouts`` / ``errors``."""
        return {"hits": self.cache.hits, "misses": self.cache.misses, "judged": self.judged,
                "timeouts": self.timeouts, "errors": self.errors}

    def __call__(self, prompt: str, completion: str, answer: str | None = None, /, **meta: Any) -> JudgeScore:
        """One sample, through the cache and the timeout; ``meta`` is not used."""
        return self.score_batch([prompt], [completion], [answer])[0]

    def score_batch(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        answers: Sequence[str | None] | None = None,
        metas: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> list[JudgeScore]:
        """One :class:`JudgeScore` per sample. Cached samples are not re-judged; identical samples of
        the batch are judged once; the rest go to the judge in chunks of ``batch_size``. ``metas`` is
        accepted for the reward-runner interface and not used."""
        n = len(completions)
        answers = [None] * n if answers is None else list(answers)
        if len(prompts) != n or len(answers) != n or (metas is not None and len(metas) != n):
            raise ValueError(f"score_batch: prompts ({len(prompts)}), completions ({n}), answers ({len(answers)})"
                             f"{'' if metas is None else f' and metas ({len(metas)})'} must have the same length")
        results: list[JudgeScore | None] = [None] * n
        pending: dict[str, list[int]] = {}
        for i in range(n):
            key = JudgeCache.key(self.judge_id, prompts[i], completions[i], answers[i])
            if key in pending:
                pending[key].append(i)
                continue
            cached = self.cache.get(key)
            if cached is not None:
                results[i] = JudgeScore(cached)
            else:
                pending[key] = [i]
        keys = list(pending)
        for start in range(0, len(keys), self.batch_size):
            chunk = keys[start : start + self.batch_size]
            samples = [(prompts[pending[k][0]], completions[pending[k][0]], answers[pending[k][0]]) for k in chunk]
            outcome = self._judge_chunk(samples)
            if isinstance(outcome, JudgeScore):
                for key in chunk:
                    for i in pending[key]:
                        results[i] = outcome
                continue
            self.cache.put_many(dict(zip(chunk, outcome)))
            for key, score in zip(chunk, outcome):
                for i in pending[key]:
                    results[i] = JudgeScore(score)
        return results  # type: ignore[return-value]  # every index is filled above

    def _judge_chunk(self, samples: list[Sample]) -> list[float] | JudgeScore:
        """The chunk's scores, or the one failed :class:`JudgeScore` all its samples get."""
        self.judged += len(samples)
        try:
            return _judge_scores(self.judge, samples, self.timeout_s)
        except _JudgeTimeout:
            self.timeouts += len(samples)
            logger.warning("judge %s took longer than %.3g s on %d samples; scored 0", self.judge_id, self.timeout_s, len(samples))
            return JudgeScore(0.0, JUDGE_TIMEOUT_REASON, failed=True)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:  # noqa: BLE001 - a judge must never kill the run
            self.errors += len(samples)
            reason = f"judge error: {type(error).__name__}: {error}"
            logger.warning("judge %s failed on %d samples (scored 0): %s", self.judge_id, len(samples), reason)
            return JudgeScore(0.0, reason, failed=True, details=traceback.format_exc())
