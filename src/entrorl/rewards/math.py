"""Math answers: find the final answer of a completion, judge it *equivalent* (not equally spelled) to the
reference, and say why when it is not.

Three stages, each a small ordered table that later work extends:

1. **Extraction** (:data:`ANSWER_EXTRACTORS`, :func:`find_final_answer`): the first extractor that finds a
   non-empty answer wins (``MathReward(extractors=[...])`` picks and orders them) —

   * ``boxed`` — the last complete ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces included;
   * ``answer_tag`` — the last ``<answer>...</answer>``;
   * ``answer_phrase`` — the last "the answer is X" / "Final answer: X" / "答案是 X" (to the end of the
     line or sentence);
   * ``hashes`` — GSM8K's ``#### X``;
   * ``last_number`` — the last number in the text (integers, decimals, ``1,234``, ``a/b``, ``1e3``), or the value
     written out on its side of a math statement (``$x = \\frac{3}{2}$`` gives ``\\frac{3}{2}``, not ``2``); none
     when the number is part of an expression (``$2^{10}$``).

   Each takes time linear in the length of the completion (braces are matched once, tags paired once).

2. **Reading the question** (:func:`read_question`): whether it asks for a percentage, for real (or
   complex) roots, or for a rounded value. These change the rules below and nothing else.

3. **Equivalence** (:func:`canonical_answer`, :data:`CHECKERS`, :func:`compare_answers`): both answers
   are first put in a canonical spelling — ``\\dfrac``/``\\tfrac`` → ``\\frac``, ``\\left``/``\\right``
   dropped, thousands separators (``1,000``, ``1{,}000``, ``1\\,000``) removed, units dropped
   (``5 cm``, ``5\\text{ cm}``, ``$5``, ``30^\\circ``, ``30°``), ``pi`` / ``π`` / ``圆周率`` → ``\\pi``,
   ``\\text{ or }`` → ``,`` — and percent signs are resolved:

   * **percent rule** — when the question asks for a percentage ("profit __%", "what percentage",
     "in %"), answers are numbers *of percent*: the sign is a unit, so ``96``, ``96%`` and ``96\\%``
     agree, while ``0.96`` (that is 0.96 %) does not. When the question does not, a percent sign means
     "/100", after a number or an expression (``\\frac{1}{2}\\%`` is ``1/200``): ``25%`` equals ``0.25`` and
     ``1/4`` but not ``25`` — except that a reference written with a percent sign (``96%``) accepts both
     readings of the answer (``96`` and ``0.96``).

   Then the answers are equal when any checker says so:

   * ``string`` — equal after dropping whitespace, ``$``, LaTeX spacing and case, in Unicode NFC;
   * ``numeric`` — each side read as one number or an unordered list of numbers (``{1,2}``,
     ``x=1, x=-2``, ``1 \\pm \\sqrt2``, complex values with ``i``), compared with

     - **exact comparison** of two exact values — integers and fractions written without a decimal
       point, and expressions of them such as ``10^{12}+1`` or ``\\frac{2^{40}}{3}`` — however large
       (``99999999999`` does not match ``100000000000``); only ``abs_tolerance``, and a ``tolerance``
       the caller raises above its default, loosen it;
     - the relative tolerance ``tolerance`` (default ``1e-9``, room for the rounding error of
       evaluation) and ``abs_tolerance`` (default 0) for everything else: decimals count as inexact
       (``0.30000000000000004`` matches ``0.3``), as do ``\\pi``, ``\\sqrt2``, ...;
     - the **approximation rule**: a decimal written with at least ``approximation_digits`` (default 3)
       significant digits matches an exact value that is not itself a plain decimal (``\\pi``, ``e``,
       ``\\sqrt2``, ``1/3``) when it is that value rounded or cut to the decimal's written digits
       (``3.14``, ``3.1416`` and ``3.1415926`` all match ``\\pi``; ``3.15`` does not).
       When the question asks for rounding ("nearest tenth", "two decimal places", "approximately"),
       a value matches a decimal it rounds to, whatever the digit count, two decimals included
       (``3.1415926`` matches a reference ``3.14``). An integer (no decimal point) approximates nothing
       (``333`` does not match ``1000/3``, nor ``1012`` match ``2023/2``) unless the question asks for
       rounding, and then only a non-integer value within half a unit of it (``1011`` and ``1012`` both
       match ``2023/2`` for "round to the nearest integer");
     - the **roots rule**: when the question asks for real roots / solutions, non-real values are left
       out on both sides before the lists are compared (a reference that also lists complex roots is
       judged by its real ones); when the question names no domain and the reference lists only real
       values, non-real values in the answer are left out (a model that also gives the complex roots of
       a degree-7 equation whose reference lists its three real ones is right); when the question asks
       for complex roots, every value counts;
     - the **variable-name rule** (which ``math_verify`` follows too): when a side names several variables
       (``x=2, y=3``; ``(x, y) = (2, 3)``; ``x=y=2``; ``\\{x=2, y=3\\}``), values are matched name to name —
       ``y=3, x=\\frac{4}{2}`` matches ``x=2, y=3``, while ``x=3, y=2`` and ``x=2, z=3`` do not. A side that
       names no variable, a plain list or one tuple (``2, 3``; ``(2, 3)``), is read by position, the names in
       the order of a tuple of those names in the question (``(m, b)``), else in the order the question first
       mentions them (not counting a function's arguments, ``f(y, x)``), else in the named side's order: ``2, 3``
       matches ``x=2, y=3`` and ``3, 2`` does not. The numbered solutions of a system (``x_1, y_1, x_2, y_2``)
       are compared as a set of solutions. A side that names only some of its values, or gives a different
       number of them, does not match. When no side names several variables (``x=1, x=-2`` is a list of
       roots, and so is ``x_1=1, x_2=-2``: numbered names of one letter, numbered arbitrarily; ``x = 3``),
       names are ignored and the order of a list is free;

   * ``math_verify`` — HuggingFace Math-Verify on the canonical spellings: symbolic expressions, sets
     and intervals, ``x = 3`` vs ``3``; not when both sides read as numbers, which ``numeric`` alone judges
     (Math-Verify rounds floats to ``float_rounding`` decimals, so ``0.0000001`` would equal ``0.0000002``).

   A checker that fails on odd input counts as "not equal".

:class:`MathReward` (the ``math`` reward) returns a :class:`MathVerdict`: a float (1.0 or 0.0) that also
carries ``reason`` — why it scored 0 ("no final answer found", "answer 12 differs from reference 13",
"could not parse answer ...", "timeout ...") — and the ``extracted`` answer and ``reference``.
:meth:`MathReward.judge` returns the same verdict. Models should be asked to box their answer;
:data:`MATH_INSTRUCTION` is the usual instruction.

**Bounded time.** One judgement — finding the final answer and the reference, and comparing them with
every reference given — may take at most ``timeout`` seconds (default 5) in all, enforced with a
``SIGALRM`` interval timer in the main thread (when no other alarm is armed); past that it scores 0 with
reason "timeout". :func:`compare_answers` alone is bounded the same way. Numbers too large to evaluate
(power towers such as ``2^{3^{20}}``, exponents above 10,000, factorials above 1,000) are refused before
any evaluation, in every thread, because big-integer arithmetic cannot be interrupted. Off the main
thread no timer can be armed, so only that refusal, the ``max_chars`` limit and the linear extraction
bound the time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import re
import signal
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from typing import Any

from entrorl._checks import caseless, check_int
from entrorl.rewards.base import reference_answers, register_reward

__all__ = [
    "ANSWER_EXTRACTORS",
    "CHECKERS",
    "MATH_INSTRUCTION",
    "Comparison",
    "ComparisonResult",
    "JudgeTimeout",
    "MathOptions",
    "MathReward",
    "MathVerdict",
    "QuestionHints",
    "canonical_answer",
    "compare_answers",
    "extract_answer_phrase",
    "extract_answer_tag",
    "extract_boxed",
    "extract_final_answer",
    "extract_hashes",
    "extract_last_number",
    "find_final_answer",
    "math_equal",
    "normalize_answer",
    "prepare_reference",
    "read_question",
    "select_extractors",
]

#: The instruction to append to math prompts so answers are extractable.
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


# --------------------------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BRACE_RE = re.compile(r"\\[{}]|[{}]")
_BARE_BOX_TOKEN_RE = re.compile(r"[^\s$]+")


def _closing_braces(text: str) -> dict[int, int]:
    """The position of the ``}`` that closes each closed ``{`` of ``text``, found in one pass (escaped
    braces ``\\{`` and ``\\}`` are content, not braces)."""
    closing: dict[int, int] = {}
    open_braces: list[int] = []
    for m in _BRACE_RE.finditer(text):
        brace = m.group(0)
        if brace == "{":
            open_braces.append(m.start())
        elif brace == "}" and open_braces:
            closing[open_braces.pop()] = m.start()
    return closing


def extract_boxed(text: str) -> str | None:
    """Content of the last complete top-level ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces and boxes kept),
    or of ``\\boxed 5`` / ``\\boxed5`` / ``\\boxed\\pi`` (without a brace, what follows up to a space or ``$``); None
    when there is none (an unclosed last box falls back to the previous one).

    Time linear in ``len(text)``: the braces are matched once for the whole text."""
    closing: dict[int, int] | None = None
    found, covered_until = None, -1
    for m in _BOX_RE.finditer(text):
        if m.start() < covered_until:  # a box inside the previous complete box is part of its content
            continue
        j = m.end()
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            if closing is None:
                closing = _closing_braces(text)
            end = closing.get(j)
            if end is not None:
                found, covered_until = text[j + 1 : end], end + 1
        elif j > m.end() or (j < len(text) and (text[j].isdigit() or text[j] in "-\\")):  # \boxed 5, \boxed5, \boxed\pi
            token = _BARE_BOX_TOKEN_RE.match(text, j)
            if token:
                found, covered_until = token.group(0), token.end()
    return found


_TAGS = {False: (re.compile(r"<answer>", re.IGNORECASE), re.compile(r"</answer>", re.IGNORECASE)),
         True: (re.compile(r"<answer>"), re.compile(r"</answer>"))}  # keyed by case_sensitive


def extract_answer_tag(text: str, *, case_sensitive: bool = False) -> str | None:
    """Content of the last ``<answer>...</answer>`` (``<ANSWER>`` too unless ``case_sensitive``), reading left to
    right: each opening tag pairs with the first closing tag after it (so ``<answer>a<answer>b</answer>`` gives
    ``a<answer>b``), as reasoning-gym's own ``extract_answer`` reads it. Time linear in ``len(text)``."""
    opening_re, closing_re = _TAGS[case_sensitive]
    found, position = None, 0
    while (opening := opening_re.search(text, position)) is not None:
        closing = closing_re.search(text, opening.end())
        if closing is None:
            break
        found, position = text[opening.end() : closing.start()], closing.end()
    return found


