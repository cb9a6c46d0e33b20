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


def save_pseudo_label_grid(
    weak: Tensor, strong: Tensor, probs: Tensor, classes: Sequence[str], threshold: float, path: str | Path,
    mean: Sequence[float], std: Sequence[float],
) -> Path:
    """Unlabeled images as the consistency loss sees them: weak view (top) with the pseudo label and its
    confidence, green when it passes the mask, grey when it does not; strong view (bottom).

    Args:
        weak, strong: ``[N, C, H, W]`` normalised views of the same images.
        probs: ``[N, K]`` predicted probabilities on the weak view.
        classes: K class names.
        threshold: confidence mask threshold.
        path: PNG file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = weak.shape[0]
    rows = [denormalize(v.detach().float().cpu(), mean, std) for v in (weak, strong)]
    conf, label = probs.detach().float().cpu().max(dim=1)
    fig, axes = plt.subplots(2, n, figsize=(1.3 * n, 3.0), squeeze=False)
    for i in range(n):
        for r, row in enumerate(rows):
            image = row[i].permute(1, 2, 0).numpy()
            axes[r][i].imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
            axes[r][i].axis("off")
        name = classes[int(label[i])] if classes else str(int(label[i]))
        passed = float(conf[i]) > threshold
        axes[0][i].set_title(f"{name[:10]}\n{float(conf[i]):.2f}", fontsize=7, color="green" if passed else "grey")
    fig.suptitle(f"pseudo labels on weak views (green: confidence > {threshold}); strong views below", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def save_segmentation_grid(
    images: Tensor, ground_truth: Tensor, pseudo: Tensor, entropy: Tensor, reliable: Tensor, path: str | Path,
    mean: Sequence[float], std: Sequence[float], num_classes: int, alpha: float,
) -> Path:
    """One row per image: image / ground truth / teacher pseudo label / entropy map / reliable mask.

    Args:
        images: ``[N, C, H, W]`` normalised.
        ground_truth, pseudo: ``[N, H, W]`` class maps (255 = ignore, drawn white).
        entropy: ``[N, H, W]`` teacher entropy (nats), drawn on a shared scale ``[0, log K]``.
        reliable: ``[N, H, W]`` bool, pixels that keep their pseudo label.
        num_classes: K, for a fixed colour per class.
        alpha: unreliable percentage the mask was drawn with.
    """
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    colours = plt.get_cmap("tab20")(range(20))[: max(num_classes, 1)]
    cmap = ListedColormap(colours)
    cmap.set_over("white")
    shown = denormalize(images.detach().float().cpu(), mean, std)
    titles = ["image", "ground truth", "pseudo label", "entropy", f"reliable ({100 - alpha:.0f} %)"]
    n = shown.shape[0]
    fig, axes = plt.subplots(n, 5, figsize=(7.5, 1.5 * n), squeeze=False)
    for i in range(n):
        image = shown[i].permute(1, 2, 0).numpy()
        panels = [
            (image[..., 0] if image.shape[-1] == 1 else image, dict(cmap="gray", vmin=0, vmax=1)),
            (ground_truth[i].cpu().numpy(), dict(cmap=cmap, vmin=-0.5, vmax=num_classes - 0.5, interpolation="nearest")),
            (pseudo[i].cpu().numpy(), dict(cmap=cmap, vmin=-0.5, vmax=num_classes - 0.5, interpolation="nearest")),
            (entropy[i].float().cpu().numpy(), dict(cmap="magma", vmin=0, vmax=math.log(num_classes))),
            (reliable[i].float().cpu().numpy(), dict(cmap="gray", vmin=0, vmax=1, interpolation="nearest")),
        ]
        for j, (data, style) in enumerate(panels):
            axes[i][j].imshow(data, **style)
            axes[i][j].axis("off")
            if i == 0:
                axes[i][j].set_title(titles[j], fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
