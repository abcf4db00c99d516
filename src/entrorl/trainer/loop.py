"""The trainer: GRPO/PPO-style fine-tuning of a Hugging Face causal LM with any entrorl objective.

One step of training is :meth:`Trainer.train_step`, readable top to bottom:
prompts → rollouts → rewards → advantages → scoring → updates → diagnostics.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import random
import re
import shutil
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from fractions import Fraction
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from pydantic import ValidationError
from pydantic_core import to_jsonable_python

from entrorl._checks import refuse_multi_process_launch, validation_message
from entrorl.advantages import AdvantageOverflow, compute_advantages, unlikeliness_shaped_rewards
from entrorl.data import (DataError, PromptRecord, PromptStream, filter_by_pass_rate, informative_groups, load_prompts,
                          parse_band)
from entrorl.data.loading import answers_class_labels, class_labels_numbered, nested_floats_widened
from entrorl.modeling import (
    DamagedWeightsError,
    bucketed_response_token_stats,
    check_model_files,
    check_prompts_fit,
    check_stop_tokens_can_be_sampled,
    encode_records,
    is_out_of_memory,
    load_causal_lm,
    load_tokenizer,
    model_vocab_size,
    out_of_memory_while,
    read_model_config,
    stop_token_ids,
    unknown_token_note,
    unstopped_turn_end_note,
)
from entrorl.objective import Objective, ObjectiveConfig, PolicyBatch, build_objective
from entrorl.rewards import RewardResult, RewardRunner, get_reward
from entrorl.rewards.diversity import diversity_weights, load_embedder
from entrorl.tokens import STAT_NAMES, TokenStats
from entrorl.rollout import HFSampler, Rollouts, SamplingParams, forked_rng
from entrorl.trainer.adapters import ADAPTER_DIRECTORY, LoraAdapter
from entrorl.trainer.allocator import retain_freed_memory
from entrorl.trainer.checkpoint import (
    PASSED_OVER,
    atomic_write_text,
    capture_rng_state,
    checkpoint_step,
    checkpoints_with_a_model,
    incomplete_checkpoints,
    latest_checkpoint,
    load_trainer_state,
    check_run_directory_writable,
    lock_run_directory,
    model_fingerprint,
    remove_temporary_files,
    restore_rng_state,
    save_checkpoint,
    set_aside_checkpoints_after,
    software_changes,
    software_versions,
)
from entrorl.trainer.config import (OptimConfig, RolloutConfig, TrainConfig, resolve_device, resume_changes,
                                   with_resolved_paths)
from entrorl.trainer.diagnostics import (
    covariance_summary,
    decision_points,
    discriminator_summary,
    entropy_summary,
    FirstOrderEntropyChange,
    predicted_vs_measured,
)
from entrorl.trainer.evaluate import NonFiniteLogProbs, evaluate_model
from entrorl.trainer.loggers import MetricsLogger, TrackerError
from entrorl.trainer.precision import LossScale, MasterWeights, float16_range_note, needs_master_weights
from entrorl.trainer.progress import StepProgress
from entrorl.trainer.schedule import SCHEDULE_KEYS, learning_rate_factor, schedule_factor
from entrorl.trainer.step_metrics import MicroBatchShares, step_metrics_over_updates
from entrorl.trainer.stop_signals import FINISH_THE_STEP, HANGUP, catch_stop_signals, exit_at_once_on_another_signal

__all__ = ["Trainer", "TrainingStopped", "TrainingInterrupted", "ScoredRollouts", "learning_rate_factor"]



class TrainingStopped(RuntimeError):
    """The run stopped on purpose (e.g. too many non-finite steps in a row); the last checkpoint is intact.

    ``step`` and ``metrics``, when given: the record of the step the run stopped in, as far as that step got (its
    rewards, its skipped updates), which :meth:`Trainer.train` writes to ``metrics.jsonl`` before it stops."""

    def __init__(self, message: str, *, step: int | None = None, metrics: dict[str, float] | None = None):
        super().__init__(message)
        self.step, self.metrics = step, metrics


class TrainingInterrupted(RuntimeError):
    """A signal (SIGINT, SIGTERM, SIGXCPU) stopped the run after it finished a step and checkpointed it.

    ``signal_number`` is the signal, ``step`` the last step done and saved, ``checkpoint`` its directory. A signal
    during the evaluation before the first step (``eval.at_start``) stops the run there: ``step`` 0 and no
    ``checkpoint`` (there is nothing to resume; the run starts afresh)."""

    def __init__(self, signal_number: int, step: int, checkpoint: Path | None):
        self.signal_number, self.step, self.checkpoint = signal_number, step, checkpoint
        name = signal.Signals(signal_number).name
        super().__init__(f"{name} received: stopped after step {step}, saved in {checkpoint}" if checkpoint is not None
                         else f"{name} received: stopped after the evaluation at the start, before the first step")


@dataclass
class ScoredRollouts:
    """One step's training data: rollouts plus rewards and per-sample advantages."""

    rollouts: Rollouts
    records: list[PromptRecord]
    group_ids: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    metrics: dict[str, float]
    completions: list[str] = field(default_factory=list)
    reasons: list[str | None] = field(default_factory=list)  # why each sample got its score, when the reward says
    correct: torch.Tensor | None = None  # bool per sample: score >= reward.correct_threshold
    sampled_tokens: int | None = None  # response tokens sampled for the step, rows dynamic sampling dropped included


#: Registered methods whose recipe changed after checkpoints began to be written and before they recorded the objective
#: they trained with (``objective_built``): a resume of such a checkpoint says so. ``first``: only where the method
#: comes first in the composition and no ``loss_agg_mode`` is set (the change was to its own aggregation).
RECIPES_CHANGED = {
    "rft": ("its loss is now the mean over the accepted samples' tokens (RAFT), where it was divided by every sampled "
            "token", False),
    "icepop": ("alone, it now aggregates as its paper, seq-mean-token-mean, where it took token-mean", True),
}


def trainer_objective(config: TrainConfig) -> Objective:
    """The objective ``config`` trains with (see :func:`_with_a_constant_divisor`)."""
    return _with_a_constant_divisor(config.build_objective(), config.rollout.max_new_tokens)


def _with_a_constant_divisor(objective: Objective, max_new_tokens: int) -> Objective:
    """``objective`` with Dr. GRPO's divisor, when its aggregation needs one and none is given: the longest response
    allowed (``rollout.max_new_tokens``), a constant, not the step's longest response, which varies."""
    if objective.loss_agg_mode == "seq-mean-token-sum-norm" and objective.loss_scale_factor is None:
        objective.loss_scale_factor = float(max_new_tokens)
    return objective


def _objective_of_settings(saved_config: dict[str, Any]) -> Objective:
    """The objective this version builds from a checkpoint's saved settings: its method and ``rollout.max_new_tokens``
    alone (the other settings, which a resume may change or this machine may lack, do not enter it)."""
    method = saved_config.get("method", TrainConfig.model_fields["method"].default)
    if isinstance(method, list):
        method = "+".join(str(name) for name in method)
    method = ObjectiveConfig.model_validate(method if isinstance(method, dict) else {"method": method},
                                            context={"settings_only": True})
    rollout = saved_config.get("rollout") if isinstance(saved_config.get("rollout"), dict) else {}
    max_new_tokens = rollout.get("max_new_tokens", RolloutConfig.model_fields["max_new_tokens"].default)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _with_a_constant_divisor(build_objective(method), max_new_tokens)


def _as_stored(description: dict[str, Any]) -> dict[str, Any]:
    """An objective's :meth:`~entrorl.objective.Objective.describe` as plain JSON data (lists, string keys; a path, an
    enumeration or another value of a part's parameter as JSON writes it), which the checkpoint's loader reads back."""
    return json.loads(json.dumps(to_jsonable_python(description, fallback=str)))


