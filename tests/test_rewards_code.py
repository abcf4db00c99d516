"""The sandboxed ``code`` reward: scoring, and containment of hostile programs (measured)."""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import tempfile
import textwrap
import sys
import time

import numpy as np
import pytest

from entrorl.rewards import RewardRunner, check_reward_spec, get_reward
from entrorl.rewards.code import (
    CodeOptions,
    CodeReward,
    CodeTest,
    CodeVerdict,
    extract_code,
    judge_run,
    outputs_match,
    parse_tests,
)
from entrorl.rewards.sandbox import CaseOutcome, SandboxCase, SandboxError, SandboxLimits, SandboxRun, run_in_sandbox

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="the sandbox needs Linux")

ADD_TESTS = {"cases": [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6\n"}]}


def fenced(source: str) -> str:
    return "Here is my solution.\n```python\n" + textwrap.dedent(source).strip() + "\n```\nDone."


@pytest.fixture
def reachable_temp_dir():
    """A temp_dir the sandbox uid can pass through (pytest's tmp_path is root's alone), removed afterwards."""
    import pathlib
    import shutil

    folder = pathlib.Path(tempfile.mkdtemp(prefix="entrorl-test-"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def reward(**options) -> CodeReward:
    return CodeReward(**{"time_limit": 2.0, **options})


def stdin_cases(count: int = 1) -> list[SandboxCase]:
    return [SandboxCase("stdin", "") for _ in range(count)]


def processes_of(uid: int | None, marker: str) -> list[int]:
    """Live (non-zombie) pids running as ``uid`` or carrying ``marker`` — checked independently of the
    sandbox's own cleanup code."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                if handle.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                    continue
            owner = os.stat(f"/proc/{name}").st_uid
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                cmdline = handle.read()
            with open(f"/proc/{name}/environ", "rb") as handle:
                environ = handle.read()
        except (OSError, IndexError):
            continue
        if (uid is not None and owner == uid) or marker.encode() in cmdline or marker.encode() in environ:
            found.append(int(name))
    return found


@functools.cache
def kernel_layers() -> dict:
    """The kernel layers the sandbox gets on this machine (one probe run): each test of a kernel
    layer alone, without the audit hook, runs only where that layer exists."""
    run = run_in_sandbox("pass", stdin_cases(), SandboxLimits())
    user_namespace = run.isolation["network_namespace"] or run.isolation["read_only_filesystem"]
    return {"dropped_uid": run.uid is not None, "user_namespace": user_namespace, **run.isolation}


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


# --------------------------------------------------------------------------------------------
# extraction and test specs
# --------------------------------------------------------------------------------------------


def test_extract_code_takes_the_last_python_block_and_falls_back_to_untagged_blocks():
    text = "```python\nfirst\n```\ntext\n```py\nsecond\n```\n```\nuntagged\n```"
    assert extract_code(text) == "second\n"
    assert extract_code(text, which="first") == "first\n"
    assert extract_code("```\nonly untagged\n```") == "only untagged\n"
    assert extract_code("```bash\nls\n```") is None
    assert extract_code("```cpp\nint main(){}\n```", languages=("cpp",)) == "int main(){}\n"
    assert extract_code("1. Code:\n   ```python\n   print(1)\n   ```\n").strip() == "print(1)"  # fences in a list


def test_extract_code_removes_the_indentation_of_a_fence_indented_in_a_list():
    """A fenced block indented in a Markdown list item has its lines indented as much as its fence: that indentation
    is the list's, not the program's (CommonMark removes it), and a program that keeps it does not compile."""
    completion = "1. Code:\n   ```python\n   def f():\n       return 1\n   print(f())\n   ```\n"
    assert extract_code(completion) == "def f():\n    return 1\nprint(f())\n"


def test_a_line_indented_less_than_its_fence_loses_only_the_blanks_it_has():
    """Up to the fence's indentation is taken off each line (CommonMark): a line with fewer leading blanks keeps all of
    its code."""
    completion = "1. Code:\n   ```python\n   print(1)\n print(2)\nprint(3)\n   ```\n"
    assert extract_code(completion) == "print(1)\nprint(2)\nprint(3)\n"


def test_extract_code_ignores_unclosed_fences_and_bare_text_unless_asked():
    assert extract_code("```python\nprint(1)\n") is None  # truncated completion
    assert extract_code("print(1)") is None
    assert extract_code("print(1)", allow_unfenced=True) == "print(1)"
    assert extract_code("```python\n   \n```") is None
    with pytest.raises(ValueError, match="which"):
        extract_code("x", which="middle")


def test_extract_code_compares_language_tags_without_case_and_knows_python3():
    """Fence tags match ``languages`` case-insensitively on both sides; ``python3`` is one of the default Python tags."""
    assert extract_code("```Python\nprint(1)\n```") == "print(1)\n"
    assert extract_code("```python3\nprint(3)\n```") == "print(3)\n"
    assert extract_code("```cpp\nint x;\n```", languages=("CPP",)) == "int x;\n"
    # one string is one tag, as in CodeOptions (not the tags "p" and "y")
    assert extract_code("```py\nprint(1)\n```\n```p\nprint(2)\n```", languages="py") == "print(1)\n"


def test_extract_code_finds_no_program_in_blank_text_a_truncated_fence_or_a_non_string():
    """``allow_unfenced`` takes the whole completion only when it is non-blank text without any fence: a completion
    cut off inside its fenced block still has no program, and a missing completion is no program either."""
    assert extract_code("   \n", allow_unfenced=True) is None
    assert extract_code("Here it is:\n```python\nprint(1)\n", allow_unfenced=True) is None
    assert extract_code(None) is None


def test_extract_code_reads_the_answer_after_thinking_not_a_draft_written_while_thinking():
    """After ``</think>`` only the answer's text is read (a tagged draft inside the reasoning does not beat the
    answer's untagged block, nor stand in for a missing one); a ``<think>`` never closed, a completion cut off while
    reasoning, has no program."""
    draft = "<think>\nFirst try:\n```python\nprint('draft')\n```\nWait, that is wrong.\n"
    assert extract_code(draft + "</think>\nFinal:\n```\nprint('answer')\n```") == "print('answer')\n"
    assert extract_code(draft + "</think>\nThe answer is above.") is None
    assert extract_code(draft + "Let me check the constraints again and") is None
    assert extract_code(draft + "and", allow_unfenced=True) is None
    # a chat template that opened the reasoning in the prompt: the completion holds only its end
    assert extract_code("```python\nprint('draft')\n```\n</think>\n```python\nprint(2)\n```") == "print(2)\n"
    assert extract_code("</think>print(3)", allow_unfenced=True) == "print(3)"
    verdict = reward()("add", draft + "</think>\n```python\nprint(sum(map(int, input().split())))\n```", ADD_TESTS)
    assert verdict == 1.0, verdict.reason
    verdict = reward()("add", "<think>\n```python\nprint(sum(map(int, input().split())))\n```\nHmm", ADD_TESTS)
    assert (float(verdict), verdict.status) == (0.0, "no_code")
    # a draft block left open in the reasoning does not hide the answer after it
    abandoned = "<think>\nDraft:\n```python\ndef f(a, b):\nHmm, no.\n</think>\n```python\nprint(1)\n```\n"
    assert extract_code(abandoned) == "print(1)\n"
    # the tags inside a program are the program's: it may print them, or strip them from its input
    assert extract_code("```python\nprint('<think>')\n```\n") == "print('<think>')\n"
    strip = "s = input()\nprint(s.replace('</think>', ''))\n"
    assert extract_code(f"<think>plan</think>\n```python\n{strip}```") == strip
    verdict = reward()("strip", f"<think>easy</think>\n```python\n{strip}```",
                       {"cases": [{"input": "a</think>b\n", "output": "ab\n"}]})
    assert verdict == 1.0, verdict.reason


def test_parse_tests_accepts_every_documented_form():
    as_cases = parse_tests(ADD_TESTS)
    assert [(t.kind, t.input, t.expected) for t in as_cases] == [("stdin", "1 2\n", "3\n"), ("stdin", "10 -4\n", "6\n")]
    assert parse_tests(json.dumps(ADD_TESTS)) == as_cases
    assert parse_tests({"inputs": ["1 2\n", "10 -4\n"], "outputs": ["3\n", "6\n"]}) == as_cases
    assert parse_tests(ADD_TESTS["cases"]) == as_cases
    asserts = parse_tests(["assert f(1) == 2", "assert f(2) == 4"])
    assert [(t.kind, t.code) for t in asserts] == [("assert", "assert f(1) == 2"), ("assert", "assert f(2) == 4")]
    mixed = parse_tests({"cases": [{"input": "", "output": "x"}], "asserts": ["assert True"]})
    assert [t.kind for t in mixed] == ["stdin", "assert"]


def test_parse_tests_reads_numbers_and_lists_of_lines_as_text():
    """An output given as a number is its text; an input or output given as a list of lines is those lines, each
    ending with a newline (what a program reading or printing them line by line sees)."""
    [test] = parse_tests({"inputs": [["1 2", "3 4"]], "outputs": [3]})
    assert (test.input, test.expected) == ("1 2\n3 4\n", "3")
    [test] = parse_tests({"cases": [{"input": ["x"], "output": ["a", "b"]}]})
    assert (test.input, test.expected) == ("x\n", "a\nb\n")
    [test] = parse_tests({"cases": [{"input": ("x", "y"), "output": ("a",)}]})  # a tuple of lines too
    assert (test.input, test.expected) == ("x\ny\n", "a\n")
    [test] = parse_tests({"cases": [{"output": "ok"}]})  # no input: empty standard input
    assert (test.input, test.expected) == ("", "ok")
    [test] = parse_tests({"cases": [{"input": [], "output": []}]})  # no lines at all: empty text, not one newline
    assert (test.input, test.expected) == ("", "")
    [test] = parse_tests({"inputs": [2.5], "outputs": [0.75]})  # a decimal number is its text too
    assert (test.input, test.expected) == ("2.5", "0.75")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("not json", "JSON"),
        ("1 2 -> 3", "a string spec must be JSON"),
        ({}, "no test case"),
        ({"inputs": ["1"]}, "together"),
        ({"outputs": ["1"]}, "together"),
        ({"inputs": ["1"], "outputs": []}, "1 inputs but 0 outputs"),
        ({"cases": [{"input": "1"}]}, r"cases\[0\]"),
        ({"tests": []}, "unknown keys"),
        ({"asserts": [""]}, r"asserts\[0\]"),
        ({"asserts": ["   \n"]}, r"asserts\[0\]"),
        ({"asserts": [7]}, r"asserts\[0\]"),
        # one string is not a list of asserts: each of its characters would become a case of its own
        pytest.param({"asserts": "assert(f(1)==2)"}, "'asserts' must be a list, got str", id="asserts-as-one-string"),
        ({"cases": {"input": "1", "output": "2"}}, "'cases' must be a list, got dict"),
        ({"inputs": "12", "outputs": "34"}, "must be lists"),
        # a list holding any case dict is a list of standard-input cases: the string in it is the malformed case
        pytest.param([{"input": "1", "output": "2"}, "assert f()"], r"cases\[1\] must be a dict", id="mixed-list"),
        ({"cases": [{"input": "", "output": True}]}, r"cases\[0\]\.output"),
        (42, "expected a dict"),
        # LiveCodeBench's function-call case: run as standard input it printed nothing and scored 0, uncounted
        ([{"input": "[2,7]\n9", "output": "[0, 1]", "testtype": "functional"}], r"name the function with 'fn_name'"),
        ({"cases": [{"input": "1", "output": "2", "name": "f"}]}, r"cases\[0\] has unknown keys \['name'\]"),
        ({"cases": [{"input": "1", "output": "2", "fn_name": "a b"}]}, r"'cases\[0\]\.fn_name' must be a Python name"),
        ({"test_cases": [{"input": "1", "output": "2"}], "language": "cpp"}, "the tests are for 'cpp' programs"),
        ({"test_cases": [], "cases": [{"input": "1", "output": "2"}]}, "'cases' and 'test_cases' are one list"),
        ({"cases": [{"input": "1", "output": "2", "testtype": "interactive"}]}, "testtype 'interactive'"),
        ({"fn_name": "x y", "inputs": [[1]], "outputs": [1]}, "'fn_name' must be a Python name"),
        ({"fn_name": "class", "inputs": [[1]], "outputs": [1]}, "'fn_name' must be a Python name"),
        ({"fn_name": "f", "asserts": ["assert f(1)"]}, "no case calls it"),
        ({"fn_name": "f", "inputs": [1], "outputs": [1]}, r"inputs\[0\] must be the list of the function's arguments"),
        ({"fn_name": "f", "inputs": [[{1, 2}]], "outputs": [1]}, r"inputs\[0\] must be JSON values"),
        ({"fn_name": "f", "cases": [{"input": "[1", "output": "2"}]}, "one JSON value per line"),
        ({"fn_name": "f", "cases": [{"input": "1", "output": "2\n3"}]}, "must be one JSON value, got 2"),
    ],
)
def test_parse_tests_rejects_malformed_specs_naming_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_tests(spec)


def test_outputs_match_modes():
    assert outputs_match("3 4\n", "3  4", "tokens")
    assert not outputs_match("3 4", "34", "tokens")
    assert outputs_match("a  \nb\n\n", "a\nb", "lines")
    assert not outputs_match("a b", "a  b", "lines")
    assert not outputs_match("  a\nb", "a\nb", "lines")  # only trailing whitespace is ignored
    assert outputs_match("x\n", "x\n", "exact") and not outputs_match("x", "x\n", "exact")
    with pytest.raises(ValueError, match="compare"):
        outputs_match("a", "a", "fuzzy")


def test_options_are_validated_and_registered():
    with pytest.raises(ValueError, match="time_limit"):
        CodeOptions(time_limit=0)
    with pytest.raises(ValueError, match="memory_mb"):
        CodeOptions(memory_mb=1)
    with pytest.raises(ValueError, match="compare"):
        check_reward_spec("code", compare="fuzzy")
    with pytest.raises(ValueError, match="invalid options"):
        check_reward_spec("code", no_such_option=1)
    check_reward_spec("code", time_limit=1.5, memory_mb=256)
    assert isinstance(get_reward("code", time_limit=1.0), CodeReward)


def test_the_interpreter_and_the_working_folder_are_checked_when_the_reward_is_made(tmp_path):
    """Not at the first sample, after a model has loaded and sampled: a missing interpreter or folder fails at once."""
    with pytest.raises(ValueError, match=r"python '.*no-such-python' is not an interpreter"):
        check_reward_spec("code", python=str(tmp_path / "no-such-python"))
    with pytest.raises(ValueError, match=r"temp_dir '.*missing' is not an existing folder"):
        get_reward("code", temp_dir=str(tmp_path / "missing"))
    assert CodeOptions(python=sys.executable, temp_dir=str(tmp_path)).temp_dir == str(tmp_path)
    assert CodeOptions(python="python3").python == "python3"  # a command on the PATH


@pytest.mark.parametrize(
    ("options", "name"),
    [({"block": "middle"}, "block"), ({"languages": ()}, "languages"), ({"languages": ("python", "")}, "languages"),
     ({"allow_unfenced": "yes"}, "allow_unfenced")],
)
def test_code_options_reject_bad_extraction_settings(options, name):
    with pytest.raises(ValueError, match=name):
        CodeOptions(**options)


def test_a_single_language_tag_is_one_tag():
    """``languages="cpp"`` means the one tag ``cpp``, not its letters."""
    assert CodeOptions(languages="cpp").languages == ("cpp",)
    verdict = reward(languages="py")("p", "```py\nprint('ok')\n```", {"cases": [{"input": "", "output": "ok"}]})
    assert verdict == 1.0, verdict.reason


def test_a_verdict_status_must_be_one_of_the_documented_statuses():
    assert CodeVerdict(0.5, "wrong_answer").status == "wrong_answer"
    with pytest.raises(ValueError, match="status"):
        CodeVerdict(0.5, "almost")


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------


def stdin_test(expected: str = "ok") -> CodeTest:
    [test] = parse_tests({"cases": [{"input": "", "output": expected}]})
    return test


@pytest.mark.parametrize(
    ("kind", "outcome", "status", "detail"),
    [
        ("stdin", CaseOutcome("error", "MemoryError"), "memory_limit", "MemoryError"),
        ("stdin", CaseOutcome("error", "BlockingIOError: [Errno 11] Resource temporarily unavailable"),
         "process_limit", None),
        ("stdin", CaseOutcome("error", "RuntimeError: can't start new thread"), "process_limit", None),
        ("stdin", CaseOutcome("error", "OSError: [Errno 27] File too large"), "output_limit", None),
        ("stdin", CaseOutcome("error", "OSError: [Errno 101] Network is unreachable"), "network_blocked", None),
        ("stdin", CaseOutcome("error", "gaierror: [Errno -3] Temporary failure in name resolution"), "network_blocked",
         None),
        ("stdin", CaseOutcome("error", "gaierror: [Errno -2] Name or service not known"), "network_blocked", None),
        ("stdin", CaseOutcome("error", "ConnectionRefusedError: [Errno 111] Connection refused"), "runtime_error", None),
        ("stdin", CaseOutcome("error", "AssertionError"), "runtime_error", None),
        ("assert", CaseOutcome("error", "AssertionError"), "wrong_answer", None),
        ("stdin", CaseOutcome("timeout", "ran past the 2 s time limit"), "timeout", "ran past the 2 s time limit"),
        ("stdin", CaseOutcome("timeout", "CPU time limit (SIGXCPU)"), "timeout", None),
        ("stdin", CaseOutcome("crashed"), "runtime_error", "crashed"),  # no message: the sandbox's own status says how
        ("stdin", CaseOutcome("crashed", "killed by SIGSEGV"), "runtime_error", None),
        ("stdin", CaseOutcome("ok", stdout="ko\n"), "wrong_answer", "expected 'ok', got 'ko\\n'"),
        ("assert", CaseOutcome("ok"), "passed", None),
    ],
)
def test_each_sandbox_outcome_is_judged_with_its_documented_status(kind, outcome, status, detail):
    """The status of a case follows from what the sandbox saw: the limit an error message names, a failing assert
    case as a wrong answer (an ``AssertionError`` in a stdin program is the program crashing), a timeout (wall clock
    or CPU time), any other error or crash a runtime error."""
    test = stdin_test() if kind == "stdin" else parse_tests(["assert f()"])[0]
    verdict = judge_run([test], SandboxRun(outcomes=[outcome]))
    assert verdict.cases[0][0] == status
    assert verdict.status == status
    assert verdict == (1.0 if status == "passed" else 0.0)
    if detail is not None:
        assert verdict.cases[0][1] == detail


def test_a_judged_run_reports_the_fraction_the_first_failure_and_the_runs_own_time_and_layers():
    """Three cases, the second failing and the third not run after a timeout: the score counts the one passed out of
    every case, the reason names the first case that did not pass and the count passed, and the verdict keeps the
    run's seconds and isolation report."""
    tests = [stdin_test("a"), stdin_test("b"), stdin_test("c")]
    run = SandboxRun(
        outcomes=[CaseOutcome("ok", stdout="a"), CaseOutcome("timeout", "ran past the 1 s time limit"),
                  CaseOutcome("not_run")],
        isolation={"network_namespace": True}, seconds=1.25,
    )
    verdict = judge_run(tests, run)
    assert verdict == pytest.approx(1 / 3)
    assert (verdict.passed, verdict.total) == (1, 3)
    assert verdict.status == "timeout"
    assert verdict.reason == "timeout: case 1: ran past the 1 s time limit (1/3 passed)"
    assert [status for status, _ in verdict.cases] == ["passed", "timeout", "not_run"]
    assert verdict.seconds == 1.25 and verdict.isolation == {"network_namespace": True}


def test_a_run_with_another_number_of_outcomes_than_tests_is_refused_naming_both():
    """One outcome per test: fewer would leave tests unjudged (and ended in a bare StopIteration), more would judge
    outcomes of no test."""
    for outcomes in ([CaseOutcome("ok", stdout="x\n")], [CaseOutcome("ok", stdout="x\n")] * 3):
        with pytest.raises(ValueError, match=f"judge_run: {len(outcomes)} case outcomes for 2 tests"):
            judge_run([stdin_test(), stdin_test()], SandboxRun(outcomes=outcomes))


def test_a_judged_syntax_error_scores_zero_and_keeps_the_case_count():
    run = SandboxRun(outcomes=[CaseOutcome("not_run")] * 2, syntax_error="SyntaxError: invalid syntax", seconds=0.5)
    verdict = judge_run([stdin_test(), stdin_test()], run)
    assert verdict == 0.0 and verdict.status == "syntax_error"
    assert verdict.reason == "syntax_error: SyntaxError: invalid syntax"
    assert (verdict.passed, verdict.total, verdict.seconds) == (0, 2, 0.5)


@pytest.mark.parametrize(
    ("kind", "status"),
    [("network", "network_blocked"), ("file_write", "forbidden_write"), ("process", "process_limit"),
     ("proc_read", "forbidden_read"), ("ctypes", "forbidden_operation"), ("something_new", "forbidden_operation")],
)
def test_each_refused_kind_is_judged_with_its_status_and_scores_zero(kind, status):
    """A refused act of each kind the sandbox reports names the verdict (an unknown kind is still forbidden), and
    the case the program passed anyway does not count."""
    run = SandboxRun(outcomes=[CaseOutcome("ok", stdout="ok")], violations=[(kind, "detail")])
    verdict = judge_run([stdin_test()], run)
    assert verdict == 0.0 and verdict.status == status and verdict.passed == 0
    assert verdict.reason == f"{status}: detail"


def test_compare_reaches_the_judged_outputs():
    run = SandboxRun(outcomes=[CaseOutcome("ok", stdout="ok  \n")])
    assert judge_run([stdin_test("ok")], run, "tokens") == 1.0
    assert judge_run([stdin_test("ok")], run, "lines") == 1.0
    assert judge_run([stdin_test("ok")], run, "exact").status == "wrong_answer"


def test_an_assert_case_passes_whatever_the_program_printed():
    """An assert case passes when its code runs to its end: what the program printed on the way is no output to
    compare (it has no expected output)."""
    [test] = parse_tests(["assert f() == 1"])
    verdict = judge_run([test], SandboxRun(outcomes=[CaseOutcome("ok", stdout="debug: f called\n")]))
    assert verdict == 1.0 and verdict.status == "passed" and verdict.cases == (("passed", None),)


def test_a_wrong_answer_reason_quotes_the_start_of_each_output():
    expected, printed = "".join(f"{n}\n" for n in range(100)), "".join(f"{n}\n" for n in range(1, 101))
    verdict = judge_run([stdin_test(expected)], SandboxRun(outcomes=[CaseOutcome("ok", stdout=printed)]))
    assert verdict.cases[0] == ("wrong_answer", f"expected {expected[:80]!r}, got {printed[:80]!r}")
    assert verdict.reason == f"wrong_answer: case 0: expected {expected[:80]!r}, got {printed[:80]!r} (0/1 passed)"


def test_every_sandbox_option_of_the_reward_reaches_its_sandbox_limits():
    sandbox = dict(time_limit=1.5, memory_mb=256, max_processes=4, max_file_mb=2, max_open_files=32, startup_time=3.0,
                   drop_privileges=False, network_namespace=False, read_only_filesystem=False,
                   allow_subprocesses=True)
    limits = CodeOptions(**sandbox, compare="exact", block="first").limits()
    assert type(limits) is SandboxLimits and limits == SandboxLimits(**sandbox)
    assert reward(memory_mb=200).options.limits().memory_mb == 200


TWO_SUM = """
    class Solution:
        def twoSum(self, nums, target):
            seen = {}
            for i, x in enumerate(nums):
                if target - x in seen:
                    return (seen[target - x], i)
                seen[x] = i
"""
TWO_SUM_CASES = [{"input": "[2,7,11,15]\n9", "output": "[0, 1]", "testtype": "functional"},
                 {"input": "[3,2,4]\n6", "output": "[1,2]", "testtype": "functional"}]


def test_function_calls_as_apps_and_taco_write_them():
    tests = {"fn_name": "add", "inputs": [[1, 2], [10, -4], [[1, 2], [3]]], "outputs": [[3], 6, [[1, 2, 3]]]}
    verdict = reward()("add", fenced("def add(a, b):\n    return a + b"), tests)
    assert verdict == 1.0 and verdict.total == 3, verdict.reason
    verdict = reward()("add", fenced("def add(a, b):\n    return a - b"), tests)
    assert verdict == 0.0 and verdict.status == "wrong_answer"
    assert "add(1, 2) returned -1, expected [3]" in verdict.reason
    assert parse_tests({"fn_name": "", "inputs": ["1 2\n"], "outputs": ["3\n"]})[0].kind == "stdin"  # no function


def test_function_calls_as_livecodebench_writes_them_reach_a_solution_method():
    tests = {"fn_name": "twoSum", "cases": TWO_SUM_CASES}
    verdict = reward()("two sum", fenced(TWO_SUM), tests)
    assert verdict == 1.0, verdict.reason  # a tuple returned compares as a list
    wrong = fenced(TWO_SUM.replace("return (seen[target - x], i)", "return [i, i]"))
    assert reward()("two sum", wrong, tests) == 0.0
    verdict = reward()("two sum", fenced("def twoSum(nums, target):\n    return [0, 1]"), tests)
    assert [status for status, _ in verdict.cases] == ["passed", "wrong_answer"]  # a plain function of that name
    verdict = reward()("two sum", fenced("print('no function')"), tests)
    assert verdict == 0.0 and "NameError" in verdict.reason


def test_cases_as_primeintellect_and_open_r1_write_them():
    """verification_info: {"test_cases": [{"type": "stdin_stdout" | "function_call", "fn_name", "input", "output"}],
    "language": "python"}, a call's arguments and value as values, not JSON text."""
    stdin = {"language": "python", "test_cases": [
        {"type": "stdin_stdout", "fn_name": None, "input": "1 2\n", "output": "3\n"},
        {"type": "stdin_stdout", "input": "10 -4\n", "output": "6\n"}]}
    assert reward()("add", fenced("a, b = map(int, input().split())\nprint(a + b)"), stdin) == 1.0
    calls = {"language": "python", "test_cases": [
        {"type": "function_call", "fn_name": "add", "input": [1, 2], "output": [3]},
        {"type": "function_call", "fn_name": "add", "input": ["a", "b"], "output": ["ab"]}]}
    assert [t.kind for t in parse_tests(calls)] == ["assert", "assert"]
    assert reward()("add", fenced("def add(a, b):\n    return a + b"), calls) == 1.0
    assert reward()("add", fenced("def add(a, b):\n    return b + a"), calls) == 0.5


def test_a_function_s_value_is_compared_as_json_holds_it():
    """APPS writes {"2": 1} for {2: 1} (JSON's keys are strings); numpy's values are Python's; NaN is NaN."""
    tests = {"fn_name": "count", "inputs": [["ab"]], "outputs": [[{"2": 1}]]}
    assert reward()("p", fenced("def count(s):\n    return {len(s): 1}"), tests) == 1.0
    tests = {"fn_name": "f", "inputs": [[2]], "outputs": [[[4, 4.5]]]}
    numpy_program = fenced("import numpy as np\ndef f(x):\n    return np.array([x * 2, x + 2.5])")
    assert reward(drop_privileges=False)("p", numpy_program, tests) == 1.0  # the trainer's interpreter, with numpy
    tests = {"fn_name": "f", "inputs": [[0]], "outputs": [float("nan")]}
    assert reward()("p", fenced("def f(x):\n    return float('nan')"), tests) == 1.0


def test_a_value_equal_to_everything_or_a_builtin_of_the_name_does_not_pass():
    always_equal = "class Any:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Any()"
    verdict = reward()("p", fenced(always_equal), {"fn_name": "add", "inputs": [[1, 2]], "outputs": [[3]]})
    assert verdict == 0.0 and "Any is not a JSON value" in verdict.reason
    also_a_str = "class S(str):\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return S('x')"
    assert reward()("p", fenced(also_a_str), {"fn_name": "add", "inputs": [[1, 2]], "outputs": [[3]]}) == 0.0
    verdict = reward()("p", fenced("print('no function')"), {"fn_name": "sorted", "inputs": [[[3, 1]]], "outputs": [[[1, 3]]]})
    assert verdict == 0.0 and "the program defines no function sorted" in verdict.reason


def test_only_apps_and_primeintellect_outputs_may_be_wrapped_in_a_list_of_one():
    """LiveCodeBench's "[0]" is the list [0], which a method returning 0 does not return; PrimeIntellect's values are
    values, not JSON text ("hello" is a string, "42" not the number 42)."""
    lcb = {"fn_name": "f", "cases": [{"input": "[1]", "output": "[0]", "testtype": "functional"}]}
    assert reward()("p", fenced("class Solution:\n    def f(self, a):\n        return 0"), lcb) == 0.0
    assert reward()("p", fenced("class Solution:\n    def f(self, a):\n        return [0]"), lcb) == 1.0
    hello = {"test_cases": [{"type": "function_call", "fn_name": "g", "input": [1], "output": "hello"}]}
    assert reward()("p", fenced("def g(x):\n    return 'hello'"), hello) == 1.0
    text = {"test_cases": [{"type": "function_call", "fn_name": "g", "input": [1], "output": "42"}]}
    assert reward()("p", fenced("def g(x):\n    return 42"), text) == 0.0


@pytest.fixture
def ctrl_c_raises():
    """Python's own Ctrl-C handler (KeyboardInterrupt) for the test, whatever an earlier one left installed."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_stops_the_programs_of_a_batch_scored_at_once(ctrl_c_raises):
    """The pool waited for the running sandboxes to finish (9 s here) before the interrupt reached the caller."""
    import signal
    import threading

    runner = RewardRunner(reward(workers=2))
    program = fenced("import time\ntime.sleep(1.5)\nprint(3)")
    tests = {"cases": [{"input": "", "output": "3"}] * 6}
    timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        runner(["p"] * 4, [program] * 4, [tests] * 4)
    assert time.monotonic() - started < 4.0
    timer.join()
    deadline = time.monotonic() + 5
    while any(thread.name.startswith("entrorl-reward") for thread in threading.enumerate()):
        assert time.monotonic() < deadline, "the scoring threads outlived the interrupt"
        time.sleep(0.05)
    assert RewardRunner(reward(workers=2))(["p"], [fenced("print(3)")], [{"cases": [{"input": "", "output": "3"}]}]
                                           ).scores.tolist() == [1.0]


def test_a_pickled_code_reward_stops_its_own_calls():
    import pickle

    clone = pickle.loads(pickle.dumps(reward(workers=2)))
    clone.stop_calls()
    assert clone("p", fenced("print(3)"), {"cases": [{"input": "", "output": "3"}]}) == 1.0


def test_keys_that_are_null_are_absent_as_a_column_of_nested_values_gives_them(tmp_path):
    """A Parquet column of nested values gives every row every key of the column, those it lacks as null: a row of
    'cases' came with 'test_cases': null and was refused ("'cases' and 'test_cases' are one list")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from entrorl.data import load_prompts

    path = tmp_path / "code.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"prompt": "add:", "tests": {"cases": [{"input": "1 2\n", "output": "3\n"}]}},
        {"prompt": "add:", "tests": {"language": "python",
                                     "test_cases": [{"type": "stdin_stdout", "input": "1 2\n", "output": "3\n"}]}},
    ]), path)
    records = load_prompts(path, meta_columns=["tests"], require_answer=False)
    assert records[0].meta["tests"]["test_cases"] is None and records[1].meta["tests"]["cases"] is None
    program = fenced("a, b = map(int, input().split())\nprint(a + b)")
    assert [reward()(r.prompt, program, r.answer, **r.meta) for r in records] == [1.0, 1.0]


def test_a_function_s_value_may_be_none_or_an_exact_number_and_a_case_s_type_is_not_its_format():
    """A null output is a function's value (in-place problems), not a missing key; Fraction(1, 2) is 0.5, as APPS's own
    check has it; "type": "functional" is LiveCodeBench's JSON text, only "function_call" PrimeIntellect's values."""
    none = {"test_cases": [{"type": "function_call", "fn_name": "f", "input": [1], "output": None}]}
    assert reward()("p", fenced("def f(x):\n    return None"), none) == 1.0
    assert reward()("p", fenced("def f(x):\n    return 0"), none) == 0.0
    half = {"fn_name": "half", "inputs": [[1]], "outputs": [[0.5]]}
    assert reward()("p", fenced("from fractions import Fraction\ndef half(x):\n    return Fraction(x, 2)"), half) == 1.0
    typed = {"fn_name": "f", "cases": [{"type": "functional", "input": "[1, 2]\n3", "output": "[1, 2, 3]"}]}
    assert reward()("p", fenced("def f(a, b):\n    return a + [b]"), typed) == 1.0
    with pytest.raises(ValueError, match=r"cases\[0\]\.output of a standard-input case is null"):
        parse_tests({"cases": [{"input": "1", "output": None}]})


def test_a_value_too_large_to_write_is_a_wrong_answer_that_says_what_it_was():
    verdict = reward()("p", fenced("def f(x):\n    return 10 ** 5000"), {"fn_name": "f", "inputs": [[1]], "outputs": [1]})
    assert verdict == 0.0 and verdict.reason.startswith("wrong_answer") and "returned a int" in verdict.reason
    huge_fraction = fenced("from fractions import Fraction\ndef f(x):\n    return Fraction(10 ** 400, 3)")
    verdict = reward()("p", huge_fraction, {"fn_name": "f", "inputs": [[1]], "outputs": [1]})
    assert verdict == 0.0 and verdict.status == "wrong_answer", verdict.reason  # float() overflows


@pytest.mark.parametrize("kind", ["functional", "function", "call"])
def test_a_call_case_whose_arguments_are_a_list_takes_its_output_as_a_value(kind):
    upper = {"fn_name": "f", "cases": [{"type": kind, "input": ["a"], "output": "A"}]}
    assert reward()("p", fenced("def f(s):\n    return s.upper()"), upper) == 1.0
    wrapped = {"fn_name": "f", "cases": [{"type": kind, "input": [1], "output": [2]}]}
    assert reward()("p", fenced("def f(x):\n    return x + 1"), wrapped) == 1.0


def test_an_interrupt_stops_a_call_still_reading_its_tests(monkeypatch, ctrl_c_raises):
    """A call still reading its tests when the batch was interrupted took the event stop_calls had just put in place,
    so its program ran to its end."""
    import signal
    import threading

    import entrorl.rewards.code as code_module

    real = code_module.parse_tests

    def slow_parse(spec):
        time.sleep(1.0)
        return real(spec)

    monkeypatch.setattr(code_module, "parse_tests", slow_parse)
    runner = RewardRunner(reward(time_limit=8.0, workers=2))
    program, tests = fenced("import time\ntime.sleep(5)\nprint(3)"), {"cases": [{"input": "", "output": "3"}]}
    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        runner(["p"] * 2, [program] * 2, [tests] * 2)
    timer.join()
    interrupted = time.monotonic()
    while any(thread.name.startswith("entrorl-reward") for thread in threading.enumerate()):
        assert time.monotonic() - interrupted < 3.0, "the interrupted calls' programs ran on"
        time.sleep(0.05)


MAIN_GUARDED_ADD = """
    def add(a, b):
        return a + b

    if __name__ == "__main__":
        a, b = map(int, input().split())
        print(add(a, b))
"""


@pytest.mark.parametrize("tests", [{"fn_name": "add", "inputs": [[1, 2]], "outputs": [3]},
                                   {"fn_name": "add", "cases": [{"input": "1\n2", "output": "3", "testtype": "functional"}]},
                                   ["assert add(1, 2) == 3"]], ids=["apps", "livecodebench", "asserts"])
def test_the_asserts_run_the_program_as_a_module_whose_main_block_does_not_run(tests):
    """As HumanEval's, MBPP's, APPS's and LiveCodeBench's own checks load it; run as __main__, its demo block read the
    empty standard input (EOFError) and a right function scored 0."""
    assert reward()("add", fenced(MAIN_GUARDED_ADD), tests) == 1.0


# LeetCode's starter code names typing's List without importing it
TYPED_TWO_SUM = textwrap.dedent("""
    class Solution:
        def twoSum(self, nums: List[int], target: int) -> List[int]:
            seen = {}
            for i, x in enumerate(nums):
                if target - x in seen:
                    return [seen[target - x], i]
                seen[x] = i
""")


def test_function_call_programs_get_typing_s_names_as_leetcode_s_starter_code_expects():
    assert reward()("two sum", fenced(TYPED_TWO_SUM), {"fn_name": "twoSum", "cases": TWO_SUM_CASES}) == 1.0


def test_a_function_call_program_may_begin_with_a_future_import():
    """typing's names are given to the program's namespace before it runs, not written above its source, where
    ``from __future__`` imports must come first (a SyntaxError otherwise)."""
    program = fenced('"""Two sum."""\nfrom __future__ import annotations\n' + TYPED_TWO_SUM)
    verdict = reward()("two sum", program, {"fn_name": "twoSum", "cases": TWO_SUM_CASES})
    assert verdict == 1.0, verdict.reason
    add = fenced("from __future__ import annotations\n\ndef add(a: int, b: int) -> int:\n    return a + b")
    verdict = reward()("add", add, {"fn_name": "add", "inputs": [[1, 2], [5, 6]], "outputs": [3, 11]})
    assert verdict == 1.0, verdict.reason


def test_each_function_call_gets_fresh_arguments():
    program = "def grow(items):\n    items.append(0)\n    return len(items)"
    tests = {"fn_name": "grow", "inputs": [[[1]], [[1]]], "outputs": [2, 2]}
    assert reward()("grow", fenced(program), tests) == 1.0


def test_a_case_marked_as_standard_input_is_one():
    [test] = parse_tests([{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}])
    assert (test.kind, test.input, test.expected) == ("stdin", "1 2\n", "3\n")


@pytest.mark.parametrize(
    "program",
    [
        "import fileinput\nprint(sum(int(x) for line in fileinput.input() for x in line.split()))",
        "import sys\nif len(sys.argv) > 1:\n    sys.stdin = open(sys.argv[1])\na, b = map(int, input().split())\nprint(a + b)",
        "import sys, os\nassert sys.argv == ['solution.py'] and os.path.basename(__file__) == 'solution.py'\n"
        "print(sum(map(int, input().split())))",
    ],
    ids=["fileinput", "argv-idiom", "argv-and-file"],
)
def test_the_program_runs_as_a_script_without_arguments(program):
    """The program saw the harness's own arguments ('-c', the sandbox's marker, a descriptor): fileinput opened a file
    named like the marker."""
    verdict = reward()("add", fenced(program), ADD_TESTS)
    assert verdict == 1.0, verdict.reason


def test_standard_input_keeps_carriage_returns_as_a_scripts_does():
    """A script's stdin on Linux ends lines at \\n only; with universal newlines input() of 'abc\\r\\n' was 'abc'."""
    tests = {"cases": [{"input": "abc\r\n", "output": "4\n"}, {"input": "a\rb\n", "output": "3\n"}]}
    verdict = reward()("length", fenced("print(len(input()))"), tests)
    assert verdict == 1.0, verdict.reason


def test_a_writer_of_the_programs_own_on_standard_output_is_not_flushed_after_its_globals_are_gone():
    """PyRival's FastIO template replaces sys.stdout with an object whose flush uses the program's globals; the
    harness flushed it again after clearing them (NameError: 'os'), scoring the correct program 0."""
    program = """
        import os, sys
        class Out:
            def __init__(self):
                self.parts = []
            def write(self, text):
                self.parts.append(text)
            def flush(self):
                os.write(1, "".join(self.parts).encode())
                self.parts.clear()
        sys.stdout = Out()
        a, b = map(int, input().split())
        print(a + b)
    """
    verdict = reward()("add", fenced(program), ADD_TESTS)
    assert verdict == 1.0, verdict.reason


def test_correct_program_scores_one():
    verdict = reward()("add", fenced("a, b = map(int, input().split())\nprint(a + b)"), ADD_TESTS)
    assert verdict == 1.0 and verdict.score == 1.0
    assert verdict.status == "passed" and verdict.reason is None
    assert (verdict.passed, verdict.total) == (2, 2)
    assert verdict.isolation["audit_hook"] is True


def test_partly_correct_program_scores_the_fraction_passed():
    tests = {"cases": [{"input": f"{n}\n", "output": f"{n * n}\n"} for n in (0, 1, 2, 3)]}
    verdict = reward()("square", fenced("n = int(input())\nprint(n + n if n < 2 else n * n)"), tests)
    assert verdict == pytest.approx(0.75)
    assert verdict.status == "wrong_answer" and verdict.reason.startswith("wrong_answer: case 1")
    assert [status for status, _ in verdict.cases] == ["passed", "wrong_answer", "passed", "passed"]


def test_assert_cases_run_after_the_program_in_its_namespace():
    program = fenced("def add(a, b):\n    return a + b if a else 0")
    verdict = reward()("add", program, ["assert add(1, 2) == 3", "assert add(0, 5) == 5", "assert add(2, 2) == 4"])
    assert verdict == pytest.approx(2 / 3)
    assert verdict.cases[1][0] == "wrong_answer"


def test_a_program_that_fails_before_the_asserts_fails_each_of_them_the_same_way():
    verdict = reward(memory_mb=128)("p", fenced("x = bytearray(4 * 1024 ** 3)"), ["assert True", "assert 1"])
    assert verdict == 0.0 and verdict.status == "memory_limit"
    assert [status for status, _ in verdict.cases] == ["memory_limit", "memory_limit"]
    verdict = reward()("p", fenced("import sys\nsys.exit(2)"), ["assert True"])
    assert verdict.cases == (("runtime_error", "SystemExit: exit status 2"),)


def test_tests_come_from_meta_when_the_answer_is_none_and_their_absence_is_an_error():
    program = fenced("print(input()[::-1])")
    assert reward()("rev", program, None, tests={"cases": [{"input": "abc", "output": "cba"}]}) == 1.0
    with pytest.raises(ValueError, match="no test cases"):
        reward()("rev", program, None)


def test_the_answer_takes_precedence_over_meta_tests():
    program = fenced("print(input()[::-1])")
    verdict = reward()("rev", program, {"cases": [{"input": "abc", "output": "cba"}]},
                       tests={"cases": [{"input": "abc", "output": "abc"}]})
    assert verdict == 1.0, verdict.reason
    with pytest.raises(ValueError, match="no test case"):  # an empty answer is still the answer: only None is none
        reward()("rev", program, {}, tests={"cases": [{"input": "abc", "output": "cba"}]})


def test_a_completion_without_code_still_reports_how_many_cases_there_were():
    verdict = reward()("add", "no code here", ADD_TESTS)
    assert verdict.status == "no_code" and (verdict.passed, verdict.total) == (0, 2)


def test_the_score_method_returns_a_plain_float():
    score = reward().score("add", "no code here", ADD_TESTS)
    assert type(score) is float and score == 0.0


def test_extraction_and_comparison_options_change_the_verdict():
    """``block``, ``allow_unfenced``, ``languages`` and ``compare`` each reach the reward's extraction and scoring."""
    tests = {"cases": [{"input": "", "output": "first"}]}
    two_blocks = "```python\nprint('first')\n```\n```python\nprint('second')\n```"
    assert reward()("p", two_blocks, tests) == 0.0
    assert reward(block="first")("p", two_blocks, tests) == 1.0
    assert reward()("p", "print('first')", tests).status == "no_code"
    assert reward(allow_unfenced=True)("p", "print('first')", tests) == 1.0
    assert reward(languages=("sh",))("p", "```python\nprint('first')\n```", tests).status == "no_code"
    spaced = fenced("print('first  ')")
    assert reward()("p", spaced, tests) == 1.0
    assert reward(compare="exact")("p", spaced, tests).status == "wrong_answer"


def test_outputs_are_compared_by_tokens_unless_told_otherwise():
    """The default ``compare`` is ``tokens``: the same words, however spaced or broken into lines, pass."""
    verdict = reward()("p", fenced("print('3   4')\nprint('5')"), {"cases": [{"input": "", "output": "3 4 5\n"}]})
    assert verdict == 1.0, verdict.reason
    assert reward(compare="lines")("p", fenced("print('3   4')\nprint('5')"),
                                   {"cases": [{"input": "", "output": "3 4 5\n"}]}).status == "wrong_answer"


def test_sandbox_options_reach_the_sandbox(reachable_temp_dir):
    """``time_limit`` and ``temp_dir`` given to the reward are the ones the program runs under."""
    verdict = reward(time_limit=0.5)("p", fenced("import time\ntime.sleep(5)"), {"cases": [{"input": "", "output": ""}]})
    assert verdict.status == "timeout" and "0.5 s" in verdict.reason
    program = fenced(f"import os\nprint(os.path.realpath(os.getcwd()).startswith({str(reachable_temp_dir.resolve())!r}))")
    verdict = reward(temp_dir=str(reachable_temp_dir))("p", program, {"cases": [{"input": "", "output": "True"}]})
    assert verdict == 1.0, verdict.reason


def test_an_assertion_error_in_a_stdin_program_is_a_runtime_error():
    """A failing ``assert`` *case* is a wrong answer; an ``assert`` failing inside the program on its input is the
    program crashing."""
    verdict = reward()("p", fenced("assert input() == 'x'\nprint('ok')"), {"cases": [{"input": "y", "output": "ok"}]})
    assert verdict.status == "runtime_error" and verdict.cases[0][1].startswith("AssertionError")


def test_a_wrong_answer_reason_quotes_long_outputs_only_in_part():
    """A program printing megabytes does not put them in the verdict's reason (kept in logs and reports)."""
    verdict = reward()("p", fenced("print('x' * 100_000)"), {"cases": [{"input": "", "output": "y" * 100_000}]})
    assert verdict.status == "wrong_answer"
    assert len(verdict.reason) < 1_000


def test_a_program_reading_another_process_environment_scores_zero_as_a_forbidden_read():
    program = fenced("import os\nprint(len(open(f'/proc/{os.getppid()}/environ').read()))")
    verdict = reward()("p", program, {"cases": [{"input": "", "output": "0"}]})
    assert verdict == 0.0 and verdict.status == "forbidden_read" and verdict.reason.startswith("forbidden_read")


def test_a_forbidden_act_scores_zero_and_counts_no_case_passed_even_after_passing_cases():
    """The first refused act names the verdict; cases passed before it do not count."""
    program = fenced(
        """
        import socket
        word = input().strip()
        if word == "b":
            try:
                open('/etc/entrorl-test', 'w')
            except PermissionError:
                pass
            try:
                socket.socket().connect(('127.0.0.1', 9))
            except OSError:
                pass
        print(word)
        """
    )
    verdict = reward()("echo", program, {"cases": [{"input": w, "output": w} for w in ("a", "b")]})
    assert verdict == 0.0 and verdict.status == "forbidden_write"
    assert verdict.passed == 0 and verdict.cases[0][0] == "passed"


@pytest.mark.parametrize(
    ("completion", "status"),
    [
        ("I think the answer is to loop.", "no_code"),
        (fenced("def broken(:\n    pass"), "syntax_error"),
        (fenced("print(1)\x00"), "syntax_error"),  # a null byte: the source does not compile
        (fenced("print(1 // 0)"), "runtime_error"),
        (fenced("import sys\nsys.exit(3)"), "runtime_error"),
        (fenced("print('x' * (3 * 1024 * 1024))"), "output_limit"),
    ],
)
def test_broken_programs_score_zero_with_their_reason(completion, status):
    verdict = reward(max_file_mb=1)("p", completion, {"cases": [{"input": "", "output": "1"}]})
    assert verdict == 0.0
    assert verdict.status == status and verdict.reason.startswith(status)


def test_a_program_that_does_not_compile_runs_no_case():
    """A syntax error is reported once, for the run; no case ran, so none is reported as crashed."""
    run = run_in_sandbox("def broken(:\n    pass", stdin_cases(2) + [SandboxCase("assert", "assert True")])
    assert run.syntax_error is not None and run.syntax_error.startswith("SyntaxError")
    assert [outcome.status for outcome in run.outcomes] == ["not_run"] * 3


def test_exit_zero_and_sys_exit_end_a_stdin_case_normally():
    verdict = reward()("p", fenced("import sys\nprint(42)\nsys.exit(0)"), {"cases": [{"input": "", "output": "42"}]})
    assert verdict == 1.0


def test_a_crash_is_attributed_to_its_case_and_later_cases_still_run():
    program = fenced(
        """
        import os, signal
        word = input().strip()
        if word == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        print(word)
        """
    )
    tests = {"cases": [{"input": w, "output": w} for w in ("a", "crash", "b")]}
    verdict = reward()("echo", program, tests)
    assert verdict == pytest.approx(2 / 3)
    assert verdict.cases[1] == ("runtime_error", "killed by SIGSEGV")
    assert verdict.status == "runtime_error"


def test_exiting_during_an_assert_does_not_pass_it():
    program = fenced("import os\ndef f():\n    os._exit(0)")
    verdict = reward()("p", program, ["assert f() == 1", "assert True"])
    assert verdict.cases[0][0] == "runtime_error"
    assert verdict.cases[1][0] == "passed"


@pytest.mark.parametrize("exit", ["sys.exit(0)", "sys.exit()", "raise SystemExit", "sys.exit(3)"])
def test_exiting_from_a_function_an_assert_calls_does_not_pass_it(exit):
    """``sys.exit(0)`` (or any exit) inside the function under test stops the assert before it is checked: like
    ``os._exit``, that is a runtime error, never a pass (otherwise a program could pass every assert this way), and
    the next case still runs."""
    program = fenced(f"import sys\ndef f():\n    {exit}")
    verdict = reward()("p", program, ["assert f() == 1", "assert True"])
    assert verdict == 0.5
    assert verdict.cases[0][0] == "runtime_error" and "SystemExit" in verdict.cases[0][1]
    assert verdict.cases[1][0] == "passed"


def test_the_program_may_exit_cleanly_before_the_asserts():
    """Ending the program with ``sys.exit(0)`` is a normal end, so the assert cases still run against what it
    defined; a script's ``__main__`` block runs for standard-input cases."""
    program = fenced("def add(a, b):\n    return a + b\nimport sys\nsys.exit(0)")
    verdict = reward()("add", program, ["assert add(1, 2) == 3", "assert add(2, 2) == 5"])
    assert [status for status, _ in verdict.cases] == ["passed", "wrong_answer"]
    guarded = fenced("if __name__ == '__main__':\n    print(input()[::-1])")
    assert reward()("rev", guarded, {"cases": [{"input": "abc", "output": "cba"}]}) == 1.0


def test_how_the_process_ends_during_a_case_decides_its_outcome():
    """``os._exit(0)`` ends a script normally (its output so far counts); a non-zero exit status is an error, not a
    crash; running out of CPU time is a timeout."""
    run = run_in_sandbox("import os\nprint('partial', flush=True)\nos._exit(0)", stdin_cases())
    assert (run.outcomes[0].status, run.outcomes[0].stdout) == ("ok", "partial\n")
    run = run_in_sandbox("import os\nos._exit(3)", stdin_cases())
    assert (run.outcomes[0].status, run.outcomes[0].error) == ("error", "exited with status 3")
    spin = "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (1, 3))\nwhile True:\n    pass"
    verdict = reward(time_limit=10.0)("p", fenced(spin), {"cases": [{"input": "", "output": ""}]})
    assert verdict.status == "timeout" and "SIGXCPU" in verdict.reason


def test_long_and_non_ascii_outputs_are_captured_whole():
    """Inputs and outputs are UTF-8 text, and an output far larger than a pipe buffer is compared in full."""
    program = fenced("s = input()\nprint(s[::-1] * 20000)")
    verdict = reward()("p", program, {"cases": [{"input": "héllo→", "output": "→olléh" * 20000}]})
    assert verdict == 1.0, verdict.reason


def test_output_that_is_not_utf8_is_compared_with_its_bad_bytes_replaced_not_dropped():
    """Bytes of the output that are not UTF-8 stand as replacement characters: dropping them would let ``o\\xffk``
    pass as ``ok``."""
    program = fenced("import sys\nsys.stdout.buffer.write(b'o\\xffk\\n')")
    verdict = reward()("p", program, {"cases": [{"input": "", "output": "ok"}]})
    assert verdict.status == "wrong_answer"
    assert verdict.cases[0][1] == "expected 'ok', got 'o\ufffdk\\n'"


@pytest.mark.parametrize("program", [
    "a, b = map(int, open(0).read().split())\nprint(a + b)",  # fd 0 closed once its file is collected
    "with open(0) as handle:\n    a, b = map(int, handle.read().split())\nprint(a + b)",
    "import sys\na, b = map(int, sys.stdin.read().split())\nopen(1, 'w').write(str(a + b) + '\\n')",  # closes fd 1
    "import sys\na, b = map(int, input().split())\nprint(a + b)\nsys.stdout.close()",
])
def test_programs_that_close_their_standard_streams_pass_every_case(program):
    """Correct under ``python3 p.py < in`` (the competitive-programming idioms): every case passes, the later ones too."""
    verdict = reward()("add", fenced(program), ADD_TESTS)
    assert verdict == 1.0, verdict.reason


def _plant(kind: str, name: str, target: str = "") -> str:
    """Program text that replaces the working directory's ``name`` by a FIFO, a directory or a link to ``target``."""
    make = {"fifo": f"os.mkfifo({name!r})", "symlink": f"os.symlink({target!r}, {name!r})",
            "directory": f"os.mkdir({name!r})"}[kind]
    return f"import os\nif os.path.exists({name!r}):\n    os.remove({name!r})\n{make}\n"


@pytest.mark.timeout(60)  # the failure this guards against is a parent blocked for ever
@pytest.mark.parametrize("kind", ["fifo", "directory"])
@pytest.mark.parametrize("name", ["case0.out", "stderr.txt", "config1.json"])
def test_files_the_program_replaces_neither_block_nor_mislead_the_sandbox(kind, name):
    """The parent reads each case's output and stderr, and writes the next attempt's configuration and stderr, in the
    working directory, where a program may have put a FIFO (opening it would block the parent for ever) or a directory
    in their place. The case whose file was replaced fails, the run ends within its time limit, and the later case
    (in a fresh child after the crash) is scored."""
    program = ("import os\nfirst = not os.path.exists('crashed')\n"
               "a, b = map(int, input().split())\nprint(a + b, flush=True)\n"
               f"if first:\n    open('crashed', 'w').close()\n    exec({_plant(kind, name)!r})\n    os._exit(1)")
    started = time.monotonic()
    verdict = reward()("add", fenced(program), ADD_TESTS)
    assert time.monotonic() - started < 30
    assert verdict.cases[1][0] == "passed", verdict.reason
    if name == "case0.out":  # its output replaced: the case is not passed on what the parent could not read
        assert verdict.cases[0][0] != "passed"


def test_a_link_made_outside_the_sandbox_directory_is_refused(tmp_path):
    """os.symlink(inside, outside) writes a name outside the sandbox directory: the audit hook refuses it like any
    other write there, whatever the link points at."""
    link = tmp_path / "planted-link"
    program = f"import os\nos.symlink(os.path.join(os.getcwd(), 'x'), {str(link)!r})\nprint('ok')"
    verdict = reward()("p", fenced(program), {"cases": [{"input": "", "output": "ok"}]})
    assert verdict == 0.0 and verdict.status == "forbidden_write"
    assert not os.path.lexists(link)


def test_the_program_cannot_swap_its_working_directory_for_a_link(tmp_path):
    """Without the audit hook and the read-only view, a program running as the sandbox uid tries to rename its working
    directory away and put a link to another folder in its place, so that the parent (root) would write the next
    attempt's files there. The folder holding the working directory is the parent's: the rename is refused, the
    other folder stays empty and the run ends normally."""
    if not kernel_layers()["dropped_uid"]:
        pytest.skip("the sandbox runs as the caller's own uid here: no boundary between the two to test")
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o777)
    program = textwrap.dedent(f"""
        import os
        workdir = os.getcwd()
        try:
            os.rename(workdir, workdir + ".moved")
            os.symlink({str(victim)!r}, workdir)
            print("swapped", flush=True)
        except OSError as error:
            print("refused", type(error).__name__, flush=True)
        os._exit(1)
    """)
    run = run_in_sandbox(program, stdin_cases(2), SandboxLimits(audit_hook=False, read_only_filesystem=False))
    assert list(victim.iterdir()) == []
    assert [outcome.stdout for outcome in run.outcomes] == ["refused PermissionError\n"] * 2  # each attempt ran


