"""RandAugment as UDA and Meta Pseudo Labels run it on images, per image and label-preserving.

UDA's image RandAugment (google-research/uda, ``image/randaugment``): for every image, ``num_ops``
operations drawn uniformly (with replacement) from the list below, each applied with probability
``op_prob`` (0.5) at a magnitude drawn uniformly from ``magnitude_range`` (1-9 on a 0-10 scale), then
Cutout. kornia's ``auto.RandAugment`` differs in ways that destroy grey images: it applies every drawn
op, to the whole batch, at one magnitude up to 29/30, with ``invert`` in its list and an ADDITIVE
brightness (factor 0.6 turns 0.5 into 0.1). Here every image draws its own ops and magnitudes, and the
photometric ops follow PIL's ``ImageEnhance`` (multiplicative brightness, contrast blended with the
image mean), built from ``kornia.enhance`` / ``kornia.geometry`` functions.

Operations (``m`` = magnitude / 10, in (0, 1); signed ops take a random sign):
identity, auto_contrast, equalize, rotate (+-30 m deg), posterize (8 - round(4 m) bits),
solarize (threshold 1 - m), colour (factor 0.1 + 1.8 m; colour images only), contrast, brightness,
sharpness (factor 0.1 + 1.8 m), shear_x / shear_y (+-0.3 m), translate_x / translate_y (+-0.3 m of the
side). Geometric ops fill with 0 (the Fashion-MNIST background). ``invert`` is left out: it swaps
figure and ground on grey images and is not in UDA's list.
"""
from __future__ import annotations

from typing import Callable

import kornia.enhance as KE
import kornia.geometry.transform as KT
import torch
from torch import Tensor, nn

from ssl_kit.errors import UserError

Op = Callable[[Tensor, Tensor], Tensor]  # ([N, C, H, W] in [0, 1], m [N] in (0, 1)) -> [N, C, H, W]


def _signed(m: Tensor) -> Tensor:
    return m * (torch.randint(0, 2, m.shape, device=m.device) * 2 - 1)


def _enhance_factor(m: Tensor) -> Tensor:
    """PIL ImageEnhance factor of UDA: ``m / 10 * 1.8 + 0.1`` (1 = unchanged)."""
    return 0.1 + 1.8 * m


def _grey(x: Tensor) -> Tensor:
    """``[N, C, H, W]`` -> ``[N, 1, H, W]`` luminance (ITU-R 601, as PIL's ``convert("L")``)."""
    if x.shape[1] == 1:
        return x
    return 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def auto_contrast(x: Tensor, m: Tensor) -> Tensor:
    """Stretch each image's channels to [0, 1] (PIL ``autocontrast``)."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)


def brightness(x: Tensor, m: Tensor) -> Tensor:
    """Multiplicative (PIL ``Brightness``): blend with black."""
    return KE.adjust_contrast(x, _enhance_factor(m))  # kornia's adjust_contrast multiplies by the factor


def contrast(x: Tensor, m: Tensor) -> Tensor:
    """PIL ``Contrast``: blend with the image's mean grey level."""
    factor = _enhance_factor(m).view(-1, 1, 1, 1)
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    return (mean + factor * (x - mean)).clamp(0, 1)


def colour(x: Tensor, m: Tensor) -> Tensor:
    """PIL ``Color``: blend with the grey image (identity on grey images)."""
    if x.shape[1] == 1:
        return x
    factor = _enhance_factor(m).view(-1, 1, 1, 1)
    grey = _grey(x)
    return (grey + factor * (x - grey)).clamp(0, 1)


def sharpness(x: Tensor, m: Tensor) -> Tensor:
    """PIL ``Sharpness``: blend with PIL's 3x3 SMOOTH image (factor < 1 blurs, > 1 sharpens); borders kept.
    (kornia's ``sharpness`` accepts only factors in [0, 1].)"""
    factor = _enhance_factor(m)
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device, dtype=x.dtype) / 13.0
    c = x.shape[1]
    blurred = torch.nn.functional.conv2d(x, kernel.expand(c, 1, 3, 3), padding=1, groups=c)
    blurred[..., 0, :], blurred[..., -1, :] = x[..., 0, :], x[..., -1, :]
    blurred[..., :, 0], blurred[..., :, -1] = x[..., :, 0], x[..., :, -1]
    f = factor.view(-1, 1, 1, 1)
    return (blurred + f * (x - blurred)).clamp(0, 1)


def equalize(x: Tensor, m: Tensor) -> Tensor:
    return KE.equalize(x)


def posterize(x: Tensor, m: Tensor) -> Tensor:
    return KE.posterize(x, (8 - torch.round(4 * m)).to(torch.int64))


def solarize(x: Tensor, m: Tensor) -> Tensor:
    return KE.solarize(x, 1.0 - m)


def rotate(x: Tensor, m: Tensor) -> Tensor:
    return KT.rotate(x, 30.0 * _signed(m))


