"""``ssl-finetune`` vs ``ssl-linear-probe`` vs ``ssl-knn`` with their DEFAULTS on one encoder, several seeds.

For each seed: the seeded labeled subset (10 labels per class) or all 60k labels, then the three commands
as a user runs them (no overrides but the subset and the seed), scored on all 10k Fashion-MNIST test
images. Results are written after every run. Usage (2 CPU cores; ~5 min per fine-tune, ~0.5 / 2.5 min per
probe at 10 / all labels):
    python benchmarks/probe_vs_finetune.py --encoder runs/mae/TIME/encoder --seeds 0 1 2 --labels 10
    python benchmarks/probe_vs_finetune.py --encoder runs/mae/TIME/encoder --seeds 0 1 --labels all
Writes benchmarks/results/probe_vs_finetune/probe_vs_finetune.json (rows keyed by labels/command/seed, plus mean and spread).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from ssl_kit.eval.cli import finetune_main, knn_main, linear_probe_main

RESULTS = Path(__file__).parent / "results" / Path(__file__).stem  # one folder per benchmark


def run(command, argv: list[str], out: Path) -> tuple[dict, float]:
    start = time.perf_counter()
    if command(argv + ["--out", str(out)]) != 0:
        raise SystemExit(f"{command.__name__} failed: {' '.join(argv)}")
    return json.loads((out / "metrics.json").read_text()), round(time.perf_counter() - start, 1)


def summarise(rows: dict[str, dict]) -> dict[str, dict]:
    groups: dict[str, list[float]] = {}
    for row in rows.values():
        groups.setdefault(f"{row['labels']}/{row['command']}", []).append(row["test_top1"])
    return {k: {"mean": statistics.mean(v), "spread": (max(v) - min(v)) / 2, "n": len(v), "values": v} for k, v in groups.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", required=True, help="export folder of the pretrained encoder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labels", choices=["10", "all"], default="10")
    parser.add_argument("--commands", nargs="+", default=["knn", "linear_probe", "finetune"])
    parser.add_argument("--runs", default="runs/bench_probe_ft")
    parser.add_argument("--result", default="probe_vs_finetune.json")
    args = parser.parse_args()
    path = RESULTS / args.result
    result = json.loads(path.read_text()) if path.is_file() else {
        "protocol": "each command with its own defaults on the same export; test top-1 on all 10k Fashion-MNIST test "
                    "images; 10-label subsets seeded by --data.seed (the same subset for every command of a seed)",
        "encoder": args.encoder, "rows": {}}
    commands = {"knn": knn_main, "linear_probe": linear_probe_main, "finetune": finetune_main}
    for seed in args.seeds:
        subset = ["--data.labels_per_class", "10"] if args.labels == "10" else []
        for name in args.commands:
            if name == "knn" and args.labels == "all":
                continue  # the all-label k-NN is the pretraining benchmark's figure
            argv = ["--encoder", args.encoder, *subset, "--data.seed", str(seed)]
            metrics, wall = run(commands[name], argv, Path(args.runs) / f"{args.labels}_{name}_s{seed}")
            top1 = metrics["knn_top1"]["20"] if name == "knn" else metrics["val_top1_final"]
            result["rows"][f"{args.labels}/{name}/s{seed}"] = {
                "labels": args.labels, "command": name, "seed": seed, "test_top1": top1, "wall_s": wall,
                "readout": metrics.get("feature") or metrics.get("global_pool"), "steps": metrics.get("steps"),
                "argv": " ".join(argv)}
            print(json.dumps(result["rows"][f"{args.labels}/{name}/s{seed}"]), flush=True)
            result["summary"] = summarise(result["rows"])
            RESULTS.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
