"""Code rewards: run the completion's program against test cases in a sandbox.

The ``code`` reward (:class:`CodeReward`) extracts a Python program from the completion
(:func:`extract_code`: the last fenced block tagged ``python`` / ``py`` / ``python3``, else the last
untagged fenced block), runs it against the sample's test cases with
:func:`entrorl.rewards.sandbox.run_in_sandbox` and scores the fraction of cases passed. A program
that tries something forbidden (a network connection, a write outside its directory, starting a
process or signalling another, looking up C functions through ``ctypes``, loading ``cffi``, reading another
process's ``/proc``) scores 0 whatever it passed.

Test cases — the ``answer`` of the sample, or ``meta["tests"]`` when the answer is None; a dict, a
list, or a JSON string of either (:func:`parse_tests`)::

    {
      "cases":   [{"input": "1 2\\n", "output": "3\\n"}, ...],   # standard input -> standard output
      "inputs":  ["1 2\\n", ...], "outputs": ["3\\n", ...],       # the same, as parallel lists
      "asserts": ["assert add(1, 2) == 3", ...],                  # Python run after the program
    }

A list of ``{"input", "output"}`` dicts is a list of standard-input cases; a list of strings is a
list of assert cases. Function calls (APPS, TACO, LiveCodeBench's functional cases)::

    {"fn_name": "add", "inputs": [[1, 2], ...], "outputs": [3, ...]}        # each input the list of the arguments
    {"fn_name": "twoSum", "cases": [{"input": "[2,7,11,15]\\n9", "output": "[0,1]", "testtype": "functional"}]}

call ``fn_name`` (a method of ``class Solution`` when the program defines one that has it) with the arguments, each a
JSON value (one per line in a case's ``input``), and pass when it returns the output as JSON holds it (tuples as
lists, keys as strings; for APPS, TACO and PrimeIntellect an output given as a list of one value may be that value).
Each call is an assert case. A case may say
its ``testtype`` or ``type`` (``stdin``, ``stdin_stdout``; ``functional``, ``function_call``) and its own ``fn_name``
(PrimeIntellect's ``{"test_cases": [...], "language": "python"}``, where ``test_cases`` is ``cases`` and a call's
arguments and value are values, not JSON text); another key in a case is refused.

A standard-input case passes when the program's output matches ``output`` under the ``compare`` option
(``"tokens"``: the same whitespace-separated tokens, the default; ``"lines"``: the same lines after stripping trailing
whitespace and trailing blank lines; ``"exact"``). An assert case passes when its code runs without raising; the
program itself is executed once before the first assert case, with empty standard input, as a module named
``solution`` (its ``if __name__ == "__main__":`` block does not run), after ``from typing import *`` when the cases
call a function (LeetCode's starter code uses ``List`` without importing it).

The reward returns a :class:`CodeVerdict`: a float (the score) that carries ``status`` (one of
:data:`STATUSES`), ``reason`` (None for a full score, else why), the per-case results and the
isolation layers that were active. :meth:`CodeReward.score` is the plain-float path.
"""

from __future__ import annotations

import json
import keyword
import os
import re
import shutil
import string
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from entrorl.rewards.base import register_reward
from entrorl.rewards.sandbox import CaseOutcome, SandboxCase, SandboxLimits, SandboxRun, run_in_sandbox, unsupported_system_reason

__all__ = [
    "STATUSES",
    "CodeOptions",
    "CodeReward",
    "CodeTest",
    "CodeVerdict",
    "extract_code",
    "judge_run",
    "outputs_match",
    "parse_tests",
]

