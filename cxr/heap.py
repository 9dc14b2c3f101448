"""glibc heap tuning, in one place: image-sized buffers are allocated and freed per image, in many threads.

glibc hands large freed blocks back to the kernel and page-faults them in again on the next image, and keeps
what each thread frees in that thread's arena, so RSS creeps up with the shards read. Three calls address
that, each where its workload is: reading shards trims the heap every few shards (`release`), raw mode keeps
some free memory at the top of each heap (`keep_top`), phantom drawing raises the mmap and trim thresholds
(`for_drawing`). All are best effort and no-ops where libc is not glibc. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import ctypes
import functools

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters (malloc.h)
TRIM_EVERY_SHARDS = 8  # trimming after every shard made the next batches fault the freed pages in again


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def release() -> None:
    """Give freed heap back to the OS (malloc_trim), so RSS stays flat over thousands of shards."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def keep_top(nbytes: int = 16 << 20) -> None:
    """Keep `nbytes` free at the top of each heap (M_TOP_PAD): raw mode's ~1 MB decode buffers stay mapped."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_TOP_PAD, nbytes)


def for_drawing() -> None:
    """Process-pool initializer of `cxr synth`: freed 256 KB arrays stay in the heap instead of being unmapped."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 64 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)
