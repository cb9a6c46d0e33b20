"""Q-score (METHODS.md section 8): score values, regulariser gradients, attachment to any method, commands."""
import csv
import json

import pytest
import torch

from ssl_kit.encoders.features import readout_features
from ssl_kit.losses.qscore import qscore, qscore_regularizer, sparsity, standardize_rectify
from ssl_kit.methods import LoMaR, MAE
from ssl_kit.qscore import QScoreRegularizer


def test_hand_values_population_and_unbiased_sigma():
    h = torch.tensor([[4.0, 0.0, 0.0, 0.0]])
    # mu 1, population sigma sqrt(3): Z = 3 / 1.732 = 1.732, / L1 4 = 0.433; unbiased sigma 2: 1.5 / 4 = 0.375
    assert qscore(h).item() == pytest.approx(0.4330, abs=1e-4)
    assert qscore(h, unbiased=True).item() == pytest.approx(0.375, abs=1e-4)


def test_constant_and_zero_vectors_are_finite():
    q = qscore(torch.tensor([[2.0, 2.0, 2.0], [0.0, 0.0, 0.0]]))
    assert torch.isfinite(q).all() and q.abs().max() == 0
    grad_input = torch.full((2, 3), 1.5, requires_grad=True)
    qscore_regularizer(grad_input).backward()
    assert torch.isfinite(grad_input.grad).all()


def test_regularizer_value_by_hand():
    h = torch.tensor([[4.0, 0.0, 0.0, 0.0], [1.0, 1.0, 2.0, 0.0]])
    q = qscore(h)  # second sample: mu 1, sigma sqrt(0.5), Z 1.414, L1 4 -> 0.354 (< mean 0.393)
    cols = h.abs().sum(0)  # [5, 1, 2, 0], mean 2 -> only column 0 is above
    expected = -1e-4 * q[1] + 1e-4 * 5.0
    assert qscore_regularizer(h).item() == pytest.approx(expected.item(), rel=1e-6)
    assert cols.tolist() == [5.0, 1.0, 2.0, 0.0]


def test_sample_term_gradient_is_zero_for_samples_at_or_above_mean_q():
    torch.manual_seed(0)
    h = torch.randn(16, 32).requires_grad_(True)
    qscore_regularizer(h, lambda1=1.0, lambda2=0.0).backward()
    q = qscore(h.detach())
    high = q >= q.mean()
    assert h.grad[high].abs().max() == 0 and h.grad[~high].abs().max() > 0


def test_column_term_gradient_is_zero_for_columns_at_or_below_mean_l1():
    torch.manual_seed(1)
    h = torch.randn(16, 32).requires_grad_(True)
    qscore_regularizer(h, lambda1=0.0, lambda2=1.0).backward()
    cols = h.detach().abs().sum(0)
    quiet = cols <= cols.mean()
    assert h.grad[:, quiet].abs().max() == 0 and h.grad[:, ~quiet].abs().max() > 0


def test_sparsity_counts_small_entries():
    assert sparsity(torch.tensor([[0.0, 0.01, 0.2, -0.03]]), eta=0.05).item() == pytest.approx(0.75)


class FakeTrainer:
    accumulate_grad_batches = 2
    precision_plugin = object()


MAKERS = [
    lambda: MAE(encoder="tiny", encoder_kwargs=dict(depth=2, embed_dim=64, num_heads=2), img_size=32, patch_size=4,
                in_chans=1, decoder_dim=32, decoder_depth=1, decoder_heads=2),
    lambda: LoMaR(encoder="tiny", encoder_kwargs=dict(depth=2, embed_dim=64, num_heads=2), img_size=32, patch_size=4,
                  in_chans=1, num_windows=2),
]


