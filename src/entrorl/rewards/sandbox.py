"""Run an untrusted Python program against test cases, contained.

:func:`run_in_sandbox` runs a program in a fresh child interpreter and reports, per test case, what the
program did. Containment is layered; every layer that is active for a run is named in
:attr:`SandboxRun.isolation`, and a layer that is not available degrades explicitly (it is reported as
off, never silently assumed):

* **process** — the child starts in a new session and process group (``start_new_session``) with a
  minimal environment (no inherited variables, so the parent's secrets are not there), a fresh
  temporary working directory (deleted afterwards) and only the descriptors it needs. The working directory is a
  folder of a root-owned temporary folder that also holds the parent's own files (the child's stderr); the child's
  configuration reaches it as a file with no name. So what the parent opens by name is either out of the program's
  reach or read only as a plain file of the program's own, never through a link, a FIFO or a swapped folder;
* **unprivileged user** — when the parent runs as root, the child runs as a fresh, otherwise unused
  uid/gid. It cannot write root's files or read other processes' ``/proc/<pid>/environ``, and
  ``RLIMIT_NPROC`` counts only its own processes (the kernel does not apply that limit to root).
  Needs an interpreter the unprivileged user can execute: the configured one, else the parent's, else
  ``python3`` on the system ``PATH`` (see :attr:`SandboxRun.isolation` ``"interpreter"``);
* **network namespace** — the child moves itself into a new, empty user + network namespace
  (``unshare(CLONE_NEWUSER | CLONE_NEWNET)``) before the program runs: no interface but a down
  loopback, so every connection, to ``127.0.0.1`` included, fails in the kernel. ``RLIMIT_NPROC`` then counts the
  tasks of that user namespace alone, so it is ``max_processes`` whoever else the uid runs;
* **PID namespace** — without a uid of its own (a trainer that is not root, or ``drop_privileges`` off), nothing
  else tells the program's processes from the user's, so the same unshare adds a PID namespace: the child stays
  outside as its keeper, forks the namespace's first process (a reaper) and the harness, and once the harness ends
  kills the reaper, with which the kernel kills every process left in the namespace (one that left the group and
  dropped the run's marker included). No process outside the namespace has a pid in it, so the program cannot
  signal the trainer. The namespace gets its own ``/proc`` where the system allows it (a container whose ``/proc``
  has masked parts does not; ``isolation["proc_of_the_namespace"]``), else ``/proc/<os.getpid()>`` is another
  process's entry and the program's own is ``/proc/self``;
* **read-only file system** — the same unshare adds a mount namespace in which every mount is made
  read-only (``mount_setattr(AT_RECURSIVE, MOUNT_ATTR_RDONLY)``) except a bind mount of the working
  directory; the inherited mounts are locked in that namespace, so the program cannot make them
  writable again. World-writable places (``/tmp``, ``/dev/shm``) are read-only too;
* **resource limits** (``setrlimit`` in the child) — ``RLIMIT_CPU``, ``RLIMIT_AS`` and ``RLIMIT_DATA``
  (memory), ``RLIMIT_NPROC`` (processes and threads), ``RLIMIT_FSIZE`` (size of any file written,
  captured output included), ``RLIMIT_NOFILE`` and ``RLIMIT_CORE = 0``; plus ``PR_SET_NO_NEW_PRIVS``
  and a parent-death signal;
* **audit hook** (``sys.addaudithook``, installed before the program runs) — refuses socket
  connect / bind / send and name lookups, process creation (fork, exec, spawn, ``subprocess``,
  ``os.system``) and signals to other processes (``os.kill``, and ``os.pidfd_open`` of another process, which
  raises no audit event of its own and is replaced), writes / renames / deletions outside the sandbox
  directory, reading other processes' ``/proc`` entries, looking up C functions with ``ctypes`` and loading
  ``cffi``, calling ``_posixsubprocess.fork_exec`` (what ``subprocess`` calls below its own audit event, which raises
  none). A refused operation raises ``PermissionError`` in the program *and* is reported to the parent at
  once, so catching the exception does not hide it. Importing ``ctypes`` is allowed (numpy, pandas, scipy and
  sympy do), and its own helpers (``memmove``, ``string_at``) raise no audit event: with them, or by reaching
  into the harness's objects, a program written for it can undo the hook. An audit hook is a tripwire, not a
  security boundary: it judges a path by its name, so an operation relative to a directory descriptor
  (``dir_fd``) passes it, and the kernel layers above are what contain a determined program;
* **wall clock and cleanup** — the parent enforces a wall-clock limit per test case and, whatever
  happened (success included), kills the whole process group with ``SIGKILL``, then every process
  still running as the sandbox uid or carrying the run's marker (which catches children that left
  the group with ``setsid``), removes the working directory and any file the sandbox uid left in the
  world-writable temporary directories.

Test cases are run in one child process, one after the other (the interpreter starts once), each as a script runs:
in a new ``__main__`` (for assert cases, the program once in a module named ``solution``), with ``sys.__stdin__`` / ``sys.__stdout__`` the case's streams, and ended as a script ends,
while its output is still attached (the non-daemon threads it started waited for, its executors shut down, its
exit handlers run, standard output flushed, its objects finalised). A case that kills the process (a crash,
``os._exit``, a signal) is attributed to that case and the remaining cases continue in a fresh process; after a
wall-clock timeout the remaining cases are not run.

Standard-input cases compare the captured standard output *in the parent*: the expected output never
enters the sandbox. Assert cases (test code executed after the program, in its namespace) necessarily
run in the program's interpreter: a program written to attack the harness could fake their results,
so prefer standard-input cases where that matters.

Linux only (``/proc``, ``setrlimit``, ``unshare``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from entrorl._checks import check_int, is_real_number

try:  # absent off Unix: the module still imports there (the sandbox refuses to start: unsupported_system_reason)
    import fcntl
except ImportError:
    fcntl = None

__all__ = [
    "CaseOutcome",
    "SandboxCase",
    "SandboxError",
    "SandboxLimits",
    "SandboxRun",
    "run_in_sandbox",
    "unsupported_system_reason",
]

#: Marker put in the child's argv and environment; strays are found by it.
SANDBOX_MARKER = "ENTRORL_SANDBOX"

# Fresh uids/gids for sandboxed programs are drawn from this range (far above any real account's).
_SANDBOX_ID_BASE = 2_100_000_000
_SANDBOX_ID_SPAN = 40_000_000

# Directories any user can write to; what a sandbox uid leaves there is removed after the run.
_SHARED_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock")

# Most bytes of result messages accepted from one child (a program flooding the channel is cut off).
_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class SandboxError(RuntimeError):
    """The sandbox could not run the program at all (a setup problem, not the program's fault)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits and isolation switches of one sandboxed run.

    * ``time_limit`` — wall-clock seconds each test case may take (the parent kills the process
      group when it is exceeded); CPU time is capped by ``RLIMIT_CPU`` at the total of all cases;
    * ``memory_mb`` — address-space limit of the program (``RLIMIT_AS`` and ``RLIMIT_DATA``);
    * ``max_processes`` — processes *and threads* the sandbox uid may have (``RLIMIT_NPROC``);
    * ``max_file_mb`` — largest file the program may write, its captured output included
      (``RLIMIT_FSIZE``);
    * ``max_open_files`` — ``RLIMIT_NOFILE``;
    * ``startup_time`` — extra wall-clock seconds allowed for the interpreter to start;
    * ``drop_privileges`` — when the parent is root, run as a fresh unprivileged uid;
    * ``network_namespace`` — move the program into an empty user + network namespace;
    * ``read_only_filesystem`` — give the program a mount namespace where everything but its working
      directory is read-only;
    * ``audit_hook`` — install the audit-hook tripwire;
    * ``allow_subprocesses`` — let the audit hook permit fork / exec / ``subprocess`` (the process
      limit and the final kill still apply);
    * ``python`` — interpreter to run the program with (default: the current one);
    * ``temp_dir`` — where the per-run working directory is created (default: the system's).
    """

    time_limit: float = 2.0
    memory_mb: int = 512
    max_processes: int = 16
    max_file_mb: int = 16
    max_open_files: int = 64
    startup_time: float = 5.0
    drop_privileges: bool = True
    network_namespace: bool = True
    read_only_filesystem: bool = True
    audit_hook: bool = True
    allow_subprocesses: bool = False
    python: str | None = None
    temp_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("time_limit", "startup_time"):
            value = getattr(self, name)
            if not is_real_number(value) or not 0 < value < 86_400:
                raise ValueError(f"{name} must be a number of seconds in (0, 86400), got {value!r}")
        for name, low in (("memory_mb", 32), ("max_processes", 1), ("max_file_mb", 1), ("max_open_files", 16)):
            object.__setattr__(self, name, check_int(getattr(self, name), name, minimum=low))
        switches = ("drop_privileges", "network_namespace", "read_only_filesystem", "audit_hook", "allow_subprocesses")
        for name in switches:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("python", "temp_dir"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty path or None, got {value!r}")


@dataclass(frozen=True)
class SandboxCase:
    """One test case: ``kind="stdin"`` feeds ``text`` to standard input and captures standard output;
    ``kind="assert"`` executes ``text`` as Python in the program's namespace after the program ran."""

    kind: str
    text: str

    def __post_init__(self) -> None:
        if self.kind not in ("stdin", "assert"):
            raise ValueError(f"a sandbox case kind is 'stdin' or 'assert', got {self.kind!r}")
        if not isinstance(self.text, str):
            raise TypeError(f"a sandbox case's text must be a string, got {type(self.text).__name__}")


@dataclass(frozen=True)
class CaseOutcome:
    """What one test case did.

    ``status`` is ``"ok"`` (ran to the end; for stdin cases the output still has to be compared),
    ``"error"`` (raised or exited non-zero; ``error`` holds ``"Type: message"``), ``"timeout"``,
    ``"crashed"`` (the process died; ``error`` says how) or ``"not_run"``. ``stdout`` is the captured
    standard output of stdin cases; ``seconds`` the wall-clock time of the case.
    """

    status: str
    error: str | None = None
    stdout: str = ""
    seconds: float = 0.0


@dataclass
class SandboxRun:
    """Result of :func:`run_in_sandbox`.

    ``syntax_error`` is set when the program does not compile (no case ran); ``violations`` are the
    ``(kind, detail)`` pairs the audit hook refused (``kind`` is ``"network"``, ``"file_write"``,
    ``"process"``, ``"proc_read"`` or ``"ctypes"``); ``isolation`` names the active layers;
    ``seconds`` is the wall-clock time of the whole run; ``uid`` and ``marker`` identify the run's
    processes (for inspection by tests and tools); ``stderr_tail`` is the end of the program's
    standard error in the last case it ran (each case's starts empty).
    """

    outcomes: list[CaseOutcome]
    syntax_error: str | None = None
    violations: list[tuple[str, str]] = field(default_factory=list)
    isolation: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    uid: int | None = None
    marker: str = ""
    workdir: str = ""
    stderr_tail: str = ""


# --------------------------------------------------------------------------------------------
# the child's bootstrap (standard library only; runs in the sandbox interpreter, Python >= 3.8)
# --------------------------------------------------------------------------------------------

_BOOTSTRAP = r'''
import atexit, builtins, gc, json, os, resource, signal, sys, time, types

with os.fdopen(int(sys.argv[2]), encoding="utf-8") as handle:  # a file with no name: nothing on disk to find
    CONFIG = json.load(handle)
MAIN_PID = os.getpid()  # in a PID namespace, the harness's pid there (set again once it is in)
GETPID = os.getpid  # the harness's own references: a program may rebind os.getpid, os.readlink
READLINK = os.readlink
RESULT_FD = CONFIG["result_fd"]
WORKDIR = os.path.realpath(CONFIG["workdir"])
OWN_STREAMS = {}  # the harness's own stream objects ("stderr"), which the program may replace in sys


def send(message):
    data = (json.dumps(message) + "\n").encode("utf-8")
    while data:
        data = data[os.write(RESULT_FD, data):]


def within_the_job_s_limit(which, value):
    """value, or the hard limit this process inherited where that is lower (a job's `ulimit -n 32`): a limit cannot
    be raised here, and the job's is the stricter one."""
    hard = resource.getrlimit(which)[1]
    if hard == resource.RLIM_INFINITY:
        return value
    return hard if value == resource.RLIM_INFINITY else min(value, hard)


def set_limits(isolation):
    limits = CONFIG["limits"]
    memory = limits["memory_bytes"]
    for name, value in (("RLIMIT_AS", memory), ("RLIMIT_DATA", memory), ("RLIMIT_CPU", limits["cpu_seconds"]),
                        ("RLIMIT_FSIZE", limits["file_bytes"]), ("RLIMIT_NOFILE", limits["open_files"]),
                        ("RLIMIT_CORE", 0)):
        which = getattr(resource, name)
        value = within_the_job_s_limit(which, value)
        resource.setrlimit(which, (value, value))
    processes = limits["processes"]
    if processes is not None and isolation.get("user_namespace"):  # (None: root, whom RLIMIT_NPROC does not bind)
        # the kernel counts the tasks of this user namespace alone: the program's (the harness's included), and the
        # keeper and reaper of its PID namespace
        processes = limits["max_processes"] + (2 if isolation.get("pid_namespace") else 0)
        isolation["process_limit"] = "RLIMIT_NPROC=%d in the user namespace (max_processes%s)" % (
            processes, " + the PID namespace's keeper and reaper" if isolation.get("pid_namespace") else "")
    if processes is not None:
        allowed = within_the_job_s_limit(resource.RLIMIT_NPROC, processes)
        if allowed < processes:
            isolation["process_limit"] = "RLIMIT_NPROC=%d, the job's own hard limit (below the %d set here)" % (
                allowed, processes)
        resource.setrlimit(resource.RLIMIT_NPROC, (allowed, allowed))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-long write raises OSError(EFBIG) instead


CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 0x1000, 0x4000, 1 << 18
MOUNT_ATTR_RDONLY, AT_RECURSIVE, AT_FDCWD, SYS_MOUNT_SETATTR = 0x1, 0x8000, -100, 442


def read_only_view(libc, ctypes):
    """Every mount read-only except a bind mount of the working directory (in our mount namespace:
    the mounts we inherited are locked there, so the program cannot make them writable again)."""
    import struct

    def check(result, step):
        if result != 0:
            raise OSError(ctypes.get_errno(), "%s: %s" % (step, os.strerror(ctypes.get_errno())))

    def mount_attr(attr_set, attr_clr):
        return ctypes.create_string_buffer(struct.pack("QQQQ", attr_set, attr_clr, 0, 0), 32)

    libc.syscall.restype = ctypes.c_long
    workdir = WORKDIR.encode()
    check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
    check(libc.mount(workdir, workdir, None, MS_BIND | MS_REC, None), "bind the working directory")
    check(libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, mount_attr(MOUNT_ATTR_RDONLY, 0), 32),
          "make / read-only")
    check(libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, workdir, 0, mount_attr(0, MOUNT_ATTR_RDONLY), 32),
          "make the working directory writable")


def kernel_isolation():
    """no_new_privs, death with the parent, and new user + PID + network + mount namespaces."""
    report = {}
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    report["no_new_privs"] = libc.prctl(38, 1, 0, 0, 0) == 0          # PR_SET_NO_NEW_PRIVS
    libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)                        # PR_SET_PDEATHSIG
    report["network_namespace"] = False
    report["read_only_filesystem"] = False
    report["pid_namespace"] = False
    flags = (CLONE_NEWNET if CONFIG["network_namespace"] else 0) | (CLONE_NEWNS if CONFIG["read_only_filesystem"] else 0)
    namespaces = False
    if flags:
        uid, gid = os.getuid(), os.getgid()
        # a uid of its own already keeps the program from the trainer's processes, and finds its strays
        pid_namespace = CONFIG["pid_namespace"] and libc.unshare(CLONE_NEWUSER | CLONE_NEWPID | flags) == 0
        if pid_namespace or libc.unshare(CLONE_NEWUSER | flags) == 0:
            try:
                for name, text in (("setgroups", "deny"), ("uid_map", "%d %d 1" % (uid, uid)),
                                   ("gid_map", "%d %d 1" % (gid, gid))):
                    with open("/proc/self/" + name, "w") as handle:
                        handle.write(text)
                namespaces = True
            except OSError as exc:
                report["namespace_error"] = "uid map: %s" % exc
        else:
            report["namespace_error"] = "unshare: %s" % os.strerror(ctypes.get_errno())
    if namespaces:
        report["user_namespace"] = True
        report["network_namespace"] = bool(flags & CLONE_NEWNET)
        if flags & CLONE_NEWNS:
            try:
                read_only_view(libc, ctypes)
                report["read_only_filesystem"] = True
            except OSError as exc:
                report["read_only_filesystem_error"] = str(exc)
    if flags and pid_namespace:  # this process's next child is the namespace's first: it must be the reaper
        enter_pid_namespace(libc, report)
    return report


def enter_pid_namespace(libc, report):
    """Run the harness in the new PID namespace, whose processes all die with its first one. This process (the
    keeper, which the parent started and kills) forks that first process (the reaper: it collects the namespace's
    orphans until it is killed) and then the harness, waits for the harness, kills the reaper, so that every process
    the program started dies with it (one that left the process group with ``setsid`` included), and ends as the
    harness ended. In the namespace no process outside it has a pid: the program cannot signal the trainer."""
    global MAIN_PID
    try:
        reaper = os.fork()
    except OSError as exc:  # the namespace has no first process: this one runs the harness outside it
        report["pid_namespace_error"] = "fork: %s" % exc
        return
    if reaper == 0:
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)
        os.close(RESULT_FD)
        while True:
            try:
                os.wait()
            except ChildProcessError:  # none now; an orphan may come later
                time.sleep(0.05)
    try:
        harness = os.fork()
    except OSError as exc:
        os.kill(reaper, signal.SIGKILL)
        report["pid_namespace_error"] = "fork: %s" % exc
        raise
    if harness == 0:
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)
        MAIN_PID = os.getpid()
        report["pid_namespace"] = True
        # a /proc of this namespace, so that /proc/<os.getpid()> is the program's own entry; a container whose /proc
        # has parts masked refuses it: the system's stays, where the program's entry is /proc/self only
        report["proc_of_the_namespace"] = bool(report.get("read_only_filesystem")) and libc.mount(
            b"proc", b"/proc", b"proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, None) == 0
        return
    os.close(RESULT_FD)
    status = os.waitpid(harness, 0)[1]
    os.kill(reaper, signal.SIGKILL)
    os.waitpid(reaper, 0)
    if os.WIFSIGNALED(status):  # die the same way, without a core file
        number = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if number not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


class Refused(PermissionError):
    pass


WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
PATH_EVENTS = {"os.remove": 0, "os.rmdir": 0, "os.mkdir": 0, "os.rename": 0, "os.link": 1, "os.symlink": 1,
               "os.chmod": 0, "os.chown": 0, "os.truncate": 0, "os.utime": 0, "os.chflags": 0,
               "os.setxattr": 0, "os.removexattr": 0, "shutil.rmtree": 0, "shutil.move": 1, "shutil.copyfile": 1}
RENAME_EVENTS = {"os.rename", "os.link", "shutil.move", "shutil.copyfile"}  # (source, destination, ...)
SOCKET_EVENTS = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"}   # (socket, address, ...)
LOOKUP_EVENTS = {"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo"}
PROCESS_EVENTS = {"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system",
                  "subprocess.Popen", "pty.spawn", "os.startfile"}
# importing ctypes is allowed (numpy, pandas, scipy, sympy need it); looking up a C function is not. Its own helpers
# (memmove, string_at) raise no audit event: the hook is a tripwire, not a boundary
CTYPES_EVENTS = {"ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function"}
# modules the harness imported, whose functions it replaced: importing them afresh would give the originals back
NO_REIMPORT = ("posix", "os", "_signal", "signal", "_posixsubprocess")


def inside_workdir(path):
    """Whether ``path`` (relative to the current directory) lies in the working directory."""
    if isinstance(path, int):
        return True  # an already open descriptor
    try:
        real = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return real == WORKDIR or real.startswith(WORKDIR + os.sep) or real == "/dev/null"


def refuse(kind, detail):
    send({"event": "violation", "kind": kind, "detail": detail[:300]})
    raise Refused("sandbox: %s refused (%s)" % (kind.replace("_", " "), detail[:200]))


def install_audit_hook():
    allow_processes = CONFIG["allow_subprocesses"]

    def hook(event, args):
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & WRITE_FLAGS)
            if writing and not inside_workdir(path):
                refuse("file_write", "open %r for writing" % (path,))
            if isinstance(path, (str, bytes)):
                text = os.fsdecode(path)
                # the entry named, however it is spelled: /proc//1, /proc/self/../1, ../../proc/1
                real = os.path.realpath(text) if "proc" in text else ""
                if real.startswith("/proc/"):
                    part = real.split("/")[2]
                    # the process's own entry, as /proc names it (another pid than its own in a PID namespace)
                    if part.isdigit() and part != os.path.basename(READLINK("/proc/self")):
                        refuse("proc_read", "open %r" % (text,))
        elif event in PATH_EVENTS:
            if event == "os.symlink":  # (target, link): only the link is written; what it points at is not
                paths = list(args[1:2])
            else:
                paths = [args[0]] + ([args[1]] if event in RENAME_EVENTS and len(args) > 1 else [])
            for path in paths:
                if not inside_workdir(path):
                    refuse("file_write", "%s %r" % (event, path))
        elif event in SOCKET_EVENTS:
            refuse("network", "%s %r" % (event, args[1] if len(args) > 1 else None))
        elif event in LOOKUP_EVENTS:
            refuse("network", "%s %r" % (event, args[0] if args else None))
        elif event in PROCESS_EVENTS:
            if not allow_processes:
                refuse("process", event)
        elif event in ("os.kill", "os.killpg"):
            if not allow_processes and args and args[0] not in (0, MAIN_PID):
                refuse("process", "%s %r" % (event, args[0]))
        elif event in CTYPES_EVENTS:
            refuse("ctypes", event)
        elif event == "import" and args and args[0] in ("cffi", "_cffi_backend"):
            refuse("ctypes", "import %s" % args[0])
        elif event == "import" and args and args[0] in NO_REIMPORT and not allow_processes:
            refuse("process", "import %s afresh" % args[0])

    if not allow_processes:
        # os.pidfd_open raises no audit event, and signal.pidfd_send_signal on its descriptor signals any process the
        # kernel lets this uid signal
        import posix
        original_pidfd_open = getattr(posix, "pidfd_open", None)
        if original_pidfd_open is not None:
            def pidfd_open(pid, flags=0):
                if pid != MAIN_PID:
                    refuse("process", "os.pidfd_open %r" % (pid,))
                return original_pidfd_open(pid, flags)
            posix.pidfd_open = os.pidfd_open = pidfd_open
        # what subprocess calls below its own audit event, which raises none
        try:
            import _posixsubprocess
        except ImportError:
            pass
        else:
            def fork_exec(*args, **kwargs):
                refuse("process", "_posixsubprocess.fork_exec")
            _posixsubprocess.fork_exec = fork_exec
    sys.addaudithook(hook)


def describe(exc):
    text = str(exc)
    name = type(exc).__name__
    return ("%s: %s" % (name, text))[:500] if text else name


def leave_if_forked():
    if GETPID() != MAIN_PID:  # a forked child of the program must never run the harness
        os._exit(0)


def redirect(fd, path, flags):
    new = os.open(path, flags, 0o600)
    if new != fd:  # the program closed fd (open(0).read() does, once its file is collected): open() reused it
        os.dup2(new, fd)
        os.close(new)


def attach_standard_streams(input_path, output_path, output_flags):
    """Point descriptors 0 and 1 (and sys.stdin / sys.stdout) at the given files."""
    redirect(0, input_path, os.O_RDONLY)
    redirect(1, output_path, output_flags)
    # lines end at "\n" only, as a script's stdin on Linux reads them: "abc\r\n" is "abc\r"
    sys.stdin = sys.__stdin__ = open(0, "r", encoding="utf-8", errors="replace", newline="\n", closefd=False)
    # one object for both names, as in a script: what the program writes through either keeps its order
    sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", closefd=False)
    return sys.stdout


def attach_standard_error(error_file):
    """Point descriptor 2 (and sys.stderr) at the run's standard error file again, emptied: each case's standard error
    starts empty, under a file size limit of its own, as a script's would. The harness's own stream of the case before
    is flushed first; a stream the program put in its place is not touched (its flush is the program's code)."""
    own = OWN_STREAMS.pop("stderr", None)
    sys.stderr = sys.__stderr__ = None
    if own is not None:
        try:  # closed, it never flushes again: what a flush refused (the file at its size limit) is dropped here
            own.close()
        except BaseException:
            pass
    try:
        os.dup2(error_file, 2)
        os.ftruncate(2, 0)
    except OSError:  # the program closed the harness's copy (descriptor 2 may be its output now: left as it is)
        pass
    try:
        sys.stderr = sys.__stderr__ = OWN_STREAMS["stderr"] = open(2, "w", buffering=1, encoding="utf-8",
                                                               errors="backslashreplace", closefd=False)
    except OSError:  # descriptor 2 closed too: the case writes its standard error nowhere
        pass


def fresh_program_namespace(name, preamble=None):
    """A new, empty module ``name`` for the program (not the harness's own globals): ``__main__`` for a script,
    ``solution`` for a program whose functions the asserts call, whose ``if __name__ == "__main__":`` block must not
    run (as in HumanEval's, MBPP's, APPS's and LiveCodeBench's own checks). What the previous case left to the
    collector (objects its exception's traceback kept alive) is collected first: a file on descriptor 0 among them
    must close it before this case's input takes it, not after. ``preamble`` (compiled) is run in it first: the names
    it defines are there for the program, whose own first lines (``from __future__`` imports) stay first."""
    module = types.ModuleType(name)
    module.__builtins__ = builtins
    module.__file__ = "solution.py"
    sys.argv = ["solution.py"]  # as `python solution.py < input` runs it: no arguments, not the harness's
    sys.modules["__main__"] = module if name == "__main__" else types.ModuleType("__main__")
    sys.modules[name] = module
    gc.collect()
    if preamble is not None:
        exec(preamble, module.__dict__)
    return module.__dict__


def executor_of(thread):
    """The ThreadPoolExecutor a worker thread serves, while it is alive (None for any other thread)."""
    target = getattr(thread, "_target", None)
    if getattr(target, "__module__", "") != "concurrent.futures.thread":
        return None
    reference = (getattr(thread, "_args", None) or (None,))[0]
    return reference() if callable(reference) else None


def flush_standard_output(output):
    # the program may have replaced sys.stdout (with an object that need not be hashable) or closed it
    for stream in (output,) if sys.stdout is output else (sys.stdout, output):
        if stream is not None and not getattr(stream, "closed", False):
            stream.flush()


def end_as_a_script_ends(namespace, output):
    """What the end of a script does, in its order, while the case's streams are still attached: wait for the
    threads the program started (not daemons), run the exit handlers it registered, flush standard output, then
    finalise its objects (a file it opened on descriptor 1 flushes when collected; one holding descriptor 0 closes
    it, which must happen before the next case's streams take descriptors 0 and 1) and flush again."""
    try:
        threading = sys.modules.get("threading")
        if threading is not None:
            current = threading.current_thread()
            for thread in threading.enumerate():
                if thread is current or thread.daemon:
                    continue
                executor = executor_of(thread)
                if executor is not None:
                    # at a script's end its executors finish their work and let idle workers go; the interpreter-wide
                    # flag that does it there would refuse later cases' executors
                    executor.shutdown(wait=True)
                thread.join()
        atexit._run_exitfuncs()
    finally:
        atexit._clear()
        try:
            flush_standard_output(output)
        finally:
            # a script's end puts the original streams back before its modules go: a writer of the program's own
            # (FastIO) is not flushed again once its globals are cleared
            sys.stdout = sys.__stdout__ = output
            sys.modules["__main__"] = types.ModuleType("__main__")
            namespace.clear()
            gc.collect()
            flush_standard_output(output)


def run_case(index, case, state):
    kind, text = case["kind"], case["text"]
    if kind == "stdin":
        namespace = fresh_program_namespace("__main__", state["preamble"])
        output = attach_standard_streams(os.path.join(WORKDIR, "case%d.in" % index),
                                         os.path.join(WORKDIR, "case%d.out" % index), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            exec(state["code"], namespace)
        finally:
            try:
                end_as_a_script_ends(namespace, output)
            finally:
                attach_standard_streams(os.devnull, os.devnull, os.O_WRONLY)
        return
    if "namespace" not in state:  # assert cases: run the program once, before the first of them
        state["namespace"] = fresh_program_namespace("solution", state["preamble"])
        state["program_exception"] = None
        try:
            exec(state["code"], state["namespace"])
        except SystemExit as exc:
            if exc.code not in (None, 0):
                state["program_exception"] = exc
        except BaseException as exc:
            leave_if_forked()
            state["program_exception"] = exc
    if state["program_exception"] is not None:  # every assert case fails the way the program did
        raise state["program_exception"]
    try:
        exec(compile(text, "test_%d" % index, "exec"), state["namespace"])
    except SystemExit as exc:  # even sys.exit(0): the assert was never checked, which must not pass it
        raise RuntimeError("the code under test exited (SystemExit: exit status %r) before the assert was checked"
                           % (exc.code,)) from None


def main():
    isolation = kernel_isolation()
    set_limits(isolation)
    os.chdir(WORKDIR)
    source, preamble, cases = CONFIG.pop("program"), CONFIG.pop("preamble"), CONFIG.pop("cases")
    attach_standard_streams(os.devnull, os.devnull, os.O_WRONLY)
    if CONFIG["audit_hook"]:
        install_audit_hook()
    isolation["audit_hook"] = bool(CONFIG["audit_hook"])
    send({"event": "ready", "isolation": isolation})
    try:
        code = compile(source, "solution.py", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:  # (nested too deep, too large to compile)
        send({"event": "syntax_error", "detail": describe(exc)})
        return
    state = {"code": code, "preamble": compile(preamble, "preamble.py", "exec") if preamble else None}
    error_file = os.dup(2)  # the run's standard error, whatever the program does to descriptor 2
    for index in range(CONFIG["first_case"], len(cases)):
        attach_standard_error(error_file)
        send({"event": "start", "case": index})
        started = time.monotonic()
        status, error = "ok", None
        try:
            run_case(index, cases[index], state)
        except SystemExit as exc:
            leave_if_forked()
            if exc.code not in (None, 0):
                status, error = "error", "SystemExit: exit status %r" % (exc.code,)
        except BaseException as exc:
            leave_if_forked()
            status, error = "error", describe(exc)
        leave_if_forked()
        send({"event": "end", "case": index, "status": status, "error": error,
              "seconds": time.monotonic() - started})
    send({"event": "done"})


main()
'''


# --------------------------------------------------------------------------------------------
# the parent
# --------------------------------------------------------------------------------------------

_INTERPRETER_CACHE: dict[tuple[str, int], bool] = {}


def _minimal_environment(workdir: str, marker: str) -> dict[str, str]:
    """The only variables the program sees: nothing of the parent's environment."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        SANDBOX_MARKER: marker,
    }


def _runs_as(python: str, uid: int) -> bool:
    """Whether ``python`` starts when run as ``uid`` (checked once per interpreter)."""
    key = (python, 1 if uid else 0)
    if key not in _INTERPRETER_CACHE:
        try:
            probe = subprocess.run(
                [python, "-I", "-c", "pass"],
                user=uid,
                group=uid,
                extra_groups=[],
                env={"PATH": "/usr/bin:/bin"},
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=30,
                start_new_session=True,
            )
            _INTERPRETER_CACHE[key] = probe.returncode == 0
        except (OSError, subprocess.SubprocessError):
            _INTERPRETER_CACHE[key] = False
    return _INTERPRETER_CACHE[key]


def _choose_identity(limits: SandboxLimits) -> tuple[str, int | None, dict[str, Any]]:
    """(interpreter, uid to run as or None for the parent's, isolation notes)."""
    requested = limits.python or sys.executable
    notes: dict[str, Any] = {}
    if os.geteuid() != 0 or not limits.drop_privileges:
        notes["user"] = "parent's uid" + ("" if os.geteuid() != 0 else " (root: privileges not dropped)")
        return requested, None, notes
    uid = _SANDBOX_ID_BASE + secrets.randbelow(_SANDBOX_ID_SPAN)
    candidates = [requested]
    if limits.python is None:
        system_python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
        if system_python and system_python not in candidates:
            candidates.append(system_python)
    for python in candidates:
        if _runs_as(python, uid):
            notes["user"] = "unprivileged uid"
            if python != requested:
                notes["interpreter_note"] = f"{requested} is not executable by an unprivileged user"
            return python, uid, notes
    notes["user"] = "root (no interpreter executable by an unprivileged user: privileges not dropped)"
    return requested, None, notes


def _count_tasks_of(uid: int) -> int:
    """Threads of every process whose real uid is ``uid``."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", encoding="utf-8") as handle:
                fields = dict(line.split(":", 1) for line in handle if ":" in line)
        except OSError:
            continue
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            total += int(fields.get("Threads", "1").strip() or 1)
    return total


def _process_limit(uid: int | None, limits: SandboxLimits) -> tuple[int | None, str]:
    if uid is not None:
        return limits.max_processes, f"RLIMIT_NPROC={limits.max_processes} on the sandbox's own uid"
    if os.geteuid() == 0:
        return None, "none in the kernel (RLIMIT_NPROC does not apply to root)"
    budget = _count_tasks_of(os.getuid()) + limits.max_processes
    return budget, f"RLIMIT_NPROC={budget} (shared uid: the user's current tasks + {limits.max_processes})"


def _find_strays(uid: int | None, marker: str, exclude: int) -> list[int]:
    """Pids running as ``uid`` or carrying ``marker`` in their command line or environment."""
    found = []
    needle = marker.encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == exclude:
            continue
        pid = int(entry.name)
        try:
            if uid is not None and uid in _uids_of(pid):
                found.append(pid)
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if needle in handle.read():
                    found.append(pid)
                    continue
            with open(f"/proc/{pid}/environ", "rb") as handle:
                if needle in handle.read():
                    found.append(pid)
        except OSError:
            continue
    return found


def _children_of(pid: int) -> list[int]:
    """The live children of ``pid`` (from ``/proc``: its ``children`` list where the kernel keeps one, else every
    process's parent)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as handle:
            return [int(child) for child in handle.read().split()]
    except (OSError, ValueError):
        return sorted(_processes_whose(_PARENT, pid))


_PARENT, _GROUP = 1, 2  # the fields of /proc/<pid>/stat after the state (the first after the command's name)


def _processes_whose(field: int, value: int) -> set[int]:
    """The processes whose ``/proc/<pid>/stat`` ``field`` (:data:`_PARENT`, :data:`_GROUP`) is ``value``."""
    return {int(entry.name) for entry in os.scandir("/proc")
            if entry.name.isdigit() and _stat_field(int(entry.name), field) == value}


def _stat_field(pid: int, field: int) -> int | None:
    """Field ``field`` of ``/proc/<pid>/stat`` (also a zombie's), None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return int(handle.read().rsplit(b")", 1)[1].split()[field])
    except (OSError, ValueError, IndexError):
        return None


def _uids_of(pid: int) -> set[int]:
    """Real, effective, saved and filesystem uids of a process (from /proc, which does not hide them
    the way the owner of ``/proc/<pid>`` is hidden for non-dumpable processes)."""
    with open(f"/proc/{pid}/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("Uid:"):
                return {int(value) for value in line.split()[1:]}
    return set()


def _kill_everything(pgid: int, uid: int | None, marker: str, *, keeper: bool = False) -> int:
    """SIGKILL the process group, then every stray of the run until none is left; how many strays. A ``keeper`` (the
    child keeping a PID namespace) has its children killed first, its reaper and harness (the namespace's processes
    die with the reaper), and is given a moment to reap them and end: killed with it, they would be left to the
    trainer's init or subreaper, as zombies where that is the trainer itself (PID 1 of a container). The run's other
    processes orphaned to the trainer in such a case are reaped here (:func:`_reap_the_run_s_orphans`)."""
    children = _children_of(pgid) if keeper else []
    for pid in children:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 0.5
    while children and _exit_status_without_reaping(pgid) is None and time.monotonic() < deadline:
        time.sleep(0.005)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    killed: set[int] = set()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        strays = [pid for pid in _find_strays(uid, marker, os.getpid()) if _is_alive(pid)]
        if not strays:
            break
        for pid in strays:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                if pid != pgid:  # the group leader is the child itself, dying from the group kill
                    killed.add(pid)
        time.sleep(0.01)
    _reap_the_run_s_orphans(pgid, uid, killed)
    return len(killed)


def _reap_the_run_s_orphans(pgid: int, uid: int | None, killed: set[int]) -> None:
    """Reap this process's children that were the run's, every one of which is dead by now (the strays killed, the
    processes of the run's group or of the sandbox uid, killed or ended by themselves), as the orphans of a trainer that
    is a subreaper or PID 1 of a container are: nothing else would, and their zombies would count against its process
    limit. The child itself (``pgid``) is left to its own wait. (Under the trainer's uid, without a PID namespace, an
    ended process that left the group carries nothing that names the run.)"""

    def the_run_s(pid: int) -> bool:
        if pid in killed or _stat_field(pid, _GROUP) == pgid:
            return True
        with contextlib.suppress(OSError):
            return uid is not None and uid in _uids_of(pid)
        return False

    pending = {pid for pid in _processes_whose(_PARENT, os.getpid()) - {pgid} if the_run_s(pid)}
    deadline = time.monotonic() + 0.5
    while pending:
        for pid in list(pending):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    pending.discard(pid)
            except ChildProcessError:
                pending.discard(pid)
        if pending and time.monotonic() < deadline:
            time.sleep(0.005)
        elif pending:
            return


def _is_alive(pid: int) -> bool:
    """False for processes that are gone or zombies (already dead, waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            state = handle.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def _remove_tree(path: str) -> None:
    """Delete the folder ``path`` whatever the program did to it: ``shutil.rmtree``, and where that fails (a tree
    deeper than Python's recursion limit, folders whose owner took their permissions away) the system's ``chmod -R``
    and ``rm -rf``, which walk any depth."""
    try:
        shutil.rmtree(path)
        return
    except (OSError, RecursionError):
        pass
    for command in (["chmod", "-R", "u+rwx", "--", path], ["rm", "-rf", "--", path]):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=60, check=False)


def _remove_litter(uid: int) -> list[str]:
    """Delete entries owned by ``uid`` directly inside the world-writable directories."""
    removed = []
    for directory in _SHARED_WRITABLE_DIRS:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    _remove_tree(entry.path)
                else:
                    os.unlink(entry.path)
                removed.append(entry.path)
            except OSError:
                continue
    return removed


def _open_program_file(path: str) -> BinaryIO | None:
    """``path`` (in the working directory, where the program could replace it) opened for reading only if it is still
    a plain file of its own: not a symbolic link (the parent could read what the sandbox user cannot), a FIFO or a
    device (opening or reading it could block the parent), or a hard link to another file; ``None`` otherwise."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode) or status.st_nlink != 1:
        os.close(descriptor)
        return None
    return os.fdopen(descriptor, "rb")


def _read_program_text(path: str, limit: int, *, tail: bool = False) -> str:
    """At most ``limit`` bytes of the file (its first, or with ``tail`` its last), as text; "" when it is not a plain
    file of its own (:func:`_open_program_file`) or cannot be read."""
    handle = _open_program_file(path)
    if handle is None:
        return ""
    try:
        with handle:
            if tail:
                handle.seek(max(0, handle.seek(0, os.SEEK_END) - limit))
            return handle.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class _Attempt:
    """Follows one child process running cases ``first_case..``: parses its result messages into
    ``run`` and keeps the case in progress and that case's deadline.

    The program can write to the result pipe too, so a message is believed only in the harness's own order: one
    ``ready``, then for each case from ``first_case`` on, once, its ``start`` and its ``end``. A forged message can
    thus only move on, never restart a case or a clock, and an attempt never lasts past ``hard_deadline``."""

    def __init__(self, run: SandboxRun, cases: Sequence[SandboxCase], limits: SandboxLimits, first_case: int,
                 hard_deadline: float) -> None:
        self.run = run
        self.cases = cases
        self.limits = limits
        self.first_case = self.next_case = first_case
        self.hard_deadline = hard_deadline
        self.buffer = b""
        self.received = 0
        self.flooded = False
        self.isolation: dict[str, Any] = {}
        self.ready = False
        self.done = False
        self.current: int | None = None
        self.case_started = 0.0
        self.deadline = min(time.monotonic() + limits.startup_time, hard_deadline)

    def feed(self, data: bytes) -> None:
        """Take bytes read from the result pipe; complete lines are handled at once."""
        self.received += len(data)
        if self.received > _MAX_MESSAGE_BYTES:
            self.flooded = True
            return
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict):
                self._handle(message)

    def _handle(self, message: dict[str, Any]) -> None:
        event = message.get("event")
        now = time.monotonic()
        if event == "ready" and not self.ready:
            self.ready = True
            self.isolation = dict(message.get("isolation") or {})
            self.deadline = min(now + self.limits.time_limit, self.hard_deadline)
        elif event == "done":
            self.done = True
        elif event == "syntax_error":
            self.run.syntax_error = str(message.get("detail", "syntax error"))
        elif event == "violation":
            self.run.violations.append((str(message.get("kind")), str(message.get("detail"))))
        elif event == "start" and self.current is None and message.get("case") == self.next_case < len(self.cases):
            self.current = message["case"]
            self.next_case += 1
            self.case_started = now
            self.deadline = min(now + self.limits.time_limit, self.hard_deadline)
        elif event == "end" and self.current is not None and message.get("case") == self.current:
            error = message.get("error")
            self.run.outcomes[self.current] = CaseOutcome(
                "ok" if message.get("status") == "ok" else "error",
                None if error is None else str(error),
                seconds=now - self.case_started,
            )
            self.current = None
            self.deadline = min(now + self.limits.time_limit, self.hard_deadline)

    def time_out(self) -> None:
        """The deadline passed: the case in progress timed out. Raises :class:`SandboxError` when the
        interpreter did not even get ready (no program code had run: not the program's fault)."""
        now = time.monotonic()
        if not self.ready:
            raise SandboxError(f"the sandboxed interpreter did not start within {self.limits.startup_time:g} s")
        if self.current is not None:
            self.run.outcomes[self.current] = CaseOutcome(
                "timeout", f"ran past the {self.limits.time_limit:g} s time limit", seconds=now - self.case_started
            )
        elif not self.done and self.run.syntax_error is None and self.next_case < len(self.cases):
            # before the case started: the program's compilation (it runs before the first case of each attempt)
            self.run.outcomes[self.next_case] = CaseOutcome(
                "timeout", f"compiling the program ran past the {self.limits.time_limit:g} s time limit"
                if self.next_case == self.first_case else
                f"ran past the {self.limits.time_limit:g} s time limit before the case started")

    def child_exited(self, exit_status: int, first_case: int, stderr_path: str) -> int | None:
        """The child ended: attribute its death to the case in progress; the case to resume from.
        Raises :class:`SandboxError` when it died before the program could run."""
        if not self.ready:
            tail = _read_program_text(stderr_path, 500, tail=True).strip().splitlines()
            detail = tail[-1] if tail else f"exit status {exit_status}"
            raise SandboxError(
                f"the sandbox did not start ({detail}); the working directory (temp_dir) must be reachable "
                "and the interpreter runnable by the sandbox user"
            )
        if self.current is not None:
            self.run.outcomes[self.current] = _death_outcome(
                exit_status, self.cases[self.current].kind, time.monotonic() - self.case_started
            )
            return self.current + 1 if self.current + 1 < len(self.cases) else None
        if not self.done and self.run.syntax_error is None:
            for index in range(first_case, len(self.cases)):
                if self.run.outcomes[index].status == "not_run":
                    self.run.outcomes[index] = CaseOutcome(
                        "crashed", f"the process ended between test cases (exit status {exit_status})"
                    )
        return None


def unsupported_system_reason() -> str | None:
    """Why the sandbox cannot run on this system (it needs Linux: ``/proc``, ``prctl``, ``unshare``), or None."""
    if sys.platform.startswith("linux"):
        return None
    return (f"the code reward's sandbox runs on Linux only (it isolates programs with /proc, prctl and namespaces); "
            f"this system is {sys.platform!r}: score code on a Linux machine or in a Linux container")


def run_in_sandbox(
    program: str, cases: Sequence[SandboxCase], limits: SandboxLimits | None = None, *, stop: threading.Event | None = None,
    preamble: str = "",
) -> SandboxRun:
    """Run ``program`` (Python source) on every case of ``cases`` under ``limits``; see the module doc. ``preamble``
    (Python source) runs in the program's namespace before it, each time the program runs: names a judge gives the
    program without its importing them (LeetCode's ``List``).

    Never raises because of what the program does; raises :class:`SandboxError` (or ``OSError``) when
    the sandbox itself cannot be set up or its interpreter does not start, and ``ValueError`` /
    ``TypeError`` for bad arguments. Setting ``stop`` (from another thread: an interrupted batch) kills the program
    within a twentieth of a second and raises :class:`SandboxError`.
    """
    for name, text in (("program", program), ("preamble", preamble)):
        if not isinstance(text, str):
            raise TypeError(f"{name} must be a string, got {type(text).__name__}")
    reason = unsupported_system_reason()
    if reason is not None:
        raise SandboxError(reason)
    cases = list(cases)
    if not all(isinstance(case, SandboxCase) for case in cases):
        raise TypeError("cases must be SandboxCase objects")
    limits = limits or SandboxLimits()
    started = time.monotonic()
    python, uid, isolation = _choose_identity(limits)
    isolation["interpreter"] = python
    marker = f"{SANDBOX_MARKER}_{secrets.token_hex(8)}"
    outer = tempfile.mkdtemp(prefix="entrorl-sandbox-", dir=limits.temp_dir)
    workdir = os.path.join(outer, "work")
    stderr_path = os.path.join(outer, "stderr.txt")
    stderr_fd: int | None = None
    run = SandboxRun(
        outcomes=[CaseOutcome("not_run") for _ in cases], isolation=isolation, uid=uid, marker=marker, workdir=workdir
    )
    try:
        processes, process_note = _process_limit(uid, limits)
        isolation["process_limit"] = process_note
        _prepare_workdir(outer, workdir, cases, uid)
        stderr_fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        # every attempt's start-up, and for each case its run and the pause after it, at most: whatever the messages
        hard_deadline = started + (len(cases) + 1) * limits.startup_time + (2 * len(cases) + 1) * limits.time_limit
        context = _RunContext(python, uid, workdir, marker, program, preamble, cases, processes, limits, run, stderr_fd,
                              stderr_path, hard_deadline, stop)
        first_case = 0
        strays = 0
        while True:
            attempt_result = _run_attempt(context, first_case)
            strays += attempt_result.strays
            if attempt_result.next_case is None or attempt_result.next_case <= first_case:
                break
            first_case = attempt_result.next_case
        isolation["strays_killed"] = strays
        run.stderr_tail = _read_program_text(stderr_path, 2000, tail=True)
        for index, case in enumerate(cases):
            if case.kind == "stdin" and run.outcomes[index].status in ("ok", "error"):
                stdout = _read_program_text(os.path.join(workdir, f"case{index}.out"), limits.max_file_mb * 1024 * 1024)
                outcome = run.outcomes[index]
                run.outcomes[index] = CaseOutcome(outcome.status, outcome.error, stdout, outcome.seconds)
    finally:
        if stderr_fd is not None:
            os.close(stderr_fd)
        _remove_tree(outer)
        if uid is not None:
            litter = _remove_litter(uid)
            if litter:
                isolation["litter_removed"] = litter
    run.seconds = time.monotonic() - started
    return run


def _prepare_workdir(outer: str, workdir: str, cases: Sequence[SandboxCase], uid: int | None) -> None:
    """The working directory ``outer/work``, the sandbox uid's, with the inputs of stdin cases written by the parent;
    ``outer`` stays the parent's, which the sandbox uid may only pass through (so it cannot rename the working
    directory away and put a link to another folder in its place)."""
    os.mkdir(workdir)
    for index, case in enumerate(cases):
        if case.kind == "stdin":
            with open(os.path.join(workdir, f"case{index}.in"), "w", encoding="utf-8") as handle:
                handle.write(case.text)
    for name in os.listdir(workdir):
        os.chmod(os.path.join(workdir, name), 0o444)
    if uid is not None:
        os.chown(workdir, uid, uid)
    os.chmod(workdir, 0o700)
    os.chmod(outer, 0o711)


@dataclass(frozen=True)
class _RunContext:
    """What every attempt of one ``run_in_sandbox`` call shares."""

    python: str
    uid: int | None
    workdir: str
    marker: str
    program: str
    preamble: str
    cases: Sequence[SandboxCase]
    processes: int | None  # the RLIMIT_NPROC to set, None for none
    limits: SandboxLimits
    run: SandboxRun  # the outcomes, filled in by the attempts
    stderr_fd: int  # the child's stderr, one file for every attempt
    stderr_path: str
    hard_deadline: float  # time.monotonic() past which no attempt runs, whatever the child reports
    stop: threading.Event | None  # set: kill the program now


@dataclass
class _AttemptResult:
    next_case: int | None
    strays: int


def _run_attempt(context: _RunContext, first_case: int) -> _AttemptResult:
    """Start one child for cases ``first_case..`` and follow it until it ends or must be stopped.

    Returns the case to resume from in a fresh child (after a crash), or None when the run is over.
    """
    cases, limits, run, workdir, uid = context.cases, context.limits, context.run, context.workdir, context.uid
    stderr_fd = context.stderr_fd
    remaining = len(cases) - first_case
    if first_case > 0:  # what an earlier attempt's program may have changed, and the next one needs
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(workdir), 0o711)
            os.chmod(workdir, 0o700)
        fcntl.fcntl(stderr_fd, fcntl.F_SETFL, os.O_APPEND)  # the descriptor is shared: its flags and offset too
        os.lseek(stderr_fd, 0, os.SEEK_END)
    read_fd, write_fd = os.pipe()
    config = {
        "result_fd": write_fd,
        "workdir": workdir,
        "program": context.program,
        "preamble": context.preamble,
        "cases": [{"kind": case.kind, "text": "" if case.kind == "stdin" else case.text} for case in cases],
        "first_case": first_case,
        "network_namespace": limits.network_namespace,
        "read_only_filesystem": limits.read_only_filesystem,
        "audit_hook": limits.audit_hook,
        "allow_subprocesses": limits.allow_subprocesses,
        "pid_namespace": context.uid is None,
        "limits": {
            "memory_bytes": limits.memory_mb * 1024 * 1024,
            "cpu_seconds": int(limits.time_limit * max(remaining, 1)) + 2,
            "file_bytes": limits.max_file_mb * 1024 * 1024,
            "open_files": limits.max_open_files,
            "processes": context.processes,
            "max_processes": limits.max_processes,
        },
    }
    # the configuration as a file with no name in any folder (the child reads it from its descriptor): no program can
    # find, replace or read it by name
    with tempfile.TemporaryFile(dir=os.path.dirname(workdir)) as config_file:
        config_file.write(json.dumps(config).encode("utf-8"))
        config_file.flush()
        config_file.seek(0)
        try:
            child = _start_child(
                [context.python, "-I", "-B", "-c", _BOOTSTRAP, context.marker, str(config_file.fileno())], workdir,
                context.marker, stderr_fd, (write_fd, config_file.fileno()), uid,
            )
        finally:
            os.close(write_fd)
    attempt = _Attempt(run, cases, limits, first_case, context.hard_deadline)
    next_case: int | None = None
    pipe_open = True
    try:
        while True:
            if context.stop is not None and context.stop.is_set():
                raise SandboxError("stopped: the run was interrupted")
            now = time.monotonic()
            if now >= attempt.deadline:
                attempt.time_out()
                break
            wait = min(0.05, attempt.deadline - now)
            if pipe_open and select.select([read_fd], [], [], wait)[0]:
                data = os.read(read_fd, 65536)
                if data:
                    attempt.feed(data)
                else:  # every writer closed it; keep polling the child without spinning on EOF
                    pipe_open = False
            elif not pipe_open:
                time.sleep(wait)
            if attempt.flooded:
                if attempt.current is not None:
                    run.outcomes[attempt.current] = CaseOutcome("crashed", "flooded the sandbox's result channel")
                break
            exit_status = _exit_status_without_reaping(child.pid)
            if exit_status is not None:
                if pipe_open:
                    _drain_pipe(read_fd, attempt)
                next_case = attempt.child_exited(exit_status, first_case, context.stderr_path)
                break
    finally:
        os.close(read_fd)
        strays = _kill_everything(child.pid, uid, context.marker, keeper=bool(attempt.isolation.get("pid_namespace")))
        with contextlib.suppress(ChildProcessError):
            child.wait()
    run.isolation.update(attempt.isolation)
    return _AttemptResult(next_case, strays)


def _start_child(argv: list[str], workdir: str, marker: str, stderr_fd: int, pass_fds: tuple[int, ...], uid: int | None):
    """Start the sandbox's child process; SandboxError if the interpreter cannot be started."""
    identity: dict[str, Any] = {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}
    try:
        return subprocess.Popen(
            argv,
            cwd=workdir,
            env=_minimal_environment(workdir, marker),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr_fd,
            pass_fds=pass_fds,
            start_new_session=True,
            **identity,
        )
    except OSError as exc:
        raise SandboxError(f"cannot start the sandbox's interpreter {argv[0]!r}: {exc}") from exc


def _drain_pipe(read_fd: int, attempt: _Attempt) -> None:
    """Read what is left in the pipe without blocking (strays may still hold its write end)."""
    while select.select([read_fd], [], [], 0)[0]:
        data = os.read(read_fd, 65536)
        if not data:
            return
        attempt.feed(data)
        if attempt.flooded:
            return


def _exit_status_without_reaping(pid: int) -> int | None:
    """The child's exit status once it has ended, leaving it a zombie so its pid (the process group
    id) cannot be reused before the group is killed; ``-N`` for death by signal N."""
    try:
        result = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return -1
    if result is None or result.si_pid == 0:
        return None
    if result.si_code == os.CLD_EXITED:
        return result.si_status
    return -result.si_status


def _death_outcome(exit_status: int, kind: str, seconds: float) -> CaseOutcome:
    """How a case of ``kind`` ended when the process died during it."""
    if exit_status == 0:
        if kind == "stdin":  # os._exit(0) ends a script: the output written so far counts
            return CaseOutcome("ok", None, seconds=seconds)
        return CaseOutcome("error", "the process exited before the test finished", seconds=seconds)
    if exit_status < 0:
        number = -exit_status
        if number == signal.SIGXCPU:
            return CaseOutcome("timeout", "CPU time limit (SIGXCPU)", seconds=seconds)
        return CaseOutcome("crashed", f"killed by {_signal_name(number)}", seconds=seconds)
    return CaseOutcome("error", f"exited with status {exit_status}", seconds=seconds)

