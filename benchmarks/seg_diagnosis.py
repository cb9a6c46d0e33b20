"""Why the supervised segmenter learns item classes slowly on the built-in scenes (#24): three measurements.

1. **Item features of a frozen encoder in scenes.** Each item's feature is the mean of the final patch tokens
   under its mask; weighted k-NN (k 20, T 0.07) from the items of 1000 train scenes to those of 300 val scenes.
   Readouts: whole 64 px scene (position grid resampled 8x8 -> 16x16), the same with MAE's sin-cos table for
   16x16 instead of the resampled one, a 32 px window around each item (the pretraining context), and single
   28 px items on a 64 px or a 32 px black canvas; on the 64 px canvas both where the generator put them and the
   same items moved to the centre (the same pixels, only the position differs).
2. **Learning curves of the supervised segmenter** (ViT + progressive upsampling head, per-pixel CE, AdamW
   5e-4 encoder / 5e-3 head, one-cycle, bf16 autocast, batch 8): val mIoU and foreground pixel accuracy on 300
   val scenes, and the same on 300 of its training scenes, for 125 and 2000 labeled scenes.
3. **What a segmenter's pseudo labels know** (``--pseudo_labels CKPT``): its EMA teacher on 400 unlabeled train
   scenes of its run (what U2PL's unsupervised loss trains on): among item pixels predicted as some item, the share
   at or above each confidence (max softmax) and how many of those have the right class.

    python benchmarks/seg_diagnosis.py --encoder runs/mae/TIME/encoder [--skip_training]
    python benchmarks/seg_diagnosis.py --curves_only --skip_training --pseudo_labels RUN/checkpoints/last.ckpt \
        --out benchmarks/results/seg_diagnosis/pseudo_labels.json

Writes benchmarks/results/seg_diagnosis/seg_diagnosis.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassJaccardIndex

from ssl_kit.data import SegmentationDataModule
from ssl_kit.encoders import load_encoder, set_sincos_pos_embed
from ssl_kit.eval.knn import weighted_knn
from ssl_kit.heads.segmentation import ProgressiveUpsamplingHead, SegmentationNet, vit_feature_map
from ssl_kit.methods import U2PL
from ssl_kit.methods.classifier import classifier_param_groups, pretrained_or_random

RESULTS = Path(__file__).parent / "results" / Path(__file__).stem  # one folder per benchmark
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def encoder_at(path: str | None, img_size: int, sincos: bool = False) -> torch.nn.Module:
    vit, _ = load_encoder(pretrained_or_random(path, "tiny", 4, {"depth": 6}), img_size, 1, num_classes=0)
    if sincos:
        with torch.no_grad():
            set_sincos_pos_embed(vit)
    return vit.eval()


def item_features(vit: torch.nn.Module, dm: SegmentationDataModule, dataset, count: int,
                  window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[items, D]`` normalised mask-pooled features and ``[items]`` classes of the first ``count`` scenes."""
    feats, labels = [], []
    for i in range(count):
        image, mask = dataset[i]
        x, mask = dm.eval_images(image[None]), mask.long()
        for c in mask.unique().tolist():
            if c == 0:
                continue
            region, view = mask == c, x
            if window is not None:  # a window x window crop centred on the item
                ys, xs = region.nonzero(as_tuple=True)
                side = mask.shape[-1]
                y0 = min(max(int(ys.float().mean()) - window // 2, 0), side - window)
                x0 = min(max(int(xs.float().mean()) - window // 2, 0), side - window)
                view, region = x[..., y0:y0 + window, x0:x0 + window], region[y0:y0 + window, x0:x0 + window]
            with torch.no_grad(), torch.autocast(**BF16):
                fmap = vit_feature_map(vit, view).float()[0]
            small = F.interpolate(region[None, None].float(), size=fmap.shape[-2:], mode="nearest")[0, 0] > 0
            if small.any():
                feats.append(fmap[:, small].mean(1))
                labels.append(c - 1)
    return F.normalize(torch.stack(feats), dim=1), torch.tensor(labels)


def centre_items(dataset) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Single-item scenes on a black canvas with each item (image and mask) shifted so that its mask's bounding box
    is centred; nothing but the position changes."""
    out = []
    for i in range(len(dataset)):
        image, mask = dataset[i]
        ys, xs = (mask > 0).nonzero(as_tuple=True)
        side = mask.shape[-1]
        shift = (side - int(ys.min() + ys.max())) // 2, (side - int(xs.min() + xs.max())) // 2
        out.append((image.roll(shift, dims=(-2, -1)), mask.roll(shift, dims=(-2, -1))))
    return out


def knn_items(vit: torch.nn.Module, train_dm: SegmentationDataModule, window: int | None = None,
              centred: bool = False) -> dict[str, float]:
    train, val = train_dm.full_train, train_dm.val_set
    if centred:
        train, val = centre_items([train[i] for i in range(1000)]), centre_items([val[i] for i in range(300)])
    tf, tl = item_features(vit, train_dm, train, 1000, window)
    vf, vl = item_features(vit, train_dm, val, 300, window)
    pred = weighted_knn(tf, tl, vf, num_classes=10, k=20, temperature=0.07)[20]
    return {"knn_top1": round(float((pred == vl).float().mean()), 4), "train_items": len(tl), "val_items": len(vl)}


def feature_checks(encoder: str | None) -> dict[str, dict[str, float]]:
    scenes = SegmentationDataModule(labeled_images=2000, unlabeled_ratio=0, img_size=64)
    scenes.setup()
    single64 = SegmentationDataModule(labeled_images=2000, unlabeled_ratio=0, img_size=64, objects=(1, 1),
                                      object_size=(28, 28), texture=False)
    single64.setup()
    single32 = SegmentationDataModule(labeled_images=2000, unlabeled_ratio=0, img_size=32, objects=(1, 1),
                                      object_size=(28, 28), texture=False)
    single32.setup()
    scene_vit = encoder_at(encoder, 64)
    checks = {"scene_64px_resampled_grid": knn_items(scene_vit, scenes)}
    if scene_vit.pos_embed is not None:  # a relative-position encoder (LoMaR's) has no table to swap
        checks["scene_64px_sincos_16x16"] = knn_items(encoder_at(encoder, 64, sincos=True), scenes)
    return {
        **checks,
        "scene_32px_window_per_item": knn_items(encoder_at(encoder, 32), scenes, window=32),
        "single_28px_item_64px_canvas": knn_items(encoder_at(encoder, 64), single64),
        "single_28px_item_64px_canvas_centred": knn_items(encoder_at(encoder, 64), single64, centred=True),
        "single_28px_item_32px_canvas": knn_items(encoder_at(encoder, 32), single32),
    }


THRESHOLDS = (0.0, 0.5, 0.7, 0.9, 0.95, 0.99)


def confidence_table(probs: torch.Tensor, target: torch.Tensor) -> list[dict[str, float | None]]:
    """``[N, K, H, W]`` softmax and ``[N, H, W]`` truth -> for each threshold, the share of item pixels (true item,
    predicted as some item) at or above it and their class accuracy (None where none pass)."""
    conf, pred = probs.max(dim=1)
    both = (pred > 0) & (target > 0)
    conf, right = conf[both], (pred == target)[both]
    rows = []
    for t in THRESHOLDS:
        keep = conf >= t
        rows.append({"threshold": t, "share": round(float(keep.float().mean()), 4),
                     "class_accuracy": round(float(right[keep].float().mean()), 4) if keep.any() else None})
    return rows


@torch.no_grad()
def pseudo_label_check(checkpoint: str, scenes: int = 400) -> dict:
    """A segmenter's teacher on the first ``scenes`` unlabeled train scenes of its run (its config.yaml)."""
    from seg_errors import load_run  # same folder

    model, dm, _ = load_run(checkpoint)
    labeled = set(dm.subset_indices)
    unlabeled = [i for i in range(len(dm.full_train)) if i not in labeled][:scenes]
    images, masks = map(torch.stack, zip(*[dm.full_train[i] for i in unlabeled]))
    with torch.autocast(**BF16):
        probs = torch.cat([model(dm.eval_images(images[i:i + 64])).float().softmax(1) for i in range(0, len(images), 64)])
    target, pred = masks.long(), probs.argmax(1)
    return {"checkpoint": checkpoint, "unlabeled_scenes": len(unlabeled),
            "pixel_accuracy": round(float((pred == target).float().mean()), 4),
            "item_pixel_accuracy": round(float((pred == target)[target > 0].float().mean()), 4),
            "by_confidence": confidence_table(probs, target)}


def segmentation_curve(encoder: str | None, labeled: int, steps: int, every: int, seed: int = 0,
                       encoder_lr: float = 5e-4, head_lr: float = 5e-3, patch_size: int | None = None) -> list[dict]:
    torch.manual_seed(seed)
    dm = SegmentationDataModule(labeled_images=labeled, unlabeled_ratio=0, seed=seed)
    dm.setup()
    x = torch.stack([dm.full_train[i][0] for i in dm.subset_indices])
    y = torch.stack([dm.full_train[i][1] for i in dm.subset_indices])
    val_x = dm.eval_images(torch.stack([dm.val_set[i][0] for i in range(300)]))
    val_y = torch.stack([dm.val_set[i][1] for i in range(300)]).long()
    train_x, train_y = dm.eval_images(x[:300]), y[:300].long()
    net = U2PL(init_from=encoder, drop_path_rate=0.1).student
    if patch_size is not None:  # the encoder's patch embedding resampled (timm), the head upsampling to stride 2
        vit, _ = load_encoder(pretrained_or_random(encoder, "tiny", patch_size, {"depth": 6}), 64, 1, num_classes=0,
                              drop_path_rate=0.1, patch_size=patch_size)
        net = SegmentationNet(vit, ProgressiveUpsamplingHead(vit.embed_dim, 11, num_upsample=int(patch_size // 2).bit_length() - 1))
    groups = classifier_param_groups(net.encoder, 0.05, 1.0)
    for g in groups:
        g["lr"] = encoder_lr
    groups.append({"params": list(net.head.parameters()), "lr": head_lr, "weight_decay": 0.05})
    opt = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=steps, pct_start=0.1)

    def score(images: torch.Tensor, masks: torch.Tensor) -> tuple[float, float]:
        net.eval()
        miou, hits, fg = MulticlassJaccardIndex(11, average="macro"), 0, 0
        with torch.no_grad(), torch.autocast(**BF16):
            for i in range(0, len(images), 50):
                pred, true = net(images[i:i + 50]).logits.argmax(1), masks[i:i + 50]
                miou.update(pred, true)
                hits += int(((pred == true) & (true > 0)).sum())
                fg += int((true > 0).sum())
        net.train()
        return round(float(miou.compute()), 4), round(hits / fg, 4)

    curve, start = [], time.time()
    for step in range(1, steps + 1):
        batch = torch.randint(len(x), (8,))
        images, masks = dm.augment(x[batch], y[batch])
        with torch.autocast(**BF16):
            logits = net(images).logits
        loss = F.cross_entropy(logits.float(), masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % every == 0:
            (val_miou, val_fg), (train_miou, train_fg) = score(val_x, val_y), score(train_x, train_y)
            curve.append({"step": step, "val_miou": val_miou, "val_fg_acc": val_fg, "train_miou": train_miou,
                          "train_fg_acc": train_fg, "wall_s": round(time.time() - start, 1)})
            print(labeled, curve[-1], flush=True)
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default=None, help="encoder export (default: random init)")
    parser.add_argument("--skip_training", action="store_true")
    parser.add_argument("--curves_only", action="store_true", help="skip the item k-NN measurements")
    parser.add_argument("--labeled", type=int, nargs="+", default=[125, 2000], help="labeled scenes of each curve")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--encoder_lr", type=float, default=5e-4, help="peak one-cycle lr of the encoder")
    parser.add_argument("--head_lr", type=float, default=5e-3, help="peak one-cycle lr of the head")
    parser.add_argument("--patch_size", type=int, default=None,
                        help="segment with this patch size (the encoder's patch embedding resampled); default: its own")
    parser.add_argument("--pseudo_labels", nargs="*", default=[], help="segmenter checkpoints for measurement 3")
    parser.add_argument("--out", default=str(RESULTS / "seg_diagnosis.json"))
    args = parser.parse_args()
    result = {"encoder": args.encoder, "encoder_lr": args.encoder_lr, "head_lr": args.head_lr,
              "patch_size": args.patch_size}
    if not args.curves_only:
        result["item_knn"] = feature_checks(args.encoder)
        print(json.dumps(result["item_knn"], indent=1), flush=True)
    if not args.skip_training:
        result["curves"] = {f"{n}_labeled": segmentation_curve(args.encoder, n, args.steps, args.steps // 4,
                                                               encoder_lr=args.encoder_lr, head_lr=args.head_lr,
                                                               patch_size=args.patch_size)
                            for n in args.labeled}
    if args.pseudo_labels:
        result["pseudo_labels"] = [pseudo_label_check(c) for c in args.pseudo_labels]
        print(json.dumps(result["pseudo_labels"], indent=1), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
