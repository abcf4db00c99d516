"""Stage 3 of the ``math`` reward: the checkers, and :func:`compare_answers` / :func:`math_equal`."""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from entrorl._checks import caseless
from entrorl.rewards.math.canonical import canonical_answer, has_percent_sign
from entrorl.rewards.math.extract import normalize_answer
from entrorl.rewards.math.limits import JudgeTimeout, MathOptions, _TooLarge, _check_size, _parse_latex, _time_limit
from entrorl.rewards.math.numbers import (
    _Reading, _Value, _distinct, _is_bracketed, _is_list_of_values_set, _is_real, _names_several_variables,
    _numbers_match, _pair_variable_names, _read_numbers, _same_names_on_both_sides
)
from entrorl.rewards.math.question import QuestionHints, read_question

__all__ = [
    "CHECKERS", "Checker", "Comparison", "ComparisonResult", "check_math_verify", "check_numeric", "check_string",
    "compare_answers", "math_equal"
]


class Comparison:
    """One prediction-vs-reference comparison handed to every checker; parses lazily and once.

    ``prediction`` / ``reference`` are the canonical spellings (:func:`canonical_answer`) of
    ``raw_prediction`` / ``raw_reference``, with variable names paired by the variable-name rule
    (:func:`_pair_variable_names`; ``naming_conflict`` says why they cannot be, and is None when they
    can or no side names several variables); ``hints`` what the question asks for; ``percent`` the
    percent reading (numbers of percent, or ``%`` as /100; default: percent when the question asks for
    a percentage). Checkers may leave a ``detail`` (why the values differ) and record an evaluation
    failure in ``problems``.
    """

    def __init__(
        self,
        prediction: str,
        reference: str,
        options: MathOptions,
        hints: QuestionHints | None = None,
        percent: bool | None = None,
    ) -> None:
        self.hints = hints if hints is not None else QuestionHints()
        self.options = options
        self.raw_prediction = prediction
        self.raw_reference = reference
        percent = self.hints.percent if percent is None else percent
        self.percent = percent
        self.prediction = canonical_answer(prediction, percent=percent)
        self.reference = canonical_answer(reference, percent=percent)
        self.naming_conflict: str | None = None
        if self.parsable:
            self.prediction, self.reference, self.naming_conflict = _pair_variable_names(
                self.prediction, self.reference, hints.question
            )
        self.detail: str | None = None
        self.problems: dict[str, str] = {}

    @property
    def parsable(self) -> bool:
        limit = self.options.max_chars
        return 0 < len(self.prediction) <= limit and 0 < len(self.reference) <= limit

    def _parse(self, side: str, s: str) -> list[Any]:
        if not self.parsable:
            return []
        parsed = _parse_latex(s)
        try:
            for item in parsed:
                _check_size(item)
        except _TooLarge as exc:
            self.problems.setdefault(side, f"too large to evaluate ({exc})")
            return []
        return parsed

    @cached_property
    def gold(self) -> list[Any]:
        """Math-Verify parse of the reference (empty if unparsable or too large)."""
        return self._parse("reference", self.reference)

    @cached_property
    def target(self) -> list[Any]:
        """Math-Verify parse of the prediction (empty if unparsable or too large)."""
        return self._parse("answer", self.prediction)

    def _read(self, side: str, s: str) -> _Reading | None:
        if not self.parsable:
            return None
        try:
            return _read_numbers(s)
        except _TooLarge as exc:
            self.problems.setdefault(side, f"too large to evaluate ({exc})")
        except (ValueError, TypeError, ArithmeticError, AttributeError, RecursionError):
            pass
        return None

    @cached_property
    def gold_numbers(self) -> _Reading | None:
        """The reference read as numbers (None if it is not a number or list of numbers)."""
        return self._read("reference", self.reference)

    @cached_property
    def target_numbers(self) -> _Reading | None:
        """The prediction read as numbers (None if it is not a number or list of numbers)."""
        return self._read("answer", self.prediction)


Checker = Callable[[Comparison], bool]


def _canon(s: str) -> str:
    # NFC first: U+037E is ";"; a spacing command, not the row break "\\\\" of a matrix before a space
    return caseless(re.sub(r"\s+|\$|(?<!\\)\\[,!;: ]", "", unicodedata.normalize("NFC", s)))


def check_string(c: Comparison) -> bool:
    """Equal after dropping whitespace, ``$``, LaTeX spacing commands and case, in Unicode NFC (as ``exact_match``)."""
    return _canon(c.prediction) == _canon(c.reference) or _canon(c.raw_prediction) == _canon(c.raw_reference)


