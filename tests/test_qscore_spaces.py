"""Issue #21: benchmarks/qscore_spaces.py scores the last block's MLP activations; they must be exactly what the
block computes after its GELU, at [CLS] and averaged over the patch tokens."""
import pytest
import timm
import torch

from helpers import import_benchmark


@pytest.fixture
def qscore_spaces(monkeypatch):
    return import_benchmark(monkeypatch, "qscore_spaces")


def test_mlp_hidden_features_are_the_last_blocks_gelu_outputs(qscore_spaces):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, in_chans=1, depth=2, num_classes=0)
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    feats = qscore_spaces.mlp_hidden_of(model, images, None)

    from ssl_kit.data.augment import EvalTransform
    from ssl_kit.data.fashion_mnist import MEAN, STD

    with torch.no_grad():
        x = model.patch_embed(EvalTransform(32, MEAN, STD)(images))
        x = model.norm_pre(model.patch_drop(model._pos_embed(x)))
        x = model.blocks[0](x)
        last = model.blocks[1]
        y = x + last.ls1(last.attn(last.norm1(x)))
        hidden = torch.nn.functional.gelu(last.mlp.fc1(last.norm2(y)))  # [5, 1 + 16, 768]
    assert feats["mlp_cls"].shape == (5, 768)
    torch.testing.assert_close(feats["mlp_cls"], hidden[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats["mlp_avgpool"], hidden[:, 1:].mean(dim=1), rtol=1e-4, atol=1e-5)
    assert not model.blocks[-1].mlp.act._forward_hooks  # the hook is removed again


def test_unit_spaces_ignore_a_rescaling_of_a_sample(qscore_spaces):
    h = torch.randn(6, 10)
    scaled = h * torch.tensor([0.5, 1, 2, 3, 4, 10.0]).unsqueeze(1)
    a, b = qscore_spaces.spaces(h, h), qscore_spaces.spaces(scaled, h)
    for space in ("unit_abs", "unit_relu"):
        torch.testing.assert_close(a[space], b[space])
    assert not torch.allclose(a["abs"], b["abs"])
