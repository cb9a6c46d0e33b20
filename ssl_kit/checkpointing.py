"""Checkpoint files that survive a killed process: written whole or not at all.

Lightning's own ``TorchCheckpointIO`` serialises into memory and moves a file written under the system's temporary
folder onto the target, which is a copy (not a rename) whenever the run folder is on another file system (a cluster's
shared storage), and does not ``fsync``: a process killed mid-copy, or a node that loses power, can leave
``last.ckpt`` cut short. :class:`AtomicCheckpointIO` writes ``.NAME.*.partial`` beside the target, ``fsync``s it and
renames it onto the target (``os.replace``: atomic within a folder), so a reader sees the old checkpoint or the new
one. A write cut short leaves only a ``.partial`` file, which no checkpoint pattern matches (``--ckpt_path last``
ignores it) and :func:`remove_partial_writes` deletes at the next start.
"""
from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.types import _PATH

log = logging.getLogger("ssl_kit")

PARTIAL_SUFFIX = ".partial"


def is_local(path: _PATH) -> bool:
    """Whether ``path`` is on the local file system (not an fsspec URL such as ``s3://``)."""
    return "://" not in str(path) or str(path).startswith("file://")


def fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file in the target's folder, ``fsync``, then ``os.replace`` onto the target.

    Remote (fsspec URL) targets are left to Lightning's own writer. Loading and removal are Lightning's.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)  # Lightning's errors and remote writers
            return
        target = Path(str(path).removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}{PARTIAL_SUFFIX}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        fd = os.open(tmp, flags, 0o666)  # the umask's permissions, as open() gives
        try:
            with os.fdopen(fd, "wb") as f:
                self.write(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_folder(target.parent)

    def write(self, checkpoint: dict[str, Any], f: Any) -> None:
        """Serialise ``checkpoint`` into the open temporary file ``f``."""
        torch.save(checkpoint, f)


def with_atomic_checkpoints(plugins: Any) -> list[Any]:
    """Trainer ``plugins`` with :class:`AtomicCheckpointIO` added, unless they already hold a CheckpointIO."""
    if plugins is None:
        plugins = []
    elif not isinstance(plugins, Sequence) or isinstance(plugins, str):
        plugins = [plugins]
    plugins = list(plugins)
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def remove_partial_writes(run_dir: Path) -> list[Path]:
    """Delete the ``.partial`` files that checkpoint writes cut short by a killed process left in a run folder
    (``RUN/checkpoints/`` and ``RUN/`` for SLURM's hpc checkpoints); returns them. Call it before training starts,
    on one process."""
    leftovers = [*run_dir.glob(f"checkpoints/.*{PARTIAL_SUFFIX}"), *run_dir.glob(f".*{PARTIAL_SUFFIX}")]
    for path in leftovers:
        path.unlink(missing_ok=True)
    if leftovers:
        log.info("removed %d checkpoint write(s) cut short by a killed process: %s", len(leftovers),
                 ", ".join(p.name for p in leftovers))
    return leftovers
