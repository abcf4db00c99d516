"""Argument checks and conversions shared by every layer of the package (the standard library, numpy and torch only)."""

from __future__ import annotations

import difflib
import numbers
import operator
import os
import re
import types
import typing
import unicodedata
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch


def check_int(value: Any, name: str, *, minimum: int | None = None) -> int:
    """``value`` as an ``int`` when it is an integer of at least ``minimum``; otherwise ``ValueError`` naming ``name``
    and the value given.

    An integer is a Python ``int`` or any single integer that ``operator.index`` reads: a numpy integer, a 0-d
    integer array or tensor. Booleans (Python's, numpy's, a boolean tensor) and floats, even whole ones such as
    ``2.0``, are refused: a count given as a flag or a float is usually a slip upstream.
    """
    number = _as_int(value)
    if number is None or (minimum is not None and number < minimum):
        raise ValueError(f"{name} must be {_integer_kind(minimum)}, got {value!r}")
    return number


# C0 controls but tab and newline, DEL, C1 controls, and the marks that reorder bidirectional text
_INVISIBLE_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def caseless(text: str) -> str:
    """``text`` to compare without case or Unicode's composition of characters: NFC, case-folded, NFC again (folding
    may turn a combining mark into a letter: U+0345 into iota), so that ``é`` and ``e`` + U+0301, or marks written in
    either order, compare equal, as ``STRASSE`` and ``Straße`` do."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).casefold())


def visible_controls(text: str) -> str:
    """``text`` for a terminal: its control characters (but tab and newline) and bidirectional overrides written as
    escapes (``\\x1b``, ``\\u202e``), so that text from a data file or a reward's error cannot clear the screen,
    retitle the terminal, move the cursor or reverse the line it is printed on."""
    return _INVISIBLE_CONTROLS.sub(lambda found: ascii(found.group())[1:-1], text)


def is_real_number(value: Any) -> bool:
    """Whether ``value`` is one real number: any ``numbers.Real`` (a Python or numpy int or float, a ``Fraction``) but
    not a boolean, Python's or numpy's (a flag given for a number is usually a slip upstream)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def validation_message(item: dict[str, Any]) -> str:
    """A pydantic error's message (one item of ``ValidationError.errors()``) as its validator wrote it, without the
    ``"Value error, "`` that pydantic puts before a ``ValueError``'s."""
    return item["msg"].removeprefix("Value error, ")


def is_boolean(value: Any) -> bool:
    """Whether ``value`` is a boolean or holds booleans: Python's, numpy's, or a boolean array or tensor."""
    return isinstance(value, (bool, np.bool_)) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool")


def refuse_booleans_for_numbers(value: Any, annotation: Any) -> Any:
    """``value`` as given, unless it is a boolean (Python's, numpy's, a boolean tensor) for a setting of type
    ``annotation`` that takes numbers but no booleans (``int``, ``float | None``, ``list[int]``, ...), a complex
    number, or a tensor or array of one or more dimensions for one number: ``ValueError`` then. For a pydantic
    ``mode="before"`` validator: pydantic reads ``True`` as 1 for a number (a count of one step, Pass@1, a clip ratio
    of 1), and a one-element tensor of any shape as its number (a numpy array it refuses)."""
    if _takes_numbers_only(_alternatives(annotation)):
        if is_boolean(value):
            raise ValueError("expected a number, not a boolean")
        if _is_complex(value):  # numpy's and torch's would lose their imaginary part without a word
            raise ValueError("expected a real number, not a complex one")
        if getattr(value, "ndim", 0) != 0:
            raise ValueError(f"expected one number, not an array of shape {list(value.shape)}")
    if isinstance(value, (list, tuple)) and any(is_boolean(item) or _is_complex(item) for item in value):
        elements = {element for alternative in _alternatives(annotation)
                    if typing.get_origin(alternative) in (list, tuple) for element in typing.get_args(alternative)}
        if _takes_numbers_only(elements - {Ellipsis}):
            raise ValueError("expected real numbers, not booleans or complex numbers")
    return value


def _is_complex(value: Any) -> bool:
    return (isinstance(value, numbers.Complex) and not isinstance(value, numbers.Real)) or "complex" in str(
        getattr(value, "dtype", ""))


