"""Math answers: extract the final answer of a completion and check it for *equivalence* with the reference.

Two stages, each an ordered table that later work extends (percentages, units, intervals, ...):

1. **Extraction** (:data:`ANSWER_EXTRACTORS`, :func:`extract_final_answer`): the first extractor that
   finds a non-empty answer wins —

   * ``boxed`` — the last complete ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces included;
   * ``answer_tag`` — the last ``<answer>...</answer>``;
   * ``answer_phrase`` — the last "the answer is X" / "Answer: X" (up to the end of the line or sentence);
   * ``hashes`` — GSM8K's ``#### X``;
   * ``last_number`` — the last number in the text (integers, decimals, ``1,234``, ``a/b``).

2. **Equivalence** (:data:`CHECKERS`, :func:`math_equal`): the answers are equal when any checker says so
   —

   * ``string`` — equal after dropping whitespace, ``$`` and case;
   * ``math_verify`` — HuggingFace Math-Verify (``math_verify.parse`` both sides as LaTeX, then
     ``math_verify.verify(gold, prediction)``): fractions vs decimals, ``\\frac12`` vs ``1/2``, sets of
     roots in any order, ``\\sqrt2`` vs ``2^{1/2}``, symbolic expressions, ...;
   * ``numeric`` — both sides evaluate to numbers (or sets / tuples of numbers) that agree within a
     *relative* tolerance (``tolerance``, default ``1e-9``: ``3.14159`` is not ``\\pi``; with
     ``tolerance=1e-6`` it is).

   A checker that raises counts as "not equal"; the reward never raises on garbage input.

The ``math`` reward (:class:`MathReward`) is 1.0 when the completion's extracted answer is equivalent to
the reference (which may itself contain ``\\boxed{}``), else 0.0. Models should be asked to box their
answer; :data:`MATH_INSTRUCTION` is the usual instruction.

Math-Verify guards parsing with ``signal.alarm`` timeouts, which only work in the main thread; off the
main thread the timeouts are disabled (Math-Verify then logs a one-time warning).
"""

from __future__ import annotations

import importlib.util
import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property
from typing import Any

from entrorl.rewards.base import register_reward

__all__ = [
    "ANSWER_EXTRACTORS",
    "CHECKERS",
    "MATH_INSTRUCTION",
    "Comparison",
    "MathOptions",
    "MathReward",
    "extract_answer_phrase",
    "extract_answer_tag",
    "extract_boxed",
    "extract_final_answer",
    "extract_hashes",
    "extract_last_number",
    "math_equal",
    "normalize_answer",
    "prepare_reference",
]

#: The instruction to append to math prompts so answers are extractable.
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


