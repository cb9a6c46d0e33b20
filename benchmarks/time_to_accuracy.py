"""Time to accuracy: minutes of this machine until the MAE recipe's encoder reaches a k-NN target.

The speed figure users care about. For each step budget (``--budgets``, optimizer steps of the MAE
recipe: 5 epochs of budget/5 batches of 256, the same warmup + cosine schedule fitted to the budget) and
each seed, this runs ``ssl-pretrain --recipe mae`` (wall clock of the whole command, start-up and the
per-epoch k-NN monitor included), then scores the exported encoder with the full weighted k-NN
(k = 20, T = 0.07, all 60k training images as memory, all 10k test images; ``pretrain_knn.py``).
The target is the official MAE code's 10-minute result on Fashion-MNIST (79.1 %, ViT 192 wide, depth 6,
32 px, patch 4, decoder 128 x 2, batch 256). Time to accuracy = the wall time of the shortest budget
whose seed mean reaches the target.

It also measures, in the same process and on the same machine state, the per-step time of the recipe's
model in ssl_kit's setting (the recipe's precision, per-length attention kernel, fused AdamW, tuned
allocator) against a straightforward implementation (fp32, timm's default attention, torch's default
AdamW), on the recipe's exact shapes.

Usage (2 CPU cores; one 400-step budget ~5 min + ~2 min of k-NN):
    python benchmarks/time_to_accuracy.py --budgets 400,800 --seeds 0,1
    python benchmarks/time_to_accuracy.py --budgets 400 --seeds 0 --precision 32-true   # the fp32 reference
    python benchmarks/time_to_accuracy.py --step_ratio_only [--compile] --out X.json
Writes benchmarks/results/time_to_accuracy[_TAG].json (rows are merged into an existing file, so budgets
and seeds can be run in separate calls).
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
from typing import Any, Callable

import torch

from pretrain_knn import feature_dtype, features, knn_top1  # same folder
from sweep import pretrain_command
from ssl_kit.data.augment import EvalTransform
from ssl_kit.data.fashion_mnist import MEAN, STD, load_fashion_mnist
from ssl_kit.encoders import load_exported_encoder

RESULTS = Path(__file__).parent / "results" / Path(__file__).stem  # one folder per benchmark
TARGET = 0.791  # official MAE code, 10 minutes on this kind of machine
EPOCHS = 5


def pretrain(steps: int, seed: int, precision: str, run_dir: Path, extra: list[str]) -> float:
    """Run the MAE recipe for ``steps`` optimizer steps; returns the command's wall seconds."""
    if steps % EPOCHS:
        raise SystemExit(f"--budgets: {steps} is not a multiple of {EPOCHS} epochs")
    cmd = pretrain_command("mae", run_dir, seed, "--trainer.max_epochs", str(EPOCHS), "--trainer.limit_train_batches",
                           str(steps // EPOCHS), "--trainer.precision", precision, "--trainer.enable_progress_bar",
                           "false", *extra)
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    (run_dir / "wall_s.txt").write_text(f"{wall:.1f}\n")
    return wall


def full_knn(encoder_dir: Path, dtype: torch.dtype | None) -> tuple[float, float]:
    """(top-1, extraction + scoring seconds) of an export on the full splits."""
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    transform = EvalTransform(32, MEAN, STD)
    model = load_exported_encoder(encoder_dir)
    start = time.perf_counter()
    top1 = knn_top1(features(model, train_x, transform, dtype), train_y, features(model, test_x, transform, dtype), test_y)
    return top1, time.perf_counter() - start


def step_ratio(precision: str, steps: int = 8, compiled: bool = False) -> dict[str, Any]:
    """Median ms per training step of the recipe's model: ssl_kit's setting vs a straightforward one; with
    ``compiled`` also ssl_kit's setting under ``torch.compile`` (inductor) and the seconds its first step takes."""
    from timm.layers import use_fused_attn
    from timm.models.vision_transformer import Attention

    from mae_throughput import make_optimizer  # same folder: the training's optimizer and a plain one

    from ssl_kit.methods import MAE
    from ssl_kit.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    images = torch.randn(256, 1, 32, 32)
    dtype = feature_dtype(precision)

    def make(straightforward: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = MAE(encoder="tiny", encoder_kwargs={"depth": 6}, img_size=32, patch_size=4, in_chans=1, decoder_dim=128,
                    decoder_depth=2, decoder_heads=4, norm_pix_loss=False).train()
        if straightforward:
            for m in model.modules():
                if isinstance(m, Attention):
                    m.fused_attn = use_fused_attn()
            return model, make_optimizer(model, "default")
        model.select_attention_kernels("cpu")
        return model, make_optimizer(model, "ssl_kit")

    def one_step(model: torch.nn.Module, opt: torch.optim.Optimizer, autocast: torch.dtype | None,
                 forward: Callable[[torch.Tensor], Any] | None = None) -> float:
        """Seconds of one training step (``forward``: a compiled model, else the model itself)."""
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = (forward if forward is not None else model)(images)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def time_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, autocast: torch.dtype | None,
                   forward: Callable[[torch.Tensor], Any] | None = None) -> list[float]:
        return [one_step(model, opt, autocast, forward) for _ in range(steps + 2)][2:]

    ours, base = make(False), make(True)
    ours_ms, base_ms = [], []
    for _ in range(2):  # interleaved, so drifting machine speed hits both alike
        ours_ms += [1e3 * t for t in time_steps(*ours, dtype)]
        base_ms += [1e3 * t for t in time_steps(*base, None)]
    ours_med, base_med = statistics.median(ours_ms), statistics.median(base_ms)
    result = {"precision": str(dtype or torch.float32), "ssl_kit_ms_per_step": round(ours_med, 1),
              "straightforward_fp32_ms_per_step": round(base_med, 1), "speedup": round(base_med / ours_med, 3),
              "shape": "MAE recipe: ViT 192 wide, depth 6, 32 px, patch 4, 1 channel, decoder 128 x 2, batch 256"}
    if compiled:
        model, opt = make(False)
        forward = torch.compile(model)
        compile_s = one_step(model, opt, dtype, forward)  # the first call compiles
        compiled_ms, eager_ms = [], []
        for _ in range(2):  # interleaved with the eager model, as above
            compiled_ms += [1e3 * t for t in time_steps(model, opt, dtype, forward)]
            eager_ms += [1e3 * t for t in time_steps(*ours, dtype)]
        compiled_med, eager_med = statistics.median(compiled_ms), statistics.median(eager_ms)
        result.update(compile_first_step_s=round(compile_s, 1), compiled_ms_per_step=round(compiled_med, 1),
                      eager_ms_per_step_same_run=round(eager_med, 1), compiled_speedup=round(eager_med / compiled_med, 3),
                      compile_pays_after_steps=round(compile_s / max((eager_med - compiled_med) / 1e3, 1e-9)))
    return result


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Seed mean / spread per (precision, budget), and the first budget whose mean reaches the target."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["precision"], r["steps"]), []).append(r)
    table = []
    for (precision, steps), rs in sorted(groups.items()):
        accs = [r["knn_top1"] for r in rs]
        walls = [r["pretrain_wall_s"] for r in rs]
        table.append({"precision": precision, "steps": steps, "seeds": [r["seed"] for r in rs],
                      "knn_mean": round(statistics.mean(accs), 4),
                      "knn_spread": round(max(accs) - min(accs), 4), "pretrain_minutes_mean": round(statistics.mean(walls) / 60, 2),
                      "reaches_target": statistics.mean(accs) >= TARGET})
    reached = {}
    for row in table:
        if row["reaches_target"] and row["precision"] not in reached:
            reached[row["precision"]] = row["pretrain_minutes_mean"]
    return {"target_knn": TARGET, "by_budget": table, "minutes_to_target": reached or "not reached at any budget run"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="400,800", help="optimizer steps, comma separated (multiples of 5)")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--precision", default="auto", choices=["auto", "32-true", "bf16-mixed"])
    parser.add_argument("--runs", default="runs/tta", help="run folders go here")
    parser.add_argument("--reuse", action="store_true",
                        help="score existing run folders (with their recorded wall_s.txt) instead of pretraining again")
    parser.add_argument("--step_ratio_only", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="also time the recipe's model under torch.compile, and its compile time")
    parser.add_argument("--out", default=str(RESULTS / "time_to_accuracy.json"))
    parser.add_argument("overrides", nargs="*", help="extra ssl-pretrain overrides (after --)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    result: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    if args.compile:  # a cold compile, as a user's first run has: an empty inductor cache of its own
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="tta_inductor_")
    result["step_ratio"] = step_ratio(args.precision, compiled=args.compile)
    print("per step:", result["step_ratio"], flush=True)
    if not args.step_ratio_only:
        dtype = feature_dtype(args.precision)
        precision = "bf16" if dtype == torch.bfloat16 else "fp32"
        for steps in (int(s) for s in args.budgets.split(",")):
            for seed in (int(s) for s in args.seeds.split(",")):
                run_dir = Path(args.runs) / f"{precision}_{steps}_s{seed}"
                if args.reuse and (run_dir / "wall_s.txt").is_file():
                    wall = float((run_dir / "wall_s.txt").read_text())
                else:
                    wall = pretrain(steps, seed, args.precision, run_dir, args.overrides)
                top1, knn_s = full_knn(run_dir / "encoder", dtype)
                row = {"precision": precision, "steps": steps, "seed": seed, "pretrain_wall_s": round(wall, 1),
                       "knn_top1": round(top1, 4), "knn_wall_s": round(knn_s, 1), "run_dir": str(run_dir),
                       "overrides": args.overrides}
                print(row, flush=True)
                result["rows"] = [r for r in result["rows"] if r["run_dir"] != str(run_dir)] + [row]
                result.update(summarise(result["rows"]))
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result, indent=2) + "\n")
    result.update(summarise(result["rows"]))
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
