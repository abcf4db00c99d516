"""Atomic checkpoints: a crash while writing one never damages the previous one.

Layout of a run directory::

    run_dir/checkpoints/step_000040/model/        save_pretrained: weights, config, tokenizer
    run_dir/checkpoints/step_000040/trainer.pt    optimizer, scheduler, RNG states, data position, objective state
    run_dir/checkpoints/latest                    name of the newest complete checkpoint

A checkpoint is written into a hidden temporary directory and renamed into place (``os.replace`` is atomic on
one filesystem); ``latest`` is then rewritten the same way. Only then are old checkpoints pruned.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["save_checkpoint", "latest_checkpoint", "checkpoint_step", "load_trainer_state", "capture_rng_state", "restore_rng_state", "atomic_write_text"]

_PREFIX = "step_"


def atomic_write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def capture_rng_state() -> dict[str, Any]:
    """The CPU torch, numpy and Python generators, and CUDA's when it has been used (sampling on a GPU draws there)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(run_dir: Path, step: int, *, model, tokenizer, trainer_state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, keep the ``keep`` newest."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"{_PREFIX}{step:06d}"
    final = root / name
    temporary = root / f".{name}.tmp-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    model.save_pretrained(temporary / "model")
    tokenizer.save_pretrained(temporary / "model")
    torch.save(trainer_state, temporary / "trainer.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(temporary, final)
    atomic_write_text(root / "latest", name + "\n")
    complete = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and _complete(p))
    for old in complete[:-keep]:  # incomplete leftovers are not counted, so they can never push this one out
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f".{_PREFIX}*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _complete(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` holds everything a resume reads: the trainer state, the model's config and weights."""
    model = checkpoint / "model"
    return ((checkpoint / "trainer.pt").is_file() and (model / "config.json").is_file()
            and any((model / name).is_file() for name in _WEIGHT_FILES))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None. When ``latest`` names a checkpoint that has lost
    files since it was written, the newest complete one before it is taken, with a warning."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    named = root / pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
    if named is not None and _complete(named):
        return named
    complete = sorted(p for p in root.glob(f"{_PREFIX}*") if _complete(p)) if root.is_dir() else []
    chosen = complete[-1] if complete else None
    if named is not None and named.exists():
        logger.warning("checkpoint %s is incomplete (a file is missing); %s", named,
                       f"using {chosen.name} instead" if chosen is not None else "no complete checkpoint is left")
    return chosen


def checkpoint_step(checkpoint: Path) -> int:
    """The training step a checkpoint directory (``step_000042``) holds."""
    return int(Path(checkpoint).name[len(_PREFIX):])


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state saved in ``checkpoint``; ``ValueError`` naming the file when it cannot be read."""
    path = Path(checkpoint) / "trainer.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # mapped: no second copy in memory
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise ValueError(f"{path} cannot be read ({error}); delete {Path(checkpoint).name} to resume from the "
                         "checkpoint before it") from None
