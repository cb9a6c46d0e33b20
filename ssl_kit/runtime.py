"""Process-level settings: the console log, CPU allocator tuning (faster, no result changes), and :func:`eval_mode`."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

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


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Run a block with ``modules`` in eval mode (pictures, monitors, deterministic measurements); afterwards every
    sub-module gets back exactly the mode it had, so an EMA teacher kept in eval mode inside a training method
    stays there."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def drop_advertisements(record: logging.LogRecord) -> bool:
    """Lightning >= 2.6 logs a tip to install its cloud logger at every Trainer start: noise before each run."""
    return not str(record.msg).startswith("💡 Tip:")


def setup_logging() -> None:
    lightning = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if drop_advertisements not in lightning.filters:
        lightning.addFilter(drop_advertisements)
    logger = logging.getLogger("ssl_kit")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[ssl_kit] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
