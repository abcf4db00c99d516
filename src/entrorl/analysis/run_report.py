"""The report of one training run (``entrorl report RUN_DIR``): ``report.md`` with PNG figures, a self-contained
``report.html`` and ``report.json``, from the run directory's files alone.

Inputs (written by :class:`entrorl.trainer.Trainer`)::

    config.json            the run's configuration (method, model, planned steps)
    metrics.jsonl          one JSON object per training step (and step 0's, with only the evaluation before training);
                           its eval/... metrics are the evaluations when eval/ holds none
    eval/step_<N>.json     each evaluation: Avg@n, unbiased Pass@k, the pass-rate polarisation
    forks/step_<N>.json    each evaluation's highest-entropy response positions, decoded in context
    final_eval.json        a laboratory method folder's final evaluation and fork tokens, read when neither eval/ nor
                           metrics.jsonl holds an evaluation

or, for a run of TRL's ``GRPOTrainer`` with the entrorl plugin, the log history of its ``trainer_state.json``
(the output directory's or a checkpoint's, whichever went furthest), with its ``max_steps`` and the plugin's ``entrorl_objective.json``
beside it (the method); or, for a verl run, the JSON lines of verl's ``file`` logger (``{"step": N, "data": {...}}``:
``actor/entropy`` is the entropy, ``critic/score/mean`` the reward, ``val-core/<source>/<acc or reward>/mean@<n>`` the
evaluations, and the entrorl plugin's ``actor/<name>`` metrics its ``<name>`` ones).

What it checks on the user's own run: the entropy–performance law ``R = -a exp(H) + b`` fitted over every step and
forecast from the first steps, with its ceiling ``b - a`` (arXiv 2505.22617, Eq. 6); the predicted entropy change of
each step (``-alpha D``, arXiv 2602.03392, Thm 3.3) against the measured one; the covariance concentration (arXiv
2505.22617, Table 1); what the method's own interventions and PPO's clipping did; the evaluations and the fork tokens
(arXiv 2506.01939). A run still training can be reported on: the report covers the steps logged so far.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import re
import shlex
from collections import Counter
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import ValidationError

from entrorl._checks import is_real_number
from entrorl._files import make_own_folder
from entrorl.analysis.document import (Cell, Figures, Section, Table, agreement_cell, build_section, dash, finite, fmt,
                                       fork_context, json_value, missing, num, power_of_ten, render_html, render_markdown,
                                       text, write_report_files)
from entrorl.analysis.run import (COLLAPSE_RATIO, COV_PERCENTS, ENTROPY_KEY, EVAL_REWARD_KEY, FORKS_SHOWN, LAW_COLUMNS,
                                  MIN_CEILING_STEPS, SMOOTH_WINDOW, MetricRecords, analyse_records, beyond_an_accuracy,
                                  chance_sign_agreement, edge_phrase, forecast_ceiling_shown, json_lines, law_cells, law_columns,
                                  latest_record_of_each_step, law_of, moving_average, read_json, read_metrics_records,
                                  sparse_edges_phrase)
from entrorl.objective import ObjectiveConfig

__all__ = ["write_run_report", "default_report_dir", "NotARunDirectory", "RUN_REPORT_SECTIONS", "DEFAULT_FIT_FRACTION"]

DEFAULT_FIT_FRACTION = 0.15  # the paper fits the law on the first ~15% of training (arXiv 2505.22617, Sec. 3)
RECURRING_FORKS_SHOWN = 10
ACTIVITY_PREFIXES = ("select/", "clip/", "reg/", "shape/", "correction/", "kl/ref", "kl_cov/",
                     "pg_clipfrac", "ppo_kl", "clip_ratio/")  # the last three: verl's and TRL's own loss's
_STEP_FILE = re.compile(r"step_(\d+)\.json")
_LOGGED_PASS_AT = re.compile(r"eval/pass_at_([0-9]+)")
TRAINER_STATE = "trainer_state.json"
LAB_FINAL_EVALUATION = "final_eval.json"  # written in each method folder of ``entrorl lab``
#: Written by the TRL plugin beside each ``trainer_state.json`` it saves: ``{"method": the objective's name}``.
TRL_OBJECTIVE_FILE = "entrorl_objective.json"
#: verl's metrics read as entrorl's (verl's ``actor/entropy``: the token entropy of the step's rollouts under the policy
#: that sampled them, aggregated as the loss is)
VERL_ALIASES = {"actor/entropy": ENTROPY_KEY, "critic/score/mean": "reward/mean"}
#: The evaluations' Avg@n of a verl run whose validation logged a reward's mean score, not an accuracy: a score on the
#: reward's own scale.
VERL_EVAL_SCORE_KEY = "val-core/<source>/reward/mean@n"
#: What verl's ``actor/entropy`` is, which its log does not say.
VERL_ENTROPY_AGGREGATION = (
    "verl aggregates `actor/entropy` as its loss, by `actor.loss_agg_mode`, which its log does not record: under "
    "token-mean (its default) and seq-mean-token-mean it is the mean token entropy, but under seq-mean-token-sum and "
    "seq-mean-token-sum-norm it is a sum over each response's tokens (divided by `loss_scale_factor` under the "
    "latter), which moves with the response length: its ratio, its verdict and the law then mix entropy with length.")
_VERL_VALIDATION = re.compile(r"val-core/.+/(?P<kind>acc|reward)/mean@(?P<n>\d+)")

RUN_REPORT_SECTIONS = (
    ("summary", "Summary"),
    ("curves", "Entropy and reward"),
    ("law", "Entropy–reward law and ceiling forecast"),
    ("entropy-change", "Predicted vs measured entropy change"),
    ("covariance", "Covariance concentration"),
    ("interventions", "Interventions and clipping"),
    ("evaluations", "Evaluations"),
    ("forks", "Fork tokens"),
)


class _TrainingRun(MetricRecords):
    """A run directory's files, read leniently: what cannot be read is left out and said. Without ``metrics.jsonl``,
    the log history of a transformers Trainer's ``trainer_state.json`` (TRL's ``GRPOTrainer`` with the entrorl plugin,
    :mod:`entrorl.integrations.trl`) gives the steps."""

    def __init__(self, run_dir: Path, *, config: Any, trainer_state: Path | None, verl_log: Path | None = None,
                 unreadable_states: Iterable[Path] = ()):
        """``config``: the content of ``run_dir/config.json`` (``None`` when it cannot be read); ``trainer_state``: the
        ``trainer_state.json`` to read the steps from, for a run without ``metrics.jsonl``, and ``unreadable_states``
        those of the folder that could not be read; ``verl_log``: verl's file logger's JSON lines, for a verl run
        (``run_dir`` is then the folder holding them)."""
        self.directory = run_dir
        metrics = run_dir / "metrics.jsonl"
        self.from_trainer_state = trainer_state is not None  # a TRL run's log history
        self.from_verl_log = verl_log is not None
        #: the log's own names of the metrics read under entrorl's (a verl run's ``actor/entropy`` as ``entropy/mean``)
        self.source_keys = {alias: key for key, alias in VERL_ALIASES.items()} if self.from_verl_log else {}
        # the run's name: its folder's (a relative "." named by the folder it is), or the experiment's, verl's log's
        self.name = (verl_log.stem if verl_log is not None and verl_log.name != "metrics.jsonl"
                     else run_dir.resolve().name)
        # what one record is: a TRL log entry averages logging_steps steps
        self.record_unit = ("log entry", "log entries") if self.from_trainer_state else ("step", "training steps")
        self.counted = ("log entry", "log entries") if self.from_trainer_state else ("step", "steps")  # in tables
        self.unreadable_files: list[str] = []  # files there that could not be read as what they should hold
        # the step the run got to: a TRL run logs every logging_steps, so its last entry may come before its last step
        self.last_step: int | None = None
        self.repeated_steps: list[int] = []  # steps logged more than once: each one's last record is read
        if trainer_state is not None:
            state = read_json(trainer_state)
            records, self.unreadable_lines = _log_history_records(state), []
            self.source = str(trainer_state.relative_to(run_dir))
            global_step = state.get("global_step") if isinstance(state, dict) else None
            self.last_step = global_step if isinstance(global_step, int) and not isinstance(global_step, bool) else None
            # the folder's config.json is the model's: the method and the planned steps come from the plugin and TRL
            # the run's own state, or a checkpoint's, cut short: the report comes from another one, and says so
            self.unreadable_files += [str(path.relative_to(run_dir)) for path in unreadable_states]
            objective_file = trainer_state.parent / TRL_OBJECTIVE_FILE
            objective = read_json(objective_file)
            if objective_file.exists() and not isinstance(objective, dict):
                self.unreadable_files.append(str(objective_file.relative_to(run_dir)))
            config = {"method": objective.get("method") if isinstance(objective, dict) else None,
                      "optim": {"steps": state.get("max_steps") if isinstance(state, dict) else None}}
        elif verl_log is not None:
            records, self.unreadable_lines, verl_evaluations = _verl_records(verl_log)
            records, self.repeated_steps = latest_record_of_each_step(records)
            self.source = verl_log.name
            config = {}  # verl's configuration is not in its log: no method, no planned steps
        else:
            if metrics.exists():
                metrics.open("rb").close()  # one that cannot be read is an error, not an empty run
            records, self.unreadable_lines, self.repeated_steps = read_metrics_records(metrics)
            self.source = metrics.name
            if (run_dir / "config.json").exists() and not isinstance(config, dict):
                self.unreadable_files.append("config.json")
        # training steps count from 1; a step-0 record holds only the evaluation before training (eval.at_start)
        self.records = [record for record in records  # a record without a step number is counted as a step
                        if record.get("step") is None or (finite(record.get("step")) or 0.0) >= 1]
        self.config = config if isinstance(config, dict) else {}
        if verl_log is not None:
            self.evaluations, self.forks, self.evaluation_source = verl_evaluations, {}, verl_log.name
        else:
            self.evaluations = self._step_files(run_dir / "eval", dict)
            self.forks = self._step_files(run_dir / "forks", list)
            self.evaluation_source = "eval/"
        if self.records and self.last_step is None:
            self.last_step = int(self.steps.max())
        if not self.evaluations and trainer_state is None and verl_log is None:
            self.evaluations = _logged_evaluations(records)
            self.evaluation_source = metrics.name if self.evaluations else self.evaluation_source
        if not self.evaluations and verl_log is None:
            self._read_laboratory_evaluation(run_dir / LAB_FINAL_EVALUATION)

    def _step_files(self, folder: Path, kind: type) -> dict[int, Any]:
        """``{step: content}`` of the ``step_<N>.json`` files of ``folder`` whose content is a ``kind``, by step; the
        others are noted in :attr:`unreadable_files`."""
        found = {}
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                match = _STEP_FILE.fullmatch(path.name)
                if match is None:
                    continue
                content = read_json(path)
                if isinstance(content, kind):
                    found[int(match.group(1))] = content
                else:
                    self.unreadable_files.append(str(path.relative_to(self.directory)))
        return dict(sorted(found.items()))

    def _read_laboratory_evaluation(self, path: Path) -> None:
        """A laboratory method folder's final evaluation (:func:`entrorl.lab.runner.evaluate_policy`), when ``eval/``
        holds none: its summary, and its fork tokens when ``forks/`` holds none, stand as the evaluation after the last
        logged step. Only then: the laboratory samples its own held-out split, so the two are not one series."""
        final = read_json(path) if path.is_file() else None
        summary = final.get("summary") if isinstance(final, dict) else None
        if path.exists() and not isinstance(summary, dict):
            self.unreadable_files.append(path.name)
        if not isinstance(summary, dict) or not self.records:
            return
        last = int(self.steps.max())
        self.evaluations = {last: summary}
        self.evaluation_source = LAB_FINAL_EVALUATION
        if not self.forks and isinstance(final.get("forks"), list):
            self.forks = {last: final["forks"]}

    @property
    def reward_key(self) -> str:
        """A verl run's reward is ``critic/score/mean`` (read as ``reward/mean``): verl logs no accuracy of its own."""
        return VERL_ALIASES["critic/score/mean"] if self.from_verl_log else super().reward_key

    def named(self, key: str) -> str:
        """``key`` in backticks, with the log's own name for it when that differs (a verl run's ``critic/score/mean``)."""
        source = self.source_keys.get(key)
        return f"`{key}` (verl's `{source}`)" if source else f"`{key}`"

    @property
    def method(self) -> str:
        method = self.config.get("method")
        if isinstance(method, dict):  # a method with parameters or parts added: its methods, then the parts
            try:
                # settings an earlier version wrote are read as it read them (a part named twice, say)
                return ObjectiveConfig.model_validate(method, context={"settings_only": True}).label()
            except ValidationError:  # a hand-edited file: the names it gives
                method = method.get("method") or method.get("name")
        if isinstance(method, (list, tuple)):  # ``method: [dapo, clip_b]`` composes as ``dapo+clip_b`` does
            method = "+".join(str(name) for name in method)
        return str(method) if method else ""

    @property
    def planned_steps(self) -> int | None:
        steps = (self.config.get("optim") or {}).get("steps") if isinstance(self.config.get("optim"), dict) else None
        return steps if isinstance(steps, int) and not isinstance(steps, bool) else None


