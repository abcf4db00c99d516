"""entrorl._files: what an output path names (a file, a link, a device, a descriptor) and how it is written."""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import typer

from entrorl._files import put_in_place_together, write_atomically, write_folder_atomically, written_in_place
from entrorl.cli import _said_when_interrupted, _stop_signals_as_interrupt, _Terminated
from entrorl.data.loading import check_output_file


def _waiting(read_end: int) -> bytes:
    """What the pipe holds now, without waiting for more."""
    os.set_blocking(read_end, False)
    try:
        return os.read(read_end, 65536)
    except BlockingIOError:
        return b""


@pytest.fixture
def pipe():
    read_end, write_end = os.pipe()
    yield read_end, write_end
    for end in (read_end, write_end):
        os.close(end)


@pytest.mark.parametrize("spelling", ["0{n}", "{arabic_indic}", "\u00b2", "9" * 20])
def test_descriptor_names_the_kernel_does_not_have_are_refused_and_nothing_is_written(pipe, spelling):
    """/dev/fd/01 or /dev/fd/<digits of another script> name no descriptor: an OSError naming the path, as open()
    gives, and nothing reaches the descriptor whose number they spell."""
    read_end, write_end = pipe
    name = spelling.format(n=write_end, arabic_indic="".join(chr(0x0660 + int(d)) for d in str(write_end)))
    path = f"/dev/fd/{name}"
    with pytest.raises(OSError) as refused:
        write_atomically(path, lambda handle: handle.write(b"lost"))
    assert refused.value.filename == path
    assert _waiting(read_end) == b""


def test_a_descriptor_open_for_reading_is_opened_anew_for_writing(pipe):
    """/dev/fd/N of a pipe's reading end: check_output_file accepts it, so the write must go through (the descriptor
    itself cannot be written; the pipe opened for writing can)."""
    read_end, _ = pipe
    path = f"/dev/fd/{read_end}"
    assert written_in_place(path)
    check_output_file(path, what="--out")
    write_atomically(path, lambda handle: handle.write(b"summary"))
    assert _waiting(read_end) == b"summary"


def test_a_descriptor_open_for_writing_is_written_through_itself(pipe):
    read_end, write_end = pipe
    write_atomically(f"/proc/self/fd/{write_end}", lambda handle: handle.write(b"one "))
    write_atomically(f"/dev/fd/{write_end}", lambda handle: handle.write(b"two"))
    os.write(write_end, b" three")  # the descriptor's own writes follow
    assert _waiting(read_end) == b"one two three"


def test_a_regular_file_is_replaced_with_its_permission_bits_kept(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")
    target.chmod(0o640)
    assert not written_in_place(target)
    write_atomically(target, lambda handle: handle.write(b"new"))
    assert target.read_text() == "new" and (target.stat().st_mode & 0o777) == 0o640
    with pytest.raises(ZeroDivisionError):  # any failure: the old content stays, no temporary file is left
        write_atomically(target, lambda handle: handle.write(b"half") and 1 / 0)
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_folder_written_atomically_replaces_the_old_one_or_leaves_it(tmp_path):
    """write_folder_atomically: the new folder replaces the old one whole (no file of the old one left); a write that
    fails or is interrupted leaves the old folder as it was and no temporary folder; a link is followed."""
    target = tmp_path / "copy"
    target.mkdir()
    (target / "old.txt").write_text("old")

    def write_new(folder):
        folder.mkdir()
        (folder / "new.txt").write_text("new")

    write_folder_atomically(target, write_new)
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]

    def interrupted(folder):
        write_new(folder)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_folder_atomically(target, interrupted)
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["copy"]

    def failing(folder):
        folder.mkdir()
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="copy"):
        write_folder_atomically(target, failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]
    link = tmp_path / "link"
    link.symlink_to(target)
    write_folder_atomically(link, lambda folder: (folder.mkdir(), (folder / "third.txt").write_text("3")))
    assert link.is_symlink() and sorted(p.name for p in target.iterdir()) == ["third.txt"]


def test_a_folder_write_stopped_between_its_two_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    """A Ctrl-C after the old folder was moved aside and before the new one took its place: the old one is back."""
    import entrorl._files as files

    target = tmp_path / "copy"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_replace, calls = os.replace, []

    def interrupted_second_rename(source, destination):
        calls.append(source)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(source, destination)

    monkeypatch.setattr(files.os, "replace", interrupted_second_rename)
    with pytest.raises(KeyboardInterrupt):
        write_folder_atomically(target, lambda folder: (folder.mkdir(), (folder / "new.txt").write_text("new")))
    monkeypatch.undo()
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


