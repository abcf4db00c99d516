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
    * ``question`` — the question's text, in which the order that variables are first named decides which unnamed
      value is whose (the variable-name rule).
    """

    percent: bool = False
    roots: str | None = None
    rounding: bool = False
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
    return QuestionHints(
        percent=bool(_PERCENT_QUESTION_RE.search(question)),
        roots=roots,
        rounding=bool(_ROUNDING_RE.search(question)),
        question=question,
    )
