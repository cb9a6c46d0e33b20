"""Semi-supervised segmentation on the built-in Fashion-MNIST scenes: supervised-only vs U2PL.

For each labeled fraction (1/16 and 1/4 of the 2000 train scenes by default) and each start (random
init, or the default MAE recipe's exported encoder, resampled from 32 to 64 px), runs the shipped
recipes ``seg_supervised`` and ``u2pl`` unchanged except for ``--data.labeled_images`` (same model,
same steps, same labeled batches; U2PL adds as many unlabeled scenes per step) and records the val
mIoU of the teacher (all 500 val scenes, 11 classes) after the last epoch, with wall time. Results
are written after every run, so a partial sweep keeps its rows.

Usage:
    python benchmarks/u2pl_scenes.py --mae_encoder runs/mae/TIME/encoder --labeled 125 500
Writes benchmarks/results/u2pl_scenes/u2pl_scenes.json.
"""
from __future__ import annotations

import sys
from pathlib import Path

from sweep import init_args, load_results, parse_sweep_args, run_and_record, sweep_parser

RESULTS = Path(__file__).parent / "results" / Path(__file__).stem  # one folder per benchmark
PROTOCOL = ("val mIoU (500 val scenes from the Fashion-MNIST test split, 64 px, 11 classes) of the teacher after each "
            "row's command: the shipped recipe (labeled [+ as many unlabeled] scenes per step, ViT-Tiny width depth 6, "
            "progressive upsampling head) with the overrides written in that command")


def main() -> None:
    parser = sweep_parser(__doc__, ["seg_supervised", "u2pl"], "runs/bench_u2pl", "u2pl_scenes.json", ["random", "mae"])
    parser.add_argument("--labeled", type=int, nargs="+", default=[125, 500], help="labeled train scenes (of 2000)")
    args = parse_sweep_args(parser)
    out = RESULTS / args.result
    result = load_results(out, PROTOCOL)
    for labeled in args.labeled:
        for init in args.inits:
            for method in args.methods:
                name = f"{method}_{labeled}lab_{init}"
                run_dir = Path(args.runs) / name
                cmd = ["ssl-pretrain", "--recipe", method, "--run_dir", str(run_dir),
                       "--data.labeled_images", str(labeled), *init_args(init, args), *args.overrides]
                run_and_record(cmd, run_dir, ["val_miou"], result, name, out, method=method, labeled_images=labeled,
                               init=init)


if __name__ == "__main__":
    sys.exit(main())
