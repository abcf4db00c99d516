"""Loading prompt data sets from files, and writing them back.

Supported inputs (chosen by extension, case-insensitive):

* ``.jsonl``   one JSON object per line; blank lines are skipped. Locations are ``file.jsonl:LINE``
               (1-based line numbers).
* ``.json``    a list of objects, or an object ``{"data": [...]}``. Locations are ``file.json[ROW]``
               (0-based row index). JSON Lines under a ``.json`` name (what ``Dataset.to_json`` and
               pandas' ``to_json(lines=True)`` write) is refused, asking for the name ``.jsonl``.
* ``.csv``     a header line, then one record per row (standard-library ``csv``; all values are
               strings, no type guessing). Locations are ``file.csv:LINE`` (1-based line where the
               record starts; quoted fields may span lines).
* ``.parquet`` read with ``pyarrow``. Locations are ``file.parquet[ROW]``.
* ``.arrow``   an Arrow IPC file or stream (as ``datasets`` writes its shards), read with ``pyarrow``.
               Locations are ``file.arrow[ROW]``.
* a directory written by ``datasets.Dataset.save_to_disk`` (read with ``datasets.load_from_disk``; a
  saved ``DatasetDict`` contributes its ``"train"`` split). Locations are ``dir[ROW]``. Here and in Parquet and
  Arrow files written by ``datasets`` (whose features they keep), an answer column (a top-level one, not a field
  within one) of ``ClassLabel`` gives the label's name, not its number.

Every malformed input raises :class:`~entrorl.data.records.DataError`, whose message names the file and
the line or row, says what is wrong and what was expected. ``pyarrow`` and ``datasets`` are imported
only when a Parquet or Arrow file or a saved data set is read.

Normalisation rules (the same for every format):

* the prompt must be a non-empty string (whitespace-only counts as empty); it is stored unchanged;
* the answer may be a string or a number (numbers become ``str(value)``, e.g. ``3.0 -> "3.0"``); a
  missing column, ``null``, ``NaN`` or an empty / whitespace-only string is a *missing* answer: an
  error when ``require_answer`` is true, ``None`` otherwise; booleans, lists and objects are rejected;
* a column named ``meta`` holding an object is spread into the meta fields (its keys must not repeat a
  column);
* meta values must be JSON-able: numpy scalars and arrays become Python values, dates and times
  become ISO strings, ``Decimal`` becomes a string, non-finite floats become ``None``; anything else
  (bytes, images, ...) is rejected — choose the columns with ``meta_columns``.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import decimal
import errno
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from entrorl._files import write_atomically, written_in_place
from entrorl.data.records import DataError, PromptRecord

__all__ = [
    "SUPPORTED_FORMATS",
    "answers_class_labels",
    "check_output_directory",
    "check_output_file",
    "class_labels_numbered",
    "load_prompts",
    "nested_floats_widened",
    "read_arrow_ipc",
    "write_jsonl",
]

SUPPORTED_FORMATS = (
    ".jsonl (one JSON object per line), .json (a list of objects or {\"data\": [...]}), .csv, "
    ".parquet, .arrow (Arrow IPC file or stream), or a directory written by datasets.Dataset.save_to_disk"
)

_BOM = b"\xef\xbb\xbf"

#: A column of this name holding an object is spread into the record's meta, so that records laid out as
#: ``{"prompt", "answer", "meta": {...}}`` (as :func:`entrorl.rewards.reasoning_gym_records` returns them) give
#: the reward the same keyword arguments as flat columns would.
NESTED_META_COLUMN = "meta"


@dataclass(frozen=True)
class _Columns:
    prompt: str
    answer: str
    meta: tuple[str, ...] | None
    require_answer: bool


# --------------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------------


def load_prompts(
    path: str | os.PathLike[str],
    *,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    meta_columns: Sequence[str] | None = None,
    require_answer: bool = True,
    split: str | None = "train",
) -> list[PromptRecord]:
    """Read a prompt data set into a list of :class:`PromptRecord` (in file order).

    ``meta_columns=None`` keeps every column other than the prompt and answer columns in ``meta``;
    a list keeps exactly those columns (each must exist, else :class:`DataError`). ``split``: the split of a saved
    ``DatasetDict`` that is read; None reads its only split and refuses one of several (held-out data must not
    become the training split without a word).

    Raises ``FileNotFoundError`` when ``path`` does not exist, :class:`DataError` for an unsupported
    format, malformed content or an empty data set, and ``TypeError`` / ``ValueError`` for bad
    arguments.
    """
    cols = _check_arguments(prompt_column, answer_column, meta_columns, require_answer)
    p = Path(os.fspath(path))
    if not p.exists():
        raise _NotFound(str(p), "prompt data")
    if p.is_dir():
        records = _load_saved_dataset(p, cols, split)
    else:
        suffix = p.suffix.lower()
        loader = _LOADERS.get(suffix)
        if loader is None:
            kind = f"extension {suffix!r}" if suffix else "no extension"
            raise DataError(
                f"{p}: unsupported prompt data format ({kind}); expected one of: {SUPPORTED_FORMATS}",
                path=str(p),
            )
        records = loader(p, cols)
    if not records:
        raise DataError(
            f"{p}: empty data set (no records); expected at least one prompt", path=str(p)
        )
    return records


def write_jsonl(
    records: Iterable[PromptRecord],
    path: str | os.PathLike[str],
    *,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
) -> Path:
    """Write records as JSONL: one object per record with the prompt, the answer (``null`` when
    ``None``) and the meta fields flattened beside them. Loading the file back with the same column
    names gives the same prompts, answers and meta (``require_answer=False`` when an answer is ``None``).

    The write is atomic (a temporary file in the target directory, then ``os.replace``); the parent
    directory is created. Writing over a file that any of the records were loaded from is refused
    (``ValueError``), so an input file is never modified. Returns the path written.
    """
    if not isinstance(prompt_column, str) or not isinstance(answer_column, str) or prompt_column == answer_column:
        raise ValueError(
            "write_jsonl: prompt_column and answer_column must be two different strings; "
            f"got {prompt_column!r} and {answer_column!r}"
        )
    target = Path(os.fspath(path))
    records = list(records)
    lines: list[str] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, PromptRecord):
            raise TypeError(f"write_jsonl: item {i} is a {type(rec).__name__}, expected a PromptRecord")
        # a conversation is written back as such: loading the file gives the same record
        obj: dict[str, Any] = {prompt_column: rec.as_given(), answer_column: rec.answer}
        for key, value in rec.meta.items():
            if key in (prompt_column, answer_column):
                raise ValueError(
                    f"write_jsonl: record {i} ({rec.source}) has a meta field {key!r} that collides with "
                    f"the {'prompt' if key == prompt_column else 'answer'} column; rename the field or "
                    "choose other prompt_column / answer_column names"
                )
            if key == NESTED_META_COLUMN and isinstance(value, dict):
                value = {NESTED_META_COLUMN: value}  # the loader spreads a 'meta' object: this one spreads back to itself
            obj[key] = value
        try:
            lines.append(json.dumps(obj, ensure_ascii=False, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"write_jsonl: record {i} ({rec.source}) cannot be written as JSON ({exc}); "
                "meta values must be JSON-able (no NaN / infinity)"
            ) from None
    _refuse_overwriting_sources(target, records)
    if target.is_dir():
        raise IsADirectoryError(errno.EISDIR, "write_jsonl: the target is a directory", str(target))
    text = "".join(line + "\n" for line in lines)
    write_atomically(target, lambda handle: handle.write(text.encode("utf-8", "backslashreplace")), make_folder=True)
    return target


# --------------------------------------------------------------------------------------------------
# argument checks and per-row conversion
# --------------------------------------------------------------------------------------------------


def _check_arguments(
    prompt_column: Any, answer_column: Any, meta_columns: Any, require_answer: Any
) -> _Columns:
    for name, value in (("prompt_column", prompt_column), ("answer_column", answer_column)):
        if not isinstance(value, str) or not value:
            raise TypeError(f"load_prompts: {name} must be a non-empty string, got {value!r}")
    if prompt_column == answer_column:
        raise ValueError(
            f"load_prompts: prompt_column and answer_column are both {prompt_column!r}; they must differ"
        )
    meta: tuple[str, ...] | None = None
    if meta_columns is not None:
        if isinstance(meta_columns, (str, bytes)):
            raise TypeError(
                f"load_prompts: meta_columns must be a list of column names, got the string {meta_columns!r} "
                f"(write meta_columns=[{meta_columns!r}])"
            )
        meta = tuple(meta_columns)
        for c in meta:
            if not isinstance(c, str) or not c:
                raise TypeError(f"load_prompts: meta_columns must hold non-empty strings, got {c!r}")
            if c in (prompt_column, answer_column):
                raise ValueError(
                    f"load_prompts: meta column {c!r} is also the prompt or answer column; list only other columns"
                )
        if len(set(meta)) != len(meta):
            raise ValueError(f"load_prompts: meta_columns lists a column twice: {list(meta)}")
    if not isinstance(require_answer, bool):
        raise TypeError(f"load_prompts: require_answer must be True or False, got {require_answer!r}")
    return _Columns(prompt_column, answer_column, meta, require_answer)


def _fmt_cols(columns: Iterable[Any]) -> str:
    names = [repr(c) for c in columns]
    if not names:
        return "none"
    if len(names) > 20:
        names = names[:20] + [f"... ({len(names) - 20} more)"]
    return ", ".join(names)


def _a_json_kind(value: Any) -> str:
    """:func:`_json_kind` with its article ("an object", "a string")."""
    kind = _json_kind(value)
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


class _NotFound(FileNotFoundError):
    """``FileNotFoundError`` (errno ``ENOENT``, ``filename`` set) whose message names the path without ``[Errno 2]``,
    and for a relative path where it was looked for."""

    def __init__(self, path: str, what: str, where: str | None = None):
        super().__init__(errno.ENOENT, f"{what} not found", path)
        self.what = what
        self.where = where if where is not None else "" if os.path.isabs(path) else os.path.abspath(path)

    def __reduce__(self):  # OSError's own would rebuild it from (errno, strerror, filename)
        return _NotFound, (self.filename, self.what, self.where)

    def __str__(self) -> str:
        where = f" (looked for {self.where}: a relative path is taken from the working directory)" if self.where else ""
        return f"{self.strerror}: {self.filename}{where}"


def _near_miss(name: str, columns: Sequence[str]) -> str:
    """", and 'Answer ' differs from it only in spaces or case" when a column does (a header written ``prompt, answer``),
    else nothing."""
    near = [c for c in columns if isinstance(c, str) and c.strip().casefold() == name.strip().casefold()]
    return f", and {near[0]!r} differs from it only in spaces or case" if near else ""


def _check_schema(columns: Sequence[str], where: str, path: str, cols: _Columns) -> None:
    """Column-level checks for formats with a fixed schema (CSV header, Parquet, saved data sets)."""
    if not _has_column(columns, cols.prompt):
        raise DataError(
            f"{where}: no prompt column {cols.prompt!r} (columns: {_fmt_cols(columns)}){_near_miss(cols.prompt, columns)}; "
            "expected a column of prompt strings — name it with prompt_column (data.prompt_column, --prompt-column)",
            path=path,
            location=where,
        )
    if cols.require_answer and not _has_column(columns, cols.answer):
        raise DataError(
            f"{where}: no answer column {cols.answer!r} (columns: {_fmt_cols(columns)}){_near_miss(cols.answer, columns)}; "
            "expected a column of reference answers — name it with answer_column (data.answer_column, --answer-column), "
            "or allow data without answers with require_answer=False (data.require_answer: false in a training config, --no-require-answer for entrorl eval and data audit)",
            path=path,
            location=where,
        )
    if cols.meta is not None:
        missing = [c for c in cols.meta if c not in columns]
        if missing:
            raise DataError(
                f"{where}: meta column(s) {_fmt_cols(missing)} not found (columns: {_fmt_cols(columns)}); "
                "expected every name in meta_columns to be a column",
                path=path,
                location=where,
            )


def _has_column(columns: Sequence[str], name: str) -> bool:
    """Whether ``name`` is one of ``columns``, or a field within one (``reward_model.ground_truth``)."""
    return name in columns or ("." in name and name.split(".", 1)[0] in columns)


_ABSENT = object()


def _column_value(row: Mapping[str, Any], name: str) -> Any:
    """The value of column ``name`` in ``row``; a dotted name that is no column names a field within one
    (``reward_model.ground_truth``: the ``ground_truth`` of the ``reward_model`` object, as verl's data sets hold their
    answers). :data:`_ABSENT` when there is none."""
    if name in row:
        return row[name]
    if "." not in name:
        return _ABSENT
    value: Any = row
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _ABSENT
        value = value[part]
    return value


_PROMPT_TEXT = "expected a non-empty string, or chat messages ([{\"role\": \"user\", \"content\": ...}, ...])"


def _chat_messages(value: Any, column: str, fail: Any) -> tuple[str, tuple[dict[str, Any], ...]]:
    """``(the user's last turn, the conversation)`` from a prompt given as chat messages: a non-empty list of objects,
    each with a string ``role`` and a string ``content`` (other fields, such as ``name``, are kept for the chat
    template), ending with the user's turn, whose content is not empty."""
    messages = _jsonable(value, column, fail)
    if isinstance(messages, list):  # a field other messages have, which a table fills with null in this one
        messages = [{key: item for key, item in message.items() if item is not None or key in ("role", "content")}
                    if isinstance(message, dict) else message for message in messages]
    if not messages:
        raise fail(f"prompt column {column!r} holds no message; {_PROMPT_TEXT}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not message["role"].strip() \
                or not isinstance(message.get("content"), str):
            got = (f"an object with the fields {_fmt_cols(message)}" if isinstance(message, dict)
                   else _a_json_kind(message))
            content = message.get("content") if isinstance(message, dict) else None
            why = (" (a list of content parts is not read: text only)" if isinstance(content, list) else
                   " (its content is null: a tool call, which a prompt cannot hold)" if isinstance(message, dict)
                   and "content" in message and content is None else "")
            raise fail(f"prompt column {column!r}: message {index} is {got}; expected chat messages, each an object "
                       f"with a string \"role\" and a string \"content\"{why}")
    if messages[-1]["role"] != "user":
        raise fail(f"prompt column {column!r}: the conversation ends with a {messages[-1]['role']!r} message; expected it "
                   "to end with the user's turn, which the policy answers")
    if not messages[-1]["content"].strip():
        raise fail(f"prompt column {column!r}: the user's last message is empty; expected the prompt's text there")
    return messages[-1]["content"], tuple(messages)


def _make_record(row: Mapping[str, Any], where: str, path: str, cols: _Columns) -> PromptRecord:
    def fail(what: str) -> DataError:
        return DataError(f"{where}: {what}", path=path, location=where)

    prompt = _column_value(row, cols.prompt)
    if prompt is _ABSENT:
        fields = _fmt_cols(row.keys())
        raise fail(
            f"missing prompt column {cols.prompt!r} (fields: {fields}){_near_miss(cols.prompt, list(row.keys()))}; expected a non-empty string "
            "there — name the column with prompt_column (data.prompt_column, --prompt-column)"
        )
    messages = None
    if isinstance(prompt, (list, tuple, np.ndarray)):
        prompt, messages = _chat_messages(prompt, cols.prompt, fail)
    if not isinstance(prompt, str):
        raise fail(f"prompt column {cols.prompt!r} holds {_a_json_kind(prompt)}; {_PROMPT_TEXT}")
    if not prompt.strip():
        raise fail(f"prompt column {cols.prompt!r} is empty; {_PROMPT_TEXT}")

    found = _column_value(row, cols.answer)
    answer = _answer_value(None if found is _ABSENT else found, cols.answer, fail)
    if answer is None and cols.require_answer:
        state = (f"missing (fields: {_fmt_cols(row.keys())}){_near_miss(cols.answer, list(row.keys()))}"
                 if found is _ABSENT else "empty")
        raise fail(
            f"answer column {cols.answer!r} is {state}; expected a reference answer (a string or a number) "
            "— name the column with answer_column (data.answer_column, --answer-column), or allow rows without "
            "answers with require_answer=False (data.require_answer: false in a training config, --no-require-answer for entrorl eval and data audit)"
        )

    if cols.meta is None:
        keys = [k for k in row if k != cols.prompt and k != cols.answer]
    else:
        keys = list(cols.meta)
        missing = [k for k in keys if k not in row]
        if missing:
            raise fail(
                f"meta column(s) {_fmt_cols(missing)} missing (fields: {_fmt_cols(row.keys())}); "
                "expected every name in meta_columns to be present in every record"
            )
    meta: dict[str, Any] = {}
    for k in keys:
        if not isinstance(k, str):
            raise fail(f"column name {k!r} is not a string; expected string column names")
        meta[k] = _jsonable(row[k], k, fail)
    if isinstance(meta.get(NESTED_META_COLUMN), dict):
        nested = meta.pop(NESTED_META_COLUMN)
        clashes = sorted(set(nested) & (set(meta) | {cols.prompt, cols.answer}))
        if clashes:
            raise fail(f"the {NESTED_META_COLUMN!r} object repeats the column(s) {_fmt_cols(clashes)}; "
                       "expected each field once, either as a column or inside it")
        meta.update(nested)
    for column, value in ((cols.prompt, list(messages or [prompt])), (cols.answer, answer), *meta.items()):
        _refuse_lone_surrogates(value, column, fail)
    return PromptRecord(prompt=prompt, answer=answer, meta=meta, source=where, messages=messages)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _refuse_lone_surrogates(value: Any, column: str, fail: Any) -> None:
    """Refuse a string (or a key or string within a list or object) holding half of a UTF-16 surrogate pair, which a
    JSON escape such as ``"\\ud800"`` decodes to: no UTF-8 text can hold it, so the tokenizer would refuse the prompt
    and every file written after it (samples, checkpoints, audit outputs) would fail, after the work was done."""
    if isinstance(value, str):
        found = _LONE_SURROGATE.search(value)
        if found is not None:
            raise fail(f"column {column!r} holds a lone surrogate ({ascii(found.group())[1:-1]}, at character "
                       f"{found.start()}): half of a UTF-16 pair, which no UTF-8 text can hold; expected valid Unicode "
                       "text (the character itself, or both halves of its pair)")
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_lone_surrogates(key, column, fail)
            _refuse_lone_surrogates(item, column, fail)
    elif isinstance(value, list):
        for item in value:
            _refuse_lone_surrogates(item, column, fail)


def _as_python(value: np.generic) -> Any:
    """A numpy scalar as the Python value it stands for; a float narrower than Python's as the number written: the
    shortest decimal its own type reads back (float32's 0.1 is 0.1, not its float64 widening 0.10000000149011612)."""
    if isinstance(value, np.floating) and value.dtype.itemsize < 8:
        return float(str(value))
    return value.item()


def _answer_value(value: Any, column: str, fail: Any) -> str | None:
    if isinstance(value, np.generic):
        value = _as_python(value)
    if value is None:
        return None
    if isinstance(value, bool):
        raise fail(
            f"answer column {column!r} holds a boolean ({value}); expected a string or a number "
            "(quote it if the answer is the word)"
        )
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            raise fail(f"answer column {column!r} holds {value}; expected a string or a finite number")
        return str(value)
    if isinstance(value, (int, decimal.Decimal)):
        return str(value)
    if isinstance(value, str):
        return value if value.strip() else None
    raise fail(f"answer column {column!r} holds {_a_json_kind(value)}; expected a string or a number")


def _jsonable(value: Any, column: str, fail: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist(), column, fail)
    if isinstance(value, np.generic):
        return _jsonable(_as_python(value), column, fail)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, column, fail) for v in value]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise fail(
                    f"column {column!r} holds a mapping with a non-string key {k!r}; "
                    "meta values must be JSON-able (choose columns with meta_columns=[...])"
                )
            out[k] = _jsonable(v, column, fail)
        return out
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    raise fail(
        f"column {column!r} holds a {type(value).__name__} value, which cannot be kept in meta; "
        "expected JSON-able values (strings, numbers, booleans, null, lists, objects) — "
        "choose the columns to keep with meta_columns=[...]"
    )