def loss_seen_by_backward(model, reg, images, monkeypatch, before_forward=lambda: None):
    """Attach ``reg``, run one forward of ``images`` and ``model.backward``; the method's loss and what backward got."""
    reg.setup(None, model, "fit")
    before_forward()
    reg.on_train_batch_start(None, model, (images, None), 0)
    out = model(images)
    loss = out[0] if isinstance(out, tuple) else out.loss
    seen = []
    model._trainer = FakeTrainer()
    monkeypatch.setattr("pytorch_lightning.LightningModule.backward", lambda self, l, *a, **k: seen.append(l))
    model.backward(loss)
    return loss, seen


@pytest.mark.parametrize("make", MAKERS, ids=["mae", "lomar"])
def test_enabling_it_adds_exactly_the_regulariser_to_any_method(make, monkeypatch):
    """``features='training'``, raw space, sums: the paper's regulariser on the [CLS] of the method's own passes."""
    torch.manual_seed(0)
    model = make().train()
    reg = QScoreRegularizer(lambda1=1e-2, lambda2=1e-2)  # defaults: the paper's, on the training passes' raw [CLS]
    captured = {}
    hook = lambda: model.encoder.norm.register_forward_hook(lambda m, a, out: captured.update(cls=out[:, 0]) and None)  # noqa: E731
    loss, seen = loss_seen_by_backward(model, reg, torch.randn(4, 1, 32, 32), monkeypatch, hook)
    expected = loss + qscore_regularizer(captured["cls"], 1e-2, 1e-2) / 2  # divided by gradient accumulation
    assert seen[0].item() == pytest.approx(expected.item(), rel=1e-6)
    assert seen[0].item() != pytest.approx(loss.item(), rel=1e-9)
    n_seq = 4 if isinstance(model, MAE) else 8  # LoMaR: every window sequence's [CLS]
    assert captured["cls"].shape == (n_seq, 64)
    reg.teardown(None, model, "fit")
    model.backward(loss)
    assert seen[1] is loss and model.extra_loss() is None  # detached: the method's loss is untouched


@pytest.mark.parametrize("make", MAKERS, ids=["mae", "lomar"])
def test_full_image_regulariser_scores_the_readout_in_the_standardized_space(make, monkeypatch):
    torch.manual_seed(0)
    model = make().train()
    reg = QScoreRegularizer(lambda1=0.2, lambda2=0.02, features="full", space="standardized", reduction="mean")
    images = torch.randn(6, 1, 32, 32)
    loss, seen = loss_seen_by_backward(model, reg, images, monkeypatch)
    h = readout_features(model.encoder, images)[model.readout]  # [CLS] for MAE, mean patch token for LoMaR
    expected = loss + qscore_regularizer(standardize_rectify(h), 0.2, 0.02, reduction="mean") / 2
    assert seen[0].item() == pytest.approx(expected.item(), rel=1e-5)
    assert float(reg._last["qscore_reg"]) != 0


def test_standardized_space_by_hand_and_mean_reduction_by_hand():
    # per column: [1, 3] -> mean 2, population std 1 -> [-1, 1] -> [0, 1]; [10, 30] the same
    out = standardize_rectify(torch.tensor([[1.0, 10.0], [3.0, 30.0]]))
    assert torch.allclose(out, torch.tensor([[0.0, 0.0], [1.0, 1.0]]), atol=1e-5)  # 1 / (1 + eps)
    h = torch.tensor([[4.0, 0.0, 0.0, 0.0], [1.0, 1.0, 2.0, 0.0]])
    q = qscore(h)  # sample 1 is the only one below the mean Q; column means [2.5, 0.5, 1, 0], mean 1 -> column 0
    expected = -0.3 * q[1] + 0.7 * 2.5
    assert qscore_regularizer(h, 0.3, 0.7, reduction="mean").item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_layernorm_gain_cannot_lower_the_standardized_regulariser():
    """Issue #21: on raw LayerNorm outputs, shrinking the gain is the cheapest way down (the column L1 term); on
    batch-standardised features the regulariser does not depend on the gain or bias at all."""
    torch.manual_seed(0)
    x = torch.randn(64, 32) @ torch.randn(32, 32)
    norm = torch.nn.LayerNorm(32)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.normal_()
    raw = qscore_regularizer(norm(x), 1e-4, 1e-4)
    raw.backward()
    assert float((norm.weight.grad * norm.weight).sum()) > 0  # raw: a smaller gain lowers R
    norm.zero_grad()
    standardized = qscore_regularizer(standardize_rectify(norm(x)), 0.2, 0.02, reduction="mean")
    standardized.backward()
    assert norm.weight.grad.abs().max() < 1e-5 and norm.bias.grad.abs().max() < 1e-5
    with torch.no_grad():
        scale = torch.rand(32) * 3 + 0.1
        shifted = standardize_rectify(norm(x) * scale + 5.0)
    assert torch.allclose(shifted, standardize_rectify(norm(x)).detach(), atol=1e-4)