def objective_changes(saved_state: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(setting, checkpoint's, now)`` where this version builds the checkpoint's own configuration otherwise than
    the objective the checkpoint recorded it trained with (``objective_built``): a registered method's recipe that
    changed between versions, not a setting the resumed run changes. A part's parameter is ``<kind>.<part>.<name>``,
    a part added or gone ``<kind>.<part>`` (``absent`` on the side without it). None when the checkpoint recorded no
    objective; ``method`` when this version cannot build its method from the checkpoint's settings."""
    recorded, saved_config = saved_state.get("objective_built"), saved_state.get("config")
    if not isinstance(recorded, dict) or not isinstance(saved_config, dict):
        return []
    try:
        rebuilt = _objective_of_settings(saved_config)
    except (ValidationError, ValueError, TypeError) as error:
        message = ("; ".join(validation_message(e) for e in error.errors()) if isinstance(error, ValidationError)
                   else error)
        return [("method", "as recorded", f"not built by this version from the checkpoint's settings: {message}")]

    def parts(description: dict[str, Any]) -> dict[str, Any]:
        found = {}
        for kind, value in description.items():
            for part in value if isinstance(value, list) else [value]:
                if isinstance(part, dict) and "name" in part:
                    found[f"{kind}.{part['name']}"] = {key: item for key, item in part.items() if key != "name"}
                elif not isinstance(value, list):
                    found[kind] = value
        return found

    before, after = parts(_as_stored(recorded)), parts(_as_stored(rebuilt.describe()))
    changes = []
    for key in sorted(before.keys() | after.keys()):
        old, new = before.get(key, "absent"), after.get(key, "absent")
        if isinstance(old, dict) and isinstance(new, dict):
            changes += [(f"{key}.{name}", old.get(name), new.get(name)) for name in sorted(old.keys() | new.keys())
                        if old.get(name) != new.get(name)]
        elif old != new:
            changes.append((key, old, new))
    return changes


def recipe_notes(saved_state: dict[str, Any], method: ObjectiveConfig) -> list[str]:
    """For a checkpoint written before checkpoints recorded their objective: what changed since in the recipes of
    the methods it names (:data:`RECIPES_CHANGED`), in words."""
    if "objective_built" in saved_state:
        return []
    names = method.method_names()
    return [f"{name}: {said}" for position, name in enumerate(names) if name in RECIPES_CHANGED
            for said, first in [RECIPES_CHANGED[name]] if not first or (position == 0 and method.loss_agg_mode is None)]


class Trainer:
    """Train a local Hugging Face causal LM with an entrorl method; see :class:`TrainConfig`.

    >>> trainer = Trainer(load_config("run.yaml"))     # doctest: +SKIP
    >>> trainer.train()                                # doctest: +SKIP
    """

    def __init__(self, config: TrainConfig, *, run_dir: str | Path | None = None, resume: bool = False, console=None):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"Trainer takes a TrainConfig, got {type(config).__name__}: build one with "
                            "load_config(path or dict, overrides) or TrainConfig(**settings)")
        refuse_multi_process_launch("entrorl's Trainer")
        self.config = config
        self._closed = False
        self.console = console
        # what continues an interrupted run, in the message of a second Ctrl-C ("running the laboratory again")
        self.resumed_by = "--resume"
        if config.torch_threads is not None:
            torch.set_num_threads(config.torch_threads)
        retain = config.retain_freed_memory
        if retain or (retain is None and resolve_device(config.model.device).type == "cpu"):
            retain_freed_memory()
        self.run_dir = Path(run_dir).expanduser() if run_dir is not None else self._default_run_dir()
        check_run_directory_writable(self.run_dir)  # now, not after the model has loaded
        # held from here: a second start of the same run is refused at once, and no other run can change the
        # directory's checkpoints while this one reads them and loads (a run that does not exist yet is checked for
        # again when its directory is made)
        self._lock = None
        existed = self.run_dir.is_dir()
        if existed:
            self._lock = lock_run_directory(self.run_dir)
        try:
            self._start(config, resume=resume, existed=existed)
        except BaseException:
            if self._lock is not None:
                self._lock.close()
                self._lock = None
            raise

    def _start(self, config: TrainConfig, *, resume: bool, existed: bool) -> None:
        """The rest of the set-up: the checkpoint to resume from, data, reward, models, sampler, optimizer; then the
        run directory's files (``existed``: whether the directory was there, and locked, when the start began)."""
        checkpoint = latest_checkpoint(self.run_dir, verify="all" if resume else None)  # a resume reads every file
        if resume and checkpoint is None:
            damaged = incomplete_checkpoints(self.run_dir, verify="all")
            aside = self.run_dir / "checkpoints" / PASSED_OVER
            set_aside = sorted(path.name for path in aside.iterdir()) if aside.is_dir() else []
            raise FileNotFoundError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}" + (
                "; incomplete: " + "; ".join(f"{path.name} ({wrong})" for path, wrong in damaged) if damaged else "")
                + (f"; set aside by earlier starts in {aside}: {', '.join(set_aside)}" if set_aside else ""))
        if not resume and checkpoint is not None:  # a fresh run here would prune that run's checkpoints
            raise FileExistsError(f"{self.run_dir} holds another run's checkpoints (latest: {checkpoint.name}); pass "
                                  "--resume to continue it, or choose another --run-dir / logging.name")
        if not resume and (models := checkpoints_with_a_model(self.run_dir)):  # and replace its metrics.jsonl
            missing = dict(incomplete_checkpoints(self.run_dir))
            raise FileExistsError(
                f"{self.run_dir} holds another run's trained models in checkpoints that cannot be resumed ("
                + "; ".join(f"{path.name}: {missing[path]}" for path in models)
                + f"): move them out of {self.run_dir / 'checkpoints'}, or choose another --run-dir / logging.name")
        saved_state = load_trainer_state(checkpoint) if resume else None  # an unreadable checkpoint fails here, early
        self.resumed_from = checkpoint if resume else None
        self.needs_reference = config.needs_reference()
        self.resume_learning_rate: tuple[float, float] | None = None
        self.resume_changes = self._check_resume_changes(saved_state) if saved_state is not None else []
        # (package, checkpoint's version, this process's): a resume then need not reproduce an uninterrupted run
        self.software_changes = software_changes(saved_state.get("software")) if saved_state is not None else []
        # adapters and the reference are read from model.path again: the model there must be the one they were read from
        self.base_model_fingerprint = (model_fingerprint(Path(config.model.path)) if config.reads_model_path_again()
                                       else None)
        saved_fingerprint = saved_state.get("base_model") if saved_state is not None else None
        if saved_fingerprint and self.base_model_fingerprint and saved_fingerprint != self.base_model_fingerprint:
            read = [what for what, reads in (("the LoRA adapters' base model", config.model.lora is not None),
                                             ("the kl_ref reference", self.needs_reference)) if reads]
            warnings.warn(f"the model in model.path ({config.model.path}) is not the one {checkpoint.name} was trained "
                          f"with: its weight files changed since, and {' and '.join(read)} "
                          f"{'are' if len(read) > 1 else 'is'} read from it; the run continues on the model there now",
                          stacklevel=2)
        self._seed_everything(config.seed)

        # what cannot fail late: data and reward before any model loads
        self.train_records, self.train_prompts_read = self._read_train_records()
        self.stream = PromptStream(self.train_records, seed=config.seed, shuffle=config.data.shuffle)
        if saved_state is not None:  # other prompts than the checkpoint's are refused before any model loads
            self._restore_stream(saved_state["stream"])
        if len(self.train_records) < config.rollout.prompts_per_step:
            warnings.warn(f"data.train has {len(self.train_records)} prompt(s), fewer than rollout.prompts_per_step = "
                          f"{config.rollout.prompts_per_step}: every step samples some prompt in two or more groups",
                          stacklevel=2)
        self.eval_records = (  # every row is checked; those past eval.max_prompts are neither tokenised nor sampled
            load_prompts(config.data.eval, prompt_column=config.data.prompt_column, answer_column=config.data.answer_column,
                         meta_columns=config.data.meta_columns, require_answer=config.data.require_answer, split=None)
            [:config.eval.max_prompts] if config.data.eval else []
        )
        self.reward = RewardRunner(
            get_reward(config.reward.name, **config.reward.kwargs),
            overlong=config.reward.overlong.model_dump() if config.reward.overlong else None,
            correct_threshold=config.reward.correct_threshold, name=config.reward.name,
        )
        self.extra_rewards = [(extra.name, extra.weight, RewardRunner(get_reward(extra.name, **extra.kwargs), name=extra.name))
                              for extra in config.reward.extra]
        for runner in [self.reward] + [runner for _, _, runner in self.extra_rewards]:
            runner.check_arguments([record.meta for record in self.train_records + self.eval_records])
        self.objective = trainer_objective(config)
        self.advantage_name = config.advantage_estimator()
        self.advantage_params = dict(config.advantage.params)
        # estimators that split correct from wrong samples (PSR, NSR, W-REINFORCE, Pass@k) take the reward's verdicts,
        # as accuracy does (shaping the reward does not change them), or, given their own correct_threshold, the main
        # reward's scores against it
        self.estimator_threshold = self.advantage_params.pop("correct_threshold", None)
        # a checkpoint's model/ holds no weights when its adapters were saved without the merged model
        model_path = check_model_files(checkpoint / "model" if checkpoint is not None else config.model.path,
                                       weights=checkpoint is None or config.model.lora is None)
        diversity = config.reward.diversity
        self.diversity_embedder = (load_embedder(diversity.model, batch_size=diversity.batch_size,
                                                 device=str(resolve_device(diversity.device)))
                                   if diversity.enabled else None)

        self.tokenizer = load_tokenizer(model_path, trust_remote_code=config.model.trust_remote_code)
        if config.model.chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"model.chat_template is true, but the tokenizer in {model_path} has no chat template")
        # prompts that do not fit the context fail now when the config declares it, not after the weights load
        declared = read_model_config(model_path, trust_remote_code=config.model.trust_remote_code)
        if declared is not None:
            self._encode_prompts(declared)
        self.device = resolve_device(config.model.device)
        self.adapter: LoraAdapter | None = None  # set by _load_policy with model.lora
        self.model = self._load_policy(model_path, checkpoint)
        self.reference = self._load_reference()
        if declared is None:
            self._encode_prompts(self.model)
        self.sampling = SamplingParams(max_new_tokens=config.rollout.max_new_tokens, temperature=config.rollout.temperature,
                                       top_p=config.rollout.top_p, top_k=config.rollout.top_k)
        self.sampler = self._build_sampler(model_path)
        note = unstopped_turn_end_note(self.model, self.tokenizer) if config.model.chat_template else None
        if note is not None:
            warnings.warn(f"model.chat_template: {note}", stacklevel=2)
        if config.rollout.backend == "vllm" and self.adapter is not None and checkpoint is not None:
            self._sync_sampler()  # the engine holds the base model; new adapters change nothing yet (B = 0)
        # a bfloat16 / float16 model is stepped through float32 copies of its weights (see entrorl.trainer.precision)
        self.master = MasterWeights(self.model) if config.model.master_weights and needs_master_weights(self.model) else None
        self.loss_scale = LossScale() if config.model.dtype == "float16" and config.model.loss_scaling else None
        self.optimizer, self.scheduler = self._build_optimizer()
        self.step = 0
        self.consecutive_nonfinite = 0
        self.consecutive_failed_rewards = 0  # steps in a row whose every sample's reward raised
        self.skipped_steps = 0
        self._warned_nothing_trained = False
        self._warned_dynamic_sampling = False  # fewer informative groups than a step takes: said once
        self.weight_norm_at_start: float | None = None
        # where this version builds the checkpoint's method otherwise than it trained (a registered recipe changed)
        self.objective_changes = objective_changes(saved_state) if saved_state is not None else []
        self.recipe_notes = recipe_notes(saved_state, config.objective_config()) if saved_state is not None else []
        if saved_state is not None:
            self._restore(saved_state)
        # what the trainer is doing, in words (train_step, evaluate and save say it), for a message about a failure
        # during it (memory that ran out)
        self.activity = f"training step {self.step + 1}"
        self.weight_norm = self._trained_weight_norm()  # on a resume, the checkpoint's weights'
        if saved_state is None:
            self.weight_norm_at_start = self.weight_norm
        # (step, trained weights' norm) of the newest checkpoint this process wrote or resumed from
        self.checkpoint_weight_norm = (self.step, self.weight_norm) if saved_state is not None else None
        # the outermost folder this creates (runs/ for runs/<name> on a first run), removed again if the start fails
        created_run_dir = next((folder for folder in reversed([self.run_dir, *self.run_dir.parents])
                                if not folder.exists()), None)
        if not existed:
            if self.run_dir.exists():
                raise FileExistsError(f"{self.run_dir} was made by another run while this one was starting; continue "
                                      "that run with --resume once it has ended, or choose another --run-dir / "
                                      "logging.name")
            self.run_dir.mkdir(parents=True, exist_ok=True)  # only now: a run that fails to start leaves no directory
            self._lock = lock_run_directory(self.run_dir)  # raises before anything is written if another run holds it
        try:  # ... not even when a logger (a W&B login, a tracking server) fails to start
            self.logger = MetricsLogger(
                self.run_dir, resume_step=self.step if checkpoint is not None else None,
                tensorboard=config.logging.tensorboard, wandb=config.logging.wandb, trackio=config.logging.trackio,
                run_name=self.run_dir.name, project=config.logging.project, config=config.model_dump(mode="json"),
            )
            self._discard_files_after(self.step if checkpoint is not None else None)
            # last, so that a start that fails (an unreadable metrics.jsonl) leaves the record of the run's last start;
            # absolute paths, so that the record names the same files from any working directory;
            # renamed into place: a full disk leaves the previous run's record, never a truncated one
            atomic_write_text(self.run_dir / "config.json",
                              json.dumps(with_resolved_paths(config.model_dump(mode="json")), indent=2), follow_links=False)
        except BaseException:
            with contextlib.suppress(Exception):  # the failure to start is the one to report
                self.close(failed=True)
            if created_run_dir is not None:
                shutil.rmtree(created_run_dir, ignore_errors=True)
            raise

    def close(self, *, failed: bool = False) -> None:
        """Close the loggers (``failed``: the W&B run is marked failed) and let go of the run directory (another run may
        use it from then on). ``train`` does it when it returns or raises; a trainer driven step by step calls it when
        done. A closed trainer trains, evaluates and saves no more: a new ``Trainer(config, run_dir=...,
        resume=True)`` continues the run."""
        self._closed = True
        try:
            if getattr(self, "logger", None) is not None:
                self.logger.close(failed=failed)
        finally:  # the lock goes even when the loggers could not sync (a full disk)
            if getattr(self, "_lock", None) is not None:
                self._lock.close()
                self._lock = None

    # ------------------------------------------------------------------------------------------------ set-up
    _STEP_FILE = re.compile(r"step_(\d+)\.jsonl?")  # eval/, forks/, samples/
    _REWARD_LOG_STEP = re.compile(r"step (\d+), ")  # the first line of reward_errors.log

    def _discard_files_after(self, step: int | None) -> None:
        """Remove the evaluations, fork tokens, samples and first reward traceback that an interrupted run wrote after
        ``step``, the checkpoint this run resumes from (``None``: a fresh start, which keeps none of them), so that the
        run directory reads as if the run had never stopped, as ``metrics.jsonl`` does; set aside the checkpoints after
        it (see :func:`set_aside_checkpoints_after`); and remove the half-written files of a process killed while
        writing them."""
        remove_temporary_files(self.run_dir)
        moved = set_aside_checkpoints_after(self.run_dir, step)
        if moved:
            warnings.warn(f"moved the checkpoints {'this resume' if step is not None else 'this fresh start'} passed "
                          f"over (incomplete or damaged) to {moved[0].parent}: {', '.join(path.name for path in moved)}",
                          stacklevel=3)
        for folder in ("eval", "forks", "samples"):
            for path in (self.run_dir / folder).glob("step_*"):
                match = self._STEP_FILE.fullmatch(path.name)
                if match and (step is None or int(match.group(1)) > step):
                    path.unlink()
        reward_log = self.run_dir / "reward_errors.log"
        if reward_log.is_file():  # afresh, written by a discarded step, or cut short (an earlier version wrote it in
            # place: a full disk left it empty): the run's first failure is still to come
            match = self._REWARD_LOG_STEP.match(reward_log.read_text(encoding="utf-8", errors="replace")[:40])
            if step is None or match is None or int(match.group(1)) > step:
                reward_log.unlink()

    def version_notes(self) -> list[str]:
        """What differs, for a resumed run, between the software that wrote its checkpoint and this one: the method
        this version builds otherwise, the changed recipes a checkpoint older than that record used, the packages'
        versions; one sentence each (``entrorl train`` and the laboratory print them)."""
        notes = []
        if self.objective_changes:
            changed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in self.objective_changes)
            notes.append(f"this version builds the method otherwise than the one that wrote that checkpoint: {changed}; "
                         "the run continues with this version's")
        notes += [f"that checkpoint predates the record of the objective it trained with; since, {note}; the run "
                  "continues with this version's" for note in self.recipe_notes]
        if self.software_changes:
            changed = ", ".join(f"{name} {old} -> {new}" for name, old, new in self.software_changes)
            notes.append(f"software changed since that checkpoint: {changed}; the run continues, but it need not give "
                         "the metrics an uninterrupted run would have")
        return notes

    def _check_resume_changes(self, saved_state: dict[str, Any]) -> list[tuple[str, Any, Any]]:
        """The settings this resumed run changes from those its checkpoint was trained with, ``(key, saved, now)``;
        ``ValueError`` naming every one it may not change (see :func:`resume_changes`)."""
        saved_config = saved_state.get("config")
        if saved_config is None:  # a checkpoint written before configs were saved with it: the run's last config
            config_file = self.run_dir / "config.json"
            saved_config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else None
        if saved_config is None:
            return []
        accepted = check_resume_settings(saved_config, self.config)
        moved = next(((old, new) for key, old, new in accepted if key == "data.train"), None)
        if moved is not None and "records_digest" not in (saved_state.get("stream") or {}):
            raise ValueError(f"--resume cannot change what the run was trained with:\n  data.train: {moved[0]!r} in the "
                             f"checkpoint, {moved[1]!r} now\nthis checkpoint keeps no digest of its prompts (an earlier "
                             "entrorl wrote it), which would tell whether the file now named holds the same ones: put "
                             "data.train back, or start a new run (another --run-dir) from the checkpoint's model "
                             "directory")
        self.resume_learning_rate = self._next_learning_rates(saved_config, saved_state["step"], accepted)
        return accepted

    def _next_learning_rates(self, saved_config: dict[str, Any], step: int,
                             changes: list[tuple[str, Any, Any]]) -> tuple[float, float] | None:
        """``(before, now)``: the learning rate of the resumed run's next step under the checkpoint's schedule and
        under the current one, when a change to the rate, length or schedule moves it; else None."""
        if not any(key in SCHEDULE_KEYS for key, _, _ in changes):
            return None
        try:
            before = OptimConfig.model_validate(saved_config.get("optim") or {})
        except ValidationError:
            return None
        rates = [optim.lr * schedule_factor(optim, step) for optim in (before, self.config.optim)]
        return (rates[0], rates[1]) if rates[0] != rates[1] else None

    def _load_policy(self, model_path: Path, checkpoint: Path | None):
        """The policy, from the checkpoint when resuming (``ValueError`` naming a damaged checkpoint's way out); with
        ``model.lora``, the base model with adapters (``self.adapter``), those of the checkpoint when resuming."""
        from safetensors import SafetensorError

        model_config = self.config.model
        lora = model_config.lora
        try:  # with adapters, the base model: the checkpoint holds the adapters and, for other tools, the merged model
            model = load_causal_lm(Path(model_config.path) if lora is not None else model_path, dtype=model_config.dtype,
                                   disable_dropout=model_config.disable_dropout,
                                   trust_remote_code=model_config.trust_remote_code, device=self.device)
        except (torch.OutOfMemoryError, MemoryError):
            raise
        except (OSError, RuntimeError, SafetensorError, DamagedWeightsError) as error:
            if is_out_of_memory(error):  # not the checkpoint's fault: deleting it would lose good weights
                raise out_of_memory_while(f"loading the model of {checkpoint or model_path}", error) from error
            if checkpoint is None or lora is not None:
                raise
            if isinstance(error, DamagedWeightsError) and error.__cause__ is not None:
                error = error.__cause__  # what the weight file's reader said
            raise ValueError(f"the model of checkpoint {checkpoint} cannot be read ({type(error).__name__}: {error}); "
                             f"delete {checkpoint.name} to resume from the checkpoint before it") from None
        if lora is not None:
            self.adapter = LoraAdapter(model, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                                       target_modules=lora.target_modules, resumed=checkpoint is not None)
            if checkpoint is not None:
                try:
                    self.adapter.load(checkpoint / ADAPTER_DIRECTORY)
                except (OSError, RuntimeError, SafetensorError, ValueError) as error:
                    if is_out_of_memory(error):
                        raise out_of_memory_while(f"reading the adapters of {checkpoint}", error) from error
                    raise ValueError(f"the adapters of checkpoint {checkpoint} cannot be read ({type(error).__name__}: "
                                     f"{error}); delete {checkpoint.name} to resume from the checkpoint before it") from None
        if model_config.activation_checkpointing:  # the method's name from transformers 5.24 on, and before
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model.train()

    def _load_reference(self):
        """The frozen starting model, when the configuration asks for one (:meth:`TrainConfig.needs_reference`) and
        the policy is not the base model with adapters (whose reference is the policy, adapters off)."""
        if not self.needs_reference or self.adapter is not None:
            return None
        model_config = self.config.model
        reference = load_causal_lm(Path(model_config.path), dtype=model_config.dtype,
                                   trust_remote_code=model_config.trust_remote_code, device=self.device)
        return reference.eval().requires_grad_(False)

    @contextlib.contextmanager
    def _reference_model(self):
        """The frozen starting model: the loaded reference, or the policy with its adapters switched off."""
        if self.adapter is not None:
            with self.adapter.disabled() as base:
                yield base
        else:
            yield self.reference

    def _build_sampler(self, model_path: Path):
        rollout = self.config.rollout
        if rollout.backend == "hf":
            return HFSampler.for_model(self.model, self.tokenizer, batch_size=rollout.generation_batch_size)
        from entrorl.rollout.vllm import VLLMSampler  # an optional dependency, imported only when asked for

        stop_ids = stop_token_ids(self.model, self.tokenizer)
        check_stop_tokens_can_be_sampled(self.model, stop_ids)
        # with adapters the engine loads the base model, and is given the merged weights (_sync_sampler)
        return VLLMSampler(Path(self.config.model.path) if self.adapter is not None else model_path,
                           eos_token_id=stop_ids,
                           pad_token_id=self.tokenizer.pad_token_id, dtype=self.config.model.dtype, seed=self.config.seed,
                           gpu_memory_utilization=rollout.vllm_gpu_memory_utilization,
                           trust_remote_code=self.config.model.trust_remote_code)

    def _sync_sampler(self) -> None:
        """Push the updated policy into the vLLM engine: its parameters, or with adapters the merged weights."""
        self.sampler.sync_weights(self.model, None if self.adapter is None else self.adapter.merged_parameters())

    def _build_optimizer(self):
        """AdamW over the trained weights (the float32 copies when there are master weights) and its schedule."""
        optim = self.config.optim
        trained = self.master.copies if self.master is not None else [p for p in self.model.parameters() if p.requires_grad]
        # torch's fused AdamW (one kernel for all parameters instead of a loop over them) runs on the CPU and CUDA
        fused = self.device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in trained)
        optimizer = torch.optim.AdamW(trained, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                      weight_decay=optim.weight_decay, fused=fused or None)
        return optimizer, self._build_scheduler(optimizer, step=0)

    def _build_scheduler(self, optimizer, *, step: int):
        """``optim.lr`` times :func:`learning_rate_factor` of the configured schedule, positioned at update ``step``
        (a resumed run takes its current configuration's rate, length and schedule from where it stands)."""
        optim = self.config.optim
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] = optim.lr
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda index: schedule_factor(optim, index), last_epoch=step - 1)

    def _default_run_dir(self) -> Path:
        name = self.config.logging.name or f"{self.config.method_label()}-{datetime.now():%Y%m%d-%H%M%S}"
        return Path(self.config.logging.run_dir) / name

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _restore_stream(self, saved: dict[str, Any]) -> None:
        """Continue dealing the prompts where the checkpoint's stream stood; ``ValueError`` when they are not the prompts
        it was dealing."""
        try:
            self.stream.load_state_dict(saved)
        except ValueError as error:
            if not self._saved_over_the_earlier_reading(saved):
                self._refuse_numbered_class_labels(saved)
                self._refuse_other_data(error)
            try:  # the same rows, which this version reads more exactly
                self.stream.load_state_dict({**saved, "records_digest": self.stream.records_digest})
            except ValueError as again:
                self._refuse_other_data(again)

    def _refuse_other_data(self, error: ValueError) -> NoReturn:
        kept = " (those data.pass_rate_band keeps)" if self.config.data.pass_rate_band is not None else ""
        moved = next((f" ({new!r}; the checkpoint's: {old!r})" for key, old, new in self.resume_changes
                      if key == "data.train"), "")
        raise ValueError(f"--resume: the prompts of data.train{moved}{kept} are not those the checkpoint was trained on: "
                         f"{str(error).removeprefix('PromptStream.load_state_dict: ')}; put the data back, or "
                         "start a new run from the checkpoint's model directory") from None

    def _saved_over_the_earlier_reading(self, saved: dict[str, Any]) -> bool:
        """Whether the stream ``saved`` was dealing the same rows as these, as entrorl read them before it read
        float32 values within structs and lists as written (:func:`entrorl.data.loading.nested_floats_widened`): a
        run of that version resumed on unchanged data. ``ValueError`` when it was, but ``data.pass_rate_band`` keeps
        other rows now (a rate such a value holds reads otherwise)."""
        records = self._records_read_as(saved, nested_floats_widened)
        if records is None:
            return False
        rows = [(record.source, record.prompt, record.answer, record.messages) for record in self.train_records]
        if rows != [(record.source, record.prompt, record.answer, record.messages) for record in records]:
            raise ValueError(
                "--resume: the checkpoint was trained by an earlier version of entrorl, which read the float32 values "
                "within the data's structs and lists widened (0.1 as 0.10000000149011612); this one reads them as "
                "written, and data.pass_rate_band then keeps other prompts than the run's: start a new run from the "
                "checkpoint's model directory, or resume with the earlier version")
        return True

    def _refuse_numbered_class_labels(self, saved: dict[str, Any]) -> None:
        """``ValueError`` when the stream ``saved`` was dealing these rows as an earlier version of entrorl read them,
        with a ``ClassLabel`` answer as the label's number (:func:`entrorl.data.loading.class_labels_numbered`): that
        run's reward compared the completions with '1', not 'B', and its data cannot be read so again."""
        data = self.config.data
        if not answers_class_labels(data.train, data.answer_column):  # other data: not read again for nothing
            return
        for readings in ((class_labels_numbered,), (class_labels_numbered, nested_floats_widened)):
            if self._records_read_as(saved, *readings) is not None:
                raise ValueError(
                    f"--resume: the checkpoint was trained by an earlier version of entrorl, which read the answers of "
                    f"data.train's ClassLabel column {self.config.data.answer_column!r} as the labels' numbers ('1'); "
                    "this one reads their names ('B'), which the run's reward was never given: start a new run, or "
                    "resume with the earlier version")

    def _records_read_as(self, saved: dict[str, Any], *readings) -> list[PromptRecord] | None:
        """``data.train``'s records read within the context managers ``readings`` (an earlier version's reading), when
        they are the ones the stream ``saved`` was dealing (its data digest); None otherwise, or when they cannot be
        read so."""
        try:
            with contextlib.ExitStack() as earlier:
                for reading in readings:
                    earlier.enter_context(reading())
                records, _ = self._read_train_records()
        except (ValueError, OSError):
            return None
        stream = PromptStream(records, seed=self.config.seed, shuffle=self.config.data.shuffle)
        return records if stream.records_digest == saved.get("records_digest") else None

    def _read_train_records(self) -> tuple[list[PromptRecord], int]:
        """``data.train``'s records that ``data.pass_rate_band`` keeps, and how many were read before it kept some."""
        data = self.config.data
        # data.pass_rate_band reads its column whether or not data.meta_columns passes it to the reward
        rate_read_only = (data.pass_rate_band is not None and data.meta_columns is not None
                          and data.pass_rate_column not in data.meta_columns)
        records = self._load_train_prompts(rate_read_only)
        read = len(records)
        if data.pass_rate_band is not None:
            records = self._filter_by_pass_rate(records, keep_column=not rate_read_only)
        return records, read

    def _load_train_prompts(self, rate_read_only: bool) -> list[PromptRecord]:
        """``data.train``'s records, with ``data.pass_rate_column`` in their meta too when ``rate_read_only`` (the band
        reads it though ``data.meta_columns`` leaves it out). A rate column missing there is the band's error, not one
        of the user's meta_columns."""
        data = self.config.data
        load = functools.partial(load_prompts, data.train, prompt_column=data.prompt_column,
                                 answer_column=data.answer_column, require_answer=data.require_answer)
        if not rate_read_only:
            return load(meta_columns=data.meta_columns)
        try:
            return load(meta_columns=[*data.meta_columns, data.pass_rate_column])
        except DataError as error:
            load(meta_columns=data.meta_columns)  # fails again, with the user's own meta_columns: the error is theirs
            raise ValueError(f"data.pass_rate_band needs a numeric '{data.pass_rate_column}' column; "
                             f"missing at {error.location or error.path}") from None

    def _filter_by_pass_rate(self, records: list[PromptRecord], *, keep_column: bool = True) -> list[PromptRecord]:
        """The records whose pass rate (``data.pass_rate_column`` of their ``meta``) is in ``data.pass_rate_band``;
        without ``keep_column`` the rate is taken out of their ``meta`` (it was read for this filter only)."""
        column = self.config.data.pass_rate_column
        rates = [_as_number(r.meta.get(column)) for r in records]
        missing = [r.source for r, rate in zip(records, rates) if rate is None]
        if missing:
            raise ValueError(f"data.pass_rate_band needs a numeric '{column}' column; missing or not a number at "
                             f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        low, high, inclusive = parse_band(self.config.data.pass_rate_band)
        kept = filter_by_pass_rate(records, rates, low=low, high=high, inclusive=inclusive)
        if not kept:
            raise ValueError(f"data.pass_rate_band {self.config.data.pass_rate_band} keeps none of the {len(records)} prompts")
        if not keep_column:
            kept = [replace(record, meta={k: v for k, v in record.meta.items() if k != column}) for record in kept]
        return kept

    def _encode_prompts(self, context_of) -> None:
        """Tokenise every train and eval prompt once (``train_prompt_ids``, ``eval_prompt_ids``); prompts that leave no
        room for the response in the context of ``context_of`` (the model or its config) are reported, not truncated."""
        data, model = self.config.data, self.config.model
        for records, attribute, what in ((self.train_records, "train_prompt_ids", "data.train"),
                                         (self.eval_records, "eval_prompt_ids", "data.eval")):
            encoded = encode_records(self.tokenizer, records, template=data.prompt_template,
                                     chat_template=model.chat_template)
            check_prompts_fit(context_of, encoded, [record.source for record in records],
                              max_new_tokens=self.config.rollout.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id)
            note = unknown_token_note(self.tokenizer, encoded, records, what=what, template=data.prompt_template)
            if note is not None:
                warnings.warn(note, stacklevel=3)
            setattr(self, attribute, encoded)

    # ------------------------------------------------------------------------------------------------ state
    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng_state(),
            "stream": self.stream.state_dict(),
            "objective": self.objective.state_dict(),
            "objective_built": _as_stored(self.objective.describe()),  # what these steps trained with, part by part
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "consecutive_failed_rewards": self.consecutive_failed_rewards,
            "skipped_steps": self.skipped_steps,
            "weight_norm_at_start": self.weight_norm_at_start,
            "master_weights": self.master.state_dict() if self.master is not None else None,
            "loss_scale": self.loss_scale.state_dict() if self.loss_scale is not None else None,
            "sampler": self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else None,
            "config": with_resolved_paths(self.config.model_dump(mode="json")),  # what these steps were trained with
            "software": software_versions(),
            "base_model": self.base_model_fingerprint,  # model.path's files, when adapters or the reference read it
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])  # the moments, and the saved hyper-parameters ...
        optim = self.config.optim
        for group in self.optimizer.param_groups:  # ... which give way to the current configuration's
            group.update(betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
        self.scheduler = self._build_scheduler(self.optimizer, step=self.step)
        self.objective.load_state_dict(state["objective"])
        self.consecutive_nonfinite = state["consecutive_nonfinite"]
        self.consecutive_failed_rewards = state.get("consecutive_failed_rewards", 0)
        self.skipped_steps = state["skipped_steps"]
        self.weight_norm_at_start = state.get("weight_norm_at_start")  # absent from checkpoints of older versions
        if self.master is not None and state.get("master_weights") is not None:
            self.master.load_state_dict(state["master_weights"])
        if self.loss_scale is not None and state.get("loss_scale") is not None:
            self.loss_scale.load_state_dict(state["loss_scale"])
        if state.get("sampler") is not None and hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict(state["sampler"])  # vLLM seeds each request from a running count
        restore_rng_state(state["rng"])

    def __repr__(self) -> str:
        closed = ", closed" if self._closed else ""
        return (f"Trainer({self.config.method_label()!r}, run_dir={str(self.run_dir)!r}, step {self.step} of "
                f"{self.config.optim.steps}{closed})")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"this Trainer of {self.run_dir} is closed (train() closes it when it returns or raises, "
                               "and lets go of the run directory): continue the run with a new Trainer(config, "
                               "run_dir=..., resume=True)")

    def log(self, metrics: dict[str, float]) -> None:
        """Append the current step's ``metrics`` to ``metrics.jsonl`` (and the TensorBoard / W&B / trackio mirrors):
        ``train`` does it after each step; a loop of its own calls it with what ``train_step`` (and ``evaluate``)
        returned, before ``save``."""
        self._check_open()
        self.logger.log(self.step, metrics)

    def save(self) -> Path:
        """Checkpoint the current step; with adapters and ``model.lora.merged: last``, the merged model only at the
        run's last step."""
        self._check_open()
        self.activity = f"writing the checkpoint of step {self.step}"
        self.logger.sync()  # the metrics of every step the checkpoint covers are on disk before it is
        lora = self.config.model.lora
        merged = lora is None or lora.merged == "every" or self.step >= self.config.optim.steps
        saved = save_checkpoint(self.run_dir, self.step, model=self.model, tokenizer=self.tokenizer,
                                trainer_state=self._trainer_state(), keep=self.config.checkpoint.keep, adapter=self.adapter,
                                merged=merged)
        self.checkpoint_weight_norm = (self.step, self.weight_norm)
        return saved

    # ------------------------------------------------------------------------------------------------ rollouts
    def _sample_groups(self, n_prompts: int) -> tuple[Rollouts, list[PromptRecord], torch.Tensor]:
        group_size = self.config.rollout.group_size
        batch = self.stream.next_batch(n_prompts)
        prompts = [self.train_prompt_ids[index] for index, _ in batch for _ in range(group_size)]
        records = [record for _, record in batch for _ in range(group_size)]
        group_ids = torch.arange(len(batch)).repeat_interleave(group_size)
        rollouts = self.sampler.generate(prompts, self.sampling)
        self._stop_if_the_policy_broke(rollouts)
        return rollouts, records, group_ids

    def _stop_if_the_policy_broke(self, rollouts: Rollouts) -> None:
        """Finite weights can still overflow in a forward (an update at a learning rate far too high makes them huge):
        the policy then gives its own samples inf / NaN log-probs, and no advantage or loss can be computed."""
        valid = rollouts.sampler_log_probs[rollouts.response_mask]
        broken = int((~torch.isfinite(valid)).sum())
        if not broken:
            return
        if self.step == 0:
            cause = "the model as loaded gives"
        else:
            cause = (f"after the update of step {self.step} (optim.lr = {self.config.optim.lr:g}: too high?), the "
                     "policy gives")
        latest = latest_checkpoint(self.run_dir)
        if latest is not None and self.step > 0 and checkpoint_step(latest) == self.step:
            before = latest_checkpoint(self.run_dir, before_step=self.step)
            where = (f"The last checkpoint, {latest}, holds these weights; "
                     + (f"{before} was written before them." if before is not None else "no checkpoint before it is left."))
        else:
            where = self._last_checkpoint_phrase()
        raise TrainingStopped(f"{cause} inf or NaN log-probs to {broken} of its {valid.numel()} sampled tokens"
                              f"{float16_range_note(self.model, 'model.dtype:')}; stopping. "
                              + where + ("" if self.step == 0 else " " + self._weight_norm_phrase()))

    def _score(self, rollouts: Rollouts, records: list[PromptRecord]):
        completions = self.tokenizer.batch_decode(rollouts.completion_ids(), skip_special_tokens=True)
        inputs = ([r.prompt for r in records], completions, [r.answer for r in records], [r.meta for r in records])
        sources = [r.source for r in records]
        result = self.reward(*inputs, rollouts.lengths.tolist(), sources=sources)
        main_failures = result.errors  # the main reward's alone: an extra reward that fails leaves the score standing
        for name, weight, runner in self.extra_rewards:
            result = result.with_extra(name, weight, runner(*inputs, sources=sources))
        if result.first_error:
            self._note_reward_error(result.first_error, step=self.step + 1)
        return result, completions, main_failures

    def collect(self) -> ScoredRollouts:
        """Sample ``prompts_per_step`` groups, score them; with dynamic sampling, replace uninformative groups."""
        config = self.config.rollout
        rollouts, records, group_ids = self._sample_groups(config.prompts_per_step)
        result, completions, main_failures = self._score(rollouts, records)
        metrics: dict[str, float] = {}
        sampled_rows = len(rollouts)
        sampled_tokens = int(rollouts.lengths.sum())
        if config.dynamic_sampling:
            results = [result]
            keep = self._informative(results, group_ids)
            while int(keep.sum()) < config.prompts_per_step * config.group_size and len(results) < config.max_sampling_rounds:
                extra, extra_records, extra_groups = self._sample_groups(config.prompts_per_step)
                extra_result, extra_completions, extra_failures = self._score(extra, extra_records)
                main_failures += extra_failures
                rollouts = Rollouts.concat([rollouts, extra], self.tokenizer.pad_token_id)
                records += extra_records
                completions += extra_completions
                group_ids = torch.cat([group_ids, extra_groups + int(group_ids.max()) + 1])
                results.append(extra_result)
                keep = self._informative(results, group_ids)
            result = RewardResult.concat(results)
            sampled, sampled_errors = result.metrics(), result.errors  # every row sampled this step, kept or not
            sampled_rows, sampled_tokens = len(result.rewards), int(rollouts.lengths.sum())
            metrics.update({"data/sampling_rounds": float(len(results)), "reward/sampled_mean": sampled["reward/mean"],
                            "reward/sampled_accuracy": sampled["reward/accuracy"]})
            kept_rows = keep.nonzero().squeeze(-1)[: config.prompts_per_step * config.group_size]
            metrics["data/informative_groups"] = float(len(kept_rows) // config.group_size)
            if len(kept_rows) == 0:  # nothing informative within the bound: train on one round's worth of rows
                kept_rows = torch.arange(config.prompts_per_step * config.group_size)
            rollouts, group_ids = rollouts.select(kept_rows), group_ids[kept_rows]
            records = [records[i] for i in kept_rows.tolist()]
            completions = [completions[i] for i in kept_rows.tolist()]
            result = result.select(kept_rows)
            result.errors = sampled_errors  # every failure of the step counts, kept or not
        metrics.update(result.metrics())
        metrics["reward/error_frac"] = main_failures / sampled_rows  # the main reward's, every row sampled this step
        rewards, reasons = result.rewards, list(result.reasons)
        seq_log_prob = self._sequence_log_probs(rollouts)
        rewards = self._shape_group_rewards(rewards, completions, group_ids, seq_log_prob, metrics)
        correct = result.correct if self.estimator_threshold is None else result.correct_at(self.estimator_threshold)
        try:
            advantages = compute_advantages(
                self.advantage_name, rewards, group_ids, lengths=rollouts.lengths, seq_log_prob=seq_log_prob,
                correct=correct, **self.advantage_params,
            )
        except AdvantageOverflow as error:
            raise TrainingStopped(f"step {self.step + 1}: {error}; stopping. {self._last_checkpoint_phrase()}",
                                  step=self.step + 1, metrics=dict(metrics)) from None
        if rewards is not result.rewards:  # group-level shaping changed the rewards the advantages see
            metrics["reward/shaped_mean"] = float(rewards.mean())
        metrics.update({
            "reward/zero_std_groups": float(1.0 - informative_groups(rewards, group_ids).float().mean()),
            "response/length_mean": float(rollouts.lengths.float().mean()),
            "response/length_max": float(rollouts.lengths.max()),
            "response/truncated_frac": float(rollouts.truncated.float().mean()),
            "response/sampled_tokens": float(sampled_tokens),
        })
        return ScoredRollouts(rollouts, records, group_ids, rewards, advantages, metrics, completions, reasons, result.correct,
                              sampled_tokens=sampled_tokens)

    def _sequence_log_probs(self, rollouts: Rollouts) -> torch.Tensor:
        """Each response's length-normalised log-prob under the policy that sampled it, what the unlikeliness rank
        orders a group by (arXiv 2506.02355): the sampler's own, unless it drew from a filtered distribution
        (``rollout.top_k`` / ``top_p``) or is another engine (vLLM), whose log-probs are not the policy's; then, when
        the rank is used, the policy scores the responses."""
        rollout = self.config.rollout
        log_probs = rollouts.sampler_log_probs
        ranked = self.advantage_name == "unlikely" or self.config.reward.unlikeliness is not None
        if ranked and (rollout.filters_tokens(model_vocab_size(self.model)) or rollout.backend != "hf"):
            with torch.no_grad():
                scored = self.token_stats(self.model, rollouts, torch.arange(len(rollouts)), need=("logprob",))
            log_probs = torch.where(rollouts.response_mask, scored.logprob.float().cpu(), torch.zeros(()))
        return (log_probs.sum(-1) / rollouts.lengths.clamp(min=1)).float()

    def _informative(self, results: list[RewardResult], group_ids: torch.Tensor) -> torch.Tensor:
        """Rows of groups that dynamic sampling keeps: groups whose accuracy is neither 0 nor 1 (DAPO, arXiv
        2503.14476), or whose rewards are not all equal with ``rollout.dynamic_sampling_metric: reward``; under the
        ``passk`` advantage also groups with at least k wrong samples, since with fewer every k-subset passes and
        every advantage of the group is 0."""
        if self.config.rollout.dynamic_sampling_metric == "accuracy":
            values = torch.cat([result.correct for result in results]).float()
        else:
            values = torch.cat([result.scores + result.penalties for result in results])  # the main reward only
        keep = informative_groups(values, group_ids)
        if self.advantage_name == "passk":
            result = RewardResult.concat(results)
            correct = result.correct if self.estimator_threshold is None else result.correct_at(self.estimator_threshold)
            advantages = compute_advantages("passk", result.rewards, group_ids, correct=correct, **self.advantage_params)
            keep &= informative_groups(advantages, group_ids)  # the right and the wrong samples' advantages differ
        return keep

    def _shape_group_rewards(self, rewards, completions: list[str], group_ids, seq_log_prob, metrics: dict[str, float]):
        """Group-level reward shaping before the advantage (each takes a share of ``|R|`` off, so their order does
        not matter): DRA-GRPO diversity weights (arXiv 2505.09655) and the unlikeliness rank scaling (arXiv
        2506.02355)."""
        if self.diversity_embedder is not None:
            started = time.perf_counter()
            weights = diversity_weights(completions, group_ids, embedder=self.diversity_embedder)
            rewards = (rewards.double() - (1.0 - weights) * rewards.double().abs()).float()  # see diversity_adjusted_rewards
            metrics["reward/diversity_weight_mean"] = float(weights.mean())
            metrics["time/diversity_s"] = time.perf_counter() - started
            self._stop_if_shaped_past_float32(rewards, "reward.diversity", metrics)
        if self.config.reward.unlikeliness is not None:
            beta_rank = self.config.reward.unlikeliness.beta_rank
            rewards = unlikeliness_shaped_rewards(rewards, group_ids, seq_log_prob, beta_rank=beta_rank).float()
            self._stop_if_shaped_past_float32(rewards, "reward.unlikeliness", metrics)
        return rewards

    def _stop_if_shaped_past_float32(self, rewards: torch.Tensor, shaping: str, metrics: dict[str, float]) -> None:
        """A negative reward grows under shaping (up to 2x under the diversity weights, 1 + beta_rank under the
        unlikeliness rank): near float32's largest value it becomes inf, on which no advantage can be computed."""
        if not bool(torch.isfinite(rewards).all()):
            raise TrainingStopped(f"step {self.step + 1}: {shaping} took rewards beyond float32's largest value, "
                                  f"{torch.finfo(torch.float32).max:.3g}: rescale the rewards; stopping. "
                                  + self._last_checkpoint_phrase(), step=self.step + 1, metrics=dict(metrics))

    def _stop_if_the_reward_keeps_failing(self, collected: dict[str, float]) -> None:
        """Stop when the (main) reward raised on every sample of ``reward.max_failing_steps`` steps in a row: their
        scores are all 0, so nothing tells their samples apart, and the run would go on training on nothing.
        ``collected``: the step's metrics from collection, its record when it stops."""
        failed_everywhere = collected.get("reward/error_frac", 0.0) >= 1.0
        self.consecutive_failed_rewards = self.consecutive_failed_rewards + 1 if failed_everywhere else 0
        limit = self.config.reward.max_failing_steps
        if limit and self.consecutive_failed_rewards >= limit:
            raise TrainingStopped(
                f"the reward failed (raised, or gave no number) on every sample of {self.consecutive_failed_rewards} "
                f"steps in a row (up to step "
                f"{self.step + 1}); stopping. The first traceback is in {self.run_dir / 'reward_errors.log'}. "
                + self._last_checkpoint_phrase(), step=self.step + 1, metrics=dict(collected)
            )

    def _note_reward_error(self, traceback_text: str, *, step: int) -> None:
        """Keep the run's first reward failure in ``reward_errors.log`` (later ones are only counted), its first line
        led by the step it happened in (``step 12, sample 3: ValueError: ...``); written as one rename, so a full disk
        leaves no empty log behind and its error names the file."""
        path = self.run_dir / "reward_errors.log"
        if not path.exists():
            atomic_write_text(path, f"step {step}, {traceback_text}", follow_links=False)

    # ------------------------------------------------------------------------------------------------ the step
    def token_stats(self, model, rollouts: Rollouts, rows: torch.Tensor, need=STAT_NAMES):
        """Statistics of the response tokens of ``rollouts[rows]`` under ``model`` (differentiable when grad is on),
        scored as ``optim.length_buckets`` and ``optim.share_prompts`` say; without grad, in pieces of at most
        ``optim.micro_batch_size`` rows (the size the user made fit in memory)."""
        optim = self.config.optim
        pieces = rows.split(optim.micro_batch_size) if optim.micro_batch_size and not torch.is_grad_enabled() else [rows]
        stats = [bucketed_response_token_stats(
            model, rollouts.prompt_ids[piece], rollouts.prompt_mask[piece], rollouts.response_ids[piece],
            rollouts.response_mask[piece], temperature=self.config.rollout.temperature, need=need,
            max_buckets=optim.length_buckets, share_prompts=optim.share_prompts,
        ) for piece in pieces]
        if len(stats) == 1:
            return stats[0]
        return TokenStats(**{name: torch.cat([part.as_dict()[name] for part in stats]) for name in stats[0].as_dict()})

    def _entropy_gradient(self, rollouts: Rollouts, rows: torch.Tensor) -> FirstOrderEntropyChange:
        """The gradient of the mean entropy of ``rows``' response tokens under the current weights (in pieces of at
        most ``optim.micro_batch_size`` rows), kept to be read as a first-order change after the update. The random
        state is put back afterwards, so that a model left with dropout trains as it would without this pass. With
        master weights the pieces are summed in float32, as the updates' gradients are; a float16 model's pass is
        multiplied by the loss scale, halved and run again while its gradient overflows (the updates' scale is left
        as it is)."""
        trained = [p for p in self.model.parameters() if p.requires_grad]
        valid = rollouts.response_mask
        count = max(int(valid[rows].sum()), 1)
        scale = self.loss_scale.scale if self.loss_scale is not None else 1.0
        while True:
            gradient: list[torch.Tensor | None] = [None] * len(trained)
            forward_finite = True  # a non-finite entropy is no overflow of the scale: no smaller scale mends it
            with forked_rng(self.device):
                for piece in rows.split(self.config.optim.micro_batch_size or len(rows)):
                    entropy = self.token_stats(self.model, rollouts, piece, need=("entropy",)).entropy
                    part = entropy[valid[piece].to(entropy.device)].float().sum() * (scale / count)
                    if self.loss_scale is not None:
                        forward_finite = forward_finite and bool(torch.isfinite(part))
                    for index, slope in enumerate(torch.autograd.grad(part, trained, allow_unused=True)):
                        if slope is None:
                            continue
                        if self.master is not None:
                            slope = slope.float()
                        if scale != 1.0:
                            slope = slope / scale
                        gradient[index] = slope if gradient[index] is None else gradient[index].add_(slope)
            if (self.loss_scale is None or scale <= 1.0 or not forward_finite
                    or all(g is None or bool(torch.isfinite(g).all()) for g in gradient)):
                return FirstOrderEntropyChange(trained, gradient)
            scale /= 2

    def train_step(self) -> dict[str, float]:
        """One step: prompts → rollouts → rewards → advantages → scoring → updates → diagnostics. Returns the step's
        metrics, which ``log`` records (``train`` does both)."""
        self._check_open()
        self.activity = f"training step {self.step + 1}"
        config = self.config
        temperature = config.rollout.temperature
        started = time.perf_counter()

        # 1-3. rollouts, rewards, advantages
        scored = self.collect()
        self._stop_if_the_reward_keeps_failing(scored.metrics)
        rollouts = scored.rollouts
        generated = time.perf_counter()
        mask = rollouts.response_mask
        if config.rollout.mask_truncated:  # DAPO's overlong filtering: cut responses are not trained on
            mask = mask & ~rollouts.truncated[:, None]
        token_advantages = scored.advantages[:, None].expand_as(mask) * mask
        n_rows = len(rollouts)
        all_rows = torch.arange(n_rows)
        # the loss's per-token inputs live with the model; diagnostics are computed on the CPU
        on_device = {"mask": mask.to(self.device), "advantages": token_advantages.to(self.device),
                     "rollout_log_prob": rollouts.sampler_log_probs.to(self.device)}

        # 4. scoring under the policy before the update (old log-probs, entropy, S, D; reference log-probs); parts that
        # read the whole batch (Clip_B, Clip_V, the adaptive entropy's first step) see it too when the update is split
        on_policy = config.optim.mini_batches == 1 and config.optim.epochs == 1
        split = not on_policy or (config.optim.micro_batch_size or n_rows) < n_rows
        whole_batch_parts = split and self.objective.takes_step_statistics
        before = population = None
        if not on_policy or whole_batch_parts:
            with torch.no_grad():
                before = self.token_stats(self.model, rollouts, all_rows)
        normaliser_mask = mask  # the tokens each micro-batch's share of the loss is counted in
        if whole_batch_parts:
            population = PolicyBatch(log_prob=before.logprob, old_log_prob=before.logprob, advantages=on_device["advantages"],
                                     mask=on_device["mask"], entropy=before.entropy, disc=before.disc,
                                     disc_centered=before.disc_centered)
            normaliser_mask = self.objective.normaliser_mask(population).cpu()
        reference_log_prob = None
        if self.needs_reference:
            with torch.no_grad(), self._reference_model() as reference:
                reference_log_prob = self.token_stats(reference, rollouts, all_rows, need=("logprob",)).logprob
        measured_rows = first_order = None  # the rows re-scored after the update; their entropy's gradient before it
        first_order_s = 0.0
        if config.diagnostics.measure_entropy_change:
            count = max(1, math.ceil(n_rows * config.diagnostics.measure_fraction))
            measured_rows = torch.arange(count) * n_rows // count  # evenly spread: every 4th row for 0.25
            if config.diagnostics.first_order:
                first_order_started = time.perf_counter()
                first_order = self._entropy_gradient(rollouts, measured_rows)
                first_order_s = time.perf_counter() - first_order_started

        # 5. updates: epochs x mini-batches, each optionally split into micro-batches
        grad_coefficients = torch.zeros(mask.shape, dtype=torch.float32)
        objective_metrics: list[list[tuple[dict[str, float], MicroBatchShares]]] = []  # each update's micro-batches
        grad_norms, skipped, overflowed = [], 0, 0
        first_pass = {name: torch.zeros(mask.shape) for name in STAT_NAMES}
        # the advantages the loss used, after the objective's shaping (the first epoch's, one pass over each row): what
        # the covariance and discriminator statistics pair with log-probs, as the objective's own selectors do
        used_advantages = token_advantages.clone()
        for epoch in range(config.optim.epochs):
            order = torch.randperm(n_rows) if config.optim.mini_batches > 1 else all_rows
            for mini_batch in order.tensor_split(min(config.optim.mini_batches, n_rows)):  # sizes differ by 1 at most
                self._zero_grad()
                objective_state = copy.deepcopy(self.objective.state_dict())  # put back if this update is skipped
                mini_coefficients, mini_metrics = torch.zeros(mask.shape, dtype=torch.float32), []
                micro_size = config.optim.micro_batch_size or len(mini_batch)
                losses_finite = True
                for micro in mini_batch.split(micro_size):
                    if not losses_finite and before is not None:
                        break  # the update is lost, and the statistics were scored before the updates
                    with torch.set_grad_enabled(losses_finite):  # after a non-finite loss only the statistics are wanted
                        stats = self.token_stats(self.model, rollouts, micro)
                    if before is None:  # this pass is the only scoring under the pre-update policy
                        for name in STAT_NAMES:
                            first_pass[name][micro] = getattr(stats, name).detach().float().cpu()
                    if not losses_finite:
                        continue
                    stats.logprob.retain_grad()
                    old = stats.logprob.detach() if on_policy else before.logprob[micro]
                    batch = PolicyBatch(
                        log_prob=stats.logprob, old_log_prob=old, advantages=on_device["advantages"][micro],
                        mask=on_device["mask"][micro], entropy=stats.entropy, disc=stats.disc, disc_centered=stats.disc_centered,
                        ref_log_prob=None if reference_log_prob is None else reference_log_prob[micro],
                        rollout_log_prob=on_device["rollout_log_prob"][micro], step=self.step,
                        population=population, rows=None if population is None else micro,
                    )
                    objective_out = self.objective(batch)
                    if epoch == 0:
                        used_advantages[micro] = objective_out.advantages.detach().float().cpu()
                    if not torch.isfinite(objective_out.loss):
                        losses_finite = False
                        continue
                    shares = MicroBatchShares.of(micro, mini_batch, mask=mask, normaliser_mask=normaliser_mask,
                                                 loss_agg_mode=self.objective.loss_agg_mode)
                    # the policy loss by its share of the normaliser, the regularisers' terms by their share of the
                    # valid tokens they are aggregated over (the two differ when a selector shrinks the normaliser)
                    weighted = objective_out.policy_loss * shares.loss
                    if objective_out.loss is not objective_out.policy_loss:
                        weighted = weighted + (objective_out.loss - objective_out.policy_loss) * shares.aggregated
                    if self.loss_scale is not None:  # float16: small gradients would round to 0
                        weighted = weighted * self.loss_scale.scale
                    weighted.backward()
                    if self.master is not None:  # summed in float32 over the micro-batches
                        self.master.take_gradients()
                    mini_coefficients[micro] = stats.logprob.grad.detach().float().cpu()
                    if self.loss_scale is not None:
                        mini_coefficients[micro] /= self.loss_scale.scale
                    mini_metrics.append((objective_out.metrics, shares))
                scaled = losses_finite and self.loss_scale is not None
                if scaled:
                    self.loss_scale.unscale(self._stepped_parameters())
                grad_norm, clip_scale = self._clip_gradients() if losses_finite else (math.nan, 0.0)
                scale_overflowed = False
                if scaled:
                    scale_overflowed = not math.isfinite(grad_norm) and self.loss_scale.can_shrink()
                    self.loss_scale.update(overflowed=not math.isfinite(grad_norm))
                if losses_finite and math.isfinite(grad_norm):
                    self.optimizer.step()
                    if self.master is not None:
                        self.master.write_back()
                    self._stop_if_the_weights_broke()
                    grad_norms.append(grad_norm)
                    # d loss / d log p of the update actually applied, clipping included
                    grad_coefficients += mini_coefficients * clip_scale
                    objective_metrics.append(mini_metrics)
                else:  # skipped: no weight moves, and the objective's state (adaptive coefficients) stays as it was
                    self._zero_grad()
                    self.objective.load_state_dict(objective_state)
                    if scale_overflowed:  # the loss scale's doing, now halved: no sign of a broken run
                        overflowed += 1
                    else:
                        skipped += 1
                        self.skipped_steps += 1
        step_metrics = self.objective.end_step()  # parts acting once per step (the adaptive entropy controller)
        self.consecutive_nonfinite = self.consecutive_nonfinite + 1 if skipped else 0
        if self.consecutive_nonfinite >= config.optim.max_consecutive_nonfinite:
            first, last = self.step + 2 - self.consecutive_nonfinite, self.step + 1
            which = f"{last - first + 1} steps in a row (steps {first}-{last})" if first < last else f"step {last}"
            record = {**scored.metrics, "train/lr": self.scheduler.get_last_lr()[0], "train/updates": float(len(grad_norms)),
                      "train/skipped_updates": float(skipped), "train/skipped_total": float(self.skipped_steps),
                      "train/weight_norm": self.weight_norm,  # the norm the stop's message quotes
                      "time/step_s": time.perf_counter() - started}
            half_precision = config.model.dtype in ("bfloat16", "float16")
            raise TrainingStopped(
                f"{which} had a non-finite loss or gradient; stopping: lower optim.lr"
                + (", check the reward values, or train in float32 (model.dtype). " if half_precision
                   else " or check the reward values. ")
                + self._last_checkpoint_phrase() + " " + self._weight_norm_phrase(), step=self.step + 1, metrics=record
            )
        if config.rollout.backend == "vllm":
            self._sync_sampler()  # the next rollouts come from the updated policy
        lr = self.scheduler.get_last_lr()[0]  # the rate this step's updates used
        with warnings.catch_warnings():  # the schedule follows steps: a first step whose updates were all skipped too
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()
        self.step += 1
        updated = time.perf_counter()

        # 6. diagnostics: the same rollouts under the updated policy, against the first-order prediction
        scored_before = (first_pass if before is None
                         else {name: values.float().cpu() for name, values in before.as_dict().items()})
        logprob, before_entropy, disc, disc_centered_before = (scored_before[name] for name in STAT_NAMES)
        valid = rollouts.response_mask  # every sampled token; ``mask``: those trained on
        metrics = entropy_summary(before_entropy, valid)
        points = decision_points(rollouts.prompt_ids, rollouts.prompt_mask, rollouts.response_ids)
        after_entropy, measured_mask = None, valid
        if measured_rows is not None:
            measured_mask = torch.zeros_like(valid)
            measured_mask[measured_rows] = valid[measured_rows]
            after_entropy = before_entropy.clone()
            with torch.no_grad():
                after_entropy[measured_rows] = self.token_stats(self.model, rollouts, measured_rows,
                                                                need=("entropy",)).entropy.float().cpu()
        change, _ = predicted_vs_measured(grad_coefficients, disc_centered_before, before_entropy, after_entropy,
                                          measured_mask, lr=lr, temperature=temperature, points=points, trained_mask=mask)
        metrics.update(change)
        if first_order is not None and "entropy/measured_delta" in metrics:  # absent when no re-scored token was valid
            metrics["entropy/first_order_delta"] = first_order.after_update()
        metrics.update(covariance_summary(logprob, used_advantages, mask))
        metrics.update(discriminator_summary(disc, disc_centered_before, used_advantages, mask))
        metrics.update(step_metrics_over_updates(objective_metrics, aggregated=self.objective.aggregated_metrics))
        metrics.update(step_metrics)
        if reference_log_prob is not None:
            log_ratio = (logprob - reference_log_prob.float().cpu())[mask]
            metrics["kl/ref_k1"] = float(log_ratio.mean()) if log_ratio.numel() else math.nan  # no token: no mean
        metrics.update(scored.metrics)  # what collection measured (rewards, lengths; a subclass may add more)
        tokens = float(valid.sum() if scored.sampled_tokens is None else scored.sampled_tokens)
        metrics.update({
            "train/grad_norm": float(np.mean(grad_norms)) if grad_norms else math.nan,
            "train/weight_norm": self.weight_norm,
            "train/lr": lr,
            "train/updates": float(len(grad_norms)),
            "train/skipped_updates": float(skipped),
            "train/skipped_total": float(self.skipped_steps),
            **({"train/loss_scale": self.loss_scale.scale, "train/loss_scale_overflows": float(overflowed)}
               if self.loss_scale is not None else {}),
            "time/step_s": time.perf_counter() - started,
            "time/generate_s": generated - started,
            "time/update_s": updated - generated - first_order_s,
            "time/diagnostics_s": time.perf_counter() - updated + first_order_s,
            "time/tokens_per_s": tokens / max(time.perf_counter() - started, 1e-9),
        })
        every = config.logging.samples_every
        if every and self.step % every == 0:
            self._save_samples(scored)
        return metrics

    def _save_samples(self, scored: ScoredRollouts) -> Path:
        """``samples/step_<step>.jsonl``: one line per rollout of the step with its prompt, completion (and its token
        ids, which its text may not give back when re-tokenised, with its log-probability under the sampler, the sum
        of its tokens'), reference answer, reward (after the group transforms: what the advantages see), correctness,
        advantage (the estimator's, before the objective's shapers), length and the reward's reason (why it scored
        what it did)."""
        folder = self.run_dir / "samples"
        folder.mkdir(exist_ok=True)
        rollouts = scored.rollouts
        lines = []
        completion_ids, sequence_log_probs = rollouts.completion_ids(), rollouts.summed_sampler_log_probs()
        for row, record in enumerate(scored.records):
            lines.append(json.dumps({
                "step": self.step, "group": int(scored.group_ids[row]), "source": record.source, "prompt": record.prompt,
                **record.conversation(),
                "completion": scored.completions[row] if scored.completions else None,
                "completion_ids": completion_ids[row],
                "sampler_log_prob": sequence_log_probs[row], "answer": record.answer,
                "reward": float(scored.rewards[row]),
                "correct": bool(scored.correct[row]) if scored.correct is not None else None,
                "advantage": float(scored.advantages[row]),
                "length": int(rollouts.lengths[row]), "truncated": bool(rollouts.truncated[row]),
                "reason": scored.reasons[row] if scored.reasons else None,
            }, ensure_ascii=False))
        path = folder / f"step_{self.step:06d}.jsonl"
        atomic_write_text(path, "\n".join(lines) + "\n", follow_links=False)
        return path

    def _trained_weight_norm(self) -> float:
        """The L2 norm of all trained weights together (the adapters' alone with LoRA), summed in float32 whatever the
        weights' precision (a bfloat16 sum would hide a slow growth, a float16 one overflow)."""
        trained = [p for p in self.model.parameters() if p.requires_grad]
        if not trained:
            return 0.0
        with torch.no_grad():  # one device sync, in float(): the per-tensor norms stay where their weights are
            device = trained[0].device
            norms = torch.stack([torch.linalg.vector_norm(p, dtype=torch.float32).to(device) for p in trained])
            return float(torch.linalg.vector_norm(norms))

    def _weight_norm_phrase(self) -> str:
        """The trained weights' norm now, at the run's start and in the newest checkpoint: an update at a learning
        rate far too high can make the weights huge but finite before any loss turns non-finite, and a checkpoint
        holding such weights fails a resume the same way."""
        known = [f"{self.weight_norm:.4g} now"]
        if self.weight_norm_at_start is not None:
            known.append(f"{self.weight_norm_at_start:.4g} at the start of the run")
        latest = latest_checkpoint(self.run_dir)
        if latest is not None and self.checkpoint_weight_norm is not None \
                and self.checkpoint_weight_norm[0] == checkpoint_step(latest):
            known.append(f"{self.checkpoint_weight_norm[1]:.4g} in {latest.name}")
        return (f"The trained weights' norm: {', '.join(known)} (train/weight_norm in metrics.jsonl, step by step); a "
                "checkpoint whose norm grew far beyond the start's holds damaged weights, from which a resume would "
                "likely fail the same way: resume from one written before the growth, or start again.")

    def _stop_if_the_weights_broke(self) -> None:
        """A finite gradient can still step the weights to inf or NaN (a learning rate far too high); the next rollouts
        would be nonsense, so the run stops here, before a checkpoint could keep such weights."""
        # a norm is finite exactly when every entry is (barring an overflow of weights beyond 1e19, broken anyway)
        self.weight_norm = self._trained_weight_norm()
        if math.isfinite(self.weight_norm):
            return
        names = [name for name, p in self.model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        what = (f"left {len(names)} weight tensor(s) with inf or NaN values ({', '.join(names[:3])}"
                f"{', ...' if len(names) > 3 else ''})" if names
                else "moved the weights so far (entries beyond about 1e19) that their norm overflows")
        raise TrainingStopped(
            f"the update of step {self.step + 1} {what} although its gradient was finite: optim.lr = "
            f"{self.config.optim.lr:g} is far too high for this model. Stopping. " + self._last_checkpoint_phrase()
        )

    def _last_checkpoint_phrase(self) -> str:
        latest = latest_checkpoint(self.run_dir, verify="all")  # called intact: the one a resume would take
        return (f"The last checkpoint, {latest}, is intact." if latest is not None
                else "No checkpoint had been written (checkpoint.every).")

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)

    def _stepped_parameters(self) -> list[torch.Tensor]:
        """The optimizer's parameters that hold a gradient (the master copies when there are master weights)."""
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]

    def _clip_gradients(self) -> tuple[float, float]:
        """Clip the optimizer's gradients to ``optim.grad_clip``; their norm before clipping, and the factor clipping
        multiplied them by (as ``clip_grad_norm_`` computes it)."""
        parameters = self._stepped_parameters()
        if not parameters:
            return 0.0, 1.0
        max_norm = self.config.optim.grad_clip if self.config.optim.grad_clip is not None else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(parameters, max_norm, error_if_nonfinite=False))
        return norm, min(1.0, max_norm / (norm + 1e-6))

    # ------------------------------------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """Avg@n, unbiased Pass@k and polarisation on the eval prompts; saves the summary and the top fork tokens."""
        self._check_open()
        self.activity = f"evaluating after step {self.step}" if self.step else "evaluating before the first step"
        config = self.config.eval
        if not self.eval_records:
            return {}
        sampling = SamplingParams(max_new_tokens=self.config.rollout.max_new_tokens, temperature=config.temperature,
                                  top_p=config.top_p, top_k=config.top_k)
        try:
            result = evaluate_model(
                self.model, self.tokenizer, self.eval_records, self.eval_prompt_ids, self.reward,
                n=config.n, ks=config.ks, sampling=sampling, seed=self.config.seed + 1_000_003 * (self.step + 1),
                batch_size=self.config.rollout.generation_batch_size, top_forks=config.top_forks,
                scoring_batch_size=self.config.optim.micro_batch_size, dtype_setting="model.dtype:",
            )
        except NonFiniteLogProbs as error:
            if self.step == 0:
                raise TrainingStopped(f"evaluating the model as loaded: {error}") from None
            raise TrainingStopped(f"evaluating after the update of step {self.step} (optim.lr = "
                                  f"{self.config.optim.lr:g}: too high?): {error}. {self._last_checkpoint_phrase()} "
                                  f"{self._weight_norm_phrase()}") from None
        if result.first_reward_error:
            self._note_reward_error(result.first_reward_error, step=self.step)
        for folder, payload in (("eval", {"step": self.step, **result.to_dict()}), ("forks", result.forks)):
            (self.run_dir / folder).mkdir(exist_ok=True)
            atomic_write_text(self.run_dir / folder / f"step_{self.step:06d}.json",
                              json.dumps(payload, indent=1, ensure_ascii=False), follow_links=False)
        return result.metrics()

    # ------------------------------------------------------------------------------------------------ the run
    def _warn_if_nothing_trained(self, metrics: dict[str, float]) -> None:
        """Say once when the selectors dropped every token of a step: such an update trains on nothing, as a
        composition of selectors that keep disjoint tokens (forking_tokens + low_entropy_tokens) always does."""
        if self._warned_nothing_trained:
            return
        if metrics.get("select/rejection_sampling_frac", 0.0) >= 1.0:
            message = (f"warning: at step {self.step} no sample was accepted (select/rejection_sampling_frac = 1: "
                       "none had a positive advantage, for the psr estimator none was correct), so rejection sampling "
                       "trained on nothing")
        elif metrics.get("select/dropped_frac", 0.0) >= 1.0:
            message = (f"warning: at step {self.step} the selectors of '{self.config.method_label()}' dropped every "
                       "token (select/dropped_frac = 1), so the update trained on nothing; check the method's selectors")
        elif metrics.get("tokens/valid", 1.0) == 0:
            message = (f"warning: at step {self.step} no token was left to train on (tokens/valid = 0), so the update "
                       "trained on nothing" + (": every response was cut at rollout.max_new_tokens, and "
                                               "rollout.mask_truncated leaves such responses out"
                                               if self.config.rollout.mask_truncated else ""))
        elif metrics.get("correction/icepop_masked_frac", 0.0) >= 1.0:
            message = (f"warning: at step {self.step} IcePop masked every token (correction/icepop_masked_frac = 1), so "
                       "the update trained on nothing: the trainer's and the sampler's log-probs disagree beyond its "
                       "band" + (" (rollout.top_k / top_p make the sampler's those of the filtered distribution)"
                                 if self.config.rollout.filters_tokens(model_vocab_size(self.model)) else ""))
        else:
            return
        self._warned_nothing_trained = True
        self._warn(message)

    def _warn_if_dynamic_sampling_fell_short(self, metrics: dict[str, float]) -> None:
        """Say once when dynamic sampling found fewer informative groups than a step takes."""
        rollout = self.config.rollout
        found = metrics.get("data/informative_groups")
        if self._warned_dynamic_sampling or found is None or found >= rollout.prompts_per_step:
            return
        self._warned_dynamic_sampling = True
        trained = (f"the step trained on those {int(found)} group(s)" if found else
                   "the step trained on the first round's groups, none of them informative")
        self._warn(f"warning: at step {self.step} dynamic sampling found {int(found)} informative group(s) of the "
                   f"{rollout.prompts_per_step} a step takes within rollout.max_sampling_rounds = "
                   f"{rollout.max_sampling_rounds}; {trained} (data/informative_groups; said once)")

    def _warn(self, message: str) -> None:
        """``message`` on the console, in yellow, or as a warning without one."""
        if self.console is not None:
            from rich.text import Text

            self.console.print(Text(message, style="yellow"), soft_wrap=True)
        else:
            warnings.warn(message, stacklevel=3)

    def train(self, *, handle_signals: bool = False, stop_on_hangup: bool = False,
              should_stop: Callable[[], bool] | None = None) -> Path:
        """Run to ``optim.steps``; checkpoint every ``checkpoint.every`` steps and at the end. Returns the run dir.

        With ``handle_signals`` (the ``train`` command sets it), SIGINT and SIGTERM let the current step finish, save
        a checkpoint and raise :class:`TrainingInterrupted`, so that ``--resume`` loses nothing (one the process was
        started ignoring stays ignored); a second signal stops at once, as without it. Once the checkpoint is saved, a
        further signal ends the process at once (status 128 + the signal's number), quietly, for as long as it runs.
        With ``stop_on_hangup`` as well, SIGHUP (the terminal closed: an ssh connection lost) stops the run the same way
        instead of ending the process at once (its repeats are ignored), and output to the terminal that has gone is
        sent to the null device (unless the process was started ignoring SIGHUP, as ``nohup`` starts it).
        ``should_stop``, asked after each step, stops the run the same way (as SIGINT) when it returns true: a signal
        the process could not catch yet (the laboratory's workers ignore Ctrl-C until they train) still ends the run at
        a step's end."""
        self._check_open()
        config = self.config
        progress = StepProgress(self.console, f"train {config.method_label()}", config.optim.steps, self.step,
                                 enabled=config.logging.progress)
        received: list[int] = []
        evaluating_at_start = False
        closing: str | None = None  # once the run has ended: "finished", or "stopped" by an error
        restore_handlers = catch_stop_signals(received, progress.console, plan=lambda: (
            f"the run has {closing}: closing its loggers" if closing else
            "finishing the evaluation at the start, then stopping before the first step (nothing to save yet)"
            if evaluating_at_start else FINISH_THE_STEP), resumes_from=lambda: (
            f"{self.resumed_by} continues from the checkpoint of step {self.checkpoint_weight_norm[0]}"
            if self.checkpoint_weight_norm is not None else "no checkpoint was written yet: there is nothing to resume"),
            hangup=stop_on_hangup) if handle_signals else (lambda numbers=None: None)
        saved_since_signal = False  # a second signal raised out of a step instead: the handlers go back
        finished = False
        try:
            with progress:
                if config.eval.at_start and self.eval_records and self.step == 0:
                    evaluating_at_start = True
                    evaluated = self.evaluate()
                    evaluating_at_start = False
                    self.logger.log(0, evaluated)
                    progress.note_evaluation(0, evaluated)
                    if received:
                        saved_since_signal = True
                        raise TrainingInterrupted(received[0], 0, None)
                    progress.restart_clock()
                while self.step < config.optim.steps:
                    try:
                        metrics = self.train_step()
                    except TrainingStopped as stopped:
                        if stopped.metrics is not None:  # the step it stopped in, as far as it got
                            self.logger.log(stopped.step, stopped.metrics)
                        raise
                    self._warn_if_dynamic_sampling_fell_short(metrics)
                    self._warn_if_nothing_trained(metrics)
                    last = self.step == config.optim.steps
                    if self.eval_records and ((config.eval.every and self.step % config.eval.every == 0) or last):
                        try:
                            evaluated = self.evaluate()
                        except TrainingStopped:  # the step trained: its record is kept
                            self.log(metrics)
                            raise
                        metrics.update(evaluated)
                        progress.note_evaluation(self.step, evaluated)
                    self.log(metrics)
                    if not received and should_stop is not None and should_stop():
                        received.append(signal.SIGINT)
                    saved = None
                    if (config.checkpoint.every and self.step % config.checkpoint.every == 0) or last or received:
                        saved = self.save()
                    progress.advance(self.step, metrics)
                    if received and not last:  # the signal came during this step, or during its checkpoint
                        saved = saved if saved is not None else self.save()
                        saved_since_signal = True
                        raise TrainingInterrupted(received[0], self.step, saved)
                saved_since_signal = True
            self.activity = f"finishing the run after step {self.step}"
            finished = True
        finally:
            stopped_and_saved = bool(received and handle_signals and saved_since_signal)
            if stopped_and_saved:
                # all is saved: closing the loggers and Python's exit can take seconds
                exit_at_once_on_another_signal(progress.console, self.run_dir, resumable=self.step > 0,
                                               resumed_by=self.resumed_by)
            else:  # Ctrl-C and SIGTERM stop the close as they would without these handlers; a hangup does not
                closing = "finished" if finished else "stopped"
                restore_handlers(numbers=(signal.SIGINT, signal.SIGTERM))
            try:
                if finished:
                    self.close()
                else:  # the error under way is the one to report, not a second one from closing (a full disk)
                    with contextlib.suppress(OSError, TrackerError):
                        self.close(failed=True)
            finally:  # after the loggers are closed: a hangup meanwhile is noted, not the end of the process; a
                # stopped run's SIGINT / SIGTERM stay those that end the process at once, and SIGXCPU's repeats, which
                # come every CPU second until the process ends, stay ignored
                restore_handlers(numbers=None if not stopped_and_saved else (HANGUP,))
        return self.run_dir


