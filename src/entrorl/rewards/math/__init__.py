"""Math answers: find the final answer of a completion, judge it *equivalent* (not equally spelled) to the
reference, and say why when it is not.

Three stages, each a small ordered table that later work extends:

1. **Extraction** (:data:`ANSWER_EXTRACTORS`, :func:`find_final_answer`): the first extractor that finds a
   non-empty answer wins (``MathReward(extractors=[...])`` picks and orders them) —

   * ``boxed`` — the last complete ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces included;
   * ``answer_tag`` — the last ``<answer>...</answer>``;
   * ``answer_phrase`` — the last "the answer is X" / "Final answer: X" / "答案是 X" (to the end of the
     line or sentence, or to a clause after it outside math: "11 because 3*4 = 12" gives ``11``);
   * ``hashes`` — GSM8K's ``#### X``;
   * ``last_number`` — the last number in the text (integers, decimals, ``1,234``, ``a/b``, ``1e3``), or the value
     written out on its side of a math statement (``$x = \\frac{3}{2}$`` gives ``\\frac{3}{2}``, not ``2``); none
     when the number is part of an expression (``$2^{10}$``).

   After a reasoning block closed by ``</think>``, an answer stated after the block comes first, then a marked one
   (``boxed``, ``answer_tag``) anywhere, then the last number after the block. Each takes time linear in the length
   of the completion (braces are matched once, tags paired once).

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
       a value matches a decimal it rounds to, two decimals included (``3.1415926`` matches a reference
       ``3.14``), the answer keeping the precision the question states, if it states one (``0`` does not
       match ``0.33`` "to the nearest hundredth"). An integer (no decimal point) approximates nothing
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

from entrorl.rewards.math.extract import (
    ANSWER_EXTRACTORS, Extractors, extract_answer_phrase, extract_answer_tag, extract_boxed, extract_final_answer,
    extract_hashes, extract_last_number, find_final_answer, normalize_answer, prepare_reference, select_extractors
)
from entrorl.rewards.math.question import QuestionHints, read_question
from entrorl.rewards.math.canonical import canonical_answer, has_percent_sign
from entrorl.rewards.math.limits import JudgeTimeout, MathOptions
from entrorl.rewards.math.compare import (
    CHECKERS, Checker, Comparison, ComparisonResult, check_math_verify, check_numeric, check_string, compare_answers,
    math_equal
)
from entrorl.rewards.math.reward import MATH_INSTRUCTION, MathReward, MathVerdict

__all__ = [
    "ANSWER_EXTRACTORS",
    "CHECKERS",
    "Checker",
    "MATH_INSTRUCTION",
    "Comparison",
    "ComparisonResult",
    "Extractors",
    "JudgeTimeout",
    "MathOptions",
    "MathReward",
    "MathVerdict",
    "QuestionHints",
    "canonical_answer",
    "check_math_verify",
    "check_numeric",
    "check_string",
    "compare_answers",
    "extract_answer_phrase",
    "extract_answer_tag",
    "extract_boxed",
    "extract_final_answer",
    "extract_hashes",
    "extract_last_number",
    "find_final_answer",
    "has_percent_sign",
    "math_equal",
    "normalize_answer",
    "prepare_reference",
    "read_question",
    "select_extractors",
]
