"""U2PL: semi-supervised semantic segmentation with unreliable pseudo labels (Wang et al. CVPR 2022),
METHODS.md section 6, on the shared ViT with a progressive upsampling head."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassJaccardIndex

from ssl_kit.data.augment import apply_cutmix, cutmix_masks
from ssl_kit.errors import UserError
from ssl_kit.callbacks import ValidationPictures
from ssl_kit.encoders import load_encoder
from ssl_kit.heads.segmentation import HeadNorm, ProgressiveUpsamplingHead, SegmentationNet
from ssl_kit.losses.u2pl import (
    IGNORE, ClassMemoryBank, contrastive_loss, entropy_masks, foreground_share, negative_candidates,
    pixel_entropy, push_negatives, unreliable_percent, unsupervised_ce,
)
from ssl_kit.methods.base import StudentTeacherMethod
from ssl_kit.methods.classifier import encoder_and_head_groups, pretrained_or_random
from ssl_kit.optim import linear_ramp, steps_per_epoch
from ssl_kit.runtime import eval_mode
from ssl_kit.teacher import EMATeacher, make_ema_copy
from ssl_kit.validation import check_settings, require
from ssl_kit.viz import save_segmentation_grid


def downsample_nearest(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """``[B, H, W]`` label / bool map -> ``[B, h, w]`` (nearest), dtype kept."""
    return F.interpolate(maps[:, None].float(), size=size, mode="nearest")[:, 0].to(maps.dtype)


class SegmentationPictures(ValidationPictures):
    """``segmentation_epoch_NNN.png``: validation images with their ground truth and what the method's teacher
    makes of them (``reliability_maps``): pseudo label, entropy, reliable mask."""

    name = "segmentation"

    def save_picture(self, dm: pl.LightningDataModule, pl_module: pl.LightningModule, samples: list, path: Path) -> None:
        images, masks = dm.on_after_batch_transfer(
            (torch.stack([s[0] for s in samples]).to(pl_module.device), torch.stack([torch.as_tensor(s[1]) for s in samples])),
            0)
        maps = pl_module.reliability_maps(images)
        save_segmentation_grid(images, masks, maps["pseudo"], maps["entropy"], maps["reliable"], path, dm.mean, dm.std,
                               pl_module.hparams.num_classes, pl_module.current_alpha())


class U2PL(StudentTeacherMethod):
    """Student = ViT + segmentation head, trained on labeled images (CE) and on CutMix-ed unlabeled images
    with the EMA teacher's pseudo labels: CE on reliable pixels (entropy below the ``100 - alpha_t``
    percentile, ``alpha_t = alpha0 (1 - epoch / E)``) + ``contrastive_weight`` x the contrastive loss whose
    negatives are unreliable pixels (memory bank per class). The teacher (EMA, ``min(1 - 1/(i+1), ema_decay)``
    counted from the end of the ``sup_only_epochs`` warm-up) makes the pseudo labels, is evaluated (val mIoU)
    and its encoder is exported. With ``unsup_weight 0`` and ``contrastive_weight 0`` it is supervised-only
    training of the same model (the ``seg_supervised`` recipe).

    Batches come from :class:`ssl_kit.data.SegmentationDataModule`.

    Choices (documented in METHODS.md terms):
        * unsupervised CE normalisation: ``paper`` (sum over reliable pixels / all valid pixels) by
          default, ``authors`` for the reference code's rescaling;
        * negatives follow the paper (labeled: top-3 but not the label; unlabeled: unreliable pixels where c
          ranks 3..20), see :func:`ssl_kit.losses.u2pl.negative_candidates`;
        * CutMix is drawn per image with ``cutmix_prob`` (the reference code draws once per batch);
        * the teacher runs in eval mode for both its forwards.

    Same training on any number of processes: what the reference computes per device (CutMix partners, the
    entropy percentile, anchor / negative sampling, the loss normalisers) is computed per draw group
    (``--data.draw_group_size``; unset = one group per device, the reference's behaviour), and the losses are
    averaged over groups as DDP averages devices; the memory bank receives every group's negatives, in group
    order, before any group's contrastive loss. The head's norm must not cross images for this:
    ``head_norm layer`` (BatchNorm statistics are per device batch; SyncBatchNorm needs a GPU).

    Args:
        encoder, encoder_kwargs, img_size, in_chans: the ViT (random init).
        patch_size: patch of the ViT (random init: 4 when None); with ``init_from`` a pretrained encoder's patch
            embedding is resampled to it (timm's resampling; None keeps the encoder's own patch).
        num_classes: K, background included (11 for the built-in scenes).
        init_from: start from a pretrained checkpoint / encoder export (any method).
        drop_path_rate: stochastic depth.
        head_dim, rep_dim, num_upsample: segmentation head.
        head_norm: ``batch`` (BatchNorm, as the reference) or ``layer`` (per-pixel LayerNorm: no statistic
            crosses images, so 1 and N processes train alike).
        head_dropout: dropout before the head's classifier (drawn per process, like stochastic depth).
        sup_only_epochs: supervised warm-up epochs (teacher copies the student meanwhile).
        unsup_weight, contrastive_weight: loss weights (1.0, 0.1).
        unsup_ramp_epochs: after the warm-up both weights rise linearly from ~0 to their value over this many
            epochs (optimizer steps counted, so resume continues the ramp); 0 = full weight at once, the paper
            (not in U2PL; as MPL's ``uda_ramp_epochs``).
        alpha0: unreliable percentage at epoch 0 (20).
        unreliable_ranking: ``batch`` ranks the entropy of all valid unlabeled pixels of the device batch (the
            paper); ``class`` ranks within each pseudo class, so background cannot push the objects out
            (not the paper's; ``unreliable_foreground_share`` logs what ``batch`` drops).
        unsup_normalisation: ``paper`` or ``authors``.
        cutmix_prob: CutMix probability per unlabeled image (0.5).
        num_anchors, num_negatives, temperature, anchor_threshold, low_rank, high_rank: contrastive loss
            (256, 50, 0.5, 0.3, 3, 20).
        memory_size: negative keys kept per class.
        ema_decay: teacher momentum cap (0.99).
        base_lr: AdamW lr per 256 LABELED images; head_lr_scale: lr multiplier of the head (10 in U2PL).
        layer_decay: ViT layer-wise lr decay of the encoder (timm groups, as ViTDet / BEiT fine-tune segmenters);
            1.0 = one lr for the whole backbone, as U2PL's ResNet.
        min_lr, warmup_epochs, weight_decay, betas: schedule and optimiser.
    """

    checkpoint_monitor = ("val_miou", "max")

    def __init__(
        self,
        encoder: str = "tiny",
        encoder_kwargs: dict[str, Any] | None = None,
        patch_size: int | None = 4,
        img_size: int = 64,
        in_chans: int = 1,
        num_classes: int = 11,
        init_from: str | None = None,
        drop_path_rate: float = 0.1,
        head_dim: int = 128,
        rep_dim: int = 256,
        num_upsample: int = 1,
        head_norm: HeadNorm = "batch",
        head_dropout: float = 0.1,
        sup_only_epochs: int = 1,
        unsup_weight: float = 1.0,
        contrastive_weight: float = 0.1,
        unsup_ramp_epochs: float = 0.0,
        alpha0: float = 20.0,
        unreliable_ranking: Literal["batch", "class"] = "batch",
        unsup_normalisation: Literal["paper", "authors"] = "paper",
        cutmix_prob: float = 0.5,
        num_anchors: int = 256,
        num_negatives: int = 50,
        temperature: float = 0.5,
        anchor_threshold: float = 0.3,
        low_rank: int = 3,
        high_rank: int = 20,
        memory_size: int = 2048,
        ema_decay: float = 0.99,
        base_lr: float = 5e-3,
        head_lr_scale: float = 10.0,
        layer_decay: float = 1.0,
        min_lr: float = 1e-6,
        warmup_epochs: float = 1.0,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        super().__init__()
        if unsup_normalisation not in ("paper", "authors"):
            raise UserError(f"--model.unsup_normalisation must be paper or authors, got {unsup_normalisation!r}.")
        if unreliable_ranking not in ("batch", "class"):
            raise UserError(f"--model.unreliable_ranking must be batch or class, got {unreliable_ranking!r}.")
        if head_norm not in ("batch", "layer"):
            raise UserError(f"--model.head_norm must be batch or layer, got {head_norm!r}.")
        self.save_hyperparameters()
        check_settings(self.hparams)
        require(1 <= low_rank < min(high_rank, num_classes),
                f"--model.low_rank {low_rank} must be >= 1 and below both --model.high_rank {high_rank} and "
                f"--model.num_classes {num_classes} (the paper: 3 and 20 of 21 classes; high_rank is capped at the "
                "classes).")
        source = pretrained_or_random(init_from, encoder, patch_size or 4, encoder_kwargs)
        resample = {"patch_size": patch_size} if init_from and patch_size else {}
        vit, self.encoder_spec = load_encoder(source, img_size, in_chans, num_classes=0, drop_path_rate=drop_path_rate,
                                              **resample)
        # without a contrastive loss (seg_supervised) the representation branch would cost a third of the step
        # for a zero-weighted output and the memory bank a third of each checkpoint, so neither is built
        contrastive = contrastive_weight > 0
        head = ProgressiveUpsamplingHead(vit.embed_dim, num_classes, head_dim, rep_dim, num_upsample, head_dropout,
                                         head_norm, representation=contrastive)
        self.student = SegmentationNet(vit, head)
        self.ema_teacher = make_ema_copy(self.student)
        self.memory_bank = ClassMemoryBank(num_classes, memory_size, rep_dim) if contrastive else None
        self.val_miou = MulticlassJaccardIndex(num_classes, average="macro", ignore_index=IGNORE)

    # ------------------------------------------------------------------ contract
    def method_callbacks(self, pictures_dir: Path) -> list[pl.Callback]:
        """Segmentation pictures (:meth:`reliability_maps`), and the EMA teacher, started after the warm-up."""
        return [SegmentationPictures(pictures_dir),
                EMATeacher(schedule="inverse", cap=self.hparams.ema_decay, start_epoch=self.hparams.sup_only_epochs)]

    def forward(self, images: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> teacher logits ``[B, K, H, W]``."""
        return self.ema_teacher(images).logits

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and getattr(dm, "num_classes", None) not in (None, self.hparams.num_classes):
            raise UserError(f"The masks have {dm.num_classes} classes but the model was built for "
                            f"{self.hparams.num_classes}: pass --model.num_classes {dm.num_classes}.")

    @property
    def semi_supervised(self) -> bool:
        hp = self.hparams
        return (hp.unsup_weight > 0 or hp.contrastive_weight > 0) and self.current_epoch >= hp.sup_only_epochs

    def unsup_ramp(self) -> float:
        """Factor in (0, 1] on the unsupervised and contrastive weights at this step: ``(s + 1) / R`` for the s-th
        step after the warm-up and R = ``unsup_ramp_epochs`` epochs of steps, 1 from then on (and without a ramp)."""
        hp = self.hparams
        if hp.unsup_ramp_epochs <= 0 or self._trainer is None:
            return 1.0
        since_warmup = self.global_step - hp.sup_only_epochs * steps_per_epoch(self.trainer)
        return linear_ramp(max(since_warmup, 0), hp.unsup_ramp_epochs, self.trainer)

    def current_alpha(self) -> float:
        """alpha_t in percent for the current epoch."""
        return unreliable_percent(self.current_epoch, self.trainer.max_epochs if self._trainer else 1, self.hparams.alpha0)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        hp = self.hparams
        images, labels = batch["labeled"]
        n_l = len(images)
        if not self.semi_supervised or "unlabeled" not in batch:
            out = self.student(images)
            loss, logs = self.mean_over_draw_groups("u2pl_supervised", self._supervised_loss, out.logits, labels)
            self.log_dict(logs, on_step=True, on_epoch=False, batch_size=n_l)
            # the representation head joins the graph with zero weight, so plain DDP sees every parameter used
            return self.report_loss(loss if out.rep is None else loss + 0.0 * out.rep.sum(), n_l)

        self.ema_teacher.eval()
        with torch.no_grad():
            pseudo = self.ema_teacher(batch["unlabeled"]).logits.argmax(dim=1)
        strong, pseudo = self.random_draw("cutmix", self._cutmix, batch["unlabeled"], pseudo)

        inputs = torch.cat([images, strong])
        out = self.student(inputs)
        with torch.no_grad():
            out_t = self.ema_teacher(inputs)
        alpha = self.current_alpha()
        # labeled / unlabeled halves as dicts, so that draw groups cut each half into its own rows
        lab: dict[str, Tensor] = {"logits": out.logits[:n_l], "labels": labels}
        unl: dict[str, Tensor] = {"logits": out.logits[n_l:], "pseudo": pseudo}
        entropy = pixel_entropy(out_t.logits[n_l:].softmax(dim=1))
        per_class = hp.unreliable_ranking == "class"
        unl["unreliable"], unl["reliable_anchor"] = self.random_draw(
            "entropy_rank", lambda e, v, p: entropy_masks(e, v, alpha, p if per_class else None),
            entropy, pseudo != IGNORE, pseudo)
        if hp.contrastive_weight > 0:
            for part, rows in ((lab, slice(0, n_l)), (unl, slice(n_l, None))):
                part.update(rep=out.rep[rows], rep_t=out_t.rep[rows], probs_low=out_t.logits_low[rows].softmax(dim=1))
            push_negatives(self.memory_bank, *self.random_draw("negatives", self._negatives, lab, unl))
        ramp = self.unsup_ramp()
        loss, logs = self.mean_over_draw_groups("u2pl", partial(self._semi_loss, ramp=ramp), lab, unl)
        self.log_dict({**logs, "unreliable_percent": alpha, "unsup_ramp": ramp}, on_step=True, on_epoch=False,
                      batch_size=n_l)
        return self.report_loss(loss, n_l)

    # Each of the following sees one draw group (one device batch in the reference).
    @staticmethod
    def _supervised_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE)
        return loss, {"loss_sup": loss.detach()}

    def _cutmix(self, unlabeled: Tensor, pseudo: Tensor) -> tuple[Tensor, Tensor]:
        """CutMix boxes from the group's stream; each image's partner is the next image of its group."""
        mix = cutmix_masks(len(pseudo), *pseudo.shape[-2:], self.hparams.cutmix_prob, pseudo.device)
        strong, mixed = apply_cutmix(mix, unlabeled, pseudo)
        return strong, mixed

    def _small_maps(self, lab: dict[str, Tensor], unl: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Labels / pseudo labels, anchor region and unreliable mask of ``[labeled; unlabeled]`` at the
        representation resolution, ``[B, h, w]`` each."""
        size = tuple(lab["rep"].shape[-2:])
        labels_small = downsample_nearest(torch.cat([lab["labels"], unl["pseudo"]]), size)
        anchor_region = downsample_nearest(torch.cat([lab["labels"] != IGNORE, unl["reliable_anchor"]]), size)
        unreliable = downsample_nearest(torch.cat([torch.zeros_like(lab["labels"], dtype=torch.bool), unl["unreliable"]]),
                                        size)
        return labels_small, anchor_region, unreliable

    def _negatives(self, lab: dict[str, Tensor], unl: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Teacher features ``[B, D, h, w]`` and negative candidates ``[B, K, h, w]`` of ``[labeled; unlabeled]``."""
        labels_small, _, unreliable = self._small_maps(lab, unl)
        probs = torch.cat([lab["probs_low"], unl["probs_low"]])
        negatives = negative_candidates(probs, labels_small, unreliable, len(lab["labels"]), self.hparams.low_rank,
                                        self.hparams.high_rank)
        return torch.cat([lab["rep_t"], unl["rep_t"]]), negatives

    def _semi_loss(self, lab: dict[str, Tensor], unl: dict[str, Tensor], ramp: float = 1.0) -> tuple[Tensor, dict[str, Any]]:
        """Supervised CE + ``ramp`` x (unsupervised CE on reliable pixels (+ contrastive)) of one group, and its logs."""
        hp = self.hparams
        sup = F.cross_entropy(lab["logits"], lab["labels"], ignore_index=IGNORE)
        unsup = unsupervised_ce(unl["logits"], unl["pseudo"], ~unl["unreliable"], hp.unsup_normalisation)
        loss = sup + ramp * hp.unsup_weight * unsup
        valid = unl["pseudo"] != IGNORE
        logs: dict[str, Any] = {
            "loss_sup": sup.detach(), "loss_unsup": unsup.detach(),
            "pseudo_foreground_fraction": (unl["pseudo"][valid] > 0).float().mean(),
            # what the batch-wide entropy percentile drops: the share of the unreliable pixels that are objects
            "unreliable_foreground_share": foreground_share(unl["unreliable"], unl["pseudo"]),
        }
        if hp.contrastive_weight > 0:
            labels_small, anchor_region, _ = self._small_maps(lab, unl)
            contra, info = contrastive_loss(
                torch.cat([lab["rep"], unl["rep"]]), torch.cat([lab["rep_t"], unl["rep_t"]]),
                torch.cat([lab["probs_low"], unl["probs_low"]]), labels_small, anchor_region, self.memory_bank,
                hp.num_anchors, hp.num_negatives, hp.temperature, hp.anchor_threshold)
            loss = loss + ramp * hp.contrastive_weight * contra
            logs.update(loss_contrastive=contra.detach(), **info)
        return loss, logs

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints of supervised-only runs written before the representation branch and the memory bank were
        left out when unused carry them; they are dropped so those runs still resume and evaluate."""
        if self.memory_bank is None:
            state = checkpoint.get("state_dict", {})
            for key in [k for k in state if ".head.representation." in k or k.startswith("memory_bank.")]:
                del state[key]

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, masks = batch
        self.val_miou.update(self(images).argmax(dim=1), masks)

    def on_validation_epoch_end(self) -> None:
        self.log("val_miou", self.val_miou.compute(), prog_bar=True, sync_dist=False)
        self.val_miou.reset()

    @torch.no_grad()
    def reliability_maps(self, images: Tensor) -> dict[str, Tensor]:
        """What the unsupervised loss would see for these images (teacher, eval mode): pseudo labels, entropy and
        the reliable mask at the current alpha_t. ``[B, C, H, W]`` -> ``[B, H, W]`` maps."""
        with eval_mode(self.ema_teacher):
            probs = self.ema_teacher(images).logits.softmax(dim=1)
        entropy, pseudo = pixel_entropy(probs), probs.argmax(dim=1)
        per_class = pseudo if self.hparams.unreliable_ranking == "class" else None
        unreliable, _ = entropy_masks(entropy, torch.ones_like(entropy, dtype=torch.bool), self.current_alpha(), per_class)
        return {"pseudo": pseudo, "entropy": entropy, "reliable": ~unreliable}

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = encoder_and_head_groups(self.student.encoder, {"head": self.student.head}, hp.weight_decay,
                                         hp.layer_decay, hp.head_lr_scale)
        return self.scheduled_adamw(groups)
