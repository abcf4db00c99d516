#!/usr/bin/env python
"""What LoRA adapters cost the rollouts, measured side by side.

``bench_trainer.py``'s tiny model (random-init Qwen2, character vocabulary) samples ``P x G`` responses of up to
``--max-new-tokens`` tokens to the prompts ``"a+b="``, at temperature 1, with ``HFSampler``, in three arms run in
turn within each round (so that a slow period of the machine slows every arm alike):

* ``base``: the model alone, on entrorl's static-cache decoder;
* ``lora, static cache``: the same model with LoRA adapters on every linear layer but the output
  (``entrorl.trainer.adapters.LoraAdapter``, B random so that the adapters change the model), on the static-cache
  decoder, which adds each adapter's ``scale * B A x`` itself;
* ``lora, transformers``: the same adapted model on the sampler's other decoder, the model's own forward with
  transformers' ``DynamicCache``, which is what an adapted model ran on before the static-cache decoder took adapters.

Reported: the median seconds per ``generate`` call of each arm over the rounds, and its ratio to the base arm.

    python benchmarks/bench_lora_sampling.py --markdown
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from bench_trainer import add_tiny_batch_arguments, print_result, read_prompts, write_prompts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_tiny_batch_arguments(parser)
    parser.add_argument("--rank", type=int, default=16, help="the adapters' rank (default 16)")
    parser.add_argument("--rounds", type=int, default=15, help="generate calls per arm (default 15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per arm first (default 2)")
    args = parser.parse_args(argv)
    if min(args.rounds, args.threads, args.group_size, args.rank, args.max_new_tokens) < 1 or args.warmup < 0:
        parser.error("--rounds, --threads, --group-size, --rank and --max-new-tokens must be >= 1, --warmup >= 0")

    import torch
    from transformers.utils import logging as hf_logging

    from entrorl.lab.tiny_model import save_tiny_model
    from entrorl.modeling import load_causal_lm, load_tokenizer
    from entrorl.rollout import HFSampler, SamplingParams
    from entrorl.trainer.adapters import LoraAdapter

    hf_logging.disable_progress_bar()
    warnings.simplefilter("ignore", FutureWarning)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as work:
        work_dir = Path(work)
        model_dir = save_tiny_model(work_dir / "model", seed=args.seed, hidden_size=args.hidden_size,
                                    num_layers=args.num_layers, num_heads=4, num_kv_heads=2,
                                    max_position_embeddings=max(64, 2 * (8 + args.max_new_tokens)))
        write_prompts(work_dir / "prompts.jsonl", args.prompts_per_step, args.seed)
        tokenizer = load_tokenizer(model_dir)
        records = read_prompts(work_dir / "prompts.jsonl")[: args.prompts_per_step]
        prompts = [tokenizer(record["prompt"])["input_ids"] for record in records for _ in range(args.group_size)]
        base = load_causal_lm(model_dir)
        adapted = load_causal_lm(model_dir)
        torch.manual_seed(args.seed)  # peft draws A at random, and B is drawn below
        adapter = LoraAdapter(adapted, rank=args.rank, alpha=2.0 * args.rank)
        with torch.no_grad():
            for name, parameter in adapted.named_parameters():
                if ".lora_B." in name:
                    parameter.normal_(std=0.02)
        arms = {
            "base": HFSampler.for_model(base, tokenizer, decoder="auto"),
            "lora, static cache": HFSampler.for_model(adapted, tokenizer, decoder="static_cache"),
            "lora, transformers": HFSampler.for_model(adapted, tokenizer, decoder="transformers"),
        }
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0)
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        tokens: dict[str, list[int]] = {arm: [] for arm in arms}
        for round_index in range(args.warmup + args.rounds):
            for arm, sampler in arms.items():
                torch.manual_seed(args.seed + round_index)
                started = time.perf_counter()
                rollouts = sampler.generate(prompts, params)
                elapsed = time.perf_counter() - started
                if round_index >= args.warmup:
                    times[arm].append(elapsed)
                    tokens[arm].append(int(rollouts.response_mask.sum()))

    plain = statistics.median(times["base"])
    header = ["arm", "generate s (median)", "relative to base", "response tokens (mean)", "calls"]
    rows = [[arm, f"{statistics.median(values):.4f}", f"{statistics.median(values) / plain:.2f}x",
             f"{statistics.mean(tokens[arm]):.0f}", str(len(values))] for arm, values in times.items()]
    print_result(f"{len(prompts)} rows ({args.prompts_per_step} prompts x {args.group_size}), at most "
                 f"{args.max_new_tokens} new tokens; tiny Qwen2 hidden {args.hidden_size}, {args.num_layers} layers; LoRA "
                 f"rank {args.rank} on every linear layer but the output ({adapter.trainable_parameters():,} parameters); "
                 f"{args.threads} torch thread(s)", header, rows, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
