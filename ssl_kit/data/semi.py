"""Labeled + unlabeled data for semi-supervised classification (UDA, Meta Pseudo Labels).

Every training step yields ``{"labeled": (x [B, C, S, S], y [B]), "unlabeled": (u_weak, u_strong)}``
with ``mu * B`` unlabeled images in two views; all views are made on the device with kornia
(:class:`ssl_kit.data.augment.WeakStrongAugment`), the loaders only deliver uint8.

* Fashion-MNIST (default): ``labels_per_class`` images per class of the train split (balanced,
  seeded) are labeled, the rest of the train split is unlabeled, the test split is validation.
* Image folders: ``root`` holds the labeled class folders (``train/`` + ``val/``, or a held-out
  ``val_fraction``); ``unlabeled_root`` (flat or nested, labels ignored) the unlabeled images, or,
  when it is unset, the labeled folder's images beyond ``labels_per_class`` per class.

The labeled subset is written to the run folder (``labeled_subset.json``) so a run can be repeated.
"""
from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ssl_kit.data.augment import WeakStrongAugment
from ssl_kit.data.classification import ClassificationDataModule
from ssl_kit.data.image_folder import ImageFolderDataset, scan_image_folder
from ssl_kit.errors import UserError
from ssl_kit.validation import DATA_RULES, check_settings

log = logging.getLogger("ssl_kit")


