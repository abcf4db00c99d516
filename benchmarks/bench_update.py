#!/usr/bin/env python
"""What each setting of the trainer's update phase is worth, measured side by side.

The update phase of one training step, as ``Trainer.train_step`` runs it on-policy: score the rollouts under the
policy (``bucketed_response_token_stats`` with the trainer's statistics), the ``grpo`` objective, backward,
gradient clipping at 1.0, one AdamW step. On ``bench_trainer.py``'s tiny model (random-init Qwen2, character
vocabulary) and batch shape: ``P`` prompts ``"a+b="`` times ``G`` responses sampled from the model itself at
temperature 1 (so the lengths are the ones the trainer sees), rewards drawn at random, GRPO advantages.

Three settings:

* ``share_prompts``: ``optim.share_prompts`` off / on (each prompt run once per group instead of once per row);
* ``adamw``: torch's AdamW looping over the parameters, or its fused kernel (what the trainer uses on CPU / CUDA);
* ``allocator``: glibc's defaults, or ``retain_freed_memory()`` (``retain_freed_memory: true``; the default when training on the CPU).

The first two are switched step by step inside one process, in turn, so that a slow period of the machine slows
every variant alike. The allocator cannot be put back to glibc's (self-adjusting) defaults inside a process, so
each worker process runs one allocator setting, workers alternate between the two (``--rounds`` each), and every
worker times all the in-process variants. Reported: the median time of each variant over all its timed steps, and
its speed-up over the plain one (defaults, no sharing, looped AdamW), and the median of its steps' minor page
faults (pages of memory the step touched for the first time, each one zeroed by the kernel). The model's weights change with every step
(a real update at lr 1e-4), the rollouts stay fixed.

    python benchmarks/bench_update.py                       # 32 completion tokens
    python benchmarks/bench_update.py --max-new-tokens 128 --markdown
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_trainer import add_tiny_batch_arguments, print_result, read_prompts, write_prompts

RESULT_PREFIX = "@@RESULT@@ "
ALLOCATORS = ("glibc defaults", "retain_freed_memory")


def run_worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["allocator"] == "retain_freed_memory":
        from entrorl.trainer.allocator import retain_freed_memory

        if not retain_freed_memory():
            raise SystemExit("retain_freed_memory() had no effect here (not glibc?)")
    from entrorl.advantages import compute_advantages
    from entrorl.modeling import bucketed_response_token_stats, load_causal_lm, load_tokenizer
    from entrorl.objective import PolicyBatch, build_objective
    from entrorl.rollout import HFSampler, SamplingParams

    torch.manual_seed(spec["seed"])
    model = load_causal_lm(spec["model_dir"]).train()
    tokenizer = load_tokenizer(spec["model_dir"])
    records = read_prompts(Path(spec["prompts"]))[: spec["prompts_per_step"]]
    prompts = [tokenizer(record["prompt"])["input_ids"] for record in records for _ in range(spec["group_size"])]
    sampler = HFSampler.for_model(model, tokenizer)
    rollouts = sampler.generate(prompts, SamplingParams(max_new_tokens=spec["max_new_tokens"], temperature=1.0))
    rewards = torch.rand(len(prompts))
    group_ids = torch.arange(len(prompts)) // spec["group_size"]
    advantages = compute_advantages("grpo", rewards, group_ids)
    mask = rollouts.response_mask
    token_advantages = advantages[:, None] * mask
    objective = build_objective("grpo")
    optimizers = {
        "loop": torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False),
        "fused": torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True),
    }

    def update(share_prompts: bool, adamw: str) -> tuple[float, int]:
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        optimizer = optimizers[adamw]
        optimizer.zero_grad(set_to_none=True)
        stats = bucketed_response_token_stats(
            model, rollouts.prompt_ids, rollouts.prompt_mask, rollouts.response_ids, mask,
            need=("logprob", "entropy", "disc", "disc_centered"), share_prompts=share_prompts,
        )
        batch = PolicyBatch(log_prob=stats.logprob, old_log_prob=stats.logprob.detach(), advantages=token_advantages,
                            mask=mask, entropy=stats.entropy, disc=stats.disc, disc_centered=stats.disc_centered,
                            rollout_log_prob=rollouts.sampler_log_probs)
        objective(batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before

    variants = [(share, adamw) for share in (False, True) for adamw in ("loop", "fused")]
    times: dict[str, list[float]] = {f"{share}/{adamw}": [] for share, adamw in variants}
    faults: dict[str, list[int]] = {f"{share}/{adamw}": [] for share, adamw in variants}
    for step in range(spec["warmup"] + spec["steps"]):
        for share, adamw in variants:
            elapsed, step_faults = update(share, adamw)
            if step >= spec["warmup"]:
                times[f"{share}/{adamw}"].append(elapsed)
                faults[f"{share}/{adamw}"].append(step_faults)
    return {"times": times, "faults": faults, "rows": len(prompts), "mean_length": float(rollouts.lengths.float().mean()),
            "prompt_tokens": int(rollouts.prompt_mask.sum()), "response_tokens": int(mask.sum())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_tiny_batch_arguments(parser)
    parser.add_argument("--rounds", type=int, default=3, help="worker processes per allocator setting (default 3)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps of every variant per worker (default 15)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of every variant per worker (default 3)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return 0
    if min(args.rounds, args.steps, args.threads, args.group_size) < 1 or args.warmup < 0:
        parser.error("--rounds, --steps, --threads and --group-size must be >= 1, --warmup >= 0")

    from transformers.utils import logging as hf_logging

    from entrorl.lab.tiny_model import save_tiny_model

    hf_logging.disable_progress_bar()

    results: dict[str, dict[str, list[float]]] = {allocator: {} for allocator in ALLOCATORS}
    faults: dict[str, dict[str, list[int]]] = {allocator: {} for allocator in ALLOCATORS}
    shape = None
    with tempfile.TemporaryDirectory(prefix="bench_update_") as work:
        work_dir = Path(work)
        model_dir = save_tiny_model(work_dir / "model", seed=args.seed, hidden_size=args.hidden_size,
                                    num_layers=args.num_layers, num_heads=4, num_kv_heads=2,
                                    max_position_embeddings=max(64, 2 * (8 + args.max_new_tokens)))
        prompts = work_dir / "prompts.jsonl"
        write_prompts(prompts, args.prompts_per_step, args.seed)
        for round_index in range(args.rounds):
            for allocator in ALLOCATORS:
                spec = {"allocator": allocator, "model_dir": str(model_dir), "prompts": str(prompts), "seed": args.seed,
                        "threads": args.threads, "prompts_per_step": args.prompts_per_step, "group_size": args.group_size,
                        "max_new_tokens": args.max_new_tokens, "steps": args.steps, "warmup": args.warmup}
                done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                                      text=True, timeout=1800)
                lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
                if done.returncode != 0 or not lines:
                    print(done.stderr[-3000:], file=sys.stderr)
                    print(f"worker ({allocator}, round {round_index + 1}) failed with status {done.returncode}", file=sys.stderr)
                    return 1
                result = json.loads(lines[-1][len(RESULT_PREFIX):])
                shape = {key: result[key] for key in ("rows", "mean_length", "prompt_tokens", "response_tokens")}
                for variant, values in result["times"].items():
                    results[allocator].setdefault(variant, []).extend(values)
                    faults[allocator].setdefault(variant, []).extend(result["faults"][variant])
                print(f"[round {round_index + 1}/{args.rounds}] {allocator}: done", file=sys.stderr)

    rows = []
    plain = statistics.median(results[ALLOCATORS[0]]["False/loop"])
    for allocator in ALLOCATORS:
        for variant, values in results[allocator].items():
            share, adamw = variant.split("/")
            median = statistics.median(values)
            rows.append([allocator, "on" if share == "True" else "off", adamw, f"{1000 * median:.1f}", f"{plain / median:.2f}x",
                         f"{statistics.median(faults[allocator][variant]):.0f}", str(len(values))])
    header = ["allocator", "share_prompts", "AdamW", "update ms (median)", "speed-up", "page faults (median)", "timed steps"]
    print_result(f"update phase of one step: {shape['rows']} rows ({args.prompts_per_step} prompts x {args.group_size}), "
                 f"{shape['prompt_tokens']} prompt + {shape['response_tokens']} response tokens (mean response "
                 f"{shape['mean_length']:.1f}, at most {args.max_new_tokens}); tiny Qwen2 hidden {args.hidden_size}, "
                 f"{args.num_layers} layers; {args.threads} torch thread(s); {args.rounds} worker(s) per allocator setting",
                 header, rows, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
