from types import SimpleNamespace

import pytest

from ssl_kit.methods import MAE
from ssl_kit.optim import adamw_param_groups, cosine_schedule, effective_batch_size, scaled_lr, warmup_cosine


def test_warmup_cosine_values():
    # 10 warmup steps of 110: mid-warmup is half the peak, end of warmup the peak, end 0
    assert warmup_cosine(0, 10, 110) == 0.0
    assert warmup_cosine(5, 10, 110) == pytest.approx(0.5)
    assert warmup_cosine(10, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110) == pytest.approx(0.5)  # half-way through the cosine
    assert warmup_cosine(110, 10, 110) == pytest.approx(0.0)
    assert warmup_cosine(110, 10, 110, min_ratio=0.1) == pytest.approx(0.1)


def test_cosine_schedule_endpoints():
    assert cosine_schedule(0, 100, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine_schedule(50, 100, 0.04, 0.4) == pytest.approx(0.22)
    assert cosine_schedule(100, 100, 0.04, 0.4) == pytest.approx(0.4)


def test_effective_batch_counts_devices_nodes_accumulation():
    trainer = SimpleNamespace(world_size=8 * 2, accumulate_grad_batches=4)  # 8 devices x 2 nodes
    assert effective_batch_size(trainer, 32) == 2048
    assert scaled_lr(1.5e-4, 2048) == pytest.approx(1.2e-3)


def test_no_weight_decay_on_biases_norms_tokens():
    model = MAE(img_size=16, patch_size=4, in_chans=1, encoder_kwargs=dict(depth=1, embed_dim=32, num_heads=2), decoder_dim=16, decoder_depth=1, decoder_heads=2)
    groups = adamw_param_groups({"encoder": model.encoder, "decoder": model.decoder}, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    free = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert all(g["weight_decay"] in (0.0, 0.05) for g in groups)
    # as the MAE reference (timm param_groups_weight_decay without a no-decay list): [CLS] and
    # mask tokens are 3-D and decayed; every 1-D parameter and bias is not
    assert "encoder.cls_token" in decayed and "decoder.mask_token" in decayed
    assert "encoder.blocks.0.attn.qkv.bias" in free and "encoder.blocks.0.norm1.weight" in free
    assert "encoder.blocks.0.attn.qkv.weight" in decayed and "decoder.pred.weight" in decayed
    assert "encoder.patch_embed.proj.weight" in decayed
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed)
    assert all(model.get_parameter(n).ndim == 1 for n in free)
    # the frozen sin-cos position embedding is not optimised at all
    assert "encoder.pos_embed" not in decayed | free
    assert decayed | free == {n for n, p in model.named_parameters() if p.requires_grad}


def test_exempt_listed_follows_timm_no_weight_decay():
    model = MAE(img_size=16, patch_size=4, in_chans=1, encoder_kwargs=dict(depth=1, embed_dim=32, num_heads=2), decoder_dim=16, decoder_depth=1, decoder_heads=2)
    groups = adamw_param_groups({"encoder": model.encoder}, 0.05, exempt_listed=True)
    free = [p for g in groups if g["weight_decay"] == 0 for p in g["params"]]
    assert any(p is model.encoder.cls_token for p in free)


def test_mae_optimizer_lr_at_mid_warmup_uses_effective_batch():
    """2 nodes x 2 devices x accumulation 2 x batch 16 = 128 -> lr 1.5e-4 * 128 / 256; half of it mid-warmup."""
    from types import SimpleNamespace

    model = MAE(img_size=16, patch_size=4, in_chans=1, encoder_kwargs=dict(depth=1, embed_dim=32, num_heads=2),
                decoder_dim=16, decoder_depth=1, decoder_heads=2, warmup_epochs=1)
    model._trainer = SimpleNamespace(estimated_stepping_batches=100, num_training_batches=20, accumulate_grad_batches=2,
                                     world_size=4, max_epochs=10, is_global_zero=True, datamodule=SimpleNamespace(batch_size=16))
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    for _ in range(5):  # warmup = 1 epoch = 20 batches / 2 accumulation = 10 optimizer steps
        optimizer.step()
        scheduler.step()
    assert all(g["lr"] == pytest.approx(1.5e-4 * 128 / 256 * 0.5) for g in optimizer.param_groups)
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.05}


def test_short_epoch_note_names_the_steps_when_the_data_run_out():
    """A recipe sized as 5 epochs x 180 batches of 60k images trains 35 steps on 2000 scenes: say so."""
    from ssl_kit.optim import short_epoch_note

    trainer = SimpleNamespace(limit_train_batches=180, num_training_batches=7, estimated_stepping_batches=35)
    note = short_epoch_note(trainer)
    assert "only 7 batches" in note and "limit_train_batches 180" in note and "35 optimizer steps" in note
    assert short_epoch_note(SimpleNamespace(limit_train_batches=180, num_training_batches=180,
                                            estimated_stepping_batches=900)) is None
    assert short_epoch_note(SimpleNamespace(limit_train_batches=1.0, num_training_batches=7,
                                            estimated_stepping_batches=35)) is None  # a fraction: all batches meant
