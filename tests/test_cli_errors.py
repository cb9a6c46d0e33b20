"""ssl-pretrain on bad input: a one-line 'ssl-pretrain: error: ...' naming the fix, exit code 2, nothing written."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ssl_kit.cli import available_recipes, pretrain_main


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Run in tmp_path (so a stray runs/ folder lands there) and undo setup_logging()'s handler."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["ssl-pretrain"])
    logger = logging.getLogger("ssl_kit")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = pretrain_main(list(args))
    err = capsys.readouterr().err
    return code, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("ssl-pretrain: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_mae_recipe_is_shipped():
    assert "mae" in available_recipes()


def test_unknown_recipe_lists_available(capsys, tmp_path):
    code, err = run_cli(capsys, "--recipe", "doesnotexist", "--run_dir", str(tmp_path / "run"))
    assert code == 2
    line = error_line(err)
    assert "doesnotexist" in line and "mae" in line
    assert not (tmp_path / "run").exists()


def test_missing_recipe_file(capsys, tmp_path):
    code, err = run_cli(capsys, "--recipe", str(tmp_path / "mine.yaml"))
    assert code == 2 and "mine.yaml" in error_line(err)


def test_no_recipe_asks_for_one(capsys):
    code, err = run_cli(capsys)
    assert code == 2 and "--recipe" in error_line(err)


def test_unknown_timm_model_named(capsys, tmp_path):
    code, err = run_cli(capsys, "--recipe", "mae", "--model.encoder", "vit_doesnotexist", "--run_dir", str(tmp_path / "run"))
    assert code == 2
    line = error_line(err)
    assert "vit_doesnotexist" in line and "Unknown encoder" in line
    assert not (tmp_path / "run").exists()


def test_img_size_not_divisible_by_patch(capsys, tmp_path):
    code, err = run_cli(capsys, "--recipe", "mae", "--data.img_size", "30", "--run_dir", str(tmp_path / "run"))
    assert code == 2
    line = error_line(err)
    assert "img_size 30" in line and "patch_size 4" in line and "--data.img_size 32" in line
    assert not (tmp_path / "run").exists()


def test_bad_in_chans_from_data_module(capsys, tmp_path):
    code, err = run_cli(capsys, "--recipe", "mae", "--data.in_chans", "2", "--run_dir", str(tmp_path / "run"))
    assert code == 2 and "in_chans" in error_line(err)


def test_missing_data_folder_writes_nothing(capsys, tmp_path):
    run = tmp_path / "run"
    code, err = run_cli(
        capsys, "--recipe", "mae", "--data.root", "/nonexistent", "--data.dataset", "folder", "--run_dir", str(run)
    )
    assert code == 2
    line = error_line(err)
    assert "/nonexistent" in line and "--data.root" in line
    assert not run.exists()
    assert not (tmp_path / "runs").exists()


def test_empty_data_folder_writes_nothing(capsys, tmp_path):
    (tmp_path / "imgs").mkdir()
    run = tmp_path / "run"
    code, err = run_cli(capsys, "--recipe", "mae", "--data.root", str(tmp_path / "imgs"), "--run_dir", str(run))
    assert code == 2 and "No images found" in error_line(err)
    assert not run.exists()


def test_print_config_shows_resolved_recipe(capsys):
    with pytest.raises(SystemExit) as info:
        pretrain_main(["--recipe", "mae", "--model.mask_ratio", "0.6", "--print_config"])
    assert info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "mask_ratio: 0.6" in out and "ssl_kit.methods.MAE" in out and "PretrainDataModule" in out


def test_mask_ratio_out_of_range_is_one_line_before_training(capsys, tmp_path):
    """Issue #26: a bad --model.mask_ratio used to start training and fail inside random_masking at step 0."""
    code, err = run_cli(capsys, "--recipe", "mae", "--model.mask_ratio", "1.5", "--run_dir", str(tmp_path / "run"))
    assert code == 2
    assert "--model.mask_ratio must be in [0, 1)" in error_line(err) and "got 1.5" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_truncated_checkpoint_is_one_line_and_last_falls_back(capsys, tmp_path, ssl_caplog):
    """Issue #26: --ckpt_path on a file cut short is one clear line (it was a 20-line zip traceback); --ckpt_path last
    passes over an unreadable newest checkpoint to the newest readable one and says so."""
    import os
    import shutil

    from helpers import TINY_ARGS

    run = tmp_path / "run"
    args = [*TINY_ARGS, "--knn_every_n_epochs", "0", "--trainer.max_epochs", "1", "--run_dir", str(run)]
    assert pretrain_main(args) == 0
    last = run / "checkpoints" / "last.ckpt"
    older = run / "hpc_ckpt_1.ckpt"
    shutil.copy(last, older)
    os.utime(older, (last.stat().st_mtime - 60, last.stat().st_mtime - 60))
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # killed while writing
    capsys.readouterr()
    code, err = run_cli(capsys, *args, "--ckpt_path", str(last))
    assert code == 2 and "is not a readable checkpoint (cut short" in error_line(err)
    resume = [*args[:-2], "--trainer.max_epochs", "2", "--run_dir", str(run), "--ckpt_path", "last"]
    assert pretrain_main(resume) == 0
    assert f"{last} is not a readable checkpoint (cut short?); trying an older one" in ssl_caplog.text
    assert f"resuming from {older}" in ssl_caplog.text
    older.write_bytes(b"not a checkpoint")
    os.utime(older, (0, 0))
    last.write_bytes(b"")
    code, err = run_cli(capsys, *resume)
    assert code == 2 and "none of the checkpoints of" in error_line(err)


