"""Does the supervised segmenter learn? The ``seg_supervised_all`` recipe (8000 fully labeled built-in scenes, about
20 CPU minutes) per seed, each from that seed's MAE recipe export; issue #24's goal is val mIoU >= 0.5 within 20 CPU
minutes. Records the teacher's val mIoU after every validation (500 val scenes; ``--data.seed S`` draws both the
train and the val scenes), the steps, the wall time of the whole ``ssl-pretrain`` process, and draws the curves.

    python benchmarks/seg_supervised_all.py --encoders runs/tta/bf16_900_s0/encoder runs/tta/bf16_900_s1/encoder \
        --seeds 0 1 [--reuse]

``--reuse`` records a run folder that already holds a finished run instead of training again; its wall time is then
read from the folder (``config.yaml`` written at the start, ``checkpoints/last.ckpt`` at the end).
Writes benchmarks/results/seg_supervised_all/seg_supervised_all.{json,png}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sweep import finished_run_wall, load_results, pretrain_command, record_run, run_and_record

RESULTS = Path(__file__).parent / "results" / Path(__file__).stem
PROTOCOL = ("ssl-pretrain --recipe seg_supervised_all (8000 labeled 64 px scenes, batch 32, ViT-Tiny width depth 6, patch "
            "8, one upsampling stage, 8190 steps) from the seed's MAE recipe export; val mIoU (11 classes, 500 val scenes "
            "of the Fashion-MNIST test split) of the EMA teacher; wall = the whole process")


def plot(result: dict, path: Path) -> None:
    """Val mIoU against minutes of training (wall scaled by steps), one line per seed, the goal dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, row in result["runs"].items():
        total = row["curve_steps"][-1]
        minutes = [row["wall_s"] / 60 * s / total for s in row["curve_steps"]]
        ax.plot(minutes, row["val_miou_per_epoch"], marker="o", label=name)
    ax.axhline(0.5, color="grey", linestyle="--", label="goal 0.5")
    ax.set_xlabel("CPU minutes (2 cores, bf16; wall scaled by steps)")
    ax.set_ylabel("val mIoU (teacher)")
    ax.set_title("supervised segmenter, 8000 labeled scenes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", required=True, help="one MAE encoder export per seed")
    parser.add_argument("--seeds", nargs="+", type=int, required=True)
    parser.add_argument("--runs", default="runs/bench_seg_all")
    parser.add_argument("--result", default="seg_supervised_all.json")
    parser.add_argument("--reuse", action="store_true", help="record finished run folders instead of training")
    parser.add_argument("overrides", nargs="*", help="extra ssl-pretrain overrides for every run")
    args = parser.parse_args()
    if len(args.encoders) != len(args.seeds):
        parser.error("give one --encoders entry per --seeds entry")
    out = RESULTS / args.result
    result = load_results(out, PROTOCOL)
    for seed, encoder in zip(args.seeds, args.encoders):
        name = f"seed{seed}"
        run_dir = Path(args.runs) / name
        cmd = pretrain_command("seg_supervised_all", run_dir, seed, "--model.init_from", encoder, *args.overrides,
                               data_seed=True)
        last = run_dir / "checkpoints" / "last.ckpt"
        if args.reuse and last.is_file():
            record_run(run_dir, ["val_miou"], result, name, out, finished_run_wall(run_dir), " ".join(cmd), seed=seed,
                       reused=True)
        else:
            run_and_record(cmd, run_dir, ["val_miou"], result, name, out, seed=seed)
        plot(result, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