def check_resume_settings(saved_config: dict[str, Any], config: TrainConfig) -> list[tuple[str, Any, Any]]:
    """The settings ``config`` changes from ``saved_config`` (the configuration a checkpoint was trained with, as
    ``TrainConfig.model_dump(mode="json")``), as ``(key, saved, now)``; ``ValueError`` naming every one a resumed run
    may not change (see :func:`entrorl.trainer.config.resume_changes`)."""
    # model.path names the base model of the adapters, and the reference model
    refused, accepted = resume_changes(saved_config, config.model_dump(mode="json"),
                                       loads_reference=config.reads_model_path_again())
    if refused:
        listed = "\n".join(f"  {key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in refused)
        raise ValueError(
            f"--resume cannot change what the run was trained with:\n{listed}\nput those back, or start a new run "
            "(another --run-dir) from the checkpoint's model directory; a resumed run may change its length, "
            "learning-rate schedule, optimiser settings, rollouts, rewards, evaluation, logging and checkpoints"
        )
    return accepted


def _as_number(value) -> float | None:
    """A number, or the number a string spells, as a decimal or a fraction as the band's edges may be ("0.25", "1/16":
    CSV cells are strings); None for anything else, one too large for a float included (NaN and infinities pass, for
    the caller's finiteness check)."""
    try:
        if isinstance(value, str):
            return float(Fraction("".join(value.split())))
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
