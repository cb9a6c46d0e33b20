"""Soft Teacher's pieces (Xu et al. ICCV 2021, METHODS.md section 7): pseudo-box selection, box-jitter
uncertainty and the background-weighted classification loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def confident(scores: Tensor, threshold: float) -> Tensor:
    """Pseudo boxes kept for classification and the RPN: ``score > threshold`` (strict, 0.9 in the paper)."""
    return scores > threshold


def reliable(uncertainty: Tensor, threshold: float) -> Tensor:
    """Pseudo boxes kept for box regression: ``uncertainty < threshold`` (strict, 0.02 in the paper)."""
    return uncertainty < threshold


def jitter_boxes(boxes: Tensor, times: int = 10, scale: float = 0.06, generator: torch.Generator | None = None) -> Tensor:
    """``times`` jittered copies of ``[n, 4]`` xyxy boxes: each coordinate moved by ``N(0, (scale * side)^2)``
    (x by the box width, y by its height). Returns ``[times, n, 4]``."""
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1.0).repeat(1, 2)  # [n, 4]: w, h, w, h
    noise = torch.randn((times, *boxes.shape), generator=generator, device=boxes.device, dtype=boxes.dtype)
    return boxes[None] + noise * scale * wh[None]


def box_uncertainty(refined: Tensor) -> Tensor:
    """Localisation uncertainty of boxes from their refined jitters ``[times, n, 4]`` -> ``[n]``: the std of each
    coordinate over the jitters (unbiased, as the reference code's ``Tensor.std``) divided by the mean refined
    box's width (x) or height (y, at least 1 px), averaged over the 4 coordinates."""
    if refined.shape[1] == 0:
        return refined.new_zeros(0)
    std = refined.std(dim=0)  # [n, 4]
    mean = refined.mean(dim=0)
    wh = (mean[:, 2:] - mean[:, :2]).clamp(min=1.0).repeat(1, 2)
    return (std / wh).mean(dim=-1)


def soft_background_ce(class_logits: Tensor, labels: Tensor, background_prob: Tensor) -> Tensor:
    """Classification loss with soft-teacher weights: proposals assigned to background (label 0) weighted by
    the teacher's background probability for them, foreground weight 1;
    ``sum(w * CE) / max(sum(w), 1)``.

    Args:
        class_logits: ``[P, K]`` student logits of the sampled proposals.
        labels: ``[P]`` their assigned classes (0 = background).
        background_prob: ``[P]`` teacher background probability of each proposal (only read where label 0).
    """
    ce = F.cross_entropy(class_logits, labels, reduction="none")
    weight = torch.where(labels == 0, background_prob.detach().to(ce.dtype), torch.ones_like(ce))
    return (weight * ce).sum() / weight.sum().clamp(min=1.0)
