"""Metrics sinks: ``metrics.jsonl`` always (the source of truth), TensorBoard / W&B / trackio when asked."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import sys
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

from entrorl._files import naming_file
from entrorl.trainer.checkpoint import atomic_write_text

__all__ = ["MetricsLogger", "TrackerError", "read_metrics"]


WANDB_ID_FILE = "wandb_run_id"  # the W&B run's id, for a resumed run to log into the same run
TRACKIO_RUN_FILE = "trackio_run"  # the trackio run's name, for a resumed run to log into the same run


class TrackerError(RuntimeError):
    """A tracking back-end (TensorBoard, W&B, trackio) that could not start, write or finish; the message names it."""


def _clean(value: Any) -> Any:
    """A metric as JSON writes it: a numpy scalar or a 0-d tensor as the Python number it holds, a non-finite float as
    None, inside lists and dicts too (``json.dumps`` would write ``NaN`` / ``Infinity`` there, which is not JSON)."""
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    return value


class MetricsLogger:
    """Appends one JSON object per step to ``metrics.jsonl``, flushed at once (a killed process loses nothing) and
    synced to disk by :meth:`sync`, which the trainer calls before each checkpoint (so that a machine crash cannot
    lose a step the checkpoint covers; an ``fsync`` per step could cost a slow disk several ms a step).

    On resume from step ``s``, records with ``step > s`` (written after the checkpoint, before a crash) are
    dropped first, so the file reads exactly as if the run had never stopped. TensorBoard drops its own
    (``purge_step``); W&B and trackio take each step once, so the steps they already hold (sent by the interrupted
    attempt and stored) are not sent again (on a CPU with the same seed they hold the same values; a warning says so).
    A fresh start removes the TensorBoard events an earlier attempt left in the run directory, and its W&B files once
    W&B has started.
    """

    def __init__(self, run_dir: Path, *, resume_step: int | None = None, tensorboard=False, wandb=False, trackio=False,
                 run_name: str = "", project: str = "entrorl", config: dict[str, Any] | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            records = [(line, record) for line, record in _records(self.path) if record.get("step", 0) <= resume_step]
            _warn_of_missing_steps(self.path, {record.get("step") for _, record in records}, resume_step)
            kept = "".join(line + "\n" for line, _ in records)
            # one rename (a full disk leaves metrics.jsonl untouched); a link there is replaced, not written through
            atomic_write_text(self.path, kept, follow_links=False)
        elif resume_step is None and (self.path.exists() or self.path.is_symlink()):
            self.path.unlink()
        elif resume_step is not None:
            _warn_of_missing_steps(self.path, set(), resume_step)
        if self.path.is_symlink():  # one to nothing (a run directory received from elsewhere): not appended through
            self.path.unlink()
        self.tensorboard_dir = Path(run_dir) / "tensorboard"
        self.wandb_dir = Path(run_dir) / "wandb"
        # an earlier attempt's files on a fresh start: TensorBoard would merge its events, `wandb sync` upload its run
        # (kept aside until W&B has started: a start that fails leaves them as they were)
        earlier_wandb = Path(run_dir) / ".wandb-earlier"
        if resume_step is None:
            for events in self.tensorboard_dir.glob("events.out.tfevents.*") if self.tensorboard_dir.is_dir() else ():
                events.unlink()
            if wandb and self.wandb_dir.is_dir():
                shutil.rmtree(earlier_wandb, ignore_errors=True)
                os.replace(self.wandb_dir, earlier_wandb)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tensorboard = self._wandb = self._trackio = None
        self._resume_step = resume_step if resume_step is not None else 0
        # W&B and trackio take each step once: the first step each one does not hold yet (on a resume, steps after the
        # checkpoint that an interrupted attempt sent them and they stored are not sent again)
        self._next_step = {"W&B": 0, "trackio": 0}
        self._warned_held = False
        try:
            self._open_backends(run_dir, resume_step=resume_step, tensorboard=tensorboard, wandb=wandb, trackio=trackio,
                                run_name=run_name, project=project, config=config)
        except BaseException:  # a back-end that fails to start (no login, no server) leaves nothing open behind it
            with contextlib.suppress(Exception):  # the failure to start is the one to report
                self.close(failed=True)
                if earlier_wandb.is_dir():
                    shutil.rmtree(self.wandb_dir, ignore_errors=True)
                    os.replace(earlier_wandb, self.wandb_dir)
            raise
        shutil.rmtree(earlier_wandb, ignore_errors=True)

    def _open_backends(self, run_dir: Path, *, resume_step, tensorboard, wandb, trackio, run_name, project, config) -> None:
        """Start the TensorBoard / W&B / trackio mirrors that were asked for; :class:`TrackerError` naming the one that
        could not start."""
        if tensorboard:
            with _as_tracker_error("logging.tensorboard", "could not start TensorBoard", self.tensorboard_dir):
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(self.tensorboard_dir),
                                                  purge_step=None if resume_step is None else resume_step + 1)
        if wandb:
            with _as_tracker_error("logging.wandb", "could not start W&B", self.wandb_dir,
                                   advice="without a login, WANDB_MODE=offline logs into the run directory, for `wandb "
                                          "sync` to upload later"):
                import wandb as wandb_module

                id_file = Path(run_dir) / WANDB_ID_FILE  # a resumed run logs into the same W&B run
                run_id = _earlier_run(id_file, resume_step) or None
                # a W&B run already open in this process (another trainer's) would be handed back by default
                self._wandb = wandb_module.init(project=project, name=run_name, config=config, dir=str(run_dir), id=run_id,
                                                resume="allow", reinit="create_new")
                atomic_write_text(id_file, self._wandb.id, follow_links=False)
                self._next_step["W&B"] = _whole(getattr(self._wandb, "step", 0))  # a resumed W&B run's next step
        if trackio:
            with _as_tracker_error("logging.trackio", "could not start trackio"):
                import trackio as trackio_module

                # trackio resumes the newest run of a name: the run directory's name with the time of its start is
                # this run's alone (two directories of one name, runs/a/grpo and runs/b/grpo, would share it)
                name_file = Path(run_dir) / TRACKIO_RUN_FILE
                earlier = _earlier_run(name_file, resume_step)
                name = earlier or f"{run_name}-{datetime.now():%Y%m%d-%H%M%S}"
                _check_trackio_store(trackio_module)
                run = trackio_module.init(project=project, name=name, config=config, resume="allow" if earlier else "never")
                # this run's own object: trackio.log and trackio.finish act on the run started last in the process
                self._trackio = run
                atomic_write_text(name_file, name + "\n", follow_links=False)
                # the step after the last one its storage holds for this run (trackio has no public name for it)
                held = getattr(run, "_next_step", None)
                if earlier and held is None:
                    warnings.warn("this trackio version does not say which steps its run already holds: every step "
                                  "after the checkpoint is sent again, and those it holds are stored twice", stacklevel=2)
                self._next_step["trackio"] = _whole(held)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append step ``step``; ``FileNotFoundError`` when ``metrics.jsonl`` was deleted meanwhile (the run directory
        removed during the run), instead of writing on into a file nobody can read."""
        if os.fstat(self._file.fileno()).st_nlink == 0:
            raise FileNotFoundError(f"{self.path} was deleted during the run (was the run directory removed?): stopping, "
                                    f"since step {step} and the steps after it could not be recorded")
        if "step" in metrics:  # it would relabel the record in metrics.jsonl, not in the trackers
            raise ValueError(f"step {step}: a metric may not be named 'step', the record's own key; rename it")
        metrics = {key: _clean(value) for key, value in metrics.items()}
        try:
            line = json.dumps({"step": step, **metrics}) + "\n"
        except TypeError as error:
            kinds = {key: type(value).__name__ for key, value in metrics.items()
                     if not isinstance(value, (str, int, float, bool, list, dict, type(None)))}
            raise TypeError(f"step {step}: metrics must be numbers, text, lists or dicts; got {kinds} ({error})") from None
        try:
            self._file.write(line)
            self._file.flush()
        except OSError as error:  # a full disk: the error names no file by itself
            raise naming_file(error, self.path) from None
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self._tensorboard is not None:
            with _as_tracker_error("logging.tensorboard", "TensorBoard could not write", self.tensorboard_dir):
                for key, value in numeric.items():
                    self._tensorboard.add_scalar(key, value, step)
                self._tensorboard.flush()
        skipped = [tracker for tracker, sink in (("W&B", self._wandb), ("trackio", self._trackio))
                   if sink is not None and step < self._next_step[tracker]]
        if skipped and not self._warned_held:
            self._warned_held = True
            held = [f"{tracker} already holds {_steps(self._resume_step + 1, self._next_step[tracker] - 1)}"
                    for tracker in skipped]
            warnings.warn(f"{' and '.join(held)}, sent before the run was interrupted; each takes a step once and keeps "
                          "those values (on a CPU with the same seed the same as this attempt's, which metrics.jsonl "
                          "holds)", stacklevel=2)
        if self._wandb is not None and "W&B" not in skipped:
            with _as_tracker_error("logging.wandb", "W&B could not log", self.wandb_dir):
                self._wandb.log(numeric, step=step, commit=True)  # committed at once, not when the next step comes
        if self._trackio is not None and "trackio" not in skipped:
            with _as_tracker_error("logging.trackio", "trackio could not log"):
                self._trackio.log(numeric, step=step)
                _refuse_lost_trackio_steps(self._trackio)

    def sync(self) -> None:
        """Make every step logged so far durable (``fsync``)."""
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as error:
            raise naming_file(error, self.path) from None

    def close(self, *, failed: bool = False) -> None:
        """Sync and close every sink; a second call does nothing. ``failed`` marks the W&B run as failed (exit code 1)
        instead of finished. The first error (a full disk) is raised after every sink is closed."""
        errors: list[Exception] = []
        if not self._file.closed:
            try:
                self.sync()
            except OSError as error:
                errors.append(error)
        try:
            self._file.close()
        except OSError:  # what could not be flushed was reported by the sync
            pass
        closing = (("logging.tensorboard", "TensorBoard could not write", self._tensorboard, self.tensorboard_dir,
                    lambda sink: sink.close()),
                   ("logging.wandb", "W&B could not finish", self._wandb, self.wandb_dir,
                    lambda sink: sink.finish(exit_code=int(failed))),
                   ("logging.trackio", "trackio could not finish", self._trackio, None, _finish_trackio))
        for key, what, sink, folder, finish in closing:
            if sink is None:
                continue
            try:
                with _as_tracker_error(key, what, folder):
                    finish(sink)
            except TrackerError as error:
                errors.append(error)
        self._tensorboard = self._wandb = self._trackio = None
        if errors:
            raise errors[0]


