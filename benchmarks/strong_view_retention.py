"""Does the strong view keep the label? Accuracy of a classifier trained on clean images, on strong views.

Trains a classifier on weakly augmented Fashion-MNIST (flip + 4 px translation; the MAE recipe's encoder
fine-tuned on all 60k labels, or --random_init), then scores the 10k test images under four views:
clean, weak, the strong view ssl_kit used before (kornia ``auto.RandAugment``: both ops always, one
magnitude in 1..29 of 30 per group of 8 images, invert and additive brightness in the list, then a grey
Cutout always), and today's strong view (UDA's per-image RandAugment, ``ssl_kit.data.rand_augment``).
Retention = accuracy on the view / accuracy on clean images. Also the fraction of views whose border is
bright (an inverted background: Fashion-MNIST items lie on black). Writes a JSON and a PNG of the views.

Usage (2 CPU cores, ~3 min):
    python benchmarks/strong_view_retention.py --encoder runs/mae/TIME/encoder
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_kit.data.augment import WeakStrongAugment
from ssl_kit.data.classification import ClassificationDataModule
from ssl_kit.encoders import EncoderSource, load_encoder
from ssl_kit.eval.finetune import layer_decay_param_groups
from ssl_kit.precision import autocast_dtype, resolve_precision

RESULTS = Path(__file__).parent / "results" / Path(__file__).stem  # one folder per benchmark


class KorniaRandAugmentBefore(torch.nn.Module):
    """The strong view ssl_kit shipped before: weak view, kornia RandAugment (n 2, m uniform 1..29, one draw per
    group of 8 images, grey images replicated to RGB and averaged back), grey Cutout (area 0.25-25 %) always."""

    def __init__(self, weak: WeakStrongAugment) -> None:
        super().__init__()
        self.weak = weak
        self.rand_augment = K.auto.RandAugment(n=2, m=1)
        self.cutout = K.RandomErasing(scale=(0.0025, 0.25), ratio=(1.0, 1.0), value=0.5, p=1.0)

    def forward(self, images: Tensor) -> Tensor:
        x = self.weak.weak_ops(self.weak._unit(images)).clamp(0, 1)
        groups = []
        for chunk in x.split(8):
            self.rand_augment.m = int(torch.randint(1, 30, ()))
            out = self.rand_augment(chunk.expand(-1, 3, -1, -1)).mean(dim=1, keepdim=True) if chunk.shape[1] == 1 \
                else self.rand_augment(chunk)
            groups.append(out.clamp(0, 1))
        return self.weak._normalise(self.cutout(torch.cat(groups)))


def bright_border_fraction(views: Tensor, mean: Tensor, std: Tensor) -> float:
    """Fraction of normalised views ``[B, C, S, S]`` whose one-pixel border averages above 0.5 in [0, 1] units."""
    x = views * std + mean
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1).flatten(1).mean(1)
    return float((border > 0.5).float().mean())


def train_classifier(source: EncoderSource, data: ClassificationDataModule, augment: WeakStrongAugment, steps: int,
                     batch: int, lr: float, dtype: torch.dtype | None) -> torch.nn.Module:
    model, _ = load_encoder(source, data.img_size, data.in_chans, num_classes=data.num_classes, global_pool="avg",
                            drop_path_rate=0.1)
    groups = layer_decay_param_groups(model, lr, 0.05, 0.75)
    for g in groups:
        g["initial_lr"] = g["lr"]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    images = torch.stack([data.train_set[i][0] for i in range(len(data.train_set))])
    labels = torch.as_tensor([int(data.train_set[i][1]) for i in range(len(data.train_set))])
    g = torch.Generator().manual_seed(0)
    warmup = max(1, steps // 10)
    model.train()
    for step in range(steps):
        factor = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        for group in groups:
            group["lr"] = group["initial_lr"] * factor
        idx = torch.randint(0, len(images), (batch,), generator=g)
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(augment.weak(images[idx])), labels[idx], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", help="export folder of the MAE recipe (default: --random_init)")
    parser.add_argument("--random_init", action="store_true")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--result", default="strong_view_retention.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    dtype = autocast_dtype(resolve_precision("auto", "cpu"))
    data = ClassificationDataModule(train_augment="none")
    data.setup()
    augment = WeakStrongAugment(data.img_size, data.mean, data.std)
    before = KorniaRandAugmentBefore(augment)
    source = (EncoderSource(random_init="tiny", patch_size=4, encoder_kwargs={"depth": 6}) if args.random_init or not args.encoder
              else EncoderSource(encoder=args.encoder))
    model = train_classifier(source, data, augment, args.steps, args.batch, args.lr, dtype)
    views = {"clean": data.eval_transform, "weak": augment.weak, "strong_before (kornia RandAugment)": before,
             "strong (UDA RandAugment)": augment.strong}
    correct = {name: 0 for name in views}
    bright = {name: 0.0 for name in views}
    total = 0
    _, val_loader = data.feature_loaders(1000)
    torch.manual_seed(1)
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        for images, labels in val_loader:
            for name, view in views.items():
                x = view(images)
                correct[name] += int((model(x).argmax(-1) == labels).sum())
                bright[name] += bright_border_fraction(x.float(), augment.mean, augment.std) * len(labels)
            total += len(labels)
    accuracy = {name: correct[name] / total for name in views}
    result = {
        "classifier": f"{source.describe()}, fine-tuned {args.steps} steps x {args.batch} on weak views of all 60k labels",
        "top1": accuracy, "retention": {name: accuracy[name] / accuracy["clean"] for name in views},
        "bright_border_fraction": {name: bright[name] / total for name in views},
        "test_images": total, "wall_s": round(time.perf_counter() - start, 1),
        "command": "python benchmarks/strong_view_retention.py " + (f"--encoder {args.encoder}" if args.encoder else "--random_init"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / args.result).write_text(json.dumps(result, indent=2) + "\n")
    save_picture(data, augment, before, RESULTS / Path(args.result).with_suffix(".png").name)
    print(json.dumps(result, indent=2))


def save_picture(data: ClassificationDataModule, augment: WeakStrongAugment, before: torch.nn.Module, path: Path) -> None:
    """Rows: clean, weak, strong before, strong now; 16 test images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = torch.stack([data.val_set[i][0] for i in range(16)])
    torch.manual_seed(2)
    rows = [("clean", data.eval_transform(images)), ("weak", augment.weak(images)),
            ("strong before\n(kornia)", before(images)), ("strong now\n(UDA RandAugment)", augment.strong(images))]
    fig, axes = plt.subplots(len(rows), 16, figsize=(16, len(rows) * 1.15))
    for r, (name, x) in enumerate(rows):
        x = (x * augment.std + augment.mean).clamp(0, 1)
        for c in range(16):
            axes[r, c].imshow(x[c, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