def _what_is_wrong_with_config(path: Path, content: Any) -> str:
    """Why the ``config.json`` at ``path`` (read as ``content``, None when it could not be) is not a training run's."""
    if path.is_dir():
        return "is a folder"
    if content is None:
        try:
            json.loads(path.read_text(encoding="utf-8-sig"))
        except OSError as error:
            return f"cannot be read ({error.strerror or error})"
        except ValueError:
            return "cannot be read as JSON (a write cut short, or a hand edit?)"
        return "holds null"
    if not isinstance(content, dict):
        return f"holds a JSON {type(content).__name__}, not an object"
    return "is a model's configuration" if "model_type" in content else "names no training method"


def trainer_states(run_dir: Path) -> tuple[Path | None, list[Path]]:
    """The transformers Trainer's ``trainer_state.json`` in ``run_dir`` that went furthest (the highest
    ``global_step``): its own (``save_state``), or that of one of its ``checkpoint-<N>`` folders (the folder may be
    such a checkpoint itself), and the ones that could not be read. A run saved with ``save_state`` and then continued
    in the same folder has newer checkpoints than its own file; on a tie its own file, written last, is taken, then the
    newest checkpoint's; one that cannot be read is taken only when no other can be. The files are read newest first,
    and no further once one has reached the step of the checkpoints left (``checkpoint-<N>`` holds step N): a run that
    keeps every checkpoint is not read whole once for each."""
    candidates = sorted([(2**63, run_dir / TRAINER_STATE)] + [
        (int(p.name[len("checkpoint-"):]), p / TRAINER_STATE) for p in run_dir.glob("checkpoint-*")
        if re.fullmatch(r"[0-9]+", p.name[len("checkpoint-"):])], reverse=True)
    found, unreadable = [], []
    for index, (order, path) in enumerate(candidates):
        if found and max(found)[0] >= candidates[index][0]:  # the rest holds no later step
            break
        if path.is_file():
            state = read_json(path)
            if not isinstance(state, dict):
                unreadable.append(path)
            step = state.get("global_step") if isinstance(state, dict) else None
            step = step if isinstance(step, int) and not isinstance(step, bool) else -1
            found.append((step, order, path))
    return (max(found, key=lambda item: item[:2])[2] if found else None), sorted(unreadable)


