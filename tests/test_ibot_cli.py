"""`ssl-pretrain --recipe ibot` end to end (tiny): outputs, schedules in the log, exact resume."""
import csv
import signal

import pytest
import torch

from helpers import assert_same_final_state, run_tiny
from ssl_kit.eval.cli import knn_main
from ssl_kit.teacher import cosine_momentum

pytestmark = pytest.mark.slow


def test_ibot_recipe_runs_logs_schedules_and_exports_the_teacher(tmp_path):
    run = tmp_path / "run"
    assert run_tiny("ibot", run, "--trainer.max_epochs", "2") == 0
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    momentum = [float(r["ema_momentum"]) for r in rows if r.get("ema_momentum")]
    wd = [float(r["weight_decay"]) for r in rows if r.get("weight_decay")]
    assert len(momentum) == 6 and momentum == sorted(momentum)  # one update per optimizer step
    # the short-run recipe: momentum 0.98 -> 1, constant weight decay 0.04 (ibot_224 keeps the paper's 0.996, 0.04 -> 0.4)
    assert momentum[0] == pytest.approx(0.98, abs=1e-6)
    assert momentum[-1] == pytest.approx(cosine_momentum(5, 6, base=0.98), abs=1e-6)
    assert wd == pytest.approx([0.04] * len(wd))
    assert any(r.get("knn_top1") for r in rows) and any(r.get("patch_loss_step") for r in rows)
    assert (run / "pictures" / "epoch_001.png").is_file()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["ssl_kit"]["export_prefix"] == "ema_teacher."
    assert ckpt["state_dict"]["criterion.center"].abs().sum() > 0
    assert knn_main(["--ckpt", str(run / "checkpoints" / "last.ckpt"), "--data.labels_per_class", "10",
                     "--out", str(tmp_path / "knn")]) == 0


def test_ibot_resume_ends_with_same_student_teacher_and_centers(tmp_path):
    """At an epoch end, and mid-epoch after SLURM's pre-emption signal outside SLURM (SIGUSR1, taken as SIGTERM):
    multi-crop views, block masks, teacher EMA, centers and the weight-decay schedule continue exactly."""
    full, part, cut = tmp_path / "full", tmp_path / "part", tmp_path / "cut"
    fp32 = ("--trainer.max_epochs", "2", "--trainer.precision", "32-true")
    assert run_tiny("ibot", full, *fp32) == 0
    stop_after_epoch_0 = ("--trainer.callbacks+=helpers.StopAfterEpoch", "--trainer.callbacks.epoch", "0")
    assert run_tiny("ibot", part, *fp32, *stop_after_epoch_0) == 0
    assert run_tiny("ibot", part, *fp32, "--ckpt_path", str(part / "checkpoints" / "last.ckpt")) == 0
    a, b = assert_same_final_state(full / "checkpoints" / "last.ckpt", part / "checkpoints" / "last.ckpt", steps=6)
    keys = a["state_dict"].keys()
    assert any(k.startswith("ema_teacher.") for k in keys) and "criterion.center2" in keys

    assert run_tiny("ibot", cut, *fp32, "--trainer.callbacks+=helpers.SignalAtStep", "--trainer.callbacks.step", "2",
                   "--trainer.callbacks.signum", str(int(signal.SIGUSR1))) == 128 + signal.SIGUSR1
    assert torch.load(cut / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # the handler went with the run
    assert run_tiny("ibot", cut, *fp32, "--ckpt_path", "last") == 0
    assert_same_final_state(full / "checkpoints" / "last.ckpt", cut / "checkpoints" / "last.ckpt", steps=6)