#: Every status a :class:`CodeVerdict` (or one of its cases) can have.
STATUSES = (
    "passed",  # every case passed
    "wrong_answer",  # wrong output, or a failing assert
    "no_code",  # no program found in the completion
    "syntax_error",  # the program does not compile
    "runtime_error",  # the program raised, exited non-zero or crashed
    "timeout",  # a case ran past the time limit (later cases are not run)
    "memory_limit",  # the program ran out of its memory limit
    "process_limit",  # the program tried to start processes (or more threads than allowed)
    "output_limit",  # the program wrote more than the file-size limit
    "forbidden_write",  # the program tried to write outside its directory
    "network_blocked",  # the program tried to use the network
    "forbidden_read",  # the program tried to read another process's /proc entries (its environment)
    "forbidden_operation",  # the program tried to look up C functions through ctypes (or load cffi)
    "not_run",  # a case that was not run (after a timeout)
)

_VIOLATION_STATUS = {
    "network": "network_blocked",
    "file_write": "forbidden_write",
    "process": "process_limit",
    "proc_read": "forbidden_read",
    "ctypes": "forbidden_operation",
}

_PYTHON_TAGS = ("python", "py", "python3")
_THINK_START, _THINK_END = "<think>", "</think>"
_FENCE_RE = re.compile(r"^([ \t]*)```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)^[ \t]*```", re.DOTALL | re.MULTILINE)


def _without_fence_indent(body: str, width: int) -> str:
    """``body`` with up to ``width`` leading blanks taken off each line: a fence indented in a list item indents its
    code by as much (CommonMark removes the fence's indentation from the block's lines)."""
    if not width:
        return body
    return "".join(line[min(width, len(line) - len(line.lstrip(" \t"))):] for line in body.splitlines(keepends=True))


def extract_code(
    completion: str,
    *,
    languages: Sequence[str] = _PYTHON_TAGS,
    which: str = "last",
    allow_unfenced: bool = False,
) -> str | None:
    """The program in ``completion``: the ``which`` (``"last"`` or ``"first"``) complete fenced block
    whose language tag is in ``languages`` (case-insensitive; one string is one tag); without one, the ``which``
    untagged fenced block; without one, the whole completion when ``allow_unfenced`` (else None). An
    unclosed fence (a truncated completion) does not count. Blank programs are None.

    A draft written while thinking is not the program: only the text after the reasoning is read. A completion that
    opens with ``<think>`` reasons up to its first ``</think>`` (whatever draft blocks it left open), and has no
    program without one (cut off while reasoning); in one that does not (a chat template opened the reasoning in the
    prompt), the reasoning ends at the first ``</think>`` outside a fenced block (a program may print the tags)."""
    if which not in ("last", "first"):
        raise ValueError(f"which must be 'last' or 'first', got {which!r}")
    if not isinstance(completion, str):
        return None
    if completion.lstrip().startswith(_THINK_START):  # reasoning ends at its first </think>, draft blocks or not
        closed = completion.find(_THINK_END)
        if closed < 0:
            return None
        completion = completion[closed + len(_THINK_END):]
    else:  # reasoning a chat template opened in the prompt, or none: a tag inside a program is the program's
        fenced = [match.span() for match in _FENCE_RE.finditer(completion)]
        closed = next((found.start() for found in re.finditer(re.escape(_THINK_END), completion)
                       if not any(start <= found.start() < end for start, end in fenced)), None)
        if closed is not None:
            completion = completion[closed + len(_THINK_END):]
    wanted = {language.casefold() for language in ((languages,) if isinstance(languages, str) else languages)}
    tagged, untagged = [], []
    for match in _FENCE_RE.finditer(completion):
        tag, body = match.group(2).casefold(), _without_fence_indent(match.group(3), len(match.group(1)))
        if tag in wanted:
            tagged.append(body)
        elif not tag:
            untagged.append(body)
    for blocks in (tagged, untagged):
        blocks = [block for block in blocks if block.strip()]
        if blocks:
            return blocks[-1] if which == "last" else blocks[0]
    if allow_unfenced and completion.strip() and "```" not in completion:
        return completion
    return None


