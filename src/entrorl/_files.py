"""Writing a file, a folder or a set of files whole, shared by every layer of the package (the standard library only).

A file is written through a temporary file beside it (``.NAME.tmp-PID``), flushed to disk and renamed over it, so
that a crash leaves the old file or the new one, never part of either. A symbolic link is followed: the file it names
is replaced and the link stays; unless the writer says not to (``follow_links=False``, for the files a program keeps in
a folder of its own, such as a run directory received from someone else, where a link planted at one of them must not
make the program replace a file elsewhere): the link is then replaced by the file, and what it names left as it is.
What cannot be replaced is written into as it is: a device, a pipe or a socket (``/dev/null``), and a process's open
descriptors (``/dev/stdout``, ``/dev/fd/1``: a pipe, or a file the shell redirected into, which gets the text where
this process's own output has reached; another process's descriptor, or a read-only one, is opened anew and gets it
at the end).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

try:
    import fcntl
except ImportError:  # not a POSIX system: no /proc or /dev/fd descriptors either
    fcntl = None

__all__ = ["make_own_folder", "modes_as_the_umask_gives", "naming_file", "put_in_place_together",
           "refuse_a_name_that_is_not_utf8", "staging_folder", "write_atomically", "write_folder_atomically",
           "written_in_place"]

# /proc/self/fd/1, /proc/<pid>/fd/1, /dev/fd/1 (the last is this process's)
_DESCRIPTOR = re.compile(r"(?:/proc/(?P<owner>[^/]+)|/dev)/fd/(?P<number>[^/]+)")
_MAX_LINKS = 40  # as the kernel's own limit on the links one path may follow


def make_own_folder(path: Path) -> Path:
    """``path`` made a folder (with those above it) where a program keeps files of its own: a link there is removed
    first, not followed (one planted in a folder received from someone else would have its files written elsewhere)."""
    if path.is_symlink():
        path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def refuse_a_name_that_is_not_utf8(path: str | os.PathLike[str], what: str) -> None:
    """``ValueError`` naming ``path`` when its name is not UTF-8 (bytes from another system's encoding, which Python
    keeps as surrogates): the ``tokenizers`` library, which loads and saves every tokenizer, takes UTF-8 paths only."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")  # its bytes that are not UTF-8 as \xNN
        raise ValueError(f"{what} {shown} has a name that is not UTF-8, where the tokenizers library opens and saves "
                         "tokenizers by UTF-8 names only; rename it") from None


def written_in_place(path: str | os.PathLike[str]) -> bool:
    """Whether a write to ``path`` goes into what is there rather than replacing it: ``path`` is, or links through, a
    process's descriptor (``/dev/stdout`` links to ``/proc/self/fd/1``, which may name a pipe or a redirected file),
    or names something other than a regular file or a folder (a device, a pipe, a socket)."""
    if _descriptor_path(path) is not None:
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:  # nothing there yet, or a dangling link: a new file
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _descriptor_path(path: str | os.PathLike[str]) -> str | None:
    """The ``/proc/<pid>/fd/<n>`` or ``/dev/fd/<n>`` that ``path`` is or links through, else None."""
    hop = os.path.abspath(path)
    for _ in range(_MAX_LINKS):
        if _DESCRIPTOR.fullmatch(hop):
            return hop
        if not os.path.islink(hop):
            return None
        hop = os.path.normpath(os.path.join(os.path.dirname(hop), os.readlink(hop)))
    return None


