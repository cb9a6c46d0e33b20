"""The small contract every method shares: one encoder, features for monitors, a training seed.

Methods subclass :class:`SSLMethod` (a LightningModule) and keep their own logic in their own
file. What the shared callbacks (k-NN monitor, export, pictures, EMA) rely on is listed here:

* ``self.encoder``: the timm VisionTransformer that gets exported and evaluated;
* ``self.encoder_spec``: how to rebuild it with plain timm;
* ``readout``: the feature its paper evaluates (``cls`` or ``avgpool``, :data:`ssl_kit.encoders.features.READOUTS`),
  ``readouts(images)`` both of them from one forward pass, ``embed(images) -> [B, D]`` the default one (k-NN
  monitor, Q-score); ``encoder_init`` how a random baseline of the same network is initialised (``mae`` or
  ``timm``, :func:`ssl_kit.encoders.build_random_encoder`);
* ``checkpoint_monitor``: the logged metric (and mode) that picks the run's best checkpoint, ``None`` for the
  k-NN monitor's ``knn_top1`` (the training loss when k-NN is off);
* ``method_callbacks(pictures_dir)``: the callbacks the method brings to every run (its per-epoch pictures,
  its EMA teacher); none by default;
* optionally ``ema_pairs()`` for :class:`ssl_kit.teacher.EMATeacher`.

The command line asks nothing else of a method: it reads these, it does not probe for attributes.

Extra loss terms (e.g. the Q-score regulariser) are attached from outside with
:meth:`SSLMethod.add_loss_term`; they are added to whatever loss the method's ``training_step``
returns, right before backward, so no method has to know about them.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, ClassVar

import pytorch_lightning as pl
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from ssl_kit.encoders import CHECKPOINT_KEY, EncoderSpec, resolve_encoder_spec
from ssl_kit.encoders.features import READOUTS, readout_features
from ssl_kit.errors import NonFiniteLossError, UserError
from ssl_kit.optim import adamw_param_groups, adamw_warmup_cosine


class SSLMethod(pl.LightningModule):
    """Base LightningModule: holds the encoder spec and the features used by monitors."""

    encoder: VisionTransformer
    encoder_spec: EncoderSpec
    encoder_init: ClassVar[str] = "mae"  # init of the encoder before training: "mae" (xavier, sin-cos) or "timm"
    # (metric, "max" | "min") of the run's best checkpoint; None: the k-NN monitor's knn_top1 (train loss without it)
    checkpoint_monitor: ClassVar[tuple[str, str] | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loss_terms: dict[str, Callable[[], Tensor | None]] = {}  # see add_loss_term

    def method_callbacks(self, pictures_dir: Path) -> list[pl.Callback]:
        """The callbacks this method adds to every ``ssl-pretrain`` run: its pictures (PNG files written into
        ``pictures_dir`` each epoch) and its EMA teacher; an empty list by default."""
        return []

    @property
    def readout(self) -> str:
        """The readout evaluated by default (``--model.readout`` where the method has it, else ``cls``)."""
        return self.hparams.get("readout", "cls")

    @staticmethod
    def check_readout(readout: str) -> None:
        if readout not in READOUTS:
            raise UserError(f"--model.readout must be one of {', '.join(READOUTS)} (the feature k-NN and probes read "
                            f"by default), got {readout!r}.")

    def add_loss_term(self, name: str, term: Callable[[], Tensor | None]) -> None:
        """Add ``term()`` (a scalar with gradient, or None to skip) to every training loss before backward.

        Used by callbacks such as :class:`ssl_kit.qscore.QScoreRegularizer`; the term is divided by
        ``accumulate_grad_batches`` and scaled by the fp16 grad scaler exactly like the method's loss.
        """
        self._loss_terms[name] = term

    def remove_loss_term(self, name: str) -> None:
        self._loss_terms.pop(name, None)

    def extra_loss(self) -> Tensor | None:
        """Sum of the attached loss terms for the current step (None when there are none)."""
        values = [v for v in (t() for t in self._loss_terms.values()) if v is not None]
        if not values:
            return None
        total = torch.stack([v.reshape(()) for v in values]).sum()
        self.check_finite(total)
        return total

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Lightning's backward, with the attached loss terms added to the (already accumulation-
        divided and, under fp16, scaled) loss."""
        extra = self.extra_loss()
        if extra is not None:
            trainer = self._trainer
            if trainer is not None:
                extra = extra / trainer.accumulate_grad_batches
                scaler = getattr(trainer.precision_plugin, "scaler", None)
                if scaler is not None:
                    extra = scaler.scale(extra)
            loss = loss + extra
        super().backward(loss, *args, **kwargs)

    def random_draw(self, site: str, fn: Callable[..., Any], *inputs: Any, rows: int | None = None) -> Any:
        """A random draw of the current training step (masks, box jitter), made per draw group of the global
        batch (:class:`ssl_kit.distributed.DrawPlan`) so it is the same on any number of processes.
        Outside a training step (pictures, evaluation) ``fn`` runs as is: ``fn(*inputs)`` or ``fn(rows)``."""
        trainer = self._trainer
        plan = getattr(getattr(trainer, "datamodule", None), "draws", None) if trainer is not None else None
        if plan is None or not self.training:
            return fn(*inputs) if inputs else fn(rows)
        return plan.run(site, fn, *inputs, rows=rows)

    def mean_over_draw_groups(self, site: str, fn: Callable[..., tuple[Tensor, dict[str, Any]]], *inputs: Any) -> tuple[Tensor, dict[str, Any]]:
        """A training step whose statistics are per device in the reference (percentiles, proposal sampling,
        normalisers), run per draw group (:meth:`ssl_kit.distributed.DrawPlan.mean`) so that one process with
        several groups trains like several processes. ``fn`` returns ``(loss, logs)``."""
        plan = getattr(getattr(self._trainer, "datamodule", None), "draws", None) if self._trainer is not None else None
        if plan is None or not self.training:
            return fn(*inputs)
        return plan.mean(site, fn, *inputs)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """The step's draw plan ends with the step (pictures drawn later use the plain RNG)."""
        datamodule = getattr(self._trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "draws"):
            datamodule.draws = None

    def adamw_warmup_cosine(self, modules: dict[str, torch.nn.Module]) -> dict[str, Any]:
        """AdamW with no weight decay on biases / 1-D params over the named modules: :meth:`scheduled_adamw`."""
        return self.scheduled_adamw(adamw_param_groups(modules, self.hparams.weight_decay))

    def scheduled_adamw(self, groups: list[dict[str, Any]]) -> dict[str, Any]:
        """AdamW over prepared ``groups`` (a group's ``lr_scale`` multiplies its lr), lr = base_lr * effective batch
        / 256, per-step warmup + cosine, from the method's ``base_lr``, ``warmup_epochs``, ``betas``, ``min_lr``."""
        hp = self.hparams
        batch_size = self.trainer.datamodule.batch_size if self.trainer.datamodule is not None else 1
        return adamw_warmup_cosine(self, groups, hp.base_lr, batch_size, hp.warmup_epochs, betas=tuple(hp.betas),
                                   min_lr=hp.min_lr)

    def make_encoder_spec(
        self, encoder: str, img_size: int, patch_size: int, in_chans: int, encoder_kwargs: dict[str, Any] | None
    ) -> EncoderSpec:
        """Resolve the encoder spec (raises a clear error for unknown names / bad sizes)."""
        self.encoder_spec = resolve_encoder_spec(
            encoder, img_size=img_size, patch_size=patch_size, in_chans=in_chans, **(encoder_kwargs or {})
        )
        return self.encoder_spec

    def export_module(self) -> VisionTransformer:
        """The encoder that is exported and evaluated (a teacher for iBOT-like methods)."""
        return self.encoder

    def export_prefix(self) -> str:
        """State-dict prefix of :meth:`export_module` inside this LightningModule (e.g. ``encoder.``)."""
        target = self.export_module()
        for name, module in self.named_modules():
            if module is target:
                return f"{name}." if name else ""
        raise RuntimeError("export_module() must return a sub-module of the method")

    def encoder_record(self) -> dict[str, Any]:
        """What evaluation needs to rebuild, read out and re-initialise the exported encoder (checkpoint and
        export config)."""
        return {"method": type(self).__name__, "readout": self.readout, "encoder_init": self.encoder_init}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record which encoder the checkpoint carries, so evaluation tools can rebuild it."""
        checkpoint[CHECKPOINT_KEY] = {
            **self.encoder_record(),
            "encoder": {"timm_name": self.encoder_spec.timm_name, "kwargs": dict(self.encoder_spec.kwargs)},
            "export_prefix": self.export_prefix(),
        }

    @torch.no_grad()
    def readouts(self, images: Tensor) -> dict[str, Tensor]:
        """``{"cls": [B, D], "avgpool": [B, D]}`` of :meth:`export_module` (one forward pass).

        Args:
            images: ``[B, C, H, W]`` normalised float images.
        """
        return readout_features(self.export_module(), images)

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """Image features for monitors: the method's default :attr:`readout` of :meth:`export_module`, ``[B, D]``."""
        return self.readouts(images)[self.readout]

    def report_loss(self, loss: Tensor, batch_size: int) -> Tensor:
        """Stop on a non-finite loss, log it as ``train_loss`` (step and epoch), and return it."""
        self.check_finite(loss)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch_size)
        return loss

    def check_finite(self, loss: Tensor) -> None:
        """Stop the run with a clear message when the loss is NaN or infinite (before backward)."""
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"The training loss became {value} at epoch {self.current_epoch}, step {self.global_step}. "
                "The weights were not updated with it, and the checkpoints already written are kept. "
                "Lower the learning rate (--model.base_lr), enable gradient clipping "
                "(--trainer.gradient_clip_val 3.0), or use bf16 instead of fp16."
            )


class StudentTeacherMethod(SSLMethod):
    """A method whose ``self.student`` trains and whose EMA copy ``self.ema_teacher`` (same structure, both with an
    ``.encoder`` ViT) makes the targets and is evaluated and exported (U2PL, Soft Teacher)."""

    student: torch.nn.Module
    ema_teacher: torch.nn.Module

    @property
    def encoder(self) -> torch.nn.Module:  # type: ignore[override]
        return self.student.encoder

    def export_module(self) -> torch.nn.Module:
        return self.ema_teacher.encoder

    def ema_pairs(self) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
        return [(self.student, self.ema_teacher)]