# "\s*(?:\*\*\s*)?" rather than "\s*(?:\*\*)?\s*": two adjacent "\s*" backtrack quadratically over long blanks
_PHRASE_RE = re.compile(r"(?:\banswer\b\s*(?:\*\*\s*)?(?:is\b|:|=)|答案\s*(?:是|为|:|：))\s*:?", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"\.(?=\s|$)")
# "the answer is therefore 42": words between the phrase and the answer
_PHRASE_FILLER_RE = re.compile(r"^(?:(?:therefore|thus|hence|so|then|simply|clearly|just|indeed|finally|obviously)\b[\s,]*)+(?=\S)",
                               re.IGNORECASE)


def extract_answer_phrase(text: str) -> str | None:
    """What follows the last "answer is" / "answer:" / "answer =" (also "Final answer:", "答案是"), up to
    the end of the line (or of a display-math block starting there) or the first sentence-ending period."""
    last = None
    for last in _PHRASE_RE.finditer(text):
        pass
    if last is None:
        return None
    rest = _PHRASE_FILLER_RE.sub("", text[last.end() :].lstrip(" \t*\n"))
    for opener, closer in (("$$", "$$"), ("\\[", "\\]")):
        if rest.startswith(opener):
            end = rest.find(closer, len(opener))
            if end != -1:
                return rest[len(opener) : end]
    line = rest.split("\n", 1)[0]
    m = _SENTENCE_END_RE.search(line)
    if m:
        line = line[: m.start()]
    return line.strip(" \t*")


_HASHES_RE = re.compile(r"####\s*([^\n]*)")


def extract_hashes(text: str) -> str | None:
    """GSM8K style: what follows the last ``####``."""
    matches = _HASHES_RE.findall(text)
    return matches[-1] if matches else None


_NUMBER_RE = re.compile(
    r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?(?![\d])"
    r"|(?<![\w.])-?\.\d+"
)
# $..$, $$..$$, \(..\), \[..\]; an escaped \$ is a dollar sign, not a delimiter
_MATH_DELIMITER_RE = re.compile(r"\$\$|\\\[|\\\]|\\\(|\\\)|(?<!\\)\$")
_MATH_CLOSERS = {"$$": "$$", "\\[": "\\]", "\\(": "\\)", "$": "$"}
# what separates the sides of a statement in a math span: the number's own side is its value
_RELATION_RE = re.compile(
    r":=|=|≈|≤|≥|≡|<|>|⇒|→|∴|\\(?:approx|approxeq|simeq|leq?|geq?|leqslant|geqslant|neq?|in|equiv|sim|to|therefore"
    r"|because|Rightarrow|implies|Longrightarrow|rightarrow|longrightarrow|iff|coloneqq)(?![A-Za-z])"
)
# what surrounds a value in a math span without changing it: words (each left as a space) ...
_WORDS_RE = re.compile(
    r"\(\s*\\text\s*\{[^{}]*\}\s*\)"
    r"|\\(?:text|textit|textrm|textnormal|textsf|texttt|mathrm|mathit|mathsf|operatorname|mbox)\s*\{[^{}]*\}"
)
# ... and spacing, end-of-proof marks, layout and dollar signs (each left out: "1\,000" is 1000)
_LAYOUT_RE = re.compile(
    r"\\(?:quad|qquad|blacksquare|square|Box|qed|checkmark|displaystyle|ldots|dots)(?![A-Za-z])|\\[,;:! ]|~"
    r"|\\(?:begin|end)\s*\{[^{}]*\}(?:\s*\{[^{}]*\})?|\\\\|&|\\\$"
)
_EMPHASIS_RE = re.compile(r"\\(?:mathbf|boldsymbol|bm|textbf|underline|boxed)\s*\{([^{}]*)\}")  # the content stays
# after a number, marks that make it an ordinal or an angle, not part of a power: 7^{th}, 30^\circ, 30°
_NUMBER_MARK_RE = re.compile(
    r"(?<=\d)\s*(?:\^\s*\{?\s*(?:\\text\s*\{\s*)?(?:st|nd|rd|th)\b\s*\}?\s*\}?|\^\s*\{?\s*\\circ\s*\}?|°|\\degree(?![A-Za-z]))"
)
# two words of prose in a row, outside \text: what a pair of currency signs ("$5 ... 5.5$") enclosed, not math
_PROSE_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}\s+[A-Za-z]{2,}(?![A-Za-z])")
_PLAIN_NUMBER = r"(?:\d{1,3}(?:(?:,|\{,\})\d{3})+|\d+)(?:\.\d+)?|\.\d+"  # an alternation: group it where it is used
_IRRATIONAL = r"\\sqrt\s*\{\s*(?:" + _PLAIN_NUMBER + r")\s*\}|\\sqrt\s*\d|\\pi(?![A-Za-z])"
_ROOT_OR_PI = rf"(?:{_PLAIN_NUMBER})?\s*(?:{_IRRATIONAL})"
_TERM = rf"(?:{_ROOT_OR_PI}|{_PLAIN_NUMBER})"
_SUM = rf"[-+]?\s*{_TERM}(?:\s*[-+]\s*{_TERM})*"  # 1 + \sqrt{5}
_SCALAR = (
    rf"(?:\\pm\s*|[-+]\s*)?(?:\\[dt]?frac\s*\{{\s*{_SUM}\s*\}}\s*\{{\s*{_SUM}\s*\}}|\\[dt]?frac\s*\d\s*\d"
    rf"|(?:\d+\s*)?\\[dt]?frac\s*\{{\s*\d+\s*\}}\s*\{{\s*\d+\s*\}}"  # a mixed number: 3 \frac{1}{2}
    rf"|(?:{_PLAIN_NUMBER})\s*(?:\\times|\\cdot)\s*10\s*\^\s*\{{?\s*-?\d+\s*\}}?"  # 3 \times 10^{8}
    rf"|{_TERM}(?:\s*/\s*{_TERM})?"
    rf"|{_TERM}(?:\s*[-+]\s*{_TERM})+)"  # 3 + 2\sqrt{2}; a sum of plain numbers (3 + 4) is refused by _is_written_value
)
_PLAIN_SUM_RE = re.compile(rf"[-+]?\s*(?:{_PLAIN_NUMBER})(?:\s*[-+]\s*(?:{_PLAIN_NUMBER}))+\s*(?:\\?%)?")
# a value written out, not an expression to evaluate: 7, -3.5, 1{,}000, 3/4, \frac{3}{2}, 2\sqrt{3}, 4\pi, \pm 5, 20%
_VALUE_RE = re.compile(rf"(?:{_SCALAR})\s*(?:\\?%)?")
_LIST_BRACKETS = (("\\{", "\\}"), ("(", ")"), ("[", "]"), ("(", "]"), ("[", ")"))
_UNIT_POWER_RE = re.compile(r"\^\s*\{?\s*[23]\s*\}?")
_ATTACHED = frozenset("^_")  # a number written against these is part of a power or an index, not a value of its own


def _is_dollar_delimiter(text: str, index: int, opening: bool) -> bool:
    """Pandoc's rule for a single ``$``: an opening one has a non-space after it, a closing one a non-space before it
    and no digit after it; and an opening one follows no digit, so that ``5$ and 2$`` (currency) opens nothing."""
    before = text[index - 1] if index else " "
    after = text[index + 1] if index + 1 < len(text) else " "
    if opening:
        return not after.isspace() and not before.isdigit()
    return not before.isspace() and not after.isdigit()


