"""host_memory: glibc's malloc told to keep freed blocks for reuse (speed_up sets it for the process)."""

import resource

import pytest
import torch

from minillm.host_memory import glibc, release_freed_memory, reuse_freed_memory

needs_glibc = pytest.mark.skipif(glibc() is None, reason="the C library here is not glibc: nothing to set")


def faults_while(fn) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@needs_glibc
def test_a_freed_activation_is_reused_without_fresh_pages():
    """8 MB, a prefill activation's size: once freed, the next one of its size takes the same memory
    instead of new pages (2,048 of them, each a page fault at first touch, without the setting)."""
    assert reuse_freed_memory()
    torch.ones(2 << 20).sum()  # 8 MB taken from the heap, touched, freed
    pages = (2 << 20) * 4 // resource.getpagesize()
    faults = faults_while(lambda: torch.ones(2 << 20).sum())
    assert faults < pages // 20, f"{faults} page faults for a reused 8 MB block of {pages} pages"


@needs_glibc
def test_release_still_hands_memory_back():
    """After reuse_freed_memory, an explicit release (after a load) still trims: the next 8 MB block
    is fresh memory again, faulted in page by page."""
    assert reuse_freed_memory()
    torch.ones(2 << 20).sum()
    assert release_freed_memory()
    pages = (2 << 20) * 4 // resource.getpagesize()
    assert faults_while(lambda: torch.ones(2 << 20).sum()) > pages // 2


def test_off_glibc_both_say_they_did_nothing(monkeypatch):
    glibc.cache_clear()
    monkeypatch.setattr("ctypes.util.find_library", lambda name: "libc-that-is-not-here.so")
    try:
        assert glibc() is None and release_freed_memory() is False and reuse_freed_memory() is False
    finally:
        glibc.cache_clear()
