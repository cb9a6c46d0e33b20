"""Range checks of the methods' and data modules' settings, run when they are built (before any data is read or
step taken).

One table, :data:`RULES` (:data:`DATA_RULES` for the data modules), maps a hyperparameter name to the values it may take; every method calls
:func:`check_settings` on its ``hparams``, so a setting shared by several methods (``ema_decay``, ``num_classes``,
``betas``) is checked the same way everywhere. A failure is one :class:`~ssl_kit.errors.UserError` naming the flag,
the valid range and the value given. Checks that combine settings (LoMaR's window vs the patch grid, U2PL's ranks
vs the classes) stay in the method that knows the combination. :func:`check_trainer_settings` does the same for the
Trainer settings our schedules cannot use.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ssl_kit.errors import UserError


@dataclass(frozen=True)
class Rule:
    """Values ``low <= v <= high`` (either end open or absent); a sequence value must hold it element-wise."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    hint: str = ""

    def holds(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"


def at_least(low: float, hint: str = "") -> Rule:
    return Rule(low=low, hint=hint)


def positive(hint: str = "") -> Rule:
    return Rule(low=0.0, low_open=True, hint=hint)


def fraction(hint: str = "", high_open: bool = False) -> Rule:
    return Rule(low=0.0, high=1.0, high_open=high_open, hint=hint)


RULES: dict[str, Rule] = {
    # sizes and counts
    **{name: at_least(1) for name in (
        "decoder_dim", "decoder_heads", "hidden_dim", "bottleneck_dim", "out_dim", "num_windows", "window_size",
        "min_block", "fpn_channels", "head_dim", "rep_dim", "num_anchors", "num_negatives", "memory_size",
        "representation", "rpn_batch", "roi_batch", "rpn_pre_nms", "rpn_post_nms", "anchor_sizes", "strides")},
    **{name: at_least(0) for name in (
        "decoder_depth", "finetune_epochs", "freeze_last_layer_epochs", "warmup_teacher_temp_epochs", "sup_only_epochs",
        "num_upsample", "uda_ramp_epochs", "unsup_ramp_epochs", "student_wait_epochs")},
    "num_classes": at_least(2, "background included for segmentation and detection"),
    "jitter_times": at_least(2, "Soft Teacher measures the spread of jittered boxes; the paper: 10"),
    # probabilities, momenta and fractions
    **{name: fraction() for name in ("mask_prob", "cutmix_prob", "initial_score", "anchor_threshold", "object_threshold",
                                     "feedback_baseline")},
    "ema_decay": fraction("the teacher's momentum; 0.99-0.9999"),
    "burn_in_ema_decay": fraction("the teacher's momentum during the burn-in; 0.99-0.9999"),
    "center_momentum": fraction("the paper: 0.9"),
    "teacher_momentum": fraction("iBOT's paper: 0.996"),
    "teacher_momentum_final": fraction("iBOT's paper: 1.0"),
    "center_momentum2": fraction("the paper: 0.9"),
    "confidence_threshold": fraction("a probability; UDA's paper: 0.8"),
    "threshold": fraction("a probability; Meta Pseudo Labels' UDA term: 0.6"),
    "cls_threshold": fraction("a probability; Soft Teacher's paper: 0.9"),
    "label_smoothing": fraction(high_open=True),
    "drop_path_rate": fraction(high_open=True),
    "betas": fraction("Adam's moment decays, e.g. [0.9, 0.999]", high_open=True),
    "layer_decay": Rule(low=0.0, high=1.0, low_open=True, hint="1 = off"),
    "alpha0": Rule(low=0.0, high=100.0, hint="a percentage of unlabeled pixels; the paper: 20"),
    # temperatures, learning rates, scales
    **{name: positive() for name in (
        "student_temp", "teacher_temp", "teacher_temp2", "warmup_teacher_temp", "warmup_teacher_temp2",
        "uda_temperature", "temperature", "head_lr_scale", "rpe_ratio", "jitter_scale")},
    # the optimiser of every method (also checked where the optimiser is built, for use from Python)
    "base_lr": positive("the lr per 256 images"),
    **{name: at_least(0) for name in ("warmup_epochs", "min_lr", "weight_decay")},
    # loss weights and other non-negative settings (a learning rate of 0 freezes that network: a test of the rest)
    **{name: at_least(0) for name in (
        "teacher_lr", "student_lr", "finetune_lr", "unsup_weight", "contrastive_weight", "entropy_weight", "lambda_u", "grad_clip", "weight_decay_end",
        "reg_threshold")},
}


def flatten(value: Any) -> list[Any]:
    """A setting's numbers: ``0.9`` -> ``[0.9]``, ``[16, [32, 48]]`` -> ``[16, 32, 48]``."""
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in flatten(item)]
    return [value]


