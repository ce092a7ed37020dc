"""The C allocator under PyTorch's CPU tensors (glibc's malloc on Linux), set for what the process does.

    release_freed_memory()  hand freed memory back to the OS now: after loading, whose temporaries
                            would otherwise stay in the heap for good (quantized.py)
    reuse_freed_memory()    keep freed memory for reuse from now on: while running, a tensor of a few MB
                            (a prefill's activations) is otherwise often mapped fresh from the OS and
                            zero-filled page by page at first touch, at every use (speed.speed_up)
    drop_file_pages(t)      for a tensor read from a memory-mapped file that is no longer used: its pages
                            out of the process's resident memory (speed.StackedLinear's copied weights)

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
import mmap

import torch

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


MADV_DONTNEED = 4  # Linux's madvise advice: drop the pages (a file's are read again if touched)


def drop_file_pages(t: torch.Tensor) -> int:
    """Drop from this process's resident memory the whole pages of t's bytes where they are a mapped file's
    pages as read (a safetensors checkpoint is read memory-mapped, copy-on-write), for weights copied
    elsewhere and no longer read: otherwise they stay counted as resident while the file stays mapped for
    the other weights. Pages written since (anonymous copies now) or outside a file's mapping are left
    alone: dropped, they would read back as the file's bytes or as zeros. A dropped page, if read again,
    comes back from the file, the same bytes. Nothing may write t meanwhile (a write between the check
    and the drop would be lost). -> bytes dropped (0 off glibc or Linux's /proc)."""
    libc = glibc()
    if libc is None or t.device.type != "cpu" or t.nbytes == 0:
        return 0
    page = mmap.PAGESIZE
    first, last = -(-t.data_ptr() // page) * page, (t.data_ptr() + t.nbytes) // page * page  # whole pages
    if first >= last or not _in_file_mapping(first, last) or not _unwritten(first, last, page):
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return last - first if libc.madvise(first, last - first, MADV_DONTNEED) == 0 else 0


def _in_file_mapping(start: int, end: int) -> bool:
    """Whether [start, end) lies in one mapping of a regular file (/proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                low, high = (int(a, 16) for a in fields[0].split("-"))
                if low <= start and end <= high:
                    return len(fields) >= 6 and fields[5].startswith("/")
    except (OSError, ValueError):
        pass
    return False


def _unwritten(start: int, end: int, page: int) -> bool:
    """Whether every page of [start, end) is the file's own or was never read in (/proc/self/pagemap: bit
    63 present, 62 swapped, 61 a file page; a page written to in a private mapping becomes anonymous,
    and may be swapped out)."""
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(start // page * 8)
            entries = f.read((end - start) // page * 8)
    except OSError:
        return False
    flags = torch.frombuffer(bytearray(entries), dtype=torch.int64)
    present, swapped, file_page = (flags >> 63) & 1, (flags >> 62) & 1, (flags >> 61) & 1
    return len(entries) == (end - start) // page * 8 and bool(
        ((file_page == 1) | ((present == 0) & (swapped == 0))).all())
