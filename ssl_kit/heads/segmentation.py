"""Semantic segmentation on the shared ViT: patch tokens -> feature map -> progressive upsampling head.

The ViT has no hierarchy, so the head rebuilds resolution from its last feature map (as ViTDet's simple
feature pyramid does): ``num_upsample`` stages of 2x transposed convolution + 3x3 convolution. Two outputs
at that resolution: class logits, and U2PL's 256-d representation (conv-norm-ReLU-conv); the logits are
upsampled bilinearly to the image size for the pixel losses and evaluation.

Norm layers: ``batch`` (BatchNorm, as the reference's DeepLab head; its statistics depend on the device batch)
or ``layer`` (LayerNorm over the channels of each pixel, as ViTDet's pyramid: no statistic crosses images, so
the head computes the same on any number of processes without synchronisation).
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn


class SegmentationOutput(NamedTuple):
    logits: Tensor  # [B, K, H, W] at image resolution
    logits_low: Tensor  # [B, K, h, w] at head resolution
    rep: Tensor | None  # [B, R, h, w] representation for the contrastive loss (None: head built without it)


def vit_feature_map(encoder: VisionTransformer, images: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, D, H / p, W / p]``: the final-norm patch tokens as a map (prefix tokens dropped)."""
    tokens = encoder.forward_features(images)[:, encoder.num_prefix_tokens:]
    patch_h, patch_w = encoder.patch_embed.patch_size
    h, w = images.shape[-2] // patch_h, images.shape[-1] // patch_w
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


HeadNorm = Literal["batch", "layer"]


def norm_2d(kind: HeadNorm, channels: int) -> nn.Module:
    """``batch``: BatchNorm2d; ``layer``: LayerNorm over the channels of each pixel (timm's LayerNorm2d)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return LayerNorm2d(channels)
    raise ValueError(f"norm must be 'batch' or 'layer', got {kind!r}")


def _conv_norm_act(cin: int, cout: int, norm: HeadNorm, kernel: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), norm_2d(norm, cout), nn.GELU()]


class ProgressiveUpsamplingHead(nn.Module):
    """ViT feature map -> (logits, representation) at ``2 ** num_upsample`` times the token resolution.

    Args:
        embed_dim: ViT width D.
        num_classes: K (background included).
        hidden_dim: channels of the upsampling stages.
        rep_dim: representation channels (256 in U2PL).
        num_upsample: 2x stages (1: 32x32 from 16x16 tokens, i.e. stride 2 for patch 4).
        dropout: dropout before the classifier.
        norm: ``batch`` or ``layer`` (module docstring).
        representation: build the representation branch; without it (a run with no contrastive loss) the
            forward returns ``None`` for it and skips its 3x3 conv at head resolution, the costliest layer of
            the head (seg_supervised step at batch 32, patch 8: 1.37x faster).
    """

    def __init__(self, embed_dim: int, num_classes: int, hidden_dim: int = 128, rep_dim: int = 256,
                 num_upsample: int = 1, dropout: float = 0.1, norm: HeadNorm = "batch",
                 representation: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = embed_dim
        for _ in range(num_upsample):
            layers += [nn.ConvTranspose2d(cin, hidden_dim, 2, stride=2), norm_2d(norm, hidden_dim), nn.GELU()]
            layers += _conv_norm_act(hidden_dim, hidden_dim, norm)
            cin = hidden_dim
        if num_upsample == 0:
            layers += _conv_norm_act(cin, hidden_dim, norm)
        self.decoder = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(hidden_dim, num_classes, 1))
        self.representation = nn.Sequential(*_conv_norm_act(hidden_dim, rep_dim, norm)[:2], nn.ReLU(),
                                            nn.Conv2d(rep_dim, rep_dim, 1)) if representation else None

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor | None]:
        """``[B, D, h0, w0]`` -> logits ``[B, K, h, w]``, representation ``[B, R, h, w]`` (or None)."""
        x = self.decoder(features)
        return self.classifier(x), None if self.representation is None else self.representation(x)


class SegmentationNet(nn.Module):
    """ViT encoder + :class:`ProgressiveUpsamplingHead`; one forward gives :class:`SegmentationOutput`."""

    def __init__(self, encoder: VisionTransformer, head: ProgressiveUpsamplingHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, images: Tensor) -> SegmentationOutput:
        logits_low, rep = self.head(vit_feature_map(self.encoder, images))
        logits = F.interpolate(logits_low, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return SegmentationOutput(logits, logits_low, rep)
