"""The equivalence check's options, and the limits on time and size that keep sympy from running away on a
completion's expression."""

from __future__ import annotations

import contextlib
import logging
import math
import re
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from entrorl._checks import check_int
from entrorl.rewards.math.extract import _UNESCAPED_DOLLAR_RE

__all__ = ["JudgeTimeout", "MathOptions"]


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


# whether this thread's judgement runs under _time_limit's timer (refusals that only bound time are needed without one)
_TIMER = threading.local()


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
    _TIMER.armed = True

    def on_alarm(signum: int, frame: Any) -> None:
        raise JudgeTimeout(f"took more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        _TIMER.armed = False
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
# brackets nested deeper than this take the LaTeX parser seconds (25: about 1 s more, 30: 3 s, 60: minutes)
_MAX_NESTING = 20
# a sum raised to a power above this takes sympy's comparison seconds to expand ((x+1)^{800}: 9 s); refused only where
# no timer bounds the judgement
_MAX_SUM_EXPONENT = 400
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
    which the parser would compute as it reads them, and for brackets nested deeper than ``_MAX_NESTING``, which the
    parser reads in a time that grows exponentially with their depth."""
    depth = deepest = 0
    for character in s:
        if character in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif character in ")]}":
            depth -= 1
    if deepest > _MAX_NESTING:
        raise _TooLarge(f"brackets nested more than {_MAX_NESTING} deep")
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
        elif (not getattr(_TIMER, "armed", False) and _numeric(exponent, values) and base.has(sympy.Add)
              and base.free_symbols - set(values or ()) and _magnitude(exponent, values) > _MAX_SUM_EXPONENT):
            raise _TooLarge(f"a sum of symbols to a power above {_MAX_SUM_EXPONENT} (without a timer: off the main "
                            "thread)")
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


def _parse_latex(s: str) -> list[Any]:
    """Math-Verify's parse of ``s`` as LaTeX (falling back to free text); [] when unparsable."""
    from math_verify import parse

    _check_parse_time_sizes(s)
    parsed = parse(s if _UNESCAPED_DOLLAR_RE.search(s) else f"${s}$", parsing_timeout=None)  # "\$5": a dollar sign
    if not parsed:
        parsed = parse(s, parsing_timeout=None)
    return list(parsed)
