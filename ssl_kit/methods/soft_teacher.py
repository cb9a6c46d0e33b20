"""Soft Teacher: end-to-end semi-supervised object detection (Xu et al. ICCV 2021), METHODS.md section 7, on
the shared ViT through a ViTDet simple feature pyramid inside torchvision's Faster R-CNN."""
from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.ops import box_iou

from ssl_kit.data.box_geometry import clip_and_keep, map_boxes, transform_boxes
from ssl_kit.errors import UserError
from ssl_kit.callbacks import ValidationPictures
from ssl_kit.encoders import load_encoder
from ssl_kit.heads.detection import ViTDetector
from ssl_kit.losses.soft_teacher import box_uncertainty, confident, jitter_boxes, reliable, soft_background_ce
from ssl_kit.methods.base import StudentTeacherMethod
from ssl_kit.methods.classifier import encoder_and_head_groups, pretrained_or_random
from ssl_kit.runtime import eval_mode
from ssl_kit.teacher import EMATeacher, make_ema_copy
from ssl_kit.validation import check_settings, require
from ssl_kit.viz import save_detection_grid

log = logging.getLogger("ssl_kit")
Features = OrderedDict[str, Tensor]
Targets = list[dict[str, Tensor]]


class ViewTargets(NamedTuple):
    """Pseudo boxes in the student's view, per image (``boxes`` ``[n, 4]``, ``labels`` ``[n]``): for classification
    (score > ``cls_threshold``), for box regression (uncertainty < ``reg_threshold``), and the objects the RPN learns
    (score > ``object_threshold``; the classification boxes when it is None)."""

    classification: Targets
    regression: Targets
    objects: Targets


def split_features(features: Features, n: int) -> tuple[Features, Features]:
    """Pyramid maps of a concatenated batch -> (first ``n`` images, the rest)."""
    return (OrderedDict((k, v[:n]) for k, v in features.items()), OrderedDict((k, v[n:]) for k, v in features.items()))


class DetectionPictures(ValidationPictures):
    """``detection_epoch_NNN.png``: validation images with their ground-truth boxes, the teacher's pseudo-box
    candidates (score / uncertainty) and the student's detections (``detection_panels``)."""

    name = "detection"

    def __init__(self, out_dir: str | Path, num_images: int = 4) -> None:
        super().__init__(out_dir, num_images)

    def save_picture(self, dm: pl.LightningDataModule, pl_module: pl.LightningModule, samples: list, path: Path) -> None:
        images = dm.eval_images(torch.stack([s[0] for s in samples]).to(pl_module.device))
        panels = pl_module.detection_panels(images)
        hp = pl_module.hparams
        save_detection_grid(images, [s[1] for s in samples], panels["teacher"], panels["student"], path, dm.mean,
                            dm.std, dm.classes, hp.cls_threshold, hp.reg_threshold)


