"""Issue #21: readouts ([CLS] / mean patch token), collapse figures, and like-for-like random-init baselines."""
import json
from types import SimpleNamespace

import pytest
import timm
import torch

from ssl_kit.cli import pretrain_main
from ssl_kit.encoders import EncoderSource, build_random_encoder, load_encoder, sincos_2d_pos_embed
from ssl_kit.eval.cli import knn_main
from ssl_kit.encoders.features import encoder_features, feature_spread, readout_features
from ssl_kit.methods import IBOT, MAE, LoMaR

TINY = {"encoder_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2}, "img_size": 16, "patch_size": 4, "in_chans": 1}


def test_readouts_are_cls_and_mean_of_normed_patch_tokens():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=1,
                            num_heads=2, num_classes=0).eval()
    x = torch.randn(3, 1, 16, 16)
    tokens = vit.norm(vit.blocks(vit._pos_embed(vit.patch_embed(x))))  # the final norm by hand
    out = readout_features(vit, x)
    assert torch.allclose(out["cls"], tokens[:, 0], atol=1e-6)
    assert torch.allclose(out["avgpool"], tokens[:, 1:].mean(dim=1), atol=1e-6) and out["avgpool"].shape == (3, 32)
    assert torch.equal(encoder_features(vit, x, "avgpool"), out["avgpool"])
    # an avg-pool classifier: the readout is exactly what its head reads (timm's pre-logits, fc_norm after pooling)
    clf = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=1,
                            num_heads=2, num_classes=5, global_pool="avg").eval()
    pre = clf.forward_head(clf.forward_features(x), pre_logits=True)
    assert torch.allclose(readout_features(clf, x)["avgpool"], pre, atol=1e-6)


def test_feature_spread_by_hand():
    # normalised rows e1, e2, e1: pairwise cosines (1,2)=0, (1,3)=1, (2,3)=0 -> mean 1/3;
    # per-dimension values [1, 0, 1] and [0, 1, 0]: unbiased std sqrt(1/3) each
    spread = feature_spread(torch.tensor([[2.0, 0.0], [0.0, 5.0], [3.0, 0.0]]))
    assert spread["mean_cosine"] == pytest.approx(1 / 3)
    assert spread["mean_std"] == pytest.approx((1 / 3) ** 0.5)
    collapsed = feature_spread(torch.tensor([[1.0, 2.0]]).repeat(5, 1) * torch.arange(1, 6.0)[:, None])
    assert collapsed["mean_cosine"] == pytest.approx(1.0) and collapsed["mean_std"] == pytest.approx(0.0, abs=1e-6)
    assert all(v != v for v in feature_spread(torch.ones(1, 3)).values())  # one feature: no pairs, NaN


def test_each_method_names_its_paper_readout_and_init():
    mae, lomar, ibot = MAE(**TINY), LoMaR(**TINY, window_size=3), IBOT(**TINY, out_dim=16, hidden_dim=16, bottleneck_dim=8)
    assert (mae.readout, lomar.readout, ibot.readout) == ("cls", "avgpool", "cls")
    assert (mae.encoder_init, lomar.encoder_init, ibot.encoder_init) == ("mae", "mae", "timm")
    assert MAE(**TINY, readout="avgpool").readout == "avgpool"
    with pytest.raises(Exception, match="--model.readout must be one of cls, avgpool"):
        MAE(**TINY, readout="mean")
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(lomar.embed(x), lomar.readouts(x)["avgpool"])


def test_random_baseline_is_built_like_the_method_builds_its_encoder():
    """MAE's encoder at init: fixed sin-cos table, xavier linears; iBOT's: timm's learned, trunc-normal table."""
    torch.manual_seed(0)
    mae, ibot = MAE(**TINY), IBOT(**TINY, out_dim=16, hidden_dim=16, bottleneck_dim=8)
    mae_random = build_random_encoder(mae.encoder_spec, mae.encoder_init)
    ibot_random = build_random_encoder(ibot.encoder_spec, ibot.encoder_init)
    table = sincos_2d_pos_embed(32, 4, 4)
    assert torch.allclose(mae_random.pos_embed[0], table) and not mae_random.pos_embed.requires_grad
    assert torch.allclose(mae.encoder.pos_embed[0], table)
    assert ibot_random.pos_embed.requires_grad and not torch.allclose(ibot_random.pos_embed[0], table, atol=0.1)
    for built, method in ((mae_random, mae.encoder), (ibot_random, ibot.ema_teacher)):
        assert type(built) is type(method)
        for name, w in method.named_parameters():  # same init: same shapes and the same weight scales
            if w.ndim == 2 and w.shape[0] > 8 and "pos_embed" not in name:
                ratio = built.get_parameter(name).std() / w.std()
                assert 0.8 < float(ratio) < 1.25, (name, float(ratio))
    q_mae, q_ibot = mae_random.blocks[0].attn.qkv.weight, ibot_random.blocks[0].attn.qkv.weight
    assert q_mae.std() > 2 * q_ibot.std()  # xavier (~0.18 at 32 -> 96) vs trunc-normal 0.02


