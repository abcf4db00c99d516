"""Stage 2 of the ``math`` reward: what the question says about the form of its answer."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["QuestionHints", "read_question"]


@dataclass(frozen=True)
class QuestionHints:
    """What the question says about the form of its answer (the defaults: nothing known).

    * ``percent`` — the answer is a number of percent ("profit __%", "what percentage ...");
    * ``roots`` — ``"real"`` when real roots / solutions are asked for, ``"complex"`` when complex ones
      are, None when the question names no domain;
    * ``rounding`` — the question asks for a rounded or approximate value;
    * ``decimals`` / ``significant`` — the precision it asks for, when it says: decimals for "nearest tenth /
      hundredth / ...", "N decimal places", "nearest cent" (2), "nearest" anything else ("whole number", "mile": 0),
      "保留N位小数", "精确到0.01"; significant digits for "N significant figures / digits";
    * ``question`` — the question's text, in which the order that variables are first named decides which unnamed
      value is whose (the variable-name rule).
    """

    percent: bool = False
    roots: str | None = None
    rounding: bool = False
    decimals: int | None = None
    significant: int | None = None
    question: str = field(default="", repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.roots not in (None, "real", "complex"):
            raise ValueError(f"roots must be None, 'real' or 'complex', got {self.roots!r}")


_PERCENT_QUESTION_RE = re.compile(
    r"percentage|(?:what|how\s+many|which)\s+per\s?cent|(?:in|as\s+an?|by\s+what)\s+per\s?cent"
    r"|(?:_|\?|\(\s*\)|\\square|\\underline\{[^{}]*\})\s*\\?%|\(\s*(?:in\s+)?\\?%\s*\)|\bin\s+\\?%|百分",
    re.IGNORECASE,
)
_REAL_ROOTS_RE = re.compile(
    r"\breal\s+(?:roots?|solutions?|zeros?|zeroes|numbers?|values?|[a-z])\b|\\mathbb\s*\{?R\b|ℝ|实根|实数",
)
_COMPLEX_ROOTS_RE = re.compile(r"\bcomplex\b|\\mathbb\s*\{?C\b|ℂ|复数|复根|虚根", re.IGNORECASE)
_ROUNDING_RE = re.compile(
    r"\bround(?:ed|ing)?\b|\bnearest\b|decimal\s+places?|significant\s+(?:figures|digits)"
    r"|\bapproximate(?:ly)?\b|\\approx|≈|保留|精确到|约等于|近似",
    re.IGNORECASE,
)


_COUNT = r"(?P<count>\d+|one|two|three|four|five|six|seven|eight|nine|ten|一|二|两|三|四|五|六)"
_COUNTS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
           "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6}
# the places "to the nearest ..." names, longest first ("ten-thousandth" before "thousandth"); any other word (whole
# number, integer, mile, dollar, ten) asks for no decimals
_NEAREST_PLACES = (("hundred[- ]thousandth", 5), ("ten[- ]thousandth", 4), ("millionth", 6), ("thousandth", 3),
                   ("hundredth", 2), ("tenth", 1), ("cent", 2), ("[a-z]+", 0))
_NEAREST_RE = re.compile(r"\bnearest\s+(?:" + "|".join(f"(?P<p{index}>{place})" for index, (place, _) in
                                                      enumerate(_NEAREST_PLACES)) + r")s?\b", re.IGNORECASE)
_DECIMAL_PLACES_RE = re.compile(rf"\b{_COUNT}\s+decimal\s+(?:places?|digits?)|保留{_COUNT.replace('count', 'zh_count')}位小数",
                                re.IGNORECASE)
_SIGNIFICANT_RE = re.compile(rf"\b{_COUNT}\s+significant\s+(?:figures?|digits?)", re.IGNORECASE)
_CHINESE_PLACES_RE = re.compile(r"精确到(?:(?P<unit>0\.0*1)|(?P<place>个位|整数|十分位|百分位|千分位))")
_CHINESE_PLACES = {"个位": 0, "整数": 0, "十分位": 1, "百分位": 2, "千分位": 3}


def _count(text: str) -> int:
    return int(text) if text.isdigit() else _COUNTS[text.lower()]


def _asked_precision(question: str) -> tuple[int | None, int | None]:
    """``(decimals, significant digits)`` the question asks its answer to be rounded to, None where it does not say."""
    decimals = significant = None
    if (found := _DECIMAL_PLACES_RE.search(question)) is not None:
        decimals = _count(next(group for group in found.groups() if group is not None))
    elif (found := _NEAREST_RE.search(question)) is not None:
        decimals = next(places for index, (_, places) in enumerate(_NEAREST_PLACES) if found[f"p{index}"] is not None)
    elif (found := _CHINESE_PLACES_RE.search(question)) is not None:
        decimals = len(found["unit"]) - 2 if found["unit"] else _CHINESE_PLACES[found["place"]]
    if (found := _SIGNIFICANT_RE.search(question)) is not None:
        significant = _count(found["count"])
    return decimals, significant


def read_question(question: str | None) -> QuestionHints:
    """What ``question`` asks for (see :class:`QuestionHints`); nothing known for None or non-text.

    A question asks for a percentage when it says "percentage", "what / how many percent", "in
    percent", "(in %)", "in %", has a blank or question mark right before ``%`` ("profit __%") or says
    "百分"; a percentage merely *mentioned* ("a 20% discount") does not count. It asks for real roots
    when it says "real roots / solutions / zeros / numbers / values", "real x", ``\\mathbb{R}`` or
    "实根"/"实数"; for complex ones when it says "complex", ``\\mathbb{C}`` or "复数" (which wins over
    "real" when both appear).
    """
    if not isinstance(question, str):
        return QuestionHints()
    roots = None
    if _COMPLEX_ROOTS_RE.search(question):
        roots = "complex"
    elif _REAL_ROOTS_RE.search(question):
        roots = "real"
    rounding = bool(_ROUNDING_RE.search(question))
    decimals, significant = _asked_precision(question) if rounding else (None, None)
    return QuestionHints(
        percent=bool(_PERCENT_QUESTION_RE.search(question)),
        roots=roots,
        rounding=rounding,
        decimals=decimals,
        significant=significant,
        question=question,
    )
