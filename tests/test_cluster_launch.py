"""Cluster launches of `ssl-pretrain`: the SLURM job script (scripts/slurm_job.py) and torchrun, on CPU.

The SLURM runs use a stand-in `srun` (one machine, SLURM_NTASKS processes with the variables srun sets)
and a stand-in `scontrol`, with the job variables sbatch would set derived from the script's #SBATCH lines.
"""
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from helpers import TINY_ARGS
from ssl_kit.checkpointing import newest_checkpoint
from ssl_kit.cli import pretrain_main

ROOT = Path(__file__).resolve().parent.parent
RENDERER = ROOT / "scripts" / "slurm_job.py"

FAKE_SRUN = r"""#!/bin/bash
# Stand-in for srun on one machine: SLURM_NTASKS copies of the command, each with the variables srun sets.
while [[ "$1" == -* ]]; do shift; done  # srun's own options (--kill-on-bad-exit=1)
printf '%s\n' "$@" > "$FAKE_SRUN_ARGS"
if [[ -n "$FAKE_SRUN_DRY" ]]; then exit 0; fi
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""

# Lightning calls `scontrol requeue JOB_ID` after the SIGUSR1 checkpoint; SLURM would then end the job.
FAKE_SCONTROL = r"""#!/bin/bash
echo "$@" >> "$FAKE_SCONTROL_LOG"
kill -KILL 0
"""


class RequeueSignalAtStep(pl.Callback):
    """Every rank receives SIGUSR1 (SLURM's --signal) after optimizer step ``step``."""

    def __init__(self, step: int = 4):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(30)  # the handler saves hpc_ckpt_N.ckpt and calls scontrol, which ends the job


def render(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RENDERER), *args], capture_output=True, text=True, timeout=60)


def sbatch_directives(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S*))?$", script, flags=re.M))


def clean_env() -> dict[str, str]:
    """This environment without any launcher's variables (SLURM, torchrun)."""
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
                "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in launcher}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def free_job_id() -> str:
    """A job id whose Lightning default port (15000 + its last 4 digits) is free here."""
    for _ in range(100):
        digits = random.randint(0, 9999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 15000 + digits))
            except OSError:
                continue
        return f"7{digits:04d}"
    raise RuntimeError("no free port in 15000-24999")


def fake_cluster(tmp_path: Path, script: str, job_id: str) -> dict[str, str]:
    """PATH with the stand-in srun/scontrol, plus the job variables sbatch sets for ``script``'s directives."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    d = sbatch_directives(script)
    nodes, per_node = int(d["nodes"]), int(d["ntasks-per-node"])
    return dict(
        clean_env(), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        FAKE_SRUN_ARGS=str(tmp_path / "srun_args.txt"), FAKE_SCONTROL_LOG=str(tmp_path / "scontrol.log"),
        SLURM_JOB_ID=job_id, SLURM_JOB_NAME=d["job-name"], SLURM_NNODES=str(nodes),
        SLURM_NTASKS_PER_NODE=str(per_node), SLURM_NTASKS=str(nodes * per_node),
        SLURM_CPUS_PER_TASK=d["cpus-per-task"], SLURM_NODELIST="localhost", SLURM_JOB_NODELIST="localhost",
    )


def run_job(tmp_path: Path, env: dict, *extra: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """``bash job.sbatch EXTRA`` as sbatch (or a requeue) would start it: #SBATCH lines are comments."""
    return subprocess.run(["bash", str(tmp_path / "job.sbatch"), *extra], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout, start_new_session=True)


def option(args: list[str], name: str) -> str:
    assert args.count(name) == 1, (name, args)
    return args[args.index(name) + 1]


