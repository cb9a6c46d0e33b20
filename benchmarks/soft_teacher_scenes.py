"""Semi-supervised detection on the built-in Fashion-MNIST detection scenes: supervised-only vs Soft Teacher.

For each start (random init, or an MAE-pretrained encoder export, resampled to patch 8 / 128 px) and seed, runs
the shipped recipes ``det_supervised`` and ``soft_teacher`` unchanged (10 % of the 2000 train scenes labeled, same
detector, same steps, same labeled batches; Soft Teacher adds 4 unlabeled scenes per labeled one) and records
the val COCO mAP and mAP@50 (300 val scenes) of the EMA teacher and of the student after every epoch, with wall
time, and draws the mAP@50 curves.

Usage:
    python benchmarks/soft_teacher_scenes.py --mae_encoder runs/mae/TIME/encoder --seeds 0 1
    python benchmarks/soft_teacher_scenes.py --methods det_supervised --inits mae --seeds 0 --mae_encoder ENC
Writes benchmarks/results/soft_teacher_scenes/detection_scenes.json and detection_scenes.png.
"""
from __future__ import annotations

import sys
from pathlib import Path

from sweep import init_args, load_results, parse_sweep_args, run_and_record, save_curves, sweep_parser

RESULTS = Path(__file__).parent / "results" / Path(__file__).stem  # one folder per benchmark
PROTOCOL = ("val COCO mAP / mAP@50 of the EMA teacher and of the student (300 val scenes from the Fashion-MNIST "
            "test split, 128 px, 10 classes, every detection scored: threshold 0) after each epoch of the shipped "
            "recipe (3000 steps: 15 epochs x 200 since #23's second commit, 10 x 300 for the first det_supervised rows; 2 labeled [+ 8 unlabeled] scenes per step, 10 % of 2000 train scenes "
            "labeled, ViT-Tiny width depth 6, patch 8, ViTDet pyramid + Faster R-CNN, two anchor sizes per level)")
METRICS = ["val_map", "val_map50", "val_map_student", "val_map50_student"]


def plot(result: dict, path: Path) -> None:
    """mAP@50 of the teacher (solid) and the student (dashed) against optimizer steps, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, row) in enumerate(sorted(result["runs"].items())):
        colour = f"C{i}"
        steps = row["curve_steps"]
        ax.plot(steps, row["val_map50_per_epoch"], color=colour, label=name)
        if row.get("val_map50_student_per_epoch"):
            ax.plot(steps, row["val_map50_student_per_epoch"], color=colour, linestyle="--")
    save_curves(fig, ax, "val mAP@50 (solid: teacher, dashed: student)", path)


def main() -> None:
    parser = sweep_parser(__doc__, ["det_supervised", "soft_teacher"], "runs/bench_soft_teacher",
                          "detection_scenes.json", ["mae", "random"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    args = parse_sweep_args(parser)
    out = RESULTS / args.result
    result = load_results(out, PROTOCOL)
    for init in args.inits:
        for method in args.methods:
            for seed in args.seeds:
                name = f"{method}_{init}_s{seed}"
                run_dir = Path(args.runs) / name
                cmd = ["ssl-pretrain", "--recipe", method, "--run_dir", str(run_dir), "--seed_everything", str(seed),
                       "--data.seed", str(seed), "--trainer.enable_progress_bar", "false",
                       *init_args(init, args), *args.overrides]
                run_and_record(cmd, run_dir, METRICS, result, name, out, method=method, init=init, seed=seed)
                plot(result, out.with_suffix(".png"))


if __name__ == "__main__":
    sys.exit(main())
