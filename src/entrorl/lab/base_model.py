"""The laboratory's base model: a tiny Qwen2 pretrained on diverse, partly wrong demonstrations.

Like an SFT model before RL, it starts with real entropy at the decision points (several valid
demonstrations per problem) and imperfect accuracy (a share of the demonstrations are wrong). It is built
once per specification and cached; the same specification and seed rebuild identical weights.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError

from entrorl._checks import check_int, is_real_number
from entrorl._files import refuse_a_name_that_is_not_utf8
from entrorl.lab.tasks import available_tasks, get_task, sft_corpus
from entrorl.lab.tiny_model import build_char_tokenizer, build_tiny_qwen2, save_quietly
from entrorl.modeling import refuse_files_this_user_cannot_read, unreadable_weight_file
from entrorl.trainer.checkpoint import UnlockableFile, lock_file, nearest_existing, written_by_another_live_process

logger = logging.getLogger(__name__)

__all__ = ["BaseModelSpec", "build_base_model", "default_cache_dir", "sft_batches", "supervised_loss"]

# part of every cache key: raised when the data a specification trains on changes (2: rg_arithmetic's split by parse tree)
_FORMAT_VERSION = 2


@dataclass(frozen=True)
class BaseModelSpec:
    """Everything that determines the base model's weights."""

    tasks: tuple[str, ...] = ("sum_chain", "countdown", "rg_arithmetic")
    problems_per_task: int = 3000
    demos_per_problem: int = 2
    wrong_fraction: float = 0.3
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 256
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        counts = ("problems_per_task", "demos_per_problem", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                  "max_position_embeddings", "steps", "batch_size")
        for name in counts:
            object.__setattr__(self, name, check_int(getattr(self, name), f"BaseModelSpec.{name}", minimum=1))
        object.__setattr__(self, "seed", check_int(self.seed, "BaseModelSpec.seed"))
        if isinstance(self.tasks, str) or not isinstance(self.tasks, (tuple, list)) or not self.tasks:
            raise ValueError(f"BaseModelSpec.tasks must be a list of lab task names ({', '.join(available_tasks())}), "
                             f"got {self.tasks!r}")
        for task in self.tasks:
            get_task(task)  # an unknown name is refused here, before a cache folder is made for it
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if not (is_real_number(self.wrong_fraction) and 0.0 <= self.wrong_fraction <= 1.0):
            raise ValueError(f"BaseModelSpec.wrong_fraction must be a number in [0, 1], got {self.wrong_fraction!r}")
        if not (is_real_number(self.lr) and math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"BaseModelSpec.lr must be a finite number >= 0, got {self.lr!r}")
        for name in ("wrong_fraction", "lr"):  # as Python floats, so that equal specifications share one cache key
            object.__setattr__(self, name, float(getattr(self, name)))

    def key(self) -> str:
        payload = json.dumps({"version": _FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """``$ENTRORL_CACHE`` (``~`` expanded, made absolute: the runs record where their model is) or ``~/.cache/entrorl``."""
    given = os.environ.get("ENTRORL_CACHE")  # set but empty: the default
    return Path(os.path.abspath(os.path.expanduser(given))) if given else Path.home() / ".cache" / "entrorl"


def sft_batches(pairs: list[tuple[str, str]], tokenizer, *, batch_size: int, seed: int):
    """Endless shuffled batches of ``(input_ids, attention_mask, loss_mask)`` for prompt/completion pairs:
    the loss covers the completion and the EOS token, never the prompt or the padding. Each pass over the pairs
    gives ``len(pairs) // batch_size`` batches (the rest waits for a later pass); fewer pairs than ``batch_size``
    give batches of all of them."""
    if not pairs:
        raise ValueError("sft_batches: no prompt/completion pairs to train on")
    batch_size = min(check_int(batch_size, "sft_batches: batch_size", minimum=1), len(pairs))
    rng = random.Random(seed)
    encoded = []
    for prompt, completion in pairs:
        prompt_ids = tokenizer(prompt)["input_ids"]
        completion_ids = tokenizer(completion)["input_ids"] + [tokenizer.eos_token_id]
        encoded.append((prompt_ids + completion_ids, len(prompt_ids)))
    order = list(range(len(encoded)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = [encoded[i] for i in order[start : start + batch_size]]
            width = max(len(ids) for ids, _ in rows)
            input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
            for row, (ids, prompt_length) in enumerate(rows):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention[row, : len(ids)] = 1
                loss_mask[row, prompt_length : len(ids)] = True
            yield input_ids, attention, loss_mask


def supervised_loss(model, input_ids: torch.Tensor, attention: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Token-mean negative log-likelihood of the masked tokens (next-token prediction)."""
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
    targets = input_ids[:, 1:]
    mask = loss_mask[:, 1:]
    losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    return (losses * mask.reshape(-1)).sum() / mask.sum().clamp(min=1)


def _train(spec: BaseModelSpec, directory: Path, progress=None) -> dict:
    with torch.random.fork_rng(devices=[]):  # seeded for the run, leaving the caller's generator as it was
        torch.manual_seed(spec.seed)
        return _train_seeded(spec, directory, progress)


def _train_seeded(spec: BaseModelSpec, directory: Path, progress=None) -> dict:
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(
        len(tokenizer), hidden_size=spec.hidden_size, num_layers=spec.num_layers, num_heads=spec.num_heads,
        num_kv_heads=spec.num_kv_heads, max_position_embeddings=spec.max_position_embeddings, seed=spec.seed,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    pairs = []
    for index, name in enumerate(spec.tasks):
        pairs += sft_corpus(get_task(name), spec.problems_per_task, seed=spec.seed + 7919 * index,
                            wrong_fraction=spec.wrong_fraction, demos_per_problem=spec.demos_per_problem)
    batches = sft_batches(pairs, tokenizer, batch_size=spec.batch_size, seed=spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 50) * max(0.1, 1.0 - step / spec.steps)
    )
    model.train()
    losses = []
    for step in range(spec.steps):
        loss = supervised_loss(model, *next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, spec.steps, losses[-1])
    save_quietly(model, tokenizer, directory)
    return {"spec": asdict(spec), "key": spec.key(), "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
            "corpus_pairs": len(pairs), "final_loss": sum(losses[-50:]) / min(50, len(losses)),
            "loss_curve": losses[:: max(1, len(losses) // 100)]}


def lab_cache_root(cache_dir: Path | None = None, *, create: bool = True) -> Path:
    """``<cache>/lab``, where base models are kept, created if need be (checked only, without ``create``: its
    nearest existing folder must be writable); ``ValueError`` naming the cache (and ``ENTRORL_CACHE``, which moves
    it) when it cannot be created or written, or its name is not UTF-8 (the base model's tokenizer is saved there)."""
    root = (cache_dir or default_cache_dir()) / "lab"
    refuse_a_name_that_is_not_utf8(root, "the laboratory's cache (ENTRORL_CACHE)")
    existing = nearest_existing(root)
    problem = None
    if not existing.is_dir():
        problem = f"cannot be created: {existing} is a file"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = "cannot be written (permissions, or a read-only filesystem)"
    elif create:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            problem = f"cannot be created ({error.strerror or error})"
    if problem is not None:
        raise ValueError(f"the laboratory's cache {root} {problem}; point ENTRORL_CACHE at a writable folder")
    return root


def cached_base_model(spec: BaseModelSpec, cache_dir: Path | None = None, *, say: bool = True) -> Path | None:
    """The cache's directory of the base model of ``spec`` when it holds a whole one (its ``base.json`` is written
    last, and each weight file's header reads), else None; an entry whose weights are damaged is said (with
    ``say``), to be rebuilt. ``PermissionError`` when this user may not read its files (a cache shared by a teammate
    whose files are not readable to others), which no rebuild would mend."""
    final = (cache_dir or default_cache_dir()) / "lab" / f"base-{spec.key()}"
    if not (final.is_dir() and (final / "base.json").is_file()):
        return None
    refuse_files_this_user_cannot_read(final, advice="ask the cache's owner to make it readable (chmod -R a+rX), or "
                                                     "point ENTRORL_CACHE at a cache of your own")
    damaged = unreadable_weight_file(final)
    if damaged is not None:
        if say:
                logger.warning("the cached base model's %s cannot be read (damaged or truncated): building it again",
                           damaged)
        return None
    return final


def build_base_model(spec: BaseModelSpec, *, cache_dir: Path | None = None, rebuild: bool = False, progress=None) -> Path:
    """The cached base model directory for ``spec`` (trained on first use, atomically, and again when its weights are
    damaged; a cache that holds it is only read, so it may be read-only). Processes that need the same uncached model
    at once train it once: the others wait for it (a lock file in the cache) and read it."""
    cached = None if rebuild else cached_base_model(spec, cache_dir)
    if cached is not None:
        return cached
    root = lab_cache_root(cache_dir)
    final = root / f"base-{spec.key()}"
    with _building(root / f".base-{spec.key()}.lock", final):
        cached = None if rebuild else cached_base_model(spec, cache_dir, say=False)
        if cached is not None:
            return cached  # built by the process this one waited for
        return _build(spec, final, root, progress)


@contextlib.contextmanager
def _building(lock_path: Path, final: Path):
    """Hold the lock of building ``final`` (an exclusive ``flock`` of ``lock_path``, which holds the builder's process
    id), waiting, with a word, while another process holds it; without locks (not POSIX, or a filesystem without
    them) builds are not serialised."""
    try:
        handle, _ = lock_file(lock_path, waiting=lambda holder: logger.warning(
            "process %s is building the base model %s; waiting for it", holder, final.name))
    except UnlockableFile:
        yield
        return
    with handle:  # the lock goes with the file's closing, however the build ends
        yield


def _build(spec: BaseModelSpec, final: Path, root: Path, progress) -> Path:
    """Train the base model of ``spec`` into a temporary folder of ``root``, then rename it to ``final``."""
    temporary = root / f".base-{spec.key()}.tmp-{os.getpid()}"
    for stale in root.glob(f".base-{spec.key()}.tmp-*"):  # this one's, and those of builds killed on their way
        if not written_by_another_live_process(stale):
            shutil.rmtree(stale, ignore_errors=True)
    temporary.mkdir()
    try:
        info = _train(spec, temporary, progress=progress)
        (temporary / "base.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
    except (OSError, SafetensorError) as error:
        if isinstance(error, OSError) and error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise  # not a lack of room (a memory refusal, a permission): as it is
        raise OSError(f"the base model cannot be written into the cache {root} ({error}): free space there, or point "
                      "ENTRORL_CACHE at a folder with room") from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return final
