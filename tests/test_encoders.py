import math

import pytest
import torch

from ssl_kit.encoders import (
    EncoderConfigError,
    build_encoder,
    gather_tokens,
    patchify,
    random_masking,
    resolve_encoder_spec,
    sincos_2d_pos_embed,
    unpatchify,
)


def test_patchify_unpatchify_roundtrip_and_layout():
    images = torch.randn(2, 3, 8, 12)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 4 * 4 * 3)
    # patch 1 is row 0, column 1; its first pixel is (c=0..2) at (y=0, x=4): pixel order (p, q, C)
    assert torch.equal(patches[0, 1, :3], images[0, :, 0, 4])
    assert torch.equal(unpatchify(patches, 4, 3, grid=(2, 3)), images)


def test_random_masking_224_16_keeps_49_masks_147():
    m = random_masking(4, 196, 0.75)
    assert m.ids_keep.shape == (4, 49)
    assert torch.equal(m.mask.sum(1), torch.full((4,), 147.0))
    # ids_restore inverts the shuffle: kept ids are exactly the unmasked positions
    for b in range(4):
        visible = set(torch.nonzero(m.mask[b] == 0).flatten().tolist())
        assert visible == set(m.ids_keep[b].tolist())
    # masks differ per sample
    assert not torch.equal(m.mask[0], m.mask[1])


def test_random_masking_ratio_validation():
    with pytest.raises(ValueError):
        random_masking(1, 16, 1.0)


def test_gather_tokens():
    tokens = torch.arange(2 * 5 * 3).float().view(2, 5, 3)
    ids = torch.tensor([[4, 0], [1, 1]])
    out = gather_tokens(tokens, ids)
    assert torch.equal(out[0, 0], tokens[0, 4]) and torch.equal(out[1, 1], tokens[1, 1])


def test_sincos_table_matches_mae_formula():
    dim, gh, gw = 8, 2, 3
    table = sincos_2d_pos_embed(dim, gh, gw, num_prefix_tokens=1)
    assert table.shape == (1 + 6, 8)
    assert torch.all(table[0] == 0)  # [CLS] slot
    # patch at row 1, column 2 (index 1 + 1*3 + 2): first half encodes the column (MAE's grid[0])
    row = table[1 + 5]
    omega = [1.0, 1.0 / 100.0]  # 1 / 10000 ** (arange(2) / 2)
    expected = [math.sin(2 * omega[0]), math.sin(2 * omega[1]), math.cos(2 * omega[0]), math.cos(2 * omega[1]),
                math.sin(1 * omega[0]), math.sin(1 * omega[1]), math.cos(1 * omega[0]), math.cos(1 * omega[1])]
    assert torch.allclose(row, torch.tensor(expected), atol=1e-6)


def test_build_encoder_any_size_and_fixed_pos_embed():
    spec = resolve_encoder_spec("tiny", img_size=32, patch_size=4, in_chans=1, depth=2)
    enc = build_encoder(spec)
    assert enc.patch_embed.grid_size == (8, 8)
    assert enc.pos_embed.shape == (1, 65, 192) and not enc.pos_embed.requires_grad
    assert enc(torch.randn(2, 1, 32, 32)).shape == (2, 192)
    assert len(enc.blocks) == 2


def test_build_encoder_by_timm_name():
    spec = resolve_encoder_spec("vit_small_patch16_224", img_size=48, patch_size=16, depth=1)
    enc = build_encoder(spec, sincos_pos_embed=False)
    assert enc.embed_dim == 384 and enc.pos_embed.requires_grad


def test_unknown_timm_name_is_clear():
    with pytest.raises(EncoderConfigError, match="Unknown encoder 'vit_doesnotexist'"):
        resolve_encoder_spec("vit_doesnotexist", img_size=32, patch_size=4)


def test_non_vit_timm_name_is_clear():
    with pytest.raises(EncoderConfigError, match="not a VisionTransformer"):
        build_encoder(resolve_encoder_spec("resnet18", img_size=32, patch_size=4))


def test_img_size_not_divisible_by_patch_is_clear():
    with pytest.raises(EncoderConfigError, match="not divisible by patch_size 16"):
        resolve_encoder_spec("tiny", img_size=100, patch_size=16)