def _folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "data.arrow").write_text(text)
    return path


def _visible(out: Path) -> dict[str, str]:
    """The visible entries of ``out``: a file's text, a folder's data.arrow's text."""
    return {p.name: (p / "data.arrow").read_text() if p.is_dir() else p.read_text()
            for p in sorted(out.iterdir()) if not p.name.startswith(".")}


def test_a_leftover_aside_folder_of_an_earlier_process_with_the_same_pid_does_not_fail_the_set(tmp_path):
    """A `.NAME.old-PID-N` an interrupted set left (its slow removal cut short) in a process of the same id (a
    container's PID 1 on a mounted folder) is removed before the name is used again: os.replace cannot rename a
    folder over a non-empty one."""
    out, staging = tmp_path / "out", tmp_path / "out" / ".staging"
    _folder(out / "ds.filtered", "old")
    _folder(staging / "ds.filtered", "new")
    (out / "summary.json").write_text("old")
    (staging / "summary.json").write_text("new")
    _folder(out / f".ds.filtered.old-{os.getpid()}-0", "left by an interrupted audit")
    put_in_place_together(staging, out, ["ds.filtered", "summary.json"])
    assert _visible(out) == {"ds.filtered": "new", "summary.json": "new"}


def test_a_leftover_new_folder_of_an_earlier_rollback_does_not_leave_one_file_of_each_set(tmp_path):
    """A `.NAME.new-PID-N` an earlier rollback left is removed before a rollback of a process of the same id uses the
    name: the earlier set comes back whole, not the new folder beside the earlier set's other files."""
    out, staging = tmp_path / "out", tmp_path / "out" / ".staging"
    _folder(out / "ds.filtered", "old")
    _folder(staging / "ds.filtered", "new")
    (out / "summary.json").write_text("old")
    # summary.json is not staged: putting it in place fails after ds.filtered went in
    _folder(out / f".ds.filtered.new-{os.getpid()}-1", "left by an earlier rollback")
    with pytest.raises(OSError):
        put_in_place_together(staging, out, ["ds.filtered", "summary.json"])
    assert _visible(out) == {"ds.filtered": "old", "summary.json": "old"}


def _two_files_old_and_new(tmp_path: Path) -> tuple[Path, Path]:
    """``out`` holding "old a.json" and "old b.json", ``staging`` inside it the new set's."""
    out, staging = tmp_path / "out", tmp_path / "out" / ".staging"
    staging.mkdir(parents=True)
    for name in ("a.json", "b.json"):
        (out / name).write_text(f"old {name}")
        (staging / name).write_text(f"new {name}")
    return out, staging


def _failing_replace(staging: Path, state: dict, *, failing_name: str = "b.json", ctrl_c_in_rollback: bool = False,
                     sigterm_in_rollback: bool = False):
    """An os.replace that fails (a full disk) when ``failing_name`` goes in, setting ``state["rollback"]``, and, once the
    rollback renames, sends the signals asked for."""
    replace = os.replace

    def failing(source, destination, *args, **kwargs):
        if os.fspath(source) == os.fspath(staging / failing_name):
            state["rollback"] = True
            raise OSError(errno.ENOSPC, "No space left on device")  # the set fails: rollback
        if state.get("rollback") and ".new-" in os.path.basename(os.fspath(destination)) and not state.get("renamed"):
            state["renamed"] = True
            if ctrl_c_in_rollback:
                os.kill(os.getpid(), signal.SIGINT)  # noted
            if sigterm_in_rollback:
                os.kill(os.getpid(), signal.SIGTERM)  # noted
        return replace(source, destination, *args, **kwargs)

    return failing


def test_a_second_interrupt_during_the_rollback_renames_leaves_the_earlier_set_whole(tmp_path, monkeypatch):
    """An exception during the rollback's renames (raised by a rename itself here) does not stop them: every entry is
    put back, then it is raised."""
    out, staging = _two_files_old_and_new(tmp_path)
    replace, fired = os.replace, []

    def interrupts(src, dst, *args, **kwargs):
        dst_name = os.path.basename(os.fspath(dst))
        if not fired and os.fspath(src) == os.fspath(staging / "b.json"):
            fired.append("first")
            raise KeyboardInterrupt  # Ctrl-C while the set goes in
        if fired == ["first"] and ".new-" in dst_name:
            fired.append("second")
            raise KeyboardInterrupt  # Ctrl-C again while it is undone
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", interrupts)
    with pytest.raises(KeyboardInterrupt):
        put_in_place_together(staging, out, ["a.json", "b.json"])
    monkeypatch.undo()
    assert fired == ["first", "second"]
    assert _visible(out) == {"a.json": "old a.json", "b.json": "old b.json"}