def test_a_case_output_linked_to_a_file_the_program_cannot_read_is_not_read_for_it(tmp_path):
    """Without the audit hook a program may link its output file to one it cannot read; the parent (maybe root) does
    not read it on its behalf, so the file's text never reaches the verdict's reason. (A hard link to such a file the
    kernel refuses the program itself, with protected_hardlinks.)"""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    secret = private / "secret"
    secret.write_text("SECRET-TEXT\n")
    secret.chmod(0o600)
    program = _plant("symlink", "case0.out", str(secret))
    run = run_in_sandbox(program, stdin_cases(), SandboxLimits(audit_hook=False))
    assert "SECRET" not in (run.outcomes[0].stdout or "") + (run.outcomes[0].error or "")


def test_runner_keeps_the_verdict_score_and_reason():
    runner = RewardRunner(reward())
    result = runner(
        ["p", "p"],
        [fenced("a, b = map(int, input().split())\nprint(a + b)"), "no code here"],
        [ADD_TESTS, ADD_TESTS],
    )
    assert result.scores.tolist() == [1.0, 0.0]
    assert result.errors == 0
    reasons = getattr(result, "reasons", None)
    if reasons is not None:  # runners that keep per-sample reasons
        assert reasons[0] is None and reasons[1].startswith("no_code")


