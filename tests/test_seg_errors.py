"""Issue #24: benchmarks/seg_errors.py splits a segmenter's mIoU into mask and class errors; pinned on a
hand-made 1 x 4 x 4 prediction."""
import pytest
import torch

from helpers import import_benchmark


@pytest.fixture
def seg_errors(monkeypatch):
    return import_benchmark(monkeypatch, "seg_errors")


def test_error_split_by_hand(seg_errors):
    # truth: item of class 1 (4 px, top-left), item of class 2 (4 px, bottom-right), background elsewhere
    target = torch.tensor([[[1, 1, 0, 0],
                            [1, 1, 0, 0],
                            [0, 0, 2, 2],
                            [0, 0, 2, 2]]])
    # prediction: item 1 right on 3 px (1 px missed as background); item 2 called class 3 on 3 px and 2 on 1 px;
    # one background pixel called class 1
    pred = torch.tensor([[[1, 1, 1, 0],
                          [1, 0, 0, 0],
                          [0, 0, 3, 3],
                          [0, 0, 3, 2]]])
    out = seg_errors.error_split(pred, target, 4)
    assert out["items"] == 2 and out["items_right"] == 1  # item 2's majority is class 3
    conf = out["pred"]
    assert conf.tolist() == [[7, 1, 0, 0], [1, 3, 0, 0], [0, 0, 1, 3], [0, 0, 0, 0]]
    iou = seg_errors.iou_per_class(conf)
    assert iou[:3].tolist() == pytest.approx([7 / 9, 3 / 5, 1 / 4]) and iou[3] == 0  # class 3: predicted, never true
    # true classes on the predicted masks: item pixels predicted as any item take their class
    assert out["true_classes"].tolist() == [[7, 1, 0, 0], [1, 3, 0, 0], [0, 0, 4, 0], [0, 0, 0, 0]]
    # predicted classes on the true masks: item 1 -> 1, item 2 -> 3 (its majority), background exact
    assert out["true_masks"].tolist() == [[8, 0, 0, 0], [0, 4, 0, 0], [0, 0, 0, 4], [0, 0, 0, 0]]
    assert torch.isnan(seg_errors.iou_per_class(torch.zeros(2, 2, dtype=torch.long))).all()


def test_the_scenes_are_read_from_the_runs_config(seg_errors, tmp_path):
    """A run of seed 1 on 8000 scenes is scored on ITS scenes (the val scenes are drawn from the data seed), not on
    the defaults; without a config.yaml the defaults stay."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("data:\n  class_path: ssl_kit.data.SegmentationDataModule\n  init_args:\n"
                                     "    seed: 1\n    train_scenes: 8000\n    labeled_images: 8000\n    root: null\n"
                                     "    object_size:\n    - 16\n    - 40\n    batch_size: 32\n")
    scenes = seg_errors.run_scenes(str(run / "checkpoints" / "last.ckpt"))
    assert scenes == {"seed": 1, "train_scenes": 8000, "labeled_images": 8000, "object_size": [16, 40]}
    assert seg_errors.run_scenes(str(tmp_path / "elsewhere" / "checkpoints" / "last.ckpt")) == {}
