"""The laboratory run: one base model, a matrix of methods under the same seeds and budget, in parallel
processes, each resumable; then a report.

Run directory::

    lab.json                         preset, every method run in this folder (across resumes), base model key, and
                                     `invocations`: one entry per run_lab call on the folder, with `started_at` and
                                     `finished_at` (seconds since the epoch, from the base model being ready to the
                                     last method finishing, also when interrupted), `seconds` (that duration, on a
                                     monotonic clock) and `ran` (the methods it trained or was training, rather than
                                     finding them finished)
    data/{train,eval,forget}.jsonl   the generated prompt files
    base/final_eval.json             the base model's evaluation (same format as a method's)
    methods/<name>/                  a trainer run directory (metrics.jsonl, config.json, checkpoints/)
    methods/<name>/final_eval.json   Pass@k curve, pass rates, S/D distributions, fork tokens, forgetting
    report.md, report.html, figures/
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import multiprocessing
import numbers
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.text import Text

from entrorl._checks import refuse_multi_process_launch
from entrorl._files import refuse_a_name_that_is_not_utf8
from entrorl.data import load_prompts, write_jsonl
from entrorl.lab.base_model import build_base_model, cached_base_model, lab_cache_root
from entrorl.lab.presets import LabPreset, get_preset
from entrorl.lab.supervised import SFT_OBJECTIVE
from entrorl.lab.tasks import get_task
from entrorl.trainer.checkpoint import atomic_write_text, lock_run_directory
from entrorl.trainer.config import flatten_settings
from entrorl.trainer.stop_signals import CPU_TIME_LIMIT

__all__ = ["run_lab", "evaluate_policy", "task_reward", "SUPERVISED_BASELINES"]

SUPERVISED_BASELINES = ("sft", "rft")
_HISTOGRAM_BINS = np.linspace(-0.4, 0.4, 41)


def task_reward(task: str):
    """The verifier of a lab task as a reward function (``reward.name: entrorl.lab.runner:task_reward``)."""
    return get_task(task)


def _write_error_log(run_dir: Path, text: str) -> None:
    """A method's ``error.log``, in UTF-8 whatever the locale; a link planted there is replaced, not written through."""
    atomic_write_text(run_dir / "error.log", text, follow_links=False)


def _write_json(path: Path, payload: Any) -> None:
    # an error names the file; a link planted in a laboratory folder is replaced, never written through
    atomic_write_text(path, json.dumps(payload, indent=1, ensure_ascii=False), follow_links=False)


def _prepare_data(out: Path, preset: LabPreset) -> dict[str, Path]:
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    train_task, forget_task = get_task(preset.train_task), get_task(preset.forgetting_task)
    files = {
        "train": (train_task.records(preset.train_problems, seed=preset.seed, split="train")),
        "eval": (train_task.records(preset.eval_problems, seed=preset.seed, split="eval")),
        "forget": (forget_task.records(preset.forgetting_problems, seed=preset.seed, split="eval")),
    }
    paths = {}
    for name, records in files.items():
        paths[name] = data / f"{name}.jsonl"
        if not paths[name].exists():
            write_jsonl(records, paths[name])
    return paths


def _trainer_config(preset: LabPreset, method: str, model_dir: Path, data: dict[str, Path], run_dir: Path,
                    imports: list[str] = ()) -> dict[str, Any]:
    """The training run of ``method``; ``imports``: the modules that register the methods of the user's own that it
    names (:func:`_worker_imports`)."""
    return {
        "imports": list(imports),
        "seed": preset.seed if preset.rl_seed is None else preset.rl_seed,
        "torch_threads": 1,
        "model": {"path": str(model_dir)},
        "data": {"train": str(data["train"])},
        "reward": {"name": "entrorl.lab.runner:task_reward", "kwargs": {"task": preset.train_task}},
        "rollout": {
            "prompts_per_step": preset.prompts_per_step, "group_size": preset.group_size,
            "max_new_tokens": preset.max_new_tokens, "temperature": preset.temperature, "generation_batch_size": 256,
        },
        "method": SFT_OBJECTIVE if method == "sft" else method,
        "optim": {"steps": preset.steps, "lr": preset.lr, "warmup_steps": preset.warmup_steps,
                  "mini_batches": preset.mini_batches, "grad_clip": 1.0},
        "eval": {"every": 0},
        "diagnostics": {"first_order": True},
        "logging": {"run_dir": str(run_dir.parent), "name": run_dir.name, "progress": False},
        "checkpoint": {"every": preset.checkpoint_every, "keep": 1},
    }


@torch.no_grad()
def evaluate_policy(model, tokenizer, preset: LabPreset, data: dict[str, Path]) -> dict[str, Any]:
    """Pass@k (k up to ``eval_n``) on the held-out split, pass rates, entropy and S/D distributions of the
    samples split by correctness, the top fork tokens, and accuracy on the untrained (forgetting) task."""
    from entrorl.modeling import bucketed_response_token_stats, encode_prompt
    from entrorl.rewards import RewardRunner
    from entrorl.rollout import HFSampler, SamplingParams
    from entrorl.trainer.diagnostics import top_fork_tokens
    from entrorl.evaluation import summarize_samples

    model.eval()
    params = SamplingParams(max_new_tokens=preset.max_new_tokens, temperature=preset.temperature)
    sampler = HFSampler.for_model(model, tokenizer, batch_size=256)
    result: dict[str, Any] = {}
    for split, task_name, n in (("eval", preset.train_task, preset.eval_n), ("forget", preset.forgetting_task, preset.forgetting_n)):
        records = load_prompts(data[split])
        task = get_task(task_name)
        prompts = [ids for r in records for ids in [encode_prompt(tokenizer, r.prompt)] * n]  # each prompt encoded once
        repeated = [r for r in records for _ in range(n)]
        torch.manual_seed(preset.seed + 17)
        rollouts = sampler.generate(prompts, params)
        completions = tokenizer.batch_decode([row[m].tolist() for row, m in zip(rollouts.response_ids, rollouts.response_mask)],
                                             skip_special_tokens=True)
        scores = RewardRunner(task)([r.prompt for r in repeated], completions, [r.answer for r in repeated],
                                          [r.meta for r in repeated], rollouts.lengths.tolist())
        correct = scores.correct.view(len(records), n).numpy()
        if split == "forget":
            result["forgetting_accuracy"] = float(correct.mean())
            continue
        summary = summarize_samples(correct)  # Pass@k for k = 1, 2, 4, ... and n itself (default_ks)
        stats = bucketed_response_token_stats(model, rollouts.prompt_ids, rollouts.prompt_mask, rollouts.response_ids,
                                              rollouts.response_mask, temperature=preset.temperature,
                                              need=("entropy", "disc", "disc_centered"))
        mask = rollouts.response_mask
        sample_correct = scores.correct[:, None].expand_as(mask)
        distributions = {}
        for name, values in (("disc", stats.disc), ("disc_centered", stats.disc_centered)):
            for label, select in (("correct", sample_correct), ("wrong", ~sample_correct)):
                distributions[f"{name}/{label}"] = _histogram(values[mask & select])
        result.update({
            "summary": summary.to_dict(),
            "avg_at_n": summary.avg_at_n,
            "pass_at_k": {str(k): v for k, v in summary.pass_at_k.items()},
            "pass_rates": summary.pass_rates.tolist(),
            "entropy_mean": float(stats.entropy[mask].mean()),
            "response_length_mean": float(rollouts.lengths.float().mean()),
            "distributions": distributions,
            "histogram_bins": _HISTOGRAM_BINS.tolist(),
            "forks": top_fork_tokens(tokenizer, rollouts.prompt_ids, rollouts.prompt_mask, rollouts.response_ids, mask,
                                     stats.entropy, k=preset.top_forks),
        })
    return result


