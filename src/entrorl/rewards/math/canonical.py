"""The canonical spelling of an answer, before it is compared (stage 3 of the ``math`` reward)."""

from __future__ import annotations

import re
from decimal import Decimal, localcontext
from fractions import Fraction

from entrorl.rewards.math.extract import normalize_answer, superscripts_as_powers
from entrorl.rewards.math.units import _UNIT_LETTERS, _strip_bracketed_remark, _strip_text_unit_tail, _strip_unit_tail

__all__ = ["canonical_answer", "has_percent_sign"]


_UNICODE_SPELLINGS = {
    "\u2212": "-",
    "\u2013": "-",
    "π": "\\pi ",
    "圆周率": "\\pi ",
    "√": "\\sqrt",
    "∞": "\\infty ",
    "×": "\\times ",
    "÷": "\\div ",
    "·": "\\cdot ",
    "°": "^\\circ",
    "，": ",",
    "；": ";",
    "％": "%",
}
_SIZING_RE = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big|bigg|Bigg)(?:\.|(?![A-Za-z]))\s*")
_TEXT_COMMAND_RE = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
# (?<!\s) in the patterns that begin with blanks: tried once where a run of blanks starts, not again from each of
# its blanks (quadratic); a connective may also start right after blanks an earlier one took ("1 \quad or \quad 2")
_CONNECTIVE_RE = re.compile(r"(?:(?<!\s)\s+)?(?:\\text\s*\{\s*(?:or|and)\s*\}|\\(?:quad|qquad)|\bor\b|\band\b)\s*")
_DEGREE_RE = re.compile(r"(?<!\s)\s*(?:\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree)\s*(?:[CF](?![A-Za-z]))?")
_CURRENCY_RE = re.compile(r"^([-+]?)\s*(?:\\\$|\$|US\$|USD|€|£|¥|\\euro|\\pounds)\s*")
_PERCENT_SIGN = r"(?<!\s)(?:\s*\\%|\s*%|\s*\\text\s*\{\s*\\?%\s*\}|\s+per\s?cent\b|\s*\\text\s*\{\s*per\s?cent\s*\})"
_PERCENT_NUMBER_RE = re.compile(r"(?<![\d.])(-?(?:\d+(?:\.\d*)?|\.\d+))" + _PERCENT_SIGN)  # from a number's start:
# without the look-behind a long run of digits is rescanned from each of its digits (quadratic)
_PERCENT_ANY_RE = re.compile(_PERCENT_SIGN)
_PERCENT_TAIL_RE = re.compile(r"^(?P<value>[^%]*?[^%\s\\{])" + _PERCENT_SIGN + r"$")  # an expression of percent: "\frac{1}{2}\%"
_APPROXIMATELY_RE = re.compile(r"^(?:\\approx(?![A-Za-z])|≈|\\simeq(?![A-Za-z])|\\sim(?![A-Za-z])|~|approximately\b|about\b)\s*")
_PI_WORD_RE = re.compile(r"(?<![A-Za-z\\])pi(?![A-Za-z])")
# "5 (or 6)" once its "or" is a comma: a value and an alternative in brackets at the end
_BRACKETED_ALTERNATIVE_RE = re.compile(r"(?P<first>.*[^\s(\[,])\s*[(\[]\s*,\s*(?P<second>[^()\[\]]*)[)\]]")
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
# 0.\overline{3}, 1.2\overline{45}: the digits under the bar repeat forever
_REPEATING_DECIMAL_RE = re.compile(r"(?<![\d.])(-?)(\d*)\.(\d*)\\overline\s*\{\s*(\d+)\s*\}")


