"""benchmarks/det_pseudo_boxes.py: a detection is right with the class of the true box it overlaps, located with
any class; ``--split unlabeled`` scores exactly the train scenes the run leaves unlabeled."""
import torch

from helpers import import_benchmark
from ssl_kit.data import DetectionDataModule


def test_right_needs_the_class_located_does_not(monkeypatch):
    bench = import_benchmark(monkeypatch, "det_pseudo_boxes")
    gt_boxes, gt_labels = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), torch.tensor([1, 2])
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [21, 21, 30, 30], [50, 50, 60, 60]])
    labels, scores = torch.tensor([1, 3, 2, 1]), torch.tensor([0.9, 0.8, 0.7, 0.6])
    right = bench.match(boxes, labels, scores, gt_boxes, gt_labels)
    located = bench.match(boxes, torch.zeros_like(labels), scores, gt_boxes, torch.zeros_like(gt_labels))
    # box 1 sits on object 2 with the wrong class; box 2 then takes object 2 with the right class
    assert right.tolist() == [True, False, True, False]
    # classes ignored, box 1 takes object 2 first (higher score), so box 2 is a duplicate
    assert located.tolist() == [True, True, False, False]


def test_unlabeled_split_is_the_complement_of_the_labeled_subset(monkeypatch):
    bench = import_benchmark(monkeypatch, "det_pseudo_boxes")
    dm = DetectionDataModule(train_scenes=30, val_scenes=4, img_size=64, object_size=(12, 24), labeled_fraction=0.2,
                             unlabeled_ratio=0, seed=3)
    dm.setup("fit")
    unlabeled = bench.split_scenes(dm, "unlabeled", None)
    assert sorted(unlabeled.indices + dm.subset_indices) == list(range(30)) and len(dm.subset_indices) == 6
    image, target = unlabeled[0]
    assert torch.equal(image, dm.full_train[unlabeled.indices[0]][0]) and len(target["boxes"]) >= 1
    assert len(bench.split_scenes(dm, "unlabeled", 5)) == 5 and len(bench.split_scenes(dm, "val", None)) == 4
