"""Pixel reconstruction losses (MAE, LoMaR)."""
from __future__ import annotations

from torch import Tensor


def normalize_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-patch normalisation of MAE's ``norm_pix_loss``: ``(t - mean) / sqrt(var + eps)``.

    Mean and UNBIASED variance are taken over the pixels of each patch (as ``Tensor.var``
    in the reference).

    Args:
        patches: ``[..., P]`` flattened patches (P = p*p*C).

    Returns:
        Same shape, each patch with mean 0.
    """
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def masked_mse_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = True) -> Tensor:
    """Mean squared error per patch, averaged over MASKED patches only.

    loss = sum_{b,l} mask_bl * mean_p (pred - target)^2 / sum_{b,l} mask_bl

    Args:
        pred: ``[B, L, P]`` predicted pixels.
        target: ``[B, L, P]`` patchified input image.
        mask: ``[B, L]`` 1 = masked (the loss is taken there), 0 = visible.
        norm_pix: normalise each target patch first (MAE default).

    Returns:
        Scalar loss. Gradients at visible positions are exactly zero.
    """
    if norm_pix:
        target = normalize_patches(target)
    per_patch = (pred - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