# --------------------------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _braced(text: str, start: int) -> str | None:
    """Content of the brace group opening at ``text[start] == "{"``; None if unbalanced."""
    depth = 0
    i = start
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            i += 2  # escaped brace \{ \} is content
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces kept), or of
    ``\\boxed 5``; None when there is none (an unclosed last box falls back to the previous one)."""
    for m in reversed(list(_BOX_RE.finditer(text))):
        j = m.end()
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            content = _braced(text, j)
            if content is not None:
                return content
        elif j > m.end():  # "\boxed 5": the next token
            tok = re.match(r"[^\s$]+", text[j:])
            if tok:
                return tok.group(0)
    return None


_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def extract_answer_tag(text: str) -> str | None:
    """Content of the last ``<answer>...</answer>``."""
    matches = _TAG_RE.findall(text)
    return matches[-1] if matches else None


_PHRASE_RE = re.compile(r"\banswer\b\s*(?:\*\*)?\s*(?:is\b|:|=)\s*:?", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"\.(?=\s|$)")


def extract_answer_phrase(text: str) -> str | None:
    """What follows the last "answer is" / "answer:" / "answer =", up to the end of the line (or of
    a display-math block starting there) or the first sentence-ending period."""
    matches = list(_PHRASE_RE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].lstrip(" \t*\n")
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
    r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?(?![\d])|(?<![\w.])-?\.\d+"
)


def extract_last_number(text: str) -> str | None:
    """The last number in the text (``-3``, ``2.5``, ``1,234``, ``3/4``, ``.5``), commas removed."""
    text = text.replace("\u2212", "-")
    matches = _NUMBER_RE.findall(text)
    if not matches:
        return None
    return re.sub(r"\s+", "", matches[-1]).replace(",", "")


#: ``(name, extractor)`` pairs tried in order by :func:`extract_final_answer`.
ANSWER_EXTRACTORS: list[tuple[str, Callable[[str], str | None]]] = [
    ("boxed", extract_boxed),
    ("answer_tag", extract_answer_tag),
    ("answer_phrase", extract_answer_phrase),
    ("hashes", extract_hashes),
    ("last_number", extract_last_number),
]

_WRAPPERS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"), ("**", "**"), ("`", "`"))


def normalize_answer(answer: str) -> str:
    """Strip whitespace, enclosing ``$..$`` / ``\\(..\\)`` / ``\\[..\\]`` / ``**..**`` and a trailing period."""
    s = answer.strip()
    changed = True
    while changed and s:
        changed = False
        for opener, closer in _WRAPPERS:
            if len(s) >= len(opener) + len(closer) and s.startswith(opener) and s.endswith(closer):
                inner = s[len(opener) : len(s) - len(closer)]
                if opener.startswith("$") and "$" in inner:  # "$a$ and $b$" is not one wrapped block
                    continue
                s = inner.strip()
                changed = True
        if s.endswith("."):
            s = s[:-1].strip()
            changed = True
    return s


def extract_final_answer(
    text: str, extractors: Sequence[tuple[str, Callable[[str], str | None]]] | None = None
) -> str | None:
    """The completion's final answer (normalized), by the first extractor that finds a non-empty one;
    None if none does."""
    if not isinstance(text, str) or not text.strip():
        return None
    for _name, extractor in extractors if extractors is not None else ANSWER_EXTRACTORS:
        found = extractor(text)
        if found is not None:
            found = normalize_answer(found)
            if found:
                return found
    return None


def prepare_reference(reference: str) -> str:
    """A reference answer ready for comparison: the content of its last ``\\boxed{}`` if it has one,
    normalized."""
    boxed = extract_boxed(reference)
    return normalize_answer(boxed if boxed is not None else reference)


# --------------------------------------------------------------------------------------------
# equivalence
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MathOptions:
    """Options of the equivalence check.

    * ``tolerance`` — relative tolerance of the numeric checker (``|a - b| <= tol * max(|a|, |b|)``);
    * ``abs_tolerance`` — absolute tolerance of the numeric checker (for answers near 0);
    * ``float_rounding`` — decimals Math-Verify rounds floats to before comparing;
    * ``timeout`` — seconds Math-Verify may spend parsing / verifying one answer (main thread only);
    * ``max_chars`` — longer answers only get the string check (no symbolic parsing of garbage).
    """

    tolerance: float = 1e-9
    abs_tolerance: float = 0.0
    float_rounding: int = 6
    timeout: int = 5
    max_chars: int = 1000

    def __post_init__(self) -> None:
        for name in ("tolerance", "abs_tolerance"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("float_rounding", "timeout", "max_chars"):
            value = getattr(self, name)
            low = 0 if name == "float_rounding" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _wrap_latex(s: str) -> str:
    return s if "$" in s else f"${s}$"


class Comparison:
    """One prediction-vs-reference comparison handed to every checker; parses lazily and once."""

    def __init__(self, prediction: str, reference: str, options: MathOptions) -> None:
        self.prediction = prediction
        self.reference = reference
        self.options = options

    @property
    def parsable(self) -> bool:
        limit = self.options.max_chars
        return 0 < len(self.prediction) <= limit and 0 < len(self.reference) <= limit

    @property
    def timeout(self) -> int | None:
        # signal.alarm-based timeouts only work in the main thread.
        return self.options.timeout if threading.current_thread() is threading.main_thread() else None

    def _parse(self, s: str) -> list[Any]:
        if not self.parsable:
            return []
        from math_verify import parse

        parsed = parse(_wrap_latex(s), parsing_timeout=self.timeout)
        if not parsed:  # text around the answer ("5 apples"): let Math-Verify look for an expression
            parsed = parse(s, parsing_timeout=self.timeout)
        return list(parsed)

    @cached_property
    def gold(self) -> list[Any]:
        """Math-Verify parse of the reference (empty if unparsable)."""
        return self._parse(self.reference)

    @cached_property
    def target(self) -> list[Any]:
        """Math-Verify parse of the prediction (empty if unparsable)."""
        return self._parse(self.prediction)


Checker = Callable[[Comparison], bool]


def _canon(s: str) -> str:
    return re.sub(r"\s+|\$|\\[,!;: ]", "", s).casefold()


def check_string(c: Comparison) -> bool:
    """Equal after dropping whitespace, ``$``, LaTeX spacing commands and case."""
    return _canon(c.prediction) == _canon(c.reference)


def check_math_verify(c: Comparison) -> bool:
    """Math-Verify's symbolic / numeric equivalence."""
    if not c.gold or not c.target:
        return False
    from math_verify import verify

    return bool(verify(c.gold, c.target, float_rounding=c.options.float_rounding, timeout_seconds=c.timeout))


