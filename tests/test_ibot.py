"""iBOT (METHODS.md section 3): masks, loss pairing and normalisation, centers, schedules, teacher."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml

from ssl_kit.cli import resolve_recipe
from ssl_kit.encoders import block_mask, random_count_mask
from ssl_kit.heads.projection import IBOTHead
from ssl_kit.losses.distillation import IBOTLoss, teacher_entropies
from ssl_kit.methods import IBOT
from ssl_kit.methods.ibot import teacher_temperature
from ssl_kit.teacher import EMATeacher


def tiny_ibot(**kw) -> IBOT:
    args = dict(encoder="tiny", encoder_kwargs=dict(depth=2, embed_dim=64, num_heads=2), img_size=32, patch_size=4,
                in_chans=1, out_dim=32, hidden_dim=64, bottleneck_dim=16, min_block=4)
    return IBOT(**dict(args, **kw))


def views(b=3, n_local=2):
    return [torch.randn(b, 1, 32, 32), torch.randn(b, 1, 32, 32)] + [torch.randn(b, 1, 16, 16) for _ in range(n_local)]


def recipe_teacher(recipe: str, tmp_path) -> EMATeacher:
    """The EMA teacher callback the IBOT of a recipe brings (its model settings on the tiny test model)."""
    settings = yaml.safe_load(resolve_recipe(recipe).read_text())["model"]["init_args"]
    momentum = {k: settings[k] for k in ("teacher_momentum", "teacher_momentum_final")}
    (ema,) = [c for c in tiny_ibot(**momentum).method_callbacks(tmp_path) if isinstance(c, EMATeacher)]
    return ema


def test_recipe_teacher_momentum_is_cosine_to_1_paper_0996_short_run_098(tmp_path):
    paper = recipe_teacher("ibot_224", tmp_path)
    assert paper.momentum(0, 1000) == pytest.approx(0.996)
    assert paper.momentum(500, 1000) == pytest.approx(0.998)
    assert paper.momentum(1000, 1000) == pytest.approx(1.0)
    # the 350-step recipe: 0.98 -> 1, so the evaluated teacher leaves its random init (issue #21)
    short = recipe_teacher("ibot", tmp_path)
    assert short.momentum(0, 350) == pytest.approx(0.98) and short.momentum(175, 350) == pytest.approx(0.99)
    assert short.momentum(350, 350) == pytest.approx(1.0)


def test_masks_random_exact_count_and_block_never_more():
    assert int(random_count_mask((14, 14), int(0.3 * 196)).sum()) == 58
    torch.manual_seed(0)
    for ratio in (0.1, 0.3, 0.5):
        target = int(ratio * 196)
        counts = [int(block_mask((14, 14), target).sum()) for _ in range(50)]
        assert max(counts) <= target and min(counts) >= target - 16  # close to the target, never above


def test_sampled_masks_follow_probability_and_ratio_range():
    torch.manual_seed(0)
    model = tiny_ibot(mask_mode="random")
    masks = model.sample_masks(2, 400, torch.device("cpu"))  # [2, 400, 64]
    counts = masks.sum(-1).flatten().float()
    assert abs(float((counts == 0).float().mean()) - 0.5) < 0.06  # half the crops carry no mask
    masked = counts[counts > 0]
    assert masked.min() >= int(0.1 * 64) and masked.max() <= int(0.5 * 64)


def ce(t, s):  # per-image CE averaged over images
    return -(t * F.log_softmax(s / 0.1, dim=-1)).sum(-1).mean()


def test_cls_loss_averages_22_cross_view_pairs_and_patch_loss_2_terms():
    torch.manual_seed(0)
    b, k, length = 4, 8, 6
    student_cls = torch.randn(12, b, k)  # 2 global + 10 local
    teacher_cls = torch.randn(1, b, k).expand(2, b, k)  # identical teacher views -> pair (q, v) costs c_v
    student_patch, teacher_patch = torch.randn(2, b, length, k), torch.randn(2, b, length, k)
    masks = torch.rand(2, b, length) < 0.5
    loss = IBOTLoss(k)
    cls_loss, patch_loss = loss(student_cls, student_patch, teacher_cls, teacher_patch, masks, 0.04, 0.05)
    t = F.softmax(teacher_cls[0] / 0.04, dim=-1)
    c = torch.stack([ce(t, student_cls[v]) for v in range(12)])
    assert cls_loss.item() == pytest.approx(((2 * c.sum() - c[0] - c[1]) / 22).item(), rel=1e-5)
    terms = []
    for v in range(2):
        per_patch = -(F.softmax(teacher_patch[v] / 0.05, -1) * F.log_softmax(student_patch[v] / 0.1, -1)).sum(-1)
        m = masks[v].float()
        terms.append(((per_patch * m).sum(-1) / m.sum(-1).clamp(min=1)).mean())
    assert patch_loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_all_zero_masks_give_patch_loss_exactly_zero():
    model = tiny_ibot()
    out = model(views(), masks=torch.zeros(2, 3, 64, dtype=torch.bool))
    assert out["patch_loss"].item() == 0.0 and out["cls_loss"].item() > 0


def test_teacher_sees_no_mask_and_student_sees_the_mask_embedding():
    model = tiny_ibot()
    with torch.no_grad():
        model.mask_token.fill_(1e4)
    seen = {}
    model.ema_teacher.blocks[0].register_forward_hook(lambda m, a, o: seen.update(teacher=a[0]))
    model.encoder.blocks[0].register_forward_hook(lambda m, a, o: None if "student" in seen else seen.update(student=a[0]))
    model(views(), masks=torch.ones(2, 3, 64, dtype=torch.bool))
    assert seen["teacher"].abs().max() < 100 and seen["student"][:, 1:].abs().min() > 100
    assert seen["student"].shape == (6, 65, 64)  # the two masked global crops (+ [CLS])


def test_center_update_is_point9_c_plus_point1_mean():
    loss = IBOTLoss(8)
    loss.center.fill_(1.0)
    loss.center2.fill_(2.0)
    t_cls, t_patch = torch.randn(2, 5, 8), torch.randn(2, 5, 7, 8)
    loss.update_centers(t_cls, t_patch)
    assert torch.allclose(loss.center, 0.9 + 0.1 * t_cls.mean(dim=(0, 1)).view(1, 8), atol=1e-6)
    assert torch.allclose(loss.center2, 1.8 + 0.1 * t_patch.mean(dim=(0, 1, 2)).view(1, 1, 8), atol=1e-6)


def _center_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(rank)
    loss = IBOTLoss(8)
    t_cls, t_patch = torch.randn(2, 3, 8), torch.randn(2, 3, 5, 8)
    loss.update_centers(t_cls, t_patch)
    torch.save({"center": loss.center, "center2": loss.center2, "t_cls": t_cls, "t_patch": t_patch},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_centers_are_all_reduced_identical_on_ranks_and_equal_the_global_mean(tmp_path):
    mp.start_processes(_center_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["center"], r1["center"]) and torch.equal(r0["center2"], r1["center2"])
    all_cls = torch.cat([r0["t_cls"], r1["t_cls"]], dim=1)
    all_patch = torch.cat([r0["t_patch"], r1["t_patch"]], dim=1)
    assert torch.allclose(r0["center"], 0.1 * all_cls.mean(dim=(0, 1)).view(1, 8), atol=1e-6)
    assert torch.allclose(r0["center2"], 0.1 * all_patch.mean(dim=(0, 1, 2)).view(1, 1, 8), atol=1e-6)


def test_teacher_temperature_linear_warmup_then_constant():
    assert teacher_temperature(0, 30, 0.04, 0.07) == pytest.approx(0.04)
    assert teacher_temperature(29, 30, 0.04, 0.07) == pytest.approx(0.07)
    assert teacher_temperature(10, 30, 0.04, 0.07) == pytest.approx(0.04 + 0.03 * 10 / 29)
    assert teacher_temperature(50, 30, 0.04, 0.07) == 0.07


def test_last_layer_frozen_in_first_epoch_only(monkeypatch):
    model = tiny_ibot()
    model(views())["loss"].backward()
    last = list(model.head.last_layer.parameters())
    trainable = [p for p in last if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    monkeypatch.setattr(type(model), "current_epoch", property(lambda self: 0))
    model.on_after_backward()
    assert all(p.grad is None for p in last)
    model(views())["loss"].backward()
    monkeypatch.setattr(type(model), "current_epoch", property(lambda self: 1))
    model.on_after_backward()
    assert all(p.grad is not None for p in trainable)


def test_teacher_is_exported_and_frozen_weight_norm_magnitude():
    model = tiny_ibot()
    assert model.export_module() is model.ema_teacher and model.export_prefix() == "ema_teacher."
    assert not any(p.requires_grad for p in model.ema_teacher.parameters())
    g = model.head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    assert not model.ema_teacher.training  # from construction on
    model.train()
    assert model.encoder.training and not model.ema_teacher.training  # teacher runs without drop-path
    assert model.ema_teacher_head.training  # its head follows the student (batch norms use batch statistics)
    model.eval()
    assert not model.ema_teacher_head.training and not model.ema_teacher.training


def test_batch_norm_in_head_normalises_over_every_token_of_the_call():
    """``norm_in_head bn`` (the reference's --norm_in_head): BatchNorm1d after each hidden Linear, statistics over
    images and token positions together; a shared offset of every token cannot pass the first hidden layer."""
    torch.manual_seed(0)
    head = IBOTHead(8, out_dim=6, hidden_dim=16, bottleneck_dim=4, norm="bn")
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in head.mlp) == 2
    tokens = torch.randn(3, 5, 8)
    out = head(tokens)  # one call: the running mean is 0.1 x the mean of the 15 tokens' first-layer outputs
    assert out.shape == (3, 5, 6)
    with torch.no_grad():
        assert torch.allclose(head.mlp[1].running_mean, 0.1 * head.mlp[0](tokens.reshape(15, 8)).mean(0), atol=1e-6)
    assert torch.allclose(out, head(tokens.reshape(15, 8)).reshape(3, 5, 6), atol=1e-5)  # [B, L, D] == [B*L, D]
    offset = torch.zeros(8)
    offset[0] = 50.0  # one vector shared by every token: the first layer maps it to a constant the norm removes
    assert torch.allclose(head(tokens + offset), out, atol=1e-4)
    plain = IBOTHead(8, out_dim=6, hidden_dim=16, bottleneck_dim=4)
    assert not torch.allclose(plain(tokens + offset), plain(tokens), atol=1e-2)  # without it the offset dominates
    model = tiny_ibot(norm_in_head="bn")
    model.train()
    assert model.ema_teacher_head.training and isinstance(model.ema_teacher_head.mlp[1], torch.nn.BatchNorm1d)
    with pytest.raises(Exception, match="--model.norm_in_head must be none or bn"):
        tiny_ibot(norm_in_head="ln")


def test_teacher_entropies_pinned_by_hand_between_the_two_collapses():
    # uniform: every image's distribution and their mean are uniform -> 1, 1
    assert [float(v) for v in teacher_entropies(torch.zeros(4, 8), torch.zeros(1, 8), 0.07)] == pytest.approx([1, 1])
    # two images, each sure of its own prototype of 4: per image 0, mean [1/2, 1/2, 0, 0] -> log 2 / log 4 = 0.5
    logits = torch.full((2, 4), -50.0)
    logits[0, 0] = logits[1, 1] = 50.0
    assert [float(v) for v in teacher_entropies(logits, torch.zeros(1, 4), 0.1)] == pytest.approx([0, 0.5], abs=1e-6)
    # the center is subtracted before the temperature: centring the same row leaves the uniform distribution
    row = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert float(teacher_entropies(row, row, 0.04)[0]) == pytest.approx(1.0)
    # one image, p = softmax([log 3, 0] / 1) = [3/4, 1/4]: H = -(3/4 log 3/4 + 1/4 log 1/4) / log 2 = 0.8113
    two = torch.tensor([[torch.log(torch.tensor(3.0)), 0.0]])
    assert float(teacher_entropies(two, torch.zeros(1, 2), 1.0)[0]) == pytest.approx(0.811278, abs=1e-5)


def test_uniform_teacher_logs_its_entropy_and_warns_of_the_collapse(ssl_caplog):
    model = tiny_ibot(teacher_temp=0.07, warmup_teacher_temp_epochs=0)
    with torch.no_grad():  # a teacher whose [CLS] logits are the same for every image: centering makes them uniform
        model.ema_teacher_head.last_layer.parametrizations.weight.original0.zero_()
    model.log_dict = lambda values, **kw: logged.update(values)
    logged: dict = {}
    model.on_train_epoch_start()
    model.training_step((views(), torch.zeros(3)), 0)
    assert float(logged["teacher_entropy"]) == pytest.approx(1.0)
    assert float(logged["teacher_marginal_entropy"]) == pytest.approx(1.0)
    model.on_train_epoch_end()
    assert "nearly uniform" in ssl_caplog.text and "--model.teacher_temp" in ssl_caplog.text
    ssl_caplog.clear()
    model.on_train_epoch_start()  # a fresh epoch without steps warns of nothing
    model.on_train_epoch_end()
    assert ssl_caplog.text == ""
