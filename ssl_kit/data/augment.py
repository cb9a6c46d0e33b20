"""Batched augmentation on the device with kornia: uint8 in, normalised float out."""
from __future__ import annotations

import math
from typing import Sequence

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_kit.data.rand_augment import RandAugment
from ssl_kit.errors import UserError


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
        return (fit_to_size(images.float().div_(255.0), self.img_size) - self.mean) / self.std


def fit_to_size(x: Tensor, img_size: int) -> Tensor:
    """``[B, C, h, w]`` float in [0, 1] -> ``[B, C, img_size, img_size]``: centre crop when larger
    (decoded files), bicubic resize otherwise (Fashion-MNIST 28 -> 32)."""
    h, w = x.shape[-2:]
    if min(h, w) > img_size:
        top, left = (h - img_size) // 2, (w - img_size) // 2
        return x[..., top : top + img_size, left : left + img_size]
    if (h, w) != (img_size, img_size):
        return F.interpolate(x, size=(img_size, img_size), mode="bicubic", align_corners=False).clamp_(0, 1)
    return x


class WeakStrongAugment(nn.Module):
    """Weak and strong views for consistency training (UDA, FixMatch, Meta Pseudo Labels).

    * weak: horizontal flip + translation by reflect-padding ``img_size / 8`` and cropping back
      (``pad_crop``), or a mild random resized crop (``resized_crop``, area 0.5-1) + flip;
    * strong: an independent weak draw, then UDA's per-image RandAugment
      (:class:`ssl_kit.data.rand_augment.RandAugment`: ``num_ops`` ops drawn per image, each applied with
      probability ``op_prob`` at a magnitude uniform in ``magnitude_range`` of 10) and Cutout (a square
      of side up to half the image, filled with the image's mean level).

    Args:
        img_size: output side.
        mean, std: normalisation.
        weak: ``pad_crop`` or ``resized_crop``.
        num_ops: RandAugment operations per image (2; 0 = the strong view is a second weak view + Cutout).
        magnitude_range: inclusive range of the random magnitude on UDA's 0-10 scale (1-9).
        cutout: apply Cutout to the strong view.
        op_prob: probability that each drawn operation is applied (UDA: 0.5).
    """

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float], weak: str = "pad_crop",
                 num_ops: int = 2, magnitude_range: tuple[int, int] = (1, 9), cutout: bool = True,
                 op_prob: float = 0.5) -> None:
        super().__init__()
        if weak not in ("pad_crop", "resized_crop"):
            raise UserError(f"--data.weak must be pad_crop or resized_crop, got {weak!r}.")
        if num_ops < 0:
            raise UserError(f"--data.strong_ops must be >= 0, got {num_ops}.")
        self.img_size = img_size
        pad = max(1, img_size // 8)
        if weak == "pad_crop":
            geometric = [K.RandomHorizontalFlip(), K.RandomCrop((img_size, img_size), padding=pad, padding_mode="reflect")]
        else:
            geometric = [K.RandomResizedCrop((img_size, img_size), scale=(0.5, 1.0), resample="BICUBIC"), K.RandomHorizontalFlip()]
        self.weak_ops = K.AugmentationSequential(*geometric)
        self.rand_augment = RandAugment(num_ops, tuple(magnitude_range), op_prob, cutout_prob=1.0 if cutout else 0.0)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def _unit(self, images: Tensor) -> Tensor:
        return fit_to_size(images.float().div(255.0), self.img_size) if images.dtype == torch.uint8 else images

    def _normalise(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def weak(self, images: Tensor) -> Tensor:
        """``[B, C, h, w]`` uint8 (or [0, 1] float at size S) -> ``[B, C, S, S]`` normalised weak view."""
        return self._normalise(self.weak_ops(self._unit(images)).clamp_(0, 1))

    def weak_and_strong(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Both views of the same uint8 images, converted to float once."""
        x = self._unit(images)
        return self.weak(x), self.strong(x)

    def strong(self, images: Tensor) -> Tensor:
        """``[B, C, h, w]`` uint8 (or [0, 1] float at size S) -> ``[B, C, S, S]`` normalised strong view."""
        x = self.weak_ops(self._unit(images)).clamp_(0, 1)
        return self._normalise(self.rand_augment(x))


class MultiCropAugment(nn.Module):
    """DINO/iBOT multi-crop on the device: 2 global + n local views of every image in the batch.

    Per view: RandomResizedCrop (bicubic), flip, colour jitter (p 0.8; brightness/contrast only on
    grayscale data), grayscale (p 0.2, colour data), Gaussian blur (p 1.0 / 0.1 for the two global
    views, 0.5 for local ones; sigma (0.1, 2.0) scaled by size / 224), solarisation (p 0.2, second
    global view), then normalisation.

    Args:
        global_size: side of the global views (the model's img_size).
        local_size: side of the local views.
        num_local: n local views (0 allowed).
        mean, std: normalisation.
        global_scale: area range of global crops (iBOT 0.25-1; DINO 0.14-1).
        local_scale: area range of local crops (0.05-0.25).
        color_jitter: jitter strength for brightness/contrast (saturation 0.5x, hue 0.25x on colour data).
    """

    def __init__(self, global_size: int, local_size: int, num_local: int, mean: Sequence[float], std: Sequence[float],
                 global_scale: tuple[float, float] = (0.25, 1.0), local_scale: tuple[float, float] = (0.05, 0.25),
                 color_jitter: float = 0.4) -> None:
        super().__init__()
        self.colour = len(mean) == 3
        self.global_views = nn.ModuleList([
            self._view(global_size, global_scale, color_jitter, blur_p=1.0, solarize_p=0.0),
            self._view(global_size, global_scale, color_jitter, blur_p=0.1, solarize_p=0.2),
        ])
        self.local_views = nn.ModuleList([
            self._view(local_size, local_scale, color_jitter, blur_p=0.5, solarize_p=0.0) for _ in range(num_local)
        ])
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def _view(self, size: int, scale: tuple[float, float], jitter: float, blur_p: float,
              solarize_p: float) -> K.AugmentationSequential:
        ops: list[nn.Module] = [K.RandomResizedCrop((size, size), scale=tuple(scale), resample="BICUBIC"),
                                K.RandomHorizontalFlip()]
        if jitter > 0:
            sat, hue = (jitter / 2, jitter / 4) if self.colour else (0.0, 0.0)
            ops.append(K.ColorJitter(jitter, jitter, sat, hue, p=0.8))
        if self.colour:
            ops.append(K.RandomGrayscale(p=0.2))
        if blur_p > 0:
            sigma = (0.1 * size / 224, 2.0 * size / 224)
            ops.append(K.RandomGaussianBlur(max(3, 2 * math.ceil(3 * sigma[1]) + 1), sigma, p=blur_p))
        if solarize_p > 0:
            ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=solarize_p))
        return K.AugmentationSequential(*ops)

    def forward(self, images: Tensor) -> list[Tensor]:
        """``[B, C, h, w]`` uint8 -> [2 global ``[B, C, G, G]``] + [n local ``[B, C, l, l]``] normalised views."""
        x = images.float().div_(255.0)
        views = [view(x).clamp_(0.0, 1.0) for view in [*self.global_views, *self.local_views]]
        return [(v - self.mean) / self.std for v in views]


def cutmix_masks(batch: int, height: int, width: int, prob: float, device: torch.device | str = "cpu") -> Tensor:
    """U2PL's CutMix boxes: ``[B, H, W]`` bool, True inside a box covering half the image, for each image
    with probability ``prob`` (all False otherwise). Box width uniform in ``(W/2, W)``, height
    ``round(H W / 2 / width)``, position uniform inside the image; uses the global torch RNG."""
    masks = torch.zeros(batch, height, width, dtype=torch.bool, device=device)
    area = height * width / 2.0
    for i in range(batch):
        if float(torch.rand(())) >= prob:
            continue
        w = int(torch.randint(width // 2 + 1, width, ()))
        h = min(height, int(round(area / w)))
        x0 = int(torch.randint(0, width - w + 1, ()))
        y0 = int(torch.randint(0, height - h + 1, ()))
        masks[i, y0:y0 + h, x0:x0 + w] = True
    return masks


def apply_cutmix(masks: Tensor, *maps: Tensor) -> list[Tensor]:
    """Paste, inside each image's box, the content of the NEXT image in the batch (index ``(i + 1) % B``).

    Args:
        masks: ``[B, H, W]`` bool from :func:`cutmix_masks`.
        maps: tensors ``[B, ..., H, W]`` mixed identically (images ``[B, C, H, W]``, labels ``[B, H, W]``).
    """
    out = []
    for x in maps:
        m = masks.view(masks.shape[0], *([1] * (x.dim() - 3)), *masks.shape[1:])
        out.append(torch.where(m, x.roll(-1, dims=0), x))
    return out