def check_math_verify(c: Comparison) -> bool:
    """Math-Verify's symbolic / numeric equivalence of the canonical spellings (False when the
    variable-name rule finds the names cannot be matched: Math-Verify ignores names on one side only)."""
    if c.naming_conflict:
        c.detail = c.naming_conflict
        return False
    if not c.gold or not c.target:
        return False
    if c.gold_numbers is not None and c.target_numbers is not None:
        # numbers on both sides are the numeric checker's to judge: Math-Verify rounds floats to float_rounding
        # decimals, which would make 0.0000001 equal 0.0000002 whatever the tolerance
        return False
    if _is_list_of_values_set(c.prediction) != _is_list_of_values_set(c.reference) and (
            _is_bracketed(c.prediction) or _is_bracketed(c.reference)):
        c.detail = "a set is neither an ordered pair nor an interval"  # Math-Verify matches {1,2} to (1,2), not {2,1}
        return False
    from math_verify import verify

    return bool(verify(c.gold, c.target, float_rounding=c.options.float_rounding, timeout_seconds=None))


def check_numeric(c: Comparison) -> bool:
    """Both sides are numbers or unordered lists of numbers that agree under the tolerance, the
    approximation rule and the roots rule; when a side names several variables, the values of each
    variable agree (the variable-name rule; see the module notes)."""
    if c.naming_conflict:
        c.detail = c.naming_conflict
        return False
    gold, pred = c.gold_numbers, c.target_numbers
    if gold is None or pred is None:
        return False
    gold_pairs, pred_pairs = ([(v.name, v.text) for v in side.values] for side in (gold, pred))
    if _same_names_on_both_sides(pred_pairs, gold_pairs) or any(map(_names_several_variables, (gold_pairs, pred_pairs))):
        return _values_match_by_name(gold, pred, c)
    if not gold.is_list and not pred.is_list:
        return _numbers_match(gold.values[0], pred.values[0], c.options, c.hints)
    return _value_lists_match(gold.values, pred.values, c)


def _values_match_by_name(gold: _Reading, pred: _Reading, c: Comparison) -> bool:
    """Both readings assign the same variables, and each variable the same values (an unordered list)."""
    gold_names = list(dict.fromkeys(v.name for v in gold.values))
    pred_names = list(dict.fromkeys(v.name for v in pred.values))
    if None in gold_names or None in pred_names or set(gold_names) != set(pred_names):
        answer_names, reference_names = (", ".join(str(n) for n in names) for names in (pred_names, gold_names))
        c.detail = f"the answer names {answer_names}, the reference {reference_names}"
        return False
    for name in gold_names:
        gold_values = [v for v in gold.values if v.name == name]
        pred_values = [v for v in pred.values if v.name == name]
        if not _value_lists_match(gold_values, pred_values, c, name):
            return False
    return True


def _value_lists_match(
    gold: Sequence[_Value], pred: Sequence[_Value], c: Comparison, name: str | None = None
) -> bool:
    """``gold`` and ``pred`` hold the same distinct values in any order, after the roots rule; ``name``
    is the variable they are assigned to (for the reason)."""
    options, hints = c.options, c.hints
    of_name = f" for {name}" if name else ""
    gold_values = _distinct(gold, options, hints)
    pred_values = _distinct(pred, options, hints)
    if hints.roots == "real":
        gold_values = [v for v in gold_values if _is_real(v, options)]
        pred_values = [v for v in pred_values if _is_real(v, options)]
    elif hints.roots is None and all(_is_real(v, options) for v in gold_values):
        real = [v for v in pred_values if _is_real(v, options)]
        if len(real) < len(pred_values):
            c.detail = "non-real values in the answer were left out: the reference lists real values only"
            pred_values = real
    if not gold_values:
        c.detail = (f"the reference has no real value{of_name}, and the question asks for real ones" if hints.roots == "real"
                    else f"the reference has no value{of_name}")
        return False
    if len(gold_values) != len(pred_values):
        c.detail = f"the answer has {len(pred_values)} distinct value(s){of_name}, the reference {len(gold_values)}"
        return False
    unmatched = list(pred_values)
    for g in gold_values:
        match = next((p for p in unmatched if _numbers_match(g, p, options, hints)), None)
        if match is None:
            value = f"{name} = {g.text}" if name else g.text
            c.detail = f"reference value {value} is not in the answer"
            return False
        unmatched.remove(match)
    c.detail = None
    return True


