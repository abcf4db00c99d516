"""The data audit: sample a model on every prompt of a data set, score and group its answers, and write
what a person needs to clean the data.

:func:`audit_records` samples ``n`` completions per prompt (batched, with a private seed), scores them
with a reward, extracts each completion's final answer with the extractor that belongs to the reward
(:func:`answer_tools`) and audits each prompt with :func:`entrorl.data.audit.audit_prompt`: pass rate,
majority answer and its share, verdict ``ok`` / ``hard`` / ``looks_wrong``. Prompts that do not fit in
the model's context together with ``max_new_tokens`` are not sampled; they are reported.

:func:`write_audit_outputs` writes, into one directory (the input is only read):

* ``pass_rate_histogram.json`` / ``.png`` — prompts per number of correct samples ``0 .. n``, split
  by verdict;
* ``suspected_wrong.jsonl`` — the ``looks_wrong`` prompts with their reference, majority answer, its
  share, pass rate, the sampled answers and two completions that reached the majority answer;
* ``audit.jsonl`` — the same fields for every prompt;
* ``<name>.filtered<ext>`` — the rows whose pass rate lies in the band, in the input's format with
  every original column (suspected-wrong rows are left out unless ``keep_wrong``);
* ``summary.json`` — counts per verdict, the band's kept / dropped rows, the prompts too long.

:func:`check_audit_output` checks, before any sampling, that all this can be written. A reward that failed on every
sample leaves nothing to label: :func:`write_audit_outputs` then refuses, writing nothing.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from entrorl._checks import check_int
from entrorl._files import naming_file, put_in_place_together, staging_folder
from entrorl.data import PromptRecord
from entrorl.data.audit import (
    AuditThresholds,
    PassRateHistogram,
    PromptAudit,
    audit_prompt,
    band_selection,
    canonical_answer,
    check_selected_rows_format,
    overlaps_input,
    pass_rate_histogram,
    verdict_counts,
    write_selected_rows,
)
from entrorl.data.loading import check_output_directory
from entrorl.rewards import (
    CodeReward,
    MathReward,
    ReasoningGymReward,
    RewardRunner,
    error_headline,
    exact_match,
    extract_final_answer,
    extract_reasoning_gym_answer,
    math_equal,
)
from entrorl.modeling import model_context_length
from entrorl.rollout import HFSampler, SamplingParams, private_seed
from entrorl.trainer.evaluate import refuse_non_finite_log_probs

__all__ = [
    "AuditOutputs",
    "AuditResult",
    "TooLongPrompt",
    "answer_tools",
    "audit_records",
    "check_audit_output",
    "default_audit_dir",
    "model_context_length",
    "plot_pass_rate_histogram",
    "write_audit_outputs",
]

Extractor = Callable[[str], "str | None"]
Equivalence = Callable[[str, str], bool]


def answer_tools(reward_fn: Any) -> tuple[Extractor, Equivalence]:
    """The answer extractor and the answer equivalence that go with a reward.

    ``math``: :func:`~entrorl.rewards.extract_final_answer` with the reward's extractors and :func:`~entrorl.rewards.math_equal`
    with the reward's own options (so ``0.5``, ``1/2`` and ``\\frac{1}{2}`` are one answer);
    ``reasoning_gym``: its ``<answer>`` extractor (with the reward's ``strict``) and equality of spellings; ``code``: no answer (a program has none:
    its prompts are never ``looks_wrong``); ``exact_match`` and any
    other reward: the final-answer extractor (the whole completion when it finds nothing, for
    ``exact_match``) and equality of spellings up to case, whitespace and Unicode NFC.
    """
    if isinstance(reward_fn, MathReward):
        options, extractors = reward_fn.options, reward_fn.extractors  # the reward's own extractors, in its order
        return lambda completion: extract_final_answer(completion, extractors), lambda a, b: math_equal(a, b, options=options)
    if isinstance(reward_fn, ReasoningGymReward):  # strict: only <answer> tags, as the reward reads them
        return functools.partial(extract_reasoning_gym_answer, strict=reward_fn.strict), _same_spelling
    if isinstance(reward_fn, CodeReward):  # programs have no final answer to agree on (the last number in them is none)
        return _no_answer, _same_spelling
    if reward_fn is exact_match:
        return lambda completion: extract_final_answer(completion) or (completion.strip() or None), _same_spelling
    return extract_final_answer, _same_spelling


def _no_answer(completion: str) -> None:
    return None


def _same_spelling(a: str, b: str) -> bool:
    return canonical_answer(a) == canonical_answer(b)


@dataclass(frozen=True)
class TooLongPrompt:
    """A prompt left out of the audit: ``prompt_tokens + max_new_tokens`` exceeds ``context_length``."""

    index: int
    source: str
    prompt_tokens: int
    context_length: int

    def message(self, max_new_tokens: int) -> str:
        return (
            f"{self.source}: the prompt has {self.prompt_tokens} tokens; with max_new_tokens={max_new_tokens} "
            f"it exceeds the model's context of {self.context_length} tokens (not sampled)"
        )


@dataclass
class AuditResult:
    """``audits[i]`` belongs to ``records[i]`` (None for a prompt that was too long); ``completions[i]``
    are its sampled completions and ``answers[i]`` their extracted answers."""

    records: list[PromptRecord]
    audits: list[PromptAudit | None]
    completions: list[list[str]]
    answers: list[list[str | None]]
    too_long: list[TooLongPrompt]
    n: int
    reasons: list[list[str | None]] = field(default_factory=list)  # the reward's reason for each completion
    correct: list[list[bool]] = field(default_factory=list)  # the reward's judgement of each completion
    thresholds: AuditThresholds = field(default_factory=AuditThresholds)  # those the verdicts were given with
    reward_errors: int = 0
    first_reward_error: str | None = None
    wall_s: float = 0.0

    def audited(self) -> list[PromptAudit]:
        return [a for a in self.audits if a is not None]

    def histogram(self) -> PassRateHistogram:
        return pass_rate_histogram(self.audited())

    def counts(self) -> dict[str, int]:
        return {**verdict_counts(self.audited()), "too_long": len(self.too_long)}

    @property
    def n_sampled(self) -> int:
        """How many samples were drawn and scored (those of the prompts that fit the context)."""
        return sum(audit.n_samples for audit in self.audited())

    @property
    def reward_failed_everywhere(self) -> bool:
        """Whether the reward failed (raised, or returned no number) on every sample: then every score is a 0 that
        says nothing about the answers, and no prompt can be labelled."""
        return self.n_sampled > 0 and self.reward_errors >= self.n_sampled


@torch.no_grad()
def audit_records(
    model,
    tokenizer,
    records: Sequence[PromptRecord],
    prompt_ids: Sequence[Sequence[int]],
    reward: RewardRunner,
    *,
    n: int,
    sampling: SamplingParams,
    thresholds: AuditThresholds | None = None,
    seed: int = 0,
    batch_size: int = 64,
    extract: Extractor | None = None,
    equivalent: Equivalence | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> AuditResult:
    """Sample ``n`` completions for every prompt that fits the context, score and audit them.

    ``prompt_ids[i]`` are the token ids of ``records[i]`` as the model sees it. Generation calls hold
    about ``batch_size`` rows (whole prompts' groups); ``progress(done, total)`` is called with the
    number of samples done and to do after each call. The sampling seed is private: the caller's RNG state is restored.
    ``extract`` / ``equivalent`` default to :func:`answer_tools` of the reward; ``equivalent(answer, reference)`` is
    asked answer first, as a reward asks its checker.
    """
    n = check_int(n, "audit_records: n", minimum=1)
    batch_size = check_int(batch_size, "audit_records: batch_size", minimum=1)
    if len(prompt_ids) != len(records):
        raise ValueError(f"audit_records: {len(records)} records but {len(prompt_ids)} tokenized prompts")
    if not records:
        raise ValueError("audit_records: no prompts to audit")
    default_extract, default_equivalent = answer_tools(reward.fn)
    extract = extract or default_extract
    equivalent = equivalent or default_equivalent
    thresholds = thresholds or AuditThresholds()
    started = time.perf_counter()

    context = model_context_length(model)
    too_long = [
        TooLongPrompt(i, records[i].source, len(ids), context)
        for i, ids in enumerate(prompt_ids)
        if context is not None and len(ids) + sampling.max_new_tokens > context
    ]
    skipped = {t.index for t in too_long}
    todo = [i for i in range(len(records)) if i not in skipped]

    result = AuditResult(
        records=list(records), audits=[None] * len(records), completions=[[] for _ in records],
        answers=[[] for _ in records], too_long=too_long, n=n, reasons=[[] for _ in records], correct=[[] for _ in records],
        thresholds=thresholds,
    )
    sampler = HFSampler.for_model(model, tokenizer, batch_size=batch_size)
    prompts_per_call = max(1, batch_size // n)
    done = 0
    with private_seed(seed, next(model.parameters()).device):
        for start in range(0, len(todo), prompts_per_call):
            chunk = todo[start : start + prompts_per_call]
            rollouts = sampler.generate([prompt_ids[i] for i in chunk for _ in range(n)], sampling)
            refuse_non_finite_log_probs(rollouts, model)
            completions = tokenizer.batch_decode(rollouts.completion_ids(), skip_special_tokens=True)
            repeated = [records[i] for i in chunk for _ in range(n)]
            scored = reward([r.prompt for r in repeated], completions, [r.answer for r in repeated],
                            [r.meta for r in repeated], rollouts.lengths.tolist(), sources=[r.source for r in repeated],
                            sample_numbers=[row % n for row in range(len(repeated))])  # as entrorl eval numbers them
            result.reward_errors += scored.errors
            result.first_reward_error = result.first_reward_error or scored.first_error
            correct = scored.correct.tolist()
            for position, index in enumerate(chunk):
                own = slice(position * n, (position + 1) * n)
                answers = [extract(c) for c in completions[own]]
                result.completions[index] = completions[own]
                result.answers[index] = answers
                result.reasons[index] = scored.reasons[own]
                result.correct[index] = [bool(ok) for ok in correct[own]]
                result.audits[index] = audit_prompt(answers, correct[own], equivalent=equivalent, thresholds=thresholds,
                                                    reference=records[index].answer)
            done += len(chunk) * n
            if progress is not None:
                progress(done, len(todo) * n)
    result.wall_s = time.perf_counter() - started
    return result


def _with_folder_name(data: str | os.PathLike[str]) -> Path:
    """``data`` as a path whose last part is its name: ``.`` or ``..`` (a saved data set one is in) as the absolute
    path, whose last part is the folder's own name."""
    path = Path(os.fspath(data))
    return Path(os.path.abspath(path)) if path.name in ("", "..") else path


def default_audit_dir(data: str | os.PathLike[str]) -> Path:
    """Where the outputs go by default: ``<data's folder>/<data's name without extension>.audit``."""
    data = _with_folder_name(data)
    stem = data.name if data.is_dir() else data.stem
    return data.parent / f"{stem}.audit"


def _stage_text(final: Path, staging: Path, text: str) -> None:
    """``text`` as the file of ``final``'s name in ``staging``; an error names ``final``."""
    staged = staging / final.name
    try:
        # a path that is not UTF-8: \\udcXX, which in JSON is the escape that reads back to it
        staged.write_text(text, encoding="utf-8", errors="backslashreplace")
    except OSError as error:
        raise naming_file(error, final, instead_of=staged) from None


def _filtered_name(data: Path) -> str:
    data = _with_folder_name(data)
    return f"{data.name}.filtered" if data.is_dir() else f"{data.stem}.filtered{data.suffix}"


def check_audit_output(data: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Check before sampling that :func:`write_audit_outputs` can write into ``out`` (default
    :func:`default_audit_dir`): a directory outside the input that can be created and written, and a filtered copy
    that can be written in the input's format. ``ValueError`` saying what is wrong; returns the directory."""
    data = Path(os.fspath(data))
    directory = Path(os.fspath(out)) if out is not None else default_audit_dir(data)
    _check_out_dir(data, directory)
    check_selected_rows_format(data)
    check_output_directory(directory, what="the audit output directory")
    _check_output_paths(data, directory)
    return directory


#: where `entrorl data audit` keeps the reward's first traceback, in the output directory
REWARD_ERRORS_LOG = "reward_errors.log"
#: the files an audit writes into its output directory, besides the filtered copy of the input
AUDIT_FILES = ("pass_rate_histogram.json", "pass_rate_histogram.png", "audit.jsonl", "suspected_wrong.jsonl",
               "summary.json", REWARD_ERRORS_LOG)


def _check_out_dir(data: Path, out: Path) -> None:
    data_resolved, out_resolved = data.resolve(), out.resolve()
    if out_resolved == data_resolved or (data.is_dir() and data_resolved in out_resolved.parents):
        raise ValueError(
            f"the audit output directory {out} would be written inside the input {data}; "
            "choose another --out (the input is never modified)"
        )
    if data_resolved.parent == out_resolved and data_resolved.name in (*AUDIT_FILES, _filtered_name(data)):
        raise ValueError(
            f"the audit would write its {data_resolved.name} into {out}, over the input {data}"
            + (f" (a link to {data_resolved})" if data_resolved.name != data.name else "")
            + "; choose another --out (the input is never modified)"
        )
    if out.exists() and not out.is_dir():
        raise ValueError(f"the audit output path {out} exists and is not a directory; choose another --out")


def _check_output_paths(data: Path, out: Path) -> None:
    """No folder stands where the audit writes one of its files, and for the filtered copy, no file where a saved data
    set's copy (a folder) goes or folder where a file's goes: found after sampling, it would cost the whole audit."""
    if not out.is_dir():
        return
    for path in (*(out / name for name in AUDIT_FILES), out / _filtered_name(data)):
        if overlaps_input(data, path):
            raise ValueError(f"{path} is a link to the input {data} (or to a path that holds it or lies in it): the "
                             "audit would write over the input; remove the link or choose another --out (the input is "
                             "never modified)")
    for name in AUDIT_FILES:
        if (out / name).is_dir():
            raise ValueError(f"{out / name} is a folder, where the audit writes its {name}; move it or choose another "
                             "--out")
    filtered = out / _filtered_name(data)
    if filtered.exists() and filtered.is_dir() != data.is_dir():
        raise ValueError(f"{filtered} is a {'folder' if filtered.is_dir() else 'file'}, where the audit writes the "
                         f"filtered copy of {data} (a {'folder' if data.is_dir() else 'file'}); move it or choose "
                         "another --out")


def _row(record: PromptRecord, audit: PromptAudit, completions: list[str], reasons: list[str | None]) -> dict[str, Any]:
    """One line of ``audit.jsonl``: where the prompt is, the prompt and reference, the audit, up to two
    completions that reached the majority answer (the majority group's own samples: one spelling can be right alone
    and wrong in a sentence), and the reward's most common reasons for a 0."""
    examples = [completions[i] for i in audit.groups[0].samples[:2]] if audit.groups else []
    return {
        "source": record.source,
        "prompt": record.prompt,
        **record.conversation(),
        "reference": record.answer,
        **audit.to_dict(),
        "majority_examples": examples,
        "reject_reasons": Counter(reason for reason in reasons if reason).most_common(3),
    }


def plot_pass_rate_histogram(histogram: PassRateHistogram, path: str | os.PathLike[str], *, title: str = "") -> Path:
    """Save a bar chart of prompts per pass rate ``c/n``, stacked by verdict, as a PNG."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    n = histogram.n_samples
    figure = Figure(figsize=(max(4.0, 0.32 * (n + 1) + 1.5), 3.0), dpi=120)
    axes = figure.add_subplot()
    positions = list(range(n + 1))
    bottom = [0] * (n + 1)
    colours = {"ok": "#4c78a8", "hard": "#f2a33a", "looks_wrong": "#d6453d"}
    labels = {"ok": "ok", "hard": "hard", "looks_wrong": "looks wrong"}
    for verdict, colour in colours.items():
        counts = histogram.by_verdict[verdict]
        axes.bar(positions, counts, bottom=bottom, color=colour, label=labels[verdict], width=0.85)
        bottom = [b + c for b, c in zip(bottom, counts)]
    step = max(1, (n + 1) // 12)
    axes.set_xticks(positions[::step], [f"{c}/{n}" for c in positions[::step]], fontsize=7)
    axes.set_xlabel("pass rate (correct samples / n)")
    axes.set_ylabel("prompts")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    title = title or f"{histogram.n_prompts} prompts x {n} samples"
    # a file name that is not UTF-8 (surrogates), which matplotlib cannot draw
    axes.set_title(title.encode("utf-8", "backslashreplace").decode("utf-8"), fontsize=9)
    axes.legend(fontsize=7, frameon=False)
    figure.tight_layout()
    path = Path(os.fspath(path))
    figure.savefig(path)
    return path


@dataclass
class AuditOutputs:
    """Paths written by :func:`write_audit_outputs` and the summary saved in ``summary.json``."""

    directory: Path
    histogram_json: Path
    histogram_png: Path | None
    suspected_wrong: Path
    per_prompt: Path
    filtered: Path
    summary_json: Path
    summary: dict[str, Any] = field(default_factory=dict)
    reward_errors_log: Path | None = None  # the reward's first failure's traceback, when it failed on some samples


def write_audit_outputs(
    result: AuditResult,
    data: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    band: str = "(0, 1)",
    keep_wrong: bool = False,
    thresholds: AuditThresholds | None = None,
    settings: dict[str, Any] | None = None,
    plot: bool = True,
) -> AuditOutputs:
    """Write the audit's files (see the module notes) into ``out`` (default :func:`default_audit_dir`).

    ``band`` chooses the rows of the filtered file by pass rate; too-long prompts have none and are
    dropped; suspected-wrong rows are dropped too unless ``keep_wrong``. ``settings`` (model, reward,
    sampling, ...) are the summary's ``settings``, as in ``entrorl eval``'s summary; beside them, the thresholds the
    verdicts were given with (``result``'s;
    ``thresholds``, when given, must be those). ``ValueError`` (and nothing written) for a malformed band, other
    thresholds than the result's, an output directory inside the input, no prompt that fit the context, or a reward
    that failed on every sample. The files (``reward_errors.log`` with the reward's first failure when it failed on
    some samples) go in as one set: an ``OSError`` or an interrupt while they are written leaves an earlier audit's
    set in ``out`` as it was, and the files of an earlier set this one has not are removed.
    """
    if thresholds is not None and thresholds != result.thresholds:
        raise ValueError(f"write_audit_outputs: the verdicts were given with {result.thresholds}, not {thresholds}; "
                         "audit again with those thresholds")
    data = Path(os.fspath(data))
    directory = Path(os.fspath(out)) if out is not None else default_audit_dir(data)
    _check_out_dir(data, directory)
    _check_output_paths(data, directory)  # also here: the Python API may be called without check_audit_output
    audited_index = [i for i, a in enumerate(result.audits) if a is not None]
    if not audited_index:
        raise ValueError("no prompt could be audited: no prompt leaves room in the model's context for its response "
                         "(--max-new-tokens); shorten the prompts, filter them out, or lower --max-new-tokens")
    if result.reward_failed_everywhere:
        first = error_headline(result.first_reward_error)
        raise ValueError(
            f"the reward failed on all {result.n_sampled} samples (first failure: {first}), so every score is 0 "
            "whatever the answer; no prompt was labelled and no filtered file was written; check that the "
            "reward suits this data (its columns, its answers)"
        )
    audited_records = [result.records[i] for i in audited_index]
    selection = band_selection(audited_records, [result.audits[i].pass_rate for i in audited_index], band)
    directory.mkdir(parents=True, exist_ok=True)

    keep = [False] * len(result.records)
    dropped_as_wrong = 0
    for index, in_band in zip(audited_index, selection.keep):
        wrong = result.audits[index].verdict == "looks_wrong"
        if in_band and wrong and not keep_wrong:
            dropped_as_wrong += 1
        keep[index] = in_band and (keep_wrong or not wrong)

    # The set is written into a folder of its own inside ``directory``, then put in place as one set (the summary last):
    # a failure on the way (a full disk) or an interrupt leaves an earlier audit's set as it was, not mixed with this one.
    with staging_folder(directory, "audit") as staging:
        histogram = result.histogram()
        histogram_json = directory / "pass_rate_histogram.json"
        _stage_text(histogram_json, staging, json.dumps(histogram.to_dict(), indent=1) + "\n")
        histogram_png = None
        if plot:
            staged_png = plot_pass_rate_histogram(histogram, staging / "pass_rate_histogram.png",
                                                  title=f"{data.name}: {histogram.n_prompts} prompts x {result.n} samples")
            histogram_png = directory / staged_png.name if staged_png else None

        rows = [
            _row(result.records[i], result.audits[i], result.completions[i], result.reasons[i] if result.reasons else [])
            for i in audited_index
        ]
        per_prompt = directory / "audit.jsonl"
        _stage_text(per_prompt, staging, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        suspected_wrong = directory / "suspected_wrong.jsonl"
        _stage_text(suspected_wrong, staging,
                    "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows if row["verdict"] == "looks_wrong"))
        filtered = directory / _filtered_name(data)
        try:
            write_selected_rows(data, result.records, keep, staging / filtered.name)
        except OSError as error:
            raise naming_file(error, filtered, instead_of=staging / filtered.name) from None
        audits = result.audited()
        summary = {
            "data": str(data),
            "settings": dict(settings or {}),
            "n": result.n,
            "thresholds": asdict(result.thresholds),
            "prompts": len(result.records),
            "audited": len(audits),
            "counts": result.counts(),
            "mean_pass_rate": sum(a.pass_rate for a in audits) / len(audits),
            "frac_zero": histogram.frac_zero,
            "frac_one": histogram.frac_one,
            "band": {
                "band": band,
                "in_band": selection.kept,
                "out_of_band": selection.dropped,
                "dropped_as_wrong": dropped_as_wrong,
                "dropped_too_long": len(result.too_long),
                "kept": sum(keep),
                "dropped": len(keep) - sum(keep),
                "keep_wrong": keep_wrong,
                "file": str(filtered),
            },
            "too_long": [asdict(t) for t in result.too_long],
            "reward_errors": result.reward_errors,
            "first_reward_error": error_headline(result.first_reward_error) or None,
            "wall_s": result.wall_s,
            "files": {
                "histogram_json": str(histogram_json),
                "histogram_png": str(histogram_png) if histogram_png else None,
                "suspected_wrong": str(suspected_wrong),
                "per_prompt": str(per_prompt),
                "filtered": str(filtered),
            },
        }
        reward_errors_log = directory / REWARD_ERRORS_LOG if result.first_reward_error is not None else None
        if reward_errors_log is not None:  # the first failure's traceback
            _stage_text(reward_errors_log, staging, result.first_reward_error + "\n")
        summary_json = directory / "summary.json"
        _stage_text(summary_json, staging, json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
        names = [path.name for path in (histogram_json, histogram_png, per_prompt, suspected_wrong, filtered,
                                        reward_errors_log, summary_json) if path is not None]
        stale = [*([] if histogram_png else ["pass_rate_histogram.png"]), *([] if reward_errors_log else [REWARD_ERRORS_LOG])]
        put_in_place_together(staging, directory, names, stale=stale)
    return AuditOutputs(directory, histogram_json, histogram_png, suspected_wrong, per_prompt, filtered, summary_json, summary,
                        reward_errors_log)
