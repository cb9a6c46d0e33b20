"""Weighted k-NN classification on L2-normalised features (DINO / iBOT protocol) and its monitor."""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from ssl_kit.precision import autocast_dtype, inference_autocast

log = logging.getLogger("ssl_kit")


@torch.no_grad()
def weighted_knn(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    k: int | Sequence[int] = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> dict[int, Tensor]:
    """Predict test labels by a vote of the k most cosine-similar training samples.

    Each neighbour votes for its class with weight ``exp(cos / T)``.

    Args:
        train_features: ``[N, D]`` memory features (normalised here).
        train_labels: ``[N]`` int labels.
        test_features: ``[M, D]`` query features.
        num_classes: K.
        k: one k or several (all computed from one top-k search).
        temperature: T.
        chunk: queries per similarity block (bounds memory at chunk x N).

    Returns:
        ``{k: predictions [M]}``.
    """
    ks = [k] if isinstance(k, int) else list(k)
    k_max = min(max(ks), train_features.shape[0])
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    preds: dict[int, list[Tensor]] = {kk: [] for kk in ks}
    for start in range(0, test.shape[0], chunk):
        sim = test[start : start + chunk] @ train.T  # [m, N]
        top_sim, top_idx = sim.topk(k_max, dim=1)
        weights = (top_sim / temperature).exp()
        votes_onehot = F.one_hot(train_labels[top_idx], num_classes).float()  # [m, k, K]
        for kk in ks:
            n = min(kk, k_max)
            scores = (votes_onehot[:, :n] * weights[:, :n, None]).sum(dim=1)
            preds[kk].append(scores.argmax(dim=1))
    return {kk: torch.cat(v) for kk, v in preds.items()}


@torch.no_grad()
def extract_features(
    embed: Callable[[Tensor], Tensor], loader: DataLoader, transform: Callable[[Tensor], Tensor], device: torch.device,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Run ``embed(transform(images))`` over a loader of (uint8 images, labels).

    Args:
        dtype: autocast dtype of the forward passes (the training's precision: ``torch.bfloat16`` under
            bf16-mixed); None runs in full precision.

    Returns:
        features ``[N, D]`` (float32, on CPU) and labels ``[N]``.
    """
    feats, labels = [], []
    for images, y in loader:
        images = transform(images.to(device))
        with inference_autocast(device, dtype):
            feats.append(embed(images).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


# Feature extraction batch: on 2 CPU cores a ViT forward runs ~20-40 % faster per image at batch 64
# than at 512 (activations closer to cache size); accelerators want large batches.
FEATURE_BATCH_CPU = 64
FEATURE_BATCH_ACCELERATOR = 512


def feature_batch_size(device: torch.device) -> int:
    """Loader batch size for feature extraction on ``device``."""
    return FEATURE_BATCH_CPU if device.type == "cpu" else FEATURE_BATCH_ACCELERATOR


def knn_unscorable(dm: pl.LightningDataModule | None) -> str | None:
    """Why the k-NN monitor cannot score a data module's data (a phrase for the log), or None when it can:
    it needs a labeled held-out split (``knn_dataloaders()``) of at least 2 classes."""
    if dm is None or not hasattr(dm, "knn_dataloaders") or not getattr(dm, "has_labels", False):
        return "the data have no labeled held-out images"
    classes = list(getattr(dm, "classes", []))
    if len(classes) < 2:
        return f"the data have one class ({', '.join(classes)}), so every k-NN vote is right and top-1 says nothing"
    return None


class KNNMonitor(pl.Callback):
    """Log weighted k-NN top-1 of the method's exported encoder at the end of training epochs.

    Uses the data module's labeled memory / test split (``knn_dataloaders()``) and the
    method's ``embed`` ([CLS] after the final norm). Under DDP every rank extracts the same
    features; only the metric is logged (rank-zero identical values). Data it cannot score
    (:func:`knn_unscorable`) get one log line at the start and no ``knn_top1``.

    Args:
        k: neighbours.
        temperature: vote temperature.
        every_n_epochs: run frequency (the last epoch always runs).
    """

    def __init__(self, k: int = 20, temperature: float = 0.07, every_n_epochs: int = 1) -> None:
        self.k, self.temperature, self.every_n_epochs = k, temperature, every_n_epochs
        self.unscorable: str | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.unscorable = knn_unscorable(trainer.datamodule)
        if self.unscorable and trainer.is_global_zero:
            log.info("k-NN monitor: cannot score: %s; knn_top1 is not logged.", self.unscorable)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.unscorable:
            return
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        if (epoch + 1) % self.every_n_epochs and not last:
            return
        top1 = self.evaluate(trainer, pl_module)
        if top1 is None:
            return
        pl_module.log("knn_top1", top1, prog_bar=True, on_epoch=True, sync_dist=False)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
        dm = trainer.datamodule
        loaders = dm.knn_dataloaders(feature_batch_size(pl_module.device)) if dm is not None and hasattr(dm, "knn_dataloaders") else None
        if loaders is None:
            return None
        was_training = pl_module.training
        pl_module.eval()
        dtype = autocast_dtype(trainer.precision)  # the training's precision
        try:
            train_f, train_y = extract_features(pl_module.embed, loaders[0], dm.eval_images, pl_module.device, dtype)
            test_f, test_y = extract_features(pl_module.embed, loaders[1], dm.eval_images, pl_module.device, dtype)
        finally:
            pl_module.train(was_training)
        num_classes = int(max(train_y.max(), test_y.max())) + 1
        pred = weighted_knn(train_f, train_y, test_f, num_classes, self.k, self.temperature)[self.k]
        return float((pred == test_y).float().mean())