#: ``(name, checker)`` pairs; the answers are equivalent when any checker returns True.
CHECKERS: list[tuple[str, Checker]] = [
    ("string", check_string),
    ("numeric", check_numeric),  # before Math-Verify: plain numbers need no LaTeX parse
    ("math_verify", check_math_verify),
]


@dataclass(frozen=True)
class ComparisonResult:
    """The outcome of :func:`compare_answers`: ``equal``, and when not, ``reason`` (why)."""

    equal: bool
    reason: str | None = None
    checker: str | None = None


def _short(s: str, limit: int = 80) -> str:
    s = re.sub(r"\s+", " ", s)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _difference_reason(c: Comparison) -> str:
    for side, text in (("answer", c.raw_prediction), ("reference", c.raw_reference)):
        if side in c.problems:
            return f"could not evaluate {side} {_short(text)}: {c.problems[side]}"
    limit = c.options.max_chars
    for side, canonical, text in (("answer", c.prediction, c.raw_prediction), ("reference", c.reference, c.raw_reference)):
        if len(canonical) > limit:
            return f"could not parse {side} {_short(text)}: longer than max_chars={limit}"
        if not canonical:
            return f"could not parse {side} {_short(text)}"
    if not c.gold and c.gold_numbers is None:
        return f"could not parse reference {_short(c.raw_reference)}"
    if not c.target and c.target_numbers is None:
        return f"could not parse answer {_short(c.raw_prediction)}"
    reason = f"answer {_short(c.raw_prediction)} differs from reference {_short(c.raw_reference)}"
    notes = [c.detail] if c.detail else []
    if c.hints.percent:
        notes.append("the question asks for a percentage, so both are read as numbers of percent")
    elif has_percent_sign(c.raw_prediction):
        notes.append("a percent sign means /100 because the question does not ask for a percentage")
    return reason + (f" ({'; '.join(notes)})" if notes else "")


def compare_answers(
    prediction: str,
    reference: str,
    *,
    question: str | None = None,
    options: MathOptions | None = None,
    checkers: Sequence[tuple[str, Checker]] | None = None,
) -> ComparisonResult:
    """Whether two *already extracted* answers are equivalent, and why not when they are not.

    ``question`` (the prompt) selects the percent, rounding and roots rules (:func:`read_question`).
    The whole comparison is bounded by ``options.timeout`` (see the module notes). Never raises on
    malformed answers: a checker that fails counts as "not equal".
    """
    options = options if options is not None else MathOptions()
    started = time.monotonic()
    try:
        with _time_limit(options.timeout):
            return _compare(prediction, reference, question, options, checkers)
    except JudgeTimeout:
        return ComparisonResult(False, _comparison_timeout_reason(prediction, options, started))


# what Math-Verify reads past, which leaves an answer incomplete: a sign written against the value before it ("5-", not
# the "5 -" of a dash; not the sign of a power or an index, "0^+"), "=" or a product or quotient sign at the end
_DANGLING_OPERATOR_RE = re.compile(
    r"(?:(?<=[^\s^_])-|(?<![\^_])\+|[*/^=]|\\(?:times|cdot|div|pm|mp)(?![A-Za-z]))\s*$")
# an answer that states a bound, not a value: "\\geq 5" ("\\geqslant", "\\geqq"), "\\neq 5", "at least 5", "5 (or more)"
# (canonically "5, more"), which Math-Verify reads as 5; and a relation anywhere, which a reference stating a bound has
_RELATION = r"\\(?:[gl]eq?(?:slant|q)?|[gl]t|neq?|n[gl]eq?(?:slant)?)(?![A-Za-z])|\\not\s*=|[<>≤≥≠]"
_BOUND_START_RE = re.compile(r"\s*(?:" + _RELATION
                             + r"|(?:at\s+(?:least|most)|(?:no\s+)?(?:more|less|fewer)\s+than|over|under|above|below)\b)",
                             re.IGNORECASE)
_BOUND_END_RE = re.compile(r",\s*(?:more|less|fewer|greater|higher|lower|above|below|over|under|larger|smaller)\s*$",
                           re.IGNORECASE)
