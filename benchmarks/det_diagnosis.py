"""Supervised ViTDet detector on the built-in Fashion-MNIST detection scenes (#23): which setting makes it learn.

Trains the student of ``ssl_kit.methods.SoftTeacher`` on labeled scenes only (the ``det_supervised`` recipe's
detector) in a plain loop, and scores the STUDENT on the validation scenes every ``--eval_every`` steps with COCO
mAP / mAP@50, at any detection score threshold (``--score_thresh``), so a setting can be judged in minutes.

    python benchmarks/det_diagnosis.py --init runs/tta/bf16_900_s2/encoder --steps 600 --lr 1e-4 --tag lr1e-4
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import kornia.augmentation as K
import torch
from timm.optim import param_groups_layer_decay
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RPNHead

from ssl_kit.data.detection_module import DetectionDataModule
from ssl_kit.methods import SoftTeacher
from ssl_kit.optim import warmup_cosine

RESULTS = Path(__file__).parent / "results" / Path(__file__).stem  # one folder per benchmark


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--init", default=None, help="encoder export / checkpoint (default: random init)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak lr of the encoder's top block")
    p.add_argument("--head_lr_scale", type=float, default=1.0)
    p.add_argument("--layer_decay", type=float, default=1.0)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--anchors", default="16,32,64,128", help="per level, sizes joined by '/': 16/24,32/48,...")
    p.add_argument("--roi_batch", type=int, default=128)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--drop_path", type=float, default=0.1)
    p.add_argument("--brightness", type=float, default=0.4)
    p.add_argument("--labeled_fraction", type=float, default=0.1)
    p.add_argument("--score_thresh", type=float, default=0.0)
    p.add_argument("--eval_every", type=int, default=200)
    p.add_argument("--val_scenes", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="run")
    p.add_argument("--result", default="det_diagnosis.json")
    return p.parse_args()


def set_anchors(detector, spec: str, channels: int) -> None:
    sizes = tuple(tuple(int(s) for s in level.split("/")) for level in spec.split(","))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    detector.rpn.anchor_generator = anchors
    detector.rpn.head = RPNHead(channels, anchors.num_anchors_per_location()[0])


@torch.no_grad()
def evaluate(model, dm, score_thresh: float) -> dict[str, float]:
    detector = model.student
    detector.roi_heads.score_thresh = score_thresh
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
    agnostic = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", iou_thresholds=[0.5])
    detector.eval()
    per_image = []
    for images, targets in dm.val_dataloader():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            detections = detector.detect(dm.eval_images(images))
        detections = [{k: v.float() if v.is_floating_point() else v for k, v in d.items()} for d in detections]
        per_image += [len(d["boxes"]) for d in detections]
        metric.update(detections, targets)
        one = lambda ds: [dict(d, labels=torch.ones_like(d["labels"])) for d in ds]  # noqa: E731
        agnostic.update(one(detections), one(targets))
    detector.train()
    result = metric.compute()
    return {"map": float(result["map"]), "map50": float(result["map_50"]),
            "map50_class_agnostic": float(agnostic.compute()["map"]),
            "detections_per_image": sum(per_image) / len(per_image)}


def main() -> None:
    args = parse()
    torch.manual_seed(args.seed)
    dm = DetectionDataModule(batch_size=args.batch, unlabeled_ratio=0, labeled_fraction=args.labeled_fraction,
                             val_scenes=args.val_scenes, seed=args.seed, num_workers=0)
    dm.augment.photometric[0] = K.RandomBrightness((1 - args.brightness, 1 + args.brightness), p=0.8)
    dm.setup()
    model = SoftTeacher(init_from=args.init, patch_size=args.patch, encoder_kwargs={"depth": args.depth},
                        unsup_weight=0.0, roi_batch=args.roi_batch, drop_path_rate=args.drop_path)
    detector = model.student
    set_anchors(detector, args.anchors, model.hparams.fpn_channels)
    enc = detector.encoder
    groups = param_groups_layer_decay(enc, weight_decay=args.weight_decay, no_weight_decay_list=enc.no_weight_decay(),
                                      layer_decay=args.layer_decay)
    heads = [p for m in (detector.pyramid, detector.rpn, detector.roi_heads) for p in m.parameters()]
    decay = [p for p in heads if p.ndim > 1]
    no_decay = [p for p in heads if p.ndim <= 1]
    groups += [{"params": decay, "weight_decay": args.weight_decay, "lr_scale": args.head_lr_scale},
               {"params": no_decay, "weight_decay": 0.0, "lr_scale": args.head_lr_scale}]
    for g in groups:
        g.setdefault("lr_scale", 1.0)
    opt = torch.optim.AdamW(groups, lr=args.lr)
    loader = dm.make_loader(dm.train_set, True, num_samples=args.steps * args.batch, collate_fn=dm.collate_fn)
    curve, start, step = [], time.time(), 0
    model.train()
    losses_seen = []
    for batch in loader:
        images, targets = dm.on_after_batch_transfer({"labeled": batch}, 0)["labeled"]
        factor = warmup_cosine(step, args.warmup, args.steps, 0.01)
        for g in opt.param_groups:
            g["lr"] = args.lr * factor * g["lr_scale"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = detector.supervised_losses(images, detector.features(images), targets)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(detector.parameters(), 10.0)
        opt.step()
        losses_seen.append({k: float(v.detach()) for k, v in losses.items()})
        step += 1
        if step % args.eval_every == 0 or step == args.steps:
            window = losses_seen[-args.eval_every:]
            mean = {k: round(sum(d[k] for d in window) / len(window), 4) for k in window[0]}
            row = {"step": step, "minutes": round((time.time() - start) / 60, 2), **evaluate(model, dm, args.score_thresh),
                   "train_losses": mean}
            curve.append(row)
            print(json.dumps(row), flush=True)
    out = RESULTS / args.result
    data = json.loads(out.read_text()) if out.is_file() else {}
    data[args.tag] = {"args": vars(args), "curve": curve}
    out.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
