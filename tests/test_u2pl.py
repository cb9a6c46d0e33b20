"""U2PL checks from METHODS.md section 6: unreliable fraction, loss normalisation, contrastive shapes and
negatives, memory bank capacity, EMA decay from the end of the warm-up, CutMix."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import ssl_kit.losses.u2pl as u2pl_losses
from ssl_kit.data.augment import apply_cutmix, cutmix_masks
from ssl_kit.heads.segmentation import ProgressiveUpsamplingHead, SegmentationNet
from ssl_kit.encoders import build_encoder, resolve_encoder_spec
from ssl_kit.losses.u2pl import (
    IGNORE, ClassMemoryBank, contrastive_logits, entropy_masks, foreground_share, high_entropy_mask, low_entropy_mask,
    negative_candidates, pixel_entropy, contrastive_loss, push_negatives, unreliable_percent, unsupervised_ce,
)
from ssl_kit.teacher import EMATeacher, make_ema_copy


def test_unreliable_percent_schedule():
    assert unreliable_percent(0, 40) == pytest.approx(20.0)
    assert unreliable_percent(20, 40) == pytest.approx(10.0)
    assert unreliable_percent(30, 40, alpha0=20) == pytest.approx(5.0)


@pytest.mark.parametrize("epoch, expected_percent", [(0, 20), (10, 10)])
def test_exactly_alpha_percent_of_valid_unlabeled_pixels_are_ignored(epoch, expected_percent):
    torch.manual_seed(0)
    probs = torch.randn(4, 11, 25, 20).softmax(dim=1)
    entropy = pixel_entropy(probs)
    valid = torch.rand(4, 25, 20) > 0.1  # 10 % ignore (255) pixels
    percent = unreliable_percent(epoch, 20)
    unreliable = high_entropy_mask(entropy, valid, percent)
    n_valid = int(valid.sum())
    assert int(unreliable.sum()) == round(expected_percent / 100 * n_valid)
    assert not (unreliable & ~valid).any()
    assert entropy[unreliable].min() >= entropy[valid & ~unreliable].max()  # the highest-entropy ones
    reliable_anchors = low_entropy_mask(entropy, valid, percent)
    assert int(reliable_anchors.sum()) == round(expected_percent / 100 * n_valid)
    assert entropy[reliable_anchors].max() <= entropy[valid & ~reliable_anchors].min()


def test_pixel_entropy_uniform_is_log_k():
    probs = torch.full((1, 4, 2, 2), 0.25)
    assert torch.allclose(pixel_entropy(probs), torch.full((1, 2, 2), math.log(4)), atol=1e-6)


def test_unsupervised_ce_normalisations_by_hand():
    # 1 image, 4 pixels, 2 classes: logits (2, 0) everywhere
    logits = torch.tensor([2.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, 1, 4).clone().requires_grad_()
    pseudo = torch.tensor([[[0, 1, 0, IGNORE]]])
    reliable = torch.tensor([[[True, True, False, True]]])
    ce0, ce1 = math.log(1 + math.exp(-2)), math.log(1 + math.exp(2))  # label 0 / label 1
    kept = ce0 + ce1  # pixels 0 and 1 (pixel 2 unreliable, pixel 3 ignored)
    paper = unsupervised_ce(logits, pseudo, reliable, "paper")
    assert paper.item() == pytest.approx(kept / 3)  # / valid pixels
    authors = unsupervised_ce(logits, pseudo, reliable, "authors")
    assert authors.item() == pytest.approx(kept / 2 * 4 / 2)  # mean over reliable x B H W / N_reliable
    paper.backward()
    assert logits.grad[0, :, 0, 2].abs().sum() == 0  # the unreliable pixel gets no gradient


def test_unsupervised_ce_without_reliable_pixels_is_zero_with_gradient():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = unsupervised_ce(logits, torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad


def test_memory_bank_keeps_the_newest_keys_and_never_exceeds_its_size():
    bank = ClassMemoryBank(num_classes=2, size=5, dim=1)
    bank.push(0, torch.arange(3.0).view(3, 1))
    assert bank.get(0).flatten().tolist() == [0, 1, 2]
    bank.push(0, torch.arange(3.0, 7.0).view(4, 1))  # wraps around: 7 keys pushed, 5 kept
    assert bank.count[0] == 5 and bank.get(0).shape == (5, 1)
    assert sorted(bank.get(0).flatten().tolist()) == [2, 3, 4, 5, 6]
    bank.push(0, torch.arange(100.0, 112.0).view(12, 1))  # more than the size at once
    assert bank.count[0] == 5 and sorted(bank.get(0).flatten().tolist()) == [107, 108, 109, 110, 111]
    assert bank.get(1).shape == (0, 1)
    assert bank.keys.shape == (2, 5, 1)


def test_contrastive_logits_hand_value():
    anchors = torch.tensor([[1.0, 0.0]])
    logits = contrastive_logits(anchors, torch.tensor([2.0, 0.0]), torch.tensor([[[0.0, 3.0], [-1.0, 0.0]]]), 0.5)
    assert logits[0].tolist() == pytest.approx([2.0, 0.0, -2.0])  # cosine / 0.5, positive first


def test_negatives_follow_the_paper_surely_not_ranks():
    # K = 5. Labeled pixel: ranking c2 > c0 > c4 > c1 > c3, label 0 -> negatives for 2 and 4 (top 3, not the label)
    # unlabeled unreliable pixel: ranking c1 > c3 > c0 > c2 > c4 -> ranks 3..(20 capped at 5) -> classes 2 and 4
    # unlabeled reliable pixel: no negatives
    def probs_for(order):
        p = torch.zeros(5)
        p[list(order)] = torch.tensor([0.4, 0.25, 0.15, 0.12, 0.08])
        return p

    probs = torch.stack([probs_for([2, 0, 4, 1, 3]), probs_for([1, 3, 0, 2, 4]), probs_for([1, 3, 0, 2, 4])])
    probs = probs.view(3, 5, 1, 1)
    labels = torch.tensor([0, 1, 1]).view(3, 1, 1)
    unreliable = torch.tensor([False, True, False]).view(3, 1, 1)
    neg = negative_candidates(probs, labels, unreliable, n_labeled=1, low_rank=3, high_rank=20)
    assert neg.shape == (3, 5, 1, 1)
    assert neg[0, :, 0, 0].nonzero().flatten().tolist() == [2, 4]
    assert neg[1, :, 0, 0].nonzero().flatten().tolist() == [2, 4]
    assert not neg[2].any()


def _contrastive_batch(classes: list[int], k: int = 4, d: int = 8):
    torch.manual_seed(0)
    b, h, w = 2, 6, 6
    labels = torch.tensor(classes).repeat(b * h * w // len(classes))[: b * h * w].view(b, h, w)
    probs = torch.full((b, k, h, w), 0.1)
    probs.scatter_(1, labels[:, None], 0.7)
    rep = torch.randn(b, d, h, w, requires_grad=True)
    return rep, rep.detach() + 0.1 * torch.randn(b, d, h, w), probs, labels


def test_contrastive_logits_have_one_positive_and_num_negatives_per_anchor(monkeypatch):
    rep, rep_t, probs, labels = _contrastive_batch([0, 1, 2])
    shapes = []
    original = u2pl_losses.contrastive_logits
    monkeypatch.setattr(u2pl_losses, "contrastive_logits", lambda *a: shapes.append(original(*a).shape) or original(*a))
    bank = ClassMemoryBank(4, 100, 8)
    negatives = torch.ones(2, 4, 6, 6, dtype=torch.bool)
    push_negatives(bank, rep_t, negatives)
    loss, info = contrastive_loss(rep, rep_t, probs, labels, torch.ones(2, 6, 6, dtype=torch.bool), bank,
                                  num_anchors=256, num_negatives=50)
    assert shapes == [torch.Size([256, 51])] * 3  # one InfoNCE per class present
    assert info["contrastive_classes"] == 3
    assert loss.item() > 0 and loss.requires_grad
    loss.backward()
    assert rep.grad.abs().sum() > 0
    assert int(bank.count.max()) == 72 and bank.count.le(bank.size).all()  # 2 x 6 x 6 keys pushed per class


def test_contrastive_loss_is_zero_when_only_one_class_is_present():
    rep, rep_t, probs, labels = _contrastive_batch([1])
    bank = ClassMemoryBank(4, 100, 8)
    bank.push(1, torch.randn(10, 8))
    push_negatives(bank, rep_t, torch.ones(2, 4, 6, 6, dtype=torch.bool))
    loss, info = contrastive_loss(rep, rep_t, probs, labels, torch.ones(2, 6, 6, dtype=torch.bool), bank)
    assert loss.item() == 0.0 and loss.requires_grad and info["contrastive_classes"] == 1


def test_ema_decay_counts_from_the_end_of_the_supervised_warm_up():
    student, teacher = nn.Linear(1, 1, bias=False), None
    teacher = make_ema_copy(student)
    module = SimpleNamespace(ema_pairs=lambda: [(student, teacher)], log=lambda *a, **k: None)
    callback = EMATeacher(schedule="inverse", cap=0.99, start_epoch=2)
    trainer = SimpleNamespace(global_step=0, num_training_batches=3, accumulate_grad_batches=1,
                              estimated_stepping_batches=30, max_epochs=10)
    momenta = []
    for step in range(1, 16):
        trainer.global_step = step
        callback.on_train_batch_end(trainer, module)
        momenta.append(callback.last_momentum)
    assert callback.start_step == 6
    assert momenta[:6] == [0.0] * 6  # warm-up: the teacher is a copy of the student
    assert momenta[6:10] == pytest.approx([0.0, 0.5, 2 / 3, 0.75])  # 1 - 1/(i+1), i counted from the semi start
    assert max(momenta) <= 0.99
    assert EMATeacher(schedule="inverse", cap=0.99).momentum(10**5, 10**6) == pytest.approx(0.99)


def test_unsupervised_weight_ramp_counts_from_the_end_of_the_warm_up_and_scales_both_terms():
    """``unsup_ramp_epochs 2`` with a 1-epoch warm-up of 3 steps: the s-th semi-supervised step gets (s + 1) / 6, then 1;
    the loss is the supervised CE plus the ramp times the unsupervised CE."""
    from ssl_kit.methods import U2PL

    kwargs = dict(encoder_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}, img_size=32, head_dim=16, rep_dim=8,
                  memory_size=4, contrastive_weight=0.0, sup_only_epochs=1)
    module = U2PL(**kwargs, unsup_ramp_epochs=2)
    module._trainer = SimpleNamespace(global_step=0, num_training_batches=3, accumulate_grad_batches=1)
    ramps = {}
    for step in (3, 5, 8, 20):
        module._trainer.global_step = step
        ramps[step] = module.unsup_ramp()
    assert ramps == pytest.approx({3: 1 / 6, 5: 3 / 6, 8: 1.0, 20: 1.0})
    assert U2PL(**kwargs).unsup_ramp() == 1.0  # no ramp: the paper's full weight at once

    torch.manual_seed(0)
    lab = {"logits": torch.randn(2, 11, 4, 4), "labels": torch.randint(0, 11, (2, 4, 4))}
    unl = {"logits": torch.randn(2, 11, 4, 4), "pseudo": torch.randint(0, 11, (2, 4, 4)),
           "unreliable": torch.zeros(2, 4, 4, dtype=torch.bool)}
    loss, logs = module._semi_loss(lab, unl, ramp=0.25)
    assert loss.item() == pytest.approx((logs["loss_sup"] + 0.25 * logs["loss_unsup"]).item())
    assert module._semi_loss(lab, unl)[0].item() == pytest.approx((logs["loss_sup"] + logs["loss_unsup"]).item())


def test_cutmix_boxes_cover_half_the_image_and_take_the_next_image():
    torch.manual_seed(0)
    masks = cutmix_masks(64, 32, 48, prob=0.5)
    mixed = masks.flatten(1).any(dim=1)
    assert 20 < int(mixed.sum()) < 44  # about half of the images
    area = masks.flatten(1).sum(dim=1)[mixed].float()
    assert ((area - 32 * 48 / 2).abs() <= 48 / 2).all()  # half the image up to rounding of the height
    images = torch.arange(64.0).view(64, 1, 1, 1).expand(64, 3, 32, 48)
    labels = torch.arange(64).view(64, 1, 1).expand(64, 32, 48)
    mixed_images, mixed_labels = apply_cutmix(masks, images, labels)
    expected = torch.where(masks, (torch.arange(64) + 1).remainder(64).view(64, 1, 1), labels)
    assert torch.equal(mixed_labels, expected)
    assert torch.equal(mixed_images[:, 0], expected.float())


def test_segmentation_net_shapes():
    spec = resolve_encoder_spec("tiny", img_size=32, patch_size=4, in_chans=1, depth=1, embed_dim=32, num_heads=2)
    vit = build_encoder(spec)
    net = SegmentationNet(vit, ProgressiveUpsamplingHead(32, num_classes=5, hidden_dim=16, rep_dim=24, num_upsample=1))
    out = net(torch.randn(2, 1, 32, 32))
    assert out.logits.shape == (2, 5, 32, 32)
    assert out.logits_low.shape == (2, 5, 16, 16) and out.rep.shape == (2, 24, 16, 16)


def test_supervised_only_segmenter_builds_no_representation_branch_and_loads_older_checkpoints():
    """Without a contrastive loss (seg_supervised) the head has no representation branch and the method no memory
    bank: no parameters or buffers, the forward returns None for it, the logits are unchanged. A checkpoint written
    when both were built anyway still loads into such a model (their entries are dropped), with the same logits."""
    from ssl_kit.methods import U2PL

    torch.manual_seed(0)
    kwargs = dict(encoder_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}, img_size=32, head_dim=16, rep_dim=8,
                  memory_size=4, unsup_weight=0.0)
    with_branch = U2PL(**kwargs, contrastive_weight=0.1).eval()
    without = U2PL(**kwargs, contrastive_weight=0.0).eval()
    assert without.student.head.representation is None
    assert not any(".representation." in name for name, _ in without.named_parameters())
    assert without.memory_bank is None and not any(k.startswith("memory_bank.") for k in without.state_dict())
    checkpoint = {"state_dict": dict(with_branch.state_dict())}
    assert any(".head.representation." in k for k in checkpoint["state_dict"])
    assert any(k.startswith("memory_bank.") for k in checkpoint["state_dict"])
    without.on_load_checkpoint(checkpoint)
    without.load_state_dict(checkpoint["state_dict"])  # strict: every remaining key matches
    images = torch.randn(2, 1, 32, 32)
    out = without.student(images)
    assert out.rep is None
    assert torch.equal(out.logits, with_branch.student(images).logits)


def test_the_batch_wide_percentile_drops_mostly_foreground_pixels_on_a_fixed_batch():
    """Issue #24: 2 scenes of 4 x 4 pixels, 8 of 32 pixels foreground (25 %), each foreground pixel more
    uncertain than the background (as early in training), two background pixels in between. At alpha 31.25 %
    (10 pixels) the percentile drops all 8 foreground pixels and 2 background ones: a share of 0.8 foreground,
    although the batch is 25 % foreground."""
    pseudo = torch.zeros(2, 4, 4, dtype=torch.long)
    pseudo[0, :2, :2] = 3
    pseudo[1, 2:, 2:] = 7
    entropy = torch.full((2, 4, 4), 0.1)
    entropy[pseudo > 0] = 1.0
    entropy[0, 3, 3] = entropy[1, 0, 0] = 0.5
    unreliable = high_entropy_mask(entropy, torch.ones_like(pseudo, dtype=torch.bool), 31.25)
    assert int(unreliable.sum()) == 10 and bool(unreliable[pseudo > 0].all())
    assert foreground_share(unreliable, pseudo) == pytest.approx(0.8)
    assert foreground_share(torch.ones_like(unreliable), pseudo) == pytest.approx(0.25)
    assert foreground_share(torch.zeros_like(unreliable), pseudo) == 0.0
    # ranking within each pseudo class instead: round(0.3125 x 24) = 8 background, round(0.3125 x 4) = 1 of each
    # item dropped, the most uncertain of each; anchors likewise from each class's least uncertain pixels
    per_class, anchors = entropy_masks(entropy, torch.ones_like(pseudo, dtype=torch.bool), 31.25, pseudo)
    assert int(per_class.sum()) == 10 and foreground_share(per_class, pseudo) == pytest.approx(0.2)
    assert bool(per_class[0, 3, 3]) and bool(per_class[1, 0, 0])
    assert int(anchors.sum()) == 10 and int((anchors & (pseudo == 3)).sum()) == 1
    batch_wide, _ = entropy_masks(entropy, torch.ones_like(pseudo, dtype=torch.bool), 31.25)
    assert torch.equal(batch_wide, unreliable)


def test_layer_norm_head_computes_each_image_alone_batch_norm_does_not():
    """``head_norm layer``: no statistic crosses images in training mode, so an image's output does not depend
    on the rest of the batch (what makes U2PL weight-equivalent on 1 and 2 processes); BatchNorm's does."""
    torch.manual_seed(0)
    features = torch.randn(4, 32, 8, 8)
    for norm, alone in (("layer", True), ("batch", False)):
        head = ProgressiveUpsamplingHead(32, num_classes=5, hidden_dim=16, rep_dim=24, dropout=0.0, norm=norm).train()
        logits_batch, rep_batch = head(features)
        logits_half, rep_half = head(features[:2])
        same = torch.allclose(logits_batch[:2], logits_half, atol=1e-5) and torch.allclose(rep_batch[:2], rep_half, atol=1e-5)
        assert same == alone, norm


