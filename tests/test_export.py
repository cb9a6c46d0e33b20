import json

import timm
import torch

from ssl_kit.encoders import export_encoder, load_exported_encoder
from ssl_kit.methods import MAE


def test_export_loads_in_plain_timm_with_same_features(tmp_path):
    model = MAE(img_size=32, patch_size=4, in_chans=1, encoder_kwargs=dict(depth=2, embed_dim=64, num_heads=2), decoder_dim=32, decoder_depth=1, decoder_heads=2)
    with torch.no_grad():  # make the weights differ from any fresh init
        for p in model.encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = export_encoder(model.encoder, model.encoder_spec, tmp_path / "enc", {"method": "MAE"})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["timm_name"] == "vit_tiny_patch16_224" and cfg["kwargs"]["patch_size"] == 4
    # exactly the documented plain-timm call
    loaded = timm.create_model(cfg["timm_name"], pretrained=True, pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")), **cfg["kwargs"])
    model.eval()
    loaded.eval()
    x = torch.randn(3, 1, 32, 32)
    trained = model.encoder.state_dict()
    assert all(torch.equal(value, trained[name]) for name, value in loaded.state_dict().items())
    # ssl_kit runs short sequences with timm's unfused attention, plain timm with fused SDPA: the same maths,
    # rounded differently (up to ~2e-6 measured on an AMX CPU), so the features agree to float tolerance
    with torch.no_grad():
        assert torch.allclose(loaded.forward_features(x), model.encoder.forward_features(x), atol=1e-5)
        assert torch.allclose(loaded(x), model.embed(x), atol=1e-5)
    # the fixed sin-cos table travels with the weights
    assert torch.equal(loaded.pos_embed, model.encoder.pos_embed)
    # helper, and loading at another resolution resamples the position embedding
    bigger = load_exported_encoder(out, img_size=48)
    assert bigger.pos_embed.shape == (1, 1 + 12 * 12, 64)
