"""Segmentation data: built-in Fashion-MNIST scenes, users' mask folders (and their errors), joint augmentation."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_kit.data import SegmentationDataModule
from ssl_kit.data.fashion_mnist import load_fashion_mnist
from ssl_kit.data.fmnist_scenes import OBJECT_THRESHOLD, make_scenes
from ssl_kit.data.mask_folder import scan_mask_folder
from ssl_kit.data.segmentation_module import JointAugment
from ssl_kit.errors import UserError

SMALL = dict(img_size=32, train_scenes=64, val_scenes=16, labeled_images=16, batch_size=4, object_size=(8, 20))


@pytest.fixture(scope="module")
def items():
    images, labels = load_fashion_mnist("test")
    return images[:500], labels[:500]


def test_scenes_are_deterministic_by_seed_with_exact_masks(items):
    images, labels = items
    a = make_scenes(images, labels, 20, canvas=48, objects=(1, 3), object_size=(10, 30), seed=3)
    b = make_scenes(images, labels, 20, canvas=48, objects=(1, 3), object_size=(10, 30), seed=3)
    c = make_scenes(images, labels, 20, canvas=48, objects=(1, 3), object_size=(10, 30), seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    scenes, masks = a
    assert scenes.shape == (20, 1, 48, 48) and scenes.dtype == torch.uint8 and masks.shape == (20, 48, 48)
    assert (scenes[:, 0][masks > 0] > OBJECT_THRESHOLD).all()  # every object pixel is bright
    assert (scenes[:, 0][masks == 0] <= 40).all()  # background texture stays faint
    present = [set(m.unique().tolist()) - {0} for m in masks]
    assert all(1 <= len(p) <= 3 for p in present)  # 1..3 items (fewer classes when two items share one)
    assert int(masks.max()) <= 10


def test_a_single_pasted_item_is_its_own_mask(items):
    images, labels = items
    scenes, masks = make_scenes(images[:1], labels[:1], 1, canvas=28, objects=(1, 1), object_size=(28, 28),
                                texture=False, seed=0)
    expected = torch.where(images[0, 0] > OBJECT_THRESHOLD, images[0, 0], 0)
    assert torch.allclose(scenes[0, 0].float(), expected.float(), atol=1)  # 28 -> 28: the item itself
    assert torch.equal(masks[0] > 0, scenes[0, 0] > OBJECT_THRESHOLD)
    assert set(masks[0].unique().tolist()) == {0, int(labels[0]) + 1}


def test_joint_augment_keeps_image_and_mask_aligned():
    torch.manual_seed(0)
    masks = torch.zeros(8, 32, 32, dtype=torch.uint8)
    masks[:, 4:20, 6:26] = 3
    masks[:, 22:30, 2:12] = 7
    masks[:, :2] = 255
    images = (masks.float() * 20).clamp(max=250).to(torch.uint8)[:, None]  # image value is a function of the mask
    augment = JointAugment(32, (0.0,), (1.0,), crop_scale=(0.3, 1.0))
    x, y = augment(images, masks)
    assert x.shape == (8, 1, 32, 32) and y.dtype == torch.long
    assert set(y.unique().tolist()) <= {0, 3, 7, 255}  # nearest: no blended class ids
    def agreement(labels):
        return ((x[:, 0] * 255 - (labels.float() * 20).clamp(max=250)).abs() < 2).float().mean()

    assert agreement(y) > 0.85  # only object borders differ (bilinear image vs nearest mask)
    assert agreement(y.flip(-1)) < 0.75  # what a mask that missed the flip would score


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode).save(path)


def _folder(tmp_path, n=6, size=20, num_classes=3):
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", 2)):
        for i in range(count):
            _png(tmp_path / split / "images" / f"im{i}.png", rng.integers(0, 255, (size, size, 3)))
            mask = rng.integers(0, num_classes, (size, size))
            mask[0] = 255
            _png(tmp_path / split / "masks" / f"im{i}.png", mask)
    return tmp_path


def test_mask_folder_errors_name_the_file(tmp_path):
    root = _folder(tmp_path)
    images, masks = root / "train" / "images", root / "train" / "masks"
    assert len(scan_mask_folder(images, masks, 3)) == 6
    with pytest.raises(UserError, match=r"im1.png.*value\(s\) \[5\]"):
        _png(masks / "im1.png", np.full((20, 20), 5))
        scan_mask_folder(images, masks, 3)
    _png(masks / "im1.png", np.zeros((20, 20)))
    _png(masks / "im2.png", np.zeros((16, 20)))
    with pytest.raises(UserError, match=r"im2.png is 20x16 but its image .*im2.png is 20x20"):
        scan_mask_folder(images, masks, 3)
    (masks / "im2.png").unlink()
    with pytest.raises(UserError, match=r"im2.png has no mask: expected .*masks/im2.png"):
        scan_mask_folder(images, masks, 3)
    (masks / "im2.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"Cannot read mask .*im2.png"):
        scan_mask_folder(images, masks, 3)
    _png(masks / "im2.png", np.zeros((20, 20, 3)))
    with pytest.raises(UserError, match=r"im2.png is a RGB image: save masks as single-channel index PNGs"):
        scan_mask_folder(images, masks, 3)
    with pytest.raises(UserError, match="does not exist"):
        scan_mask_folder(root / "nope", masks, 3)


def test_palette_masks_are_read_as_indices(tmp_path):
    root = _folder(tmp_path, n=2)
    mask = Image.fromarray(np.array([[0, 1], [2, 255]], dtype=np.uint8).repeat(10, 0).repeat(10, 1), "P")
    mask.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (3 * 252) + [224, 224, 192])  # VOC-like colours
    mask.save(root / "train" / "masks" / "im0.png")
    dm = SegmentationDataModule(str(root), img_size=20, num_classes=3, labeled_images=None, unlabeled_ratio=0,
                                batch_size=2)
    dm.setup()
    _, values = dm.full_train[0]
    assert set(values.unique().tolist()) == {0, 1, 2, 255}


def test_builtin_module_sizes_batches_and_subset_file(tmp_path):
    dm = SegmentationDataModule(**SMALL)
    dm.setup()
    assert (len(dm.train_set), len(dm.unlabeled_set), len(dm.val_set)) == (16, 48, 16)
    assert dm.num_classes == 11 and dm.classes[0] == "background"
    assert dm.steps_per_epoch == 12  # one pass over the 48 unlabeled scenes, 4 per step
    loaders = dm.train_dataloader()
    assert len(loaders["labeled"]) == len(loaders["unlabeled"]) == 12  # the labeled scenes are cycled
    raw = {"labeled": next(iter(loaders["labeled"])), "unlabeled": next(iter(loaders["unlabeled"]))}
    batch = dm.on_after_batch_transfer(raw, 0)
    x, y = batch["labeled"]
    assert x.shape == (4, 1, 32, 32) and x.dtype == torch.float32 and y.shape == (4, 32, 32) and y.dtype == torch.long
    assert batch["unlabeled"].shape == (4, 1, 32, 32)
    images, masks = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert images.shape == (16, 1, 32, 32) and masks.dtype == torch.long
    dm.save_subset(tmp_path / "subset.json")
    saved = json.loads((tmp_path / "subset.json").read_text())
    assert saved["indices"] == dm.subset_indices and len(saved["indices"]) == 16
    again = SegmentationDataModule(**SMALL)
    again.setup()
    assert again.subset_indices == dm.subset_indices  # seeded


def test_supervised_only_takes_as_many_steps_without_unlabeled_images():
    dm = SegmentationDataModule(**dict(SMALL, unlabeled_ratio=0))
    dm.setup()
    assert dm.unlabeled_set is None and "unlabeled" not in dm.train_dataloader()
    assert dm.steps_per_epoch == 64 // 4


def test_folder_module_end_to_end(tmp_path):
    root = _folder(tmp_path)
    _png(root / "unlabeled" / "u0.png", np.zeros((30, 30, 3)))
    (root / "classes.txt").write_text("sky\nroad\ncar\n")
    dm = SegmentationDataModule(str(root), img_size=16, num_classes=3, labeled_images=4, batch_size=2)
    dm.setup()
    assert dm.classes == ["sky", "road", "car"] and dm.in_chans == 3
    assert (len(dm.train_set), len(dm.unlabeled_set), len(dm.val_set)) == (4, 3, 2)  # 2 unmasked train + 1 extra
    image, mask = dm.train_set[0]
    assert image.shape == (3, 16, 16) and mask.shape == (16, 16) and 255 in mask.tolist()[0]


def test_module_errors(tmp_path):
    with pytest.raises(UserError, match="--data.num_classes is needed"):
        SegmentationDataModule(str(_folder(tmp_path)))
    with pytest.raises(UserError, match="--data.root .* does not exist"):
        SegmentationDataModule(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="--data.labeled_images 100 must be between 1 and the 64"):
        SegmentationDataModule(**dict(SMALL, labeled_images=100)).setup()
    with pytest.raises(UserError, match="No unlabeled images"):
        SegmentationDataModule(**dict(SMALL, labeled_images=None)).setup()
    with pytest.raises(UserError, match="built-in scenes have 11 classes"):
        SegmentationDataModule(**dict(SMALL, num_classes=5)).setup()
