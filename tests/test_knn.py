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
