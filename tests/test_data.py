"""Data loading a user relies on: image folders, Fashion-MNIST, and the exact-resume plumbing."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import nested_folder, save
from ssl_kit.data import PretrainDataModule, fashion_mnist
from ssl_kit.data.image_folder import ImageFolderDataset, load_image, scan_image_folder
from ssl_kit.data.module import EpochSeededRandomSampler
from ssl_kit.errors import UserError

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not all((FMNIST_DIR / n).is_file() for pair in fashion_mnist.FILES.values() for n in pair),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


def corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    return path


# ---------------------------------------------------------------- scan_image_folder


def test_scan_nested_class_folders(tmp_path):
    root = nested_folder(tmp_path / "data")
    save(root / "cat" / "deeper" / "x.JPG")  # recursive, case-insensitive extension
    (root / "dog" / "notes.txt").write_text("not an image")
    images = scan_image_folder(root)
    assert images.classes == ["cat", "dog"] and images.labeled
    assert len(images.paths) == 9
    assert images.labels.count(0) == 5 and images.labels.count(1) == 4
    assert {p.suffix.lower() for p in images.paths} == {".jpg", ".png", ".webp"}
    assert images.skipped == []


def test_scan_flat_folder_is_unlabeled(tmp_path):
    for i, ext in enumerate([".jpg", ".png", ".webp"]):
        save(tmp_path / f"a{i}{ext}", seed=i)
    images = scan_image_folder(tmp_path)
    assert not images.labeled and images.classes == []
    assert len(images.paths) == 3 and images.labels == [-1, -1, -1]


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp"])
def test_load_image_converts_modes_and_channels(tmp_path, mode, channels, ext):
    if ext == ".jpg" and mode in ("RGBA", "P"):
        path = save(tmp_path / "x.png", mode)  # JPEG cannot store alpha/palette
    else:
        path = save(tmp_path / f"x{ext}", mode)
    x = load_image(path, 12, channels)
    assert x.dtype == torch.uint8 and x.shape == (channels, 12, 12) and x.is_contiguous()


def test_transparent_pixels_become_white(tmp_path):
    path = tmp_path / "t.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(path)
    assert load_image(path, 8, 3).eq(255).all() and load_image(path, 8, 1).eq(255).all()


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(path)
    x = load_image(path, 8, 1)
    assert x.shape == (1, 8, 8) and 120 <= int(x.float().mean()) <= 135  # mid grey, not saturated white


def test_dataset_items_have_requested_shape(tmp_path):
    root = tmp_path / "d"
    save(root / "a" / "l.png", "L", size=(30, 50))
    save(root / "a" / "rgba.png", "RGBA", size=(50, 30))
    save(root / "b" / "p.png", "P")
    save(root / "b" / "rgb.webp", "RGB")
    images = scan_image_folder(root)
    for channels in (1, 3):
        ds = ImageFolderDataset(images, decode_size=16, channels=channels)
        assert len(ds) == 4
        for i in range(len(ds)):
            x, label = ds[i]
            assert x.dtype == torch.uint8 and x.shape == (channels, 16, 16) and label in (0, 1)


def test_corrupt_file_skipped_counted_and_named(tmp_path, ssl_caplog):
    root = nested_folder(tmp_path / "data")
    bad = corrupt(root / "cat" / "broken.jpg")
    images = scan_image_folder(root)
    assert images.skipped == [bad]
    assert bad not in images.paths and len(images.paths) == len(images.labels) == 8
    warnings = [r.getMessage() for r in ssl_caplog.records if r.levelno == logging.WARNING and r.name == "ssl_kit"]
    assert any("broken.jpg" in m and "1 unreadable" in m for m in warnings)


def test_empty_folder_is_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"No images found in .*empty.*--data\.root"):
        scan_image_folder(tmp_path / "empty")


def test_missing_folder_is_user_error(tmp_path):
    with pytest.raises(UserError, match=r"nope.* does not exist.*--data\.root"):
        scan_image_folder(tmp_path / "nope")


def test_file_instead_of_folder_is_user_error(tmp_path):
    path = save(tmp_path / "one.png")
    with pytest.raises(UserError, match=r"must be a folder.*one\.png"):
        scan_image_folder(path)


def test_class_with_only_corrupt_images_is_user_error(tmp_path, ssl_caplog):
    root = nested_folder(tmp_path / "data")
    corrupt(root / "zebra" / "a.jpg")
    corrupt(root / "zebra" / "b.png")
    with pytest.raises(UserError, match=r"zebra.*Add images or remove"):
        scan_image_folder(root)


def test_all_images_corrupt_is_user_error(tmp_path, ssl_caplog):
    corrupt(tmp_path / "a.jpg")
    with pytest.raises(UserError, match=r"could be read.*--data\.root"):
        scan_image_folder(tmp_path)


def test_empty_class_folder_is_user_error(tmp_path):
    root = nested_folder(tmp_path / "data")
    (root / "empty_class").mkdir()
    with pytest.raises(UserError, match="empty_class"):
        scan_image_folder(root)


# ---------------------------------------------------------------- PretrainDataModule on folders


def test_folder_module_train_val_split_used_for_knn(tmp_path):
    root = tmp_path / "data"
    nested_folder(root / "train", per_class=3)
    nested_folder(root / "val", per_class=2)
    dm = PretrainDataModule(root=str(root), img_size=16, batch_size=2, num_workers=0, knn_train_size=0, knn_test_size=0)
    assert dm.source == "folder" and dm.in_chans == 3 and dm.decode_size == round(16 / 0.875)
    dm.setup()
    assert dm.classes == ["cat", "dog"] and len(dm.train_set) == 6
    loaders = dm.knn_dataloaders(batch_size=64)
    assert loaders is not None
    (mem_x, mem_y), = list(loaders[0])
    (test_x, test_y), = list(loaders[1])
    assert mem_x.shape == (6, 3, dm.decode_size, dm.decode_size) and mem_x.dtype == torch.uint8
    assert test_x.shape[0] == 4 and sorted(test_y.tolist()) == [0, 0, 1, 1]
    val_paths = {p for p in dm.knn_test_set.images.paths}
    assert all("val" in p.parts for p in val_paths)


def test_folder_module_flat_has_no_knn_and_grayscale_batches(tmp_path):
    for i in range(5):
        save(tmp_path / f"x{i}.png", "RGBA" if i % 2 else "L", seed=i)
    dm = PretrainDataModule(root=str(tmp_path), dataset="folder", img_size=16, in_chans=1, batch_size=2, num_workers=0)
    dm.setup()
    assert not dm.has_labels and dm.knn_dataloaders() is None
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (2, 1, dm.decode_size, dm.decode_size) and y.tolist() == [-1, -1]
    out, _ = dm.on_after_batch_transfer((x, y), 0)
    assert out.dtype == torch.float32 and out.shape == (2, 1, 16, 16)


def test_folder_module_single_folder_holds_out_val_fraction(tmp_path):
    nested_folder(tmp_path, per_class=5)
    dm = PretrainDataModule(root=str(tmp_path), img_size=16, num_workers=0, val_fraction=0.2, knn_train_size=0, knn_test_size=0)
    assert dm.has_labels
    assert len(dm.knn_test_set) == 2 and len(dm.knn_train_set) == 8 and len(dm.train_set) == 8  # held-out images are not pretrained on


def test_folder_module_missing_root_is_user_error(tmp_path):
    dm = PretrainDataModule(root=str(tmp_path / "missing"), dataset="folder", num_workers=0)
    with pytest.raises(UserError, match="missing"):
        dm.setup()


def test_folder_module_too_few_images_for_a_batch(tmp_path):
    save(tmp_path / "a.png")
    dm = PretrainDataModule(root=str(tmp_path), batch_size=4, num_workers=0)
    with pytest.raises(UserError, match="batch_size"):
        dm.train_dataloader()


def test_bad_in_chans_and_dataset_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="in_chans"):
        PretrainDataModule(root=str(tmp_path), in_chans=2)
    with pytest.raises(UserError, match="dataset"):
        PretrainDataModule(root=str(tmp_path), dataset="imagenet")
    with pytest.raises(UserError, match="--data.root"):
        PretrainDataModule(dataset="folder")


def test_auto_source_expands_user_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    fm = tmp_path / "fm"
    fm.mkdir()
    for pair in fashion_mnist.FILES.values():
        for name in pair:
            (fm / name).write_bytes(b"")
    assert PretrainDataModule(root="~/fm").source == "fashion_mnist"
    assert fashion_mnist.search_paths("~/fm")[0] == fm


# ---------------------------------------------------------------- Fashion-MNIST


@pytest.fixture(scope="module")
def fmnist_module():
    dm = PretrainDataModule(batch_size=8, num_workers=0, knn_train_size=100, knn_test_size=50)
    dm.setup()
    return dm


@needs_fmnist
def test_fashion_mnist_defaults_and_subsets(fmnist_module):
    dm = fmnist_module
    assert dm.source == "fashion_mnist" and dm.in_chans == 1 and dm.img_size == 32
    assert len(dm.train_set) == 60000 and len(dm.classes) == 10
    assert len(dm.knn_train_set) == 100 and len(dm.knn_test_set) == 50
    mem, test = dm.knn_dataloaders(batch_size=1000)
    x, y = next(iter(test))
    assert x.shape == (50, 1, 28, 28) and y.dtype == torch.int64 and 0 <= int(y.min()) <= int(y.max()) <= 9


@needs_fmnist
def test_fashion_mnist_train_batches_and_transforms(fmnist_module):
    dm = fmnist_module
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (8, 1, 28, 28) and y.shape == (8,)
    assert dm.trainer is None
    out, labels = dm.on_after_batch_transfer((x, y), 0)
    assert out.dtype == torch.float32 and out.shape == (8, 1, 32, 32) and torch.equal(labels, y)
    # normalised with the Fashion-MNIST statistics: mean near 0, not in [0, 1]
    assert abs(float(out.mean())) < 1.0 and float(out.min()) < 0 and torch.isfinite(out).all()
    assert dm.train_batches_seen == 0  # eval mode does not advance the resume counter
    aug = dm.train_augment(x.clone())
    assert aug.dtype == torch.float32 and aug.shape == (8, 1, 32, 32) and torch.isfinite(aug).all()


@needs_fmnist
def test_fashion_mnist_three_channels():
    dm = PretrainDataModule(in_chans=3, batch_size=4, num_workers=0, knn_train_size=10, knn_test_size=10)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 28, 28)
    assert dm.eval_images(x).shape == (4, 3, 32, 32)


def test_find_fashion_mnist_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "search_paths", lambda root=None: [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(UserError) as info:
        fashion_mnist.find_fashion_mnist()
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path / "a") in message and "--data.root" in message


def test_find_fashion_mnist_prefers_explicit_root(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SSL_KIT_DATA", raising=False)
    for pair in fashion_mnist.FILES.values():
        for name in pair:
            (tmp_path / name).write_bytes(b"")
    assert fashion_mnist.find_fashion_mnist(tmp_path) == tmp_path
    paths = fashion_mnist.search_paths()
    assert paths[0] == tmp_path / "home" / ".cache" / "ssl_kit" / "fashion-mnist"


# ---------------------------------------------------------------- exact resume


def test_epoch_seeded_sampler_is_reproducible():
    data = list(range(50))
    a, b = EpochSeededRandomSampler(data, seed=3), EpochSeededRandomSampler(data, seed=3)
    for epoch in (0, 1, 5):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert list(a) == list(b)
    a.set_epoch(0)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    assert first != second and sorted(first) == sorted(second) == data
    a.set_epoch(0)
    assert list(a) == first  # re-seeding restores the order (as after a resume)
    other = EpochSeededRandomSampler(data, seed=4)
    assert list(other) != first


def test_datamodule_state_dict_round_trip(tmp_path):
    save(tmp_path / "a.png")
    dm = PretrainDataModule(root=str(tmp_path), num_workers=0)
    dm.train_batches_seen = 17
    state = dm.state_dict()
    assert state == {"train_batches_seen": 17, "world_size": 1, "batch_size": 256, "accumulate_grad_batches": 1}
    fresh = PretrainDataModule(root=str(tmp_path), num_workers=0)
    assert fresh.train_batches_seen == 0
    fresh.load_state_dict(state)
    assert fresh.train_batches_seen == 17
    fresh.load_state_dict({})  # checkpoints from before the counter existed
    assert fresh.train_batches_seen == 0


@needs_fmnist
def test_scene_source_pretrains_on_the_segmentation_modules_train_scenes():
    """``--data.dataset fmnist_scenes``: unlabeled, no k-NN monitor, exactly the scenes SegmentationDataModule
    of the same seed and size trains on (so pretraining sees no validation scene)."""
    from ssl_kit.data import SegmentationDataModule

    dm = PretrainDataModule(dataset="fmnist_scenes", img_size=64, batch_size=4, seed=3)
    dm.setup()
    assert dm.in_chans == 1 and dm.decode_size == 64 and not dm.has_labels and len(dm.train_set) == 2000
    seg = SegmentationDataModule(img_size=64, seed=3, labeled_images=10)
    seg.setup()
    for i in (0, 1999):
        image, label = dm.train_set[i]
        assert label == -1 and torch.equal(image, seg.full_train[i][0])
    assert dm.mean == seg.mean and dm.std == seg.std
    more = PretrainDataModule(dataset="fmnist_scenes", img_size=64, batch_size=4, seed=3, train_scenes=2500)
    more.setup()  # more scenes of Fashion-MNIST train items (--data.train_scenes), still unlabeled
    assert len(more.train_set) == 2500 and more.train_set[0][0].shape == (1, 64, 64)
