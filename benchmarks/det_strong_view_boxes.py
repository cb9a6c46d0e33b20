"""Does the strong view keep the box? (issue #23) Soft Teacher carries each pseudo box into the student's strong view
by mapping its four corners (``ssl_kit.data.box_geometry.transform_boxes``: the smallest box holding them, as the
reference code does). That is exact for translations and flips; under a rotation or shear it ENCLOSES the turned
box, which is larger than the tight box of the turned item, and the student's box regression learns it.

For real Fashion-MNIST items, resized as the built-in scenes resize them (sides 20-56 px, pixels above the scenes'
object threshold), alone on a 128 px canvas, and for each of the strong view's three geometric ops at its recipe
range (translate 10 %, rotate 30 deg, shear 30 deg: ``DetectionAugment``, the op drawn per image), this compares
the mapped box with the tight box of the item after the same warp (``DetectionAugment.warp``): IoU and area ratio.

    python benchmarks/det_strong_view_boxes.py [--items 400]

Writes benchmarks/results/det_strong_view_boxes/det_strong_view_boxes.json. ~15 s on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_area, box_iou

from ssl_kit.data.box_geometry import rotation_matrices, shear_matrices, transform_boxes, translation_matrices
from ssl_kit.data.detection_module import DetectionAugment
from ssl_kit.data.detection_scenes import tight_box
from ssl_kit.data.fashion_mnist import load_fashion_mnist
from ssl_kit.data.fmnist_scenes import OBJECT_THRESHOLD

RESULTS = Path(__file__).parent / "results" / Path(__file__).stem  # one folder per benchmark
CANVAS = 128


def op_matrix(augment: DetectionAugment, op: str, generator: torch.Generator) -> Tensor:
    """``[3, 3]``: one draw of ``op`` at the augment's range (uniform in [-range, range], as its strong view)."""
    uniform = lambda *shape: torch.rand(*shape, generator=generator) * 2 - 1  # noqa: E731
    if op == "translate":
        return translation_matrices(uniform(1, 2) * augment.translate * CANVAS)[0]
    if op == "rotate":
        return rotation_matrices(uniform(1) * augment.rotate, CANVAS)[0]
    return shear_matrices(uniform(1) * augment.shear, torch.rand(1, generator=generator) < 0.5, CANVAS)[0]


def mapped_and_true_box(augment: DetectionAugment, inside: Tensor, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
    """An item mask ``[s, s]`` centred on the canvas -> (its tight box mapped by ``matrix``, the tight box of the
    mask warped by ``matrix``; None when the warp moved it out of view)."""
    size = inside.shape[-1]
    canvas = torch.zeros(1, 1, CANVAS, CANVAS)
    y0 = x0 = (CANVAS - size) // 2
    canvas[0, 0, y0:y0 + size, x0:x0 + size] = inside.float()
    box = tight_box(canvas[0, 0] > 0.5)
    warped = augment.warp(canvas, matrix[None])[0, 0] > 0.5
    return transform_boxes(box[None], matrix)[0], tight_box(warped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    images, _ = load_fashion_mnist("train")
    augment = DetectionAugment(CANVAS, [0.5], [0.5])
    items = torch.randint(len(images), (args.items,), generator=g)
    sides = torch.randint(20, 57, (args.items,), generator=g)
    result = {"items": args.items, "seed": args.seed, "ops": {}}
    for op in ("translate", "rotate", "shear"):
        ious, ratios = [], []
        for item, side in zip(items.tolist(), sides.tolist()):
            pixels = F.interpolate(images[item:item + 1].float(), size=(side, side), mode="bilinear", antialias=True,
                                   align_corners=False)[0, 0].round().clamp(0, 255)
            mapped, true = mapped_and_true_box(augment, pixels > OBJECT_THRESHOLD, op_matrix(augment, op, g))
            if true is None:
                continue
            ious.append(float(box_iou(mapped[None], true[None])))
            ratios.append(float(box_area(mapped[None]) / box_area(true[None])))
        iou, ratio = torch.tensor(ious), torch.tensor(ratios)
        result["ops"][op] = {"mean_iou": round(iou.mean().item(), 3), "min_iou": round(iou.min().item(), 3),
                             "share_iou_below_0.7": round((iou < 0.7).float().mean().item(), 3),
                             "mean_area_ratio": round(ratio.mean().item(), 3),
                             "max_area_ratio": round(ratio.max().item(), 3)}
        print(op, json.dumps(result["ops"][op]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "det_strong_view_boxes.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