# --------------------------------------------------------------------------------------------------
# formats
# --------------------------------------------------------------------------------------------------


def _read_text(p: Path) -> str:
    data = p.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        offset = exc.start + (len(_BOM) if data.startswith(_BOM) else 0)
        line = data[:offset].count(b"\n") + 1
        raise DataError(
            f"{p}:{line}: not valid UTF-8 ({exc.reason}); expected UTF-8 text", path=str(p), location=f"{p}:{line}"
        ) from None


def _load_jsonl(p: Path, cols: _Columns) -> list[PromptRecord]:
    with p.open("rb") as lines:  # line by line: the file is not held in memory beside its records
        records = []
        for lineno, raw in enumerate(lines, start=1):
            raw = raw.rstrip(b"\r\n")  # a JSON error at the line's end is at its last column, not on "line 2" of it
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if not raw.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start} of the line); expected UTF-8 text",
                    path=str(p),
                    location=where,
                ) from None
            try:
                obj, repeating = _loads_keeping_repeated_keys(text)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); expected one JSON object per line",
                    path=str(p),
                    location=where,
                ) from None
            except ValueError as exc:  # a whole number past Python's digit limit for reading one
                raise DataError(f"{where}: {_unreadable_number(exc)}", path=str(p), location=where) from None
            if repeating is not None:
                raise DataError(f"{where}: {repeating.refusal}", path=str(p), location=where)
            if not isinstance(obj, dict):
                raise DataError(
                    f"{where}: a JSON {_json_kind(obj)} where a JSON object was expected (one object per line)",
                    path=str(p),
                    location=where,
                )
            records.append(_make_record(obj, where, str(p), cols))
        return records