@dataclass(frozen=True)
class CodeTest:
    """One test case: ``kind="stdin"`` with ``input`` and ``expected`` output, or ``kind="assert"``
    with ``code``."""

    kind: str
    input: str = ""
    expected: str = ""
    code: str = ""
    function: str = ""  # the function an assert case made from a function-call case calls

    def to_sandbox(self) -> SandboxCase:
        return SandboxCase(self.kind, self.input if self.kind == "stdin" else self.code)


def _text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return "\n".join(value) + ("\n" if value else "")  # lines given as a list
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"code tests: {where} must be a string, got {type(value).__name__}")


_CASE_KIND_KEYS = ("testtype", "type")  # LiveCodeBench's "testtype": "stdin" or "functional"

# one function-call case, run in the program's namespace: the program's function named (a method of LeetCode's class
# Solution when the program defines one), not a builtin of that name, called with the arguments; what it returns is
# compared as JSON holds it (tuples as lists, keys as strings, numbers as Python's: numpy's, Fraction, Decimal; any
# other object fails, so that one equal to everything does not pass), and, for APPS, TACO and PrimeIntellect, an
# expected value wrapped in a list of one is also that value
_CALL_CASE = string.Template("""\
import json as __entrorl_json
import numbers as __entrorl_numbers
def __entrorl_number_value(value):
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, __entrorl_numbers.Integral):
        return int(value)
    if isinstance(value, __entrorl_numbers.Real) or type(value).__name__ == "Decimal":
        return float(value)
    raise TypeError("%s is not a JSON value" % type(value).__name__)
def __entrorl_shown(value):
    try:
        return "%.200r" % (value,)
    except Exception:
        return "a %s" % type(value).__name__
__entrorl_function = globals().get($quoted_name)
if isinstance(globals().get("Solution"), type) and hasattr(Solution, $quoted_name):
    __entrorl_function = getattr(Solution(), $quoted_name)
if __entrorl_function is None:
    raise NameError("the program defines no function " + $quoted_name)
__entrorl_expected = __entrorl_json.loads($expected)
__entrorl_value = __entrorl_function(*__entrorl_json.loads($arguments))
try:
    __entrorl_got = __entrorl_json.loads(__entrorl_json.dumps(__entrorl_value, default=__entrorl_number_value))
except (TypeError, ValueError, OverflowError, RecursionError) as __entrorl_error:
    raise AssertionError("$name(%s) returned %s: %s" % ($shown_arguments, __entrorl_shown(__entrorl_value),
                                                         __entrorl_error)) from None
assert (__entrorl_got == __entrorl_expected or __entrorl_json.dumps(__entrorl_got, sort_keys=True)
        == __entrorl_json.dumps(__entrorl_expected, sort_keys=True) or ($unwrap and [__entrorl_got] == __entrorl_expected)), (
    "$name(%s) returned %s, expected %s" % ($shown_arguments, __entrorl_shown(__entrorl_got),
                                            __entrorl_shown(__entrorl_expected)))
""")


# LeetCode's starter code (``def twoSum(self, nums: List[int], ...)``) leaves typing's names to its judge, as
# LiveCodeBench's and APPS's own checks give them
_FUNCTION_CALL_PRELUDE = "from typing import *\n"


def _json_text(value: Any, where: str) -> str:
    try:
        return json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"code tests: {where} must be JSON values ({exc})") from exc


def _call_case(name: str, arguments: Any, expected: Any, where: str, *, unwrap: bool) -> CodeTest:
    """The assert case that calls ``name(*arguments)`` and compares its value with ``expected`` (also with the one
    value of ``expected`` when ``unwrap``)."""
    if not isinstance(arguments, (list, tuple)):
        raise ValueError(f"code tests: {where} must be the list of the function's arguments, got "
                         f"{type(arguments).__name__}")
    arguments_text = _json_text(list(arguments), where)
    shown = arguments_text[1:-1]
    code = _CALL_CASE.substitute(name=name, quoted_name=repr(name), arguments=repr(arguments_text), unwrap=unwrap,
                                 expected=repr(_json_text(expected, where)),
                                 shown_arguments=repr(shown[:200] + ("..." if len(shown) > 200 else "")))
    return CodeTest("assert", code=code, function=name)


