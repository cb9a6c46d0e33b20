"""Runs that survive what clusters and users do to them (issue #26): checkpoints written whole or not at all,
kill -9 at any moment, SIGTERM writes a checkpoint the run resumes from."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from helpers import TINY_ARGS
from ssl_kit.checkpointing import AtomicCheckpointIO, remove_partial_writes, with_atomic_checkpoints
from ssl_kit.checkpointing import checkpoint_readable, newest_checkpoint
from ssl_kit.cli import pretrain_main
from ssl_kit.precision import Trainer

ROOT = Path(__file__).resolve().parent.parent


def test_a_write_cut_short_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 3, "w": torch.arange(1000.0)}, path)
    before = path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04" + b"\0" * 5000)  # the start of a zip archive, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 6, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before and checkpoint_readable(path)
    assert torch.load(path, weights_only=False)["global_step"] == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # the partial write is removed
    io.save_checkpoint({"global_step": 6}, path)  # and the next write replaces the file
    assert torch.load(path, weights_only=False)["global_step"] == 6
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # as a plain open() would create it


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_trainers_write_atomically_unless_given_another_checkpoint_io(tmp_path):
    assert isinstance(Trainer(logger=False, default_root_dir=tmp_path).strategy.checkpoint_io, AtomicCheckpointIO)
    own = TorchCheckpointIO()
    assert with_atomic_checkpoints([own]) == [own]
    trainer = Trainer(logger=False, plugins=[own], default_root_dir=tmp_path)
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO
    assert [type(p) for p in with_atomic_checkpoints(None)] == [AtomicCheckpointIO]


def test_last_ignores_and_the_next_start_removes_partial_writes(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    torch.save({"global_step": 3}, last)
    partial = tmp_path / "checkpoints" / ".last.ckpt.123-abcd.partial"
    partial.write_bytes(b"PK\x03\x04 cut short")
    hpc_partial = tmp_path / ".hpc_ckpt_2.ckpt.124-beef.partial"
    hpc_partial.write_bytes(b"")
    os.utime(last, (1000, 1000))  # the partial files are newer
    assert newest_checkpoint(tmp_path) == str(last)
    assert sorted(remove_partial_writes(tmp_path)) == sorted([partial, hpc_partial])
    assert not partial.exists() and not hpc_partial.exists() and last.exists()


# ---------------------------------------------------------------------------------------------- end to end
def cli_args(run: Path, *extra: str) -> list[str]:
    """A tiny MAE run of 3 steps per epoch that resumes the newest checkpoint of ``run`` when there is one."""
    return [*TINY_ARGS, "--knn_every_n_epochs", "0", "--trainer.enable_progress_bar", "false", "--run_dir", str(run),
            "--ckpt_path", "last", *extra]


def cli_command(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ssl_kit.cli", *cli_args(run, *extra)]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, env=env, cwd=log.parent, stdout=subprocess.DEVNULL, stderr=log.open("w"))


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended before the moment the test waits for"
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def global_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


@pytest.mark.slow
def test_kill_9_at_any_moment_leaves_a_checkpoint_the_run_resumes_from(tmp_path):
    run = tmp_path / "run"
    ckpts, last = run / "checkpoints", run / "checkpoints" / "last.ckpt"
    slow = '{"class_path": "helpers.SlowCheckpointIO", "init_args": {"pause": 0.5}}'  # a kill can land mid-write
    cmd = cli_command(run, "--trainer.max_epochs", "3", "--trainer.plugins", slow)  # 9 steps, 3 per epoch

    # 1. killed while last.ckpt is being replaced at epoch 1's end: the file stays epoch 0's, whole
    proc = start(cmd, tmp_path / "1.log")
    wait_for(lambda: last.exists() and any(ckpts.glob(".last.ckpt.*.partial")), proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert checkpoint_readable(last) and global_step(last) == 3
    assert len(list(ckpts.glob(".last.ckpt.*.partial"))) == 1  # what the killed write left

    # 2. resumed, killed again as soon as it says so (restoring / first steps)
    proc = start(cmd, tmp_path / "2.log")
    wait_for(lambda: "resuming from" in (tmp_path / "2.log").read_text(), proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    err = (tmp_path / "2.log").read_text()
    assert f"resuming from {last}" in err and "removed 1 checkpoint write(s) cut short by a killed process" in err
    assert checkpoint_readable(last) and global_step(last) in (3, 6)

    # 3. resumed to the end
    proc = start(cmd, tmp_path / "3.log")
    assert proc.wait(timeout=180) == 0, (tmp_path / "3.log").read_text()[-3000:]
    assert f"resuming from {last}" in (tmp_path / "3.log").read_text()
    assert global_step(last) == 9 and not list(ckpts.glob(".*.partial"))


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    cmd = cli_command(run, "--trainer.max_epochs", "3", "--trainer.callbacks+=helpers.SlowSteps",
                      "--trainer.callbacks.seconds", "0.3")
    proc = start(cmd, tmp_path / "run.log")
    wait_for(lambda: last.exists(), proc)  # epoch 0 is done
    time.sleep(0.4)  # in epoch 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    err = (tmp_path / "run.log").read_text()
    step = global_step(last)
    assert 3 <= step < 9 and checkpoint_readable(last)
    line = next(line for line in err.splitlines() if line.startswith("ssl-pretrain: stopped by SIGTERM"))
    assert line.startswith(f"ssl-pretrain: stopped by SIGTERM at step {step}; checkpoint {last}. "
                           "Resume with: ssl-pretrain --recipe mae ")
    assert line.endswith(f"--ckpt_path last --run_dir {run}") and "Traceback" not in err

    assert pretrain_main(cli_args(run, "--trainer.max_epochs", "3")) == 0  # resumed (in this process: faster)
    assert global_step(last) == 9


def test_sigterm_inside_a_gradient_accumulation_window_waits_for_its_optimizer_step(tmp_path, capsys):
    """With --trainer.accumulate_grad_batches 2, a SIGTERM after the first batch of a window is held until the
    window's optimizer step: a checkpoint between the two batches would drop the gradient of the first, and the
    resumed run would differ from the uninterrupted one."""
    from helpers import TINY_ARGS, assert_same_final_state
    from ssl_kit.cli import pretrain_main

    full, cut = tmp_path / "full", tmp_path / "cut"
    args = [*TINY_ARGS, "--knn_every_n_epochs", "0", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "4",
            "--trainer.accumulate_grad_batches", "2", "--trainer.precision", "32-true"]
    assert pretrain_main([*args, "--run_dir", str(full)]) == 0
    # batch 5 of 8 is the first of epoch 1's first window: the run stops after batch 6, at optimizer step 3
    assert pretrain_main([*args, "--run_dir", str(cut), "--trainer.callbacks+=helpers.SignalAtBatch",
                          "--trainer.callbacks.batch", "5"]) == 143
    assert "stopped by SIGTERM at step 3" in capsys.readouterr().err
    stopped = torch.load(cut / "checkpoints" / "last.ckpt", weights_only=False)
    assert stopped["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 2}]
    assert pretrain_main([*args, "--run_dir", str(cut), "--ckpt_path", "last"]) == 0
    assert_same_final_state(full / "checkpoints" / "last.ckpt", cut / "checkpoints" / "last.ckpt", steps=4)
