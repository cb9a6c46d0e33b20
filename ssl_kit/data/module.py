"""Pretraining data module: uint8 batches from the loaders, kornia augmentation on the device.

Sources (``dataset``):
* ``fashion_mnist``: the built-in default, read offline (``root`` may name a folder with the IDX files);
* ``folder``: the user's images under ``root`` (class sub-folders or flat; a ``train/`` + ``val/``
  split is used as such; with class folders only, ``val_fraction`` is held out for the k-NN
  monitor and not pretrained on);
* ``auto`` (default): ``fashion_mnist`` when ``root`` is unset or holds the IDX files, else ``folder``.

Exact resume, and the same training on any number of processes (``ssl_kit.distributed``): the train
sampler is a :class:`~ssl_kit.distributed.GlobalBatchSampler` (one global batch sequence from
``seed + epoch``, each process a contiguous share), and every random draw of a training step is made
per draw group under a seed of (seed, training batches seen, group, site). The counter of training
batches seen is kept in this module's ``state_dict`` (saved in every checkpoint), with the world size
and batch it was reached with, so augmentation and masks repeat exactly after a resume, and a resume
on another number of processes says what changed.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset

from ssl_kit.data.augment import EvalTransform, MultiCropAugment, TrainAugment
from ssl_kit.data.resumable import ResumableLoader
from ssl_kit.data.fmnist_scenes import TRAIN_SCENES
from ssl_kit.data.splits import Splits, channel_stats, load_splits, resolve_source
from ssl_kit.distributed import DrawPlan, GlobalBatchSampler, check_draw_groups, step_seed
from ssl_kit.errors import UserError
from ssl_kit.validation import DATA_RULES, check_settings

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
    return 0 if source in ("fashion_mnist", "fmnist_scenes") else min(8, os.cpu_count() or 1)


def log_world_change(saved: dict[str, Any], world: int, accumulate: int, batch_size: int) -> None:
    """Say how a resumed run's processes and batch differ from the checkpoint's, and what that means."""
    before = (int(saved["world_size"]), int(saved["batch_size"]), int(saved.get("accumulate_grad_batches", 1)))
    after = (world, batch_size, accumulate)
    if before == after:
        return
    global_before, global_after = before[0] * before[1] * before[2], world * batch_size * accumulate
    change = (f"resuming a run of {before[0]} process(es) x {before[1]} images x {before[2]} accumulation on "
              f"{world} x {batch_size} x {accumulate}")
    if global_before == global_after:
        log.info("%s: the same global batch of %d, so training continues exactly as it would have (same order, "
                 "same draws when --data.draw_group_size is set, same lr).", change, global_after)
    else:
        log.warning("%s: the global batch changes %d -> %d. The optimizer state and the lr continue from the checkpoint "
                    "(not rescaled for the new batch); the warmup + cosine schedule is recomputed for the new steps per "
                    "epoch; the data order and draws from here on differ from the original run.", change, global_before, global_after)


class ImageDataModule(pl.LightningDataModule):
    """What every ssl_kit data module shares: the source, sizes, channels, normalisation, loaders' settings.

    Args are documented on the subclasses.
    """

    train_scenes: int = TRAIN_SCENES  # built-in scenes made for ``fmnist_scenes`` (PretrainDataModule sets its own)

    def __init__(
        self, root: str | None, dataset: str, img_size: int, in_chans: int | None, batch_size: int,
        num_workers: int | None, decode_size: int | None, val_fraction: float, verify_images: bool, seed: int,
        draw_group_size: int | None = None,
    ) -> None:
        super().__init__()
        self.root = root
        self.source = resolve_source(root, dataset)
        if img_size < 1 or batch_size < 1:
            flag, value = ("img_size", img_size) if img_size < 1 else ("batch_size", batch_size)
            raise UserError(f"--data.{flag} must be a positive integer, got {value}.")
        self.img_size = img_size
        self.in_chans = in_chans if in_chans is not None else (3 if self.source == "folder" else 1)
        if self.in_chans not in (1, 3):
            raise UserError(f"--data.in_chans must be 1 (grayscale) or 3 (RGB), got {self.in_chans}.")
        self.batch_size = batch_size
        self.num_workers = num_workers if num_workers is not None else default_num_workers(self.source)
        # scenes are made at the model's size (the canvas the segmentation module uses); files are decoded larger
        self.decode_size = decode_size or (img_size if self.source == "fmnist_scenes" else round(img_size / 0.875))
        self.val_fraction, self.verify_images, self.seed = val_fraction, verify_images, seed
        self.mean, self.std = channel_stats(self.source, self.in_chans)
        self.eval_transform = EvalTransform(img_size, self.mean, self.std)
        self.draw_groups = check_draw_groups(batch_size, draw_group_size)
        self.train_batches_seen = 0
        self.draws: DrawPlan | None = None

    def _world(self) -> tuple[int, int, int]:
        """(rank, world size, gradient accumulation) of the attached trainer (1 process without one)."""
        t = self.trainer
        return (t.global_rank, t.world_size, t.accumulate_grad_batches) if t is not None else (0, 1, 1)

    def seed_training_batch(self) -> DrawPlan:
        """Start a training batch: the draw plan of its groups (augmentation, masks: world-size independent),
        and the global RNG seeded from (seed, rank, batches seen) for anything drawn outside a group
        (dropout, stochastic depth). Both repeat exactly after a resume."""
        rank = self._world()[0]
        self.draws = DrawPlan(self.seed, self.train_batches_seen, rank * self.draw_groups, self.draw_groups)
        torch.manual_seed(step_seed(self.seed, rank, self.train_batches_seen))
        self.train_batches_seen += 1
        return self.draws

    def state_dict(self) -> dict[str, Any]:
        _, world, accumulate = self._world()
        return {"train_batches_seen": self.train_batches_seen, "world_size": world, "batch_size": self.batch_size,
                "accumulate_grad_batches": accumulate}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_batches_seen = int(state_dict.get("train_batches_seen", 0))
        if "world_size" in state_dict:
            log_world_change(state_dict, *self._world()[1:], self.batch_size)

    def load_splits(self) -> Splits:
        """Train / val splits of this module's source."""
        return load_splits(self.source, self.root, self.in_chans, self.decode_size, self.val_fraction, self.verify_images, self.seed,
                           self.train_scenes)

    def make_loader(self, dataset: Dataset, train: bool, batch_size: int | None = None, seed_salt: int = 0,
                    num_samples: int | None = None, collate_fn: Callable | None = None) -> DataLoader:
        """Training: the process's share of a seeded global batch sequence (exact resume, any world size);
        plain order otherwise.

        ``num_samples`` (training) sets the images per epoch (all processes together), drawn as consecutive
        permutations; ``collate_fn`` replaces the default stacking (e.g. detection targets of varying size).
        """
        batch_size = batch_size or self.batch_size
        rank, world, _ = self._world()
        sampler = GlobalBatchSampler(dataset, batch_size, world, rank, self.seed + seed_salt, num_samples) if train else None
        return (ResumableLoader if train else DataLoader)(  # training: its place in the epoch goes into checkpoints
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=train and not sampler.partial,
            collate_fn=collate_fn,
        )


