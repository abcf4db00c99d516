"""Auditing a prompt data set from sampled answers: *hard* prompts versus *wrong* references.

A data set for RL mixes prompts the model rarely solves for two very different reasons:

* **hard** — the model seldom reaches the reference answer and its answers scatter: many tries, many
  different mistakes, an occasional success. These prompts are worth training on.
* **looks wrong** — the model keeps converging on *one* answer that the verifier rejects because it
  disagrees with the reference; now and then a stray sample happens to match the reference. Such a
  reference is often subtly wrong (4.5 tickets, three of seven roots), and training on it punishes
  the model for being right.

Given, for one prompt, the extracted answer of each of its ``n`` samples and whether the reward judged
each sample correct, :func:`audit_prompt` groups equivalent answers, finds the majority answer and its
share of the ``n`` samples, and gives a verdict (:func:`classify`):

* ``"looks_wrong"`` — pass rate ``<= low_pass_rate`` and the majority answer is *not* the reference,
  is strictly more common than any other answer and holds a share ``>= consensus`` of the samples;
* ``"hard"``        — pass rate ``<= low_pass_rate`` without such a consensus (a tie for the most common
  answer is no consensus: with two samples answering ``5`` and ``9`` the model agrees on nothing);
* ``"ok"``          — every other prompt.

The rest of the module turns per-prompt audits into a pass-rate histogram over ``0/n .. n/n``
(:func:`pass_rate_histogram`), counts per verdict (:func:`verdict_counts`), the rows whose pass rate lies
in a band (:func:`band_selection`, built on :func:`~entrorl.data.filters.pass_rate_band_mask`), and a
copy of the chosen rows of the input file in the input's own format (:func:`write_selected_rows`).

Everything here is plain Python and numpy: sampling and scoring happen elsewhere
(:mod:`entrorl.trainer.audit`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from entrorl._checks import caseless, is_real_number
from entrorl._files import write_atomically, write_folder_atomically
from entrorl.data.filters import parse_band, pass_rate_band_mask
from entrorl.data.loading import _LOADERS, _csv_fields_up_to, _read_text, read_arrow_ipc, saved_splits
from entrorl.data.records import PromptRecord

__all__ = [
    "SELECTED_ROWS_SUFFIXES",
    "VERDICTS",
    "AnswerGroup",
    "AuditThresholds",
    "BandSelection",
    "PassRateHistogram",
    "PromptAudit",
    "audit_prompt",
    "band_selection",
    "canonical_answer",
    "check_selected_rows_format",
    "classify",
    "group_answers",
    "pass_rate_histogram",
    "verdict_counts",
    "write_selected_rows",
]

#: The verdicts, in the order reports list them.
VERDICTS = ("ok", "hard", "looks_wrong")

#: ``equivalent(answer, reference)``: whether ``answer`` counts as ``reference`` (math_equal's order, which need not
#: be symmetric).
Equivalence = Callable[[str, str], bool]


@dataclass(frozen=True)
class AuditThresholds:
    """Where *hard* ends and *looks wrong* begins.

    * ``consensus`` — the majority answer must hold at least this share of all samples (unanswered
      samples included) for the model to count as having converged on it; in ``(0, 1]``.
    * ``low_pass_rate`` — prompts whose pass rate is at most this are rarely solved (hard or wrong);
      in ``[0, 1)``.
    """

    consensus: float = 0.5
    low_pass_rate: float = 0.25

    def __post_init__(self) -> None:
        for name in ("consensus", "low_pass_rate"):
            value = getattr(self, name)
            if not is_real_number(value) or not math.isfinite(value):
                raise ValueError(f"AuditThresholds: {name} must be a number, got {value!r}")
        if not 0.0 < self.consensus <= 1.0:
            raise ValueError(f"AuditThresholds: consensus must be in (0, 1], got {self.consensus!r}")
        if not 0.0 <= self.low_pass_rate < 1.0:
            raise ValueError(f"AuditThresholds: low_pass_rate must be in [0, 1), got {self.low_pass_rate!r}")


@dataclass(frozen=True)
class AnswerGroup:
    """Samples whose answers are equivalent.

    ``answer`` is the group's most frequent spelling (the first seen on ties), ``count`` the number of
    samples, ``matches_reference`` whether the reward judged these samples correct (or their answer is the
    reference, see :func:`group_answers`), ``spellings`` every distinct spelling in the group, most
    frequent first, and ``samples`` the indices of its samples, in order.
    """

    answer: str
    count: int
    matches_reference: bool
    spellings: tuple[str, ...]
    samples: tuple[int, ...] = ()


@dataclass(frozen=True)
class PromptAudit:
    """The audit of one prompt's ``n_samples`` sampled answers.

    ``majority_answer`` is ``None`` (share 0) when no sample has an extractable answer; ``groups`` are
    sorted by count, largest first (first seen on ties); ``n_unanswered`` counts samples without an
    extractable answer. ``majority_tied`` says that another group is as large as the majority's: the
    majority answer is then only the first seen of the most common ones, and no consensus.
    """

    n_samples: int
    n_correct: int
    pass_rate: float
    majority_answer: str | None
    majority_share: float
    majority_matches_reference: bool
    n_unanswered: int
    groups: tuple[AnswerGroup, ...]
    verdict: str
    majority_tied: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields; ``sample_answers`` lists every group as ``{answer, count, correct, spellings}``."""
        return {
            "verdict": self.verdict,
            "pass_rate": self.pass_rate,
            "n_correct": self.n_correct,
            "n_samples": self.n_samples,
            "majority_answer": self.majority_answer,
            "majority_share": self.majority_share,
            "majority_matches_reference": self.majority_matches_reference,
            "majority_tied": self.majority_tied,
            "n_unanswered": self.n_unanswered,
            "sample_answers": [
                {"answer": g.answer, "count": g.count, "correct": g.matches_reference, "spellings": list(g.spellings)}
                for g in self.groups
            ],
        }


