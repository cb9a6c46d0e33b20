"""Weighted k-NN classification on L2-normalised features (DINO / iBOT protocol) and its monitor."""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from ssl_kit.encoders.features import feature_spread
from ssl_kit.precision import autocast_dtype, inference_autocast
from ssl_kit.runtime import eval_mode

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
    features, labels = extract_readouts(lambda x: {"features": embed(x)}, loader, transform, device, dtype)
    return features["features"], labels


@torch.no_grad()
def extract_readouts(
    embed: Callable[[Tensor], dict[str, Tensor]], loader: DataLoader, transform: Callable[[Tensor], Tensor],
    device: torch.device, dtype: torch.dtype | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """:func:`extract_features` for an ``embed`` that returns several named features per batch (one forward pass).

    Returns:
        ``{name: [N, D_name]}`` (float32, on CPU) and labels ``[N]``.
    """
    feats: dict[str, list[Tensor]] = {}
    labels = []
    for images, y in loader:
        images = transform(images.to(device))
        with inference_autocast(device, dtype):
            for name, value in embed(images).items():
                feats.setdefault(name, []).append(value.float().cpu())
        labels.append(torch.as_tensor(y))
    return {name: torch.cat(values) for name, values in feats.items()}, torch.cat(labels)


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


# mean pairwise cosine above which the monitor warns that the features have (nearly) collapsed: MAE's [CLS] on a
# working run sits near 0.98 at most, LoMaR's and iBOT's collapsed short-budget runs measured 0.996-0.999
COLLAPSE_COSINE = 0.99


class KNNMonitor(pl.Callback):
    """Log weighted k-NN top-1 of the method's exported encoder at the end of training epochs, with a collapse signal.

    Uses the data module's labeled memory / test split (``knn_dataloaders()``) and the method's ``readouts``
    ([CLS] and mean patch token, one forward pass). Logs ``knn_top1`` (the method's default ``readout``, which the
    "best" checkpoint follows), ``knn_top1_cls`` and ``knn_top1_avgpool``, and for the default readout of the
    query images ``feature_cosine`` (mean pairwise cosine) and ``feature_std`` (mean per-dimension spread of the
    normalised features, :func:`ssl_kit.encoders.features.feature_spread`); a warning when the cosine passes
    :data:`COLLAPSE_COSINE` (once per run). Under DDP every rank extracts the same features; only the metric is logged
    (rank-zero identical values). Data it cannot score (:func:`knn_unscorable`) get one log line at the start
    and no ``knn_top1``.

    Args:
        k: neighbours.
        temperature: vote temperature.
        every_n_epochs: run frequency (the last epoch always runs).
    """

    def __init__(self, k: int = 20, temperature: float = 0.07, every_n_epochs: int = 1) -> None:
        self.k, self.temperature, self.every_n_epochs = k, temperature, every_n_epochs
        self.unscorable: str | None = None
        self.warned = False

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
        scores = self.evaluate(trainer, pl_module)
        if scores is None:
            return
        for name, value in scores.items():
            pl_module.log(name, value, prog_bar=name == "knn_top1", on_epoch=True, sync_dist=False)
        if scores["feature_cosine"] > COLLAPSE_COSINE and trainer.is_global_zero and not self.warned:
            self.warned = True  # once per run
            log.warning("epoch %d: the %s features have nearly collapsed: mean pairwise cosine %.4f (> %.2f), "
                        "per-dimension spread %.4f; k-NN reads mostly one shared direction.", epoch,
                        pl_module.readout, scores["feature_cosine"], COLLAPSE_COSINE, scores["feature_std"])

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float] | None:
        """``knn_top1`` (default readout), ``knn_top1_<readout>`` for each readout, ``feature_cosine``, ``feature_std``."""
        dm = trainer.datamodule
        loaders = dm.knn_dataloaders(feature_batch_size(pl_module.device)) if dm is not None and hasattr(dm, "knn_dataloaders") else None
        if loaders is None:
            return None
        dtype = autocast_dtype(trainer.precision)  # the training's precision
        with eval_mode(pl_module):
            train_f, train_y = extract_readouts(pl_module.readouts, loaders[0], dm.eval_images, pl_module.device, dtype)
            test_f, test_y = extract_readouts(pl_module.readouts, loaders[1], dm.eval_images, pl_module.device, dtype)
        num_classes = int(max(train_y.max(), test_y.max())) + 1
        scores = {}
        for name in train_f:
            pred = weighted_knn(train_f[name], train_y, test_f[name], num_classes, self.k, self.temperature)[self.k]
            scores[f"knn_top1_{name}"] = float((pred == test_y).float().mean())
        scores["knn_top1"] = scores[f"knn_top1_{pl_module.readout}"]
        spread = feature_spread(test_f[pl_module.readout])
        return {**scores, "feature_cosine": spread["mean_cosine"], "feature_std": spread["mean_std"]}