# --------------------------------------------------------------------------------------------
# containment of hostile programs
# --------------------------------------------------------------------------------------------


def test_infinite_loop_is_stopped_at_the_time_limit_and_later_cases_are_skipped():
    limit = 1.0
    started = time.monotonic()
    verdict = reward(time_limit=limit)("p", fenced("while True:\n    pass"), ADD_TESTS)
    elapsed = time.monotonic() - started
    assert verdict == 0.0 and verdict.status == "timeout"
    assert [status for status, _ in verdict.cases] == ["timeout", "not_run"]
    assert elapsed < limit + 2.0, f"an infinite loop held the reward for {elapsed:.2f} s"


def test_a_case_is_stopped_at_its_own_time_limit():
    """Stopped at time_limit, not at some multiple of it (the margin leaves room for a busy machine's wake-up)."""
    run = run_in_sandbox("import time\ntime.sleep(30)", stdin_cases(), SandboxLimits(time_limit=1.0))
    assert run.outcomes[0].status == "timeout"
    assert 1.0 <= run.outcomes[0].seconds < 1.8


def test_sleeping_program_is_stopped_by_the_wall_clock_not_only_cpu_time():
    started = time.monotonic()
    verdict = reward(time_limit=0.5)("p", fenced("import time\ntime.sleep(60)"), {"cases": [{"input": "", "output": ""}]})
    assert verdict.status == "timeout"
    assert time.monotonic() - started < 0.5 + 2.0


