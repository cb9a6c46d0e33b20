"""Semi-supervised detection on the built-in Fashion-MNIST detection scenes: supervised-only vs Soft Teacher.

For each start (random init, or an MAE-pretrained encoder export, resampled to patch 8 / 128 px), runs the
shipped recipes ``det_supervised`` and ``soft_teacher`` unchanged (10 % of the 2000 train scenes labeled, same
detector, same steps, same labeled batches; Soft Teacher adds 4 unlabeled scenes per labeled one) and records
the teacher's val COCO mAP and mAP@50 (300 val scenes) after every epoch, with wall time.

Usage:
    python benchmarks/soft_teacher_scenes.py --mae_encoder runs/mae/TIME/encoder
Writes benchmarks/results/soft_teacher_scenes.json.
"""
from __future__ import annotations

import sys
from pathlib import Path

from sweep import RESULTS, init_args, load_results, parse_sweep_args, run_and_record, sweep_parser

PROTOCOL = ("val COCO mAP / mAP@50 of the EMA teacher (300 val scenes from the Fashion-MNIST test split, 128 px, "
            "10 classes) after the shipped recipe (8 epochs x 40 steps, 2 labeled [+ 8 unlabeled] scenes per step, "
            "10 % of 2000 train scenes labeled, ViT-Tiny width depth 6, patch 8, ViTDet pyramid + Faster R-CNN)")


def main() -> None:
    parser = sweep_parser(__doc__, ["det_supervised", "soft_teacher"], "runs/bench_soft_teacher",
                          "soft_teacher_scenes.json", ["mae", "random"])
    args = parse_sweep_args(parser)
    out = RESULTS / args.result
    result = load_results(out, PROTOCOL)
    for init in args.inits:
        for method in args.methods:
            name = f"{method}_{init}"
            run_dir = Path(args.runs) / name
            cmd = ["ssl-pretrain", "--recipe", method, "--run_dir", str(run_dir), *init_args(init, args.mae_encoder),
                   *args.overrides]
            run_and_record(cmd, run_dir, ["val_map", "val_map50"], result, name, out, method=method, init=init)


if __name__ == "__main__":
    sys.exit(main())
