"""Built-in detection scenes made of REAL Fashion-MNIST items (no download, exact boxes).

Each scene pastes a few items, each resized to a random side, on a faint textured canvas. An item's pixels
are those brighter than ``OBJECT_THRESHOLD`` and its box is the tight box of exactly those pixels (pixel-edge
xyxy). A new item is placed where its box overlaps every earlier box by IoU <= ``max_overlap`` (some overlap,
no item hidden); when 20 tries fail the item is left out. Labels are ``1 + fashion class`` (0 = background,
torchvision's convention).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.ops import box_iou

from ssl_kit.data.fashion_mnist import CLASSES
from ssl_kit.data.fmnist_scenes import OBJECT_THRESHOLD, textured_background

DETECTION_CLASSES: tuple[str, ...] = ("background",) + CLASSES
PLACEMENT_TRIES = 20


def tight_box(inside: Tensor) -> Tensor | None:
    """``[h, w]`` bool -> ``[4]`` pixel-edge xyxy box of the True pixels (None when there are none)."""
    ys, xs = inside.nonzero(as_tuple=True)
    if len(ys) == 0:
        return None
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()


def make_detection_scenes(
    images: Tensor, labels: Tensor, num_scenes: int, canvas: int = 128, objects: tuple[int, int] = (2, 6),
    object_size: tuple[int, int] = (20, 56), max_overlap: float = 0.3, texture: bool = True, seed: int = 0,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Paste random items into ``num_scenes`` canvases.

    Args:
        images: ``[N, 1, 28, 28]`` uint8 items; labels: ``[N]`` their classes (0..9).
        num_scenes: scenes to make.
        canvas: scene side in pixels.
        objects: inclusive range of items per scene.
        object_size: inclusive range of an item's side after resizing.
        max_overlap: largest IoU of a new item's box with an earlier one.
        texture: faint textured background (else black).
        seed: everything is drawn from a generator seeded with it.

    Returns:
        scenes ``[num_scenes, 1, canvas, canvas]`` uint8, and per scene its boxes ``[n, 4]`` float32 (xyxy,
        pixel edges) and labels ``[n]`` int64 in ``1..10``.
    """
    lo, hi = object_size
    if not (1 <= lo <= hi <= canvas):
        raise ValueError(f"object_size {object_size} must satisfy 1 <= min <= max <= canvas ({canvas})")
    g = torch.Generator().manual_seed(seed)
    scenes = textured_background(num_scenes, canvas, g) if texture else torch.zeros(num_scenes, canvas, canvas)
    counts = torch.randint(objects[0], objects[1] + 1, (num_scenes,), generator=g).tolist()
    all_boxes: list[Tensor] = []
    all_labels: list[Tensor] = []
    for s in range(num_scenes):
        items = torch.randint(len(images), (counts[s],), generator=g)
        sizes = torch.randint(lo, hi + 1, (counts[s],), generator=g).tolist()
        boxes: list[Tensor] = []
        classes: list[int] = []
        for item, size in zip(items.tolist(), sizes):
            pixels = F.interpolate(images[item:item + 1].float(), size=(size, size), mode="bilinear",
                                   antialias=True, align_corners=False)[0, 0].round().clamp(0, 255)
            inside = pixels > OBJECT_THRESHOLD
            local = tight_box(inside)
            if local is None:
                continue
            corners = (torch.rand(PLACEMENT_TRIES, 2, generator=g) * (canvas - size + 1)).long().clamp(max=canvas - size)
            for y0, x0 in corners.tolist():
                box = local + torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
                if boxes and box_iou(box[None], torch.stack(boxes)).max() > max_overlap:
                    continue
                scenes[s, y0:y0 + size, x0:x0 + size][inside] = pixels[inside]
                boxes.append(box)
                classes.append(int(labels[item]) + 1)
                break
        all_boxes.append(torch.stack(boxes) if boxes else torch.zeros(0, 4))
        all_labels.append(torch.tensor(classes, dtype=torch.int64))
    return scenes.round_().clamp_(0, 255).to(torch.uint8).unsqueeze(1), all_boxes, all_labels


class DetectionSceneDataset(Dataset):
    """In-memory scenes: ``(image uint8 [1, S, S], {"boxes": [n, 4] float32, "labels": [n] int64})``."""

    def __init__(self, scenes: Tensor, boxes: list[Tensor], labels: list[Tensor]) -> None:
        self.scenes, self.boxes, self.labels = scenes, boxes, labels

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.scenes[i], {"boxes": self.boxes[i], "labels": self.labels[i]}
