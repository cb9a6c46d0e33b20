"""Users' detection data in COCO JSON: an images folder + an annotations file.

Read with the standard library (``json``) and checked entry by entry, so a problem names the annotation or
image and the fix:

* malformed JSON, a missing ``images`` / ``annotations`` / ``categories`` list, an annotation whose
  ``image_id`` or ``category_id`` is not declared, a box outside its image, or an image file that does not
  exist: errors;
* zero-area boxes and ``iscrowd`` regions: skipped, counted and logged (as mmdetection and detectron2 skip
  them);
* a box that crosses the image border by at most ``BORDER_TOLERANCE`` pixels (rounding in exporters) is
  clipped.

Categories are renumbered ``1..K`` in the file's order of ``categories`` (0 is background).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ssl_kit.data.mask_folder import load_square
from ssl_kit.errors import UserError

log = logging.getLogger("ssl_kit")
BORDER_TOLERANCE = 1.0


@dataclass
class CocoImage:
    """One image and its boxes (xyxy, pixels of the original image) with labels ``1..K``."""

    path: Path
    width: int
    height: int
    boxes: Tensor = field(default_factory=lambda: torch.zeros(0, 4))
    labels: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))


@dataclass
class CocoSet:
    images: list[CocoImage]
    categories: list[str]
    skipped: dict[str, int]


def _read_json(ann_file: Path) -> dict:
    if not ann_file.is_file():
        raise UserError(f"COCO annotation file {ann_file} does not exist: pass --data.train_annotations / "
                        "--data.val_annotations pointing to the JSON files.")
    try:
        data = json.loads(ann_file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{ann_file} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}). "
                        "Fix or re-export the annotation file.") from err
    if not isinstance(data, dict):
        raise UserError(f"{ann_file} must hold a JSON object with 'images', 'annotations' and 'categories'.")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise UserError(f"{ann_file} has no '{key}' list: a COCO detection file needs 'images', "
                            "'annotations' and 'categories'.")
    return data


def read_coco(ann_file: str | Path, image_dir: str | Path, categories: list[str] | None = None) -> CocoSet:
    """Parse and check a COCO detection file.

    Args:
        ann_file: the JSON file.
        image_dir: folder the images' ``file_name`` are relative to.
        categories: category names to map onto (the training file's), so val labels agree with train.

    Returns:
        The images with their boxes (images without annotations are kept: they are all background), the
        category names in label order (label ``k`` is ``categories[k - 1]``) and the skip counts.
    """
    ann_file, image_dir = Path(ann_file).expanduser(), Path(image_dir).expanduser()
    data = _read_json(ann_file)
    if not image_dir.is_dir():
        raise UserError(f"Image folder {image_dir} does not exist: pass the folder the file names in {ann_file} "
                        "are relative to.")
    declared = {}
    for cat in data["categories"]:
        if "id" not in cat or "name" not in cat:
            raise UserError(f"{ann_file}: category {cat} needs an 'id' and a 'name'.")
        declared[cat["id"]] = cat["name"]
    names = list(categories) if categories is not None else list(declared.values())
    label_of = {}
    for cat_id, name in declared.items():
        if name not in names:
            raise UserError(f"{ann_file}: category '{name}' (id {cat_id}) is not among the training categories "
                            f"{names}: use the same categories in every annotation file.")
        label_of[cat_id] = names.index(name) + 1
    images: dict[int, CocoImage] = {}
    for entry in data["images"]:
        try:
            image_id, file_name, width, height = entry["id"], entry["file_name"], int(entry["width"]), int(entry["height"])
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{ann_file}: image entry {entry} needs 'id', 'file_name', 'width' and 'height'.") from err
        path = image_dir / file_name
        if not path.is_file():
            raise UserError(f"{ann_file}: image id {image_id} names {path}, which does not exist. Put the file there "
                            "or remove the image and its annotations from the JSON.")
        images[image_id] = CocoImage(path, width, height)
    boxes: dict[int, list[list[float]]] = {i: [] for i in images}
    labels: dict[int, list[int]] = {i: [] for i in images}
    skipped = {"zero_area": 0, "crowd": 0}
    for ann in data["annotations"]:
        ann_id = ann.get("id", "?")
        image_id, cat_id, bbox = ann.get("image_id"), ann.get("category_id"), ann.get("bbox")
        if image_id not in images:
            raise UserError(f"{ann_file}: annotation {ann_id} refers to image_id {image_id}, which is not in 'images'.")
        if cat_id not in label_of:
            raise UserError(f"{ann_file}: annotation {ann_id} has category_id {cat_id}, which is not in 'categories' "
                            f"(declared: {sorted(label_of)}).")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise UserError(f"{ann_file}: annotation {ann_id} needs 'bbox': [x, y, width, height], got {bbox}.")
        if ann.get("iscrowd", 0):
            skipped["crowd"] += 1
            continue
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            skipped["zero_area"] += 1
            continue
        image = images[image_id]
        t = BORDER_TOLERANCE
        if x < -t or y < -t or x + w > image.width + t or y + h > image.height + t:
            raise UserError(f"{ann_file}: annotation {ann_id} box [x={x}, y={y}, w={w}, h={h}] lies outside its "
                            f"image {image.path.name} ({image.width}x{image.height}). Fix the box or the image size.")
        boxes[image_id].append([max(x, 0.0), max(y, 0.0), min(x + w, image.width), min(y + h, image.height)])
        labels[image_id].append(label_of[cat_id])
    for image_id, image in images.items():
        if boxes[image_id]:
            image.boxes = torch.tensor(boxes[image_id], dtype=torch.float32)
            image.labels = torch.tensor(labels[image_id], dtype=torch.int64)
    for reason, count in skipped.items():
        if count:
            log.warning("%s: skipped %d %s annotation(s).", ann_file, count, reason.replace("_", "-"))
    return CocoSet(list(images.values()), names, skipped)


class CocoDetectionDataset(Dataset):
    """Images decoded to ``[C, S, S]`` uint8 (resized to the square) with their boxes scaled to match."""

    def __init__(self, images: list[CocoImage], size: int, channels: int) -> None:
        self.images, self.size, self.channels = images, size, channels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        image = self.images[i]
        pixels = load_square(image.path, self.size, self.channels)
        scale = torch.tensor([self.size / image.width, self.size / image.height] * 2)
        return pixels, {"boxes": image.boxes * scale, "labels": image.labels.clone()}