@pytest.mark.parametrize(
    "bomb",
    ["x = bytearray(8 * 1024 ** 3)", "chunks = []\nwhile True:\n    chunks.append(bytearray(8 * 1024 ** 2))"],
    ids=["one-allocation", "growing"],
)
def test_memory_bomb_hits_the_memory_limit(bomb):
    started = time.monotonic()
    verdict = reward(memory_mb=256)("p", fenced(bomb), {"cases": [{"input": "", "output": ""}]})
    assert verdict == 0.0 and verdict.status == "memory_limit"
    assert time.monotonic() - started < 5.0


FORK_BOMB = """
import os, sys, time
children = 0
while True:
    try:
        pid = os.fork()
    except OSError as error:
        print("fork refused after", children, "children:", error, flush=True)
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    children += 1
print(children)
"""


def test_fork_bomb_is_refused_and_leaves_no_process():
    run = run_in_sandbox(textwrap.dedent(FORK_BOMB), stdin_cases(), SandboxLimits(time_limit=2.0))
    assert ("process", "os.fork") in run.violations
    assert processes_of(run.uid, run.marker) == []
    verdict = reward()("p", fenced(FORK_BOMB), {"cases": [{"input": "", "output": "0"}]})
    assert verdict == 0.0 and verdict.status == "process_limit"