_process_warmed_up = False


def _warm_up_process(job: dict[str, Any]) -> None:
    """Pay, once per worker process and before any method is timed, the one-off costs that would otherwise be
    charged to the first method the worker runs (:func:`_pay_one_off_costs`), so that every method's train time
    measures the same work whatever the queue order."""
    global _process_warmed_up
    if _process_warmed_up:
        return
    _process_warmed_up = True
    try:
        _pay_one_off_costs(job)
    except Exception:  # noqa: BLE001 — the warm-up only moves one-off costs; a method that cannot run reports its own error
        pass


def _pay_one_off_costs(job: dict[str, Any]) -> None:
    """Import the trainer, model, sampler, reward and evaluation code, load the base model, score one prompt of each
    task, and run one short generation, forward and backward pass. Nothing here touches the run directory, and every
    method seeds its own randomness, so results do not depend on it."""
    from entrorl.evaluation import summarize_samples  # noqa: F401
    from entrorl.lab.supervised import SFTTrainer  # noqa: F401
    from entrorl.modeling import bucketed_response_token_stats, encode_prompt, load_causal_lm, load_tokenizer
    from entrorl.rewards import RewardRunner
    from entrorl.rollout import HFSampler, SamplingParams
    from entrorl.trainer import Trainer, load_config  # noqa: F401
    from entrorl.trainer.diagnostics import top_fork_tokens  # noqa: F401

    preset = LabPreset(**job["preset"])
    model_dir = Path(job["model_dir"])
    model, tokenizer = load_causal_lm(model_dir), load_tokenizer(model_dir)
    for split, task_name in (("train", preset.train_task), ("forget", preset.forgetting_task)):
        record = load_prompts(Path(job["data"][split]))[0]
        RewardRunner(get_task(task_name))([record.prompt], [""], [record.answer], [record.meta], [0])
    sampler = HFSampler.for_model(model, tokenizer, batch_size=2)
    rollouts = sampler.generate([encode_prompt(tokenizer, record.prompt)] * 2,
                                SamplingParams(max_new_tokens=4, temperature=preset.temperature))
    with torch.enable_grad():
        stats = bucketed_response_token_stats(model, rollouts.prompt_ids, rollouts.prompt_mask, rollouts.response_ids,
                                              rollouts.response_mask, temperature=preset.temperature, need=("logprob",))
        stats.logprob.sum().backward()


def _histogram(values: torch.Tensor) -> list[int]:
    """Counts of ``values`` in the bins of ``_HISTOGRAM_BINS``, values beyond the range counted in the end bins.
    Clamped in float64: float32's 0.4 lies above the float64 edge, and ``np.histogram`` would drop it."""
    clamped = values.detach().cpu().double().clamp(_HISTOGRAM_BINS[0], _HISTOGRAM_BINS[-1]).numpy()  # an Apple GPU has no float64
    return np.histogram(clamped, bins=_HISTOGRAM_BINS)[0].tolist()


def _train_and_evaluate(job: dict[str, Any]) -> dict[str, Any]:
    """Train one method (resuming when a checkpoint exists), then evaluate it; returns the evaluation."""
    from entrorl.lab.supervised import SFTTrainer
    from entrorl.trainer import Trainer, load_config
    from entrorl.trainer.checkpoint import latest_checkpoint, set_aside_checkpoints_after

    preset = LabPreset(**job["preset"])
    method, run_dir = job["method"], Path(job["run_dir"])
    data = {k: Path(v) for k, v in job["data"].items()}
    config = load_config(_trainer_config(preset, method, Path(job["model_dir"]), data, run_dir, job.get("imports", [])))
    resume = latest_checkpoint(run_dir, verify="all") is not None  # as the trainer's resume checks them
    if not resume:  # the method's own checkpoints that cannot be resumed (damaged, a trainer state gone): it trains again
        moved = set_aside_checkpoints_after(run_dir, None)
        if moved:
            warnings.warn(f"{method}: no checkpoint of it can be resumed; moved them to {moved[0].parent} "
                          f"({', '.join(path.name for path in moved)}) and training it again from the start",
                          stacklevel=1)
    trainer_class = SFTTrainer if method == "sft" else Trainer
    trainer = trainer_class(config, run_dir=run_dir, resume=resume)
    trainer.resumed_by = "running the laboratory's command again"
    for note in trainer.version_notes():
        warnings.warn(f"{method}, resumed from {trainer.resumed_from.name}: {note}", stacklevel=1)
    if method == "sft":
        trainer.use_task(get_task(preset.train_task))
    if _STOP is None:
        trainer.train()
    else:  # in a worker: Ctrl-C, or the laboratory's stop before the trainer could catch it, ends at a step's end
        # the trainer leaves an ignored SIGINT ignored; one before its handler is in place is the laboratory's stop
        signal.signal(signal.SIGINT, lambda number, frame: None)
        trainer.train(handle_signals=True, should_stop=_laboratory_stopped)
    return evaluate_policy(trainer.model, trainer.tokenizer, preset, data)


_STOP: Any = None  # in a worker: the laboratory's _StopRequest, set when it is interrupted


