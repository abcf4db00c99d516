"""Keeping freed CPU memory for reuse: blocks glibc would map and unmap stay in the heap, a training-like loop
never hands memory back to the kernel once the setting is applied, and the trainer applies it only when its
config asks for it.

What this saves in page faults and time is measured by ``benchmarks/bench_update.py``: the fault counts of a run
swing by several times from one process to the next (glibc's thresholds adapt to the allocation history, and
torch's is not the same in every run), so they are no unit test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from entrorl.trainer import allocator

# mallinfo2 (glibc >= 2.33): "arena" is the heap taken with brk, "hblks" / "hblkhd" the blocks served with mmap
# (the 1 MiB probe runs before torch is imported: glibc's defaults raise the mmap threshold to the size of each mapped
# block freed, and importing torch frees blocks of almost 1 MiB; so the allocator module is loaded from its file, without
# the entrorl package, which imports torch)
HEAP_OF_A_TRAINING_LOOP = textwrap.dedent("""
    import ctypes, importlib.util, json, os, sys
    if sys.argv[1] == "retain":
        package = importlib.util.find_spec("entrorl")
        path = os.path.join(os.path.dirname(package.origin), "trainer", "allocator.py")
        spec = importlib.util.spec_from_file_location("allocator_alone", path)
        allocator = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(allocator)
        assert allocator.retain_freed_memory()
        assert "torch" not in sys.modules

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                          "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def held():  # bytes glibc holds from the kernel
        info = libc.mallinfo2()
        return info.arena + info.hblkhd

    mapped_before = libc.mallinfo2().hblks
    block = libc.malloc(1 << 20)
    one_mib_block_mapped = libc.mallinfo2().hblks > mapped_before
    libc.free(block)

    import torch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(64, 40, 64, requires_grad=True)
    up, down = torch.randn(256, 64, requires_grad=True), torch.randn(64, 256, requires_grad=True)

    def step():  # activations and gradients of a few hundred KiB to a few MiB, allocated and freed every step
        h = x
        for _ in range(4):
            h = h + torch.nn.functional.linear(torch.nn.functional.silu(torch.nn.functional.linear(h, up)), down)
        loss = h.square().mean()
        with_activations = held()
        loss.backward()
        return with_activations

    for _ in range(3):
        step()
    handed_back = []
    for _ in range(20):
        with_activations = step()
        handed_back.append(with_activations - held())
    print(json.dumps({"one_mib_block_mapped": one_mib_block_mapped, "handed_back": handed_back}))
""")


def heap_of_a_training_loop(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", HEAP_OF_A_TRAINING_LOOP, mode], capture_output=True, text=True,
                          timeout=120, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def glibc_version() -> tuple[int, ...]:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, OSError, ValueError):
        return ()
    return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else ()


@pytest.mark.skipif(glibc_version() < (2, 33), reason="glibc's mallopt and mallinfo2 (glibc >= 2.33)")
def test_retained_memory_is_never_handed_back_to_the_kernel():
    system, retained = heap_of_a_training_loop("system"), heap_of_a_training_loop("retain")
    # with glibc's defaults a 1 MiB block is mapped on its own (and unmapped when freed); kept, it comes from the heap
    assert system["one_mib_block_mapped"] and not retained["one_mib_block_mapped"]
    # after the backward pass the memory of the freed activations stays in the process for the next step
    assert max(retained["handed_back"]) <= 0, retained["handed_back"]


def test_bad_thresholds_are_refused():
    with pytest.raises(ValueError, match="mmap_threshold"):
        allocator.retain_freed_memory(mmap_threshold=allocator.MMAP_THRESHOLD_MAX + 1)
    with pytest.raises(ValueError, match="trim_threshold"):
        allocator.retain_freed_memory(trim_threshold=0)
    with pytest.raises(ValueError, match="mmap_threshold"):
        allocator.retain_freed_memory(mmap_threshold=0)
    with pytest.raises(ValueError, match="mmap_threshold"):  # glibc's largest on 64-bit systems: HEAP_MAX_SIZE / 2
        allocator.retain_freed_memory(mmap_threshold=32 * 1024 * 1024 + 1)


class FakeLibc:
    """A C library whose ``mallopt`` records its calls and answers ``answer(parameter)``; ``glibc``: whether it has
    glibc's ``gnu_get_libc_version``."""

    def __init__(self, glibc: bool = True, answer=lambda parameter: 1):
        self.calls = []

        def mallopt(parameter, value):
            self.calls.append((parameter, value))
            return answer(parameter)

        self.mallopt = mallopt
        if glibc:
            self.gnu_get_libc_version = lambda: b"2.36"


@pytest.fixture
def fake_libc(monkeypatch):
    """Installs a :class:`FakeLibc` built with the given options in place of the process's C library, with no
    setting applied yet."""
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setattr(allocator.sys, "platform", "linux")

    def install(**options) -> FakeLibc:
        libc = FakeLibc(**options)
        monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: libc)
        return libc

    return install


def test_both_glibc_parameters_are_set_once_with_the_trim_threshold_kept_within_an_int(fake_libc):
    """M_MMAP_THRESHOLD is -3 and M_TRIM_THRESHOLD -1 (malloc.h); mallopt takes a C int, so a larger trim threshold is
    passed as the largest int; calling again with the same values does nothing more, with others sets them."""
    libc = fake_libc()
    assert allocator.retain_freed_memory(mmap_threshold=1 << 20, trim_threshold=1 << 40)
    assert libc.calls == [(-3, 1 << 20), (-1, 2**31 - 1)]
    assert allocator.retain_freed_memory(mmap_threshold=1 << 20, trim_threshold=1 << 40)
    assert len(libc.calls) == 2
    assert allocator.retain_freed_memory()  # the defaults: the largest mmap threshold, 1 GiB kept
    assert libc.calls[2:] == [(-3, 32 * 1024 * 1024), (-1, 1 << 30)]


