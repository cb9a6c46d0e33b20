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


def _plot_boxes(axis: object, boxes: Tensor, labels: Tensor, colours: Sequence, captions: list[str]) -> None:
    from matplotlib.patches import Rectangle

    for box, label, caption in zip(boxes.tolist(), labels.tolist(), captions):
        x1, y1, x2, y2 = box
        colour = colours[int(label) % len(colours)]
        axis.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.0))
        axis.text(x1, y1, caption, color="black", fontsize=4, va="bottom",
                  bbox=dict(facecolor=colour, alpha=0.8, pad=0.5, linewidth=0))


def save_detection_grid(
    images: Tensor, ground_truth: list[dict[str, Tensor]], teacher: list[dict[str, Tensor]],
    student: list[dict[str, Tensor]], path: str | Path, mean: Sequence[float], std: Sequence[float],
    classes: Sequence[str], cls_threshold: float, reg_threshold: float, min_score: float = 0.5,
) -> Path:
    """One row per image: ground truth / teacher pseudo-box candidates / student detections.

    Args:
        images: ``[N, C, H, W]`` normalised.
        ground_truth: per image ``boxes`` ``[n, 4]`` xyxy and ``labels``.
        teacher: per image candidates with ``scores`` and ``uncertainty``; drawn solid when they pass
            ``cls_threshold`` (classification) and captioned ``score / uncertainty`` with a ``*`` when the
            uncertainty is below ``reg_threshold`` (regression).
        student: per image detections; those above ``min_score`` are drawn.
        classes: names by label (0 = background).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10")(range(10))
    shown = denormalize(images.detach().float().cpu(), mean, std)
    n = shown.shape[0]
    titles = ["ground truth", f"teacher (solid: score > {cls_threshold}; *: unc < {reg_threshold})",
              f"student (score > {min_score})"]
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
    short = [name.split("/")[0][:8] for name in classes]
    for i in range(n):
        image = shown[i].permute(1, 2, 0).numpy()
        gt, tea = ground_truth[i], {k: v.cpu() for k, v in teacher[i].items()}
        stu = {k: v.cpu() for k, v in student[i].items()}
        keep = stu["scores"] > min_score
        for j in range(3):
            axes[i][j].imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
            axes[i][j].axis("off")
        _plot_boxes(axes[i][0], gt["boxes"].cpu(), gt["labels"].cpu(), colours, [short[c] for c in gt["labels"].tolist()])
        captions = [f"{short[c]} {s:.2f}/{u:.3f}{'*' if u < reg_threshold else ''}"
                    for c, s, u in zip(tea["labels"].tolist(), tea["scores"].tolist(), tea["uncertainty"].tolist())]
        confident = tea["scores"] > cls_threshold
        _plot_boxes(axes[i][1], tea["boxes"][confident], tea["labels"][confident], colours,
                    [c for c, k in zip(captions, confident.tolist()) if k])
        for patch_box, label, caption in zip(tea["boxes"][~confident], tea["labels"][~confident],
                                             [c for c, k in zip(captions, confident.tolist()) if not k]):
            _plot_boxes(axes[i][1], patch_box[None], label[None], [(0.6, 0.6, 0.6, 1.0)] * 10, [caption])
        _plot_boxes(axes[i][2], stu["boxes"][keep], stu["labels"][keep], colours,
                    [f"{short[c]} {s:.2f}" for c, s in zip(stu["labels"][keep].tolist(), stu["scores"][keep].tolist())])
        if i == 0:
            for j, title in enumerate(titles):
                axes[i][j].set_title(title, fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
