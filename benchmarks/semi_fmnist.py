"""Semi-supervised classification on Fashion-MNIST: supervised-only vs UDA vs Meta Pseudo Labels.

For each labels-per-class setting, start (random init, or a pretrained MAE export) and seed (labeled subset
and run seed), runs the shipped recipes ``supervised``, ``uda`` and ``mpl`` with the same overrides
(``--extra``), so every method has the same encoder, steps and labeled batches (UDA / MPL add 2 x 112
unlabeled views per step). ``METHOD@supervised`` continues from the same seed's supervised export, head
included (UDA's "start from the fine-tuned model"); ``supervised@supervised`` is its like-for-like baseline
(the same labeled steps again). ``mpl@uda`` is MPL with its teacher warm-up done beforehand: the student starts
from the seed's supervised export, the teacher from the seed's ``uda@supervised`` export (run that first, in the
same ``--runs``). Scores the exported model (EMA classifier / EMA student), loaded with plain
timm, on all 10k test images, and records steps and wall time. Results are written after every run, so a
partial sweep keeps its rows; ``summary`` holds the mean and spread over seeds.

Usage (2 CPU cores, recipe schedule of 360 steps: ~1 min supervised, ~5.5 min UDA):
    python benchmarks/semi_fmnist.py --mae_encoder runs/mae/TIME/encoder --labels 10 --inits mae --seeds 0 1 2 \
        --methods supervised supervised@supervised uda@supervised --result semi_fmnist_from_supervised.json
Writes benchmarks/results/semi_fmnist/semi_fmnist.json (or --result).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ssl_kit.data.semi import SemiSupervisedDataModule
from ssl_kit.encoders import load_exported_encoder
from sweep import pretrain_command  # same folder

RESULTS = Path(__file__).parent / "results" / Path(__file__).stem  # one folder per benchmark
# a method name ending in this continues from the supervised run of the same labels / start / seed (head included):
# "supervised@supervised" is the like-for-like baseline of "uda@supervised" (the same labeled steps again)
FROM_SUPERVISED = "@supervised"


def optimisation_steps(run_dir: Path) -> int:
    """Steps the run made, from its metrics.csv."""
    return 1 + max(int(r["step"]) for r in csv.DictReader(open(run_dir / "metrics.csv")) if r.get("step"))


@torch.no_grad()
def test_top1(export_dir: Path) -> float:
    """Top-1 of the exported classifier (plain timm, as a user loads it) on all 10k Fashion-MNIST test images."""
    model = load_exported_encoder(export_dir).eval()
    data = SemiSupervisedDataModule(mu=0, labels_per_class=10, val_size=0)
    data.setup("fit")
    correct = total = 0
    for images, labels in data.val_dataloader():
        correct += int((model(data.eval_transform(images)).argmax(dim=-1) == labels).sum())
        total += len(labels)
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mae_encoder", required=True, help="export folder of the default MAE recipe")
    parser.add_argument("--labels", type=int, nargs="+", default=[10, 40])
    parser.add_argument("--inits", nargs="+", default=["random", "mae"], choices=["random", "mae"])
    parser.add_argument("--methods", nargs="+", default=["supervised", "uda", "mpl"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="each seed draws its own labeled subset (--data.seed) and run seed (--seed_everything), "
                             "the same for every method")
    parser.add_argument("--runs", default="runs/bench_semi")
    parser.add_argument("--result", default="semi_fmnist.json")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="overrides appended to every command, e.g. --extra --trainer.max_epochs 15")
    args = parser.parse_args()
    out = RESULTS / args.result
    result = json.loads(out.read_text()) if out.is_file() else {"protocol": (
        "test top-1 (all 10k Fashion-MNIST test images, 32 px) of the exported model after the shipped recipe "
        "(16 labeled [+ 2 x 112 unlabeled] images per step, ViT-Tiny width depth 6, patch 4) with the overrides "
        f"{' '.join(args.extra) or 'none'}"),
        "runs": {}}
    for labels, init, seed, method in itertools.product(args.labels, args.inits, args.seeds, args.methods):
        name = f"{method}_{labels}pc_{init}_s{seed}"
        run_dir = Path(args.runs) / name
        cmd = pretrain_command(method, run_dir, seed, "--data.labels_per_class", str(labels), "--data.val_size", "500",
                               *args.extra, data_seed=True)
        supervised_export = Path(args.runs) / f"supervised_{labels}pc_{init}_s{seed}" / "encoder"
        if method.endswith(FROM_SUPERVISED):  # e.g. uda@supervised: start from this seed's supervised export
            recipe = method[: -len(FROM_SUPERVISED)]
            cmd[2] = recipe
            cmd += ["--model.init_from", str(supervised_export)]
        elif method == "mpl@uda":  # student from the supervised export, teacher from this seed's UDA export
            cmd[2] = "mpl"
            cmd += ["--model.init_from", str(supervised_export), "--model.teacher_init_from",
                    str(Path(args.runs) / f"uda@supervised_{labels}pc_{init}_s{seed}" / "encoder")]
        elif init == "mae":
            cmd += ["--model.init_from", args.mae_encoder]
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - start
        result["runs"][name] = {"method": method, "labels_per_class": labels, "init": init, "seed": seed,
                                "test_top1": test_top1(run_dir / "encoder"), "wall_s": round(wall, 1),
                                "steps": optimisation_steps(run_dir), "command": " ".join(cmd)}
        print(json.dumps(result["runs"][name]), flush=True)
        result["summary"] = summarise(result["runs"])
        RESULTS.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


def summarise(runs: dict[str, dict]) -> dict[str, dict]:
    """Mean and spread (half the range) of test top-1 per method, label count and start, over seeds."""
    groups: dict[str, list[float]] = {}
    for row in runs.values():
        groups.setdefault(f"{row['method']}_{row['labels_per_class']}pc_{row['init']}", []).append(row["test_top1"])
    return {k: {"mean": statistics.mean(v), "spread": (max(v) - min(v)) / 2, "n": len(v)} for k, v in groups.items()}

if __name__ == "__main__":
    sys.exit(main())
