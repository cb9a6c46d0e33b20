"""`ssl-pretrain --recipe lomar` end to end (tiny), resume, and the evaluation commands on its checkpoint."""
import csv
import json

import pytest
import timm
import torch

from helpers import assert_same_final_state, run_tiny
from ssl_kit.eval.cli import finetune_main, knn_main

pytestmark = pytest.mark.slow


def test_lomar_recipe_runs_and_its_checkpoint_evaluates(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_tiny("lomar", run, "--trainer.max_epochs", "2") == 0
    assert f"run folder: {run}" in capsys.readouterr().out
    assert sorted(p.name for p in (run / "pictures").iterdir()) == ["epoch_000.png", "epoch_001.png"]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert any(r.get("knn_top1") for r in rows) and any(r.get("train_loss_step") for r in rows)
    cfg = json.loads((run / "encoder" / "config.json").read_text())
    enc = timm.create_model(cfg["timm_name"], pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(run / "encoder" / "model.safetensors")), **cfg["kwargs"])
    assert enc.pos_embed is None and cfg["kwargs"]["rpe_ratio"] == 1.9
    ckpt = str(run / "checkpoints" / "last.ckpt")
    assert torch.load(ckpt, weights_only=False)["ssl_kit"]["method"] == "LoMaR"
    knn_out = tmp_path / "knn"
    assert knn_main(["--ckpt", ckpt, "--data.labels_per_class", "10", "--out", str(knn_out)]) == 0
    assert 0.2 < json.loads((knn_out / "metrics.json").read_text())["knn_top1"]["20"] <= 1.0
    ft_out = tmp_path / "ft"
    assert finetune_main(["--ckpt", ckpt, "--data.labels_per_class", "10", "--data.img_size", "40",
                          "--steps", "2", "--trainer.limit_val_batches", "2", "--out", str(ft_out)]) == 0
    assert (ft_out / "metrics.json").is_file()


def test_lomar_resume_ends_with_the_same_weights(tmp_path):
    """At an epoch end, and after SIGTERM in the middle of an epoch (step 4 of 2 x 3): window draws, masks and the
    relative-position tables continue exactly."""
    full, part, cut = tmp_path / "full", tmp_path / "part", tmp_path / "cut"
    assert run_tiny("lomar", full, "--trainer.max_epochs", "2") == 0
    assert run_tiny("lomar", part, "--trainer.max_epochs", "2", "--trainer.callbacks+=helpers.StopAfterEpoch",
                   "--trainer.callbacks.epoch", "0") == 0
    assert run_tiny("lomar", part, "--trainer.max_epochs", "2", "--ckpt_path", str(part / "checkpoints" / "last.ckpt")) == 0
    assert_same_final_state(full / "checkpoints" / "last.ckpt", part / "checkpoints" / "last.ckpt", steps=6)
    assert run_tiny("lomar", cut, "--trainer.max_epochs", "2", "--trainer.callbacks+=helpers.SignalAtStep", "--trainer.callbacks.step", "4") == 143
    assert run_tiny("lomar", cut, "--trainer.max_epochs", "2", "--ckpt_path", "last") == 0
    assert_same_final_state(full / "checkpoints" / "last.ckpt", cut / "checkpoints" / "last.ckpt", steps=6)
