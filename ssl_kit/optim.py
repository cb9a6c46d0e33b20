"""Shared optimisation plumbing: lr scaling by the effective batch, warmup + cosine per step,
and parameter groups without weight decay on biases and 1-D parameters (timm's grouping)."""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable

import pytorch_lightning as pl
import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from ssl_kit.validation import check_settings

log = logging.getLogger("ssl_kit")


def effective_batch_size(trainer: pl.Trainer, per_device_batch: int) -> int:
    """Per-device batch x devices x nodes x gradient accumulation (METHODS.md, shared rules)."""
    return int(per_device_batch * trainer.world_size * trainer.accumulate_grad_batches)


def scaled_lr(base_lr: float, effective_batch: int) -> float:
    """Linear scaling rule: ``lr = base_lr * effective_batch / 256``."""
    return base_lr * effective_batch / 256.0


def warmup_cosine(step: int | float, warmup_steps: int | float, total_steps: int | float, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warmup from 0, then half-cycle cosine to ``min_ratio``.

    Matches the MAE reference (``lr * t / warmup`` during warmup, then
    ``min + (1 - min) * 0.5 * (1 + cos(pi * (t - warmup) / (total - warmup)))``).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return float(step) / float(warmup_steps)
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_schedule(step: int | float, total_steps: int | float, start: float, end: float) -> float:
    """Half-cycle cosine from ``start`` (step 0) to ``end`` (step ``total_steps``)."""
    progress = min(max(float(step) / max(float(total_steps), 1.0), 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names the model itself exempts from weight decay (timm's ``no_weight_decay()``)."""
    fn = getattr(model, "no_weight_decay", None)
    return set(fn()) if callable(fn) else set()


def adamw_param_groups(
    modules: dict[str, nn.Module], weight_decay: float, exempt_listed: bool = False
) -> list[dict[str, Any]]:
    """Groups for several named sub-modules: no weight decay on biases and 1-D parameters.

    With ``exempt_listed`` the names a model lists in ``no_weight_decay()`` (timm: cls_token,
    pos_embed) are exempt too; the MAE reference does not do this (its [CLS] and mask tokens
    are decayed), so MAE leaves it off. Frozen parameters are left out.
    """
    groups: list[dict[str, Any]] = []
    for prefix, module in modules.items():
        listed = no_weight_decay_names(module) if exempt_listed else set()
        for group in param_groups_weight_decay(module, weight_decay, no_weight_decay_list=listed):
            if group["params"]:
                groups.append(dict(group, module=prefix, name=f"{prefix}_{'decay' if group['weight_decay'] else 'no_decay'}"))
    return groups


def steps_per_epoch(trainer: pl.Trainer) -> float:
    """Optimizer steps in one epoch (after ``estimated_stepping_batches`` has set up the data)."""
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        return float(trainer.estimated_stepping_batches) / max(trainer.max_epochs or 1, 1)
    return max(batches // trainer.accumulate_grad_batches, 1)


def linear_ramp(step: int | float, ramp_epochs: float, trainer: pl.Trainer) -> float:
    """Loss-weight multiplier ``min(1, (step + 1) / R)`` for the ``step``-th (0-based) step of a ramp over
    ``ramp_epochs`` epochs of optimizer steps, R at least 1 (0 epochs: full weight at once)."""
    return min(1.0, (step + 1) / max(ramp_epochs * steps_per_epoch(trainer), 1.0))


def short_epoch_note(trainer: pl.Trainer) -> str | None:
    """A warning when the data hold fewer batches than ``--trainer.limit_train_batches`` asks for per epoch (e.g. a
    recipe sized for 60k images run on 2000): the run then trains fewer steps than the recipe says."""
    limit, batches = getattr(trainer, "limit_train_batches", None), trainer.num_training_batches
    if isinstance(limit, int) and not isinstance(limit, bool) and math.isfinite(batches) and batches < limit:
        return (f"an epoch of these data holds only {int(batches)} batches, not --trainer.limit_train_batches {limit}: "
                f"{int(trainer.estimated_stepping_batches)} optimizer steps in all; raise --trainer.max_epochs for more.")
    return None


def _fused_ok(groups: list[dict[str, Any]], trainer: pl.Trainer | None = None) -> bool:
    """The fused AdamW kernel (one pass over all tensors, ~10x faster than the CPU for-loop) applies
    to float parameters on CPU or CUDA; same update rule. Not with mixed precision AND gradient clipping:
    the fused kernel unscales fp16 gradients itself, so Lightning's AMP plugin refuses to clip them."""
    params = [p for g in groups for p in g["params"]]
    if trainer is not None and getattr(trainer, "gradient_clip_val", None) and str(getattr(trainer, "precision", "")).endswith("-mixed"):
        return False
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def adamw_warmup_cosine(
    module: pl.LightningModule,
    param_groups: Iterable[dict[str, Any]],
    base_lr: float,
    batch_size: int,
    warmup_epochs: float,
    betas: tuple[float, float] = (0.9, 0.95),
    min_lr: float = 0.0,
) -> dict[str, Any]:
    """AdamW with ``lr = base_lr * effective_batch / 256`` (times a group's ``lr_scale``), per-step warmup + cosine.

    Returns the dict Lightning expects from ``configure_optimizers``.
    """
    param_groups = list(param_groups)
    check_settings({"base_lr": base_lr, "warmup_epochs": warmup_epochs, "min_lr": min_lr,  # also for use from Python
                    "weight_decay": [g.get("weight_decay", 0.0) for g in param_groups]})
    trainer = module.trainer
    total_steps = int(trainer.estimated_stepping_batches)
    warmup_steps = int(round(warmup_epochs * steps_per_epoch(trainer)))
    eff_batch = effective_batch_size(trainer, batch_size)
    lr = scaled_lr(base_lr, eff_batch)
    if trainer.is_global_zero:
        log.info(
            "effective batch %d (%d per device x %d processes x %d accumulation) -> lr %.3g "
            "(base %.3g); %d optimizer steps, %d warmup",
            eff_batch, batch_size, trainer.world_size, trainer.accumulate_grad_batches, lr, base_lr,
            total_steps, warmup_steps,
        )
        if note := short_epoch_note(trainer):
            log.warning(note)
    groups = [dict(g) for g in param_groups]
    for group in groups:  # a group's "lr_scale" (e.g. a segmentation head at 10x) multiplies the scaled lr
        if "lr_scale" in group:
            group["lr"] = lr * group.pop("lr_scale")
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=_fused_ok(groups, trainer))
    return with_warmup_cosine(trainer, optimizer, warmup_epochs, min_lr / lr if lr > 0 else 0.0)


def with_warmup_cosine(
    trainer: pl.Trainer, optimizer: torch.optim.Optimizer, warmup_epochs: float, min_ratio: float = 0.0
) -> dict[str, Any]:
    """Attach a per-step warmup + cosine schedule that scales every group's own lr by the same factor.

    Returns the dict Lightning expects from ``configure_optimizers``.
    """
    total_steps = int(trainer.estimated_stepping_batches)
    warmup_steps = int(round(warmup_epochs * steps_per_epoch(trainer)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_ratio)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