def _lines_as_json(text: Any, where: str) -> list[Any]:
    """LiveCodeBench's functional input or output: one JSON value per line."""
    text = _text(text, where)
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as exc:
        raise ValueError(
            f"code tests: {where} of a function-call case must hold one JSON value per line ({exc})") from exc


_STDIN_KINDS = ("stdin", "stdin_stdout")  # LiveCodeBench's testtype; PrimeIntellect's and open-r1's type
_CALL_KINDS = ("functional", "function_call", "function", "call")


def _case_function(case: Mapping[str, Any], index: int, function: str | None) -> str | None:
    """The function a case calls (its own "fn_name", else the spec's), or None for a standard-input case: what its
    "testtype" / "type" says, else a call when a function is named. Other keys are refused rather than ignored (a
    function's case run as standard input prints nothing: a silent 0)."""
    unknown = set(case) - {"input", "output", "fn_name", *_CASE_KIND_KEYS}
    if unknown:
        raise ValueError(f"code tests: cases[{index}] has unknown keys {sorted(unknown)}; a case is "
                         "{'input': ..., 'output': ...}")
    if case.get("fn_name"):
        function = _function_name(case["fn_name"], f"cases[{index}].fn_name")
    kind = _case_kind(case)
    if kind in _STDIN_KINDS or (kind is None and function is None):
        return None
    if kind in _CALL_KINDS or kind is None:
        if function is None:
            raise ValueError(f"code tests: cases[{index}] is a function-call case ({kind!r}); name the function with "
                             "'fn_name' beside 'cases' or in the case")
        return function
    raise ValueError(f"code tests: cases[{index}] has testtype {kind!r}; one of {_STDIN_KINDS + _CALL_KINDS}")


def _case_kind(case: Mapping[str, Any]) -> Any:
    """What a case's "testtype" / "type" says, lower-cased (None when it says nothing)."""
    kind = next((case[key] for key in _CASE_KIND_KEYS if key in case), None)
    return kind.strip().lower() if isinstance(kind, str) else kind


def _function_name(name: Any, where: str) -> str:
    if not (isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)):
        raise ValueError(f"code tests: '{where}' must be a Python name, got {name!r}")
    return name