_SPACES = re.compile(r"\s+")


def canonical_answer(answer: str) -> str:
    """The spelling key answers are first grouped by: surrounding whitespace dropped, inner runs of
    whitespace collapsed to one space, case folded, Unicode NFC (``" X  = 2 "`` and ``"x = 2"`` share a key, and so
    do ``é`` and ``e`` + U+0301, as for ``exact_match``)."""
    return caseless(_SPACES.sub(" ", answer.strip()))


def _by_frequency(spellings: Sequence[str]) -> list[str]:
    """The distinct spellings, most frequent first (first seen first on ties)."""
    counts: dict[str, int] = {}
    for spelling in spellings:
        counts[spelling] = counts.get(spelling, 0) + 1
    return sorted(counts, key=lambda s: -counts[s])


def group_answers(
    answers: Sequence[str | None],
    correct: Sequence[bool],
    *,
    equivalent: Equivalence | None = None,
    reference: str | None = None,
) -> list[AnswerGroup]:
    """Group one prompt's sampled answers, largest group first (on ties, the group seen first).

    ``answers[i]`` is sample ``i``'s extracted answer (``None`` when nothing was extracted: such samples
    join no group) and ``correct[i]`` the reward's judgement. Every correct answered sample goes to one
    group that matches the reference, however it is spelled: the reward is the judge of agreement with
    the reference. So does an incorrect answer that is the ``reference`` itself (the same
    :func:`canonical_answer`, or ``equivalent(answer, reference)``, the order a reward asks its checker in): a
    reward stricter than its answer extraction (on the format around the answer) rejects it, and that is no sign
    of a wrong reference. Incorrect answers
    are grouped first by :func:`canonical_answer`; then each such group, largest first, joins the first
    earlier group for which ``equivalent`` holds both ways on their most frequent spellings (without
    ``equivalent`` only the canonical keys group answers; an equivalence that raises counts as "not
    equivalent"). Cost: at most ``d * (d - 1)`` calls for ``d`` distinct canonical wrong answers, and
    one per distinct spelling to compare it with the ``reference``.
    """
    if len(answers) != len(correct):
        raise ValueError(
            f"group_answers: {len(answers)} answers but {len(correct)} correctness flags; expected one per sample"
        )
    for i, answer in enumerate(answers):
        if answer is not None and not isinstance(answer, str):
            raise TypeError(f"group_answers: answer {i} is a {type(answer).__name__}; expected a string or None")
    is_reference: dict[str, bool] = {}  # by canonical spelling: one equivalence check each

    def the_reference(answer: str) -> bool:
        key = canonical_answer(answer)
        if reference is not None and key not in is_reference:
            is_reference[key] = key == canonical_answer(reference) or (
                equivalent is not None and _safe_equivalent(equivalent, answer, reference))  # as the reward asks it
        return is_reference.get(key, False)

    right = [(i, a) for i, (a, ok) in enumerate(zip(answers, correct)) if a is not None and (ok or the_reference(a))]
    wrong = [(i, a) for i, (a, ok) in enumerate(zip(answers, correct)) if a is not None and not ok and not the_reference(a)]

    groups: list[tuple[int, AnswerGroup]] = []  # each with the index of its own first sample, for ties
    if right:
        spellings = _by_frequency([a for _, a in right])
        groups.append((right[0][0], AnswerGroup(spellings[0], len(right), True, tuple(spellings),
                                                tuple(i for i, _ in right))))

    by_key: dict[str, list[tuple[int, str]]] = {}
    for index, answer in wrong:
        by_key.setdefault(canonical_answer(answer), []).append((index, answer))
    merged: list[list[tuple[int, str]]] = []  # the samples of each wrong group
    for samples in sorted(by_key.values(), key=len, reverse=True):
        for kept in merged:
            if equivalent is not None and _equivalent_both_ways(equivalent, _most_frequent(kept), _most_frequent(samples)):
                kept.extend(samples)
                break
        else:
            merged.append(list(samples))
    for samples in merged:
        spellings = _by_frequency([a for _, a in sorted(samples)])
        groups.append((min(i for i, _ in samples), AnswerGroup(spellings[0], len(samples), False, tuple(spellings),
                                                              tuple(sorted(i for i, _ in samples)))))

    return [group for _, group in sorted(groups, key=lambda pair: (-pair[1].count, pair[0]))]