_JSON_LINES_UNDER_A_JSON_NAME = ("if the file holds JSON Lines, one object per line (as datasets' Dataset.to_json "
                                 "and pandas' to_json(lines=True) write them), name it .jsonl")


def _first_line_is_an_object(text: str) -> bool:
    """Whether the first line of ``text`` that holds anything is a JSON object by itself (a JSON Lines file's first
    row), not the opening of an indented one."""
    first = re.search(r"\S[^\n]*", text)
    try:
        return first is not None and isinstance(json.loads(first.group(0)), dict)
    except ValueError:
        return False


def _unreadable_number(error: ValueError) -> str:
    """What to say of a number that ``json`` could not read (one of more digits than Python reads into an int)."""
    return (f"a number too long to read ({str(error).split(';')[0].rstrip('.')}); write it as a string, in quotes, to "
            "keep it as the answer's text")


def _load_json(p: Path, cols: _Columns) -> list[PromptRecord]:
    text = _read_text(p)
    if not text.strip():
        raise DataError(
            f"{p}: empty file; expected a JSON list of objects or an object {{\"data\": [...]}}", path=str(p)
        )
    try:
        obj, repeating = _loads_keeping_repeated_keys(text)
    except json.JSONDecodeError as exc:
        where = f"{p}:{exc.lineno}"
        lines_hint = (f"; {_JSON_LINES_UNDER_A_JSON_NAME}" if exc.msg == "Extra data" and _first_line_is_an_object(text)
                      else "")
        raise DataError(
            f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); "
            "expected a JSON list of objects or an object {\"data\": [...]}" + lines_hint,
            path=str(p),
            location=where,
        ) from None
    except ValueError as exc:  # a whole number past Python's digit limit for reading one
        raise DataError(f"{p}: {_unreadable_number(exc)}", path=str(p)) from None
    if isinstance(obj, _RepeatingKeys):  # the file's own object: no row to name
        raise DataError(f"{p}: {obj.refusal}", path=str(p))
    if isinstance(obj, dict):
        if "data" not in obj:
            raise DataError(
                f"{p}: a JSON object without a \"data\" field (fields: {_fmt_cols(obj.keys())}); "
                "expected a JSON list of objects or an object {\"data\": [...]}"
                + (f"; {_JSON_LINES_UNDER_A_JSON_NAME}" if "\n" not in text.strip() else ""),
                path=str(p),
            )
        rows = obj["data"]
        if not isinstance(rows, list):
            raise DataError(
                f"{p}: \"data\" holds a JSON {_json_kind(rows)}; expected a list of objects", path=str(p)
            )
    elif isinstance(obj, list):
        rows = obj
    else:
        raise DataError(
            f"{p}: the top level is a JSON {_json_kind(obj)}; "
            "expected a JSON list of objects or an object {\"data\": [...]}",
            path=str(p),
        )
    records = []
    for i, row in enumerate(rows):
        where = f"{p}[{i}]"
        in_row = _RepeatingKeys.within(row) if repeating is not None else None
        if in_row is not None:
            raise DataError(f"{where}: {in_row.refusal}", path=str(p), location=where)
        if not isinstance(row, dict):
            raise DataError(
                f"{where}: row {i} is a JSON {_json_kind(row)}; expected a JSON object",
                path=str(p),
                location=where,
            )
        records.append(_make_record(row, where, str(p), cols))
    if repeating is not None:  # in a top-level field beside "data"
        raise DataError(f"{p}: {_RepeatingKeys.within(obj).refusal}", path=str(p))
    return records