# -- numeric ---------------------------------------------------------------------------------

_FRAC_RE = re.compile(r"^(-?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")


def _plain_number(s: str) -> complex | None:
    """A plain-text number: ``-1,234.5``, ``3/4``, ``\\frac{3}{4}``; None otherwise."""
    s = s.strip().replace("\u2212", "-")
    if re.fullmatch(r"-?(?:\d{1,3}(?:,\d{3})+)(?:\.\d+)?", s):
        s = s.replace(",", "")
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


def _sympy_number(expr: Any) -> complex | None:
    import sympy

    if isinstance(expr, sympy.Eq):  # "x = 3" -> 3
        expr = expr.rhs
    if not isinstance(expr, sympy.Basic) or not expr.is_number:
        return None
    value = complex(expr.evalf(30))
    return value if math.isfinite(value.real) and math.isfinite(value.imag) else None


def _numeric_forms(parsed: list[Any], raw: str) -> list[tuple[str, list[complex]]]:
    """Numeric readings of an answer: ("scalar", [v]), ("set", sorted values) or ("tuple", values)."""
    import sympy

    forms: list[tuple[str, list[complex]]] = []
    plain = _plain_number(raw)
    if plain is not None:
        forms.append(("scalar", [plain]))
    for item in parsed:
        if isinstance(item, str):
            value = _plain_number(item)
            if value is not None:
                forms.append(("scalar", [value]))
            continue
        try:
            if isinstance(item, sympy.FiniteSet):
                values = [_sympy_number(e) for e in item.args]
                if values and all(v is not None for v in values):
                    forms.append(("set", sorted(values, key=lambda v: (v.real, v.imag))))  # type: ignore[arg-type]
            elif isinstance(item, (sympy.Tuple, tuple, list)):
                values = [_sympy_number(e) for e in item]
                if values and all(v is not None for v in values):
                    forms.append(("tuple", values))  # type: ignore[arg-type]
            else:
                value = _sympy_number(item)
                if value is not None:
                    forms.append(("scalar", [value]))
        except (TypeError, ValueError, AttributeError, OverflowError):
            continue
    return forms


def _close(a: complex, b: complex, options: MathOptions) -> bool:
    if a == b:
        return True
    return abs(a - b) <= max(options.tolerance * max(abs(a), abs(b)), options.abs_tolerance)


def check_numeric(c: Comparison) -> bool:
    """Both answers evaluate to numbers (or sets / tuples of numbers) equal within the tolerance."""
    from math_verify.utils import timeout

    gold_parsed, target_parsed = c.gold, c.target
    # numeric evaluation of odd expressions can be slow: same time limit as Math-Verify's own steps
    evaluate = timeout(timeout_seconds=c.timeout)(_numeric_forms)
    gold = evaluate(gold_parsed, c.reference)
    pred = evaluate(target_parsed, c.prediction)
    for kind_g, vals_g in gold:
        for kind_p, vals_p in pred:
            if kind_g == kind_p and len(vals_g) == len(vals_p):
                if all(_close(g, p, c.options) for g, p in zip(vals_g, vals_p)):
                    return True
    return False