def _most_frequent(samples: list[tuple[int, str]]) -> str:
    return _by_frequency([a for _, a in sorted(samples)])[0]


def _equivalent_both_ways(equivalent: Equivalence, a: str, b: str) -> bool:
    """Whether two wrong answers are one vote: ``equivalent`` as answer against reference in both orders, since a
    checker such as math_equal need not be symmetric (it takes ``(2,3)`` for the reference ``3, 2``, not the
    reverse), and which of the two is the larger group must not decide it."""
    return _safe_equivalent(equivalent, a, b) and _safe_equivalent(equivalent, b, a)


def _safe_equivalent(equivalent: Equivalence, a: str, b: str) -> bool:
    try:
        return bool(equivalent(a, b))
    except Exception:  # noqa: BLE001 - a checker failing on odd input means "not shown equivalent"
        return False


def classify(
    pass_rate: float,
    majority_share: float,
    majority_matches_reference: bool,
    thresholds: AuditThresholds,
    *,
    majority_tied: bool = False,
) -> str:
    """The verdict of one prompt (see the module notes): ``"looks_wrong"``, ``"hard"`` or ``"ok"``.
    ``majority_tied``: another answer is as common as the majority answer, which is then no consensus."""
    for name, value in (("pass_rate", pass_rate), ("majority_share", majority_share)):
        if not is_real_number(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"classify: {name} must be a number in [0, 1], got {value!r}")
    if pass_rate > thresholds.low_pass_rate:
        return "ok"
    if not majority_matches_reference and not majority_tied and majority_share >= thresholds.consensus:
        return "looks_wrong"
    return "hard"


