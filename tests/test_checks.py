"""The integer check every layer uses for counts, sizes and seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from entrorl._checks import check_int, did_you_mean


@pytest.mark.parametrize("value", [3, np.int64(3), np.int8(3), np.uint16(3), np.array(3), torch.tensor(3),
                                   torch.tensor(3, dtype=torch.int16)])
def test_python_and_numpy_integers_and_single_integer_tensors_are_taken_as_python_ints(value):
    checked = check_int(value, "size", minimum=1)
    assert checked == 3 and type(checked) is int


@pytest.mark.parametrize("value", [True, False, np.bool_(True), torch.tensor(True), 3.0, np.float64(3.0),
                                   torch.tensor(3.0), torch.tensor([3]), np.array([3]), "3", None, 2.5, float("nan")])
def test_booleans_floats_text_and_tensors_of_a_dimension_are_not_integers(value):
    with pytest.raises(ValueError, match=r"^size must be an integer, got "):
        check_int(value, "size")


@pytest.mark.parametrize(("minimum", "bad", "message"), [
    (0, -1, "seed must be a non-negative integer, got -1"),
    (1, 0, "seed must be a positive integer, got 0"),
    (2, 1, "seed must be an integer >= 2, got 1"),
    (-3, -4, "seed must be an integer >= -3, got -4"),
    (None, "x", "seed must be an integer, got 'x'"),
])
def test_a_value_below_the_minimum_is_refused_naming_the_bound(minimum, bad, message):
    with pytest.raises(ValueError) as raised:
        check_int(bad, "seed", minimum=minimum)
    assert str(raised.value) == message


@pytest.mark.parametrize("minimum", [0, 1, 2])
def test_the_minimum_itself_is_accepted(minimum):
    assert check_int(minimum, "n", minimum=minimum) == minimum
    assert check_int(-(10**30), "n") == -(10**30)


def test_an_empty_sequence_becomes_an_empty_integer_tensor_python_floats_stay_float64_and_a_tensor_is_as_given():
    from entrorl._checks import as_tensor

    for empty in ([], (), np.array([])):
        converted = as_tensor(empty)
        assert converted.dtype == torch.int64 and converted.shape == (0,)
    assert as_tensor([3, 4]).tolist() == [3, 4] and as_tensor([3, 4]).dtype == torch.int64
    assert as_tensor([1.0, 1.0 + 1e-12]).dtype == torch.float64 and as_tensor([1.0, 1.0 + 1e-12]).unique().numel() == 2
    assert as_tensor([True, False]).dtype == torch.bool
    given = torch.zeros(0)
    assert as_tensor(given) is given


def test_a_real_number_is_any_real_but_not_a_boolean():
    from fractions import Fraction

    from entrorl._checks import is_real_number

    assert all(is_real_number(v) for v in (0, 1.5, np.int64(3), np.float32(0.5), Fraction(1, 3), float("nan")))
    assert not any(is_real_number(v) for v in (True, np.bool_(False), "0.5", None, 1j, [1.0], torch.tensor(1.0)))


def test_did_you_mean_names_the_nearest_choice_or_nothing():
    assert did_you_mean("clipb", ["clip_b", "clip_cov", "grpo"]) == "did you mean 'clip_b'? "
    assert did_you_mean("zzz", ["clip_b", "grpo"]) == ""
    assert did_you_mean("grpoo", iter(["grpo"])) == "did you mean 'grpo'? "  # any iterable of names
    assert did_you_mean("GRPO", ["clip_b", "grpo"]) == "did you mean 'grpo'? "  # letter case aside
    assert did_you_mean("Clip_B", ["Clip_b", "clip_b"]) == "did you mean 'Clip_b'? "


def test_visible_controls_writes_what_would_drive_a_terminal_as_escapes():
    """Escape sequences, carriage returns, NUL, DEL, C1 controls and bidirectional overrides become their escapes;
    tab, newline and every other character (accents, CJK, emoji, markup) stay as they are."""
    from entrorl._checks import visible_controls

    assert visible_controls("\x1b[2J\x1b]0;t\x07 a\rb\x00\x7f\x85 \u202eevil\u2066") == (
        "\\x1b[2J\\x1b]0;t\\x07 a\\rb\\x00\\x7f\\x85 \\u202eevil\\u2066")
    kept = "tab\tline\nçé 中文 😀 [b]x</td>"
    assert visible_controls(kept) == kept


@pytest.mark.parametrize("flag", [True, np.bool_(True), torch.tensor(True), torch.tensor([True]), np.array(True)])
def test_a_boolean_of_any_kind_is_refused_for_a_number(flag):
    from entrorl._checks import refuse_booleans_for_numbers

    with pytest.raises(ValueError, match="expected a number, not a boolean"):
        refuse_booleans_for_numbers(flag, float | None)
    assert refuse_booleans_for_numbers(flag, bool | float) is flag  # a setting that takes a switch


@pytest.mark.parametrize("array", [torch.tensor([2.0]), np.array([2.0]), torch.ones(1, 1)])
def test_a_one_element_array_is_refused_for_one_number_as_numpy_and_torch_alike(array):
    """pydantic reads a one-element tensor of any shape as its number but refuses a numpy array."""
    from entrorl._checks import refuse_booleans_for_numbers

    with pytest.raises(ValueError, match=r"expected one number, not an array of shape \["):
        refuse_booleans_for_numbers(array, float)
    scalar = torch.tensor(2.0)
    assert refuse_booleans_for_numbers(scalar, float) is scalar


@pytest.mark.parametrize("value", [3 + 0j, np.complex128(3 + 4j), torch.tensor(2 + 1j)])
def test_a_complex_number_is_refused_for_a_real_one(value):
    """numpy's and torch's complex numbers read as floats without their imaginary part (and a warning at most)."""
    from entrorl._checks import refuse_booleans_for_numbers

    with pytest.raises(ValueError, match="expected a real number, not a complex one"):
        refuse_booleans_for_numbers(value, float | None)
    with pytest.raises(ValueError, match="expected real numbers, not booleans or complex numbers"):
        refuse_booleans_for_numbers((value, 0.999), tuple[float, float])  # AdamW's betas



@pytest.mark.parametrize(("variables", "source"), [
    ({"WORLD_SIZE": "4", "RANK": "1"}, "WORLD_SIZE=4, as torchrun or accelerate launch sets it"),
    ({"WORLD_SIZE": "4", "LOCAL_RANK": "0"}, "WORLD_SIZE=4, as torchrun or accelerate launch sets it"),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "OMPI_COMM_WORLD_SIZE=4, as mpirun sets it"),  # Open MPI
    ({"PMI_SIZE": "4"}, "PMI_SIZE=4, as mpirun sets it"),  # MPICH, Intel MPI
    ({"MV2_COMM_WORLD_SIZE": "4", "PMI_SIZE": "2"}, "MV2_COMM_WORLD_SIZE=4, as mpirun sets it"),  # the largest count
])
def test_a_launch_of_several_processes_is_refused_naming_the_count_its_source_and_the_integrations(
        monkeypatch, variables, source):
    from entrorl._checks import refuse_multi_process_launch

    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as refused:
        refuse_multi_process_launch("entrorl train")
    assert str(refused.value) == (
        f"entrorl train runs in one process, but this one was started as one of 4 ({source}): each would do all the "
        "work on its own, into the same outputs. Run it without the launcher; to train on several GPUs or machines, "
        "use the verl or TRL integration (docs/verl.md, docs/trl.md)")


@pytest.mark.parametrize("variables", [{}, {"WORLD_SIZE": "1", "RANK": "0"}, {"WORLD_SIZE": "", "RANK": "0"},
                                       {"WORLD_SIZE": "auto", "RANK": "0"}, {"PMI_SIZE": "1"},
                                       {"WORLD_SIZE": "4"}])  # the last: a WORLD_SIZE left in the shell, no launcher
def test_one_process_or_counts_no_launcher_wrote_are_let_through(monkeypatch, variables):
    from entrorl._checks import _LAUNCHER_SIZES, refuse_multi_process_launch

    for name in [variable for variable, _ in _LAUNCHER_SIZES] + ["RANK", "LOCAL_RANK"]:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    refuse_multi_process_launch("entrorl train")


@pytest.mark.parametrize("processes", [1, 2])
def test_an_open_process_group_counts_over_the_environment_and_is_named(monkeypatch, processes):
    """A script that opened its own process group (``torch.distributed.init_process_group``) is refused by the group's
    size, whatever the environment says, and the message names the group."""
    from entrorl._checks import refuse_multi_process_launch

    monkeypatch.setenv("WORLD_SIZE", "1" if processes > 1 else "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: processes)
    if processes == 1:
        refuse_multi_process_launch("the laboratory")
    else:
        with pytest.raises(ValueError, match=r"^the laboratory runs in one process, but this one was started as one "
                                             r"of 2 \(an open torch.distributed process group\): "):
            refuse_multi_process_launch("the laboratory")