def test_rendered_job_script_agrees_with_lightning_arguments(tmp_path):
    done = render("--recipe", "mae", "--nodes", "2", "--gpus-per-node", "4", "--time", "1-00:00:00",
                  "--partition", "gpu", "-o", str(tmp_path / "job.sbatch"), "--", "--trainer.max_epochs", "400")
    assert done.returncode == 0, done.stderr
    script = (tmp_path / "job.sbatch").read_text()
    assert "{{" not in script
    d = sbatch_directives(script)
    assert d["nodes"] == "2" and d["ntasks-per-node"] == "4" and d["gres"] == "gpu:4"
    assert d["time"] == "1-00:00:00" and d["partition"] == "gpu" and int(d["cpus-per-task"]) >= 1
    assert d["signal"] == "SIGUSR1@90" and "requeue" in d and d["open-mode"] == "append"
    # the srun line as bash expands it under the job's variables (a dry stand-in srun records its argv)
    env = dict(fake_cluster(tmp_path, script, "123456"), FAKE_SRUN_DRY="1")
    done = run_job(tmp_path, env, "--trainer.precision", "bf16-mixed")
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "srun_args.txt").read_text().splitlines()
    assert args[:3] == ["ssl-pretrain", "--recipe", "mae"]
    assert option(args, "--trainer.devices") == d["ntasks-per-node"] == d["gres"].split(":")[-1]
    assert option(args, "--trainer.num_nodes") == d["nodes"]
    assert option(args, "--trainer.strategy") == "ddp"
    assert option(args, "--ckpt_path") == "last"
    assert option(args, "--run_dir") == "runs/mae/123456"  # the job id: the same folder after a requeue
    assert option(args, "--trainer.max_epochs") == "400"  # renderer overrides
    assert args[-2:] == ["--trainer.precision", "bf16-mixed"]  # `sbatch job.sbatch ARGS` pass through
    srun_line = " ".join(l.strip(" \\") for l in script.split("\nsrun ", 1)[1].splitlines())
    assert '--trainer.num_nodes "${SLURM_NNODES}"' in srun_line  # from the allocation, not a second constant
    assert srun_line.startswith("--kill-on-bad-exit=1 ")


@pytest.mark.parametrize("args, message", [
    (["--recipe", "mae", "--nodes", "1", "--gpus-per-node", "0"], "--gpus-per-node must be at least 1"),
    (["--recipe", "nope", "--nodes", "1", "--gpus-per-node", "4"], "unknown recipe 'nope'; available: "),
    (["--recipe", "mae", "--nodes", "0", "--gpus-per-node", "4"], "--nodes must be at least 1"),
    (["--recipe", "mae", "--nodes", "1", "--gpus-per-node", "4", "--time", "1 day"], "is not a SLURM time"),
    (["--recipe", "mae", "--nodes", "1", "--gpus-per-node", "4", "--", "--trainer.devices", "2"],
     "--trainer.devices is set by the job script"),
])
def test_renderer_rejects_invalid_requests(args, message):
    if "--time" not in args:
        args = [*args[:6], "--time", "1:00:00", *args[6:]]
    done = render(*args)
    assert done.returncode == 2 and done.stdout == ""
    assert "slurm_job.py: error:" in done.stderr and message in done.stderr, done.stderr


def test_ckpt_path_last_picks_the_newest_of_last_and_hpc_checkpoints(tmp_path):
    assert newest_checkpoint(tmp_path) is None  # first start of a job: nothing to resume
    (tmp_path / "checkpoints").mkdir()
    last, hpc1, hpc2 = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt", tmp_path / "hpc_ckpt_2.ckpt"
    for i, path in enumerate([hpc2, last, hpc1]):
        torch.save({"global_step": i}, path)  # a readable (zip) checkpoint file
        os.utime(path, (1000 + i, 1000 + i))
    assert newest_checkpoint(tmp_path) == str(hpc1)  # newest by time, not the highest hpc number
    os.utime(last, (2000, 2000))
    assert newest_checkpoint(tmp_path) == str(last)  # an epoch-end save after the last requeue


def test_ckpt_path_last_needs_a_run_dir(capsys):
    assert pretrain_main([*TINY_ARGS, "--ckpt_path", "last"]) == 2
    assert "--ckpt_path last resumes the newest checkpoint of a run folder: pass --run_dir too" in capsys.readouterr().err


