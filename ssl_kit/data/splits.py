"""Where images come from: resolve the source and load labeled train / val splits (uint8)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from ssl_kit.data import fashion_mnist
from ssl_kit.data.fmnist_scenes import TRAIN_SCENES, make_scenes
from ssl_kit.data.image_folder import ImageFolderDataset, ImageList, scan_image_folder
from ssl_kit.errors import UserError

log = logging.getLogger("ssl_kit")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SOURCES = ("auto", "fashion_mnist", "fmnist_scenes", "folder")


@dataclass
class Splits:
    """Train and validation sets of ``(uint8 image [C, H, W], label)``; labels are -1 when unlabeled.

    Attributes:
        train: training images.
        val: held-out labeled images, or None (flat folder).
        classes: class names (empty when unlabeled).
        train_labels: ``[len(train)]`` labels, for class-balanced subsets.
    """

    train: Dataset
    val: Dataset | None
    classes: list[str] = field(default_factory=list)
    train_labels: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))


def resolve_source(root: str | None, dataset: str) -> str:
    """``auto`` -> ``fashion_mnist`` when ``root`` is unset or holds the IDX files, else ``folder``."""
    if dataset not in SOURCES:
        raise UserError(f"--data.dataset must be one of {', '.join(SOURCES)}, got {dataset!r}.")
    if dataset != "auto":
        if dataset == "folder" and not root:
            raise UserError("--data.dataset folder needs --data.root pointing at your images.")
        return dataset
    if root is None:
        return "fashion_mnist"
    idx_files = [name for pair in fashion_mnist.FILES.values() for name in pair]
    return "fashion_mnist" if all((Path(root).expanduser() / n).is_file() for n in idx_files) else "folder"


def channel_stats(source: str, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation mean and std per channel for a source."""
    if source in ("fashion_mnist", "fmnist_scenes"):
        return fashion_mnist.MEAN * in_chans, fashion_mnist.STD * in_chans
    return (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.5,), (0.25,))


def load_splits(
    source: str, root: str | None, in_chans: int, decode_size: int, val_fraction: float = 0.1,
    verify_images: bool = True, seed: int = 0, scenes: int = TRAIN_SCENES,
) -> Splits:
    """Load train / val splits.

    * Fashion-MNIST: its train (60k) and test (10k) splits.
    * Folder with ``train/`` and ``val/``: those.
    * Folder of class sub-folders: a seeded ``val_fraction`` of the images is held out as val.
    * Flat folder: every image is unlabeled training data, no val.
    * ``fmnist_scenes``: the built-in segmentation scenes (``decode_size`` px canvas, ``scenes`` from the
      Fashion-MNIST train split, scene seed ``seed``), unlabeled, no val: with the default 2000 the images a
      semi-supervised segmentation run of the same seed and size trains on, for pretraining on them; more are
      other scenes of the same train items (no val scene's items: those come from the test split).
    """
    if source == "fmnist_scenes":
        images, labels = fashion_mnist.load_fashion_mnist("train", root)
        canvases, _ = make_scenes(images, labels, scenes, canvas=decode_size, seed=seed)
        canvases = canvases.expand(-1, 3, -1, -1) if in_chans == 3 else canvases
        return Splits(TensorDataset(canvases, torch.full((len(canvases),), -1)), None)
    if source == "fashion_mnist":
        images, labels = fashion_mnist.load_fashion_mnist("train", root)
        test_images, test_labels = fashion_mnist.load_fashion_mnist("test", root)
        if in_chans == 3:
            images, test_images = images.expand(-1, 3, -1, -1), test_images.expand(-1, 3, -1, -1)
        return Splits(TensorDataset(images, labels), TensorDataset(test_images, test_labels), list(fashion_mnist.CLASSES), labels)

    def folder(images: ImageList, indices: list[int] | None = None) -> ImageFolderDataset:
        return ImageFolderDataset(images, decode_size, in_chans, indices)

    def labels_of(images: ImageList, indices: list[int] | None = None) -> Tensor:
        labels = torch.tensor(images.labels, dtype=torch.long)
        return labels if indices is None else labels[indices]

    root_path = Path(root).expanduser()
    train_dir, val_dir = root_path / "train", root_path / "val"
    if train_dir.is_dir() and val_dir.is_dir():
        train, val = scan_image_folder(train_dir, verify_images), scan_image_folder(val_dir, verify_images)
        if train.classes and val.classes and train.classes != val.classes:
            raise UserError(f"{train_dir} and {val_dir} have different class folders; make them match.")
        labeled = train.labeled and val.labeled
        return Splits(folder(train), folder(val) if labeled else None, train.classes if labeled else [], labels_of(train))
    images = scan_image_folder(root_path, verify_images)
    if not images.labeled:
        return Splits(folder(images), None, [], labels_of(images))
    order = torch.randperm(len(images.paths), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(len(order) * val_fraction))
    val_idx, train_idx = order[:n_val], order[n_val:]
    return Splits(folder(images, train_idx), folder(images, val_idx), images.classes, labels_of(images, train_idx))
