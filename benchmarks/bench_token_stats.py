#!/usr/bin/env python
"""Time and peak memory of ``entrorl.tokens.token_stats`` against other ways of getting per-token
log-probs and entropies from logits ``[N, V]``, side by side in one run.

Implementations (each timed in its own fresh subprocess, so one cannot inherit another's memory):

* ``logsumexp`` -- ``torch.logsumexp(logits, -1)`` once: the time baseline (one reduction pass).
* ``entrorl``   -- ``token_stats(logits, targets)`` (chunked forward, recomputing backward).
* ``naive``     -- ``lp = log_softmax(logits.float(), -1)``; ``lp.gather(...)``; ``-(lp.exp() * lp).sum(-1)``.
* ``trl``       -- ``trl.trainer.utils.selective_log_softmax`` + ``entropy_from_logits`` (when installed).
* ``verl``      -- ``verl.utils.torch_functional.logprobs_from_logits`` +
  ``entropy_from_logits_with_chunking`` (when installed).

Directions: ``fwd`` (log-prob and entropy under ``torch.no_grad()``) and ``fwd+bwd``
(``loss = sum(logprob * g1 + entropy * g2)`` with fixed random ``g1, g2``, then the gradient
with respect to the logits).

Time: the median of ``--repeats`` timed calls after ``--warmup`` untimed ones, as wall time and as
CPU time of the worker (user + system, all threads). Each timed call is preceded, in the same
worker, by one ``torch.logsumexp`` pass over the same logits, and "x logsumexp" is the median of
the per-call ratios: both sides of the ratio ran under the same load, which matters on a machine
shared with other jobs (``--threads 1`` steadies the figures further there). "fresh pages" counts
the minor page faults of a call (memory touched for the first time), which on some machines is a
large part of the time.

Memory: "extra peak" is the peak resident set size of the worker (``VmHWM``, reset through
``/proc/self/clear_refs`` once the inputs exist; ``ru_maxrss`` where that is not possible) minus
the resident set size right after the logits, targets and ``g1, g2`` were allocated and written.
For ``fwd+bwd`` the gradient of the logits (one more tensor of the logits' size) is part of it;
the table also shows the extra peak beyond that unavoidable gradient.

Safety: every worker caps its own address space (``RLIMIT_AS``) at what the machine has
available when it starts, minus a margin, so an implementation that needs more memory fails with
an allocation error (reported as ``out of memory``) instead of waking the kernel's OOM killer.

Correctness: every worker compares its statistics (and, for ``fwd+bwd``, its gradient) on the
first rows against a float64 reference; a separate check compares ``token_stats`` with the naive
approach on all rows (values and gradients) at the smallest benchmarked vocabulary. If
``token_stats`` is wrong anywhere, the script exits with status 1.

Run ``python benchmarks/bench_token_stats.py --help`` for the options; ``--quick`` is a smoke test
(N=512, V=4096, measurements in one process) that finishes in well under a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

IMPLEMENTATIONS = ("logsumexp", "entrorl", "naive", "trl", "verl")
DIRECTIONS = ("fwd", "fwd+bwd")
RESULT_PREFIX = "@@RESULT@@ "
GIB = 1 << 30
MIB = 1 << 20
# Rows compared against the float64 reference in every worker.
REFERENCE_ROWS = 256
# Tolerances of the correctness gate: absolute on log-probs and entropies (nats), relative to the
# largest reference entry on gradients. They sit far below any algebraic mistake (a wrong row, chunk,
# shift or formula costs 1e-2 or more) and above float32 rounding of a 152k-term sum; the table
# shows the actual errors of every implementation, so precision can be compared there.
VALUE_ATOL = 2e-3
GRAD_RTOL = {"float32": 1e-3, "bfloat16": 2e-2}
# Memory left to the rest of the machine when a worker caps its address space (--memory-margin-gib).
MEMORY_MARGIN_GIB = 2.0
LOGIT_SCALE = 3.0


# ----------------------------------------------------------------------------------------------
# Small helpers shared by the parent and the workers
# ----------------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss_bytes() -> int:
    kib = _proc_status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if this kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_bytes() -> int:
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------------------------
# Implementations (imported lazily inside the workers)
# ----------------------------------------------------------------------------------------------


def _load_implementation(name: str):
    """Return fn(logits, targets) -> (logprob, entropy), or raise ImportError if not installed."""
    import torch

    if name == "entrorl":
        from entrorl.tokens import token_stats

        def run(logits, targets):
            stats = token_stats(logits, targets)
            return stats.logprob, stats.entropy

        return run
    if name == "naive":

        def run(logits, targets):
            lp = torch.log_softmax(logits.float(), dim=-1)
            logprob = lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            entropy = -(lp.exp() * lp).sum(-1)
            return logprob, entropy

        return run
    if name == "trl":
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax

        def run(logits, targets):
            return selective_log_softmax(logits, targets), entropy_from_logits(logits)

        return run
    if name == "verl":
        from verl.utils.torch_functional import entropy_from_logits_with_chunking, logprobs_from_logits

        def run(logits, targets):
            return logprobs_from_logits(logits, targets), entropy_from_logits_with_chunking(logits)

        return run
    if name == "logsumexp":

        def run(logits, targets):
            return torch.logsumexp(logits, dim=-1), None

        return run
    raise ValueError(f"unknown implementation {name!r}")


def _availability() -> dict:
    """Which implementations import here, with versions (run in a worker: imports are heavy)."""
    import torch

    info = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "available": {},
        "versions": {},
        "reasons": {},
    }
    from importlib import metadata

    for name in IMPLEMENTATIONS:
        try:
            _load_implementation(name)
        except Exception as error:  # ImportError, or a broken install of an optional package
            info["available"][name] = False
            info["reasons"][name] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            continue
        info["available"][name] = True
        package = {"entrorl": "entrorl", "trl": "trl", "verl": "verl"}.get(name)
        if package:
            try:
                info["versions"][name] = metadata.version(package)
            except metadata.PackageNotFoundError:
                module = sys.modules.get(package)
                info["versions"][name] = getattr(module, "__version__", "source tree")
    return info


# ----------------------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------------------


def _make_inputs(tokens: int, vocab: int, dtype_name: str, seed: int, requires_grad: bool):
    """Logits written chunk by chunk (no full-size float32 temporary, even for bfloat16)."""
    import torch

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    generator = torch.Generator().manual_seed(seed)
    logits = torch.empty(tokens, vocab, dtype=dtype)
    step = max(1, (1 << 22) // vocab)
    for start in range(0, tokens, step):
        stop = min(tokens, start + step)
        block = torch.randn(stop - start, vocab, generator=generator).mul_(LOGIT_SCALE)
        block.add_(torch.randn(stop - start, 1, generator=generator).mul_(4.0))  # per-row offsets
        logits[start:stop] = block
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    g1 = torch.randn(tokens, generator=generator)
    g2 = torch.randn(tokens, generator=generator)
    if requires_grad:
        logits.requires_grad_(True)
    return logits, targets, g1, g2


def _reference(logits, targets, g1, g2, rows: int, with_grad: bool):
    """float64 log-probs, entropies (and gradient) of the first ``rows`` rows."""
    import torch

    z = logits.detach()[:rows].double().requires_grad_(with_grad)
    with torch.set_grad_enabled(with_grad):
        lp = torch.log_softmax(z, dim=-1)
        logprob = lp.gather(-1, targets[:rows].unsqueeze(-1)).squeeze(-1)
        entropy = -(lp.exp() * lp).sum(-1)
    grad = None
    if with_grad:
        loss = (logprob * g1[:rows].double() + entropy * g2[:rows].double()).sum()
        (grad,) = torch.autograd.grad(loss, z)
    return logprob.detach(), entropy.detach(), grad


_FAULTS: list[int] = []  # minor page faults of the timed calls (a worker runs one measurement)


def _timed(call):
    """(value, wall seconds, CPU seconds of this process: user + system, all threads)."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    value = call()
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    _FAULTS.append(after.ru_minflt - before.ru_minflt)
    return value, elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _one_step(run, logits, targets, g1, g2, direction: str):
    import torch

    if direction == "fwd":
        with torch.no_grad():
            logprob, entropy = run(logits, targets)
        return logprob, entropy, None
    logprob, entropy = run(logits, targets)
    loss = (logprob * g1 + entropy * g2).sum()
    (grad,) = torch.autograd.grad(loss, logits)
    return logprob.detach(), entropy.detach(), grad


