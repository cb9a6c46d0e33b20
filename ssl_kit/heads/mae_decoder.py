"""MAE's lightweight decoder: mask tokens, unshuffle, fixed sin-cos position embedding, pixels."""
from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ssl_kit.encoders import gather_tokens, init_weights_mae, sincos_2d_pos_embed


class MAEDecoder(nn.Module):
    """Narrow, shallow transformer that predicts the pixels of every patch.

    Args:
        encoder_dim: D of the encoder output.
        grid_size: (rows, cols) of the patch grid.
        patch_size: p.
        in_chans: C of the reconstructed image.
        dim: decoder width D_dec.
        depth: number of decoder blocks.
        num_heads: attention heads per block.
        mlp_ratio: hidden width ratio of the MLPs.
    """

    def __init__(
        self,
        encoder_dim: int,
        grid_size: tuple[int, int],
        patch_size: int,
        in_chans: int,
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.grid_size = tuple(grid_size)
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.embed = nn.Linear(encoder_dim, dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = sincos_2d_pos_embed(dim, *self.grid_size, num_prefix_tokens=1)
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)  # [1, 1 + L, D_dec], fixed
        self.blocks = nn.Sequential(
            *[Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=_layer_norm) for _ in range(depth)]
        )
        self.norm = _layer_norm(dim)
        self.pred = nn.Linear(dim, patch_size * patch_size * in_chans, bias=True)
        assert self.pos_embed.shape[1] == num_patches + 1
        init_weights_mae(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """Predict pixels for all patches.

        Args:
            latent: ``[B, 1 + L_keep, D]`` encoder output ([CLS] first).
            ids_restore: ``[B, L]`` from :func:`ssl_kit.encoders.random_masking`.

        Returns:
            ``[B, L, p*p*C]`` predictions in original patch order ([CLS] removed).
        """
        x = self.embed(latent)
        b, n_vis, d = x.shape
        num_patches = ids_restore.shape[1]
        mask_tokens = self.mask_token.expand(b, num_patches + 1 - n_vis, d)
        shuffled = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [B, L, D_dec] in shuffled order
        patches = gather_tokens(shuffled, ids_restore)  # back to patch order
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.pred(x[:, 1:])


def _layer_norm(dim: int, **kwargs: object) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6, **kwargs)
