"""End-to-end runs of `ssl-pretrain --recipe mae` on a tiny configuration."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from helpers import TINY_ARGS, assert_same_final_state, run_tiny

pytestmark = pytest.mark.slow


def test_smoke_run_leaves_everything_in_the_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_tiny("mae", run, "--trainer.max_epochs", "2", "--model.mask_ratio", "0.5") == 0
    out = capsys.readouterr().out
    assert f"run folder: {run}" in out
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(n.startswith("best-epoch") and "knn" in n for n in ckpts)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert any(r.get("knn_top1") for r in rows) and any(r.get("train_loss_step") for r in rows)
    assert sorted(p.name for p in (run / "pictures").iterdir()) == ["epoch_000.png", "epoch_001.png"]
    cfg = json.loads((run / "encoder" / "config.json").read_text())
    enc = timm.create_model(cfg["timm_name"], pretrained=True, pretrained_cfg_overlay=dict(file=str(run / "encoder" / "model.safetensors")), **cfg["kwargs"])
    assert enc.embed_dim == 64 and cfg["kwargs"]["in_chans"] == 1
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["hyper_parameters"]["mask_ratio"] == 0.5  # the command-line override reached the model
    assert state["hyper_parameters"]["img_size"] == 32  # linked from the data module
    assert (run / "config.yaml").is_file()


def test_resume_ends_with_the_same_weights(tmp_path, capsys):
    """Stopped at an epoch end, or by SIGTERM in the middle of an epoch (after step 4 of 2 x 3): the resumed run
    ends with the uninterrupted run's weights, optimizer and schedule (the data position, augmentation and mask
    draws continue where they stopped)."""
    full, part, cut = tmp_path / "full", tmp_path / "part", tmp_path / "cut"
    fp32 = ("--trainer.max_epochs", "2", "--trainer.precision", "32-true")
    assert run_tiny("mae", full, *fp32) == 0
    stop_after_epoch_0 = ("--trainer.callbacks+=helpers.StopAfterEpoch", "--trainer.callbacks.epoch", "0")
    assert run_tiny("mae", part, *fp32, *stop_after_epoch_0) == 0
    interrupted = torch.load(part / "checkpoints" / "last.ckpt", weights_only=False)
    assert interrupted["global_step"] == 3
    capsys.readouterr()
    assert run_tiny("mae", part, *fp32, "--ckpt_path", str(part / "checkpoints" / "last.ckpt")) == 0
    a, b = assert_same_final_state(full / "checkpoints" / "last.ckpt", part / "checkpoints" / "last.ckpt", steps=6)
    # the training time (Lightning's Timer) goes on from the first part's: it counts the whole run
    first_part_s = interrupted["callbacks"]["Timer"]["time_elapsed"]["train"]
    whole_s = b["callbacks"]["Timer"]["time_elapsed"]["train"]
    assert 0 < first_part_s < whole_s
    assert "training time: 0:00:" in capsys.readouterr().out
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert all(torch.equal(opt_a[k]["exp_avg"], opt_b[k]["exp_avg"]) for k in opt_a)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 6
    # the first part's metrics survive the resume (Lightning's CSVLogger would delete them)
    first = (part / "metrics.part1.csv").read_text()
    assert "train_loss_epoch" in first and (part / "metrics.csv").is_file()

    capsys.readouterr()
    assert run_tiny("mae", cut, *fp32, "--trainer.callbacks+=helpers.SignalAtStep", "--trainer.callbacks.step", "4") == 143
    assert f"stopped by SIGTERM at step 4; checkpoint {cut / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().err
    stopped = torch.load(cut / "checkpoints" / "last.ckpt", weights_only=False)
    assert stopped["global_step"] == 4 and stopped["epoch"] == 1
    assert stopped["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 1}]
    assert run_tiny("mae", cut, *fp32, "--ckpt_path", "last") == 0
    a, b = assert_same_final_state(full / "checkpoints" / "last.ckpt", cut / "checkpoints" / "last.ckpt", steps=6)
    assert a["optimizer_states"][0]["state"][0]["step"] == b["optimizer_states"][0]["state"][0]["step"]
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 6


def test_kept_step_checkpoints_continue_exactly_into_another_run_folder(tmp_path):
    """--keep_every_n_steps 2 keeps steps 2, 4, 6 (never overwritten); a new run from step 4, mid-epoch, ends with
    the uninterrupted run's weights (how a paired comparison starts two settings from one state)."""
    full, branch = tmp_path / "full", tmp_path / "branch"
    fp32 = ("--trainer.max_epochs", "2", "--trainer.precision", "32-true")
    assert run_tiny("mae", full, *fp32, "--keep_every_n_steps", "2") == 0
    kept = sorted(p.name for p in (full / "checkpoints" / "steps").iterdir())
    assert kept == ["step=000002.ckpt", "step=000004.ckpt", "step=000006.ckpt"]
    assert run_tiny("mae", branch, *fp32, "--ckpt_path", str(full / "checkpoints" / "steps" / "step=000004.ckpt")) == 0
    assert_same_final_state(full / "checkpoints" / "last.ckpt", branch / "checkpoints" / "last.ckpt", steps=6)