def test_failing_to_remove_what_was_moved_aside_does_not_fail_a_set_that_is_in_place(tmp_path, monkeypatch):
    """Once the whole set is in, removing what was moved aside is tidying: an OSError there (a file busy on NFS, a
    read-only subfolder of the earlier data set copy) is a warning, and the set stands."""
    out, staging = tmp_path / "out", tmp_path / "out" / ".staging"
    _folder(out / "ds.filtered", "old")
    _folder(staging / "ds.filtered", "new")
    (out / "summary.json").write_text("old")
    (staging / "summary.json").write_text("new")
    rmtree = shutil.rmtree

    def busy(path, *args, **kwargs):
        if ".old-" in os.path.basename(os.fspath(path)):
            raise OSError(errno.EBUSY, "Device or resource busy", os.fspath(path))
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", busy)
    with pytest.warns(UserWarning, match="could not remove .*ds.filtered.old-.*Device or resource busy"):
        put_in_place_together(staging, out, ["ds.filtered", "summary.json"])
    monkeypatch.undo()
    assert _visible(out) == {"ds.filtered": "new", "summary.json": "new"}


@pytest.fixture
def sigint_raises():
    """SIGINT raising KeyboardInterrupt, as in an interactive process, for the test's length (a process started in the
    background of a non-interactive shell, a CI job's, begins with SIGINT ignored, and Python keeps it so); SIGTERM's
    handler, which a test may change, put back after it."""
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    for number, handler in before.items():
        signal.signal(number, handler if handler is not None else signal.SIG_DFL)


def test_a_sigint_during_the_rollback_renames_is_held_in_a_process_with_another_thread(tmp_path, monkeypatch, sigint_raises):
    """A real SIGINT (the user's second Ctrl-C) during the rollback's renames, in a process with another thread (torch's,
    a progress bar's: the kernel may hand the signal to any of them), waits until the renames are done: the earlier set
    is whole, then the KeyboardInterrupt comes."""
    out, staging = _two_files_old_and_new(tmp_path)
    names = ["a.json", "b.json", "c.json"]
    (out / "c.json").write_text("old c.json")
    (staging / "c.json").write_text("new c.json")

    other = threading.Event()
    helper = threading.Thread(target=other.wait, daemon=True)  # any other thread of the process
    helper.start()

    exists, state = pathlib.Path.exists, {"rollback": False, "asides": 0, "sent": False}

    def exists_then_signal(self, *args, **kwargs):
        result = exists(self, *args, **kwargs)
        if state["rollback"] and ".old-" in self.name and not state["sent"]:
            state["asides"] += 1
            if state["asides"] == 2:  # the rollback has put c.json back; b.json and a.json are next
                state["sent"] = True
                os.kill(os.getpid(), signal.SIGINT)  # the user's second Ctrl-C, a real signal
                end = time.monotonic() + 0.5
                while time.monotonic() < end:  # held: nothing happens here
                    pass
        return result

    monkeypatch.setattr(os, "replace", _failing_replace(staging, state, failing_name="c.json"))
    monkeypatch.setattr(pathlib.Path, "exists", exists_then_signal)
    try:
        with pytest.raises(KeyboardInterrupt):
            put_in_place_together(staging, out, names)
    finally:
        monkeypatch.undo()
        other.set()
    assert state["sent"]
    assert _visible(out) == {name: f"old {name}" for name in names}


def test_a_signal_while_the_handlers_are_put_back_does_not_leave_the_noting_handler_installed(tmp_path, monkeypatch, sigint_raises):
    """A Ctrl-C arriving while the handlers are put back (right after SIGINT's) does not stop the putting back:
    SIGTERM gets its own handler again, not the one that only notes signals."""
    out, staging = _two_files_old_and_new(tmp_path)
    sigterm_before = signal.getsignal(signal.SIGTERM)
    real_signal = signal.signal
    state = {"rollback": False, "sent": False}

    def signal_then_ctrl_c(number, handler):
        previous = real_signal(number, handler)
        if state["rollback"] and number == signal.SIGINT and handler is signal.default_int_handler \
                and not state["sent"]:  # SIGINT's handler was just put back: the user presses Ctrl-C now
            state["sent"] = True
            os.kill(os.getpid(), signal.SIGINT)
        return previous

    monkeypatch.setattr(os, "replace", _failing_replace(staging, state))
    monkeypatch.setattr(signal, "signal", signal_then_ctrl_c)
    try:
        with pytest.raises((KeyboardInterrupt, OSError)):
            put_in_place_together(staging, out, ["a.json", "b.json"])
    finally:
        monkeypatch.undo()
        left = signal.getsignal(signal.SIGTERM)
    assert state["sent"]
    assert left == sigterm_before, f"SIGTERM's handler left as {left!r} (notes the signal, never acts on it)"


