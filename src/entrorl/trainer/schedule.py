"""The learning-rate schedule: warm-up, then constant, linear or cosine decay."""

from __future__ import annotations

import math
import typing

from entrorl.trainer.config import OptimConfig

__all__ = ["SCHEDULE_KEYS", "learning_rate_factor", "schedule_factor"]

# the settings that decide a step's learning rate
SCHEDULE_KEYS = ("optim.lr", "optim.steps", "optim.warmup_steps", "optim.lr_schedule", "optim.min_lr_ratio")

_LR_SCHEDULES = typing.get_args(OptimConfig.model_fields["lr_schedule"].annotation)  # constant, linear, cosine


def learning_rate_factor(step: int, total_steps: int, *, warmup_steps: int = 0, schedule: str = "constant",
                         min_ratio: float = 0.0) -> float:
    """The share of ``optim.lr`` used by update step ``step`` (0-based): ``(step + 1) / warmup_steps`` during the
    warm-up, then 1 (``constant``), or a decay over the remaining steps towards ``min_ratio``: ``linear``
    ``1 - (1 - min_ratio) t``, ``cosine`` ``min_ratio + (1 - min_ratio) (1 + cos(pi t)) / 2``, with
    ``t = (step - warmup_steps) / (total_steps - warmup_steps)``: 0 at the first step after the warm-up, reaching 1
    just after the last step (as ``transformers``' schedules do, so that no step is spent at the final rate).
    ``ValueError`` for an unknown schedule, a negative step, or ``min_ratio`` outside [0, 1], whatever the step."""
    if schedule not in _LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose one of {', '.join(_LR_SCHEDULES)}")
    if step < 0 or not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"learning_rate_factor: step must be >= 0 and min_ratio in [0, 1]; got step {step}, "
                         f"min_ratio {min_ratio}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def schedule_factor(optim: OptimConfig, step: int) -> float:
    """:func:`learning_rate_factor` of update ``step`` under the schedule ``optim`` configures."""
    return learning_rate_factor(step, optim.steps, warmup_steps=optim.warmup_steps, schedule=optim.lr_schedule,
                                min_ratio=optim.min_lr_ratio)