def test_a_run_started_from_an_epochs_last_step_resumes_mid_epoch_exactly(tmp_path):
    """A kept step checkpoint on an epoch's last batch (or a SIGTERM there) starts the next epoch without Lightning
    counting it as started (2.6); a SIGTERM in that epoch then saved it as not begun, and the resume ran the whole
    epoch again: 15 extra steps in a 6000-step Soft Teacher run. 3 epochs x 3 steps: branch at step 3, stop at 4."""
    full, branch = tmp_path / "full", tmp_path / "branch"
    fp32 = ("--trainer.max_epochs", "3", "--trainer.precision", "32-true")
    assert run_tiny("mae", full, *fp32, "--keep_every_n_steps", "3") == 0
    start = full / "checkpoints" / "steps" / "step=000003.ckpt"
    stop = ("--trainer.callbacks+=helpers.SignalAtStep", "--trainer.callbacks.step", "4")
    assert run_tiny("mae", branch, *fp32, "--ckpt_path", str(start), *stop) == 143
    stopped = torch.load(branch / "checkpoints" / "last.ckpt", weights_only=False)["loops"]["fit_loop"]
    assert stopped["epoch_progress"]["current"]["started"] == 2 and stopped["epoch_progress"]["current"]["processed"] == 1
    assert run_tiny("mae", branch, *fp32, "--ckpt_path", "last") == 0
    assert_same_final_state(full / "checkpoints" / "last.ckpt", branch / "checkpoints" / "last.ckpt", steps=9)


def test_one_class_folder_logs_no_knn_and_the_best_checkpoint_is_the_last(tmp_path, capsys, ssl_caplog):
    """Issue #26: k-NN on one class scored 1.0 every epoch and named best-epoch000-knn1.0000.ckpt the best."""
    from helpers import save

    for i in range(40):
        save(tmp_path / "data" / "cat" / f"{i}.png", size=(16, 16), seed=i)
    run = tmp_path / "run"
    assert run_tiny("mae", run, "--data.root", str(tmp_path / "data"), "--data.img_size", "16", "--model.patch_size", "4",
                   "--trainer.limit_train_batches", "2", "--trainer.max_epochs", "2") == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert rows and not any(r.get("knn_top1") for r in rows)
    reason = "the data have one class (cat), so every k-NN vote is right and top-1 says nothing"
    lines = [r.getMessage() for r in {id(r): r for r in ssl_caplog.records}.values() if "k-NN" in r.getMessage()]
    last = run / "checkpoints" / "last.ckpt"
    assert lines == [f"no k-NN score ({reason}): the best checkpoint is the last one, {last}"]
    assert f"best checkpoint: the last one (no k-NN score: {reason})" in capsys.readouterr().out


def test_nonfinite_loss_stops_clearly_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    code = run_tiny("mae", run, "--trainer.max_epochs", "3", "--trainer.callbacks+=helpers.PoisonWeightsAtEpoch",
                   "--trainer.callbacks.epoch", "1")
    assert code == 2
    err = capsys.readouterr().err
    assert "loss became nan" in err and "checkpoints already written are kept" in err
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_two_process_ddp_on_cpu(tmp_path):
    """`--trainer.devices 2 --trainer.strategy ddp` on CPU (gloo), no code change."""
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "ssl_kit.cli", *TINY_ARGS, "--run_dir", str(run), "--trainer.max_epochs", "1",
           "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "effective batch 32 (16 per device x 2 processes x 1 accumulation)" in proc.stderr
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 3
    assert (run / "encoder" / "model.safetensors").is_file()
