"""Evaluation suite: layer-wise lr decay, LARS, linear head, and each command end to end (tiny)."""
import csv
import json
from types import SimpleNamespace

import pytest
import timm
import torch

from helpers import TINY_ARGS
from ssl_kit.cli import pretrain_main
from ssl_kit.eval.cli import export_main, finetune_main, knn_main, linear_probe_main
from ssl_kit.eval.finetune import FineTune, layer_decay_param_groups
from ssl_kit.eval.lars import LARS
from ssl_kit.eval.linear_probe import LinearProbe, linear_head
from ssl_kit.precision import auto_precision

RANDOM_TINY = ["--random_init", "tiny", "--patch_size", "4", "--encoder_kwargs", "{depth: 1, embed_dim: 32, num_heads: 2}"]
FEW = ["--data.labels_per_class", "10"]


def vit_b_shaped(depth=12):
    return timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=16, embed_dim=32,
                             num_heads=2, depth=depth, num_classes=10, global_pool="avg")


def test_layer_decay_matches_mae_rule_vit_b_065():
    model = vit_b_shaped()
    groups = layer_decay_param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.65)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    lr = lambda name: lr_of[id(model.get_parameter(name))]  # noqa: E731
    assert lr("patch_embed.proj.weight") == pytest.approx(0.65**13) == pytest.approx(0.003697, abs=1e-6)
    assert lr("cls_token") == pytest.approx(0.65**13) and lr("pos_embed") == pytest.approx(0.65**13)
    for i in range(12):  # blocks.i -> layer i + 1 -> scale 0.65 ** (13 - (i + 1))
        assert lr(f"blocks.{i}.attn.qkv.weight") == pytest.approx(0.65 ** (12 - i))
        assert lr(f"blocks.{i}.norm1.bias") == pytest.approx(0.65 ** (12 - i))
    assert lr("head.weight") == pytest.approx(1.0) and lr("fc_norm.weight") == pytest.approx(1.0)
    assert len({round(g["lr"], 12) for g in groups}) == 14  # 14 distinct rates: 0..13
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert wd[id(model.cls_token)] == 0 and wd[id(model.blocks[0].attn.qkv.bias)] == 0
    assert wd[id(model.blocks[0].attn.qkv.weight)] == 0.05


def test_finetune_optimizer_lrs_really_differ_per_block_under_the_scheduler():
    model = vit_b_shaped(depth=4)
    module = FineTune(model, 10, base_lr=1e-3, layer_decay=0.75, warmup_epochs=0, min_lr=0.0, batch_size=256)
    module._trainer = SimpleNamespace(estimated_stepping_batches=100, num_training_batches=100, accumulate_grad_batches=1,
                                      world_size=1, max_epochs=1)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    for _ in range(50):  # half-way through the cosine: every rate is halved, the ratios stay
        optimizer.step()
        scheduler.step()
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    head = lr_of[id(model.head.weight)]
    assert head == pytest.approx(1e-3 * 0.5, rel=1e-6)
    for i in range(4):
        assert lr_of[id(model.blocks[i].mlp.fc1.weight)] == pytest.approx(head * 0.75 ** (4 - i), rel=1e-6)
    assert lr_of[id(model.patch_embed.proj.weight)] == pytest.approx(head * 0.75**5, rel=1e-6)


def test_lars_excludes_1d_params_from_adaptation_and_weight_decay():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    w.grad = torch.tensor([[0.0, 1.0]])
    b.grad = torch.tensor([2.0, -2.0])
    LARS([w, b], lr=0.1, weight_decay=0.5, momentum=0.9, trust_coefficient=0.001).step()
    d = torch.tensor([[1.5, 3.0]])  # grad + 0.5 * w
    ratio = 0.001 * 5.0 / d.norm()
    assert torch.allclose(w, torch.tensor([[3.0, 4.0]]) - 0.1 * ratio * d)
    assert torch.allclose(b, torch.tensor([0.8, 1.2]))  # plain SGD step: no decay, no trust ratio


def test_linear_head_is_batchnorm_without_affine_then_linear():
    head = linear_head(16, 5)
    assert head[0].weight is None and head[0].bias is None and head[0].eps == 1e-6
    probe = LinearProbe(torch.nn.Identity(), 16, 5)
    probe.encoder = None  # cached mode: inputs are features
    trainable = [n for n, p in probe.named_parameters() if p.requires_grad]
    assert trainable == ["head.1.weight", "head.1.bias"]
    assert probe(torch.randn(4, 16)).shape == (4, 5)


def read(out):
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("pretrain") / "run"
    assert pretrain_main([*TINY_ARGS, "--run_dir", str(run), "--trainer.max_epochs", "1"]) == 0
    return run


def test_knn_command_on_checkpoint_several_k(tiny_run, tmp_path, capsys):
    out = tmp_path / "knn"
    assert knn_main(["--ckpt", str(tiny_run / "checkpoints" / "last.ckpt"), "--k", "1,20", *FEW, "--out", str(out)]) == 0
    metrics = read(out)
    assert set(metrics["knn_top1"]) == {"1", "20"} and metrics["num_train"] == 100 and metrics["num_val"] == 10000
    assert all(0.2 < v <= 1.0 for v in metrics["knn_top1"].values())  # far above chance (0.1)
    assert metrics["precision"] == auto_precision("cpu")[0]  # --precision auto: the forward passes follow the CPU
    assert "k-NN top-1 (k=20" in capsys.readouterr().out
    assert json.loads((out / "labeled_subset.json").read_text())["labels_per_class"] == 10
    assert (out / "knn.csv").read_text().startswith("k,top1")