_RELATION_RE = re.compile(_RELATION)
# a one-sided limit's side: "0^+", "0^{-}", "0+"
_SIDE_RE = re.compile(r"(?:\^\s*\{?\s*(?P<raised>[-+])\s*\}?|(?<=\d)(?P<after>[-+]))\s*$")
# a numeral in a base from 2 to 36: 1011_2, 1234_{5}, FF_{16}
_BASE_NUMERAL_RE = re.compile(r"(?P<digits>[0-9A-Za-z]+)_\{?\s*(?P<base>\d+)\s*\}?")
# a multiple-choice letter and its value, "(C) 12" (from \textbf{(C) } 12); a letter alone, "(C)" or "C"
_CHOICE_WITH_VALUE_RE = re.compile(r"\(\s*(?P<letter>[A-Ea-e])\s*\)\s*(?P<value>[^\s(^_+\-*/=,].*)")
_CHOICE_RE = re.compile(r"\(\s*[A-Ea-e]\s*\)|\s*[A-E]\s*")  # a bare lower-case letter is a constant or variable
# a reference written as a choice and its value, as MATH and AMC write them: an upper-case letter, a space, one value
# (negative ones included); "(b)c" is a product, "(A), (C)" or "(A) 3, (B) 4" several choices
_REFERENCE_CHOICE_RE = re.compile(r"\(\s*(?P<letter>[A-E])\s*\)\s+(?P<value>[^\s(^_+*/=,].*)")
_CHOICE_MARK_RE = re.compile(r"(?<![\w)}\]])\(\s*[A-Ea-e]\s*\)")  # not f(a), x(c) or 2(b): a product or argument


def _one_choice(pattern: re.Pattern, text: str) -> re.Match | None:
    """The letter and value of ``text`` written as one choice with its value, as ``pattern`` reads it
    (:data:`_REFERENCE_CHOICE_RE` for a reference, :data:`_CHOICE_WITH_VALUE_RE` for an answer); text that names
    several choices ("(B), (C)", "(B) 3, (C) 4") is none: for an answer, hedging is no answer."""
    found = pattern.fullmatch(text)
    return found if found is not None and not _CHOICE_MARK_RE.search(found["value"]) else None


def _base_numeral(answer: str) -> tuple[str, int] | None:
    """``(digits, base)`` of an answer written as a numeral in a base (leading zeros left out), None otherwise."""
    found = _BASE_NUMERAL_RE.fullmatch(answer.strip())
    if found is None or not 2 <= int(found["base"]) <= 36:
        return None
    digits, base = found["digits"].upper().lstrip("0") or "0", int(found["base"])
    return (digits, base) if all(int(digit, 36) < base for digit in digits) else None


def _written_form_verdict(prediction: str, reference: str) -> ComparisonResult | None:
    """The verdict where the way an answer is written decides it, before any value is compared (None elsewhere): an
    answer cut off after an operator, a one-sided limit's other side, a bound against a value, a numeral in another
    base (Math-Verify reads ``5-`` as 5, ``0^-`` as ``0^+``, ``\\geq 5`` and ``5 or more`` as 5 and ``1011_2`` as
    1011)."""
    sides = [_SIDE_RE.search(side) for side in (prediction, reference)]
    if all(sides):  # "0^-" against "0^+" or "0+": the sides must agree, and a side is no dangling sign
        if (sides[0]["raised"] or sides[0]["after"]) != (sides[1]["raised"] or sides[1]["after"]):
            return ComparisonResult(False, f"answer {_short(prediction, 40)} is the other side of reference "
                                           f"{_short(reference, 40)}")
    else:
        dangling = _DANGLING_OPERATOR_RE.search(prediction)
        written = _DANGLING_OPERATOR_RE.search(reference)
        if dangling and (written is None or written.group().strip() != dangling.group().strip()):
            return ComparisonResult(False, f"the answer {_short(prediction, 40)} ends with an operator "
                                           f"({dangling.group().strip()}): it is incomplete")
    bounds = [bool(_BOUND_START_RE.match(side) or _BOUND_END_RE.search(side)) for side in (prediction, reference)]
    relations = [bound or bool(_RELATION_RE.search(side)) for bound, side in zip(bounds, (prediction, reference))]
    if bounds[0] and not relations[1]:
        return ComparisonResult(False, f"the answer {_short(prediction, 40)} states a bound, not a value")
    if bounds[1] and not relations[0]:
        return ComparisonResult(False, f"the reference {_short(reference, 40)} states a bound, the answer a value")
    numerals = [_base_numeral(side) for side in (prediction, reference)]
    if None not in numerals:
        equal = numerals[0] == numerals[1]
    elif numerals != [None, None] and (reference if numerals[0] else prediction).strip().isdigit():
        numeral, other = numerals[0] or numerals[1], (reference if numerals[0] else prediction).strip()
        # a plain number is in base 10: equal in base 10, or as one digit, the same in every base it is below
        equal = (other.lstrip("0") or "0") == numeral[0] and (numeral[1] == 10 or len(numeral[0]) == 1)
    else:
        return None  # no numeral, or one against something other than digits: the checkers' to judge
    return ComparisonResult(True, None, "string") if equal else ComparisonResult(
        False, f"answer {_short(prediction, 40)} differs from reference {_short(reference, 40)} (a numeral's digits "
               "and base are compared)")


