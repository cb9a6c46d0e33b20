"""LoMaR (METHODS.md section 2): windows, masking, relative positions, loss, export, CLI."""
import json
import math

import pytest
import timm
import torch

from ssl_kit.encoders import Windows, export_encoder, random_subset_mask, sample_windows
from ssl_kit.errors import UserError
from ssl_kit.losses.reconstruction import masked_mse_loss
from ssl_kit.methods import LoMaR
from ssl_kit.encoders.rpe import IRPE_MODEL, RPEAttention, piecewise_index, product_bucket_ids


def tiny_lomar(**kw) -> LoMaR:
    args = dict(encoder="tiny", encoder_kwargs=dict(depth=2, embed_dim=64, num_heads=2), img_size=32,
                patch_size=4, in_chans=1)
    return LoMaR(**dict(args, **kw))


def randomise_rpe(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("rpe.table"):
                p.normal_(std=0.5)


def test_piecewise_index_hand_values():
    # alpha 1.9, beta 3.8, gamma 15.2 (ratio 1.9): exact for |x| <= 1.9, then
    # 1.9 + ln(|x|/1.9)/ln(8)*1.9 rounded: 3 -> 2.32 -> 2, 4 -> 2.58 -> 3, 6 -> 3.0 -> 3, capped at int(3.8) = 3
    offsets = torch.tensor([0, 1, -1, 2, 3, -3, 4, 6, 20, -20])
    assert piecewise_index(offsets, 1.9, 3.8, 15.2).tolist() == [0, 1, -1, 2, 2, -2, 3, 3, 3, -3]
    ids = product_bucket_ids(7, 7)
    assert ids.shape == (50, 50)
    assert set(ids[0].tolist()) == {49} and set(ids[:, 0].tolist()) == {49}  # [CLS] has its own bucket
    assert ids[1:, 1:].unique().numel() == 49  # 7 x 7 product buckets
    assert ids[1, 1] == 3 * 7 + 3  # zero offset -> centre bucket
    # token 1 is (0,0), token 2 is (0,1): query minus key = (0,-1) -> r=3, c=2
    assert ids[1, 2] == 3 * 7 + 2


def test_encoder_input_is_b_times_m_windows_of_50_tokens():
    model = tiny_lomar()
    seen = {}
    model.encoder.blocks[0].register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0]))
    torch.manual_seed(0)
    out = model(torch.randn(3, 1, 32, 32))
    assert seen["x"].shape == (3 * 4, 50, 64)
    # masked positions enter the encoder as the learned mask token (replaced, not dropped)
    tokens = seen["x"][:, 1:]
    assert torch.equal(tokens[out.mask], model.mask_token[0, 0].expand(int(out.mask.sum()), -1))
    assert out.pred.shape == (12, 49, 16) and out.target.shape == (12, 49, 16)


def test_exactly_39_of_49_masked_per_window():
    model = tiny_lomar()
    out = model(torch.randn(5, 1, 32, 32))
    assert model.num_masked == 39
    assert out.mask.sum(dim=1).tolist() == [39] * 20
    mask = random_subset_mask(1000, 49, 39)
    assert mask.sum(1).eq(39).all() and mask.float().mean(0).sub(39 / 49).abs().max() < 0.06


def test_each_image_gets_different_windows():
    torch.manual_seed(0)
    w = sample_windows(16, (14, 14), 7, 4)
    for offsets in w.offsets:
        assert len({tuple(o) for o in offsets.tolist()}) == 4  # M distinct windows per image
    assert len({tuple(map(tuple, o.tolist())) for o in w.offsets}) > 1  # not the same set for every image
    # window patch ids are the K x K block at the offset
    top, left = w.offsets[0, 0].tolist()
    expected = [(top + r) * 14 + left + c for r in range(7) for c in range(7)]
    assert w.patch_ids[0, 0].tolist() == expected
    # an 8 x 8 grid has exactly 4 positions for a 7 x 7 window: every image gets all of them
    small = sample_windows(6, (8, 8), 7, 4)
    assert all(sorted(map(tuple, o.tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1)] for o in small.offsets)


def test_loss_ignores_predictions_at_visible_patches():
    model = tiny_lomar()
    out = model(torch.randn(2, 1, 32, 32))
    pred = out.pred.detach().clone().requires_grad_(True)
    loss = masked_mse_loss(pred, out.target, out.mask.float())
    loss.backward()
    assert pred.grad[~out.mask].abs().max() == 0 and pred.grad[out.mask].abs().max() > 0
    perturbed = torch.where(out.mask.unsqueeze(-1), out.pred, out.pred + 100.0)
    assert torch.allclose(masked_mse_loss(perturbed, out.target, out.mask.float()), out.loss)


def test_no_absolute_position_same_content_anywhere_gives_same_output():
    model = tiny_lomar().eval()
    randomise_rpe(model)
    assert model.encoder.pos_embed is None and not any("pos_embed" in k for k in model.state_dict())
    image = torch.randn(1, 1, 32, 32)
    shifted = torch.roll(image, shifts=(4, 4), dims=(2, 3))  # content moves by one patch down and right
    ids = sample_windows(1, (8, 8), 7, 1)
    ids = lambda top, left: Windows(  # noqa: E731
        patch_ids=torch.tensor([[[(top + r) * 8 + left + c for r in range(7) for c in range(7)]]]),
        offsets=torch.tensor([[[top, left]]]), size=7)
    a = model.window_patches(image, ids(0, 0))
    b = model.window_patches(shifted, ids(1, 1))
    assert torch.equal(a, b)
    mask = random_subset_mask(1, 49, 39)
    with torch.no_grad():
        enc = lambda p: model.forward_encoder(torch.where(mask[..., None], model.mask_token, model.embed_patches(p)))  # noqa: E731
        assert torch.allclose(enc(a), enc(b))


