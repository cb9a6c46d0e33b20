"""Full fine-tuning with layer-wise lr decay (MAE recipe, METHODS.md section 1)."""
from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from ssl_kit.metrics import ValidationTop1
from ssl_kit.optim import effective_batch_size, scaled_lr, with_warmup_cosine

log = logging.getLogger("ssl_kit")


def layer_decay_param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """timm's layer-wise groups with the scale APPLIED: each group's ``lr = lr * lr_scale``.

    Layer ids from timm's ``group_matcher``: cls_token / pos_embed / patch_embed -> 0, blocks.i ->
    i + 1, final norm / fc_norm / head -> depth + 1; ``lr_scale = decay ** (depth + 1 - id)``.
    (timm's helper only records ``lr_scale``; a plain torch scheduler would ignore it.)
    """
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups = param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return groups


class FineTune(ValidationTop1, pl.LightningModule):
    """Fine-tune a ViT classifier (``num_classes`` head, global average pool + fc_norm).

    Args:
        model: timm ViT with its classification head.
        num_classes: K.
        base_lr: lr per 256 images (MAE ViT-B: 5e-4).
        layer_decay: per-block lr decay (0.65 ViT-B, 0.75 ViT-L/H and small models).
        weight_decay: AdamW weight decay.
        warmup_epochs: linear warmup.
        min_lr: cosine floor.
        label_smoothing: applied directly or through mixup's soft targets.
        mixup: mixup alpha (0 = off).
        cutmix: cutmix alpha (0 = off).
        batch_size: per-device batch, for the lr scaling.
    """

    def __init__(
        self, model: VisionTransformer, num_classes: int, base_lr: float = 5e-4, layer_decay: float = 0.75,
        weight_decay: float = 0.05, warmup_epochs: float = 5, min_lr: float = 1e-6, label_smoothing: float = 0.1,
        mixup: float = 0.8, cutmix: float = 1.0, batch_size: int = 256,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        nn.init.trunc_normal_(model.head.weight, std=2e-5)  # MAE: a nearly-zero head at start
        nn.init.zeros_(model.head.bias)
        self.mixup = (
            Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes)
            if mixup > 0 or cutmix > 0 else None
        )
        self.soft_ce = SoftTargetCrossEntropy()
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.mixup is not None and len(y) % 2 == 0:
            x, soft = self.mixup(x, y)
            loss = self.soft_ce(self(x), soft)
        else:
            loss = F.cross_entropy(self(x), y, label_smoothing=self.hparams.label_smoothing)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        lr = scaled_lr(self.hparams.base_lr, effective_batch_size(self.trainer, self.hparams.batch_size))
        groups = layer_decay_param_groups(self.model, lr, self.hparams.weight_decay, self.hparams.layer_decay)
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
        # the schedule multiplies every group's own (already layer-scaled) lr by the same factor
        return with_warmup_cosine(self.trainer, optimizer, self.hparams.warmup_epochs, self.hparams.min_lr / lr if lr > 0 else 0.0)