def _math_span_around(text: str, position: int) -> tuple[int, int] | None:
    """The bounds of the content of the math span (``$..$``, ``$$..$$``, ``\\(..\\)``, ``\\[..\\]``) that holds
    ``position``, or None. One pass over the delimiters: time linear in ``len(text)``."""
    opener, start = None, 0
    for delimiter in _MATH_DELIMITER_RE.finditer(text):
        token = delimiter.group()
        if opener is None:
            if delimiter.start() > position:
                return None
            if token in _MATH_CLOSERS and (token != "$" or _is_dollar_delimiter(text, delimiter.start(), opening=True)):
                opener, start = token, delimiter.end()
        elif token == _MATH_CLOSERS[opener] and (token != "$" or _is_dollar_delimiter(text, delimiter.start(), opening=False)):
            if start <= position < delimiter.start():
                return start, delimiter.start()
            opener = None
        elif token == "$" == opener and _is_dollar_delimiter(text, delimiter.start(), opening=True):
            start = delimiter.end()  # "$15 and has $7.50$": the first was a dollar sign; math starts here
    return None


def _value_around(content: str, start: int, end: int) -> str | None:
    """The side of the statement ``content`` (a math span) that holds ``content[start:end]``, without its
    decorations, if that side is a value written out (:data:`_VALUE_RE`); None if it is an expression."""
    relations = list(_RELATION_RE.finditer(content))
    left = max((m.end() for m in relations if m.end() <= start), default=0)
    right = min((m.start() for m in relations if m.start() >= end), default=len(content))
    side, previous = content[left:right], None
    while side != previous:  # "(\text{...})" and "\quad" may each uncover the other
        side, previous = _LAYOUT_RE.sub("", _WORDS_RE.sub(" ", side)), side
    side = _EMPHASIS_RE.sub(r"\1", side).strip(" \t\n:,;").rstrip(".").strip()
    power = side.rfind("^")  # the power of a unit whose name was words: "125 \text{ cm}^3" became "125 ^3"
    if power > 0 and side[power - 1].isspace() and _UNIT_POWER_RE.fullmatch(side, power):
        side = side[:power].rstrip()
    side = _strip_unit_tail(side)  # "12 cm", "60 km/h"
    one_element = _wrapped(side, "\\{", "\\}")  # x \in \{7\}
    if one_element is not None and _VALUE_RE.fullmatch(one_element.strip()):
        side = one_element.strip()
    return side if _is_written_value(side) else None


def _is_written_value(side: str) -> bool:
    """Whether ``side`` is a value written out (:data:`_VALUE_RE`) or a list, tuple, interval or set of them
    (``2, 3, 5``, ``(2, -3)``, ``[2, 5)``, ``\\{1, 2\\}``); each item is matched on its own, so no pattern backtracks
    over the whole list."""
    if _VALUE_RE.fullmatch(side):
        return not _PLAIN_SUM_RE.fullmatch(side)  # arithmetic to do, not its result
    inner = next((inside for opener, closer in _LIST_BRACKETS if (inside := _wrapped(side, opener, closer))), side)
    items = _split_top_level(inner)
    return len(items) > 1 and all(_VALUE_RE.fullmatch(item) and not _PLAIN_SUM_RE.fullmatch(item) for item in items)


def extract_last_number(text: str) -> str | None:
    """The last number in the text (``-3``, ``2.5``, ``1,234``, ``3/4``, ``.5``, ``1e3``), commas and a percent sign
    after it dropped (GSM8K-style references are numbers of percent) — unless it is part of an expression, so that the
    digits of one do not pass for the answer (``2`` is not the answer of ``$\\frac{3}{2}$``, ``$\\sqrt{2}$``,
    ``$2^{10}$`` or ``2^10``, and a restated ``$\\gcd(12, 18)$`` answers nothing):

    * inside a math span, the value on the number's side of the statement (``=``, ``\\approx``, ``\\le``, ...), words,
      spacing and end marks left out, when that side is a value written out (``$x = \\frac{3}{2}$`` gives
      ``\\frac{3}{2}``, ``$4\\pi$`` gives ``4\\pi``, ``$\\text{Total: } 7 \\text{ apples}$`` gives ``7``); None when it is
      an expression;
    * elsewhere, None for a number written against ``^`` or ``_`` (ordinals such as ``7^{th}`` are plain numbers).
    """
    text = _NUMBER_MARK_RE.sub("", text.replace("\u2212", "-"))
    last = None
    for last in _NUMBER_RE.finditer(text):
        pass
    if last is None:
        return None
    span = _math_span_around(text, last.start())
    if span is not None and _PROSE_RE.search(_WORDS_RE.sub(" ", text[span[0] : span[1]])):
        span = None  # "$5 and the total is 5.5$": two currency signs, not math
    if span is not None:
        value = _value_around(text[span[0] : span[1]], last.start() - span[0], last.end() - span[0])
        return None if value is None else _without_percent_sign(value)
    before = text[last.start() - 1] if last.start() else ""
    after = text[last.end()] if last.end() < len(text) else ""
    if before in _ATTACHED or after in _ATTACHED:
        return None
    return re.sub(r"\s+", "", last.group()).replace(",", "")


def _without_percent_sign(value: str) -> str:
    """``value`` without a ``%`` / ``\\%`` at its end (a string operation: no regular expression to backtrack)."""
    if value.endswith("%"):
        value = value[:-1].removesuffix("\\").rstrip()
    return value


#: ``(name, extractor)`` pairs tried in order by :func:`extract_final_answer`.
ANSWER_EXTRACTORS: list[tuple[str, Callable[[str], str | None]]] = [
    ("boxed", extract_boxed),
    ("answer_tag", extract_answer_tag),
    ("answer_phrase", extract_answer_phrase),
    ("hashes", extract_hashes),
    ("last_number", extract_last_number),
]

_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")
_WRAPPERS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"), ("**", "**"), ("`", "`"))