def _loads_keeping_repeated_keys(text: str) -> tuple[Any, "_RepeatingKeys | None"]:
    """``json.loads(text)``, and the first object of it that repeats a key (or None). ``json`` would keep the last
    value without a word, where a CSV header or a Parquet schema that repeats a name is refused: such an object is
    kept as a :class:`_RepeatingKeys`, for the caller to refuse, naming the line or row that holds it."""
    repeating: list[_RepeatingKeys] = []

    def noting_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = _RepeatingKeys.of(pairs)
        if isinstance(obj, _RepeatingKeys):
            repeating.append(obj)
        return obj

    return json.loads(text, object_pairs_hook=noting_repeats), (repeating[0] if repeating else None)


class _RepeatingKeys(dict):
    """A JSON object that repeats a key, kept while a file is parsed, so that the row holding it can be named when it
    is refused (the parser gives no position)."""

    refusal: str

    @classmethod
    def of(cls, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) == len(pairs):
            return obj
        seen: set[str] = set()
        repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
        repeating = cls(pairs)
        repeating.refusal = f"an object repeats the key {repeated!r}; expected unique keys (which value is meant?)"
        return repeating

    @classmethod
    def within(cls, value: Any) -> "_RepeatingKeys | None":
        """The first object under ``value`` (itself included) that repeats a key, or None."""
        if isinstance(value, cls):
            return value
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        return next((found for child in children if (found := cls.within(child)) is not None), None)