class PretrainDataModule(ImageDataModule):
    """Unlabeled pretraining views plus a small labeled split for the k-NN monitor.

    Args:
        root: image folder, or a folder with the Fashion-MNIST IDX files; unset = built-in data.
        dataset: ``auto``, ``fashion_mnist``, ``folder`` or ``fmnist_scenes`` (the built-in segmentation
            scenes, unlabeled: pretraining on the images a semi-supervised segmentation run uses).
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
        draw_group_size: images of the global batch that share one random stream (augmentation, masks);
            unset = one stream per device batch. Runs whose per-device batch is a multiple of it draw
            the same for every image on any number of processes (``ssl_kit.distributed``).
        train_scenes: scenes made for ``fmnist_scenes`` (2000: exactly a segmentation run's train scenes of the
            same seed and size; more: further scenes of Fashion-MNIST train items).
    """

    def __init__(
        self,
        root: str | None = None,
        dataset: Literal["auto", "fashion_mnist", "fmnist_scenes", "folder"] = "auto",
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
        draw_group_size: int | None = None,
        train_scenes: int = TRAIN_SCENES,
    ) -> None:
        check_settings(dict(locals()), "data", DATA_RULES)
        super().__init__(root, dataset, img_size, in_chans, batch_size, num_workers, decode_size, val_fraction, verify_images, seed,
                         draw_group_size)
        self.train_scenes = train_scenes
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise UserError(f"--data.crop_scale must be [min, max] area fractions with 0 < min <= max <= 1 "
                            f"(e.g. [0.2, 1.0]), got {list(crop_scale)}.")
        if knn_train_size < 0 or knn_test_size < 0:
            raise UserError(f"--data.knn_train_size and --data.knn_test_size must be >= 0 (0 = all), got "
                            f"{knn_train_size} and {knn_test_size}.")
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
            log.info("%s has no labeled validation images: the k-NN monitor is off (it needs labels).", self.describe())
        log.info("data: %s, %d training images, %d channels, %d px", self.describe(), len(self.train_set), self.in_chans, self.img_size)

    def describe(self) -> str:
        names = {"fashion_mnist": "Fashion-MNIST", "fmnist_scenes": "Fashion-MNIST scenes"}
        return names.get(self.source, f"image folder {self.root}")

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
            draws = self.seed_training_batch()
            return draws.run("augment", self.train_augment.to(images.device), images), labels
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
        check_settings(dict(locals()), "data", DATA_RULES)
        super().__init__(color_jitter=color_jitter, **kwargs)
        self.local_size, self.num_local = local_size, num_local
        self.train_augment = MultiCropAugment(self.img_size, local_size, num_local, self.mean, self.std,
                                              tuple(global_scale), tuple(local_scale), color_jitter)
