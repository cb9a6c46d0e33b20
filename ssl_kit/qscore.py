"""Q-score for any method, by configuration: a regulariser callback and an epoch monitor.

``ssl-pretrain --recipe mae --qscore`` adds both; so does
``--trainer.callbacks+=ssl_kit.qscore.QScoreRegularizer --trainer.callbacks.lambda1 1e-3``.
To regularise an already pretrained encoder for a few epochs (as the paper does), start from its
weights: ``ssl-pretrain --recipe mae --qscore --init_weights runs/mae/TIME/checkpoints/last.ckpt``.

The regulariser sees the features the method already computes: a forward hook on the student
encoder's final norm collects the [CLS] rows of every training forward pass of the step (MAE:
the visible-patch encoding; LoMaR: each window sequence), and the method's loss gets
``qscore_regularizer(h)`` added right before backward (:meth:`SSLMethod.add_loss_term`).
See :mod:`ssl_kit.losses.qscore` for the feature and sigma choices.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from torch import Tensor

from ssl_kit.losses.qscore import qscore, qscore_regularizer, sparsity


class QScoreRegularizer(pl.Callback):
    """Add the Q-score regulariser to the method's training loss.

    Args:
        lambda1: weight of the low-Q sample term (paper 1e-4).
        lambda2: weight of the column-L1 term (paper 1e-4).
        unbiased: Bessel-corrected sigma (default population sigma).
    """

    def __init__(self, lambda1: float = 1e-4, lambda2: float = 1e-4, unbiased: bool = False) -> None:
        self.lambda1, self.lambda2, self.unbiased = lambda1, lambda2, unbiased
        self._features: list[Tensor] = []
        self._handle: Any = None
        self._last: dict[str, Tensor] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "add_loss_term"):
            raise TypeError("QScoreRegularizer needs an ssl_kit method (SSLMethod.add_loss_term)")
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

    def term(self) -> Tensor | None:
        """The regulariser for the features collected in this step (None if the encoder did not run)."""
        if not self._features:
            return None
        h = torch.cat(self._features).float()
        self._features.clear()
        reg = qscore_regularizer(h, self.lambda1, self.lambda2, unbiased=self.unbiased)
        self._last = {"qscore_reg": reg.detach(), "train_qscore": qscore(h.detach(), unbiased=self.unbiased).mean()}
        return reg

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        for name, value in self._last.items():
            pl_module.log(name, value, on_step=True, on_epoch=True, batch_size=1)
        self._last = {}


class QScoreMonitor(pl.Callback):
    """Each epoch: mean Q-score and sparsity of the [CLS] features of a fixed image set, plus a histogram PNG.

    Uses the data module's k-NN query subset (``knn_test_set``) or the first ``num_images`` training
    images.

    Args:
        out_dir: folder for ``qscore_epoch_NNN.png``.
        eta: sparsity threshold, |h| < eta counts as inactive.
        num_images: images scored when there is no k-NN subset.
    """

    def __init__(self, out_dir: str | Path | None = None, eta: float = 0.05, num_images: int = 1000) -> None:
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.eta, self.num_images = eta, num_images

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        dataset = getattr(dm, "knn_test_set", None) or dm.train_set
        n = min(self.num_images, len(dataset))
        was_training = pl_module.training
        pl_module.eval()
        feats = []
        with torch.no_grad():
            for start in range(0, n, 256):
                images = torch.stack([dataset[i][0] for i in range(start, min(n, start + 256))])
                feats.append(pl_module.embed(dm.eval_images(images.to(pl_module.device))).float())
        pl_module.train(was_training)
        h = torch.cat(feats)
        q = qscore(h)
        pl_module.log("qscore_mean", q.mean(), sync_dist=True)
        pl_module.log("sparsity", sparsity(h, self.eta), sync_dist=True)
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
