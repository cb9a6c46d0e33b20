"""Boxes under the geometric augmentations of a detection pipeline, through recorded 3x3 matrices.

Coordinates are pixel EDGES (``x`` from 0 to W, a box ``[x1, y1, x2, y2]`` covers ``x1 <= x < x2``), the
convention of COCO and torchvision's detectors. Every geometric op of :mod:`ssl_kit.data.detection_module`
records its matrix ``M`` (``[B, 3, 3]``, mapping a point of the input view to the output view), so pseudo
boxes found by the teacher in the weak view are carried into the student's strong view with ``M`` and the
student's proposals are carried back with ``M^-1``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def flip_matrices(flipped: Tensor, width: int) -> Tensor:
    """``[B]`` bool -> ``[B, 3, 3]``: ``x -> W - x`` where flipped, identity elsewhere."""
    m = torch.eye(3, device=flipped.device).repeat(len(flipped), 1, 1)
    m[flipped, 0, 0] = -1.0
    m[flipped, 0, 2] = float(width)
    return m


def centred(linear: Tensor, size: int) -> Tensor:
    """``[B, 2, 2]`` linear maps about the image centre -> ``[B, 3, 3]`` affine maps in edge coordinates."""
    c = size / 2.0
    m = torch.eye(3, device=linear.device).repeat(len(linear), 1, 1)
    m[:, :2, :2] = linear
    centre = torch.tensor([c, c], device=linear.device)
    m[:, :2, 2] = centre - (linear @ centre)
    return m


def translation_matrices(shift: Tensor) -> Tensor:
    """``[B, 2]`` shifts in pixels -> ``[B, 3, 3]``."""
    m = torch.eye(3, device=shift.device).repeat(len(shift), 1, 1)
    m[:, :2, 2] = shift
    return m


def rotation_matrices(degrees: Tensor, size: int) -> Tensor:
    """``[B]`` angles (counter-clockwise on screen) -> ``[B, 3, 3]`` rotations about the image centre."""
    a = degrees * math.pi / 180.0
    cos, sin = torch.cos(a), torch.sin(a)
    return centred(torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2), size)


def shear_matrices(degrees: Tensor, horizontal: Tensor, size: int) -> Tensor:
    """``[B]`` shear angles, ``[B]`` bool (x sheared by y, else y by x) -> ``[B, 3, 3]`` about the centre."""
    t = torch.tan(degrees * math.pi / 180.0)
    linear = torch.eye(2, device=degrees.device).repeat(len(degrees), 1, 1)
    linear[:, 0, 1] = torch.where(horizontal, t, torch.zeros_like(t))
    linear[:, 1, 0] = torch.where(horizontal, torch.zeros_like(t), t)
    return centred(linear, size)


def transform_boxes(boxes: Tensor, matrix: Tensor) -> Tensor:
    """Map ``[N, 4]`` xyxy boxes with one ``[3, 3]`` matrix: the smallest box holding the four mapped corners
    (exact for flips, translations and scalings; encloses the rotated box otherwise)."""
    if boxes.numel() == 0:
        return boxes.reshape(0, 4)
    x1, y1, x2, y2 = boxes.unbind(-1)
    corners = torch.stack([torch.stack([x1, y1], -1), torch.stack([x2, y1], -1),
                           torch.stack([x1, y2], -1), torch.stack([x2, y2], -1)], 1)  # [N, 4, 2]
    mapped = corners @ matrix[:2, :2].T.to(boxes.dtype) + matrix[:2, 2].to(boxes.dtype)
    return torch.cat([mapped.amin(1), mapped.amax(1)], -1)


def clip_and_keep(boxes: Tensor, size: int, min_side: float = 2.0) -> tuple[Tensor, Tensor]:
    """Clip ``[N, 4]`` boxes to the ``size`` x ``size`` image; returns the clipped boxes and a ``[N]`` bool of
    those still at least ``min_side`` pixels wide and high (boxes pushed out of the view are dropped)."""
    clipped = boxes.clamp(0.0, float(size))
    keep = ((clipped[:, 2] - clipped[:, 0]) >= min_side) & ((clipped[:, 3] - clipped[:, 1]) >= min_side)
    return clipped, keep


def map_boxes(boxes: list[Tensor], matrices: Tensor, size: int, min_side: float = 2.0) -> tuple[list[Tensor], list[Tensor]]:
    """Per image: map its boxes with its matrix, clip to the view and keep the boxes still visible.

    Returns the mapped boxes and, per image, the indices of the kept boxes (to select labels / scores).
    """
    out, kept = [], []
    for b, m in zip(boxes, matrices):
        mapped, keep = clip_and_keep(transform_boxes(b, m), size, min_side)
        out.append(mapped[keep])
        kept.append(keep.nonzero().flatten())
    return out, kept


def edge_to_centre(matrix: Tensor) -> Tensor:
    """An edge-coordinate map as the pixel-centre map kornia's ``warp_affine`` expects (centres at integers)."""
    shift = torch.eye(3, device=matrix.device, dtype=matrix.dtype)
    shift[:2, 2] = 0.5
    back = torch.eye(3, device=matrix.device, dtype=matrix.dtype)
    back[:2, 2] = -0.5
    return back @ matrix @ shift
