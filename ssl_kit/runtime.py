"""Process-level settings that make CPU training faster without changing any result."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger("ssl_kit")

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_tuned = False


def tune_cpu_allocator() -> bool:
    """Keep freed activation memory in the process instead of returning it to the OS every step.

    glibc's defaults ``mmap``/``munmap`` large blocks, so every training step page-faults and zeroes
    its activations afresh (measured: ~10 % of an MAE step on 2 cores). Raising the mmap, trim and
    top-pad thresholds makes the heap reuse them, as a caching allocator would. Linux/glibc only;
    elsewhere this does nothing and returns False. Call it once, early (the CLI does).
    """
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = all(
            libc.mallopt(option, value) == 1
            for option, value in ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 256 << 20))
        )
    except (OSError, AttributeError):
        return False
    _tuned = ok
    return ok