@contextlib.contextmanager
def _csv_fields_up_to(length: int) -> Iterator[None]:
    """Within the block, the csv module reads fields of up to ``length`` characters (a file's size: no field of it is
    longer), where by default it refuses one over 131072 characters as malformed while the other formats take a
    prompt of any length; the module's limit (process-wide) is put back after."""
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, min(length, sys.maxsize)))
    try:
        yield
    finally:
        csv.field_size_limit(limit)


def _load_csv(p: Path, cols: _Columns) -> list[PromptRecord]:
    # read from the file as it is decoded: no copy of its bytes and its text beside the records
    with _csv_fields_up_to(p.stat().st_size), p.open(encoding="utf-8-sig", newline="") as handle:
        try:
            return _csv_records(handle, p, cols)
        except UnicodeDecodeError:
            _read_text(p)  # names the line of the first byte that is not UTF-8
            raise


def _csv_records(lines: Iterable[str], p: Path, cols: _Columns) -> list[PromptRecord]:
    reader = csv.reader(lines, strict=True)  # an unclosed quote is an error, not the rest of the file
    header: list[str] | None = None
    header_line = 0
    records = []
    prev_end = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            where = f"{p}:{prev_end + 1}"  # the line the record starts on (an unclosed quote runs to the end)
            raise DataError(
                f"{where}: malformed CSV ({exc}); expected comma-separated fields with balanced quotes",
                path=str(p),
                location=where,
            ) from None
        start, prev_end = prev_end + 1, reader.line_num
        if not row:
            continue  # a blank line
        where = f"{p}:{start}"
        if header is None:
            header, header_line = row, start
            blank = [i for i, c in enumerate(header) if not c.strip()]
            if blank:
                raise DataError(
                    f"{where}: header field {blank[0] + 1} is empty; expected a name for every column",
                    path=str(p),
                    location=where,
                )
            dups = sorted({c for c in header if header.count(c) > 1})
            if dups:
                raise DataError(
                    f"{where}: header repeats column name(s) {_fmt_cols(dups)}; expected unique column names",
                    path=str(p),
                    location=where,
                )
            _check_schema(header, f"{where} (header)", str(p), cols)
            continue
        if len(row) != len(header):
            raise DataError(
                f"{where}: {len(row)} field(s); expected {len(header)} as in the header on line {header_line}",
                path=str(p),
                location=where,
            )
        records.append(_make_record(dict(zip(header, row)), where, str(p), cols))
    return records