# a number times scale words, "2.5 million", "1,500 million", "1 050 million", "3 hundred thousand", "2 dozen": not after
# a letter, digit, point, comma, power, brace, slash, backslash or a digit and a blank, so not inside another number, a
# power (10^6 million) or a fraction
_SCALES = {"hundred": 100, "thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12, "dozen": 12}
_SCALED_NUMBER_RE = re.compile(
    r"(?<![\w.,^{}/\\])(?<!\d )(?P<number>[-+]?(?:\d{1,3}(?:,\d{3})+|\d{1,3}(?: \d{3})+(?!\d)|\d+)(?:\.\d+)?"
    r"|[-+]?\.\d+)"
    r"(?P<scales>(?:\s*(?i:" + "|".join(_SCALES) + r")(?![A-Za-z]))+)")


def _scaled_number(found: re.Match) -> str:
    """A number times its scale words as digits: ``2.5 million`` is ``2500000``."""
    digits = found["number"].replace(",", "").replace(" ", "")
    if len(digits) > 50:  # beyond any answer's precision: left as written
        return found.group()
    with localcontext(prec=100):
        value = Decimal(digits)
        for scale in found["scales"].split():
            value *= _SCALES[scale.lower()]
        text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _repeating_decimal_as_fraction(found: re.Match) -> str:
    """A repeating decimal as its exact fraction: ``0.\\overline{3}`` is ``\\frac{1}{3}``."""
    sign, whole, fixed, repeating = found.groups()
    value = Fraction(int(whole or "0")) + (
        Fraction(int(fixed or "0")) + Fraction(int(repeating), 10 ** len(repeating) - 1)) / 10 ** len(fixed)
    return f"{sign}\\frac{{{value.numerator}}}{{{value.denominator}}}"


# superscript digits after a unit ("25 m²", "27 cm³", "A = 25 m²") are the unit's; after anything else a power ("x²",
# "mc²", "\\pi²"); a one-letter unit only after a number and a space
_UNIT_WORDS = frozenset({"cm", "mm", "km", "dm", "nm", "ft", "in", "yd", "mi", "units", "sq"})
_WORD_SUPERSCRIPT_RE = re.compile("(?<![A-Za-z\\\\])(?P<word>\\\\?[A-Za-z]+)[⁰¹²³⁴⁵⁶⁷⁸⁹]+")


def _unit_superscript(found: re.Match) -> str:
    word, before = found["word"], found.string[max(0, found.start() - 2) : found.start()]
    unit = word in _UNIT_WORDS or (word in _UNIT_LETTERS and re.fullmatch(r"\d ", before) is not None)
    return word if unit else found.group()


def has_percent_sign(answer: str) -> bool:
    """Whether ``answer`` contains a percent sign (``%``, ``\\%``, "percent")."""
    return bool(_PERCENT_ANY_RE.search(answer.replace("％", "%")))


def canonical_answer(answer: str, *, percent: bool = False) -> str:
    """``answer`` in the canonical spelling every checker compares (see the module notes).

    ``percent`` selects the percent rule: True drops percent signs (a number of percent), False turns
    ``N%`` into ``\\frac{N}{100}``.
    """
    s = superscripts_as_powers(_WORD_SUPERSCRIPT_RE.sub(_unit_superscript, normalize_answer(answer)))
    for spelling, canonical in _UNICODE_SPELLINGS.items():
        s = s.replace(spelling, canonical)
    s = _SIZING_RE.sub("", s)
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\\displaystyle|\\!", "", s)
    s = re.sub(r"(\d)(?:\{,\}|\\[,;: ]|\\thinspace\s*)(?=\d{3}(?!\d))", r"\1", s)
    s = _CONNECTIVE_RE.sub(", ", s).strip(" ,")
    s = _PERCENT_NUMBER_RE.sub(r"\1" if percent else r"\\frac{\1}{100}", s)
    if percent:
        s = _PERCENT_ANY_RE.sub("", s)
    else:
        s = _PERCENT_TAIL_RE.sub(r"\\frac{\g<value>}{100}", s)
    s = _strip_text_unit_tail(_DEGREE_RE.sub("", s))
    s = _TEXT_COMMAND_RE.sub(lambda m: f" {m.group(1).strip()} ", s)
    s = re.sub(r"(?<!\\)\\[ ,;:]", " ", s)  # a spacing command, not a matrix's row break "\\\\" before a space
    s = _REPEATING_DECIMAL_RE.sub(_repeating_decimal_as_fraction, s)
    s = _CURRENCY_RE.sub(r"\1", normalize_answer(_APPROXIMATELY_RE.sub("", s.strip())))  # "about $\$12$", "\approx \$12"
    alternative = _BRACKETED_ALTERNATIVE_RE.fullmatch(s)
    if alternative:  # "5 (or 6)": the list of both, not 5 times 6; "40 (or 40 minutes)": one value restated
        first, second = (canonical_answer(alternative[part], percent=percent) for part in ("first", "second"))
        return first if first == second else f"{first}, {second}"
    s = _PI_WORD_RE.sub(r"\\pi ", s)
    s = _SCALED_NUMBER_RE.sub(_scaled_number, s)
    s = _strip_bracketed_remark(re.sub(r"\s+", " ", s).strip())
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    s = _strip_unit_tail(s)
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    return normalize_answer(s)