def test_fork_bomb_without_the_audit_hook_is_capped_by_the_process_limit():
    limits = SandboxLimits(time_limit=2.0, audit_hook=False, max_processes=6)
    run = run_in_sandbox(textwrap.dedent(FORK_BOMB), stdin_cases(), limits)
    if run.uid is None:
        pytest.skip(f"RLIMIT_NPROC cannot hold here: {run.isolation['process_limit']}")
    output = run.outcomes[0].stdout
    assert output.startswith("fork refused after"), output
    children = int(output.split()[3])
    assert children < limits.max_processes
    assert processes_of(run.uid, run.marker) == []


def test_starting_more_threads_or_processes_than_allowed_scores_process_limit():
    """Past ``max_processes`` a thread cannot start (``RuntimeError``) and, without the audit hook, a fork fails with
    ``BlockingIOError``: either scores ``process_limit``."""
    if os.geteuid() == 0 and not kernel_layers()["dropped_uid"]:
        pytest.skip("RLIMIT_NPROC does not apply to root")
    tests = {"cases": [{"input": "", "output": "ok"}]}
    threads = fenced("import threading, time\nfor _ in range(32):\n"
                     "    threading.Thread(target=time.sleep, args=(1,), daemon=True).start()\nprint('ok')")
    verdict = reward(max_processes=4)("p", threads, tests)
    assert verdict.status == "process_limit", verdict.reason
    forks = fenced("import os, time\nfor _ in range(32):\n    if os.fork() == 0:\n        time.sleep(5)\n"
                   "        os._exit(0)\nprint('ok')")
    verdict = reward(max_processes=4, audit_hook=False)("p", forks, tests)
    assert verdict.status == "process_limit", verdict.reason


def test_the_program_runs_under_the_configured_resource_limits():
    """Every limit of :class:`SandboxLimits` is the program's own ``getrlimit``; CPU time is capped at the total of
    every case's time limit (plus a little), no core dumps."""
    program = ("import resource\nfor name in ('AS', 'DATA', 'CPU', 'FSIZE', 'NOFILE', 'CORE', 'NPROC'):\n"
               "    print(name, *resource.getrlimit(getattr(resource, 'RLIMIT_' + name)))")
    limits = SandboxLimits(time_limit=1.5, memory_mb=300, max_processes=7, max_file_mb=3, max_open_files=40)
    run = run_in_sandbox(program, stdin_cases(3), limits)
    seen = {name: (int(soft), int(hard)) for name, soft, hard in map(str.split, run.outcomes[0].stdout.splitlines())}
    megabyte = 1024 * 1024
    assert seen["AS"] == seen["DATA"] == (300 * megabyte, 300 * megabyte)
    assert seen["FSIZE"] == (3 * megabyte, 3 * megabyte)
    assert seen["NOFILE"] == (40, 40)
    assert seen["CORE"] == (0, 0)
    assert 3 * 1.5 <= seen["CPU"][0] <= 3 * 1.5 + 5
    if run.isolation.get("user_namespace"):  # the namespace's tasks: the program's, and the PID namespace's two helpers
        helpers = 2 if run.isolation["pid_namespace"] else 0
        assert seen["NPROC"] == (7 + helpers, 7 + helpers)
    elif run.uid is not None:
        assert seen["NPROC"] == (7, 7)