def test_patch_embedding_of_window_patches_equals_the_conv():
    model = tiny_lomar()
    images = torch.randn(2, 1, 32, 32)
    w = sample_windows(2, (8, 8), 7, 4)
    ours = model.embed_patches(model.window_patches(images, w))  # [8, 49, 64]
    full = model.encoder.patch_embed(images)  # [2, 64, 64] via the conv
    ref = torch.gather(full, 1, w.patch_ids.reshape(2, -1, 1).expand(-1, -1, 64)).reshape(8, 49, 64)
    assert torch.allclose(ours, ref, atol=1e-5)


def reference_rpe_attention(attn: RPEAttention, x: torch.Tensor, grid: int) -> torch.Tensor:
    """Independent computation: explicit softmax with the bias built offset by offset."""
    b, n, c = x.shape
    h, d = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    table = attn.rpe.table  # [d, 50]

    def axis_bucket(delta: int) -> int:
        if abs(delta) <= 1.9:
            return delta
        far = 1.9 + math.log(abs(delta) / 1.9) / math.log(8.0) * 1.9
        return int(math.copysign(min(round(far), 3.8), delta))

    bias = torch.zeros(b, h, n, n)
    for i in range(n):
        for j in range(n):
            if i == 0 or j == 0:
                bucket = 49
            else:
                (ri, ci), (rj, cj) = divmod(i - 1, grid), divmod(j - 1, grid)
                bucket = (axis_bucket(ri - rj) + 3) * 7 + axis_bucket(ci - cj) + 3
            bias[:, :, i, j] = q[:, :, i, :] @ table[:, bucket]
    logits = q @ k.transpose(-2, -1) / math.sqrt(d) + bias
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
    return attn.proj(out)


@pytest.mark.parametrize("fused", [True, False])
def test_rpe_attention_equals_explicit_softmax_reference(fused):
    torch.manual_seed(0)
    model = tiny_lomar()
    randomise_rpe(model)
    attn = model.encoder.blocks[0].attn
    attn.fused_attn = fused
    model.encoder.set_token_grid(5, 5)
    x = torch.randn(3, 26, 64)
    with torch.no_grad():
        assert torch.allclose(attn(x), reference_rpe_attention(attn, x, 5), atol=1e-5)


def test_permuting_window_tokens_changes_attention_only_through_rpe():
    torch.manual_seed(0)
    model = tiny_lomar()
    attn = model.encoder.blocks[0].attn
    model.encoder.set_token_grid(7, 7)
    x = torch.randn(2, 50, 64)
    perm = torch.cat([torch.tensor([0]), 1 + torch.randperm(49)])
    with torch.no_grad():
        # zero table (the initialisation): attention is permutation-equivariant, positions play no role
        assert torch.allclose(attn(x)[:, perm], attn(x[:, perm]), atol=1e-5)
        randomise_rpe(model)
        assert (attn(x)[:, perm] - attn(x[:, perm])).abs().max() > 1e-2


def test_window_larger_than_grid_is_one_clear_error():
    """A 7x7 window on a 4x4 patch grid used to shrink silently to 4x4 with a warning: a different method from the
    one the recipe names. It is now one error naming the largest window that fits."""
    with pytest.raises(UserError, match=r"--model.window_size 7 does not fit the 4x4 patch grid .*window_size 4 or less"):
        tiny_lomar(img_size=16)
    model = tiny_lomar(img_size=16, window_size=4)
    assert model.window_size == 4 and model.num_masked == int(16 * 0.8)
    assert model(torch.randn(2, 1, 16, 16)).mask.shape == (8, 16)


def test_export_loads_in_timm_and_runs_at_any_resolution(tmp_path):
    model = tiny_lomar().eval()
    randomise_rpe(model)
    export_encoder(model.encoder, model.encoder_spec, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["timm_name"] == IRPE_MODEL
    enc = timm.create_model(cfg["timm_name"], pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")), **cfg["kwargs"]).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(enc(x), model.readouts(x)["cls"], atol=1e-5)  # timm's [CLS] head input
        tokens = enc.forward_features(x)
        assert torch.allclose(tokens[:, 1:].mean(dim=1), model.embed(x), atol=1e-5)  # LoMaR's readout: avgpool
        # a larger evaluation grid needs no interpolation: the same weights load strictly at 48 px
        big = timm.create_model(cfg["timm_name"], **dict(cfg["kwargs"], img_size=48)).eval()
        big.load_state_dict(enc.state_dict(), strict=True)
        assert torch.isfinite(big(torch.randn(2, 1, 48, 48))).all()


def test_mae_style_param_groups_and_lr():
    model = tiny_lomar()
    from ssl_kit.optim import adamw_param_groups

    groups = {g["name"]: g for g in adamw_param_groups({"lomar": model}, 0.05)}
    no_decay = {id(p) for p in groups["lomar_no_decay"]["params"]}
    assert id(model.encoder.blocks[0].norm1.weight) in no_decay and id(model.pred.bias) in no_decay
    decay = {id(p) for p in groups["lomar_decay"]["params"]}
    assert id(model.encoder.blocks[0].attn.rpe.table) in decay and id(model.mask_token) in decay
