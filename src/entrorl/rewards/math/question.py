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
    * ``decimals`` / ``significant`` — the precision it asks for, when it says so: decimals for "nearest tenth /
      hundredth / ... / 0.01 / 100th", "the tenths place", "N decimal places", "N decimals", "nearest cent" (2),
      "nearest whole number / integer / unit / dollar", "as a whole number" (0), "保留N位小数", "小数点后N位",
      "保留整数", "精确到0.01 / 1 / 百分位"; significant digits for "N significant figures", "N sig figs", "N s.f.",
      "N位有效数字"; None when it does not say (the last statement wins);
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
# what "to the nearest" may round to: a place, a unit of count or of measure ("the nearest vertex" rounds nothing)
_NEAREST_TARGETS = (
    r"(?:hundred[- ]|ten[- ])?(?:tenth|hundredth|thousandth|millionth)s?|0?\.0*1|10+(?:th|ths)|whole|integers?|units?|ones?"
    r"|tens?|hundreds?|thousands?|millions?|billions?|cents?|dollars?|euros?|pounds?|penn(?:y|ies)|percent(?:age)?"
    r"|degrees?|radians?|seconds?|minutes?|hours?|days?|weeks?|months?|years?|inch(?:es)?|f(?:oo|ee)t|yards?|miles?"
    r"|(?:milli|centi|kilo)?(?:met(?:er|re)s?|grams?|lit(?:er|re)s?)|ounces?|gallons?|square|cubic|kg|km|cm|mm|m|g")
_ROUNDING_RE = re.compile(
    r"\bround(?:ed|ing)\b|\bround\s+(?:off|up|down|to|your|the\s+(?:answer|result|value|number)|it|each|all|this|that"
    r"|these|them|final)\b|(?:^|[.;:!?])\s*round\b(?![- ](?:trips?|robin|tables?))"
    rf"|\bnearest\s+(?:{_NEAREST_TARGETS})\b|decimal\s+places?|significant\s+(?:figures|digits)|\bsig\.?\s*figs?\b"
    r"|\bs\.\s?f\.|\b(?:\d+|one|two|three|four|five|six)\s+decimals\b|\bapproximate(?:ly)?\b|\\approx|≈"
    r"|保留(?:到|整数|小数|\S{0,2}位|有效)|精确到|四舍五入|约等于|近似",
    re.IGNORECASE,
)


_COUNT = r"(?P<count>\d+|one|two|three|four|five|six|seven|eight|nine|ten|一|二|两|三|四|五|六|七|八|九)"
_COUNTS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
           "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
# the decimal places named by a word, longest first ("ten-thousandth" before "thousandth")
_PLACES = (("hundred[- ]thousandth", 5), ("ten[- ]thousandth", 4), ("millionth", 6), ("thousandth", 3),
           ("hundredth", 2), ("tenth", 1))
_PLACE_WORDS = "|".join(place for place, _ in _PLACES)
_WHOLE = r"whole(?:\s+numbers?)?|integers?|units?|ones?|dollars?"
_CHINESE_PLACES = {"个位": 0, "整数": 0, "十分位": 1, "百分位": 2, "千分位": 3, "万分位": 4}


def _place_decimals(word: str) -> int:
    return next(places for place, places in _PLACES if re.fullmatch(f"{place}s?", word, re.IGNORECASE))


def _count(text: str) -> int:
    return int(text) if text.isdigit() else _COUNTS[text.lower()]


# how a question states the precision it asks for: (pattern, decimals read from the match); the last one stated wins
_DECIMALS_STATED = (
    (re.compile(rf"\b{_COUNT}\s+decimals?\b(?:\s+(?:places?|digits?))?", re.IGNORECASE), lambda m: _count(m["count"])),
    (re.compile(rf"\bnearest\s+(?P<word>(?:{_PLACE_WORDS})s?)\b|\b(?P<place>(?:{_PLACE_WORDS})s?)\s+place\b",
                re.IGNORECASE), lambda m: _place_decimals(m["word"] or m["place"])),
    (re.compile(r"\bnearest\s+(?P<unit>0?\.0*1)\b"), lambda m: len(m["unit"].split(".")[1])),
    (re.compile(r"\bnearest\s+(?P<power>10+)(?:th|ths)\b", re.IGNORECASE), lambda m: len(m["power"]) - 1),
    (re.compile(r"\bnearest\s+cents?\b", re.IGNORECASE), lambda m: 2),
    (re.compile(rf"\bnearest\s+(?:{_WHOLE})\b|\bround(?:ed)?\s+(?:\w+\s+){{0,3}}?(?:to|as)\s+(?:an?\s+)?"
                r"(?:whole\s+numbers?|integers?)\b", re.IGNORECASE), lambda m: 0),
    (re.compile(rf"保留{_COUNT}位小数|小数点后{_COUNT.replace('count', 'after')}位"),
     lambda m: _count(m["count"] or m["after"])),
    (re.compile(r"保留整数|精确到\s*(?:个位|整数|1(?![\d.]))"), lambda m: 0),
    (re.compile(r"精确到\s*(?P<unit>0\.0*1)|到(?P<place>个位|十分位|百分位|千分位|万分位)"),
     lambda m: len(m["unit"]) - 2 if m["unit"] else _CHINESE_PLACES[m["place"]]),
)
_SIGNIFICANT_STATED = re.compile(
    rf"\b{_COUNT}\s+(?:significant\s+(?:figures?|digits?)|sig(?:nificant)?\.?\s*(?:figs?|digits?)\b\.?|s\.\s?f\.)"
    rf"|保留?{_COUNT.replace('count', 'zh')}位有效数字", re.IGNORECASE)


def _asked_precision(question: str) -> tuple[int | None, int | None]:
    """``(decimals, significant digits)`` the question asks its answer to be rounded to, None where it does not say so
    in a way read here (the last statement of each, the instruction usually closing the question: "... the nearest
    vertex. Round to the nearest tenth.")."""
    stated = [(found.start(), read(found)) for pattern, read in _DECIMALS_STATED for found in pattern.finditer(question)]
    decimals = max(stated)[1] if stated else None
    significant = [found for found in _SIGNIFICANT_STATED.finditer(question)]
    return decimals, (_count(significant[-1]["count"] or significant[-1]["zh"]) if significant else None)


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