def parse_tests(spec: Any) -> list[CodeTest]:
    """The test cases of ``spec`` (see the module docstring for the accepted forms).

    Raises ``ValueError`` naming what is wrong for a malformed spec or one without any case.
    """
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError as exc:
            raise ValueError(f"code tests: a string spec must be JSON ({exc})") from exc
    tests: list[CodeTest] = []
    if isinstance(spec, (list, tuple)):
        spec = {"asserts": list(spec)} if all(isinstance(item, str) for item in spec) else {"cases": list(spec)}
    if not isinstance(spec, Mapping):
        raise ValueError(f"code tests: expected a dict, a list or JSON of one, got {type(spec).__name__}")
    # a key that is null is absent: a column of nested values (Parquet, Arrow, datasets) gives each row every key of
    # the column, those the row lacks as null
    spec = {key: value for key, value in spec.items() if value is not None}
    unknown = set(spec) - {"cases", "test_cases", "inputs", "outputs", "asserts", "fn_name", "language"}
    if unknown:
        raise ValueError(f"code tests: unknown keys {sorted(unknown)}; use 'cases', 'inputs'/'outputs', 'asserts' "
                         "(and 'fn_name' for function calls)")
    if "test_cases" in spec:  # PrimeIntellect's and open-r1's verification_info
        if "cases" in spec:
            raise ValueError("code tests: 'cases' and 'test_cases' are one list; give one of them")
        spec = {**{key: value for key, value in spec.items() if key != "test_cases"}, "cases": spec["test_cases"]}
    language = spec.get("language")
    if language is not None and not (isinstance(language, str) and language.strip().lower() in ("python", "python3")):
        raise ValueError(f"code tests: the tests are for {language!r} programs; the code reward runs Python")
    # "" or null: a standard-input problem (APPS writes no key, others "")
    function = _function_name(spec["fn_name"], "fn_name") if spec.get("fn_name") else None
    for key in ("cases", "asserts"):
        if spec.get(key) is not None and not isinstance(spec[key], (list, tuple)):
            raise ValueError(f"code tests: '{key}' must be a list, got {type(spec[key]).__name__}")
    for index, case in enumerate(spec.get("cases") or []):
        if isinstance(case, Mapping):  # a null kind or function is absent; a null output may be a function's value
            case = {key: value for key, value in case.items() if value is not None or key == "output"}
        if not isinstance(case, Mapping) or "output" not in case:
            raise ValueError(f"code tests: cases[{index}] must be a dict with 'input' and 'output'")
        where = f"cases[{index}]"
        called = _case_function(case, index, function)
        if called is not None:
            # the values themselves, as PrimeIntellect writes them ("type": "function_call") or as any case whose
            # arguments are a list, else JSON text, one value per line (LiveCodeBench's functional cases)
            as_values = _case_kind(case) == "function_call" or ("input" in case and not isinstance(case["input"], str))
            arguments, expected = case.get("input", [] if as_values else ""), case["output"]
            if isinstance(arguments, str) and not as_values:
                arguments = _lines_as_json(arguments, f"{where}.input")
            if isinstance(expected, str) and not as_values:
                values = _lines_as_json(expected, f"{where}.output")
                if len(values) != 1:
                    raise ValueError(f"code tests: {where}.output of a function-call case must be one JSON value, got "
                                     f"{len(values)}")
                expected = values[0]
            tests.append(_call_case(called, arguments, expected, where, unwrap=as_values))
            continue
        if case["output"] is None:
            raise ValueError(f"code tests: {where}.output of a standard-input case is null")
        tests.append(
            CodeTest(
                "stdin",
                input=_text(case.get("input", ""), f"{where}.input"),
                expected=_text(case["output"], f"{where}.output"),
            )
        )
    inputs, outputs = spec.get("inputs"), spec.get("outputs")
    if (inputs is None) != (outputs is None):
        raise ValueError("code tests: 'inputs' and 'outputs' come together")
    if inputs is not None:
        if not isinstance(inputs, (list, tuple)) or not isinstance(outputs, (list, tuple)):
            raise ValueError("code tests: 'inputs' and 'outputs' must be lists")
        if len(inputs) != len(outputs):
            raise ValueError(f"code tests: {len(inputs)} inputs but {len(outputs)} outputs")
        for index, (given, expected) in enumerate(zip(inputs, outputs)):
            if function is not None:  # APPS / TACO: each input the list of the arguments, each output the value
                tests.append(_call_case(function, given, expected, f"inputs[{index}]", unwrap=True))
                continue
            tests.append(
                CodeTest("stdin", input=_text(given, f"inputs[{index}]"), expected=_text(expected, f"outputs[{index}]"))
            )
    for index, code in enumerate(spec.get("asserts") or []):
        if not isinstance(code, str) or not code.strip():
            raise ValueError(f"code tests: asserts[{index}] must be non-empty Python code")
        tests.append(CodeTest("assert", code=code))
    if not tests:
        raise ValueError("code tests: the spec has no test case")
    if function is not None and not any(test.function for test in tests):
        raise ValueError("code tests: 'fn_name' names a function but no case calls it ('inputs'/'outputs' or "
                         "function-call 'cases')")
    return tests