BAD_INPUTS = [  # (arguments, a fragment of the one error line)
    (["--recipe", "mae", "--model.mask_ratio", "-0.1"], "--model.mask_ratio must be in [0, 1)"),
    (["--recipe", "mae", "--data.batch_size", "0"], "--data.batch_size must be a positive integer"),
    (["--recipe", "mae", "--data.img_size", "0"], "--data.img_size must be a positive integer"),
    (["--recipe", "mae", "--model.patch_size", "0"], "patch_size must be positive integers"),
    (["--recipe", "mae", "--data.crop_scale", "[0.9, 0.1]"], "--data.crop_scale must be [min, max]"),
    (["--recipe", "mae", "--data.knn_train_size", "-5"], "--data.knn_train_size and --data.knn_test_size must be >= 0"),
    (["--recipe", "mae", "--model.base_lr", "-1"], "--model.base_lr must be > 0"),
    (["--recipe", "mae", "--model.warmup_epochs", "-1"], "--model.warmup_epochs must be >= 0"),
    (["--recipe", "mae", "--model.weight_decay", "-1"], "--model.weight_decay must be >= 0"),
    (["--recipe", "mae", "--data.root", "/etc/hostname"], "is a file"),
    (["--recipe", "mae", "--init_weights", "/nonexistent.ckpt"], "no such checkpoint"),
    (["--recipe", "uda", "--model.confidence_threshold", "2"], "--model.confidence_threshold must be in [0, 1] (a probability"),
    (["--recipe", "uda", "--data.labels_per_class", "0"], "No unlabeled images"),
    (["--recipe", "u2pl", "--model.alpha0", "150"], "--model.alpha0 must be in [0, 100] (a percentage"),
    (["--recipe", "mae", "--trainer.devices", "0"], "trainer settings: `Trainer(devices='0')`"),
    (["--recipe", "u2pl", "--data.labeled_images", "5000"], "--data.labeled_images 5000 must be between 1"),
]