def _worker(spec: dict) -> dict:
    import torch

    result = {"spec": spec, "status": "ok"}
    impl, direction, vocab, tokens = spec["impl"], spec["direction"], spec["vocab"], spec["tokens"]
    run = _load_implementation(impl)
    with_grad = direction == "fwd+bwd"

    # Warm the code paths (library pages, thread pool, allocator) on a few rows, before any baseline.
    small, small_targets, small_g1, small_g2 = _make_inputs(8, vocab, spec["dtype"], spec["seed"] + 1, with_grad)
    _one_step(run, small, small_targets, small_g1, small_g2, direction)
    del small, small_targets, small_g1, small_g2

    budget = spec.get("memory_budget")
    if budget and hasattr(resource, "RLIMIT_AS"):
        vm_size_kib = _proc_status_kib("VmSize")
        if vm_size_kib is not None:
            limit = vm_size_kib * 1024 + int(budget)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            result["address_space_budget_gib"] = round(budget / GIB, 2)

    try:
        logits, targets, g1, g2 = _make_inputs(tokens, vocab, spec["dtype"], spec["seed"], with_grad)
    except (RuntimeError, MemoryError) as error:
        result.update(status="oom", error=str(error).splitlines()[0][:200], phase="inputs")
        return result
    logits_bytes = logits.numel() * logits.element_size()
    result["logits_mib"] = logits_bytes / MIB
    baseline = _rss_bytes()
    result["peak_reset"] = _reset_peak()
    if not result["peak_reset"]:
        baseline = max(baseline, _peak_bytes())

    # With a resettable peak, each call of the implementation is paired with a logsumexp pass in the
    # same process just before it (outside the peak window), so the "x logsumexp" ratio compares
    # calls made under the same load even when other processes share the machine.
    paired = result["peak_reset"] and impl != "logsumexp" and spec.get("paired_baseline", True)
    baseline_run = _load_implementation("logsumexp") if paired else None
    wall, cpu, faults, baseline_wall, baseline_cpu, peak = [], [], [], [], [], baseline
    outputs = None
    try:
        for index in range(spec["warmup"] + spec["repeats"]):
            outputs = None  # drop the previous outputs (and gradient) before the next call
            if paired:
                baseline_elapsed = _timed(lambda: _one_step(baseline_run, logits, targets, g1, g2, "fwd"))[1:]
                _reset_peak()
            outputs, elapsed, cpu_elapsed = _timed(lambda: _one_step(run, logits, targets, g1, g2, direction))
            peak = max(peak, _peak_bytes())
            if index >= spec["warmup"]:
                faults.append(_FAULTS[-1])
                wall.append(elapsed)
                cpu.append(cpu_elapsed)
                if paired:
                    baseline_wall.append(baseline_elapsed[0])
                    baseline_cpu.append(baseline_elapsed[1])
    except (RuntimeError, MemoryError) as error:
        message = str(error)
        outputs = None
        if "alloc" in message.lower() or isinstance(error, MemoryError):
            result.update(status="oom", error=message.splitlines()[0][:200], phase="run")
            result["extra_peak_mib"] = (max(peak, _peak_bytes()) - baseline) / MIB
            return result
        raise
    result["load_average"] = _load_average()
    result["times_s"] = wall
    result["minor_faults"] = faults  # pages first touched during each timed call (4 KiB each)
    result["cpu_times_s"] = cpu
    result["median_s"] = statistics.median(wall)
    result["median_cpu_s"] = statistics.median(cpu)
    result["min_s"] = min(wall)
    if paired:
        result["paired_logsumexp_times_s"] = baseline_wall
        result["paired_logsumexp_cpu_times_s"] = baseline_cpu
        result["ratio_vs_paired_logsumexp"] = statistics.median(t / b for t, b in zip(wall, baseline_wall))
        result["cpu_ratio_vs_paired_logsumexp"] = statistics.median(c / max(b, 1e-9) for c, b in zip(cpu, baseline_cpu))
    result["extra_peak_mib"] = (peak - baseline) / MIB
    result["extra_peak_pct"] = 100.0 * (peak - baseline) / logits_bytes
    if with_grad:
        result["extra_beyond_grad_pct"] = 100.0 * (peak - baseline - logits_bytes) / logits_bytes

    # Accuracy against float64 on the first rows (after the memory reading).
    logprob, entropy, grad = outputs
    if impl != "logsumexp":
        rows = min(REFERENCE_ROWS, tokens)
        ref_lp, ref_ent, ref_grad = _reference(logits, targets, g1, g2, rows, with_grad)
        err_lp = (logprob[:rows].double() - ref_lp).abs().max().item()
        err_ent = (entropy[:rows].double() - ref_ent).abs().max().item()
        result["max_err_logprob"] = err_lp
        result["max_err_entropy"] = err_ent
        ok = err_lp <= VALUE_ATOL and err_ent <= VALUE_ATOL
        if with_grad:
            err_grad = ((grad[:rows].double() - ref_grad).abs().max() / ref_grad.abs().max()).item()
            result["rel_err_grad"] = err_grad
            ok = ok and err_grad <= GRAD_RTOL[spec["dtype"]]
        result["accurate"] = bool(ok)
    return result


