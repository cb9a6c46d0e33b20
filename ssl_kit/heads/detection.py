"""Object detection on the shared ViT: ViTDet's simple feature pyramid inside torchvision's Faster R-CNN.

The plain ViT has one feature map (stride = patch size). Following Li et al. 2022 ("Exploring Plain Vision
Transformer Backbones for Object Detection"), the pyramid is built from that last map alone: 2x transposed
convolutions for finer strides, max-pooling for coarser ones, each followed by a 1x1 and a 3x3 convolution
with channel LayerNorms. torchvision supplies everything else unchanged: anchor generator, RPN, RoIAlign
(``MultiScaleRoIAlign``), box coder, sampling, losses and NMS.

Images reach the detector already normalised and of one size, so torchvision's ``GeneralizedRCNNTransform``
(resizing, normalisation) is not used; the RPN and RoI heads are called directly, which also lets Soft Teacher
score arbitrary boxes with the box head (:meth:`ViTDetector.classify_boxes`).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
from timm.layers import LayerNorm2d
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign

from ssl_kit.errors import UserError
from ssl_kit.heads.segmentation import vit_feature_map
from ssl_kit.runtime import eval_mode


def _power_of_two(value: float) -> bool:
    return value > 0 and math.log2(value).is_integer()


class SimpleFeaturePyramid(nn.Module):
    """Stride-``patch_size`` ViT map ``[B, D, H/p, W/p]`` -> ``{"p2": [B, C, H/4, W/4], ..., "p5": ...}``.

    Args:
        embed_dim: ViT width D.
        patch_size: p (the map's stride).
        out_channels: C of every level.
        strides: output strides, powers of two (ViTDet: 4, 8, 16, 32).
    """

    def __init__(self, embed_dim: int, patch_size: int, out_channels: int = 128,
                 strides: Sequence[int] = (4, 8, 16, 32)) -> None:
        super().__init__()
        self.levels = nn.ModuleDict()
        for stride in strides:
            scale = patch_size / stride
            if not _power_of_two(stride) or not _power_of_two(scale):
                raise UserError(f"Feature pyramid stride {stride} cannot be made from the patch-{patch_size} ViT map: "
                                "strides and the patch size must be powers of two.")
            layers: list[nn.Module] = []
            dim = embed_dim
            if scale >= 1:
                steps = int(math.log2(scale))
                for i in range(steps):
                    layers.append(nn.ConvTranspose2d(dim, dim // 2, 2, stride=2))
                    dim //= 2
                    if i < steps - 1:
                        layers += [LayerNorm2d(dim), nn.GELU()]
            else:
                layers.append(nn.MaxPool2d(int(1 / scale), stride=int(1 / scale)))
            layers += [nn.Conv2d(dim, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                       nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels)]
            self.levels[f"p{int(math.log2(stride))}"] = nn.Sequential(*layers)

    def forward(self, feature_map: Tensor) -> OrderedDict[str, Tensor]:
        return OrderedDict((name, level(feature_map)) for name, level in self.levels.items())


def anchor_levels(anchor_sizes: Sequence[int | Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    """``[16, [32, 48], ...]`` -> ``((16,), (32, 48), ...)``: the anchor sizes of each pyramid level."""
    return tuple((int(a),) if isinstance(a, (int, float)) else tuple(int(v) for v in a) for a in anchor_sizes)


class ViTDetector(nn.Module):
    """ViT + simple feature pyramid + torchvision RPN and RoI heads (Faster R-CNN).

    Args:
        encoder: the shared timm ViT.
        num_classes: classes including background (label 0).
        fpn_channels: pyramid channels.
        strides: pyramid strides.
        anchor_sizes: per level one anchor size or several (pixels), three aspect ratios each.
        rpn_pre_nms, rpn_post_nms: proposals kept per level before NMS / in all after NMS, (train, test).
        rpn_batch, roi_batch: anchors / proposals sampled per image for the losses.
        representation: width of the two-layer box head.
        score_thresh, nms_thresh, detections_per_img: detection post-processing (evaluation, teacher). The
            score threshold is 0 so that mAP, a ranking metric, sees every detection (torchvision's 0.05 cut
            them all while the 11-way softmax is still dominated by background); pseudo boxes have their own.
    """

    def __init__(
        self, encoder: VisionTransformer, num_classes: int, fpn_channels: int = 128,
        strides: Sequence[int] = (4, 8, 16, 32), anchor_sizes: Sequence[int | Sequence[int]] = (16, 32, 64, 128),
        rpn_pre_nms: tuple[int, int] = (1000, 500), rpn_post_nms: tuple[int, int] = (500, 200),
        rpn_batch: int = 256, roi_batch: int = 128, representation: int = 256, score_thresh: float = 0.0,
        nms_thresh: float = 0.5, detections_per_img: int = 50,
    ) -> None:
        super().__init__()
        if len(anchor_sizes) != len(strides):
            raise UserError(f"--model.anchor_sizes needs one size per pyramid level ({len(strides)}), got {list(anchor_sizes)}.")
        self.encoder = encoder
        self.pyramid = SimpleFeaturePyramid(encoder.embed_dim, encoder.patch_embed.patch_size[0], fpn_channels, strides)
        names = list(self.pyramid.levels)
        levels = anchor_levels(anchor_sizes)
        if len({len(sizes) for sizes in levels}) != 1:
            raise UserError(f"--model.anchor_sizes needs as many sizes at every pyramid level (one RPN head serves them "
                            f"all), got {[list(sizes) for sizes in levels]}.")
        anchors = AnchorGenerator(levels, ((0.5, 1.0, 2.0),) * len(levels))
        self.rpn = RegionProposalNetwork(
            anchors, RPNHead(fpn_channels, anchors.num_anchors_per_location()[0]), fg_iou_thresh=0.7, bg_iou_thresh=0.3,
            batch_size_per_image=rpn_batch, positive_fraction=0.5,
            pre_nms_top_n=dict(training=rpn_pre_nms[0], testing=rpn_pre_nms[1]),
            post_nms_top_n=dict(training=rpn_post_nms[0], testing=rpn_post_nms[1]), nms_thresh=0.7)
        self.roi_heads = RoIHeads(
            MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2),
            TwoMLPHead(fpn_channels * 7 * 7, representation), FastRCNNPredictor(representation, num_classes),
            fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=roi_batch, positive_fraction=0.25,
            bbox_reg_weights=None, score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections_per_img)

    def features(self, images: Tensor) -> OrderedDict[str, Tensor]:
        """``[B, C, H, W]`` normalised images -> the pyramid's maps."""
        return self.pyramid(vit_feature_map(self.encoder, images))

    @staticmethod
    def image_list(images: Tensor) -> ImageList:
        return ImageList(images, [tuple(images.shape[-2:])] * len(images))

    def supervised_losses(self, images: Tensor, features: OrderedDict[str, Tensor],
                          targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Faster R-CNN losses (``loss_objectness``, ``loss_rpn_box_reg``, ``loss_classifier``, ``loss_box_reg``)."""
        image_list = self.image_list(images)
        proposals, rpn_losses = self.rpn(image_list, features, targets)
        _, roi_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        return {**rpn_losses, **roi_losses}

    def detect_from_features(self, images: Tensor, features: OrderedDict[str, Tensor]) -> list[dict[str, Tensor]]:
        """Detections (``boxes`` xyxy, ``scores``, ``labels``) after score threshold and per-class NMS.
        Call in eval mode."""
        image_list = self.image_list(images)
        proposals, _ = self.rpn(image_list, features)
        detections, _ = self.roi_heads(features, proposals, image_list.image_sizes)
        return detections

    def detect(self, images: Tensor) -> list[dict[str, Tensor]]:
        """Detections for ``[B, C, H, W]`` images in eval mode (the training mode is restored)."""
        with eval_mode(self):
            return self.detect_from_features(images, self.features(images))

    def classify_boxes(self, features: OrderedDict[str, Tensor], boxes: list[Tensor],
                       image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """The box head on given boxes: class logits ``[P, K]`` and box deltas ``[P, 4K]`` (P = all boxes)."""
        pooled = self.roi_heads.box_roi_pool(features, boxes, [image_size] * len(boxes))
        return self.roi_heads.box_predictor(self.roi_heads.box_head(pooled))

    def refine_boxes(self, features: OrderedDict[str, Tensor], boxes: list[Tensor], labels: list[Tensor],
                     image_size: tuple[int, int]) -> list[Tensor]:
        """Boxes regressed by the box head for the given class of each box (Soft Teacher's jitter refinement).

        Args:
            boxes: per image ``[n, 4]``; labels: per image ``[n]`` classes whose regression is applied.

        Returns:
            per image ``[n, 4]`` refined boxes.
        """
        _, deltas = self.classify_boxes(features, boxes, image_size)
        decoded = self.roi_heads.box_coder.decode(deltas, boxes)  # [P, K, 4]
        flat_labels = torch.cat(labels)
        picked = decoded[torch.arange(len(flat_labels), device=decoded.device), flat_labels]
        return list(picked.split([len(b) for b in boxes]))
