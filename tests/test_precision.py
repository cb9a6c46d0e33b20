"""Issue #10: every method trains under ``--trainer.precision bf16-mixed`` (CPU autocast here; the same
Lightning plugin on GPUs): finite losses, fp32 master weights, a finite checkpoint."""
import csv
import math

import pytest
import torch

from ssl_kit.cli import pretrain_main
from test_equivalence import CASES, COMMON
from test_u2pl_cli import TINY_SEG

pytestmark = pytest.mark.slow

RECIPES = {name: args for name, (args, _, _) in CASES.items()}
RECIPES["u2pl"] = ["--recipe", "u2pl", *TINY_SEG, "--model.drop_path_rate", "0.0"]


@pytest.mark.parametrize("method", list(RECIPES))
def test_bf16_mixed_precision_trains(method, tmp_path, ssl_caplog):
    strategy = ["--trainer.strategy", "auto"]
    args = [*RECIPES[method], *COMMON, "--trainer.limit_train_batches", "2", "--data.batch_size", "2" if method == "soft_teacher" else "4"]
    assert pretrain_main([*args, *strategy, "--trainer.precision", "bf16-mixed", "--run_dir", str(tmp_path)]) == 0
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    weights = {k: v for k, v in ckpt["state_dict"].items() if v.is_floating_point()}
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
    losses = [float(r["train_loss_step"]) for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r.get("train_loss_step")]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert ckpt["global_step"] > 0
