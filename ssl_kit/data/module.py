"""Pretraining data module: uint8 batches from the loaders, kornia augmentation on the device.

Sources (``dataset``):
* ``fashion_mnist``: the built-in default, read offline (``root`` may name a folder with the IDX files);
* ``folder``: the user's images under ``root`` (class sub-folders or flat; a ``train/`` + ``val/``
  split is used as such; with class folders only, ``val_fraction`` is held out for the k-NN
  monitor and not pretrained on);
* ``auto`` (default): ``fashion_mnist`` when ``root`` is unset or holds the IDX files, else ``folder``.

Exact resume: the train sampler is reshuffled from ``seed + epoch``, and before each training
batch is augmented the global RNG is seeded from (seed, rank, number of training batches seen),
a counter kept in this module's ``state_dict`` (saved in every checkpoint). Augmentation and the
method's random masking therefore repeat exactly after a resume.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Callable, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset

from ssl_kit.data.augment import EvalTransform, MultiCropAugment, TrainAugment
from ssl_kit.data.splits import Splits, channel_stats, load_splits, resolve_source
from ssl_kit.errors import UserError

log = logging.getLogger("ssl_kit")


class EpochSeededRandomSampler(RandomSampler):
    """RandomSampler whose order depends only on ``(seed, epoch)``, so a resumed run sees the same order.

    Lightning calls ``set_epoch`` every epoch; under DDP it swaps in a DistributedSampler, which
    is seeded the same way.
    """

    def __init__(self, data_source: Dataset, seed: int = 0, num_samples: int | None = None) -> None:
        # num_samples > len(data_source): consecutive fresh permutations (every image once per pass)
        super().__init__(data_source, num_samples=num_samples, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)


def default_num_workers(source: str) -> int:
    """0 for in-memory tensors; decoding files gets up to 8 worker processes."""
    return 0 if source == "fashion_mnist" else min(8, os.cpu_count() or 1)


def step_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class ImageDataModule(pl.LightningDataModule):
    """What every ssl_kit data module shares: the source, sizes, channels, normalisation, loaders' settings.

    Args are documented on the subclasses.
    """

    def __init__(
        self, root: str | None, dataset: str, img_size: int, in_chans: int | None, batch_size: int,
        num_workers: int | None, decode_size: int | None, val_fraction: float, verify_images: bool, seed: int,
    ) -> None:
        super().__init__()
        self.root = root
        self.source = resolve_source(root, dataset)
        self.img_size = img_size
        self.in_chans = in_chans if in_chans is not None else (1 if self.source == "fashion_mnist" else 3)
        if self.in_chans not in (1, 3):
            raise UserError(f"--data.in_chans must be 1 (grayscale) or 3 (RGB), got {self.in_chans}.")
        self.batch_size = batch_size
        self.num_workers = num_workers if num_workers is not None else default_num_workers(self.source)
        self.decode_size = decode_size or round(img_size / 0.875)
        self.val_fraction, self.verify_images, self.seed = val_fraction, verify_images, seed
        self.mean, self.std = channel_stats(self.source, self.in_chans)
        self.eval_transform = EvalTransform(img_size, self.mean, self.std)
        self.train_batches_seen = 0

    def seed_training_batch(self) -> None:
        """Seed the global RNG from (seed, rank, training batches seen) before augmenting a training batch,
        so augmentation (and the method's random draws) repeat exactly after a resume."""
        rank = self.trainer.global_rank if self.trainer is not None else 0
        torch.manual_seed(step_seed(self.seed, rank, self.train_batches_seen))
        self.train_batches_seen += 1

    def state_dict(self) -> dict[str, Any]:
        return {"train_batches_seen": self.train_batches_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_batches_seen = int(state_dict.get("train_batches_seen", 0))

    def load_splits(self) -> Splits:
        """Train / val splits of this module's source."""
        return load_splits(self.source, self.root, self.in_chans, self.decode_size, self.val_fraction, self.verify_images, self.seed)

    def make_loader(self, dataset: Dataset, train: bool, batch_size: int | None = None, seed_salt: int = 0,
                    num_samples: int | None = None, collate_fn: Callable | None = None) -> DataLoader:
        """Seeded shuffling for training (exact resume), plain order otherwise.

        ``num_samples`` (training) sets the images per epoch, drawn as consecutive permutations;
        ``collate_fn`` replaces the default stacking (e.g. detection targets of varying size).
        """
        batch_size = batch_size or self.batch_size
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=EpochSeededRandomSampler(dataset, self.seed + seed_salt, num_samples) if train else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=train and (num_samples or len(dataset)) > batch_size,
            collate_fn=collate_fn,
        )


class PretrainDataModule(ImageDataModule):
    """Unlabeled pretraining views plus a small labeled split for the k-NN monitor.

    Args:
        root: image folder, or a folder with the Fashion-MNIST IDX files; unset = built-in data.
        dataset: ``auto``, ``fashion_mnist`` or ``folder``.
        img_size: side of the training crops (the model input).
        in_chans: image channels; default 1 for Fashion-MNIST, 3 for image folders.
        batch_size: images per device and step.
        num_workers: loader processes; default 0 for the in-memory Fashion-MNIST (workers would only
            compete with training for the cores), else min(8, CPU count) for decoding image files.
        crop_scale: RandomResizedCrop area range.
        hflip: random horizontal flips.
        color_jitter: colour jitter strength (0 = off, as MAE).
        decode_size: side of the uint8 images decoded from files (default img_size / 0.875).
        knn_train_size: labeled training images used as the k-NN memory (0 = all).
        knn_test_size: labeled held-out images scored by the k-NN monitor (0 = all).
        val_fraction: held-out fraction for the k-NN monitor when a folder has no ``val/`` split.
        verify_images: open every file once at start and skip unreadable ones (with a report).
        seed: data order and augmentation seed.
    """

    def __init__(
        self,
        root: str | None = None,
        dataset: Literal["auto", "fashion_mnist", "folder"] = "auto",
        img_size: int = 32,
        in_chans: int | None = None,
        batch_size: int = 256,
        num_workers: int | None = None,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        hflip: bool = True,
        color_jitter: float = 0.0,
        decode_size: int | None = None,
        knn_train_size: int = 10000,
        knn_test_size: int = 2000,
        val_fraction: float = 0.1,
        verify_images: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(root, dataset, img_size, in_chans, batch_size, num_workers, decode_size, val_fraction, verify_images, seed)
        self.knn_train_size = knn_train_size
        self.knn_test_size = knn_test_size
        self.train_augment = TrainAugment(img_size, self.mean, self.std, crop_scale, hflip, color_jitter)
        self.train_set: Dataset | None = None
        self.knn_train_set: Dataset | None = None
        self.knn_test_set: Dataset | None = None
        self.classes: list[str] = []

    # ------------------------------------------------------------------ data sets
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        splits = self.load_splits()
        self.train_set, self.classes = splits.train, splits.classes
        if splits.val is not None and splits.classes:
            self.knn_train_set = self._subset(splits.train, self.knn_train_size, 1)
            self.knn_test_set = self._subset(splits.val, self.knn_test_size, 2)
        else:
            log.info("%s has no labeled validation images: the k-NN monitor is off (it needs labels).", self.root)
        log.info("data: %s, %d training images, %d channels, %d px", self.describe(), len(self.train_set), self.in_chans, self.img_size)

    def describe(self) -> str:
        return "Fashion-MNIST" if self.source == "fashion_mnist" else f"image folder {self.root}"

    def _subset(self, dataset: Dataset, size: int, salt: int) -> Dataset:
        if size <= 0 or size >= len(dataset):
            return dataset
        g = torch.Generator().manual_seed(self.seed * 7919 + salt)
        return Subset(dataset, torch.randperm(len(dataset), generator=g)[:size].tolist())

    @property
    def has_labels(self) -> bool:
        """Whether the k-NN monitor can run (a labeled memory and test split exist)."""
        self.setup()
        return self.knn_train_set is not None and self.knn_test_set is not None

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        self.setup()
        if len(self.train_set) < self.batch_size:
            raise UserError(
                f"{len(self.train_set)} training images are fewer than one batch of {self.batch_size}: "
                "lower --data.batch_size or add images."
            )
        return self.make_loader(self.train_set, train=True)

    def knn_dataloaders(self, batch_size: int = 512) -> tuple[DataLoader, DataLoader] | None:
        """Loaders of (uint8 images, labels) for the k-NN memory and test split, or None without labels."""
        if not self.has_labels:
            return None
        return self.make_loader(self.knn_train_set, False, batch_size), self.make_loader(self.knn_test_set, False, batch_size)

    # ------------------------------------------------------------------ device side
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Augment training batches on the device (uint8 -> normalised float views)."""
        images, labels = batch
        if self.trainer is not None and self.trainer.training:
            self.seed_training_batch()
            return self.train_augment.to(images.device)(images), labels
        return self.eval_transform.to(images.device)(images), labels

    def eval_images(self, images: Tensor) -> Tensor:
        """Deterministic view of uint8 images for monitors and pictures."""
        return self.eval_transform.to(images.device)(images)


class MultiCropDataModule(PretrainDataModule):
    """:class:`PretrainDataModule` whose training batches are multi-crop views (iBOT, DINO).

    Training batches become ``(views, labels)`` with ``views`` = 2 global ``[B, C, img_size, img_size]``
    + ``num_local`` local ``[B, C, local_size, local_size]`` tensors (see :class:`MultiCropAugment`).

    Args:
        local_size: side of the local crops (96 for 224 px data; 16 for 32 px).
        num_local: local crops per image (10 in iBOT).
        global_scale: global crop area range.
        local_scale: local crop area range.
        color_jitter: jitter strength.
        **kwargs: :class:`PretrainDataModule` arguments (root, img_size, batch_size, k-NN sizes, ...).
    """

    def __init__(self, local_size: int = 16, num_local: int = 4, global_scale: tuple[float, float] = (0.25, 1.0),
                 local_scale: tuple[float, float] = (0.05, 0.25), color_jitter: float = 0.4, **kwargs: Any) -> None:
        super().__init__(color_jitter=color_jitter, **kwargs)
        self.local_size, self.num_local = local_size, num_local
        self.train_augment = MultiCropAugment(self.img_size, local_size, num_local, self.mean, self.std,
                                              tuple(global_scale), tuple(local_scale), color_jitter)