def test_a_ctrl_c_while_the_rollback_swaps_in_its_noting_handlers_does_not_skip_the_rollback(tmp_path, monkeypatch, sigint_raises):
    """A second Ctrl-C that arrives while the rollback installs its noting handlers (after SIGINT's handler is read,
    before it is replaced) does not skip the rollback: the earlier set is whole, then the KeyboardInterrupt comes."""
    out, staging = _two_files_old_and_new(tmp_path)
    real_getsignal = signal.getsignal
    state = {"rollback": False, "sent": False}

    def getsignal_then_ctrl_c(number):
        handler = real_getsignal(number)
        if state["rollback"] and number == signal.SIGINT and not state["sent"]:
            state["sent"] = True  # the user presses Ctrl-C again just as the rollback starts holding signals
            os.kill(os.getpid(), signal.SIGINT)
        return handler

    monkeypatch.setattr(os, "replace", _failing_replace(staging, state))
    monkeypatch.setattr(signal, "getsignal", getsignal_then_ctrl_c)
    try:
        with pytest.raises((KeyboardInterrupt, OSError)):
            put_in_place_together(staging, out, ["a.json", "b.json"])
    finally:
        monkeypatch.undo()
    assert state["sent"]
    assert _visible(out) == {"a.json": "old a.json", "b.json": "old b.json"}, _visible(out)


_BOTH_SIGNALS = textwrap.dedent("""
    import contextlib, errno, os, signal, sys
    from pathlib import Path
    import typer
    import entrorl._files as files
    from entrorl.cli import _said_when_interrupted
    out, staging = Path(sys.argv[1]) / "out", Path(sys.argv[1]) / "out" / ".staging"
    replace, sent = os.replace, []
    def failing_then_signalled(source, destination, *args, **kwargs):
        if os.fspath(source) == os.fspath(staging / "b.json"):
            raise OSError(errno.ENOSPC, "No space left on device")  # the set fails: rollback
        if ".new-" in os.path.basename(os.fspath(destination)) and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)   # the user's Ctrl-C ...
            os.kill(os.getpid(), signal.SIGTERM)  # ... and the job scheduler's SIGTERM, both during the rollback
        return replace(source, destination, *args, **kwargs)
    os.replace = failing_then_signalled
    in_the_cli = sys.argv[2] == "cli"  # SIGTERM raising the CLI's _Terminated, else its default action
    try:
        with _said_when_interrupted("while writing") if in_the_cli else contextlib.nullcontext():
            files.put_in_place_together(staging, out, ["a.json", "b.json"])
    except typer.Exit as done:
        print("EXIT", done.exit_code, flush=True)
        sys.exit(done.exit_code)
    except KeyboardInterrupt:
        print("KeyboardInterrupt caught; SIGTERM not delivered", flush=True)
    except OSError:
        print("OSError", flush=True)
        sys.exit(1)
    sys.exit(0)
""")


