"""The built-in default data set: Fashion-MNIST read offline from IDX gzip files.

Looked up, in order: an explicit folder, ``$SSL_KIT_DATA/fashion-mnist``,
``~/.cache/ssl_kit/fashion-mnist``, and Debian's ``/usr/share/datasets/fashion-mnist``
(package ``dataset-fashion-mnist``). Nothing is downloaded at run time.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ssl_kit.errors import UserError

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MEAN, STD = (0.2860,), (0.3530,)
DOWNLOAD_URL = "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion"


def search_paths(root: str | os.PathLike | None = None) -> list[Path]:
    """Folders checked for the IDX files, most specific first."""
    paths = [Path(root).expanduser()] if root else []
    if os.environ.get("SSL_KIT_DATA"):
        paths.append(Path(os.environ["SSL_KIT_DATA"]) / "fashion-mnist")
    paths += [Path.home() / ".cache" / "ssl_kit" / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist")]
    return paths


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path:
    """Return the first folder holding all four IDX files, or raise a message saying how to get them."""
    needed = [name for pair in FILES.values() for name in pair]
    for path in search_paths(root):
        if all((path / name).is_file() for name in needed):
            return path
    looked = "\n  ".join(str(p) for p in search_paths(root))
    cache = Path.home() / ".cache" / "ssl_kit" / "fashion-mnist"
    raise UserError(
        "Fashion-MNIST (the built-in default data set) was not found. Looked in:\n  "
        f"{looked}\nGet it offline with:  sudo apt-get install dataset-fashion-mnist\n"
        f"or, with internet:  mkdir -p {cache} && for f in {' '.join(needed)}; do "
        f"curl -L -o {cache}/$f {DOWNLOAD_URL}/$f; done\n"
        "or train on your own images with --data.root /path/to/images."
    )


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise UserError(f"{path} is not an unsigned-byte IDX file; re-install or re-download it.")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise UserError(f"{path} is truncated ({array.size} bytes for shape {shape}); re-download it.")
    return array.reshape(shape)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """Load one split.

    Returns:
        images ``[N, 1, 28, 28]`` uint8 and labels ``[N]`` int64.
    """
    if split not in FILES:
        raise UserError(f"Unknown Fashion-MNIST split {split!r}; use 'train' or 'test'.")
    folder = find_fashion_mnist(root)
    image_file, label_file = FILES[split]
    images = torch.from_numpy(_read_idx(folder / image_file).copy()).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(folder / label_file).astype(np.int64))
    if images.shape[0] != labels.shape[0]:
        raise UserError(f"{folder}: {images.shape[0]} images but {labels.shape[0]} labels in the {split} split.")
    return images, labels
