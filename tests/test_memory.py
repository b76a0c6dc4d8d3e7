"""release_freed_memory: the pages of freed CPU tensors go back to the operating system."""

import pytest
import torch

from lmscalpel.evaluation.resources import rss_bytes
from lmscalpel.runtime import memory

glibc = pytest.mark.skipif(memory._malloc_trim() is None, reason="needs glibc's malloc_trim")


@glibc
def test_the_pages_of_freed_tensors_leave_the_resident_set():
    """Tensors of 32 KiB (below glibc's mmap threshold: they come from the heap), each followed by
    a small one that stays alive, so that freeing them leaves holes that glibc keeps: the resident
    set stays up until the release, and falls by most of what they held after it."""
    memory.release_freed_memory()
    base = rss_bytes()
    big, keepers = [], []
    for _ in range(8_000):
        big.append(torch.ones(8_192))  # 32 KiB, touched
        keepers.append(torch.ones(4))
    held = 8_000 * 32 * 1024
    del big
    before = rss_bytes()
    assert before - base > held // 2  # the allocator kept the freed pages
    assert memory.release_freed_memory()
    after = rss_bytes()
    assert before - after > held // 2
    del keepers  # alive until here: they kept the holes from merging


def test_without_glibc_it_does_nothing(monkeypatch):
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    assert memory.release_freed_memory() is False
