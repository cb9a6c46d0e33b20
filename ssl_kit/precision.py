"""Precision chosen for the hardware: ``--trainer.precision auto`` (every recipe's default).

bf16 autocast halves the cost of a training step where the processor multiplies bf16 natively
(NVIDIA Ampere and newer; x86 CPUs with AVX512-BF16 or AMX): the default MAE recipe's step took 490 ms
against 1003 ms in fp32 on a 2-core AVX512-BF16 machine. A processor without those instructions emulates
bf16 and gets *slower*, so "auto" detects them rather than assuming; it falls back to fp32 elsewhere.
Weights and optimizer state stay fp32 either way (Lightning's ``bf16-mixed``).
"""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Any, Iterator, Literal, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.connectors.accelerator_connector import _PRECISION_INPUT
from pytorch_lightning.utilities import rank_zero_only

from ssl_kit.checkpointing import with_atomic_checkpoints

log = logging.getLogger("ssl_kit")

AUTO = "auto"
BF16 = "bf16-mixed"
FP32 = "32-true"
# CPU flags (Linux /proc/cpuinfo) of native bf16 matrix instructions.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The processor's feature flags (Linux); an empty set where they cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_bf16_native() -> tuple[bool, str]:
    """Whether this CPU multiplies bf16 natively, and the evidence (for the start-up message)."""
    if sys.platform.startswith("linux"):
        found = sorted(set(CPU_BF16_FLAGS) & cpu_flags())
        if found:
            return True, f"the CPU has {'/'.join(found)}"
        return False, f"the CPU lacks {' and '.join(CPU_BF16_FLAGS)} (bf16 would be emulated, slower than fp32)"
    if sys.platform == "darwin" and torch.backends.mps.is_available():
        return False, "bf16 autocast is not used on Apple CPUs by default"
    # Elsewhere oneDNN's own check tells (it looks for the same instructions).
    native = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    return native, "oneDNN reports native bf16" if native else "oneDNN reports no native bf16"


def uses_cuda(accelerator: object) -> bool:
    """Whether a Trainer with this ``accelerator`` argument trains on CUDA GPUs."""
    name = str(accelerator if accelerator is not None else "auto").lower()
    if name in ("cpu", "mps"):
        return False
    return torch.cuda.is_available() and name in ("auto", "gpu", "cuda")


def auto_precision(accelerator: object = "auto") -> tuple[str, str]:
    """``(precision, reason)`` for ``--trainer.precision auto`` on the accelerator a run will use."""
    if uses_cuda(accelerator):
        if torch.cuda.is_bf16_supported():
            return BF16, f"{torch.cuda.get_device_name(0)} supports bf16"
        return FP32, f"{torch.cuda.get_device_name(0)} has no native bf16 (fp16 needs loss scaling: --trainer.precision 16-mixed)"
    native, why = cpu_bf16_native()
    return (BF16 if native else FP32), why


def resolve_precision(precision: object, accelerator: object = "auto") -> object:
    """A Trainer ``precision`` argument with ``"auto"`` (or unset) replaced by the choice for this hardware;
    logs what was chosen and why. Any explicit value passes through unchanged (and is logged as such)."""
    say = log.info if rank_zero_only.rank == 0 else log.debug  # once per run, not once per process
    if precision is None or str(precision) == AUTO:
        chosen, why = auto_precision(accelerator)
        say("precision %s (auto: %s; --trainer.precision 32-true or bf16-mixed to choose)", chosen, why)
        return chosen
    say("precision %s (set by --trainer.precision)", precision)
    return precision


def autocast_dtype(precision: object) -> torch.dtype | None:
    """The autocast dtype of a Lightning precision setting (None for full precision)."""
    text = str(precision)
    if text.startswith("bf16"):
        return torch.bfloat16
    if text.startswith("16"):
        return torch.float16
    return None


@contextlib.contextmanager
def inference_autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Autocast for forward passes of evaluation (features, pictures) in the training's precision.
    ``dtype`` None (full precision) or a CPU with fp16 requested runs as is."""
    if dtype is None or (device.type == "cpu" and dtype == torch.float16):
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


PrecisionArg = Union[Literal["auto"], _PRECISION_INPUT, None]


class Trainer(pl.Trainer):
    """Lightning's Trainer whose ``precision`` defaults to ``"auto"`` (:func:`resolve_precision`) and whose
    checkpoints are written atomically (:class:`~ssl_kit.checkpointing.AtomicCheckpointIO`, unless ``plugins``
    name another CheckpointIO); every other argument is Lightning's own."""

    def __init__(self, *args: Any, precision: PrecisionArg = AUTO, **kwargs: Any) -> None:
        kwargs["plugins"] = with_atomic_checkpoints(kwargs.get("plugins"))
        super().__init__(*args, precision=resolve_precision(precision, kwargs.get("accelerator", "auto")), **kwargs)
