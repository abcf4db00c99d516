#!/usr/bin/env python
"""Trainer step throughput: entrorl's ``Trainer`` against TRL's ``GRPOTrainer`` on the same tiny model,
prompts, batch shape and lengths, side by side in one run.

Arms (each run in its own fresh subprocess, so no arm inherits another's threads, caches or patches):

* ``entrorl``         -- ``Trainer.train_step()`` with the diagnostics on (``measure_entropy_change``: the
  step's rollouts, or the share ``diagnostics.measure_fraction`` of their rows, ``--measure-fraction``, are
  re-scored after the update, one extra forward), plus the per-step metrics log line.
* ``entrorl-nodiag``  -- the same with ``diagnostics.measure_entropy_change: false``.
* ``trl``             -- ``trl.GRPOTrainer.train()`` (generation with ``model.generate``, TRL's own loop),
  when TRL is installed (``pip install -e ".[bench]"``).
* ``floor``           -- no trainer at all: just the model calls a step cannot do without while it runs this
  model's ``transformers`` code (prefill, one decode forward per token with a KV cache, always the full length;
  one forward + backward with a plain policy-gradient loss; AdamW). A reference for how much of a step is the
  model itself, not a competitor.

What is the same in every arm: one tiny random-init Qwen2 with a character tokenizer
(:func:`entrorl.lab.tiny_model.save_tiny_model`, loaded with ``entrorl.modeling``), the prompts (``"a+b="``
sums from a generated JSONL file), ``P`` prompts per step times a group of ``G`` completions, at most
``--max-new-tokens`` completion tokens sampled at temperature 1 (no top-k / top-p), float32, the same reward
function (defined below; both frameworks call this very function), GRPO advantages (group mean and std),
the PPO-clip loss with eps 0.2 averaged per sequence then over sequences (entrorl ``grpo``; TRL
``loss_type="grpo"``), no KL term and no reference model (TRL ``beta=0``), one AdamW update per step
(on-policy: TRL ``num_iterations=1``, ``gradient_accumulation_steps=1``), the same constant learning rate,
gradient clipping at 1.0, no gradient checkpointing (TRL turns it on by default; it is turned off here, since it
only trades time for memory), the same number of torch threads (``torch.set_num_threads``), no progress bars.

Timing: ``--warmup`` steps are run and discarded, then ``--steps`` steps are timed. A step's time is the wall
clock from the end of one step to the end of the next: for TRL the interval between ``on_step_end`` callbacks
(data loading, generation, rewards, the update, the optimizer step, TRL's metric logging); for entrorl the
time of ``train_step()`` plus writing its metrics line (what ``Trainer.train`` does per step, minus
checkpoints and evaluation). steps/s is one over the median step time and completion tokens/s the median of
(completion tokens of a step / its time), over the timed steps of every round; a completion token is every
generated token up to and including EOS. Medians, because on a shared machine a burst of other work can slow
a few steps by half; the table also shows steps/s on mean step times and per round. ``--rounds`` repeats
every arm, interleaved, each time in a fresh process. "CPU s/step" is the median CPU time the arm's process
spent over the same interval (``time.process_time``): with one torch thread it equals the wall time on an idle
machine, and it leaves out the time the process waited for a core while other processes ran, so its ratios hold
up better on a shared machine (a shared core's caches still slow it somewhat).

Phases: entrorl reports ``time/generate_s`` (sampling, decoding, rewards, advantages), ``time/update_s``
(scoring forward, loss, backward, optimizer step) and ``time/diagnostics_s`` (the post-update forward when on,
and the entropy / covariance / S-D summaries). For TRL the "generate" phase is
``_generate_and_score_completions`` (generation, decoding, rewards, advantages; timed by a subclass that only
wraps it) and "update" is the rest of the step.

Diagnostics overhead, two ways: arm against arm, ``median step(entrorl) / median step(entrorl-nodiag) - 1``
(what the post-update forward adds); and within each step of the ``entrorl`` arm, the diagnostics phase over
the rest of the same step (the post-update forward and every summary statistic; immune to slow periods that
hit one arm and not the other).

``--entrorl-set KEY=VALUE`` (repeatable) changes the entrorl arms' configuration the way ``entrorl train --set`` does,
to measure what one setting is worth (e.g. ``--entrorl-set optim.share_prompts=false``); the batch's shape and sampling
(``rollout.prompts_per_step``, ``group_size``, ``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``,
``generation_batch_size``, or the whole ``rollout`` section), which every arm shares, are refused there.

Run ``python benchmarks/bench_trainer.py --help`` for the options; ``--quick`` is a smoke test that finishes in
well under a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = ("entrorl", "entrorl-nodiag", "trl", "floor")
RESULT_PREFIX = "@@RESULT@@ "
REWARD_NAME = "bench_trainer_reward"
# what the arms share and the report's header states: an --entrorl-set of one would compare unlike batches
_BATCH_SHAPE_KEYS = frozenset(f"rollout.{key}" for key in ("prompts_per_step", "group_size", "max_new_tokens", "temperature",
                                                           "top_p", "top_k", "generation_batch_size"))


# ----------------------------------------------------------------------------------------------
# The shared task: prompts and the reward
# ----------------------------------------------------------------------------------------------


def bench_reward(prompt: str, completion: str, answer, /, **meta) -> float:
    """1.0 when the completion starts with the answer (after leading spaces); otherwise partial credit:
    the share of digits among the completion's first characters, times 0.5. Cheap and deterministic, and
    unlike a plain exact match it gives a random model's groups unequal rewards, so updates are non-trivial."""
    text = completion.lstrip()
    reference = str(answer)
    if text.startswith(reference) and not text[len(reference) : len(reference) + 1].isdigit():
        return 1.0
    head = text[: len(reference) + 2]
    return 0.5 * sum(ch.isdigit() for ch in head) / max(len(head), 1)