@pytest.mark.parametrize("caller", ["library", "cli"])
def test_a_sigterm_noted_after_a_sigint_during_the_rollback_is_delivered(tmp_path, caller):
    """A Ctrl-C and a job scheduler's SIGTERM both noted during the rollback's renames: both are delivered afterwards,
    SIGTERM last. With the default handlers (a library user's) the process ends by SIGTERM although the caller catches
    KeyboardInterrupt; in the CLI (SIGTERM raises _Terminated) the command says "terminated" and exits 143."""
    _two_files_old_and_new(tmp_path)
    script = tmp_path / "both.py"
    script.write_text(_BOTH_SIGNALS)
    done = subprocess.run([sys.executable, str(script), str(tmp_path), caller], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200"})
    if caller == "library":
        assert done.returncode == -signal.SIGTERM, (done.returncode, done.stdout, done.stderr[-800:])
    else:
        assert done.returncode == 128 + signal.SIGTERM, (done.returncode, done.stdout, done.stderr[-800:])
        assert "terminated" in done.stdout + done.stderr


@pytest.mark.parametrize("when", ["as the noting handlers go in", "as the handlers are put back"])
def test_a_sigterm_while_the_handlers_are_swapped_then_a_noted_ctrl_c_says_terminated(tmp_path, monkeypatch,
                                                                                   sigint_raises, when):
    """The job scheduler's SIGTERM arrives while the rollback swaps the signal handlers (raised by the CLI's handler,
    the swap carried on), and a Ctrl-C is noted during the renames: the termination is what the caller gets, the
    data audit says "terminated" and exits 143, not the KeyboardInterrupt delivered after it."""
    out, staging = _two_files_old_and_new(tmp_path)
    state: dict = {}
    real_getsignal, real_signal = signal.getsignal, signal.signal

    def sigterm_once(ready: bool) -> None:
        if ready and not state.get("sent"):
            state["sent"] = True
            os.kill(os.getpid(), signal.SIGTERM)  # the CLI's handler raises _Terminated here

    def getsignal_then_sigterm(number):
        handler = real_getsignal(number)
        sigterm_once(state.get("rollback") and number == signal.SIGTERM)
        return handler

    def signal_then_sigterm(number, handler):
        previous = real_signal(number, handler)
        put_back = getattr(handler, "__name__", "") == "terminated"  # the CLI's own handler, going back in
        sigterm_once(state.get("renamed") and number == signal.SIGTERM and put_back)
        return previous

    monkeypatch.setattr(os, "replace", _failing_replace(staging, state, ctrl_c_in_rollback=True))
    if when == "as the noting handlers go in":
        monkeypatch.setattr(signal, "getsignal", getsignal_then_sigterm)
    else:
        monkeypatch.setattr(signal, "signal", signal_then_sigterm)
    with pytest.raises(typer.Exit) as done:
        with _said_when_interrupted("while writing"):
            put_in_place_together(staging, out, ["a.json", "b.json"])
    monkeypatch.undo()
    assert state.get("sent") and state.get("renamed")
    assert _visible(out) == {"a.json": "old a.json", "b.json": "old b.json"}
    assert done.value.exit_code == 128 + signal.SIGTERM, done.value.exit_code


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and all(error is not other for other in seen):
        seen.append(error)
        error = error.__context__
    return seen


@pytest.mark.skipif(not hasattr(signal, "SIGXCPU"), reason="no CPU-time limit signal on this system")
def test_a_cpu_time_limit_reached_inside_the_cli_s_stop_handling_raises_once_and_stays_ignored():
    """SIGXCPU raises _Terminated as SIGTERM does, once: the kernel's repeats every CPU second are no new request; on
    the way out SIGXCPU is ignored (a repeat would end the process while it says why it stopped), SIGTERM's handler
    put back; when no SIGXCPU came, both handlers before are put back."""
    signal.signal(signal.SIGXCPU, signal.SIG_DFL)
    with pytest.raises(_Terminated) as stopped:
        with _stop_signals_as_interrupt():
            handler = signal.getsignal(signal.SIGXCPU)
            try:
                handler(signal.SIGXCPU, None)
            finally:
                handler(signal.SIGXCPU, None)  # the kernel's repeat while the first is handled: nothing
    assert stopped.value.signal_number == signal.SIGXCPU
    assert signal.getsignal(signal.SIGXCPU) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is not None
    signal.signal(signal.SIGXCPU, signal.SIG_DFL)
    before = signal.getsignal(signal.SIGTERM)
    with _stop_signals_as_interrupt():
        assert signal.getsignal(signal.SIGXCPU) is not signal.SIG_DFL
    assert signal.getsignal(signal.SIGXCPU) is signal.SIG_DFL and signal.getsignal(signal.SIGTERM) is before


def test_the_ctrl_c_noted_before_a_sigterm_is_in_the_context_of_the_exception_the_caller_gets(tmp_path, monkeypatch,
                                                                                               sigint_raises):
    """Both signals noted during the rollback's renames, SIGTERM raising _Terminated (the CLI's handler): the caller
    gets the _Terminated, with the KeyboardInterrupt and then the set's failure in its chain of contexts."""
    out, staging = _two_files_old_and_new(tmp_path)
    state: dict = {}
    monkeypatch.setattr(os, "replace", _failing_replace(staging, state, ctrl_c_in_rollback=True,
                                                        sigterm_in_rollback=True))
    with pytest.raises(_Terminated) as done:
        with _stop_signals_as_interrupt():
            put_in_place_together(staging, out, ["a.json", "b.json"])
    monkeypatch.undo()
    assert _visible(out) == {"a.json": "old a.json", "b.json": "old b.json"}
    chain = _chain(done.value)
    assert [type(error) for error in chain] == [_Terminated, KeyboardInterrupt, OSError], [repr(e) for e in chain]