@pytest.mark.parametrize("refused", [-3, -1], ids=["mmap-threshold-refused", "trim-threshold-refused"])
def test_a_refused_setting_is_reported_and_not_remembered_as_applied(fake_libc, refused):
    libc = fake_libc(answer=lambda parameter: 0 if parameter == refused else 1)
    assert allocator.retain_freed_memory() is False
    assert allocator._applied is None
    asked = len(libc.calls)
    assert allocator.retain_freed_memory() is False and len(libc.calls) == 2 * asked  # asked again, not taken as done


def test_other_c_libraries_and_systems_are_left_alone(fake_libc, monkeypatch):
    """A C library without glibc's version function (musl) and a system other than Linux: False, no mallopt call."""
    musl = fake_libc(glibc=False)
    assert allocator.retain_freed_memory() is False
    assert musl.calls == [] and allocator._applied is None
    linux_libc = fake_libc()
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.retain_freed_memory() is False
    assert linux_libc.calls == [] and allocator._applied is None


@pytest.mark.parametrize(("retain", "applied"), [(True, True), (False, False), (None, True)])  # None: on the CPU, yes
def test_trainer_applies_the_setting_only_when_asked(tmp_path, tiny_model_dir, arithmetic_files, monkeypatch, retain, applied):
    from entrorl.trainer import Trainer, load_config, loop

    calls = []
    monkeypatch.setattr(loop, "retain_freed_memory", lambda: calls.append(True) or True)
    train, _ = arithmetic_files
    config = load_config({"model": {"path": str(tiny_model_dir), "device": "cpu"}, "data": {"train": str(train)},
                          "reward": {"name": "exact_match"}, "rollout": {"max_new_tokens": 6},
                          "retain_freed_memory": retain,
                          "logging": {"progress": False}})
    Trainer(config, run_dir=tmp_path / "run")
    assert calls == ([True] if applied else [])


class _StopAfterTheAllocatorSetting(Exception):
    pass


@pytest.mark.parametrize(("retain", "applied"), [(True, True), (False, False), (None, False)])  # None: on a GPU, no
def test_trainer_on_a_gpu_keeps_glibcs_defaults_unless_asked(tmp_path, tiny_model_dir, arithmetic_files, monkeypatch,
                                                             retain, applied):
    """Training on a GPU leaves the CPU allocator alone by default; retain_freed_memory: true applies it there too."""
    import torch

    from entrorl.trainer import load_config, loop

    calls = []
    monkeypatch.setattr(loop, "retain_freed_memory", lambda: calls.append(True) or True)
    monkeypatch.setattr(loop, "resolve_device", lambda name: torch.device("cuda"))

    def stop(run_dir):  # the setting is decided before the run directory is checked: no model needs to load
        raise _StopAfterTheAllocatorSetting

    monkeypatch.setattr(loop, "check_run_directory_writable", stop)
    train, _ = arithmetic_files
    config = load_config({"model": {"path": str(tiny_model_dir), "device": "cpu"}, "data": {"train": str(train)},
                          "reward": {"name": "exact_match"}, "rollout": {"max_new_tokens": 6},
                          "retain_freed_memory": retain, "logging": {"progress": False}})
    with pytest.raises(_StopAfterTheAllocatorSetting):
        loop.Trainer(config, run_dir=tmp_path / "run")
    assert calls == ([True] if applied else [])


def test_a_c_library_that_cannot_be_loaded_is_left_alone(fake_libc, monkeypatch):
    """ctypes cannot open the C library: False, nothing remembered as applied, no error."""
    fake_libc()

    def cannot_open(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(allocator.ctypes, "CDLL", cannot_open)
    assert allocator.retain_freed_memory() is False
    assert allocator._applied is None


@pytest.mark.parametrize(("found", "opened"), [("libc.so.6.1", "libc.so.6.1"), (None, "libc.so.6")])
def test_the_c_library_opened_is_the_one_the_system_names(fake_libc, monkeypatch, found, opened):
    """The C library's file is what ctypes.util.find_library("c") names (libc.so.6.1 on some systems), libc.so.6
    when it names none."""
    libc = fake_libc()
    names = []
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: names.append(name) or libc)
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: found if name == "c" else None)
    assert allocator.retain_freed_memory()
    assert names == [opened] and len(libc.calls) == 2


def test_a_refused_trim_threshold_leaves_no_setting_taken_for_applied(monkeypatch):
    """The mmap threshold is set, then the trim threshold refused: the call returns False, and asking again for the
    values applied before sets them again (the mmap threshold had changed meanwhile), instead of taking them as set."""
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    refuse_trim = [False]
    libc = FakeLibc(answer=lambda parameter: 0 if refuse_trim[0] and parameter == -1 else 1)
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: libc)
    assert allocator.retain_freed_memory(1 << 20, 1 << 20)
    refuse_trim[0] = True
    assert allocator.retain_freed_memory(2 << 20, 1 << 21) is False
    assert libc.calls[-2:] == [(-3, 2 << 20), (-1, 1 << 21)]
    refuse_trim[0] = False
    before = len(libc.calls)
    assert allocator.retain_freed_memory(1 << 20, 1 << 20)
    assert libc.calls[before:] == [(-3, 1 << 20), (-1, 1 << 20)]