def outputs_match(actual: str, expected: str, compare: str = "tokens") -> bool:
    """Whether a program's output matches the expected one under ``compare`` (``"tokens"``,
    ``"lines"`` or ``"exact"``; see the module docstring)."""
    if compare == "tokens":
        return actual.split() == expected.split()
    if compare == "lines":

        def lines(text: str) -> list[str]:
            stripped = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
            while stripped and not stripped[-1]:
                stripped.pop()
            return stripped

        return lines(actual) == lines(expected)
    if compare == "exact":
        return actual == expected
    raise ValueError(f"compare must be 'tokens', 'lines' or 'exact', got {compare!r}")


class CodeVerdict(float):
    """The ``code`` reward's value: a float (the fraction of cases passed) that also says why.

    * ``score`` — the same number as a plain float;
    * ``status`` — one of :data:`STATUSES`: ``"passed"``, a policy violation (which scores 0), else
      the status of the first failing case;
    * ``reason`` — None when every case passed, else ``"<status>: <detail>"``;
    * ``passed`` / ``total`` — case counts;
    * ``cases`` — ``(status, detail)`` per case;
    * ``isolation`` — the sandbox layers that were active (see :mod:`entrorl.rewards.sandbox`);
    * ``seconds`` — wall-clock time of the sandboxed run.
    """

    status: str
    reason: str | None
    passed: int
    total: int
    cases: tuple[tuple[str, str | None], ...]
    isolation: Mapping[str, Any]
    seconds: float

    def __new__(
        cls,
        score: float,
        status: str,
        reason: str | None = None,
        *,
        passed: int = 0,
        total: int = 0,
        cases: Sequence[tuple[str, str | None]] = (),
        isolation: Mapping[str, Any] | None = None,
        seconds: float = 0.0,
    ) -> CodeVerdict:
        if status not in STATUSES:
            raise ValueError(f"unknown code verdict status {status!r}; one of {STATUSES}")
        verdict = super().__new__(cls, score)
        verdict.status = status
        verdict.reason = reason
        verdict.passed = passed
        verdict.total = total
        verdict.cases = tuple(cases)
        verdict.isolation = dict(isolation or {})
        verdict.seconds = seconds
        return verdict

    @property
    def score(self) -> float:
        return float(self)

    def __reduce__(self) -> tuple[Any, ...]:
        # float's own would rebuild it as CodeVerdict(score), without its status: pickling and copying need this
        return (_rebuild_code_verdict, (float(self), self.status, self.reason, self.passed, self.total, self.cases,
                                        dict(self.isolation), self.seconds))

    def __repr__(self) -> str:
        return f"CodeVerdict({float(self)!r}, status={self.status!r}, reason={self.reason!r})"


def _rebuild_code_verdict(score, status, reason, passed, total, cases, isolation, seconds) -> CodeVerdict:
    return CodeVerdict(score, status, reason, passed=passed, total=total, cases=cases, isolation=isolation, seconds=seconds)


def _case_status(test: CodeTest, outcome: CaseOutcome, compare: str) -> tuple[str, str | None]:
    """``(status, detail)`` of one case from what the sandbox saw."""
    if outcome.status == "ok":
        if test.kind == "assert" or outputs_match(outcome.stdout, test.expected, compare):
            return "passed", None
        return "wrong_answer", f"expected {test.expected[:80]!r}, got {outcome.stdout[:80]!r}"
    if outcome.status == "timeout":
        return "timeout", outcome.error
    if outcome.status == "not_run":
        return "not_run", "not run: the sandbox stopped after an earlier case"
    error = outcome.error or outcome.status
    if error.startswith("MemoryError"):
        return "memory_limit", error
    if error.startswith("BlockingIOError") or "can't start new thread" in error:
        return "process_limit", error
    if "[Errno 27]" in error:  # EFBIG: RLIMIT_FSIZE
        return "output_limit", error
    if "[Errno 101]" in error or "[Errno -3]" in error or "[Errno -2]" in error:  # no route / no DNS
        return "network_blocked", error
    if test.kind == "assert" and error.startswith("AssertionError"):
        return "wrong_answer", error
    return "runtime_error", error


