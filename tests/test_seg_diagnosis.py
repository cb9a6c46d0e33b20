"""Issue #24: benchmarks/seg_diagnosis.py moves single items to the canvas centre (position only) and tables the
pseudo labels' class accuracy by confidence; pinned on hand-made tensors."""
import pytest
import torch

from helpers import import_benchmark


@pytest.fixture
def diagnosis(monkeypatch):
    return import_benchmark(monkeypatch, "seg_diagnosis")


def test_centre_items_moves_image_and_mask_together(diagnosis):
    image = torch.zeros(1, 8, 8, dtype=torch.uint8)
    mask = torch.zeros(8, 8, dtype=torch.uint8)
    image[0, 0:2, 5:8] = torch.tensor([[10, 20, 30], [40, 50, 60]], dtype=torch.uint8)  # a 2 x 3 item, top right
    mask[0:2, 5:8] = 4
    (moved_image, moved_mask), = diagnosis.centre_items([(image, mask)])
    ys, xs = (moved_mask == 4).nonzero(as_tuple=True)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (3, 4, 3, 5)  # centre 3.5 of rows 0-7; columns 3-5 (centre 4, half a pixel off)
    assert moved_image[0, 3:5, 3:6].tolist() == [[10, 20, 30], [40, 50, 60]] and moved_image.sum() == image.sum()
    assert moved_mask.sum() == mask.sum()


def test_confidence_table_by_hand(diagnosis):
    # 4 true item pixels (class 1) predicted as items with confidences 0.6 (class 2), 0.8 (1), 0.96 (1), 0.4 (2);
    # a fifth pixel is background in truth and does not count
    p = torch.tensor([[0.2, 0.2, 0.6], [0.1, 0.8, 0.1], [0.02, 0.96, 0.02], [0.3, 0.3, 0.4], [0.1, 0.9, 0.0]])
    probs = p.T.reshape(1, 3, 1, 5)
    target = torch.tensor([[[1, 1, 1, 1, 0]]])
    rows = {r["threshold"]: r for r in diagnosis.confidence_table(probs, target)}
    assert rows[0.0]["share"] == 1.0 and rows[0.0]["class_accuracy"] == 0.5
    assert rows[0.5]["share"] == 0.75 and rows[0.5]["class_accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    assert rows[0.9]["share"] == 0.25 and rows[0.9]["class_accuracy"] == 1.0
    assert rows[0.99]["share"] == 0.0 and rows[0.99]["class_accuracy"] is None
