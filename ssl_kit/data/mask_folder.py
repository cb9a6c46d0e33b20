"""Users' segmentation data: an image folder and a folder of index-mask PNGs, matched by file stem.

Masks are single-channel PNGs (mode ``L``, or palette ``P`` read as its indices, as PASCAL VOC ships them):
the value is the class id, ``255`` means "ignore". Every problem names the file and the fix.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from ssl_kit.data.image_folder import IMAGE_EXTENSIONS
from ssl_kit.errors import UserError

IGNORE_VALUE = 255


def list_images(folder: Path) -> list[Path]:
    """Image files directly under ``folder`` (sorted); a missing or empty folder is an error."""
    if not folder.is_dir():
        raise UserError(f"{folder} does not exist: put the images there (see the layout in the README).")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not files:
        raise UserError(f"{folder} has no images ({', '.join(IMAGE_EXTENSIONS)}).")
    return files


def read_mask(path: Path) -> np.ndarray:
    """``[H, W]`` uint8 class ids of an index PNG (palette images give their indices, not colours)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "P"):
                raise UserError(f"Mask {path} is a {im.mode} image: save masks as single-channel index PNGs "
                                "(pixel value = class id, 255 = ignore), not colour images.")
            return np.asarray(im, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserError(f"Cannot read mask {path}: {err}. Remove or replace the file.") from err


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image file (clear error when unreadable)."""
    try:
        with Image.open(path) as im:
            im.verify()
            return im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserError(f"Cannot read image {path}: {err}. Remove or replace the file.") from err


def scan_mask_folder(image_dir: Path, mask_dir: Path, num_classes: int, verify: bool = True) -> list[tuple[Path, Path]]:
    """Pairs ``(image, mask)`` matched by stem; with ``verify`` every pair is opened and checked once.

    Errors name the file: a missing mask, a mask of a different size than its image, values
    ``>= num_classes`` other than 255, unreadable files.
    """
    images = list_images(image_dir)
    if not mask_dir.is_dir():
        raise UserError(f"{mask_dir} does not exist: put one index-PNG mask per image there, named like the image.")
    pairs = []
    for image in images:
        mask = mask_dir / f"{image.stem}.png"
        if not mask.is_file():
            raise UserError(f"Image {image} has no mask: expected {mask} (every labeled image needs one; "
                            "move images without masks to the unlabeled folder).")
        pairs.append((image, mask))
    if verify:
        for image, mask in pairs:
            values = read_mask(mask)
            w, h = image_size(image)
            if values.shape != (h, w):
                raise UserError(f"Mask {mask} is {values.shape[1]}x{values.shape[0]} but its image {image} is {w}x{h}: "
                                "masks must have their image's size.")
            bad = np.setdiff1d(np.unique(values), np.append(np.arange(num_classes), IGNORE_VALUE))
            if bad.size:
                raise UserError(f"Mask {mask} has value(s) {bad.tolist()} >= --data.num_classes {num_classes} (255 = "
                                "ignore is allowed): set --data.num_classes to the number of classes or fix the mask.")
    return pairs


class MaskFolderDataset(Dataset):
    """``(image uint8 [C, S, S], mask uint8 [S, S])`` resized to ``S x S`` (bilinear image, nearest mask)."""

    def __init__(self, pairs: list[tuple[Path, Path]], size: int, channels: int) -> None:
        self.pairs, self.size, self.channels = pairs, size, channels

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        image_path, mask_path = self.pairs[i]
        with Image.open(image_path) as im:
            full = (im.width, im.height)
        image = load_square(image_path, self.size, self.channels)
        mask = Image.fromarray(read_mask(mask_path))
        if mask.size != full:
            raise UserError(f"Mask {mask_path} is {mask.size[0]}x{mask.size[1]} but its image {image_path} is "
                            f"{full[0]}x{full[1]}: masks must have their image's size.")
        mask = np.asarray(mask.resize((self.size, self.size), Image.NEAREST), dtype=np.uint8)
        return image, torch.from_numpy(mask.copy())


def load_square(path: Path, size: int, channels: int) -> Tensor:
    """Decode an image to ``[channels, size, size]`` uint8, resized to the square WITHOUT cropping (so it stays
    aligned with its mask; no EXIF rotation either, as masks have none)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA", "P"):
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im.convert("RGBA"))
            im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserError(f"Cannot read image {path}: {err}. Remove or replace the file.") from err
    array = np.asarray(im, dtype=np.uint8)
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
