"""Where a segmenter's mIoU goes: item masks or item classes? (issue #24)

For a U2PL / seg_supervised checkpoint, on the built-in val scenes (the same 500 the run scores), with the
evaluated network (the EMA teacher):
  * per-class IoU and mIoU (torchmetrics' definition: background included, classes absent from both ignored);
  * foreground IoU: every item class merged into one "item" class against background, so only the masks count;
  * item accuracy: an item (all pixels of one class in a scene's true mask) is right when the majority of the
    item classes predicted on its pixels is its class;
  * two oracle mIoUs that split the loss: "true classes on the predicted masks" (every pixel predicted as some
    item that is an item takes its true class: class confusions removed, mask errors kept) and "predicted
    classes on the true masks" (each true item filled with its majority predicted class, background elsewhere:
    mask errors removed, class errors kept).

The scenes are those of the run: its ``config.yaml`` (beside ``checkpoints/``) gives the data seed, scene counts and
item settings. ``--split train`` scores the first ``--max_scenes`` of its LABELED training scenes instead (eval transform), to tell
overfitting from underfitting.

Usage:
    python benchmarks/seg_errors.py runs/u2pl/TIME/checkpoints/last.ckpt [--tag NAME] [--split train]
Writes benchmarks/results/seg_errors/seg_errors.json (one entry per checkpoint, merged).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torchmetrics.functional.classification import multiclass_confusion_matrix

from ssl_kit.data import SegmentationDataModule
from ssl_kit.methods import U2PL
from ssl_kit.precision import autocast_dtype, resolve_precision

RESULTS = Path(__file__).parent / "results" / Path(__file__).stem  # one folder per benchmark


def confusion(pred: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """``[k, k]`` pixel counts, rows = true class, columns = predicted class (torchmetrics)."""
    return multiclass_confusion_matrix(pred.flatten(), target.flatten(), k)


def iou_per_class(conf: torch.Tensor) -> torch.Tensor:
    """``[k]`` IoU; NaN for a class absent from both truth and prediction."""
    union = conf.sum(0) + conf.sum(1) - conf.diag()
    return torch.where(union > 0, conf.diag() / union.clamp(min=1), torch.nan)


def majority_item_class(pred: torch.Tensor, region: torch.Tensor) -> int:
    """The most frequent item class (> 0) predicted on ``region``; 0 when none of it is predicted as an item."""
    votes = pred[region]
    votes = votes[votes > 0]
    return int(torch.mode(votes).values) if len(votes) else 0


def error_split(pred: torch.Tensor, target: torch.Tensor, k: int) -> dict[str, torch.Tensor | int]:
    """Confusions of the prediction and of the two oracles for one batch ``[B, H, W]``, and item counts."""
    true_classes = torch.where((pred > 0) & (target > 0), target, pred)
    true_masks = torch.zeros_like(pred)
    right = items = 0
    for b in range(len(pred)):
        for c in target[b].unique().tolist():
            if c == 0:
                continue
            region = target[b] == c
            guess = majority_item_class(pred[b], region)
            true_masks[b][region] = guess
            right += int(guess == c)
            items += 1
    return {"pred": confusion(pred, target, k), "true_classes": confusion(true_classes, target, k),
            "true_masks": confusion(true_masks, target, k), "items": items, "items_right": right}


SCENE_ARGS = ("seed", "img_size", "train_scenes", "val_scenes", "labeled_images", "objects", "object_size", "texture")


def run_scenes(checkpoint: str) -> dict:
    """The built-in scene settings of the run that wrote ``checkpoint`` (its config.yaml), ``{}`` without one."""
    import yaml

    config = Path(checkpoint).resolve().parent.parent / "config.yaml"
    if not config.is_file():
        return {}
    data = yaml.safe_load(config.read_text())["data"]["init_args"]
    return {key: data[key] for key in SCENE_ARGS if data.get(key) is not None}


def load_run(checkpoint: str) -> tuple[U2PL, SegmentationDataModule, dict]:
    """The segmenter of ``checkpoint`` (eval mode), a set-up data module with its run's scenes, and those settings."""
    model = U2PL.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    scenes = {"img_size": model.hparams.img_size, "labeled_images": None, **run_scenes(checkpoint)}
    dm = SegmentationDataModule(**scenes, unlabeled_ratio=0)
    dm.setup("fit")
    return model, dm, scenes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--tag", default=None, help="name of the entry (default: the run folder)")
    parser.add_argument("--split", choices=["val", "train"], default="val")
    parser.add_argument("--max_scenes", type=int, default=500, help="labeled training scenes scored with --split train")
    parser.add_argument("--result", default="seg_errors.json")
    args = parser.parse_args()
    model, dm, scenes = load_run(args.checkpoint)
    k = model.hparams.num_classes
    if args.split == "train":
        subset = torch.utils.data.Subset(dm.full_train, dm.subset_indices[:args.max_scenes])  # scenes it trained on
        loader = torch.utils.data.DataLoader(subset, batch_size=64)
    else:
        loader = dm.val_dataloader()
    dtype = autocast_dtype(resolve_precision("auto"))
    totals: dict[str, torch.Tensor | int] = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        for images, masks in loader:
            pred = model(dm.eval_images(images)).float().argmax(dim=1)
            for key, value in error_split(pred, masks.long(), k).items():
                totals[key] = totals.get(key, 0) + value
    conf = totals["pred"]
    both_items = conf[1:, 1:].sum()  # item pixels predicted as some item
    foreground_iou = both_items / (conf[1:].sum() + conf[:, 1:].sum() - both_items)
    miou = {name: round(float(iou_per_class(totals[name]).nanmean()), 4) for name in ("pred", "true_classes", "true_masks")}
    entry = {
        "checkpoint": args.checkpoint,
        "scenes": scenes,
        "split": args.split,
        "scored_scenes": len(loader.dataset),
        "miou": miou["pred"],
        "iou_per_class": [round(float(v), 4) for v in iou_per_class(conf)],
        "foreground_iou": round(float(foreground_iou), 4),
        "item_accuracy": round(totals["items_right"] / totals["items"], 4),
        "items": totals["items"],
        "miou_true_classes_on_predicted_masks": miou["true_classes"],
        "miou_predicted_classes_on_true_masks": miou["true_masks"],
    }
    print(json.dumps(entry, indent=2))
    out = RESULTS / args.result
    result = json.loads(out.read_text()) if out.is_file() else {}
    tag = args.tag or Path(args.checkpoint).parent.parent.name + ("_train" if args.split == "train" else "")
    result[tag] = entry
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
