"""Batched augmentation on the device with kornia: uint8 in, normalised float out."""
from __future__ import annotations

from typing import Sequence

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TrainAugment(nn.Module):
    """MAE-style pretraining views: random resized crop (bicubic) + horizontal flip (+ colour jitter).

    Args:
        img_size: output side.
        mean: per-channel mean for normalisation.
        std: per-channel std.
        crop_scale: area fraction range of the random resized crop.
        hflip: random horizontal flip with p 0.5.
        color_jitter: brightness/contrast/saturation strength (0 disables; hue = strength / 4).
    """

    def __init__(
        self,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop_scale: tuple[float, float] = (0.2, 1.0),
        hflip: bool = True,
        color_jitter: float = 0.0,
    ) -> None:
        super().__init__()
        ops: list[nn.Module] = [K.RandomResizedCrop((img_size, img_size), scale=tuple(crop_scale), resample="BICUBIC")]
        if hflip:
            ops.append(K.RandomHorizontalFlip())
        if color_jitter > 0:
            s = color_jitter
            ops.append(K.ColorJitter(s, s, s, s / 4, p=0.8))
        self.ops = K.AugmentationSequential(*ops)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """``[B, C, h, w]`` uint8 -> ``[B, C, img_size, img_size]`` normalised float."""
        x = self.ops(images.float().div_(255.0)).clamp_(0.0, 1.0)
        return (x - self.mean) / self.std


class EvalTransform(nn.Module):
    """Deterministic evaluation view: resize (Fashion-MNIST 28 -> 32) or centre crop, then normalise."""

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.img_size = img_size
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """``[B, C, h, w]`` uint8 -> ``[B, C, img_size, img_size]`` normalised float."""
        x = images.float().div_(255.0)
        h, w = x.shape[-2:]
        if min(h, w) > self.img_size:  # decoded larger than the model input: centre crop
            top, left = (h - self.img_size) // 2, (w - self.img_size) // 2
            x = x[..., top : top + self.img_size, left : left + self.img_size]
        elif (h, w) != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bicubic", align_corners=False).clamp_(0, 1)
        return (x - self.mean) / self.std
