"""Semi-supervised segmentation on the built-in Fashion-MNIST scenes: supervised-only vs U2PL.

For each labeled fraction (1/16 and 1/4 of the 2000 train scenes by default) and each start (random
init, or the default MAE recipe's exported encoder, resampled from 32 to 64 px), runs the shipped
recipes ``seg_supervised`` and ``u2pl`` unchanged except for ``--data.labeled_images`` (same model,
same steps, same labeled batches; U2PL adds as many unlabeled scenes per step) and records the val
mIoU of the teacher (all 500 val scenes, 11 classes) after the last epoch, with wall time. Results
are written after every run, so a partial sweep keeps its rows.

Usage:
    python benchmarks/u2pl_scenes.py --mae_encoder runs/mae/TIME/encoder --labeled 125 500
    python benchmarks/u2pl_scenes.py --plot u2pl_scenes_lomar_s0.json u2pl_scenes_lomar_classrank_s0.json \
        --result u2pl_scenes_lomar.json       # only the curves of earlier results, into u2pl_scenes_lomar.png
Writes benchmarks/results/u2pl_scenes/u2pl_scenes.json and its per-validation curves as u2pl_scenes.png.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from sweep import (init_args, load_results, parse_sweep_args, pretrain_command, run_and_record, save_curves,
                   sweep_parser)

RESULTS = Path(__file__).parent / "results" / Path(__file__).stem  # one folder per benchmark
PROTOCOL = ("val mIoU (500 val scenes from the Fashion-MNIST test split, 64 px, 11 classes) of the teacher after each "
            "row's command: the shipped recipe (labeled [+ as many unlabeled] scenes per step, ViT-Tiny width depth 6, "
            "progressive upsampling head) with the overrides written in that command")


def plot(results: dict[str, dict], path: Path) -> None:
    """Val mIoU of the teacher against optimizer steps for every run of ``results`` (result file stem -> result):
    one colour per seed, one marker per variant (the stem without its seed), U2PL solid, supervised dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = sorted({re.sub(r"_s\d+$", "", stem) for stem in results})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for stem, result in results.items():
        variant = re.sub(r"_s\d+$", "", stem)
        for name, row in sorted(result["runs"].items()):
            found = re.search(r"--seed_everything (\d+)", str(row["command"]))
            seed = int(found.group(1)) if found else 0
            ax.plot(row["curve_steps"], row["val_miou_per_epoch"], color=f"C{seed}", marker=".x^sv"[
                variants.index(variant) % 5], linestyle="--" if row.get("method") == "seg_supervised" else "-",
                label=f"{variant.removeprefix('u2pl_scenes_')} {name} seed {seed}")
    save_curves(fig, ax, "val mIoU of the teacher (500 val scenes)", path, legend_size=6)


def main() -> None:
    parser = sweep_parser(__doc__, ["seg_supervised", "u2pl"], "runs/bench_u2pl", "u2pl_scenes.json", ["random", "mae"])
    parser.add_argument("--labeled", type=int, nargs="+", default=[125, 500], help="labeled train scenes (of 2000)")
    parser.add_argument("--plot", nargs="+", metavar="RESULT",
                        help="run nothing: draw the curves of these result files (in the results folder) into the "
                             "PNG named by --result")
    if (early := parser.parse_args()).plot:
        plot({Path(name).stem: json.loads((RESULTS / name).read_text()) for name in early.plot},
             (RESULTS / early.result).with_suffix(".png"))
        return
    args = parse_sweep_args(parser)
    out = RESULTS / args.result
    result = load_results(out, PROTOCOL)
    for labeled in args.labeled:
        for init in args.inits:
            for method in args.methods:
                name = f"{method}_{labeled}lab_{init}"
                run_dir = Path(args.runs) / name
                cmd = pretrain_command(method, run_dir, None, "--data.labeled_images", str(labeled),
                                       *init_args(init, args), *args.overrides)
                run_and_record(cmd, run_dir, ["val_miou"], result, name, out, method=method, labeled_images=labeled,
                               init=init)
                plot({out.stem: result}, out.with_suffix(".png"))


if __name__ == "__main__":
    sys.exit(main())
