"""The allocator setting the engine applies (its effect is measured in docs/benchmarks.md, not timed here)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# In a fresh process (glibc's thresholds at their defaults): is a 16 MiB block served from the brk heap,
# where a freed block stays for the next step, or mmapped, so that free() hands it back to the OS?
PROBE = """
import ctypes, ctypes.util, sys
if sys.argv[1] == "apply":
    from xytune.profiler.host_memory import keep_freed_memory
    assert keep_freed_memory() is True
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
block = libc.malloc(16 << 20)
print("heap" if block < libc.sbrk(0) else "mmap")
"""


def _where(mode: str) -> str:
    return subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="the setting is glibc's")
def test_large_blocks_come_from_the_heap_only_with_the_setting():
    assert _where("default") == "mmap"  # glibc's default: a 16 MiB block is mmapped, and munmapped on free
    assert _where("apply") == "heap"  # after keep_freed_memory(): from the heap, kept when freed
