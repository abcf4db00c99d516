"""Brackets in an answer's text: lists split at top-level commas, the inside of one enclosing pair."""

from __future__ import annotations


def _split_top_level(s: str) -> list[str]:
    """``s`` split at commas and semicolons outside brackets (``\\{`` and ``\\}`` count as brackets)."""
    parts, depth, start = [], 0, 0
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s) and s[i + 1] in "{}":
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c in ",;" and depth == 0:
            parts.append(s[start:i])
            start = i + 1
        i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


def _balanced(s: str) -> bool:
    """Whether every bracket of ``s`` closes after it opens (any kind closes any kind)."""
    depth = 0
    for c in s:
        depth += 1 if c in "([{" else -1 if c in ")]}" else 0
        if depth < 0:
            return False
    return depth == 0


def _wrapped(s: str, opener: str, closer: str) -> str | None:
    """The inside of ``s`` when one bracket pair ``opener ... closer`` encloses all of it, else None."""
    if len(s) < len(opener) + len(closer) or not (s.startswith(opener) and s.endswith(closer)):
        return None
    inner = s[len(opener) : len(s) - len(closer)]
    return inner if _balanced(inner) else None
