"""Semi-supervised detection on the built-in Fashion-MNIST detection scenes: supervised-only vs Soft Teacher.

For each start (random init, or an MAE-pretrained encoder export, resampled to patch 8 / 128 px) and seed, runs
the shipped recipes ``det_supervised`` and ``soft_teacher`` unchanged (10 % of the 2000 train scenes labeled, same
detector, same steps, same labeled batches; Soft Teacher adds 4 unlabeled scenes per labeled one) and records
the val COCO mAP and mAP@50 (300 val scenes) of the EMA teacher and of the student after every epoch, with wall
time, and draws the mAP@50 curves.

Usage:
    python benchmarks/soft_teacher_scenes.py --mae_encoder runs/mae/TIME/encoder --seeds 0 1
    python benchmarks/soft_teacher_scenes.py --methods det_supervised --inits mae --seeds 0 --mae_encoder ENC
    python benchmarks/soft_teacher_scenes.py --inits mae --mae_encoder ENC --steps 3000 --burn_in_steps 1800 --seeds 1
``--steps`` other than the recipes' 6000 sets ``--trainer.max_epochs`` (200-step epochs; the cosine schedule spans
the budget) and needs ``--burn_in_steps`` for Soft Teacher (its labeled-only start, ``--model.sup_only_epochs``).
Runs are named ``METHOD_STEPS_INIT_sSEED`` (rows named without STEPS are 3000-step runs of the earlier recipes);
``--tag T`` (for runs whose extra overrides change the recipe) adds ``_T`` before the init:
    python benchmarks/soft_teacher_scenes.py --methods soft_teacher --inits mae --mae_encoder ENC --seeds 0
        --tag ema99 -- --model.ema_decay 0.99
A finished run already in ``--runs`` (a val value for every epoch, over its resumes) is recorded, not rerun; its wall time is then read from its files.
Writes benchmarks/results/soft_teacher_scenes/detection_scenes.json and detection_scenes.png.
"""
from __future__ import annotations

import sys
from pathlib import Path

from sweep import init_args, load_results, parse_sweep_args, pretrain_command, record_or_run, save_curves, sweep_parser

RESULTS = Path(__file__).parent / "results" / Path(__file__).stem  # one folder per benchmark
PROTOCOL = ("val COCO mAP / mAP@50 of the EMA teacher and of the student (300 val scenes from the Fashion-MNIST "
            "test split, 128 px, 10 classes, every detection scored: threshold 0) after each epoch of the shipped "
            "recipe (6000 steps, 30 epochs x 200, since #23's EMA 0.999 result; rows named without steps: 3000, 15 x 200, or 10 x 300 for the first det_supervised rows; 2 labeled [+ 8 unlabeled] scenes per step, 10 % of 2000 train scenes "
            "labeled, ViT-Tiny width depth 6, patch 8, ViTDet pyramid + Faster R-CNN, two anchor sizes per level)")
METRICS = ["val_map", "val_map50", "val_map_student", "val_map50_student"]
STEPS_PER_EPOCH = 200  # both recipes' limit_train_batches
RECIPE_STEPS = 6000  # both recipes' 30 epochs


def budget_args(method: str, steps: int, burn_in_steps: int | None) -> list[str]:
    """``ssl-pretrain`` overrides for a step budget other than the recipes' (and Soft Teacher's burn-in)."""
    extra = [] if steps == RECIPE_STEPS else ["--trainer.max_epochs", str(steps // STEPS_PER_EPOCH)]
    if method == "soft_teacher" and burn_in_steps is not None:
        extra += ["--model.sup_only_epochs", str(burn_in_steps // STEPS_PER_EPOCH)]
    return extra


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
    parser.add_argument("--steps", type=int, default=RECIPE_STEPS, help="optimizer steps of every run")
    parser.add_argument("--burn_in_steps", type=int, help="Soft Teacher's labeled-only steps (the recipe: 3000)")
    parser.add_argument("--tag", help="a name part for runs whose extra overrides change the recipe: "
                                      "METHOD_STEPS_TAG_INIT_sSEED")
    args = parse_sweep_args(parser)
    for steps in (args.steps, args.burn_in_steps):
        if steps is not None and (steps <= 0 or steps % STEPS_PER_EPOCH):
            parser.error(f"--steps / --burn_in_steps {steps}: give a positive multiple of {STEPS_PER_EPOCH} "
                         "(an epoch).")
    if args.burn_in_steps is not None and args.burn_in_steps >= args.steps:
        parser.error(f"--burn_in_steps {args.burn_in_steps} leaves no step with pseudo boxes in --steps {args.steps}.")
    if args.steps != RECIPE_STEPS and args.burn_in_steps is None and "soft_teacher" in args.methods:
        parser.error(f"--steps {args.steps}: also give Soft Teacher's --burn_in_steps (the recipe's: 3000 of 6000).")
    out = RESULTS / args.result
    result = load_results(out, PROTOCOL)
    epochs = args.steps // STEPS_PER_EPOCH
    for init in args.inits:
        for method in args.methods:
            for seed in args.seeds:
                tag = f"_{args.tag}" if args.tag else ""
                name = f"{method}_{args.steps}{tag}_{init}_s{seed}"
                run_dir = Path(args.runs) / name
                cmd = pretrain_command(method, run_dir, seed, *budget_args(method, args.steps, args.burn_in_steps),
                                       "--trainer.enable_progress_bar", "false", *init_args(init, args),
                                       *args.overrides, data_seed=True)
                record_or_run(cmd, run_dir, METRICS, result, name, out, epochs, method=method, init=init, seed=seed,
                              steps=args.steps)
                plot(result, out.with_suffix(".png"))


if __name__ == "__main__":
    sys.exit(main())
