"""EMA / momentum teachers: one update rule, stateless momentum schedules, and the Callback.

A method that keeps teachers implements one explicit interface::

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.student_encoder, self.teacher_encoder)]   # (student, teacher)

The teachers are ordinary sub-modules of the LightningModule, so every checkpoint carries
them. They must have ``requires_grad=False`` (use :func:`make_ema_copy`): DDP registers only
parameters that need gradients, so a teacher is never synchronised or reduced by DDP, and it is
updated identically on every rank by :class:`EMATeacher` from the (already synchronised) student.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Literal, Protocol, runtime_checkable

import pytorch_lightning as pl
import torch
from torch import nn

from ssl_kit.optim import steps_per_epoch


@runtime_checkable
class HasEMAPairs(Protocol):
    """What :class:`EMATeacher` needs from a method."""

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(student, teacher) module pairs with identical structure."""
        ...


def make_ema_copy(student: nn.Module) -> nn.Module:
    """A frozen deep copy of ``student`` to be used as its EMA teacher."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher


def cosine_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """iBOT/DINO schedule: ``final - (final - base) * (1 + cos(pi * step / total)) / 2``.

    0.996 at step 0, 0.998 at half, 1.0 at ``total_steps``.
    """
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return final - (final - base) * (1.0 + math.cos(math.pi * progress)) / 2.0


def inverse_momentum(step: int, cap: float = 0.999) -> float:
    """Soft Teacher / U2PL schedule: ``min(cap, 1 - 1 / (step + 1))`` (0 at step 0: full copy)."""
    return min(cap, 1.0 - 1.0 / (step + 1.0))


@torch.no_grad()
def ema_update(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """``teacher <- m * teacher + (1 - m) * student`` for float parameters and buffers.

    Integer / boolean buffers (e.g. BatchNorm's ``num_batches_tracked``) are copied.
    """
    s_params, t_params = list(student.parameters()), list(teacher.parameters())
    if len(s_params) != len(t_params):
        raise ValueError("student and teacher have different numbers of parameters")
    t_float = [t for t in t_params if t.is_floating_point()]
    s_float = [s.detach() for s, t in zip(s_params, t_params) if t.is_floating_point()]
    if t_float:
        torch._foreach_lerp_(t_float, s_float, 1.0 - momentum)
    for s_buf, t_buf in zip(student.buffers(), teacher.buffers()):
        if t_buf.is_floating_point():
            t_buf.lerp_(s_buf.detach(), 1.0 - momentum)
        else:
            t_buf.copy_(s_buf)


class EMATeacher(pl.Callback):
    """Update every (student, teacher) pair of the method once per OPTIMIZER step, after it.

    The momentum is a pure function of the index of the step just taken (``global_step - 1``)
    and the total number of optimizer steps, so resume needs no hidden state. Under gradient
    accumulation the callback sees several batches per step and updates only when
    ``global_step`` advanced.

    Args:
        schedule: ``cosine`` (base -> final) or ``inverse`` (``min(cap, 1 - 1/(i+1))``).
        base: cosine start momentum.
        final: cosine end momentum.
        cap: inverse-schedule cap.
        start_step: optimizer step at which EMA starts (e.g. after a supervised warm-up);
            before it the teacher is kept a copy of the student, and the inverse schedule
            counts from it.
        start_epoch: the same given in epochs (U2PL's ``sup_only_epochs``); converted to a step once
            the number of steps per epoch is known.
        burn_in_cap: inverse-schedule cap before epoch ``burn_in_epochs`` (Soft Teacher's burn-in, where the teacher
            only follows a supervised student); ``cap`` from then on. None: ``cap`` throughout.
        burn_in_epochs: epochs under ``burn_in_cap``; converted to a step like ``start_epoch``.
        steps_taken: the method's own count of training steps taken so far, where ``global_step`` counts
            something else (MPL: each step makes a teacher and a student optimizer step, and ``global_step``
            counts both); default ``trainer.global_step``.
    """

    def __init__(
        self,
        schedule: Literal["cosine", "inverse"] = "cosine",
        base: float = 0.996,
        final: float = 1.0,
        cap: float = 0.999,
        start_step: int = 0,
        start_epoch: int = 0,
        burn_in_cap: float | None = None,
        burn_in_epochs: int = 0,
        steps_taken: Callable[[], int] | None = None,
    ) -> None:
        if schedule not in ("cosine", "inverse"):
            raise ValueError(f"EMATeacher schedule must be 'cosine' or 'inverse', got {schedule!r}")
        self.schedule = schedule
        self.base, self.final, self.cap, self.start_step = base, final, cap, start_step
        self.start_epoch = start_epoch
        self.burn_in_cap, self.burn_in_epochs, self.burn_in_steps = burn_in_cap, burn_in_epochs, 0
        self.steps_taken = steps_taken
        self._last_step: int | None = None
        self.last_momentum: float | None = None

    def momentum(self, step: int, total_steps: int) -> float:
        """Momentum for the update after optimizer step ``step`` (0-based)."""
        if step < self.start_step:
            return 0.0
        if self.schedule == "cosine":
            return cosine_momentum(step - self.start_step, total_steps - self.start_step, self.base, self.final)
        burn_in = self.burn_in_cap is not None and step < self.burn_in_steps
        return inverse_momentum(step - self.start_step, self.burn_in_cap if burn_in else self.cap)

    @staticmethod
    def pairs(pl_module: pl.LightningModule) -> list[tuple[nn.Module, nn.Module]]:
        if not isinstance(pl_module, HasEMAPairs):
            raise TypeError(
                f"EMATeacher needs {type(pl_module).__name__}.ema_pairs() returning (student, teacher) "
                "module pairs; this method has no teacher, so remove the EMATeacher callback."
            )
        return pl_module.ema_pairs()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for student, teacher in self.pairs(pl_module):
            if any(p.requires_grad for p in teacher.parameters()):
                raise ValueError("teacher parameters must not require gradients: build it with make_ema_copy()")
        self._last_step = self.steps_done(trainer)

    def steps_done(self, trainer: pl.Trainer) -> int:
        return self.steps_taken() if self.steps_taken is not None else trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        step = self.steps_done(trainer)
        if self._last_step is not None and step == self._last_step:
            return  # an accumulation micro-batch: no optimizer step happened
        self._last_step = step
        if self.start_epoch or self.burn_in_epochs:  # epochs -> steps, once the data are set up
            per_epoch = int(steps_per_epoch(trainer))
            self.start_step = self.start_epoch * per_epoch if self.start_epoch else self.start_step
            self.burn_in_steps = self.burn_in_epochs * per_epoch
        self.last_momentum = self.momentum(step - 1, int(trainer.estimated_stepping_batches))
        for student, teacher in self.pairs(pl_module):
            ema_update(student, teacher, self.last_momentum)
        pl_module.log("ema_momentum", self.last_momentum, on_step=True, on_epoch=False)
