"""MAE: masked autoencoder pretraining (He et al. 2021), METHODS.md section 1."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor

from ssl_kit.callbacks import ReconstructionPictures
from ssl_kit.encoders import (
    RandomMask,
    build_encoder,
    gather_tokens,
    init_vit_mae_style,
    patchify,
    random_masking,
    select_attention_kernel,
    unpatchify,
)
from ssl_kit.errors import UserError
from ssl_kit.heads.mae_decoder import MAEDecoder
from ssl_kit.losses.reconstruction import masked_mse_loss
from ssl_kit.methods.base import SSLMethod
from ssl_kit.validation import check_settings


class MAE(SSLMethod):
    """Masked autoencoder: the encoder sees only visible patches, a light decoder predicts pixels.

    Args:
        encoder: preset (tiny/small/base/large) or timm ViT name.
        img_size: input resolution (linked from the data module by the CLI).
        patch_size: patch side p.
        in_chans: image channels (linked from the data module by the CLI).
        encoder_kwargs: VisionTransformer overrides, e.g. ``{depth: 6}``.
        decoder_dim: decoder width (512 for ViT-B in the paper).
        decoder_depth: decoder blocks (8 in the paper).
        decoder_heads: decoder attention heads.
        mask_ratio: fraction of patches dropped per image.
        norm_pix_loss: per-patch normalised pixel targets.
        base_lr: lr per 256 images of effective batch.
        weight_decay: AdamW weight decay on >= 2-D weights.
        betas: AdamW betas.
        warmup_epochs: linear warmup length (fractional epochs allowed).
        min_lr: cosine floor.
        readout: the feature evaluated by default (k-NN monitor, ``ssl-knn --feature auto``): ``cls`` as the
            paper's linear probe (the reference fine-tunes on ``avgpool``).
    """

    def __init__(
        self,
        encoder: str = "tiny",
        img_size: int = 32,
        patch_size: int = 4,
        in_chans: int = 3,
        encoder_kwargs: dict[str, Any] | None = None,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        base_lr: float = 1.5e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_epochs: float = 1.0,
        min_lr: float = 0.0,
        readout: Literal["cls", "avgpool"] = "cls",
    ) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise UserError(f"--model.mask_ratio must be in [0, 1) (the fraction of patches dropped; the paper uses 0.75), "
                            f"got {mask_ratio}.")
        self.save_hyperparameters()
        check_settings(self.hparams)
        self.check_readout(readout)
        spec = self.make_encoder_spec(encoder, img_size, patch_size, in_chans, encoder_kwargs)
        self.encoder = build_encoder(spec, sincos_pos_embed=True)
        init_vit_mae_style(self.encoder)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.decoder = MAEDecoder(
            encoder_dim=self.encoder.embed_dim,
            grid_size=self.encoder.patch_embed.grid_size,
            patch_size=patch_size,
            in_chans=in_chans,
            dim=decoder_dim,
            depth=decoder_depth,
            num_heads=decoder_heads,
        )
        self.select_attention_kernels("cpu")

    def select_attention_kernels(self, device: torch.device | str) -> None:
        """Fastest attention kernel for the encoder's (visible) and the decoder's (all) sequence lengths."""
        num_patches = self.encoder.patch_embed.num_patches
        visible = 1 + int(num_patches * (1 - self.hparams.mask_ratio))
        select_attention_kernel(self.encoder, visible, device)
        select_attention_kernel(self.decoder, 1 + num_patches, device)

    def on_fit_start(self) -> None:
        self.select_attention_kernels(self.device)

    def forward_encoder(self, images: Tensor, mask_ratio: float) -> tuple[Tensor, RandomMask]:
        """Encode the visible patches only.

        Args:
            images: ``[B, C, H, W]``.
            mask_ratio: fraction of patches to drop.

        Returns:
            latent ``[B, 1 + L_keep, D]`` ([CLS] first, after the final norm) and the mask.
        """
        enc = self.encoder
        x = enc.patch_embed(images)  # [B, L, D]
        x = x + enc.pos_embed[:, enc.num_prefix_tokens :]  # position BEFORE dropping
        length = x.shape[1]
        masking = self.random_draw("mask", lambda n: random_masking(n, length, mask_ratio, device=x.device), rows=x.shape[0])
        x = gather_tokens(x, masking.ids_keep)  # [B, L_keep, D]: dropped, not replaced
        cls = (enc.cls_token + enc.pos_embed[:, : enc.num_prefix_tokens]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # [CLS] AFTER dropping
        x = enc.norm_pre(x)
        x = enc.blocks(x)
        return enc.norm(x), masking

    def forward(self, images: Tensor, mask_ratio: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Full MAE pass.

        Returns:
            loss (scalar), pred ``[B, L, p*p*C]``, mask ``[B, L]`` (1 = masked).
        """
        ratio = self.hparams.mask_ratio if mask_ratio is None else mask_ratio
        latent, masking = self.forward_encoder(images, ratio)
        pred = self.decoder(latent, masking.ids_restore)
        target = patchify(images, self.patch_size)
        loss = masked_mse_loss(pred, target, masking.mask, norm_pix=self.hparams.norm_pix_loss)
        return loss, pred, masking.mask

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images = batch[0]
        return self.report_loss(self(images)[0], images.shape[0])

    def configure_optimizers(self) -> dict[str, Any]:
        return self.adamw_warmup_cosine({"encoder": self.encoder, "decoder": self.decoder})

    def method_callbacks(self, pictures_dir: Path) -> list[pl.Callback]:
        """Each epoch, a PNG of fixed images as :meth:`reconstruction_panels` shows them."""
        return [ReconstructionPictures(pictures_dir)]

    @torch.no_grad()
    def reconstruction_panels(self, images: Tensor) -> dict[str, Tensor]:
        """Pictures for a person: original, masked input and reconstruction, ``[B, C, H, W]`` each.

        The reconstruction shows predicted patches where masked and the input where visible;
        with norm-pix targets each predicted patch is de-normalised with the true patch's
        mean and variance (as the MAE demo does).
        """
        _, pred, mask = self(images)
        target = patchify(images, self.patch_size)
        if self.hparams.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1e-6) ** 0.5 + mean
        grid = self.encoder.patch_embed.grid_size
        m = mask.unsqueeze(-1)
        masked = unpatchify(target * (1 - m), self.patch_size, self.in_chans, grid)
        pasted = unpatchify(target * (1 - m) + pred * m, self.patch_size, self.in_chans, grid)
        return {"original": images, "masked": masked, "reconstruction": pasted}
