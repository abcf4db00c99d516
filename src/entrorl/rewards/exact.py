"""The ``exact_match`` reward: the extracted final answer (or the whole completion) equals the reference, up to
surrounding whitespace, case and Unicode's composition of characters."""

from __future__ import annotations

from typing import Any

from entrorl._checks import caseless
from entrorl.rewards.base import reference_answers, register_reward
from entrorl.rewards.math import extract_final_answer, prepare_reference

__all__ = ["exact_match"]


@register_reward(
    "exact_match",
    description="1.0 if the completion's final answer (\\boxed{}, <answer>, 'the answer is', ####, last number; "
    "else the whole completion), or the whole completion, equals the reference (its last \\boxed{} or what follows "
    "its last ####, when it has one) after whitespace strip, case-fold and Unicode NFC, else 0.0",
)
def exact_match(prompt: str, completion: str, answer: Any, /, **meta: Any) -> float:
    """1.0 if the final answer of ``completion`` (see :func:`entrorl.rewards.math.extract_final_answer`;
    the whole completion when nothing is extracted), or the whole completion, equals ``answer`` after ``strip()``,
    ``casefold()`` and Unicode NFC (``e`` + U+0301 is ``é``), else 0.0. A reference is read as the ``math`` reward
    reads it (:func:`entrorl.rewards.math.prepare_reference`): the content of its last ``\\boxed{}``, else what
    follows its last ``####`` (GSM8K's answer column), normalized as extracted answers are. A list / tuple / array
    ``answer`` accepts any of its items; ``None`` or a blank reference scores 0.0."""
    if answer is None or not isinstance(completion, str):
        return 0.0
    predicted = extract_final_answer(completion)
    keys = {caseless(completion.strip()), caseless((completion if predicted is None else predicted).strip())}
    for reference in reference_answers(answer):
        if reference is None or not str(reference).strip():
            continue  # a blank reference is no reference (as for `math`): an empty completion must not match it
        written = str(reference).strip()
        if keys & {caseless(written), caseless(prepare_reference(written).strip())} - {""}:
            return 1.0
    return 0.0
