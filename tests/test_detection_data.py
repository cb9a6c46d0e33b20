"""Detection data: built-in Fashion-MNIST scenes with exact boxes, COCO JSON with clear errors, device views."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_kit.data.box_geometry import transform_boxes
from ssl_kit.data.coco import read_coco
from ssl_kit.data.detection_module import DetectionDataModule
from ssl_kit.data.detection_scenes import make_detection_scenes, tight_box
from ssl_kit.data.fmnist_scenes import OBJECT_THRESHOLD
from ssl_kit.errors import UserError
from torchvision.ops import box_iou


def items(n: int = 40):
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    images[:, :, 4:24, 8:20] = torch.randint(60, 255, (n, 1, 20, 12), generator=g, dtype=torch.uint8)
    return images, torch.arange(n) % 10


def test_scene_boxes_are_the_tight_boxes_of_their_items_and_deterministic():
    images, labels = items()
    scenes, boxes, classes = make_detection_scenes(images, labels, 30, canvas=96, objects=(1, 1), texture=False, seed=3)
    again, boxes2, _ = make_detection_scenes(images, labels, 30, canvas=96, objects=(1, 1), texture=False, seed=3)
    assert torch.equal(scenes, again) and all(torch.equal(a, b) for a, b in zip(boxes, boxes2))
    for scene, box, label in zip(scenes, boxes, classes):
        assert len(box) == 1 and 1 <= int(label[0]) <= 10
        assert torch.equal(tight_box(scene[0] > OBJECT_THRESHOLD), box[0])  


def test_scenes_hold_several_items_with_limited_overlap():
    images, labels = items()
    _, boxes, classes = make_detection_scenes(images, labels, 40, canvas=128, objects=(3, 6), max_overlap=0.3, seed=0)
    counts = [len(b) for b in boxes]
    assert min(counts) >= 1 and max(counts) <= 6 and sum(counts) / len(counts) > 3
    for b, c in zip(boxes, classes):
        assert len(b) == len(c) and (b[:, 2:] > b[:, :2]).all() and (b >= 0).all() and (b <= 128).all()
        iou = box_iou(b, b) - torch.eye(len(b))
        assert iou.max() <= 0.3 + 1e-6


def write_coco(tmp_path, annotations, images=None, categories=None, make_files=True):
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    images = images or [{"id": 1, "file_name": "a.png", "width": 40, "height": 20},
                        {"id": 2, "file_name": "b.png", "width": 40, "height": 20}]
    if make_files:
        for entry in images:
            Image.fromarray(np.full((entry["height"], entry["width"], 3), 90, np.uint8)).save(folder / entry["file_name"])
    categories = categories or [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path, folder


def test_coco_reads_boxes_renumbers_categories_and_skips_degenerate_entries(tmp_path, ssl_caplog):
    path, folder = write_coco(tmp_path, [
        {"id": 10, "image_id": 1, "category_id": 3, "bbox": [2, 3, 10, 5]},
        {"id": 11, "image_id": 1, "category_id": 7, "bbox": [0, 0, 40.5, 20]},   # 0.5 px over the border: clipped
        {"id": 12, "image_id": 2, "category_id": 7, "bbox": [5, 5, 0, 4]},       # zero width: skipped
        {"id": 13, "image_id": 2, "category_id": 7, "bbox": [1, 1, 5, 5], "iscrowd": 1},
    ])
    coco = read_coco(path, folder)
    assert coco.categories == ["cat", "dog"] and coco.skipped == {"zero_area": 1, "crowd": 1}
    first, second = coco.images
    assert first.boxes.tolist() == [[2, 3, 12, 8], [0, 0, 40, 20]] and first.labels.tolist() == [2, 1]
    assert len(second.boxes) == 0  # kept as an all-background image
    assert "skipped 1 zero-area" in ssl_caplog.text


@pytest.mark.parametrize("annotation, message", [
    ({"id": 5, "image_id": 1, "category_id": 99, "bbox": [1, 1, 4, 4]}, "annotation 5 has category_id 99"),
    ({"id": 6, "image_id": 42, "category_id": 7, "bbox": [1, 1, 4, 4]}, "annotation 6 refers to image_id 42"),
    ({"id": 8, "image_id": 1, "category_id": 7, "bbox": [30, 1, 20, 4]}, "annotation 8 box .* lies outside its image a.png"),
    ({"id": 9, "image_id": 1, "category_id": 7, "bbox": [1, 1]}, r"annotation 9 needs 'bbox': \[x, y, width, height\]"),
])
def test_coco_bad_annotations_name_the_entry(tmp_path, annotation, message):
    path, folder = write_coco(tmp_path, [annotation])
    with pytest.raises(UserError, match=message):
        read_coco(path, folder)


def test_coco_malformed_json_and_missing_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [}')
    with pytest.raises(UserError, match=r"bad.json is not valid JSON \(line 1, column 13"):
        read_coco(bad, tmp_path)
    path, folder = write_coco(tmp_path, [], make_files=False)
    with pytest.raises(UserError, match=r"image id 1 names .*a.png, which does not exist"):
        read_coco(path, folder)
    (tmp_path / "nolist.json").write_text(json.dumps({"images": []}))
    with pytest.raises(UserError, match="has no 'annotations' list"):
        read_coco(tmp_path / "nolist.json", tmp_path)


def test_coco_data_module_splits_by_fraction_and_scales_boxes(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 20} for i in range(10)]
    annotations = [{"id": i, "image_id": i, "category_id": 3, "bbox": [4, 2, 20, 10]} for i in range(10)]
    path, folder = write_coco(tmp_path, annotations, images=images)
    dm = DetectionDataModule(root=str(folder), train_annotations=str(path), val_annotations=str(path), img_size=32,
                             batch_size=1, unlabeled_ratio=2, labeled_fraction=0.3, verify_images=False)
    dm.setup()
    assert (len(dm.train_set), len(dm.unlabeled_set), dm.num_classes) == (3, 7, 3)
    image, target = dm.train_set[0]
    assert image.shape == (3, 32, 32) and target["boxes"][0].tolist() == pytest.approx([3.2, 3.2, 19.2, 19.2])
    with pytest.raises(UserError, match="pass --data.train_annotations and --data.val_annotations"):
        DetectionDataModule(root=str(folder))


def test_training_views_carry_boxes_with_their_pixels():
    dm = DetectionDataModule(train_scenes=40, val_scenes=8, img_size=64, object_size=(12, 24), batch_size=4,
                             unlabeled_ratio=2, labeled_fraction=0.5)
    dm.setup()
    (images, targets), unlabeled = detection_batch(dm)
    out = dm.on_after_batch_transfer({"labeled": (images, targets), "unlabeled": unlabeled}, 0)
    x, boxes = out["labeled"]
    assert x.shape == (4, 1, 64, 64) and x.dtype == torch.float32
    for image, original, target in zip(images, targets, boxes):
        flipped = not torch.equal(original["boxes"], target["boxes"])
        if flipped:  # a flip maps x1 -> 64 - x2
            assert torch.equal(target["boxes"][:, [0, 2]], 64 - original["boxes"][:, [2, 0]])
    views = out["unlabeled"]
    assert views["weak"].shape == views["strong"].shape == (8, 1, 64, 64)
    assert views["weak_to_strong"].shape == (8, 3, 3) and not torch.equal(views["weak"], views["strong"])
    box = torch.tensor([[10.0, 10.0, 30.0, 20.0]])
    assert transform_boxes(box, views["weak_to_strong"][0]).shape == (1, 4)


def detection_batch(dm):
    loaders = dm.train_dataloader()
    return next(iter(loaders["labeled"])), next(iter(loaders["unlabeled"]))


def test_built_in_data_module_split_and_errors():
    dm = DetectionDataModule(train_scenes=50, val_scenes=5, img_size=64, object_size=(12, 24), labeled_fraction=0.1,
                             batch_size=2, unlabeled_ratio=4)
    dm.setup()
    assert (len(dm.train_set), len(dm.unlabeled_set), dm.num_classes, dm.steps_per_epoch) == (5, 45, 11, 5)
    with pytest.raises(UserError, match="labeled_fraction must be in"):
        DetectionDataModule(labeled_fraction=0.0)
    full = DetectionDataModule(train_scenes=20, val_scenes=5, img_size=64, object_size=(12, 24), labeled_fraction=1.0)
    with pytest.raises(UserError, match="No unlabeled images"):
        full.setup()