def _check_worker(spec: dict) -> dict:
    """token_stats against the naive approach on every row: values and gradients (float32)."""
    import torch

    entrorl_run = _load_implementation("entrorl")
    naive_run = _load_implementation("naive")
    logits, targets, g1, g2 = _make_inputs(spec["tokens"], spec["vocab"], "float32", spec["seed"], True)
    lp_a, ent_a, grad_a = _one_step(entrorl_run, logits, targets, g1, g2, "fwd+bwd")
    lp_b, ent_b, grad_b = _one_step(naive_run, logits, targets, g1, g2, "fwd+bwd")
    err_lp = (lp_a - lp_b).abs().max().item()
    err_ent = (ent_a - ent_b).abs().max().item()
    err_grad = ((grad_a - grad_b).abs().max() / grad_b.abs().max()).item()
    del grad_a, grad_b
    # The same statistics without autograd must match the differentiable ones exactly in value.
    with torch.no_grad():
        lp_c, ent_c, _ = _one_step(entrorl_run, logits, targets, g1, g2, "fwd")
    err_nograd = max((lp_c - lp_a).abs().max().item(), (ent_c - ent_a).abs().max().item())
    ok = err_lp <= VALUE_ATOL and err_ent <= VALUE_ATOL and err_grad <= GRAD_RTOL["float32"] and err_nograd <= 1e-6
    return {
        "spec": spec,
        "status": "ok",
        "max_abs_diff_logprob": err_lp,
        "max_abs_diff_entropy": err_ent,
        "max_rel_diff_grad": err_grad,
        "max_abs_diff_no_grad": err_nograd,
        "passed": bool(ok),
    }