def judge_run(tests: Sequence[CodeTest], run: SandboxRun, compare: str = "tokens") -> CodeVerdict:
    """The verdict of a sandboxed run of ``tests`` (see :class:`CodeVerdict`)."""
    common = {"total": len(tests), "isolation": run.isolation, "seconds": run.seconds}
    if run.syntax_error is not None:
        return CodeVerdict(0.0, "syntax_error", f"syntax_error: {run.syntax_error}", **common)
    if len(run.outcomes) != len(tests):
        raise ValueError(f"judge_run: {len(run.outcomes)} case outcomes for {len(tests)} tests; expected one per test")
    cases = [_case_status(test, outcome, compare) for test, outcome in zip(tests, run.outcomes)]
    passed = sum(status == "passed" for status, _ in cases)
    if run.violations:
        kind, detail = run.violations[0]
        status = _VIOLATION_STATUS.get(kind, "forbidden_operation")
        return CodeVerdict(0.0, status, f"{status}: {detail}", passed=0, cases=cases, **common)
    if passed == len(tests):
        return CodeVerdict(1.0, "passed", None, passed=passed, cases=cases, **common)
    index, (status, detail) = next((i, c) for i, c in enumerate(cases) if c[0] != "passed")
    reason = f"{status}: case {index}: {detail} ({passed}/{len(tests)} passed)"
    return CodeVerdict(passed / len(tests), status, reason, passed=passed, cases=cases, **common)


@dataclass(frozen=True)
class CodeOptions(SandboxLimits):
    """Options of the ``code`` reward: every :class:`~entrorl.rewards.sandbox.SandboxLimits` field
    (``time_limit`` per case in seconds, ``memory_mb``, ``max_processes``, ``max_file_mb``,
    ``max_open_files``, ``startup_time``, ``drop_privileges``, ``network_namespace``,
    ``read_only_filesystem``, ``audit_hook``, ``allow_subprocesses``, ``python``, ``temp_dir``) plus

    * ``compare`` — output comparison: ``"tokens"``, ``"lines"`` or ``"exact"``;
    * ``languages`` — fence tags that mark the program;
    * ``block`` — which fenced block: ``"last"`` or ``"first"``;
    * ``allow_unfenced`` — take the whole completion when it has no fenced block;
    * ``workers`` — how many samples of a batch run at once, each in its own sandbox (default: the CPUs this process
      may use, at most 8); the memory limit holds for each.
    """

    compare: str = "tokens"
    languages: tuple[str, ...] = _PYTHON_TAGS
    block: str = "last"
    allow_unfenced: bool = False
    workers: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()  # validates the sandbox fields
        if self.compare not in ("tokens", "lines", "exact"):
            raise ValueError(f"compare must be 'tokens', 'lines' or 'exact', got {self.compare!r}")
        if self.block not in ("last", "first"):
            raise ValueError(f"block must be 'last' or 'first', got {self.block!r}")
        if isinstance(self.languages, str):
            object.__setattr__(self, "languages", (self.languages,))
        else:
            object.__setattr__(self, "languages", tuple(self.languages))
        if not self.languages or not all(isinstance(tag, str) and tag for tag in self.languages):
            raise ValueError(f"languages must be non-empty fence tags, got {self.languages!r}")
        if not isinstance(self.allow_unfenced, bool):
            raise ValueError(f"allow_unfenced must be true or false, got {self.allow_unfenced!r}")
        if self.workers is None:
            usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
            object.__setattr__(self, "workers", min(8, len(usable)))
        elif isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be a whole number >= 1, got {self.workers!r}")
        # where the sandbox starts: checked now, not at the first sample after a model has loaded
        if self.python is not None and shutil.which(self.python) is None:
            raise ValueError(f"python {self.python!r} is not an interpreter: neither an executable file nor a command "
                             "on the PATH")
        if self.temp_dir is not None and not os.path.isdir(self.temp_dir):
            raise ValueError(f"temp_dir {self.temp_dir!r} is not an existing folder")

    def limits(self) -> SandboxLimits:
        """The sandbox limits these options describe."""
        return SandboxLimits(**{f.name: getattr(self, f.name) for f in fields(SandboxLimits)})


