"""benchmarks/det_pseudo_boxes.py: a detection is right with the class of the true box it overlaps, located with
any class; ``--split unlabeled`` scores exactly the train scenes the run leaves unlabeled. benchmarks/
det_strong_view_boxes.py: a pseudo box mapped into the strong view is exact under translation and encloses a turned
item."""
import math

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


def test_strong_view_box_is_exact_under_translation_and_encloses_a_turned_square(monkeypatch):
    bench = import_benchmark(monkeypatch, "det_strong_view_boxes")
    augment = bench.DetectionAugment(bench.CANVAS, [0.5], [0.5])
    square = torch.ones(40, 40, dtype=torch.bool)
    shift = bench.translation_matrices(torch.tensor([[7.0, -5.0]]))[0]
    mapped, true = bench.mapped_and_true_box(augment, square, shift)
    assert torch.allclose(mapped, true) and torch.allclose(true, torch.tensor([51.0, 39.0, 91.0, 79.0]))
    turn = bench.rotation_matrices(torch.tensor([30.0]), bench.CANVAS)[0]
    mapped, true = bench.mapped_and_true_box(augment, square, turn)
    side = 40 * (math.cos(math.pi / 6) + math.sin(math.pi / 6))  # the turned square's enclosing box
    assert torch.allclose(mapped[2:] - mapped[:2], torch.tensor([side, side]), atol=1e-3)
    assert (true[2:] - true[:2] - side).abs().max() <= 2.0  # a turned SQUARE fills its enclosing box's extent
