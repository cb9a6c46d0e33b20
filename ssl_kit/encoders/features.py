"""Features of an encoder, for monitors, probes and k-NN: [CLS], the mean patch token (its readouts), the last n
blocks' [CLS], and how spread out a set of features is."""
from __future__ import annotations

from typing import Literal

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

FeatureKind = Literal["cls", "avgpool", "cls_last_n"]


def feature_dim(encoder: VisionTransformer, kind: FeatureKind, last_n: int = 4) -> int:
    """Width of :func:`encoder_features` output."""
    return encoder.embed_dim * (last_n if kind == "cls_last_n" else 1)


Readout = Literal["cls", "avgpool"]
READOUTS: tuple[Readout, ...] = ("cls", "avgpool")


def readout_features(encoder: VisionTransformer, images: Tensor) -> dict[str, Tensor]:
    """Both single-vector readouts of a timm ViT from one forward pass.

    ``cls`` is the [CLS] token and ``avgpool`` the mean of the patch tokens, each after the encoder's
    final norm (``norm`` for a [CLS]-pooled or headless ViT, ``fc_norm`` after pooling for an
    ``global_pool="avg"`` classifier, as timm's ``forward_head`` applies it).

    Args:
        encoder: the ViT.
        images: ``[B, C, H, W]`` normalised.

    Returns:
        ``{"cls": [B, D], "avgpool": [B, D]}``.
    """
    tokens = encoder.forward_features(images)  # [B, prefix + L, D], ``norm`` applied (Identity under fc_norm)
    return {"cls": encoder.fc_norm(tokens[:, 0]),
            "avgpool": encoder.fc_norm(tokens[:, encoder.num_prefix_tokens :].mean(dim=1))}


def encoder_features(encoder: VisionTransformer, images: Tensor, kind: FeatureKind = "cls", last_n: int = 4) -> Tensor:
    """Features of a timm ViT.

    Args:
        encoder: the ViT (its final norm is applied in every mode).
        images: ``[B, C, H, W]`` normalised.
        kind: ``cls`` ([CLS] after the final norm, MAE protocol), ``avgpool`` (mean of the normed
            patch tokens, :func:`readout_features`) or ``cls_last_n`` (concatenated normed [CLS] of the
            last ``last_n`` blocks, iBOT's ViT-S protocol).
        last_n: blocks for ``cls_last_n``.

    Returns:
        ``[B, feature_dim]``.
    """
    if kind == "cls_last_n":
        x = encoder.norm_pre(encoder._pos_embed(encoder.patch_embed(images)))
        outputs = []
        for i, block in enumerate(encoder.blocks):
            x = block(x)
            if i >= len(encoder.blocks) - last_n:
                outputs.append(encoder.norm(x)[:, 0])
        return torch.cat(outputs, dim=-1)
    if kind in READOUTS:
        return readout_features(encoder, images)[kind]
    raise ValueError(f"unknown feature kind {kind!r}: use cls, avgpool or cls_last_n")


def feature_spread(features: Tensor) -> dict[str, float]:
    """How far a set of features is from collapse (all images mapped to one direction).

    Args:
        features: ``[N, D]`` (L2-normalised here, as the k-NN sees them); NaNs for ``N < 2``.

    Returns:
        ``mean_cosine``: mean pairwise cosine over distinct pairs (1 = every feature the same direction);
        ``mean_std``: mean over dimensions of the per-dimension standard deviation of the normalised
        features (0 = collapsed; ``1/sqrt(D)`` for directions spread evenly over the sphere).
    """
    z = torch.nn.functional.normalize(features.float(), dim=1)
    n = z.shape[0]
    if n < 2:
        return {"mean_cosine": float("nan"), "mean_std": float("nan")}
    total = z.sum(dim=0)
    pair_sum = (total @ total - n) / (n * (n - 1))  # sum_{i != j} z_i.z_j = |sum z|^2 - n
    return {"mean_cosine": float(pair_sum), "mean_std": float(z.std(dim=0).mean())}
