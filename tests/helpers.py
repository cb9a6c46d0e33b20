"""What the tests share (importable: tests/ is on sys.path): tiny settings of every recipe and one way to run them,
metric columns of a run, small image files, and the callbacks and plugins the end-to-end tests inject through
--trainer.callbacks / --trainer.plugins (``helpers.StopAfterEpoch`` etc.)."""
import csv
import importlib
import io
import os
import signal
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image

from ssl_kit.checkpointing import AtomicCheckpointIO
from ssl_kit.cli import pretrain_main

TINY_ENCODER = dict(depth=2, embed_dim=64, num_heads=2)  # the tests' ViT, as --model.encoder_kwargs below
TINY_VIT = ["--model.encoder_kwargs", "{depth: 2, embed_dim: 64, num_heads: 2}"]
TINY_SEMI = [
    *TINY_VIT,
    "--data.batch_size", "4", "--data.mu", "2", "--data.val_size", "50", "--data.num_workers", "0",
    "--trainer.limit_train_batches", "2", "--trainer.log_every_n_steps", "1",
]
TINY_SEG = [
    *TINY_VIT,
    "--model.head_dim", "16", "--model.rep_dim", "32",
    "--model.num_anchors", "16", "--model.num_negatives", "8", "--model.memory_size", "64",
    "--data.img_size", "32", "--data.train_scenes", "64", "--data.val_scenes", "16", "--data.labeled_images", "16",
    "--data.batch_size", "4", "--data.object_size", "[8, 20]",
    "--trainer.limit_train_batches", "2", "--trainer.log_every_n_steps", "1",
]
TINY_DET = [
    "--model.encoder_kwargs", "{depth: 1, embed_dim: 32, num_heads: 2}",
    "--model.fpn_channels", "16", "--model.representation", "32", "--model.anchor_sizes", "[8, 16, 32, 64]",
    "--model.rpn_pre_nms", "[100, 50]", "--model.rpn_post_nms", "[50, 20]", "--model.roi_batch", "32",
    "--model.jitter_times", "4", "--model.initial_score", "0.05", "--model.sup_only_epochs", "0",
    "--data.img_size", "64", "--data.train_scenes", "40", "--data.val_scenes", "8", "--data.object_size", "[12, 24]",
    "--data.labeled_fraction", "0.2", "--data.batch_size", "2", "--data.unlabeled_ratio", "2",
    "--trainer.limit_train_batches", "2", "--trainer.log_every_n_steps", "1",
]
# recipe -> the arguments that make it tiny (small ViT, few images, 2-3 steps per epoch)
TINY = {
    "mae": [
        *TINY_VIT,
        "--model.decoder_dim", "32", "--model.decoder_depth", "1", "--model.decoder_heads", "2",
        "--data.batch_size", "16", "--data.num_workers", "0",
        "--data.knn_train_size", "200", "--data.knn_test_size", "100",
        "--trainer.limit_train_batches", "3", "--trainer.log_every_n_steps", "1",
    ],
    "lomar": [
        *TINY_VIT,
        "--data.batch_size", "8", "--data.num_workers", "0",
        "--data.knn_train_size", "200", "--data.knn_test_size", "100",
        "--trainer.limit_train_batches", "3", "--trainer.log_every_n_steps", "1",
    ],
    "ibot": [
        *TINY_VIT,
        "--model.out_dim", "64", "--model.hidden_dim", "64", "--model.bottleneck_dim", "32",
        "--data.batch_size", "8", "--data.num_workers", "0", "--data.num_local", "2",
        "--data.knn_train_size", "200", "--data.knn_test_size", "100",
        "--trainer.limit_train_batches", "3", "--trainer.log_every_n_steps", "1",
    ],
    **{recipe: TINY_SEMI for recipe in ("uda", "supervised", "mpl")},
    **{recipe: TINY_SEG for recipe in ("u2pl", "seg_supervised", "seg_supervised_all")},
    **{recipe: TINY_DET for recipe in ("soft_teacher", "det_supervised")},
}
TINY_ARGS = ["--recipe", "mae", *TINY["mae"]]  # the tiny MAE run most CLI tests start from