def _log_history_records(state: Any) -> list[dict[str, Any]]:
    """The training entries of a ``trainer_state.json``'s log history (``state``, the file's content) as step records:
    TRL's ``reward`` stands for ``reward/mean`` where the entrorl plugin's diagnostics did not log it, and ``entropy``,
    the token mean over every process, for ``entropy/mean``, which under data parallelism is the main process's
    micro-batch's alone; evaluation entries and the closing summary are left out."""
    history = state.get("log_history") if isinstance(state, dict) else None
    records = []
    for entry in history if isinstance(history, list) else []:
        if (not isinstance(entry, dict) or finite(entry.get("step")) is None or "train_runtime" in entry
                or any(str(key).startswith("eval_") for key in entry)):
            continue
        record = dict(entry)
        if "reward/mean" not in record and "reward" in record:
            record["reward/mean"] = record["reward"]
        if "entropy" in record:  # the plugin's global token mean; its entropy/mean is the main process's micro-batch's
            record[ENTROPY_KEY] = record["entropy"]
        records.append(record)
    return sorted(records, key=lambda record: float(record["step"]))


def _verl_records(path: Path) -> tuple[list[dict[str, Any]], list[int], dict[int, dict[str, Any]]]:
    """The step records of verl's file logger's JSON lines at ``path`` (each ``{"step": N, "data": {...}}``), in the
    order written, the numbers of the lines that are not such an object, and the evaluations: at each step that logged
    ``val-core/<source>/<acc or reward>/mean@<n>``, their mean over the data sources as Avg@n, an accuracy when every
    one was an ``acc`` (a reward without one logs its mean score, on its own scale). A step's metrics are
    kept under verl's names, under entrorl's for those of :data:`VERL_ALIASES`, and without the ``actor/`` prefix (the
    entrorl plugin's ``actor/select/...`` as ``select/...``); a line holding only validation metrics (verl's
    evaluation before training, or ``val_only``) is an evaluation, not a training step.

    Two logs joined (verl starts its file again on resuming) hold a restart: a training line at a step already
    trained. The evaluations logged at and after that step judged a policy the restart threw away, and go with the
    earlier attempt's steps (:func:`~entrorl.analysis.run.latest_record_of_each_step`); the evaluation the resumed run
    logs before training, at the step it resumed from, stays. A validation alone drops nothing: a resume that has
    validated but not trained yet (or failed), or a ``val_only`` run, leaves the steps logged before it as they are."""
    records, evaluations, unreadable = [], {}, []
    highest_trained = -math.inf
    for number, entry in json_lines(path):
        data = entry.get("data") if isinstance(entry, dict) else None
        step = finite(entry.get("step")) if isinstance(entry, dict) else None
        if not isinstance(data, dict) or step is None:
            unreadable.append(number)
            continue
        trains = not all(str(key).startswith(("val-core/", "val-aux/")) for key in data)
        if trains and step <= highest_trained:  # a restart: this step is trained again
            evaluations = {at: value for at, value in evaluations.items() if at < step}
            highest_trained = step
        elif trains:
            highest_trained = step
        validation = [(int(match.group("n")), match.group("kind"), value) for key, value in data.items()
                      if (match := _VERL_VALIDATION.fullmatch(str(key))) and finite(value) is not None]
        if validation:
            sizes = {n for n, _, _ in validation}
            evaluations[int(step)] = {"avg_at_n": float(np.mean([finite(value) for _, _, value in validation])),
                                      "n_samples": sizes.pop() if len(sizes) == 1 else None,
                                      "accuracy": all(kind == "acc" for _, kind, _ in validation)}
        if not trains:
            continue
        record = {"step": step}
        for key, value in data.items():
            if str(key).startswith("actor/"):
                record.setdefault(str(key)[len("actor/"):], value)
        record.update(data)
        record.update({alias: data[key] for key, alias in VERL_ALIASES.items() if key in data})
        records.append(record)
    return records, unreadable, dict(sorted(evaluations.items()))


