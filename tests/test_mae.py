"""METHODS.md section 1 checks for MAE."""
import pytest
import torch

from ssl_kit.encoders import gather_tokens, patchify
from ssl_kit.errors import NonFiniteLossError
from ssl_kit.losses.reconstruction import masked_mse_loss, normalize_patches
from ssl_kit.methods import MAE


@pytest.fixture(scope="module")
def mae224():
    return MAE(img_size=224, patch_size=16, in_chans=3, encoder_kwargs=dict(depth=1), decoder_dim=64, decoder_depth=1, decoder_heads=2)


def test_shapes_224_patch16(mae224):
    seen = {}
    mae224.encoder.blocks.register_forward_pre_hook(lambda m, a: seen.__setitem__("enc", a[0].shape))
    mae224.decoder.blocks.register_forward_pre_hook(lambda m, a: seen.__setitem__("dec", a[0].shape))
    loss, pred, mask = mae224(torch.randn(2, 3, 224, 224))
    assert seen["enc"] == (2, 50, 192)  # 49 visible + [CLS]: dropped, not replaced
    assert seen["dec"] == (2, 197, 64)
    assert pred.shape == (2, 196, 16 * 16 * 3)
    assert torch.equal(mask.sum(1), torch.tensor([147.0, 147.0]))
    assert loss.ndim == 0


def test_encoder_adds_pos_embed_before_dropping_and_cls_after(mae224):
    enc = mae224.encoder
    images = torch.randn(2, 3, 224, 224)
    torch.manual_seed(7)
    latent, masking = mae224.forward_encoder(images, 0.75)
    # reference: position on all patches, then keep, then [CLS] + its (zero) slot
    x = enc.patch_embed(images) + enc.pos_embed[:, 1:]
    x = gather_tokens(x, masking.ids_keep)
    cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(2, -1, -1)
    ref = enc.norm(enc.blocks(torch.cat([cls, x], dim=1)))
    assert torch.allclose(latent, ref, atol=1e-6)


def test_encoder_ignores_masked_pixels(mae224):
    images = torch.randn(1, 3, 224, 224)
    torch.manual_seed(3)
    latent_a, masking = mae224.forward_encoder(images, 0.75)
    patches = patchify(images, 16)
    noisy = patches + 10 * masking.mask.unsqueeze(-1) * torch.randn_like(patches)
    from ssl_kit.encoders import unpatchify
    torch.manual_seed(3)
    latent_b, _ = mae224.forward_encoder(unpatchify(noisy, 16, 3), 0.75)
    assert torch.allclose(latent_a, latent_b, atol=1e-6)


def test_zero_gradient_at_visible_predictions(mae224):
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["pred"] = output

    handle = mae224.decoder.pred.register_forward_hook(keep)
    loss, _, mask = mae224(torch.randn(2, 3, 224, 224))
    loss.backward()
    handle.remove()
    grad = captured["pred"].grad[:, 1:] if captured["pred"].shape[1] == 197 else captured["pred"].grad
    visible = mask == 0
    assert torch.count_nonzero(grad[visible]) == 0
    assert torch.count_nonzero(grad[~visible]) > 0
    mae224.zero_grad()


def test_norm_pix_targets_have_zero_patch_mean_unbiased_var():
    patches = torch.rand(3, 10, 48) * 5 + 2
    norm = normalize_patches(patches)
    assert torch.allclose(norm.mean(-1), torch.zeros(3, 10), atol=1e-5)
    assert torch.allclose(norm.var(-1), torch.ones(3, 10), atol=1e-3)  # unbiased, as the reference


def test_masked_mse_hand_computed():
    pred = torch.zeros(1, 2, 2)
    target = torch.tensor([[[1.0, 3.0], [2.0, 2.0]]])
    mask = torch.tensor([[1.0, 0.0]])
    # raw pixels: patch 0 error mean((1, 9)) = 5, patch 1 visible -> ignored -> 5
    assert masked_mse_loss(pred, target, mask, norm_pix=False).item() == pytest.approx(5.0)
    # norm-pix: patch 0 -> mean 2, unbiased var 2 -> (-1/sqrt(2+1e-6), 1/sqrt(2+1e-6)); error mean = 1/(2+1e-6)
    assert masked_mse_loss(pred, target, mask, norm_pix=True).item() == pytest.approx(1 / (2 + 1e-6), rel=1e-6)
    # averaged over masked patches only: two masked patches average their errors
    mask2 = torch.tensor([[1.0, 1.0]])
    assert masked_mse_loss(pred, target, mask2, norm_pix=False).item() == pytest.approx((5.0 + 4.0) / 2)


def test_nonfinite_loss_stops_with_clear_message():
    model = MAE(img_size=16, patch_size=4, in_chans=1, encoder_kwargs=dict(depth=1, embed_dim=32, num_heads=2), decoder_dim=16, decoder_depth=1, decoder_heads=2)
    images = torch.randn(2, 1, 16, 16)
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="loss became nan"):
        model.training_step((images, torch.zeros(2)), 0)


def test_reconstruction_panels_shapes():
    model = MAE(img_size=16, patch_size=4, in_chans=1, encoder_kwargs=dict(depth=1, embed_dim=32, num_heads=2), decoder_dim=16, decoder_depth=1, decoder_heads=2)
    images = torch.randn(3, 1, 16, 16)
    panels = model.reconstruction_panels(images)
    assert list(panels) == ["original", "masked", "reconstruction"]
    assert all(p.shape == (3, 1, 16, 16) for p in panels.values())
