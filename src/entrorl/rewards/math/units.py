"""A unit after a number (``5 cm``, ``60 km/h``, ``36\\pi \\text{ cm}^2``), which the comparison drops."""

from __future__ import annotations

import re

_NUMBER_TEXT = (r"[-+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d*)?|\d+(?:\.\d*)?|\.\d+)(?:\s*/\s*\d+)?"
                r"|[-+]?\\frac\{[^{}]+\}\{[^{}]+\}")
_UNIT_TAIL_RE = re.compile(
    rf"^(?P<number>{_NUMBER_TEXT})\s*"
    rf"(?P<unit>(?:[A-Za-z]+\.?(?:\s*\^\s*\{{?\d\}}?)?(?:\s*/\s*[A-Za-z]+(?:\s*\^\s*\{{?\d\}}?)?)?\s*){{1,3}})$"
)
#: Single letters read as units after a number ("5 m", "3 s"); other single letters are variables.
_UNIT_LETTERS = frozenset("mgshlLKCFAVWJN")
#: Words that are mathematics, not units, after a number ("3 pi", "2 i").
_MATH_WORDS = frozenset({"pi", "sqrt", "ln", "log", "sin", "cos", "tan", "i", "e", "or", "and", "infty",
                         # scales, which change the value ("1,500 million" is not 1500)
                         "hundred", "hundreds", "thousand", "thousands", "million", "millions", "billion", "billions",
                         "trillion", "trillions", "dozen", "dozens"})


def _strip_unit_tail(s: str) -> str:
    """``s`` without the unit after its number ("12 cm", "60 km/h", "5 m^2" give the number), unchanged when there is
    none or the words after the number are mathematics ("3 pi") or a variable ("2 x")."""
    m = _UNIT_TAIL_RE.match(s)
    if not m:
        return s
    return m.group("number").strip() if _are_unit_words(m.group("unit")) else s


def _are_unit_words(text: str) -> bool:
    """Whether the words of ``text`` can be a unit: none is mathematics or a scale (``pi``, ``million``), nor a single
    letter other than a unit's (``m``, ``s``: a unit; ``x``: a variable)."""
    return not any(word.lower() in _MATH_WORDS or (len(word) == 1 and word not in _UNIT_LETTERS)
                   for word in re.findall(r"[A-Za-z]+", text))


# a unit written as text at the end: "\text{ cm}^2", "\text{ m/s}", "\mathrm{molecules}"
_TEXT_UNIT_RE = re.compile(r"\\(?:text|textrm|mathrm|mbox)\s*\{\s*(?P<unit>[A-Za-z][A-Za-z./ ]*?(?:\^\s*\d)?)\s*\}"
                           r"\s*(?:\^\s*\{?\s*\d\s*\}?)?\s*$")
# a value written with digits, pi, roots, powers and fractions, without a variable: what such a unit may follow
_NUMERIC_VALUE_RE = re.compile(r"(?:[-+\d.,\s(){}^*/]|\\(?:pi|sqrt|frac|times|cdot)(?![A-Za-z]))+")


def _is_numeric_value(value: str) -> bool:
    """Whether ``value`` is written with digits, ``\\pi``, roots, powers and fractions only, a digit or ``\\pi`` among them."""
    return bool(_NUMERIC_VALUE_RE.fullmatch(value) and re.search(r"\d|\\pi", value))


_SPACING_TAIL_RE = re.compile(r"(?:\s|\\[ ,;:]|~)+$")


def _strip_text_unit_tail(s: str) -> str:
    """``s`` without a unit written in ``\\text{}`` (or ``\\mathrm{}``) at its end after a value of digits, ``\\pi``,
    roots and powers (``36\\pi \\text{ cm}^2``, ``6.02 \\times 10^{23} \\text{ molecules}`` give the value), unchanged
    when the value holds a variable or the words are mathematics or a variable's letter."""
    found = _TEXT_UNIT_RE.search(s)
    if found is None:
        return s
    value = _SPACING_TAIL_RE.sub("", s[: found.start()])
    if not _is_numeric_value(value):
        return s
    return value if _are_unit_words(found.group("unit")) else s


# a trailing bracket of words after a value ("8 (in total)", "18 (dollars)", "3 (three)"): a remark or a unit, unless
# one of its words changes the value or the bracket is one letter, a factor ("2(x)")
_BRACKETED_REMARK_RE = re.compile(r"(?P<value>.*?\S)\s*\(\s*(?P<words>[A-Za-z]{2,}(?:\s+[A-Za-z]+)*)\s*\)\s*")
_VALUE_CHANGING_WORDS = frozenset({
    "hundred", "hundreds", "thousand", "thousands", "million", "millions", "billion", "billions", "trillion",
    "trillions", "dozen", "dozens", "squared", "cubed", "negative", "repeating", "recurring", "binary", "octal",
    "hexadecimal", "hex", "base", "least", "most", "percent", "per", "inverse", "reciprocal", "times", "power"})


def _strip_bracketed_remark(s: str) -> str:
    """``s`` without a remark or a unit in brackets after its value (``8 (in total)``, ``18 (dollars)`` give the
    value), unchanged when the value holds a variable or the words could change it (``5 (million)``, ``5 (squared)``,
    ``2(x)``)."""
    found = _BRACKETED_REMARK_RE.fullmatch(s)
    if found is None or _VALUE_CHANGING_WORDS & {word.lower() for word in found["words"].split()}:
        return s
    return found["value"] if _is_numeric_value(found["value"]) else s
