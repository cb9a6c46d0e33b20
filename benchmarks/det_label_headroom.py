"""How much could the unlabeled scenes add? The supervised detector with 10 % and with all of the train scenes
labeled, at the same steps (#23).

Soft Teacher turns unlabeled scenes into (noisy) labeled ones; a detector trained on the TRUE boxes of every scene
bounds what it can gain at a given step budget. For each labeled fraction, step budget and seed this runs the shipped
``det_supervised`` recipe unchanged but for ``--data.labeled_fraction`` and ``--trainer.max_epochs`` (200-step epochs;
the cosine schedule spans the budget) and records the val COCO mAP / mAP@50 of the EMA teacher and of the student
after every epoch, with wall time, and draws the mAP@50 curves.

Usage:
    python benchmarks/det_label_headroom.py --mae_encoder ENC --fractions 0.1 1.0 --steps 3000 6000 --seeds 1
A finished run already in ``--runs`` (a val value for every epoch) is recorded, not rerun; its wall time is then
the time between its ``config.yaml`` and its ``checkpoints/last.ckpt``.
Writes benchmarks/results/soft_teacher_scenes/detection_label_headroom.json and .png.
"""
from __future__ import annotations

import sys
from pathlib import Path

from soft_teacher_scenes import METRICS, plot
from sweep import init_args, load_results, parse_sweep_args, pretrain_command, record_or_run, sweep_parser

RESULTS = Path(__file__).parent / "results" / "soft_teacher_scenes"
STEPS_PER_EPOCH = 200  # the recipe's limit_train_batches
PROTOCOL = ("val COCO mAP / mAP@50 of the EMA teacher and of the student (300 val scenes from the Fashion-MNIST test "
            "split, every detection scored) after each 200-step epoch of the shipped det_supervised recipe (2 labeled "
            "scenes per step, ViT-Tiny width depth 6, patch 8, ViTDet pyramid + Faster R-CNN); only the labeled "
            "fraction of the 2000 train scenes and the number of epochs change")


def run_name(fraction: float, steps: int, init: str, seed: int) -> str:
    """``labeled10_3000_mae_s1`` for 10 % labeled, 3000 steps, MAE start, seed 1."""
    return f"labeled{round(fraction * 100)}_{steps}_{init}_s{seed}"


def main() -> None:
    parser = sweep_parser(__doc__, ["det_supervised"], "runs/bench_det_headroom", "detection_label_headroom.json",
                          ["mae"])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.1, 1.0])
    parser.add_argument("--steps", nargs="+", type=int, default=[3000])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    args = parse_sweep_args(parser)
    for steps in args.steps:
        if steps <= 0 or steps % STEPS_PER_EPOCH:
            parser.error(f"--steps {steps}: give a positive multiple of {STEPS_PER_EPOCH} (the recipe's epoch).")
    out = RESULTS / args.result
    result = load_results(out, PROTOCOL)
    for init in args.inits:
        for steps in args.steps:
            for fraction in args.fractions:
                for seed in args.seeds:
                    name = run_name(fraction, steps, init, seed)
                    run_dir = Path(args.runs) / name
                    epochs = steps // STEPS_PER_EPOCH
                    cmd = pretrain_command("det_supervised", run_dir, seed, "--data.labeled_fraction", str(fraction),
                                           "--trainer.max_epochs", str(epochs), "--trainer.enable_progress_bar",
                                           "false", *init_args(init, args), *args.overrides, data_seed=True)
                    record_or_run(cmd, run_dir, METRICS, result, name, out, epochs, labeled_fraction=fraction,
                                  steps=steps, init=init, seed=seed)
                    plot(result, out.with_suffix(".png"))


if __name__ == "__main__":
    sys.exit(main())
