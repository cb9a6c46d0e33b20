"""Pure token helpers shared by the methods: patchify, random / block masks, windows of patches.

Notation: B batch, L number of patches, D embed dim, p patch size, C channels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ssl_kit.encoders.factory import EncoderConfigError


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Cut images into flattened patches.

    Args:
        images: ``[B, C, H, W]`` with H and W divisible by ``patch_size``.
        patch_size: p.

    Returns:
        ``[B, L, p*p*C]`` with L = (H/p)(W/p), row-major patch order, pixel order (p, p, C).
    """
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise EncoderConfigError(f"image size {h}x{w} is not divisible by patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, patch_size: int, channels: int, grid: tuple[int, int] | None = None) -> Tensor:
    """Inverse of :func:`patchify`.

    Args:
        patches: ``[B, L, p*p*C]``.
        patch_size: p.
        channels: C.
        grid: (rows, cols) of the patch grid; square if omitted.

    Returns:
        ``[B, C, rows*p, cols*p]``.
    """
    b, length, _ = patches.shape
    p = patch_size
    if grid is None:
        side = int(round(length**0.5))
        if side * side != length:
            raise EncoderConfigError(f"{length} patches do not form a square grid; pass grid=(rows, cols)")
        grid = (side, side)
    gh, gw = grid
    x = patches.reshape(b, gh, gw, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, gh * p, gw * p)


@dataclass
class RandomMask:
    """Result of per-sample random masking.

    Attributes:
        ids_keep: ``[B, L_keep]`` indices of visible patches (in shuffled order).
        ids_restore: ``[B, L]`` inverse permutation that puts shuffled tokens back in place.
        mask: ``[B, L]`` float, 1 = masked (dropped), 0 = visible, in original patch order.
    """

    ids_keep: Tensor
    ids_restore: Tensor
    mask: Tensor


def random_masking(
    batch: int, length: int, mask_ratio: float, device: torch.device | str = "cpu", generator: torch.Generator | None = None
) -> RandomMask:
    """Uniform per-sample masking without replacement (MAE): keep ``int(L * (1 - ratio))`` patches.

    noise ~ U(0, 1)[B, L]; ids_shuffle = argsort(noise); the first L_keep are visible;
    ids_restore = argsort(ids_shuffle).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    len_keep = int(length * (1 - mask_ratio))
    noise = torch.rand(batch, length, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(batch, length, device=device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return RandomMask(ids_keep=ids_keep, ids_restore=ids_restore, mask=mask)


def gather_tokens(tokens: Tensor, ids: Tensor) -> Tensor:
    """Select tokens per sample: ``[B, L, D]`` x ``[B, K]`` -> ``[B, K, D]``."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


@dataclass
class Windows:
    """Random square windows of patches, several per image (LoMaR).

    Attributes:
        patch_ids: ``[B, M, K*K]`` row-major patch indices into the image's ``[L]`` patches.
        offsets: ``[B, M, 2]`` (row, col) of each window's top-left patch.
        size: K.
    """

    patch_ids: Tensor
    offsets: Tensor
    size: int


def sample_windows(
    batch: int, grid: tuple[int, int], size: int, num_windows: int,
    device: torch.device | str = "cpu", generator: torch.Generator | None = None,
) -> Windows:
    """Per image, ``num_windows`` DIFFERENT K x K windows at random offsets inside the patch grid.

    Offsets are drawn without replacement from the ``(gh-K+1) * (gw-K+1)`` possible positions,
    independently per image; when there are fewer positions than windows, positions repeat
    (each still uniformly random).

    Args:
        batch: B.
        grid: patch grid (rows, cols).
        size: window side K in patches (<= both grid sides).
        num_windows: M.
    """
    gh, gw = grid
    if size > gh or size > gw:
        raise EncoderConfigError(f"window of {size}x{size} patches does not fit a {gh}x{gw} patch grid")
    rows, cols = gh - size + 1, gw - size + 1
    positions = rows * cols
    noise = torch.rand(batch, positions, device=device, generator=generator)
    if positions >= num_windows:
        choice = noise.argsort(dim=1)[:, :num_windows]  # distinct positions per image
    else:
        choice = torch.randint(positions, (batch, num_windows), device=device, generator=generator)
    top, left = choice // cols, choice % cols  # [B, M]
    k = torch.arange(size, device=device)
    patch_rows = top[..., None, None] + k[:, None]  # [B, M, K, 1]
    patch_cols = left[..., None, None] + k[None, :]  # [B, M, 1, K]
    ids = (patch_rows * gw + patch_cols).reshape(batch, num_windows, size * size)
    return Windows(patch_ids=ids, offsets=torch.stack([top, left], dim=-1), size=size)


def random_subset_mask(rows: int, length: int, num_masked: int, device: torch.device | str = "cpu",
                       generator: torch.Generator | None = None) -> Tensor:
    """``[rows, length]`` bool mask with exactly ``num_masked`` True per row, uniformly placed."""
    ranks = torch.rand(rows, length, device=device, generator=generator).argsort(dim=1).argsort(dim=1)
    return ranks < num_masked


def random_count_mask(grid: tuple[int, int], num_masked: int, generator: torch.Generator | None = None) -> Tensor:
    """``[gh, gw]`` bool mask with exactly ``num_masked`` True cells, uniformly placed."""
    gh, gw = grid
    mask = torch.zeros(gh * gw, dtype=torch.bool)
    mask[torch.randperm(gh * gw, generator=generator)[:num_masked]] = True
    return mask.view(gh, gw)


def block_mask(grid: tuple[int, int], num_masked: int, min_block: int = 16, max_aspect: float = 1 / 0.3,
               attempts: int = 10, generator: torch.Generator | None = None) -> Tensor:
    """BEiT block-wise masking: rectangles until about ``num_masked`` cells are masked, never more.

    Each block has area ~ U(min_block, remaining budget) and aspect ratio log-uniform in
    ``(1/max_aspect, max_aspect)``; up to ``attempts`` tries per block; a block only counts the
    cells it newly masks, and is rejected if that would exceed ``num_masked``.

    Returns:
        ``[gh, gw]`` bool mask with at most ``num_masked`` True cells.
    """
    gh, gw = grid
    mask = torch.zeros(gh, gw, dtype=torch.bool)
    log_aspect = (math.log(1 / max_aspect), math.log(max_aspect))

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    count = 0
    while count < num_masked:
        budget = num_masked - count
        added = 0
        for _ in range(attempts):
            area = uniform(min(min_block, budget), budget)
            aspect = math.exp(uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if not (0 < h < gh and 0 < w < gw):
                continue
            top = int(torch.randint(0, gh - h + 1, (), generator=generator))
            left = int(torch.randint(0, gw - w + 1, (), generator=generator))
            new = int((~mask[top : top + h, left : left + w]).sum())
            if 0 < new <= budget:
                mask[top : top + h, left : left + w] = True
                added = new
                break
        if added == 0:
            break
        count += added
    return mask
