"""Users' own images: nested class folders (``root/class/x.jpg``) or a flat folder.

Files are decoded with Pillow in the loader workers, converted to the requested number of
channels (grayscale and RGBA handled), resized so the short side is ``decode_size`` and centre
cropped to a square, and returned as uint8 tensors. Augmentation happens later, on the device.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from ssl_kit.errors import UserError

log = logging.getLogger("ssl_kit")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


@dataclass
class ImageList:
    """Files found under a root, with class indices (``-1`` for a flat, unlabeled folder)."""

    root: Path
    paths: list[Path]
    labels: list[int]
    classes: list[str]
    skipped: list[Path]

    @property
    def labeled(self) -> bool:
        return bool(self.classes)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


def scan_image_folder(root: str | os.PathLike, verify: bool = True) -> ImageList:
    """Find images under ``root``; sub-folders are classes when there are any.

    Unreadable files are reported by name and skipped with a count; an empty folder,
    a missing folder and a class folder without readable images are errors.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"Data folder {root} does not exist: check --data.root.")
    if not root.is_dir():
        raise UserError(f"--data.root must be a folder of images, but {root} is a file.")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths: list[Path] = []
    labels: list[int] = []
    if class_dirs:
        classes = [d.name for d in class_dirs]
        for index, folder in enumerate(class_dirs):
            found = sorted(p for p in folder.rglob("*") if p.is_file() and _is_image(p))
            paths += found
            labels += [index] * len(found)
        loose = [p for p in root.iterdir() if p.is_file() and _is_image(p)]
        if loose:
            log.warning("%d images directly under %s are ignored: with class sub-folders, put every image in one.", len(loose), root)
    else:
        classes = []
        paths = sorted(p for p in root.rglob("*") if p.is_file() and _is_image(p))
        labels = [-1] * len(paths)
    if not paths:
        raise UserError(
            f"No images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)}): point --data.root at a "
            "folder of images or of class sub-folders."
        )
    skipped: list[Path] = []
    if verify:
        keep = [_readable(p) for p in paths]
        skipped = [p for p, ok in zip(paths, keep) if not ok]
        paths = [p for p, ok in zip(paths, keep) if ok]
        labels = [lab for lab, ok in zip(labels, keep) if ok]
        if skipped:
            shown = "\n  ".join(str(p) for p in skipped[:20])
            more = f"\n  ... and {len(skipped) - 20} more" if len(skipped) > 20 else ""
            log.warning("Skipped %d unreadable image file(s) under %s:\n  %s%s", len(skipped), root, shown, more)
    if not paths:
        raise UserError(f"None of the image files in {root} could be read ({len(skipped)} unreadable): "
                        "replace the files or point --data.root at another folder.")
    if classes:
        counts = np.bincount(np.asarray(labels), minlength=len(classes))
        empty = [c for c, n in zip(classes, counts) if n == 0]
        if empty:
            raise UserError(
                f"Class folder(s) with no readable images in {root}: {', '.join(empty)}. "
                "Add images or remove the folder(s)."
            )
    return ImageList(root=root, paths=paths, labels=labels, classes=classes, skipped=skipped)


def load_image(path: Path, size: int, channels: int) -> Tensor:
    """Decode one file to ``[channels, size, size]`` uint8 (short side resize + centre crop)."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)  # camera orientation before the centre crop
            if im.mode == "I" or im.mode.startswith("I;16"):  # 16-bit grayscale (PNG/TIFF): scale, don't clip
                scaled = np.asarray(im, dtype=np.float64) / 257.0
                im = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
            if im.mode in ("RGBA", "LA", "PA", "P"):
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im.convert("RGBA"))
            im = im.convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserError(f"Cannot read image {path}: {err}. Remove or replace the file.") from err
    w, h = im.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    im = im.crop((left, top, left + size, top + size))
    array = np.asarray(im, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class ImageFolderDataset(Dataset):
    """Decoded uint8 images and labels (``-1`` when unlabeled).

    Args:
        images: the scanned file list.
        decode_size: side of the square uint8 image returned.
        channels: 1 (grayscale) or 3 (RGB).
        indices: optional subset of positions in ``images``.
    """

    def __init__(self, images: ImageList, decode_size: int, channels: int = 3, indices: list[int] | None = None) -> None:
        self.images = images
        self.decode_size = decode_size
        self.channels = channels
        self.indices = list(range(len(images.paths))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        j = self.indices[i]
        return load_image(self.images.paths[j], self.decode_size, self.channels), self.images.labels[j]
