"""Keep freed CPU memory in the process for reuse, instead of handing it back to the kernel after every tensor.

glibc's ``malloc`` serves blocks above its mmap threshold (128 KiB by default, raised dynamically up to 32 MiB)
with a fresh ``mmap`` and returns them with ``munmap`` when freed, and it trims the top of the heap once more than
128 KiB there is free. A training step on the CPU allocates and frees the same activation and gradient tensors
(hundreds of KiB to tens of MiB each) over and over, so every step touches new pages: a page fault and a page of
zeros per 4 KiB before the first write. Raising both thresholds keeps those blocks in the heap, where the next
step's tensors of the same sizes reuse them.

This is process-wide and lasts until the process ends; the cost is that up to ``trim_threshold`` bytes of freed
memory stay resident. ``benchmarks/bench_trainer.py`` measures the effect on a whole step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["MMAP_THRESHOLD_MAX", "retain_freed_memory"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# the largest mmap threshold glibc accepts on 64-bit systems (HEAP_MAX_SIZE / 2)
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024

_applied: tuple[int, int] | None = None


def retain_freed_memory(mmap_threshold: int = MMAP_THRESHOLD_MAX, trim_threshold: int = 1 << 30) -> bool:
    """Ask glibc to serve blocks below ``mmap_threshold`` bytes from the heap and to keep up to ``trim_threshold``
    bytes of freed heap memory instead of returning it to the kernel (``mallopt(M_MMAP_THRESHOLD)`` and
    ``mallopt(M_TRIM_THRESHOLD)``).

    Returns True when both settings took effect; False on a C library without ``mallopt`` (macOS, Windows, musl),
    changing nothing, or when glibc refuses a value (a refused trim threshold comes after the mmap threshold took
    effect). Calling it again with the values last applied is a no-op.
    """
    global _applied
    if not 0 < mmap_threshold <= MMAP_THRESHOLD_MAX:
        raise ValueError(f"mmap_threshold must be in (0, {MMAP_THRESHOLD_MAX}] bytes, got {mmap_threshold}")
    if trim_threshold <= 0:
        raise ValueError(f"trim_threshold must be > 0 bytes, got {trim_threshold}")
    if _applied == (mmap_threshold, trim_threshold):
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # not glibc: other C libraries ignore or lack these parameters
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    trim = min(trim_threshold, 2**31 - 1)
    if libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) != 1:
        return False
    if libc.mallopt(_M_TRIM_THRESHOLD, trim) != 1:
        _applied = None  # the mmap threshold did change: what was applied before no longer holds
        return False
    _applied = (mmap_threshold, trim_threshold)
    return True
