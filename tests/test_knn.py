import math

import torch

from ssl_kit.eval.knn import weighted_knn


def test_weighted_vote_known_answer_depends_on_temperature():
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[2.0, 0.0]])  # normalised to [1, 0]: cosines 1, 0.6, 0.6, -1
    # T = 0.07: exp(1/0.07) = 1.6e6 beats 2 * exp(0.6/0.07) = 1.05e4 -> class 0 (majority would say 1)
    assert weighted_knn(train, labels, query, 3, k=3, temperature=0.07)[3].item() == 0
    # T = 1: exp(1) = 2.72 < 2 * exp(0.6) = 3.64 -> class 1
    assert math.exp(1) < 2 * math.exp(0.6)
    assert weighted_knn(train, labels, query, 3, k=3, temperature=1.0)[3].item() == 1
    # k = 1 -> nearest neighbour
    assert weighted_knn(train, labels, query, 3, k=1)[1].item() == 0


def test_several_k_and_chunking_agree():
    torch.manual_seed(0)
    centers = torch.randn(5, 16) * 4
    train_y = torch.arange(500) % 5
    train = centers[train_y] + torch.randn(500, 16)
    test_y = torch.arange(100) % 5
    test = centers[test_y] + torch.randn(100, 16)
    out = weighted_knn(train, train_y, test, 5, k=[1, 20], chunk=7)
    ref = weighted_knn(train, train_y, test, 5, k=20, chunk=1000)[20]
    assert torch.equal(out[20], ref)
    assert (out[20] == test_y).float().mean() > 0.95
    assert set(out) == {1, 20}


def test_knn_monitor_says_once_when_it_cannot_score_and_logs_nothing(tmp_path, ssl_caplog):
    """Issue #26: one class (every vote right: top-1 always 1) or no labeled held-out split: one line, no knn_top1."""
    from types import SimpleNamespace

    from helpers import nested_folder, save

    from ssl_kit.data import PretrainDataModule
    from ssl_kit.eval.knn import KNNMonitor, knn_unscorable

    for i in range(6):
        save(tmp_path / "one" / "cat" / f"{i}.png", seed=i)
        save(tmp_path / "flat" / f"{i}.png", seed=i)
    nested_folder(tmp_path / "two", per_class=5)
    modules = {name: PretrainDataModule(root=str(tmp_path / name), img_size=16, num_workers=0)
               for name in ("one", "flat", "two")}
    assert "one class (cat)" in knn_unscorable(modules["one"])
    assert "no labeled held-out images" in knn_unscorable(modules["flat"])
    assert knn_unscorable(modules["two"]) is None

    class NoLogging:
        def log(self, *args, **kwargs):
            raise AssertionError(f"logged {args}")

    monitor = KNNMonitor()
    trainer = SimpleNamespace(datamodule=modules["one"], is_global_zero=True, current_epoch=0, max_epochs=1)
    monitor.setup(trainer, NoLogging(), "fit")
    monitor.on_train_epoch_end(trainer, NoLogging())
    monitor.on_train_epoch_end(trainer, NoLogging())
    records = {id(r): r for r in ssl_caplog.records}.values()  # a record may reach caplog by two routes
    lines = [r.getMessage() for r in records if r.getMessage().startswith("k-NN monitor")]
    assert lines == ["k-NN monitor: cannot score: the data have one class (cat), so every k-NN vote is right and "
                     "top-1 says nothing; knn_top1 is not logged."]