def render_tiny_job(tmp_path: Path, *extra: str) -> tuple[str, dict]:
    """1 node x 2 'GPUs' running the tiny MAE on CPU, the CLI started with this interpreter."""
    assert TINY_ARGS[:2] == ["--recipe", "mae"]
    done = render("--recipe", "mae", "--nodes", "1", "--gpus-per-node", "2", "--cpus-per-task", "1", "--time", "10",
                  "--run-dir", f"{tmp_path}/runs/mae/${{SLURM_JOB_ID}}", "--command", f"{shlex.quote(sys.executable)} -m ssl_kit.cli",
                  "-o", str(tmp_path / "job.sbatch"), "--", *TINY_ARGS[2:], "--trainer.accelerator", "cpu", *extra)
    assert done.returncode == 0, done.stderr
    script = (tmp_path / "job.sbatch").read_text()
    job_id = free_job_id()
    return tmp_path / "runs" / "mae" / job_id, fake_cluster(tmp_path, script, job_id)


def global_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


@pytest.mark.slow
def test_slurm_job_runs_two_tasks_and_a_requeue_resumes(tmp_path):
    run, env = render_tiny_job(tmp_path, "--trainer.max_epochs", "1")
    first = run_job(tmp_path, env)
    assert first.returncode == 0, first.stderr[-3000:]
    err = first.stderr
    assert "SLURM auto-requeueing enabled" in err  # Lightning picked SLURMEnvironment ...
    assert "All distributed processes registered. Starting with 2 processes" in err  # ... with SLURM_NTASKS ranks
    assert "effective batch 32 (16 per device x 2 processes x 1 accumulation)" in err
    assert f"--ckpt_path last: no checkpoint in {run} yet, starting fresh" in err
    assert global_step(run / "checkpoints" / "last.ckpt") == 3

    again = run_job(tmp_path, env, "--trainer.max_epochs", "2")  # the requeued job: same script, same job id
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {run / 'checkpoints' / 'last.ckpt'}" in again.stderr
    assert f"Restored all states from the checkpoint at {run / 'checkpoints' / 'last.ckpt'}" in again.stderr
    assert global_step(run / "checkpoints" / "last.ckpt") == 6


@pytest.mark.slow
def test_slurm_requeue_signal_checkpoint_is_resumed(tmp_path):
    run, env = render_tiny_job(tmp_path, "--trainer.max_epochs", "2")
    killed = run_job(tmp_path, env, "--trainer.callbacks+=test_cluster_launch.RequeueSignalAtStep",
                     "--trainer.callbacks.step", "4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert f"Handling auto-requeue signal: {int(signal.SIGUSR1)}" in killed.stderr
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", env["SLURM_JOB_ID"]]
    hpc = run / "hpc_ckpt_1.ckpt"
    assert global_step(hpc) == 4 and global_step(run / "checkpoints" / "last.ckpt") == 3  # epoch 0's end

    resumed = run_job(tmp_path, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {hpc}" in resumed.stderr
    assert global_step(run / "checkpoints" / "last.ckpt") == 6


@pytest.mark.slow
def test_slurm_tasks_per_node_must_match_devices(tmp_path):
    """Lightning refuses --trainer.devices != --ntasks-per-node at once (no hang)."""
    run, env = render_tiny_job(tmp_path, "--trainer.max_epochs", "1")
    done = run_job(tmp_path, env, "--trainer.devices", "1", timeout=90)
    assert done.returncode != 0
    assert ("You set `devices=1` in Lightning, but the number of tasks per node configured in SLURM"
            " `--ntasks-per-node=2` does not match") in done.stderr
    assert not (run / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path):
    """`torchrun --standalone --nproc_per_node 2` (its module form, with this interpreter) launching the CLI."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--tee", "3",
           "-m", "ssl_kit.cli", *TINY_ARGS, "--run_dir", str(run), "--trainer.max_epochs", "1",
           "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    done = subprocess.run(cmd, env=clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "[default0]:" in out and "[default1]:" in out  # --tee 3: every line prefixed by its local rank
    assert "All distributed processes registered. Starting with 2 processes" in out
    assert "effective batch 32 (16 per device x 2 processes x 1 accumulation)" in out
    assert global_step(run / "checkpoints" / "last.ckpt") == 3
    assert (run / "encoder" / "model.safetensors").is_file()
