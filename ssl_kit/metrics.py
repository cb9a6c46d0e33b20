"""Validation metrics shared by every classifier: the semi-supervised methods' and the evaluation commands'."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy


class ValidationTop1:
    """Mixin for classifiers: logs ``val_loss`` and ``val_top1`` (torchmetrics, micro accuracy)."""

    val_acc: MulticlassAccuracy

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log_dict({"val_loss": F.cross_entropy(logits, y), "val_top1": self.val_acc}, prog_bar=True, on_epoch=True, batch_size=len(y))
