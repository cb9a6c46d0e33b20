"""Pretraining data module: uint8 batches from the loaders, kornia augmentation on the device.

Sources (``dataset``):
* ``fashion_mnist``: the built-in default, read offline (``root`` may name a folder with the IDX files);
* ``folder``: the user's images under ``root`` (class sub-folders or flat; a ``train/`` + ``val/``
  split is used as such);
* ``auto`` (default): ``fashion_mnist`` when ``root`` is unset or holds the IDX files, else ``folder``.

Exact resume: the train sampler is reshuffled from ``seed + epoch``, and before each training
batch is augmented the global RNG is seeded from (seed, rank, number of training batches seen),
a counter kept in this module's ``state_dict`` (saved in every checkpoint). Augmentation and the
method's random masking therefore repeat exactly after a resume.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset, TensorDataset

from ssl_kit.data import fashion_mnist
from ssl_kit.data.augment import EvalTransform, TrainAugment
from ssl_kit.data.image_folder import ImageFolderDataset, ImageList, scan_image_folder
from ssl_kit.errors import UserError

log = logging.getLogger("ssl_kit")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class EpochSeededRandomSampler(RandomSampler):
    """RandomSampler whose order depends only on ``(seed, epoch)``, so a resumed run sees the same order.

    Lightning calls ``set_epoch`` every epoch; under DDP it swaps in a DistributedSampler, which
    is seeded the same way.
    """

    def __init__(self, data_source: Dataset, seed: int = 0) -> None:
        super().__init__(data_source, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)


def step_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class PretrainDataModule(pl.LightningDataModule):
    """Unlabeled pretraining views plus a small labeled split for the k-NN monitor.

    Args:
        root: image folder, or a folder with the Fashion-MNIST IDX files; unset = built-in data.
        dataset: ``auto``, ``fashion_mnist`` or ``folder``.
        img_size: side of the training crops (the model input).
        in_chans: image channels; default 1 for Fashion-MNIST, 3 for image folders.
        batch_size: images per device and step.
        num_workers: loader processes.
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
        num_workers: int = 2,
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
        super().__init__()
        self.root = root
        self.source = self._resolve_source(root, dataset)
        self.img_size = img_size
        self.in_chans = in_chans if in_chans is not None else (1 if self.source == "fashion_mnist" else 3)
        if self.in_chans not in (1, 3):
            raise UserError(f"--data.in_chans must be 1 (grayscale) or 3 (RGB), got {self.in_chans}.")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.decode_size = decode_size or round(img_size / 0.875)
        self.knn_train_size = knn_train_size
        self.knn_test_size = knn_test_size
        self.val_fraction = val_fraction
        self.verify_images = verify_images
        self.seed = seed
        if self.source == "fashion_mnist":
            mean, std = fashion_mnist.MEAN * self.in_chans, fashion_mnist.STD * self.in_chans
        else:
            mean, std = (IMAGENET_MEAN, IMAGENET_STD) if self.in_chans == 3 else ((0.5,), (0.25,))
        self.mean, self.std = tuple(mean), tuple(std)
        self.train_augment = TrainAugment(img_size, mean, std, crop_scale, hflip, color_jitter)
        self.eval_transform = EvalTransform(img_size, mean, std)
        self.train_set: Dataset | None = None
        self.knn_train_set: Dataset | None = None
        self.knn_test_set: Dataset | None = None
        self.classes: list[str] = []
        self.train_batches_seen = 0

    @staticmethod
    def _resolve_source(root: str | None, dataset: str) -> str:
        if dataset not in ("auto", "fashion_mnist", "folder"):
            raise UserError(f"--data.dataset must be auto, fashion_mnist or folder, got {dataset!r}.")
        if dataset != "auto":
            if dataset == "folder" and not root:
                raise UserError("--data.dataset folder needs --data.root pointing at your images.")
            return dataset
        if root is None:
            return "fashion_mnist"
        idx_files = [name for pair in fashion_mnist.FILES.values() for name in pair]
        return "fashion_mnist" if all((Path(root).expanduser() / n).is_file() for n in idx_files) else "folder"

    # ------------------------------------------------------------------ data sets
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.source == "fashion_mnist":
            self._setup_fashion_mnist()
        else:
            self._setup_folder()
        log.info("data: %s, %d training images, %d channels, %d px", self.describe(), len(self.train_set), self.in_chans, self.img_size)

    def describe(self) -> str:
        return "Fashion-MNIST" if self.source == "fashion_mnist" else f"image folder {self.root}"

    def _subset(self, dataset: Dataset, size: int, salt: int) -> Dataset:
        if size <= 0 or size >= len(dataset):
            return dataset
        g = torch.Generator().manual_seed(self.seed * 7919 + salt)
        return Subset(dataset, torch.randperm(len(dataset), generator=g)[:size].tolist())

    def _setup_fashion_mnist(self) -> None:
        images, labels = fashion_mnist.load_fashion_mnist("train", self.root)
        test_images, test_labels = fashion_mnist.load_fashion_mnist("test", self.root)
        if self.in_chans == 3:
            images, test_images = images.expand(-1, 3, -1, -1), test_images.expand(-1, 3, -1, -1)
        self.classes = list(fashion_mnist.CLASSES)
        self.train_set = TensorDataset(images, labels)
        self.knn_train_set = self._subset(self.train_set, self.knn_train_size, 1)
        self.knn_test_set = self._subset(TensorDataset(test_images, test_labels), self.knn_test_size, 2)

    def _folder(self, images: ImageList, indices: list[int] | None = None) -> ImageFolderDataset:
        return ImageFolderDataset(images, self.decode_size, self.in_chans, indices)

    def _setup_folder(self) -> None:
        root = Path(self.root).expanduser()
        train_dir, val_dir = root / "train", root / "val"
        if train_dir.is_dir() and val_dir.is_dir():
            train, val = scan_image_folder(train_dir, self.verify_images), scan_image_folder(val_dir, self.verify_images)
            if train.classes and val.classes and train.classes != val.classes:
                raise UserError(f"{train_dir} and {val_dir} have different class folders; make them match.")
            self.train_set = self._folder(train)
            if train.labeled and val.labeled:
                self.classes = train.classes
                self.knn_train_set = self._subset(self._folder(train), self.knn_train_size, 1)
                self.knn_test_set = self._subset(self._folder(val), self.knn_test_size, 2)
            return
        images = scan_image_folder(root, self.verify_images)
        self.train_set = self._folder(images)
        if not images.labeled:
            log.info("%s has no class sub-folders: the k-NN monitor is off (it needs labels).", root)
            return
        self.classes = images.classes
        g = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(images.paths), generator=g).tolist()
        n_val = max(1, int(len(order) * self.val_fraction))
        self.knn_test_set = self._subset(self._folder(images, order[:n_val]), self.knn_test_size, 2)
        self.knn_train_set = self._subset(self._folder(images, order[n_val:]), self.knn_train_size, 1)

    @property
    def has_labels(self) -> bool:
        """Whether the k-NN monitor can run (a labeled memory and test split exist)."""
        self.setup()
        return self.knn_train_set is not None and self.knn_test_set is not None

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=EpochSeededRandomSampler(dataset, self.seed) if train else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=train,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        if len(self.train_set) < self.batch_size:
            raise UserError(
                f"{len(self.train_set)} training images are fewer than one batch of {self.batch_size}: "
                "lower --data.batch_size or add images."
            )
        return self._loader(self.train_set, self.batch_size, train=True)

    def knn_dataloaders(self, batch_size: int = 512) -> tuple[DataLoader, DataLoader] | None:
        """Loaders of (uint8 images, labels) for the k-NN memory and test split, or None without labels."""
        if not self.has_labels:
            return None
        return self._loader(self.knn_train_set, batch_size, False), self._loader(self.knn_test_set, batch_size, False)

    # ------------------------------------------------------------------ device side
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Augment training batches on the device (uint8 -> normalised float views)."""
        images, labels = batch
        if self.trainer is not None and self.trainer.training:
            rank = self.trainer.global_rank
            torch.manual_seed(step_seed(self.seed, rank, self.train_batches_seen))
            self.train_batches_seen += 1
            return self.train_augment.to(images.device)(images), labels
        return self.eval_transform.to(images.device)(images), labels

    def state_dict(self) -> dict[str, Any]:
        return {"train_batches_seen": self.train_batches_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_batches_seen = int(state_dict.get("train_batches_seen", 0))

    def eval_images(self, images: Tensor) -> Tensor:
        """Deterministic view of uint8 images for monitors and pictures."""
        return self.eval_transform.to(images.device)(images)
