"""Labeled + unlabeled data for semi-supervised detection (Soft Teacher), views made on the device.

Every training step yields::

    {"labeled": (x [B, C, S, S], targets),                       # targets: B dicts of boxes [n, 4], labels [n]
     "unlabeled": {"weak": [rB, C, S, S], "strong": [rB, C, S, S], "weak_to_strong": [rB, 3, 3]}}

Images stay uint8 until the device. There one pipeline (kornia) makes the views of METHODS.md section 7:

* weak view (teacher): random horizontal flip;
* strong view (student): the weak view + brightness / contrast jitter + ONE geometric op per image (translate
  up to 10 %, rotate up to 30 degrees or shear up to 30 degrees, x or y) + random erasing;
* labeled images: flip + brightness / contrast (their boxes flipped with them).

The geometric op is recorded as a matrix (``weak_to_strong``), so the teacher's boxes in the weak view are
mapped into the strong view and the student's proposals back (:mod:`ssl_kit.data.box_geometry`).

Sources:
* built-in (``root`` unset): detection scenes of real Fashion-MNIST items
  (:mod:`ssl_kit.data.detection_scenes`), ``train_scenes`` from its train split, ``val_scenes`` from its test
  split; ``labeled_fraction`` of the train scenes keep their boxes (seeded, written to
  ``labeled_subset.json``);
* COCO JSON: ``root`` (the images folder) + ``train_annotations`` + ``val_annotations``; the labeled /
  unlabeled split comes from ``labeled_fraction`` of the train file, or from a second file
  ``unlabeled_annotations`` (its boxes are not used). Images are resized to ``img_size`` squares and their
  boxes scaled with them.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import kornia.augmentation as K
import torch
from kornia.geometry.transform import warp_affine
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ssl_kit.data.box_geometry import (
    edge_to_centre, flip_matrices, map_boxes, rotation_matrices, shear_matrices, translation_matrices,
)
from ssl_kit.data.coco import CocoDetectionDataset, read_coco
from ssl_kit.data.detection_scenes import DETECTION_CLASSES, DetectionSceneDataset, make_detection_scenes
from ssl_kit.data.fmnist_scenes import TRAIN_SCENES
from ssl_kit.data.fashion_mnist import load_fashion_mnist
from ssl_kit.data.labeled_unlabeled import ImagesOnly, LabeledUnlabeledDataModule
from ssl_kit.errors import UserError
from ssl_kit.validation import DATA_RULES, check_settings

log = logging.getLogger("ssl_kit")
Targets = list[dict[str, Tensor]]


def detection_collate(batch: list[tuple[Tensor, dict[str, Tensor]]]) -> tuple[Tensor, Targets]:
    """Stack the images, keep the targets as a list (their box counts differ)."""
    return torch.stack([item[0] for item in batch]), [item[1] for item in batch]


def flip_targets(targets: Targets, matrices: Tensor, size: int) -> Targets:
    """Targets carried through per-image maps (boxes leaving the view are dropped with their labels)."""
    boxes, kept = map_boxes([t["boxes"] for t in targets], matrices, size)
    return [{"boxes": b, "labels": t["labels"][k]} for b, t, k in zip(boxes, targets, kept)]


class DetectionAugment(nn.Module):
    """Weak / strong views with recorded geometry (module docstring), then normalisation.

    Args:
        img_size: side S of the (square) images.
        mean, std: per-channel normalisation.
        hflip: random horizontal flip in the weak view.
        translate: largest shift, as a fraction of S.
        rotate: largest rotation in degrees.
        shear: largest shear angle in degrees.
        brightness, contrast: jitter ranges around 1.
        erase_prob, erase_scale: random erasing probability and area range.
    """

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float], hflip: bool = True,
                 translate: float = 0.1, rotate: float = 30.0, shear: float = 30.0, brightness: float = 0.4,
                 contrast: float = 0.4, erase_prob: float = 0.7, erase_scale: tuple[float, float] = (0.02, 0.1)) -> None:
        super().__init__()
        self.img_size, self.hflip = img_size, hflip
        self.translate, self.rotate, self.shear = translate, rotate, shear
        self.photometric = nn.Sequential(
            K.RandomBrightness((1 - brightness, 1 + brightness), p=0.8),
            K.RandomContrast((1 - contrast, 1 + contrast), p=0.8),
        )
        self.erase = K.RandomErasing(scale=tuple(erase_scale), p=erase_prob)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def normalise(self, x: Tensor) -> Tensor:
        return (x.clamp(0.0, 1.0) - self.mean) / self.std

    def weak(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 ``[B, C, S, S]`` -> float ``[0, 1]`` flipped images and their ``[B, 3, 3]`` flip matrices."""
        x = images.float().div(255.0)
        flipped = torch.rand(len(x), device=x.device) < (0.5 if self.hflip else 0.0)
        x = torch.where(flipped[:, None, None, None], x.flip(-1), x)
        return x, flip_matrices(flipped, self.img_size)

    def geometric_matrices(self, n: int, device: torch.device) -> Tensor:
        """``[n, 3, 3]``: per image one of translate / rotate / shear, uniformly at random."""
        size = self.img_size
        op = torch.randint(3, (n,), device=device)
        uniform = lambda *shape: torch.rand(*shape, device=device) * 2 - 1  # noqa: E731
        translate = translation_matrices(uniform(n, 2) * self.translate * size)
        rotate = rotation_matrices(uniform(n) * self.rotate, size)
        shear = shear_matrices(uniform(n) * self.shear, torch.rand(n, device=device) < 0.5, size)
        return torch.where((op == 0)[:, None, None], translate, torch.where((op == 1)[:, None, None], rotate, shear))

    def warp(self, x: Tensor, matrices: Tensor) -> Tensor:
        """Resample ``[B, C, S, S]`` images with per-image edge-coordinate maps (zeros outside)."""
        centre = torch.stack([edge_to_centre(m) for m in matrices])
        return warp_affine(x, centre[:, :2], (self.img_size, self.img_size), align_corners=True)

    def labeled(self, images: Tensor, targets: Targets) -> tuple[Tensor, Targets]:
        """Flip + photometric jitter; boxes flipped with their images."""
        x, flips = self.weak(images)
        return self.normalise(self.photometric(x)), flip_targets(targets, flips, self.img_size)

    def unlabeled(self, images: Tensor) -> dict[str, Tensor]:
        """Weak view for the teacher, strong view for the student, and the weak -> strong map."""
        weak, _ = self.weak(images)
        matrices = self.geometric_matrices(len(weak), weak.device)
        strong = self.erase(self.warp(self.photometric(weak), matrices))
        return {"weak": self.normalise(weak), "strong": self.normalise(strong), "weak_to_strong": matrices}


