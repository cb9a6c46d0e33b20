"""How good are Soft Teacher's pseudo boxes? (issue #23) Precision and recall of a checkpoint's EMA-teacher
detections against the true boxes of the built-in scenes, per score threshold.

A detection is right when it has the class of a true box it overlaps at IoU >= 0.5 (each true box matched once,
highest score first). Precision = right / detections above the threshold; recall = matched true boxes / true boxes.
``located`` is the same precision with the classes ignored: the share of detections that sit on some object, so
``precision / located`` separates wrong classes from boxes on background.

``--split val`` (default) scores the 300 val scenes; ``--split unlabeled`` the train scenes that a
``--labeled_fraction`` run of data seed ``--seed`` leaves unlabeled: exactly the images the pseudo boxes of that run
are drawn on (their true boxes are known for the built-in scenes).

    python benchmarks/det_pseudo_boxes.py runs/det/RUN/checkpoints/last.ckpt [--thresholds 0.5 0.7 0.9]
    python benchmarks/det_pseudo_boxes.py CKPT --seed 1 --split unlabeled --scenes 400

Writes benchmarks/results/det_pseudo_boxes/det_pseudo_boxes.json (one entry per checkpoint).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset
from torchvision.ops import box_iou

from ssl_kit.data import DetectionDataModule
from ssl_kit.data.detection_module import detection_collate
from ssl_kit.methods import SoftTeacher

RESULTS = Path(__file__).parent / "results" / Path(__file__).stem  # one folder per benchmark


def match(boxes: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, gt_boxes: torch.Tensor,
          gt_labels: torch.Tensor, iou: float = 0.5) -> torch.Tensor:
    """``[n]`` bool: detection i (in score order) matches a not yet matched true box of its class at IoU >= ``iou``."""
    right = torch.zeros(len(boxes), dtype=torch.bool)
    if len(boxes) == 0 or len(gt_boxes) == 0:
        return right
    overlaps = box_iou(boxes, gt_boxes)
    taken = torch.zeros(len(gt_boxes), dtype=torch.bool)
    for i in scores.argsort(descending=True).tolist():
        candidates = (overlaps[i] >= iou) & (gt_labels == labels[i]) & ~taken
        if candidates.any():
            j = int(torch.where(candidates, overlaps[i], torch.zeros_like(overlaps[i])).argmax())
            right[i], taken[j] = True, True
    return right


def load_soft_teacher(path: str) -> SoftTeacher:
    """The checkpoint's SoftTeacher in eval mode; checkpoints written before the EMA copy was named ``ema_teacher``
    (2026-11-28) keep it under ``teacher.``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = SoftTeacher(**{k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")})
    state = {("ema_" + k if k.startswith("teacher.") else k): v for k, v in ckpt["state_dict"].items()}
    model.load_state_dict(state)
    return model.eval()


def split_scenes(dm: DetectionDataModule, split: str, limit: int | None) -> Dataset:
    """The val scenes, or the train scenes the data module leaves unlabeled (with their true boxes); the first
    ``limit`` of them when given."""
    if split == "val":
        scenes = dm.val_set
    else:
        labeled = set(dm.subset_indices)
        scenes = Subset(dm.full_train, [i for i in range(len(dm.full_train)) if i not in labeled])
    return Subset(scenes, range(min(limit, len(scenes)))) if limit else scenes


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.5, 0.7, 0.9])
    parser.add_argument("--seed", type=int, default=0, help="data seed of the scenes (and of the labeled subset)")
    parser.add_argument("--split", choices=["val", "unlabeled"], default="val")
    parser.add_argument("--labeled_fraction", type=float, default=0.1, help="with --split unlabeled")
    parser.add_argument("--scenes", type=int, default=None, help="score only the first N scenes of the split")
    args = parser.parse_args()
    out = RESULTS / "det_pseudo_boxes.json"
    result = json.loads(out.read_text()) if out.is_file() else {}
    dm = DetectionDataModule(seed=args.seed, unlabeled_ratio=0, labeled_fraction=args.labeled_fraction)
    dm.setup("fit")
    scenes = split_scenes(dm, args.split, args.scenes)
    for ckpt in args.checkpoints:
        model = load_soft_teacher(ckpt)
        counts = {t: {"detections": 0, "right": 0, "located": 0} for t in args.thresholds}
        true_boxes = 0
        for start in range(0, len(scenes), 16):
            batch = [scenes[i] for i in range(start, min(start + 16, len(scenes)))]
            images, targets = dm.on_after_batch_transfer(detection_collate(batch), 0)
            for det, gt in zip(model.pseudo_boxes(images), targets):
                true_boxes += len(gt["boxes"])
                for t in args.thresholds:
                    keep = det["scores"] > t
                    boxes, labels, scores = det["boxes"][keep], det["labels"][keep], det["scores"][keep]
                    right = match(boxes, labels, scores, gt["boxes"], gt["labels"])
                    located = match(boxes, torch.zeros_like(labels), scores, gt["boxes"],
                                    torch.zeros_like(gt["labels"]))  # classes ignored
                    counts[t]["detections"] += int(keep.sum())
                    counts[t]["right"] += int(right.sum())  # each right detection matched its own true box
                    counts[t]["located"] += int(located.sum())
        key = ckpt if args.split == "val" else f"{ckpt} [unlabeled train scenes, data seed {args.seed}]"
        result[key] = {f"{args.split}_scenes": len(scenes), "true_boxes_per_scene": round(true_boxes / len(scenes), 3),
                       "by_threshold": {
            str(t): {"boxes_per_scene": round(c["detections"] / len(scenes), 3),
                     "precision": round(c["right"] / max(c["detections"], 1), 4),
                     "located": round(c["located"] / max(c["detections"], 1), 4),
                     "recall": round(c["right"] / max(true_boxes, 1), 4)} for t, c in counts.items()}}
        print(key, json.dumps(result[key]), flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