def test_a_job_s_lower_hard_limits_are_kept_and_the_program_runs():
    """A batch script's `ulimit -n 32 -f 8192 -u 10` (hard limits below the sandbox's own 64 files, 16 MiB, 16
    processes): the child tried to raise them and could not, and every program failed to start ("not allowed to
    raise maximum limit"), scored 0. The job's stricter limits are kept; the program runs under them."""
    script = textwrap.dedent("""
        import resource
        for name, value in (("NOFILE", 32), ("FSIZE", 8 * 2**20), ("NPROC", 10)):
            resource.setrlimit(getattr(resource, "RLIMIT_" + name), (value, value))
        from entrorl.rewards.sandbox import SandboxCase, run_in_sandbox
        program = ("import resource\\nprint(int(input()) * 2, *(resource.getrlimit(getattr(resource, 'RLIMIT_' + name))[1] "
                   "for name in ('NOFILE', 'FSIZE', 'NPROC')))")
        run = run_in_sandbox(program, [SandboxCase("stdin", "3\\n")])
        print(run.outcomes[0].status, run.outcomes[0].stdout.strip(), run.uid is None, run.isolation.get("user_namespace"),
              "|", run.isolation.get("process_limit"))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    fields, note = done.stdout.split(" | ")
    status, doubled, files, size, processes, shared_uid, user_namespace = fields.split()
    assert (status, doubled, files, size) == ("ok", "6", "32", str(8 * 2**20))
    if shared_uid == "False" or user_namespace == "True":  # RLIMIT_NPROC set for the program (not for root's own uid)
        assert int(processes) <= 10
        assert "RLIMIT_NPROC=10, the job's own hard limit" in note, note


def test_background_children_are_killed_even_when_they_leave_the_process_group():
    program = textwrap.dedent(
        """
        import os, subprocess, time
        escaped = subprocess.Popen(["sleep", "60"], start_new_session=True)
        pid = os.fork()
        if pid == 0:
            os.setsid()
            time.sleep(60)
            os._exit(0)
        print(escaped.pid, pid)
        """
    )
    run = run_in_sandbox(program, stdin_cases(), SandboxLimits(time_limit=2.0, allow_subprocesses=True))
    assert run.outcomes[0].status == "ok", run.outcomes[0]
    pids = [int(word) for word in run.outcomes[0].stdout.split()]
    assert len(pids) == 2
    assert not any(pid_alive(pid) for pid in pids)
    assert processes_of(run.uid, run.marker) == []


def test_a_background_process_without_the_run_marker_is_killed_by_its_uid():
    """A child started with an empty environment and a new session carries nothing that names the run; it is still
    killed, as a process of the sandbox uid."""
    if not kernel_layers()["dropped_uid"]:
        pytest.skip("only a dedicated sandbox uid identifies a process that dropped the run's marker")
    program = "import subprocess\nprint(subprocess.Popen(['sleep', '60'], env={}, start_new_session=True).pid)"
    run = run_in_sandbox(program, stdin_cases(), SandboxLimits(allow_subprocesses=True))
    assert run.outcomes[0].status == "ok", run.outcomes[0]
    assert not pid_alive(int(run.outcomes[0].stdout))


def test_under_the_trainer_s_own_uid_a_pid_namespace_ends_every_process_the_program_started():
    """Without a uid of its own (a trainer that is not root; here root with drop_privileges off) nothing else tells
    the program's processes from the user's: the program runs in a PID namespace, so a child that left the group
    and dropped the run's marker (setsid, an empty environment) dies with the run, and no process outside has a pid
    the program could signal. /proc is the namespace's, so /proc/<os.getpid()> is the program's own entry."""
    program = textwrap.dedent("""
        import os
        if os.fork() == 0:
            os.setsid()
            os.execve("/bin/sleep", ["sleep", "61.25"], {})
        print(os.getpid(), open("/proc/%d/status" % os.getpid()).readline().split()[1])
        os.kill(1, 9)  # the namespace's first process, which the kernel does not let its own namespace kill
        try:
            os.kill(TRAINER, 9)
        except ProcessLookupError:
            print("no such process")
        """).replace("TRAINER", str(os.getpid()))
    run = run_in_sandbox(program, stdin_cases(), SandboxLimits(time_limit=2.0, drop_privileges=False, audit_hook=False))
    if not run.isolation["pid_namespace"]:
        pytest.skip(f"no PID namespace here: {run.isolation}")
    assert run.outcomes[0].status == "ok", run.outcomes[0]
    pid, name = run.outcomes[0].stdout.split()[:2]
    assert pid == "2" and run.outcomes[0].stdout.endswith("no such process\n")
    if run.isolation["proc_of_the_namespace"]:
        assert name == "python3" or name.startswith("python"), run.outcomes[0].stdout
    time.sleep(0.2)
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and _cmdline(pid) == b"sleep\x0061.25\x00"]


ADOPTING_TRAINER = """
import ctypes, os, time
from entrorl.rewards.sandbox import SandboxCase, SandboxLimits, run_in_sandbox
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come to it, as to PID 1 of a container
BODY
time.sleep(0.3)
adopted = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open("/proc/%s/stat" % pid) as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        continue
    if int(fields[1]) == os.getpid():
        adopted.append((pid, fields[0]))
print("ADOPTED", adopted)
"""


def as_an_adopting_trainer(body: str) -> subprocess.CompletedProcess:
    """Run ``body`` in a process that adopts the orphans of its descendants, which prints at the end which of its
    children it has not reaped (``ADOPTED [(pid, state), ...]``)."""
    script = ADOPTING_TRAINER.replace("BODY", textwrap.dedent(body))
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_a_timed_out_pid_namespace_leaves_no_zombie_to_a_trainer_that_adopts_orphans_nor_counts_a_stray():
    """A trainer that is PID 1 of a container (docker without --init) or a subreaper inherits the processes whose
    parent dies, and never waits for them. On a timeout the keeper's reaper and harness are killed first and reaped
    by the keeper (killed together with it, each timed-out attempt left them as zombies there), and they are not
    counted as strays of the program (a program that only sleeps has none)."""
    result = as_an_adopting_trainer("""
        strays = []
        for _ in range(3):
            run = run_in_sandbox("import time\\ntime.sleep(30)", [SandboxCase("stdin", "")],
                                 SandboxLimits(drop_privileges=False, time_limit=0.5))
            assert run.outcomes[0].status == "timeout" and run.isolation["pid_namespace"], (run.outcomes, run.isolation)
            strays.append(run.isolation["strays_killed"])
        print("STRAYS", strays)
        """)
    if "pid_namespace" in result.stderr and "AssertionError" in result.stderr:
        pytest.skip(f"no PID namespace here: {result.stderr[-300:]}")
    assert "STRAYS [0, 0, 0]\nADOPTED []" in result.stdout, result.stdout + result.stderr[-2000:]


def test_a_dedicated_uid_s_subprocesses_leave_no_zombie_to_a_trainer_that_adopts_orphans():
    """The program's own subprocesses (allow_subprocesses), killed with the group at the end, are orphaned to a
    trainer that is PID 1 of a container or a subreaper, which reaps them now (they stayed zombies, each counted
    against its process limit)."""
    if not kernel_layers()["dropped_uid"]:
        pytest.skip("the dedicated uid needs root")
    result = as_an_adopting_trainer("""
        for program in ("import subprocess\\nsubprocess.Popen(['sleep', '60'])\\nprint('hi')",
                        "import subprocess, time\\nsubprocess.Popen(['sleep', '60'])\\ntime.sleep(30)",
                        # one that left the group and ended by itself; ones started while the group is killed
                        "import subprocess, time\\nsubprocess.Popen(['true'], start_new_session=True)\\ntime.sleep(0.2)",
                        "import subprocess\\nwhile True:\\n    subprocess.Popen(['true'])"):
            run_in_sandbox(program, [SandboxCase("stdin", "")], SandboxLimits(allow_subprocesses=True, time_limit=0.5))
        """)
    assert "ADOPTED []" in result.stdout, result.stdout + result.stderr[-2000:]


def _cmdline(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def test_process_creation_below_subprocess_s_audit_event_is_refused_and_reported():
    """``_posixsubprocess.fork_exec``, what subprocess calls after raising its audit event, raises none of its own:
    called directly it is refused, and the refusal reported (the program scores 0 even when it catches it)."""
    program = textwrap.dedent("""
        import _posixsubprocess
        try:
            _posixsubprocess.fork_exec([b"/bin/true"], [b"/bin/true"])
        except PermissionError as error:
            print("refused:", error)
        """)
    run = run_in_sandbox(program, stdin_cases(), SandboxLimits(time_limit=2.0))
    assert run.outcomes[0].stdout.startswith("refused: sandbox: process refused"), run.outcomes[0]
    assert ("process", "_posixsubprocess.fork_exec") in run.violations


ORDINARY_USER_THREADS = '''
import subprocess, textwrap
from entrorl.rewards.sandbox import SandboxCase, SandboxLimits, run_in_sandbox
others = [subprocess.Popen(["sleep", "60"]) for _ in range(30)]  # the user's other work
try:
    threads = """
import threading
started = 0
try:
    for _ in range(40):
        threading.Thread(target=threading.Event().wait, args=(2,), daemon=True).start()
        started += 1
except RuntimeError:
    pass
print(started)
"""
    run = run_in_sandbox(threads, [SandboxCase("stdin", "")], SandboxLimits(max_processes=8, audit_hook=False))
    print("THREADS", run.outcomes[0].stdout.strip(), run.isolation.get("user_namespace", False),
          run.isolation["pid_namespace"])
finally:
    for process in others:
        process.kill()
        process.wait()
'''


def test_as_an_ordinary_user_the_process_limit_holds_in_the_namespaces(as_an_ordinary_user):
    """Without a uid of its own, the program shares the user's: RLIMIT_NPROC, counted in the program's user namespace,
    is ``max_processes`` (it was the user's other tasks plus ``max_processes``: a user running 60 processes let a
    program start 40 threads under ``max_processes=8``)."""
    result = as_an_ordinary_user(ORDINARY_USER_THREADS)
    line = next((text for text in result.stdout.splitlines() if text.startswith("THREADS")), None)
    assert line is not None, result.stdout + result.stderr
    started, user_namespace, pid_namespace = line.split()[1:]
    if user_namespace != "True":
        pytest.skip("no user namespace here: the shared uid's budget applies")
    assert pid_namespace == "True" and int(started) == 7, line  # 8 with the program's main thread


def test_with_subprocesses_allowed_the_program_may_stop_its_own_children():
    program = "import subprocess\nchild = subprocess.Popen(['sleep', '30'])\nchild.kill()\nprint(child.wait())"
    run = run_in_sandbox(program, stdin_cases(), SandboxLimits(allow_subprocesses=True))
    assert run.violations == [] and run.outcomes[0].stdout == "-9\n"


@pytest.mark.parametrize(
    ("program", "kind"),
    [
        ("import os\nos.open({target!r}, os.O_WRONLY | os.O_CREAT)", "file_write"),
        ("open({target!r} + '.new', 'x')", "file_write"),
        ("import os\nopen(os.getcwd() + '-sibling', 'w')", "file_write"),
        ("import os\nopen('scratch', 'w').close()\nos.rename('scratch', {target!r})", "file_write"),
        ("import os\nos.remove({target!r})", "file_write"),
        ("import os\nos.chmod({target!r}, 0o777)", "file_write"),
        ("import socket\nsocket.socket().connect(('127.0.0.1', 9))", "network"),
        ("import socket\nsocket.socket().bind(('127.0.0.1', 0))", "network"),
        ("import socket\nsocket.getaddrinfo('localhost', 80)", "network"),
        ("import socket\nsocket.gethostbyname('localhost')", "network"),
        ("import subprocess\nsubprocess.run(['true'])", "process"),
        ("import os\nos.system('true')", "process"),
        ("import os\nos.execv('/bin/true', ['true'])", "process"),
        ("import cffi", "ctypes"),
        ("import os\nos.killpg(1, 0)", "process"),
    ],
    ids=["os.open", "open-x", "sibling-folder", "rename-out", "remove", "chmod", "connect", "bind", "getaddrinfo",
         "gethostbyname", "subprocess", "os.system", "exec", "cffi", "killpg-outside"],
)
def test_each_forbidden_operation_is_refused_and_reported(tmp_path, program, kind):
    """Each operation the module documents as refused raises in the program and is reported with its kind; the
    file outside the sandbox directory is left as it was."""
    target = tmp_path / "target.txt"
    target.write_text("keep")
    run = run_in_sandbox(program.format(target=str(target)), stdin_cases(), SandboxLimits())
    assert run.violations and run.violations[0][0] == kind, (run.violations, run.outcomes)
    assert run.outcomes[0].status == "error"
    assert target.read_text() == "keep" and os.listdir(tmp_path) == ["target.txt"]
    assert (target.stat().st_mode & 0o777) != 0o777


@pytest.mark.parametrize(
    "program",
    [
        "open('/dev/null', 'w').write('discarded')",
        "import os\nopen(f'/proc/{os.getpid()}/status').read()",
        "import tempfile\nwith tempfile.TemporaryFile() as handle:\n    handle.write(b'x')",
        "import os\nopen(os.path.expanduser('~/notes.txt'), 'w').write('x')",
        "import os\nos.kill(0, 0)",
        "import os\nos.kill(os.getpid(), 0)",
    ],
    ids=["dev-null", "own-proc", "tempfile", "home", "signal-own-group", "signal-itself"],
)
def test_harmless_operations_are_allowed(program):
    """Writing to ``/dev/null``, reading the program's own ``/proc`` entry, temporary or home-directory files (both are
    the working directory), and signalling itself or its own process group (pid 0) are no violations."""
    run = run_in_sandbox(program + "\nprint('ok')", stdin_cases())
    assert run.violations == [] and run.outcomes[0].stdout == "ok\n", run.outcomes[0]


def test_writing_outside_the_sandbox_directory_is_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    program = f"open({str(target)!r}, 'w').write('pwned')\nprint('ok')"
    verdict = reward()("p", fenced(program), {"cases": [{"input": "", "output": "ok"}]})
    assert verdict == 0.0 and verdict.status == "forbidden_write"
    assert not target.exists()
    layers = kernel_layers()
    if not (layers["dropped_uid"] or layers["read_only_filesystem"]):
        pytest.skip("no kernel layer stops writes here (same uid, no read-only view)")
    # without the audit hook the kernel still refuses (unprivileged uid and the read-only view)
    run = run_in_sandbox(program, stdin_cases(), SandboxLimits(audit_hook=False))
    assert not target.exists()
    assert run.outcomes[0].status == "error" and "Error" in run.outcomes[0].error


def test_world_writable_directories_are_read_only_for_the_program():
    # any uid may write in this directory (pytest's tmp_path is not reachable by other uids): only
    # the read-only view can stop the program
    with tempfile.TemporaryDirectory() as shared:
        os.chmod(shared, 0o777)
        target = os.path.join(shared, "escaped.txt")
        program = f"open({target!r}, 'w').write('pwned')\nprint('ok')"
        run = run_in_sandbox(program, stdin_cases(), SandboxLimits(audit_hook=False))
        if not run.isolation["read_only_filesystem"]:
            pytest.skip(f"no read-only view here: {run.isolation.get('read_only_filesystem_error')}")
        assert not os.path.exists(target)
        assert "Errno 30" in run.outcomes[0].error  # EROFS
    for directory in ("/tmp", "/dev/shm"):
        run = run_in_sandbox(f"open('{directory}/entrorl-litter', 'w')", stdin_cases(), SandboxLimits(audit_hook=False))
        assert "Errno 30" in run.outcomes[0].error
        assert not os.path.exists(f"{directory}/entrorl-litter")


def test_changing_directory_does_not_make_relative_writes_allowed():
    run = run_in_sandbox("import os\nos.chdir('/tmp')\nopen('entrorl-relative-escape', 'w')", stdin_cases())
    assert run.violations and run.violations[0][0] == "file_write"
    assert not os.path.exists("/tmp/entrorl-relative-escape")


def test_litter_removal_deletes_only_the_sandbox_user_s_entries(tmp_path, monkeypatch):
    """Run on stand-in folders (the real ones are shared with every process of the machine): only what the sandbox
    user owns goes, its folders with their contents; what the parent or anyone else owns stays. A link the sandbox
    user left is judged by its own owner, not its target's, and goes without what it points at."""
    from entrorl.rewards import sandbox

    if os.geteuid() != 0:
        pytest.skip("giving files to another user needs root")
    sandbox_uid, other_uid = 61_234, 61_235
    shared = [tmp_path / "tmp", tmp_path / "shm"]
    for folder in shared:
        folder.mkdir()
    litter_file, litter_folder = shared[0] / "left-by-program", shared[1] / "folder-of-program"
    litter_file.write_text("x")
    litter_folder.mkdir()
    (litter_folder / "inside").write_text("x")
    for path in (litter_file, litter_folder, litter_folder / "inside"):
        os.chown(path, sandbox_uid, sandbox_uid)
    kept = [shared[0] / "parents", shared[1] / "someone-elses"]
    for path in kept:
        path.write_text("keep")
    os.chown(kept[1], other_uid, other_uid)
    parents_folder = tmp_path / "parents-folder"
    parents_folder.mkdir()
    (parents_folder / "inside").write_text("keep")
    links = [shared[0] / "link-to-parents-file", shared[1] / "link-to-parents-folder"]
    for link, target in zip(links, (kept[0], parents_folder)):
        link.symlink_to(target)
        os.lchown(link, sandbox_uid, sandbox_uid)
    stand_ins = (*(str(folder) for folder in shared), str(tmp_path / "absent"))
    monkeypatch.setattr(sandbox, "_SHARED_WRITABLE_DIRS", stand_ins)
    assert sorted(sandbox._remove_litter(sandbox_uid)) == sorted([str(litter_file), str(litter_folder), *map(str, links)])
    assert not litter_file.exists() and not litter_folder.exists()
    assert not any(os.path.lexists(link) for link in links)
    assert all(path.read_text() == "keep" for path in (*kept, parents_folder / "inside"))


def test_files_left_in_shared_temporary_directories_are_removed_when_the_view_is_writable():
    name = f"entrorl-litter-{os.urandom(4).hex()}"
    program = f"open('/dev/shm/{name}', 'w').write('x')\nprint('ok')"
    limits = SandboxLimits(audit_hook=False, read_only_filesystem=False)
    if os.geteuid() != 0:  # without root there is no dedicated sandbox uid, so the write would stay behind
        pytest.skip("litter is only attributable to a dedicated sandbox uid, which needs root")
    run = run_in_sandbox(program, stdin_cases(), limits)
    try:
        if run.uid is None:
            pytest.skip("litter is only attributable to a dedicated sandbox uid")
        assert run.outcomes[0].stdout == "ok\n"  # the write went through: nothing stopped it
    finally:
        if os.path.exists(f"/dev/shm/{name}") and run.uid is None:
            os.remove(f"/dev/shm/{name}")
    assert not os.path.exists(f"/dev/shm/{name}")
    assert run.isolation["litter_removed"] == [f"/dev/shm/{name}"]


def test_folders_left_in_shared_temporary_directories_are_removed_too():
    name = f"entrorl-litter-{os.urandom(4).hex()}"
    program = f"import os\nos.mkdir('/dev/shm/{name}')\nopen('/dev/shm/{name}/f', 'w').write('x')\nprint('ok')"
    if os.geteuid() != 0:
        pytest.skip("litter is only attributable to a dedicated sandbox uid, which needs root")
    run = run_in_sandbox(program, stdin_cases(), SandboxLimits(audit_hook=False, read_only_filesystem=False))
    if run.uid is None:
        if os.path.exists(f"/dev/shm/{name}"):
            import shutil

            shutil.rmtree(f"/dev/shm/{name}")
        pytest.skip("litter is only attributable to a dedicated sandbox uid")
    assert run.outcomes[0].stdout == "ok\n"
    assert not os.path.exists(f"/dev/shm/{name}")
    assert run.isolation["litter_removed"] == [f"/dev/shm/{name}"]


def test_program_cannot_signal_processes_outside_the_sandbox():
    import subprocess

    victim = subprocess.Popen(["sleep", "30"])
    try:
        program = f"import os, signal\nos.kill({victim.pid}, signal.SIGKILL)\nprint('sent')"
        verdict = reward()("p", fenced(program), {"cases": [{"input": "", "output": "sent"}]})
        assert verdict == 0.0 and verdict.status == "process_limit"
        assert victim.poll() is None
        if kernel_layers()["dropped_uid"]:  # without the hook, a different uid is what stops it: the kernel refuses
            run = run_in_sandbox(program, stdin_cases(), SandboxLimits(audit_hook=False))
            assert "PermissionError" in run.outcomes[0].error
            assert victim.poll() is None, "the sandboxed program killed a process outside the sandbox"
    finally:
        victim.kill()
        victim.wait()


def test_writing_inside_the_sandbox_directory_is_allowed_and_the_directory_is_removed():
    program = "import os\nopen('scratch.txt', 'w').write('x' * 100)\nos.mkdir('sub')\nprint(os.getcwd())"
    run = run_in_sandbox(program, stdin_cases(), SandboxLimits())
    assert run.outcomes[0].status == "ok" and not run.violations
    assert run.outcomes[0].seconds > 0  # the case's own wall-clock time is measured
    assert os.path.realpath(run.outcomes[0].stdout.strip()) == os.path.realpath(run.workdir)
    assert not os.path.exists(run.workdir)


def test_the_temporary_directory_is_removed_after_a_crash_and_a_timeout():
    for program in ("import os\nopen('f', 'w').write('x')\nos.abort()", "open('f', 'w').write('x')\nwhile True: pass"):
        run = run_in_sandbox(program, stdin_cases(), SandboxLimits(time_limit=0.5))
        assert run.workdir and not os.path.exists(run.workdir)


def _listener() -> socket.socket:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    return server


def _accepted_any(server: socket.socket) -> bool:
    try:
        connection, _ = server.accept()
    except BlockingIOError:
        return False
    connection.close()
    return True


def test_network_connection_to_a_local_listener_is_blocked():
    server = _listener()
    try:
        port = server.getsockname()[1]
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')\nprint('ok')"
        verdict = reward()("p", fenced(program), {"cases": [{"input": "", "output": "ok"}]})
        assert verdict == 0.0 and verdict.status == "network_blocked"
        if kernel_layers()["network_namespace"]:  # the kernel layer alone blocks it too
            run = run_in_sandbox(program, stdin_cases(), SandboxLimits(audit_hook=False))
            assert run.outcomes[0].status == "error" and "Errno 101" in run.outcomes[0].error
        assert not _accepted_any(server), "the sandboxed program reached the listener"
    finally:
        server.close()


