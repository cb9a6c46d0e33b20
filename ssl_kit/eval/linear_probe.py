"""Linear probe, MAE protocol (METHODS.md section 1): frozen encoder, BatchNorm (no affine) + Linear,
LARS with lr = base_lr * effective_batch / 256, warmup + cosine per step."""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from ssl_kit.encoders.features import FeatureKind, encoder_features
from ssl_kit.eval.lars import LARS
from ssl_kit.metrics import ValidationTop1
from ssl_kit.optim import effective_batch_size, scaled_lr, with_warmup_cosine


def linear_head(dim: int, num_classes: int) -> nn.Sequential:
    """BatchNorm1d(dim, affine=False, eps=1e-6) + Linear (trunc-normal std 0.01, zero bias)."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


class LinearProbe(ValidationTop1, pl.LightningModule):
    """Train only a linear head on frozen features.

    Args:
        encoder: frozen ViT, or None when batches already hold features (cached mode).
        feature_dim: width of the features.
        num_classes: K.
        feature: ``cls``, ``avgpool`` or ``cls_last_n``.
        last_n: blocks for ``cls_last_n``.
        base_lr: lr per 256 images (MAE: 0.1).
        weight_decay: LARS weight decay (MAE: 0).
        warmup_epochs: linear warmup (MAE: 10 of 90).
        batch_size: per-device batch, for the lr scaling.
    """

    def __init__(
        self, encoder: VisionTransformer | None, feature_dim: int, num_classes: int, feature: FeatureKind = "cls",
        last_n: int = 4, base_lr: float = 0.1, weight_decay: float = 0.0, warmup_epochs: float = 10,
        batch_size: int = 256,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder"])
        self.encoder = encoder
        if encoder is not None:
            encoder.requires_grad_(False)
        self.head = linear_head(feature_dim, num_classes)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")

    def features(self, x: Tensor) -> Tensor:
        if self.encoder is None:
            return x
        self.encoder.eval()  # frozen: no dropout / drop-path, whatever mode Lightning sets
        with torch.no_grad():
            return encoder_features(self.encoder, x, self.hparams.feature, self.hparams.last_n)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log_dict({"train_loss": loss, "train_top1": self.train_acc}, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        lr = scaled_lr(self.hparams.base_lr, effective_batch_size(self.trainer, self.hparams.batch_size))
        optimizer = LARS(self.head.parameters(), lr=lr, weight_decay=self.hparams.weight_decay)
        return with_warmup_cosine(self.trainer, optimizer, self.hparams.warmup_epochs)
