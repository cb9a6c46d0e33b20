"""Meta Pseudo Labels (Pham et al. 2021), METHODS.md section 5.

The step itself is :func:`meta_pseudo_labels_step`, a function of two classifiers and two update
callbacks, so its order and its feedback sign are tested without Lightning; :class:`MetaPseudoLabels`
runs it with manual optimisation (two optimisers, two schedulers).

Feedback convention: ``h = ce_old - ce_new`` (how much the student's labeled cross-entropy DROPPED
after its step on the teacher's pseudo labels), and the teacher minimises ``h * CE(teacher(u_strong),
pseudo label)``: a positive h (the labels helped) lowers that cross-entropy, i.e. reinforces the
labels. This is the first-order MPL gradient (``h ~ lr_s * grad CE_l . grad CE_pseudo``). The official
code writes ``new - old`` with the opposite loss sign; kekmodel's PyTorch port discusses the two. A
moving-average baseline (rate 0.01, the official code's ``moving_dot_product``) is subtracted.
``ce_old`` and ``ce_new`` are measured by the same deterministic (eval-mode) forward of the student on
the labeled batch, averaged over all processes, so stochastic depth adds no noise to h and a student
lr of 0 gives h = 0 exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.strategies import DDPStrategy
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from ssl_kit.callbacks import PseudoLabelPictures
from ssl_kit.errors import UserError
from ssl_kit.losses.semi import centred_feedback, uda_consistency
from ssl_kit.methods.classifier import SemiSupervisedClassifier, build_classifier, classifier_param_groups
from ssl_kit.optim import effective_batch_size, linear_ramp, scaled_lr, steps_per_epoch, warmup_cosine
from ssl_kit.runtime import eval_mode
from ssl_kit.teacher import EMATeacher, make_ema_copy
from ssl_kit.validation import check_settings


@dataclass
class MPLStep:
    """What one MPL step computed (all detached 0-d tensors except ``mask``)."""

    teacher_loss: Tensor
    teacher_uda: Tensor
    teacher_mpl: Tensor
    student_loss: Tensor
    ce_old: Tensor
    ce_new: Tensor
    feedback: Tensor
    mask: Tensor


@torch.no_grad()
def labeled_cross_entropy(student: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    """Student CE on the labeled batch, deterministic (eval mode, restored after)."""
    with eval_mode(student):
        return F.cross_entropy(student(images), labels)


def meta_pseudo_labels_step(
    teacher: nn.Module,
    student: nn.Module,
    labeled: tuple[Tensor, Tensor],
    unlabeled: tuple[Tensor, Tensor],
    *,
    uda_weight: float,
    temperature: float,
    threshold: float,
    label_smoothing: float,
    soft_pseudo_labels: bool,
    update_student: Callable[[Tensor], None],
    update_teacher: Callable[[Tensor], None],
    feedback: Callable[[Tensor], Tensor] = lambda h: h,
    mean_over_processes: Callable[[Tensor], Tensor] = lambda x: x,
) -> MPLStep:
    """One MPL step in the order of METHODS.md section 5.

    1. teacher forward on ``[x_l, u_weak, u_strong]``; teacher UDA loss (CE + ``uda_weight`` x masked consistency);
    2. pseudo labels = teacher argmax on ``u_strong``; student loss on ``u_strong``; ``ce_old`` before its step;
    3. ``update_student(student_loss)`` (backward, clip, step, scheduler);
    4. ``ce_new`` of the UPDATED student; 5. ``h = feedback(ce_old - ce_new)``, detached;
    6. ``update_teacher(uda + h * CE(teacher(u_strong), pseudo label))``.

    Args:
        teacher, student: classifiers ``[N, C, H, W] -> [N, K]``.
        labeled: ``(x_l [B, ...], y_l [B])``.
        unlabeled: ``(u_weak [M, ...], u_strong [M, ...])``.
        uda_weight: current weight of the teacher's consistency term (lambda_u, ramped).
        temperature, threshold: UDA sharpening temperature and confidence threshold.
        label_smoothing: on the teacher's supervised CE and the student's pseudo-label CE.
        soft_pseudo_labels: student learns ``softmax(teacher(u_strong) / T)`` instead of the argmax.
        update_student, update_teacher: apply a loss to the respective model.
        feedback: maps the raw ``ce_old - ce_new`` to the value used (baseline subtraction).
        mean_over_processes: averages a detached scalar over processes (the global labeled batch).
    """
    x_l, y_l = labeled
    u_weak, u_strong = unlabeled
    n_l, n_u = len(y_l), len(u_weak)
    t_logits = teacher(torch.cat([x_l, u_weak, u_strong]))
    t_labeled, t_weak, t_strong = t_logits[:n_l], t_logits[n_l : n_l + n_u], t_logits[n_l + n_u :]
    consistency, mask = uda_consistency(t_weak, t_strong, temperature, threshold)
    teacher_uda = F.cross_entropy(t_labeled, y_l, label_smoothing=label_smoothing) + uda_weight * consistency

    pseudo = t_strong.detach().argmax(dim=-1)
    s_strong = student(u_strong)
    if soft_pseudo_labels:
        target = F.softmax(t_strong.detach() / temperature, dim=-1)
        student_loss = -(target * F.log_softmax(s_strong, dim=-1)).sum(dim=-1).mean()
    else:
        student_loss = F.cross_entropy(s_strong, pseudo, label_smoothing=label_smoothing)
    ce_old = mean_over_processes(labeled_cross_entropy(student, x_l, y_l))
    update_student(student_loss)
    ce_new = mean_over_processes(labeled_cross_entropy(student, x_l, y_l))
    h = feedback(ce_old - ce_new).detach()

    teacher_mpl = F.cross_entropy(t_strong, pseudo)
    teacher_loss = teacher_uda + h * teacher_mpl
    update_teacher(teacher_loss)
    return MPLStep(teacher_loss.detach(), teacher_uda.detach(), teacher_mpl.detach(), student_loss.detach(),
                   ce_old, ce_new, h, mask)


class MetaPseudoLabels(SemiSupervisedClassifier):
    """Teacher and student ViT classifiers trained together (manual optimisation, two optimisers).

    ``self.student`` is the student classifier; its EMA (``ema_decay``, warm-started ``min(ema_decay, 1 - 1/(i+1))``,
    updated by the :class:`ssl_kit.teacher.EMATeacher` callback after every training step) is evaluated and
    exported. Both optimisers, both schedulers, the feedback baseline and the step counter are in every checkpoint.

    Args:
        encoder, encoder_kwargs, patch_size, img_size, in_chans, num_classes, init_from: both classifiers
            (``init_from``: a pretrained checkpoint / export used for teacher AND student).
        teacher_init_from: a checkpoint / export for the teacher only (MPL's teacher warm-up done beforehand: e.g.
            a UDA run's export, with the student from ``init_from``, e.g. the supervised export).
        drop_path_rate: stochastic depth of both.
        global_pool: classifier input of both, ``token`` ([CLS]) or ``avg`` (mean patch token, MAE's fine-tuning).
        temperature: UDA sharpening temperature of the teacher (0.7 in MPL).
        threshold: UDA confidence threshold (0.6 in MPL; on the unsharpened probability, as section 4).
        lambda_u: weight of the teacher's consistency term (8 in MPL), ramped over ``uda_ramp_epochs``.
        label_smoothing: 0.15 in MPL.
        soft_pseudo_labels: student trains on the teacher's sharpened distribution instead of its argmax.
        feedback_baseline: moving-average rate of the feedback baseline (0.01; 0 = off).
        optimizer: ``sgd`` (Nesterov, momentum 0.9, as MPL) or ``adamw``.
        teacher_lr, student_lr: base lrs per 256 LABELED images.
        weight_decay: both optimisers.
        warmup_epochs: lr warmup of both; student_wait_epochs: the student's lr stays 0 this long first.
        grad_clip: gradient-norm clipping of both (0 = off; Trainer-level clipping is not available with
            manual optimisation).
        ema_decay: student EMA cap (0.995).
        finetune_epochs: the last epochs fine-tune only the student on labeled data at ``finetune_lr``.
        finetune_lr: absolute lr of that stage.
        layer_decay: layer-wise lr decay of both ViTs (timm groups; 1.0 = off).
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
        teacher_init_from: str | None = None,
        drop_path_rate: float = 0.0,
        global_pool: Literal["token", "avg"] = "token",
        temperature: float = 0.7,
        threshold: float = 0.6,
        lambda_u: float = 8.0,
        uda_ramp_epochs: float = 1.0,
        label_smoothing: float = 0.15,
        soft_pseudo_labels: bool = False,
        feedback_baseline: float = 0.01,
        optimizer: Literal["sgd", "adamw"] = "adamw",
        teacher_lr: float = 1e-2,
        student_lr: float = 1e-2,
        weight_decay: float = 0.05,
        warmup_epochs: float = 1.0,
        student_wait_epochs: float = 0.0,
        grad_clip: float = 1.0,
        ema_decay: float = 0.995,
        finetune_epochs: int = 0,
        finetune_lr: float = 1e-5,
        layer_decay: float = 1.0,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise UserError(f"--model.optimizer must be sgd or adamw, got {optimizer!r}.")
        self.save_hyperparameters()
        check_settings(self.hparams)
        self.automatic_optimization = False
        build = dict(encoder=encoder, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                     encoder_kwargs=encoder_kwargs, num_classes=num_classes, init_from=init_from,
                     drop_path_rate=drop_path_rate, global_pool=global_pool)
        teacher_source = dict(init_from=teacher_init_from, init_flag="--model.teacher_init_from") if teacher_init_from else {}
        self.teacher, _ = build_classifier(**dict(build, **teacher_source))
        self.student, self.encoder_spec = build_classifier(**build)
        if init_from is None and teacher_init_from is None:
            self.student.load_state_dict(self.teacher.state_dict())  # the same start, as MPL
        self.ema_student = make_ema_copy(self.student)
        self.register_buffer("moving_feedback", torch.zeros(()))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.init_metrics(num_classes)

    @property
    def encoder(self) -> nn.Module:  # type: ignore[override]
        """The student (timm ViT classifier); its EMA is evaluated and exported."""
        return self.student

    def export_module(self) -> nn.Module:
        return self.ema_student

    def init_metrics(self, num_classes: int) -> None:
        super().init_metrics(num_classes)
        self.val_acc_teacher = MulticlassAccuracy(num_classes, average="micro")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """``val_top1`` of the exported student EMA (the run's figure) and ``val_top1_teacher`` of the teacher."""
        super().validation_step(batch, batch_idx)
        images, labels = batch
        self.val_acc_teacher(self.teacher(images), labels)
        self.log("val_top1_teacher", self.val_acc_teacher, prog_bar=True, on_epoch=True, batch_size=len(labels))

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.student, self.ema_student)]

    def method_callbacks(self, pictures_dir: Path) -> list[pl.Callback]:
        """Each epoch, fixed unlabeled images in weak / strong views with the teacher's labels; the student's EMA
        after every training step (``min(ema_decay, 1 - 1/(i+1))`` of the training step ``i``: ``global_step``
        counts the teacher's and the student's optimizer steps both)."""
        return [PseudoLabelPictures(pictures_dir),
                EMATeacher(schedule="inverse", cap=self.hparams.ema_decay, steps_taken=lambda: int(self.steps_done))]

    def pseudo_labeller(self) -> tuple[nn.Module, float]:
        """The teacher, and its UDA confidence threshold (for the pseudo-label pictures)."""
        return self.teacher, self.hparams.threshold

    def setup(self, stage: str) -> None:
        self.check_data(needs_unlabeled=True)
        strategy = self.trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, DDPStrategy) and not strategy._ddp_kwargs.get("find_unused_parameters", False):
            raise UserError("Meta Pseudo Labels makes two backward passes per step (student, then teacher), each "
                            "touching one model: under DDP use --trainer.strategy ddp_find_unused_parameters_true.")

    # ------------------------------------------------------------------ optimisation
    def _optimizer(self, name: str, module: nn.Module, base_lr: float) -> torch.optim.Optimizer:
        hp = self.hparams
        lr = scaled_lr(base_lr, effective_batch_size(self.trainer, self.trainer.datamodule.batch_size))
        groups = classifier_param_groups(module, hp.weight_decay, hp.layer_decay, prefix=name)
        for group in groups:
            group["lr"] = lr * group.pop("lr_scale", 1.0)
        if hp.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
        return torch.optim.AdamW(groups, lr=lr)

    def configure_optimizers(self) -> list[dict[str, Any]]:
        hp = self.hparams
        per_epoch = steps_per_epoch(self.trainer)
        total = int(self.trainer.estimated_stepping_batches)
        warmup, wait = int(round(hp.warmup_epochs * per_epoch)), int(round(hp.student_wait_epochs * per_epoch))
        teacher_opt = self._optimizer("teacher", self.teacher, hp.teacher_lr)
        student_opt = self._optimizer("student", self.student, hp.student_lr)
        teacher_sched = torch.optim.lr_scheduler.LambdaLR(teacher_opt, lambda s: warmup_cosine(s, warmup, total))
        student_sched = torch.optim.lr_scheduler.LambdaLR(
            student_opt, lambda s: 0.0 if s < wait else warmup_cosine(s - wait, warmup, total - wait))
        return [{"optimizer": teacher_opt, "lr_scheduler": {"scheduler": teacher_sched, "interval": "step", "name": "lr-teacher"}},
                {"optimizer": student_opt, "lr_scheduler": {"scheduler": student_sched, "interval": "step", "name": "lr-student"}}]

    def _update(self, optimizer: Any, scheduler: Any, loss: Tensor) -> None:
        self.check_finite(loss)
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.hparams.grad_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        optimizer.step()
        if scheduler is not None:
            scheduler.step()

    def _mean_over_processes(self, value: Tensor) -> Tensor:
        return self.trainer.strategy.reduce(value, reduce_op="mean") if self.trainer.world_size > 1 else value

    # ------------------------------------------------------------------ step
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        hp = self.hparams
        teacher_opt, student_opt = self.optimizers()
        teacher_sched, student_sched = self.lr_schedulers()
        if hp.finetune_epochs > 0 and self.current_epoch >= self.trainer.max_epochs - hp.finetune_epochs:
            self._finetune_step(batch, student_opt)
            return
        step = int(self.steps_done)

        out = meta_pseudo_labels_step(
            self.teacher, self.student, batch["labeled"], batch["unlabeled"],
            uda_weight=hp.lambda_u * linear_ramp(step, hp.uda_ramp_epochs, self.trainer), temperature=hp.temperature,
            threshold=hp.threshold, label_smoothing=hp.label_smoothing, soft_pseudo_labels=hp.soft_pseudo_labels,
            update_student=lambda loss: self._update(student_opt, student_sched, loss),
            update_teacher=lambda loss: self._update(teacher_opt, teacher_sched, loss),
            feedback=lambda h: centred_feedback(h, self.moving_feedback, hp.feedback_baseline),
            mean_over_processes=self._mean_over_processes,
        )
        self.steps_done += 1
        n_l = len(batch["labeled"][1])
        self.log_dict({"teacher_loss": out.teacher_loss, "teacher_uda": out.teacher_uda, "teacher_mpl": out.teacher_mpl,
                       "student_loss": out.student_loss, "mpl_feedback": out.feedback, "student_ce_labeled": out.ce_new,
                       "unsup_mask_fraction": out.mask.float().mean()}, on_step=True, on_epoch=False, batch_size=n_l)
        self.report_loss(out.teacher_loss + out.student_loss, n_l)

    def _finetune_step(self, batch: dict[str, Any], student_opt: Any) -> None:
        """Final stage: the student alone on labeled data (weak views), constant ``finetune_lr``."""
        images, labels = batch["labeled"]
        for group in student_opt.param_groups:
            group["lr"] = self.hparams.finetune_lr
        loss = F.cross_entropy(self.student(images), labels)
        self._update(student_opt, None, loss)
        self.steps_done += 1
        self.report_loss(loss, len(labels))