def _worker_main(payload: str) -> None:
    spec = json.loads(payload)
    if spec.get("threads"):
        import torch

        torch.set_num_threads(int(spec["threads"]))
    if spec["mode"] == "info":
        result = _availability()
    elif spec["mode"] == "check":
        result = _check_worker(spec)
    else:
        result = _worker(spec)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------
# Parent side
# ----------------------------------------------------------------------------------------------


def _spawn(spec: dict, timeout: float | None, in_process: bool = False, script: str = __file__) -> dict:
    """``spec`` measured by ``script --worker SPEC`` in a fresh Python process (this script's own by default), its
    ``RESULT_PREFIX`` line read back; or, ``in_process``, here."""
    environment = dict(os.environ)
    if spec.get("threads"):
        environment["OMP_NUM_THREADS"] = str(spec["threads"])
    if in_process:  # --quick: no isolation, no address-space cap; figures are only a smoke test
        spec = {key: value for key, value in spec.items() if key != "memory_budget"}
        return _worker(spec) if spec["mode"] == "bench" else _check_worker(spec)
    command = [sys.executable, os.path.abspath(script), "--worker", json.dumps(spec)]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)
    except subprocess.TimeoutExpired:
        return {"spec": spec, "status": "timeout"}
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
    status = "killed" if completed.returncode < 0 else "error"
    if completed.returncode in (-9, 137):
        status = "killed (out of memory?)"
    return {"spec": spec, "status": status, "returncode": completed.returncode, "error": " | ".join(tail)[:400]}


