"""`ssl-pretrain --recipe soft_teacher | det_supervised` end to end (tiny): logs, pictures, export, exact resume,
bad input, DDP."""
import csv
import json

import pytest
import torch

from cli_helpers import assert_same_final_state, run_cpu_ddp
from ssl_kit.cli import pretrain_main
from ssl_kit.export import load_exported_encoder
from ssl_kit.teacher import inverse_momentum
from test_u2pl_cli import column

pytestmark = pytest.mark.slow

TINY_DET = [
    "--model.encoder_kwargs", "{depth: 1, embed_dim: 32, num_heads: 2}",
    "--model.fpn_channels", "16", "--model.representation", "32", "--model.anchor_sizes", "[8, 16, 32, 64]",
    "--model.rpn_pre_nms", "[100, 50]", "--model.rpn_post_nms", "[50, 20]", "--model.roi_batch", "32",
    "--model.jitter_times", "4", "--model.initial_score", "0.05", "--model.sup_only_epochs", "0",
    "--data.img_size", "64", "--data.train_scenes", "40", "--data.val_scenes", "8", "--data.object_size", "[12, 24]",
    "--data.labeled_fraction", "0.2", "--data.batch_size", "2", "--data.unlabeled_ratio", "2",
    "--trainer.limit_train_batches", "2", "--trainer.log_every_n_steps", "1",
]


def run_cli(recipe, run_dir, *extra: str) -> int:
    return pretrain_main(["--recipe", recipe, *TINY_DET, "--run_dir", str(run_dir), *extra])


def test_soft_teacher_logs_pseudo_boxes_map_pictures_and_exports_the_teacher(tmp_path):
    run = tmp_path / "st"
    assert run_cli("soft_teacher", run, "--trainer.max_epochs", "2") == 0
    assert column(run, "teacher_momentum") == pytest.approx([inverse_momentum(i, 0.999) for i in range(4)])
    assert len(column(run, "pseudo_boxes_per_image")) == len(column(run, "unsup_loss_classifier")) == 4
    assert len(column(run, "candidate_boxes_per_image")) == 4  # score > 0.05: the jitter path ran
    assert len(column(run, "val_map")) == len(column(run, "val_map50")) == 2
    assert all(0 <= v <= 1 for v in column(run, "val_map50"))
    assert (run / "pictures" / "detection_epoch_001.png").is_file()
    assert json.loads((run / "labeled_subset.json").read_text())["labeled_images"] == 8

    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["ssl_kit"]["export_prefix"] == "teacher.encoder."
    encoder = load_exported_encoder(run / "encoder")  # plain timm ViT = the teacher's encoder
    teacher = {k[len("teacher.encoder."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("teacher.encoder.")}
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, teacher[key]), key


def test_soft_teacher_burn_in_trains_on_labels_only_then_uses_pseudo_boxes(tmp_path):
    """--model.sup_only_epochs 1: epoch 0 is the supervised baseline's (no unlabeled loss), epoch 1 adds the
    pseudo boxes; teacher and student are both scored every epoch."""
    run = tmp_path / "burn_in"
    assert run_cli("soft_teacher", run, "--trainer.max_epochs", "2", "--model.sup_only_epochs", "1") == 0
    steps_with = lambda name: [int(r["step"]) for r in csv.DictReader(open(run / "metrics.csv")) if r.get(name)]  # noqa: E731
    assert steps_with("loss_unsup") == [2, 3] and steps_with("loss_sup") == [0, 1, 2, 3]
    assert len(column(run, "val_map50_student")) == len(column(run, "val_map50")) == 2


def test_det_supervised_baseline_sees_no_unlabeled_scenes(tmp_path):
    run = tmp_path / "sup"
    assert run_cli("det_supervised", run, "--trainer.max_epochs", "1") == 0
    assert len(column(run, "loss_sup")) == 2 and not column(run, "loss_unsup")
    assert len(column(run, "val_map")) == 1


def test_soft_teacher_resume_continues_student_teacher_and_schedule(tmp_path):
    """At an epoch end and after SIGTERM mid-epoch (step 3 of 2 x 2): box jitter draws, the teacher and the
    classifier center continue exactly."""
    full, part, cut = tmp_path / "full", tmp_path / "part", tmp_path / "cut"
    assert run_cli("soft_teacher", full, "--trainer.max_epochs", "2") == 0
    stop = ["--trainer.callbacks+=cli_helpers.StopAfterEpoch", "--trainer.callbacks.epoch=0"]
    assert run_cli("soft_teacher", part, "--trainer.max_epochs", "2", *stop) == 0
    assert run_cli("soft_teacher", part, "--trainer.max_epochs", "2", "--ckpt_path", str(part / "checkpoints" / "last.ckpt")) == 0
    a, _ = assert_same_final_state(full / "checkpoints" / "last.ckpt", part / "checkpoints" / "last.ckpt", steps=4)
    assert any(k.startswith("teacher.roi_heads.") for k in a["state_dict"])
    assert len(a["optimizer_states"]) == 1 and a["lr_schedulers"]
    assert run_cli("soft_teacher", cut, "--trainer.max_epochs", "2", "--trainer.callbacks+=cli_helpers.SignalAtStep", "--trainer.callbacks.step", "3") == 143
    assert run_cli("soft_teacher", cut, "--trainer.max_epochs", "2", "--ckpt_path", "last") == 0
    assert_same_final_state(full / "checkpoints" / "last.ckpt", cut / "checkpoints" / "last.ckpt", steps=4)


def test_soft_teacher_bad_input_is_one_clear_message(tmp_path, capsys):
    assert run_cli("soft_teacher", tmp_path / "a", "--model.num_classes", "5") == 2
    assert "The data have 11 classes (background included) but the model was built for 5: pass --model.num_classes 11" \
        in capsys.readouterr().err
    images = tmp_path / "images"
    images.mkdir()
    assert run_cli("soft_teacher", tmp_path / "b", "--data.root", str(images)) == 2
    assert "pass --data.train_annotations and --data.val_annotations" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert run_cli("soft_teacher", tmp_path / "c", "--data.root", str(images), "--data.train_annotations",
                   str(tmp_path / "bad.json"), "--data.val_annotations", str(tmp_path / "bad.json")) == 2
    assert "bad.json is not valid JSON (line 1, column 2" in capsys.readouterr().err
    assert not (tmp_path / "a" / "checkpoints").exists()


def test_soft_teacher_runs_under_two_process_cpu_ddp(tmp_path):
    run = tmp_path / "ddp"
    run_cpu_ddp(["--recipe", "soft_teacher", *TINY_DET, "--run_dir", run, "--trainer.max_epochs", "1"])
    assert len(column(run, "unsup_loss_classifier")) == 2 and (run / "encoder" / "model.safetensors").is_file()
