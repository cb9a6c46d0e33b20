"""UDA: Unsupervised Data Augmentation with Training Signal Annealing (Xie et al. 2020), METHODS.md section 4."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
from torch import Tensor
import torch

from ssl_kit.callbacks import PseudoLabelPictures
from ssl_kit.losses.semi import entropy, tsa_cross_entropy, tsa_threshold, uda_consistency
from ssl_kit.methods.classifier import SemiSupervisedClassifier, build_classifier, classifier_param_groups
from ssl_kit.optim import adamw_warmup_cosine
from ssl_kit.teacher import EMATeacher, make_ema_copy
from ssl_kit.validation import check_settings


class UDA(SemiSupervisedClassifier):
    """Supervised cross-entropy with TSA + ``unsup_weight`` x confidence-masked consistency between the
    weak and strong views of unlabeled images: one forward over ``[labeled, unlabeled strong]`` and a
    gradient-free forward of the weak views (the target carries no gradient in UDA; skipping its graph
    saves a third of the backward). An EMA copy of the classifier (``ema_decay``, warm-started: ``min(ema_decay, 1 - 1/(i+1))``)
    is evaluated and exported. With ``unsup_weight 0`` and ``tsa none`` it is plain supervised training of
    the same model (the ``supervised`` recipe, the baseline of the benchmark).

    Batches come from :class:`ssl_kit.data.semi.SemiSupervisedDataModule`.

    Args:
        encoder, encoder_kwargs, patch_size, img_size, in_chans: the shared ViT (random init).
        num_classes: K.
        init_from: start from a pretrained checkpoint / export (MAE, LoMaR, iBOT, ...).
        drop_path_rate: stochastic depth.
        global_pool: classifier input, ``token`` ([CLS]) or ``avg`` (mean patch token, MAE's fine-tuning).
        unsup_weight: lambda (1.0).
        uda_temperature: sharpening temperature of the weak-view target (0.4).
        confidence_threshold: mask on the unsharpened max probability of the weak view (0.8).
        tsa: ``linear``, ``log``, ``exp`` or ``none`` (default: the reference's image runs leave TSA off; it
            is for text, where the labeled set is overfitted quickly).
        entropy_weight: optional entropy minimisation on the weak-view predictions (0 = off).
        label_smoothing: on the supervised term.
        ema_decay: cap of the evaluation EMA (UDA: 0.9999 for 400k steps; 0.99 suits runs of hundreds of steps).
        base_lr: AdamW lr per 256 LABELED images; min_lr, warmup_epochs, weight_decay, betas: as the other methods.
        layer_decay: layer-wise lr decay of the ViT (timm groups; 1.0 = off, 0.75 as MAE fine-tunes small ViTs).
    """

    def __init__(
        self,
        encoder: str = "tiny",
        encoder_kwargs: dict[str, Any] | None = None,
        patch_size: int = 4,
        img_size: int = 32,
        in_chans: int = 1,
        num_classes: int = 10,
        init_from: str | None = None,
        drop_path_rate: float = 0.1,
        global_pool: Literal["token", "avg"] = "token",
        unsup_weight: float = 1.0,
        uda_temperature: float = 0.4,
        confidence_threshold: float = 0.8,
        tsa: Literal["linear", "log", "exp", "none"] = "none",
        entropy_weight: float = 0.0,
        label_smoothing: float = 0.0,
        ema_decay: float = 0.99,
        base_lr: float = 1e-2,
        min_lr: float = 1e-6,
        warmup_epochs: float = 1.0,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        layer_decay: float = 1.0,
    ) -> None:
        super().__init__()
        tsa_threshold(tsa, 0.0, num_classes)  # validates the schedule name
        self.save_hyperparameters()
        check_settings(self.hparams)
        self.classifier, self.encoder_spec = build_classifier(
            encoder, img_size, patch_size, in_chans, encoder_kwargs, num_classes, init_from, drop_path_rate, global_pool)
        self.ema_classifier = make_ema_copy(self.classifier)
        self.init_metrics(num_classes)

    @property
    def encoder(self) -> torch.nn.Module:  # type: ignore[override]
        """The trained classifier (timm ViT with its head); its EMA is evaluated and exported."""
        return self.classifier

    def export_module(self) -> torch.nn.Module:
        return self.ema_classifier

    def ema_pairs(self) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
        return [(self.classifier, self.ema_classifier)]

    def pseudo_labeller(self) -> tuple[torch.nn.Module, float]:
        """The model whose weak-view predictions are the consistency targets, and the mask threshold."""
        return self.classifier, self.hparams.confidence_threshold

    def method_callbacks(self, pictures_dir: Path) -> list[pl.Callback]:
        """Pseudo-label pictures, and the EMA of the classifier (evaluated and exported)."""
        return [PseudoLabelPictures(pictures_dir), EMATeacher(schedule="inverse", cap=self.hparams.ema_decay)]

    def setup(self, stage: str) -> None:
        self.check_data(needs_unlabeled=self.hparams.unsup_weight > 0)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        hp = self.hparams
        images, labels = batch["labeled"]
        n_labeled = len(labels)
        use_unlabeled = hp.unsup_weight > 0 and "unlabeled" in batch
        if use_unlabeled:
            weak_images, strong_images = batch["unlabeled"]
            # the target carries no gradient (the reference stops it); only entropy minimisation needs the graph
            with torch.set_grad_enabled(hp.entropy_weight > 0):
                weak = self.classifier(weak_images)
            logits = self.classifier(torch.cat([images, strong_images]))
        else:
            logits = self.classifier(images)

        progress = self.global_step / max(1, self.trainer.estimated_stepping_batches)
        threshold = tsa_threshold(hp.tsa, progress, hp.num_classes)
        loss, kept = tsa_cross_entropy(logits[:n_labeled], labels, threshold, hp.label_smoothing)
        logs = {"loss_sup": loss.detach(), "tsa_threshold": threshold, "tsa_kept_fraction": kept.float().mean(),
                "labeled_top1": (logits[:n_labeled].detach().argmax(dim=-1) == labels).float().mean()}
        if use_unlabeled:
            strong = logits[n_labeled:]
            unsup, mask = uda_consistency(weak, strong, hp.uda_temperature, hp.confidence_threshold)
            loss = loss + hp.unsup_weight * unsup
            logs.update(loss_unsup=unsup.detach(), unsup_mask_fraction=mask.float().mean())
            if hp.entropy_weight > 0:
                ent = entropy(weak)
                loss = loss + hp.entropy_weight * ent
                logs["entropy"] = ent.detach()
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=n_labeled)
        return self.report_loss(loss, n_labeled)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = classifier_param_groups(self.classifier, hp.weight_decay, hp.layer_decay)
        return adamw_warmup_cosine(self, groups, hp.base_lr, self.trainer.datamodule.batch_size, hp.warmup_epochs,
                                   betas=tuple(hp.betas), min_lr=hp.min_lr)