def _stripped_bounds(text: str, start: int, end: int) -> tuple[int, int]:
    """``(start, end)`` narrowed past the whitespace at both ends of ``text[start:end]``."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def normalize_answer(answer: str) -> str:
    """Strip whitespace, enclosing ``$..$`` / ``\\(..\\)`` / ``\\[..\\]`` / ``**..**`` and a trailing period
    (repeatedly; time linear in ``len(answer)``, as only the bounds move until the end)."""
    start, end = _stripped_bounds(answer, 0, len(answer))
    changed = True
    while changed and start < end:
        changed = False
        for opener, closer in _WRAPPERS:
            inner_start, inner_end = start + len(opener), end - len(closer)
            wrapped = answer.startswith(opener, start, end) and answer.endswith(closer, start, end)
            if inner_start <= inner_end and wrapped:
                if opener.startswith("$") and _UNESCAPED_DOLLAR_RE.search(answer, inner_start, inner_end):
                    continue  # "$a$ and $b$" is not one wrapped block; "$\$12$" is
                start, end = _stripped_bounds(answer, inner_start, inner_end)
                changed = True
        if end > start and answer[end - 1] == ".":
            start, end = _stripped_bounds(answer, start, end - 1)
            changed = True
    return answer[start:end]


Extractors = Sequence[tuple[str, Callable[[str], str | None]]]


def find_final_answer(text: str, extractors: Extractors | None = None) -> tuple[str, str] | None:
    """``(extractor name, normalized answer)`` from the first extractor (in order; default
    :data:`ANSWER_EXTRACTORS`) that finds a non-empty answer in ``text``; None if none does."""
    if not isinstance(text, str) or not text.strip():
        return None
    for name, extractor in extractors if extractors is not None else ANSWER_EXTRACTORS:
        found = extractor(text)
        if found is not None:
            found = normalize_answer(found)
            if found:
                return name, found
    return None


def extract_final_answer(text: str, extractors: Extractors | None = None) -> str | None:
    """The completion's final answer (normalized), by the first extractor that finds a non-empty one;
    None if none does."""
    found = find_final_answer(text, extractors)
    return found[1] if found is not None else None


def select_extractors(names: Sequence[str]) -> list[tuple[str, Callable[[str], str | None]]]:
    """The ``(name, extractor)`` pairs of :data:`ANSWER_EXTRACTORS` named in ``names``, in the order
    given; ValueError for an unknown name, a repeated one or an empty list."""
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ValueError(f"extractors must be a list of extractor names, got {names!r}")
    known = dict(ANSWER_EXTRACTORS)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown answer extractor(s) {unknown}; known: {list(known)}")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"extractors must name each extractor at most once and at least one, got {list(names)}")
    return [(name, known[name]) for name in names]


def prepare_reference(reference: str) -> str:
    """A reference answer ready for comparison, normalized: the content of its last ``\\boxed{}`` if it has one,
    else what follows its last ``####`` (GSM8K's answer column: a worked solution, then ``#### 72``), else the whole
    text."""
    answer = extract_boxed(reference)
    if answer is None:
        answer = extract_hashes(reference)
    return normalize_answer(answer if answer is not None else reference)  # an empty box or #### gives no reference

# --------------------------------------------------------------------------------------------
# what the question asks for
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# canonical spelling
# --------------------------------------------------------------------------------------------

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
_CONNECTIVE_RE = re.compile(r"\s*(?:\\text\s*\{\s*(?:or|and)\s*\}|\\(?:quad|qquad)|\bor\b|\band\b)\s*")
_DEGREE_RE = re.compile(r"\s*(?:\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree)\s*(?:[CF](?![A-Za-z]))?")
_CURRENCY_RE = re.compile(r"^([-+]?)\s*(?:\\\$|\$|US\$|USD|€|£|¥|\\euro|\\pounds)\s*")
_PERCENT_SIGN = r"(?:\s*\\%|\s*%|\s*\\text\s*\{\s*\\?%\s*\}|\s+per\s?cent\b|\s*\\text\s*\{\s*per\s?cent\s*\})"
_PERCENT_NUMBER_RE = re.compile(r"(?<![\d.])(-?(?:\d+(?:\.\d*)?|\.\d+))" + _PERCENT_SIGN)  # from a number's start:
# without the look-behind a long run of digits is rescanned from each of its digits (quadratic)
_PERCENT_ANY_RE = re.compile(_PERCENT_SIGN)
_PERCENT_TAIL_RE = re.compile(r"^(?P<value>[^%]*?[^%\s\\{])" + _PERCENT_SIGN + r"$")  # an expression of percent: "\frac{1}{2}\%"
_APPROXIMATELY_RE = re.compile(r"^(?:\\approx(?![A-Za-z])|≈|\\simeq(?![A-Za-z])|\\sim(?![A-Za-z])|~|approximately\b|about\b)\s*")
_PI_WORD_RE = re.compile(r"(?<![A-Za-z\\])pi(?![A-Za-z])")
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_NUMBER_TEXT = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:\s*/\s*\d+)?|[-+]?\\frac\{[^{}]+\}\{[^{}]+\}"
_UNIT_TAIL_RE = re.compile(
    rf"^(?P<number>{_NUMBER_TEXT})\s*"
    rf"(?P<unit>(?:[A-Za-z]+\.?(?:\s*\^\s*\{{?\d\}}?)?(?:\s*/\s*[A-Za-z]+(?:\s*\^\s*\{{?\d\}}?)?)?\s*){{1,3}})$"
)
#: Single letters read as units after a number ("5 m", "3 s"); other single letters are variables.
_UNIT_LETTERS = frozenset("mgshlLKCFAVWJN")
#: Words that are mathematics, not units, after a number ("3 pi", "2 i").
_MATH_WORDS = frozenset({"pi", "sqrt", "ln", "log", "sin", "cos", "tan", "i", "e", "or", "and", "infty"})


def has_percent_sign(answer: str) -> bool:
    """Whether ``answer`` contains a percent sign (``%``, ``\\%``, "percent")."""
    return bool(_PERCENT_ANY_RE.search(answer.replace("％", "%")))


def _strip_unit_tail(s: str) -> str:
    m = _UNIT_TAIL_RE.match(s)
    if not m:
        return s
    words = re.findall(r"[A-Za-z]+", m.group("unit"))
    for word in words:
        if word.lower() in _MATH_WORDS or (len(word) == 1 and word not in _UNIT_LETTERS):
            return s
    return m.group("number").strip()


def canonical_answer(answer: str, *, percent: bool = False) -> str:
    """``answer`` in the canonical spelling every checker compares (see the module notes).

    ``percent`` selects the percent rule: True drops percent signs (a number of percent), False turns
    ``N%`` into ``\\frac{N}{100}``.
    """
    s = normalize_answer(answer)
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
    s = _DEGREE_RE.sub("", s)
    s = _TEXT_COMMAND_RE.sub(lambda m: f" {m.group(1).strip()} ", s)
    s = re.sub(r"\\[ ,;:]", " ", s)
    s = _CURRENCY_RE.sub(r"\1", normalize_answer(_APPROXIMATELY_RE.sub("", s.strip())))  # "about $\$12$", "\approx \$12"
    s = _PI_WORD_RE.sub(r"\\pi ", s)
    s = re.sub(r"\s+", " ", s).strip()
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    s = _strip_unit_tail(s)
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    return normalize_answer(s)


# --------------------------------------------------------------------------------------------
# options, time limits
# --------------------------------------------------------------------------------------------


#: The default relative tolerance: room for the rounding error of evaluating inexact values.
_DEFAULT_TOLERANCE = 1e-9


@dataclass(frozen=True)
class MathOptions:
    """Options of the equivalence check.

    * ``tolerance`` — relative tolerance of numeric comparisons (``|a - b| <= tol * max(|a|, |b|)``) of
      inexact values; two exact values (integers, fractions) are compared exactly unless it is raised
      above its default ``1e-9``;
    * ``abs_tolerance`` — absolute tolerance of numeric comparisons, exact values included (for answers
      near 0);
    * ``approximation_digits`` — the fewest significant digits a decimal needs to count as an
      approximation of an exact value (``3.14`` for ``\\pi``); 0 turns the approximation rule off;
    * ``float_rounding`` — decimals Math-Verify rounds floats to before comparing what only it reads
      (intervals, equations, ...): when both sides read as numbers, the numeric checker's rules decide;
    * ``timeout`` — seconds one judgement may take (main thread only; see the module notes);
    * ``max_chars`` — longer answers only get the string check (no symbolic parsing of garbage).
    """

    tolerance: float = _DEFAULT_TOLERANCE
    abs_tolerance: float = 0.0
    approximation_digits: int = 3
    float_rounding: int = 6
    timeout: float = 5.0
    max_chars: int = 1000

    def __post_init__(self) -> None:
        for name in ("tolerance", "abs_tolerance", "timeout"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
                or (name == "timeout" and value == 0)
            ):
                bound = "> 0" if name == "timeout" else ">= 0"
                raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
        for name in ("approximation_digits", "float_rounding", "max_chars"):
            low = 1 if name == "max_chars" else 0
            object.__setattr__(self, name, check_int(getattr(self, name), name, minimum=low))


class JudgeTimeout(BaseException):
    """One judgement ran past ``MathOptions.timeout`` (a BaseException, so no library swallows it)."""


class _TooLarge(Exception):
    """An expression whose value is too large to evaluate in bounded time."""


class _QuietMathVerifyTimeoutWarning(logging.Filter):
    """Drops Math-Verify's "timeout is disabled" warning: this module bounds the time itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


