"""Metrics sinks: ``metrics.jsonl`` always (the source of truth), TensorBoard / W&B / trackio when asked."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from entrorl.trainer.checkpoint import naming_file

__all__ = ["MetricsLogger", "read_metrics"]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Appends one JSON object per step to ``metrics.jsonl``, flushed at once (a killed process loses nothing) and
    synced to disk by :meth:`sync`, which the trainer calls before each checkpoint (so that a machine crash cannot
    lose a step the checkpoint covers; an ``fsync`` per step could cost a slow disk several ms a step).

    On resume from step ``s``, records with ``step > s`` (written after the checkpoint, before a crash) are
    dropped first, so the file reads exactly as if the run had never stopped.
    """

    def __init__(self, run_dir: Path, *, resume_step: int | None = None, tensorboard=False, wandb=False, trackio=False,
                 run_name: str = "", config: dict[str, Any] | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [line for line, record in _records(self.path) if record.get("step", 0) <= resume_step]
            temporary = self.path.with_suffix(".jsonl.tmp")
            try:
                temporary.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            except OSError as error:  # a full disk: metrics.jsonl itself is untouched
                temporary.unlink(missing_ok=True)
                raise naming_file(error, self.path) from None
            os.replace(temporary, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a", encoding="utf-8")
        self._tensorboard = self._wandb = self._trackio = None
        try:
            self._open_backends(run_dir, resume_step=resume_step, tensorboard=tensorboard, wandb=wandb, trackio=trackio,
                                run_name=run_name, config=config)
        except BaseException:  # a back-end that fails to start (no login, no server) leaves nothing open behind it
            self.close()
            raise

    def _open_backends(self, run_dir: Path, *, resume_step, tensorboard, wandb, trackio, run_name, config) -> None:
        """Start the TensorBoard / W&B / trackio mirrors that were asked for."""
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise RuntimeError("logging.tensorboard needs the tensorboard package: pip install 'entrorl[track]'") from error
            self._tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1)
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError as error:
                raise RuntimeError("logging.wandb needs the wandb package: pip install 'entrorl[track]'") from error
            id_file = Path(run_dir) / "wandb_run_id"  # a resumed run logs into the same W&B run
            run_id = id_file.read_text().strip() if resume_step is not None and id_file.is_file() else None
            self._wandb = wandb_module.init(name=run_name, config=config, dir=str(run_dir), id=run_id, resume="allow")
            id_file.write_text(self._wandb.id)
        if trackio:
            try:
                import trackio as trackio_module
            except ImportError as error:
                raise RuntimeError("logging.trackio needs the trackio package: pip install 'entrorl[track]'") from error
            trackio_module.init(project="entrorl", name=run_name, config=config)
            self._trackio = trackio_module

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append step ``step``; ``FileNotFoundError`` when ``metrics.jsonl`` was deleted meanwhile (the run directory
        removed during the run), instead of writing on into a file nobody can read."""
        if os.fstat(self._file.fileno()).st_nlink == 0:
            raise FileNotFoundError(f"{self.path} was deleted during the run (was the run directory removed?): stopping, "
                                    f"since step {step} and the steps after it could not be recorded")
        record = {"step": step, **{key: _clean(value) for key, value in metrics.items()}}
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as error:  # a full disk: the error names no file by itself
            raise naming_file(error, self.path) from None
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self._tensorboard is not None:
            for key, value in numeric.items():
                self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        if self._trackio is not None:
            self._trackio.log(numeric, step=step)

    def sync(self) -> None:
        """Make every step logged so far durable (``fsync``)."""
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as error:
            raise naming_file(error, self.path) from None

    def close(self) -> None:
        """Sync and close every sink; a second call does nothing. A sync that fails (a full disk) is raised after
        every sink is closed."""
        failed = None
        if not self._file.closed:
            try:
                self.sync()
            except OSError as error:
                failed = error
        try:
            self._file.close()
        except OSError:  # what could not be flushed was reported by the sync
            pass
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._trackio is not None:
            self._trackio.finish()
        self._tensorboard = self._wandb = self._trackio = None
        if failed is not None:
            raise failed


def _records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(line, record)`` for every line of a metrics file; a last line cut short by a crash is left out."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for index, line in enumerate(lines):
        try:
            records.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if index < len(lines) - 1:
                raise ValueError(f"{path}: line {index + 1} is not JSON: {line[:80]!r}") from None
    return records


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every step's record of a run's ``metrics.jsonl`` (a last line cut short by a crash is left out)."""
    return [record for _, record in _records(Path(run_dir) / "metrics.jsonl")]
