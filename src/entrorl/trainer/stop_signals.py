"""SIGINT / SIGTERM during training: the first one lets the step under way finish and be saved, a second one stops at
once; SIGXCPU (a soft CPU-time limit, the warning before the hard one's SIGKILL) and, when asked, SIGHUP (the
terminal closed) as a first SIGTERM; messages from inside a signal handler that never reach the code it
interrupted."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = ["CPU_TIME_LIMIT", "FINISH_THE_STEP", "HANGUP", "catch_stop_signals", "exit_at_once_on_another_signal",
           "say_in_a_signal_handler", "send_a_hung_up_terminal_to_null"]

# the kernel sends SIGXCPU once the soft CPU-time limit (`ulimit -St`, a scheduler's cputime) is reached, then again
# every CPU second until the hard limit's SIGKILL: what time is left goes to saving the step, and a repeat is no
# second request to stop at once (not on Windows, which has no such signal)
CPU_TIME_LIMIT = getattr(signal, "SIGXCPU", None)
_STOP_SIGNALS = tuple(number for number in (signal.SIGINT, signal.SIGTERM, CPU_TIME_LIMIT) if number is not None)
HANGUP = getattr(signal, "SIGHUP", None)  # the terminal closed (an ssh connection lost); not on Windows


def send_a_hung_up_terminal_to_null() -> None:
    """Point standard output and error, where they are a terminal that has hung up (a character device that is no
    longer a tty: a write there fails with EIO), at the null device, so that what the process still writes (a
    progress bar's last refresh, the final message) does not end it before its step is saved."""
    for descriptor in (1, 2):
        with contextlib.suppress(OSError):
            if stat.S_ISCHR(os.fstat(descriptor).st_mode) and not os.isatty(descriptor):
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, descriptor)
                os.close(null)


def say_in_a_signal_handler(console, message: str) -> None:
    """``message`` on ``console``, in yellow. A signal handler runs between two bytecodes of the main thread, which may
    be inside a write to the same stream: Python refuses the nested write ("reentrant call"), so the message then
    goes straight to the stream's file descriptor, unbuffered and unstyled. So it does on any other error of the
    console (a second signal inside the import rich's first print makes): nothing from the message may reach the
    code the signal interrupted (a reward would score 0 for it)."""
    try:
        console.print(message, style="yellow", highlight=False, soft_wrap=True)
    except Exception:
        with contextlib.suppress(Exception):
            try:
                descriptor = console.file.fileno()
            except (AttributeError, OSError, ValueError):
                descriptor = 2
            os.write(descriptor, (message + "\n").encode("utf-8", "replace"))


def exit_at_once_on_another_signal(console, run_dir: Path, *, resumable: bool = True,
                                    resumed_by: str = "--resume") -> None:
    """After an interrupted run's checkpoint is saved (or, stopped before its first step, when there is none to
    save), make SIGINT / SIGTERM end the process at once: what is left (closing the loggers, Python's shutdown) can
    take seconds, and a second Ctrl-C there would print a traceback. ``resumed_by``: what continues the run."""
    how = f"--resume --run-dir {run_dir}" if resumed_by == "--resume" else resumed_by
    said = (f"the checkpoint is saved (continue with {how})" if resumable
            else "no step was trained, so there is nothing to resume")

    def exit_now(number, frame) -> None:
        say_in_a_signal_handler(console, f"{signal.Signals(number).name} again: exiting now; {said}")
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a write the signal interrupted refuses a reentrant flush
                stream.flush()
        os._exit(128 + number)

    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(number) is not signal.SIG_IGN:  # ignored by whoever started the process: it stays so
                signal.signal(number, exit_now)


FINISH_THE_STEP = "finishing the current step, then saving a checkpoint"


def catch_stop_signals(received: list[int], console, *, plan: Callable[[], str] = lambda: FINISH_THE_STEP,
                        resumes_from: Callable[[], str] = lambda: "the last complete checkpoint", hangup: bool = False):
    """Make SIGINT, SIGTERM and SIGXCPU (with ``hangup``, SIGHUP too) append their number to ``received`` (the loop
    stops after the step it is in) and say on ``console`` what happens next, as ``plan()`` puts it then; a second
    SIGINT or SIGTERM stops at once (``KeyboardInterrupt`` for SIGINT, exit status 143 for SIGTERM), saying what
    ``--resume`` would continue from (``resumes_from()``). A repeated SIGXCPU or SIGHUP is no request to stop at once
    (the CPU-time limit, or the terminal's closing, once more): it is ignored; a SIGHUP first points output to a
    terminal that has hung up at the null device.
    Returns a function that puts the previous handlers back (those of the signal numbers it is given, or all).
    Does nothing outside the main thread, where Python
    cannot install handlers, and leaves a signal the process ignores ignored (a background job of a shell ignores
    SIGINT, as Python's own Ctrl-C handling does then)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda numbers=None: None
    previous = {}

    def handler(number, frame):
        if number == HANGUP:
            send_a_hung_up_terminal_to_null()
        if received and number in (CPU_TIME_LIMIT, HANGUP):
            return
        if received:
            say_in_a_signal_handler(console, f"{signal.Signals(number).name} again: stopping now, without waiting for "
                                     f"the step under way to be saved ({resumes_from()})")
            if number == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + number)
        received.append(number)
        if number == CPU_TIME_LIMIT:
            say_in_a_signal_handler(console, f"SIGXCPU: the process's CPU-time limit is reached (the hard limit ends it): "
                                             f"{plan()}")
        elif number == HANGUP:
            say_in_a_signal_handler(console, f"SIGHUP (the terminal closed): {plan()}")  # seen where output is a file
        else:
            say_in_a_signal_handler(console, f"{signal.Signals(number).name}: {plan()} (send it again to stop at once)")

    for number in (*_STOP_SIGNALS, *((HANGUP,) if hangup and HANGUP is not None else ())):
        if signal.getsignal(number) is not signal.SIG_IGN:
            previous[number] = signal.signal(number, handler)

    def restore(numbers=None) -> None:
        """Put back the previous handlers, of ``numbers`` only when given (the others stay until a later call)."""
        for number in [number for number in previous if numbers is None or number in numbers]:
            old = previous.pop(number)  # None: a handler installed outside Python, which cannot be put back
            signal.signal(number, old if old is not None else signal.SIG_DFL)

    return restore