def test_network_failures_from_the_kernel_layer_score_network_blocked():
    """Without the audit hook, the empty network namespace makes connections fail with ENETUNREACH and name lookups
    fail to resolve: either is scored ``network_blocked``."""
    if not kernel_layers()["network_namespace"]:
        pytest.skip("no network namespace here")
    for program in ("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)",
                    "import socket\nsocket.getaddrinfo('example.com', 80)"):
        verdict = reward(audit_hook=False)("p", fenced(program), {"cases": [{"input": "", "output": ""}]})
        assert verdict.status == "network_blocked", verdict.reason


def test_program_cannot_read_the_parents_environment(monkeypatch):
    secret = "s3cret-" + os.urandom(8).hex()
    monkeypatch.setenv("ENTRORL_TEST_SECRET", secret)
    program = "import os\nprint(dict(os.environ), flush=True)\nprint(open(f'/proc/{os.getppid()}/environ').read())"
    variants = [SandboxLimits()]
    layers = kernel_layers()
    if layers["dropped_uid"] or layers["user_namespace"]:  # either keeps /proc/<parent>/environ closed
        variants.append(SandboxLimits(audit_hook=False))
    for limits in variants:
        run = run_in_sandbox(program, stdin_cases(), limits)
        assert run.outcomes[0].status == "error"  # the /proc read failed
        outputs = " ".join(outcome.stdout + (outcome.error or "") for outcome in run.outcomes)
        assert "ENTRORL_SANDBOX" in outputs  # the program did print its own environment
        assert secret not in outputs and secret not in run.stderr_tail
        assert "ENTRORL_TEST_SECRET" not in outputs


def test_the_program_cannot_find_the_tests_on_disk():
    program = "import os\nprint(sorted(os.listdir('.')))"
    run = run_in_sandbox(program, [SandboxCase("stdin", ""), SandboxCase("assert", "assert 'secret-test' != 1")])
    assert run.outcomes[0].stdout.strip() == "['case0.in', 'case0.out']"
    assert all(outcome.status == "ok" for outcome in run.outcomes)


def test_a_sandbox_that_cannot_start_raises_instead_of_scoring_zero(tmp_path):
    with pytest.raises(SandboxError, match="no-such-python"):
        run_in_sandbox("print(1)", stdin_cases(), SandboxLimits(python=str(tmp_path / "no-such-python")))
    if kernel_layers()["dropped_uid"]:  # pytest's tmp_path is private to root: a dropped uid cannot reach it
        with pytest.raises(SandboxError, match="start"):
            run_in_sandbox("print(1)", stdin_cases(), SandboxLimits(temp_dir=str(tmp_path)))
        assert os.listdir(tmp_path) == []  # the working directory was removed all the same


def test_a_background_thread_ending_the_process_fails_the_case_in_progress():
    program = textwrap.dedent(
        """
        import os, threading, time
        def end_soon():
            time.sleep(0.2)
            os._exit(0)
        if not any(t.name == "ender" for t in threading.enumerate()):
            threading.Thread(target=end_soon, name="ender", daemon=True).start()
        """
    )
    cases = [SandboxCase("assert", "assert True"), SandboxCase("assert", "import time; time.sleep(1.5)")]
    run = run_in_sandbox(program, cases, SandboxLimits(time_limit=3.0))
    assert run.outcomes[0].status == "ok"
    assert run.outcomes[1].status == "error"  # os._exit during an assert case is no pass


def test_threads_within_the_process_limit_work():
    program = fenced(
        """
        import threading
        results = []
        workers = [threading.Thread(target=results.append, args=(i,)) for i in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        print(sum(results))
        """
    )
    assert reward()("p", program, {"cases": [{"input": "", "output": "6"}]}) == 1.0


def test_closing_the_result_channel_still_times_out_without_busy_waiting():
    program = "import os, time\nfor fd in range(3, 64):\n    try:\n        os.close(fd)\n    except OSError:\n        pass\n"
    program += "time.sleep(60)"
    cpu_before = time.process_time()
    started = time.monotonic()
    run = run_in_sandbox(program, stdin_cases(), SandboxLimits(time_limit=1.0))
    assert run.outcomes[0].status == "timeout"
    assert time.monotonic() - started < 1.0 + 2.0
    assert time.process_time() - cpu_before < 0.5  # the parent waited, it did not spin


_FORGE = """
import os, stat, time
def forge(line):
    for fd in range(3, 64):
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.write(fd, b"\\n" + line + b"\\n")
        except OSError:
            pass
"""


@pytest.mark.timeout(60)  # the failures this guards against are a parent that never returns
def test_forged_result_messages_cannot_restart_cases_or_clocks():
    """The program can write to the result pipe. A forged 'start' of an earlier case followed by a crash used to make
    the parent restart from the same case for ever; forged messages every half second, with the program asleep, used to
    push the wall-clock deadline back for ever. Both now end within the run's limits."""
    restart = _FORGE + 'forge(b\'{"event": "start", "case": 0}\')\nos._exit(1)\n'
    started = time.monotonic()
    run = run_in_sandbox(restart, stdin_cases(3), SandboxLimits(time_limit=1.0))
    assert time.monotonic() - started < 20 and len(run.outcomes) == 3
    stall = _FORGE + ("for _ in range(200):\n"
                      "    forge(b'{\"event\": \"start\", \"case\": 0}')\n"
                      "    time.sleep(0.3)\n")
    started = time.monotonic()
    run = run_in_sandbox(stall, stdin_cases(1), SandboxLimits(time_limit=1.0))
    assert time.monotonic() - started < 20
    assert run.outcomes[0].status == "timeout"


def test_what_a_program_does_to_its_own_folder_does_not_break_the_sandbox(reachable_temp_dir):
    """A tree deeper than Python's recursion limit (shutil.rmtree raised RecursionError and left the folder), a
    working directory whose permissions the program took away before crashing (the next attempt could not start:
    SandboxError), and stderr's shared descriptor moved 16 MiB on and made non-appending (the next attempt's stderr
    failed): each run ends normally, the later case is scored, and nothing is left in temp_dir."""
    deep = ("import os\nif not os.path.exists('a'):\n    d = os.open('.', os.O_RDONLY)\n    for _ in range(1100):\n"
            "        os.mkdir('a', dir_fd=d)\n        n = os.open('a', os.O_RDONLY, dir_fd=d)\n        os.close(d)\n"
            "        d = n\na, b = map(int, input().split())\nprint(a + b)")
    locked = ("import os\nif not os.path.exists('case1.out'):\n    print(3, flush=True)\n    os.chmod('.', 0)\n"
              "    os._exit(1)\nprint(6)")
    stderr = ("import fcntl, os, sys\nif os.path.exists('case1.out'):\n    print('late', file=sys.stderr)\n    print(6)\n"
              "else:\n    fcntl.fcntl(2, fcntl.F_SETFL, 0)\n    os.lseek(2, 16 * 2**20, 0)\n    os._exit(3)")
    for program in (deep, locked, stderr):
        verdict = reward(temp_dir=str(reachable_temp_dir))("add", fenced(program), ADD_TESTS)
        assert verdict.cases[1][0] == "passed", verdict.reason
        assert list(reachable_temp_dir.iterdir()) == []
        if program is stderr:
            run = run_in_sandbox(program, stdin_cases(2), SandboxLimits(temp_dir=str(reachable_temp_dir)))
            assert "late" in run.stderr_tail


def test_the_stderr_tail_is_the_end_of_a_long_standard_error():
    program = "import sys\nsys.stderr.write('noise ' * 2000)\nsys.stderr.write('the last words\\n')"
    run = run_in_sandbox(program, stdin_cases(), SandboxLimits())
    assert run.stderr_tail.endswith("the last words\n") and len(run.stderr_tail) <= 2000


def test_each_case_s_standard_error_has_the_file_size_limit_to_itself():
    """0.4 MB of standard error per case, under max_file_mb = 1 MB: five cases pass, as five runs of the script
    would (one file for the whole run made the third fail with 'File too large'); the tail is the last case's."""
    cases = {"cases": [{"input": f"{i} {i}\n", "output": f"{2 * i}\n"} for i in range(5)]}
    program = fenced("import sys\na, b = map(int, input().split())\nsys.stderr.write('debug ' * 70000 + str(a))\n"
                     "print(a + b)")
    verdict = reward(max_file_mb=1)("p", program, cases)
    assert (float(verdict), verdict.status) == (1.0, "passed"), verdict.reason
    run = run_in_sandbox("import sys\nsys.stderr.write('case ' + input())", [SandboxCase("stdin", "0"),
                                                                            SandboxCase("stdin", "1")])
    assert run.stderr_tail == "case 1"
    # emptied through the harness's own copy of the descriptor: a program that sent descriptor 2 to its output keeps
    # each case's output, and one whose own sys.stderr refuses to flush (SystemExit) does not end the harness
    two = [SandboxCase("stdin", "a\n"), SandboxCase("stdin", "b\n")]
    run = run_in_sandbox("import os\nos.dup2(1, 2)\nprint(input())\n", two)
    assert [(outcome.status, outcome.stdout) for outcome in run.outcomes] == [("ok", "a\n"), ("ok", "b\n")]
    quiet = ("import sys\nclass Quiet:\n    def write(self, s): return len(s)\n"
             "    def flush(self): raise SystemExit(0)\nsys.stderr = Quiet()\nprint(input())\n")
    run = run_in_sandbox(quiet, two)
    assert [(outcome.status, outcome.stdout) for outcome in run.outcomes] == [("ok", "a\n"), ("ok", "b\n")]
    # a case that ran into the size limit leaves nothing in the next one's (the refused rest of its buffer is dropped)
    flood = ("import sys\nname = input()\nif name == 'case0':\n    for i in range(200000): sys.stderr.write(f'line-{i}\\n')\n"
             "else:\n    sys.stderr.write('case1 only')\n")
    run = run_in_sandbox(flood, [SandboxCase("stdin", "case0\n"), SandboxCase("stdin", "case1\n")],
                         SandboxLimits(max_file_mb=1))
    assert run.outcomes[1].status == "ok" and run.stderr_tail == "case1 only", (run.outcomes, run.stderr_tail[-100:])
    # descriptor 2 closed: the next case has it back
    closed = "import os, sys\nif input() == 'a':\n    os.close(2)\nelse:\n    sys.stderr.write('back')\nprint('ok')\n"
    run = run_in_sandbox(closed, [SandboxCase("stdin", "a\n"), SandboxCase("stdin", "b\n")])
    assert [outcome.status for outcome in run.outcomes] == ["ok", "ok"] and run.stderr_tail == "back", run.outcomes


def test_a_program_that_cannot_be_compiled_in_time_or_at_all_says_so():
    """Compiling runs before the first case: past the time limit that case timed out (not 'not run ... after an
    earlier case', a status no step's shares count); nested too deep for the compiler it is a syntax error, not a
    crash between cases."""
    table = "T = [" + ",".join(str(i * 7919 % 100003) for i in range(400_000)) + "]\nprint(1)"
    verdict = reward(time_limit=0.1)("p", fenced(table), {"cases": [{"input": "", "output": "1"}] * 2})
    assert verdict.status == "timeout" and verdict.status in CodeReward.statuses
    assert verdict.reason.startswith("timeout: case 0: compiling the program ran past the 0.1 s time limit"), \
        verdict.reason
    verdict = reward()("p", fenced("x = " + "1+" * 200_000 + "1\nprint(1)"), {"cases": [{"input": "", "output": "1"}]})
    assert verdict.status == "syntax_error" and "RecursionError" in verdict.reason, verdict.reason


def test_a_link_inside_the_folder_to_anywhere_is_allowed():
    """Only a link's own name is a write; what it points at is not (a link to /usr/lib inside the folder is harmless,
    since the parent never follows links)."""
    verdict = reward()("p", fenced("import os\nos.symlink('/usr/lib', 'lib')\nprint('ok')"),
                       {"cases": [{"input": "", "output": "ok"}]})
    assert verdict == 1.0, verdict.reason


def test_flooding_the_result_channel_is_cut_off():
    program = "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'x' * (8 * 1024 * 1024))\n"
    program += "    except OSError:\n        pass\nprint('done')"
    run = run_in_sandbox(program, stdin_cases(), SandboxLimits(time_limit=2.0))
    assert run.outcomes[0].status == "crashed"
    assert processes_of(run.uid, run.marker) == []


def test_calling_c_functions_through_ctypes_is_refused_but_importing_it_is_not():
    tests = {"cases": [{"input": "", "output": "ok"}]}
    assert reward()("p", fenced("import ctypes\nprint('ok')"), tests) == 1.0  # numpy, pandas, scipy, sympy import it
    verdict = reward()("p", fenced("import ctypes\nctypes.CDLL(None).getpid()\nprint('ok')"), tests)
    assert verdict == 0.0 and verdict.status == "forbidden_operation"


def test_the_modules_whose_functions_the_harness_replaced_cannot_be_imported_afresh():
    tests = {"cases": [{"input": "", "output": "ok"}]}
    verdict = reward()("p", fenced("import sys\ndel sys.modules['posix']\nimport posix\nprint('ok')"), tests)
    assert verdict == 0.0 and verdict.status == "process_limit"


def test_catching_the_refusal_does_not_hide_it():
    program = "try:\n    open('/etc/entrorl-test', 'w')\nexcept PermissionError:\n    pass\nprint('ok')"
    verdict = reward()("p", fenced(program), {"cases": [{"input": "", "output": "ok"}]})
    assert verdict == 0.0 and verdict.status == "forbidden_write"
    assert not os.path.exists("/etc/entrorl-test")


def test_isolation_report_names_the_active_layers():
    run = run_in_sandbox("print(1)", stdin_cases(), SandboxLimits())
    report = run.isolation
    assert report["audit_hook"] is True
    assert isinstance(report["network_namespace"], bool)
    assert report["no_new_privs"] is True
    assert isinstance(report["read_only_filesystem"], bool)
    assert "interpreter" in report and "user" in report and "process_limit" in report
    limits = SandboxLimits(audit_hook=False, network_namespace=False, read_only_filesystem=False)
    off = run_in_sandbox("print(1)", stdin_cases(), limits)
    assert off.outcomes[0].stdout == "1\n"
    assert off.isolation["audit_hook"] is False and off.isolation["network_namespace"] is False
    assert off.isolation["read_only_filesystem"] is False


