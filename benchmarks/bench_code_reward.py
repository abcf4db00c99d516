#!/usr/bin/env python
"""How fast the ``code`` reward scores a batch, one sample at a time against several at once.

A batch of ``--samples`` completions, a mix of what a policy writes for a standard-input problem (a correct program,
a wrong one, one that sorts 200,000 numbers before answering, one that raises, one without a fenced block), each
against three test cases, is scored by ``RewardRunner`` with the reward's ``workers`` option set to each value of
``--workers`` in turn within every round (so that a slow period of the machine slows every arm alike). Each sample
runs in its own sandbox with the default limits.

Reported: the median seconds per batch of each arm over the rounds, its samples per second and its speed-up over
``workers=1``; the verdicts of every arm are checked to be the same as those of ``workers=1``.

    python benchmarks/bench_code_reward.py --markdown
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from bench_trainer import print_result

_PROGRAMS = [
    "a, b = map(int, input().split())\nprint(a + b)",
    "a, b = map(int, input().split())\nprint(a - b)",
    "import random\nrandom.seed(0)\nxs = sorted(random.random() for _ in range(200_000))\n"
    "a, b = map(int, input().split())\nprint(a + b)",
    "raise ValueError('no idea')",
]
_TESTS = {"cases": [{"input": f"{i} {2 * i}\n", "output": f"{3 * i}\n"} for i in range(3)]}


def _batch(samples: int) -> list[str]:
    completions = [f"Here is the program.\n```python\n{program}\n```" for program in _PROGRAMS]
    completions.append("I cannot solve this.")
    return [completions[i % len(completions)] for i in range(samples)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=64, help="completions per batch (default 64)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="the workers of each arm (default 1 2 4 8; 1 is the reference and always runs)")
    parser.add_argument("--rounds", type=int, default=3, help="batches per arm (default 3)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    if min(args.samples, args.rounds, *args.workers) < 1:
        parser.error("--samples, --rounds and every --workers value must be >= 1")

    from entrorl.rewards import RewardRunner, get_reward

    arms = sorted({1, *args.workers})
    runners = {workers: RewardRunner(get_reward("code", workers=workers)) for workers in arms}
    completions = _batch(args.samples)
    prompts, answers = ["add two numbers"] * args.samples, [_TESTS] * args.samples
    seconds: dict[int, list[float]] = {workers: [] for workers in arms}
    verdicts: dict[int, list[float]] = {}
    runners[1](prompts[:2], completions[:2], answers[:2])  # the interpreter check and imports, untimed
    for round_index in range(args.rounds):
        for workers in arms:
            started = time.perf_counter()
            result = runners[workers](prompts, completions, answers)
            seconds[workers].append(time.perf_counter() - started)
            verdicts[workers] = result.scores.tolist()
            if verdicts[workers] != verdicts[1]:  # workers=1 ran first in this round
                print(f"workers={workers} scored the batch differently from workers=1", file=sys.stderr)
                return 1
            if result.errors:
                print(f"workers={workers}: {result.errors} samples failed: {result.first_error}", file=sys.stderr)
                return 1
        print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
            f"workers={workers} {seconds[workers][-1]:.2f} s" for workers in arms), file=sys.stderr)

    reference = statistics.median(seconds[1])
    rows = []
    for workers in arms:
        median = statistics.median(seconds[workers])
        rows.append([str(workers), f"{median:.2f}", f"{args.samples / median:.1f}", f"{reference / median:.2f}x"])
    print_result(
        f"code reward: {args.samples} samples x 3 stdin cases per batch, {args.rounds} round(s), medians",
        ["workers", "s per batch", "samples/s", "speed-up"], rows, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
