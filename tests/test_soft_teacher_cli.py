"""`ssl-pretrain --recipe soft_teacher | det_supervised` end to end (tiny): logs, pictures, export, exact resume,
bad input, DDP."""
import csv
import json

import pytest
import torch

from helpers import TINY_DET, assert_same_final_state, metric_column, run_cpu_ddp, run_tiny
from ssl_kit.encoders import load_exported_encoder
from ssl_kit.teacher import inverse_momentum

pytestmark = pytest.mark.slow


def test_soft_teacher_logs_pseudo_boxes_map_pictures_and_exports_the_teacher(tmp_path):
    run = tmp_path / "st"
    assert run_tiny("soft_teacher", run, "--trainer.max_epochs", "2") == 0
    assert metric_column(run, "ema_momentum") == pytest.approx([inverse_momentum(i, 0.999) for i in range(4)])
    assert len(metric_column(run, "pseudo_boxes_per_image")) == len(metric_column(run, "unsup_loss_classifier")) == 4
    assert len(metric_column(run, "candidate_boxes_per_image")) == 4  # score > 0.05: the jitter path ran
    assert len(metric_column(run, "val_map")) == len(metric_column(run, "val_map50")) == 2
    assert all(0 <= v <= 1 for v in metric_column(run, "val_map50"))
    assert (run / "pictures" / "detection_epoch_001.png").is_file()
    assert json.loads((run / "labeled_subset.json").read_text())["labeled_images"] == 8

    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["ssl_kit"]["export_prefix"] == "ema_teacher.encoder."
    encoder = load_exported_encoder(run / "encoder")  # plain timm ViT = the teacher's encoder
    teacher = {k[len("ema_teacher.encoder."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema_teacher.encoder.")}
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, teacher[key]), key


def test_soft_teacher_burn_in_trains_on_labels_only_then_uses_pseudo_boxes(tmp_path):
    """--model.sup_only_epochs 1: epoch 0 is the supervised baseline's (no unlabeled loss), epoch 1 adds the
    pseudo boxes; teacher and student are both scored every epoch."""
    run = tmp_path / "burn_in"
    assert run_tiny("soft_teacher", run, "--trainer.max_epochs", "2", "--model.sup_only_epochs", "1") == 0
    steps_with = lambda name: [int(r["step"]) for r in csv.DictReader(open(run / "metrics.csv")) if r.get(name)]  # noqa: E731
    assert steps_with("loss_unsup") == [2, 3] and steps_with("loss_sup") == [0, 1, 2, 3]
    assert len(metric_column(run, "val_map50_student")) == len(metric_column(run, "val_map50")) == 2


def test_det_supervised_baseline_sees_no_unlabeled_scenes(tmp_path):
    run = tmp_path / "sup"
    assert run_tiny("det_supervised", run, "--trainer.max_epochs", "1") == 0
    assert len(metric_column(run, "loss_sup")) == 2 and not metric_column(run, "loss_unsup")
    assert len(metric_column(run, "val_map")) == 1


def test_soft_teacher_resume_continues_student_teacher_and_schedule(tmp_path):
    """At an epoch end and after SIGTERM mid-epoch (step 3 of 2 x 2): box jitter draws, the teacher and the
    classifier center continue exactly."""
    full, part, cut = tmp_path / "full", tmp_path / "part", tmp_path / "cut"
    assert run_tiny("soft_teacher", full, "--trainer.max_epochs", "2") == 0
    stop = ["--trainer.callbacks+=helpers.StopAfterEpoch", "--trainer.callbacks.epoch=0"]
    assert run_tiny("soft_teacher", part, "--trainer.max_epochs", "2", *stop) == 0
    assert run_tiny("soft_teacher", part, "--trainer.max_epochs", "2", "--ckpt_path", str(part / "checkpoints" / "last.ckpt")) == 0
    a, _ = assert_same_final_state(full / "checkpoints" / "last.ckpt", part / "checkpoints" / "last.ckpt", steps=4)
    assert any(k.startswith("ema_teacher.roi_heads.") for k in a["state_dict"])
    assert len(a["optimizer_states"]) == 1 and a["lr_schedulers"]
    assert run_tiny("soft_teacher", cut, "--trainer.max_epochs", "2", "--trainer.callbacks+=helpers.SignalAtStep", "--trainer.callbacks.step", "3") == 143
    assert run_tiny("soft_teacher", cut, "--trainer.max_epochs", "2", "--ckpt_path", "last") == 0
    assert_same_final_state(full / "checkpoints" / "last.ckpt", cut / "checkpoints" / "last.ckpt", steps=4)


def test_soft_teacher_bad_input_is_one_clear_message(tmp_path, capsys):
    assert run_tiny("soft_teacher", tmp_path / "a", "--model.num_classes", "5") == 2
    assert "The data have 11 classes (background included) but the model was built for 5: pass --model.num_classes 11" \
        in capsys.readouterr().err
    images = tmp_path / "images"
    images.mkdir()
    assert run_tiny("soft_teacher", tmp_path / "b", "--data.root", str(images)) == 2
    assert "pass --data.train_annotations and --data.val_annotations" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert run_tiny("soft_teacher", tmp_path / "c", "--data.root", str(images), "--data.train_annotations",
                   str(tmp_path / "bad.json"), "--data.val_annotations", str(tmp_path / "bad.json")) == 2
    assert "bad.json is not valid JSON (line 1, column 2" in capsys.readouterr().err
    assert not (tmp_path / "a" / "checkpoints").exists()


def test_soft_teacher_runs_under_two_process_cpu_ddp(tmp_path):
    run = tmp_path / "ddp"
    run_cpu_ddp(["--recipe", "soft_teacher", *TINY_DET, "--run_dir", run, "--trainer.max_epochs", "1"])
    assert len(metric_column(run, "unsup_loss_classifier")) == 2 and (run / "encoder" / "model.safetensors").is_file()
