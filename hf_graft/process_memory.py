"""Memory the allocator holds after work on large tensors, handed back to the system.

glibc keeps freed blocks under its mmap threshold (which rises up to 32 MiB as large blocks are
freed) in its heaps, and returns them only when the top of a heap is free. Work that makes and
drops tens of MiB of temporaries per tensor, as SkillPack extraction does, then leaves the
process hundreds of MiB larger than what it holds. :func:`release_freed_memory` asks glibc to
return every free page (``malloc_trim(0)``); elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["release_freed_memory"]


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Return the allocator's free pages to the system; whether the platform allows it."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
