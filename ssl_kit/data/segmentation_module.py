"""Labeled + unlabeled data for semi-supervised segmentation (U2PL).

Every training step yields ``{"labeled": (x [B, C, S, S], y [B, S, S] int64, 255 = ignore),
"unlabeled": u [ratio * B, C, S, S]}``; images and masks stay uint8 until the device, where one kornia
pipeline crops and flips image and mask together (the mask resampled nearest, so class ids stay exact).
The unlabeled images get the same geometric (weak) view; CutMix, the strong view, is made by the method
after the teacher has labeled the weak view.

Sources:
* built-in (``root`` unset): scenes of real Fashion-MNIST items (:mod:`ssl_kit.data.fmnist_scenes`),
  ``train_scenes`` from its train split, ``val_scenes`` from its test split; ``labeled_images`` of the train
  scenes keep their masks (seeded choice, written to ``labeled_subset.json``), the rest are unlabeled;
* your folder::

      root/train/images/NAME.jpg   root/train/masks/NAME.png    (index PNGs, 255 = ignore)
      root/val/images/...          root/val/masks/...
      root/unlabeled/...           (optional, images only, any layout)
      root/classes.txt             (optional, one class name per line)

  with ``--data.num_classes K``; ``labeled_images`` of the train pairs keep their masks, the others join
  the unlabeled images.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import kornia.augmentation as K
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ssl_kit.data.fashion_mnist import load_fashion_mnist
from ssl_kit.data.fmnist_scenes import SCENE_CLASSES, TRAIN_SCENES, SceneDataset, make_scenes
from ssl_kit.data.image_folder import ImageFolderDataset, scan_image_folder
from ssl_kit.data.mask_folder import MaskFolderDataset, scan_mask_folder
from ssl_kit.data.labeled_unlabeled import ImagesOnly, LabeledUnlabeledDataModule
from ssl_kit.errors import UserError
from ssl_kit.validation import DATA_RULES, check_settings

log = logging.getLogger("ssl_kit")


class JointAugment(nn.Module):
    """Random resized crop + horizontal flip applied identically to images and masks, then normalisation.

    Args:
        img_size: output side S.
        mean, std: per-channel normalisation.
        crop_scale: area range of the crop.
        hflip: random horizontal flips.
    """

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float],
                 crop_scale: tuple[float, float] = (0.5, 1.0), hflip: bool = True) -> None:
        super().__init__()
        ops: list[nn.Module] = [K.RandomResizedCrop((img_size, img_size), scale=tuple(crop_scale))]
        if hflip:
            ops.append(K.RandomHorizontalFlip())
        # kornia resamples "mask" inputs with nearest neighbours, so class ids (and 255) stay exact
        self.ops = K.AugmentationSequential(*ops, data_keys=["input", "mask"])
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def normalise(self, x: Tensor) -> Tensor:
        return (x.clamp(0.0, 1.0) - self.mean) / self.std

    def forward(self, images: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 ``[B, C, H, W]`` + uint8 ``[B, H, W]`` -> normalised float ``[B, C, S, S]`` + int64 ``[B, S, S]``."""
        x, m = self.ops(images.float().div(255.0), masks[:, None].float())
        return self.normalise(x), m[:, 0].round().long()

    def images_only(self, images: Tensor) -> Tensor:
        """The same geometric view for images without masks (the unlabeled weak view)."""
        x, _ = self.ops(images.float().div(255.0), torch.zeros_like(images[:, :1], dtype=torch.float32))
        return self.normalise(x)


