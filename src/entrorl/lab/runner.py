"""The laboratory run: one base model, a matrix of methods under the same seeds and budget, in parallel
processes, each resumable; then a report.

Run directory::

    lab.json                         preset, methods, tasks, base model key
    data/{train,eval,forget}.jsonl   the generated prompt files
    base/final_eval.json             the base model's evaluation (same format as a method's)
    methods/<name>/                  a trainer run directory (metrics.jsonl, config.json, checkpoints/)
    methods/<name>/final_eval.json   Pass@k curve, pass rates, S/D distributions, fork tokens, forgetting
    report.md, report.html, figures/
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import traceback
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from entrorl.data import load_prompts, write_jsonl
from entrorl.lab.base_model import build_base_model
from entrorl.lab.presets import LabPreset, get_preset
from entrorl.lab.supervised import SFT_OBJECTIVE
from entrorl.lab.tasks import get_task

__all__ = ["run_lab", "evaluate_policy", "task_reward", "SUPERVISED_BASELINES"]

SUPERVISED_BASELINES = ("sft", "rft")
_HISTOGRAM_BINS = np.linspace(-0.4, 0.4, 41)


def task_reward(task: str):
    """The verifier of a lab task as a reward function (``reward.name: entrorl.lab.runner:task_reward``)."""
    return get_task(task)


def _write_json(path: Path, payload: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(payload, indent=1, ensure_ascii=False))
    os.replace(temporary, path)


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


def _trainer_config(preset: LabPreset, method: str, model_dir: Path, data: dict[str, Path], run_dir: Path) -> dict[str, Any]:
    return {
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
        "logging": {"run_dir": str(run_dir.parent), "name": run_dir.name, "progress": False},
        "checkpoint": {"every": preset.checkpoint_every, "keep": 1},
    }


@torch.no_grad()
def evaluate_policy(model, tokenizer, preset: LabPreset, data: dict[str, Path]) -> dict[str, Any]:
    """Pass@k (k up to ``eval_n``) on the held-out split, pass rates, entropy and S/D distributions of the
    samples split by correctness, the top fork tokens, and accuracy on the untrained (forgetting) task."""
    from entrorl.modeling import bucketed_response_token_stats
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
        prompts = [tokenizer(r.prompt)["input_ids"] for r in records for _ in range(n)]
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
        ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= n]
        summary = summarize_samples(correct, ks=ks)
        stats = bucketed_response_token_stats(model, rollouts.prompt_ids, rollouts.prompt_mask, rollouts.response_ids,
                                              rollouts.response_mask, temperature=preset.temperature,
                                              need=("entropy", "disc", "disc_centered"))
        mask = rollouts.response_mask
        sample_correct = scores.correct[:, None].expand_as(mask)
        distributions = {}
        for name, values in (("disc", stats.disc), ("disc_centered", stats.disc_centered)):
            for label, select in (("correct", sample_correct), ("wrong", ~sample_correct)):
                picked = values[mask & select].clamp(_HISTOGRAM_BINS[0], _HISTOGRAM_BINS[-1]).numpy()
                distributions[f"{name}/{label}"] = np.histogram(picked, bins=_HISTOGRAM_BINS)[0].tolist()
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


def _run_method(job: dict[str, Any]) -> dict[str, Any]:
    """One method, in its own process: train (resuming when a checkpoint exists), then evaluate."""
    torch.set_num_threads(1)
    from entrorl.lab.supervised import SFTTrainer
    from entrorl.modeling import load_causal_lm, load_tokenizer
    from entrorl.trainer import Trainer, load_config
    from entrorl.trainer.checkpoint import latest_checkpoint

    preset = LabPreset(**job["preset"])
    method, run_dir = job["method"], Path(job["run_dir"])
    data = {k: Path(v) for k, v in job["data"].items()}
    final_path = run_dir / "final_eval.json"
    if final_path.exists():
        return {"method": method, "status": "cached"}
    started = time.perf_counter()
    try:
        config = load_config(_trainer_config(preset, method, Path(job["model_dir"]), data, run_dir))
        resume = latest_checkpoint(run_dir) is not None
        trainer_class = SFTTrainer if method == "sft" else Trainer
        trainer = trainer_class(config, run_dir=run_dir, resume=resume)
        if method == "sft":
            trainer.use_task(get_task(preset.train_task))
        trainer.train()
        evaluation = evaluate_policy(trainer.model, trainer.tokenizer, preset, data)
        evaluation["train_seconds"] = time.perf_counter() - started
        _write_json(final_path, evaluation)
        return {"method": method, "status": "done", "seconds": time.perf_counter() - started}
    except Exception:  # a failed method must not take the matrix down: record it and go on
        (run_dir / "error.log").parent.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.log").write_text(traceback.format_exc())
        return {"method": method, "status": "failed", "error": traceback.format_exc(limit=3)}


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as handle:
            return sum(1 for _ in handle)
    except FileNotFoundError:
        return 0


def _check_same_preset(out: Path, preset: LabPreset) -> None:
    """A run directory is resumed only with the settings it was started with (rl_seed included; the methods may
    differ, to add or revisit some): otherwise runs trained under different settings would be reported together."""
    recorded_file = out / "lab.json"
    if not recorded_file.is_file():
        return
    recorded = json.loads(recorded_file.read_text()).get("preset", {})
    current = preset.model_dump(mode="json")
    differing = sorted(key for key in set(recorded) | set(current) if key != "methods" and recorded.get(key) != current.get(key))
    if differing:
        changes = "; ".join(f"{key}: {recorded.get(key)!r} there, {current.get(key)!r} now" for key in differing)
        raise ValueError(f"{out} was started with other settings ({changes}); resume it with the same options "
                         "or choose another --out")


def run_lab(preset_name: str = "default", *, methods: list[str] | None = None, out: Path | None = None,
            workers: int | None = None, console=None, cache_dir: Path | None = None, rl_seed: int | None = None) -> Path:
    """Run the laboratory and write its report; returns the run directory. Re-running on an existing
    directory resumes: finished methods are kept, interrupted ones continue from their last checkpoint."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from entrorl.lab.report import write_report

    preset = get_preset(preset_name)
    if methods:
        preset = preset.model_copy(update={"methods": list(methods)})
    if rl_seed is not None:
        preset = preset.model_copy(update={"rl_seed": int(rl_seed)})
    preset.check_methods()
    out = Path(out) if out is not None else Path("runs") / f"lab-{datetime.now():%Y%m%d-%H%M%S}"
    _check_same_preset(out, preset)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or preset.workers
    # one thread per process: tiny matrices gain nothing from more, and two busy processes on two cores each
    # spinning two threads slow every small operation down by orders of magnitude
    torch.set_num_threads(1)
    progress = Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[status]}"), console=console)
    with progress:
        base_task = progress.add_task("base model", total=preset.base.steps, status="")
        model_dir = build_base_model(preset.base, cache_dir=cache_dir,
                                     progress=lambda done, total, loss: progress.update(base_task, completed=done, status=f"loss {loss:.3f}"))
        progress.update(base_task, completed=preset.base.steps, status=f"cached: {model_dir.name}")
        progress.console.print(f"base model ready: {model_dir}")
        data = _prepare_data(out, preset)
        _write_json(out / "lab.json", {"preset": preset.model_dump(mode="json"), "base_model": model_dir.name,
                                       "base_model_spec": asdict(preset.base), "methods": preset.methods, "workers": workers})
        base_eval = out / "base" / "final_eval.json"
        if not base_eval.exists():
            from entrorl.modeling import load_causal_lm, load_tokenizer

            base_eval.parent.mkdir(parents=True, exist_ok=True)
            eval_task = progress.add_task("base evaluation", total=1, status="")
            _write_json(base_eval, evaluate_policy(load_causal_lm(model_dir), load_tokenizer(model_dir), preset, data))
            progress.update(eval_task, completed=1)
        jobs = [{"preset": preset.model_dump(mode="json"), "method": method, "run_dir": str(out / "methods" / method),
                 "model_dir": str(model_dir), "data": {k: str(v) for k, v in data.items()}} for method in preset.methods]
        bars = {job["method"]: progress.add_task(job["method"], total=preset.steps, status="") for job in jobs}
        context = multiprocessing.get_context("spawn")
        outcomes = {}
        with context.Pool(processes=max(1, min(workers, len(jobs)))) as pool:
            pending = {job["method"]: pool.apply_async(_run_method, (job,)) for job in jobs}
            while pending:
                for method, handle in list(pending.items()):
                    steps = _count_lines(out / "methods" / method / "metrics.jsonl")
                    progress.update(bars[method], completed=min(steps, preset.steps))
                    if handle.ready():
                        outcomes[method] = handle.get()
                        status = outcomes[method]["status"]
                        progress.update(bars[method], completed=preset.steps if status != "failed" else steps,
                                        status={"done": "[green]done", "cached": "done (cached)", "failed": "[red]failed"}[status])
                        del pending[method]
                        progress.console.print(f"{method}: {status} ({len(outcomes)}/{len(jobs)})")
                time.sleep(0.5)
    failed = {m: o["error"] for m, o in outcomes.items() if o["status"] == "failed"}
    _write_json(out / "outcomes.json", outcomes)
    write_report(out)
    if failed and console is not None:
        for method, error in failed.items():
            console.print(f"[red]{method} failed[/red] (see {out / 'methods' / method / 'error.log'}):\n{error}")
    return out