class SoftTeacher(StudentTeacherMethod):
    """Student = ViT detector trained on labeled images (Faster R-CNN losses) and, from the first step, on
    strong views of unlabeled images with the EMA teacher's pseudo boxes found on their weak views:

    * teacher detections (after NMS) with score > ``initial_score`` (0.5) are pseudo-box candidates;
    * RPN and classification: candidates with score > ``cls_threshold`` (0.9, strict); student proposals
      assigned to background are weighted by the teacher's background probability of the same box, carried
      into the weak view (:func:`ssl_kit.losses.soft_teacher.soft_background_ce`);
    * optionally (``object_threshold``, not in the paper) candidates scored between ``object_threshold`` and
      ``cls_threshold`` count as objects of unknown class: RPN foreground, and the student's proposals on them are
      not trained as background;
    * box regression: candidates whose box-jitter uncertainty (``jitter_times`` copies, sigma
      ``jitter_scale`` of the box size, refined by the teacher's box head) is below ``reg_threshold`` (0.02),
      whatever their score;
    * total = supervised + ``unsup_weight`` (4.0) x unsupervised; teacher EMA ``min(ema_decay, 1 - 1/(i+1))``.

    With ``unsup_weight 0`` (or ``--data.unlabeled_ratio 0``) it is supervised-only training of the same
    detector (the ``det_supervised`` recipe). The teacher is evaluated (val mAP) and its encoder exported.

    Choices: the teacher runs in eval mode (its RPN keeps the test-time proposal counts); labeled images get
    flip + photometric jitter; box-jitter std is unbiased (the reference code's ``Tensor.std``).

    Args:
        encoder, encoder_kwargs, img_size, in_chans: the ViT (random init).
        patch_size: patch of the ViT (random init: 8 when None); with ``init_from`` a pretrained encoder's patch
            embedding is resampled to it (None keeps the encoder's own patch).
        num_classes: classes including background (11 for the built-in scenes).
        init_from: start from a pretrained checkpoint / encoder export (any method).
        drop_path_rate: stochastic depth.
        fpn_channels, strides, anchor_sizes, rpn_pre_nms, rpn_post_nms, rpn_batch, roi_batch, representation:
            the detector (:class:`ssl_kit.heads.detection.ViTDetector`).
        unsup_weight: weight of the unsupervised losses (4.0).
        sup_only_epochs: epochs of labeled images only before the pseudo boxes are used (0: the paper trains end
            to end from the first step). A short schedule needs a teacher whose detections can pass
            ``cls_threshold``; the EMA teacher runs throughout, so at the switch it is exactly the supervised
            baseline's teacher at that step.
        initial_score: teacher score for a pseudo-box candidate (0.5).
        cls_threshold: score a pseudo box needs for classification and RPN (0.9, strict).
        reg_threshold: uncertainty below which a pseudo box supervises regression (0.02, strict).
        jitter_times, jitter_scale: box jittering (10, 0.06).
        object_threshold: score above which a candidate is an object for the RPN and never background for the
            classifier, though only those above ``cls_threshold`` teach a class (None: the paper, every candidate
            at or below ``cls_threshold`` is background). For a teacher that finds items but confuses their
            classes (#23: 97 % of its > 0.9 boxes lie on an item, 25-34 % of the items get one).
        ema_decay: teacher momentum cap (0.999).
        burn_in_ema_decay: the cap during the ``sup_only_epochs`` burn-in (None: ``ema_decay``). The burn-in teacher
            only follows a supervised student and is the supervised baseline's teacher when this equals
            ``det_supervised``'s ``ema_decay``; the pseudo boxes then come from a teacher averaged at ``ema_decay``.
        base_lr: AdamW lr per 256 LABELED images; head_lr_scale: lr multiplier of pyramid + RPN + RoI heads.
        layer_decay: ViTDet's layer-wise lr decay of the encoder (timm groups: block i of d at
            ``layer_decay ** (d - 1 - i)`` of the encoder lr, embeddings at ``layer_decay ** d``; 1.0 = off,
            ViTDet: 0.7).
        min_lr, warmup_epochs, weight_decay, betas: schedule and optimiser.
    """

    checkpoint_monitor = ("val_map", "max")

    def __init__(
        self,
        encoder: str = "tiny",
        encoder_kwargs: dict[str, Any] | None = None,
        patch_size: int | None = 8,
        img_size: int = 128,
        in_chans: int = 1,
        num_classes: int = 11,
        init_from: str | None = None,
        drop_path_rate: float = 0.1,
        fpn_channels: int = 128,
        strides: Sequence[int] = (4, 8, 16, 32),
        anchor_sizes: Sequence[int | Sequence[int]] = (16, 32, 64, 128),
        rpn_pre_nms: tuple[int, int] = (1000, 500),
        rpn_post_nms: tuple[int, int] = (500, 200),
        rpn_batch: int = 256,
        roi_batch: int = 128,
        representation: int = 256,
        unsup_weight: float = 4.0,
        sup_only_epochs: int = 0,
        initial_score: float = 0.5,
        cls_threshold: float = 0.9,
        reg_threshold: float = 0.02,
        jitter_times: int = 10,
        jitter_scale: float = 0.06,
        object_threshold: float | None = None,
        ema_decay: float = 0.999,
        burn_in_ema_decay: float | None = None,
        base_lr: float = 0.128,
        head_lr_scale: float = 1.0,
        layer_decay: float = 1.0,
        min_lr: float = 1e-6,
        warmup_epochs: float = 0.1,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_settings(self.hparams)
        require(object_threshold is None or object_threshold <= cls_threshold,
                f"--model.object_threshold {object_threshold} is above --model.cls_threshold {cls_threshold}: the "
                "object pseudo boxes include the confident ones; give a score at most that (or leave it unset).")
        source = pretrained_or_random(init_from, encoder, patch_size or 8, encoder_kwargs)
        resample = {"patch_size": patch_size} if init_from and patch_size else {}
        vit, self.encoder_spec = load_encoder(source, img_size, in_chans, num_classes=0, drop_path_rate=drop_path_rate,
                                              **resample)
        self.student = ViTDetector(vit, num_classes, fpn_channels, strides, anchor_sizes, tuple(rpn_pre_nms),
                                   tuple(rpn_post_nms), rpn_batch, roi_batch, representation)
        self.ema_teacher = make_ema_copy(self.student)
        self.val_map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
        self.val_map_student = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
        self._epoch_pseudo_boxes = 0

    # ------------------------------------------------------------------ contract
    def method_callbacks(self, pictures_dir: Path) -> list[pl.Callback]:
        """Detection pictures (:meth:`detection_panels`), and the EMA teacher."""
        hp = self.hparams
        return [DetectionPictures(pictures_dir), EMATeacher(schedule="inverse", cap=hp.ema_decay,
                                                            burn_in_cap=hp.burn_in_ema_decay,
                                                            burn_in_epochs=hp.sup_only_epochs)]

    def forward(self, images: Tensor) -> list[dict[str, Tensor]]:
        """``[B, C, H, W]`` -> the teacher's detections (``boxes``, ``scores``, ``labels`` per image)."""
        return self.ema_teacher.detect(images)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and getattr(dm, "num_classes", None) not in (None, self.hparams.num_classes):
            raise UserError(f"The data have {dm.num_classes} classes (background included) but the model was built for "
                            f"{self.hparams.num_classes}: pass --model.num_classes {dm.num_classes}.")

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.hparams.img_size, self.hparams.img_size)

    # ------------------------------------------------------------------ pseudo boxes
    @torch.no_grad()
    def pseudo_boxes(self, images: Tensor, features: Features | None = None) -> list[dict[str, Tensor]]:
        """Teacher (eval mode) candidates in the images' own view: ``boxes`` ``[n, 4]``, ``labels``, ``scores`` and
        the box-jitter ``uncertainty`` of every detection with score > ``initial_score``."""
        hp = self.hparams
        self.ema_teacher.eval()
        features = self.ema_teacher.features(images) if features is None else features
        detections = self.ema_teacher.detect_from_features(images, features)
        kept = [{k: v[d["scores"] > hp.initial_score] for k, v in d.items()} for d in detections]
        jittered = [jitter_boxes(d["boxes"], hp.jitter_times, hp.jitter_scale) for d in kept]  # [T, n, 4] each
        refined = self.ema_teacher.refine_boxes(features, [j.reshape(-1, 4) for j in jittered],
                                            [d["labels"].repeat(hp.jitter_times) for d in kept], self.image_size)
        for d, r in zip(kept, refined):
            d["uncertainty"] = box_uncertainty(r.reshape(hp.jitter_times, -1, 4))
        return kept

    def strong_view_targets(self, pseudo: list[dict[str, Tensor]], weak_to_strong: Tensor) -> ViewTargets:
        """Pseudo boxes carried into the student's view, selected for each loss (:class:`ViewTargets`)."""
        hp = self.hparams
        object_threshold = hp.cls_threshold if hp.object_threshold is None else hp.object_threshold
        boxes, kept = map_boxes([p["boxes"] for p in pseudo], weak_to_strong, hp.img_size)
        targets = ViewTargets([], [], [])
        for b, p, k in zip(boxes, pseudo, kept):
            scores = p["scores"][k]
            for selected, keep in ((targets.classification, confident(scores, hp.cls_threshold)),
                                   (targets.regression, reliable(p["uncertainty"][k], hp.reg_threshold)),
                                   (targets.objects, confident(scores, object_threshold))):
                selected.append({"boxes": b[keep], "labels": p["labels"][k][keep]})
        return targets

    # ------------------------------------------------------------------ training
    @property
    def semi_supervised(self) -> bool:
        """Whether this epoch trains on unlabeled images (after the ``sup_only_epochs`` burn-in)."""
        return self.hparams.unsup_weight > 0 and self.current_epoch >= self.hparams.sup_only_epochs

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        images, targets = batch["labeled"]
        unlabeled = batch.get("unlabeled") if self.semi_supervised else None
        loss, logs = self.mean_over_draw_groups("step", self.step_losses, images, targets, unlabeled)
        if "pseudo_boxes" in logs:
            self._epoch_pseudo_boxes += int(round(float(logs.pop("pseudo_boxes")) * self._draw_groups()))
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=len(images))
        return self.report_loss(loss, len(images))

    def _draw_groups(self) -> int:
        return getattr(getattr(self.trainer, "datamodule", None), "draw_groups", 1)

    def step_losses(self, images: Tensor, targets: Targets,
                    views: dict[str, Tensor] | None) -> tuple[Tensor, dict[str, Tensor | float]]:
        """The loss of one device batch (normalisers, proposal sampling and pseudo boxes are per device, as in
        the reference): ``(loss, logs)``."""
        if views is None:
            losses = self.student.supervised_losses(images, self.student.features(images), targets)
            loss = sum(losses.values())
            return loss, {"loss_sup": loss.detach(), **{f"sup_{k}": v.detach() for k, v in losses.items()}}

        n_l = len(images)
        with torch.no_grad():
            self.ema_teacher.eval()
            teacher_features = self.ema_teacher.features(views["weak"])
            pseudo = self.pseudo_boxes(views["weak"], teacher_features)
        targets_u = self.strong_view_targets(pseudo, views["weak_to_strong"])

        features = self.student.features(torch.cat([images, views["strong"]]))
        labeled_features, unlabeled_features = split_features(features, n_l)
        sup_losses = self.student.supervised_losses(images, labeled_features, targets)
        unsup_losses, info = self.unsupervised_losses(views, unlabeled_features, teacher_features, targets_u)
        sup, unsup = sum(sup_losses.values()), sum(unsup_losses.values())
        loss = sup + self.hparams.unsup_weight * unsup

        n_u = len(pseudo)
        confident_boxes = sum(len(t["boxes"]) for t in targets_u.classification)
        return loss, {
            "loss_sup": sup.detach(), "loss_unsup": unsup.detach(),
            **{f"unsup_{k}": v.detach() for k, v in unsup_losses.items()},
            "pseudo_boxes": confident_boxes,
            "pseudo_boxes_per_image": confident_boxes / n_u,
            "candidate_boxes_per_image": sum(len(p["boxes"]) for p in pseudo) / n_u,
            "reliable_boxes_per_image": sum(len(t["boxes"]) for t in targets_u.regression) / n_u,
            "object_boxes_per_image": sum(len(t["boxes"]) for t in targets_u.objects) / n_u,
            **info,
        }

    def unsupervised_losses(self, views: dict[str, Tensor], features: Features, teacher_features: Features,
                            targets: ViewTargets) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Student losses on the strong view: the RPN on the object pseudo boxes, soft-teacher classification on
        the confident ones (proposals on objects of unknown class are not background), box regression on the
        reliable ones."""
        student = self.student
        image_list = student.image_list(views["strong"])
        proposals, rpn_losses = student.rpn(image_list, features, targets.objects)

        sampled, _, labels, _ = student.roi_heads.select_training_samples(proposals, targets.classification)
        class_logits, _ = student.classify_boxes(features, sampled, self.image_size)
        to_weak = torch.linalg.inv(views["weak_to_strong"])
        in_weak = [clip_and_keep(transform_boxes(b, m), self.hparams.img_size, 0.0)[0] for b, m in zip(sampled, to_weak)]
        with torch.no_grad():
            teacher_logits, _ = self.ema_teacher.classify_boxes(teacher_features, in_weak, self.image_size)
        background_prob = teacher_logits.softmax(dim=-1)[:, 0]
        on_unknown = torch.cat([self.on_unknown_objects(b, l, o) for b, l, o in zip(sampled, labels, targets.objects)])
        background_prob = background_prob.masked_fill(on_unknown, 0.0)
        labels = torch.cat(labels)
        loss_cls = soft_background_ce(class_logits, labels, background_prob)

        sampled, _, reg_labels, reg_values = student.roi_heads.select_training_samples(proposals, targets.regression)
        reg_logits, box_deltas = student.classify_boxes(features, sampled, self.image_size)
        _, loss_box = fastrcnn_loss(reg_logits, box_deltas, reg_labels, reg_values)
        losses = {"loss_objectness": rpn_losses["loss_objectness"], "loss_rpn_box_reg": rpn_losses["loss_rpn_box_reg"],
                  "loss_classifier": loss_cls, "loss_box_reg": loss_box}
        background = labels == 0
        info = {"background_weight_mean": background_prob[background].mean() if background.any() else torch.ones(()),
                "unknown_object_proposals": on_unknown.float().mean()}
        return losses, info

    def on_unknown_objects(self, proposals: Tensor, labels: Tensor, objects: dict[str, Tensor]) -> Tensor:
        """``[P]`` bool: background proposals of one image that the RoI heads' matcher would assign to an object
        pseudo box (IoU >= its fg threshold), i.e. proposals on an object whose class the teacher is unsure of."""
        matched = labels == 0
        if self.hparams.object_threshold is None or len(objects["boxes"]) == 0:  # None: objects are the class boxes
            return torch.zeros_like(matched)
        iou = box_iou(proposals, objects["boxes"]).max(dim=1).values
        return matched & (iou >= self.student.roi_heads.proposal_matcher.high_threshold)

    def on_train_epoch_start(self) -> None:
        self._epoch_pseudo_boxes = 0

    def on_train_epoch_end(self) -> None:
        if self.semi_supervised and self._epoch_pseudo_boxes == 0:
            log.warning("Epoch %d: no teacher detection passed --model.cls_threshold %.2f, so the unlabeled images only "
                        "taught 'background'. This is expected early from a random init; if it persists, train longer "
                        "or start from a pretrained encoder (--model.init_from).", self.current_epoch,
                        self.hparams.cls_threshold)

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: tuple[Tensor, Targets], batch_idx: int) -> None:
        """COCO mAP of the teacher (``val_map``, the exported model) and of the student (``val_map_student``) on
        every detection they make (score threshold 0)."""
        images, targets = batch
        self.val_map.update(self(images), targets)
        self.val_map_student.update(self.student.detect(images), targets)

    def on_validation_epoch_end(self) -> None:
        teacher, student = self.val_map.compute(), self.val_map_student.compute()
        self.log_dict({"val_map": teacher["map"], "val_map50": teacher["map_50"]}, prog_bar=True, sync_dist=False)
        self.log_dict({"val_map_student": student["map"], "val_map50_student": student["map_50"]}, sync_dist=False)
        self.val_map.reset()
        self.val_map_student.reset()

    @torch.no_grad()
    def detection_panels(self, images: Tensor) -> dict[str, list[dict[str, Tensor]]]:
        """For pictures: the teacher's pseudo-box candidates (with score and uncertainty) and the student's
        detections for ``[B, C, H, W]`` images."""
        with eval_mode(self.ema_teacher):  # pseudo_boxes puts the teacher in eval mode, as in training
            return {"teacher": self.pseudo_boxes(images), "student": self.student.detect(images)}

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW: the encoder at ``base_lr`` (scaled by the batch) with layer decay, the pyramid and heads at
        ``head_lr_scale`` times it."""
        hp, student = self.hparams, self.student
        groups = encoder_and_head_groups(student.encoder, {"pyramid": student.pyramid, "rpn": student.rpn,
                                                           "roi_heads": student.roi_heads},
                                         hp.weight_decay, hp.layer_decay, hp.head_lr_scale)
        return self.scheduled_adamw(groups)