def _alternatives(annotation: Any) -> set:
    """The types of a union annotation (``int | None`` → ``{int, None}``), or the annotation alone."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return set(typing.get_args(annotation)) if union else {annotation}


def _takes_numbers_only(accepted: set) -> bool:
    return bool(accepted & {int, float}) and bool not in accepted


def did_you_mean(name: str, choices: Iterable[str], *, n: int = 1, cutoff: float = 0.6) -> str:
    """``"did you mean 'x'? "`` for the choice nearest to a misspelt ``name`` (difflib's closest match, letter case
    aside: ``GRPO`` finds ``grpo``), or ``"did you mean 'x' or 'y'? "`` for the ``n`` nearest at least ``cutoff``
    alike, else ``""``: the hint an error message puts before the list of valid names."""
    choices = list(choices)
    by_folded = {choice.casefold(): choice for choice in reversed(choices)}  # the first of names folding alike
    close = difflib.get_close_matches(name.casefold(), list(by_folded), n=n, cutoff=cutoff)
    return f"did you mean {' or '.join(repr(by_folded[choice]) for choice in close)}? " if close else ""


def _as_int(value: Any) -> int | None:
    if is_boolean(value):
        return None
    if getattr(value, "ndim", 0) != 0:  # torch reads a one-element tensor of any shape as an index
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _integer_kind(minimum: int | None) -> str:
    if minimum is None:
        return "an integer"
    if minimum == 0:
        return "a non-negative integer"
    if minimum == 1:
        return "a positive integer"
    return f"an integer >= {minimum}"


def as_bool_mask(mask: torch.Tensor, name: str) -> torch.Tensor:
    """``mask`` as a bool tensor: a bool one as it is, a numeric one whose values are all 0 or 1 converted;
    ``ValueError`` naming ``name`` for any other value (0.5 is no verdict on a token, though ``bool()`` reads it as
    True)."""
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        stray = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
        raise ValueError(f"{name} must be bool or hold only 0 and 1, got {stray!r}")
    return mask.bool()


def as_tensor(values: Any) -> torch.Tensor:
    """``values`` as a tensor: a tensor as given; anything else as numpy reads it, so that Python floats stay float64
    (torch would round them to float32, making 1 and 1 + 1e-12 one value) and an empty sequence, which holds no number
    to give it a type, is int64 (torch would make it float32, which a check for integer ids or counts then refuses).
    The caller checks the type and shape it needs."""
    if isinstance(values, torch.Tensor):
        return values
    array = np.asarray(values)
    return torch.as_tensor(array.astype(np.int64) if array.size == 0 else array)


#: Device types without float64 arithmetic: Apple's GPUs (``mps``).
DEVICES_WITHOUT_FLOAT64 = frozenset({"mps"})


def widest_float(device: torch.device | str) -> torch.dtype:
    """float64, or float32 on a device without it (:data:`DEVICES_WITHOUT_FLOAT64`), for values kept on ``device``."""
    return torch.float32 if torch.device(device).type in DEVICES_WITHOUT_FLOAT64 else torch.float64


def in_float64(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` detached, in float64: on its device, or copied to the CPU where the device has none (Apple's GPUs),
    so that a statistic computed in float64 for its precision keeps it everywhere. Moved first, then widened: an
    Apple GPU refuses a copy to the CPU that also asks for float64."""
    device = torch.device("cpu") if tensor.device.type in DEVICES_WITHOUT_FLOAT64 else tensor.device
    return tensor.detach().to(device).to(torch.float64)


# what launchers of several processes set in each: torchrun, accelerate launch and DeepSpeed's launcher (WORLD_SIZE,
# with RANK / LOCAL_RANK: a WORLD_SIZE left in a shell alone is no launch), Open MPI's, MPICH's and MVAPICH's mpirun
_LAUNCHER_SIZES = (("WORLD_SIZE", "torchrun or accelerate launch sets"), ("OMPI_COMM_WORLD_SIZE", "mpirun sets"),
                   ("PMI_SIZE", "mpirun sets"), ("MV2_COMM_WORLD_SIZE", "mpirun sets"))


def rounded_like(values: np.ndarray, given: Any) -> np.ndarray:
    """``values`` rounded to the floating-point type of ``given`` (a tensor's, bfloat16 included, or an array's), as
    float64: what those numbers are in the precision ``given`` holds its own, so that a float32 7/10 compares equal
    to the edge 0.7."""
    if hasattr(given, "new_tensor"):  # a torch tensor
        floating = given.is_floating_point()
        return given.new_tensor(values, device="cpu").double().numpy() if floating else values.astype(np.float64)
    dtype = np.asarray(given).dtype
    return values.astype(dtype).astype(np.float64) if dtype.kind == "f" else values.astype(np.float64)


def refuse_multi_process_launch(what: str) -> None:
    """``ValueError`` when this process is one of several started together: an open ``torch.distributed`` process group
    of more than one process, or a launcher's process count above 1 (``WORLD_SIZE`` beside ``RANK`` or ``LOCAL_RANK``:
    ``torchrun``, ``accelerate launch``, DeepSpeed's; ``OMPI_COMM_WORLD_SIZE``, ``PMI_SIZE``, ``MV2_COMM_WORLD_SIZE``:
    ``mpirun``). ``what`` (e.g. ``"entrorl train"``) runs in one process; under a launcher every process would do all
    of it on its own, into the same outputs."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        processes, source = torch.distributed.get_world_size(), "an open torch.distributed process group"
    else:
        processes, source = 1, ""
        for variable, launchers in _LAUNCHER_SIZES:
            if variable == "WORLD_SIZE" and not ({"RANK", "LOCAL_RANK"} & os.environ.keys()):
                continue
            try:
                count = int(os.environ.get(variable, "1"))
            except ValueError:
                continue  # not a launcher's
            if count > processes:
                processes, source = count, f"{variable}={count}, as {launchers} it"
    if processes > 1:
        raise ValueError(
            f"{what} runs in one process, but this one was started as one of {processes} ({source}): each would do "
            "all the work on its own, into the same outputs. Run it without the launcher; to train on several GPUs or "
            "machines, use the verl or TRL integration (docs/verl.md, docs/trl.md)")