#: ``(name, checker)`` pairs; the answers are equivalent when any checker returns True.
CHECKERS: list[tuple[str, Checker]] = [
    ("string", check_string),
    ("math_verify", check_math_verify),
    ("numeric", check_numeric),
]


def math_equal(
    prediction: str,
    reference: str,
    *,
    options: MathOptions | None = None,
    checkers: Sequence[tuple[str, Checker]] | None = None,
    **option_kwargs: Any,
) -> bool:
    """Whether two *already extracted* answers are mathematically equivalent.

    ``option_kwargs`` build a :class:`MathOptions` (``tolerance=1e-6``, ...) when ``options`` is not
    given. Never raises on malformed answers: a checker that fails counts as "not equal".
    """
    if options is None:
        options = MathOptions(**option_kwargs)
    elif option_kwargs:
        raise ValueError("give either options or option keyword arguments, not both")
    if not isinstance(prediction, str) or not isinstance(reference, str):
        return False
    prediction, reference = normalize_answer(prediction), normalize_answer(reference)
    if not prediction or not reference:
        return False
    from math_verify.errors import TimeoutException  # a BaseException, not an Exception

    comparison = Comparison(prediction, reference, options)
    for _name, checker in checkers if checkers is not None else CHECKERS:
        try:
            if checker(comparison):
                return True
        except (Exception, TimeoutException):  # noqa: BLE001 - failing on odd input: "not shown equal"
            continue
    return False


# --------------------------------------------------------------------------------------------
# the reward
# --------------------------------------------------------------------------------------------


def _validate_math(**kwargs: Any) -> None:
    MathReward(**kwargs)


@register_reward(
    "math",
    description="1.0 if the completion's final answer (\\boxed{}, 'the answer is', last number) is "
    "mathematically equivalent to the reference (Math-Verify + numeric tolerance), else 0.0",
    factory=True,
    validate=_validate_math,
)
class MathReward:
    """The ``math`` reward: 1.0 when the extracted final answer is equivalent to the reference.

    ``tolerance`` (alias ``numeric_tolerance``; default ``1e-9``) is the numeric checker's relative
    tolerance; the other
    options are :class:`MathOptions` fields. A reference given as a list / tuple accepts any of its
    items. A missing reference or an unextractable answer scores 0.0; nothing raises.
    """

    def __init__(
        self,
        *,
        tolerance: float | None = None,
        numeric_tolerance: float | None = None,
        abs_tolerance: float = 0.0,
        float_rounding: int = 6,
        timeout: int = 5,
        max_chars: int = 1000,
    ) -> None:
        if numeric_tolerance is not None:
            if tolerance is not None:
                raise ValueError("give tolerance or its alias numeric_tolerance, not both")
            tolerance = numeric_tolerance
        if tolerance is None:
            tolerance = MathOptions.tolerance
        if importlib.util.find_spec("math_verify") is None:
            raise ImportError("the math reward needs math-verify: pip install math-verify")
        self.options = MathOptions(
            tolerance=tolerance,
            abs_tolerance=abs_tolerance,
            float_rounding=float_rounding,
            timeout=timeout,
            max_chars=max_chars,
        )
        self.__name__ = "math"

    def __repr__(self) -> str:
        return f"MathReward({self.options})"

    def __call__(self, prompt: str, completion: str, answer: Any, /, **meta: Any) -> float:
        try:
            if answer is None:
                return 0.0
            references = list(answer) if isinstance(answer, (list, tuple)) else [answer]
            predicted = extract_final_answer(completion)
            if predicted is None:
                return 0.0
            for ref in references:
                if ref is None:
                    continue
                if math_equal(predicted, prepare_reference(str(ref)), options=self.options):
                    return 1.0
            return 0.0
        except ImportError:  # a missing dependency must surface, not score 0 silently
            raise
        except Exception:  # noqa: BLE001 - garbage in, 0.0 out
            return 0.0
