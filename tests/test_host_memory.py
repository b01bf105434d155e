"""The allocator setting the engine applies (its effect is measured in docs/benchmarks.md, not timed here)."""

from __future__ import annotations

import platform
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="the setting is glibc's")
def test_glibc_accepts_the_thresholds_once_per_process():
    from xytune.runtime.host_memory import keep_freed_memory

    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # cached: applied once
