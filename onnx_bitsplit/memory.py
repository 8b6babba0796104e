"""The process's memory: what it holds, and how glibc's malloc keeps and returns freed blocks
(through ctypes; a no-op where there is no glibc)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
except OSError:  # no C library by that name (Windows)
    _LIBC = None


def resident_bytes() -> int:
    """The process's resident memory now, from /proc (Linux; where glibc's malloc_trim is)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """The process's peak resident memory in bytes (0 where the platform does not say).

    On Linux from /proc (VmHWM): getrusage's figure keeps the peak of the process that started
    this one across exec, so a conversion launched by a large process would report that one's."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters, from glibc's malloc.h


def keep_freed_blocks() -> None:
    """Have glibc's malloc (a no-op elsewhere) serve blocks up to 32 MiB from its heap and keep
    the freed ones there for the next (until BatchStore.release_freed). By default it maps each
    block of a few MiB afresh and unmaps it when freed, so every batch copied out of onnxruntime
    faults its pages in again (docs/scaling.md). Process-wide, so the
    command sets it, not the library."""
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest
        _LIBC.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)



def release_freed_memory(*, above: int | None = None) -> None:
    """Return the heap's freed blocks to the system (glibc's malloc_trim) if the process holds
    more than `above` bytes (None: always)."""
    if _LIBC is None or not hasattr(_LIBC, "malloc_trim"):
        return
    if above is None or resident_bytes() > above:
        _LIBC.malloc_trim(0)
