"""LoMaR: local masked reconstruction on random windows (Chen et al. 2022), METHODS.md section 2."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_kit.callbacks import ReconstructionPictures
from ssl_kit.encoders import (
    Windows,
    build_encoder,
    init_vit_mae_style,
    init_weights_mae,
    patchify,
    random_subset_mask,
    sample_windows,
    unpatchify,
)
from ssl_kit.losses.reconstruction import masked_mse_loss
from ssl_kit.methods.base import SSLMethod
from ssl_kit.encoders.rpe import DEFAULT_RATIO, irpe_spec
from ssl_kit.validation import check_settings, require



@dataclass
class LoMaROutput:
    """One LoMaR pass (S = B*M window sequences, K2 = K*K patches per window).

    Attributes:
        loss: scalar norm-pix MSE over masked window patches.
        pred: ``[S, K2, p*p*C]`` predicted pixels for every window patch.
        target: ``[S, K2, p*p*C]`` the window patches' pixels.
        mask: ``[S, K2]`` bool, True = replaced by the mask token.
        windows: where the windows are (``patch_ids`` ``[B, M, K2]``).
    """

    loss: Tensor
    pred: Tensor
    target: Tensor
    mask: Tensor
    windows: Windows


class LoMaR(SSLMethod):
    """Reconstruct masked patches inside M random K x K windows per image, with relative positions.

    Every window (all K*K tokens, masked ones replaced by a learned mask token, plus [CLS]) goes
    through the encoder as its own sequence: the encoder batch is B*M sequences of K*K + 1
    tokens. There is no absolute position embedding; the encoder is a timm ViT with contextual
    relative position encoding in every attention layer (:mod:`ssl_kit.encoders.rpe`), so its cost per
    image is constant in resolution. A LayerNorm (the encoder's final norm) + Linear head
    predicts pixels.

    Args:
        encoder: preset (tiny/small/base/large) or timm ViT name (its sizes are kept).
        img_size: input resolution (linked from the data module by the CLI).
        patch_size: patch side p.
        in_chans: image channels (linked from the data module by the CLI).
        encoder_kwargs: VisionTransformer overrides, e.g. ``{depth: 6}``.
        window_size: K, window side in patches (7 in the paper); at most the patch grid's side.
        num_windows: M windows per image (4 in the paper), distinct positions per image.
        mask_ratio: fraction of each window's patches masked (``int(K*K*ratio)``: 39 of 49 at 0.8).
        norm_pix_loss: per-patch normalised pixel targets.
        rpe_ratio: iRPE bucket ratio (1.9: 7 x 7 relative buckets + [CLS]).
        base_lr: lr per 256 images of effective batch.
        weight_decay: AdamW weight decay on >= 2-D weights.
        betas: AdamW betas.
        warmup_epochs: linear warmup length (the paper: 5 % of the epochs).
        min_lr: cosine floor.
        readout: the feature evaluated by default: ``avgpool``, as the reference fine-tunes (the loss reads only
            patch tokens, so the [CLS] output of the last block gets no gradient).
    """

    def __init__(
        self,
        encoder: str = "tiny",
        img_size: int = 32,
        patch_size: int = 4,
        in_chans: int = 3,
        encoder_kwargs: dict[str, Any] | None = None,
        window_size: int = 7,
        num_windows: int = 4,
        mask_ratio: float = 0.8,
        norm_pix_loss: bool = True,
        rpe_ratio: float = DEFAULT_RATIO,
        base_lr: float = 1.5e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_epochs: float = 0.25,
        min_lr: float = 0.0,
        readout: Literal["cls", "avgpool"] = "avgpool",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_settings(self.hparams)
        self.check_readout(readout)
        self.encoder_spec = irpe_spec(self.make_encoder_spec(encoder, img_size, patch_size, in_chans, encoder_kwargs),
                                      rpe_ratio)
        self.encoder = build_encoder(self.encoder_spec)
        init_vit_mae_style(self.encoder)
        dim = self.encoder.embed_dim
        self.patch_size, self.in_chans = patch_size, in_chans
        self.grid: tuple[int, int] = tuple(self.encoder.patch_embed.grid_size)  # type: ignore[assignment]
        smallest = min(self.grid)
        require(window_size <= smallest,
                f"--model.window_size {window_size} does not fit the {self.grid[0]}x{self.grid[1]} patch grid (img_size "
                f"{img_size}, patch {patch_size}): pass --model.window_size {smallest} or less, or a larger image.")
        self.window_size = window_size
        self.num_masked = int(self.window_size**2 * mask_ratio)
        require(1 <= self.num_masked < self.window_size**2,
                f"--model.mask_ratio {mask_ratio} masks {self.num_masked} of the {self.window_size ** 2} patches of a "
                "window: choose a ratio that masks at least one and keeps at least one (the paper: 0.8).")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.pred = nn.Linear(dim, patch_size * patch_size * in_chans)
        init_weights_mae(self.pred)
        for m in self.encoder.modules():  # LoMaR's speed claim is about SDPA with the position bias
            if hasattr(m, "fused_attn"):
                m.fused_attn = True

    def window_patches(self, images: Tensor, windows: Windows) -> Tensor:
        """Pixels of every window patch: ``[B, C, H, W]`` -> ``[B*M, K*K, p*p*C]``."""
        patches = patchify(images, self.patch_size)  # [B, L, P]
        b, m, k2 = windows.patch_ids.shape
        ids = windows.patch_ids.reshape(b, m * k2, 1).expand(-1, -1, patches.shape[-1])
        return torch.gather(patches, 1, ids).reshape(b * m, k2, -1)

    def embed_patches(self, patches: Tensor) -> Tensor:
        """The encoder's patch embedding applied to flattened patches: ``[..., p*p*C]`` -> ``[..., D]``.

        Same numbers as ``patch_embed`` on the image (the conv is a Linear over (p, p, C) patches),
        but only the window patches are embedded, so the cost does not grow with the image.
        """
        proj = self.encoder.patch_embed.proj
        weight = proj.weight.permute(0, 2, 3, 1).reshape(proj.weight.shape[0], -1)  # [D, p*p*C]
        return self.encoder.patch_embed.norm(F.linear(patches, weight, proj.bias))

    def forward_encoder(self, tokens: Tensor) -> Tensor:
        """Run the window sequences through the encoder.

        Args:
            tokens: ``[S, K*K, D]`` window patch embeddings (masked ones already replaced).

        Returns:
            ``[S, 1 + K*K, D]`` after the final norm ([CLS] first).
        """
        enc = self.encoder
        cls = enc.cls_token.expand(tokens.shape[0], -1, -1)
        x = enc.norm_pre(torch.cat([cls, tokens], dim=1))
        enc.set_token_grid(self.window_size, self.window_size)
        return enc.norm(enc.blocks(x))

    def forward(self, images: Tensor) -> LoMaROutput:
        """Full LoMaR pass on ``[B, C, H, W]`` images (fresh windows and masks each call)."""
        windows = self.random_draw("windows", lambda n: sample_windows(n, self.grid, self.window_size, self.hparams.num_windows,
                                                                device=images.device), rows=images.shape[0])
        target = self.window_patches(images, windows)  # [S, K2, P]
        tokens = self.embed_patches(target)  # [S, K2, D]
        mask = self.random_draw("mask", lambda n: random_subset_mask(n, tokens.shape[1], self.num_masked, device=images.device),
                         rows=tokens.shape[0])
        tokens = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)  # replaced, not dropped
        pred = self.pred(self.forward_encoder(tokens)[:, 1:])
        loss = masked_mse_loss(pred, target, mask.to(pred.dtype), norm_pix=self.hparams.norm_pix_loss)
        return LoMaROutput(loss=loss, pred=pred, target=target, mask=mask, windows=windows)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images = batch[0]
        return self.report_loss(self(images).loss, images.shape[0])

    def configure_optimizers(self) -> dict[str, Any]:
        return self.adamw_warmup_cosine({"lomar": self})

    def method_callbacks(self, pictures_dir: Path) -> list[pl.Callback]:
        """Each epoch, a PNG of fixed images as :meth:`reconstruction_panels` shows them."""
        return [ReconstructionPictures(pictures_dir)]

    @torch.no_grad()
    def reconstruction_panels(self, images: Tensor) -> dict[str, Tensor]:
        """Pictures for a person, first window of each image: original, the window as the encoder
        sees it (outside the window grey, masked patches black), and the reconstruction pasted into
        the window (norm-pix predictions de-normalised with the true patch statistics)."""
        out = self(images)
        b, m, k2 = out.windows.patch_ids.shape
        first = torch.arange(b, device=images.device) * m  # window 0 of each image
        pred, target, mask = out.pred[first], out.target[first], out.mask[first].unsqueeze(-1)
        if self.hparams.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            pred = pred * (var + 1e-6) ** 0.5 + mean
        full = patchify(images, self.patch_size)
        ids = out.windows.patch_ids[:, 0].unsqueeze(-1).expand(-1, -1, full.shape[-1])
        outside = torch.full_like(full, float(images.mean()))

        def paste(values: Tensor) -> Tensor:
            return unpatchify(outside.scatter(1, ids, values), self.patch_size, self.in_chans, self.grid)

        blacked = torch.full_like(target, float(images.min()))
        return {
            "original": images,
            "window input": paste(torch.where(mask, blacked, target)),
            "reconstruction": paste(torch.where(mask, pred, target)),
        }
