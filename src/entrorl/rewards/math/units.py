"""A unit after a number (``5 cm``, ``60 km/h``), which the comparison drops."""

from __future__ import annotations

import re

_NUMBER_TEXT = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:\s*/\s*\d+)?|[-+]?\\frac\{[^{}]+\}\{[^{}]+\}"
_UNIT_TAIL_RE = re.compile(
    rf"^(?P<number>{_NUMBER_TEXT})\s*"
    rf"(?P<unit>(?:[A-Za-z]+\.?(?:\s*\^\s*\{{?\d\}}?)?(?:\s*/\s*[A-Za-z]+(?:\s*\^\s*\{{?\d\}}?)?)?\s*){{1,3}})$"
)
#: Single letters read as units after a number ("5 m", "3 s"); other single letters are variables.
_UNIT_LETTERS = frozenset("mgshlLKCFAVWJN")
#: Words that are mathematics, not units, after a number ("3 pi", "2 i").
_MATH_WORDS = frozenset({"pi", "sqrt", "ln", "log", "sin", "cos", "tan", "i", "e", "or", "and", "infty"})


def _strip_unit_tail(s: str) -> str:
    """``s`` without the unit after its number ("12 cm", "60 km/h", "5 m^2" give the number), unchanged when there is
    none or the words after the number are mathematics ("3 pi") or a variable ("2 x")."""
    m = _UNIT_TAIL_RE.match(s)
    if not m:
        return s
    words = re.findall(r"[A-Za-z]+", m.group("unit"))
    for word in words:
        if word.lower() in _MATH_WORDS or (len(word) == 1 and word not in _UNIT_LETTERS):
            return s
    return m.group("number").strip()
