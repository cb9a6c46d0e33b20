"""Semi-supervised segmentation on the built-in Fashion-MNIST scenes: supervised-only vs U2PL.

For each labeled fraction (1/16 and 1/4 of the 2000 train scenes by default) and each start (random
init, or the default MAE recipe's exported encoder, resampled from 32 to 64 px), runs the shipped
recipes ``seg_supervised`` and ``u2pl`` unchanged except for ``--data.labeled_images`` (same model,
same steps, same labeled batches; U2PL adds as many unlabeled scenes per step) and records the val
mIoU of the teacher (all 500 val scenes, 11 classes) after the last epoch, with wall time. Results
are written after every run, so a partial sweep keeps its rows.

Usage:
    python benchmarks/u2pl_scenes.py --mae_encoder runs/mae/TIME/encoder --labeled 125 500
Writes benchmarks/results/u2pl_scenes.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def final_miou(run_dir: Path) -> tuple[float, list[float]]:
    """Last and all val mIoU values logged by the run."""
    values = [float(r["val_miou"]) for r in csv.DictReader(open(run_dir / "metrics.csv")) if r.get("val_miou")]
    return values[-1], values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mae_encoder", help="export folder of the default MAE recipe (needed for --inits mae)")
    parser.add_argument("--labeled", type=int, nargs="+", default=[125, 500], help="labeled train scenes (of 2000)")
    parser.add_argument("--inits", nargs="+", default=["random", "mae"], choices=["random", "mae"])
    parser.add_argument("--methods", nargs="+", default=["seg_supervised", "u2pl"])
    parser.add_argument("--runs", default="runs/bench_u2pl")
    parser.add_argument("--result", default="u2pl_scenes.json")
    parser.add_argument("overrides", nargs="*", help="extra ssl-pretrain overrides for every run")
    args = parser.parse_args()
    if "mae" in args.inits and not args.mae_encoder:
        parser.error("--inits mae needs --mae_encoder")
    out = RESULTS / args.result
    result = json.loads(out.read_text()) if out.is_file() else {"protocol": (
        "val mIoU (500 val scenes from the Fashion-MNIST test split, 64 px, 11 classes) of the teacher after the "
        "shipped recipe (8 epochs x 25 steps, 8 labeled [+ 8 unlabeled] scenes per step, ViT-Tiny width depth 6, "
        "patch 4, progressive upsampling head)"), "runs": {}}
    for labeled in args.labeled:
        for init in args.inits:
            for method in args.methods:
                name = f"{method}_{labeled}lab_{init}"
                run_dir = Path(args.runs) / name
                cmd = ["ssl-pretrain", "--recipe", method, "--run_dir", str(run_dir),
                       "--data.labeled_images", str(labeled), *args.overrides]
                if init == "mae":
                    cmd += ["--model.init_from", args.mae_encoder]
                start = time.perf_counter()
                subprocess.run(cmd, check=True)
                wall = time.perf_counter() - start
                last, curve = final_miou(run_dir)
                result["runs"][name] = {"method": method, "labeled_images": labeled, "init": init, "val_miou": last,
                                        "val_miou_per_epoch": curve, "wall_s": round(wall, 1),
                                        "command": " ".join(cmd)}
                print(json.dumps(result["runs"][name]), flush=True)
                RESULTS.mkdir(exist_ok=True)
                out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