def _own_descriptor(path: str | os.PathLike[str]) -> int | None:
    """The number of this process's open, writable descriptor that ``path`` names (``/dev/stdout``: 1), else None."""
    hop = _descriptor_path(path)
    match = None if hop is None else _DESCRIPTOR.fullmatch(hop)
    if match is None or match["owner"] not in (None, "self", str(os.getpid())):
        return None
    if not re.fullmatch(r"0|[1-9][0-9]{0,8}", match["number"], flags=re.ASCII):  # the kernel's names, nothing else
        return None
    number = int(match["number"])
    if fcntl is None:
        return number
    try:
        writable = fcntl.fcntl(number, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY
    except OSError:  # not open: opening the path says so
        return None
    return number if writable else None  # a read-only one (a pipe's reading end) is opened anew for writing


def write_atomically(path: str | os.PathLike[str], write: Callable[[BinaryIO], Any], *, make_folder: bool = False,
                     follow_links: bool = True) -> None:
    """Call ``write`` with a binary file whose content then replaces ``path``'s as one rename (see the module's
    description for links, devices and descriptors, which are written into: one of this process's own, such as
    ``/dev/stdout``, through the descriptor itself, so that what the process writes next follows the text; with
    ``follow_links=False`` a link at ``path`` is replaced instead). A file replaced keeps its permission bits;
    ``make_folder`` creates the folder it goes into (a link's target's). When the write fails the temporary file goes,
    and an ``OSError`` names ``path`` (a full disk's names none)."""
    replacing_a_link = not follow_links and os.path.islink(path)
    if not replacing_a_link and written_in_place(path):
        try:
            descriptor = _own_descriptor(path)
            if descriptor is None:
                with open(path, "ab") as handle:
                    write(handle)
                return
            for stream in (sys.stdout, sys.stderr):  # what Python holds for the descriptor goes first
                with contextlib.suppress(AttributeError, OSError, ValueError):
                    if stream.fileno() == descriptor:
                        stream.flush()
            with os.fdopen(os.dup(descriptor), "wb") as handle:  # the dup shares the descriptor's position
                write(handle)
        except OSError as error:
            raise naming_file(error, Path(path)) from None
        return
    target = Path(os.path.abspath(path) if replacing_a_link else os.path.realpath(path))
    if make_folder:
        target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if not replacing_a_link and target.is_file():
            os.chmod(temporary, stat.S_IMODE(target.stat().st_mode))
        os.replace(temporary, target)
    except BaseException as error:
        with contextlib.suppress(OSError):
            temporary.unlink()
        if isinstance(error, OSError):
            raise naming_file(error, Path(path), instead_of=temporary) from None
        raise


def write_folder_atomically(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> None:
    """Call ``write`` with a new folder beside ``path`` (``.NAME.tmp-PID``), then move it to ``path``: a crash or a
    Ctrl-C while writing leaves what was at ``path`` as it was. A folder already at ``path`` is moved aside and removed
    once the new one is in place (two renames: an exception between them puts the old one back; a process killed there
    leaves it as ``.NAME.old-PID``). A link is followed: the folder it names is replaced."""
    target = Path(os.path.realpath(path))
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    aside = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    moved_aside = False
    try:
        write(temporary)
        if target.is_dir():
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(target, aside)
            moved_aside = True
        os.replace(temporary, target)
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException as error:
        if moved_aside and not target.exists():  # stopped between the two renames: the old folder goes back
            with contextlib.suppress(OSError):
                os.replace(aside, target)
        shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(error, OSError):
            raise naming_file(error, Path(path), instead_of=temporary) from None
        raise


@contextlib.contextmanager
def staging_folder(directory: Path, label: str) -> Iterator[Path]:
    """A new hidden folder ``.LABEL.tmp-PID`` in ``directory`` (on its file system, so that what is staged there goes
    into place by renames, :func:`put_in_place_together`), removed with whatever is left in it when the block ends."""
    staging = directory / f".{label}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def put_in_place_together(staging: Path, directory: Path, names: Sequence[str], *, stale: Sequence[str] = (),
                          follow_links: bool = True) -> None:
    """Put each of ``names`` from ``staging`` in ``directory`` as one set, and take away the entries of ``stale`` (an
    earlier set's that this one has not; a link among them goes, not what it names). A name that is a link is
    followed, and what it names is replaced (two names naming one file: the first's), unless ``follow_links`` is
    False: the link is then replaced; a pipe or a device (``/dev/null``) is written into. What each name replaces,
    and each stale entry, is first moved aside beside itself; the set in, what was moved aside is removed. A failure on the way (a link to another file system takes a
    copy, which can fail) or an interrupt moves back what was moved aside (renames only) before removing what came in,
    so a second interrupt there leaves the earlier set whole, with hidden ``.NAME.new-PID-...`` left. A replaced
    file's permission bits are kept; an ``OSError`` names the path it concerns."""
    moves: list[tuple[Path, Path, bool]] = []  # (a path, where what was there goes aside, whether anything was there)
    placed: set[Path] = set()
    concerned = directory
    try:
        for name in names:
            staged, final = staging / name, directory / name
            concerned = final
            replacing_a_link = not follow_links and final.is_symlink()
            # a pipe or a device cannot be moved aside, nor put back
            if not replacing_a_link and staged.is_file() and written_in_place(final):
                write_atomically(final, lambda handle: handle.write(staged.read_bytes()))
                continue
            target = Path(os.path.abspath(final) if replacing_a_link else os.path.realpath(final))
            if target in placed:
                continue
            placed.add(target)
            concerned = target
            there = target.exists() or target.is_symlink()
            if there and not replacing_a_link and target.is_file() and staged.is_file():
                os.chmod(staged, stat.S_IMODE(target.stat().st_mode))
            aside = _hidden_name(target, "old")
            moves.append((target, aside, there))
            if there:
                os.replace(target, aside)
            try:
                os.replace(staged, target)
            except OSError as error:
                if error.errno != errno.EXDEV:
                    raise
                (shutil.copytree if staged.is_dir() else shutil.copy2)(staged, target)  # another file system
        for name in stale:
            entry = directory / name
            concerned = entry
            if (entry.exists() or entry.is_symlink()) and not written_in_place(entry):
                aside = _hidden_name(entry, "old")
                moves.append((entry, aside, True))
                os.replace(entry, aside)
    except BaseException as error:
        failure = naming_file(error, concerned, instead_of=staging / concerned.name) if isinstance(error, OSError) \
            else error
    else:
        failure = None
    if failure is not None:  # put back outside the except clause, so that a signal's exception keeps its context
        _put_back(moves, failure)
        raise failure
    for _, aside, there in moves:  # the set is in: what is left to do is tidying, which may not fail it
        if there:
            try:
                _remove_entry(aside)
            except OSError as error:
                warnings.warn(f"could not remove {aside}, what the new files replaced: {error}", stacklevel=2)


def _put_back(moves: list[tuple[Path, Path, bool]], failure: BaseException) -> None:
    """Undo :func:`put_in_place_together`'s ``moves``: first, renames only, with SIGINT and SIGTERM held until they are
    done (whichever thread they reach), what came in goes to a hidden name and what was moved aside comes back (read
    from the file system, so that a move an interrupt cut off from its record counts too); then what came in is
    removed. ``failure``, why they are undone, is the context of an exception a signal's handler raises meanwhile."""
    incoming, stopped = [], []

    def step(action: Callable[[], Any]) -> bool:
        """Whether ``action`` was done; an exception other than ``OSError`` is kept for the end, the renames go on."""
        met = _until_done(action, once=True)
        stopped.extend(error for error in met if not isinstance(error, OSError))
        return not met

    with _stop_signals_held(context=failure):
        for path, aside, there in reversed(moves):
            moved_aside = there and (aside.exists() or aside.is_symlink())
            if (path.exists() or path.is_symlink()) and (moved_aside or not there):
                new = _hidden_name(path, "new")
                if step(lambda: os.replace(path, new)):
                    incoming.append(new)
            if moved_aside:
                step(lambda: os.replace(aside, path))
    if stopped:
        stopped[0].__context__ = failure
        raise stopped[0]
    for new in incoming:
        with contextlib.suppress(OSError):
            _remove_entry(new)


@contextlib.contextmanager
def _stop_signals_held(*, context: BaseException | None = None):
    """SIGINT and SIGTERM held back inside, then delivered as they would have been (their handlers, or their default
    actions), every one of them, SIGTERM last: in the main thread, handlers that only note them stand in for the others
    meanwhile, so a signal that reaches any of the process's threads waits. Elsewhere (another thread, where handlers
    cannot be set), nothing. A signal the process ignores stays ignored. A signal that arrives while the handlers are
    swapped, in or out, does not stop the swap (nor what is held). Of the exceptions the handlers raise, the caller
    gets a termination's (SIGTERM's, a handler's ``SystemExit``) over an interrupt's (exactly ``KeyboardInterrupt``),
    the last of them, with the others and then ``context`` before it in its chain of contexts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous: dict[int, Any] = {}

    def note(received, frame) -> None:
        noted.append(received)

    def hold() -> None:  # again after an interruption: what it did stays done
        for number in (signal.SIGINT, signal.SIGTERM):
            if number not in previous:
                if signal.getsignal(number) is signal.SIG_IGN:
                    continue
                previous[number] = signal.getsignal(number)  # first: a signal between the two lines finds it kept
            signal.signal(number, note)

    raised = _until_done(hold)
    try:
        yield
    finally:
        raised += _until_done(lambda: [signal.signal(number, handler if handler is not None else signal.SIG_DFL)
                                       for number, handler in previous.items()])
        for number in sorted(set(noted), key=lambda number: number == signal.SIGTERM):
            raised += _until_done(lambda: signal.raise_signal(number), once=True)
        if raised:
            final = next((error for error in reversed(raised) if type(error) is not KeyboardInterrupt), raised[-1])
            chain = [context, *(error for error in raised if error is not final), final]
            for earlier, later in zip(chain, chain[1:]):
                later.__context__ = earlier
            raise final


def _until_done(action: Callable[[], Any], *, once: bool = False) -> list[BaseException]:
    """Do ``action`` (idempotent) again until it runs through without being interrupted (a signal handler's exception,
    raised between two of its steps), or, with ``once``, once; the exceptions it met. An error of its own
    (an ``Exception``) ends it."""
    met: list[BaseException] = []
    while True:
        try:
            action()
            return met
        except Exception as error:
            return [*met, error]
        except BaseException as error:
            met.append(error)
            if once:
                return met


def _hidden_name(path: Path, what: str) -> Path:
    """A hidden name beside ``path`` that nothing has: ``.NAME.<what>-PID-<random>`` (a process of the same id may
    have left one of its own, cut short)."""
    return path.with_name(f".{path.name}.{what}-{os.getpid()}-{secrets.token_hex(4)}")


def _remove_entry(path: Path) -> None:
    """Remove ``path``, a folder with what it holds; nothing when there is none."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def naming_file(error: OSError, path: Path, *, instead_of: Path | None = None) -> OSError:
    """``error`` with ``path`` as its file name when it names none (a full disk's write error names no file), or
    names ``instead_of`` (the temporary file of an atomic write): "[Errno 28] No space left on device: 'path'"."""
    if error.errno is None or error.filename not in (None, None if instead_of is None else str(instead_of)):
        return error
    return type(error)(error.errno, error.strerror, str(path))


def modes_as_the_umask_gives(directory: str | os.PathLike[str]) -> None:
    """Give every regular file under ``directory`` the permission bits a new file gets under this process's umask
    (``0o666 & ~umask``). safetensors writes weight files 0600 whatever the umask: a teammate whom the umask lets
    read the rest of a run directory (or a shared cache) could not load its models."""
    bits = 0o666 & ~_umask()
    for folder, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path) and stat.S_IMODE(os.stat(path).st_mode) != bits:
                os.chmod(path, bits)


def _umask() -> int:
    """This process's umask, read without changing it where /proc says it (Linux), else set and put back."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status", encoding="ascii") as handle:
            return int(next(line for line in handle if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
