"""`ssl-pretrain --recipe u2pl | seg_supervised` end to end (tiny): logs, pictures, export, exact resume, DDP."""

import pytest
import torch

from helpers import TINY_SEG, assert_same_final_state, metric_column, run_cpu_ddp, run_tiny
from ssl_kit.encoders import load_exported_encoder
from ssl_kit.teacher import inverse_momentum

pytestmark = pytest.mark.slow


def test_u2pl_warm_up_then_semi_supervised_logs_pictures_and_export(tmp_path):
    run = tmp_path / "u2pl"
    assert run_tiny("u2pl", run, "--trainer.max_epochs", "3") == 0
    # epoch 0 supervised only (teacher copied), epochs 1-2 semi-supervised: EMA counted from step 2
    assert metric_column(run, "ema_momentum") == pytest.approx([0, 0] + [inverse_momentum(i, 0.99) for i in range(4)])
    assert metric_column(run, "unreliable_percent") == pytest.approx([20 * (1 - 1 / 3)] * 2 + [20 * (1 - 2 / 3)] * 2)
    assert len(metric_column(run, "loss_unsup")) == len(metric_column(run, "loss_contrastive")) == 4
    assert len(metric_column(run, "val_miou")) == 3 and all(0 <= v <= 1 for v in metric_column(run, "val_miou"))
    assert (run / "pictures" / "segmentation_epoch_002.png").is_file()
    assert (run / "labeled_subset.json").is_file()

    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["ssl_kit"]["export_prefix"] == "ema_teacher.encoder."
    assert int(ckpt["state_dict"]["memory_bank.count"].max()) > 0  # negatives were banked
    encoder = load_exported_encoder(run / "encoder")  # plain timm ViT = the teacher's encoder
    teacher = {k[len("ema_teacher.encoder."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema_teacher.encoder.")}
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, teacher[key]), key


def test_u2pl_class_ranking_layer_norm_head_and_weight_ramp_train_and_log_what_the_percentile_drops(tmp_path):
    run = tmp_path / "u2pl"
    assert run_tiny("u2pl", run, "--trainer.max_epochs", "1", "--model.sup_only_epochs", "0",
                    "--model.unreliable_ranking", "class", "--model.head_norm", "layer",
                    "--model.unsup_ramp_epochs", "1") == 0
    shares = metric_column(run, "unreliable_foreground_share")
    assert len(shares) == 2 and all(0 <= v <= 1 for v in shares)
    assert metric_column(run, "unsup_ramp") == pytest.approx([0.5, 1.0])  # 2 steps per epoch, ramped over 1
    assert (run / "pictures" / "segmentation_epoch_000.png").is_file()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert not any("running_mean" in k for k in ckpt["state_dict"])  # no BatchNorm left in the head


@pytest.mark.parametrize("recipe", ["seg_supervised", "seg_supervised_all"])
def test_seg_supervised_baseline_sees_no_unlabeled_scenes(tmp_path, recipe):
    run = tmp_path / "sup"
    assert run_tiny(recipe, run, "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1") == 0
    assert len(metric_column(run, "loss_sup")) == 4 and not metric_column(run, "loss_unsup")
    assert len(metric_column(run, "val_miou")) == 2
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert not any(".representation." in k for k in state)  # no contrastive loss: no representation branch


def test_u2pl_resume_continues_teacher_memory_bank_and_schedule(tmp_path):
    """At an epoch end and after SIGTERM mid-epoch (step 3 of 3 x 2)."""
    full, part, cut = tmp_path / "full", tmp_path / "part", tmp_path / "cut"
    assert run_tiny("u2pl", full, "--trainer.max_epochs", "3") == 0
    stop = ["--trainer.callbacks+=helpers.StopAfterEpoch", "--trainer.callbacks.epoch=1"]
    assert run_tiny("u2pl", part, "--trainer.max_epochs", "3", *stop) == 0
    assert run_tiny("u2pl", part, "--trainer.max_epochs", "3", "--ckpt_path", str(part / "checkpoints" / "last.ckpt")) == 0
    a, _ = assert_same_final_state(full / "checkpoints" / "last.ckpt", part / "checkpoints" / "last.ckpt", steps=6)
    assert any(k.startswith("memory_bank.") for k in a["state_dict"])
    assert run_tiny("u2pl", cut, "--trainer.max_epochs", "3", "--trainer.callbacks+=helpers.SignalAtStep", "--trainer.callbacks.step", "3") == 143
    assert run_tiny("u2pl", cut, "--trainer.max_epochs", "3", "--ckpt_path", "last") == 0
    assert_same_final_state(full / "checkpoints" / "last.ckpt", cut / "checkpoints" / "last.ckpt", steps=6)


def test_u2pl_bad_input_is_one_clear_message(tmp_path, capsys):
    assert run_tiny("u2pl", tmp_path / "a", "--model.num_classes", "5") == 2
    assert "The masks have 11 classes but the model was built for 5: pass --model.num_classes 11" in capsys.readouterr().err
    assert run_tiny("u2pl", tmp_path / "b", "--data.root", str(tmp_path / "missing")) == 2
    assert "--data.root" in capsys.readouterr().err
    assert not (tmp_path / "a" / "checkpoints").exists()


def test_u2pl_runs_under_two_process_cpu_ddp(tmp_path):
    run = tmp_path / "ddp"
    run_cpu_ddp(["--recipe", "u2pl", *TINY_SEG, "--run_dir", run, "--trainer.max_epochs", "2"])
    assert len(metric_column(run, "loss_contrastive")) == 2 and (run / "encoder" / "model.safetensors").is_file()
