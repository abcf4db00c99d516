"""The ``exact_match`` reward: the extracted final answer equals the reference, up to surrounding
whitespace, case and Unicode's composition of characters."""

from __future__ import annotations

from typing import Any

from entrorl._checks import caseless
from entrorl.rewards.base import reference_answers, register_reward
from entrorl.rewards.math import extract_final_answer

__all__ = ["exact_match"]


@register_reward(
    "exact_match",
    description="1.0 if the completion's final answer (\\boxed{}, <answer>, 'the answer is', ####, last number; "
    "else the whole completion) equals the reference after whitespace strip, case-fold and Unicode NFC, else 0.0",
)
def exact_match(prompt: str, completion: str, answer: Any, /, **meta: Any) -> float:
    """1.0 if the final answer of ``completion`` (see :func:`entrorl.rewards.math.extract_final_answer`;
    the whole completion when nothing is extracted) equals ``answer`` after ``strip()``, ``casefold()`` and Unicode
    NFC (``e`` + U+0301 is ``é``), else 0.0. A list / tuple / array ``answer`` accepts any of its items; ``None`` or a
    blank reference scores 0.0."""
    if answer is None or not isinstance(completion, str):
        return 0.0
    references = reference_answers(answer)
    predicted = extract_final_answer(completion)
    if predicted is None:
        predicted = completion
    key = caseless(predicted.strip())
    # a blank reference is no reference (as for `math`): an empty completion must not match it
    return 1.0 if any(ref is not None and str(ref).strip() and caseless(str(ref).strip()) == key
                      for ref in references) else 0.0

