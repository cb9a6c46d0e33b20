"""What the dense semi-supervised data modules (segmentation, detection) share: a seeded labeled subset of the
training images, an unlabeled pool (the rest, plus any extra unlabeled images), and epochs of one pass over
that pool, with ``unlabeled_ratio`` unlabeled images per labeled one in every step."""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from ssl_kit.data.module import ImageDataModule
from ssl_kit.errors import UserError

log = logging.getLogger("ssl_kit")


class ImagesOnly(Dataset):
    """The image part of another data set's items (labels of unlabeled images are never used)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[i][0]


class LabeledUnlabeledDataModule(ImageDataModule):
    """Base class: subclasses set ``full_train``, ``val_set`` and ``classes`` in ``setup`` and then call
    :meth:`split_train`.

    Attributes used by subclasses: ``unlabeled_ratio`` (set by the subclass), ``collate_fn`` (training loaders).
    """

    collate_fn: Callable | None = None
    task = "images"

    def init_split(self, unlabeled_ratio: int) -> None:
        if unlabeled_ratio < 0:
            raise UserError(f"--data.unlabeled_ratio must be >= 0, got {unlabeled_ratio}.")
        self.unlabeled_ratio = unlabeled_ratio
        self.full_train: Dataset | None = None
        self.train_set: Dataset | None = None
        self.unlabeled_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.subset_indices: list[int] | None = None
        self.classes: list[str] = []

    def split_train(self, count: int, extra_unlabeled: Dataset | None, more_unlabeled_hint: str) -> None:
        """Keep ``count`` seeded training images labeled; the others (and ``extra_unlabeled``) are unlabeled.

        ``more_unlabeled_hint`` completes the error raised when a semi-supervised run has no unlabeled images.
        """
        n = len(self.full_train)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 7919 + 3)).tolist()
        self.subset_indices = sorted(order[:count])
        self.train_set = Subset(self.full_train, self.subset_indices)
        pools = [ImagesOnly(Subset(self.full_train, sorted(order[count:])))] if count < n else []
        pools += [extra_unlabeled] if extra_unlabeled is not None else []
        if self.unlabeled_ratio > 0:
            if not pools:
                raise UserError(f"No unlabeled images: {more_unlabeled_hint}, or train supervised only with "
                                "--data.unlabeled_ratio 0.")
            self.unlabeled_set = ConcatDataset(pools) if len(pools) > 1 else pools[0]
            if len(self.unlabeled_set) < self.unlabeled_ratio * self.batch_size:
                raise UserError(f"{len(self.unlabeled_set)} unlabeled images are fewer than one unlabeled batch of "
                                f"{self.unlabeled_ratio * self.batch_size}: lower --data.unlabeled_ratio or --data.batch_size.")
        log.info("%s data: %d labeled, %d unlabeled, %d validation images, %d classes", self.task, len(self.train_set),
                 len(self.unlabeled_set) if self.unlabeled_set is not None else 0, len(self.val_set), len(self.classes))

    @property
    def steps_per_epoch(self) -> int:
        """One pass over the unlabeled images (over all training images when supervised only, so the baseline
        takes as many steps)."""
        self.setup()
        global_batch = self.batch_size * self._world()[1]
        if self.unlabeled_set is not None:
            return max(1, len(self.unlabeled_set) // (self.unlabeled_ratio * global_batch))
        return max(1, len(self.full_train) // global_batch)

    def train_dataloader(self) -> dict[str, DataLoader]:
        steps, world = self.steps_per_epoch, self._world()[1]
        loaders = {"labeled": self.make_loader(self.train_set, True, num_samples=steps * self.batch_size * world,
                                               collate_fn=self.collate_fn)}
        if self.unlabeled_set is not None:
            batch = self.unlabeled_ratio * self.batch_size
            loaders["unlabeled"] = self.make_loader(self.unlabeled_set, True, batch, seed_salt=1,
                                                    num_samples=steps * batch * world)
        return loaders
