"""Issue #10: every method trains under ``--trainer.precision bf16-mixed`` (CPU autocast here; the same
Lightning plugin on GPUs): finite losses, fp32 master weights, a finite checkpoint."""
import csv
import math

import pytest
import torch

from ssl_kit.cli import pretrain_main
from helpers import METHOD_CASES, SHORT_FP32

pytestmark = pytest.mark.slow

RECIPES = {name: args for name, (args, _, _) in METHOD_CASES.items()}  # U2PL's: semi-supervised from step 0


@pytest.mark.parametrize("method", list(RECIPES))
def test_bf16_mixed_precision_trains(method, tmp_path, ssl_caplog):
    strategy = ["--trainer.strategy", "auto"]
    args = [*RECIPES[method], *SHORT_FP32, "--trainer.limit_train_batches", "2", "--data.batch_size", "2" if method == "soft_teacher" else "4"]
    assert pretrain_main([*args, *strategy, "--trainer.precision", "bf16-mixed", "--run_dir", str(tmp_path)]) == 0
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    weights = {k: v for k, v in ckpt["state_dict"].items() if v.is_floating_point()}
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
    losses = [float(r["train_loss_step"]) for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r.get("train_loss_step")]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert ckpt["global_step"] > 0


# ----------------------------------------------------------------------------- issue #20: --trainer.precision auto
from ssl_kit import precision as prec  # noqa: E402
from helpers import TINY_ARGS  # noqa: E402


@pytest.fixture
def cpu_with(monkeypatch):
    """Pretend the CPU has these flags (and no CUDA device)."""
    def set_flags(*flags):
        monkeypatch.setattr(prec, "cpu_flags", lambda *a: set(flags) | {"avx2", "fma"})
        monkeypatch.setattr(prec.sys, "platform", "linux")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return set_flags


def test_auto_picks_bf16_only_where_the_cpu_has_it(cpu_with):
    cpu_with("avx512_bf16")
    assert prec.auto_precision("auto") == ("bf16-mixed", "the CPU has avx512_bf16")
    cpu_with("amx_bf16", "amx_tile")
    assert prec.auto_precision("cpu")[0] == "bf16-mixed"
    cpu_with()  # AVX2 only: bf16 would be emulated, slower than fp32
    chosen, why = prec.auto_precision("auto")
    assert chosen == "32-true" and "lacks avx512_bf16" in why


def test_explicit_precision_passes_through(cpu_with, ssl_caplog):
    cpu_with()
    assert prec.resolve_precision("bf16-mixed") == "bf16-mixed"
    assert "precision bf16-mixed (set by --trainer.precision)" in ssl_caplog.text
    assert prec.resolve_precision("auto") == "32-true"
    assert prec.resolve_precision(None) == "32-true"


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\nbugs\t\t: none\n")
    assert {"avx512_bf16", "fpu"} <= prec.cpu_flags(info)
    assert prec.cpu_flags(tmp_path / "missing") == set()


def test_cuda_choice_follows_the_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert prec.uses_cuda("auto") and prec.uses_cuda("gpu") and not prec.uses_cuda("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    assert prec.auto_precision("gpu") == ("32-true", "Tesla V100 has no native bf16 (fp16 needs loss scaling: "
                                                    "--trainer.precision 16-mixed)")


def test_autocast_dtype_and_inference_autocast():
    assert prec.autocast_dtype("bf16-mixed") is torch.bfloat16 and prec.autocast_dtype("32-true") is None
    assert prec.autocast_dtype("16-mixed") is torch.float16 and prec.autocast_dtype(32) is None
    with prec.inference_autocast(torch.device("cpu"), torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") is torch.bfloat16
    with prec.inference_autocast(torch.device("cpu"), None):
        assert not torch.is_autocast_enabled("cpu")


def test_feature_extraction_runs_in_the_given_precision():
    from torch.utils.data import DataLoader, TensorDataset

    from ssl_kit.eval.knn import extract_features

    seen = []
    layer = torch.nn.Linear(16, 4)

    def embed(x):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return layer(x)

    loader = DataLoader(TensorDataset(torch.randint(0, 255, (10, 16), dtype=torch.uint8), torch.arange(10)), batch_size=4)
    to_float = lambda x: x.float() / 255  # noqa: E731
    f_bf16, y = extract_features(embed, loader, to_float, torch.device("cpu"), torch.bfloat16)
    f_fp32, _ = extract_features(embed, loader, to_float, torch.device("cpu"))
    assert seen == [torch.bfloat16] * 3 + [None] * 3
    assert f_bf16.dtype == torch.float32 and f_bf16.shape == (10, 4) and torch.equal(y, torch.arange(10))
    assert torch.allclose(f_bf16, f_fp32, atol=0.05) and not torch.equal(f_bf16, f_fp32)


def test_recipe_default_is_auto_and_the_run_says_so(tmp_path, ssl_caplog, cpu_with):
    """Every shipped recipe defaults to auto; a run names the precision it chose and why, and a resumed run
    chooses the same."""
    import yaml

    from ssl_kit.cli import RECIPE_DIR

    for recipe in RECIPE_DIR.glob("*.yaml"):
        assert yaml.safe_load(recipe.read_text())["trainer"]["precision"] == "auto", recipe.name
    cpu_with("avx512_bf16")
    args = [*TINY_ARGS, "--knn_every_n_epochs", "0", "--trainer.max_epochs", "1", "--run_dir", str(tmp_path)]
    assert pretrain_main(args) == 0
    assert "precision bf16-mixed (auto: the CPU has avx512_bf16" in ssl_caplog.text
    ssl_caplog.clear()
    resume = [*args[:-2], "--trainer.max_epochs", "2", "--run_dir", str(tmp_path), "--ckpt_path", "last"]
    assert pretrain_main(resume) == 0
    assert "precision bf16-mixed (auto" in ssl_caplog.text and "resuming from" in ssl_caplog.text
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    cpu_with()  # the same recipe on a CPU without bf16 instructions trains in fp32
    ssl_caplog.clear()
    assert pretrain_main([*args[:-1], str(tmp_path / "fp32")]) == 0
    assert "precision 32-true (auto: the CPU lacks avx512_bf16" in ssl_caplog.text