def _gather_worker(rank: int, world: int, port: int, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rows = torch.full((rank + 1, 3), float(rank))  # rank 0 has 1 row, rank 1 has 2
    gathered = u2pl_losses.gather_rows(rows)
    bank = ClassMemoryBank(1, 10, 3)
    bank.push(0, gathered)
    out.put((rank, gathered.tolist(), bank.get(0).tolist()))
    dist.destroy_process_group()


def test_memory_bank_keys_are_gathered_from_every_process():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gather_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (g, b)) for r, g, b in (queue.get(timeout=60) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    expected = [[0.0] * 3, [1.0] * 3, [1.0] * 3]  # variable sizes, rank order
    assert results[0][0] == results[1][0] == expected
    assert results[0][1] == results[1][1] == expected  # identical banks on every process


def test_pretrained_encoder_is_resampled_to_the_segmenter_patch(tmp_path):
    """`--model.patch_size` with `--model.init_from`: timm resamples the pretrained patch embedding (as Soft
    Teacher's); None keeps the encoder's own patch."""
    from ssl_kit.encoders import export_encoder
    from ssl_kit.methods import U2PL

    spec = resolve_encoder_spec("tiny", img_size=32, patch_size=4, in_chans=1, depth=1, embed_dim=32, num_heads=2)
    pretrained = build_encoder(spec)
    export_encoder(pretrained, spec, tmp_path / "encoder")
    kwargs = dict(init_from=str(tmp_path / "encoder"), img_size=64, in_chans=1, head_dim=16, rep_dim=8, memory_size=4)
    resampled = U2PL(**kwargs, patch_size=8, num_upsample=2)  # 8 x 8 tokens at 64 px, upsampled to stride 2
    assert resampled.encoder.patch_embed.patch_size == (8, 8) and resampled.encoder.pos_embed.shape[1] == 1 + 8 * 8
    assert resampled.encoder_spec.kwargs["patch_size"] == 8
    assert torch.equal(resampled.encoder.blocks[0].mlp.fc1.weight, pretrained.blocks[0].mlp.fc1.weight)
    assert resampled.student(torch.randn(2, 1, 64, 64)).logits.shape == (2, 11, 64, 64)
    kept = U2PL(**kwargs, patch_size=None)
    assert kept.encoder.patch_embed.patch_size == (4, 4)
    assert torch.equal(kept.encoder.patch_embed.proj.weight, pretrained.patch_embed.proj.weight)


@pytest.mark.parametrize("layer_decay", [0.7, 1.0])
def test_layer_decay_gives_each_encoder_block_its_own_lr_and_the_head_ten_times(layer_decay):
    """--model.layer_decay (#24): block i of d at base lr x decay^(d - 1 - i), embeddings at decay^d, the head at
    head_lr_scale x base lr; 1.0 keeps one lr for the whole encoder (U2PL's ResNet)."""
    from helpers import optimizer_trainer
    from ssl_kit.methods import U2PL

    model = U2PL(encoder_kwargs={"depth": 3, "embed_dim": 32, "num_heads": 2}, img_size=32, layer_decay=layer_decay,
                 head_lr_scale=10.0, base_lr=0.256, head_dim=16, rep_dim=16, warmup_epochs=0)
    model.trainer = optimizer_trainer(batch_size=2)
    optimizer = model.configure_optimizers()["optimizer"]
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    lr = 0.256 * 2 / 256
    encoder = model.student.encoder
    assert [lr_of[id(b.attn.qkv.weight)] for b in encoder.blocks] == pytest.approx(
        [lr * layer_decay ** (2 - i) for i in range(3)])
    assert lr_of[id(encoder.patch_embed.proj.weight)] == pytest.approx(lr * layer_decay ** (3 if layer_decay < 1 else 0))
    assert lr_of[id(model.student.head.classifier[1].weight)] == pytest.approx(10 * lr)
    assert {id(p) for p in model.student.parameters() if p.requires_grad} == set(lr_of)  # each trainable one, once


def test_segmenter_on_the_relative_position_encoder_has_no_position_embedding_and_reloads(tmp_path):
    """`--model.encoder vit_irpe_patch16_224` (LoMaR's timm ViT with contextual relative position encoding, no
    absolute position embedding): the segmenter builds, its output has the image's size, and its exported
    encoder starts another segmenter at another patch size (`--model.init_from`), weights and RPE tables intact."""
    from ssl_kit.encoders import export_encoder
    from ssl_kit.encoders.rpe import IRPE_MODEL
    from ssl_kit.methods import U2PL

    sizes = dict(img_size=64, in_chans=1, head_dim=16, rep_dim=8, memory_size=4)
    model = U2PL(encoder=IRPE_MODEL, encoder_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}, **sizes,
                 patch_size=8, num_upsample=1)
    assert model.encoder.pos_embed is None and model.encoder_spec.timm_name == IRPE_MODEL
    with torch.no_grad():
        model.encoder.blocks[0].attn.rpe.table.normal_()
    assert model.student(torch.randn(2, 1, 64, 64)).logits.shape == (2, 11, 64, 64)
    export_encoder(model.encoder, model.encoder_spec, tmp_path / "encoder")
    reloaded = U2PL(init_from=str(tmp_path / "encoder"), **sizes, patch_size=4, num_upsample=2)
    assert reloaded.encoder.pos_embed is None and reloaded.encoder.patch_embed.patch_size == (4, 4)
    assert torch.equal(reloaded.encoder.blocks[0].attn.rpe.table, model.encoder.blocks[0].attn.rpe.table)
    assert torch.equal(reloaded.encoder.blocks[0].mlp.fc1.weight, model.encoder.blocks[0].mlp.fc1.weight)
    assert reloaded.student(torch.randn(2, 1, 64, 64)).logits.shape == (2, 11, 64, 64)
