"""What the recipe-sweep benchmarks share: run one ``ssl-pretrain`` command, read a metric's curve from its
``metrics.csv``, and keep a JSON of results that is rewritten after every run (a partial sweep keeps its rows)."""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import time
from pathlib import Path

import torch


def pretrain_command(recipe: str, run_dir: Path, seed: int | None = None, *extra: str,
                     data_seed: bool = False) -> list[str]:
    """``ssl-pretrain --recipe RECIPE --run_dir DIR [--seed_everything S [--data.seed S]] EXTRA...``: the command every
    sweep starts from (``data_seed``: the seed also draws the data: labeled subset, scenes)."""
    cmd = ["ssl-pretrain", "--recipe", recipe, "--run_dir", str(run_dir)]
    if seed is not None:
        cmd += ["--seed_everything", str(seed)] + (["--data.seed", str(seed)] if data_seed else [])
    return cmd + list(extra)


def logged_rows(run_dir: Path) -> list[dict[str, str]]:
    """The rows the run logged, over its resumes: ``metrics.part1.csv``, ``metrics.part2.csv``, ... (kept by
    ``ssl-pretrain`` at each resume) then ``metrics.csv``. A part's rows from the step its successor starts at on
    are dropped (a resume from a checkpoint older than the part's end logs those steps again)."""
    parts = sorted(run_dir.glob("metrics.part*.csv"), key=lambda p: int(p.stem.removeprefix("metrics.part")))
    rows: list[dict[str, str]] = []
    for path in [*parts, run_dir / "metrics.csv"]:
        with open(path) as f:
            part = list(csv.DictReader(f))
        if part:
            start = min(int(r["step"]) for r in part)
            rows = [r for r in rows if int(r["step"]) < start] + part
    return rows


def load_results(out: Path, protocol: str) -> dict:
    return json.loads(out.read_text()) if out.is_file() else {"protocol": protocol, "runs": {}}


def finished_run_wall(run_dir: Path) -> float:
    """Seconds a finished run trained, for recording a run folder without rerunning it: the training time its
    ``checkpoints/last.ckpt`` carries (Lightning's ``Timer``, summed over resumes); for a checkpoint without one
    (runs from before ssl-pretrain kept it), from its ``config.yaml`` (rewritten at each start) to ``last.ckpt``,
    which counts only the last part of a resumed run."""
    last = run_dir / "checkpoints" / "last.ckpt"
    timer = torch.load(last, map_location="cpu", weights_only=False, mmap=True).get("callbacks", {}).get("Timer")
    if timer is not None:
        return float(timer["time_elapsed"]["train"])
    return last.stat().st_mtime - (run_dir / "config.yaml").stat().st_mtime


def run_and_record(cmd: list[str], run_dir: Path, metrics: list[str], result: dict, name: str, out: Path,
                   **info: object) -> dict:
    """Run ``cmd``; record the last value and the per-epoch curve of each metric, the wall time and the command."""
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return record_run(run_dir, metrics, result, name, out, time.perf_counter() - start, " ".join(cmd), **info)


def finished_epochs(run_dir: Path, metric: str, epochs: int) -> bool:
    """Whether ``run_dir`` holds a run that logged ``metric`` after each of its ``epochs`` epochs."""
    if not (run_dir / "metrics.csv").is_file():
        return False
    return sum(1 for r in logged_rows(run_dir) if r.get(metric)) >= epochs


def record_or_run(cmd: list[str], run_dir: Path, metrics: list[str], result: dict, name: str, out: Path, epochs: int,
                  **info: object) -> dict:
    """Record the run already finished in ``run_dir`` (``metrics[0]`` logged for each of ``epochs`` epochs; wall time
    from its files, :func:`finished_run_wall`), or run ``cmd`` and record it."""
    if finished_epochs(run_dir, metrics[0], epochs):
        return record_run(run_dir, metrics, result, name, out, finished_run_wall(run_dir), " ".join(cmd), **info)
    return run_and_record(cmd, run_dir, metrics, result, name, out, **info)


def record_run(run_dir: Path, metrics: list[str], result: dict, name: str, out: Path, wall_s: float, command: str,
               **info: object) -> dict:
    """Record a finished run (its metrics' last values and per-epoch curves, wall time, command) in ``result``
    and rewrite ``out``."""
    row: dict = dict(info)
    rows = logged_rows(run_dir)
    for metric in metrics:
        curve = [float(r[metric]) for r in rows if r.get(metric)]
        row[metric], row[f"{metric}_per_epoch"] = curve[-1], curve
    # the optimizer steps taken at each curve value (Lightning logs the 0-based step index)
    row["curve_steps"] = [int(r["step"]) + 1 for r in rows if r.get(metrics[0])]
    row.update(wall_s=round(wall_s, 1), command=command)
    result["runs"][name] = row
    print(json.dumps(row), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return row


def sweep_parser(doc: str, methods: list[str], runs: str, result: str, inits: list[str]) -> argparse.ArgumentParser:
    """The options every sweep takes: where the pretrained encoders are, which inits / methods, where runs and results
    go, and extra ``ssl-pretrain`` overrides."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mae_encoder", help="encoder export of an MAE run (needed for --inits mae)")
    parser.add_argument("--lomar_encoder", help="encoder export of a LoMaR run (relative-position ViT; for --inits lomar)")
    parser.add_argument("--inits", nargs="+", default=inits, choices=["random", "mae", "lomar"])
    parser.add_argument("--methods", nargs="+", default=methods)
    parser.add_argument("--runs", default=runs)
    parser.add_argument("--result", default=result)
    parser.add_argument("overrides", nargs="*", help="extra ssl-pretrain overrides for every run")
    return parser


def parse_sweep_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    for init in ("mae", "lomar"):
        if init in args.inits and not getattr(args, f"{init}_encoder"):
            parser.error(f"--inits {init} needs --{init}_encoder")
    return args


def init_args(init: str, args: argparse.Namespace) -> list[str]:
    """``ssl-pretrain`` arguments for a start: nothing for random init, ``--model.init_from`` the MAE or LoMaR export
    (which brings its own architecture) otherwise."""
    return [] if init == "random" else ["--model.init_from", getattr(args, f"{init}_encoder")]


def save_curves(fig, ax, ylabel: str, path: Path, legend_size: int = 7) -> None:
    """Finish a curves-against-steps figure of a sweep (labels, grid, legend) and write it as a PNG."""
    import matplotlib.pyplot as plt

    ax.set_xlabel("optimizer steps")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