DATA_RULES: dict[str, Rule] = {
    **{name: at_least(1) for name in ("train_scenes", "val_scenes", "objects", "object_size", "local_size",
                                      "decode_size", "draw_group_size")},
    **{name: at_least(0) for name in ("num_workers", "num_local", "val_size", "mu", "color_jitter")},
    **{name: fraction() for name in ("erase_prob", "max_overlap", "translate", "strong_op_prob")},
    "val_fraction": fraction(high_open=True),
    "global_scale": Rule(low=0.0, high=1.0, low_open=True, hint="area fractions of the image"),
    "local_scale": Rule(low=0.0, high=1.0, low_open=True, hint="area fractions of the image"),
    "rotate": Rule(low=0.0, high=180.0, hint="degrees"),
    "shear": Rule(low=0.0, high=90.0, high_open=True, hint="degrees"),
}


def check_settings(hparams: Mapping[str, Any], flag_prefix: str = "model", rules: Mapping[str, Rule] = RULES) -> None:
    """Raise one UserError for the first setting in ``hparams`` that breaks its entry in ``rules`` (:data:`RULES`
    for a method's ``--model.*`` settings, :data:`DATA_RULES` for ``--data.*``); names without an entry, and None
    values, are not checked."""
    for name, value in hparams.items():
        rule = rules.get(name)
        if rule is None or value is None or isinstance(value, (str, bool)):
            continue
        values = flatten(value)
        if not all(isinstance(v, (int, float)) and rule.holds(float(v)) for v in values):
            hint = f" ({rule.hint})" if rule.hint else ""
            shown = list(value) if isinstance(value, (list, tuple)) else value
            flag = f"--{flag_prefix}.{name}"
            subject = f"{flag}: every value" if isinstance(value, (list, tuple)) else flag
            raise UserError(f"{subject} must be {rule.describe()}{hint}, got {shown}.")


def require(condition: bool, message: str) -> None:
    """Raise ``UserError(message)`` unless ``condition``: for checks that combine settings."""
    if not condition:
        raise UserError(message)


def check_trainer_settings(trainer: Mapping[str, Any]) -> None:
    """The Trainer settings Lightning accepts but our schedules cannot use (it would divide by zero, or train on
    without end), each as one UserError."""
    accumulate = trainer.get("accumulate_grad_batches", 1)
    if accumulate is not None and accumulate < 1:
        raise UserError(f"--trainer.accumulate_grad_batches must be >= 1 (1 = an optimizer step per batch), "
                        f"got {accumulate}.")
    epochs, steps = trainer.get("max_epochs"), trainer.get("max_steps", -1)
    if epochs is not None and epochs < -1:
        raise UserError(f"--trainer.max_epochs must be >= 1 (or -1 with --trainer.max_steps), got {epochs}.")
    if epochs == -1 and (steps is None or steps < 0):
        raise UserError("--trainer.max_epochs -1 trains without end and the learning-rate schedule needs one: pass "
                        "--trainer.max_steps N too, or a number of epochs.")