class DetectionDataModule(LabeledUnlabeledDataModule):
    """Labeled ``(image, boxes)`` batches of ``batch_size`` and ``unlabeled_ratio * batch_size`` unlabeled images.

    Args:
        root: COCO images folder; unset = built-in Fashion-MNIST detection scenes.
        train_annotations, val_annotations: COCO JSON files (needed with ``root``).
        unlabeled_annotations: optional COCO JSON of the unlabeled images (then every train image is labeled).
        img_size: model input side (and the built-in canvas side).
        in_chans: channels (1 for the built-in scenes, 3 for COCO by default).
        batch_size: LABELED images per device and step.
        unlabeled_ratio: unlabeled images per labeled image (4 = Soft Teacher's 1:4; 0 = supervised only).
        labeled_fraction: fraction of the train images that keep their boxes (seeded).
        train_scenes, val_scenes: built-in scene counts.
        objects: built-in items per scene (inclusive range).
        object_size: built-in item side range in pixels.
        max_overlap: built-in largest IoU between two items' boxes.
        texture: built-in textured background.
        translate, rotate, shear, erase_prob: strong-view settings (:class:`DetectionAugment`).
        num_workers: loader processes (0 for the in-memory scenes).
        verify_images: open every COCO image once at setup (errors name the file).
        seed: scenes, subset, order and augmentation seed.
        draw_group_size: images of the global batch that share one random stream (augmentation, masks);
            unset = one stream per device batch. Runs whose per-device batch is a multiple of it draw
            the same for every image on any number of processes (``ssl_kit.distributed``).
    """

    task = "detection"
    collate_fn = staticmethod(detection_collate)

    def __init__(
        self,
        root: str | None = None,
        train_annotations: str | None = None,
        val_annotations: str | None = None,
        unlabeled_annotations: str | None = None,
        img_size: int = 128,
        in_chans: int | None = None,
        batch_size: int = 2,
        unlabeled_ratio: int = 4,
        labeled_fraction: float = 0.1,
        train_scenes: int = TRAIN_SCENES,
        val_scenes: int = 300,
        objects: tuple[int, int] = (2, 6),
        object_size: tuple[int, int] = (20, 56),
        max_overlap: float = 0.3,
        texture: bool = True,
        translate: float = 0.1,
        rotate: float = 30.0,
        shear: float = 30.0,
        erase_prob: float = 0.7,
        num_workers: int | None = None,
        verify_images: bool = True,
        seed: int = 0,
        draw_group_size: int | None = None,
    ) -> None:
        check_settings(dict(locals()), "data", DATA_RULES)
        if root is not None and not Path(root).expanduser().is_dir():
            raise UserError(f"--data.root {root} does not exist: pass your COCO images folder, or leave it unset for "
                            "the built-in Fashion-MNIST detection scenes.")
        if root is not None and (train_annotations is None or val_annotations is None):
            raise UserError("With --data.root, pass --data.train_annotations and --data.val_annotations (COCO JSON).")
        super().__init__(root, "folder" if root else "fashion_mnist", img_size, in_chans, batch_size, num_workers,
                         img_size, 0.0, verify_images, seed, draw_group_size)
        self.init_split(unlabeled_ratio)
        if not 0.0 < labeled_fraction <= 1.0:
            raise UserError(f"--data.labeled_fraction must be in (0, 1], got {labeled_fraction}.")
        self.train_annotations, self.val_annotations = train_annotations, val_annotations
        self.unlabeled_annotations = unlabeled_annotations
        self.labeled_fraction = labeled_fraction
        self.train_scenes, self.val_scenes = train_scenes, val_scenes
        self.scene_options = dict(canvas=img_size, objects=tuple(objects), object_size=tuple(object_size),
                                  max_overlap=max_overlap, texture=texture)
        self.augment = DetectionAugment(img_size, self.mean, self.std, translate=translate, rotate=rotate, shear=shear,
                                        erase_prob=erase_prob)

    @property
    def num_classes(self) -> int:
        """Classes including background (torchvision's convention)."""
        self.setup()
        return len(self.classes)

    # ------------------------------------------------------------------ data sets
    def setup(self, stage: str | None = None) -> None:
        if self.full_train is not None:
            return
        extra_unlabeled = self._builtin() if self.root is None else self._coco()
        n = len(self.full_train)
        count = n if extra_unlabeled is not None else max(1, round(self.labeled_fraction * n))
        self.split_train(count, extra_unlabeled, "lower --data.labeled_fraction or pass --data.unlabeled_annotations")

    def _builtin(self) -> None:
        self.classes = list(DETECTION_CLASSES)
        lo, hi = self.scene_options["object_size"]
        if not 1 <= lo <= hi <= self.img_size:
            raise UserError(f"--data.object_size {[lo, hi]} must fit the {self.img_size} px canvas.")
        images, labels = load_fashion_mnist("train")
        self.full_train = DetectionSceneDataset(*make_detection_scenes(images, labels, self.train_scenes, seed=self.seed,
                                                                       **self.scene_options))
        images, labels = load_fashion_mnist("test")
        self.val_set = DetectionSceneDataset(*make_detection_scenes(images, labels, self.val_scenes, seed=self.seed + 1,
                                                                    **self.scene_options))
        return None

    def _coco(self) -> Dataset | None:
        train = read_coco(self.train_annotations, self.root)
        self.classes = ["background"] + train.categories
        val = read_coco(self.val_annotations, self.root, train.categories)
        self.full_train = CocoDetectionDataset(train.images, self.img_size, self.in_chans)
        self.val_set = CocoDetectionDataset(val.images, self.img_size, self.in_chans)
        if self.unlabeled_annotations is None:
            return None
        unlabeled = read_coco(self.unlabeled_annotations, self.root, train.categories)
        return ImagesOnly(CocoDetectionDataset(unlabeled.images, self.img_size, self.in_chans))

    def save_subset(self, path: str | Path) -> None:
        """Write which training images kept their boxes, so the run can be repeated."""
        self.setup()
        files = [str(self.full_train.images[i].path) for i in self.subset_indices] if self.root else None
        Path(path).write_text(json.dumps({"labeled_fraction": self.labeled_fraction, "labeled_images": len(self.subset_indices),
                                          "seed": self.seed, "indices": self.subset_indices, "files": files}) + "\n")

    # ------------------------------------------------------------------ loaders
    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self.make_loader(self.val_set, False, batch_size=16, collate_fn=detection_collate)

    def eval_images(self, images: Tensor) -> Tensor:
        """uint8 ``[B, C, S, S]`` -> normalised float."""
        return self.augment.to(images.device).normalise(images.float().div(255.0))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training dict -> labeled (flip + jitter) and unlabeled weak / strong views; evaluation
        ``(images, targets)`` -> normalised images, targets unchanged."""
        if not isinstance(batch, dict):
            images, targets = batch
            return self.eval_images(images), targets
        draws = self.seed_training_batch()
        augment = self.augment.to(batch["labeled"][0].device)
        out: dict[str, Any] = {"labeled": draws.run("labeled", augment.labeled, *batch["labeled"])}
        if "unlabeled" in batch:
            out["unlabeled"] = draws.run("unlabeled", augment.unlabeled, batch["unlabeled"])
        return out
