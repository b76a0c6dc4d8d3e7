"""Handing the memory of freed tensors back to the operating system.

An edit allocates and frees large, short-lived CPU tensors batch after batch (activations and
gradients of the value optimisation, the layer inputs of the key passes). glibc's allocator keeps
most of what they freed: after the first large block is freed it raises its mmap threshold (up to
32 MiB), so later tensors of that size come from the heap, and the heap's free pages stay in the
process's resident set. Over the ~30 value batches of a MEMIT batch of 1,000 requests that
retained memory grows with the number of batches, not with what any one batch needs
(docs/memit.md, "Memory"). ``malloc_trim(0)`` returns every free page of the heap, in the middle
as well as at the top, in a few milliseconds; the editors call :func:`release_freed_memory` at
the end of each batch. It changes no result, only the resident set.

Elsewhere (no glibc: macOS, musl; or memory on a GPU, whose caching allocator torch manages) it
does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` in this process, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Give the heap's free pages back to the operating system; True if any were returned."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