def _check_trackio_store(trackio_module: Any) -> None:
    """``OSError`` when trackio's store (``TRACKIO_DIR``) cannot be made or written: trackio itself starts regardless,
    and its writer, in another thread, only warns that each batch could not be stored."""
    store = getattr(getattr(trackio_module, "utils", None), "TRACKIO_DIR", None)
    if store is None:
        return
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    if not os.access(store, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "trackio's store (TRACKIO_DIR) is not writable", str(store))


def _finish_trackio(run: Any) -> None:
    """Finish trackio's ``run`` as ``trackio.finish()`` does for the current one: no longer current afterwards (a later
    ``trackio.log`` of the user's is refused, not added to this run); then refuse steps it could not store."""
    try:
        run.finish()
    finally:
        current = getattr(sys.modules.get("trackio.context_vars"), "current_run", None)
        if current is not None and current.get(None) is run:
            current.set(None)
    _refuse_lost_trackio_steps(run)


# what trackio notes (Run._warned_failures, beside its warning) when it gives up storing logged steps
_TRACKIO_LOST_STEPS = frozenset({"write-logs-to-sqlite", "write-logs-fragment", "persist-logs-locally",
                                 "flush-local-buffer", "local-sender-loop", "remote-sender-loop"})


def _refuse_lost_trackio_steps(run: Any) -> None:
    """``RuntimeError`` once trackio has given up storing some of the run's steps: its writer runs in another thread
    and raises nothing, and says so only in a warning (versions that do not note it are trusted)."""
    lost = _TRACKIO_LOST_STEPS & set(getattr(run, "_warned_failures", None) or ())
    if lost:
        raise RuntimeError(f"trackio could not store the run's steps ({', '.join(sorted(lost))}; its warning says why)")