def _compare(
    prediction: str,
    reference: str,
    question: str | None,
    options: MathOptions,
    checkers: Sequence[tuple[str, Checker]] | None,
) -> ComparisonResult:
    """:func:`compare_answers` without a time limit of its own: :class:`JudgeTimeout` from the caller's
    limit passes through."""
    if not isinstance(prediction, str) or not normalize_answer(prediction):
        return ComparisonResult(False, "no final answer found")
    if not isinstance(reference, str) or not normalize_answer(reference):
        return ComparisonResult(False, "the reference answer is empty")
    hints = read_question(question)
    if hints.percent:
        percent_readings = [True]
    else:  # a reference "96%" accepts 96 (a number of percent) and 0.96 (96/100)
        percent_readings = [True, False] if has_percent_sign(reference) else [False]
    comparisons = [Comparison(prediction, reference, options, hints, p) for p in percent_readings]
    written = _written_form_verdict(comparisons[0].prediction, comparisons[0].reference)
    if written is not None:
        return written
    predicted, expected = _one_choice(_CHOICE_WITH_VALUE_RE, comparisons[0].prediction), _one_choice(_REFERENCE_CHOICE_RE, comparisons[0].reference)
    if predicted is not None and expected is not None and predicted["letter"].upper() != expected["letter"]:
        # another choice, whatever its value ("(D) 0" and "(B) 0" are both products equal to 0 to the checkers)
        return ComparisonResult(False, f"choice ({predicted['letter']}) differs from reference's choice "
                                       f"({expected['letter']})")
    for comparison in comparisons:
        for name, checker in checkers if checkers is not None else CHECKERS:
            try:
                if checker(comparison):
                    return ComparisonResult(True, None, name)
            except JudgeTimeout:
                raise
            except Exception:  # noqa: BLE001 - failing on odd input: "not shown equal"
                continue
    choice = _one_choice(_CHOICE_WITH_VALUE_RE, comparisons[0].prediction)
    if choice:  # "(C) 12": its letter against a letter or another choice's, its value against anything else
        other = _one_choice(_REFERENCE_CHOICE_RE, comparisons[0].reference)
        if other is not None or _CHOICE_RE.fullmatch(comparisons[0].reference):
            part, against = choice["letter"], other["letter"] if other is not None else reference
        else:
            part, against = choice["value"], reference
        chosen = _compare(part, against, question, options, checkers)
        if chosen.equal:
            return chosen
    else:
        choice = _one_choice(_REFERENCE_CHOICE_RE, comparisons[0].reference)
        if choice:  # the reference written so (MATH, AMC): a letter against its letter, anything else against its value
            part = choice["letter"] if _CHOICE_RE.fullmatch(comparisons[0].prediction) else choice["value"]
            chosen = _compare(prediction, part, question, options, checkers)
            if chosen.equal:
                return chosen
    return ComparisonResult(False, _difference_reason(comparisons[0]))


def _timeout_reason(doing: str, options: MathOptions, started: float) -> str:
    elapsed = time.monotonic() - started
    shown = f"{elapsed:.1f}" if elapsed >= 0.995 else f"{elapsed:.2g}"  # 5.0, 123.4, 0.021, 0.96 (and 1.0, not 1)
    return f"timeout: {doing} took more than {options.timeout:g} s (stopped at {shown} s)"


def _comparison_timeout_reason(prediction: Any, options: MathOptions, started: float) -> str:
    return _timeout_reason(f"comparing {_short(str(prediction), 40)} with the reference", options, started)


def math_equal(
    prediction: str,
    reference: str,
    *,
    question: str | None = None,
    options: MathOptions | None = None,
    checkers: Sequence[tuple[str, Checker]] | None = None,
    **option_kwargs: Any,
) -> bool:
    """Whether two *already extracted* answers are mathematically equivalent (see
    :func:`compare_answers`, which also says why not).

    ``option_kwargs`` build a :class:`MathOptions` (``tolerance=1e-6``, ...) when ``options`` is not
    given. Never raises on malformed answers.
    """
    if options is None:
        options = MathOptions(**option_kwargs)
    elif option_kwargs:
        raise ValueError("give either options or option keyword arguments, not both")
    return compare_answers(prediction, reference, question=question, options=options, checkers=checkers).equal
