"""Built-in segmentation scenes made of REAL Fashion-MNIST items (no download, exact masks).

Each scene pastes a few items, each resized to a random side and placed at a random position fully inside
the canvas, on a faint textured background; later items occlude earlier ones. An item's pixels are those
whose resized intensity exceeds ``OBJECT_THRESHOLD``, and exactly those pixels get its class in the mask
(``0`` = background, ``1 + fashion class`` for items), so image and mask agree pixel for pixel.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ssl_kit.data.fashion_mnist import CLASSES

SCENE_CLASSES: tuple[str, ...] = ("background",) + CLASSES
OBJECT_THRESHOLD = 25
TRAIN_SCENES = 2000  # built-in train scenes of the segmentation / detection modules and of scene pretraining


def textured_background(num: int, canvas: int, generator: torch.Generator) -> Tensor:
    """``[num, canvas, canvas]`` float in ``[0, 40]``: two random sinusoidal gratings plus a little noise."""
    yy, xx = torch.meshgrid(torch.arange(canvas, dtype=torch.float32), torch.arange(canvas, dtype=torch.float32),
                            indexing="ij")
    out = torch.full((num, canvas, canvas), 18.0)
    for _ in range(2):
        angle = torch.rand(num, 1, 1, generator=generator) * math.pi
        freq = 0.15 + 0.45 * torch.rand(num, 1, 1, generator=generator)
        phase = torch.rand(num, 1, 1, generator=generator) * 2 * math.pi
        out += 9.0 * torch.sin(freq * (xx * torch.cos(angle) + yy * torch.sin(angle)) + phase)
    out += 4.0 * torch.rand(num, canvas, canvas, generator=generator)
    return out.clamp_(0, 40)


def make_scenes(
    images: Tensor, labels: Tensor, num_scenes: int, canvas: int = 64, objects: tuple[int, int] = (2, 4),
    object_size: tuple[int, int] = (16, 40), texture: bool = True, seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Paste random items into ``num_scenes`` canvases.

    Args:
        images: ``[N, 1, 28, 28]`` uint8 items; labels: ``[N]`` their classes (0..9).
        num_scenes: scenes to make.
        canvas: scene side in pixels.
        objects: inclusive range of items per scene.
        object_size: inclusive range of an item's side after resizing.
        texture: faint textured background (else black).
        seed: everything is drawn from a generator seeded with it.

    Returns:
        scenes ``[num_scenes, 1, canvas, canvas]`` uint8 and masks ``[num_scenes, canvas, canvas]`` uint8.
    """
    lo, hi = object_size
    if not (1 <= lo <= hi <= canvas):
        raise ValueError(f"object_size {object_size} must satisfy 1 <= min <= max <= canvas ({canvas})")
    g = torch.Generator().manual_seed(seed)
    scenes = textured_background(num_scenes, canvas, g) if texture else torch.zeros(num_scenes, canvas, canvas)
    masks = torch.zeros(num_scenes, canvas, canvas, dtype=torch.uint8)
    counts = torch.randint(objects[0], objects[1] + 1, (num_scenes,), generator=g)
    owner = torch.repeat_interleave(torch.arange(num_scenes), counts)
    items = torch.randint(len(images), (len(owner),), generator=g)
    sizes = torch.randint(lo, hi + 1, (len(owner),), generator=g)
    corners = torch.rand(len(owner), 2, generator=g)
    resized: dict[int, Tensor] = {}
    for size in sizes.unique().tolist():  # one batched resize per item size
        chosen = (sizes == size).nonzero().flatten()
        resized.update(zip(chosen.tolist(), F.interpolate(images[items[chosen]].float(), size=(size, size),
                                                          mode="bilinear", antialias=True, align_corners=False)[:, 0]))
    for k in range(len(owner)):
        s, size = int(owner[k]), int(sizes[k])
        y0, x0 = (corners[k] * (canvas - size + 1)).long().clamp(max=canvas - size).tolist()
        item = resized[k].round().clamp(0, 255)
        inside = item > OBJECT_THRESHOLD
        scenes[s, y0:y0 + size, x0:x0 + size][inside] = item[inside]
        masks[s, y0:y0 + size, x0:x0 + size][inside] = int(labels[items[k]]) + 1
    return scenes.round_().clamp_(0, 255).to(torch.uint8).unsqueeze(1), masks


class SceneDataset(Dataset):
    """In-memory scenes: ``(image uint8 [1, S, S], mask uint8 [S, S])``."""

    def __init__(self, scenes: Tensor, masks: Tensor) -> None:
        self.scenes, self.masks = scenes, masks

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.scenes[i], self.masks[i]