def shear_x(x: Tensor, m: Tensor) -> Tensor:
    s = 0.3 * _signed(m)
    return KT.shear(x, torch.stack([s, torch.zeros_like(s)], dim=1))


def shear_y(x: Tensor, m: Tensor) -> Tensor:
    s = 0.3 * _signed(m)
    return KT.shear(x, torch.stack([torch.zeros_like(s), s], dim=1))


def translate_x(x: Tensor, m: Tensor) -> Tensor:
    t = 0.3 * x.shape[-1] * _signed(m)
    return KT.translate(x, torch.stack([t, torch.zeros_like(t)], dim=1))


def translate_y(x: Tensor, m: Tensor) -> Tensor:
    t = 0.3 * x.shape[-2] * _signed(m)
    return KT.translate(x, torch.stack([torch.zeros_like(t), t], dim=1))


def identity(x: Tensor, m: Tensor) -> Tensor:
    return x


OPS: dict[str, Op] = {
    "identity": identity, "auto_contrast": auto_contrast, "equalize": equalize, "rotate": rotate, "posterize": posterize,
    "solarize": solarize, "colour": colour, "contrast": contrast, "brightness": brightness, "sharpness": sharpness,
    "shear_x": shear_x, "shear_y": shear_y, "translate_x": translate_x, "translate_y": translate_y,
}


def cutout(x: Tensor, max_side: float, prob: float) -> Tensor:
    """With probability ``prob`` per image, a square of side uniform in ``(0, max_side]`` x image side at a
    uniform centre (clipped at the border), filled with the image's mean level. ``x``: ``[B, C, H, W]``."""
    b, _, h, w = x.shape
    apply = torch.rand(b, device=x.device) < prob
    side = (torch.rand(b, device=x.device) * max_side * min(h, w)).clamp_min(1.0)
    cy, cx = torch.rand(b, device=x.device) * h, torch.rand(b, device=x.device) * w
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    half = (side / 2).view(-1, 1, 1)
    inside = ((ys - cy.view(-1, 1, 1)).abs() < half) & ((xs - cx.view(-1, 1, 1)).abs() < half) & apply.view(-1, 1, 1)
    fill = x.mean(dim=(1, 2, 3), keepdim=True).expand_as(x)
    return torch.where(inside[:, None], fill, x)


class RandAugment(nn.Module):
    """Per-image RandAugment with UDA's sampling (see the module docstring).

    Args:
        num_ops: operations drawn per image (with replacement), 2 in UDA / FixMatch / MPL.
        magnitude_range: inclusive range of the uniform integer magnitude on a 0-10 scale (UDA: 1-9).
        op_prob: probability that each drawn operation is applied (UDA: 0.5).
        cutout_prob: probability of Cutout per image (UDA and FixMatch apply it after RandAugment).
        cutout_max_side: largest Cutout side as a fraction of the image side.
        ops: names from :data:`OPS` to draw from (default: all of them).
    """

    def __init__(self, num_ops: int = 2, magnitude_range: tuple[int, int] = (1, 9), op_prob: float = 0.5,
                 cutout_prob: float = 1.0, cutout_max_side: float = 0.5, ops: list[str] | None = None) -> None:
        super().__init__()
        lo, hi = magnitude_range
        if not 0 <= lo <= hi <= 10:
            raise UserError(f"--data.magnitude_range must lie in [0, 10] (UDA's RandAugment scale), got {magnitude_range}.")
        if not 0.0 <= op_prob <= 1.0 or not 0.0 <= cutout_prob <= 1.0:
            raise UserError(f"RandAugment probabilities must lie in [0, 1], got op_prob {op_prob}, cutout_prob {cutout_prob}.")
        unknown = sorted(set(ops or []) - set(OPS))
        if unknown:
            raise UserError(f"Unknown RandAugment operation(s) {unknown}: choose from {', '.join(OPS)}.")
        self.num_ops, self.magnitude_range, self.op_prob = num_ops, (lo, hi), op_prob
        self.cutout_prob, self.cutout_max_side = cutout_prob, cutout_max_side
        self.op_names = list(ops or OPS)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` in [0, 1] -> same shape in [0, 1]; every image has its own ops and magnitudes."""
        b = x.shape[0]
        lo, hi = self.magnitude_range
        x = x.clone()
        for _ in range(self.num_ops):
            choice = torch.randint(0, len(self.op_names), (b,), device=x.device)
            applied = torch.rand(b, device=x.device) < self.op_prob
            magnitude = torch.randint(lo, hi + 1, (b,), device=x.device).to(x.dtype) / 10.0
            for k, name in enumerate(self.op_names):
                rows = torch.nonzero((choice == k) & applied).flatten()
                if len(rows):
                    x[rows] = OPS[name](x[rows], magnitude[rows]).clamp(0, 1).to(x.dtype)
        if self.cutout_prob > 0:
            x = cutout(x, self.cutout_max_side, self.cutout_prob)
        return x
