"""The laboratory report: ``report.md`` (with PNG figures), a self-contained ``report.html`` and
``report.json``, generated from a lab run directory and nothing else.

Inputs (see :mod:`entrorl.lab.runner`)::

    lab.json                          preset, base model key, methods, workers, invocations (start and end times)
    base/final_eval.json              the base model's final evaluation
    methods/<name>/metrics.jsonl      one JSON object per training step
    methods/<name>/final_eval.json    the method's final evaluation (absent when the method failed)
    methods/<name>/error.log          the traceback of a failed method
    outcomes.json                     the runner's per-method outcome (optional)

Every number is computed here from those files and formatted once (:func:`fmt`, three significant
figures) into :class:`Table` cells; the Markdown, the HTML and ``report.json`` are all rendered from the
same cells, so the three cannot disagree. The prose is generated from the same values: nothing in the
report is written by hand.

The rules the report applies (and states) are module constants: start and end of a run are the means
over the first and last :data:`EDGE_FRACTION` of its steps; GRPO's entropy has collapsed when the mean token
entropy of its final evaluation is at most :data:`COLLAPSE_RATIO` times the base model's on the same evaluation (when
either is missing: the end of its training curve against the curve's start); a method *kept entropy* when its end/start entropy
ratio is at least :data:`KEPT_MARGIN` times GRPO's (both verdicts compare the numbers as the report shows them, to
3 significant figures, so a verdict never contradicts the values printed beside it); curves are smoothed with a trailing moving average of
:data:`SMOOTH_WINDOW` steps; a method whose own intervention (:func:`intervention_keys`) was 0 at every logged
step is flagged as never having acted.

The report covers every method of the run directory: those ``lab.json`` lists (all the invocations on the folder)
and any other ``methods/<name>/`` holding results.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from entrorl.analysis.document import (NA, NOT_APPLICABLE, Cell, Figures, Heading, Paragraph, Section, Table, TableBlock,
                                       agreement_cell, build_section, colours, dash, finite, fmt, fork_context,
                                       json_value, missing, num, power_of_ten, render_html, render_markdown, subplot_grid,
                                       text, write_report_files)
from entrorl.analysis.run import (COLLAPSE_RATIO, COV_PERCENTS, EDGE_FRACTION, ENTROPY_KEY, FALLBACK_REWARD_KEY,
                                  FORKS_SHOWN, LAW_COLUMNS, MIN_CEILING_STEPS, REWARD_KEY, SMOOTH_WINDOW, MetricRecords,
                                  analyse_records, edge_count, edge_means, edge_phrase, intervention_keys,
                                  last_steps_phrase, law_cells, moving_average, nanmedian, read_json,
                                  read_metrics_records, sparse_edges_phrase)
from entrorl.analysis.run import ratio as ratio_of
from entrorl.analysis.run_report import lab_command, lab_imports
from entrorl.dynamics import top_token_count
from entrorl.evaluation import polarisation

__all__ = [
    "write_report",
    "fmt",
    "edge_means",
    "edge_count",
    "edge_phrase",
    "intervention_keys",
    "moving_average",
    "Table",
    "ENTROPY_KEY",
    "REWARD_KEY",
    "EDGE_FRACTION",
    "COLLAPSE_RATIO",
    "KEPT_MARGIN",
    "SMOOTH_WINDOW",
    "MIN_CEILING_STEPS",
    "SECTIONS",
]

KEPT_MARGIN = 1.25
# a collapse ratio within this share of COLLAPSE_RATIO is said to be close to it: over three training seeds of the
# default laboratory GRPO's evaluation entropy ratio spread over 0.38-0.44 on one CPU and 0.45-0.54 on another
NEAR_THRESHOLD = 0.1
SUMMARY_MIDDLE_K = 8  # shown in the summary beside Pass@1 and the largest k
WALL_CLOCK_LABEL = "wall clock, summed over the invocations that ran something (s)"
CPU_KERNELS_LABEL = "CPU kernels (torch)"
SD_OTHERS = 3  # methods besides base and GRPO in the S/D figure
PASS_RATE_BINS = 10
REFERENCE = "grpo"
# quantities of the headline's number table that scripts read from report.json
HEADLINE_REWARD_START = "GRPO training reward start"
HEADLINE_REWARD_END = "GRPO training reward end"
HEADLINE_EVAL_ENTROPY_RATIO = "GRPO evaluation entropy / base"
HEADLINE_COLLAPSE_PREFIX = "collapse ("  # then the criterion, which depends on whether the run evaluated the base model

SECTIONS = (
    ("headline", "Headline"),
    ("summary", "Summary"),
    ("curves", "Entropy and reward curves"),
    ("pass-at-k", "Pass@k"),
    ("law", "Entropy–reward law"),
    ("entropy-change", "Predicted vs measured entropy change"),
    ("covariance", "Covariance concentration"),
    ("distributions", "S/D distributions"),
    ("pass-rates", "Pass-rate polarisation"),
    ("forks", "Top fork tokens"),
    ("reproduce", "Reproduce"),
)


def _shown(value: Any) -> float | None:
    """The value as the report shows it (rounded by :func:`fmt`), for comparisons stated in the text."""
    return finite(fmt(value)) if finite(value) is not None else None


# ------------------------------------------------------------------------------------------------ reading the run


@dataclass
class Run(MetricRecords):
    """One method's files: its step records, its final evaluation, and its status."""

    name: str
    status: str  # "ok" (final evaluation present), "failed" (error recorded) or "missing"
    records: list[dict[str, Any]]
    final: dict[str, Any] | None
    error: str | None = None
    unreadable_lines: list[int] = field(default_factory=list)  # of metrics.jsonl, skipped


def _methods_with_results(out: Path) -> list[str]:
    """The method folders under ``methods/`` that hold a result (evaluation, step records or an error), by name."""
    directory = out / "methods"
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir()
                  if p.is_dir() and any((p / f).exists() for f in ("final_eval.json", "metrics.jsonl", "error.log")))


def _load_run(out: Path, name: str, outcomes: dict[str, Any]) -> Run:
    directory = out / "methods" / name
    final = read_json(directory / "final_eval.json")
    records, unreadable, _ = read_metrics_records(directory / "metrics.jsonl")  # a lab run cuts its log back on resuming
    if isinstance(final, dict):
        return Run(name, "ok", records, final, unreadable_lines=unreadable)
    error = None
    log = directory / "error.log"
    if log.exists():
        lines = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        error = lines[-1].strip() if lines else "error.log is empty"
    elif isinstance(outcomes.get(name), dict) and outcomes[name].get("status") == "failed":
        lines = [line for line in str(outcomes[name].get("error", "")).splitlines() if line.strip()]
        error = lines[-1].strip() if lines else "failed"
    if error is not None:
        return Run(name, "failed", records, None, error, unreadable)
    if (directory / "final_eval.json").exists():
        return Run(name, "missing", records, None, "final_eval.json cannot be read (cut short?) and there is no "
                   "error.log", unreadable)
    outcome = outcomes.get(name) if isinstance(outcomes.get(name), dict) else {}
    if outcome.get("status") == "interrupted":
        saved = f", saved at step {outcome['step']}" if isinstance(outcome.get("step"), int) else ""
        return Run(name, "missing", records, None, f"interrupted{saved}: running the laboratory's command again "
                   "continues it", unreadable)
    return Run(name, "missing", records, None, "no final_eval.json and no error.log (interrupted?)", unreadable)


# ------------------------------------------------------------------------------------------------ the report


