"""Callbacks shared by every method: the end-of-training encoder export and the checkpoint written when the run is
told to stop (SIGTERM); and the per-epoch pictures that several methods add through ``SSLMethod.method_callbacks``
(``reconstruction_panels`` of MAE / LoMaR / iBOT, ``pseudo_labeller`` of UDA / MPL) with :class:`ValidationPictures`,
the base of U2PL's and Soft Teacher's own pictures (in their files)."""
from __future__ import annotations

import logging
import os
import signal
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ssl_kit.encoders import export_encoder
from ssl_kit.runtime import eval_mode
from ssl_kit.viz import save_panel_grid, save_pseudo_label_grid

log = logging.getLogger("ssl_kit")


class ReconstructionPictures(pl.Callback):
    """Each epoch, save a PNG of fixed images as the method shows them (``reconstruction_panels``).

    For MAE: row 1 original, row 2 masked input, row 3 reconstruction (visible patches pasted).

    Args:
        out_dir: folder for ``epoch_NNN.png`` (zero-padded epoch).
        num_images: images per row (fixed across epochs).
    """

    def __init__(self, out_dir: str | Path, num_images: int = 8) -> None:
        self.out_dir = Path(out_dir)
        self.num_images = num_images

    @rank_zero_only
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        if dm is None:
            return
        dataset = dm.knn_test_set if getattr(dm, "knn_test_set", None) is not None else dm.train_set
        images = torch.stack([dataset[i][0] for i in range(min(self.num_images, len(dataset)))])
        with torch.random.fork_rng(devices=[]), eval_mode(pl_module):
            torch.manual_seed(0)  # the same masks every epoch, so epochs compare
            panels = pl_module.reconstruction_panels(dm.eval_images(images.to(pl_module.device)))
        save_panel_grid(panels, self.out_dir / f"epoch_{trainer.current_epoch:03d}.png", dm.mean, dm.std)


class PseudoLabelPictures(pl.Callback):
    """Each epoch, save ``pseudo_labels_epoch_NNN.png``: fixed unlabeled images in their weak and strong
    views, with the label the method's pseudo-labeller (``pseudo_labeller()``: the classifier itself for
    UDA, the teacher for MPL) gives the weak view and whether it passes the confidence mask.

    Args:
        out_dir: folder of the PNGs.
        num_images: images per picture.
    """

    def __init__(self, out_dir: str | Path, num_images: int = 10) -> None:
        self.out_dir = Path(out_dir)
        self.num_images = num_images

    @rank_zero_only
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        unlabeled = getattr(dm, "unlabeled_set", None)
        if unlabeled is None:
            return
        images = torch.stack([unlabeled[i][0] for i in range(min(self.num_images, len(unlabeled)))])
        model, threshold = pl_module.pseudo_labeller()
        with torch.random.fork_rng(devices=[]), torch.no_grad(), eval_mode(model):
            torch.manual_seed(0)  # the same views every epoch, so epochs compare
            augment = dm.augment.to(pl_module.device)
            images = images.to(pl_module.device)
            weak, strong = augment.weak_and_strong(images)
            probs = model(weak).softmax(dim=-1)
        save_pseudo_label_grid(weak, strong, probs, dm.classes, threshold,
                               self.out_dir / f"pseudo_labels_epoch_{trainer.current_epoch:03d}.png", dm.mean, dm.std)


class ValidationPictures(pl.Callback, ABC):
    """Each epoch, picture what the method makes of the first ``num_images`` validation items in
    ``out_dir/{name}_epoch_NNN.png``; subclasses say how (:meth:`save_picture`).

    Args:
        out_dir: folder of the PNGs.
        num_images: rows per picture.
    """

    name = ""

    def __init__(self, out_dir: str | Path, num_images: int = 6) -> None:
        self.out_dir = Path(out_dir)
        self.num_images = num_images

    @rank_zero_only
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        val = getattr(dm, "val_set", None)
        if val is None:
            return
        samples = [val[i] for i in range(min(self.num_images, len(val)))]
        self.save_picture(dm, pl_module, samples, self.out_dir / f"{self.name}_epoch_{trainer.current_epoch:03d}.png")

    @abstractmethod
    def save_picture(self, dm: pl.LightningDataModule, pl_module: pl.LightningModule, samples: list, path: Path) -> None:
        """Save a picture of ``samples`` (validation items as the data set returns them) as ``path``."""


class EncoderExport(pl.Callback):
    """At the end of fit, export the method's encoder as safetensors + timm config.

    Args:
        out_dir: export folder.
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        extra = {**pl_module.encoder_record(), "epoch": trainer.current_epoch, "global_step": trainer.global_step}
        export_encoder(pl_module.export_module(), pl_module.encoder_spec, self.out_dir, extra)
        log.info("exported encoder to %s", self.out_dir)


class CheckpointOnSignal(pl.Callback):
    """Write a resumable checkpoint when the process is told to stop: SIGTERM (a scheduler's pre-emption or
    ``scancel``, ``kill``, ``docker stop``), and SIGUSR1 where Lightning's SLURM requeue does not take it.

    Lightning notes a SIGTERM and stops at the end of the current training step with its ``SIGTERMException``;
    this callback then saves ``path`` (the run's ``last.ckpt``) through the trainer, so everything a step-boundary
    checkpoint holds is there (loop progress, the data position, schedulers after their step) and the run resumes
    exactly. A SIGUSR1 is passed on as a SIGTERM, unless a handler is already installed (Lightning's SLURM
    auto-requeue saves ``hpc_ckpt_N.ckpt`` itself). ``signal_name`` and ``saved`` tell the caller what happened.

    Args:
        path: the checkpoint file to write.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.signal_name = "SIGTERM"
        self.saved: Path | None = None
        self.held = False  # a SIGTERM that arrived inside a gradient-accumulation window, waiting for its step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Under gradient accumulation, hold a SIGTERM that lands between the batches of one optimizer step until
        that step is taken: Lightning would stop after the batch, and a checkpoint there loses the gradient summed
        so far (the resumed run would differ). Lightning checks its flag right after this hook."""
        connector = trainer._signal_connector  # Lightning keeps the flag there; no public setter
        mid_window = trainer.fit_loop.epoch_loop._should_accumulate()
        if connector.received_sigterm and mid_window:
            connector.received_sigterm, self.held = False, True
            if trainer.is_global_zero:
                log.info("%s inside a gradient-accumulation window: stopping after its optimizer step",
                         self.signal_name)
        elif self.held and not mid_window:
            connector.received_sigterm, self.held = True, False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after Lightning installed its handlers (its SIGUSR1 one only under SLURM auto-requeue); Lightning's
        # teardown puts back the handlers found before it started, SIG_DFL for SIGUSR1 here
        sigusr1 = getattr(signal, "SIGUSR1", None)  # not on Windows
        in_main_thread = threading.current_thread() is threading.main_thread()  # where handlers can be set
        if sigusr1 is not None and in_main_thread and signal.getsignal(sigusr1) in (signal.SIG_DFL, None):
            signal.signal(sigusr1, self._sigusr1_as_sigterm)

    def _sigusr1_as_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.global_step == 0:
            return
        trainer.save_checkpoint(self.path)
        self.saved = self.path
        if trainer.is_global_zero:
            log.info("%s: saved %s at step %d", self.signal_name, self.path, trainer.global_step)