class SegmentationDataModule(LabeledUnlabeledDataModule):
    """Labeled ``(image, mask)`` batches of ``batch_size`` and ``unlabeled_ratio * batch_size`` unlabeled images.

    Args:
        root: your folder (layout in the module docstring); unset = built-in Fashion-MNIST scenes.
        img_size: model input side (and the built-in canvas side).
        in_chans: channels (1 for the built-in scenes, 3 for folders by default).
        num_classes: classes incl. background (built-in: 11; required for folders).
        batch_size: LABELED images per device and step.
        unlabeled_ratio: unlabeled images per labeled image (0 = supervised only).
        labeled_images: train images that keep their masks (seeded); None = all (then unlabeled images
            must come from ``root/unlabeled`` or the ratio must be 0).
        train_scenes, val_scenes: built-in scene counts.
        objects: built-in items per scene (inclusive range).
        object_size: built-in item side range in pixels.
        texture: built-in textured background.
        crop_scale: crop area range of the joint augmentation.
        hflip: random flips.
        num_workers: loader processes (0 for the in-memory scenes, up to 8 for files).
        decode_size: side files are decoded to (default img_size).
        verify_images: open every file once at setup (errors name the file).
        seed: scenes, subset, order and augmentation seed.
        draw_group_size: images of the global batch that share one random stream (augmentation, masks);
            unset = one stream per device batch. Runs whose per-device batch is a multiple of it draw
            the same for every image on any number of processes (``ssl_kit.distributed``).
    """

    task = "segmentation"

    def __init__(
        self,
        root: str | None = None,
        img_size: int = 64,
        in_chans: int | None = None,
        num_classes: int | None = None,
        batch_size: int = 8,
        unlabeled_ratio: int = 1,
        labeled_images: int | None = 125,
        train_scenes: int = TRAIN_SCENES,
        val_scenes: int = 500,
        objects: tuple[int, int] = (2, 4),
        object_size: tuple[int, int] = (16, 40),
        texture: bool = True,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        hflip: bool = True,
        num_workers: int | None = None,
        decode_size: int | None = None,
        verify_images: bool = True,
        seed: int = 0,
        draw_group_size: int | None = None,
    ) -> None:
        check_settings(dict(locals()), "data", DATA_RULES)
        if root is not None and not Path(root).expanduser().is_dir():
            raise UserError(f"--data.root {root} does not exist: pass your segmentation folder, or leave it unset "
                            "for the built-in Fashion-MNIST scenes.")
        super().__init__(root, "folder" if root else "fashion_mnist", img_size, in_chans, batch_size, num_workers,
                         decode_size or img_size, 0.0, verify_images, seed, draw_group_size)
        self.init_split(unlabeled_ratio)
        if root is None:
            num_classes = num_classes or len(SCENE_CLASSES)
        elif num_classes is None:
            raise UserError("--data.num_classes is needed with your own masks: the number of classes, background "
                            "included (mask values 0..K-1, 255 = ignore).")
        self._num_classes = num_classes
        self.labeled_images = labeled_images
        self.train_scenes, self.val_scenes, self.objects = train_scenes, val_scenes, tuple(objects)
        self.object_size, self.texture = tuple(object_size), texture
        self.augment = JointAugment(img_size, self.mean, self.std, tuple(crop_scale), hflip)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    # ------------------------------------------------------------------ data sets
    def setup(self, stage: str | None = None) -> None:
        if self.full_train is not None:
            return
        extra_unlabeled = self._builtin() if self.root is None else self._folder()
        n = len(self.full_train)
        count = n if self.labeled_images is None else self.labeled_images
        if not 1 <= count <= n:
            raise UserError(f"--data.labeled_images {count} must be between 1 and the {n} training images.")
        self.split_train(count, extra_unlabeled, "set --data.labeled_images below the number of training images "
                         "or add root/unlabeled/")

    def _builtin(self) -> None:
        self.classes = list(SCENE_CLASSES)
        if self.num_classes != len(SCENE_CLASSES):
            raise UserError(f"The built-in scenes have {len(SCENE_CLASSES)} classes: drop --data.num_classes or set it "
                            f"to {len(SCENE_CLASSES)}.")
        options = dict(canvas=self.img_size, objects=self.objects, object_size=self.object_size, texture=self.texture)
        if not 1 <= self.object_size[0] <= self.object_size[1] <= self.img_size:
            raise UserError(f"--data.object_size {list(self.object_size)} must fit the {self.img_size} px canvas.")
        images, labels = load_fashion_mnist("train")
        self.full_train = SceneDataset(*make_scenes(images, labels, self.train_scenes, seed=self.seed, **options))
        images, labels = load_fashion_mnist("test")
        self.val_set = SceneDataset(*make_scenes(images, labels, self.val_scenes, seed=self.seed + 1, **options))
        return None

    def _folder(self) -> Dataset | None:
        root = Path(self.root).expanduser()
        names = root / "classes.txt"
        self.classes = names.read_text().split("\n")[: self.num_classes] if names.is_file() else \
            [str(c) for c in range(self.num_classes)]
        train = scan_mask_folder(root / "train" / "images", root / "train" / "masks", self.num_classes, self.verify_images)
        val = scan_mask_folder(root / "val" / "images", root / "val" / "masks", self.num_classes, self.verify_images)
        self.full_train = MaskFolderDataset(train, self.decode_size, self.in_chans)
        self.val_set = MaskFolderDataset(val, self.decode_size, self.in_chans)
        if not (root / "unlabeled").is_dir():
            return None
        listed = scan_image_folder(root / "unlabeled", self.verify_images)
        return ImagesOnly(ImageFolderDataset(listed, self.decode_size, self.in_chans))

    def save_subset(self, path: str | Path) -> None:
        """Write which training images kept their masks, so the run can be repeated."""
        self.setup()
        files = [str(self.full_train.pairs[i][0]) for i in self.subset_indices] if self.root else None
        Path(path).write_text(json.dumps({"labeled_images": len(self.subset_indices), "seed": self.seed,
                                          "indices": self.subset_indices, "files": files}) + "\n")

    # ------------------------------------------------------------------ loaders
    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self.make_loader(self.val_set, False, batch_size=64)

    def eval_images(self, images: Tensor) -> Tensor:
        """uint8 ``[B, C, H, W]`` -> normalised float at ``img_size``."""
        x = images.float().div(255.0)
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = nn.functional.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return self.augment.to(images.device).normalise(x)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training dict -> joint crops/flips; evaluation ``(images, masks)`` -> normalised images, int64 masks."""
        if not isinstance(batch, dict):
            images, masks = batch
            if masks.shape[-1] != self.img_size or masks.shape[-2] != self.img_size:
                masks = nn.functional.interpolate(masks[:, None].float(), size=(self.img_size, self.img_size),
                                                  mode="nearest")[:, 0]
            return self.eval_images(images), masks.long()
        draws = self.seed_training_batch()
        augment = self.augment.to(batch["labeled"][0].device)
        out: dict[str, Any] = {"labeled": draws.run("labeled", augment, *batch["labeled"])}
        if "unlabeled" in batch:
            out["unlabeled"] = draws.run("unlabeled", augment.images_only, batch["unlabeled"])
        return out