def audit_prompt(
    answers: Sequence[str | None],
    correct: Sequence[bool],
    *,
    equivalent: Equivalence | None = None,
    thresholds: AuditThresholds | None = None,
    reference: str | None = None,
) -> PromptAudit:
    """Audit one prompt from its samples' extracted answers and correctness, and its ``reference`` answer (see
    :func:`group_answers`).

    The pass rate is ``n_correct / n`` over all ``n`` samples (a correct sample without an extractable
    answer still counts as correct); the majority share is the largest group's count over ``n``.
    """
    thresholds = thresholds or AuditThresholds()
    n = len(answers)
    if n == 0:
        raise ValueError("audit_prompt: no samples; expected at least one sampled answer per prompt")
    groups = group_answers(answers, correct, equivalent=equivalent, reference=reference)
    n_correct = sum(1 for ok in correct if ok)
    pass_rate = n_correct / n
    top = groups[0] if groups else None
    share = top.count / n if top else 0.0
    matches = top.matches_reference if top else False
    tied = len(groups) > 1 and groups[1].count == groups[0].count
    return PromptAudit(
        n_samples=n,
        n_correct=n_correct,
        pass_rate=pass_rate,
        majority_answer=top.answer if top else None,
        majority_share=share,
        majority_matches_reference=matches,
        n_unanswered=sum(1 for a in answers if a is None),
        groups=tuple(groups),
        verdict=classify(pass_rate, share, matches, thresholds, majority_tied=tied),
        majority_tied=tied,
    )


def verdict_counts(audits: Sequence[PromptAudit]) -> dict[str, int]:
    """``{verdict: number of prompts}`` for every verdict in :data:`VERDICTS` (zeros included)."""
    counts = dict.fromkeys(VERDICTS, 0)
    for audit in audits:
        counts[audit.verdict] += 1
    return counts


@dataclass(frozen=True)
class PassRateHistogram:
    """How many prompts were solved by ``c`` of ``n`` samples, for ``c = 0 .. n``.

    ``counts[c]`` is the number of prompts with ``c`` correct samples; ``by_verdict[v][c]`` splits that
    count by verdict. ``frac_zero`` / ``frac_one`` are the shares never / always solved.
    """

    n_samples: int
    counts: tuple[int, ...]
    by_verdict: dict[str, tuple[int, ...]] = field(repr=False)

    @property
    def n_prompts(self) -> int:
        return sum(self.counts)

    @property
    def frac_zero(self) -> float:
        return self.counts[0] / self.n_prompts if self.n_prompts else 0.0

    @property
    def frac_one(self) -> float:
        return self.counts[-1] / self.n_prompts if self.n_prompts else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: one bin per ``c`` with its pass rate ``c / n`` and counts, plus the two shares."""
        n = self.n_samples
        return {
            "n_samples": n,
            "n_prompts": self.n_prompts,
            "frac_zero": self.frac_zero,
            "frac_one": self.frac_one,
            "bins": [
                {
                    "correct": c,
                    "pass_rate": c / n,
                    "prompts": self.counts[c],
                    **{verdict: self.by_verdict[verdict][c] for verdict in VERDICTS},
                }
                for c in range(n + 1)
            ],
        }


def pass_rate_histogram(audits: Sequence[PromptAudit]) -> PassRateHistogram:
    """The histogram of correct-sample counts of ``audits``, which must all have the same sample count."""
    if not audits:
        raise ValueError("pass_rate_histogram: no audited prompts")
    sizes = sorted({a.n_samples for a in audits})
    if len(sizes) != 1:
        raise ValueError(f"pass_rate_histogram: prompts have different sample counts {sizes}; expected one n")
    n = sizes[0]
    counts = [0] * (n + 1)
    by_verdict = {verdict: [0] * (n + 1) for verdict in VERDICTS}
    for audit in audits:
        counts[audit.n_correct] += 1
        by_verdict[audit.verdict][audit.n_correct] += 1
    return PassRateHistogram(n, tuple(counts), {v: tuple(c) for v, c in by_verdict.items()})


@dataclass(frozen=True)
class BandSelection:
    """Which rows a pass-rate band keeps: ``keep[i]`` for row ``i``, and the band as written."""

    band: str
    keep: tuple[bool, ...]

    @property
    def kept(self) -> int:
        return sum(self.keep)

    @property
    def dropped(self) -> int:
        return len(self.keep) - self.kept


def band_selection(records: Sequence[PromptRecord], pass_rates: Sequence[float], band: str) -> BandSelection:
    """Mark the records whose pass rate lies in ``band`` (interval notation read by
    :func:`~entrorl.data.filters.parse_band`, e.g. ``"[0.1, 0.5]"`` or ``"(1/16, 15/16)"``).
    ``ValueError`` for a malformed band or mismatched lengths."""
    low, high, inclusive = parse_band(band)
    in_band = pass_rate_band_mask(list(records), pass_rates, low=low, high=high, inclusive=inclusive)
    return BandSelection(band=band, keep=tuple(in_band.tolist()))


# --------------------------------------------------------------------------------------------------
# writing the chosen rows in the input's format
# --------------------------------------------------------------------------------------------------

_LINE_SOURCE = re.compile(r"^(?P<file>.+):(?P<line>\d+)$")
_ROW_SOURCE = re.compile(r"^(?P<file>.+)\[(?P<row>\d+)\]$")


def _locations(records: Sequence[PromptRecord], pattern: re.Pattern[str], group: str, data: Path) -> list[int]:
    out = []
    for i, record in enumerate(records):
        match = pattern.match(record.source)
        if match is None or Path(match.group("file")) != data:
            raise ValueError(
                f"write_selected_rows: record {i} comes from {record.source!r}, not from {data}; "
                "expected records loaded from that file with load_prompts"
            )
        out.append(int(match.group(group)))
    return out


def _atomic_write_bytes(target: Path, payload: bytes) -> None:
    write_atomically(target, lambda handle: handle.write(payload), make_folder=True)


#: The file formats :func:`write_selected_rows` writes (besides saved data set directories): every format
#: :func:`~entrorl.data.load_prompts` reads.
SELECTED_ROWS_SUFFIXES = tuple(_LOADERS)


def check_selected_rows_format(data: str | os.PathLike[str]) -> None:
    """``ValueError`` now, before any sampling, when :func:`write_selected_rows` could not write rows of ``data``
    in its format."""
    data = Path(os.fspath(data))
    if data.is_dir():
        return
    suffix = data.suffix.lower()
    if suffix not in SELECTED_ROWS_SUFFIXES:
        raise ValueError(
            f"cannot write rows of {data} (unsupported format {suffix!r}); the filtered copy is written for "
            f"{', '.join(SELECTED_ROWS_SUFFIXES)} files and saved data set directories"
        )


def _same_path(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def overlaps_input(data: str | os.PathLike[str], target: str | os.PathLike[str]) -> bool:
    """Whether writing ``target`` (links followed) would write over the input ``data``: the same file or folder, a path
    inside the input's folder, or a folder (replaced whole) that holds the input."""
    data_path, target_path = Path(os.path.realpath(data)), Path(os.path.realpath(target))
    return (data_path == target_path or data_path in target_path.parents or target_path in data_path.parents
            or (target_path.exists() and _same_path(data_path, target_path)))


