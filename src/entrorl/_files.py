"""Writing a file whole, shared by every layer of the package (the standard library only).

A file is written through a temporary file beside it (``.NAME.tmp-PID``), flushed to disk and renamed over it, so
that a crash leaves the old file or the new one, never part of either. A symbolic link is followed: the file it names
is replaced and the link stays. What cannot be replaced is written into as it is: a device, a pipe or a socket
(``/dev/null``), and a process's open descriptors (``/dev/stdout``, ``/dev/fd/1``: a pipe, or a file the shell
redirected into, which gets the text appended).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["naming_file", "write_atomically", "written_in_place"]

_DESCRIPTOR = re.compile(r"/proc/[^/]+/fd/[^/]+|/dev/fd/[^/]+")  # /proc/self/fd/1, /proc/<pid>/fd/1, /dev/fd/1
_MAX_LINKS = 40  # as the kernel's own limit on the links one path may follow


def written_in_place(path: str | os.PathLike[str]) -> bool:
    """Whether a write to ``path`` goes into what is there rather than replacing it: ``path`` is, or links through, a
    process's descriptor (``/dev/stdout`` links to ``/proc/self/fd/1``, which may name a pipe or a redirected file),
    or names something other than a regular file or a folder (a device, a pipe, a socket)."""
    hop = os.path.abspath(path)
    for _ in range(_MAX_LINKS):
        if _DESCRIPTOR.fullmatch(hop):
            return True
        if not os.path.islink(hop):
            break
        hop = os.path.normpath(os.path.join(os.path.dirname(hop), os.readlink(hop)))
    try:
        mode = os.stat(path).st_mode
    except OSError:  # nothing there yet, or a dangling link: a new file
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def write_atomically(path: str | os.PathLike[str], write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write`` with a binary file whose content then replaces ``path``'s as one rename (see the module's
    description for links, devices and descriptors, which are written into). A file replaced keeps its permission
    bits. When the write fails the temporary file goes, and an ``OSError`` names ``path`` (a full disk's names none)."""
    if written_in_place(path):
        try:
            with open(path, "ab") as handle:
                write(handle)
        except OSError as error:
            raise naming_file(error, Path(path)) from None
        return
    target = Path(os.path.realpath(path))
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if target.is_file():
            os.chmod(temporary, stat.S_IMODE(target.stat().st_mode))
        os.replace(temporary, target)
    except BaseException as error:
        with contextlib.suppress(OSError):
            temporary.unlink()
        if isinstance(error, OSError):
            raise naming_file(error, Path(path), instead_of=temporary) from None
        raise


def naming_file(error: OSError, path: Path, *, instead_of: Path | None = None) -> OSError:
    """``error`` with ``path`` as its file name when it names none (a full disk's write error names no file), or
    names ``instead_of`` (the temporary file of an atomic write): "[Errno 28] No space left on device: 'path'"."""
    if error.errno is None or error.filename not in (None, None if instead_of is None else str(instead_of)):
        return error
    return type(error)(error.errno, error.strerror, str(path))