def _machine_description() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    total = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "memory_gib": None if total is None else round(total / GIB, 1),
        "os": f"{platform.system()} {platform.release()}",
    }


def _load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def _format_time(result: dict | None, key: str = "median_s") -> str:
    if result is None:
        return "-"
    if result.get("status") != "ok":
        return result.get("status", "?") if key == "median_s" else "-"
    return f"{result[key]:.3f}"


def _time_ratio(result: dict | None, baseline: dict | None, cpu: bool = False) -> float | None:
    """Time relative to one logsumexp pass: against the paired passes in the same worker when there
    are some, else against the separate logsumexp worker. ``cpu``: CPU time instead of wall time."""
    if not result or result.get("status") != "ok":
        return None
    key = "cpu_ratio_vs_paired_logsumexp" if cpu else "ratio_vs_paired_logsumexp"
    if key in result:
        return result[key]
    if not baseline or baseline.get("status") != "ok":
        return None
    key = "median_cpu_s" if cpu else "median_s"
    return result[key] / baseline[key]


def _ratio(result: dict | None, baseline: dict | None, cpu: bool = False) -> str:
    value = _time_ratio(result, baseline, cpu)
    return "-" if value is None else f"{value:.2f}x"


def _plain_ratio(result: dict | None, other: dict | None, key: str) -> str:
    if not result or not other or result.get("status") != "ok" or other.get("status") != "ok":
        return "-"
    return f"{result[key] / other[key]:.2f}x"


def _memory(result: dict | None, key: str = "extra_peak_pct") -> str:
    if result is None or result.get("status") != "ok":
        return "-"
    if key == "extra_peak_pct":
        return f"{result['extra_peak_mib']:.0f} MiB ({result['extra_peak_pct']:.1f}%)"
    return f"{result[key]:.1f}%"


def _fresh_pages(result: dict | None) -> str:
    """Median minor page faults per timed call, as MiB of 4 KiB pages (memory touched for the first time)."""
    if result is None or result.get("status") != "ok" or not result.get("minor_faults"):
        return "-"
    return f"{statistics.median(result['minor_faults']) * 4 / 1024:.0f} MiB"


def _accuracy(result: dict | None) -> str:
    if result is None or result.get("status") != "ok" or "max_err_logprob" not in result:
        return "-"
    text = f"{max(result['max_err_logprob'], result['max_err_entropy']):.1e}"
    if "rel_err_grad" in result:
        text += f" / {result['rel_err_grad']:.1e}"
    return text + ("" if result.get("accurate") else " (!)")


def _render(table_rows: list[list[str]], header: list[str], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in table_rows]
        return "\n".join(lines)
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *table_rows)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in table_rows]
    return "\n".join(lines)