def _warn_of_missing_steps(path: Path, logged: set[Any], resume_step: int) -> None:
    """Warn when the metrics file ``path`` of a run resumed at ``resume_step`` lacks steps that the checkpoint
    trained (the file cut back or deleted since): the run's curves, and its report, have a gap there."""
    missing = [step for step in range(1, resume_step + 1) if step not in logged]
    if missing:
        where = (f"{path} is missing" if not path.exists() else
                 f"{path} holds no record of {len(missing)} of the {resume_step} steps the checkpoint trained")
        some = "some of " if len(missing) < missing[-1] - missing[0] + 1 else ""
        warnings.warn(f"{where} ({some}{_steps(missing[0], missing[-1])}): the run's curves and `entrorl report` have "
                      "a gap there", stacklevel=3)


def _earlier_run(marker: Path, resume_step: int | None) -> str:
    """On a resume, the run (W&B id, trackio name) that ``marker`` says the earlier attempt logged into; else ""."""
    return marker.read_text(encoding="utf-8").strip() if resume_step is not None and marker.is_file() else ""


def _steps(first: int, last: int) -> str:
    """"step 4", or "steps 4 to 6"."""
    return f"step {first}" if first == last else f"steps {first} to {last}"


def _whole(value: Any) -> int:
    """``value`` when it is a whole number of at least 0, else 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


@contextlib.contextmanager
def _as_tracker_error(key: str, what: str, path: Path | None = None, *, advice: str = ""):
    """Any error of a tracking back-end inside the block as a :class:`TrackerError` that names the back-end's setting
    (and the folder it writes, when given; ``advice`` after the error): a back-end's own errors name neither."""
    try:
        yield
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 — whatever the back-end raises (UsageError, OSError, ...)
        where = f" in {path}" if path is not None else ""
        message = f"{key}: {what}{where}: {type(error).__name__}: {error}"
        raise TrackerError(f"{message.rstrip('. ')}; {advice}" if advice else message) from error


def _records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(line, record)`` for every line of a metrics file; a last line cut short by a crash is left out, and so is a
    byte-order mark an editor put before the first line."""
    # lines end at "\n" alone (reading turns "\r\n" into it): splitlines() would also cut at a U+2028 inside a string
    lines = [(number, line) for number, line in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), start=1)
             if line.strip()]
    records = []
    for index, (number, line) in enumerate(lines):
        try:
            records.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if index < len(lines) - 1:
                raise ValueError(f"{path}: line {number} is not JSON: {line[:80]!r}") from None
    return records


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every step's record of a run's ``metrics.jsonl`` (a last line cut short by a crash is left out); ``run_dir`` is
    the run directory or that file itself."""
    path = Path(run_dir)
    return [record for _, record in _records(path if path.is_file() else path / "metrics.jsonl")]
