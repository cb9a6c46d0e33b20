"""`ssl-pretrain --recipe uda | mpl | supervised` end to end (tiny): logs, subset file, export, exact resume, DDP."""
import csv
import json

import pytest
import torch

from helpers import TINY_SEMI, assert_same_final_state, run_cpu_ddp, run_tiny
from ssl_kit.encoders import load_exported_encoder
from ssl_kit.teacher import inverse_momentum

pytestmark = pytest.mark.slow


def metrics(run_dir) -> list[dict[str, str]]:
    return list(csv.DictReader(open(run_dir / "metrics.csv")))


def column(rows, name) -> list[float]:
    return [float(r[name]) for r in rows if r.get(name)]


def test_uda_logs_tsa_and_mask_saves_subset_and_exports_a_timm_classifier(tmp_path):
    run = tmp_path / "uda"
    assert run_tiny("uda", run, "--trainer.max_epochs", "2", "--model.tsa", "linear") == 0  # off in the recipe
    rows = metrics(run)
    total = 4
    assert column(rows, "tsa_threshold") == pytest.approx([0.1 + 0.9 * s / total for s in range(total)])
    assert len(column(rows, "tsa_kept_fraction")) == len(column(rows, "unsup_mask_fraction")) == total
    assert column(rows, "ema_momentum") == pytest.approx([inverse_momentum(s, 0.99) for s in range(total)])
    assert len(column(rows, "val_top1")) == 2
    assert (run / "pictures" / "pseudo_labels_epoch_001.png").is_file()

    subset = json.loads((run / "labeled_subset.json").read_text())
    assert subset["labels_per_class"] == 10 and len(subset["indices"]) == 100

    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["ssl_kit"]["export_prefix"] == "ema_classifier."
    classifier = load_exported_encoder(run / "encoder").eval()  # plain timm, head included
    ema = {k[len("ema_classifier."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema_classifier.")}
    assert classifier.num_classes == 10
    for key, value in classifier.state_dict().items():
        assert torch.equal(value, ema[key]), key


def test_supervised_recipe_uses_no_unlabeled_images(tmp_path):
    run = tmp_path / "sup"
    # also: average pooling reaches the export, and a run without a progress bar works
    assert run_tiny("supervised", run, "--trainer.max_epochs", "1", "--model.global_pool", "avg",
                   "--trainer.enable_progress_bar", "false") == 0
    rows = metrics(run)
    assert column(rows, "tsa_threshold") == [1.0, 1.0] and not column(rows, "unsup_mask_fraction")
    assert load_exported_encoder(run / "encoder").global_pool == "avg"


def test_mpl_with_student_lr_zero_logs_zero_feedback_and_uda_only_teacher_loss(tmp_path):
    run = tmp_path / "mpl0"
    assert run_tiny("mpl", run, "--trainer.max_epochs", "1", "--model.student_lr", "0") == 0
    rows = metrics(run)
    assert column(rows, "mpl_feedback") == [0.0, 0.0]
    assert column(rows, "teacher_loss") == column(rows, "teacher_uda")
    # the student EMA counts training steps (each makes a teacher and a student optimizer step): min(0.995, 1 - 1/(i+1))
    assert column(rows, "ema_momentum") == [inverse_momentum(0, 0.995), inverse_momentum(1, 0.995)] == [0.0, 0.5]


def test_mpl_resume_restores_both_optimisers_schedulers_and_baseline(tmp_path):
    """At an epoch end and after SIGTERM mid-epoch (batch 3 of 2 x 2, optimizer step 6 of 8)."""
    full, part, cut = tmp_path / "full", tmp_path / "part", tmp_path / "cut"
    assert run_tiny("mpl", full, "--trainer.max_epochs", "2") == 0
    assert run_tiny("mpl", part, "--trainer.max_epochs", "2", "--trainer.callbacks+=helpers.StopAfterEpoch",
                   "--trainer.callbacks.epoch", "0") == 0
    assert run_tiny("mpl", part, "--trainer.max_epochs", "2", "--ckpt_path", str(part / "checkpoints" / "last.ckpt")) == 0
    # two optimizer steps (student, teacher) per batch: 2 epochs x 2 batches x 2
    a, b = assert_same_final_state(full / "checkpoints" / "last.ckpt", part / "checkpoints" / "last.ckpt", steps=8)
    assert a["state_dict"]["steps_done"].item() == 4 and a["state_dict"]["moving_feedback"].item() != 0
    assert len(a["optimizer_states"]) == len(b["optimizer_states"]) == 2
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"]):
        for pid, state in opt_a["state"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b["state"][pid][name])), (pid, name)
    assert a["lr_schedulers"] == b["lr_schedulers"] and a["lr_schedulers"][1]["last_epoch"] == 4
    assert run_tiny("mpl", cut, "--trainer.max_epochs", "2", "--trainer.callbacks+=helpers.SignalAtStep", "--trainer.callbacks.step", "6") == 143
    assert run_tiny("mpl", cut, "--trainer.max_epochs", "2", "--ckpt_path", "last") == 0
    _, c = assert_same_final_state(full / "checkpoints" / "last.ckpt", cut / "checkpoints" / "last.ckpt", steps=8)
    assert a["lr_schedulers"] == c["lr_schedulers"]


def test_uda_resumed_mid_epoch_ends_with_the_same_weights(tmp_path):
    """SIGTERM after step 3 of 2 x 2: labeled / unlabeled positions, weak and strong views, the EMA classifier and
    the schedule continue exactly."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    fp32 = ("--trainer.max_epochs", "2", "--trainer.precision", "32-true")
    assert run_tiny("uda", full, *fp32) == 0
    sigterm_after_step_3 = ("--trainer.callbacks+=helpers.SignalAtStep", "--trainer.callbacks.step", "3")
    assert run_tiny("uda", cut, *fp32, *sigterm_after_step_3) == 143
    stopped = torch.load(cut / "checkpoints" / "last.ckpt", weights_only=False)
    assert stopped["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 1}] * 2
    assert run_tiny("uda", cut, *fp32, "--ckpt_path", "last") == 0
    a, _ = assert_same_final_state(full / "checkpoints" / "last.ckpt", cut / "checkpoints" / "last.ckpt", steps=4)
    assert any(k.startswith("ema_classifier.") for k in a["state_dict"])  # the evaluated EMA classifier is compared too


def test_mpl_runs_under_two_process_cpu_ddp(tmp_path):
    run = tmp_path / "ddp"
    run_cpu_ddp(["--recipe", "mpl", *TINY_SEMI, "--run_dir", run, "--trainer.max_epochs", "1"],
                strategy="ddp_find_unused_parameters_true")
    rows = metrics(run)
    assert len(column(rows, "mpl_feedback")) == 2 and (run / "encoder" / "model.safetensors").is_file()