def _selected_columns(columns: Sequence[str], cols: _Columns) -> list[str]:
    if cols.meta is None:
        return list(columns)
    wanted = {cols.prompt, cols.answer, *cols.meta}
    wanted |= {name.split(".", 1)[0] for name in (cols.prompt, cols.answer) if name not in columns}  # nested fields
    return [c for c in columns if c in wanted]


def _load_parquet(p: Path, cols: _Columns) -> list[PromptRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(p) as parquet:
            _refuse_repeated_columns(parquet.schema_arrow.names, p)  # reading would fail on them with an Arrow message
            table = parquet.read()
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{p}: cannot be read as Parquet ({exc}); expected a Parquet file", path=str(p)) from None
    return _table_records(table, p, cols)


def read_arrow_ipc(path: str | os.PathLike[str]) -> tuple[Any, bool]:
    """``(table, is_stream)``: the ``pyarrow.Table`` in an Arrow IPC file, read as the random-access file format or,
    failing that, as the stream format that ``datasets`` writes its ``.arrow`` shards in (``is_stream`` says which).
    :class:`DataError` when it is neither."""
    import pyarrow as pa

    p = Path(os.fspath(path))
    try:
        with pa.memory_map(str(p)) as source:
            try:
                return pa.ipc.open_file(source).read_all(), False
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_stream(source).read_all(), True
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{p}: cannot be read as Arrow IPC ({exc}); expected an Arrow file or stream", path=str(p)) from None


def _load_arrow(p: Path, cols: _Columns) -> list[PromptRecord]:
    table, _ = read_arrow_ipc(p)
    return _table_records(table, p, cols)


def _table_records(table: Any, p: Path, cols: _Columns) -> list[PromptRecord]:
    """The records of a ``pyarrow.Table`` read from ``p``, its schema checked first."""
    columns = list(table.column_names)
    _refuse_repeated_columns(columns, p)
    _check_schema(columns, f"{p} (schema)", str(p), cols)
    names = _class_label_names(table.schema, cols.answer)
    table = table.select(_selected_columns(columns, cols))
    return list(_rows_to_records(_answers_named(_iter_arrow_rows(table), cols.answer, names), p, cols))


def _refuse_repeated_columns(columns: Sequence[str], p: Path) -> None:
    dups = sorted({c for c in columns if columns.count(c) > 1})
    if dups:
        raise DataError(f"{p} (schema): repeated column name(s) {_fmt_cols(dups)}; expected unique names", path=str(p))


def _iter_arrow_rows(table: Any) -> Iterator[dict[str, Any]]:
    narrow = _narrow_arrow_fields(list(table.schema))
    for batch in table.to_batches():
        yield from _as_written(batch.to_pylist(), narrow)


_EACH = object()  # a step of a path: every item of a list


_NESTED_READ_AS_WRITTEN = [True]  # False within nested_floats_widened()


@contextlib.contextmanager
def nested_floats_widened() -> Iterator[None]:
    """In the block, the loaders read float32 / float16 values within structs, lists and dictionary or extension
    columns widened to float64 (0.1 as 0.10000000149011612), as entrorl read them before it read them as written
    (top-level float columns were read as written then too): the reading a resumed run's data digest, saved by such
    a version, was taken over."""
    _NESTED_READ_AS_WRITTEN.append(False)
    try:
        yield
    finally:
        _NESTED_READ_AS_WRITTEN.pop()


def _narrow_arrow_fields(fields: list[Any]) -> dict[tuple[Any, ...], Any]:
    """``{path: numpy type}`` of the float values narrower than Python's among Arrow ``fields``, those within structs
    and lists included: a path names the column, then the field within it (``reward_model.ground_truth``) or
    :data:`_EACH` item of a list (``prompt``'s messages). Only the top-level float columns in
    :func:`nested_floats_widened`."""
    narrow: dict[tuple[Any, ...], Any] = {}
    for field in fields:
        if _NESTED_READ_AS_WRITTEN[-1]:
            narrow.update(_narrow_arrow_type(field.type, (field.name,)))
        elif str(field.type) in _NARROW_FLOATS:
            narrow[(field.name,)] = _NARROW_FLOATS[str(field.type)]
    return narrow


def _narrow_arrow_type(kind: Any, path: tuple[Any, ...]) -> dict[tuple[Any, ...], Any]:
    import pyarrow as pa

    if str(kind) in _NARROW_FLOATS:
        return {path: _NARROW_FLOATS[str(kind)]}
    if pa.types.is_struct(kind):
        return {found: numpy_type for i in range(kind.num_fields)
                for found, numpy_type in _narrow_arrow_type(kind.field(i).type, (*path, kind.field(i).name)).items()}
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _narrow_arrow_type(kind.value_type, (*path, _EACH))
    if pa.types.is_dictionary(kind):  # dictionary-encoded values read as their values
        return _narrow_arrow_type(kind.value_type, path)
    if isinstance(kind, pa.ExtensionType):  # datasets' Array2D..Array5D: lists of lists in Python
        return _narrow_arrow_type(kind.storage_type, path)
    return {}


# float columns narrower than Python's float: a value read from one is widened (float32's 0.1 becomes 0.10000000149...)
_NARROW_FLOATS = {"float": np.float32, "float32": np.float32, "halffloat": np.float16, "float16": np.float16}


def _as_written(rows: Iterable[dict[str, Any]], narrow: Mapping[tuple[Any, ...], Any]) -> Iterator[dict[str, Any]]:
    """``rows`` with the ``narrow`` float values (path: numpy type, see :func:`_narrow_arrow_fields`) as the numbers
    written (see :func:`_as_python`), as a JSON file would give them."""
    for row in rows:
        for path, kind in narrow.items():
            _narrow_in(row, path, kind)
        yield row


def _narrow_in(holder: Any, path: tuple[Any, ...], kind: Any) -> None:
    """Narrow, in place, the float values at ``path`` within ``holder`` (a row, a struct's dict or a list)."""
    step, rest = path[0], path[1:]
    if step is _EACH:
        keys = range(len(holder)) if isinstance(holder, list) else ()
    else:
        keys = (step,) if isinstance(holder, dict) and step in holder else ()
    for key in keys:
        if rest:
            _narrow_in(holder[key], rest, kind)
        elif isinstance(holder[key], float):
            holder[key] = _as_python(kind(holder[key]))


def _rows_to_records(rows: Iterable[Mapping[str, Any]], p: Path, cols: _Columns) -> Iterator[PromptRecord]:
    for i, row in enumerate(rows):
        yield _make_record(row, f"{p}[{i}]", str(p), cols)


def saved_splits(p: Path) -> list[str] | None:
    """The split names that a ``DatasetDict`` saved in ``p`` lists in its ``dataset_dict.json``; None for a folder that
    holds no such listing (a saved ``Dataset``), ``DataError`` for one that cannot be read."""
    listing = p / "dataset_dict.json"
    if not listing.is_file():
        return None
    try:
        return [str(name) for name in json.loads(listing.read_text(encoding="utf-8"))["splits"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{p}: a saved DatasetDict whose dataset_dict.json lists no splits; expected a directory written "
                        "by datasets.DatasetDict.save_to_disk", path=str(p)) from None


def _saved_split_directory(p: Path, split: str | None) -> Path:
    """The directory of the saved ``Dataset`` to read: ``p`` itself, or for a saved ``DatasetDict`` the sub-directory
    of ``split`` (``None``: its only split) among those it lists (:func:`saved_splits`). Reading that one split, not
    the whole dict, keeps an empty split elsewhere from failing the read."""
    splits = saved_splits(p)
    if splits is None:
        return p
    if not splits:
        raise DataError(f"{p}: a saved DatasetDict without splits; expected at least one split with prompts", path=str(p))
    if split is None and len(splits) > 1:
        raise DataError(
            f"{p}: a saved DatasetDict of several splits ({_fmt_cols(splits)}); point at the split to evaluate on, its "
            f"sub-directory ({p / splits[0]}, ...)",
            path=str(p),
        )
    if split is not None and split not in splits:
        raise DataError(
            f"{p}: a saved DatasetDict without a '{split}' split (splits: {_fmt_cols(splits)}); expected a '{split}' "
            "split — or point at one split's sub-directory",
            path=str(p),
        )
    return p / (split if split is not None else splits[0])


def _saved_without_rows(directory: Path) -> bool:
    """Whether the ``Dataset`` saved in ``directory`` was saved without rows: it then has no data file, and
    ``datasets.load_from_disk`` fails on it with an ``IndexError``."""
    try:
        return json.loads((directory / "state.json").read_text(encoding="utf-8")).get("_data_files") == []
    except (OSError, ValueError, AttributeError):
        return False


def _load_saved_dataset(p: Path, cols: _Columns, split: str | None = "train") -> list[PromptRecord]:
    import datasets

    directory = _saved_split_directory(p, split)
    if _saved_without_rows(directory):
        return []
    try:
        ds = datasets.load_from_disk(str(directory))
    except FileNotFoundError as exc:
        raise DataError(
            f"{p}: a directory that is not a saved data set ({exc}); expected a directory written by "
            f"datasets.Dataset.save_to_disk, or a file in one of: {SUPPORTED_FORMATS}",
            path=str(p),
        ) from None
    columns = list(ds.column_names)
    _check_schema(columns, f"{p} (schema)", str(p), cols)
    selected = _selected_columns(columns, cols)
    if selected != columns:
        ds = ds.select_columns(selected)
    # an output format saved with it (numpy, torch, pandas, arrow) is a view of the rows: they are read as Python values
    narrow = _narrow_arrow_fields(list(ds.data.schema))
    labels = ds.features.get(cols.answer)
    names = list(labels.names) if isinstance(labels, datasets.ClassLabel) else None
    rows = _answers_named(_as_written(iter(ds.with_format(None)), narrow), cols.answer, names)
    return list(_rows_to_records(rows, p, cols))


_CLASS_LABELS_NAMED = [True]  # False within class_labels_numbered()


@contextlib.contextmanager
def class_labels_numbered() -> Iterator[None]:
    """In the block, an answer column of ``datasets.ClassLabel`` is read as the label's number, as entrorl read it
    before it read the label's name: the reading a resumed run's data digest, saved by such a version, was taken
    over."""
    _CLASS_LABELS_NAMED.append(False)
    try:
        yield
    finally:
        _CLASS_LABELS_NAMED.pop()


def answers_class_labels(path: str | os.PathLike[str], answer_column: str = "answer", *, split: str | None = "train") -> bool:
    """Whether :func:`load_prompts` reads ``answer_column`` of ``path`` as ``ClassLabel`` names (a saved data set, or a
    Parquet or Arrow file ``datasets`` wrote); from the schema, without reading the rows. False for a file that cannot
    be read so (its reading says why)."""
    p = Path(os.fspath(path))
    try:
        if p.is_dir():
            import datasets

            labels = datasets.load_from_disk(str(_saved_split_directory(p, split))).features.get(answer_column)
            return isinstance(labels, datasets.ClassLabel)
        if p.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return _class_label_names(pq.read_schema(p), answer_column) is not None
        if p.suffix.lower() == ".arrow":
            return _class_label_names(read_arrow_ipc(p)[0].schema, answer_column) is not None
    except Exception:  # noqa: BLE001 - whatever stops this look stops the reading too, which names it
        return False
    return False


def _class_label_names(schema: Any, column: str) -> list[str] | None:
    """The label names of ``column`` when the ``datasets`` features stored in an Arrow ``schema``'s metadata (as
    ``Dataset.to_parquet`` and its ``.arrow`` shards keep them) make it a ``ClassLabel``, else None."""
    try:
        feature = json.loads((schema.metadata or {})[b"huggingface"])["info"]["features"][column]
    except (KeyError, TypeError, ValueError):
        return None
    names = feature.get("names") if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" else None
    return names if isinstance(names, list) and all(isinstance(name, str) for name in names) else None


def _answers_named(rows: Iterable[dict[str, Any]], column: str, names: list[str] | None) -> Iterable[dict[str, Any]]:
    """``rows`` with the ``ClassLabel`` number in ``column`` replaced by its name among ``names`` (a multiple-choice
    reference 'B', not '1'), and -1, ``datasets``' "no label", by None; ``rows`` as they are without ``names``."""
    if names is None or not _CLASS_LABELS_NAMED[-1]:
        return rows

    def named(number: Any) -> Any:
        if number == -1:
            return None
        return names[number] if isinstance(number, int) and not isinstance(number, bool) and 0 <= number < len(names) \
            else number

    return ({**row, column: named(row[column])} if column in row else row for row in rows)


_LOADERS = {
    ".jsonl": _load_jsonl,
    ".json": _load_json,
    ".csv": _load_csv,
    ".parquet": _load_parquet,
    ".arrow": _load_arrow,
}


# --------------------------------------------------------------------------------------------------
# writing helpers
# --------------------------------------------------------------------------------------------------

_SOURCE_RE = re.compile(r"^(?P<file>.+?)(?::\d+|\[\d+\])$")


def _refuse_overwriting_sources(target: Path, records: Sequence[PromptRecord]) -> None:
    files = set()
    for rec in records:
        m = _SOURCE_RE.match(rec.source)
        if m:
            files.add(m.group("file"))
    if not files:
        return
    target_resolved = target.resolve()
    for f in files:
        src = Path(f)
        same = False
        try:
            same = os.path.samefile(src, target)
        except OSError:
            same = src.resolve() == target_resolved
        if same:
            raise ValueError(
                f"write_jsonl: refusing to write {target}: some records were loaded from it "
                "(input files are never modified); write to a new path"
            )


def check_output_file(path: str | os.PathLike[str], *, what: str = "output file") -> Path:
    """Check, before any work is done, that a file can be written at ``path``: it is not a directory, and its
    folder exists or can be created and takes new files. ``ValueError`` saying why not, naming ``what``
    (e.g. ``"--out"``). Nothing is left behind: missing folders are created to try, then removed. Returns the path."""
    target = Path(os.fspath(path))
    if target.is_dir():
        raise ValueError(f"{what} {target} is a directory; expected the path of a file")
    if written_in_place(target):  # /dev/null, /dev/stdout, a pipe: opened for writing, not replaced
        if not os.access(target, os.W_OK):
            raise ValueError(f"{what} {target} cannot be written: permission denied")
        return target
    # realpath: a link's file is replaced in its own folder; 'x/../y' is y, and x need not exist
    _try_writing_in(Path(os.path.realpath(target)).parent, target, what)
    return target


def check_output_directory(path: str | os.PathLike[str], *, what: str = "output directory") -> Path:
    """Check, before any work is done, that files can be written into the directory ``path``: it is a directory
    or does not exist yet, and it (or its nearest existing parent) takes new files. ``ValueError`` saying why not;
    nothing is left behind. Returns the path."""
    target = Path(os.fspath(path))
    if target.exists() and not target.is_dir():
        raise ValueError(f"{what} {target} exists and is not a directory; expected a directory")
    _try_writing_in(Path(os.path.abspath(target)), target, what)
    return target


def _try_writing_in(folder: Path, target: Path, what: str) -> None:
    """Create ``folder`` (with its missing parents) and a file in it, then remove what was created. Permission
    bits alone cannot tell: root may write where the file system refuses (/proc, a read-only mount)."""
    missing = []
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise ValueError(f"{what} {target} cannot be written: {candidate} is not a directory")
            break
        missing.append(candidate)
    created: list[Path] = []
    try:
        for directory in reversed(missing):
            try:
                directory.mkdir()
            except OSError as exc:
                raise ValueError(f"{what} {target} cannot be written: the folder {directory} cannot be created "
                                 f"({exc.strerror or exc})") from None
            created.append(directory)
        try:
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".entrorl-write-check-")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise ValueError(f"{what} {target} cannot be written: the folder {folder} does not take new files "
                             f"({exc.strerror or exc})") from None
    finally:
        for directory in reversed(created):
            try:
                directory.rmdir()
            except OSError:
                pass
