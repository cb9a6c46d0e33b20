"""kill -9 at random moments of a run, including during checkpoint writes: does it always resume? (issue #26)

One tiny MAE run (fp32, k-NN off, 4 steps per epoch, checkpoints at every epoch end, steps padded to 0.25 s so
that the run outlasts the kills on a fast machine too) is started with ``--ckpt_path last --run_dir RUN`` and
killed with SIGKILL ``--kills`` times: half at a random time after the start (start-up, restore, training,
epoch ends alike), half the moment a checkpoint write is in progress (a ``.partial`` file is seen). After every kill
the newest checkpoint ``--ckpt_path last`` would take must load, and the next start must say it resumes from it.
A last start runs to the end; its weights are compared with an uninterrupted run of the same command (kill -9 loses
the steps since the last checkpoint; the replay is exact, so the weights should be equal).

Usage (2 busy CPU cores, ~6 min):
    python benchmarks/kill_resume.py [--kills 20] [--seed 0]
Writes benchmarks/results/kill_resume/kill_resume.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from ssl_kit.checkpointing import checkpoint_readable, newest_checkpoint

RESULTS = Path(__file__).parent / "results" / Path(__file__).stem  # one folder per benchmark
ARGS = [
    "--recipe", "mae",
    "--model.encoder_kwargs", "{depth: 2, embed_dim: 64, num_heads: 2}",
    "--model.decoder_dim", "32", "--model.decoder_depth", "1", "--model.decoder_heads", "2",
    "--data.batch_size", "16", "--data.num_workers", "0", "--knn_every_n_epochs", "0",
    "--trainer.limit_train_batches", "4", "--trainer.max_epochs", "60", "--trainer.precision", "32-true",
    "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
    "--trainer.callbacks+=kill_resume.SlowSteps",
]
TOTAL_STEPS = 240  # more than 20 starts of 5-15 s get through: every kill finds the run still going


class SlowSteps(pl.Callback):
    """Training steps of at least ``seconds``, whatever the machine (the run then lasts long enough)."""

    def __init__(self, seconds: float = 0.25) -> None:
        self.seconds, self.started = seconds, 0.0

    def on_train_batch_start(self, *args: object) -> None:
        self.started = time.monotonic()

    def on_train_batch_end(self, *args: object) -> None:
        time.sleep(max(0.0, self.seconds - (time.monotonic() - self.started)))


def start(run: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ssl_kit.cli", *ARGS, "--run_dir", str(run), "--ckpt_path", "last"]
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])  # kill_resume.SlowSteps
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=path)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)


def partial_files(run: Path) -> set[Path]:
    """The temporary files of checkpoint writes in progress (or cut short)."""
    return {*run.glob("checkpoints/.*.partial"), *run.glob(".*.partial")}


def kill_at(proc: subprocess.Popen, run: Path, mode: str, rng: random.Random) -> dict:
    """SIGKILL ``proc`` at a random time, or during its n-th checkpoint write (n random 1..3)."""
    t0 = time.monotonic()
    leftovers = partial_files(run)  # from the previous kill: not this start's writes

    def writing() -> bool:
        return bool(partial_files(run) - leftovers)

    if mode == "random time":
        deadline = t0 + rng.uniform(5.0, 15.0)
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
    else:
        wanted, seen, was = rng.randint(1, 3), 0, False
        while proc.poll() is None and time.monotonic() - t0 < 120:
            now = writing()
            if now and not was:
                seen += 1
                if seen == wanted:
                    break
            was = now
            time.sleep(0.0005)
    partial = writing()
    finished = proc.poll() is not None
    if not finished:
        proc.send_signal(signal.SIGKILL)
    code = proc.wait()
    return {"mode": mode, "after_s": round(time.monotonic() - t0, 3), "during_write": partial and not finished,
            "finished_before_kill": finished, "exit_code": code}


def resumed(log: str, expected: str | None) -> bool | None:
    """Whether a start resumed from ``expected`` (started fresh when None); None when killed before it said."""
    if "resuming from" not in log and "starting fresh" not in log:
        return None
    return f"resuming from {expected}" in log if expected else "starting fresh" in log


def newest_state(run: Path) -> tuple[str | None, int | None, bool]:
    """The checkpoint `--ckpt_path last` takes now, its global step, and whether torch.load reads it."""
    path = newest_checkpoint(run) if run.exists() else None
    if path is None:
        return None, None, True
    try:
        step = int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])
        return path, step, checkpoint_readable(Path(path))
    except Exception:  # noqa: BLE001 (any failure to load is what this benchmark counts)
        return path, None, False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/kill_resume"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    out = args.out / time.strftime("%Y%m%d-%H%M%S")
    run, reference = out / "run", out / "reference"
    out.mkdir(parents=True)
    t_start = time.monotonic()

    moments, expected, proc = [], None, None
    try:
        for i in range(args.kills):
            log = out / f"start{i:02d}.log"
            proc = start(run, log)
            moment = kill_at(proc, run, "random time" if i % 2 == 0 else "checkpoint write", rng)
            moment.update(index=i, resumed=resumed(log.read_text(), expected))
            expected, step, readable = newest_state(run)
            moment.update(newest_checkpoint=expected and Path(expected).name, newest_step=step, readable=readable)
            moments.append(moment)
            print(json.dumps(moment), flush=True)
        log = out / "final.log"
        proc = start(run, log)
        final_code = proc.wait()
        final_resumed = resumed(log.read_text(), expected)
        proc = start(reference, out / "reference.log")
        ref_code = proc.wait()
    finally:
        if proc is not None and proc.poll() is None:  # interrupted: do not leave a run behind
            proc.kill()
    a = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    diff = max(float((v.double() - b["state_dict"][k].double()).abs().max()) for k, v in a["state_dict"].items())

    killed = [m for m in moments if not m["finished_before_kill"]]
    decided = [m["resumed"] for m in moments[1:] if m["resumed"] is not None] + [final_resumed]
    summary = {
        "kills": len(killed),
        "kills_during_checkpoint_write": sum(m["during_write"] for m in killed),
        "kills_at_random_times": sum(m["mode"] == "random time" for m in killed),
        "newest_checkpoint_readable_after_kill": sum(m["readable"] for m in killed),
        "later_starts_that_reached_the_resume": len(decided),
        "of_which_resumed_from_the_newest_readable_checkpoint": sum(bool(r) for r in decided),
        "final_exit_code": final_code,
        "final_global_step": int(a["global_step"]),
        "total_steps": TOTAL_STEPS,
        "reference_exit_code": ref_code,
        "max_weight_difference_vs_uninterrupted": diff,
        "wall_s": round(time.monotonic() - t_start, 1),
        "command": "ssl-pretrain " + " ".join(ARGS) + " --run_dir RUN --ckpt_path last",
        "moments": moments,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kill_resume.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "moments"}, indent=2))


if __name__ == "__main__":
    main()
