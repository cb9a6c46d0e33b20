"""Callbacks and plugins the end-to-end tests inject through --trainer.callbacks / --trainer.plugins (importable:
tests/ is on sys.path)."""
import io
import os
import signal
import time

import pytorch_lightning as pl
import torch

from ssl_kit.checkpointing import AtomicCheckpointIO

TINY_ARGS = [
    "--recipe", "mae",
    "--model.encoder_kwargs", "{depth: 2, embed_dim: 64, num_heads: 2}",
    "--model.decoder_dim", "32", "--model.decoder_depth", "1", "--model.decoder_heads", "2",
    "--data.batch_size", "16", "--data.num_workers", "0",
    "--data.knn_train_size", "200", "--data.knn_test_size", "100",
    "--trainer.limit_train_batches", "3", "--trainer.log_every_n_steps", "1",
]


class StopAfterEpoch(pl.Callback):
    """Simulate an interrupted run: stop cleanly at the end of epoch ``epoch``."""

    def __init__(self, epoch: int = 0):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


class SignalAtStep(pl.Callback):
    """Simulate a pre-emption: the process sends itself ``signum`` (SIGTERM by default) after optimizer step
    ``step``."""

    def __init__(self, step: int = 2, signum: int = int(signal.SIGTERM)):
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class SignalAtBatch(pl.Callback):
    """Send ``signum`` (SIGTERM by default) to this process after the ``batch``-th training batch of the run (counted
    from 1 over all epochs), wherever that falls in a gradient-accumulation window."""

    def __init__(self, batch: int = 1, signum: int = int(signal.SIGTERM)):
        self.batch, self.signum, self.seen = batch, signum, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen += 1
        if self.seen == self.batch:
            os.kill(os.getpid(), self.signum)


class SlowSteps(pl.Callback):
    """Training steps that take at least ``seconds`` (room for a signal to land in the middle of a run)."""

    def __init__(self, seconds: float = 0.3):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)


class SlowCheckpointIO(AtomicCheckpointIO):
    """A disk so slow that a kill can land inside a checkpoint write: half the bytes, a pause, the rest."""

    def __init__(self, pause: float = 0.5):
        super().__init__()
        self.pause = pause

    def write(self, checkpoint, f):
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(self.pause)
        f.write(data[len(data) // 2:])


class PoisonWeightsAtEpoch(pl.Callback):
    """Make the loss non-finite from epoch ``epoch`` on (weights set to NaN before it starts)."""

    def __init__(self, epoch: int = 1):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                pl_module.decoder.pred.weight.fill_(float("nan"))


def max_difference(a: dict, b: dict) -> tuple[str, float]:
    """The state_dict entry of two checkpoints that differs most, and its largest absolute difference."""
    diffs = {k: float((v.double() - b["state_dict"][k].double()).abs().max()) if v.numel() else 0.0
             for k, v in a["state_dict"].items()}
    key = max(diffs, key=diffs.get)
    return key, diffs[key]


def assert_same_final_state(full_ckpt, resumed_ckpt, steps: int) -> tuple[dict, dict]:
    """An uninterrupted and an interrupted-then-resumed run end at the same step with identical weights
    (students, teachers, centers: every state_dict entry). Returns both checkpoints."""
    a = torch.load(full_ckpt, weights_only=False)
    b = torch.load(resumed_ckpt, weights_only=False)
    assert (a["global_step"], b["global_step"]) == (steps, steps)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    key, diff = max_difference(a, b)
    print(f"largest weight difference after the resume: {diff:.3g} ({key})")
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    return a, b


def run_cpu_ddp(args: list, devices: int = 2, strategy: str = "ddp", timeout: int = 300) -> None:
    """Run ``ssl-pretrain ARGS`` as ``python -m ssl_kit.cli`` on ``devices`` CPU processes; fail with its stderr."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(__file__)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(name, None)  # left by an in-process Lightning run: the port may still be held by this process
    cmd = [sys.executable, "-m", "ssl_kit.cli", *map(str, args), "--trainer.accelerator", "cpu",
           "--trainer.devices", str(devices), "--trainer.strategy", strategy]
    for attempt in range(3):  # the free port Lightning picked can be taken by a concurrent run: try another
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if "EADDRINUSE" not in done.stderr:
            break
    assert done.returncode == 0, done.stderr[-2000:]
