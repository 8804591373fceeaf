"""CPU process settings for training loops."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
# glibc refuses mmap thresholds above 32 MiB; larger tensors still get their own pages.
_MMAP_THRESHOLD_MAX = 32 << 20
_TRIM_THRESHOLD = 1 << 30


@functools.cache
def retain_freed_memory() -> bool:
    """Keep freed memory in the process heap instead of returning it to the kernel.

    glibc serves allocations of a few MB (a batch of attention maps) with fresh mmap'd pages
    and unmaps them on free, so every step page-faults its large tensors in again: measured
    here, a fifth of the STA loss's time. Raising the mmap and trim thresholds keeps those
    pages mapped for reuse, as jemalloc or tcmalloc would. Process-wide and idempotent;
    returns False where the C library has no ``mallopt`` (not glibc).
    """
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name)
    if not hasattr(libc, "mallopt"):
        return False
    settings = (
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX),
        (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
        (_M_TOP_PAD, 64 << 20),
    )
    return all(libc.mallopt(param, value) == 1 for param, value in settings)