def test_ibot_with_the_mae_init_records_it_and_its_baseline_follows():
    """``--model.encoder_init mae``: iBOT's student and teacher start from MAE's fixed sin-cos table and xavier
    weights, the record says so, and the random baseline of that network is built the same way."""
    torch.manual_seed(0)
    ibot = IBOT(**TINY, out_dim=16, hidden_dim=16, bottleneck_dim=8, encoder_init="mae")
    assert ibot.encoder_init == "mae" and ibot.encoder_record()["encoder_init"] == "mae"
    table = sincos_2d_pos_embed(32, 4, 4)
    for vit in (ibot.encoder, ibot.ema_teacher):
        assert torch.allclose(vit.pos_embed[0], table) and not vit.pos_embed.requires_grad
    fan_in, fan_out = ibot.encoder.blocks[0].attn.qkv.weight.shape[1], ibot.encoder.blocks[0].attn.qkv.weight.shape[0]
    bound = (6 / (fan_in + fan_out)) ** 0.5  # xavier-uniform: U(-b, b), std b / sqrt(3), not timm's 0.02
    assert float(ibot.encoder.blocks[0].attn.qkv.weight.abs().max()) <= bound
    assert float(ibot.encoder.blocks[0].attn.qkv.weight.std()) == pytest.approx(bound / 3 ** 0.5, rel=0.15)
    baseline = build_random_encoder(ibot.encoder_spec, ibot.encoder_init)
    assert torch.allclose(baseline.pos_embed[0], table)
    with pytest.raises(Exception, match="encoder_init"):
        IBOT(**TINY, out_dim=16, hidden_dim=16, bottleneck_dim=8, encoder_init="xavier")


@pytest.fixture(scope="module")
def ibot_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ibot") / "run"
    args = ["--recipe", "ibot", "--run_dir", str(run), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
            "--data.batch_size", "8", "--data.num_local", "2", "--data.knn_train_size", "64", "--data.knn_test_size", "16",
            "--data.num_workers", "0", "--model.encoder_kwargs", "{depth: 1, embed_dim: 32, num_heads: 2}",
            "--model.out_dim", "32", "--model.hidden_dim", "32", "--model.bottleneck_dim", "16"]
    assert pretrain_main(args) == 0
    return run


def test_random_init_same_builds_the_checkpoints_own_network(ibot_run, tmp_path):
    ckpt = str(ibot_run / "checkpoints" / "last.ckpt")
    trained, _ = load_encoder(EncoderSource(ckpt=ckpt), 32, 1)
    torch.manual_seed(3)
    baseline, spec = load_encoder(EncoderSource(ckpt=ckpt, random_init="same"), 32, 1)
    torch.manual_seed(3)
    expected = build_random_encoder(spec, "timm")
    assert type(baseline) is type(trained) and spec.timm_name == "vit_tiny_patch16_224"
    assert torch.equal(baseline.pos_embed, expected.pos_embed) and baseline.pos_embed.requires_grad
    assert not torch.equal(baseline.blocks[0].attn.qkv.weight, trained.blocks[0].attn.qkv.weight)
    config = json.loads((ibot_run / "encoder" / "config.json").read_text())
    assert (config["method"], config["readout"], config["encoder_init"]) == ("IBOT", "cls", "timm")
    out = tmp_path / "knn"
    assert knn_main(["--encoder", str(ibot_run / "encoder"), "--random_init", "same", "--data.labels_per_class", "10",
                     "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["encoder"].startswith("random init of the network in") and metrics["feature"] == "cls"


def test_random_init_same_needs_a_checkpoint_or_export(capsys):
    assert knn_main(["--random_init", "same"]) == 2
    assert "--random_init same evaluates the untrained network of a --ckpt CHECKPOINT" in capsys.readouterr().err


def test_monitor_logs_both_readouts_and_warns_on_collapse(tmp_path, ssl_caplog):
    from helpers import nested_folder

    from ssl_kit.data import PretrainDataModule
    from ssl_kit.eval.knn import KNNMonitor

    nested_folder(tmp_path / "two", per_class=6)
    dm = PretrainDataModule(root=str(tmp_path / "two"), img_size=16, num_workers=0, knn_train_size=0, knn_test_size=0,
                            val_fraction=0.5)
    dm.setup("fit")

    class Collapsed(torch.nn.Module):
        readout = "cls"
        device = torch.device("cpu")

        def __init__(self):
            super().__init__()
            self.logged = {}

        def readouts(self, x):  # every [CLS] the same direction; the mean token follows the image
            return {"cls": torch.ones(len(x), 4) + 1e-4 * x.flatten(1)[:, :4], "avgpool": x.flatten(1)}

        def log(self, name, value, **kwargs):
            self.logged[name] = value

    module = Collapsed()
    trainer = SimpleNamespace(datamodule=dm, is_global_zero=True, current_epoch=0, max_epochs=1, precision="32-true")
    monitor = KNNMonitor(k=3)
    monitor.setup(trainer, module, "fit")
    monitor.on_train_epoch_end(trainer, module)
    assert set(module.logged) == {"knn_top1", "knn_top1_cls", "knn_top1_avgpool", "feature_cosine", "feature_std"}
    assert module.logged["knn_top1"] == module.logged["knn_top1_cls"]
    assert module.logged["feature_cosine"] > 0.999 and module.logged["feature_std"] < 1e-3
    assert "the cls features have nearly collapsed: mean pairwise cosine" in ssl_caplog.text
