"""Seconds per training step of every shipped recipe through ``ssl-pretrain``, fp32 vs bf16-mixed.

Each recipe runs ``--trainer.max_steps`` steps (default 8) with its own shapes and data, once per
precision, monitors off; a callback records the wall time of each optimizer step (forward, backward,
optimizer, the data module's device-side augmentation) and the median of the steps after the first two
is reported. Used to size each recipe's step count to its ~10-minute budget (issue #20).

Usage (2 CPU cores, ~10 min for all recipes):
    python benchmarks/precision_steps.py
    python benchmarks/precision_steps.py --recipes mae uda --steps 10
Writes benchmarks/results/precision_steps/precision_steps.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl

RESULTS = Path(__file__).parent / "results" / Path(__file__).stem  # one folder per benchmark
RECIPES = ["mae", "lomar", "ibot", "supervised", "uda", "mpl", "seg_supervised", "u2pl", "det_supervised", "soft_teacher"]


class StepTimer(pl.Callback):
    """Append each training batch's wall seconds to the file named by $SSL_KIT_STEP_TIMES."""

    def __init__(self) -> None:
        self.start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        with open(os.environ["SSL_KIT_STEP_TIMES"], "a") as f:
            f.write(f"{time.perf_counter() - self.start}\n")


def seconds_per_step(recipe: str, precision: str, steps: int) -> float:
    work = Path(tempfile.mkdtemp(prefix=f"steps_{recipe}_"))
    times = work / "times.txt"
    env = dict(os.environ, SSL_KIT_STEP_TIMES=str(times),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    cmd = ["ssl-pretrain", "--recipe", recipe, "--trainer.max_steps", str(steps), "--trainer.max_epochs", "1",
           "--trainer.precision", precision, "--knn_every_n_epochs", "0", "--trainer.enable_progress_bar", "false",
           "--trainer.limit_val_batches", "0", "--trainer.callbacks+=precision_steps.StepTimer", "--run_dir", str(work / "run")]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    values = [float(v) for v in times.read_text().split()]
    return statistics.median(values[2:] if len(values) > 4 else values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default=str(RESULTS / "precision_steps.json"))
    args = parser.parse_args()
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    for recipe in args.recipes:
        fp32 = seconds_per_step(recipe, "32-true", args.steps)
        bf16 = seconds_per_step(recipe, "bf16-mixed", args.steps)
        result[recipe] = {"fp32_s_per_step": round(fp32, 3), "bf16_s_per_step": round(bf16, 3),
                          "speedup": round(fp32 / bf16, 2), "steps_timed": args.steps}
        print(recipe, result[recipe], flush=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
