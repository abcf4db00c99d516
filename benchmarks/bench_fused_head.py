#!/usr/bin/env python
"""Time and peak memory of the statistics of a model's output layer, from its final hidden states ``[N, D]`` and head
``[V, D]``, three ways, side by side in one run:

* ``dense``      -- ``logits = hidden @ W^T`` built whole, then ``entrorl.tokens.token_stats`` (chunked over rows);
* ``fused``      -- ``token_stats_from_hidden`` as the trainer calls it: tiles of 1024 rows by 4096 head columns, the
  softmax normaliser carried across a row's tiles, so no ``[N, V]`` tensor exists and the head is read once per 1024
  rows in each direction;
* ``fused-rows`` -- ``token_stats_from_hidden`` with one tile spanning the whole head (``vocab_chunk_size = V``) and
  the rows per chunk that keep a chunk near 4M elements (27 at V = 152k): chunking by rows alone, which reads the whole
  head again for every chunk of rows.

Directions: ``fwd+bwd`` (``loss = sum(logprob * g1 + entropy * g2)``, gradients of hidden and head: a training step)
and ``fwd`` (under ``torch.no_grad()``: scoring rollouts).

Each arm and direction runs in its own subprocess, so that one cannot inherit another's memory. Time: the median of
``--repeats`` calls after one untimed call; "x dense" is that median over the dense arm's, same direction. Memory:
"extra peak" is the worker's peak resident set size (``VmHWM``, reset once the inputs exist) above its resident set
size at that moment, over every call: the gradients of hidden and head are part of it for every arm, and for ``dense``
the ``[N, V]`` logits and their gradient too. Every worker checks its
log-probs and entropies on the first 64 rows against a float64 computation, and the script exits with status 1 if one
is off.

``python benchmarks/bench_fused_head.py --help`` for the options; ``--quick`` is a smoke test (N = 256, V = 8192, D = 64).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_token_stats import (  # noqa: E402  (the sibling script's process helpers)
    RESULT_PREFIX,
    _load_average,
    _machine_description,
    _peak_bytes,
    _render,
    _reset_peak,
    _rss_bytes,
    _spawn,
)

ARMS = ("dense", "fused", "fused-rows")
DIRECTIONS = ("fwd+bwd", "fwd")
DTYPES = ("float32", "bfloat16")
CHECKED_ROWS = 64
MIB = 1 << 20


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text}")
    return value


def _statistics(arm: str, hidden, weight, targets):
    from entrorl.tokens import default_chunk_size, token_stats, token_stats_from_hidden

    if arm == "dense":
        import torch

        return token_stats(torch.nn.functional.linear(hidden, weight), targets)
    if arm == "fused":
        return token_stats_from_hidden(hidden, weight, targets)
    vocab = weight.shape[0]
    return token_stats_from_hidden(hidden, weight, targets, vocab_chunk_size=vocab, chunk_size=default_chunk_size(vocab))


def _worker(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    generator = torch.Generator().manual_seed(spec["seed"])
    dtype = getattr(torch, spec["dtype"])
    tokens, vocab, hidden_size = spec["tokens"], spec["vocab"], spec["hidden"]
    hidden = torch.randn(tokens, hidden_size, generator=generator).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=generator) * hidden_size ** -0.5 * 2).to(dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    weights = torch.randn(2, tokens, generator=generator)
    backward = spec["direction"] == "fwd+bwd"
    hidden.requires_grad_(backward)
    weight.requires_grad_(backward)

    def call():
        hidden.grad = weight.grad = None
        with torch.set_grad_enabled(backward):
            stats = _statistics(spec["arm"], hidden, weight, targets)
            if backward:
                (stats.logprob * weights[0] + stats.entropy * weights[1]).sum().backward()
        return stats

    with torch.no_grad():  # the float64 reference, before the measured window (the head in float64 is 1 GiB at 152k)
        logits = torch.nn.functional.linear(hidden[:CHECKED_ROWS].detach().double(), weight.detach().double())
        log_probs = torch.log_softmax(logits, dim=-1)
        reference_logprob = log_probs.gather(-1, targets[:CHECKED_ROWS, None]).squeeze(-1)
        reference_entropy = -(log_probs.exp() * log_probs).sum(-1)
        del logits, log_probs
    # the peak is measured from the first call on: memory freed by one call stays in the process for the next
    baseline = _rss_bytes()
    exact_peak = _reset_peak()
    stats = call()  # untimed: first touches of the pages, lazy initialisations
    differences = torch.cat([stats.logprob[:CHECKED_ROWS].detach().double() - reference_logprob,
                             stats.entropy[:CHECKED_ROWS].detach().double() - reference_entropy])
    error = float(differences.abs().max())  # NaN when any statistic is NaN
    del stats
    times = []
    for _ in range(spec["repeats"]):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return {"spec": spec, "status": "ok", "median_s": statistics.median(times), "times_s": times,
            "extra_peak_mib": (_peak_bytes() - baseline) / MIB if exact_peak else None, "max_error": error}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=_positive, nargs="+", default=[32000, 151936], help="head sizes V (default: 32000 151936)")
    parser.add_argument("--hidden", type=_positive, default=896, help="hidden size D (default 896, Qwen2.5-0.5B's)")
    parser.add_argument("--tokens", type=_positive, default=2048, help="rows N (response tokens of a micro-batch; default 2048)")
    parser.add_argument("--dtype", choices=DTYPES, nargs="+", default=["float32"], help="dtypes of hidden and head")
    parser.add_argument("--arms", choices=ARMS, nargs="+", default=list(ARMS))
    parser.add_argument("--direction", choices=DIRECTIONS, nargs="+", default=list(DIRECTIONS))
    parser.add_argument("--repeats", type=_positive, default=3, help="timed calls per arm (default 3)")
    parser.add_argument("--threads", type=_positive, default=None, help="torch threads in each worker (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=_positive_seconds, default=1800.0,
                        help="seconds allowed to one worker (default 1800)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: N=256, V=8192, D=64, one repeat (in place of --vocab, --hidden, --tokens, "
                             "--repeats)")
    parser.add_argument("--markdown", action="store_true", help="print the table in markdown")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(_worker(json.loads(args.worker))), flush=True)
        return 0
    if args.quick:
        args.vocab, args.hidden, args.tokens, args.repeats = [8192], 64, 256, 1
    machine = _machine_description()
    print(f"# {machine['cpu']}, {machine['logical_cpus']} logical CPUs, {machine['memory_gib']} GiB; "
          f"load average {_load_average()}; N = {args.tokens}, D = {args.hidden}", flush=True)
    header = ["V", "dtype", "direction", "arm", "median s", "x dense", "extra peak MiB", "max error"]
    rows, failed = [], False
    try:
        for vocab in args.vocab:
            for dtype in args.dtype:
                for direction in args.direction:
                    dense = {}
                    for arm in args.arms:
                        spec = {"arm": arm, "direction": direction, "dtype": dtype, "vocab": vocab, "hidden": args.hidden,
                                "tokens": args.tokens, "repeats": args.repeats, "seed": args.seed, "threads": args.threads,
                                "mode": "bench"}
                        result = _run_worker(spec, args.timeout)
                        ok = result.get("status") == "ok"
                        print(f"  V={vocab} {dtype} {direction} {arm}: "
                              + (f"{result['median_s']:.3f} s" if ok else result.get("status", "?")),
                              file=sys.stderr, flush=True)
                        if arm == "dense":
                            dense = result
                        tolerance = 1e-3 if dtype == "float32" else 5e-2
                        if not ok or not result["max_error"] <= tolerance:  # a NaN error fails too
                            failed = True
                        ratio = (f"{result['median_s'] / dense['median_s']:.2f}x"
                                 if ok and dense.get("status") == "ok" else "-")
                        peak = result.get("extra_peak_mib")
                        rows.append([str(vocab), dtype, direction, arm,
                                     f"{result['median_s']:.3f}" if ok else result.get("status", "?"), ratio,
                                     "-" if peak is None else f"{peak:.0f}",
                                     f"{result['max_error']:.1e}" if ok else "-"])
    except KeyboardInterrupt:
        print("interrupted: the rows measured so far follow", file=sys.stderr)
        print(_render(rows, header, args.markdown))
        return 130
    print(_render(rows, header, args.markdown))
    if failed:
        print("an arm failed or its statistics are off from float64 (see `max error`)", file=sys.stderr)
    return 1 if failed else 0


def _run_worker(spec: dict, timeout: float) -> dict:
    """``spec`` measured in a fresh Python process running this script."""
    return _spawn(spec, timeout, script=__file__)


if __name__ == "__main__":
    sys.exit(main())
