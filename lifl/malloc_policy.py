"""Keep freed message buffers in malloc's arenas: no page faults and zeroing per received chunk.

grpcio hands every received message to Python as a fresh ``bytes`` of the chunk's size
(2 MiB by default). glibc serves an allocation that large with its own ``mmap`` and gives it back
with ``munmap`` when freed (or, once its threshold has adapted, trims it off the top of a
thread's heap), so every chunk costs the kernel a page fault and a zeroed page per 4 KiB, and an
unmap: ~0.5 CPU-s per GiB received, about half of what a bare grpcio server spends (measured with
``perf``, docs/benchmarks.md). Raising the mmap threshold to its maximum and the trim threshold
far above the chunk size makes such buffers come from, and go back to, the arenas. What it costs:
the process's RSS stays near its peak instead of shrinking after a burst.

Applied by the processes LIFL owns (``lifl serve``, the gateway pool's processes) when
``malloc_keep_buffers`` is on, never by a library imported into someone else's process. glibc
only; elsewhere it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger("lifl.malloc_policy")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2**20    # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit): chunks up to it stay in arenas
TRIM_THRESHOLD = 256 * 2**20   # free memory at the top of a heap kept for reuse


def keep_buffers() -> bool:
    """Set this process's malloc thresholds (above); True if they were set (glibc)."""
    if platform.libc_ver()[0] != "glibc":
        log.info("malloc thresholds left as they are: not glibc")
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.warning("mallopt refused the malloc thresholds; received chunks will fault their pages in")
    return ok


def apply(config) -> bool:
    """What a process LIFL owns does at start: :func:`keep_buffers` if ``malloc_keep_buffers``."""
    return keep_buffers() if config.malloc_keep_buffers else False
