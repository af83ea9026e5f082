"""This process's memory, as Linux reports it: peak resident set and what the machine still has available."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mib() -> float:
    """Peak resident memory of this process. VmHWM, not getrusage: Linux carries ru_maxrss over from the parent
    through fork + exec, so a child of a big process (a test runner, a benchmark driver) would report its parent's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; a fallback elsewhere


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo; None where there is no such file (not Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


_KEEP_FREED = False


def keep_freed_memory() -> bool:
    """Keep freed memory in this process for reuse instead of handing it back to the OS (glibc: no mmap'd blocks,
    no trimming; `release_freed_memory` then only collects garbage). For a process that frees and reallocates
    gigabytes many times, like the test suite, on a VM whose freed pages go back to the host: on the 2-core
    development VM the first touch of such a page costs ~10 s per GiB (1 GiB allocated, freed, and allocated again
    5 s later: 12.3 s, then 8.9 s; kept: 0.2 s). Peak resident memory stays what the largest phase needs, as long as
    the heap's free space is reused. False where the allocator is not glibc."""
    import ctypes

    global _KEEP_FREED
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-4, 0) == 1 and libc.mallopt(-1, 2**31 - 1) == 1  # M_MMAP_MAX 0, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False
    _KEEP_FREED = ok
    return ok


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS. glibc keeps freed blocks below its mmap threshold
    (up to 32 MB: a 0.5B model's layer weights) in the heap, so a freed 2 GB reference would otherwise stay in this
    process's resident set until the heap is reused."""
    import ctypes
    import gc

    gc.collect()
    if _KEEP_FREED:
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
