"""Labeled train / val data for evaluation (linear probe, fine-tune, k-NN).

Same sources as pretraining (Fashion-MNIST by default, image folders with class sub-folders);
uint8 from the loaders, augmentation batched on the device with kornia:
random resized crop + flip (MAE probe), optionally RandAugment and random erasing (fine-tune).
``labels_per_class`` keeps a seeded, class-balanced subset of the training labels (few-label setting).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import kornia.augmentation as K
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from ssl_kit.data.augment import TrainAugment, WeakStrongAugment
from ssl_kit.data.rand_augment import RandAugment
from ssl_kit.data.module import ImageDataModule
from ssl_kit.data.splits import Splits
from ssl_kit.errors import UserError

log = logging.getLogger("ssl_kit")


def balanced_subset(labels: Tensor, per_class: int, num_classes: int, seed: int, class_names: list[str]) -> list[int]:
    """Seeded choice of ``per_class`` indices of every class (clear error for a class with too few)."""
    g = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < per_class:
            raise UserError(
                f"Class '{class_names[c]}' has {len(idx)} labeled training images, fewer than "
                f"--data.labels_per_class {per_class}: lower it or add images to that class."
            )
        chosen += idx[torch.randperm(len(idx), generator=g)[:per_class]].tolist()
    return sorted(chosen)


class ClassificationDataModule(ImageDataModule):
    """Labeled splits with device-side augmentation.

    Args:
        root: image folder (class sub-folders; ``train/`` + ``val/`` used as such) or Fashion-MNIST folder.
        dataset: ``auto``, ``fashion_mnist`` or ``folder``.
        img_size: model input side.
        in_chans: channels (default 1 for Fashion-MNIST, 3 for folders).
        batch_size: images per device and step.
        num_workers: loader processes (default: 0 in memory, up to 8 for files).
        labels_per_class: keep only this many labeled training images per class (seeded, balanced).
        train_augment: ``pad_crop`` (flip + translation by reflect-padding img_size / 8: keeps small grey
            items whole), ``crop_flip`` (MAE probe: random resized crop + flip), ``finetune`` (MAE fine-tune:
            crop_flip + RandAugment + random erasing) or ``none``.
        crop_scale: RandomResizedCrop area range.
        rand_augment_magnitude: largest RandAugment magnitude (0-10 scale; 2 ops) for ``finetune``, 0 = off.
        random_erase: random erasing probability for ``finetune``.
        decode_size: side of decoded image files (default img_size / 0.875).
        val_fraction: held-out fraction when a folder has no ``val/``.
        verify_images: open every file once and skip unreadable ones.
        seed: subset, order and augmentation seed.
        epoch_steps: training batches per epoch (the labeled images are cycled as consecutive fresh
            permutations); unset = one pass over the labeled images. Lets a schedule be set in steps
            whatever the label count.
        draw_group_size: images of the global batch that share one random stream (augmentation, masks);
            unset = one stream per device batch. Runs whose per-device batch is a multiple of it draw
            the same for every image on any number of processes (``ssl_kit.distributed``).
    """

    def __init__(
        self,
        root: str | None = None,
        dataset: Literal["auto", "fashion_mnist", "folder"] = "auto",
        img_size: int = 32,
        in_chans: int | None = None,
        batch_size: int = 256,
        num_workers: int | None = None,
        labels_per_class: int | None = None,
        train_augment: Literal["pad_crop", "crop_flip", "finetune", "none"] = "crop_flip",
        crop_scale: tuple[float, float] = (0.08, 1.0),
        rand_augment_magnitude: int = 9,
        random_erase: float = 0.25,
        decode_size: int | None = None,
        val_fraction: float = 0.1,
        verify_images: bool = True,
        seed: int = 0,
        draw_group_size: int | None = None,
        epoch_steps: int | None = None,
    ) -> None:
        super().__init__(root, dataset, img_size, in_chans, batch_size, num_workers, decode_size, val_fraction, verify_images, seed,
                         draw_group_size)
        if epoch_steps is not None and epoch_steps < 1:
            raise UserError(f"--data.epoch_steps must be >= 1 (or unset: one pass over the labeled images), got {epoch_steps}.")
        self.epoch_steps = epoch_steps
        self.labels_per_class = labels_per_class
        self.train_transform = self._train_transform(train_augment, crop_scale, rand_augment_magnitude, random_erase)
        self.splits: Splits | None = None
        self.train_set = self.val_set = None
        self.subset_indices: list[int] | None = None

    def _train_transform(self, kind: str, crop_scale: tuple[float, float], magnitude: int, erase: float) -> nn.Module:
        if kind == "none":
            return self.eval_transform
        if kind == "pad_crop":
            return PadCropAugment(WeakStrongAugment(self.img_size, self.mean, self.std, "pad_crop", num_ops=0, cutout=False))
        if kind not in ("crop_flip", "finetune"):
            raise UserError(f"--data.train_augment must be pad_crop, crop_flip, finetune or none, got {kind!r}.")
        base = TrainAugment(self.img_size, self.mean, self.std, crop_scale, hflip=True)
        if kind == "crop_flip":
            return base
        return FinetuneAugment(base, magnitude, erase)

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.splits.classes)

    @property
    def classes(self) -> list[str]:
        self.setup()
        return self.splits.classes

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        splits = self.load_splits()
        if not splits.classes or splits.val is None:
            raise UserError(
                f"{self.root} has no class sub-folders: evaluation needs labels (root/CLASS/image.jpg, or "
                "root/train/CLASS/... and root/val/CLASS/...)."
            )
        self.splits = splits
        self.train_set, self.val_set = splits.train, splits.val
        if self.labels_per_class:
            self.subset_indices = balanced_subset(
                splits.train_labels, self.labels_per_class, len(splits.classes), self.seed, splits.classes
            )
            self.train_set = Subset(splits.train, self.subset_indices)
        log.info("data: %d labeled training images%s, %d validation images, %d classes",
                 len(self.train_set), f" ({self.labels_per_class} per class)" if self.labels_per_class else "",
                 len(self.val_set), len(splits.classes))

    def save_subset(self, path: str | Path) -> None:
        """Write the labeled subset (indices into the training split) so the run is reproducible."""
        if self.subset_indices is None:
            return
        Path(path).write_text(json.dumps({"labels_per_class": self.labels_per_class, "seed": self.seed,
                                          "indices": self.subset_indices}) + "\n")

    def train_dataloader(self) -> DataLoader:
        self.setup()
        if self.epoch_steps is None:
            return self.make_loader(self.train_set, train=True)
        return self.make_loader(self.train_set, train=True, num_samples=self.epoch_steps * self.batch_size * self._world()[1])

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self.make_loader(self.val_set, train=False)

    def feature_loaders(self, batch_size: int = 512) -> tuple[DataLoader, DataLoader]:
        """Un-augmented loaders over the (possibly subset) train split and the val split."""
        self.setup()
        return self.make_loader(self.train_set, False, batch_size), self.make_loader(self.val_set, False, batch_size)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch
        if images.dtype != torch.uint8:  # cached features, not images
            return batch
        training = self.trainer is not None and self.trainer.training
        transform = self.train_transform if training else self.eval_transform
        return transform.to(images.device)(images), labels


class PadCropAugment(nn.Module):
    """The weak view of consistency training as a training transform: flip + reflect-pad translation."""

    def __init__(self, views: WeakStrongAugment) -> None:
        super().__init__()
        self.views = views

    def forward(self, images: Tensor) -> Tensor:
        """``[B, C, h, w]`` uint8 -> ``[B, C, S, S]`` normalised."""
        return self.views.weak(images)


class FinetuneAugment(nn.Module):
    """Crop + flip, then RandAugment (2 ops per image, each with probability 0.5, magnitude uniform in
    1..``magnitude`` of 10, as timm's ``rand-m9-mstd0.5`` of the MAE fine-tune recipe; no Cutout) and
    random erasing."""

    def __init__(self, base: TrainAugment, magnitude: int, erase: float) -> None:
        super().__init__()
        self.base = base
        self.rand_augment = RandAugment(2, (1, magnitude), 0.5, cutout_prob=0.0) if magnitude > 0 else None
        self.erase = K.RandomErasing(p=erase) if erase > 0 else None

    def forward(self, images: Tensor) -> Tensor:
        x = images.float().div(255.0)
        x = self.base.ops(x).clamp(0, 1)
        if self.rand_augment is not None:
            x = self.rand_augment(x)
        x = (x - self.base.mean) / self.base.std
        if self.erase is not None:
            x = self.erase(x)
        return x