# ----------------------------------------------------------------- every method, for 1- vs 2-process and bf16 runs
# fp32: the 2e-5 tolerance below is float noise of a changed summation order; bf16 (the recipes' "auto" on
# CPUs with bf16 instructions) rounds activations to 8 mantissa bits, where such noise can flip a rounding (issue #20)
SHORT_FP32 = ["--data.num_workers", "0", "--trainer.limit_train_batches", "3", "--trainer.max_epochs", "1",
          "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "1", "--trainer.precision", "32-true"]
# a large lr, so that 3 steps move the weights far more than float noise
_PRETRAIN = ["--model.base_lr", "0.1", "--knn_every_n_epochs", "0", "--data.knn_train_size", "100", "--data.knn_test_size", "50"]
_SEMI = ["--data.mu", "2", "--data.val_size", "20", "--model.drop_path_rate", "0.0"]

# method -> (recipe arguments, per-device batch b, DDP strategy)
METHOD_CASES = {
    "mae": (["--recipe", "mae", *TINY_VIT, "--model.decoder_dim", "32", "--model.decoder_depth", "1",
             "--model.decoder_heads", "2", *_PRETRAIN], 4, "ddp"),
    "lomar": (["--recipe", "lomar", *TINY_VIT, *_PRETRAIN], 4, "ddp"),
    # iBOT: centers all-reduced, EMA teacher; stochastic depth off (it is drawn per device, like dropout)
    "ibot": (["--recipe", "ibot", *TINY_VIT, "--model.out_dim", "64", "--model.hidden_dim", "64",
              "--model.bottleneck_dim", "32", "--data.num_local", "2", "--model.drop_path_rate", "0.0", *_PRETRAIN],
             4, "ddp"),
    # UDA: TSA cross-entropy normalised over the global batch's kept examples
    "uda": (["--recipe", "uda", *TINY_VIT, *_SEMI, "--model.base_lr", "0.5"], 4, "ddp"),
    # MPL: both optimisers, feedback on the global labeled batch
    "mpl": (["--recipe", "mpl", *TINY_VIT, *_SEMI, "--model.teacher_lr", "0.5", "--model.student_lr", "0.5",
             "--model.student_wait_epochs", "0"], 4, "ddp_find_unused_parameters_true"),
    # U2PL: CutMix, entropy percentile, anchor sampling and losses per draw group, memory bank fed in group order;
    # a head norm that needs no statistics across images (BatchNorm's are per device); warm-up off and every
    # pixel an anchor candidate, so the unsupervised and contrastive terms train from step 0 (a representation
    # head whose first gradient comes at step 3 meets AdamW with v ~ 0: float noise of ~1e-11 became 8e-5)
    "u2pl": (["--recipe", "u2pl", *TINY_VIT, "--model.head_dim", "16", "--model.rep_dim", "32",
              "--model.num_anchors", "16", "--model.num_negatives", "8", "--model.memory_size", "64",
              "--data.img_size", "32", "--data.train_scenes", "64", "--data.val_scenes", "16",
              "--data.labeled_images", "16", "--data.object_size", "[8, 20]", "--model.sup_only_epochs", "0",
              "--model.head_norm", "layer", "--model.head_dropout", "0.0", "--model.drop_path_rate", "0.0",
              "--model.anchor_threshold", "0.0", "--model.base_lr", "0.5"], 4, "ddp"),
    # Soft Teacher: the whole step runs per draw group (torchvision samples proposals with the global RNG and
    # normalises the RoI losses by the device batch's proposals); 1 labeled + 2 unlabeled scenes per device
    "soft_teacher": (["--recipe", "soft_teacher", "--model.encoder_kwargs", "{depth: 1, embed_dim: 32, num_heads: 2}",
                      "--model.fpn_channels", "16", "--model.representation", "32",
                      "--model.anchor_sizes", "[8, 16, 32, 64]", "--model.rpn_pre_nms", "[100, 50]",
                      "--model.rpn_post_nms", "[50, 20]", "--model.roi_batch", "32", "--model.jitter_times", "4",
                      "--model.initial_score", "0.05", "--model.drop_path_rate", "0.0", "--model.base_lr", "0.5",
                      "--data.img_size", "64", "--data.train_scenes", "40", "--data.val_scenes", "4",
                      "--data.object_size", "[12, 24]", "--data.labeled_fraction", "0.2",
                      "--data.unlabeled_ratio", "2"], 1, "ddp"),
}


def run_tiny(recipe: str, run_dir: Path, *extra: str) -> int:
    """``ssl-pretrain --recipe RECIPE`` with the tiny settings, into ``run_dir``; the exit code."""
    return pretrain_main(["--recipe", recipe, *TINY[recipe], "--run_dir", str(run_dir), *extra])


def metric_column(run_dir: Path, name: str) -> list[float]:
    """Every value of ``name`` a run logged to its metrics.csv, in order."""
    return [float(r[name]) for r in csv.DictReader(open(Path(run_dir) / "metrics.csv")) if r.get(name)]


def save(path: Path, mode: str = "RGB", size=(20, 14), fmt: str | None = None, seed: int = 0) -> Path:
    """A tiny random image in ``mode`` (RGB, L, RGBA, P)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "L":
        im = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    elif mode == "RGBA":
        im = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    elif mode == "P":
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").convert("P")
    else:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    im.save(path, format=fmt)
    return path


def nested_folder(root: Path, per_class: int = 4) -> Path:
    """``root/cat`` and ``root/dog`` with ``per_class`` tiny images each, in three formats."""
    exts = [".jpg", ".png", ".webp"]
    for c, name in enumerate(["cat", "dog"]):
        for i in range(per_class):
            save(root / name / f"img{i}{exts[i % 3]}", seed=10 * c + i)
    return root


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


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def import_benchmark(monkeypatch, name: str) -> ModuleType:
    """A ``benchmarks/`` script as a module (the scripts import their neighbours by plain name)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module(name)


def finished_detection_run(run_dir: Path, epochs: int, wall_s: float = 930.0) -> None:
    """A detection run folder as a finished run leaves it: ``config.yaml``, a ``metrics.csv`` with val mAP rows after
    each 200-step epoch (val_map50 0.2, 0.3, ... for epochs 0, 1, ...) and a ``checkpoints/last.ckpt`` whose
    training time (Lightning's Timer state) is ``wall_s``."""
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("")
    header = "epoch,step,val_map,val_map50,val_map_student,val_map50_student\n"
    rows = "".join(f"{e},{200 * e + 199},0.{e + 1},0.{e + 2},0.{e + 1},0.{e + 2}\n" for e in range(epochs))
    (run_dir / "metrics.csv").write_text(header + rows)
    torch.save({"callbacks": {"Timer": {"time_elapsed": {"train": wall_s}}}}, run_dir / "checkpoints" / "last.ckpt")


def fake_detection_runs(monkeypatch, epochs: int) -> list[list[str]]:
    """Replace ``sweep.run_and_record`` of the benchmarks with one that writes a finished ``epochs``-epoch detection
    run (:func:`finished_detection_run`) instead of training and records it; returns the list the commands go to."""
    sweep = import_benchmark(monkeypatch, "sweep")
    commands: list[list[str]] = []

    def fake_run(cmd, run_dir, metrics, result, name, out, **info):
        commands.append(cmd)
        finished_detection_run(run_dir, epochs=epochs)
        return sweep.record_run(run_dir, metrics, result, name, out, 1.0, " ".join(cmd), **info)

    monkeypatch.setattr(sweep, "run_and_record", fake_run)
    return commands


def optimizer_trainer(batch_size: int = 2) -> SimpleNamespace:
    """The Trainer attributes ``configure_optimizers`` reads (10 steps of 5 per epoch, one process), so a method's
    optimizer can be built without a run."""
    return SimpleNamespace(estimated_stepping_batches=10, num_training_batches=5, accumulate_grad_batches=1,
                           world_size=1, max_epochs=2, is_global_zero=True, gradient_clip_val=None,
                           precision="32-true", datamodule=SimpleNamespace(batch_size=batch_size))