def _logged_evaluations(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """``{step: evaluation}`` of the records that logged one (``eval/avg_at_n``, with ``eval/n``, ``eval/pass_at_<k>``
    and ``eval/frac_solved_none`` / ``_all`` when given), step 0's baseline included, shaped as ``eval/step_<N>.json``'s
    summary: a run whose ``eval/`` folder was not kept (``metrics.jsonl`` copied alone, a loop of one's own) still has
    its evaluations in its log."""
    evaluations = {}
    for record in records:
        step, avg = finite(record.get("step")), finite(record.get(EVAL_REWARD_KEY))
        if step is None or avg is None or step != int(step):
            continue
        pass_at = {int(match.group(1)): value for key, value in record.items()
                   if (match := _LOGGED_PASS_AT.fullmatch(str(key))) and finite(value) is not None}
        samples = finite(record.get("eval/n"))
        evaluations[int(step)] = {
            "avg_at_n": avg, "n_samples": int(samples) if samples is not None and samples == int(samples) else None,
            "pass_at_k": dict(sorted(pass_at.items())),
            "polarisation": {"frac_zero": finite(record.get("eval/frac_solved_none")),
                             "frac_one": finite(record.get("eval/frac_solved_all"))}}
    return dict(sorted(evaluations.items()))


def _holds_nothing(path: Path) -> bool:
    """Whether the file holds only white space (read up to its first other line)."""
    with path.open("rb") as handle:
        return not any(line.removeprefix(codecs.BOM_UTF8).strip() for line in handle)


def is_verl_log(path: Path) -> bool:
    """Whether ``path`` is a file of JSON lines whose first object is verl's file logger's ``{"step", "data"}``."""
    try:
        with path.open("r", encoding="utf-8-sig", errors="replace") as handle:
            for line in handle:
                if line.strip():
                    entry = json.loads(line)
                    return isinstance(entry, dict) and "step" in entry and isinstance(entry.get("data"), dict)
    except (OSError, ValueError):
        return False
    return False


def _pass_at(evaluation: dict[str, Any]) -> dict[int, float]:
    values = evaluation.get("pass_at_k") if isinstance(evaluation.get("pass_at_k"), dict) else {}
    return {int(k): float(v) for k, v in values.items() if str(k).isdigit() and finite(v) is not None}


class _RunReport:
    def __init__(self, run: _TrainingRun, out: Path, fit_fraction: float, figures: bool, *, default_out: bool = False):
        # default_out: the report's own folder (run_dir/report), where a link is replaced; a folder given is the user's
        self.run, self.out, self.fit_fraction, self.default_out = run, out, fit_fraction, default_out
        self.analysis = analyse_records(run, fit_fraction, run.method,
                                        unit="log entries" if run.from_trainer_state else "steps")
        self.figures = Figures(out / "figures", enabled=figures, disabled_by="--no-figures")
        self.errors: dict[str, str] = {}
        self.json: dict[str, Any] = {}

    def guarded(self, section: Section, build: Callable[[Section], None]) -> Section:
        return build_section(section, build, self.errors)

    # ---------------------------------------------------------------- summary
    def summary(self, section: Section) -> None:
        run, a = self.run, self.analysis
        planned = run.planned_steps
        if not run.records:
            section.say(f"No training step has been logged yet (`{run.source}` holds none): the sections drawn from the "
                        "training steps are empty until the run has trained.")
        table = Table(["quantity", "value"])
        planned_key = ("max_steps" if run.from_trainer_state else "trainer.total_training_steps" if run.from_verl_log
                       else "optim.steps")
        logged = "log entries" if run.from_trainer_state else "steps logged"
        rows = [("method", text(run.method or "n/a")), ("read from", text(run.source)), (logged, num(a.n_steps)),
                (f"steps planned ({planned_key})", num(planned) if planned is not None else missing()),
                *([("entropy", text(run.named(ENTROPY_KEY).replace("`", "")))] if run.source_keys else []),
                ("entropy start (nats)", num(a.entropy_start)), ("entropy end (nats)", num(a.entropy_end)),
                ("entropy end/start", num(a.entropy_ratio)), ("reward", text(run.named(run.reward_key).replace("`", ""))),
                ("reward start", num(a.reward_start)), ("reward end", num(a.reward_end)),
                (f"reward reached ({SMOOTH_WINDOW}-{run.record_unit[0].split()[-1]} moving average, max)",
                 num(a.reward_reached))]
        law = a.law
        fit, forecast = law.get("fit") or {}, law.get("forecast") or {}
        ceiling = forecast.get("predicted_ceiling")
        if not forecast_ceiling_shown(law):
            ceiling_cell = dash()
        elif beyond_an_accuracy(law, ceiling):  # the law extrapolated past what an accuracy can be
            ceiling_cell = Cell(f"above 1 ({fmt(ceiling)}): no ceiling in sight", json_value(ceiling), False)
        else:
            ceiling_cell = num(ceiling)
        rows += [("law R² (every step)", num(fit.get("r2")) if fit else missing()),
                 ("forecast ceiling (law at zero entropy)", ceiling_cell),
                 ("predicted vs measured entropy change: sign agreement", self._agreement_with_chance())]
        if run.evaluations:
            last_step, last = list(run.evaluations.items())[-1]
            rows.append((f"evaluation Avg@n at step {last_step}", num(last.get("avg_at_n"))))
            for k, value in _pass_at(last).items():
                rows.append((f"evaluation Pass@{k} at step {last_step}", num(value)))
        for quantity, cell in rows:
            table.add([text(quantity), cell])
        section.table(table)
        if a.n_steps >= 2 and finite(a.entropy_start) is not None and finite(a.entropy_end) is not None:
            sparse = sparse_edges_phrase(a.n_steps, {"the entropy": a.entropy_steps, "the reward": a.reward_steps},
                                         unit=run.record_unit)
            entropy = (f"The entropy {run.named(ENTROPY_KEY)}" if run.from_verl_log
                       else f"The mean token entropy (`{ENTROPY_KEY}`)")
            sentence = (f"Start and end are the means over {edge_phrase(a.n_steps, unit=run.record_unit)}{sparse}. "
                        f"{entropy} went from {fmt(a.entropy_start)} to {fmt(a.entropy_end)} nats")
            if finite(a.entropy_ratio) is not None:
                collapsed = finite(fmt(a.entropy_ratio)) <= COLLAPSE_RATIO  # the ratio as the sentence prints it
                sentence += (f", {fmt(a.entropy_ratio)} of its start: {'at most' if collapsed else 'more than'} "
                             f"{fmt(COLLAPSE_RATIO)}, so by the laboratory's threshold, applied to the training curve "
                             f"(the laboratory compares evaluations when it has them), entropy "
                             f"{'collapsed' if collapsed else 'did not collapse'}")
            section.say(sentence + f"; the reward went from {fmt(a.reward_start)} to {fmt(a.reward_end)}.")
            if run.from_verl_log:
                section.say(VERL_ENTROPY_AGGREGATION)
        if planned is not None and a.n_steps and run.last_step < planned:
            lab = run.directory.parent.parent if run.directory.parent.name == "methods" else None
            again = _lab_command(lab) if lab is not None and (lab / "lab.json").is_file() else None
            continues = ("`trainer.train(resume_from_checkpoint=True)` continues it" if run.from_trainer_state
                         else f"`{again}` continues it" if again is not None  # a laboratory method's folder
                         else "`entrorl train ... --resume` continues it")
            section.say(f"The run got to step {run.last_step} of {planned}: it is still training or was stopped "
                        f"({continues}); this report covers the steps logged so far.")
        if run.records and run.steps.min() > 1 and not run.from_trainer_state:  # TRL logs from logging_steps on
            first = int(run.steps.min())
            section.say(f"`{run.source}` begins at step {first}: the steps before it are not in it"
                        + (" (verl's file logger starts its file again when a run resumes)" if run.from_verl_log else "")
                        + ", so start and end, the law's forecast and the collapse verdict cover the steps from "
                        f"{first} on.")
        if run.unreadable_files:
            section.say("Files that could not be read (cut short, or not what they should hold) were left out: "
                        + ", ".join(f"`{name}`" for name in run.unreadable_files) + ".")
        if run.repeated_steps:
            steps = ", ".join(map(str, run.repeated_steps[:10])) + (", ..." if len(run.repeated_steps) > 10 else "")
            section.say(f"`{run.source}` logged {len(run.repeated_steps)} "
                        f"{'step' if len(run.repeated_steps) == 1 else 'steps'} more than once ({steps}): a run that "
                        "went on past its last checkpoint and was continued from it, or logs joined together: the "
                        "last record of each step, the continued run's, is the one read (a record logging only other "
                        "metrics of its step is read with it).")
        if run.unreadable_lines:
            lines = ", ".join(map(str, run.unreadable_lines[:10])) + (", ..." if len(run.unreadable_lines) > 10 else "")
            what = "verl's `{\"step\", \"data\"}` object" if run.from_verl_log else "a JSON object"
            section.say(f"Lines of `{run.source}` that are not {what} were skipped: {lines}.")
        skipped, applied = np.nan_to_num(run.series("train/skipped_updates")), run.series("train/updates")
        if (skipped > 0).any():
            section.say(f"{int((skipped > 0).sum())} of {len(skipped)} steps skipped updates whose loss or gradient was "
                        f"not finite ({int(skipped.sum())} updates in all).")
        if len(applied) and np.isfinite(applied).all() and not (applied > 0).any():
            section.say("No update was applied at any step: the policy never changed, so these curves are the "
                        "starting policy's.")
        self.json["summary"] = table.to_json()

    def _agreement_with_chance(self) -> Cell:
        """The sign agreement of predicted and measured entropy change, with the share that would agree by chance."""
        change = self.analysis.change
        cell = agreement_cell(change["sign_agreement"], change["sign_steps"], self.run.counted)
        if change["sign_steps"] < 2:
            return cell
        return Cell(f"{cell.text} ({fmt(self._chance_agreement)} by chance)", cell.value, True)

    @cached_property
    def _chance_agreement(self) -> float:
        """The share of steps whose predicted and measured entropy changes would agree in sign by chance; nan from fewer
        than 2 steps with a sign, where it can only be 0 or 1 and says nothing."""
        change = self.analysis.change
        if change["sign_steps"] < 2:
            return math.nan
        return chance_sign_agreement(np.asarray(change["predicted"]), np.asarray(change["measured"]))

    @cached_property
    def _training_points(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(steps, entropy, reward)`` of the training steps where both are finite: the points the law is fitted to."""
        entropy, reward = self.run.series(ENTROPY_KEY), self.run.series(self.run.reward_key)
        keep = np.isfinite(entropy) & np.isfinite(reward)
        return self.run.steps[keep], entropy[keep], reward[keep]

    # ---------------------------------------------------------------- curves
    def curves(self, section: Section) -> None:
        run = self.run
        each, window = ("log entry (each a mean over TRL's `logging_steps` steps)", f"{SMOOTH_WINDOW} entries") \
            if run.from_trainer_state else ("training step", f"{SMOOTH_WINDOW} steps")
        entropy = (f"the entropy of the step's samples, {run.named(ENTROPY_KEY)} in nats, aggregated as verl's loss,"
                   if run.from_verl_log else f"the mean token entropy of the step's samples (`{ENTROPY_KEY}`, nats)")
        section.say(f"Per {each}: {entropy} and the "
                    f"reward {run.named(run.reward_key)}; thick lines are a trailing moving average over {window}, thin "
                    "lines the raw values."
                    + (" Evaluations (Avg@n on the held-out prompts) are the dots." if run.evaluations else ""))

        def paint(figure):
            if not run.records:
                return "no training step was logged"
            axes = figure.subplots(1, 2)
            steps = run.steps
            for axis, key, colour in ((axes[0], ENTROPY_KEY, "C0"), (axes[1], run.reward_key, "C1")):
                values = run.series(key)
                logged = np.isfinite(values)  # a key logged at some steps only is drawn through the steps that have it
                axis.plot(steps[logged], values[logged], color=colour, alpha=0.3, linewidth=0.6)
                axis.plot(steps, moving_average(values), color=colour, label=key)
            if run.evaluations:
                axes[1].plot(list(run.evaluations), [finite(e.get("avg_at_n")) for e in run.evaluations.values()], "o",
                             color="C3", markersize=3, label="evaluation Avg@n")
            axes[0].set(title="entropy", xlabel="step", ylabel="nats")
            axes[1].set(title="reward", xlabel="step")
            axes[1].legend(frameon=False, loc="best")

        section.blocks.append(self.figures.draw("curves.png", f"Entropy and reward per step ({SMOOTH_WINDOW}-{run.record_unit[0].split()[-1]} "
                                                f"moving average).",
                                                8.0, 2.8, paint))

    # ---------------------------------------------------------------- law
    def law(self, section: Section) -> None:
        run, law = self.run, self.analysis.law
        evaluation_law = self._evaluation_law()
        evaluation_key = evaluation_law["reward_key"] if evaluation_law is not None else EVAL_REWARD_KEY
        scored = (": verl's validation logged the reward's mean score, on its own scale, not an accuracy"
                  if evaluation_key == VERL_EVAL_SCORE_KEY else "")
        section.say(
            f"The entropy–performance law R = −a·exp(H) + b (arXiv 2505.22617, Eq. 6), with H = {run.named(ENTROPY_KEY)} "
            f"and R = {run.named(run.reward_key)}, fitted by least squares over every step where both are finite. Where a > 0 its ceiling b − a "
            f"is the reward it predicts once entropy is spent (H = 0); where a ≤ 0 the law's premise fails and no ceiling "
            f"is given (—). The forecast refits on the first {fmt(100 * self.fit_fraction)}% of the steps (at least 3; "
            f"`--fit-fraction`) and predicts the rest from their measured entropies: 'forecast RMSE' is its error on the "
            f"later steps. A ceiling is shown once its fit rests on at least {MIN_CEILING_STEPS} points. The paper fits "
            f"validation accuracy: with at least two evaluations the law is also fitted to each evaluation's Avg@n "
            f"(`{evaluation_key}`{scored}), with H the training entropy of the policy evaluated (`{ENTROPY_KEY}` of the "
            "next step, whose samples that policy drew; of the same step for an evaluation after the last one)."
        )
        table = Table(["fitted on", *law_columns(self.analysis.law)], title="Fit and forecast")
        table.add([text(f"{run.record_unit[1]} ({run.reward_key})"), *law_cells(law)])
        if evaluation_law is not None:
            table.add([text(f"evaluations ({evaluation_law['reward_key']})"), *law_cells(evaluation_law)])
        section.table(table)
        baselines = self._forecast_baselines()
        if baselines is not None:
            section.say(
                "How good the forecast is, against two baselines on the same later steps: a constant (the mean reward of "
                "the fitted steps), which knows nothing of entropy, and the law fitted on every step, the best any fit of "
                "the law can do there. The paper forecasts validation accuracy from the first 15% of training to about 1% "
                + ("RMSE; here R is each log entry's training reward, a mean over TRL's `logging_steps` steps' batches, so "
                   "it carries their sampling noise: where" if self.run.from_trainer_state else
                   "RMSE; here R is each step's training reward, a mean over one batch of samples, so it carries that "
                   "batch's sampling noise: where")
                + " even the law fitted on every step is barely better than the constant, that noise, "
                "not the law, sets the RMSE."
            )
            section.table(baselines)

        def paint(figure):
            if "fit" not in law:
                return "the law could not be fitted (the table's note says why)"
            steps, h, r = self._training_points
            axes = figure.subplots(1, 2)
            x = np.exp(h)
            points = axes[0].scatter(x, r, c=steps, cmap="viridis", s=6)
            grid = np.linspace(x.min(), x.max(), 50)
            axes[0].plot(grid, law["fit"]["b"] - law["fit"]["a"] * grid, color="C3", label="fit, every step")
            axes[1].plot(steps, r, color="0.6", linewidth=0.6, label="measured")
            if "forecast" in law:
                forecast = law["forecast"]
                f = forecast["fit"]
                label = f"fit, first {forecast['n_fit']} {self.run.record_unit[1].split()[-1]}"
                axes[0].plot(grid, f["b"] - f["a"] * grid, "--", color="C0", label=label)
                axes[1].plot(steps, f["b"] - f["a"] * x, "--", color="C0", label=f"forecast ({label})")
                axes[1].axvline(steps[forecast["n_fit"] - 1], color="0.8", linewidth=0.6)
            if evaluation_law is not None and "fit" in evaluation_law:
                _, eval_entropy, eval_reward = self._evaluation_points
                keep = np.isfinite(eval_entropy) & np.isfinite(eval_reward)
                eval_x = np.exp(eval_entropy[keep])
                axes[0].plot(eval_x, eval_reward[keep], "D", color="C3", markersize=3, label="evaluations (Avg@n)")
                line = np.linspace(eval_x.min(), eval_x.max(), 50)
                f = evaluation_law["fit"]
                axes[0].plot(line, f["b"] - f["a"] * line, ":", color="C3", label="fit, evaluations")
            axes[0].set(xlabel="exp(H)", ylabel="R", title=f"R² {fmt(law['fit']['r2'])}")
            axes[0].legend(frameon=False, loc="best")
            axes[1].set(xlabel="step", ylabel="R", title="forecast from the first steps")
            axes[1].legend(frameon=False, loc="best")
            figure.colorbar(points, ax=axes[0], label="step", fraction=0.05, pad=0.01)

        section.blocks.append(self.figures.draw("law.png", "Left: reward against exp(entropy), coloured by step, with the fitted "
                                                "law. Right: the reward the early fit predicts from each step's entropy.",
                                                8.5, 2.8, paint))
        self.json["law"] = {"table": table.to_json(), "fit": json_value(law), "evaluations": json_value(evaluation_law),
                            "fit_fraction": self.fit_fraction}

    @cached_property
    def _evaluation_points(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(steps, entropy, Avg@n)`` of the evaluations: each one's entropy is the training entropy of the policy it
        evaluated, ``entropy/mean`` of the next step (drawn by that policy), or of its own step after the last one."""
        entropy = {int(step): value for step, value in zip(self.run.steps, self.run.series(ENTROPY_KEY))}
        steps = np.array(list(self.run.evaluations), dtype=np.int64)
        paired = [entropy.get(step + 1, entropy.get(step, math.nan)) for step in steps.tolist()]
        reward = [finite(e.get("avg_at_n")) for e in self.run.evaluations.values()]
        return (steps, np.array(paired, dtype=np.float64),
                np.array([math.nan if value is None else value for value in reward], dtype=np.float64))

    def _evaluation_law(self) -> dict[str, Any] | None:
        """The law fitted to the evaluations' Avg@n (the paper's validation accuracy), with two of them or more."""
        if len(self.run.evaluations) < 2:
            return None
        _, entropy, reward = self._evaluation_points
        reached = float(np.nanmax(reward)) if np.isfinite(reward).any() else math.nan
        accuracies = all(evaluation.get("accuracy", True) for evaluation in self.run.evaluations.values())
        return law_of(entropy, reward, reward_key=EVAL_REWARD_KEY if accuracies else VERL_EVAL_SCORE_KEY, reached=reached,
                      fit_fraction=self.fit_fraction, unit="evaluations")

    def _forecast_baselines(self) -> Table | None:
        """The forecast's RMSE on the steps after the fitted ones, next to a constant's and the whole-run fit's."""
        law = self.analysis.law
        forecast = law.get("forecast")
        later_label = "later log entries" if self.run.from_trainer_state else "later steps"
        table = Table([later_label, "forecast RMSE", "constant RMSE", "law fitted on every step: RMSE"],
                      title="The forecast against two baselines")
        self.json["forecast_baselines"] = table.to_json()  # empty without a forecast
        if not forecast or not forecast.get("actual") or "fit" not in law:
            return None
        _, h, r = self._training_points
        n_fit, whole = forecast["n_fit"], law["fit"]  # the law fitted on every step
        later = r[n_fit:]

        def rmse(predicted: np.ndarray) -> float:
            return float(np.sqrt(np.mean((predicted - later) ** 2)))

        table.add([num(later.size), num(forecast["rmse"]), num(rmse(np.full(later.shape, r[:n_fit].mean()))),
                   num(rmse(whole["b"] - whole["a"] * np.exp(h[n_fit:])))])
        self.json["forecast_baselines"] = table.to_json()
        return table

    # ---------------------------------------------------------------- predicted vs measured entropy change
    def entropy_change(self, section: Section) -> None:
        change = self.analysis.change
        section.say(
            "Each step the trainer predicts its update's entropy change to first order for a tabular policy "
            "(`entropy/predicted_delta`: −α·D, arXiv 2602.03392 Thm 3.3) and measures it by re-scoring some of the same "
            "samples after the update (`entropy/measured_delta`, `diagnostics.measure_fraction`). Adam and shared weights "
            "change the scale, so read the signs and the correlation: across steps, the share of steps whose signs agree "
            "(next to the share that would agree by chance, from how often each is positive), and the mean per-token "
            "correlation within a step (`entropy/delta_token_corr`). With `diagnostics.first_order` the "
            "run also records the first-order change of the update actually applied (`entropy/first_order_delta`), "
            "which makes no tabular assumption."
        )
        predicted, measured = np.asarray(change["predicted"]), np.asarray(change["measured"])
        counted = self.run.counted
        table = Table([counted[1], f"correlation across {counted[1]}", "sign agreement", "by chance",
                       "mean token correlation", "first order: correlation", "first order: sign agreement"])
        table.add([num(change["n_steps"]), num(change["pearson"]),
                   agreement_cell(change["sign_agreement"], change["sign_steps"], counted),
                   num(self._chance_agreement), num(change["token_corr_mean"]),
                   num(change["first_order_pearson"]),
                   agreement_cell(change["first_order_sign_agreement"], change["first_order_sign_steps"], counted)])
        section.table(table)
        if predicted.size:
            steps = f"{predicted.size} {counted[0] if predicted.size == 1 else counted[1]}"
            section.say(f"Summed over the {steps}, the predicted change is {fmt(float(predicted.sum()), signed=True)} "
                        f"nats a token and the measured one {fmt(float(measured.sum()), signed=True)}.")

        def paint(figure):
            if not predicted.size:
                return "the run logged no step with both the predicted and the measured entropy change"
            axis = figure.subplots()
            x_power, y_power = power_of_ten(predicted), power_of_ten(measured)
            axis.scatter(predicted / 10.0 ** x_power, measured / 10.0 ** y_power, s=6, color="C0")
            axis.axhline(0, color="0.7", linewidth=0.5)
            axis.axvline(0, color="0.7", linewidth=0.5)
            axis.set(title=f"r {fmt(change['pearson'])}", xlabel="predicted" + (f" (×1e{x_power})" if x_power else ""),
                     ylabel="measured" + (f" (×1e{y_power})" if y_power else ""))

        section.blocks.append(self.figures.draw("entropy_change.png", "Measured against predicted entropy change, one point per step.",
                                                3.6, 2.8, paint))
        self.json["entropy_change"] = table.to_json()

    # ---------------------------------------------------------------- covariance
    def covariance(self, section: Section) -> None:
        cov = self.analysis.cov
        section.say(
            "Concentration of the token covariance C = (log p − mean)·(A − mean) (arXiv 2505.22617, Table 1): "
            "`cov/top_{q}pct_ratio` is the mean of C over the top q% of the step's tokens divided by its mean over all "
            f"tokens. The paper reports the top 0.02% carrying more than 1000 times the mean. A step has "
            f"{fmt(self.analysis.cov_tokens)} response tokens (median over steps)."
        )
        first = (f"first log entry (at step {fmt(self.analysis.first_step)})"
                 if self.run.from_trainer_state and math.isfinite(self.analysis.first_step) else self.analysis.first_step_label)
        table = Table(["q", f"mean over {self.run.counted[1]}", first])
        for q in COV_PERCENTS:
            table.add([text(f"top {q}%"), num(cov[q]["mean"]), num(cov[q]["first"])])
        section.table(table)
        self.json["covariance"] = table.to_json()

    # ---------------------------------------------------------------- interventions
    def interventions(self, section: Section) -> None:
        run = self.run
        keys = sorted({key for record in run.records for key in record if key.startswith(ACTIVITY_PREFIXES)})
        if not keys:
            section.say("The run logged no selector, clipping, regulariser, advantage-shaping or correction metric.")
            self.json["interventions"] = Table(["metric"]).to_json()
            return
        section.say("What the method's parts did at each step, over the logged steps: `select/*_frac` the share of tokens a "
                    "selector dropped (KL-Cov's: the share its KL term covers), `clip/*` the share PPO's clipping cut, "
                    "`reg/*` a regulariser's coefficient or bonus, `kl/ref` the KL to the reference model that `kl_ref` "
                    "penalises, `kl_cov/abs_log_ratio` the mean |log π − log π_old| over the valid tokens (0 strictly "
                    "on-policy), `shape/*_bonus` an advantage shaper's mean bonus, `correction/*` what a rollout "
                    "correction did (TIS's mean weight and truncated share, IcePop's masked share). verl's own loss "
                    "logs `pg_clipfrac` (PPO's clipped share), `pg_clipfrac_lower` (the dual-clip's) and `ppo_kl` (the "
                    "KL between the sampling and the updated policy), TRL's `clip_ratio/*` (the clipped shares), as "
                    "docs/migrating.md maps them.")
        counted = run.counted
        table = Table(["metric", counted[1], "mean", "max", f"{counted[1]} not 0"])
        for key in keys:
            values = run.series(key)
            values = values[np.isfinite(values)]
            table.add([text(key), num(values.size), num(float(values.mean()) if values.size else math.nan),
                       num(float(values.max()) if values.size else math.nan), num(int(np.count_nonzero(values)))])
        section.table(table)
        idle = self.analysis.never_acted
        logged = "log entry" if run.from_trainer_state else "logged step"
        if idle:
            keys = ", ".join(f"`{item['key']}`" for item in idle)
            if len(idle) == len(self.analysis.interventions):
                section.say(f"The method's own intervention was 0 at every {logged} ({keys}): on this run it never "
                            "acted, so it trained as its base objective does.")
            else:
                acted = ", ".join(f"`{item['key']}`" for item in self.analysis.interventions if item["active_steps"])
                section.say(f"Part of the method's own intervention was 0 at every {logged} ({keys}): that part never "
                            f"acted on this run; its other parts did ({acted}).")
        self.json["interventions"] = table.to_json()

    # ---------------------------------------------------------------- evaluations
    def evaluations(self, section: Section) -> None:
        evaluations = self.run.evaluations
        if not evaluations:
            section.say("A TRL run keeps no Pass@k evaluation: `entrorl eval --model` on one of its `checkpoint-<N>` "
                        "folders gives one." if self.run.from_trainer_state else
                        "verl logged no `val-core/.../mean@<n>` validation (`trainer.test_freq` runs them)."
                        if self.run.from_verl_log else
                        f"No evaluation was found in `eval/` or `{self.run.source}` (`eval.every` and `data.eval` run "
                        "them; `eval.at_start` adds a step-0 baseline).")
            self.json["evaluations"] = Table(["step"]).to_json()
            return
        ks = sorted(set().union(*(_pass_at(e) for e in evaluations.values())))
        if self.run.from_verl_log:
            section.say("Each validation verl logged: Avg@n is the mean of its `val-core/<source>/<acc or reward>/mean@<n>` "
                        "over the data sources (verl logs no unbiased Pass@k nor pass-rate polarisation).")
        else:
            what = ("Each evaluation of `eval/`" if self.run.evaluation_source == "eval/" else
                    f"Each evaluation logged in `{self.run.evaluation_source}` (no `eval/` folder holds one)"
                    if self.run.evaluation_source == self.run.source else
                    f"The laboratory's final evaluation (`{self.run.evaluation_source}`, after step "
                    f"{next(iter(evaluations))})")
            section.say(f"{what}: Avg@n and unbiased Pass@k on the held-out prompts, and the share of prompts no sample "
                        "solved and every sample solved (the pass-rate polarisation).")
        table = Table(["step", "prompts", "n", "Avg@n", *[f"Pass@{k}" for k in ks], "solved by none", "solved by all"])
        for step, evaluation in evaluations.items():
            polar = evaluation.get("polarisation") if isinstance(evaluation.get("polarisation"), dict) else {}
            pass_at = _pass_at(evaluation)
            table.add([num(step), num(evaluation.get("n_problems")), num(evaluation.get("n_samples")),
                       num(evaluation.get("avg_at_n")), *[num(pass_at.get(k, math.nan)) for k in ks],
                       num(polar.get("frac_zero")), num(polar.get("frac_one"))])
        section.table(table)

        def paint(figure):
            if len(evaluations) < 2 or not ks:
                return "fewer than two evaluations" if ks else "the evaluations recorded no Pass@k"
            axis = figure.subplots()
            steps = list(evaluations)
            for k in ks:
                axis.plot(steps, [_pass_at(e).get(k, math.nan) for e in evaluations.values()], marker="o", markersize=3,
                          label=f"Pass@{k}")
            axis.set(xlabel="step", ylabel="share of prompts", title="Pass@k over training")
            axis.legend(frameon=False, loc="best")

        section.blocks.append(self.figures.draw("evaluations.png", "Unbiased Pass@k at each evaluation.", 4.5, 2.8, paint))
        self.json["evaluations"] = table.to_json()

    # ---------------------------------------------------------------- forks
    def forks(self, section: Section) -> None:
        # evaluations that saved positions (eval.top_forks = 0 writes empty lists)
        forks = {step: kept for step, records in self.run.forks.items()
                 if (kept := [fork for fork in records if isinstance(fork, dict)])}
        if not forks:
            section.say(f"A {'TRL' if self.run.from_trainer_state else 'verl'} run saves no fork tokens."
                        if self.run.from_trainer_state or self.run.from_verl_log else
                        "No fork tokens were found in `forks/` (each evaluation saves its `eval.top_forks` "
                        "highest-entropy positions).")
            self.json["forks"] = {}
            return
        step, latest = list(forks.items())[-1]
        shown = min(len(latest), FORKS_SHOWN)
        section.say(f"The highest-entropy positions of the evaluation at step {step} (the top {shown}"
                    + (f" of the {len(latest)} saved" if len(latest) > shown else "") + "), each decoded in "
                    "context: the text before the token, the token between ⟦ ⟧, and what followed; ↵ marks a line break. "
                    "These are the forks arXiv 2506.01939 trains on: where a reasoning path can go one way or another.")
        table = Table(["rank", "token", "entropy", "context", "prompt"], title=f"Step {step}")
        for rank, fork in enumerate(latest[:FORKS_SHOWN], 1):
            table.add([num(rank), text(repr(str(fork.get("token", "")))), num(fork.get("entropy")), text(fork_context(fork)),
                       text(str(fork.get("source", "")))])
        section.table(table)
        counts: Counter[str] = Counter()
        entropies: dict[str, list[float]] = {}
        for records in forks.values():
            for fork in records:
                if finite(fork.get("entropy")) is not None:
                    token = str(fork.get("token", ""))
                    counts[token] += 1
                    entropies.setdefault(token, []).append(float(fork["entropy"]))
        recurring = Table(["token", "times among the top positions", "mean entropy"],
                          title=f"Recurring fork tokens over the {len(forks)} evaluation(s)")
        for token, count in counts.most_common(RECURRING_FORKS_SHOWN):
            recurring.add([text(repr(token)), num(count), num(float(np.mean(entropies[token])))])
        section.table(recurring)
        self.json["forks"] = {"latest": table.to_json(), "recurring": recurring.to_json()}

    # ---------------------------------------------------------------- assembly
    def build(self) -> dict[str, Any]:
        builders = {"summary": self.summary, "curves": self.curves, "law": self.law, "entropy-change": self.entropy_change,
                    "covariance": self.covariance, "interventions": self.interventions, "evaluations": self.evaluations,
                    "forks": self.forks}
        sections = [self.guarded(Section(anchor, title), builders[anchor]) for anchor, title in RUN_REPORT_SECTIONS]
        title = f"entrorl run — {self.run.name}"
        report = json_value({
            "schema_version": 1,
            "run_dir": str(self.run.directory),
            "out": str(self.out),
            "method": self.run.method,
            "steps": self.analysis.n_steps,
            "reward_key": self.run.reward_key,
            "source_keys": dict(self.run.source_keys),
            "fit_fraction": self.fit_fraction,
            "unreadable_files": list(self.run.unreadable_files),
            "unreadable_lines": list(self.run.unreadable_lines),
            "repeated_steps": list(self.run.repeated_steps),
            **self.json,
            "figures": dict(self.figures.saved),
            "figures_note": self.figures.unavailable,
            "section_errors": dict(self.errors),
        })
        if self.default_out:
            make_own_folder(self.out)
        else:
            self.out.mkdir(parents=True, exist_ok=True)
        write_report_files(self.out, {"report.md": render_markdown(title, sections), "report.html": render_html(title, sections),
                                      "report.json": json.dumps(report, indent=1, ensure_ascii=False, allow_nan=False)},
                           self.figures)
        return report


class NotARunDirectory(FileNotFoundError):
    """The directory given is not a training run's (missing, a laboratory folder, a checkpoint, something else)."""


def _lab_command(lab_dir: Path) -> str | None:
    """The ``entrorl lab`` command that goes on with (or, finished, only re-reports) the laboratory folder ``lab_dir``:
    its preset, its methods and its seed of the RL runs, as its ``lab.json`` records them; None when that is unreadable."""
    record = read_json(lab_dir / "lab.json")
    preset = record.get("preset") if isinstance(record, dict) else None
    methods = record.get("methods") if isinstance(record, dict) else None
    if not isinstance(preset, dict) or not isinstance(preset.get("name"), str) or not isinstance(methods, list) \
            or not all(isinstance(name, str) for name in methods):
        return None
    rl_seed = preset.get("rl_seed")
    return lab_command(preset["name"], methods, lab_dir,
                       rl_seed=rl_seed if isinstance(rl_seed, int) and rl_seed != preset.get("seed") else None,
                       imports=lab_imports(record))


def lab_imports(record: dict[str, Any]) -> list[str]:
    """The modules a laboratory folder's ``lab.json`` (``record``) says its methods of one's own need (``--import``)."""
    imports = record.get("imports")
    return [name for name in imports if isinstance(name, str)] if isinstance(imports, list) else []


def lab_command(preset: str, methods: list[str], out: str | Path | None, *, workers: int | None = None,
                rl_seed: int | None = None, imports: list[str] = ()) -> str:
    """The ``entrorl lab`` command line (quoted for a POSIX shell) that runs, or goes on with, ``methods`` (none: the
    preset's matrix) of ``preset`` in the folder ``out`` (None: a new folder of its own); ``imports``: the modules
    that register methods of one's own, each an ``--import``."""
    return shlex.join(["entrorl", "lab", "--preset", preset, *(["--methods", ",".join(methods)] if methods else []),
                       *(["--out", str(out)] if out is not None else []),
                       *(["--workers", str(workers)] if workers is not None else []),
                       *(["--rl-seed", str(rl_seed)] if rl_seed is not None else []),
                       *(option for module in imports for option in ("--import", module))])


def write_run_report(run_dir: str | Path, *, out: str | Path | None = None, fit_fraction: float = DEFAULT_FIT_FRACTION,
                     figures: bool = True) -> dict[str, Any]:
    """Write ``report.md``, ``report.html`` (self-contained), ``report.json`` and ``figures/*.png`` for the training
    run in ``run_dir`` (default: into ``run_dir/report``); returns the content of ``report.json``. ``run_dir`` may
    also be verl's file logger's JSON lines, or a folder whose one such file is the run (default ``out`` then:
    ``<the file's name without .jsonl>.report`` beside it).

    Raises:
        NotARunDirectory: ``run_dir`` is not a directory, or holds no ``metrics.jsonl``, ``config.json``,
            ``trainer_state.json`` or verl log, or holds several verl logs
            (a laboratory folder and a checkpoint are named as such, with the way to what was meant).
        ValueError: ``fit_fraction`` outside (0, 1].
    """
    run_dir = Path(run_dir)
    if not is_real_number(fit_fraction) or not (0.0 < fit_fraction <= 1.0):
        raise ValueError(f"fit_fraction must be a number in (0, 1]; got {fit_fraction!r}")
    if run_dir.is_file():
        if run_dir.name in ("metrics.jsonl", TRAINER_STATE) or (
                run_dir.name == "config.json" and isinstance(content := read_json(run_dir), dict) and "method" in content):
            if not is_verl_log(run_dir):
                raise NotARunDirectory(f"{run_dir} is a file of the run in {run_dir.parent}: `entrorl report` reads "
                                       f"the run's folder (`entrorl report {shlex.quote(str(run_dir.parent))}`)")
        if _holds_nothing(run_dir):
            raise NotARunDirectory(f"{run_dir} is empty: nothing has been logged yet (verl's file logger writes its "
                                   "first line after the validation before training, or after the first step)")
        if not is_verl_log(run_dir):
            raise NotARunDirectory(f"{run_dir} is a file: `entrorl report` reads a run directory, or the JSON lines of "
                                   "verl's file logger (`{\"step\": N, \"data\": {...}}` on each line), which it is not")
        return _verl_report(run_dir, out, fit_fraction, figures)
    if not run_dir.is_dir():
        raise NotARunDirectory(f"no run directory at {run_dir}")
    # as given ('.' and '..' made absolute, links kept: a checkpoint linked in from elsewhere, a run named as typed),
    # then with links resolved (a link to a checkpoint)
    for given in dict.fromkeys((Path(os.path.abspath(run_dir)), run_dir.resolve())):
        for parent in (given, *given.parents):
            if parent.parent.name == "checkpoints" and (parent.parent.parent / "metrics.jsonl").exists():
                raise NotARunDirectory(f"{run_dir} is in checkpoint {parent.name} of the run {parent.parent.parent}: "
                                       "report on the run")
    config, trainer_state, unreadable_states, verl_logs, an_entrorl_or_trl_run = _run_files(run_dir)
    if an_entrorl_or_trl_run:
        return _RunReport(_TrainingRun(run_dir, config=config, trainer_state=trainer_state,
                                       unreadable_states=unreadable_states), Path(out or run_dir / "report"),
                          float(fit_fraction), figures, default_out=out is None).build()
    if len(verl_logs) == 1:
        return _verl_report(verl_logs[0], out, fit_fraction, figures)
    if verl_logs:
        raise NotARunDirectory(f"{run_dir} holds several verl logs ({', '.join(path.name for path in verl_logs)}): "
                               "name the one to report on")
    if (run_dir / "lab.json").exists():
        again = _lab_command(run_dir)
        raise NotARunDirectory(f"{run_dir} is a laboratory folder: its report is {run_dir / 'report.md'}"
                               + (f" (`{again}` writes it again)" if again else "")
                               + f"; each method's run is in {run_dir / 'methods'}/<method>")
    writers = ("(`entrorl train ... --run-dir DIR` writes one; so does TRL's GRPOTrainer with the entrorl plugin, in "
               "its output_dir; verl's file logger writes JSON lines that can be named instead)")
    if (run_dir / "config.json").exists():
        said = _what_is_wrong_with_config(run_dir / "config.json", config)
        raise NotARunDirectory(f"{run_dir} holds no metrics.jsonl or trainer_state.json, and its config.json {said}: "
                               f"not a training run directory {writers}")
    empty_logs = [path.name for path in sorted(run_dir.glob("*.jsonl")) if _holds_nothing(path)]
    if empty_logs:
        raise NotARunDirectory(f"{run_dir} holds no metrics.jsonl, config.json or trainer_state.json, and "
                               f"{', '.join(empty_logs)} {'is' if len(empty_logs) == 1 else 'are'} empty: nothing has "
                               "been logged yet (verl's file logger writes its first line after the validation "
                               "before training, or after the first step)")
    raise NotARunDirectory(f"{run_dir} holds no metrics.jsonl, config.json or trainer_state.json: not a training run "
                           f"directory {writers}")


def _run_files(run_dir: Path) -> tuple[Any, Path | None, list[Path], list[Path], bool]:
    """What a folder holds, each read once: ``config.json``'s content, the ``trainer_state.json`` to read (none beside
    a ``metrics.jsonl``) and those that could not be read, its verl logs (none in an entrorl or TRL run's folder), and
    whether it is an entrorl or a TRL run's folder (``metrics.jsonl``, a run's ``config.json``, a trainer state)."""
    config = read_json(run_dir / "config.json")
    metrics = run_dir / "metrics.jsonl"  # verl's file logger writes the file it is named, metrics.jsonl included
    has_metrics = metrics.exists() and not (metrics.is_file() and is_verl_log(metrics))
    trainer_state, unreadable_states = (None, []) if has_metrics else trainer_states(run_dir)
    a_run_config = isinstance(config, dict) and "method" in config  # a training run's, not a model's config.json
    a_run = has_metrics or a_run_config or trainer_state is not None
    verl_logs = [] if a_run else sorted(path for path in run_dir.glob("*.jsonl") if is_verl_log(path))
    return config, trainer_state, unreadable_states, verl_logs, a_run


def _report_beside(log: Path) -> Path:
    return log.with_name(f"{log.stem}.report")


def default_report_dir(run_dir: str | Path) -> Path:
    """Where :func:`write_run_report` writes without ``out``: ``run_dir/report``, or for verl's log ``NAME.jsonl`` (named,
    or the one such file of a folder that is no entrorl or TRL run), ``NAME.report`` beside it."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return _report_beside(run_dir)
    verl_logs = _run_files(run_dir)[3] if run_dir.is_dir() else []
    return _report_beside(verl_logs[0]) if len(verl_logs) == 1 else run_dir / "report"


def _verl_report(log: Path, out: str | Path | None, fit_fraction: float, figures: bool) -> dict[str, Any]:
    return _RunReport(_TrainingRun(log.parent, config=None, trainer_state=None, verl_log=log),
                      Path(out or _report_beside(log)), float(fit_fraction), figures, default_out=out is None).build()
