"""The record type every loader produces, and the error every loader raises on bad input."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DataError", "PromptRecord"]


@dataclass(frozen=True)
class PromptRecord:
    """One training / evaluation prompt.

    ``prompt``  the text given to the policy (never empty; stored exactly as read, not stripped).
    ``answer``  the reference answer as a string (numbers are converted with ``str``), or ``None`` when
                the data set has none and the loader was told not to require one.
    ``meta``    every other field kept with the record (JSON-able values only).
    ``source``  where the record came from, for error messages and audits: ``"file.jsonl:17"``
                (1-based line number) for line-oriented files, ``"file.parquet[3]"`` (0-based row index)
                for row-oriented ones.

    The dataclass is frozen, but ``meta`` is a plain dict: records are not hashable.
    """

    prompt: str
    answer: str | None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"


class DataError(ValueError):
    """Malformed prompt data. The message names the file and the line (or row), what is wrong and
    what was expected. ``path`` and ``location`` carry the same information for programs."""

    def __init__(self, message: str, *, path: str | None = None, location: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.location = location
