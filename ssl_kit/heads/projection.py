"""DINO/iBOT projection head: MLP -> L2 norm -> weight-normalised linear layer."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm


class IBOTHead(nn.Module):
    """3-layer MLP (GELU) to a bottleneck, L2-normalise, weight-normalised Linear without bias.

    Shared between the [CLS] token and the patch tokens (iBOT ``shared_head``).

    Args:
        in_dim: encoder width D.
        out_dim: prototypes K (8192 in the paper; smaller for small data).
        hidden_dim: MLP width (2048).
        bottleneck_dim: width before the last layer (256).
        norm_last_layer: fix the weight-norm magnitude g to 1 (not trained), as DINO/iBOT ViT-S.
        norm: ``none`` (the paper's ViT setting) or ``bn``: BatchNorm1d after each hidden Linear, statistics over
            every token of the call (images and, for patch tokens, positions), as the reference code's
            ``--norm_in_head bn`` (DINO's ``use_bn_in_head``).
    """

    def __init__(self, in_dim: int, out_dim: int = 8192, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 norm_last_layer: bool = True, norm: Literal["none", "bn"] = "none") -> None:
        super().__init__()

        def hidden(width: int) -> list[nn.Module]:
            return ([nn.BatchNorm1d(width)] if norm == "bn" else []) + [nn.GELU()]

        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), *hidden(hidden_dim),
            nn.Linear(hidden_dim, hidden_dim), *hidden(hidden_dim),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., D]`` -> ``[..., out_dim]`` logits (batch norms see the leading dims flattened)."""
        z = self.mlp(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
        return self.last_layer(F.normalize(z, dim=-1, p=2))
