"""Q-score for any method, by configuration: a regulariser callback and an epoch monitor.

``ssl-pretrain --recipe mae --qscore`` adds both; so does
``--trainer.callbacks+=ssl_kit.qscore.QScoreRegularizer --trainer.callbacks.lambda1 1e-3``.
To regularise an already pretrained encoder for a few epochs (as the paper does), start from its
weights: ``ssl-pretrain --recipe mae --qscore --init_weights runs/mae/TIME/checkpoints/last.ckpt``.

What the regulariser sees (``features``): ``training`` (default) collects, with a forward hook on the
encoder's final norm, the [CLS] rows of the method's own forward passes (MAE: the 25 % visible patches;
LoMaR: each window), at no extra cost; ``full`` runs the student encoder once more, on the step's full
training images (the first global crop for multi-crop batches), and takes the method's readout, the
feature that is later scored. The method's loss gets ``qscore_regularizer`` of those features, in the
chosen feature space (``space``) and ``reduction``, added right before backward
(:meth:`SSLMethod.add_loss_term`). See :mod:`ssl_kit.losses.qscore` for the feature space, sigma and
reduction choices and what was measured for each.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from torch import Tensor

from ssl_kit.encoders.features import readout_features
from ssl_kit.losses.qscore import (
    Space,
    feature_space,
    qscore,
    qscore_regularizer,
    sparsity,
)
from ssl_kit.runtime import eval_mode


def batch_images(batch: Any) -> Tensor:
    """The full images of a training batch: ``images`` of ``(images, labels)``, or the first view of a multi-crop
    ``(views, labels)`` batch."""
    images = batch[0]
    if isinstance(images, (list, tuple)):
        images = images[0]
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise TypeError("QScoreRegularizer(features='full') needs (images [B, C, H, W], ...) or (views, ...) batches; "
                        "use features='training' for this method")
    return images


class QScoreRegularizer(pl.Callback):
    """Add the Q-score regulariser to the method's training loss.

    Args:
        lambda1: weight of the low-Q sample term (paper 1e-4 with sums on ResNet features).
        lambda2: weight of the column-L1 term (paper 1e-4 with sums).
        unbiased: Bessel-corrected sigma (default population sigma).
        features: ``training`` (the [CLS] of the method's own forward passes, no extra cost) or ``full`` (the
            method's readout of the full training images, one extra encoder pass: the feature that is scored).
        space: ``raw``, ``abs`` or ``standardized`` (:func:`ssl_kit.losses.qscore.feature_space`).
        reduction: ``sum`` (the paper's) or ``mean`` over the selected samples and columns.

    The defaults are the paper's regulariser on raw [CLS] features. In the ``raw`` space a smaller LayerNorm gain
    lowers it; in ``standardized`` nothing a LayerNorm gain or bias does can (tested), but there Q points the
    wrong way: on the MAE recipe's encoders it separates the linear probe's right from wrong predictions with
    AUROC 0.38 (seeds 0 and 1), against 0.58 / 0.59 for ``abs`` (benchmarks/results/qscore_spaces/qscore_spaces.json). No space
    reached 0.6 on both seeds, so none is made the default (issue #21).
    """

    def __init__(self, lambda1: float = 1e-4, lambda2: float = 1e-4, unbiased: bool = False,
                 features: Literal["full", "training"] = "training", space: Space = "raw",
                 reduction: Literal["sum", "mean"] = "sum") -> None:
        if features not in ("full", "training"):
            raise ValueError(f"QScoreRegularizer features must be full or training, got {features!r}")
        self.lambda1, self.lambda2, self.unbiased = lambda1, lambda2, unbiased
        self.features, self.space, self.reduction = features, space, reduction
        self._features: list[Tensor] = []
        self._images: Tensor | None = None
        self._handle: Any = None
        self._last: dict[str, Tensor] = {}
        self._module: Any = None
        self._trainer: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "add_loss_term"):
            raise TypeError("QScoreRegularizer needs an ssl_kit method (SSLMethod.add_loss_term)")
        self._module, self._trainer = pl_module, trainer
        if self.features == "training":
            self._handle = pl_module.encoder.norm.register_forward_hook(self._collect)
        pl_module.add_loss_term("qscore", self.term)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        pl_module.remove_loss_term("qscore")

    def _collect(self, module: torch.nn.Module, args: Any, output: Tensor) -> None:
        if module.training and torch.is_grad_enabled() and output.ndim == 3:
            self._features.append(output[:, 0])  # [CLS] after the final norm, with gradient

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._features.clear()
        self._images = batch_images(batch) if self.features == "full" else None

    def _full_image_features(self) -> Tensor | None:
        if self._images is None:
            return None
        module, images = self._module, self._images
        self._images = None
        plugin = getattr(self._trainer, "precision_plugin", None)
        context = plugin.forward_context() if hasattr(plugin, "forward_context") else contextlib.nullcontext()
        with context:  # the training's autocast
            return readout_features(module.encoder, images)[module.readout]

    def term(self) -> Tensor | None:
        """The regulariser for this step's features (None if there are none)."""
        if self.features == "full":
            h = self._full_image_features()
        else:
            h = torch.cat(self._features) if self._features else None
            self._features.clear()
        if h is None:
            return None
        h = feature_space(h.float(), self.space)
        reg = qscore_regularizer(h, self.lambda1, self.lambda2, unbiased=self.unbiased, reduction=self.reduction)
        self._last = {"qscore_reg": reg.detach(), "train_qscore": qscore(h.detach(), unbiased=self.unbiased).mean()}
        return reg

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        for name, value in self._last.items():
            pl_module.log(name, value, on_step=True, on_epoch=True, batch_size=1)
        self._last = {}


class QScoreMonitor(pl.Callback):
    """Each epoch: mean Q-score and sparsity of the method's readout of a fixed image set, plus a histogram PNG.

    Uses the data module's k-NN query subset (``knn_test_set``) or the first ``num_images`` training
    images. Logs ``qscore_mean`` and ``sparsity`` (entries below ``eta``) in the feature space ``space``
    (standardised over the image set), and ``sparsity_raw`` (``|h| < eta`` of the readout as it is).

    Args:
        out_dir: folder for ``qscore_epoch_NNN.png``.
        eta: sparsity threshold, values below it count as inactive.
        num_images: images scored when there is no k-NN subset.
        space: feature space of the scores (as the regulariser's).
    """

    def __init__(self, out_dir: str | Path | None = None, eta: float = 0.05, num_images: int = 1000,
                 space: Space = "raw") -> None:
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.eta, self.num_images, self.space = eta, num_images, space

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        dataset = getattr(dm, "knn_test_set", None) or dm.train_set
        n = min(self.num_images, len(dataset))
        feats = []
        with torch.no_grad(), eval_mode(pl_module):
            for start in range(0, n, 256):
                images = torch.stack([dataset[i][0] for i in range(start, min(n, start + 256))])
                feats.append(pl_module.embed(dm.eval_images(images.to(pl_module.device))).float())
        h = torch.cat(feats)
        scored = feature_space(h, self.space)
        q = qscore(scored)
        pl_module.log("qscore_mean", q.mean(), sync_dist=True)
        pl_module.log("sparsity", sparsity(scored, self.eta), sync_dist=True)
        pl_module.log("sparsity_raw", sparsity(h, self.eta), sync_dist=True)
        self._save_histogram(q.cpu(), trainer.current_epoch)

    @rank_zero_only
    def _save_histogram(self, q: Tensor, epoch: int) -> None:
        if self.out_dir is None:
            return
        save_qscore_histogram(q, self.out_dir / f"qscore_epoch_{epoch:03d}.png", title=f"Q-score, epoch {epoch}")


def save_qscore_histogram(q: Tensor, path: Path, title: str, groups: dict[str, Tensor] | None = None) -> Path:
    """Histogram of Q-scores (optionally split into labelled groups, e.g. probe-correct / wrong)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    bins = torch.linspace(float(q.min()), float(q.max()) + 1e-9, 41).tolist()
    for name, values in (groups or {"all": q}).items():
        ax.hist(values.tolist(), bins=bins, alpha=0.6, label=f"{name} ({len(values)})")
    ax.set_xlabel("Q-score")
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
