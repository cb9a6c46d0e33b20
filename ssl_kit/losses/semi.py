"""Losses of semi-supervised classification: UDA's TSA cross-entropy and confidence-masked consistency
(METHODS.md section 4), and the Meta Pseudo Labels feedback (section 5)."""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_kit.distributed import global_mean

TSA_SCHEDULES = ("linear", "log", "exp", "none")


def tsa_threshold(schedule: Literal["linear", "log", "exp", "none"], progress: float, num_classes: int) -> float:
    """Training Signal Annealing threshold ``eta_t = alpha_t (1 - 1/K) + 1/K``.

    Args:
        schedule: ``linear`` (alpha = t/T), ``log`` (1 - exp(-5 t/T)), ``exp`` (exp(5 (t/T - 1))), or
            ``none`` (eta = 1: every example kept).
        progress: t/T, clamped to [0, 1].
        num_classes: K.
    """
    if schedule not in TSA_SCHEDULES:
        raise ValueError(f"TSA schedule must be one of {', '.join(TSA_SCHEDULES)}, got {schedule!r}")
    t = min(max(progress, 0.0), 1.0)
    if schedule == "none":
        return 1.0
    alpha = {"linear": t, "log": 1.0 - math.exp(-5.0 * t), "exp": math.exp(5.0 * (t - 1.0))}[schedule]
    return alpha * (1.0 - 1.0 / num_classes) + 1.0 / num_classes


def tsa_cross_entropy(logits: Tensor, targets: Tensor, threshold: float, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """Cross-entropy over the examples whose CORRECT-class probability is <= ``threshold``.

    Args:
        logits: ``[B, K]``.
        targets: ``[B]`` class indices.
        threshold: eta_t from :func:`tsa_threshold` (1.0 keeps every example).
        label_smoothing: as ``F.cross_entropy``.

    Returns:
        ``(sum of kept losses / max(#kept, 1), kept mask [B] bool)``; under DDP both sums run over all
        processes (:func:`ssl_kit.distributed.global_mean`), so the loss is the 1-process loss of the global batch.
    """
    per_example = F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)
    with torch.no_grad():
        p_correct = logits.softmax(dim=-1).gather(1, targets[:, None]).squeeze(1)
        kept = p_correct <= threshold
    loss = global_mean((per_example * kept).sum(), kept.sum())  # over the kept examples of the GLOBAL batch
    return loss, kept


def uda_consistency(logits_weak: Tensor, logits_strong: Tensor, temperature: float, threshold: float) -> tuple[Tensor, Tensor]:
    """``mean_i mask_i * KL(sg(softmax(weak_i / T)) || softmax(strong_i))`` over ALL unlabeled examples.

    The confidence mask uses the UNSHARPENED weak prediction: ``max softmax(weak) > threshold``.

    Args:
        logits_weak: ``[N, K]`` predictions on the weak ("ori") view (only used detached).
        logits_strong: ``[N, K]`` predictions on the strong ("aug") view.
        temperature: sharpening temperature T of the target (UDA 0.4).
        threshold: confidence threshold (UDA 0.8).

    Returns:
        ``(loss, mask [N] bool)``.
    """
    weak = logits_weak.detach()
    mask = weak.softmax(dim=-1).amax(dim=-1) > threshold
    target_log = F.log_softmax(weak / temperature, dim=-1)
    kl = (target_log.exp() * (target_log - F.log_softmax(logits_strong, dim=-1))).sum(dim=-1)
    return (kl * mask).mean(), mask


def entropy(logits: Tensor) -> Tensor:
    """Mean prediction entropy ``-sum p log p`` of ``[N, K]`` logits (UDA's optional entropy minimisation)."""
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1).mean()


def centred_feedback(h: Tensor, moving: Tensor, rate: float) -> Tensor:
    """Subtract the moving-average baseline of the MPL feedback (the official code's ``moving_dot_product``).

    ``moving <- moving - rate * (moving - h)`` (in place), then returns ``h - moving``; ``rate = 0`` returns ``h``.

    Args:
        h: 0-d feedback ``ce_old - ce_new`` of this step.
        moving: 0-d buffer, updated in place.
        rate: baseline update rate (0.01 in the official code).
    """
    if rate == 0:
        return h
    moving.sub_(rate * (moving - h))
    return h - moving
