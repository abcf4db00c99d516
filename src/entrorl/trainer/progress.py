"""Progress of long work: a live bar on a terminal, plain lines in a log; evaluation results as one line."""

from __future__ import annotations

import math
import time

__all__ = ["PROGRESS_LINE_EVERY_S", "StepProgress", "format_evaluation"]


#: Away from a terminal (a log file, a batch job), long work prints a plain line at most this often, in seconds.
PROGRESS_LINE_EVERY_S = 30.0


class StepProgress:
    """The training loop's progress: a live bar on a terminal; elsewhere (a log file, a batch job) one plain line
    at the first and last steps and at most every :data:`PROGRESS_LINE_EVERY_S` seconds between them, so that a run's
    log shows it advancing."""

    def __init__(self, console, description: str, total: int, done: int, *, enabled: bool):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = console if console is not None else Console(stderr=True)
        self.enabled, self.total, self.description = enabled, total, description
        self.live = enabled and (self.console.is_terminal or self.console.is_jupyter)
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=self.console,
                            disable=not self.live)
        self.task = self.bar.add_task(description, total=total, completed=done, status="")
        self.started, self.first_step, self.last_line = time.perf_counter(), done, -math.inf

    def __enter__(self):
        self.bar.__enter__()
        return self

    def restart_clock(self) -> None:
        """Count steps/s from now (after the evaluation that may precede the first step)."""
        self.started = time.perf_counter()

    def __exit__(self, *exc_info):
        return self.bar.__exit__(*exc_info)

    def note_evaluation(self, step: int, metrics: dict[str, float]) -> None:
        """One line per evaluation (above the bar on a terminal): Avg@n, each Pass@k, the share of prompts no sample
        solved."""
        if not self.enabled or not metrics:
            return
        self.console.print(f"{self.description}: {format_evaluation(metrics)} at step {step}", highlight=False,
                           soft_wrap=True)

    def advance(self, step: int, metrics: dict[str, float]) -> None:
        status = (f"reward {metrics['reward/mean']:.3f}  acc {metrics['reward/accuracy']:.2f}  "
                  f"H {metrics.get('entropy/mean', math.nan):.3f}")
        self.bar.update(self.task, completed=step, status=status)
        now = time.perf_counter()
        if self.live or not self.enabled:
            return
        if step - 1 == self.first_step or step == self.total or now - self.last_line >= PROGRESS_LINE_EVERY_S:
            self.last_line = now
            rate = (step - self.first_step) / max(now - self.started, 1e-9)
            self.console.print(f"{self.description}: step {step}/{self.total}  {status}  {rate:.2f} steps/s",
                               highlight=False, soft_wrap=True)


def format_evaluation(metrics: dict[str, float]) -> str:
    """``eval/…`` metrics as one line: ``eval Avg@8 0.412, Pass@1 0.412, Pass@8 0.75, solved by none 0.125`` (Avg@n
    with the ``eval/n`` the evaluation recorded)."""
    n = int(metrics["eval/n"]) if "eval/n" in metrics else "n"
    parts = [f"Avg@{n} {metrics['eval/avg_at_n']:.3g}"] if "eval/avg_at_n" in metrics else []
    ks = sorted(int(key.rsplit("_", 1)[1]) for key in metrics if key.startswith("eval/pass_at_"))
    parts += [f"Pass@{k} {metrics[f'eval/pass_at_{k}']:.3g}" for k in ks]
    if "eval/frac_solved_none" in metrics:
        parts.append(f"solved by none {metrics['eval/frac_solved_none']:.3g}")
    return "eval " + ", ".join(parts)