BAD_INPUTS += [  # {inputs}: files the `inputs` fixture writes (checkpoints, mask folders, COCO files, a 20-image folder)
    # each method's ranges and combinations
    (["--recipe", "lomar", "--model.window_size", "100"], "--model.window_size 100 does not fit the 8x8 patch grid"),
    (["--recipe", "lomar", "--model.mask_ratio", "1.2"], "--model.mask_ratio 1.2 masks 58 of the 49 patches"),
    (["--recipe", "ibot", "--model.mask_ratio", "[0.6, 0.2]"], "--model.mask_ratio must be [min, max] fractions"),
    (["--recipe", "ibot", "--model.teacher_temp", "0"], "--model.teacher_temp must be > 0, got 0.0"),
    (["--recipe", "ibot", "--model.out_dim", "0"], "--model.out_dim must be >= 1, got 0"),
    (["--recipe", "mpl", "--model.threshold", "2"], "--model.threshold must be in [0, 1]"),
    (["--recipe", "mpl", "--model.num_classes", "1"], "--model.num_classes must be >= 2"),
    (["--recipe", "uda", "--model.betas", "[0.9, 1.5]"], "--model.betas: every value must be in [0, 1)"),
    (["--recipe", "u2pl", "--model.low_rank", "30"], "--model.low_rank 30 must be >= 1 and below both"),
    (["--recipe", "soft_teacher", "--model.cls_threshold", "2"], "--model.cls_threshold must be in [0, 1]"),
    (["--recipe", "soft_teacher", "--model.ema_decay", "1.5"], "--model.ema_decay must be in [0, 1]"),
    # options the parser rejects
    (["--recipe", "mae", "--model.nonexistent", "3"], "--model.nonexistent is not an option of MAE"),
    (["--recipe", "mae", "--model.mask_ratio", "abc"], "--model.mask_ratio: Expected a float. Got value: abc"),
    # trainer and launch
    (["--recipe", "mae", "--trainer.accumulate_grad_batches", "0"], "--trainer.accumulate_grad_batches must be >= 1"),
    (["--recipe", "mae", "--keep_every_n_steps", "-2"], "--keep_every_n_steps must be >= 0"),
    (["--recipe", "mae", "--trainer.accelerator", "tpu"], "these settings could not be built: Requirement 'torch_xla"),
    (["--recipe", "mae", "--trainer.strategy", "warp_drive"], "invalid strategy name: `strategy='warp_drive'`"),
    (["--recipe", "mae", "--data.root", "{inputs}/twenty", "--data.img_size", "16", "--data.batch_size", "16",
      "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp"],
     "fewer than one global batch of 16 x 2 processes"),
    # checkpoints: foreign, another method, another architecture
    (["--recipe", "mae", "--ckpt_path", "{inputs}/weights_only.pt"], "is not a training checkpoint"),
    (["--recipe", "lomar", "--ckpt_path", "{inputs}/mae_tiny.ckpt"], "is a MAE checkpoint but this run trains LoMaR"),
    (["--recipe", "mae", "--ckpt_path", "{inputs}/mae_tiny.ckpt", "--model.encoder_kwargs",
      "{depth: 1, embed_dim: 32, num_heads: 2}", "--model.decoder_dim", "32", "--model.decoder_depth", "1",
      "--model.decoder_heads", "2"], "encoder.cls_token is [1, 1, 64] in the checkpoint and [1, 1, 32] here"),
    # data module ranges
    (["--recipe", "soft_teacher", "--data.max_overlap", "1.5"], "--data.max_overlap must be in [0, 1], got 1.5"),
    (["--recipe", "ibot", "--data.num_local", "-1"], "--data.num_local must be >= 0, got -1"),
    (["--recipe", "mae", "--data.val_fraction", "1"], "--data.val_fraction must be in [0, 1), got 1.0"),
    # data: masks, COCO JSON
    (["--recipe", "u2pl", "--data.root", "{inputs}/seg_bad_value", "--data.num_classes", "3", "--model.num_classes", "3",
      "--model.low_rank", "1"], "has value(s) [5] >= --data.num_classes 3"),
    (["--recipe", "u2pl", "--data.root", "{inputs}/seg_missing_mask", "--data.num_classes", "3",
      "--model.num_classes", "3", "--model.low_rank", "1"], "im2.png has no mask"),
    (["--recipe", "soft_teacher", "--data.root", "{inputs}/coco", "--data.train_annotations", "{inputs}/coco/bad.json",
      "--data.val_annotations", "{inputs}/coco/bad.json"], "bad.json is not valid JSON (line 1, column 13"),
    (["--recipe", "soft_teacher", "--data.root", "{inputs}/coco", "--data.train_annotations",
      "{inputs}/coco/outside.json", "--data.val_annotations", "{inputs}/coco/outside.json"], "lies outside its"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The files the bad-input table points at."""
    import json

    import numpy as np
    import torch
    from PIL import Image

    from ssl_kit.methods import MAE
    from helpers import save

    root = tmp_path_factory.mktemp("inputs")
    for i in range(20):
        save(root / "twenty" / ("a" if i % 2 else "b") / f"{i}.png", size=(16, 16), seed=i)
    tiny = MAE(encoder_kwargs=dict(depth=1, embed_dim=64, num_heads=2), decoder_dim=32, decoder_depth=1,
               decoder_heads=2)
    torch.save({"pytorch-lightning_version": "2.6.0", "state_dict": tiny.state_dict(),
                "hyper_parameters": dict(tiny.hparams), "ssl_kit": {"method": "MAE"}}, root / "mae_tiny.ckpt")
    torch.save(tiny.encoder.state_dict(), root / "weights_only.pt")
    rng = np.random.default_rng(0)
    for name in ("seg_bad_value", "seg_missing_mask"):
        for split, count in (("train", 4), ("val", 2)):
            for i in range(count):
                (root / name / split / "images").mkdir(parents=True, exist_ok=True)
                (root / name / split / "masks").mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
                    root / name / split / "images" / f"im{i}.png")
                Image.fromarray(rng.integers(0, 3, (64, 64), dtype=np.uint8)).save(
                    root / name / split / "masks" / f"im{i}.png")
    Image.fromarray(np.full((64, 64), 5, np.uint8)).save(root / "seg_bad_value" / "train" / "masks" / "im1.png")
    (root / "seg_missing_mask" / "train" / "masks" / "im2.png").unlink()
    coco = root / "coco"
    coco.mkdir()
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(coco / "a.png")
    (coco / "bad.json").write_text('{"images": [}')
    (coco / "outside.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 40}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [30, 30, 50, 50]}],
        "categories": [{"id": 1, "name": "box"}]}))
    return root


def test_the_bad_input_table_has_30_cases_across_data_config_checkpoints_and_launch():
    assert len(BAD_INPUTS) >= 30


@pytest.mark.parametrize("args, fragment", BAD_INPUTS, ids=[" ".join(a[1:]) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_before_training_and_keeps_earlier_outputs(capsys, tmp_path, inputs, args, fragment):
    """Issue #26's table: exit code 2, one 'ssl-pretrain: error:' line naming the flag, no traceback, no
    checkpoint written, and a file already in the run folder untouched."""
    args = [a.replace("{inputs}", str(inputs)) for a in args]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    earlier = run / "checkpoints" / "earlier.ckpt"
    earlier.write_bytes(b"an earlier run's checkpoint")
    code, err = run_cli(capsys, *args, "--run_dir", str(run), "--knn_every_n_epochs", "0",
                        "--trainer.limit_train_batches", "1", "--trainer.max_epochs", "1")
    assert code == 2, err
    assert fragment in error_line(err)
    assert earlier.read_bytes() == b"an earlier run's checkpoint"
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == ["checkpoints", "checkpoints/earlier.ckpt"]


def test_every_range_rule_names_a_setting_of_some_method():
    """A misspelt name in ssl_kit.validation.RULES would check nothing: each one is a parameter of a method."""
    import inspect

    import ssl_kit.methods as methods
    from ssl_kit.methods.base import SSLMethod
    from ssl_kit.validation import RULES

    classes = [c for c in vars(methods).values() if isinstance(c, type) and issubclass(c, SSLMethod)]
    parameters = {name for c in classes for name in inspect.signature(c.__init__).parameters}
    assert sorted(set(RULES) - parameters) == []


@pytest.mark.parametrize("where, fragment", [("file", "is a file, not a folder"),
                                             ("proc", "cannot be written")])
def test_a_run_folder_that_cannot_be_written_is_one_line_and_nothing_is_made(capsys, tmp_path, where, fragment):
    """Launch: --run_dir inside a file, or where nobody can write (/proc, read-only even for root), fails before
    any file is written anywhere."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    run = blocker / "run" if where == "file" else Path("/proc/ssl_kit_test_run")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = run_cli(capsys, "--recipe", "mae", "--run_dir", str(run), "--knn_every_n_epochs", "0")
    assert code == 2 and fragment in error_line(err) and str(run) in error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before and blocker.read_text() == "not a folder"


def test_a_second_ema_teacher_is_refused_before_training(capsys, tmp_path):
    """iBOT brings its EMA teacher (--model.teacher_momentum); the callback the recipe used to add would update the
    teacher twice per step."""
    run = tmp_path / "run"
    code, err = run_cli(capsys, "--recipe", "ibot", "--trainer.callbacks+=ssl_kit.teacher.EMATeacher",
                        "--data.num_workers", "0", "--run_dir", str(run))
    assert code == 2
    line = error_line(err)
    assert "IBOT brings its own EMA teacher" in line and "--model.teacher_momentum" in line
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