def write_selected_rows(
    data: str | os.PathLike[str], records: Sequence[PromptRecord], keep: Sequence[bool], out: str | os.PathLike[str]
) -> Path:
    """Write the rows of ``data`` whose ``keep`` flag is set to ``out``, in ``data``'s format, every
    original column kept.

    ``records`` must be what :func:`~entrorl.data.load_prompts` returned for ``data`` (their ``source``
    locates each row). ``.jsonl``: the kept lines are copied byte for byte, but for their line ends (``\n``, a
    ``\r\n`` losing its ``\r``) and a leading byte-order mark (dropped). ``.json``: the kept objects (inside
    ``{"data": [...]}`` with the other top-level fields when the input was so wrapped).
    ``.csv``: the header and the kept rows. ``.parquet``: the kept rows of the table. ``.arrow``: the kept rows
    of the table, with its schema, as an Arrow IPC file (or stream, when the input was one). A saved data set
    directory: ``Dataset.select`` of the kept rows, saved with ``save_to_disk`` (a ``DatasetDict``: its splits, the
    ``train`` split, the one read, filtered, the others as they were). The input is only read;
    ``out`` must be another path (``ValueError`` otherwise). Returns ``out``.
    """
    data, target = Path(os.fspath(data)), Path(os.fspath(out))
    if len(keep) != len(records):
        raise ValueError(f"write_selected_rows: {len(records)} records but {len(keep)} keep flags")
    if overlaps_input(data, target):
        raise ValueError(f"write_selected_rows: refusing to write over the input {data} ({target} is it, holds it or "
                         "lies inside it, links followed); choose another path")
    check_selected_rows_format(data)
    chosen = [r for r, k in zip(records, keep) if k]

    if data.is_dir():
        import datasets

        rows = _locations(chosen, _ROW_SOURCE, "row", data)
        splits = saved_splits(data)
        if splits is None:
            selected = datasets.load_from_disk(str(data)).select(rows)
            # save_to_disk writes into the folder in place: a Ctrl-C would leave an earlier copy's state.json naming
            # shards cut short
            write_folder_atomically(target, lambda folder: selected.save_to_disk(str(folder)))
            return target
        # a DatasetDict: 'train' (the split read) filtered, the others copied as they were (one saved without rows,
        # which datasets.load_from_disk cannot read, included)
        train = datasets.load_from_disk(str(data / "train")).select(rows)
        others = [name for name in splits if name != "train"]

        def write_splits(folder: Path) -> None:
            train.save_to_disk(str(folder / "train"))
            for name in others:
                shutil.copytree(data / name, folder / name)
            shutil.copyfile(data / "dataset_dict.json", folder / "dataset_dict.json")

        write_folder_atomically(target, write_splits)
        return target

    suffix = data.suffix.lower()
    if suffix == ".jsonl":
        lines = set(_locations(chosen, _LINE_SOURCE, "line", data))
        raw = data.read_bytes().split(b"\n")
        picked = [line.rstrip(b"\r") for number, line in enumerate(raw, start=1) if number in lines]
        if picked and picked[0].startswith(b"\xef\xbb\xbf"):
            picked[0] = picked[0][3:]
        _atomic_write_bytes(target, b"".join(line + b"\n" for line in picked))
    elif suffix == ".json":
        rows = set(_locations(chosen, _ROW_SOURCE, "row", data))
        document = json.loads(data.read_text(encoding="utf-8-sig"))
        items = document["data"] if isinstance(document, dict) else document
        selected = [item for index, item in enumerate(items) if index in rows]
        document = {**document, "data": selected} if isinstance(document, dict) else selected
        _atomic_write_bytes(target, (json.dumps(document, ensure_ascii=False, indent=1) + "\n").encode())
    elif suffix == ".csv":
        lines = set(_locations(chosen, _LINE_SOURCE, "line", data))
        # read as the loader reads it (Path.read_text would turn a "\r\n" inside a quoted field into "\n")
        text = _read_text(data)
        reader = csv.reader(io.StringIO(text, newline=""))
        buffer = io.StringIO(newline="")
        plain = csv.writer(buffer, lineterminator="\n")
        quoted = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_ALL)  # minimal quoting leaves a lone "\r" bare

        def write(row: list[str]) -> None:
            (quoted if any("\r" in value for value in row) else plain).writerow(row)

        header_written, previous_end = False, 0
        with _csv_fields_up_to(len(text)):
            for row in reader:
                start, previous_end = previous_end + 1, reader.line_num
                if not row:
                    continue
                if not header_written:
                    write(row)
                    header_written = True
                elif start in lines:
                    write(row)
        _atomic_write_bytes(target, buffer.getvalue().encode("utf-8"))
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = pa.array(_locations(chosen, _ROW_SOURCE, "row", data), type=pa.int64())  # typed: no rows at all too
        sink = pa.BufferOutputStream()
        pq.write_table(pq.read_table(data).take(rows), sink)
        _atomic_write_bytes(target, sink.getvalue().to_pybytes())  # as the other formats: never a half-written file
    else:  # .arrow
        import pyarrow as pa

        rows = pa.array(_locations(chosen, _ROW_SOURCE, "row", data), type=pa.int64())
        table, is_stream = read_arrow_ipc(data)
        kept = table.take(rows)
        sink = pa.BufferOutputStream()
        with (pa.ipc.new_stream if is_stream else pa.ipc.new_file)(sink, kept.schema) as writer:
            writer.write_table(kept)
        _atomic_write_bytes(target, sink.getvalue().to_pybytes())
    return target