class _StopRequest:
    """The laboratory's request that its workers stop (``set`` / ``is_set``, as an event's), shared with them as one
    byte of shared memory read without a lock: a worker's SIGTERM handler reads it, and the signal may land while the
    worker's own code is reading it, where a ``multiprocessing.Event`` holds a lock the handler would wait on for
    ever."""

    def __init__(self, context: Any):
        self._flag = context.RawValue(ctypes.c_bool, False)

    def set(self) -> None:
        self._flag.value = True

    def is_set(self) -> bool:
        return bool(self._flag.value)


def _laboratory_stopped() -> bool:
    """In a worker: whether the laboratory asked to stop, the worker's own CPU-time limit is reached, or the
    laboratory's process is gone (killed: nobody would read the method's outcome)."""
    parent = multiprocessing.parent_process()
    return _STOP.is_set() or _cpu_time_limit_reached or (parent is not None and not parent.is_alive())


def _init_worker(stop: Any) -> None:
    """Set up a worker process. Ctrl-C reaches every process of the terminal's group: a worker ignores it except while
    it trains, where its trainer finishes the step under way and saves it; a method not yet started when the
    laboratory is interrupted (``stop`` set) does not start. A composition whose later method's surrogate is set aside
    was said once, when the laboratory checked its methods: the worker that builds it again does not say it twice."""
    from entrorl.objective import SurrogateSetAsideWarning

    global _STOP
    _STOP = stop
    _handle_stop_signals_outside_training()
    warnings.filterwarnings("ignore", category=SurrogateSetAsideWarning)


def _handle_stop_signals_outside_training() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _terminated_outside_training)
    if CPU_TIME_LIMIT is not None:
        signal.signal(CPU_TIME_LIMIT, _cpu_time_limit_outside_training)


# in a worker: whether its soft CPU-time limit's SIGXCPU came while it was not training
_cpu_time_limit_reached = False


def _cpu_time_limit_outside_training(number: int, frame: Any) -> None:
    """SIGXCPU to a worker that is not training (starting, evaluating, between methods): each process has its own
    CPU clock, and the default action would end the worker with a core dump, its method counted as failed. Noted
    instead: the method under way stops at its next step, saved, or does not start, an evaluation under way finishes,
    and the laboratory then stops as for a method stopped by a signal. The kernel's repeats change nothing."""
    global _cpu_time_limit_reached
    _cpu_time_limit_reached = True


def _terminated_outside_training(number: int, frame: Any) -> None:
    """SIGTERM to a worker that is not training (starting, evaluating, between methods). Sent to the whole process
    group (GNU ``timeout``, Slurm, systemd), it is the laboratory's first stop request, as Ctrl-C is, which the worker
    ignores: the laboratory sets ``stop``, a method not started does not start, an evaluation under way finishes.
    Once ``stop`` is set (a second request, or the laboratory ending its workers at once) it ends the worker."""
    if _STOP is not None and _STOP.is_set():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


# a method's folder: the seconds its earlier invocations spent (interrupted, failed, or the one that finished it),
# which its train time adds up
_EARLIER_SECONDS = "earlier_train_seconds.json"


def _not_started(method: str) -> dict[str, Any] | None:
    """In a worker: the outcome of ``method`` when it is not to start (the worker's CPU-time limit is reached, or the
    laboratory asked to stop), else None."""
    if _cpu_time_limit_reached:
        return {"method": method, "status": "interrupted", "signal": "SIGXCPU"}
    if _STOP is not None and _STOP.is_set():
        return {"method": method, "status": "interrupted"}
    return None


def _run_method(job: dict[str, Any]) -> dict[str, Any]:
    """One method, in its own process: train (resuming when a checkpoint exists), then evaluate.

    ``train_seconds`` in ``final_eval.json`` is the time of the method's own set-up, training and final evaluation,
    summed over the invocations that trained it (an interrupted or failed one adds its time to :data:`_EARLIER_SECONDS`;
    one killed outright cannot); the worker's one-off warm-up (:func:`_warm_up_process`) is paid before the clock
    starts, so the times do not depend on which method a worker happens to run first."""
    from entrorl.trainer import TrainingInterrupted

    torch.set_num_threads(1)
    method, run_dir = job["method"], Path(job["run_dir"])
    final_path = run_dir / "final_eval.json"
    if _read_json_object(final_path):  # one that cannot be read is evaluated again, from the final checkpoint
        return {"method": method, "status": "cached"}
    if (stopped := _not_started(method)) is not None:
        return stopped
    _warm_up_process(job)
    if (stopped := _not_started(method)) is not None:  # stopped while warming up, when the worker ignores Ctrl-C
        return stopped
    with contextlib.suppress(FileNotFoundError):  # an earlier invocation's failure: this one tries again
        (run_dir / "error.log").unlink()
    earlier = _read_json_object(run_dir / _EARLIER_SECONDS).get("seconds")
    earlier = earlier if isinstance(earlier, (int, float)) and math.isfinite(earlier) and earlier >= 0 else 0.0
    started = time.perf_counter()
    try:
        evaluation = _train_and_evaluate(job)
        evaluation["train_seconds"] = earlier + time.perf_counter() - started
        _write_json(final_path, evaluation)
        # kept for an evaluation made again (final_eval.json cut short), which adds its own time to it
        _write_json(run_dir / _EARLIER_SECONDS, {"seconds": evaluation["train_seconds"]})
        return {"method": method, "status": "done", "seconds": time.perf_counter() - started}
    except TrainingInterrupted as stopped:  # its step saved: the next invocation continues from there
        if run_dir.is_dir():
            _write_json(run_dir / _EARLIER_SECONDS, {"seconds": earlier + time.perf_counter() - started})
        outcome = {"method": method, "status": "interrupted", "step": stopped.step}
        # the worker's own CPU-time limit, reached in training or before a step ended (the trainer asks should_stop),
        # stops the laboratory with SIGXCPU's exit status; other signals reached the laboratory too
        if _cpu_time_limit_reached or stopped.signal_number == CPU_TIME_LIMIT:
            outcome["signal"] = "SIGXCPU"
        return outcome
    except Exception:  # a failed method must not take the matrix down: record it and go on
        with contextlib.suppress(OSError):  # a full disk: the outcome still carries the error
            (run_dir / "error.log").parent.mkdir(parents=True, exist_ok=True)
            _write_error_log(run_dir, traceback.format_exc())
            # the steps it trained and saved count when a later invocation finishes the method
            _write_json(run_dir / _EARLIER_SECONDS, {"seconds": earlier + time.perf_counter() - started})
        return {"method": method, "status": "failed", "error": traceback.format_exc(limit=3)}
    finally:
        if _STOP is not None:  # a worker: the trainer's "exit at once" handlers are for a terminal's process
            _handle_stop_signals_outside_training()


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as handle:
            return sum(1 for _ in handle)
    except FileNotFoundError:
        return 0


