"""Handing the memory of freed tensors back to the operating system.

An edit allocates and frees large, short-lived CPU tensors batch after batch (activations and
gradients of the value optimisation, the layer inputs of the key passes). glibc's allocator keeps
most of what they freed: after the first large block is freed it raises its mmap threshold (up to
32 MiB), so later tensors of that size come from the heap, and the heap's free pages stay in the
process's resident set. ``malloc_trim(0)`` returns every free page of the heap, in the middle
as well as at the top, in a few milliseconds. The value optimisation and the key passes
(:mod:`lmscalpel.mechanics.keys_values`) call :func:`release_freed_memory` after each batch: with
it every value batch of a MEMIT batch of 1,000 requests starts back at the model's resident size,
and the peak above the model of a batch of 300 fell from 1,681 to 1,473 MiB (docs/memit.md,
"Memory"). It changes no result, only the resident set. (What the key passes kept beyond that
was not the allocator's: a reference cycle held each stopped pass's activations until the
garbage collector ran; :func:`lmscalpel.runtime.hooks.tap` now breaks it.)

Without glibc (macOS, musl) it does nothing; a GPU's memory is torch's caching allocator's, and
it leaves that alone.
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
