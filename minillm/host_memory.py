"""The C allocator under PyTorch's CPU tensors (glibc's malloc on Linux), set for what the process does.

    release_freed_memory()  hand freed memory back to the OS now: after loading, whose temporaries
                            would otherwise stay in the heap for good (quantized.py)
    reuse_freed_memory()    keep freed memory for reuse from now on: while running, a tensor of a few MB
                            (a prefill's activations) is otherwise often mapped fresh from the OS and
                            zero-filled page by page at first touch, at every use (speed.speed_up)

Why the second: glibc serves blocks from 128 KB up by mapping memory (its threshold then adapts to
the sizes freed), and hands the heap's free top back to the OS past twice that threshold; a 512-token
prefill of SmolLM2 made ~50,000 page faults (200 MB touched fresh) and took 600-750 ms, with the
thresholds set 0-500 faults and 510-530 ms (bench/README.md, "Prefill"). Blocks of 32 MB and more
(glibc's limit) are still mapped. Elsewhere (macOS, Windows, musl) both do nothing and return False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (glibc's malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks below it come from the heap
TRIM_THRESHOLD = 1 << 30  # free space the heap's top may keep before it is handed back


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (has malloc_trim and mallopt), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 (both exist, or this is not glibc)
        return libc
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Hand memory freed by torch back to the OS now (glibc's malloc_trim). Repacking int4 codes makes
    temporaries for every matrix, and glibc keeps freed heap memory for reuse: without a trim after
    each matrix, the heap of a loaded model grows by free space that the process never uses again
    (bench/README.md has the load peaks with and without)."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)
    return libc is not None


def reuse_freed_memory() -> bool:
    """From now on, blocks below 32 MB come from the heap and freed ones stay there for reuse (up to
    1 GB of free top), for this whole process. release_freed_memory still hands them back when called."""
    libc = glibc()
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) \
        and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