@pytest.mark.slow
def test_pretrain_with_qscore_then_score_a_data_set(tmp_path, capsys):
    from helpers import TINY_ARGS
    from ssl_kit.cli import pretrain_main
    from ssl_kit.eval.qscore_cli import qscore_main

    base = tmp_path / "base"
    assert pretrain_main([*TINY_ARGS, "--run_dir", str(base), "--trainer.max_epochs", "1"]) == 0
    run = tmp_path / "reg"
    assert pretrain_main([*TINY_ARGS, "--run_dir", str(run), "--trainer.max_epochs", "1", "--qscore", "true",
                          "--init_weights", str(base / "checkpoints" / "last.ckpt")]) == 0
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert any(r.get("qscore_reg_step") for r in rows) and any(r.get("qscore_mean") for r in rows)
    assert any(r.get("sparsity") for r in rows)
    assert (run / "pictures" / "qscore_epoch_000.png").is_file()
    assert pretrain_main([*TINY_ARGS, "--run_dir", str(tmp_path / "bad"), "--init_weights", str(tmp_path / "nope.ckpt")]) == 2
    assert "--init_weights" in capsys.readouterr().err

    out = tmp_path / "scores"
    assert qscore_main(["--ckpt", str(run / "checkpoints" / "last.ckpt"), "--data.labels_per_class", "10",
                        "--trainer.max_epochs", "5", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_scored"] == 10000 and 0.0 <= metrics["auroc"] <= 1.0 and 0.1 < metrics["probe_top1"] <= 1.0
    assert 0 < metrics["auprc_wrong"] <= 1 and metrics["wrong_rate"] == pytest.approx(1 - metrics["probe_top1"])
    table = list(csv.DictReader(open(out / "qscores.csv")))
    assert len(table) == 10000 and sorted(int(r["rank"]) for r in table) == list(range(1, 10001))
    lowest = min(table, key=lambda r: float(r["qscore"]))
    assert lowest["rank"] == "1"
    assert (out / "lowest_q.png").is_file() and (out / "qscore_hist.png").is_file()
    assert "AUROC" in capsys.readouterr().out


def test_qscore_regularised_run_resumed_mid_epoch_ends_with_the_same_weights(tmp_path):
    """Issue #26 for the Q-score regulariser: SIGTERM after step 4 of 2 x 3, resumed, equals the uninterrupted run."""
    from helpers import TINY_ARGS, assert_same_final_state
    from ssl_kit.cli import pretrain_main

    full, cut = tmp_path / "full", tmp_path / "cut"
    args = [*TINY_ARGS, "--qscore", "true", "--knn_every_n_epochs", "0", "--trainer.max_epochs", "2",
            "--trainer.precision", "32-true"]
    assert pretrain_main([*args, "--run_dir", str(full)]) == 0
    assert pretrain_main([*args, "--run_dir", str(cut), "--trainer.callbacks+=helpers.SignalAtStep",
                          "--trainer.callbacks.step", "4"]) == 143
    assert pretrain_main([*args, "--run_dir", str(cut), "--ckpt_path", "last"]) == 0
    assert_same_final_state(full / "checkpoints" / "last.ckpt", cut / "checkpoints" / "last.ckpt", steps=6)
