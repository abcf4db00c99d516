"""The ``math`` reward: :class:`MathReward` and the :class:`MathVerdict` it returns."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Sequence
from typing import Any

from entrorl.rewards.base import reference_answers, register_reward
from entrorl.rewards.math.compare import _compare, _comparison_timeout_reason, _short, _timeout_reason
from entrorl.rewards.math.extract import ANSWER_EXTRACTORS, find_final_answer, prepare_reference, select_extractors
from entrorl.rewards.math.limits import JudgeTimeout, MathOptions, _time_limit

__all__ = ["MATH_INSTRUCTION", "MathReward", "MathVerdict"]


#: The instruction to append to math prompts so answers are extractable.
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


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
