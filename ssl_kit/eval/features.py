"""Frozen-encoder features for probes: [CLS], average-pooled patches, or the last n blocks' [CLS]."""
from __future__ import annotations

from typing import Literal

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

FeatureKind = Literal["cls", "avgpool", "cls_last_n"]


def feature_dim(encoder: VisionTransformer, kind: FeatureKind, last_n: int = 4) -> int:
    """Width of :func:`encoder_features` output."""
    return encoder.embed_dim * (last_n if kind == "cls_last_n" else 1)


def encoder_features(encoder: VisionTransformer, images: Tensor, kind: FeatureKind = "cls", last_n: int = 4) -> Tensor:
    """Features of a timm ViT.

    Args:
        encoder: the ViT (its final ``norm`` is applied in every mode).
        images: ``[B, C, H, W]`` normalised.
        kind: ``cls`` ([CLS] after the final norm, MAE protocol), ``avgpool`` (mean of the normed
            patch tokens) or ``cls_last_n`` (concatenated normed [CLS] of the last ``last_n``
            blocks, iBOT's ViT-S protocol).
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
    tokens = encoder.forward_features(images)  # [B, prefix + L, D], final norm applied
    if kind == "cls":
        return tokens[:, 0]
    if kind == "avgpool":
        return tokens[:, encoder.num_prefix_tokens :].mean(dim=1)
    raise ValueError(f"unknown feature kind {kind!r}: use cls, avgpool or cls_last_n")
