"""Contextual relative position encoding (iRPE, Wu et al. 2021) for timm ViTs, as LoMaR uses it.

iRPE "product" method, contextual mode on keys, one table shared by all heads, [CLS] in its own
bucket (``skip=1``): for query token i and key token j at 2-D patch offset (dr, dc),

    bias[b, h, i, j] = q[b, h, i, :] . table[:, bucket(dr, dc)]

where ``bucket`` maps each axis offset through iRPE's piecewise index (exact for |x| <= alpha,
log-compressed beyond, clipped at beta; alpha, beta, gamma = 1, 2, 8 times ``ratio`` = 1.9) and
combines the two axes as ``(r + beta_int) * (2 beta_int + 1) + (c + beta_int)``: 49 buckets for
patches plus one for every pair that involves [CLS]. As in the LoMaR code, ``q`` is the unscaled
query (the attention logits are ``q k^T / sqrt(d) + bias``) and the table starts at zero.

The bias is computed per bucket (one ``[N, 50]`` matmul per head) and gathered into an
``[N, N]`` additive float mask, so attention still runs through
``torch.nn.functional.scaled_dot_product_attention``.

Because buckets depend only on offsets, and offsets beyond the trained window fall into the
outermost (clipped) buckets, an encoder trained on 7 x 7 windows runs on any full-image grid
without interpolation: :class:`VisionTransformerIRPE` sets the grid from its patch embedding.

The encoder is registered with timm as ``vit_irpe_patch16_224`` (importing ``ssl_kit.encoders`` registers
it), so exported weights load with ``timm.create_model("vit_irpe_patch16_224", pretrained=True,
pretrained_cfg_overlay=dict(file=...), **kwargs)``.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from ssl_kit.encoders.factory import EncoderConfigError, EncoderSpec

IRPE_MODEL = "vit_irpe_patch16_224"
DEFAULT_RATIO = 1.9


def piecewise_index(offsets: Tensor, alpha: float, beta: float, gamma: float) -> Tensor:
    """iRPE piecewise index (Eq. 18): exact near zero, logarithmic further out, clipped at beta.

    Args:
        offsets: integer relative positions, any shape.
        alpha, beta, gamma: breakpoints (iRPE uses 1, 2, 8 times a ratio).

    Returns:
        Long tensor of the same shape with values in ``[-int(beta), int(beta)]``.
    """
    x = offsets.double()
    far = alpha + torch.log(x.abs().clamp(min=1e-12) / alpha) / math.log(gamma / alpha) * (beta - alpha)
    far = (torch.sign(x) * far.round().clamp(max=beta))
    return torch.where(x.abs() <= alpha, x.round(), far).long()


@lru_cache(maxsize=32)
def product_bucket_ids(height: int, width: int, ratio: float = DEFAULT_RATIO, skip: int = 1) -> Tensor:
    """Bucket of every (query, key) pair of a ``height x width`` token grid with ``skip`` [CLS] tokens.

    Returns:
        ``[skip + H*W, skip + H*W]`` long tensor (CPU); pairs with [CLS] get the extra last bucket.
    """
    alpha, beta, gamma = ratio, 2 * ratio, 8 * ratio
    beta_int = int(beta)
    side = 2 * beta_int + 1
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], dim=1)  # [L, 2]
    diff = pos[:, None, :] - pos[None, :, :]  # [L, L, 2] query minus key
    r = piecewise_index(diff[..., 0], alpha, beta, gamma) + beta_int
    c = piecewise_index(diff[..., 1], alpha, beta, gamma) + beta_int
    patch_ids = r * side + c
    if skip == 0:
        return patch_ids
    length = height * width
    ids = torch.full((skip + length, skip + length), side * side, dtype=torch.long)
    ids[skip:, skip:] = patch_ids
    return ids


def num_buckets(ratio: float = DEFAULT_RATIO, skip: int = 1) -> int:
    """Patch buckets ``(2 int(2 ratio) + 1)^2`` plus one per skipped token."""
    return (2 * int(2 * ratio) + 1) ** 2 + skip


class ContextualRPE(nn.Module):
    """Query-dependent relative position bias on keys, shared across heads.

    Args:
        head_dim: per-head width d.
        ratio: iRPE bucket ratio (1.9: 7 x 7 patch buckets + [CLS]).
    """

    def __init__(self, head_dim: int, ratio: float = DEFAULT_RATIO) -> None:
        super().__init__()
        self.ratio = ratio
        self.table = nn.Parameter(torch.zeros(head_dim, num_buckets(ratio)))  # zero init as iRPE
        self.grid: tuple[int, int] | None = None  # token grid of the current forward (set by the encoder)

    def bucket_ids(self, num_tokens: int, device: torch.device) -> Tensor:
        """``[N, N]`` bucket ids for ``num_tokens`` = 1 + grid cells."""
        grid = self.grid
        if grid is None or grid[0] * grid[1] + 1 != num_tokens:
            side = math.isqrt(num_tokens - 1)
            if side * side + 1 != num_tokens:
                raise ValueError(f"{num_tokens} tokens are not [CLS] + a square grid; call set_token_grid(h, w)")
            grid = (side, side)
        return product_bucket_ids(grid[0], grid[1], self.ratio).to(device)

    def forward(self, q: Tensor) -> Tensor:
        """Bias for the attention logits.

        Args:
            q: ``[B, H, N, d]`` unscaled queries.

        Returns:
            ``[B, H, N, N]`` additive bias.
        """
        n = q.shape[2]
        per_bucket = q @ self.table.to(q.dtype)  # [B, H, N, buckets]
        ids = self.bucket_ids(n, q.device)  # [N, N]
        return torch.gather(per_bucket, 3, ids.expand(q.shape[0], q.shape[1], n, n))


class RPEAttention(Attention):
    """timm ``Attention`` plus :class:`ContextualRPE`; ``fused_attn`` selects SDPA or explicit softmax.

    The bucket ratio is a class attribute because timm instantiates ``attn_layer`` classes itself
    (see :func:`rpe_attention_class`).
    """

    rpe_ratio: float = DEFAULT_RATIO

    def __init__(self, dim: int, num_heads: int = 8, **kwargs: Any) -> None:
        super().__init__(dim, num_heads=num_heads, **kwargs)
        self.rpe = ContextualRPE(self.head_dim, self.rpe_ratio)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """``[B, N, C]`` -> ``[B, N, C]``; ``attn_mask`` (optional) is added to the position bias."""
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = self.rpe(q)
        if attn_mask is not None:
            bias = bias + attn_mask
        dropout = self.attn_drop.p if self.training else 0.0
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + bias
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(b, n, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(x)))


def rpe_attention_class(ratio: float) -> type[RPEAttention]:
    """:class:`RPEAttention` with the given bucket ratio (the class itself for the default)."""
    if ratio == DEFAULT_RATIO:
        return RPEAttention
    return type(f"RPEAttention_{ratio:g}", (RPEAttention,), {"rpe_ratio": ratio})


class VisionTransformerIRPE(VisionTransformer):
    """A timm VisionTransformer with contextual RPE in every block and no absolute position embedding."""

    def __init__(self, rpe_ratio: float = DEFAULT_RATIO, **kwargs: Any) -> None:
        kwargs.update(pos_embed="none", attn_layer=rpe_attention_class(rpe_ratio))
        super().__init__(**kwargs)

    def set_token_grid(self, height: int, width: int) -> None:
        """Tell every attention layer the patch grid behind the next sequences."""
        for m in self.modules():
            if isinstance(m, ContextualRPE):
                m.grid = (height, width)

    def _pos_embed(self, x: Tensor) -> Tensor:
        """No absolute position: record the grid (for the relative buckets) and prepend [CLS]."""
        if x.ndim == 4:  # dynamic_img_size: [B, H, W, C]
            self.set_token_grid(x.shape[1], x.shape[2])
        else:
            self.set_token_grid(*self.patch_embed.grid_size)
        return super()._pos_embed(x)


default_cfgs = {
    IRPE_MODEL: dict(url="", num_classes=0, input_size=(3, 224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                     first_conv="patch_embed.proj", classifier="head", license="apache-2.0"),
}


@register_model
def vit_irpe_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformerIRPE:
    """ViT with iRPE contextual product RPE (LoMaR encoder); sizes come from kwargs (default ViT-B/16)."""
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return build_model_with_cfg(
        VisionTransformerIRPE, IRPE_MODEL, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **dict(args, **kwargs)
    )


def irpe_spec(spec: EncoderSpec, ratio: float = DEFAULT_RATIO) -> EncoderSpec:
    """The iRPE twin of a ViT spec: same sizes, relative instead of absolute positions.

    For a plain timm name (not a preset) the architecture sizes are read from the model built on
    the ``meta`` device, so ``vit_small_patch16_224`` becomes an iRPE ViT-S.
    """
    kwargs = dict(spec.kwargs)
    if spec.timm_name != IRPE_MODEL and not {"embed_dim", "depth", "num_heads"} <= kwargs.keys():
        with torch.device("meta"):
            plain = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
        if not isinstance(plain, VisionTransformer):
            raise EncoderConfigError(f"{spec.timm_name!r} is not a VisionTransformer")
        kwargs.update(embed_dim=plain.embed_dim, depth=len(plain.blocks), num_heads=plain.blocks[0].attn.num_heads,
                      mlp_ratio=plain.blocks[0].mlp.fc1.out_features / plain.embed_dim)
    kwargs["rpe_ratio"] = ratio
    return EncoderSpec(IRPE_MODEL, kwargs)
