"""Keep freed CPU memory in the process instead of handing it back to the OS after every meta-step.

A meta-step keeps every task's query graph alive until its one backward (so that DDP all-reduces once), about
100 MB per task at 5-way 15 queries on conv4. glibc serves blocks that large with mmap and returns them with
munmap when they are freed, so the next step faults every page in again and the kernel zeroes it: measured about
25,000 minor page faults per meta-step at meta-batch 4 (bench/results/layout_cpu.json, docs/benchmarks.md), and
a clone-and-adapt loop, which frees each task before the next, pays none. Raising glibc's mmap and trim thresholds
makes freed blocks stay in the heap for the next step, as GPU caching allocators do: the process keeps its peak
memory, and the faults go away.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEEP_BYTES = 1 << 30  # blocks up to 1 GiB come from the heap; up to 1 GiB of free heap top is kept


def keep_freed_memory() -> bool:
    """Apply the thresholds once per process (glibc only); True when they are in place."""
    global _applied
    if _applied is None:
        _applied = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
            except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
                _applied = False
    return _applied


_applied: bool | None = None