def _tables(results: dict, cases: list[tuple[int, str]], impls: list[str], directions: list[str], markdown: bool) -> str:
    out = []
    for direction in directions:
        header = ["V", "logits", "implementation", "wall (s)", "CPU (s)", "x logsumexp wall", "x logsumexp CPU",
                  "x naive wall", "x naive CPU", "extra peak (% of logits)"]
        if direction == "fwd+bwd":
            header.append("beyond grad")
        header.append("fresh pages / call")
        header.append("max err" + (" (values / grad)" if direction == "fwd+bwd" else ""))
        rows = []
        for vocab, dtype in cases:
            baseline = results.get(("logsumexp", vocab, dtype, "fwd"))
            naive = results.get(("naive", vocab, dtype, direction))
            for impl in impls:
                if impl == "logsumexp":
                    if direction != "fwd":
                        continue
                    result = baseline
                else:
                    result = results.get((impl, vocab, dtype, direction))
                if result is None:
                    continue
                mib = result.get("logits_mib")
                row = [
                    str(vocab),
                    f"{dtype}" + (f", {mib:.0f} MiB" if mib else ""),
                    impl + (" (baseline)" if impl == "logsumexp" else ""),
                    _format_time(result),
                    _format_time(result, "median_cpu_s"),
                    _ratio(result, baseline),
                    _ratio(result, baseline, cpu=True),
                    "-" if impl in ("naive", "logsumexp") else _plain_ratio(result, naive, "median_s"),
                    "-" if impl in ("naive", "logsumexp") else _plain_ratio(result, naive, "median_cpu_s"),
                    _memory(result),
                ]
                if direction == "fwd+bwd":
                    row.append(_memory(result, "extra_beyond_grad_pct"))
                row.append(_fresh_pages(result))
                row.append(_accuracy(result))
                rows.append(row)
        title = {"fwd": "Forward only (log-prob + entropy, no_grad)", "fwd+bwd": "Forward + backward (gradient of sum(logprob*g1 + entropy*g2) w.r.t. the logits)"}[direction]
        out.append(("### " if markdown else "") + title)
        out.append("")
        out.append(_render(rows, header, markdown))
        out.append("")
    return "\n".join(out)