def test_each_kernel_layer_can_be_turned_off_alone_and_is_reported_so():
    run = run_in_sandbox("print(1)", stdin_cases(), SandboxLimits(network_namespace=False))
    assert run.outcomes[0].stdout == "1\n"
    assert run.isolation["network_namespace"] is False
    assert run.isolation["read_only_filesystem"] is kernel_layers()["read_only_filesystem"]
    if os.geteuid() == 0:  # only root has privileges to drop
        run = run_in_sandbox("import os\nprint(os.getuid())", stdin_cases(), SandboxLimits(drop_privileges=False))
        assert run.uid is None and "not dropped" in run.isolation["user"]


@pytest.mark.parametrize(
    ("name", "value"),
    [("time_limit", True), ("time_limit", 86_400), ("startup_time", -1.0), ("memory_mb", 31), ("memory_mb", 64.0),
     ("max_processes", 0), ("max_file_mb", 0), ("max_open_files", 15), ("audit_hook", 1), ("drop_privileges", None),
     ("python", ""), ("temp_dir", "")],
)
def test_sandbox_limits_reject_values_out_of_range(name, value):
    with pytest.raises(ValueError, match=name):
        SandboxLimits(**{name: value})


def test_sandbox_limits_accept_their_smallest_values_and_cases_are_checked():
    SandboxLimits(memory_mb=32, max_processes=1, max_file_mb=1, max_open_files=16)
    from_numpy = SandboxLimits(memory_mb=np.int64(64), max_open_files=np.int32(20))
    assert (from_numpy.memory_mb, from_numpy.max_open_files) == (64, 20)
    assert type(from_numpy.memory_mb) is int and type(from_numpy.max_open_files) is int  # written to the child as JSON
    with pytest.raises(ValueError, match="kind"):
        SandboxCase("stdout", "")
    with pytest.raises(TypeError, match="string"):
        SandboxCase("stdin", b"1 2\n")
    with pytest.raises(TypeError, match="cases must be SandboxCase objects"):
        run_in_sandbox("print(1)", [("stdin", "")])
    with pytest.raises(TypeError, match="program must be a string, got bytes"):
        run_in_sandbox(b"print(1)", stdin_cases())
    with pytest.raises(TypeError, match="preamble must be a string, got NoneType"):
        run_in_sandbox("print(1)", stdin_cases(), preamble=None)


def test_a_code_verdict_survives_pickle_and_copy_with_everything_it_says():
    """A verdict crosses a process pool or a cache by pickling: it comes back equal, with its status, reason, counts,
    cases, sandbox layers and time (float's own pickling rebuilt it as CodeVerdict(score), without a status)."""
    import copy
    import pickle

    verdict = CodeVerdict(0.5, "wrong_answer", "wrong_answer: case 1: ...", passed=1, total=2,
                          cases=[("passed", None), ("wrong_answer", "x")], isolation={"audit_hook": True}, seconds=0.2)
    for clone in (lambda v: pickle.loads(pickle.dumps(v)), copy.copy, copy.deepcopy):
        again = clone(verdict)
        assert type(again) is CodeVerdict and again == 0.5
        assert (again.status, again.reason, again.passed, again.total, again.cases, again.isolation, again.seconds) == (
            "wrong_answer", verdict.reason, 1, 2, (("passed", None), ("wrong_answer", "x")), {"audit_hook": True}, 0.2)


def test_the_sandbox_and_code_option_defaults_are_the_documented_ones():
    """docs/rewards-code.md lists the defaults: 2 s per case, 512 MB, 16 processes, 16 MB files, 64 open files, 5 s
    to start, every isolation layer on, subprocesses off; the reward compares tokens of the last Python block."""
    limits = SandboxLimits()
    assert (limits.time_limit, limits.memory_mb, limits.max_processes, limits.max_file_mb, limits.max_open_files,
            limits.startup_time) == (2.0, 512, 16, 16, 64, 5.0)
    assert (limits.drop_privileges, limits.network_namespace, limits.read_only_filesystem, limits.audit_hook,
            limits.allow_subprocesses, limits.python, limits.temp_dir) == (True, True, True, True, False, None, None)
    options = CodeOptions()
    assert options.limits() == limits
    assert (options.compare, options.languages, options.block, options.allow_unfenced) == (
        "tokens", ("python", "py", "python3"), "last", False)


@pytest.mark.parametrize(("whose", "violations"), [("os.getpid()", []), ("os.getppid()", [("proc_read", "status")])])
def test_a_forked_child_may_read_its_own_proc_entry_but_not_its_parents(whose, violations):
    """"Another process's /proc entries" are judged from the process that reads them: a child the program forked
    (subprocesses allowed) reads its own entry freely, and its parent's (the program's) is another process's."""
    program = (f"import os\npid = os.fork()\nif pid == 0:\n    open(f'/proc/{{{whose}}}/status').read()\n    os._exit(0)\n"
               "os.waitpid(pid, 0)\nprint('ok')")
    run = run_in_sandbox(program, stdin_cases(), SandboxLimits(allow_subprocesses=True))
    assert [(kind, detail.rsplit("/", 1)[-1].strip("'")) for kind, detail in run.violations] == violations
    assert run.outcomes[0].stdout == "ok\n", run.outcomes[0]


def test_another_process_s_proc_entry_is_refused_however_its_path_is_spelled():
    """The hook judges the entry a path names, not its spelling: a doubled slash, a detour through ``self`` and a
    relative path to the parent's entry are each refused and reported, ``self`` and the program's own entry are not."""
    spellings = ["/proc//{ppid}/status", "/proc/self/../{ppid}/status", "../" * 12 + "proc/{ppid}/status",
                 "/proc/self/status", "/proc//{pid}/status"]
    program = ("import os\nfor path in %r:\n    try:\n        open(path.format(ppid=os.getppid(), pid=os.getpid())).close()\n"
               "    except PermissionError:\n        print('refused')\n    else:\n        print('read')" % spellings)
    run = run_in_sandbox(program, stdin_cases(), SandboxLimits())
    assert [kind for kind, _ in run.violations] == ["proc_read"] * 3, run.violations
    assert run.outcomes[0].stdout.split() == ["refused"] * 3 + ["read"] * 2, run.outcomes[0]


def test_the_process_limit_is_per_sandbox_uid_or_added_to_a_shared_uids_tasks(monkeypatch):
    """With a uid of its own the program gets ``max_processes``; sharing a non-root user's uid it gets that user's
    current tasks plus ``max_processes`` (RLIMIT_NPROC counts them all); as root without a uid of its own, none."""
    from entrorl.rewards import sandbox

    limits = SandboxLimits(max_processes=3)
    assert sandbox._process_limit(2_100_000_007, limits)[0] == 3
    monkeypatch.setattr(sandbox, "_count_tasks_of", lambda uid: 40)
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
    assert sandbox._process_limit(None, limits) == (43, "RLIMIT_NPROC=43 (shared uid: the user's current tasks + 3)")
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 0)
    assert sandbox._process_limit(None, limits)[0] is None


def test_a_case_output_with_a_second_hard_link_is_not_read():
    """A case's output is read only as a plain file of the program's own with no other name: one the program gave a
    second name (a hard link, which could as well have been to another file) fails its case, the later case is read."""
    program = "import os\nprint('ok', flush=True)\nif not os.path.exists('copy'):\n    os.link('case0.out', 'copy')"
    run = run_in_sandbox(program, stdin_cases(2))
    assert run.violations == []
    assert [outcome.stdout for outcome in run.outcomes] == ["", "ok\n"]


def test_the_working_directory_is_the_programs_alone_and_its_folder_only_passable():
    """Other users (another run's sandbox uid among them) can neither list nor read a run's working directory, and
    the folder above it, the parent's, can only be passed through."""
    run = run_in_sandbox("import os\nprint(oct(os.stat('.').st_mode & 0o777), oct(os.stat('..').st_mode & 0o777))",
                         stdin_cases())
    assert run.outcomes[0].stdout == "0o700 0o711\n", run.outcomes[0]


_ADD_CASES = {"cases": [{"input": f"{a} {b}\n", "output": f"{a + b}\n"} for a, b in ((1, 2), (10, -4), (5, 5), (0, 0))]}


_ONE_TWO = {"cases": [{"input": "", "output": "1\n2\n"}, {"input": "", "output": "1\n2\n"}]}


@pytest.mark.parametrize("program, tests", [
    ("input = open(0).readline\na, b = map(int, input().split())\nprint(a + b)", _ADD_CASES),
    ("import os\nout = os.fdopen(1, 'w')\na, b = map(int, input().split())\nout.write(str(a + b) + '\\n')\nout.flush()",
     _ADD_CASES),
    ("import sys\na, b = map(int, input().split())\nsys.__stdout__.write(str(a + b) + '\\n')", _ADD_CASES),
    ("import atexit\na, b = map(int, input().split())\natexit.register(print, a + b)", _ADD_CASES),
    ("import sys\nsys.__stdout__.write('1\\n')\nprint(2)", _ONE_TWO),
    ("import atexit, sys\nsys.__stdout__.write('1\\n')\natexit.register(print, 2)", _ONE_TWO),
    ("import threading, time\ndef main():\n    time.sleep(0.3)\n    print(1)\n    print(2)\nthreading.Thread(target=main).start()",
     _ONE_TWO),
    ("out = open(1, 'w')\nout.write('1\\n2\\n')", _ONE_TWO),
], ids=["a global holding stdin", "a global holding stdout", "sys.__stdout__", "an atexit handler",
        "sys.__stdout__ then print", "sys.__stdout__ then atexit", "a thread", "a file on descriptor 1 left open"])
def test_each_case_runs_and_ends_as_a_script_does(program, tests):
    """Every case of a correct program passes, its output what the script would have written in its order: a case
    ends as a script ends while its output is attached (threads waited for, exit handlers run, its objects finalised:
    a file left open on descriptor 1 flushed, one a global kept on descriptor 0 closed before the next case's
    streams take it -- collecting it later closed the new descriptor, and every other case failed), and
    sys.__stdout__ is the case's sys.stdout (one object: the order is kept)."""
    verdict = reward(compare="exact")("p", fenced(program), tests)
    assert (float(verdict), verdict.status) == (1.0, "passed"), verdict.reason


@pytest.mark.skipif(os.geteuid() != 0, reason="drop_privileges=False keeps root's uid, which the kernel lets signal the victim")
def test_a_program_cannot_signal_another_process_through_a_pidfd():
    """os.pidfd_open raises no audit event: without the refusal, signal.pidfd_send_signal on its descriptor killed any
    process the program's uid may signal (the trainer's, where the program runs as the trainer's uid)."""
    victim = subprocess.Popen(["sleep", "30"])
    try:
        program = "import os, signal\npid = int(input())\nsignal.pidfd_send_signal(os.pidfd_open(pid), signal.SIGKILL)\nprint('done')"
        verdict = reward(drop_privileges=False)("p", fenced(program), {"cases": [{"input": f"{victim.pid}\n", "output": "done\n"}]})
        time.sleep(0.2)
        assert victim.poll() is None, "the program killed a process outside the sandbox"
        assert float(verdict) == 0.0 and verdict.status == "process_limit", verdict
        own = "import os, signal\nos.close(os.pidfd_open(os.getpid()))\nprint('done')"  # its own process: allowed
        assert reward(drop_privileges=False)("p", fenced(own), {"cases": [{"input": "", "output": "done\n"}]}) == 1.0
    finally:
        victim.kill()
        victim.wait()


def test_the_pidfd_refusal_reads_the_harness_s_own_process_id():
    """A program that rebinds os.getpid (which the check read) to another process's id is still refused."""
    program = "import os\nos.getpid = lambda: 1\nos.pidfd_open(1)\nprint('done')"
    verdict = reward()("p", fenced(program), {"cases": [{"input": "", "output": "done\n"}]})
    assert float(verdict) == 0.0 and verdict.status == "process_limit", verdict


@pytest.mark.parametrize("program", [
    # an executor left running: a script's end lets its idle workers go (waiting for them hung the case)
    "from concurrent.futures import ThreadPoolExecutor\nimport sys\nexecutor = ThreadPoolExecutor(2)\n"
    "a, b = map(int, sys.stdin.readline().split())\nprint(executor.submit(lambda: a + b).result())",
    # a failed case's file on descriptor 0, freed by a collection during the next case, closed that case's input
    "import gc, sys\ngc.collect()\ndef main():\n    handle = open(0)\n    cycle = [handle]\n    cycle.append(cycle)\n"
    "    line = handle.readline()\n    if line.strip() == 'boom':\n        raise ValueError(line)\n"
    "    a, b = map(int, line.split())\n    print(a + b)\nmain()",
], ids=["an executor left unshut", "a failed case's stdin freed late"])
def test_the_end_of_a_case_does_not_hang_or_spill_into_the_next(program):
    tests = {"cases": [{"input": "boom\n", "output": "boom"}] + _ADD_CASES["cases"][:2]}
    run = run_in_sandbox(program, [SandboxCase("stdin", case["input"]) for case in tests["cases"]],
                         SandboxLimits(time_limit=2.0))
    assert [outcome.status for outcome in run.outcomes][1:] == ["ok", "ok"], run.outcomes
    assert [outcome.stdout for outcome in run.outcomes][1:] == ["3\n", "6\n"]


def test_a_program_rebinding_os_getpid_is_not_taken_for_a_forked_child():
    """The harness compared os.getpid(), which the program rebinds, with its own pid: it took itself for a forked
    child after the program ran and left, and every assert case failed."""
    program = "import os\nos.getpid = lambda: 1\ndef add(a, b):\n    return a + b"
    run = run_in_sandbox(program, [SandboxCase("assert", "assert add(1, 2) == 3"), SandboxCase("assert", "assert add(2, 2) == 4")],
                         SandboxLimits(time_limit=2.0))
    assert [outcome.status for outcome in run.outcomes] == ["ok", "ok"], run.outcomes


def test_samples_scored_at_once_get_the_verdicts_they_get_one_at_a_time():
    programs = [fenced("a, b = map(int, input().split())\nprint(a + b)"), fenced("print(0)"),
                fenced("import sys\nsys.exit(3)"), "no code here", fenced("print(3)")]
    completions = programs * 2
    one_at_a_time = RewardRunner(reward(workers=1))(["p"] * 10, completions, [ADD_TESTS] * 10)
    at_once = RewardRunner(reward(workers=4))(["p"] * 10, completions, [ADD_TESTS] * 10)
    assert at_once.scores.tolist() == one_at_a_time.scores.tolist() == [1.0, 0.0, 0.0, 0.0, 0.5] * 2
    assert at_once.reasons == one_at_a_time.reasons