class SemiSupervisedDataModule(ClassificationDataModule):
    """Labeled batches of ``batch_size`` and unlabeled batches of ``mu * batch_size`` per step.

    Args:
        root: labeled image folder (class sub-folders) or Fashion-MNIST folder; unset = built-in data.
        unlabeled_root: folder of unlabeled images (optional, see module docstring).
        dataset: ``auto``, ``fashion_mnist`` or ``folder``.
        img_size: model input side.
        in_chans: channels (default 1 for Fashion-MNIST, 3 for folders).
        batch_size: LABELED images per device and step.
        mu: unlabeled images per labeled image (7 in UDA / MPL); 0 = supervised only.
        labels_per_class: labeled images kept per class (balanced, seeded); None = every labeled image.
        weak: ``pad_crop`` (flip + reflect-pad translate) or ``resized_crop``.
        strong_ops: RandAugment operations of the strong view (0 = weak view only).
        magnitude_range: random RandAugment magnitude range (UDA's 0-10 scale: 1..9).
        strong_op_prob: probability that each drawn RandAugment operation is applied (UDA: 0.5).
        cutout: Cutout on the strong view.
        val_size: validation images scored each epoch (0 = all; a seeded subset otherwise).
        num_workers: loader processes (default 0 in memory, up to 8 for files).
        decode_size: side of decoded image files (default img_size / 0.875).
        val_fraction: held-out fraction when the labeled folder has no ``val/``.
        verify_images: open every file once and skip unreadable ones.
        seed: subset, order and augmentation seed.
        draw_group_size: images of the global batch that share one random stream (augmentation, masks);
            unset = one stream per device batch. Runs whose per-device batch is a multiple of it draw
            the same for every image on any number of processes (``ssl_kit.distributed``).
    """

    def __init__(
        self,
        root: str | None = None,
        unlabeled_root: str | None = None,
        dataset: Literal["auto", "fashion_mnist", "folder"] = "auto",
        img_size: int = 32,
        in_chans: int | None = None,
        batch_size: int = 16,
        mu: int = 7,
        labels_per_class: int | None = 10,
        weak: Literal["pad_crop", "resized_crop"] = "pad_crop",
        strong_ops: int = 2,
        magnitude_range: tuple[int, int] = (1, 9),
        strong_op_prob: float = 0.5,
        cutout: bool = True,
        val_size: int = 0,
        num_workers: int | None = None,
        decode_size: int | None = None,
        val_fraction: float = 0.1,
        verify_images: bool = True,
        seed: int = 0,
        draw_group_size: int | None = None,
    ) -> None:
        check_settings(dict(locals()), "data", DATA_RULES)
        super().__init__(root, dataset, img_size, in_chans, batch_size, num_workers, labels_per_class, "none",
                         decode_size=decode_size, val_fraction=val_fraction, verify_images=verify_images, seed=seed,
                         draw_group_size=draw_group_size)
        if mu < 0:
            raise UserError(f"--data.mu must be >= 0 (unlabeled images per labeled image), got {mu}.")
        self.unlabeled_root, self.mu, self.val_size = unlabeled_root, mu, val_size
        self.augment = WeakStrongAugment(img_size, self.mean, self.std, weak, strong_ops, tuple(magnitude_range), cutout,
                                         strong_op_prob)
        self.unlabeled_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        super().setup(stage)
        counts = torch.bincount(self._labeled_targets(), minlength=len(self.splits.classes))
        empty = [self.splits.classes[c] for c in range(len(counts)) if counts[c] == 0]
        if empty:
            raise UserError(f"Class(es) {', '.join(empty)} have no labeled training image: add labeled images of "
                            "every class, or remove those class folders.")
        if 0 < self.val_size < len(self.val_set):
            g = torch.Generator().manual_seed(self.seed * 7919 + 2)
            self.val_set = Subset(self.val_set, sorted(torch.randperm(len(self.val_set), generator=g)[: self.val_size].tolist()))
        if self.mu > 0:
            self.unlabeled_set = self._unlabeled()
            if len(self.unlabeled_set) < self.mu * self.batch_size:
                raise UserError(f"{len(self.unlabeled_set)} unlabeled images are fewer than one unlabeled batch of "
                                f"mu x batch_size = {self.mu * self.batch_size}: lower --data.mu or --data.batch_size.")
        log.info("semi-supervised data: %d labeled, %s unlabeled (mu %d), %d validation images",
                 len(self.train_set), len(self.unlabeled_set) if self.unlabeled_set is not None else 0, self.mu,
                 len(self.val_set))

    def _labeled_targets(self) -> torch.Tensor:
        labels = self.splits.train_labels
        return labels[self.subset_indices] if self.subset_indices is not None else labels

    def _unlabeled(self) -> Dataset:
        if self.unlabeled_root:
            images = scan_image_folder(self.unlabeled_root, self.verify_images)
            return ImageFolderDataset(images, self.decode_size, self.in_chans)
        if self.subset_indices is None:
            raise UserError("No unlabeled images: set --data.labels_per_class N (the rest of the training split "
                            "becomes unlabeled) or --data.unlabeled_root FOLDER, or --data.mu 0 for supervised only.")
        keep = torch.ones(len(self.splits.train), dtype=torch.bool)
        keep[self.subset_indices] = False
        return Subset(self.splits.train, torch.nonzero(keep).flatten().tolist())

    @property
    def steps_per_epoch(self) -> int:
        """One epoch = one pass over the unlabeled images (over the train split when supervised only)."""
        self.setup()
        pool = len(self.unlabeled_set) // self.mu if self.unlabeled_set is not None else len(self.splits.train)
        return max(1, pool // (self.batch_size * self._world()[1]))

    def train_dataloader(self) -> dict[str, DataLoader]:
        self.setup()
        steps = self.steps_per_epoch
        # the small labeled set is cycled as consecutive fresh permutations, as long as the unlabeled epoch
        world = self._world()[1]
        loaders = {"labeled": self.make_loader(self.train_set, True, num_samples=steps * self.batch_size * world)}
        if self.unlabeled_set is not None:
            unlabeled_batch = self.mu * self.batch_size
            loaders["unlabeled"] = self.make_loader(self.unlabeled_set, True, unlabeled_batch, seed_salt=1,
                                                    num_samples=steps * unlabeled_batch * world)
        return loaders

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training: weak labeled view, weak + strong unlabeled views; evaluation: the plain view."""
        if not isinstance(batch, dict):
            images, labels = batch
            return self.eval_transform.to(images.device)(images), labels
        draws = self.seed_training_batch()
        augment = self.augment.to(batch["labeled"][0].device)
        images, labels = batch["labeled"]
        out: dict[str, Any] = {"labeled": (draws.run("labeled", augment.weak, images), labels)}
        if "unlabeled" in batch:
            unlabeled = batch["unlabeled"][0]
            out["unlabeled"] = draws.run("unlabeled", augment.weak_and_strong, unlabeled)
        return out

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self.make_loader(self.val_set, False, batch_size=256)