def _verdicts(results: dict, cases: list[tuple[int, str]]) -> list[str]:
    lines = []
    for vocab, dtype in cases:
        base = results.get(("logsumexp", vocab, dtype, "fwd"))
        fwd = results.get(("entrorl", vocab, dtype, "fwd"))
        bwd = results.get(("entrorl", vocab, dtype, "fwd+bwd"))
        label = f"V={vocab} {dtype}"
        if fwd and fwd.get("status") == "ok":
            lines.append(f"{label}: forward extra peak {fwd['extra_peak_pct']:.1f}% of logits (goal < 10%: "
                         f"{'met' if fwd['extra_peak_pct'] < 10 else 'MISSED'})")
            ratio, cpu_ratio = _time_ratio(fwd, base), _time_ratio(fwd, base, cpu=True)
            if ratio is not None and cpu_ratio is not None:
                met = ratio <= 1.5 and cpu_ratio <= 1.5
                lines.append(f"{label}: forward time {ratio:.2f}x logsumexp in wall time, {cpu_ratio:.2f}x in CPU time "
                             f"(goal <= 1.5x: {'met' if met else 'MISSED' if ratio > 1.5 and cpu_ratio > 1.5 else 'mixed'})")
        if bwd and bwd.get("status") == "ok":
            lines.append(f"{label}: fwd+bwd extra peak beyond the gradient {bwd['extra_beyond_grad_pct']:.1f}% of logits "
                         f"(goal < 10%: {'met' if bwd['extra_beyond_grad_pct'] < 10 else 'MISSED'})")
            ratio, cpu_ratio = _time_ratio(bwd, base), _time_ratio(bwd, base, cpu=True)
            if ratio is not None and cpu_ratio is not None:
                lines.append(f"{label}: fwd+bwd time {ratio:.2f}x logsumexp in wall time, {cpu_ratio:.2f}x in CPU time "
                             "(for information)")
        ours, theirs = results.get(("entrorl", vocab, dtype, "fwd")), results.get(("naive", vocab, dtype, "fwd"))
        if ours and theirs and "max_err_entropy" in ours and "max_err_entropy" in theirs:
            a = max(ours["max_err_logprob"], ours["max_err_entropy"])
            b = max(theirs["max_err_logprob"], theirs["max_err_entropy"])
            if a > 5 * b:
                lines.append(f"{label}: precision: entrorl's largest error vs float64 is {a:.1e}, the naive approach's "
                             f"{b:.1e} ({a / b:.0f}x larger; gate tolerance {VALUE_ATOL:g})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 152064], help="vocabulary sizes V (default: 32000 152064)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens N (rows of the logits; default 8192)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per measurement, the median is reported (default: 5, or 3 when V > 65536)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones (default 1)")
    parser.add_argument("--impl", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS),
                        help="implementations to run (logsumexp is always run as the baseline)")
    parser.add_argument("--direction", nargs="+", choices=DIRECTIONS, default=list(DIRECTIONS),
                        help="fwd: statistics under no_grad; fwd+bwd: also the gradient of the logits (default: both)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the extra bfloat16 row at the largest V")
    parser.add_argument("--skip-check", action="store_true", help="skip the full token_stats-vs-naive correctness check")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: N=512, V=4096, 3 repeats, measurements in one process (under a minute)")
    parser.add_argument("--memory-margin-gib", type=float, default=MEMORY_MARGIN_GIB,
                        help="memory each worker leaves to the rest of the machine (default %(default)s GiB)")
    parser.add_argument("--markdown", action="store_true", help="print the result tables in markdown")
    parser.add_argument("--json", metavar="FILE", help="also write every raw measurement to FILE")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (default: torch's default, one per core); on a machine shared "
                             "with other jobs, 1 avoids threads waiting for each other and gives steadier figures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed to one worker (default 1800)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        _worker_main(args.worker)
        return 0
    if args.tokens < 1 or min(args.vocab) < 2 or (args.repeats is not None and args.repeats < 1) or args.warmup < 0:
        parser.error("--tokens and --repeats must be >= 1, --vocab >= 2 and --warmup >= 0")
    if not args.timeout > 0 or not args.memory_margin_gib >= 0:  # not: NaN fails too
        parser.error("--timeout must be > 0 and --memory-margin-gib >= 0")

    if args.quick:
        args.tokens, args.vocab = 512, [4096]
        if args.repeats is None:
            args.repeats = 3

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    machine = _machine_description()
    log(f"machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, {machine['memory_gib']} GiB RAM, {machine['os']}")
    if args.quick and args.threads:
        import torch

        torch.set_num_threads(args.threads)
    info = _spawn({"mode": "info", "threads": args.threads}, timeout=args.timeout)
    if info.get("status") not in (None, "ok") and "available" not in info:
        log(f"could not start a worker: {info}")
        return 2
    log(f"python {info['python']}, torch {info['torch']} ({info['torch_threads']} torch thread(s))")
    impls = ["logsumexp"] + [name for name in args.impl if name != "logsumexp"]
    available = []
    for name in impls:
        if info["available"].get(name):
            version = info["versions"].get(name)
            available.append(name)
            if version:
                log(f"{name}: {version}")
        else:
            log(f"{name}: not installed, skipped ({info['reasons'].get(name, '')})")
    impls = available
    if "entrorl" in args.impl and "entrorl" not in impls:
        log("entrorl itself cannot be imported: run with PYTHONPATH=src or install the package")
        return 2

    cases = [(vocab, "float32") for vocab in args.vocab]
    if not args.no_bf16:
        cases.append((max(args.vocab), "bfloat16"))
    jobs = []
    for vocab, dtype in cases:
        repeats = args.repeats if args.repeats is not None else (3 if vocab > 65536 else 5)
        for impl in impls:
            for direction in args.direction if impl != "logsumexp" else ["fwd"]:
                jobs.append({"mode": "bench", "impl": impl, "direction": direction, "vocab": vocab, "dtype": dtype,
                             "tokens": args.tokens, "repeats": repeats, "warmup": args.warmup, "seed": args.seed,
                             "threads": args.threads})

    failures = []
    check = None
    started = time.perf_counter()
    log(f"load average before the run: {_load_average()} (other processes on the machine disturb the timings)")
    if not args.skip_check and "entrorl" not in impls:
        log("[check] skipped: it compares entrorl's token_stats, which --impl leaves out")
    if not args.skip_check and "entrorl" in impls:
        check_vocab = min(args.vocab)
        log(f"[check] token_stats vs naive on all {args.tokens} rows, V={check_vocab}, float32 (values and gradients) ...")
        check = _spawn({"mode": "check", "tokens": args.tokens, "vocab": check_vocab, "seed": args.seed,
                        "threads": args.threads},
                       timeout=args.timeout)
        if check.get("status") != "ok":
            log(f"[check] could not run: {check}")
            failures.append("check did not run")
        else:
            log(f"[check] max |diff| logprob {check['max_abs_diff_logprob']:.2e}, entropy {check['max_abs_diff_entropy']:.2e}, "
                f"grad (relative) {check['max_rel_diff_grad']:.2e}: {'passed' if check['passed'] else 'FAILED'}")
            if not check["passed"]:
                failures.append("token_stats differs from the naive approach")

    results = {}
    interrupted = False
    for number, spec in enumerate(jobs, 1):
        if interrupted:
            break
        available_bytes = _mem_available_bytes()
        if available_bytes is not None:
            spec["memory_budget"] = max(0, available_bytes - int(args.memory_margin_gib * GIB))
        label = f"[{number}/{len(jobs)}] {spec['impl']:<9} V={spec['vocab']:<6} {spec['dtype']:<8} {spec['direction']:<7}"
        log(f"{label} ...")
        try:
            result = _spawn(spec, timeout=args.timeout, in_process=args.quick)
        except KeyboardInterrupt:
            log(f"interrupted: reporting the {number - 1} measurement(s) finished")
            interrupted = True
            continue
        results[(spec["impl"], spec["vocab"], spec["dtype"], spec["direction"])] = result
        if result.get("status") == "ok":
            detail = f"median {result['median_s']:.3f} s (CPU {result['median_cpu_s']:.3f} s, fresh pages {_fresh_pages(result)}), extra peak {result['extra_peak_mib']:.0f} MiB ({result['extra_peak_pct']:.1f}% of logits)"
            if "accurate" in result:
                detail += f", accuracy {'ok' if result['accurate'] else 'OFF'}"
        else:
            detail = f"{result.get('status')}: {result.get('error', '')}"
        log(f"{label} {detail}")
        if spec["impl"] == "entrorl" and (result.get("status") != "ok" or not result.get("accurate", True)):
            failures.append(f"entrorl {spec['vocab']} {spec['dtype']} {spec['direction']}: {result.get('status')}"
                            + ("" if result.get("accurate", True) else " (inaccurate)"))
    log(f"total {time.perf_counter() - started:.0f} s; load average {_load_average()}")

    header = (f"N = {args.tokens} tokens; {machine['cpu']}, {machine['logical_cpus']} logical CPUs, "
              f"{machine['memory_gib']} GiB RAM; python {info['python']}, torch {info['torch']} "
              f"({info['torch_threads']} torch thread(s))")
    print(header)
    print()
    print(_tables(results, cases, impls, args.direction, args.markdown))
    if check is not None and check.get("status") == "ok":
        print(f"Correctness (V={check['spec']['vocab']}, float32, all rows): token_stats vs naive max |diff| logprob "
              f"{check['max_abs_diff_logprob']:.2e}, entropy {check['max_abs_diff_entropy']:.2e}, gradient "
              f"{check['max_rel_diff_grad']:.2e} (relative): {'passed' if check['passed'] else 'FAILED'}")
        print()
    if args.quick:
        print(("- " if args.markdown else "") + "--quick: sizes far too small for the goals below to mean anything "
              "(a smoke test; memory is not isolated per measurement)")
    for line in _verdicts(results, cases):
        print(("- " if args.markdown else "") + line)
    skipped = [name for name in IMPLEMENTATIONS if name in args.impl and not info["available"].get(name)]
    for name in skipped:
        print(("- " if args.markdown else "") + f"{name}: not installed, skipped")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": machine, "info": info, "check": check,
                       "results": [value for value in results.values()]}, handle, indent=2)
    if interrupted:
        return 130
    if failures:
        log("FAILED: " + "; ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
