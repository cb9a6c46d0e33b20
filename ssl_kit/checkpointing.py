"""Checkpoint files: written whole or not at all, and checked before a run resumes from one.

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
import zipfile
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.types import _PATH

from ssl_kit.encoders import CHECKPOINT_KEY
from ssl_kit.errors import UserError

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


# ----------------------------------------------------------------- resuming: one clear error before training
def checkpoint_readable(path: Path) -> bool:
    """Whether ``path`` is a complete PyTorch checkpoint file: torch.save writes a zip archive whose directory
    comes last, so a file cut short by a crash or a full disk has none."""
    return path.is_file() and zipfile.is_zipfile(path)


def require_readable_checkpoint(path: Path) -> None:
    """One clear error, before anything is built or written, for a --ckpt_path that cannot be resumed."""
    if not path.is_file():
        raise UserError(f"--ckpt_path {path}: no such file. Pass a checkpoint of this run (RUN/checkpoints/last.ckpt), "
                        "or --ckpt_path last --run_dir RUN for the newest one.")
    if not checkpoint_readable(path):
        raise UserError(f"--ckpt_path {path} is not a readable checkpoint (cut short while it was written, or not a "
                        "PyTorch file). --ckpt_path last --run_dir RUN resumes the newest readable checkpoint of a run.")


def newest_checkpoint(run_dir: Path) -> str | None:
    """``--ckpt_path last``: the newest readable one of ``RUN/checkpoints/last*.ckpt`` and the checkpoints Lightning
    writes on SLURM's requeue signal (``RUN/hpc_ckpt_N.ckpt``), saying which unreadable ones it passed over; None when
    the run folder has neither (first start); a UserError when it has only unreadable ones.

    Lightning's own ``ckpt_path="last"`` ignores hpc_ckpt files, and its SLURM auto-resume (``ckpt_path=None``)
    takes the highest hpc_ckpt even when last.ckpt is newer, hence the modification-time choice here.
    """
    found = sorted([*run_dir.glob("checkpoints/last*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")],
                   key=lambda p: p.stat().st_mtime, reverse=True)
    for path in found:
        if checkpoint_readable(path):
            return str(path)
        log.warning("--ckpt_path last: %s is not a readable checkpoint (cut short?); trying an older one", path)
    if found:
        raise UserError(f"--ckpt_path last: none of the checkpoints of {run_dir} is readable "
                        f"({', '.join(p.name for p in found)}); move them away to start this run afresh.")
    return None


def require_matching_checkpoint(model: pl.LightningModule, path: Path) -> None:
    """One clear error, before training, when the checkpoint to resume was not written by this method with this
    architecture (Lightning would stop with a KeyError or a 40-line size-mismatch traceback)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "pytorch-lightning_version" not in ckpt:
        raise UserError(f"--ckpt_path {path} is not a training checkpoint (no Lightning training state): resume from "
                        "RUN/checkpoints/last.ckpt, or start from an encoder with the method's --model.init_from.")
    saved_class = ckpt.get(CHECKPOINT_KEY, {}).get("method")  # SSLMethod.on_save_checkpoint records it
    this_class = type(model).__name__
    if saved_class and saved_class != this_class:
        raise UserError(f"--ckpt_path {path} is a {saved_class} checkpoint but this run trains {this_class}: pass the "
                        f"recipe that wrote it, or a checkpoint of {this_class}.")
    saved, here = ckpt["state_dict"], model.state_dict()
    missing, unexpected = sorted(set(here) - set(saved)), sorted(set(saved) - set(here))
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise UserError(f"--ckpt_path {path} does not fit this {this_class}: {len(missing)} weights missing, "
                        f"{len(unexpected)} unexpected (e.g. {example}). Resume with the settings the run was "
                        "started with (RUN/config.yaml).")
    for name, tensor in here.items():
        if tuple(saved[name].shape) != tuple(tensor.shape):
            raise UserError(f"--ckpt_path {path} does not fit this {this_class}: {name} is {list(saved[name].shape)} in "
                            f"the checkpoint and {list(tensor.shape)} here. Resume with the settings the run was "
                            "started with (RUN/config.yaml).")
