"""iBOT: masked image modelling with an online tokenizer (Zhou et al. 2022), METHODS.md section 3."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from timm.models.vision_transformer import VisionTransformer

from ssl_kit.callbacks import ReconstructionPictures
from ssl_kit.encoders import ENCODER_INITS, EncoderSpec, block_mask, build_random_encoder, random_count_mask
from ssl_kit.heads.projection import IBOTHead
from ssl_kit.losses.distillation import IBOTLoss, teacher_entropies
from ssl_kit.methods.base import SSLMethod
from ssl_kit.optim import cosine_schedule
from ssl_kit.teacher import EMATeacher, make_ema_copy
from ssl_kit.validation import check_settings, require

log = logging.getLogger("ssl_kit")

# epoch means of the teacher's normalised [CLS] entropies (``teacher_entropies``) beyond which the run warns of a
# collapse: the short recipe's teacher (temperature 0.07) ended its 175- and 700-step runs at 0.99 per image (its
# [CLS] loss 6.90 of log K 6.93 from the first epoch at 0.07 on), with its k-NN flat from there
UNIFORM_COLLAPSE_ENTROPY = 0.9
ONE_PROTOTYPE_ENTROPY = 0.1


def teacher_temperature(epoch: int, warmup_epochs: int, start: float, end: float) -> float:
    """iBOT teacher temperature: ``linspace(start, end, warmup_epochs)[epoch]``, then ``end``."""
    if epoch >= warmup_epochs:
        return end
    if warmup_epochs <= 1:
        return start
    return start + (end - start) * epoch / (warmup_epochs - 1)


class IBOT(SSLMethod):
    """Self-distillation on [CLS] (across views) and masked patch tokens (within a view), EMA teacher.

    The teacher (encoder + head, updated after every optimizer step by the :class:`ssl_kit.teacher.EMATeacher`
    this method brings, cosine momentum ``teacher_momentum`` -> ``teacher_momentum_final``) sees the two UNMASKED
    global crops; the student sees
    the two global crops with masks (masked patch embeddings replaced by a learned embedding
    before [CLS] and position embeddings are added) plus the local crops. The teacher encoder is
    what gets exported and evaluated. Batches come from :class:`ssl_kit.data.MultiCropDataModule`.

    Args:
        encoder, img_size, patch_size, in_chans, encoder_kwargs: the shared ViT (learned position
            embedding, interpolated for local crops).
        drop_path_rate: student stochastic depth (the teacher runs without).
        out_dim: prototypes K (8192 in the paper).
        hidden_dim, bottleneck_dim: head MLP widths (2048, 256 in the paper).
        norm_last_layer: fix the last layer's weight-norm magnitude.
        mask_mode: ``block`` (BEiT) or ``random``.
        mask_prob: probability that a global crop is masked at all (0.5).
        mask_ratio: range of the masked fraction, sampled uniformly per crop ((0.1, 0.5)).
        min_block: minimum block area in patches for block masking (16).
        student_temp: 0.1.
        teacher_temp, teacher_temp2: final [CLS] / patch teacher temperatures (0.07).
        warmup_teacher_temp, warmup_teacher_temp2: start temperatures (0.04).
        warmup_teacher_temp_epochs: linear temperature warmup length in epochs (30).
        center_momentum, center_momentum2: center EMA (0.9).
        teacher_momentum, teacher_momentum_final: the teacher's EMA momentum, cosine from the first to the
            second over the run (0.996 -> 1).
        base_lr: lr per 256 images (5e-4). min_lr: cosine floor (1e-6). warmup_epochs: lr warmup (10).
        weight_decay, weight_decay_end: cosine weight-decay schedule per step (0.04 -> 0.4).
        betas: AdamW betas.
        freeze_last_layer_epochs: epochs during which the head's last layer gets no update (1).
        readout: the feature evaluated by default: ``cls`` (the paper's k-NN and linear probe).
        encoder_init: ``timm`` (the paper's: trunc-normal(0.02) weights, a learned position embedding) or ``mae``
            (xavier-uniform weights and a fixed 2-D sin-cos position table, as MAE and MoCo v3).
        norm_in_head: ``none`` (the paper's ViT setting) or ``bn``: batch norm in the head's MLP (the reference
            code's ``--norm_in_head``; the teacher's head normalises with the batch's statistics too).
    """

    encoder_init = "timm"  # the default; an instance records the one it was built with

    def __init__(
        self,
        encoder: str = "tiny",
        img_size: int = 32,
        patch_size: int = 4,
        in_chans: int = 3,
        encoder_kwargs: dict[str, Any] | None = None,
        drop_path_rate: float = 0.1,
        out_dim: int = 8192,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
        mask_mode: Literal["block", "random"] = "block",
        mask_prob: float = 0.5,
        mask_ratio: tuple[float, float] = (0.1, 0.5),
        min_block: int = 16,
        student_temp: float = 0.1,
        teacher_temp: float = 0.07,
        teacher_temp2: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp2: float = 0.04,
        warmup_teacher_temp_epochs: int = 30,
        center_momentum: float = 0.9,
        center_momentum2: float = 0.9,
        teacher_momentum: float = 0.996,
        teacher_momentum_final: float = 1.0,
        base_lr: float = 5e-4,
        min_lr: float = 1e-6,
        warmup_epochs: float = 10,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        betas: tuple[float, float] = (0.9, 0.999),
        freeze_last_layer_epochs: int = 1,
        readout: Literal["cls", "avgpool"] = "cls",
        encoder_init: Literal["timm", "mae"] = "timm",
        norm_in_head: Literal["none", "bn"] = "none",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_settings(self.hparams)
        self.check_readout(readout)
        low, high = mask_ratio
        require(0.0 <= low <= high < 1.0, f"--model.mask_ratio must be [min, max] fractions of masked patches with "
                f"0 <= min <= max < 1 (the paper: [0.1, 0.5]), got {list(mask_ratio)}.")
        spec = self.make_encoder_spec(encoder, img_size, patch_size, in_chans,
                                      dict(encoder_kwargs or {}, dynamic_img_size=True))
        require(encoder_init in ENCODER_INITS, f"--model.encoder_init must be one of {', '.join(ENCODER_INITS)} "
                f"(timm: the paper's trunc-normal init; mae: xavier and a fixed sin-cos table), got {encoder_init!r}.")
        self.encoder_init = encoder_init
        student_spec = EncoderSpec(spec.timm_name, dict(spec.kwargs, drop_path_rate=drop_path_rate))
        self.encoder = build_random_encoder(student_spec, encoder_init)  # the init the random baseline rebuilds
        self.encoder_spec = EncoderSpec(spec.timm_name, dict(spec.kwargs, drop_path_rate=0.0))  # what is exported
        dim = self.encoder.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        require(norm_in_head in ("none", "bn"), f"--model.norm_in_head must be none or bn, got {norm_in_head!r}.")
        self.head = IBOTHead(dim, out_dim, hidden_dim, bottleneck_dim, norm_last_layer, norm_in_head)
        self.ema_teacher = make_ema_copy(self.encoder).eval()  # eval from the start: Lightning need not call train()
        self.ema_teacher_head = make_ema_copy(self.head)  # train mode with the student: see train()
        self.criterion = IBOTLoss(out_dim, student_temp, center_momentum, center_momentum2)
        self.grid: tuple[int, int] = tuple(self.encoder.patch_embed.grid_size)  # type: ignore[assignment]
        self.entropy_sums = torch.zeros(3)  # this epoch's teacher entropies (per image, marginal) and steps

    # ------------------------------------------------------------------ structure
    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.ema_teacher), (self.head, self.ema_teacher_head)]

    def export_module(self) -> VisionTransformer:
        return self.ema_teacher

    def train(self, mode: bool = True) -> "IBOT":
        """The teacher encoder always runs in eval mode (no drop-path); its head follows ``mode``, so that batch
        norms in it (``norm_in_head bn``) use the batch's statistics while training, as the reference's teacher."""
        super().train(mode)
        self.ema_teacher.eval()
        self.ema_teacher_head.train(mode)
        return self

    # ------------------------------------------------------------------ masks and encoding
    def sample_masks(self, num_views: int, batch: int, device: torch.device) -> Tensor:
        """``[G, B, L]`` bool: per crop, with prob ``mask_prob`` a mask of ratio ~ U(mask_ratio), else none."""
        hp = self.hparams
        length = self.grid[0] * self.grid[1]
        masks = torch.zeros(num_views, batch, length, dtype=torch.bool)
        low, high = hp.mask_ratio
        for g in range(num_views):
            for b in range(batch):
                if float(torch.rand(())) >= hp.mask_prob:
                    continue
                count = int((low + (high - low) * float(torch.rand(()))) * length)
                if hp.mask_mode == "block":
                    masks[g, b] = block_mask(self.grid, count, min_block=hp.min_block).flatten()
                else:
                    masks[g, b] = random_count_mask(self.grid, count).flatten()
        return masks.to(device)

    def encode(self, encoder: VisionTransformer, images: Tensor, mask: Tensor | None = None) -> Tensor:
        """Tokens after the final norm, masked patches replaced BEFORE [CLS] / position embeddings.

        Args:
            images: ``[B, C, H, W]`` (global or local crop size).
            mask: ``[B, L]`` bool or None.

        Returns:
            ``[B, 1 + L, D]``.
        """
        x = encoder.patch_embed(images)  # [B, h, w, D] (dynamic_img_size)
        if mask is not None:
            x = torch.where(mask.view(*x.shape[:3], 1), self.mask_token.to(x.dtype), x)
        x = encoder.norm_pre(encoder.patch_drop(encoder._pos_embed(x)))  # pos-embed resampled for local crops
        return encoder.norm(encoder.blocks(x))

    def teacher_temperatures(self) -> tuple[float, float]:
        hp = self.hparams
        epoch = self.current_epoch
        return (teacher_temperature(epoch, hp.warmup_teacher_temp_epochs, hp.warmup_teacher_temp, hp.teacher_temp),
                teacher_temperature(epoch, hp.warmup_teacher_temp_epochs, hp.warmup_teacher_temp2, hp.teacher_temp2))

    def forward(self, views: list[Tensor], masks: Tensor | None = None) -> dict[str, Tensor]:
        """One iBOT step's losses.

        Args:
            views: 2 global ``[B, C, H, W]`` + n local crops.
            masks: ``[2, B, L]`` bool (sampled when None).

        Returns:
            dict with ``loss``, ``cls_loss``, ``patch_loss`` and the teacher logits (for the centers).
        """
        g, b = 2, views[0].shape[0]
        if masks is None:  # drawn per image group: [B, G, L] while drawing, [G, B, L] after
            masks = self.random_draw("mask", lambda n: self.sample_masks(g, n, views[0].device).transpose(0, 1),
                              rows=b).transpose(0, 1).contiguous()
        length = masks.shape[-1]
        global_images = torch.cat(views[:g])
        with torch.no_grad():
            t = self.ema_teacher_head(self.encode(self.ema_teacher, global_images))  # unmasked, [G*B, 1+L, K]
        teacher_cls, teacher_patch = t[:, 0].view(g, b, -1), t[:, 1:].view(g, b, length, -1)
        s = self.head(self.encode(self.encoder, global_images, masks.view(g * b, length)))
        student_cls = [s[:, 0].view(g, b, -1)]
        if len(views) > g:
            local = self.encode(self.encoder, torch.cat(views[g:]))[:, 0]
            student_cls.append(self.head(local).view(len(views) - g, b, -1))
        tau, tau2 = self.teacher_temperatures()
        cls_loss, patch_loss = self.criterion(torch.cat(student_cls), s[:, 1:].view(g, b, length, -1), teacher_cls,
                                              teacher_patch, masks, tau, tau2)
        return {"loss": cls_loss + patch_loss, "cls_loss": cls_loss, "patch_loss": patch_loss,
                "teacher_cls": teacher_cls, "teacher_patch": teacher_patch}

    # ------------------------------------------------------------------ training
    def training_step(self, batch: tuple[list[Tensor], Tensor], batch_idx: int) -> Tensor:
        views = batch[0]
        out = self(views)
        b = views[0].shape[0]
        loss = self.report_loss(out["loss"], b)
        per_image, marginal = teacher_entropies(out["teacher_cls"].flatten(0, 1), self.criterion.center,
                                                self.teacher_temperatures()[0])  # with the center the loss used
        self.criterion.update_centers(out["teacher_cls"], out["teacher_patch"])  # after the loss
        self.log_dict({"cls_loss": out["cls_loss"], "patch_loss": out["patch_loss"], "teacher_entropy": per_image,
                       "teacher_marginal_entropy": marginal}, on_step=True, on_epoch=True, batch_size=b)
        self.entropy_sums = self.entropy_sums.to(per_image.device) + torch.stack([per_image, marginal,
                                                                                  torch.ones_like(per_image)])
        return loss

    def on_train_epoch_start(self) -> None:
        self.entropy_sums = torch.zeros(3)  # per-image entropy, marginal entropy, steps of this epoch

    def on_train_epoch_end(self) -> None:
        """Warn when the epoch's teacher [CLS] distributions sit at either collapse (see ``teacher_entropies``)."""
        per_image, marginal, steps = self.entropy_sums.tolist()
        if steps == 0 or self.global_rank != 0:
            return
        per_image, marginal = per_image / steps, marginal / steps
        if per_image > UNIFORM_COLLAPSE_ENTROPY:
            log.warning("epoch %d: the teacher's [CLS] distribution is nearly uniform for every image (normalised "
                        "entropy %.3f > %.1f; the [CLS] loss sits near log K): centering outweighs sharpening and the "
                        "[CLS] loss teaches the student almost nothing. A lower --model.teacher_temp sharpens the "
                        "teacher (0.02 with --model.norm_in_head bn kept it sharp on Fashion-MNIST; recipes/ibot.yaml "
                        "lists what each setting did to k-NN).",
                        self.current_epoch, per_image, UNIFORM_COLLAPSE_ENTROPY)
        elif marginal < ONE_PROTOTYPE_ENTROPY:
            log.warning("epoch %d: the teacher puts nearly every image on the same prototypes (normalised entropy "
                        "of the batch mean %.3f < %.1f): sharpening outweighs centering. Raise --model.teacher_temp "
                        "or lower --model.center_momentum.", self.current_epoch, marginal, ONE_PROTOTYPE_ENTROPY)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Per-step cosine weight decay (0.04 -> 0.4) on the decayed groups."""
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        wd = cosine_schedule(self.global_step, total, self.hparams.weight_decay, self.hparams.weight_decay_end)
        for group in self.trainer.optimizers[0].param_groups:
            if group.get("name", "").endswith("_decay") and not group["name"].endswith("no_decay"):
                group["weight_decay"] = wd
        self.log("weight_decay", wd, on_step=True, on_epoch=False)

    def on_after_backward(self) -> None:
        """The head's last layer is frozen during the first ``freeze_last_layer_epochs`` epochs."""
        if self.current_epoch < self.hparams.freeze_last_layer_epochs:
            for p in self.head.last_layer.parameters():
                p.grad = None

    def configure_optimizers(self) -> dict[str, Any]:
        return self.adamw_warmup_cosine({"encoder": self.encoder, "head": self.head,
                                         "mask": nn.ParameterList([self.mask_token])})

    def method_callbacks(self, pictures_dir: Path) -> list[pl.Callback]:
        """Each epoch, a PNG of fixed images as :meth:`reconstruction_panels` shows them; the EMA teacher."""
        hp = self.hparams
        return [ReconstructionPictures(pictures_dir),
                EMATeacher(schedule="cosine", base=hp.teacher_momentum, final=hp.teacher_momentum_final)]

    @torch.no_grad()
    def reconstruction_panels(self, images: Tensor) -> dict[str, Tensor]:
        """Pictures: the global view and what the student sees (masked patches blacked out)."""
        masks = torch.stack([block_mask(self.grid, int(0.3 * self.grid[0] * self.grid[1]),
                                        min_block=self.hparams.min_block) for _ in range(images.shape[0])])
        p = self.hparams.patch_size
        pixel_mask = masks.to(images.device).repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)
        return {"original": images, "student input (masked)": images.masked_fill(pixel_mask, float(images.min()))}
