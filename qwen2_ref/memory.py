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


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS. glibc keeps freed blocks below its mmap threshold
    (up to 32 MB: a 0.5B model's layer weights) in the heap, so a freed 2 GB reference would otherwise stay in this
    process's resident set until the heap is reused."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
