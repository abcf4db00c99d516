"""Atomic checkpoints: a crash while writing one never damages the previous one.

Layout of a run directory::

    run_dir/checkpoints/step_000040/model/        save_pretrained: weights, config, tokenizer (with LoRA: merged, or
                                                  without weights with model.lora.merged: last)
    run_dir/checkpoints/step_000040/adapter/      with LoRA only: the adapters, in peft's format
    run_dir/checkpoints/step_000040/trainer.pt    optimizer, scheduler, RNG states, data position, objective state
    run_dir/checkpoints/step_000040/files.json    every file above with its size and CRC-32, written last: what
                                                  "complete" and "intact" mean
    run_dir/checkpoints/latest                    name of the newest complete checkpoint
    run_dir/.lock                                 held by the process that runs there (:func:`lock_run_directory`)

A checkpoint is written into a hidden temporary directory, synced to disk (so that a machine that loses power cannot
leave a renamed checkpoint with empty files) and renamed into place (``os.replace`` is atomic on one filesystem);
``latest`` is then rewritten the same way. Only then are old checkpoints pruned, each renamed to a temporary name
before it is deleted (a kill meanwhile leaves no half-deleted checkpoint). A checkpoint counts as complete when every
file its ``files.json`` lists is there with the size it was written with, or, for a JSON, text or Markdown file a user
may edit, is not empty (a checkpoint from before ``files.json``: when its trainer state, model config and weights are
there and not empty); a resume, ``entrorl eval`` of a run and pruning pass over incomplete ones. A complete checkpoint
is also *intact* when the files a reader takes from it still have the CRC-32 they were written with (a JSON, text or
Markdown file a user may edit excepted): a resume checks every file, ``entrorl eval`` the model's and the adapters',
and both pass over a checkpoint damaged in place (bytes changed, size kept) to the newest intact one before it, with a
warning, where loading it would have read wrong weights or failed late. A write that fails (a full disk) removes its
temporary directory and raises :class:`CheckpointWriteError`; the previous checkpoint stays.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import pickle
import platform
import random
import re
import shutil
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

try:
    import fcntl
    import resource
except ImportError:  # not a POSIX system: runs are not locked there, nor files' sizes limited
    fcntl = resource = None

import numpy as np
import torch

from entrorl._files import modes_as_the_umask_gives, refuse_a_name_that_is_not_utf8, write_atomically
from entrorl.modeling import (TOKENIZER_FILES, check_model_files, config_rates_restored, declares_a_model, errors_in_chain,
                              is_out_of_memory,
                              load_causal_lm, out_of_memory_while, quiet_progress_bars, refuse_unreadable,
                              save_tokenizer)
from entrorl.trainer.adapters import (ADAPTER_CONFIG, ADAPTER_DIRECTORY, ADAPTER_WEIGHTS, adapter_weights_file,
                                     load_adapted_causal_lm, read_adapter_config)

logger = logging.getLogger(__name__)

__all__ = ["CheckpointWriteError", "training_run_of", "save_checkpoint", "latest_checkpoint", "incomplete_checkpoints", "checkpoint_step", "load_trainer_state", "capture_rng_state", "restore_rng_state", "atomic_write_text",
           "ModelDirectory", "resolve_model_directory", "load_model_directory", "check_run_directory_writable", "lock_run_directory", "remove_temporary_files", "written_by_another_live_process"]

_PREFIX = "step_"
PASSED_OVER = "passed_over"  # checkpoints/<this>/: the checkpoints a resume passed over
_CHECKPOINT_NAME = re.compile(r"step_(\d+)")  # a checkpoint's folder; a copy (step_000040.bak) is none


_TEMPORARY = ".*.tmp-*"  # the hidden files and directories that atomic writes rename into place


def atomic_write_text(path: Path, text: str, *, make_folder: bool = False, follow_links: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``path`` as one rename (:func:`entrorl._files.write_atomically`): ``path`` holds the
    old text or the new one, never part of either; a link is followed, a device or ``/dev/stdout`` written into.
    ``follow_links=False`` is for the files a run keeps in its own directory: a link there (one received from someone
    else may hold a link to a file of this user's elsewhere) is replaced by the file. ``make_folder`` creates the
    folder the file goes into."""
    # backslashreplace: a path that is not UTF-8 (its undecodable bytes as surrogates) is written as \\udcXX, which
    # in a JSON string is the escape that reads back to the same path
    write_atomically(path, lambda handle: handle.write(text.encode("utf-8", "backslashreplace")),
                     make_folder=make_folder, follow_links=follow_links)


def atomic_torch_save(obj: Any, path: Path, *, follow_links: bool = True) -> None:
    """``torch.save(obj, path)`` as one rename, as :func:`atomic_write_text`: a crash leaves the old file or the new
    one, never a truncated archive."""
    write_atomically(path, lambda handle: torch.save(obj, handle), follow_links=follow_links)