_DIFFERENCES_SHOWN = 6


def _setting_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, value there, value now)`` for every setting that differs; nested settings (the base model's)
    are compared key by key, so a difference is named by its own key, not by the whole dictionary."""
    before, after = flatten_settings(recorded), flatten_settings(current)
    return [(key, before.get(key), after.get(key)) for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)]


def _short_repr(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` (the folder's ``lab.json``, ``outcomes.json``), or ``{}`` when there is none (a new
    folder) or it cannot be read."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _check_same_preset(out: Path, preset: LabPreset, record: dict[str, Any]) -> None:
    """A run directory (its ``lab.json``, ``record``) is resumed only with the settings it was started with (rl_seed
    included; the methods may differ, to add or revisit some): otherwise runs trained under different settings would be
    reported together. The refusal names the settings that differ, not their whole values."""
    recorded = record.get("preset")
    if not isinstance(recorded, dict):
        return
    current = preset.model_dump(mode="json")

    def training_seed(settings: dict[str, Any]) -> dict[str, Any]:  # rl_seed None trains with seed: the same runs
        return {**settings, "rl_seed": settings.get("seed") if settings.get("rl_seed") is None else settings["rl_seed"]}

    differing = [d for d in _setting_differences(training_seed(recorded), training_seed(current)) if d[0] != "methods"]
    if not differing:
        return
    if recorded.get("name") != current.get("name"):
        keys = [key for key, _, _ in differing if key != "name"]
        shown = ", ".join(keys[:_DIFFERENCES_SHOWN]) + (f" and {len(keys) - _DIFFERENCES_SHOWN} more" if len(keys) > _DIFFERENCES_SHOWN else "")
        what = (f"this folder was started with preset {recorded.get('name')}, now {current.get('name')}"
                + (f" ({len(keys)} other setting{'s' if len(keys) != 1 else ''} differ{'s' if len(keys) == 1 else ''}: {shown})" if keys else ""))
    else:
        def said(value: Any, settings: dict[str, Any], key: str) -> str:
            seeded = key == "rl_seed" and settings.get("rl_seed") is None
            return _short_repr(value) + (" (without --rl-seed: the preset's seed)" if seeded else "")

        shown = "; ".join(f"{key}: {said(then, recorded, key)} there, {said(now, current, key)} now"
                          for key, then, now in differing[:_DIFFERENCES_SHOWN])
        more = f"; and {len(differing) - _DIFFERENCES_SHOWN} more" if len(differing) > _DIFFERENCES_SHOWN else ""
        what = f"this folder was started with other settings ({shown}{more})"
    raise ValueError(f"{out}: {what}; resume it with the same options or choose another --out")


def _weights_digest(model_dir: Path) -> str | None:
    """SHA-256 of the base model's weight files (not of its config.json, which names the transformers version that
    saved it); None when there are none or they cannot be read."""
    digest = hashlib.sha256()
    try:
        files = sorted(model_dir.glob("*.safetensors"))
        for path in files:
            digest.update(f"{path.name}\0".encode())
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    except OSError:
        return None
    return digest.hexdigest() if files else None


def _check_same_base_model(out: Path, record: dict[str, Any], fingerprint: str | None, kernels: Any) -> None:
    """A folder (its ``lab.json``, ``record``) is continued only from the base model its methods started from: the same
    settings rebuilt on a CPU of another kind (another cache, another node) give other weights under the same name, and
    the folder would then compare methods trained from two base models. Folders recorded before the fingerprint was
    kept are not checked."""
    then = record.get("base_model_fingerprint")
    if not isinstance(then, str) or fingerprint is None or then == fingerprint:
        return
    recorded_kernels = record.get("base_model_cpu_kernels")
    kinds = (f" (built with {recorded_kernels} kernels there, {kernels} here)"
             if recorded_kernels and kernels and recorded_kernels != kernels else "")
    raise ValueError(f"{out}: its methods started from another base model than the one built for these settings "
                     f"now{kinds}: a base model built on another kind of CPU, or in another cache, has other weights. "
                     "Continue the folder with the cache that holds its base model (ENTRORL_CACHE), on a machine of the "
                     "kind that built it, or choose another --out")


def _requested_methods(methods: list[str] | str | None) -> list[str] | None:
    """The method names asked for, stripped of spaces (around each part of a composition too: ``dapo + clip_b`` is
    ``dapo+clip_b``, one run folder), empty ones dropped and repeats removed (the first kept, order kept); ``None``
    when none was asked for (``methods=None``: the preset's matrix). A string is split on commas; a list or string
    that names no method (``[]``, ``""``) is refused."""
    if methods is None:
        return None
    if isinstance(methods, str):
        methods = methods.split(",")
    stripped = ["+".join(part.strip() for part in str(m).split("+")) for m in methods]
    for name in stripped:
        if "+" in name and not all(name.split("+")):
            raise ValueError(f"--methods: '{name}' has an empty part; write a composition as dapo+clip_b")
    names = list(dict.fromkeys(name for name in stripped if name))
    if not names:
        raise ValueError("--methods names no method; give method names separated by commas, e.g. --methods grpo,clip_b")
    return names


def failed_methods(out: Path) -> list[str]:
    """The methods of the laboratory folder ``out`` whose last run failed (``outcomes.json``) and that have no final
    evaluation since."""
    return _methods_whose_last_run(Path(out), _read_json_object(Path(out) / "outcomes.json"), "failed")


def interrupted_methods(out: Path) -> list[str]:
    """The methods of the laboratory folder ``out`` whose last run was interrupted and not continued since, and those
    of its methods that have neither an outcome nor a final evaluation (the laboratory was killed before it could
    record one)."""
    out = Path(out)
    recorded = _read_json_object(out / "outcomes.json")
    methods = _read_json_object(out / "lab.json").get("methods")
    unrecorded = [method for method in methods if isinstance(method, str) and method not in recorded
                  and not _finished(out, method)] if isinstance(methods, list) else []
    return _methods_whose_last_run(out, recorded, "interrupted") + unrecorded


def _finished(out: Path, method: str) -> bool:
    """Whether ``method`` has a final evaluation in the laboratory folder ``out`` (what its report shows)."""
    return bool(_read_json_object(out / "methods" / method / "final_eval.json"))


def _methods_whose_last_run(out: Path, outcomes: dict[str, Any], status: str) -> list[str]:
    """The methods whose outcome in ``outcomes`` (``outcomes.json``'s object) has ``status``, but for those finished
    since (a laboratory killed after a worker wrote the final evaluation, before it could record the outcome)."""
    return [method for method, outcome in outcomes.items()
            if isinstance(outcome, dict) and outcome.get("status") == status and not _finished(out, method)]


def _checked_workers(workers: int | None, preset: LabPreset) -> int:
    """The number of worker processes: the preset's when not given; a whole number of at least 1 otherwise; at most
    one per method (what runs, and what the report records)."""
    if workers is None:
        workers = preset.workers
    elif isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"--workers must be a whole number of at least 1 (parallel processes); got {workers!r}")
    return max(1, min(int(workers), len(preset.methods)))


# what a laboratory run directory holds (see the module docstring), so that one interrupted before its lab.json was
# written is still taken for one
_LAB_ENTRIES = frozenset({"lab.json", "data", "base", "methods", "figures", "outcomes.json", "report.md", "report.html",
                          "report.json"})


def _prepare_run_directory(out: Path) -> None:
    """Create the run directory (or accept an existing one) and check that it can be written, before anything is
    built; a path that cannot be a run directory is refused with a ValueError that says why."""
    refuse_a_name_that_is_not_utf8(out, "--out")  # each method's run directory is in it
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a directory; give a new or an existing run directory")
    if out.is_dir() and not (out / "lab.json").exists():
        foreign = sorted(entry.name for entry in out.iterdir()
                         if not entry.name.startswith(".") and entry.name not in _LAB_ENTRIES)
        if foreign:
            listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise ValueError(f"--out {out} is a directory that holds other files ({listed}) and no laboratory run "
                             "(no lab.json); give a new directory, or an existing laboratory run to resume")
    blocking = next((parent for parent in out.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"--out {out} cannot be created: {blocking} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-check-{os.getpid()}"
        probe.write_text("", encoding="utf-8")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"--out {out} cannot be used as a run directory: {error.strerror or error}") from None


def _trained_here(outcome: dict[str, Any] | None) -> bool:
    """Whether an invocation trained (or was training) the method of ``outcome``: not when it found it finished
    (cached), nor when Ctrl-C came before it started; an invocation cut short without an outcome was training it."""
    if outcome is None or outcome.get("under_way"):
        return True
    return outcome["status"] != "cached" and not (outcome["status"] == "interrupted" and outcome.get("step") is None)


@contextlib.contextmanager
def _ignoring_ctrl_c():
    """Ignore SIGINT for the block (in the main thread; elsewhere it cannot be changed): processes spawned in it
    inherit that, so a Ctrl-C while they import cannot kill them mid-start. SIGTERM keeps its default there, so that
    the laboratory can end a starting worker at once; one that kills a starting worker while the laboratory is asked
    to stop counts as the stop (:func:`_stopped_not_failed`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stopped_not_failed(outcome: dict[str, Any], process: Any, stop_requested: bool) -> dict[str, Any]:
    """A worker ``process`` that died of SIGTERM while the laboratory was asked to stop (a SIGTERM to the whole process
    group reaching it before it could handle one: still importing), or of SIGXCPU (its CPU-time limit reached then),
    was stopped, not failed: its method is interrupted, before it started (a worker past its start ignores a first
    SIGTERM outside training, and notes SIGXCPU)."""
    if outcome.get("died") and stop_requested and process.exitcode == -signal.SIGTERM:
        return {"method": outcome["method"], "status": "interrupted"}
    if outcome.get("died") and CPU_TIME_LIMIT is not None and process.exitcode == -CPU_TIME_LIMIT:
        # its CPU-time limit reached while it was still importing, before it handles SIGXCPU
        return {"method": outcome["method"], "status": "interrupted", "signal": "SIGXCPU"}
    return outcome


def default_run_directory() -> Path:
    """``runs/lab-<date>-<time>``: where a laboratory run goes without ``--out``."""
    return Path("runs") / f"lab-{datetime.now():%Y%m%d-%H%M%S}"


class LabInterrupted(RuntimeError):
    """Ctrl-C (or the signal ``signal_number``, e.g. SIGTERM) stopped the laboratory: ``methods`` were left unfinished
    (each saved at its last complete step, or not started; none when every method had finished and only the report was
    left); running the same command again on ``out`` continues them and writes the report."""

    def __init__(self, out: Path, methods: list[str], signal_number: int = signal.SIGINT):
        self.out, self.methods, self.signal_number = out, methods, signal_number
        super().__init__(f"interrupted: {', '.join(methods)} not finished in {out}" if methods
                         else f"interrupted before the report of {out} was written")


class StoppedAtOnce(KeyboardInterrupt):
    """A second Ctrl-C or SIGTERM (``signal_number``) ended the laboratory's workers at once."""

    def __init__(self, signal_number: int):
        super().__init__()
        self.signal_number = signal_number


def _death_of(exitcode: int | None) -> str:
    """Why a worker process ended without an outcome, from its exit status (``-N``: killed by signal N)."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = (" (the system's out-of-memory killer sends it when memory runs out; fewer --workers use less)"
                if -exitcode == signal.SIGKILL else "")
        return f"its worker process was killed by {name}{hint}"
    return (f"its worker process exited with status {exitcode} before returning an outcome (what it printed, if "
            "anything, is above)")


def _worker_loop(connection, stop: Any, run: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """A worker process: run each job received (``run`` is :func:`_run_method`) and send back its outcome, until told
    to stop (``None``), the laboratory stops (a method's outcome is the last one then), or its end of the pipe
    closes (the laboratory's process is gone)."""
    _init_worker(stop)
    while True:
        try:
            job = connection.recv()
        except EOFError:
            return
        if job is None:
            return
        try:
            outcome = run(job)
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once, without a traceback per worker
            return
        try:
            connection.send(outcome)
        except OSError:  # the laboratory's process is gone: nobody to tell
            return
        if stop.is_set():
            return


class _Worker:
    """One worker process and the job it is running. Unlike a ``multiprocessing.Pool``, whose task waits for ever
    when its process is killed, a worker that dies (the out-of-memory killer, kill -9) is seen at its next poll, with
    its exit status; only its own method is lost, and a new worker takes the next one."""

    def __init__(self, context: Any, stop: Any, run: Callable[[dict[str, Any]], dict[str, Any]]):
        self.connection, child_end = context.Pipe()
        try:
            with _ignoring_ctrl_c():  # the worker starts with Ctrl-C ignored (no traceback from its imports)
                self.process = context.Process(target=_worker_loop, args=(child_end, stop, run), daemon=True)
                self.process.start()
        except BaseException:
            self.connection.close()
            raise
        finally:
            child_end.close()
        self.job: dict[str, Any] | None = None

    @property
    def method(self) -> str | None:
        return self.job["method"] if self.job is not None else None

    def start(self, job: dict[str, Any]) -> None:
        self.job = job
        try:
            self.connection.send(job)
        except OSError:  # it died meanwhile: ended for sure, its death is reported at the next poll
            self.process.kill()

    def _received(self) -> dict[str, Any] | None:
        try:
            return self.connection.recv() if self.connection.poll() else None
        except (EOFError, OSError):  # the process died while sending
            return None

    def outcome(self) -> dict[str, Any] | None:
        """The outcome of its job once there is one: the method's own, or ``failed`` when the process died (``done``
        when it died after the method's final evaluation was written)."""
        if self.job is None:
            return None
        outcome = self._received()
        if outcome is None and not self.process.is_alive():
            outcome = self._received()  # sent just before it ended
            if outcome is None:
                self.process.join(timeout=5)
                if _read_json_object(Path(self.job["run_dir"]) / "final_eval.json"):
                    outcome = {"method": self.method, "status": "done"}
                else:
                    outcome = {"method": self.method, "status": "failed", "error": _death_of(self.process.exitcode),
                               "died": True}
        if outcome is not None:
            self.job = None
        return outcome


def _end_workers(pool: list[_Worker], stop: Any, at_once: bool) -> dict[str, dict[str, Any]]:
    """End every worker. Idle ones are told to stop; ``at_once`` sends SIGTERM to all of them together (a trainer
    saves the step under way, then its worker exits, ``stop`` being set), and SIGKILL to those still running 10 s
    later. Nothing is left behind. Returns the outcomes the busy ones sent on their way out, by method."""
    if at_once:
        stop.set()
    for worker in pool:
        if worker.process.is_alive():
            if at_once:
                worker.process.terminate()
            else:
                with contextlib.suppress(OSError):
                    worker.connection.send(None)
    deadline = time.monotonic() + (10 if at_once else 30)
    for worker in pool:
        worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
    sent = {}
    for worker in pool:
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        if worker.job is not None and (outcome := worker._received()) is not None:
            sent[outcome["method"]] = outcome
        worker.connection.close()
    return sent


def _record_outcome(outcome: dict[str, Any], outcomes: dict[str, Any], progress, bars: dict[str, Any], out: Path,
                    steps: int, jobs: int) -> None:
    """Keep a method's outcome and show it: its bar's state, and one line. A method whose worker died gets the
    reason in its ``error.log``, as a method that raised gets its traceback."""
    method, status = outcome["method"], outcome["status"]
    outcomes[method] = outcome
    run_dir = out / "methods" / method
    if outcome.get("died"):
        with contextlib.suppress(OSError):  # a full disk: the report reads the error from outcomes.json instead
            run_dir.mkdir(parents=True, exist_ok=True)
            _write_error_log(run_dir, outcome["error"] + "\n")
    progress.update(bars[method], completed=steps if status in ("done", "cached") else min(_count_lines(run_dir / "metrics.jsonl"), steps),
                    status={"done": "[green]done", "cached": "done (cached)", "failed": "[red]failed",
                            "interrupted": "[yellow]interrupted"}[status])
    if status not in ("done", "cached"):
        progress.stop_task(bars[method])  # its clock stops with it
    saved = (f", saved at step {outcome['step']}" if outcome.get("step") is not None
             else " before it started" if status == "interrupted" else "")
    progress.console.print(f"{method}: {status}{saved} ({len(outcomes)}/{jobs})")


def _show_progress(methods: list[str], progress, bars: dict[str, Any], out: Path, steps: int) -> None:
    """Advance the bars of the methods being trained by their logged steps; a bar's clock runs from its first step."""
    started = {task.id for task in progress.tasks if task.started}
    for method in methods:
        logged = _count_lines(out / "methods" / method / "metrics.jsonl")
        if logged and bars[method] not in started:
            progress.start_task(bars[method])
        progress.update(bars[method], completed=min(logged, steps))


@dataclass
class _StopRequests:
    """How many times the laboratory was asked to stop (Ctrl-C, SIGTERM, a first SIGXCPU), and by which signal last."""

    count: int = 0
    signal_number: int = signal.SIGINT

    @property
    def said_as(self) -> str:
        if self.signal_number == signal.SIGINT:
            return "Ctrl-C"
        if self.signal_number == CPU_TIME_LIMIT:
            return "SIGXCPU (the CPU-time limit is reached)"
        return signal.Signals(self.signal_number).name


@contextlib.contextmanager
def _counting_stop_signals():
    """Count Ctrl-C presses, SIGTERMs (a job scheduler's "stop") and a first SIGXCPU (a soft CPU-time limit reached) in
    the block instead of raising ``KeyboardInterrupt`` or ending the process wherever one lands (between a message's
    receipt and its bookkeeping, it would lose a method's outcome; killed outright, the laboratory would say nothing
    of what it kept); yields the :class:`_StopRequests`. A signal the process ignores (SIGINT, when a script starts it
    in the background) stays ignored."""
    requests = _StopRequests()
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return
    limit_reached = False

    def count(signum, frame):
        nonlocal limit_reached
        if signum == CPU_TIME_LIMIT:
            if limit_reached:  # the kernel's repeat
                return
            limit_reached = True
        requests.count += 1
        requests.signal_number = signum

    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM, CPU_TIME_LIMIT)
                if number is not None}
    for number, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(number, count)
    try:
        yield requests
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)


def _run_jobs(jobs: list[dict[str, Any]], workers: int, outcomes: dict[str, Any], progress, bars: dict[str, Any],
              out: Path, steps: int) -> int | None:
    """Train the methods of ``jobs`` in up to ``workers`` processes, filling ``outcomes``; returns the number of the
    signal that asked the laboratory to stop (Ctrl-C's SIGINT, SIGTERM or SIGXCPU; SIGXCPU when a worker reached its
    CPU-time limit, SIGINT for another signal that stopped a method without reaching this process), or None: methods
    not started then do not start. A second one ends the workers at once and raises :class:`StoppedAtOnce`."""
    context = multiprocessing.get_context("spawn")
    stop = _StopRequest(context)
    queue, pool = list(jobs), []
    at_once = True  # unless every method is accounted for, the workers are ended at once on the way out

    def record(outcome: dict[str, Any]) -> None:
        _record_outcome(outcome, outcomes, progress, bars, out, steps, len(jobs))

    try:
        with _counting_stop_signals() as requests:
            while queue or any(worker.job for worker in pool):
                if requests.count >= 2:  # the workers are ended at once (below)
                    raise StoppedAtOnce(requests.signal_number)
                if requests.count and not stop.is_set():
                    stop.set()
                    again = "Ctrl-C" if requests.signal_number == CPU_TIME_LIMIT else requests.said_as
                    progress.console.print(
                        f"[yellow]{requests.said_as}[/yellow]: each method being trained finishes its step and saves "
                        f"it, the others do not start ({again} again to stop at once)", highlight=False)
                for worker in pool:
                    outcome = worker.outcome()
                    if outcome is not None:
                        record(_stopped_not_failed(outcome, worker.process, requests.count > 0))
                for worker in [w for w in pool if w.job is None and not w.process.is_alive()]:
                    worker.connection.close()  # ended between two methods: a new one is started when needed
                    pool.remove(worker)
                stopped = [o for o in outcomes.values() if o["status"] == "interrupted"]
                if not stop.is_set() and stopped:
                    # a signal reached the workers but not this process (which ignores SIGINT when a script starts
                    # it in the background): it was meant for the whole laboratory; or a worker reached its own
                    # CPU-time limit, which the others will reach too
                    stop.set()
                    by_limit = any(o.get("signal") == "SIGXCPU" for o in stopped)
                    if by_limit:
                        requests.signal_number = CPU_TIME_LIMIT
                    why = "a worker reached its CPU-time limit (SIGXCPU)" if by_limit else "a method was stopped by a signal"
                    progress.console.print(f"[yellow]{why}[/yellow]: the others finish their step and save it, the rest "
                                           "do not start (Ctrl-C to stop at once)", highlight=False)
                    requests.count = max(requests.count, 1)
                if stop.is_set():
                    while queue:
                        record({"method": queue.pop(0)["method"], "status": "interrupted"})
                while queue:
                    worker = next((w for w in pool if w.job is None and w.process.is_alive()), None)
                    if worker is None and len(pool) < workers:
                        try:
                            worker = _Worker(context, stop, _run_method)
                        except OSError as error:  # no process could be made (out of memory, process limit)
                            record({"method": queue.pop(0)["method"], "status": "failed", "died": True,
                                    "error": f"no worker process could be started for it: {error}"})
                            continue
                        pool.append(worker)
                    if worker is None:
                        break
                    worker.start(queue.pop(0))
                _show_progress([w.method for w in pool if w.job], progress, bars, out, steps)
                time.sleep(0.5)
            if requests.count >= 2:  # asked twice during the last wait: the workers are ended at once
                raise StoppedAtOnce(requests.signal_number)
            if requests.count and not stop.is_set():  # asked once during the last wait, every method having ended
                stop.set()
        at_once = False
    finally:
        under_way = [worker.method for worker in pool if worker.job is not None]  # stopped at once: no outcome came
        sent = _end_workers(pool, stop, at_once)
        for method in under_way:  # what its worker said on its way out (the step it saved), else: it was training
            outcomes.setdefault(method, sent.get(method) or {"method": method, "status": "interrupted", "under_way": True})
        for job in queue:  # those never started
            outcomes.setdefault(job["method"], {"method": job["method"], "status": "interrupted"})
    return requests.signal_number if stop.is_set() else None


@contextlib.contextmanager
def _one_torch_thread():
    """One torch thread inside, the caller's number again after: tiny matrices gain nothing from more, and two busy
    processes on two cores each spinning two threads slow every small operation down by orders of magnitude."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_lab(preset_name: str = "default", *, methods: list[str] | str | None = None, out: Path | None = None,
            workers: int | None = None, console=None, cache_dir: Path | None = None, rl_seed: int | None = None,
            imports: list[str] | None = None) -> Path:
    """Run the laboratory and write its report; returns the run directory. Re-running on an existing
    directory resumes: finished methods are kept, interrupted ones continue from their last intact checkpoint (one
    without any, its checkpoints damaged or their trainer states deleted, trains again, those set aside in
    ``checkpoints/passed_over``), and the report covers every method run in the directory so far, not only the ones
    named this time.

    ``imports``: modules to import first, which register methods of one's own (``entrorl.objective.register_method``)
    that ``methods`` may then name. The methods train in new processes, which import them too, as they do the module
    that registered a method named here (a script's own code runs again in each of them).

    Raises:
        ValueError: an unknown preset or method, a module of ``imports`` that cannot be imported, a method registered
            where the workers cannot import it (an interactive session), ``workers`` below 1, an ``out`` that cannot be
            a run directory, an existing run directory started with other settings, one another laboratory is
            running in (its process named), or a launch of several processes (``torchrun``); all before anything is
            built.
    """
    from entrorl.rewards.base import import_named_modules

    refuse_multi_process_launch("the laboratory")
    imports = [] if imports is None else import_named_modules(imports, "--import")
    preset = get_preset(preset_name)
    requested = _requested_methods(methods)
    if requested:
        preset = preset.model_copy(update={"methods": requested})
    if rl_seed is not None:
        # an int is compared as it is: math.isfinite would overflow on one beyond a float's range
        whole = isinstance(rl_seed, numbers.Integral) or (
            isinstance(rl_seed, numbers.Real) and math.isfinite(rl_seed) and float(rl_seed).is_integer())
        if isinstance(rl_seed, bool) or not whole or not 0 <= rl_seed <= 2**32 - 1:
            raise ValueError(f"--rl-seed must be a whole number from 0 to 2**32 - 1 (numpy's seed range); got {rl_seed!r}")
        preset = preset.model_copy(update={"rl_seed": int(rl_seed)})
    preset.check_methods()
    worker_imports = _worker_imports(preset.methods, imports)
    workers = _checked_workers(workers, preset)
    out = Path(out) if out is not None else default_run_directory()
    if cached_base_model(preset.base, cache_dir, say=False) is None:  # a cache that cannot be written, and must be, fails now,
        lab_cache_root(cache_dir, create=False)  # before the run directory is made
    _prepare_run_directory(out)
    try:
        # two laboratories in one folder would overwrite each other's record and outcomes
        lock = lock_run_directory(out, options="--out", user="laboratory")
    except OSError as error:
        raise ValueError(f"--out {error}") from None
    try:
        return _run_in_folder(preset, out, workers=workers, console=console, cache_dir=cache_dir,
                              imports=worker_imports)
    finally:
        if lock is not None:
            lock.close()


def _worker_imports(methods: list[str], imports: list[str]) -> list[str]:
    """``imports`` and the modules that registered the methods of ``methods`` that are the user's own
    (:func:`entrorl.objective.method_modules`): a worker process, started afresh, imports them before it builds its
    method. A script's own module (``__main__``) runs again in each worker; an interactive session cannot."""
    from entrorl.objective import method_modules

    modules = list(imports)
    for method in methods:
        for name in ([] if method == "sft" else method.split("+")):
            for module in method_modules(name):
                if module != "__main__":
                    modules.append(module)
                elif getattr(sys.modules.get("__main__"), "__file__", None) is None:
                    raise ValueError(
                        f"method '{name}' is registered by this interactive session, whose code the laboratory's "
                        "worker processes (one per method) cannot run: register it in a module of its own and import "
                        "that (run_lab(imports=[...]), entrorl lab --import MODULE)")
    return list(dict.fromkeys(modules))


def _run_in_folder(preset: LabPreset, out: Path, *, workers: int, console, cache_dir: Path | None,
                   imports: list[str] = ()) -> Path:
    """:func:`run_lab` in its checked and locked folder ``out``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from entrorl.analysis.run_report import lab_imports
    from entrorl.lab.report import write_report

    recorded = _read_json_object(out / "lab.json")
    _check_same_preset(out, preset, recorded)
    # what the folder's methods of one's own need, those of earlier invocations included (the report's command)
    folder_imports = list(dict.fromkeys([*lab_imports(recorded), *imports]))
    # the folder's methods are all those run in it so far and now: the report covers them all
    run_methods = list(dict.fromkeys([*(str(m) for m in recorded.get("methods") or []), *preset.methods]))
    invocations = [i for i in recorded.get("invocations") or [] if isinstance(i, dict)]
    progress = Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[status]}"), console=console)
    outcomes: dict[str, Any] = {}
    with progress, _one_torch_thread():
        base_task = progress.add_task("base model", total=preset.base.steps, status="")
        model_dir = build_base_model(preset.base, cache_dir=cache_dir,
                                     progress=lambda done, total, loss: progress.update(base_task, completed=done, status=f"loss {loss:.3f}"))
        progress.update(base_task, completed=preset.base.steps, status=f"cached: {model_dir.name}")
        progress.console.print(f"base model ready: {model_dir}")
        # the kernels the cached base model was trained with (another machine's, from a shared cache)
        base_kernels = _read_json_object(model_dir / "base.json").get("cpu_kernels")
        base_fingerprint = _weights_digest(model_dir)
        _check_same_base_model(out, recorded, base_fingerprint, base_kernels)
        # the floating-point kernels torch chose for this CPU (AVX2, AVX512, ...): another set rounds differently
        invocation: dict[str, Any] = {"started_at": time.time(), "methods": list(preset.methods), "workers": workers,
                                      "cpu_kernels": torch.backends.cpu.get_cpu_capability()}
        running_since = time.monotonic()  # the duration does not follow the wall clock's jumps (an NTP correction)
        invocations.append(invocation)

        def record_lab() -> None:
            _write_json(out / "lab.json", {
                "preset": {**preset.model_dump(mode="json"), "methods": run_methods}, "base_model": model_dir.name,
                "base_model_spec": asdict(preset.base), "base_model_cpu_kernels": base_kernels,
                "base_model_fingerprint": base_fingerprint,
                "methods": run_methods, "workers": workers, "imports": folder_imports,
                "invocations": invocations})

        data = _prepare_data(out, preset)
        record_lab()
        methods_started = False  # a stop during the base evaluation comes before any method
        try:
            base_eval = out / "base" / "final_eval.json"
            if not _read_json_object(base_eval):  # one cut short is made again, as a method's final evaluation is
                from entrorl.modeling import load_causal_lm, load_tokenizer

                base_eval.parent.mkdir(parents=True, exist_ok=True)
                eval_task = progress.add_task("base evaluation", total=1, status="")
                invocation["base_evaluated"] = True
                _write_json(base_eval, evaluate_policy(load_causal_lm(model_dir), load_tokenizer(model_dir), preset, data))
                progress.update(eval_task, completed=1)
            jobs = [{"preset": preset.model_dump(mode="json"), "method": method, "run_dir": str(out / "methods" / method),
                     "model_dir": str(model_dir), "data": {k: str(v) for k, v in data.items()},
                     "imports": list(imports)} for method in preset.methods]
            bars = {job["method"]: progress.add_task(job["method"], total=preset.steps, status="", start=False)
                    for job in jobs}
            methods_started = True
            stopped_by = _run_jobs(jobs, workers, outcomes, progress, bars, out, preset.steps)
            if stopped_by is not None:  # every method may have finished meanwhile: the user still asked to stop
                raise LabInterrupted(out, [m for m, outcome in outcomes.items() if outcome["status"] == "interrupted"],
                                     signal_number=stopped_by)
        finally:  # also when interrupted: the time this invocation ran is recorded
            invocation["finished_at"] = time.time()
            invocation["seconds"] = time.monotonic() - running_since
            # what this invocation trained or was training: not the finished ones it found, nor those it never started
            invocation["ran"] = [m for m in preset.methods if methods_started and _trained_here(outcomes.get(m))]
            invocation["completed"] = (len(outcomes) == len(preset.methods)
                                       and all(o["status"] in ("done", "cached") for o in outcomes.values()))
            record_lab()
            # an interrupted invocation's outcomes too: a method that failed before and has finished since is no
            # longer listed as failed
            _write_json(out / "outcomes.json", {**_read_json_object(out / "outcomes.json"), **outcomes})
    failed = {m: o["error"] for m, o in outcomes.items() if o["status"] == "failed"}
    if console is not None:
        console.print("writing the report and its figures")
    write_report(out)
    if console is not None and len(run_methods) > len(preset.methods):
        console.print(f"the report covers all {len(run_methods)} methods of {out} ({', '.join(run_methods)}), "
                      f"not only the ones asked for now ({', '.join(preset.methods)})")
    if failed and console is not None:
        for method, error in failed.items():
            console.print(Text.assemble((f"{method} failed", "red"), f" (see {out / 'methods' / method / 'error.log'}):\n{error}"))
    return out