def write_prompts(path: Path, count: int, seed: int) -> None:
    import random

    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(count):
            a, b = rng.randrange(100), rng.randrange(100)
            handle.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")


def read_prompts(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------
# Workers (one arm each, in a fresh process)
# ----------------------------------------------------------------------------------------------


def _steps_summary(records: list[dict], warmup: int) -> dict:
    timed = records[warmup:]
    total = sum(r["step_s"] for r in timed)
    tokens = sum(r["tokens"] for r in timed)
    rows = sum(r["rows"] for r in timed)
    summary = {
        "timed_steps": len(timed),
        "total_s": total,
        "steps_per_s": len(timed) / total if total > 0 else float("nan"),
        "tokens_per_s": tokens / total if total > 0 else float("nan"),
        "step_s_median": statistics.median(r["step_s"] for r in timed) if timed else float("nan"),
        "mean_completion_length": tokens / rows if rows else float("nan"),
        "reward_mean": statistics.fmean(r["reward_mean"] for r in timed) if timed else float("nan"),
    }
    for phase in ("generate_s", "update_s", "diagnostics_s"):
        values = [r[phase] for r in timed if r.get(phase) is not None]
        summary[phase] = statistics.fmean(values) if values else None
    return summary


def _profiled(enabled: bool):
    """A cProfile.Profile if profiling was asked for, else None."""
    if not enabled:
        return None
    import cProfile

    return cProfile.Profile()


def _print_profile(profile, label: str, limit: int = 30) -> None:
    if profile is None:
        return
    import io
    import pstats

    buffer = io.StringIO()
    stats = pstats.Stats(profile, stream=buffer)
    for key in ("tottime", "cumulative"):
        buffer.write(f"\n===== profile of the timed steps: {label}, sorted by {key} =====\n")
        stats.sort_stats(key).print_stats(limit)
    sys.stderr.write(buffer.getvalue())


def worker_entrorl(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from entrorl.rewards import register_reward
    from entrorl.trainer import Trainer, load_config
    from entrorl.trainer.config import apply_overrides

    register_reward(REWARD_NAME, description="bench_trainer.py's reward")(bench_reward)
    diagnostics = {}
    if spec.get("measure_fraction") is not None:
        diagnostics["measure_fraction"] = spec["measure_fraction"]
    config = load_config(apply_overrides({
        "seed": spec["seed"],
        "torch_threads": spec["threads"],
        "model": {"path": spec["model_dir"]},
        "data": {"train": spec["prompts"]},
        "reward": {"name": REWARD_NAME},
        "rollout": {
            "prompts_per_step": spec["prompts_per_step"], "group_size": spec["group_size"],
            "max_new_tokens": spec["max_new_tokens"], "temperature": 1.0, "top_p": 1.0, "top_k": 0,
            "generation_batch_size": spec["prompts_per_step"] * spec["group_size"],
        },
        "method": "grpo",
        "optim": {"steps": spec["warmup"] + spec["steps"], "lr": spec["lr"], "grad_clip": 1.0, "weight_decay": 0.0},
        "eval": {"every": 0},
        "diagnostics": {"measure_entropy_change": spec["arm"] == "entrorl", **diagnostics},
        "logging": {"progress": False},
        "checkpoint": {"every": 0},
    }, spec.get("entrorl_set") or []))
    trainer = Trainer(config, run_dir=Path(spec["work_dir"]) / f"entrorl-run-{spec['arm']}-{spec['round']}")
    profile = None
    records = []
    try:
        for index in range(spec["warmup"] + spec["steps"]):
            if index == spec["warmup"]:
                profile = _profiled(spec["profile"])
                if profile is not None:
                    profile.enable()
            started, started_cpu = time.perf_counter(), time.process_time()
            metrics = trainer.train_step()
            trainer.logger.log(trainer.step, metrics)
            elapsed, elapsed_cpu = time.perf_counter() - started, time.process_time() - started_cpu
            # every row sampled (each dynamic-sampling round samples the whole batch again; main() refuses overrides of
            # the batch's shape), as the tokens are every token sampled
            rows = spec["prompts_per_step"] * spec["group_size"] * round(metrics.get("data/sampling_rounds", 1.0))
            records.append({
                "step_s": elapsed,
                "cpu_s": elapsed_cpu,
                "train_step_s": metrics["time/step_s"],
                "generate_s": metrics["time/generate_s"],
                "update_s": metrics["time/update_s"],
                "diagnostics_s": metrics["time/diagnostics_s"],
                "tokens": round(metrics["response/sampled_tokens"]),  # every token sampled, dynamic sampling's too
                "rows": rows,
                "reward_mean": metrics["reward/mean"],
            })
    finally:
        if profile is not None:
            profile.disable()
        trainer.logger.close()
    _print_profile(profile, spec["arm"])
    return {"records": records, "threads_seen": torch.get_num_threads(),
            "measure_fraction": getattr(config.diagnostics, "measure_fraction", 1.0), **_steps_summary(records, spec["warmup"])}


def worker_trl(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    import transformers
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    from entrorl.modeling import load_causal_lm, load_tokenizer

    transformers.logging.set_verbosity_error()
    rows = spec["prompts_per_step"] * spec["group_size"]
    phases: list[dict] = []

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with its generation-and-scoring phase timed (the behaviour is unchanged)."""

        def _generate_and_score_completions(self, inputs):
            started = time.perf_counter()
            output = super()._generate_and_score_completions(inputs)
            phases.append({
                "generate_s": time.perf_counter() - started,
                "tokens": int(output["completion_mask"].sum()),
                "rows": int(output["completion_mask"].shape[0]),
            })
            return output

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []
            self.cpu_marks: list[float] = []
            self.threads_seen = None
            self.rewards: list[float] = []
            self.profile = None
            self.checkpointing = None

        def on_train_begin(self, args, state, control, **kwargs):
            torch.set_num_threads(spec["threads"])
            self.threads_seen = torch.get_num_threads()
            model = kwargs.get("model")
            name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
            self.checkpointing = bool(getattr(model, name, False))
            self.marks.append(time.perf_counter())
            self.cpu_marks.append(time.process_time())
            if spec["warmup"] == 0:  # the first timed step starts now, before any step has ended
                self.start_profile()

        def start_profile(self):
            self.profile = _profiled(spec["profile"])
            if self.profile is not None:
                self.profile.enable()

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())
            self.cpu_marks.append(time.process_time())
            if len(self.marks) - 1 == spec["warmup"]:
                self.start_profile()
            if len(self.marks) - 1 == spec["warmup"] + spec["steps"] and self.profile is not None:
                self.profile.disable()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                self.rewards.append(float(logs["reward"]))

    def reward_fn(prompts, completions, answer, **kwargs):
        return [bench_reward(p, c, a) for p, c, a in zip(prompts, completions, answer)]

    reward_fn.__name__ = REWARD_NAME
    tokenizer = load_tokenizer(spec["model_dir"])
    model = load_causal_lm(spec["model_dir"], dtype="float32")
    dataset = Dataset.from_list(read_prompts(Path(spec["prompts"])))
    total_steps = spec["warmup"] + spec["steps"]
    # TRL turns gradient checkpointing on by default; off here (transformers >= 5.2x renamed it)
    import dataclasses

    names = {field.name for field in dataclasses.fields(GRPOConfig)}
    checkpointing = {"activation_checkpointing": False} if "activation_checkpointing" in names else {"gradient_checkpointing": False}
    args = GRPOConfig(
        output_dir=str(Path(spec["work_dir"]) / f"trl-run-{spec['round']}"),
        per_device_train_batch_size=rows,
        num_generations=spec["group_size"],
        max_completion_length=spec["max_new_tokens"],
        gradient_accumulation_steps=1,
        num_iterations=1,
        beta=0.0,
        loss_type="grpo",
        scale_rewards="group",
        epsilon=0.2,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        **checkpointing,
        use_cpu=True,
        bf16=False,
        fp16=False,
        disable_dropout=True,
        max_steps=total_steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        log_completions=False,
        seed=spec["seed"],
        dataloader_num_workers=0,
    )
    clock = StepClock()
    trainer = TimedGRPOTrainer(
        model=model, reward_funcs=[reward_fn], args=args, train_dataset=dataset, processing_class=tokenizer,
        callbacks=[clock],
    )
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    trainer.train()
    if clock.checkpointing:
        raise RuntimeError("gradient checkpointing was on in the TRL arm; it must be off for a like-for-like comparison")
    _print_profile(clock.profile, "trl")
    if len(clock.marks) != total_steps + 1 or len(phases) != total_steps:
        raise RuntimeError(f"TRL ran {len(clock.marks) - 1} steps and {len(phases)} generations, expected {total_steps}")
    records = []
    for index in range(total_steps):
        step_s = clock.marks[index + 1] - clock.marks[index]
        records.append({
            "step_s": step_s,
            "cpu_s": clock.cpu_marks[index + 1] - clock.cpu_marks[index],
            "generate_s": phases[index]["generate_s"],
            "update_s": step_s - phases[index]["generate_s"],
            "diagnostics_s": None,
            "tokens": phases[index]["tokens"],
            "rows": phases[index]["rows"],
            "reward_mean": clock.rewards[index] if index < len(clock.rewards) else float("nan"),
        })
    return {"records": records, "threads_seen": clock.threads_seen, **_steps_summary(records, spec["warmup"])}


def worker_floor(spec: dict) -> dict:
    """No trainer: the model calls one step cannot avoid with this model code. Prefill plus one decode forward per
    completion token (KV cache, multinomial sampling, always the full length), then one forward and backward over
    prompt + completion with a plain policy-gradient loss, gradient clipping and an AdamW step."""
    import torch

    torch.set_num_threads(spec["threads"])
    from entrorl.modeling import left_pad, load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(spec["model_dir"])
    model = load_causal_lm(spec["model_dir"], dtype="float32")
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"])
    prompts = read_prompts(Path(spec["prompts"]))
    encoded = [tokenizer(row["prompt"])["input_ids"] for row in prompts]
    torch.manual_seed(spec["seed"])
    P, G, R = spec["prompts_per_step"], spec["group_size"], spec["max_new_tokens"]
    records = []
    for index in range(spec["warmup"] + spec["steps"]):
        started, started_cpu = time.perf_counter(), time.process_time()
        batch = [encoded[(index * P + i) % len(encoded)] for i in range(P) for _ in range(G)]
        input_ids, attention = left_pad(batch, tokenizer.pad_token_id)
        attention = attention.long()
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        model.eval()
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True, logits_to_keep=1)
            sampled, step_attention = [], attention
            for t in range(R):
                token = torch.multinomial(out.logits[:, -1].float().softmax(-1), 1)
                sampled.append(token)
                if t == R - 1:
                    break
                step_attention = torch.cat([step_attention, torch.ones_like(token)], dim=1)
                out = model(input_ids=token, attention_mask=step_attention, position_ids=positions[:, -1:] + t + 1,
                            past_key_values=out.past_key_values, use_cache=True)
        model.train()
        generated = time.perf_counter()
        completion = torch.cat(sampled, dim=1)
        full_attention = torch.cat([attention, torch.ones_like(completion)], dim=1)
        logits = model(input_ids=torch.cat([input_ids, completion], dim=1), attention_mask=full_attention,
                       position_ids=(full_attention.cumsum(-1) - 1).clamp(min=0), logits_to_keep=R + 1).logits[:, :-1]
        log_prob = logits.float().log_softmax(-1).gather(-1, completion[..., None]).squeeze(-1)
        advantages = torch.randn(len(batch), 1)
        loss = -(advantages * log_prob).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        finished = time.perf_counter()
        records.append({"step_s": finished - started, "cpu_s": time.process_time() - started_cpu, "generate_s": generated - started, "update_s": finished - generated,
                        "diagnostics_s": None, "tokens": completion.numel(), "rows": len(batch), "reward_mean": float("nan")})
    return {"records": records, "threads_seen": torch.get_num_threads(), **_steps_summary(records, spec["warmup"])}


def run_worker(spec: dict) -> int:
    try:
        worker = {"trl": worker_trl, "floor": worker_floor}.get(spec["arm"], worker_entrorl)
        result = worker(spec)
        result["ok"] = True
    except Exception as error:  # reported to the parent, which prints it
        import traceback

        result = {"ok": False, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# Parent side
# ----------------------------------------------------------------------------------------------


def _machine() -> dict:
    from importlib import metadata

    info = {"python": platform.python_version(), "cpus": os.cpu_count(), "cpu": platform.processor() or "unknown"}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    info["ram_gib"] = round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    for package in ("torch", "transformers", "trl", "entrorl"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    return info


def _trl_importable() -> tuple[bool, str]:
    probe = subprocess.run([sys.executable, "-c", "import trl; from trl import GRPOTrainer, GRPOConfig"],
                           capture_output=True, text=True)
    if probe.returncode == 0:
        return True, ""
    lines = probe.stderr.strip().splitlines()
    return False, lines[-1] if lines else f"exit status {probe.returncode}"


def _busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy (user, nice, system, irq, softirq, steal), from /proc/stat."""
    try:
        with open("/proc/stat") as handle:
            fields = handle.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(value) for value in fields[1:9]]
    busy = values[0] + values[1] + values[2] + values[5] + values[6] + values[7]
    return busy / os.sysconf("SC_CLK_TCK")


def _spawn(spec: dict, timeout: float) -> dict:
    """Run one arm in a fresh process; also measure how busy the rest of the machine was meanwhile."""
    import resource

    machine_before = _busy_cpu_seconds()
    own_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall_before = time.perf_counter()
    result = _spawn_worker(spec, timeout)
    wall = time.perf_counter() - wall_before
    own_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    machine_after = _busy_cpu_seconds()
    if machine_before is not None and machine_after is not None and wall > 0:
        own = (own_after.ru_utime + own_after.ru_stime) - (own_before.ru_utime + own_before.ru_stime)
        # CPUs kept busy by other processes while this arm ran (start-up included); ~0 on a quiet machine
        result["foreign_cpus"] = max(0.0, (machine_after - machine_before - own) / wall)
    return result


def _spawn_worker(spec: dict, timeout: float) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"]),
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "WANDB_DISABLED": "true", "DISABLE_MLFLOW_INTEGRATION": "TRUE"}
    try:
        process = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    if spec["profile"] and process.stderr:
        sys.stderr.write(process.stderr)
    for line in process.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = "\n".join(process.stderr.strip().splitlines()[-15:])
    return {"ok": False, "error": f"worker exited with status {process.returncode} without a result:\n{tail}"}


def _pooled(runs: list[dict], warmup: int) -> dict:
    """Statistics over the timed steps of every round of one arm. Medians, so that bursts of interference
    from the rest of the machine (other processes, a virtual machine's neighbours) do not decide the figure."""
    steps = [record for run in runs for record in run["records"][warmup:]]
    total = sum(r["step_s"] for r in steps)
    pooled = {
        "steps": len(steps),
        "steps_per_s": 1.0 / statistics.median(r["step_s"] for r in steps),
        "steps_per_s_mean": len(steps) / total,
        "tokens_per_s": statistics.median(r["tokens"] / r["step_s"] for r in steps),
        "mean_completion_length": sum(r["tokens"] for r in steps) / sum(r["rows"] for r in steps),
        "rounds": [run["steps_per_s"] for run in runs],
    }
    cpu = [r["cpu_s"] for r in steps if r.get("cpu_s") is not None]
    pooled["cpu_s"] = statistics.median(cpu) if cpu else None
    for phase in ("generate_s", "update_s", "diagnostics_s"):
        values = [r[phase] for r in steps if r.get(phase) is not None]
        pooled[phase] = statistics.median(values) if values else None
    diagnostics = [r["diagnostics_s"] / (r["step_s"] - r["diagnostics_s"]) for r in steps if r.get("diagnostics_s") is not None]
    pooled["diagnostics_share"] = statistics.median(diagnostics) if diagnostics else None
    return pooled


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value != value:
        return "nan"
    return f"{value:.{digits}f}"


def add_tiny_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """The batch, model and output options that bench_update.py and bench_lora_sampling.py share."""
    parser.add_argument("--max-new-tokens", type=int, default=32, help="max completion tokens (default 32)")
    parser.add_argument("--prompts-per-step", type=int, default=8, help="P (default 8)")
    parser.add_argument("--group-size", type=int, default=8, help="G (default 8)")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true", help="print the table in markdown")


def print_result(description: str, header: list[str], rows: list[list[str]], markdown: bool) -> None:
    """What was measured, on which machine, then the table (bench_update.py, bench_lora_sampling.py)."""
    machine = _machine()
    print(description)
    print(f"machine: {machine['cpu']}, {machine['cpus']} CPUs; python {machine['python']}, torch {machine['torch']}, "
          f"transformers {machine['transformers']}")
    print(("\n" if markdown else "") + _table(rows, header, markdown))


def _table(rows: list[list[str]], header: list[str], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def report(results: dict[str, list[dict]], args, machine: dict) -> str:
    out = []
    rows_per_step = args.prompts_per_step * args.group_size
    out.append(
        f"tiny Qwen2: hidden {args.hidden_size}, {args.num_layers} layers, {args.num_heads} heads "
        f"({args.num_kv_heads} KV), character vocabulary of {args.vocab_size}; "
        f"{args.prompts_per_step} prompts x {args.group_size} completions = {rows_per_step} rows per step, "
        f"max {args.max_new_tokens} completion tokens, temperature 1.0, lr {args.lr:g}, "
        f"{args.threads} torch thread(s); {args.warmup} warm-up + {args.steps} timed steps per arm in each of "
        f"{args.rounds} round(s); figures are medians over all timed steps"
    )
    out.append(
        f"machine: {machine['cpu']}, {machine['cpus']} CPUs, {machine.get('ram_gib', '?')} GiB RAM; python "
        f"{machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}, trl {machine['trl'] or '-'}"
    )
    fractions = sorted({run["measure_fraction"] for run in results.get("entrorl", []) if run.get("measure_fraction") is not None})
    if fractions:
        out.append("entrorl diagnostics: the post-update re-scoring covers "
                   + " / ".join(f"{fraction:g}" for fraction in fractions) + " of the rows (diagnostics.measure_fraction)")
    if getattr(args, "entrorl_set", None):
        out.append("entrorl config overrides: " + ", ".join(args.entrorl_set))
    foreign = [run["foreign_cpus"] for runs in results.values() for run in runs if run.get("foreign_cpus") is not None]
    if foreign:
        out.append(f"other processes kept {statistics.median(foreign):.2f} CPUs busy (median over arms and rounds; "
                   f"at most {max(foreign):.2f}) while the arms ran")
    out.append("")
    header = ["arm", "steps/s", "s/step", "CPU s/step", "completion tok/s", "mean completion len", "generate s", "update s",
              "diagnostics s", "steps/s (mean)", "rounds (steps/s)"]
    table_rows = []
    chosen = {}
    excluded = {}
    for arm in ARMS:
        runs = results.get(arm)
        if not runs:
            continue
        clean = [run for run in runs if run.get("foreign_cpus") is None or run["foreign_cpus"] <= args.max_foreign_cpus]
        if clean and len(clean) < len(runs):
            excluded[arm] = len(runs) - len(clean)
            runs = clean
        pooled = chosen[arm] = _pooled(runs, args.warmup)
        table_rows.append([
            arm, _fmt(pooled["steps_per_s"], 2), _fmt(1.0 / pooled["steps_per_s"], 3), _fmt(pooled["cpu_s"], 3),
            _fmt(pooled["tokens_per_s"], 0),
            _fmt(pooled["mean_completion_length"], 1), _fmt(pooled["generate_s"], 3), _fmt(pooled["update_s"], 3),
            _fmt(pooled["diagnostics_s"], 3), _fmt(pooled["steps_per_s_mean"], 2),
            ", ".join(_fmt(value, 2) for value in pooled["rounds"]),
        ])
    out.append(_table(table_rows, header, args.markdown))
    out.append("")
    bullet = "- " if args.markdown else ""
    if excluded:
        out.append(f"{bullet}left out of the table, as disturbed (other processes above {args.max_foreign_cpus:g} CPUs): "
                   + ", ".join(f"{count} round(s) of {arm}" for arm, count in excluded.items()))
    disturbed = [arm for arm in chosen if any(run.get("foreign_cpus", 0.0) > args.max_foreign_cpus for run in results[arm])
                 and arm not in excluded]
    if disturbed:
        out.append(f"{bullet}WARNING: every round of {', '.join(disturbed)} ran while other processes were busy; "
                   "these figures are disturbed")
    if "trl" in chosen:
        for arm in ("entrorl", "entrorl-nodiag"):
            if arm not in chosen:
                continue
            steps = chosen[arm]["steps_per_s"] / chosen["trl"]["steps_per_s"]
            tokens = chosen[arm]["tokens_per_s"] / chosen["trl"]["tokens_per_s"]
            mean = chosen[arm]["steps_per_s_mean"] / chosen["trl"]["steps_per_s_mean"]
            cpu = (f", {chosen['trl']['cpu_s'] / chosen[arm]['cpu_s']:.2f}x on CPU time per step"
                   if chosen[arm]["cpu_s"] and chosen["trl"]["cpu_s"] else "")
            out.append(f"{bullet}{arm} / trl: {steps:.2f}x steps/s ({mean:.2f}x on mean step times{cpu}), {tokens:.2f}x "
                       f"completion tokens/s (goal >= 2x: {'met' if steps >= 2.0 else 'NOT met'})")
    if "floor" in chosen:
        floor = chosen["floor"]
        parts = [f"{arm} {floor['steps_per_s'] / chosen[arm]['steps_per_s']:.2f}x"
                 for arm in ("entrorl", "entrorl-nodiag", "trl") if arm in chosen]
        if parts:
            out.append(f"{bullet}step time against the bare-model floor (median step / floor's median step; the floor "
                       f"always generates the full length): {', '.join(parts)}")
    if "entrorl" in chosen and "entrorl-nodiag" in chosen:
        on, off = chosen["entrorl"], chosen["entrorl-nodiag"]
        overhead = off["steps_per_s"] / on["steps_per_s"] - 1.0
        cpu = (f"; {100 * (on['cpu_s'] / off['cpu_s'] - 1.0):+.1f}% on CPU time per step"
               if on["cpu_s"] and off["cpu_s"] else "")
        out.append(f"{bullet}diagnostics overhead, arm against arm (measure_entropy_change on vs off, median step times): "
                   f"{100 * overhead:+.1f}% (goal < 10%: {'met' if overhead < 0.10 else 'NOT met'}){cpu}")
    if "entrorl" in chosen:
        share = chosen["entrorl"]["diagnostics_share"]
        out.append(f"{bullet}diagnostics overhead, within each step (diagnostics phase / rest of the same step, median "
                   f"over steps): {100 * share:+.1f}% (goal < 10%: {'met' if share < 0.10 else 'NOT met'})")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per arm and round (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="times every arm is run, interleaved (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every arm (default 1)")
    parser.add_argument("--prompts-per-step", type=int, default=8, help="P, prompts per step (default 8)")
    parser.add_argument("--group-size", type=int, default=8, help="G, completions per prompt (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="max completion tokens (default 32)")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure-fraction", type=float, default=None,
                        help="entrorl's diagnostics.measure_fraction, the share of rows re-scored after the update "
                        "(default: the config's default)")
    parser.add_argument("--entrorl-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for the entrorl arms, as `entrorl train --set` takes it "
                        "(repeatable; e.g. retain_freed_memory=false to measure that setting)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="which arms to run (default: all)")
    parser.add_argument("--skip-trl", action="store_true", help="do not run TRL (skipped anyway when it is not importable)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, 1 warm-up + 2 timed steps, 1 round")
    parser.add_argument("--markdown", action="store_true", help="print the table in markdown")
    parser.add_argument("--json", metavar="FILE", help="also write every raw measurement to FILE")
    parser.add_argument("--profile", action="store_true", help="cProfile the timed steps of every arm (printed to stderr)")
    parser.add_argument("--max-foreign-cpus", type=float, default=0.25,
                        help="leave out of the table the rounds of an arm during which other processes kept more than "
                        "this many CPUs busy (default 0.25; all rounds are kept when none is below)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed to one worker (default 1800)")
    parser.add_argument("--from-json", metavar="FILE", help="print the report of an earlier run's --json FILE (runs nothing)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        return run_worker(json.loads(args.worker))
    if args.from_json:
        payload = json.loads(Path(args.from_json).read_text())
        saved = argparse.Namespace(**{**payload["args"], "markdown": args.markdown, "max_foreign_cpus": args.max_foreign_cpus})
        print(report(payload["results"], saved, payload["machine"]))
        return 0
    if args.quick:
        args.steps, args.warmup, args.rounds = 2, 1, 1
        args.prompts_per_step, args.group_size, args.max_new_tokens = 2, 4, 8
        args.hidden_size, args.num_heads, args.num_kv_heads = 32, 4, 2
    if min(args.steps, args.rounds, args.threads) < 1 or args.warmup < 0:
        parser.error("--steps, --rounds and --threads must be >= 1 and --warmup >= 0")
    if args.group_size < 2:
        parser.error("--group-size must be >= 2 (GRPO needs groups)")
    if min(args.prompts_per_step, args.max_new_tokens) < 1 or not args.timeout > 0:  # not: NaN fails too
        parser.error("--prompts-per-step and --max-new-tokens must be >= 1 and --timeout > 0")
    if args.measure_fraction is not None and not 0 < args.measure_fraction <= 1:
        parser.error("--measure-fraction must be in (0, 1]")
    shaping = [item for item in args.entrorl_set if item.split("=", 1)[0].strip() in _BATCH_SHAPE_KEYS | {"rollout"}]
    if shaping:
        parser.error(f"--entrorl-set {', '.join(shaping)}: the arms are compared on one batch shape and sampling; use "
                     "--prompts-per-step, --group-size or --max-new-tokens, which set every arm's")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        parser.error(f"--json {args.json}: the folder {Path(args.json).resolve().parent} does not exist")

    arms = list(args.arms)
    if "trl" in arms:
        if args.skip_trl:
            arms.remove("trl")
        else:
            ok, reason = _trl_importable()
            if not ok:
                print(f"note: TRL is not importable ({reason}); skipping the TRL arm. "
                      "Install it with: pip install -e \".[bench]\"", file=sys.stderr)
                arms.remove("trl")

    from transformers.utils import logging as hf_logging

    from entrorl.lab.tiny_model import DEFAULT_ALPHABET, SPECIAL_TOKENS, save_tiny_model

    hf_logging.disable_progress_bar()

    args.vocab_size = len(SPECIAL_TOKENS) + len(dict.fromkeys(DEFAULT_ALPHABET))
    machine = _machine()
    results: dict[str, list[dict]] = {}
    failures: list[str] = []
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as work:
        work_dir = Path(work)
        model_dir = save_tiny_model(
            work_dir / "model", seed=args.seed, hidden_size=args.hidden_size, num_layers=args.num_layers,
            num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
            max_position_embeddings=max(64, 2 * (8 + args.max_new_tokens)),
        )
        prompts = work_dir / "prompts.jsonl"
        # enough distinct prompts that no arm wraps around an epoch inside its run
        write_prompts(prompts, max(256, 2 * args.prompts_per_step * (args.warmup + args.steps)), args.seed)
        try:
            _run_rounds(args, arms, model_dir, prompts, work_dir, results, failures)
        except KeyboardInterrupt:
            interrupted = True
            print(f"interrupted: reporting the {sum(map(len, results.values()))} finished measurement(s)", file=sys.stderr)

    if results:
        print(report(results, args, machine))
    if args.json:
        payload = {"machine": machine, "args": {k: v for k, v in vars(args).items() if k != "worker"}, "results": results}
        Path(args.json).write_text(json.dumps(payload, indent=1))
    if interrupted:
        return 130
    return 1 if failures or not results else 0


def _run_rounds(args, arms, model_dir, prompts, work_dir, results: dict[str, list[dict]], failures: list[str]) -> None:
    """Every arm once per round, each in its own worker: its measurement into ``results``, a failure into
    ``failures``; progress on stderr."""
    for round_index in range(args.rounds):
        for arm in arms:
            spec = {
                "arm": arm, "round": round_index, "model_dir": str(model_dir), "prompts": str(prompts),
                "work_dir": str(work_dir), "threads": args.threads, "seed": args.seed, "lr": args.lr,
                "prompts_per_step": args.prompts_per_step, "group_size": args.group_size,
                "max_new_tokens": args.max_new_tokens, "warmup": args.warmup, "steps": args.steps,
                "profile": args.profile, "measure_fraction": args.measure_fraction,
                "entrorl_set": args.entrorl_set,
            }
            started = time.perf_counter()
            result = _spawn(spec, args.timeout)
            if not result.get("ok"):
                failures.append(f"{arm} round {round_index + 1}")
                print(f"[round {round_index + 1}/{args.rounds}] {arm}: FAILED: {result.get('error')}", file=sys.stderr)
                if result.get("traceback"):
                    print(result["traceback"], file=sys.stderr)
                continue
            if result.get("threads_seen") != args.threads:
                print(f"warning: {arm} ran with {result.get('threads_seen')} torch threads, not {args.threads}",
                      file=sys.stderr)
            results.setdefault(arm, []).append(result)
            foreign = result.get("foreign_cpus")
            print(f"[round {round_index + 1}/{args.rounds}] {arm}: {result['steps_per_s']:.2f} steps/s, "
                  f"{result['tokens_per_s']:.0f} completion tok/s, mean length {result['mean_completion_length']:.1f} "
                  f"({time.perf_counter() - started:.0f} s with start-up"
                  + (f"; other processes kept {foreign:.2f} CPUs busy meanwhile" if foreign is not None else "") + ")",
                  file=sys.stderr, flush=True)
            if foreign is not None and foreign > args.max_foreign_cpus:
                print(f"warning: other processes used {foreign:.2f} CPUs while {arm} ran; its timings are disturbed",
                      file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