def _code_options(options: Mapping[str, Any]) -> CodeOptions:
    """:class:`CodeOptions` from keyword options; ValueError naming unknown ones."""
    accepted = [f.name for f in fields(CodeOptions)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"invalid options for reward 'code': {unknown}; accepted options: {accepted}")
    return CodeOptions(**options)


def _validate_code(**kwargs: Any) -> None:
    _code_options(kwargs)


@register_reward(
    "code",
    description="fraction of test cases (stdin/stdout or asserts) the completion's last ```python block "
    "passes, run in a sandbox (limits, no network, no writes outside its directory); 0 for forbidden acts",
    factory=True,
    validate=_validate_code,
)
class CodeReward:
    """The ``code`` reward; keyword arguments are :class:`CodeOptions` fields.

    Calling it returns a :class:`CodeVerdict`. The completion without a program scores 0
    (``no_code``). A malformed or missing test spec raises ``ValueError`` and a sandbox that cannot
    start raises :class:`~entrorl.rewards.sandbox.SandboxError` (not the completion's fault:
    :class:`~entrorl.rewards.RewardRunner` counts either as a failed sample, with the error).

    A program is correct only when it passes every case (``correct_threshold = 1.0``, as Pass@k on code is
    defined); the training reward keeps the fraction passed.
    """

    correct_threshold = 1.0
    #: the verdicts' statuses whose shares a training step reports (``reward/status/<status>``)
    statuses = tuple(status for status in STATUSES if status != "not_run")  # a case's, never a verdict's

    def __init__(self, **options: Any) -> None:
        self.options = _code_options(options)
        reason = unsupported_system_reason()
        if reason is not None:
            raise ValueError(reason)
        self.__name__ = "code"
        self._stop = threading.Event()

    def __repr__(self) -> str:
        return f"CodeReward({self.options})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_stop"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._stop = threading.Event()

    def stop_calls(self) -> None:
        """Kill the programs of the calls running now (an interrupted batch); later calls run as usual."""
        stopping, self._stop = self._stop, threading.Event()
        stopping.set()

    @property
    def parallel_calls(self) -> int:
        """Samples :class:`~entrorl.rewards.RewardRunner` scores at once (the ``workers`` option): a call waits on its
        sandboxed process."""
        return self.options.workers

    def __call__(self, prompt: str, completion: str, answer: Any, /, **meta: Any) -> CodeVerdict:
        stop = self._stop  # the event of the batch this call belongs to, whatever stop_calls does while it reads
        spec = answer if answer is not None else meta.get("tests")
        if spec is None:
            raise ValueError("code reward: no test cases (give them as the answer or as meta['tests'])")
        tests = parse_tests(spec)
        options = self.options
        program = extract_code(
            completion, languages=options.languages, which=options.block, allow_unfenced=options.allow_unfenced
        )
        if program is None:
            return CodeVerdict(0.0, "no_code", "no_code: no fenced Python block in the completion", total=len(tests))
        preamble = _FUNCTION_CALL_PRELUDE if any(test.function for test in tests) else ""
        run = run_in_sandbox(program, [test.to_sandbox() for test in tests], options.limits(), stop=stop,
                             preamble=preamble)
        return judge_run(tests, run, options.compare)

    def score(self, prompt: str, completion: str, answer: Any, /, **meta: Any) -> float:
        """The plain-float path: the score of :meth:`__call__`."""
        return float(self(prompt, completion, answer, **meta))