_QUIET_FILTER = _QuietMathVerifyTimeoutWarning()
for _logger_name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_logger_name).addFilter(_QUIET_FILTER)


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`JudgeTimeout` in the block after ``seconds`` (main thread, no other alarm armed);
    elsewhere the block runs without a limit."""
    usable = (
        threading.current_thread() is threading.main_thread()
        and hasattr(signal, "setitimer")
        and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    )
    if not usable:
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise JudgeTimeout(f"took more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        while True:  # an alarm landing in this cleanup (the block is over) must not skip the restore
            try:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
                break
            except JudgeTimeout:
                continue


# Evaluation limits: beyond them big-integer arithmetic could run for minutes without yielding.
_MAX_EXPONENT = 10_000
_MAX_POWER_BITS = 1 << 20  # about 315,000 decimal digits: built in milliseconds
_MAX_FACTORIAL = 1_000
_MAX_BINOMIAL_BITS = 1 << 16  # sympy's C(10^5, 5*10^4), 10^5 bits, takes about a second
_MAX_TERMS = 1_000  # of a sum or product with numeric limits, as many as the largest factorial's factors

# Binomial coefficients and Gamma values, which Math-Verify's parser computes while it parses whenever their operands
# come out as integers (C(10^6, 5*10^5) alone takes it over a minute), before any parsed expression can be checked.
_PARSE_TIME_EVALUATED_RE = re.compile(r"\\(?:[dt]?binom|choose|Gamma)(?![a-zA-Z])")


def _binomial_bits(n: Any, k: Any) -> float:
    """An upper bound on the bits of sympy's ``C(n, k)`` for numbers ``n`` and ``k`` already checked by
    :func:`_check_size`. An integer ``k >= 0`` makes it a product of ``k`` factors: for an integer ``n >= 0``,
    ``min(n, k' log2 n)`` with ``k' = min(k, n - k)`` (0 when ``k > n``); for a negative integer, whose coefficient
    is ``(-1)^k C(|n| + k - 1, k)``, ``k log2(|n| + k)``; for any other ``n``, ``k`` times the bits of ``|n| + k``
    and of ``n``'s denominator. Any other ``k`` costs nothing: the coefficient is 0 (``k < 0``) or Gamma values in
    floating point. A whole number written with a decimal point (``500000.0``) counts as the integer it is, since
    sympy's coefficient builds it as one."""
    import sympy

    n, k = (_exact_if_whole(sympy.sympify(value)) for value in (n, k))
    if not k.is_integer or k.is_negative:
        return 0.0
    factors = int(k)
    if n.is_integer:
        top = int(n)
        if top >= 0:
            smaller = min(factors, top - factors)
            return 0.0 if smaller < 0 else float(min(top, smaller * max(top.bit_length(), 1)))
        return float(factors * (factors - top).bit_length())
    denominator = int(n.q).bit_length() if n.is_Rational else 0
    return factors * (math.log2(_magnitude(n) + factors + 2) + denominator)


def _closing(s: str, start: int, opening: str, closing: str) -> int:
    """The index just past the bracket that closes the one at ``s[start]`` (the end of ``s`` when none does)."""
    depth = 0
    for index in range(start, len(s)):
        if s[index] == opening:
            depth += 1
        elif s[index] == closing:
            depth -= 1
            if depth == 0:
                return index + 1
    return len(s)


def _argument_after(s: str, index: int) -> tuple[str, int]:
    """The argument of a LaTeX command that ends at ``index``: a brace group's or parenthesis's inside (after an
    optional ``\\left``), else one character; and the index past it."""
    while index < len(s) and s[index].isspace():
        index += 1
    if s.startswith("\\left", index):
        index += len("\\left")
        while index < len(s) and s[index].isspace():
            index += 1
    if index < len(s) and s[index] in "{(":
        end = _closing(s, index, s[index], "}" if s[index] == "{" else ")")
        return s[index + 1:end - 1], end
    return s[index:index + 1], index + 1


def _enclosing_group(s: str, start: int, end: int) -> tuple[str, str]:
    """What stands before ``s[start:end]`` and after it within the brace group around it (``\\choose``'s
    operands)."""
    depth, left = 0, start
    while left > 0 and not (s[left - 1] == "{" and depth == 0):
        depth += {"}": 1, "{": -1}.get(s[left - 1], 0)
        left -= 1
    depth, right = 0, end
    while right < len(s) and not (s[right] == "}" and depth == 0):
        depth += {"{": 1, "}": -1}.get(s[right], 0)
        right += 1
    return s[left:start], s[end:right]


def _operand_value(text: str) -> Any:
    """The operand ``text`` as a sympy number when it is one (its own parts checked first), else None."""
    import sympy

    stripped = text.strip()
    if re.fullmatch(r"\+?\d+", stripped):
        with contextlib.suppress(ValueError):  # beyond Python's digits for an int: the parser cannot read it either
            return sympy.Integer(int(stripped))
        return None
    for item in _parse_latex(stripped):
        if not isinstance(item, str):
            _check_size(item)
            return item if getattr(item, "is_number", False) else None
    return None


def _check_parse_time_sizes(s: str) -> None:
    """Raise :class:`_TooLarge` for a binomial coefficient of more than ``_MAX_BINOMIAL_BITS`` bits or a Gamma
    value above ``Gamma(_MAX_FACTORIAL + 1)`` (``\\binom{10^6}{500000}``, ``{10 \\choose 3}``, ``\\Gamma(10^5)``),
    which the parser would compute as it reads them."""
    for match in _PARSE_TIME_EVALUATED_RE.finditer(s):
        command = match[0]
        if command == "\\Gamma":
            argument = _operand_value(_argument_after(s, match.end())[0])
            if argument is not None and _magnitude(argument) > _MAX_FACTORIAL + 1:
                raise _TooLarge(f"a factorial above {_MAX_FACTORIAL}")
            continue
        if command == "\\choose":
            top, bottom = _enclosing_group(s, match.start(), match.end())
        else:
            top, after_top = _argument_after(s, match.end())
            bottom = _argument_after(s, after_top)[0]
        n, k = _operand_value(top), _operand_value(bottom)
        if n is not None and k is not None and _binomial_bits(n, k) > _MAX_BINOMIAL_BITS:
            raise _TooLarge(f"a binomial coefficient of more than {_MAX_BINOMIAL_BITS} bits")


def _magnitude(expr: Any, values: Mapping[Any, Any] | None = None) -> float:
    """``|expr|`` of a numeric sympy expression already checked by :func:`_check_size`, its free symbols (the
    indices of the sums it stands in) at ``values``: evaluated in floating point, so no big integer is built."""
    return float(abs(complex(expr.evalf(15, subs=values) if values else expr.evalf(15))))


def _numeric(expr: Any, values: Mapping[Any, Any] | None) -> bool:
    """Whether ``expr`` is a number once its free symbols take ``values``."""
    return bool(expr.is_number) or (bool(values) and expr.free_symbols <= set(values))


def _check_size(expr: Any, terms: float = 1.0, values: Mapping[Any, Any] | None = None) -> None:
    """Raise :class:`_TooLarge` if evaluating sympy ``expr`` could build an enormous integer: a power of
    a number other than +-1 (or 0) to an exponent above ``_MAX_EXPONENT`` or whose value would take more than
    ``_MAX_POWER_BITS`` bits (its inner powers checked first, so towers are caught), a factorial (or Gamma value)
    above ``_MAX_FACTORIAL``'s, a binomial coefficient of more than ``_MAX_BINOMIAL_BITS`` bits, or sums and products
    of more than ``_MAX_TERMS`` terms in all (``terms``: those of the sums ``expr`` stands in), with a term too large
    at one end of their indices' ranges, or products of more than ``_MAX_POWER_BITS`` bits. ``values``: the indices
    of the sums ``expr`` stands in, at one end of their ranges. Inner expressions are checked before they are
    evaluated, so ``2^{3^{20}}`` is refused without computing ``3^{20}`` twice over and ``(3!)!`` is accepted."""
    import sympy

    if not isinstance(expr, sympy.Basic):
        return
    for argument in expr.args:
        _check_size(argument, terms, values)
    if isinstance(expr, sympy.Pow):
        base, exponent = expr.args
        if _numeric(exponent, values) and _numeric(base, values) and _magnitude(base, values) not in (0.0, 1.0):
            size = _magnitude(exponent, values)
            if size > _MAX_EXPONENT:
                raise _TooLarge(f"an exponent above {_MAX_EXPONENT}")
            # the result's size, not only the exponent's: (2^{9999})^{9999} has 10^8 bits
            log_base = sympy.log(sympy.Abs(base), 2)
            bits = size * abs(float(log_base.evalf(15, subs=values) if values else log_base.evalf(15)))
            if not bits <= _MAX_POWER_BITS:
                raise _TooLarge(f"a power of more than {_MAX_POWER_BITS} bits")
    elif isinstance(expr, (sympy.factorial, sympy.factorial2)):
        argument = expr.args[0]
        if _numeric(argument, values) and _magnitude(argument, values) > _MAX_FACTORIAL:
            raise _TooLarge(f"a factorial above {_MAX_FACTORIAL}")
    elif isinstance(expr, sympy.gamma):  # Gamma(n) = (n - 1)!
        argument = expr.args[0]
        if _numeric(argument, values) and _magnitude(argument, values) > _MAX_FACTORIAL + 1:
            raise _TooLarge(f"a factorial above {_MAX_FACTORIAL}")
    elif isinstance(expr, sympy.binomial):
        top, bottom = expr.args
        if _numeric(top, values) and _numeric(bottom, values):
            if values:
                top, bottom = top.evalf(30, subs=values), bottom.evalf(30, subs=values)
            if _binomial_bits(top, bottom) > _MAX_BINOMIAL_BITS:
                raise _TooLarge(f"a binomial coefficient of more than {_MAX_BINOMIAL_BITS} bits")
    elif isinstance(expr, (sympy.Sum, sympy.Product)):
        _check_series(expr, terms, values or {})


def _exact_if_whole(value: Any) -> Any:
    """A floating-point whole number as the sympy integer it is (an index's end, so that a term at it is exact)."""
    import sympy

    return sympy.Integer(int(value)) if value.is_Float and (value % 1).is_zero else value


def _term_bits(term: Any, values: Mapping[Any, Any]) -> float:
    """The bits a product's ``term`` adds with its indices at ``values`` (one end of their ranges; :func:`_check_size`
    has sized the term there, so it is built exactly): a rational term's reduced numerator and denominator
    (``10^{-10000}`` counts as ``10^{10000}``, ``(10^{9999} + 1) / 10^{9999}`` as both, ``10^{9999} / 10^{9999}`` as 1);
    0 for a zero term (the product is 0); infinitely many for a division by zero; ``|log2|`` of any other value."""
    import sympy

    value = (term.xreplace(dict(values)) if values else term).doit()
    if value.is_Rational:
        return float(abs(value.p).bit_length() + value.q.bit_length()) if value != 0 else 0.0
    if value.has(sympy.zoo, sympy.nan, sympy.oo):
        return math.inf
    if value.evalf(15) == 0:
        return 0.0
    bits = sympy.log(sympy.Abs(value), 2).evalf(15)
    return abs(float(bits)) if bits.is_real else math.inf


def _check_series(series: Any, terms: float, values: Mapping[Any, Any]) -> None:
    """:func:`_check_size` of a sum or product inside ``terms`` terms of outer ones, whose indices take ``values``:
    its terms count with theirs, and its term is checked with each index at either end of its range (numerically:
    ``k^{k^2}`` at ``k = 999`` is a power to check, not to compute); a product's terms add their bits. An infinite or
    symbolic range is summed by formula, not term by term."""
    import sympy

    ends: list[dict[Any, Any]] = [dict(values)]
    finite_range = False
    for index, lower, upper in series.limits:
        span = upper - lower
        if span.has(sympy.oo, -sympy.oo, sympy.zoo):
            continue
        counted = [chosen for chosen in ends if _numeric(span, chosen)]
        if not counted:
            continue
        finite_range = True
        terms *= max(_magnitude(span, chosen) for chosen in counted) + 1
        if terms > _MAX_TERMS:
            raise _TooLarge(f"sums or products of more than {_MAX_TERMS} terms")
        widened = []
        for chosen in counted:
            low, high = (_exact_if_whole(bound.evalf(30, subs=chosen) if chosen else bound.evalf(30))
                         for bound in (lower, upper))
            if not (low.is_number and high.is_number):  # k from n to n + 2: counted, its ends left symbolic
                widened.append(chosen)
                continue
            # an end once: a one-term range does not double the ends
            widened += [{**chosen, index: end} for end in ([low] if low == high else [low, high])]
        ends = widened
    if not finite_range:
        return  # nothing is computed term by term
    largest = 0.0
    for chosen in ends:
        _check_size(series.function, terms, chosen)
        if isinstance(series, sympy.Product) and _numeric(series.function, chosen):
            largest = max(largest, _term_bits(series.function, chosen))
    if isinstance(series, sympy.Product) and not terms * largest <= _MAX_POWER_BITS:
        raise _TooLarge(f"a product of more than {_MAX_POWER_BITS} bits")


# --------------------------------------------------------------------------------------------
# numeric readings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Value:
    """One number of an answer: its text (for the written precision), its value, its exact value when it is
    exact (see :func:`_exact_rational`), and the variable it is assigned to (``x = 3``), if any."""

    text: str
    value: complex
    rational: Fraction | None = None
    name: str | None = None


@dataclass(frozen=True)
class _Reading:
    """An answer read as numbers: one scalar, or an unordered list (``is_list``)."""

    values: tuple[_Value, ...]
    is_list: bool


_DECIMAL_RE = re.compile(r"[-+]?(\d*)\.(\d+)|[-+]?(\d+)")
_FRAC_RE = re.compile(r"^(-?)\\frac\{([^{}]+)\}\{([^{}]+)\}$")
_INTEGER_RATIO_RE = re.compile(r"([-+]?\d+)(?:\s*/\s*(\d+))?")
_VARIABLE_NAME = r"[A-Za-z](?:_\{?\w+\}?)?"
_ASSIGNMENT_RE = re.compile(rf"(?P<name>{_VARIABLE_NAME})\s*=\s*(?P<value>\S.*)", re.DOTALL)
_TUPLE_ASSIGNMENT_RE = re.compile(
    rf"\((?P<names>\s*{_VARIABLE_NAME}(?:\s*,\s*{_VARIABLE_NAME})+\s*)\)\s*=\s*(?P<values>\(.*\))", re.DOTALL
)


def _exact_rational(text: str) -> Fraction | None:
    """The value of an integer or a fraction of integers written plainly (``-12``, ``3/4``,
    ``\\frac{3}{4}``); None otherwise (decimals included: a decimal may be an approximation)."""
    s = text.strip()
    m = _FRAC_RE.match(s)
    if m:
        s = f"{m.group(1)}{m.group(2).strip()}/{m.group(3).strip()}"
    m = _INTEGER_RATIO_RE.fullmatch(s)
    if not m or m.group(2) is not None and int(m.group(2)) == 0:
        return None
    return Fraction(int(m.group(1)), int(m.group(2) or 1))


def _plain_number(s: str) -> complex | None:
    """A plain number: ``-1234.5``, ``3/4``, ``\\frac{3}{4}``; None otherwise."""
    s = s.strip()
    m = _FRAC_RE.match(s)
    if m:
        s = f"{m.group(1)}{m.group(2)}/{m.group(3)}"
    try:
        if "/" in s:
            num, den = (part.strip() for part in s.split("/", 1))
            return complex(Fraction(num) / Fraction(den))
        value = float(s)
    except (ValueError, ZeroDivisionError):
        return None
    return complex(value) if math.isfinite(value) else None


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


def _is_list_of_values_set(s: str) -> bool:
    """A set of values written with braces, ``\\{1, 2\\}``: not one of pairs (``\\{(1, 2)\\}``) nor set-builder
    notation (``\\{x \\mid x > 0\\}``)."""
    inner = _wrapped(s.strip(), "\\{", "\\}")
    return inner is not None and not re.search(r"[()\[\]|:]|\\mid", inner)


def _is_bracketed(s: str) -> bool:
    """An interval, point or tuple: ``(a, b)``, ``[a, b)``, ... (order matters; not a list of values)."""
    return len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _balanced(s[1:-1])


def _expand_plus_minus(s: str) -> list[str]:
    """``a \\pm b`` → ``[a+b, a-b]``, ``\\pm b`` → ``[b, -b]`` (one top-level ``\\pm``); else ``[s]``."""
    if s.count("\\pm") != 1:
        return [s]
    left, right = (part.strip() for part in s.split("\\pm"))
    if not right:
        return [s]
    if not left:
        return [right, f"-({right})"]
    return [f"{left}+({right})", f"{left}-({right})"]


def _sympy_value(expr: Any) -> tuple[complex, Fraction | None] | None:
    """The complex value of a sympy number (a symbol ``i`` read as the imaginary unit) and, when the number
    is rational (``10^{12}+1``, ``2^{40}``), its exact value; None if not a number."""
    import sympy

    if isinstance(expr, sympy.Eq):  # "x = 3" -> 3
        expr = expr.rhs
    if isinstance(expr, sympy.FiniteSet) and len(expr.args) == 1:
        expr = expr.args[0]
    if not isinstance(expr, sympy.Expr):
        return None
    free = expr.free_symbols
    if free and {str(s) for s in free} == {"i"}:
        expr = expr.subs({s: sympy.I for s in free})
    if not expr.is_number:
        return None
    _check_size(expr)
    value = complex(expr.evalf(30))
    if not (math.isfinite(value.real) and math.isfinite(value.imag)):
        return None
    return value, _exact_value(expr)


#: The largest numerator or denominator, in bits, that :func:`_exact_value` builds.
_MAX_EXACT_BITS = 1 << 17


def _exact_value(expr: Any) -> Fraction | None:
    """The exact value of a sympy expression built from integers and fractions with sums, products,
    integer powers and factorials (``10^{12}+1``, ``\\frac{2^{40}}{3}``, ``(3!)!``); None for any other
    expression, or when a numerator or denominator would pass ``_MAX_EXACT_BITS`` bits."""
    import sympy

    if expr.is_Rational:
        value = Fraction(int(expr.p), int(expr.q))
    elif isinstance(expr, (sympy.Add, sympy.Mul)):
        parts = [_exact_value(argument) for argument in expr.args]
        if any(part is None for part in parts):
            return None
        value = parts[0]
        for part in parts[1:]:
            value = value + part if isinstance(expr, sympy.Add) else value * part
            if not _small_enough(value):
                return None
    elif isinstance(expr, sympy.Pow):
        base, exponent = (_exact_value(argument) for argument in expr.args)
        if base is None or exponent is None or exponent.denominator != 1 or (base == 0 and exponent < 0):
            return None
        size = max(base.numerator.bit_length(), base.denominator.bit_length())
        if size * abs(exponent.numerator) > _MAX_EXACT_BITS:
            return None
        value = base**exponent.numerator
    elif isinstance(expr, sympy.factorial):
        argument = _exact_value(expr.args[0])
        if argument is None or argument.denominator != 1 or not 0 <= argument <= _MAX_FACTORIAL:
            return None
        value = Fraction(math.factorial(argument.numerator))
    else:
        return None
    return value if _small_enough(value) else None


def _small_enough(value: Fraction) -> bool:
    return max(value.numerator.bit_length(), value.denominator.bit_length()) <= _MAX_EXACT_BITS


def _parse_latex(s: str) -> list[Any]:
    """Math-Verify's parse of ``s`` as LaTeX (falling back to free text); [] when unparsable."""
    from math_verify import parse

    _check_parse_time_sizes(s)
    parsed = parse(s if "$" in s else f"${s}$", parsing_timeout=None)
    if not parsed:
        parsed = parse(s, parsing_timeout=None)
    return list(parsed)


def _value_of(text: str) -> tuple[complex, Fraction | None] | None:
    """The value of ``text`` and its exact value when it is exact: an integer or fraction written plainly,
    or an expression without a decimal point whose value is rational (``10^{12}+1``)."""
    plain = _plain_number(text)
    if plain is not None:
        return plain, _exact_rational(text)
    for item in _parse_latex(text):
        if not isinstance(item, str):
            found = _sympy_value(item)
            if found is None:
                return None
            value, rational = found
            return value, rational if "." not in text else None
    return None


def _variable_name(name: str) -> str:
    """A variable name in one spelling: ``x_{1}`` and ``x_1`` are the same name."""
    return re.sub(r"[{}\s]", "", name)


def _read_numbers(answer: str) -> _Reading | None:
    """``answer`` (canonical) as numbers, each with the variable it is assigned to (``x = 3``), or None
    when some part is not a number."""
    inner = _wrapped(answer, "\\{", "\\}")
    is_set = inner is not None
    body = inner if is_set else answer
    if not is_set and _is_bracketed(body) and len(_split_top_level(body[1:-1])) > 1:
        return None  # intervals and tuples are Math-Verify's
    values = []
    for part in _split_top_level(body):
        if not part:
            continue
        assignment = _ASSIGNMENT_RE.fullmatch(part)
        name = _variable_name(assignment["name"]) if assignment else None
        for text in _expand_plus_minus(assignment["value"] if assignment else part):
            found = _value_of(text)
            if found is None:
                return None
            values.append(_Value(text, found[0], found[1], name))
    if not values:
        return None
    return _Reading(tuple(values), is_list=is_set or len(values) > 1)


def _assignments(answer: str) -> list[tuple[str | None, str]]:
    """The top-level parts of ``answer`` (canonical) as ``(variable name, value)``, the name None for a part
    that assigns no variable; ``(x, y) = (2, 3)``, ``x = y = 2`` and ``\\{x = 2, y = 3\\}`` give one pair per
    variable."""
    pairs: list[tuple[str | None, str]] = []
    inner = _wrapped(answer, "\\{", "\\}")  # a set of assignments, \{x = 2, y = 3\}, names them as well
    if inner is not None and all(_ASSIGNMENT_RE.fullmatch(part) for part in _split_top_level(inner) if part):
        answer = inner
    for part in _split_top_level(answer):
        if not part:
            continue
        tuple_assignment = _TUPLE_ASSIGNMENT_RE.fullmatch(part)
        if tuple_assignment:
            names = [_variable_name(name) for name in tuple_assignment["names"].split(",")]
            values = _tuple_items(tuple_assignment["values"])
            if values is not None and len(values) == len(names):
                pairs.extend(zip(names, values))
                continue
        assignment = _ASSIGNMENT_RE.fullmatch(part)
        chained = []  # x = y = 2 assigns 2 to both
        while assignment:
            chained.append(_variable_name(assignment["name"]))
            value = assignment["value"].strip()
            assignment = _ASSIGNMENT_RE.fullmatch(value)
        if chained:
            pairs.extend((name, value) for name in chained)
        else:
            pairs.append((None, part))
    return pairs


def _tuple_items(s: str) -> list[str] | None:
    """The items of an ordered tuple ``(a, b, ...)`` of two or more non-empty items; None otherwise."""
    inner = _wrapped(s, "(", ")")
    items = _split_top_level(inner) if inner is not None else []
    return items if len(items) >= 2 and all(items) else None


def _names_several_variables(pairs: Sequence[tuple[str | None, str]]) -> bool:
    """Whether every part assigns a variable and not every part the same one. Numbered names of one letter
    (``x_1 = 3, x_2 = 2``, the roots of one equation) count as one variable, so that against unnamed values
    (``2, 3``) or another spelling of the roots (``x = 2, x = 3``) they are compared as a set."""
    names = {name if name is None else _numbered_variable_base(name) for name, _ in pairs}
    return None not in names and len(names) >= 2


def _same_names_on_both_sides(answer: Sequence[tuple[str | None, str]], reference: Sequence[tuple[str | None, str]]) -> bool:
    """Whether both sides name every value with the same names, of two or more variables: then each name's values
    are compared. The numbered names of one letter (``x_1``, ``x_2``) are one variable, the roots of an equation,
    whose numbering is arbitrary: ``x_1 = 2, x_2 = 1`` against ``x_1 = 1, x_2 = 2`` is compared as a set."""
    answer_names, reference_names = {name for name, _ in answer}, {name for name, _ in reference}
    return None not in answer_names and answer_names == reference_names and _names_several_variables(answer)


def _numbered_variable_base(name: str) -> str:
    """``x`` for ``x_1`` / ``x_{12}`` (a name numbered by its subscript), the name itself otherwise."""
    base, underscore, subscript = name.partition("_")
    return base if underscore and subscript.isdigit() else name


def _spell_assignments(pairs: Iterable[tuple[str | None, str]]) -> str:
    return ", ".join(f"{name} = {value}" for name, value in pairs)


def _pair_variable_names(prediction: str, reference: str, question: str = "") -> tuple[str, str, str | None]:
    """The **variable-name rule**: ``(prediction, reference, conflict)`` with assignments spelled
    ``x = 2, y = 3`` when either side names several variables.

    When one side names several variables and the other names every value too, both are spelled out (the
    values are then matched name to name). When the other names none, its values — a plain list, or one
    ordered tuple ``(2, 3)`` — are given the names by position, in the order the question first mentions them
    (``m`` then ``b`` in "find the slope m and the intercept b"), or the named side's own order when the question
    does not mention them all. A side whose names all hold one value (``x = y = 2``) against a single value
    compares that value; a reference that is a braced set of values (``\\{2, 3\\}``) against named values in the
    answer compares the values as a set. Otherwise (some
    values named, or a different number of values) ``conflict`` says why they cannot be matched. When neither
    side names several variables, both come back unchanged.
    """
    answer_pairs, reference_pairs = _assignments(prediction), _assignments(reference)
    answer_solutions, reference_solutions = _numbered_solutions(answer_pairs), _numbered_solutions(reference_pairs)
    if answer_solutions is not None and answer_solutions[0] == (reference_solutions or ((),))[0]:
        return answer_solutions[1], reference_solutions[1], None  # two sets of solutions, however they are numbered
    if _same_names_on_both_sides(answer_pairs, reference_pairs):
        return _spell_assignments(answer_pairs), _spell_assignments(reference_pairs), None
    reference_names_several = _names_several_variables(reference_pairs)
    if not reference_names_several and not _names_several_variables(answer_pairs):
        return prediction, reference, None
    if reference_names_several:
        named_side, named, other_side, other = "reference", reference_pairs, "answer", answer_pairs
    else:
        named_side, named, other_side, other = "answer", answer_pairs, "reference", reference_pairs
    named_values = [value for _, value in named]

    def sides(named_text: str, other_text: str) -> tuple[str, str]:
        return (other_text, named_text) if reference_names_several else (named_text, other_text)

    single = other[0] if len(other) == 1 and _tuple_items(other[0][1]) is None else None
    if single is not None and len(set(named_values)) == 1 and (single[0] is None or single[0] in {n for n, _ in named}):
        return *sides(named_values[0], single[1]), None  # x = y = 2 against 2, or against x = 2
    if all(name is not None for name, _ in answer_pairs + reference_pairs):
        return _spell_assignments(answer_pairs), _spell_assignments(reference_pairs), None
    if not reference_names_several and len(other) == 1 and other[0][0] is None and _wrapped(other[0][1], "\\{", "\\}") is not None:
        return *sides(f"\\{{{', '.join(named_values)}\\}}", other[0][1]), None  # a set: the values, unordered
    names = [name for name, _ in named]
    listed = ", ".join(dict.fromkeys(str(name) for name in names))
    if any(name is not None for name, _ in other):
        return prediction, reference, f"the {named_side} names {listed}, the {other_side} only some of its values"
    values = [value for _, value in other]
    if len(values) == 1:
        values = _tuple_items(values[0]) or values
    if len(values) != len(names):
        conflict = f"the {named_side} names {listed}, the {other_side} gives {len(values)} value(s) without names"
        return prediction, reference, conflict
    names = _in_question_order(names, question)
    named_by_position = _spell_assignments(zip(names, values))
    if reference_names_several:
        return named_by_position, _spell_assignments(reference_pairs), None
    return _spell_assignments(answer_pairs), named_by_position, None


def _numbered_solutions(pairs: Sequence[tuple[str | None, str]]) -> tuple[tuple[str, ...], str] | None:
    """``x_1 = 1, y_1 = 2, x_2 = 3, y_2 = 4`` — the solutions of a system, numbered arbitrarily — as ``(("x", "y"),
    "\\{(1, 2), (3, 4)\\}")``: the letters and the set of solution tuples; None unless every value is named by a
    letter and a number, with two or more letters each given once for every number."""
    if len(pairs) < 4 or any(name is None or _numbered_variable_base(name) == name for name, _ in pairs):
        return None
    by_number: dict[str, dict[str, str]] = {}
    for name, value in pairs:
        letter, _, number = name.partition("_")
        if letter in by_number.setdefault(number, {}):
            return None
        by_number[number][letter] = value
    letters = tuple(sorted(next(iter(by_number.values()))))
    if len(letters) < 2 or len(by_number) < 2 or any(tuple(sorted(solution)) != letters for solution in by_number.values()):
        return None
    tuples = ", ".join(f"({', '.join(solution[letter] for letter in letters)})" for solution in by_number.values())
    return letters, f"\\{{{tuples}\\}}"


def _in_question_order(names: list[str], question: str) -> list[str]:
    """``names`` (distinct) in the order of a tuple of exactly these names in ``question`` (``the ordered pair (m,
    b)``), else in the order it first mentions each as a word of its own, leaving out the arguments of functions and
    named points (``f(y, x)``, ``A(y, x)``); as they are when it does not mention them all."""
    if len(set(names)) != len(names) or not question:
        return names
    for listed in re.finditer(r"(?<![A-Za-z\\])\(([^()]*)\)", question):  # a tuple of exactly these names: its order
        written = [_variable_name(item) for item in listed.group(1).split(",")]
        if sorted(written) == sorted(names):
            return written
    question = re.sub(r"(?<=[A-Za-z])\([^()]*\)", "", question)
    first = {}
    for name in names:
        spelled = r"_\{?".join(map(re.escape, name.split("_"))) + (r"\}?" if "_" in name else "")
        found = re.search(rf"(?<![A-Za-z\\]){spelled}(?![A-Za-z])", question)
        if found is None:
            return names
        first[name] = found.start()
    return sorted(names, key=first.__getitem__)


def _decimal_form(text: str) -> tuple[int, int] | None:
    """``(decimals, significant digits)`` of a plain decimal or integer literal; None otherwise."""
    m = _DECIMAL_RE.fullmatch(text.strip())
    if not m:
        return None
    if m.group(3) is not None:
        digits = m.group(3).lstrip("0")
        return 0, max(len(digits), 1)
    whole, fraction = m.group(1), m.group(2)
    digits = (whole + fraction).lstrip("0")
    return len(fraction), max(len(digits), 1)


def _close(a: _Value, b: _Value, options: MathOptions) -> bool:
    """Equal within the tolerances; two exact values (integers, fractions) must be equal exactly unless the
    caller raised ``tolerance`` above its default (``abs_tolerance``, 0 by default, applies to them too)."""
    if a.rational is not None and b.rational is not None and options.tolerance <= _DEFAULT_TOLERANCE:
        return abs(a.rational - b.rational) <= options.abs_tolerance
    if a.value == b.value:
        return True
    return abs(a.value - b.value) <= max(options.tolerance * max(abs(a.value), abs(b.value)), options.abs_tolerance)


def _is_integer(v: _Value) -> bool:
    if v.rational is not None:
        return v.rational.denominator == 1
    return v.value.imag == 0 and v.value.real.is_integer()


def _approximates(exact: _Value, approx: _Value, options: MathOptions, hints: QuestionHints) -> bool:
    """The approximation rule: ``approx`` (a decimal or integer literal) stands for ``exact`` to its written
    precision (see the module notes). An integer stands only for a non-integer value rounded to it, and only
    when the question asks for rounding. Exact values are compared in exact arithmetic."""
    form = _decimal_form(approx.text)
    if form is None or exact.value.imag != 0 or approx.value.imag != 0:
        return False
    decimals, significant = form
    written = Fraction(approx.text.strip())
    unit = Fraction(1, 10**decimals)
    if exact.rational is not None:
        target: Fraction | float = exact.rational
        slack: Fraction | float = Fraction(0)
    else:  # a float evaluation: allow for its rounding error
        target = exact.value.real
        slack = 1e-9 * max(abs(target), unit)
    error = abs(target - written)
    rounded = error <= unit / 2 + slack
    if decimals == 0:  # an integer: "333" does not stand for 1000/3, unless the question asks for rounding
        return hints.rounding and not _is_integer(exact) and rounded
    exact_form = _decimal_form(exact.text)
    if exact_form is None:  # exact value (\pi, \sqrt2, 1/3): rounded or cut to the written digits
        if options.approximation_digits and significant >= options.approximation_digits:
            cut = 0 <= abs(target) - abs(written) < unit + slack and target * written >= 0
            if rounded or cut:
                return True
        return hints.rounding and rounded
    # two decimals: only when the question asks for rounding, and the rounded one has fewer decimals
    return hints.rounding and exact_form[0] > decimals and rounded


def _numbers_match(a: _Value, b: _Value, options: MathOptions, hints: QuestionHints) -> bool:
    return (
        _close(a, b, options)
        or _approximates(a, b, options, hints)
        or _approximates(b, a, options, hints)
    )


def _is_real(v: _Value, options: MathOptions) -> bool:
    return abs(v.value.imag) <= max(options.tolerance * abs(v.value), options.abs_tolerance, 1e-12)


def _distinct(values: Sequence[_Value], options: MathOptions, hints: QuestionHints) -> list[_Value]:
    kept: list[_Value] = []
    for v in values:
        if not any(_numbers_match(v, k, options, hints) for k in kept):
            kept.append(v)
    return kept


# --------------------------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------------------------


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
    return caseless(re.sub(r"\s+|\$|\\[,!;: ]", "", unicodedata.normalize("NFC", s)))  # NFC first: U+037E is ";"


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
    for comparison in comparisons:
        for name, checker in checkers if checkers is not None else CHECKERS:
            try:
                if checker(comparison):
                    return ComparisonResult(True, None, name)
            except JudgeTimeout:
                raise
            except Exception:  # noqa: BLE001 - failing on odd input: "not shown equal"
                continue
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


# --------------------------------------------------------------------------------------------
# the reward
# --------------------------------------------------------------------------------------------


class MathVerdict(float):
    """The ``math`` reward's value: a float (the score, 1.0 or 0.0) that also says why.

    It *is* the score (``verdict == 1.0``, ``sum(verdicts)``, ``json.dumps`` all see the number), and
    carries

    * ``score`` — the same number as a plain float;
    * ``reason`` — None for a score of 1.0, else why the completion scored 0;
    * ``extracted`` — the final answer found in the completion (None if none was);
    * ``extractor`` — the name of the extractor that found it;
    * ``reference`` — the reference it was compared with (the content of its last ``\\boxed{}``).
    """

    reason: str | None
    extracted: str | None
    extractor: str | None
    reference: str | None

    def __new__(
        cls,
        score: float,
        reason: str | None = None,
        extracted: str | None = None,
        reference: str | None = None,
        extractor: str | None = None,
    ) -> MathVerdict:
        verdict = super().__new__(cls, score)
        verdict.reason = reason
        verdict.extracted = extracted
        verdict.reference = reference
        verdict.extractor = extractor
        return verdict

    @property
    def score(self) -> float:
        """The score as a plain float."""
        return float(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return (MathVerdict, (float(self), self.reason, self.extracted, self.reference, self.extractor))

    def __repr__(self) -> str:
        return (
            f"MathVerdict(score={float(self)!r}, reason={self.reason!r}, extracted={self.extracted!r}, "
            f"reference={self.reference!r})"
        )


def _validate_math(**kwargs: Any) -> None:
    MathReward(**kwargs)


@register_reward(
    "math",
    description="1.0 if the completion's final answer (\\boxed{}, <answer>, 'the answer is', ####, last number) is "
    "mathematically equivalent to the reference (Math-Verify, percent / units / roots / approximation "
    "rules read from the question), else 0.0 with the reason",
    factory=True,
    validate=_validate_math,
)
class MathReward:
    """The ``math`` reward: 1.0 when the extracted final answer is equivalent to the reference.

    Returns a :class:`MathVerdict` (a float carrying the reason of a 0). ``tolerance`` (alias
    ``numeric_tolerance``; default ``1e-9``) is the relative tolerance of numeric comparisons of inexact
    values (exact integers and fractions are compared exactly unless it is raised above the default);
    ``approximation_digits``, ``abs_tolerance``, ``float_rounding``, ``timeout`` (seconds per
    judgement) and ``max_chars`` are :class:`MathOptions` fields. ``extractors`` names the answer
    extractors to try, in order (default: all of :data:`ANSWER_EXTRACTORS`; ``["boxed"]`` makes
    unboxed answers score 0). ``use_question=False`` ignores the prompt (no percent / rounding / roots
    rules from it). A reference given as a list / tuple / array accepts any of its items. Nothing raises on bad
    input except a missing math-verify installation.
    """

    def __init__(
        self,
        *,
        tolerance: float | None = None,
        numeric_tolerance: float | None = None,
        abs_tolerance: float = 0.0,
        approximation_digits: int = 3,
        float_rounding: int = 6,
        timeout: float = 5.0,
        max_chars: int = 1000,
        extractors: Sequence[str] | None = None,
        use_question: bool = True,
    ) -> None:
        if numeric_tolerance is not None:
            if tolerance is not None:
                raise ValueError("give tolerance or its alias numeric_tolerance, not both")
            tolerance = numeric_tolerance
        if tolerance is None:
            tolerance = MathOptions.tolerance
        if importlib.util.find_spec("math_verify") is None:
            raise ImportError("the math reward needs math-verify: pip install math-verify")
        if not isinstance(use_question, bool):
            raise ValueError(f"use_question must be true or false, got {use_question!r}")
        self.options = MathOptions(
            tolerance=tolerance,
            abs_tolerance=abs_tolerance,
            approximation_digits=approximation_digits,
            float_rounding=float_rounding,
            timeout=timeout,
            max_chars=max_chars,
        )
        self.extractors = select_extractors(extractors) if extractors is not None else list(ANSWER_EXTRACTORS)
        self.use_question = use_question
        self.__name__ = "math"

    def __repr__(self) -> str:
        names = [name for name, _ in self.extractors]
        return f"MathReward({self.options}, extractors={names}, use_question={self.use_question})"

    def judge(self, prompt: str, completion: str, answer: Any, /, **meta: Any) -> MathVerdict:
        """Score ``completion`` against ``answer`` and say why it scored 0 (see :class:`MathVerdict`).

        The whole judgement — finding the final answer and the reference, and comparing them — is bounded
        by one ``timeout`` (see the module notes)."""
        started = time.monotonic()
        try:
            with _time_limit(self.options.timeout):
                return self._judge(prompt, completion, answer, started)
        except JudgeTimeout:
            return MathVerdict(0.0, _timeout_reason("finding the final answer", self.options, started))
        except ImportError:  # a missing dependency must surface, not score 0 silently
            raise
        except Exception as exc:  # noqa: BLE001 - garbage in, 0.0 out, with the reason
            return MathVerdict(0.0, f"could not judge: {type(exc).__name__}: {_short(str(exc))}")

    def _judge(self, prompt: str, completion: str, answer: Any, started: float) -> MathVerdict:
        """:meth:`judge` within its time limit; a timeout while finding the answers propagates."""
        references = reference_answers(answer)
        references = [prepare_reference(str(ref)) for ref in references if ref is not None]
        references = [ref for ref in references if ref]
        if not references:
            return MathVerdict(0.0, "no reference answer")
        found = find_final_answer(completion, self.extractors) if isinstance(completion, str) else None
        if found is None:
            return MathVerdict(0.0, "no final answer found", reference=references[0])
        extractor, predicted = found
        question = prompt if self.use_question and isinstance(prompt, str) else None
        first_reason = None
        try:
            for ref in references:
                result = _compare(predicted, ref, question, self.options, None)
                if result.equal:
                    return MathVerdict(1.0, None, predicted, ref, extractor)
                first_reason = first_reason or result.reason
        except JudgeTimeout:
            reason = _comparison_timeout_reason(predicted, self.options, started)
            return MathVerdict(0.0, reason, predicted, references[0], extractor)
        return MathVerdict(0.0, first_reason, predicted, references[0], extractor)

    def __call__(self, prompt: str, completion: str, answer: Any, /, **meta: Any) -> MathVerdict:
        return self.judge(prompt, completion, answer, **meta)
