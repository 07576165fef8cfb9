"""Hand freed heap memory back to the operating system between large steps.

glibc keeps freed blocks under its mmap threshold (which grows up to 32 MB as large arrays
are freed) in its heaps; weights quantized one after another then leave RSS climbing with
memory nobody uses. `malloc_trim` returns it. Elsewhere (musl, macOS, Windows) a no-op.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any


@functools.cache
def _malloc_trim() -> Any:
    """glibc's malloc_trim from the running process's own symbols, or None."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def trim_heap() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