def test_export_command_and_encoder_option_agree(tiny_run, tmp_path):
    export = tmp_path / "export"
    assert export_main(["--ckpt", str(tiny_run / "checkpoints" / "last.ckpt"), "--out", str(export)]) == 0
    a, b = tmp_path / "a", tmp_path / "b"
    assert knn_main(["--encoder", str(export), *FEW, "--out", str(a)]) == 0
    assert knn_main(["--encoder", str(tiny_run / "encoder"), *FEW, "--out", str(b)]) == 0
    assert read(a)["knn_top1"] == read(b)["knn_top1"]  # last.ckpt and the end-of-fit export are the same weights


def test_linear_probe_cached_and_full(tmp_path, capsys):
    cached, full = tmp_path / "cached", tmp_path / "full"
    # 32-wide features of a random one-block ViT: a larger base_lr than the default (1.0) moves the head in 400 steps
    assert linear_probe_main([*RANDOM_TINY, *FEW, "--cached-features", "true", "--steps", "400", "--val_every", "10",
                              "--warmup_steps", "40", "--base_lr", "30", "--data.batch_size", "10", "--feature", "cls",
                              "--out", str(cached)]) == 0
    m = read(cached)
    assert m["cached_features"] is True and m["protocol"].startswith("cached features")
    assert len(m["val_top1_per_epoch"]) == 40 and m["val_top1_final"] > 0.25
    assert m["feature"] == "cls" and m["steps"] == 400
    assert linear_probe_main([*RANDOM_TINY, *FEW, "--cached_features", "false", "--steps", "1", "--trainer.limit_val_batches", "2",
                              "--data.batch_size", "32", "--out", str(full)]) == 0
    assert read(full)["cached_features"] is False and "linear probe top-1" in capsys.readouterr().out


def test_finetune_command_few_labels_schedule_in_steps(tiny_run, tmp_path):
    out = tmp_path / "ft"
    assert finetune_main(["--ckpt", str(tiny_run / "checkpoints" / "last.ckpt"), *FEW, "--steps", "6", "--val_every", "3",
                          "--warmup_steps", "2", "--trainer.limit_val_batches", "2", "--data.batch_size", "32",
                          "--out", str(out)]) == 0
    m = read(out)
    assert m["labels_per_class"] == 10 and m["layer_decay"] == 0.75 and 0 <= m["val_top1_final"] <= 1
    # 100 labeled images, batch 32: 6 optimizer steps in 2 validated "epochs" of 3 steps, whatever the label count
    assert m["epochs"] == 2 and len(m["val_top1_per_epoch"]) == 2 and m["steps"] == 6
    assert m["global_pool"] == "avg" and m["train_augment"] == "pad_crop"  # MAE checkpoint: mean patch token
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert max(int(r["step"]) for r in rows) == 5  # the last validation at optimizer step 6 (0-based 5)


def test_feature_auto_follows_what_the_encoder_was_trained_for(tiny_run):
    from ssl_kit.eval.cli import default_feature
    from ssl_kit.encoders import EncoderSource

    from ssl_kit.eval.cli import finetune_pool

    ckpt, export = EncoderSource(ckpt=str(tiny_run / "checkpoints" / "last.ckpt")), EncoderSource(encoder=str(tiny_run / "encoder"))
    assert default_feature(ckpt, "auto") == "cls"  # MAE's --model.readout default: the paper's linear probe
    assert default_feature(export, "auto") == "cls"
    assert json.loads((tiny_run / "encoder" / "config.json").read_text())["readout"] == "cls"
    assert finetune_pool(ckpt) == finetune_pool(export) == "avg"  # ... and MAE fine-tunes on the mean patch token
    assert default_feature(EncoderSource(random_init="tiny"), "auto") == "cls"
    assert default_feature(EncoderSource(random_init="tiny"), "avgpool") == "avgpool"  # an explicit choice is kept


def test_eval_resolution_change_resamples_position_embedding(tiny_run, tmp_path, ssl_caplog):
    assert knn_main(["--ckpt", str(tiny_run / "checkpoints" / "last.ckpt"), *FEW, "--data.img_size", "48",
                     "--out", str(tmp_path / "k48")]) == 0
    assert "position embedding resampled" in ssl_caplog.text and "8x8 to a 12x12" in ssl_caplog.text


def test_bad_inputs_are_clear(tiny_run, tmp_path, capsys):
    ckpt = str(tiny_run / "checkpoints" / "last.ckpt")
    assert knn_main(["--ckpt", ckpt, "--data.in_chans", "3", *FEW]) == 2
    assert "trained on 1-channel images" in capsys.readouterr().err
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    assert knn_main(["--ckpt", str(foreign), *FEW]) == 2
    assert "not an ssl_kit method checkpoint" in capsys.readouterr().err
    assert knn_main(["--ckpt", str(tmp_path / "missing.ckpt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert knn_main([*RANDOM_TINY, "--data.labels_per_class", "7000"]) == 2
    assert "fewer than --data.labels_per_class 7000" in capsys.readouterr().err
    assert knn_main(["--data.labels_per_class", "5"]) == 2
    assert "exactly one of --ckpt" in capsys.readouterr().err
    assert knn_main(["--random_init", "tiny", "--encoder_kwargs", "{depth: 1, in_chans: 3}", *FEW]) == 2
    assert "encoder_kwargs sets in_chans but --data.in_chans gives 1" in capsys.readouterr().err
    assert linear_probe_main([*RANDOM_TINY, "--data.root", str(tmp_path / "nowhere"), "--data.dataset", "folder",
                              "--out", str(tmp_path / "never")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "never").exists()
