"""Keep freed host memory in the process instead of handing it back to the OS after every step.

glibc returns large freed blocks to the kernel (munmap, heap trimming), so the
next step's tensors of the same size are page-faulted in again, one 4 KiB
page at a time. On a VM a step of the engine then spends up to half its
attention time in page faults (docs/benchmarks.md). Raising glibc's mmap and
trim thresholds makes freed blocks reusable, which is what the tcmalloc or
jemalloc preloads recommended for CPU inference achieve; a serving process
keeps its working set anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit: blocks above it are always mmapped


@functools.cache
def keep_freed_memory() -> bool:
    """Apply once per process; False where the C library is not glibc (nothing changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