def nearest_existing(path: Path) -> Path:
    """``path`` when it exists, else the nearest folder above it that does: where creating it would start."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


RUN_FOLDERS = ("checkpoints", "eval", "forks", "samples", "tensorboard", "wandb")  # what a run creates in its directory


def check_run_directory_writable(run_dir: Path) -> None:
    """Raise ``OSError`` naming the problem if ``run_dir`` cannot be a run directory: it is a file, or it (or, when it
    does not exist yet, the nearest folder above it that does) cannot be written (permissions, a read-only
    filesystem), it is a link to a folder that does not exist (a disk not mounted), it holds a Hugging Face model
    (whose config.json the run's would replace), it lies in another run's ``checkpoints/``, or a file stands where the
    run puts one of its folders (:data:`RUN_FOLDERS`). Cheap, so a trainer
    checks before it loads a model, not when it first writes. A name that is not UTF-8 is a ``ValueError``: the
    checkpoints' tokenizers could not be saved in it."""
    refuse_a_name_that_is_not_utf8(run_dir, "the run directory")
    dangling = next((Path(path) for path in (run_dir, *Path(run_dir).parents) if Path(path).is_symlink()
                     and not Path(path).exists()), None)
    if dangling is not None:
        raise FileNotFoundError(f"the run directory {run_dir} cannot be created: {dangling} is a link to "
                                f"{os.readlink(dangling)}, which does not exist (a disk that is not mounted?)")
    if declares_a_model(Path(run_dir) / "config.json"):
        raise FileExistsError(f"the run directory {run_dir} holds a model (its config.json declares one), which the "
                              "run's config.json would replace; choose another --run-dir / logging.run_dir")
    owner = _run_whose_checkpoints_hold(run_dir)
    if owner is not None:
        raise FileExistsError(f"the run directory {run_dir} is inside the checkpoints of the run {owner}, which that "
                              "run prunes and resumes from; choose another --run-dir / logging.run_dir")
    existing = nearest_existing(run_dir)
    if not existing.is_dir():
        raise NotADirectoryError(f"the run directory {run_dir} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "it" if existing == run_dir else f"{existing}, where it would be created,"
        raise PermissionError(f"the run directory {run_dir} cannot be written: {where} is not writable (permissions, or "
                              "a read-only filesystem); choose another --run-dir / logging.run_dir")
    for name in RUN_FOLDERS:
        folder = Path(run_dir) / name
        if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
            what = "a link to nothing" if not folder.exists() else "a file"
            raise NotADirectoryError(f"the run directory {run_dir} cannot hold the run's {name}/: {folder} is {what}, "
                                     "not a folder; move it away or choose another --run-dir / logging.run_dir")


_UNLOCKABLE_DIRECTORIES: set[str] = set()  # run directories whose filesystem refused flock, already warned about
_WARNED: set[tuple[str, str]] = set()  # (problem, what was done) of latest checkpoints already warned about


class UnlockableFile(OSError):
    """The system (no ``flock``: not POSIX) or the filesystem cannot lock a file: nothing can be guarded with it."""


def lock_file(path: Path, *, waiting: Callable[[str], None] | None = None) -> tuple[io.TextIOWrapper | None, str]:
    """Take the exclusive ``flock`` of ``path`` (created if need be) and write this process's id into it: ``(the open
    file, "")``, the lock lasting until the file is closed or the process ends. When another process holds it: without
    ``waiting``, ``(None, its id as the file gives it, "unknown" when it gives none)``; with it, ``waiting(that id)`` is
    called and the lock waited for. :class:`UnlockableFile` where locks cannot be taken; OSError when the file cannot
    be opened, or is a link (writing the id into it would replace the file it names, which need not be the run's: a
    folder received from someone else)."""
    if fcntl is None:
        raise UnlockableFile(f"cannot lock {path}: this system has no flock")
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP and path.is_symlink():
            raise OSError(f"{path} is a link (to {os.readlink(path)}), where a lock file of its own belongs: taking "
                          "the lock would write into what it names; remove the link") from None
        raise
    handle = os.fdopen(descriptor, "r+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        if error.errno not in (errno.EAGAIN, errno.EACCES):  # a filesystem without locks
            handle.close()
            raise UnlockableFile(error.errno, error.strerror) from None
        if waiting is None:
            handle.close()
            return None, holder
        waiting(holder)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except BaseException:
            handle.close()
            raise
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle, ""


def lock_run_directory(run_dir: Path, *, options: str = "--run-dir / logging.name",
                       user: str = "Trainer") -> io.TextIOWrapper | None:
    """Take the run directory's lock (an exclusive ``flock`` of ``run_dir/.lock``, which holds the process id) and
    return the open lock file: the lock lasts until it is closed or the process ends, however it ends. A second run
    in the same directory (the same command started twice, a ``--resume`` while the first still runs) gets
    ``OSError`` naming the process that holds it (and ``options``, those that choose another folder; ``user``, what
    holds it when that process is this one: a ``Trainer`` or a ``laboratory`` of the Python API), instead of writing
    its files between the other run's. ``None`` where ``flock`` does not exist (not a POSIX system: Windows) or the
    filesystem refuses it (warned once per directory)."""
    try:
        handle, holder = lock_file(run_dir / ".lock")
    except UnlockableFile as error:  # nothing to guard with
        if str(run_dir.resolve()) not in _UNLOCKABLE_DIRECTORIES:
            _UNLOCKABLE_DIRECTORIES.add(str(run_dir.resolve()))
            logger.warning("cannot lock %s (%s); two runs there would not be kept apart", run_dir, error)
        return None
    if handle is not None:
        return handle
    if holder == str(os.getpid()):  # the Python API: an earlier Trainer of this process not closed, a laboratory
        remedy, choose = (("close() it (or let its train() finish) first", "run_dir / logging.name")
                          if user == "Trainer" else ("let it finish first", options))
        raise OSError(f"{run_dir} is in use by another {user} of this process; {remedy}, or choose another {choose}")
    raise OSError(f"{run_dir} is in use by another run (process {holder}); wait for it to end, or choose another "
                  f"{options}")


def written_by_another_live_process(temporary: Path) -> bool:
    """Whether the process whose id ends a ``.NAME.tmp-PID`` name is running and is not this one: a process writing
    into the run directory without holding its lock (``entrorl eval --out run_dir/...``), whose file is in use."""
    pid = temporary.name.rpartition(".tmp-")[2]
    if not pid.isdigit() or int(pid) <= 0 or int(pid) == os.getpid():
        return False
    if sys.platform == "win32":  # there os.kill(pid, 0) is no question: it sends CTRL_C_EVENT. Kept, as if running
        return True
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OSError:
        return False
    return True


def remove_temporary_files(run_dir: Path) -> None:
    """Remove what atomic writes in ``run_dir`` left behind when their process was killed mid-write (``kill -9``,
    a power cut): hidden ``.NAME.tmp-PID`` files and directories whose process no longer runs. Only for the holder
    of the directory's lock, which no other run writes to."""
    (run_dir / "metrics.jsonl.tmp").unlink(missing_ok=True)  # the metrics file cut back to a resumed step
    for folder in (run_dir, *(path for path in run_dir.iterdir() if path.is_dir() and not path.name.startswith("."))):
        for stale in folder.glob(_TEMPORARY):
            if written_by_another_live_process(stale):
                continue
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def capture_rng_state() -> dict[str, Any]:
    """The CPU torch, numpy and Python generators, CUDA's when it has been used and an Apple GPU's when there is one
    (sampling on a GPU draws there)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def software_versions() -> dict[str, str]:
    """The versions a checkpoint records (Python, entrorl, torch, transformers): a resume on the CPU with the same
    seed gives the metrics of an uninterrupted run only under the same ones, since a release may change a kernel's
    rounding or how a random stream is drawn."""
    import transformers

    from entrorl import __version__

    return {"python": platform.python_version(), "entrorl": __version__, "torch": str(torch.__version__),
            "transformers": transformers.__version__}


def software_changes(saved: dict[str, str] | None) -> list[tuple[str, str, str]]:
    """``(package, saved version, version now)`` for each package of :func:`software_versions` whose version differs
    from the one ``saved`` records (a checkpoint's; ``None`` for a checkpoint written before they were recorded)."""
    if not saved:
        return []
    now = software_versions()
    return [(name, saved[name], now[name]) for name in now if name in saved and saved[name] != now[name]]


_FINGERPRINT_EDGE = 1 << 20  # bytes read from each end of a weight file


def model_fingerprint(model_dir: Path) -> str | None:
    """A digest of the model directory's configuration and weight files (each one's name, size, and first and last
    MiB: a different model's weights differ there, and a multi-GB file is not read whole), which a resumed run compares
    with its checkpoint's, since LoRA adapters and the ``kl_ref`` reference are read from ``model.path`` again; None
    when the folder cannot be read."""
    digest = hashlib.sha256()
    try:
        files = sorted(path for path in Path(model_dir).iterdir() if path.is_file() and (
            path.name == "config.json" or path.suffix in (".safetensors", ".bin") or path.name.endswith(".index.json")))
        for path in files:
            size = path.stat().st_size
            digest.update(f"{path.name}\0{size}\0".encode())
            with path.open("rb") as handle:
                digest.update(handle.read(_FINGERPRINT_EDGE))
                if size > _FINGERPRINT_EDGE:
                    handle.seek(max(_FINGERPRINT_EDGE, size - _FINGERPRINT_EDGE))
                    digest.update(handle.read())
    except OSError:
        return None
    return digest.hexdigest() if files else None


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if state.get("mps") is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a removed run directory); the previous one is intact."""


def _sync_directory(folder: str | Path) -> None:
    """``fsync`` a directory's entries, where the filesystem allows it (some network and FUSE mounts refuse)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(descriptor)


def _sync_tree(directory: Path) -> None:
    """``fsync`` every file under ``directory``, then the directories themselves (their entries)."""
    for folder, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        _sync_directory(folder)


def _checkpoint_bytes(model, adapter=None, merged: bool = True) -> int:
    """About how many bytes a checkpoint of ``model`` writes: its weights (float32 ones when ``adapter`` merges into a
    half-precision model, the trained ones alone when it is not merged), and as the trainer's state AdamW's two
    float32 moments of each trained weight and the float32 master copy of a trained half-precision one."""
    needed = 0
    for parameter in model.parameters():
        size = parameter.element_size()
        if merged or parameter.requires_grad:
            needed += parameter.numel() * (max(size, 4) if adapter is not None else size)
        if parameter.requires_grad:
            needed += parameter.numel() * (8 + (4 if size < 4 else 0))
    return needed


def _why_a_checkpoint_may_not_fit(folder: Path, written: Path, error: BaseException, model, adapter=None,
                                  merged: bool = True) -> str:
    """What a library's own error about a failed checkpoint may not say (torch's zip writer reports ENOSPC and EFBIG
    as "unexpected pos"): ", probably the process's file-size limit: ..." when the error says a file grew too large
    (EFBIG) or a file of the checkpoint's folder ``written`` reached that limit (``ulimit -f``); else ", probably a
    full disk: ..." when the filesystem holding ``folder`` has less room than a checkpoint of ``model`` takes."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource is not None else None
    if limit is not None and limit != resource.RLIM_INFINITY:
        at_the_limit = sorted(str(file.relative_to(written)) for file in written.rglob("*")
                              if file.is_file() and file.stat().st_size >= limit)
        if at_the_limit or _said_too_large(error):
            reached = f", which {', '.join(at_the_limit)} reached" if at_the_limit else ""
            return (f", probably the process's file-size limit (RLIMIT_FSIZE, `ulimit -f`): files of at most "
                    f"{limit / 2**20:.2f} MiB{reached}; raise the limit")
    needed = _checkpoint_bytes(model, adapter, merged)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    if free >= needed:
        return ""
    return (f", probably a full disk: {free / 2**20:.1f} MiB free there, and a checkpoint of this model takes about "
            f"{needed / 2**20:.1f} MiB")


def _said_too_large(error: BaseException) -> bool:
    """Whether ``error``, or one it was raised from or while handling, is EFBIG: a file over the size limit."""
    return any((isinstance(link, OSError) and link.errno == errno.EFBIG) or "File too large" in str(link)
               for link in errors_in_chain(error))


def save_checkpoint(run_dir: Path, step: int, *, model, tokenizer, trainer_state: dict[str, Any], keep: int,
                    adapter=None, merged: bool = True) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, keep the ``keep`` newest. With ``adapter`` (a
    :class:`entrorl.trainer.adapters.LoraAdapter` put into ``model``), ``adapter/`` holds the adapters and ``model/``
    the merged model, or without ``merged`` only the model's config and generation config (with the tokenizer, as
    always).

    The run directory must exist (a run directory removed during the run is not silently recreated)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointWriteError(f"cannot save checkpoint step {step}: the run directory {run_dir} no longer exists")
    root = run_dir / "checkpoints"
    root.mkdir(exist_ok=True)
    for stale in root.glob(_TEMPORARY):  # what failed writes left: their room is needed now
        shutil.rmtree(stale, ignore_errors=True)
    name = f"{_PREFIX}{step:06d}"
    final = root / name
    temporary = root / f".{name}.tmp-{os.getpid()}"
    try:
        temporary.mkdir()
        with config_rates_restored(model), quiet_progress_bars():
            if adapter is not None:
                if merged:
                    adapter.save_merged(temporary / "model")
                else:  # what tools read beside the weights: the config and how it generates (its EOS ids)
                    model.config.save_pretrained(temporary / "model")
                    if getattr(model, "generation_config", None) is not None:
                        model.generation_config.save_pretrained(temporary / "model")
                adapter.save(temporary / ADAPTER_DIRECTORY)
            else:
                model.save_pretrained(temporary / "model")
        save_tokenizer(tokenizer, temporary / "model")
        torch.save(trainer_state, temporary / "trainer.pt")
        _write_file_list(temporary)
        modes_as_the_umask_gives(temporary)
        _sync_tree(temporary)
    except Exception as error:  # torch.save reports a full disk as a RuntimeError, safetensors as its own error
        why = _why_a_checkpoint_may_not_fit(root, temporary, error, model, adapter, merged)
        shutil.rmtree(temporary, ignore_errors=True)
        previous = latest_checkpoint(run_dir, verify="all")  # what a resume would take: complete, with its bytes
        raise CheckpointWriteError(
            f"writing checkpoint {name} in {root} failed ({type(error).__name__}: {error}){why}; "
            + (f"the last complete checkpoint, {previous.name}, is intact" if previous is not None else "no checkpoint was written before")
        ) from error
    if final.exists():
        _remove_checkpoint(final)
    os.replace(temporary, final)
    _sync_directory(root)  # the rename itself
    atomic_write_text(root / "latest", name + "\n", follow_links=False)
    complete = _complete_checkpoints(root)
    for old in complete[:-keep]:  # incomplete leftovers are not counted, so they can never push this one out
        if old != final:
            try:
                _remove_checkpoint(old)
            except OSError as error:  # the new checkpoint is in place: what is left is tidying, which may not fail it
                logger.warning("could not remove %s, a checkpoint older than the %d kept (%s); it stays, and the run "
                               "directory holds one checkpoint more", old, keep, error)
    return final


def _remove_checkpoint(checkpoint: Path) -> None:
    """Delete ``checkpoint`` so that a kill at any moment leaves it whole or gone from the checkpoints: it is first
    renamed to a temporary name (which the next save, or a resume, removes), then deleted."""
    doomed = checkpoint.with_name(f".{checkpoint.name}.removed.tmp-{os.getpid()}")  # not the name a save writes into
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _non_empty(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


def _weights_present(model: Path) -> bool:
    """A non-empty weight file, or an index whose every shard is one."""
    for name in _WEIGHT_FILES:
        path = model / name
        if not _non_empty(path):
            continue
        if not name.endswith(".index.json"):
            return True
        try:
            shards = set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        return all(_non_empty(model / shard) for shard in shards)
    return False


@dataclass(frozen=True)
class ModelDirectory:
    """A model directory as ``entrorl eval`` and ``data audit`` read it: where the weights, the tokenizer and the
    model's config are, and the LoRA adapters to put on the weights (None for a complete model)."""

    weights: Path
    tokenizer: Path
    adapters: Path | None = None


def resolve_model_directory(path: str | Path, *, base: str | Path | None = None,
                            prefer_adapters: bool = False) -> ModelDirectory:
    """What the model directory ``path`` stands for, its files checked (``FileNotFoundError`` / ``ValueError``
    naming what is missing) before anything loads:

    - a complete Hugging Face model directory;
    - LoRA adapters in peft's format (``adapter_config.json``, and no model weights unless ``base`` is given), on the
      base model in ``base`` or, without it, the one the adapters record (``base_model_name_or_path``, relative to
      the working directory when relative); the tokenizer is the adapters' own when they have one, else the base's;
    - a checkpoint's ``model/`` written without the merged model (``model.lora.merged: last``): the checkpoint's
      ``adapter/`` on the base model, with the tokenizer of ``model/``;
    - a checkpoint (``step_000100``), for its ``model/``, or a run directory, for its newest complete checkpoint's.

    With ``prefer_adapters`` a checkpoint's ``model/`` that holds the merged model is also read as its ``adapter/`` on
    the base model: the model as it trained, for a half-precision base whose merged model (saved in float32) would lose
    most of an update when loaded in the base's precision."""
    path = _checkpoint_model(Path(path))
    if (path / ADAPTER_CONFIG).is_file() and (base is not None or not _weights_present(path)):
        adapters = path
    elif (path / "config.json").is_file() and (prefer_adapters or not _weights_present(path)) \
            and (path.parent / ADAPTER_DIRECTORY / ADAPTER_CONFIG).is_file():
        adapters = path.parent / ADAPTER_DIRECTORY
    else:
        if base is not None:
            raise ValueError(f"--base is for LoRA adapters, and {path} holds none (no {ADAPTER_CONFIG}): leave --base out")
        return ModelDirectory(weights=check_model_files(path), tokenizer=path)
    refuse_unreadable([adapters / ADAPTER_CONFIG])
    recorded = read_adapter_config(adapters).get("base_model_name_or_path")
    if base is None and not (recorded and isinstance(recorded, str)):
        raise ValueError(f"{adapters} holds LoRA adapters that do not record their base model: give its directory with --base")
    if base is not None and not Path(base).is_dir():
        record = f" (they record {recorded})" if recorded and isinstance(recorded, str) else ""
        raise FileNotFoundError(f"--base {base} is not a directory: give the directory of the base model the LoRA "
                                f"adapters in {adapters} were trained on{record}")
    base = Path(base if base is not None else recorded)
    if not base.is_dir():
        raise FileNotFoundError(f"{adapters} holds LoRA adapters of the base model {base}, which is not a directory here: "
                                "give the base model's directory with --base")
    check_model_files(base, tokenizer=False)
    if adapter_weights_file(adapters) is None:
        raise FileNotFoundError(f"{adapters} has no {ADAPTER_WEIGHTS} (nor adapter_model.bin), or an empty one: the "
                                "adapters' weights are missing")
    refuse_unreadable([adapter_weights_file(adapters)])
    tokenizer = path if any((path / name).is_file() for name in TOKENIZER_FILES) else base
    check_model_files(tokenizer, weights=False)
    return ModelDirectory(weights=base, tokenizer=tokenizer, adapters=adapters)


def _run_whose_checkpoints_hold(path: Path) -> Path | None:
    """The training run in whose ``checkpoints/`` folder ``path`` lies, as given or with links resolved; None if none."""
    for given in dict.fromkeys((Path(os.path.abspath(path)), Path(path).resolve())):
        for folder in (given, *given.parents):
            run = folder.parent
            if folder.name == "checkpoints" and (run / "config.json").is_file() and _is_run_directory(run) \
                    and _holds_checkpoints(folder):
                return run
    return None


def _holds_checkpoints(folder: Path) -> bool:
    """Whether ``folder`` (a run's ``checkpoints/``) holds a checkpoint or the pointer to the latest one; a shared
    folder this user may enter but not list holds none of theirs."""
    try:
        return (folder / "latest").exists() or any(child.name.startswith(_PREFIX) for child in folder.iterdir())
    except OSError:
        return False


def _is_run_directory(path: Path) -> bool:
    """Whether ``path`` is a training run's directory: it holds ``checkpoints/``, or (a run stopped before its first
    checkpoint) a ``config.json`` and a ``metrics.jsonl``; and its ``config.json``, if any, is a training
    configuration, not a model's (a model directory may have a ``checkpoints/`` folder of its own), and it holds no
    LoRA adapters."""
    config = path / "config.json"
    looks_like_a_run = (path / "checkpoints").is_dir() or ((path / "metrics.jsonl").is_file() and config.is_file())
    return looks_like_a_run and not (path / ADAPTER_CONFIG).is_file() and not declares_a_model(config)


def training_run_of(path: str | Path) -> Path | None:
    """The run directory that ``path`` is, or whose ``checkpoints/``, checkpoint ``step_N`` or checkpoint's ``model/``
    / ``adapter/`` it is, when it still has its training configuration (``config.json``); None otherwise."""
    # as given first: a checkpoints/ linked to other storage resolves to a folder of another name
    for named in dict.fromkeys((Path(os.path.abspath(path)), Path(path).resolve())):
        candidates = [named, named.parent] if named.name == "checkpoints" else [named]
        checkpoint = named.parent if named.name in ("model", ADAPTER_DIRECTORY) else named
        if checkpoint.name.startswith(_PREFIX) and checkpoint.parent.name == "checkpoints":
            candidates.append(checkpoint.parent.parent)
        for run in candidates:
            if (run / "config.json").is_file() and _is_run_directory(run):
                return run
    return None


def _checkpoint_model(path: Path) -> Path:
    """``path``'s ``model/`` when ``path`` is a checkpoint, the newest intact checkpoint's when it is a run directory
    or its ``checkpoints/`` (``FileNotFoundError`` when it has none), else ``path`` itself. A checkpoint given itself,
    or through its ``model/`` or ``adapter/``, whose model or adapter files have changed since they were written is
    refused (``ValueError`` naming the file)."""
    # a checkpoint: its trainer state, or (that deleted to save room) the list of the files written into it
    if (path / "model" / "config.json").is_file() and ((path / "trainer.pt").is_file() or (path / _FILE_LIST).is_file()):
        _check_intact(path)
        return path / "model"
    if path.name in ("model", ADAPTER_DIRECTORY) and (path.parent / _FILE_LIST).is_file() \
            and _CHECKPOINT_NAME.fullmatch(path.parent.name):
        _check_intact(path.parent)
    if path.name == "checkpoints" and any(next(path.glob(f"{_PREFIX}*/{name}"), None) is not None
                                          for name in ("trainer.pt", _FILE_LIST)):
        path = path.parent
    if _is_run_directory(path):
        checkpoint = latest_checkpoint(path, verify="model")
        if checkpoint is None:
            raise FileNotFoundError(f"{path} is a run directory without a complete, intact checkpoint")
        return checkpoint / "model"
    return path


def _check_intact(checkpoint: Path) -> None:
    """``ValueError`` when a file of the checkpoint's model or adapters is not as written: of another size (a copy or
    a write cut short) or with other bytes; it names the newest intact checkpoint before it."""
    missing = _what_is_missing(checkpoint, parts=_VERIFIED_PARTS["model"])
    damage = f"is incomplete ({missing})" if missing is not None else None
    if damage is None:
        changed = _damage(checkpoint, "model")
        damage = f"is damaged: {changed}" if changed is not None else None
    if damage is None:
        return
    run = training_run_of(checkpoint)
    earlier = (latest_checkpoint(run, before_step=checkpoint_step(checkpoint), verify="model")
               if run is not None and _CHECKPOINT_NAME.fullmatch(checkpoint.name) else None)
    raise ValueError(f"checkpoint {checkpoint} {damage}"
                     + (f"; the newest intact one before it is {earlier}" if earlier is not None else ""))


def load_model_directory(directory: ModelDirectory, *, dtype: str = "float32", trust_remote_code: bool = False,
                         device: str | torch.device | None = None) -> torch.nn.Module:
    """The model that :func:`resolve_model_directory` found, in eval mode: the complete model, or the base model with
    its adapters (:func:`entrorl.trainer.adapters.load_adapted_causal_lm`)."""
    if directory.adapters is not None:
        return load_adapted_causal_lm(directory.adapters, directory.weights, dtype=dtype,
                                      trust_remote_code=trust_remote_code, device=device)
    return load_causal_lm(directory.weights, dtype=dtype, trust_remote_code=trust_remote_code, device=device).eval()


_FILE_LIST = "files.json"


def _write_file_list(checkpoint: Path) -> None:
    """``checkpoint/files.json``: the path (relative, with ``/``) and size in bytes of every file written into it, and
    the CRC-32 of each that a user has no reason to edit (read back once, while the page cache holds it)."""
    files = [path for path in sorted(checkpoint.rglob("*")) if path.is_file()]
    names = [path.relative_to(checkpoint).as_posix() for path in files]
    sizes = {name: path.stat().st_size for name, path in zip(names, files)}
    checksums = {name: _crc32(path) for name, path in zip(names, files) if not name.endswith(_EDITABLE_SUFFIXES)}
    listing = {"files": sizes, _CHECKSUMS: checksums}
    (checkpoint / _FILE_LIST).write_text(json.dumps(listing, indent=1) + "\n", encoding="utf-8")


_EDITABLE_SUFFIXES = (".json", ".txt", ".jinja", ".md")  # what a user may edit in place: a chat template, a model card
_CHECKSUMS = "crc32"  # files.json's key for the files' CRC-32, 8 hex digits each
_READ_CHUNK = 16 * 2**20


def _crc32(path: Path) -> str:
    """The CRC-32 of a file's bytes as 8 hex digits (zlib's: detects any change of up to 32 consecutive bits, and
    misses a random one with probability 2^-32; not a defence against deliberate tampering)."""
    value = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            value = zlib.crc32(chunk, value)
    return f"{value:08x}"


Verification = Literal["model", "all"]
_VERIFIED_PARTS: dict[str, tuple[str, ...]] = {"model": ("model", ADAPTER_DIRECTORY),
                                               "all": ("model", ADAPTER_DIRECTORY, "trainer.pt")}


def _damage(checkpoint: Path, verify: Verification) -> str | None:
    """None when every file of the checkpoint's parts that ``verify`` names ("model": ``model/`` and ``adapter/``,
    what a model reader takes; "all": those and ``trainer.pt``, what a resume takes) still has the CRC-32 that
    ``files.json`` gives it; else which file differs. A checkpoint written without checksums (or without
    ``files.json``) passes, and so does a file missing or of another size than written: :func:`_what_is_missing` and
    the loaders say so in their words."""
    try:
        listed = _read_file_list(checkpoint)
    except ValueError as error:
        return str(error)
    if listed is None:
        return None
    sizes, checksums = listed
    parts = _VERIFIED_PARTS[verify]
    for name, written in checksums.items():
        if name.split("/", 1)[0] not in parts:
            continue
        try:
            if (checkpoint / name).stat().st_size != sizes.get(name):
                continue
            found = _crc32(checkpoint / name)
        except OSError:
            continue
        if found != written:
            return f"{name} does not hold the bytes written: its CRC-32 is {found} instead of {written}"
    return None


def _read_file_list(checkpoint: Path) -> tuple[dict[str, int], dict[str, str]] | None:
    """The sizes and CRC-32s that ``checkpoint/files.json`` lists (no CRC-32s when it was written before them); None
    when the checkpoint has no ``files.json``; ``ValueError`` when it cannot be read."""
    listing = checkpoint / _FILE_LIST
    if not listing.exists():
        return None
    try:
        written = json.loads(listing.read_text(encoding="utf-8"))
        sizes = {str(name): int(size) for name, size in written["files"].items()}
        checksums = {str(name): str(value) for name, value in written.get(_CHECKSUMS, {}).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{_FILE_LIST} cannot be read") from None
    return sizes, checksums


def _what_is_missing(checkpoint: Path, *, parts: tuple[str, ...] | None = None) -> str | None:
    """None when ``checkpoint`` holds everything a resume reads; else what is wrong, e.g. "model/tokenizer.json is
    missing". With a ``files.json``: every file it lists, at its size (a JSON, text or Markdown file may have been
    edited, and only has to be there and not empty); with ``parts`` (e.g. ``("model", "adapter")``), only the files in
    those. Without one (written before checkpoints had it): the trainer state (not with ``parts``), the model's config
    and weights, none of them empty, and the adapters' files when it has adapters (whose checkpoints may leave the
    weights out)."""
    try:
        listed = _read_file_list(checkpoint)
    except ValueError as error:
        return str(error)
    if listed is not None:
        sizes, _ = listed
        for name, size in sizes.items():
            if parts is not None and name.split("/", 1)[0] not in parts:
                continue
            try:
                found = (checkpoint / name).stat().st_size
            except OSError:
                return f"{name} is missing"
            if found == 0 and size > 0:
                return f"{name} is empty"
            if found != size and not name.endswith(_EDITABLE_SUFFIXES):
                return f"{name} has {found} bytes instead of the {size} written"
        return None
    model, adapter = checkpoint / "model", checkpoint / ADAPTER_DIRECTORY
    has_adapters = adapter.exists()
    adapters_whole = all(_non_empty(adapter / name) for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS))
    # an adapters' checkpoint written without the merged model has no weight file at all; one with it, whole ones
    weights_whole = _weights_present(model) or (has_adapters and not any((model / name).exists() for name in _WEIGHT_FILES))
    trainer_state = [] if parts is not None else [(_non_empty(checkpoint / "trainer.pt"), "trainer.pt")]
    for whole, what in (*trainer_state,
                        (_non_empty(model / "config.json"), "model/config.json"), (weights_whole, "the model's weights"),
                        (not has_adapters or adapters_whole, "the adapters' files")):
        if not whole:
            return f"{what}: missing or empty"
    return None


def _complete(checkpoint: Path, parts: tuple[str, ...] | None = None) -> bool:
    return _what_is_missing(checkpoint, parts=parts) is None


def incomplete_checkpoints(run_dir: Path, *, verify: Verification | None = None) -> list[tuple[Path, str]]:
    """The checkpoints of a run directory that a resume would pass over, oldest first, each with what is wrong: the
    incomplete ones and, with ``verify`` (as :func:`latest_checkpoint` takes it), the damaged ones."""
    found = []
    for checkpoint in _checkpoint_folders(Path(run_dir) / "checkpoints"):
        wrong = _what_is_missing(checkpoint)
        if wrong is None and verify is not None and (damage := _damage(checkpoint, verify)) is not None:
            wrong = f"damaged: {damage}"
        if wrong is not None:
            found.append((checkpoint, wrong))
    return found


def checkpoints_with_a_model(run_dir: Path) -> list[Path]:
    """The checkpoints of a run directory whose model (and adapters) are all there, oldest first, resumable or not: a
    trainer state deleted to save room leaves a model that ``entrorl eval`` still reads."""
    return _complete_checkpoints(Path(run_dir) / "checkpoints", _VERIFIED_PARTS["model"])


def set_aside_checkpoints_after(run_dir: Path, step: int | None) -> list[Path]:
    """Move the checkpoints of steps after ``step`` (every one for ``None``, a fresh start) into
    ``checkpoints/passed_over/``, where no resume, evaluation or pruning looks; returns where each went.

    A resume continues from the newest intact checkpoint, so those after it are incomplete or damaged, and they belong
    to the stretch of the run that it discards. Left in place, one whose files are all there would later be taken for
    the run's newest checkpoint (by ``entrorl eval RUN_DIR``, say) over the resumed run's own, and would be kept by the
    pruning in place of an intact one. ``latest`` then names the checkpoint of ``step`` (none on a fresh start)."""
    root = Path(run_dir) / "checkpoints"
    moved = []
    for folder in _checkpoint_folders(root):
        if step is not None and checkpoint_step(folder) <= step:
            continue
        aside = root / PASSED_OVER
        aside.mkdir(exist_ok=True)
        target, copies = aside / folder.name, 0
        while target.exists():  # passed over once before, by an earlier resume
            copies += 1
            target = aside / f"{folder.name}.{copies}"
        os.replace(folder, target)
        moved.append(target)
    if moved:
        _sync_directory(root)
        pointer = root / "latest"  # it named one of them, or will once the next checkpoint is written
        if step is None:
            pointer.unlink(missing_ok=True)
        else:
            atomic_write_text(pointer, f"{_PREFIX}{step:06d}\n", follow_links=False)
    return moved


def _checkpoint_folders(root: Path) -> list[Path]:
    """The folders of ``root`` (a run's ``checkpoints``) named as checkpoints (``step_<N>``), by step."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir()), key=checkpoint_step)


def _complete_checkpoints(root: Path, parts: tuple[str, ...] | None = None) -> list[Path]:
    """The complete checkpoints in ``root`` (a run's ``checkpoints``), oldest first; with ``parts``, complete in
    those (see :func:`_what_is_missing`)."""
    return [p for p in _checkpoint_folders(root) if _complete(p, parts)]


def latest_checkpoint(run_dir: Path, *, before_step: int | None = None, verify: Verification | None = None) -> Path | None:
    """The newest complete checkpoint of a run directory, or None. When ``latest`` names a checkpoint that has lost
    files since it was written, the newest complete one before it is taken, with a warning; when it names an older one
    than the newest complete checkpoint (the pointer's write failed after the checkpoint was in place: a full disk, a
    crash), the newest is taken, with a warning. With ``before_step``, the newest complete one of an earlier step.

    With ``verify`` ("model": its model and adapters, for a reader of the model; "all": every file, for a resume), the
    chosen checkpoint's files are also compared with their CRC-32 (reading them), and a damaged one is passed over, with
    a warning, for the newest intact one before it. For a reader of the model, a checkpoint is complete when its model
    and adapters are (its trainer state may have been deleted to save room)."""
    parts = _VERIFIED_PARTS["model"] if verify == "model" else None
    chosen = _latest_complete_checkpoint(Path(run_dir), before_step, parts)
    while verify is not None and chosen is not None and (damage := _damage(chosen, verify)) is not None:
        damaged = chosen
        chosen = _latest_complete_checkpoint(Path(run_dir), checkpoint_step(damaged), parts)
        _warn_once(f"checkpoint {damaged} is damaged ({damage})",
                   f"using {chosen.name} instead" if chosen is not None else "no intact checkpoint is left")
    return chosen


def _warn_once(problem: str, instead: str) -> None:
    if (problem, instead) not in _WARNED:  # a resume looks for the latest checkpoint more than once
        _WARNED.add((problem, instead))
        logger.warning("%s; %s", problem, instead)


def _latest_complete_checkpoint(run_dir: Path, before_step: int | None,
                                parts: tuple[str, ...] | None = None) -> Path | None:
    """:func:`latest_checkpoint` without ``verify``, complete in ``parts`` (all of it: None)."""
    root = run_dir / "checkpoints"
    if before_step is not None:
        earlier = [p for p in _complete_checkpoints(root, parts) if checkpoint_step(p) < before_step]
        return earlier[-1] if earlier else None
    pointer = root / "latest"
    named_as = pointer.read_text(encoding="utf-8", errors="replace").strip() if pointer.is_file() else ""
    named = root / named_as if named_as else None
    names_a_checkpoint = _CHECKPOINT_NAME.fullmatch(named_as) is not None  # a copy (step_000040.bak) is none
    there = names_a_checkpoint and named.is_dir()
    wrong = _what_is_missing(named, parts=parts) if there else None
    complete = _complete_checkpoints(root, parts)
    chosen = complete[-1] if complete else None
    named_is_newest = (chosen is None or checkpoint_step(chosen) <= checkpoint_step(named)) if there else False
    if there and wrong is None and named_is_newest:
        return named
    if pointer.is_file():
        if there and wrong is None:  # a checkpoint renamed into place, then the pointer's own write cut short
            problem = f"{pointer} names {named_as!r}, but {chosen.name}, a later complete checkpoint, is there"
        elif named is None:
            problem = f"{pointer} is empty"
        elif not names_a_checkpoint:
            problem = f"{pointer} names {named_as!r}, which is not a checkpoint's name (step_<N>)"
        elif not there:
            problem = f"{pointer} names {named_as!r}, which is not there"
        else:
            problem = f"checkpoint {named} is incomplete ({wrong})"
        _warn_once(problem, f"using {chosen.name} instead" if chosen is not None else "no complete checkpoint is left")
    return chosen


def checkpoint_step(checkpoint: Path) -> int:
    """The training step a checkpoint directory (``step_000042``) holds."""
    return int(Path(checkpoint).name[len(_PREFIX):])


def _trainer_state_globals() -> list[Any]:
    """What a trainer state holds besides tensors, containers and numbers, allowed to torch's loader that runs no code
    from the file (``weights_only``): numpy's generator state (an array of ``uint32``), numpy scalars and arrays of
    the usual types (under numpy 2's module names and numpy 1's), and the ``torch.__version__`` string of checkpoints
    written before it was saved as a plain string."""
    core = np._core if hasattr(np, "_core") else np.core
    dtypes = [getattr(np.dtypes, name) for name in ("UInt32DType", "Int64DType", "Int32DType", "Float64DType",
                                                    "Float32DType", "BoolDType") if hasattr(np, "dtypes")]
    names = [(core.multiarray._reconstruct, "_reconstruct"), (core.multiarray.scalar, "scalar")]
    return [*(item for function, name in names for item in (
                (function, f"numpy._core.multiarray.{name}"), (function, f"numpy.core.multiarray.{name}"))),
            np.ndarray, np.dtype, *dtypes, torch.torch_version.TorchVersion]


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state saved in ``checkpoint``, read without running code from the file (``weights_only``: a run
    directory from elsewhere cannot execute anything when resumed); ``ValueError`` naming the file when it cannot be
    read. A part of one's own whose state holds other objects allows their types with
    ``torch.serialization.add_safe_globals`` in the module that registers it."""
    path = Path(checkpoint) / "trainer.pt"
    try:
        with torch.serialization.safe_globals(_trainer_state_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mapped: no second copy in memory
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        if is_out_of_memory(error):  # a memory map refused: the file is fine
            raise out_of_memory_while(f"reading {path}", error) from None
        refused = re.search(r"Unsupported global: GLOBAL (\S+)|but got <class '([^']+)'>", str(error))
        if refused:
            name = refused.group(1) or refused.group(2)
            raise ValueError(f"{path} holds an object of type {name}, which entrorl does not load from a checkpoint "
                             "(loading it could run code from the file); if the run's parts of your own keep such "
                             "objects in their state and you trust the file, allow the type with "
                             f"torch.serialization.add_safe_globals([{name}]) in the module that registers them (one of "
                             "the configuration's `imports`, or the laboratory's --import)") from None
        detail = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", str(error), re.S)
        raise ValueError(f"{path} cannot be read ({detail.group(1) if detail else error}); delete "
                         f"{Path(checkpoint).name} to resume from the checkpoint before it") from None
