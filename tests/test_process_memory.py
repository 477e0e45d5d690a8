"""Freed allocator memory handed back to the system between large tensors."""

import ctypes.util

import psutil
import pytest
import torch

from hf_graft.process_memory import release_freed_memory


@pytest.mark.skipif(not ctypes.util.find_library("c") or not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim"), reason="glibc only")
def test_release_freed_memory_returns_freed_heap_pages():
    process = psutil.Process()
    large = torch.empty(8 << 20)
    del large  # a freed 32 MiB block raises glibc's mmap threshold: what follows lands on the heap
    blocks = [torch.ones(1 << 18) for _ in range(400)]  # 400 MiB in 1 MiB blocks
    pinned = torch.ones(1 << 18)  # keeps the heap's top in use, so free() alone cannot shrink it
    del blocks
    before = process.memory_info().rss
    assert release_freed_memory()
    assert before - process.memory_info().rss > 300 << 20
    del pinned
