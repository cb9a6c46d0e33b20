"""What the semi-supervised classification methods (UDA, Meta Pseudo Labels) share: ViT classifiers
built from the shared encoder (random init, or a pretrained checkpoint / export), validation top-1 of
the evaluated model, and the export of that model as a timm classifier."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from ssl_kit.encoders import EncoderSource, EncoderSpec, encoder_record, load_encoder
from ssl_kit.errors import UserError
from ssl_kit.methods.base import SSLMethod
from ssl_kit.metrics import ValidationTop1
from ssl_kit.optim import adamw_param_groups


def pretrained_or_random(
    init_from: str | None, encoder: str, patch_size: int, encoder_kwargs: dict[str, Any] | None,
    flag: str = "--model.init_from",
) -> EncoderSource:
    """Where the encoder weights come from: an ssl_kit checkpoint (``.ckpt``) or export folder given as
    ``flag``, else a random init of ``encoder`` (clear error naming ``flag`` for a missing path)."""
    if not init_from:
        return EncoderSource(random_init=encoder, patch_size=patch_size, encoder_kwargs=encoder_kwargs)
    path = Path(init_from).expanduser()
    if not path.exists():
        raise UserError(f"{flag} {path} does not exist: pass a checkpoint (.ckpt) or an encoder export folder.")
    return EncoderSource(ckpt=str(path)) if path.is_file() else EncoderSource(encoder=str(path))


def build_classifier(
    encoder: str, img_size: int, patch_size: int, in_chans: int, encoder_kwargs: dict[str, Any] | None,
    num_classes: int, init_from: str | None, drop_path_rate: float, global_pool: str = "token",
    init_flag: str = "--model.init_from",
) -> tuple[VisionTransformer, EncoderSpec]:
    """A timm ViT with a ``num_classes`` linear head on the [CLS] token or the mean patch token.

    Args:
        encoder, img_size, patch_size, in_chans, encoder_kwargs: the architecture when starting from
            random initialisation (MAE-style init).
        num_classes: K.
        init_from: an ssl_kit checkpoint (``.ckpt``) or encoder export folder of any method (MAE, LoMaR,
            iBOT, UDA, MPL); its architecture is used and ``encoder`` / ``patch_size`` are ignored.
        init_flag: the option that gave ``init_from`` (named in the error for a missing path).
        drop_path_rate: stochastic depth.
        global_pool: ``token`` (head on the [CLS] token) or ``avg`` (head on the LayerNorm-ed mean of the
            patch tokens, as MAE fine-tunes: MAE never trains the [CLS] token).

    Returns:
        The model and the spec that rebuilds it with timm. The head starts near zero (predictions uniform),
        unless ``init_from`` is a classifier with the same classes and pooling (e.g. the supervised recipe's
        export: UDA / MPL then start from the fine-tuned model, whose confident predictions pass the mask).
    """
    if global_pool not in ("token", "avg"):
        raise UserError(f"--model.global_pool must be token or avg, got {global_pool!r}.")
    source = pretrained_or_random(init_from, encoder, patch_size, encoder_kwargs, init_flag)
    model, spec = load_encoder(source, img_size, in_chans, num_classes=num_classes, drop_path_rate=drop_path_rate,
                               global_pool=global_pool)
    saved, _ = encoder_record(source)
    if saved is not None and saved.kwargs.get("num_classes") == num_classes and saved.kwargs.get("global_pool") == global_pool:
        return model, spec  # a trained classifier (a supervised / UDA / MPL export): its head is kept
    nn.init.trunc_normal_(model.head.weight, std=2e-5)
    nn.init.zeros_(model.head.bias)
    return model, spec


def classifier_param_groups(model: VisionTransformer, weight_decay: float, layer_decay: float,
                            prefix: str = "encoder") -> list[dict[str, Any]]:
    """AdamW groups of a ViT classifier: no weight decay on biases / norms / tokens, and with ``layer_decay``
    < 1 timm's layer-wise groups (``lr_scale = layer_decay ** (num_layers - 1 - layer id)``: with a head, the head
    and final norm at the full lr and block i of d at ``layer_decay ** (d - i)``; without one (``num_classes=0``)
    block i at ``layer_decay ** (d - 1 - i)``; embeddings lowest). The scale is applied by
    :func:`ssl_kit.optim.adamw_warmup_cosine`."""
    if layer_decay >= 1.0:
        return adamw_param_groups({prefix: model}, weight_decay)
    groups = param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                      layer_decay=layer_decay)
    return [{"params": g["params"], "weight_decay": g["weight_decay"], "lr_scale": g["lr_scale"], "module": prefix}
            for g in groups if g["params"]]


def encoder_and_head_groups(encoder: VisionTransformer, heads: dict[str, nn.Module], weight_decay: float,
                            layer_decay: float, head_lr_scale: float) -> list[dict[str, Any]]:
    """AdamW groups of a ViT encoder with dense heads (segmenter, detector): the encoder's
    :func:`classifier_param_groups` (layer decay), then each head's groups at ``head_lr_scale`` times the lr."""
    return classifier_param_groups(encoder, weight_decay, layer_decay) + [
        dict(g, lr_scale=head_lr_scale) for g in adamw_param_groups(heads, weight_decay)]


def pre_logits(model: VisionTransformer, images: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, D]`` pooled features before the classifier head."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


class SemiSupervisedClassifier(ValidationTop1, SSLMethod):
    """Base of UDA and MPL: ``self.encoder`` is the trained classifier (UDA's ``classifier``, MPL's ``student``),
    :meth:`export_module` the one that is evaluated and exported (its EMA, ``ema_classifier`` / ``ema_student``). Validation logs ``val_top1`` of the exported model,
    which the run's "best" checkpoint follows."""

    checkpoint_monitor = ("val_top1", "max")

    def init_metrics(self, num_classes: int) -> None:
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``[B, K]`` of the evaluated (exported) model."""
        return self.export_module()(images)

    @property
    def readout(self) -> str:
        """The classifier's own input: ``avgpool`` under ``global_pool: avg``, else ``cls`` (equal to timm's
        ``forward_head(..., pre_logits=True)``)."""
        return "avgpool" if self.hparams.get("global_pool", "token") == "avg" else "cls"

    def check_data(self, needs_unlabeled: bool) -> None:
        """Fail early when the data module does not fit the model (class count, unlabeled stream)."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or not hasattr(dm, "num_classes"):
            return
        if dm.num_classes != self.hparams.num_classes:
            raise UserError(f"The data have {dm.num_classes} classes but the model was built for "
                            f"{self.hparams.num_classes}: pass --model.num_classes {dm.num_classes}.")
        if needs_unlabeled and getattr(dm, "mu", 1) == 0:
            raise UserError(f"{type(self).__name__} needs unlabeled images, but --data.mu is 0: set --data.mu 7 "
                            "(or train supervised only with --recipe supervised).")
