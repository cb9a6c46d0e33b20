"""Pictures a person would rather look at than read."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from torchvision.utils import save_image


def denormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``[B, C, H, W]`` normalised -> [0, 1] for display."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images * s + m).clamp(0, 1)


def save_panel_grid(panels: dict[str, Tensor], path: str | Path, mean: Sequence[float], std: Sequence[float], scale: int = 4) -> Path:
    """Save rows of images, one row per panel (e.g. original / masked / reconstruction).

    Args:
        panels: name -> ``[B, C, H, W]`` normalised images (same B for all).
        path: PNG file.
        mean: normalisation mean used for the images.
        std: normalisation std.
        scale: nearest-neighbour upscaling so small images are visible.
    """
    rows = [denormalize(p.detach().float().cpu(), mean, std) for p in panels.values()]
    grid = torch.cat(rows, dim=0)
    if scale > 1:
        grid = torch.nn.functional.interpolate(grid, scale_factor=scale, mode="nearest")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, str(path), nrow=rows[0].shape[0], padding=2, pad_value=1.0)
    return path