class _Report:
    def __init__(self, out: Path, figures: bool = True):
        self.out = out
        self.errors: dict[str, str] = {}
        lab = read_json(out / "lab.json")
        self.lab = lab if isinstance(lab, dict) else {}
        self.preset = self.lab.get("preset") if isinstance(self.lab.get("preset"), dict) else {}
        outcomes = read_json(out / "outcomes.json")
        self.outcomes = outcomes if isinstance(outcomes, dict) else {}
        names = [str(n) for n in (self.lab.get("methods") or self.preset.get("methods") or [])]
        self.names = list(dict.fromkeys(names + [n for n in _methods_with_results(out) if n not in names]))
        self.runs = {name: _load_run(out, name, self.outcomes) for name in self.names}
        base = read_json(out / "base" / "final_eval.json")
        self.base = base if isinstance(base, dict) else None
        # the base model's evaluation, there but cut short: left out, and said
        self.base_unreadable = not self.base and (out / "base" / "final_eval.json").exists()
        self.fit_fraction = finite(self.preset.get("law_fit_fraction")) or 0.2
        self.analyses = {name: analyse_records(run, self.fit_fraction, name) for name, run in self.runs.items() if run.status == "ok"}
        self.ok = [name for name in self.names if name in self.analyses]
        self.failed = [name for name in self.names if self.runs[name].status != "ok"]
        self.evals = {"base": self.base} if self.base else {}
        self.evals.update({name: self.runs[name].final for name in self.ok})
        self.ks = self._common_ks()
        self.k_max = self.ks[-1] if self.ks else None
        self.k_label = str(self.k_max) if self.k_max is not None else "k"  # in column names: no evaluation has one
        self.colours = colours(self.ok)
        self.figures = Figures(out / "figures", enabled=figures)
        self.json: dict[str, Any] = {}

    # ---------------------------------------------------------------- helpers
    def _common_ks(self) -> list[int]:
        """The ks every evaluation that has Pass@k at all has (one without shows n/a, and does not empty the list)."""
        sets = []
        for model in self.evals:
            keys = {int(k) for k in self._pass_at_k(model) if str(k).isdigit()}
            if keys:
                sets.append(keys)
        return sorted(set.intersection(*sets)) if sets else []

    def pass_at(self, model: str, k: int | None) -> float:
        evaluation = self.evals.get(model)
        if evaluation is None or k is None:
            return math.nan
        value = finite(self._pass_at_k(model).get(str(k)))
        return value if value is not None else math.nan

    def _pass_at_k(self, model: str) -> dict:
        """The evaluation's ``pass_at_k`` mapping; an empty one where it is missing or is no mapping (a damaged file)."""
        values = (self.evals.get(model) or {}).get("pass_at_k")
        return values if isinstance(values, dict) else {}

    def eval_value(self, model: str, key: str) -> float:
        evaluation = self.evals.get(model) or {}
        value = finite(evaluation.get(key))
        return value if value is not None else math.nan

    def models(self) -> list[str]:
        return (["base"] if self.base else []) + self.ok

    def reward_label(self) -> str:
        keys = sorted({self.analyses[n].run.reward_key for n in self.ok}) or [REWARD_KEY]
        return " / ".join(f"`{k}`" for k in keys)

    def law_end_phrase(self) -> str:
        """The points the law's 'forecast error, end' averages: the last steps, in words, when every method's entropy
        and reward are finite at every step; else the last share of the steps where both are (``law_of``)."""
        if all(self.analyses[n].law.get("n_points") == self.analyses[n].n_steps for n in self.ok):
            return last_steps_phrase({self.analyses[n].n_steps for n in self.ok})
        return (f"the last {fmt(100 * EDGE_FRACTION)}% of the steps where both are finite (rounded up to whole steps; "
                "report.json's law.fits.<method>.end_points)")

    def guarded(self, section: Section, build: Callable[[Section], None]) -> Section:
        return build_section(section, build, self.errors)

    # ---------------------------------------------------------------- 1. headline
    def headline(self, section: Section) -> None:
        info: dict[str, Any] = {"reference": REFERENCE, "collapse": None, "kept_methods": [], "paragraphs": []}
        self.json["headline"] = info
        if REFERENCE not in self.names:
            section.say(f"GRPO is not in this run (methods: {', '.join(self.names) or 'none'}), so the entropy-collapse check "
                        "and the comparison with GRPO are skipped.")
            info["skipped"] = "grpo not in the run"
            info["paragraphs"] = [b.content for b in section.blocks if isinstance(b, Paragraph)]
            return
        if REFERENCE not in self.analyses:
            section.say(f"GRPO {self.runs[REFERENCE].status} ({self.runs[REFERENCE].error}), so the entropy-collapse check "
                        "and the comparison with GRPO are skipped.")
            info["skipped"] = f"grpo {self.runs[REFERENCE].status}"
            info["paragraphs"] = [b.content for b in section.blocks if isinstance(b, Paragraph)]
            return
        g = self.analyses[REFERENCE]
        # the criterion compares like with like when it can: the final evaluation's samples of GRPO against the
        # same evaluation of the base model (same held-out prompts, same sampling); else the training curve's edges
        eval_start, eval_end = self.eval_value("base", "entropy_mean"), self.eval_value(REFERENCE, "entropy_mean")
        by_eval = finite(eval_start) is not None and finite(eval_end) is not None and eval_start > 0
        start, end = (eval_start, eval_end) if by_eval else (g.entropy_start, g.entropy_end)
        half = COLLAPSE_RATIO * start if finite(start) is not None else math.nan
        # the training curve's ratio is none for one logged step (its start is its end)
        criterion_ratio = ratio_of(end, start) if by_eval else g.entropy_ratio
        # decided on the ratio as shown beside the verdict: its two sides, rounded each on its own, can print equal
        # (0.11 and 0.11) where the ratio is 0.501
        collapsed = bool(_shown(criterion_ratio) <= COLLAPSE_RATIO) if finite(criterion_ratio) is not None else None
        shown_start, shown_end = _shown(g.reward_start), _shown(g.reward_end)
        if shown_start is None or shown_end is None:
            reward_change = "cannot be compared (missing values)"
        elif g.reward_steps < 2:
            reward_change = "cannot be compared (one logged reward, whose start is its end)"
        elif shown_end > shown_start:
            reward_change = "rose"
        elif shown_end < shown_start:
            reward_change = "fell"
        else:
            reward_change = "did not change at the shown precision"
        numbers = Table(["quantity", "value"], title="Headline numbers")
        criterion_start = "the base model's evaluation entropy" if by_eval else "training entropy start"
        for label, value in (("GRPO training entropy start", g.entropy_start), ("GRPO training entropy end", g.entropy_end),
                             ("GRPO training entropy end/start", g.entropy_ratio),
                             (f"collapse threshold ({fmt(COLLAPSE_RATIO)} × {criterion_start})", half),
                             (HEADLINE_REWARD_START, g.reward_start), (HEADLINE_REWARD_END, g.reward_end),
                             ("steps per edge", g.n_edge), ("training steps", g.n_steps)):
            numbers.add([text(label), num(value)])
        if by_eval:
            numbers.add([text("base model evaluation entropy"), num(eval_start)])
            numbers.add([text("GRPO final evaluation entropy"), num(eval_end)])
            numbers.add([text(HEADLINE_EVAL_ENTROPY_RATIO), num(eval_end / eval_start)])
        criterion = (f"final evaluation entropy ≤ {fmt(COLLAPSE_RATIO)} × the base model's" if by_eval
                     else f"training entropy end ≤ {fmt(COLLAPSE_RATIO)} × start")
        numbers.add([text(f"{HEADLINE_COLLAPSE_PREFIX}{criterion})"), Cell(NA if collapsed is None else fmt(collapsed), collapsed, True)])
        unchecked = ("a start entropy of 0, of which no ratio is taken" if finite(start) == 0 and finite(end) is not None
                     else "one logged entropy, whose start is its end" if not by_eval and g.entropy_steps == 1
                     else "missing entropy")
        verdict = {True: "holds", False: "does not hold", None: f"cannot be checked ({unchecked})"}[collapsed]
        measured_on = (
            f"the mean token entropy of the final evaluation's samples, {fmt(eval_end)}, against the base model's on the same "
            f"held-out prompts, {fmt(eval_start)} (ratio {fmt(eval_end / eval_start)})" if by_eval else
            f"the training curve's end against its start ({fmt(g.entropy_end)} against {fmt(g.entropy_start)})"
        )
        section.say(
            f"GRPO's mean token entropy (`{ENTROPY_KEY}`, nats) went from {fmt(g.entropy_start)} to {fmt(g.entropy_end)} "
            f"(end/start ratio {fmt(g.entropy_ratio)}) while its reward (`{g.run.reward_key}`) "
            f"went from {fmt(g.reward_start)} to {fmt(g.reward_end)}. Start and end are the means over "
            f"{edge_phrase(g.n_steps)}{sparse_edges_phrase(g.n_steps, {'the entropy': g.entropy_steps, 'the reward': g.reward_steps})}, "
            f"to reduce step-to-step noise. The collapse criterion, final entropy ≤ {fmt(COLLAPSE_RATIO)} × initial, compares "
            f"{measured_on}: it {verdict}; the training reward {reward_change}."
        )
        # the ratio as printed, as the verdict takes it, with a tolerance for the float difference (0.55 - 0.5 is
        # 0.05000000000000004, as far from it as 0.45 is)
        near = (finite(criterion_ratio) is not None
                and abs(_shown(criterion_ratio) - COLLAPSE_RATIO) <= NEAR_THRESHOLD * COLLAPSE_RATIO * (1 + 1e-9))
        if near:
            section.say(
                f"That ratio, {fmt(criterion_ratio)}, is within {fmt(100 * NEAR_THRESHOLD)}% of the threshold "
                f"{fmt(COLLAPSE_RATIO)}: another training seed can put it on the other side. Runs with other seeds "
                "(`--rl-seed 1`, `--rl-seed 2`, each with its own `--out`; same base model, data and evaluation) show the "
                "spread, and `python scripts/lab_seed_spread.py RUN ...` summarises them.")
        info.update({"collapse": collapsed, "reward_change": reward_change, "near_threshold": near})

        # the product of GRPO's ratio as shown, so that the rule's equation holds as printed
        threshold = KEPT_MARGIN * _shown(g.entropy_ratio) if finite(g.entropy_ratio) is not None else math.nan
        numbers.add([text(f"kept-entropy threshold ({fmt(KEPT_MARGIN)} × GRPO's ratio)"), num(threshold)])
        others = [n for n in self.ok if n != REFERENCE]
        kept = [n for n in others if finite(threshold) is not None and finite(self.analyses[n].entropy_ratio) is not None
                and _shown(self.analyses[n].entropy_ratio) >= _shown(threshold)]
        info["kept_methods"] = kept
        info["kept_rule"] = f"entropy end/start ratio >= {KEPT_MARGIN} x GRPO's ratio"
        k = self.k_max
        kept_table = Table(["method", "entropy end/start", "Pass@1", "Pass@1 GRPO", "Pass@1 base",
                            f"Pass@{self.k_label}", f"Pass@{self.k_label} GRPO", f"Pass@{self.k_label} base"],
                           title="Methods that kept entropy")
        if finite(threshold) is None:
            section.say("GRPO's entropy ratio is undefined, so no method is compared with it.")
        elif not others:
            section.say("No other method finished, so none is compared with GRPO.")
        else:
            rule = (f"A method kept entropy when its end/start entropy ratio is at least {fmt(KEPT_MARGIN)} × GRPO's "
                    f"({fmt(KEPT_MARGIN)} × {fmt(g.entropy_ratio)} = {fmt(threshold)}).")
            rated = [n for n in others if finite(self.analyses[n].entropy_ratio) is not None]
            if not kept and not rated:
                section.say(f"{rule} No other method has an entropy ratio (none logged its entropy at a start and at a "
                            "later end of its run), so none kept entropy by this rule.")
            elif not kept:
                best = max(rated, key=lambda n: finite(self.analyses[n].entropy_ratio))
                section.say(f"{rule} No method kept entropy by this rule; the highest ratio is "
                            f"{fmt(self.analyses[best].entropy_ratio)} ({best}).")
            else:
                p1_g, pk_g = self.pass_at(REFERENCE, 1), self.pass_at(REFERENCE, k)
                p1_b, pk_b = self.pass_at("base", 1), self.pass_at("base", k)
                parts = []
                for n in kept:
                    p1, pk = self.pass_at(n, 1), self.pass_at(n, k)
                    analysis = self.analyses[n]
                    # a method whose own part never acted trained with the surrogate it is built on alone
                    idle = bool(analysis.never_acted) and len(analysis.never_acted) == len(analysis.interventions)
                    parts.append(f"{n} (ratio {fmt(analysis.entropy_ratio)}: Pass@1 {fmt(p1)}, Pass@{self.k_label} {fmt(pk)}"
                                 + ("; its own intervention never acted, so this is its surrogate's doing" if idle else "")
                                 + ")")
                    kept_table.add([text(n), num(self.analyses[n].entropy_ratio), num(p1), num(p1_g), num(p1_b), num(pk), num(pk_g), num(pk_b)])
                section.say(f"{rule} {len(kept)} of {len(others)} method{'s' if len(others) != 1 else ''} kept entropy: "
                            f"{'; '.join(parts)}. For comparison, GRPO has Pass@1 {fmt(p1_g)} and Pass@{self.k_label} {fmt(pk_g)}, "
                            f"the base model Pass@1 {fmt(p1_b)} and Pass@{self.k_label} {fmt(pk_b)}.")
                section.say(self._count_sentence(kept, k, p1_g, pk_g, p1_b, pk_b))
        section.table(numbers)
        if kept_table.rows:
            section.table(kept_table)
        info["numbers"] = numbers.to_json()
        info["kept"] = kept_table.to_json()
        info["paragraphs"] = [b.content for b in section.blocks if isinstance(b, Paragraph)]

    def _count_sentence(self, kept, k, p1_g, pk_g, p1_b, pk_b) -> str:
        def count(key_k: int, reference: float) -> str:
            ref = _shown(reference)
            if ref is None:
                return NA
            values = [_shown(self.pass_at(n, key_k)) for n in kept]
            higher = sum(1 for v in values if v is not None and v > ref)
            lower = sum(1 for v in values if v is not None and v < ref)
            missing = sum(1 for v in values if v is None)
            return f"{higher} higher and {lower} lower" + (f" ({missing} n/a)" if missing else "")

        return (f"Against GRPO, the methods that kept entropy have {count(1, p1_g)} Pass@1 and {count(k, pk_g)} Pass@{self.k_label}; "
                f"against the base model, {count(1, p1_b)} Pass@1 and {count(k, pk_b)} Pass@{self.k_label} (comparing the values as shown).")

    # ---------------------------------------------------------------- 2. summary
    def summary(self, section: Section) -> None:
        k = self.k_max
        # a middle k as well: with many samples Pass@k_max saturates near 1 and hides the loss of diversity
        middle = [SUMMARY_MIDDLE_K] if SUMMARY_MIDDLE_K in self.ks and SUMMARY_MIDDLE_K not in (1, k) else []
        columns = ["method", "status", "entropy end/start", "reward end", "Pass@1", *(f"Pass@{m}" for m in middle),
                   f"Pass@{self.k_label}",
                   "law R²", "forecast error, end", "forecast RMSE", "forgetting acc", "forgetting Δ", "eval entropy",
                   "train time (s)", "note"]
        table = Table(columns, title="")
        base_forget = self.eval_value("base", "forgetting_accuracy")
        if self.base:
            table.add([text("base"), text("base"), dash(), dash(), num(self.pass_at("base", 1)),
                       *(num(self.pass_at("base", m)) for m in middle), num(self.pass_at("base", k)), dash(),
                       dash(), dash(), num(base_forget), dash(), num(self.eval_value("base", "entropy_mean")), dash(), text("")])
        for name in self.names:
            run = self.runs[name]
            if run.status != "ok":
                table.add([text(name), text(run.status)] + [missing() for _ in columns[2:-1]] + [text("")])
                continue
            a = self.analyses[name]
            forget = self.eval_value(name, "forgetting_accuracy")
            fit, forecast = a.law.get("fit") or {}, a.law.get("forecast") or {}
            note = "; ".join(f"never acted: {i['key']} = 0 at all {i['steps']} steps" for i in a.never_acted)
            if a.never_acted and len(a.never_acted) < len(a.interventions):
                note += " (its other parts acted)"
            table.add([text(name), text("ok"), num(a.entropy_ratio), num(a.reward_end), num(self.pass_at(name, 1)),
                       *(num(self.pass_at(name, m)) for m in middle), num(self.pass_at(name, k)),
                       num(fit.get("r2")), num(a.law.get("end_error"), signed=True), num(forecast.get("rmse")), num(forget),
                       num(forget - base_forget if finite(forget) is not None and finite(base_forget) is not None else math.nan, signed=True),
                       num(self.eval_value(name, "entropy_mean")), num(self.eval_value(name, "train_seconds")), text(note)])
        last = last_steps_phrase({self.analyses[n].n_steps for n in self.ok})
        section.say(
            f"One row per method{' and one for the base model' if self.base else ''}. Entropy end/start: `{ENTROPY_KEY}` averaged over {last} "
            f"divided by its average over as many first steps; reward end: {self.reward_label()} over {last}; "
            f"Pass@1{''.join(f', Pass@{m}' for m in middle)} and Pass@{self.k_label} (the largest k evaluated): the unbiased estimator on "
            f"the held-out prompts; law R²: the fit of R = −a·exp(H) + b over all steps (n/a from fewer than 3 points); "
            f"forecast error, end: the law fitted on the first {fmt(100 * self.fit_fraction)}% of steps, its predicted minus "
            f"the measured reward averaged over {self.law_end_phrase()}, and forecast RMSE its error on the steps after the fitted ones (the "
            f"ceilings are in the law section); forgetting acc: accuracy "
            f"on the untrained task (`{self.preset.get('forgetting_task', NA)}`), Δ relative to the base model; eval entropy: mean "
            f"token entropy of the final evaluation's samples; train time: seconds of the method's set-up, training and final "
            f"evaluation, summed over the invocations that trained it (one stopped by Ctrl-C included), after the worker "
            f"process's one-off warm-up; note: a method whose "
            f"own intervention never acted. {NA} marks a value that could not be computed, {NOT_APPLICABLE} one "
            "that does not apply."
        )
        section.table(table)
        idle = [n for n in self.ok if self.analyses[n].never_acted]
        if idle:
            parts = []
            for name in idle:
                analysis = self.analyses[name]
                steps = {i["steps"] for i in analysis.never_acted}
                if len(steps) == 1:  # logged at the same steps: one count for all
                    keys = " and ".join(f"`{i['key']}`" for i in analysis.never_acted)
                    idle_parts = f"{keys} 0 at all {steps.pop()} steps"
                else:
                    idle_parts = " and ".join(f"`{i['key']}` 0 at all {i['steps']} steps" for i in analysis.never_acted)
                others = "" if len(analysis.never_acted) == len(analysis.interventions) else "; its other parts acted"
                parts.append(f"{name} ({idle_parts}{others})")
            many = len(idle) != 1
            section.say(f"{len(idle)} method{'s' if many else ''} never applied {'their' if many else 'its'} own intervention, "
                        f"or part of it, during training: {'; '.join(parts)}. A run none of whose parts acted trained with "
                        "the surrogate alone, so its row measures that surrogate, not the method; a longer run, or one whose "
                        "statistics reach the method's threshold, is needed to see it act.")
        self.json["interventions"] = {n: self.analyses[n].interventions for n in self.ok}
        self.json["never_acted"] = idle
        deltas = [(n, self.eval_value(n, "forgetting_accuracy") - base_forget) for n in self.ok
                  if finite(self.eval_value(n, "forgetting_accuracy")) is not None and finite(base_forget) is not None]
        if deltas:
            worst = min(deltas, key=lambda item: item[1])
            best = max(deltas, key=lambda item: item[1])
            if fmt(worst[1]) == fmt(best[1]):
                every = ("every method" if len(deltas) == len(self.ok) else
                         f"every method with a forgetting accuracy ({len(deltas)} of {len(self.ok)})")
                change = f"after training it changed by {fmt(best[1], signed=True)} for {every}"
            else:
                change = f"after training it changed by {fmt(worst[1], signed=True)} ({worst[0]}) to {fmt(best[1], signed=True)} ({best[0]})"
            section.say(f"Forgetting: the base model's accuracy on the untrained task is {fmt(base_forget)}; {change}.")
        if self.failed:
            section.blocks.append(Heading("Failed methods"))
            failed = Table(["method", "status", "error (last line)", "steps logged"])
            for name in self.failed:
                run = self.runs[name]
                failed.add([text(name), text(run.status), text(run.error or NA), num(len(run.records))])
            section.say(f"{len(self.failed)} method{'s' if len(self.failed) != 1 else ''} did not finish and {'are' if len(self.failed) != 1 else 'is'} "
                        f"left out of every comparison: {', '.join(self.failed)}."
                        + (" The full error of a failed one (a traceback, or the signal that ended its process) is in "
                           "`methods/<name>/error.log`."
                           if any(self.runs[name].status == "failed" for name in self.failed) else ""))
            section.blocks.append(TableBlock(failed))
            self.json["failed"] = failed.to_json()
        else:
            self.json["failed"] = Table(["method", "status", "error (last line)", "steps logged"]).to_json()
        unreadable = {name: run.unreadable_lines for name, run in self.runs.items() if run.unreadable_lines}
        if unreadable:
            listed = "; ".join(f"{name}: line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines[:5]))}"
                               f"{f' and {len(lines) - 5} more' if len(lines) > 5 else ''}" for name, lines in unreadable.items())
            section.say(f"Lines of `methods/<name>/metrics.jsonl` that could not be read (a write cut short, e.g. when "
                        f"the process was killed) were left out: {listed}.")
        self.json["unreadable_metrics_lines"] = unreadable
        if self.base_unreadable:
            section.say("`base/final_eval.json` cannot be read (cut short?) or holds no evaluation: the base model's "
                        "rows and lines are missing, its columns read n/a, and the collapse verdict reads the training "
                        "curves.")
        self.json["summary"] = table.to_json()

    # ---------------------------------------------------------------- 3. curves
    def curves(self, section: Section) -> None:
        section.say(f"Per training step: `{ENTROPY_KEY}` (mean token entropy of the step's samples, nats) and the reward "
                    f"{self.reward_label()} (the share of the step's samples the verifier accepted). Thick lines are a trailing moving "
                    f"average over {SMOOTH_WINDOW} steps (fewer at the start), thin lines the raw values. 'reward reached' is the "
                    f"maximum of the smoothed reward.")

        def paint(figure):
            axes = figure.subplots(1, 2)
            drawn = False
            for name in self.ok:
                run = self.runs[name]
                if not run.records:
                    continue
                drawn = True
                steps = run.steps
                for axis, key in ((axes[0], ENTROPY_KEY), (axes[1], run.reward_key)):
                    values = run.series(key)
                    axis.plot(steps, values, color=self.colours[name], alpha=0.25, linewidth=0.5)
                    axis.plot(steps, moving_average(values), color=self.colours[name], label=name)
            if not drawn:
                return "no finished method logged a training step"
            axes[0].set(title="entropy", xlabel="step", ylabel="nats")
            axes[1].set(title="reward", xlabel="step", ylabel="share correct")
            axes[1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), ncol=2 if len(self.ok) > 10 else 1, frameon=False)

        section.blocks.append(self.figures.draw("curves.png", f"Entropy and reward per step ({SMOOTH_WINDOW}-step moving average).",
                                                8.5, 3.0, paint))
        table = Table(["method", "steps", "entropy start", "entropy end", "entropy end/start", "reward start", "reward end",
                       "reward reached"], title="Start and end of each run")
        for name in self.ok:
            a = self.analyses[name]
            table.add([text(name), num(a.n_steps), num(a.entropy_start), num(a.entropy_end), num(a.entropy_ratio),
                       num(a.reward_start), num(a.reward_end), num(a.reward_reached)])
        section.table(table)
        self.json["curves"] = table.to_json()

    # ---------------------------------------------------------------- 4. pass@k
    def pass_at_k(self, section: Section) -> None:
        if not self.ks:
            section.say("No Pass@k values: " + ("no final evaluation holds any." if self.evals
                                                else "no final evaluation was found."))
            self.json["pass_at_k"] = Table(["model"]).to_json()
            return
        section.say(f"Unbiased Pass@k on the held-out prompts of the final evaluation, k = {', '.join(map(str, self.ks))}; "
                    "the base model is the dashed black line.")

        def paint(figure):
            axis = figure.subplots()
            if self.base:
                axis.plot(self.ks, [self.pass_at("base", k) for k in self.ks], "k--", marker="o", markersize=2.5, label="base")
            for name in self.ok:
                axis.plot(self.ks, [self.pass_at(name, k) for k in self.ks], color=self.colours[name], marker="o", markersize=2.5, label=name)
            axis.set_xscale("log", base=2)
            axis.set_xticks(self.ks, [str(k) for k in self.ks])
            axis.set(xlabel="k", ylabel="Pass@k", title="Pass@k at the end of training")
            axis.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)

        section.blocks.append(self.figures.draw("pass_at_k.png", "Pass@k per method against the base model (dashed).", 5.5, 3.0, paint))
        table = Table(["model"] + [f"Pass@{k}" for k in self.ks])
        for model in self.models():
            table.add([text(model)] + [num(self.pass_at(model, k)) for k in self.ks])
        section.table(table)
        self.json["pass_at_k"] = table.to_json()

    # ---------------------------------------------------------------- 5. the law
    def law(self, section: Section) -> None:
        section.say(
            f"The entropy–performance law R = −a·exp(H) + b (arXiv 2505.22617, Eq. 6), with H = `{ENTROPY_KEY}` and R = "
            f"{self.reward_label()}, fitted by least squares of R on exp(H) (`fit_entropy_law`) over every step where both are "
            f"finite (R² from 3 points on). Where a > 0 (reward rises as entropy is spent, the law's premise) its ceiling "
            f"b − a is the reward it predicts at zero entropy; where a ≤ 0 the premise fails and the ceiling is marked "
            f"{NOT_APPLICABLE} (does not apply). The forecast (`forecast_entropy_law`) refits on the first "
            f"{fmt(100 * self.fit_fraction)}% of those steps (at least 3) and predicts the rest from their measured entropies: "
            f"'forecast RMSE' is its error on the steps after the fitted ones, and 'forecast error, end' its predicted minus "
            f"measured reward averaged over {self.law_end_phrase()} (in-sample where those steps were fitted, as the note says). 'reached' is "
            f"the maximum of the {SMOOTH_WINDOW}-step moving average of R. No run comes near zero entropy, so 'forecast "
            "ceiling − reached' is the headroom the law still promises at the end of the run, not an error of the forecast."
        )
        fitted = [n for n in self.ok if "fit" in self.analyses[n].law]

        def paint(figure):
            if not fitted:
                return ("the law could not be fitted to any method's run (the table's notes say why)" if self.ok
                        else "no method finished")
            axes = subplot_grid(figure, len(fitted), 4)
            last_step = max(float(np.max(self.runs[name].steps)) for name in fitted)
            for axis, name in zip(axes, fitted):
                run, law = self.runs[name], self.analyses[name].law
                entropy, reward = run.series(ENTROPY_KEY), run.series(run.reward_key)
                keep = np.isfinite(entropy) & np.isfinite(reward)
                x = np.exp(entropy[keep])
                points = axis.scatter(x, reward[keep], c=run.steps[keep], cmap="viridis", s=6, vmin=1, vmax=last_step)
                grid = np.linspace(x.min(), x.max(), 50)
                axis.plot(grid, law["fit"]["b"] - law["fit"]["a"] * grid, color="C3", label="fit, all steps")
                if "forecast" in law:
                    f = law["forecast"]["fit"]
                    axis.plot(grid, f["b"] - f["a"] * grid, "--", color="C0", label=f"fit, first {fmt(100 * self.fit_fraction)}%")
                axis.set_title(f"{name}  R² {fmt(law['fit']['r2'])}")
                axis.set_xlabel("exp(H)")
            axes[0].set_ylabel("R")
            axes[0].legend(loc="best", frameon=False)
            figure.colorbar(points, ax=list(axes), label="step", fraction=0.02, pad=0.01)

        section.blocks.append(self.figures.draw("law.png", "Reward against exp(entropy) per method, coloured by step, with the fitted law.",
                                                9.0, 2.1 * max(1, math.ceil(len(fitted) / 4)), paint))
        table = Table(["method", *LAW_COLUMNS], title="Fits")
        fits = {}
        for name in self.ok:
            law = self.analyses[name].law
            fits[name] = law
            table.add([text(name), *law_cells(law)])
        section.table(table)
        r2 = [(n, fits[n]["fit"]["r2"]) for n in fitted if finite(fits[n]["fit"].get("r2")) is not None]
        rmse = [fits[n]["forecast"]["rmse"] for n in self.ok if finite((fits[n].get("forecast") or {}).get("rmse")) is not None]
        if r2:
            best, worst = max(r2, key=lambda i: i[1]), min(r2, key=lambda i: i[1])
            sentence = f"R² ranges from {fmt(worst[1])} ({worst[0]}) to {fmt(best[1])} ({best[0]})"
            if rmse:
                sentence += (f"; the median forecast RMSE on the held-out steps is {fmt(float(np.median(rmse)))} over "
                             f"{len(rmse)} method{'s' if len(rmse) != 1 else ''}")
            section.say(sentence + ".")
        self.json["law"] = {"table": table.to_json(), "fits": json_value(fits), "fit_fraction": self.fit_fraction}

    # ---------------------------------------------------------------- 6. predicted vs measured entropy change
    def entropy_change(self, section: Section) -> None:
        section.say(
            "Each step, the trainer predicts the entropy change of its update to first order, as for a tabular policy "
            "(`entropy/predicted_delta`: −α·D, summed over the step's tokens that share a decision point and averaged over the tokens of "
            "the re-scored rows, α = −lr · ∂loss/∂log p / T², arXiv 2602.03392 "
            "Thm 3.3), and measures it by re-scoring the same samples after the update (`entropy/measured_delta`). On a network "
            "with shared weights and Adam the scales differ, so compare signs and correlation: below, the Pearson correlation "
            "across steps, the share of steps where the signs agree, and the mean over steps of the per-token correlation "
            "(`entropy/delta_token_corr`). The last two columns compare the measured change with the first-order change of "
            "the update actually applied (`entropy/first_order_delta` = ∇θH · Δθ, `diagnostics.first_order`), which "
            "makes no tabular assumption: Adam's scaling, clipping and the weights that positions share are all in Δθ. "
            "Where it tracks the measured change and the tabular prediction does not, the gap is the tabular assumption, "
            "not the measurement."
        )
        shown = [n for n in self.ok if self.analyses[n].change["n_steps"] > 0]

        def paint(figure):
            if not shown:
                return "no method logged both the predicted and the measured entropy change of a step"
            axes = subplot_grid(figure, len(shown), 5)
            for axis, name in zip(axes, shown):
                change = self.analyses[name].change
                # each panel's powers of ten go into its axis labels: matplotlib's offset text would sit on the title
                x_power, y_power = power_of_ten(change["predicted"]), power_of_ten(change["measured"])
                axis.scatter(np.asarray(change["predicted"], dtype=np.float64) / 10.0 ** x_power,
                             np.asarray(change["measured"], dtype=np.float64) / 10.0 ** y_power, s=6, color=self.colours[name])
                axis.axhline(0, color="0.7", linewidth=0.5)
                axis.axvline(0, color="0.7", linewidth=0.5)
                axis.set_title(f"{name}  r {fmt(change['pearson'])}")
                axis.set_xlabel("predicted" + (f" (×1e{x_power})" if x_power else ""))
                axis.set_ylabel("measured" + (f" (×1e{y_power})" if y_power else ""))

        section.blocks.append(self.figures.draw("entropy_change.png", "Measured against predicted entropy change, one point per step.",
                                                9.0, 1.9 * max(1, math.ceil(len(shown) / 5)), paint))
        table = Table(["method", "steps", "correlation across steps", "sign agreement", "mean token correlation",
                       "first order: correlation", "first order: sign agreement"])
        for name in self.ok:
            change = self.analyses[name].change
            table.add([text(name), num(change["n_steps"]), num(change["pearson"]),
                       agreement_cell(change["sign_agreement"], change["sign_steps"]),
                       num(change["token_corr_mean"]), num(change["first_order_pearson"]),
                       agreement_cell(change["first_order_sign_agreement"], change["first_order_sign_steps"])])
        section.table(table)
        if REFERENCE in self.ok:
            change = self.analyses[REFERENCE].change
            predicted, measured = np.abs(change["predicted"]), np.abs(change["measured"])
            predicted, measured = predicted[predicted > 0], measured[measured > 0]
            if predicted.size and measured.size:
                typical_predicted, typical_measured = float(np.median(predicted)), float(np.median(measured))
                section.say(
                    f"How far apart the scales are, for {REFERENCE}: the tabular prediction's median size is "
                    f"{fmt(typical_predicted)} nats a step against {fmt(typical_measured)} measured, a factor of about "
                    f"10^{round(math.log10(typical_measured / typical_predicted))}. The tabular view moves each position's logits by "
                    "lr · ∂loss/∂log p; Adam moves every weight by about lr whatever the gradient's size, and the weights "
                    "are shared by every position, so only the sign and the ordering of the prediction carry over."
                )
        for key, what in (("pearson", "The tabular prediction's correlation across steps"),
                          ("first_order_pearson", "The first-order change's")):
            values = [(n, self.analyses[n].change[key]) for n in self.ok if finite(self.analyses[n].change[key]) is not None]
            if values:
                low, high = min(values, key=lambda i: i[1]), max(values, key=lambda i: i[1])
                section.say(f"{what} ranges from {fmt(low[1])} ({low[0]}) to {fmt(high[1])} ({high[0]}).")
        self.json["entropy_change"] = table.to_json()

    # ---------------------------------------------------------------- 7. covariance
    def covariance(self, section: Section) -> None:
        section.say(
            "Concentration of the token covariance C = (log p − mean)·(A − mean) (arXiv 2505.22617, Table 1): "
            "`cov/top_{q}pct_ratio` is the mean of C over the top q% of the step's tokens divided by its mean over all tokens "
            "(undefined when that mean is not positive). Shown: the mean over steps, and the value at the first training step."
        )
        # every step of every method, pooled
        tokens = np.concatenate([self.analyses[n].run.series("cov/n_tokens") for n in self.ok] or [np.array([])])
        n_tokens = nanmedian(tokens)
        if finite(n_tokens) is not None:
            counts = [top_token_count(round(n_tokens), float(q)) for q in COV_PERCENTS]
            said = ", ".join(f"top {q}% = {count} token{'s' if count != 1 else ''}" for q, count in zip(COV_PERCENTS, counts))
            steps = {round(value) for value in tokens if np.isfinite(value)}
            # the same tokens, hence equal columns, only where the two counts coincide at every step's size
            same = [f"{COV_PERCENTS[i]}% and {COV_PERCENTS[i + 1]}%" for i in range(len(counts) - 1)
                    if all(top_token_count(n, float(COV_PERCENTS[i])) == top_token_count(n, float(COV_PERCENTS[i + 1]))
                           for n in steps)]
            section.say(f"A step has {fmt(n_tokens)} response tokens (median over steps and methods): {said}"
                        + (f"; at this scale the top {' and the top '.join(same)} are the same tokens, so their columns agree."
                           if same else "."))

        def paint(figure):
            axis = figure.subplots()
            width = 0.8 / len(COV_PERCENTS)
            drawn = False
            for j, q in enumerate(COV_PERCENTS):
                values = [self.analyses[n].cov[q]["mean"] for n in self.ok]
                heights = [v if finite(v) is not None and v > 0 else np.nan for v in values]
                drawn = drawn or any(np.isfinite(heights))
                axis.bar(np.arange(len(self.ok)) + (j - (len(COV_PERCENTS) - 1) / 2) * width, heights, width, label=f"top {q}%")
            if not drawn:
                return "no method logged a positive covariance ratio"
            axis.set_yscale("log")
            axis.set_xticks(np.arange(len(self.ok)), self.ok, rotation=45, ha="right")
            axis.set(ylabel="× mean covariance", title="covariance concentration (mean over steps)")
            axis.legend(frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))

        section.blocks.append(self.figures.draw("covariance.png", "Mean over steps of the top-q% covariance ratio (log scale).", 8.0, 2.8, paint))
        labels = {self.analyses[n].first_step_label for n in self.ok}
        first = labels.pop() if len(labels) == 1 else "first step"
        columns = ["method"] + [f"top {q}% mean" for q in COV_PERCENTS] + [f"top {q}% {first}" for q in COV_PERCENTS]
        table = Table(columns)
        for name in self.ok:
            cov = self.analyses[name].cov
            table.add([text(name)] + [num(cov[q]["mean"]) for q in COV_PERCENTS] + [num(cov[q]["first"]) for q in COV_PERCENTS])
        section.table(table)
        top = [(n, self.analyses[n].cov[COV_PERCENTS[0]]["mean"]) for n in self.ok if finite(self.analyses[n].cov[COV_PERCENTS[0]]["mean"]) is not None]
        if top:
            low, high = min(top, key=lambda i: i[1]), max(top, key=lambda i: i[1])
            section.say(f"Averaged over steps, the top {COV_PERCENTS[0]}% of tokens carry from {fmt(low[1])}× ({low[0]}) to "
                        f"{fmt(high[1])}× ({high[0]}) the mean covariance.")
        self.json["covariance"] = table.to_json()

    # ---------------------------------------------------------------- 8. S/D distributions
    def distributions(self, section: Section) -> None:
        ranked = sorted((n for n in self.ok if n != REFERENCE),
                        key=lambda n: -(finite(self.analyses[n].entropy_ratio) if finite(self.analyses[n].entropy_ratio) is not None else -math.inf))
        chosen = [m for m in ["base", REFERENCE] + ranked[:SD_OTHERS] if m in self.evals and self.evals[m].get("distributions")]
        others = [m for m in chosen if m not in ("base", REFERENCE)]
        shown = [label for model, label in (("base", "the base model"), (REFERENCE, "GRPO")) if model in chosen]
        if others:
            which = " with the highest entropy end/start ratio" if len(others) < len(ranked) else ""
            shown.append(f"{'the other method' if len(others) == 1 else f'the {len(others)} other methods'}{which} "
                         f"({', '.join(others)})")
        shown_text = ", ".join(shown[:-1]) + " and " + shown[-1] if len(shown) > 1 else (shown[0] if shown else "no model")
        section.say(
            "Per-token statistics of the final evaluation's samples, split by whether the sample was correct: the entropy "
            "discriminator S = p(log p + H) and its vocabulary-centred form D = S − E_v[S_v] (arXiv 2602.03392), histogrammed "
            f"and clamped to the histogram's range. The figure shows {shown_text}; the table gives every model's share of "
            "tokens below 0."
        )

        def paint(figure):
            if not chosen:
                return "no final evaluation holds S and D distributions"
            axes = figure.subplots(len(chosen), 2, squeeze=False)
            for row, model in enumerate(chosen):
                evaluation = self.evals[model]
                edges = np.asarray(evaluation.get("histogram_bins") or [], dtype=float)
                for col, stat in enumerate(("disc", "disc_centered")):
                    axis = axes[row, col]
                    for label, colour in (("correct", "C2"), ("wrong", "C3")):
                        counts = np.asarray(evaluation["distributions"].get(f"{stat}/{label}") or [], dtype=float)
                        if counts.size and counts.size + 1 == edges.size and counts.sum() > 0:
                            axis.stairs(counts / counts.sum(), edges, color=colour, label=label)
                    axis.set_title(f"{model}: {'S' if stat == 'disc' else 'D'}")
            axes[0, 0].legend(frameon=False)
            axes[-1, 0].set_xlabel("S")
            axes[-1, 1].set_xlabel("D")

        section.blocks.append(self.figures.draw("sd_distributions.png", "S and D of correct (green) and wrong (red) samples; share of tokens per bin.",
                                                7.0, 1.5 * max(1, len(chosen)), paint))
        table = Table(["model", "tokens correct", "tokens wrong", "S<0 correct", "S<0 wrong", "D<0 correct", "D<0 wrong"])
        for model in self.models():
            evaluation = self.evals[model]
            distributions = evaluation.get("distributions") or {}
            edges = np.asarray(evaluation.get("histogram_bins") or [], dtype=float)
            cells = [text(model)]
            counts = {key: np.asarray(distributions.get(key) or [], dtype=float) for key in
                      ("disc/correct", "disc/wrong", "disc_centered/correct", "disc_centered/wrong")}
            cells += [num(int(counts[key].sum())) if key in distributions else missing() for key in ("disc/correct", "disc/wrong")]
            for key in ("disc/correct", "disc/wrong", "disc_centered/correct", "disc_centered/wrong"):
                c = counts[key]
                if c.size and c.size + 1 == edges.size and c.sum() > 0:
                    cells.append(num(float(c[edges[1:] <= 0].sum() / c.sum())))
                else:
                    cells.append(missing())
            table.add(cells)
        section.table(table)
        self.json["distributions"] = {"table": table.to_json(), "shown_in_figure": chosen}

    # ---------------------------------------------------------------- 9. pass-rate polarisation
    def pass_rates(self, section: Section) -> None:
        section.say(
            "Per-prompt pass rates of the final evaluation (the share of a prompt's samples that were correct). Training tends to "
            "push them to the two ends, where a group's rewards no longer vary and GRPO-style advantages carry no signal. The "
            "table gives the share of prompts never solved (rate 0), always solved (rate 1) and in between; each panel of the "
            "figure overlays the base model's histogram (black outline)."
        )
        summaries = {}
        for model in self.models():
            rates = [r for r in (self.evals[model].get("pass_rates") or []) if finite(r) is not None]
            if rates:
                summaries[model] = (polarisation(rates, bins=PASS_RATE_BINS), float(np.mean(rates)), len(rates))

        def paint(figure):
            if not summaries:
                return "no final evaluation holds per-prompt pass rates"
            models = list(summaries)
            axes = subplot_grid(figure, len(models), 5, sharex=True, sharey=True)
            base = summaries.get("base")
            for axis, model in zip(axes, models):
                pol = summaries[model][0]
                shares = np.asarray(pol.histogram, dtype=float) / max(1, pol.n_problems)
                edges = np.asarray(pol.bin_edges, dtype=float)
                axis.bar(edges[:-1], shares, width=np.diff(edges), align="edge", color=self.colours.get(model, "0.6"), alpha=0.8)
                # the end bins also hold rates near 0 and 1 (1/16, 15/16): the exact ends are marked on their own
                axis.bar([0.0, 1.0], [pol.frac_zero, pol.frac_one], width=0.025, align="center", color="k")
                if base is not None and model != "base":
                    axis.stairs(np.asarray(base[0].histogram, dtype=float) / max(1, base[0].n_problems), np.asarray(base[0].bin_edges), color="k")
                axis.set_title(model)
                axis.set_xlim(-0.02, 1.02)
            axes[0].set_ylabel("share of prompts")
            for index, axis in enumerate(axes):
                if index + min(5, len(axes)) >= len(axes):  # nothing below it
                    axis.set_xlabel("pass rate")

        section.blocks.append(self.figures.draw("pass_rates.png", "Histogram of per-prompt pass rates; thin black bars at 0 and 1: "
                                                "the prompts never and always solved; black outline: base model.",
                                                9.0, 1.7 * max(1, math.ceil(len(summaries) / 5)), paint))
        table = Table(["model", "prompts", "rate 0", "rate 1", "mixed", "mean pass rate"])
        for model, (pol, mean, count) in summaries.items():
            table.add([text(model), num(count), num(pol.frac_zero), num(pol.frac_one), num(pol.frac_mixed), num(mean)])
        section.table(table)
        if "base" in summaries and len(summaries) > 1:
            ends = [(m, summaries[m][0].frac_zero + summaries[m][0].frac_one) for m in summaries if m != "base"]
            low, high = min(ends, key=lambda i: i[1]), max(ends, key=lambda i: i[1])
            base_pol = summaries["base"][0]
            section.say(f"The base model has {fmt(base_pol.frac_zero + base_pol.frac_one)} of its prompts at 0 or 1; after "
                        f"training that share ranges from {fmt(low[1])} ({low[0]}) to {fmt(high[1])} ({high[0]}).")
        self.json["pass_rates"] = table.to_json()

    # ---------------------------------------------------------------- 10. forks
    def forks(self, section: Section) -> None:
        section.say(
            f"The highest-entropy positions of the final evaluation's responses (up to {FORKS_SHOWN} per model), each decoded in "
            "context: the text before the token, the token between ⟦ ⟧, and what followed; ↵ marks a line break. The token "
            "column is its Python repr."
        )
        tables = {}
        for model in self.models():
            forks = [f for f in (self.evals[model].get("forks") or []) if isinstance(f, dict)][:FORKS_SHOWN]
            table = Table(["rank", "token", "entropy", "context"], title=model)
            for rank, fork in enumerate(forks, 1):
                table.add([num(rank), text(repr(str(fork.get("token", "")))), num(fork.get("entropy")), text(fork_context(fork))])
            if table.rows:
                section.table(table)
            else:
                section.blocks.append(Heading(model))
                section.say("No fork tokens recorded.")
            tables[model] = table.to_json()
        self.json["forks"] = tables

    # ---------------------------------------------------------------- 11. reproduce
    def reproduce(self, section: Section) -> None:
        name = self.preset.get("name", "default")
        preset_methods = self._preset_methods(name)
        used_workers = self._workers()
        other_methods = preset_methods is None or set(self.names) != set(preset_methods)
        other_workers = len(used_workers) == 1 and used_workers[0] != self.preset.get("workers")
        command = lab_command(name, list(self.names) if other_methods else [], None,
                              workers=used_workers[0] if other_workers else None, rl_seed=self.preset.get("rl_seed"),
                              imports=lab_imports(self.lab))
        make = "make lab" if command == "entrorl lab --preset default" else None
        section.say(f"Re-run with `{command}`" + (f" (or `{make}`)" if make else "") + "; an existing run directory given with "
                    "`--out` is resumed. The settings below are the preset as recorded in `lab.json`.")
        settings = Table(["setting", "value"], title="Preset")
        for key, value in self.preset.items():
            shown = json.dumps(value, sort_keys=True, ensure_ascii=False) if isinstance(value, (dict, list)) else value
            settings.add([text(key), num(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else text(str(shown))])
        settings.add([text("base model"), text(str(self.lab.get("base_model", NA)))])
        section.table(settings)
        train_seconds = [self.eval_value(n, "train_seconds") for n in self.ok]
        train_seconds = [s for s in train_seconds if finite(s) is not None]
        wall, counted, invocations, unfinished = self._wall_clock()
        machine = Table(["item", "value"], title="Machine and time")
        machine.add([text("platform"), text(platform.platform(terse=True))])
        machine.add([text("CPU count"), num(os.cpu_count() or 0)])
        machine.add([text("python"), text(platform.python_version())])
        machine.add([text("torch"), text(_package_version("torch"))])
        kernels, base_kernels = self._cpu_kernels(), self.lab.get("base_model_cpu_kernels")
        shown = ", ".join(kernels) + (f" (base model: {base_kernels})" if isinstance(base_kernels, str) and kernels
                                      and [base_kernels] != kernels else "")
        machine.add([text(CPU_KERNELS_LABEL), text(shown) if kernels else missing()])
        machine.add([text("workers"), (num(used_workers[0]) if len(used_workers) == 1 else
                                       text(", ".join(str(w) for w in used_workers)) if used_workers else missing())])
        machine.add([text("train + eval time summed over methods (s)"), num(sum(train_seconds)) if train_seconds else missing()])
        machine.add([text(WALL_CLOCK_LABEL), num(wall)])
        machine.add([text("invocations counted / in all"), text(f"{counted} / {invocations}")])
        section.table(machine)
        if invocations:
            clock = (f"the wall clock adds up, over the invocations of `entrorl lab` on this folder that trained or evaluated "
                     f"something ({counted} of {invocations}), the time from the base model being ready to the last method "
                     "finishing, as each invocation recorded it in `lab.json`; re-runs that found every result already there, "
                     "and the time between invocations, are not counted")
            if unfinished:
                clock += (f"; {unfinished} invocation{'s' if unfinished != 1 else ''} recorded no end (the process was killed) "
                          f"and {'are' if unfinished != 1 else 'is'} not counted")
        else:
            clock = "the wall clock is not known: `lab.json` records no invocations (the folder was written by an older version)"
        section.say(f"Platform, CPU count and versions are those of the machine that wrote this report; {clock}.")
        section.say(f"The {CPU_KERNELS_LABEL} are the floating-point kernels torch chose for the CPUs of the invocations "
                    "that trained (`torch.backends.cpu.get_cpu_capability()`), and the base model's when it was trained "
                    "with others (a cache shared between machines). On one kind, a re-run gives the same numbers; a CPU "
                    "with another instruction set (AVX2 against AVX-512) rounds differently, so it trains another base "
                    "model and draws other samples, and its numbers differ.")
        self.json["reproduce"] = {"command": command, "make": make, "preset": settings.to_json(), "machine": machine.to_json()}

    def _preset_methods(self, name: str) -> list[str] | None:
        try:
            from entrorl.lab.presets import get_preset

            return list(get_preset(name).methods)
        except Exception:  # noqa: BLE001 — a preset that no longer exists: print the methods explicitly
            return None

    def _workers(self) -> list[int]:
        """The distinct worker counts of the invocations in ``lab.json`` that trained or evaluated something (an
        invocation that found everything done does not count), or, in folders written before invocations recorded
        what they ran, the count ``lab.json`` gives."""
        invocations = [i for i in self.lab.get("invocations") or [] if isinstance(i, dict)]
        used = [i.get("workers") for i in invocations if i.get("ran") or i.get("base_evaluated")]
        used = [w for w in used if isinstance(w, int) and not isinstance(w, bool)]
        legacy = not any("ran" in i for i in invocations)
        if legacy and isinstance(self.lab.get("workers"), int) and not isinstance(self.lab["workers"], bool):
            used = [self.lab["workers"]]
        return list(dict.fromkeys(used))

    def _cpu_kernels(self) -> list[str]:
        """The distinct CPU kernel sets recorded by the invocations in ``lab.json`` that trained or evaluated something,
        in the order they first ran (none for folders written before they were recorded)."""
        invocations = [i for i in self.lab.get("invocations") or [] if isinstance(i, dict)]
        kernels = [i["cpu_kernels"] for i in invocations
                   if (i.get("ran") or i.get("base_evaluated")) and isinstance(i.get("cpu_kernels"), str)]
        return list(dict.fromkeys(kernels))

    def _wall_clock(self) -> tuple[float, int, int, int]:
        """(seconds, invocations counted, invocations recorded, invocations without an end). The seconds are
        the sum of the durations of the invocations in ``lab.json`` that ran a method or evaluated the base model and
        recorded their end (``seconds``, measured on a monotonic clock; ``finished_at - started_at`` in folders
        written before it was recorded); ``nan`` when none did."""
        invocations = [i for i in self.lab.get("invocations") or [] if isinstance(i, dict)]
        ended = [i for i in invocations if finite(i.get("started_at")) is not None and finite(i.get("finished_at")) is not None]
        counted = [i for i in ended if i.get("ran") or i.get("base_evaluated")]

        def duration(invocation: dict[str, Any]) -> float:
            measured = finite(invocation.get("seconds"))
            return measured if measured is not None else invocation["finished_at"] - invocation["started_at"]

        seconds = sum(max(0.0, duration(i)) for i in counted) if counted else math.nan
        return seconds, len(counted), len(invocations), len(invocations) - len(ended)

    # ---------------------------------------------------------------- assembly
    def build(self) -> dict[str, Any]:
        builders = {"headline": self.headline, "summary": self.summary, "curves": self.curves, "pass-at-k": self.pass_at_k,
                    "law": self.law, "entropy-change": self.entropy_change, "covariance": self.covariance,
                    "distributions": self.distributions, "pass-rates": self.pass_rates, "forks": self.forks,
                    "reproduce": self.reproduce}
        sections = [self.guarded(Section(anchor, title), builders[anchor]) for anchor, title in SECTIONS]
        title = f"entrorl laboratory — {self.out.name}"
        markdown, document = render_markdown(title, sections), render_html(title, sections)
        report = {
            "schema_version": 1,
            "run": self.out.name,
            "preset": self.preset.get("name"),
            "base_model": self.lab.get("base_model"),
            "rules": {
                "entropy_key": ENTROPY_KEY, "reward_key": REWARD_KEY, "fallback_reward_key": FALLBACK_REWARD_KEY,
                "edge_fraction": EDGE_FRACTION, "collapse_ratio": COLLAPSE_RATIO, "kept_margin": KEPT_MARGIN,
                "smoothing_window": SMOOTH_WINDOW, "law_fit_fraction": self.fit_fraction, "largest_k": self.k_max,
                "number_format": "3 significant figures; whole numbers from 100; n/a = missing, — = not applicable",
            },
            "methods": {n: {"status": self.runs[n].status, "steps": len(self.runs[n].records), "error": self.runs[n].error,
                            "reward_key": self.runs[n].reward_key} for n in self.names},
            **self.json,
            "figures": dict(self.figures.saved),
            "figures_note": self.figures.unavailable,
            "section_errors": dict(self.errors),
        }
        report = json_value(report)
        write_report_files(self.out, {"report.md": markdown, "report.html": document,
                                      "report.json": json.dumps(report, indent=1, ensure_ascii=False, allow_nan=False)},
                           self.figures)
        return report


def _package_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        module = sys.modules.get(name)
        return str(getattr(module, "__version__", NA))


def write_report(out: Path | str, *, figures: bool = True) -> dict[str, Any]:
    """Write ``figures/*.png``, ``report.md``, ``report.html`` (self-contained) and ``report.json`` into the lab
    run directory ``out``, from its files alone; returns the content of ``report.json``.

    A method without ``final_eval.json`` is listed as failed (with the last line of its ``error.log``) and left
    out of the comparisons; null (NaN) metrics are skipped wherever a mean, fit or correlation is taken.
    ``figures=False`` skips drawing (every table and number is still written).
    """
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"no lab run directory at {out}")
    return _Report(out, figures=figures).build()
