"""The record type every loader produces, and the error every loader raises on bad input."""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DataError", "PromptRecord", "check_prompt_template", "ends_with_the_prompt"]


def check_prompt_template(template: str) -> str:
    """``template`` if ``template.format(prompt=...)`` inserts the prompt and needs nothing else; ``ValueError``
    otherwise (not a string, another field such as ``{question}``, a lone brace, or ``{{prompt}}``, which is a
    literal)."""
    if not isinstance(template, str):
        raise ValueError(f"prompt template {template!r} is a {type(template).__name__}, not a string with a {{prompt}} "
                         "field")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise ValueError(f"prompt template {template!r} is not a valid format string ({error}); write {{{{ and }}}} "
                         "for literal braces") from None
    others = sorted({name for name in fields if name != "prompt"})
    if others:
        raise ValueError(f"prompt template {template!r} has field(s) {others}; only {{prompt}} is filled in "
                         "(write {{ and }} for literal braces)")
    if not fields:
        raise ValueError(f"prompt template {template!r} has no {{prompt}} field, so every prompt would be dropped"
                         + (" ({{prompt}} is a literal, not a field)" if "{{prompt}}" in template else ""))
    try:  # what parsing does not see: fields nested in a format spec, bad specs and conversions
        template.format(prompt="a prompt")
    except (KeyError, IndexError, ValueError, AttributeError) as error:
        raise ValueError(f"prompt template {template!r} cannot be filled with a prompt ({type(error).__name__}: {error})") from None
    return template


def ends_with_the_prompt(messages: Any, prompt: str) -> bool:
    """Whether the conversation ``messages`` ends with the user's turn whose content is ``prompt``."""
    return (bool(messages) and isinstance(messages[-1], dict) and messages[-1].get("role") == "user"
            and messages[-1].get("content") == prompt)


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
    ``messages`` the conversation, when the data gave the prompt as chat messages (``[{"role": "user",
                "content": ...}, ...]``, TRL's conversational format and verl's prompt column), ending with the
                user's turn, whose content ``prompt`` then is; None for a prompt given as text.

    The dataclass is frozen, but ``meta`` is a plain dict: records are not hashable.
    """

    prompt: str
    answer: str | None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"
    messages: tuple[dict[str, Any], ...] | None = None

    def __post_init__(self) -> None:
        if self.messages is not None and not ends_with_the_prompt(self.messages, self.prompt):
            raise ValueError(f"PromptRecord ({self.source}): the conversation must end with the user's turn, whose "
                             "content is the prompt; give both (a changed prompt: change its last message too)")

    def as_given(self) -> str | list[dict[str, Any]]:
        """The prompt as the data gave it: its text, or its conversation."""
        return self.prompt if self.messages is None else list(self.messages)

    def conversation(self) -> dict[str, Any]:
        """``{"messages": [...]}``, the whole conversation, for a prompt given as chat messages (files that show the
        prompt, the user's last turn, show it beside); ``{}`` for one given as text."""
        return {} if self.messages is None else {"messages": [dict(message) for message in self.messages]}


class DataError(ValueError):
    """Malformed prompt data. The message names the file and the line (or row), what is wrong and
    what was expected. ``path`` and ``location`` carry the same information for programs."""

    def __init__(self, message: str, *, path: str | None = None, location: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.location = location
