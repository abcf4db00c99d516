"""An endless, deterministic, resumable stream of prompts, epoch by epoch."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from functools import cached_property
from typing import Any

import numpy as np

from entrorl._checks import check_int
from entrorl.data.records import PromptRecord

__all__ = ["PromptStream"]


class PromptStream:
    """Deals records in epochs, forever.

    Epoch ``e`` visits every record exactly once, in the order
    ``numpy.random.default_rng((seed, e)).permutation(len(records))`` (or in file order when
    ``shuffle=False``). The order depends only on ``seed``, the epoch number and the number of
    records — never on a global random state — so two streams built alike deal the same batches,
    and :meth:`state_dict` / :meth:`load_state_dict` resume a stream exactly where it stopped.

    ``next_batch(n)`` returns ``n`` pairs ``(record_index, record)``, crossing epoch boundaries
    seamlessly (a batch may end one epoch and begin the next; ``n`` may exceed the data set size).
    """

    def __init__(self, records: Iterable[PromptRecord], *, seed: int = 0, shuffle: bool = True) -> None:
        self._records = tuple(records)
        if not self._records:
            raise ValueError("PromptStream: no records; expected at least one")
        strangers = [index for index, record in enumerate(self._records) if not isinstance(record, PromptRecord)]
        if strangers:
            raise TypeError(f"PromptStream: records must be PromptRecords (entrorl.data.load_prompts makes them); "
                            f"record {strangers[0]} is a {type(self._records[strangers[0]]).__name__}")
        self._seed = check_int(seed, "PromptStream: seed", minimum=0)
        if not isinstance(shuffle, bool):
            raise TypeError(f"PromptStream: shuffle must be True or False, got {shuffle!r}")
        self._shuffle = shuffle
        self._epoch = 0
        self._position = 0
        self._cached: tuple[int, np.ndarray] | None = None

    # ---- inspection -------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The epoch the next record will come from (0-based)."""
        return self._epoch

    @property
    def position(self) -> int:
        """How many records of the current epoch have been dealt."""
        return self._position

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def shuffle(self) -> bool:
        return self._shuffle

    @property
    def records(self) -> tuple[PromptRecord, ...]:
        return self._records

    def __len__(self) -> int:
        """The number of records (one epoch)."""
        return len(self._records)

    @cached_property
    def records_digest(self) -> str:
        """SHA-256 of the records' prompts (their whole conversations, when given as chat messages), answers and
        fields, in order (not of where they were read from): two streams over the same rows have the same digest, a
        row edited in place gives another."""
        digest = hashlib.sha256()
        for record in self._records:
            digest.update(json.dumps([record.as_given(), record.answer, record.meta], sort_keys=True, default=str,
                                     ensure_ascii=False).encode("utf-8"))
            digest.update(b"\n")
        return digest.hexdigest()

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The record indices of ``epoch`` in the order they are dealt (a fresh int64 array)."""
        return self._order(check_int(epoch, "PromptStream.epoch_order: epoch", minimum=0)).copy()

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            n = len(self._records)
            if self._shuffle:
                order = np.random.default_rng((self._seed, epoch)).permutation(n).astype(np.int64)
            else:
                order = np.arange(n, dtype=np.int64)
            self._cached = (epoch, order)
        return self._cached[1]

    # ---- dealing ----------------------------------------------------------------------------

    def next_batch(self, n: int) -> list[tuple[int, PromptRecord]]:
        """The next ``n`` records as ``(index into records, record)`` pairs."""
        n = check_int(n, "PromptStream.next_batch: n", minimum=0)
        size = len(self._records)
        out: list[tuple[int, PromptRecord]] = []
        while len(out) < n:
            order = self._order(self._epoch)
            take = min(n - len(out), size - self._position)
            for idx in order[self._position : self._position + take].tolist():
                out.append((idx, self._records[idx]))
            self._position += take
            if self._position == size:
                self._epoch += 1
                self._position = 0
        return out

    # ---- checkpointing ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: ``epoch`` and ``position`` (what resuming needs), plus ``seed``, ``shuffle``,
        ``num_records`` and ``records_digest`` (checked on load, so a state is not applied to another stream)."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self._seed,
            "shuffle": self._shuffle,
            "num_records": len(self._records),
            "records_digest": self.records_digest,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict`. ``epoch`` and ``position`` are required; ``seed``, ``shuffle``,
        ``num_records`` and ``records_digest``, when present, must match this stream (``ValueError`` otherwise)."""
        if not isinstance(state, Mapping):
            raise TypeError(f"PromptStream.load_state_dict: expected a mapping, got {type(state).__name__}")
        for key in ("epoch", "position"):
            if key not in state:
                raise ValueError(f"PromptStream.load_state_dict: state has no {key!r} (keys: {sorted(state)})")
        epoch, position = (check_int(state[key], f"PromptStream.load_state_dict: {key}", minimum=0)
                           for key in ("epoch", "position"))
        expected = {"seed": self._seed, "shuffle": self._shuffle, "num_records": len(self._records)}
        for key, mine in expected.items():
            if key in state and state[key] != mine:
                raise ValueError(
                    f"PromptStream.load_state_dict: the state was saved with {key}={state[key]!r} but this stream "
                    f"has {key}={mine!r}; resuming would not continue the same sequence"
                )
        if "records_digest" in state and state["records_digest"] != self.records_digest:
            raise ValueError(
                "PromptStream.load_state_dict: the state was saved over other records (as many, but a prompt, an "
                "answer or a field differs); resuming would not continue the same sequence"
            )
        if position >= len(self._records):
            raise ValueError(
                f"PromptStream.load_state_dict: position {position} is out of range for {len(self._records)} records"
            )
        self._epoch = epoch
        self._position = position
