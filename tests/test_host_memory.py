"""host_memory: glibc's malloc told to keep freed blocks for reuse (speed_up sets it for the process).

What the setting buys is measured, not tested here: `python -m bench.speed` prints the page faults of
each prefill (transformers' process ~99,000, ours 0). A unit test counting the faults of one reused
8 MB block was tried and found flaky (0 or 2,048 faults from run to run in a fresh process), so the
tests hold what is deterministic: the release still releases, and off glibc both say they did nothing."""

import mmap
import resource
from pathlib import Path

import pytest
import torch

from minillm.host_memory import glibc, release_freed_memory, reuse_freed_memory

needs_glibc = pytest.mark.skipif(glibc() is None, reason="the C library here is not glibc: nothing to set")


def resident_bytes() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()


@needs_glibc
def test_release_still_hands_memory_back():
    """After reuse_freed_memory a freed 24 MB block stays resident (it is kept for reuse); an explicit
    release (after a load) hands it back to the OS: resident memory drops by most of it."""
    assert reuse_freed_memory()
    block = torch.ones(6 << 20)  # 24 MB: under the 32 MB threshold, from the heap; touched
    block.sum()
    del block
    kept = resident_bytes()
    assert release_freed_memory()
    assert kept - resident_bytes() > (16 << 20), f"resident {kept >> 20} MB before the release, {resident_bytes() >> 20} after"


def test_off_glibc_both_say_they_did_nothing(monkeypatch):
    glibc.cache_clear()
    monkeypatch.setattr("ctypes.util.find_library", lambda name: "libc-that-is-not-here.so")
    try:
        assert glibc() is None and release_freed_memory() is False and reuse_freed_memory() is False
    finally:
        glibc.cache_clear()


@needs_glibc
@pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="Linux's /proc only")
def test_drop_file_pages_drops_only_a_files_unwritten_pages(tmp_path):
    """A checkpoint's tensor (memory-mapped, copy-on-write): its whole pages dropped, the bytes unchanged
    when read again; a tensor written to after loading, or one in anonymous memory: nothing dropped, the
    numbers kept."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from minillm.host_memory import drop_file_pages
    save_file({"a": torch.arange(1 << 20, dtype=torch.float32), "b": torch.ones(1 << 20)}, str(tmp_path / "t.safetensors"))
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt", device="cpu") as f:
        a, b = f.get_tensor("a"), f.get_tensor("b")
    a.sum(), b.sum()  # every page read in
    before = resident_bytes()
    assert drop_file_pages(a) >= a.nbytes - 2 * mmap.PAGESIZE  # all but the partial pages at its ends
    assert before - resident_bytes() >= a.nbytes // 2  # out of resident memory
    assert torch.equal(a, torch.arange(1 << 20, dtype=torch.float32))  # read back from the file
    b[::1024] = 2.0  # written: every page of b is the process's own copy now
    assert drop_file_pages(b) == 0 and (b[::1024] == 2.0).all()
    anonymous = torch.arange(1 << 20, dtype=torch.float32)
    assert drop_file_pages(anonymous) == 0 and torch.equal(anonymous, torch.arange(1 << 20, dtype=torch.float32))
