"""An answer read as one number or a list of numbers (with the variables they are assigned to), and when two
such readings match: exactly, within the tolerance, as an approximation, as real roots."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

from entrorl.rewards.math.brackets import _balanced, _split_top_level, _wrapped
from entrorl.rewards.math.limits import MathOptions, _DEFAULT_TOLERANCE, _MAX_EXPONENT, _MAX_FACTORIAL, _check_size, _parse_latex
from entrorl.rewards.math.question import QuestionHints


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
    if "_" in s:  # Python would read "1011_2" as 10112; a base's subscript is no digit separator
        return None
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
    if value == 0 and _nonzero_mantissa(s):
        return None  # below the float range (1e-400), which reads as 0: see _beyond_float_range
    return complex(value) if math.isfinite(value) else None


def _nonzero_mantissa(s: str) -> bool:
    """Whether a number's text has a non-zero digit before its exponent (``1e-400`` does, ``0.0e5`` does not)."""
    return re.search(r"[1-9]", re.split(r"[eE]", s, maxsplit=1)[0]) is not None


_SCIENTIFIC_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE](?P<exponent>[-+]?\d+)")


def _beyond_float_range(text: str) -> tuple[complex, Fraction] | None:
    """A number in scientific notation beyond the float range (``1e-400``, ``1e400``): its exact value, with the float
    it rounds to (0 or an infinity), so that it is compared exactly rather than as 0 or not at all; None otherwise,
    and for an exponent above ``limits``' bound on exponents (its exact value would not fit in memory)."""
    s = text.strip()
    m = _SCIENTIFIC_RE.fullmatch(s)
    if not m or abs(int(m["exponent"])) > _MAX_EXPONENT:
        return None
    value = float(s)
    if math.isfinite(value) and (value != 0 or not _nonzero_mantissa(s)):
        return None
    return complex(value), Fraction(Decimal(s))


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

    if isinstance(expr, sympy.Eq):  # "x = 3" -> 3; not "11 because 3*4 = 12"
        if not isinstance(expr.lhs, sympy.Symbol):
            return None
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
    exact = _exact_value(expr)
    if not (math.isfinite(value.real) and math.isfinite(value.imag)) and exact is None:
        return None  # beyond the float range, a number is compared by its exact value only
    return value, exact


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


def _value_of(text: str) -> tuple[complex, Fraction | None] | None:
    """The value of ``text`` and its exact value when it is exact: an integer or fraction written plainly,
    or an expression without a decimal point whose value is rational (``10^{12}+1``)."""
    plain = _plain_number(text)
    if plain is not None:
        return plain, _exact_rational(text)
    beyond = _beyond_float_range(text)
    if beyond is not None:
        return beyond
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


def _beyond_floats(v: _Value) -> bool:
    """Whether ``v``'s value as a float is not what it is: infinite (``1e400``) or 0 for a non-zero value
    (``1e-400``)."""
    return not (math.isfinite(v.value.real) and math.isfinite(v.value.imag)) or (v.value == 0 and v.rational != 0)


def _close(a: _Value, b: _Value, options: MathOptions) -> bool:
    """Equal within the tolerances; two exact values (integers, fractions) must be equal exactly unless the
    caller raised ``tolerance`` above its default (``abs_tolerance``, 0 by default, applies to them too)."""
    if a.rational is not None and b.rational is not None:
        if options.tolerance <= _DEFAULT_TOLERANCE:
            return abs(a.rational - b.rational) <= options.abs_tolerance
        if _beyond_floats(a) or _beyond_floats(b):  # the tolerances in exact arithmetic
            largest = max(abs(a.rational), abs(b.rational))
            return abs(a.rational - b.rational) <= max(Fraction(options.tolerance) * largest,
                                                       Fraction(options.abs_tolerance))
    if a.value == b.value:
        return True
    return abs(a.value - b.value) <= max(options.tolerance * max(abs(a.value), abs(b.value)), options.abs_tolerance)


def _is_integer(v: _Value) -> bool:
    if v.rational is not None:
        return v.rational.denominator == 1
    return v.value.imag == 0 and v.value.real.is_integer()


def _as_precise_as_asked(decimals: int, significant: int, error: Any, target: Any, hints: QuestionHints) -> bool:
    """Whether an answer of ``decimals`` decimals and ``significant`` significant digits, ``error`` away from the value
    ``target``, keeps the precision the question states (``0`` does not stand for 0.33 "to the nearest hundredth");
    where it states none, whether the error is within half the value (``0`` does not stand for 0.33 "approximately"
    either, ``9`` does for 9.4)."""
    if hints.decimals is not None:
        return decimals >= hints.decimals
    if hints.significant is not None:
        return significant >= hints.significant
    return error <= abs(target) / 2


def _rounded(value: Fraction, decimals: int) -> Fraction:
    """``value`` rounded half up to ``decimals`` decimals, exactly."""
    scale = 10**decimals
    return Fraction(math.floor(value * scale + Fraction(1, 2)), scale)


def _approximates(exact: _Value, approx: _Value, options: MathOptions, hints: QuestionHints, *,
                  approx_is_answer: bool = True) -> bool:
    """The approximation rule: ``approx`` (a decimal or integer literal) stands for ``exact`` to its written
    precision (see the module notes). An integer stands only for a non-integer value rounded to it, and only
    when the question asks for rounding. An answer (``approx_is_answer``; a reference's precision is the reference's)
    rounded as the question asks keeps the precision it states (:func:`_as_precise_as_asked`), and is then rounded,
    not cut. Exact values are compared in exact arithmetic."""
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
    if hints.rounding and approx_is_answer and hints.decimals is not None and decimals > hints.decimals:
        # more digits than asked: right when it rounds to what the value rounds to at the decimals asked
        return _rounded(written, hints.decimals) == _rounded(Fraction(target), hints.decimals)
    precise = not approx_is_answer or _as_precise_as_asked(decimals, significant, error, target, hints)
    rounded_as_asked = hints.rounding and rounded and precise
    if decimals == 0:  # an integer: "333" does not stand for 1000/3, unless the question asks for rounding
        return rounded_as_asked and not _is_integer(exact)
    exact_form = _decimal_form(exact.text)
    if exact_form is None:  # exact value (\pi, \sqrt2, 1/3): rounded or cut to the written digits
        stated = hints.rounding and (hints.decimals is not None or hints.significant is not None)
        if options.approximation_digits and significant >= options.approximation_digits and not stated:
            cut = 0 <= abs(target) - abs(written) < unit + slack and target * written >= 0
            if rounded or cut:
                return True
        return rounded_as_asked
    # two decimals: only when the question asks for rounding, and the rounded one has fewer decimals
    return rounded_as_asked and exact_form[0] > decimals


def _numbers_match(a: _Value, b: _Value, options: MathOptions, hints: QuestionHints) -> bool:
    """Whether the reference's value ``a`` and the answer's ``b`` are the same number (exactly, within the tolerances
    or by the approximation rule, either one rounding the other)."""
    return (
        _close(a, b, options)
        or _approximates(a, b, options, hints)
        or _approximates(b, a, options, hints, approx_is_answer=False)
    )


def _is_real(v: _Value, options: MathOptions) -> bool:
    return abs(v.value.imag) <= max(options.tolerance * abs(v.value), options.abs_tolerance, 1e-12)


def _distinct(values: Sequence[_Value], options: MathOptions, hints: QuestionHints) -> list[_Value]:
    kept: list[_Value] = []
    for v in values:
        if not any(_numbers_match(v, k, options, hints) for k in kept):
            kept.append(v)
    return kept
