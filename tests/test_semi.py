"""UDA and Meta Pseudo Labels: the METHODS.md section 4 / 5 checks, pinned by hand-computed values."""
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ssl_kit.data.semi import SemiSupervisedDataModule
from ssl_kit.errors import UserError
from ssl_kit.losses.semi import centred_feedback, tsa_cross_entropy, tsa_threshold, uda_consistency
from ssl_kit.methods.classifier import build_classifier
from ssl_kit.methods.mpl import meta_pseudo_labels_step


@pytest.mark.parametrize("schedule, expected", [
    ("linear", (0.1, 0.55, 1.0)),
    ("log", (0.1, 0.92612, 0.99394)),
    ("exp", (0.10606, 0.17388, 1.0)),
])
def test_tsa_threshold_values_for_ten_classes(schedule, expected):
    got = [tsa_threshold(schedule, t, 10) for t in (0.0, 0.5, 1.0)]
    assert got == pytest.approx(expected, abs=5e-6)
    assert tsa_threshold("none", 0.0, 10) == 1.0


def test_tsa_drops_examples_whose_correct_class_probability_exceeds_eta_and_divides_by_kept():
    # two classes; correct-class probabilities 0.9, 0.2, 0.5 (the second example's target is class 1)
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.5, 0.5]])
    logits, targets = probs.log(), torch.tensor([0, 1, 0])
    loss, kept = tsa_cross_entropy(logits, targets, threshold=0.55)
    assert kept.tolist() == [False, True, True]
    assert loss.item() == pytest.approx((-math.log(0.2) - math.log(0.5)) / 2, rel=1e-6)  # / #kept, not / batch
    # a threshold on the MAX probability would have dropped the second example (max 0.8 > 0.55) instead
    loss_all, kept_all = tsa_cross_entropy(logits, targets, threshold=1.0)
    assert kept_all.all() and loss_all.item() == pytest.approx(-(math.log(0.9) + math.log(0.2) + math.log(0.5)) / 3, rel=1e-6)
    none_kept, _ = tsa_cross_entropy(logits, targets, threshold=0.05)
    assert none_kept.item() == 0.0


def test_uda_consistency_is_zero_for_uniform_predictions_and_matches_hand_value():
    uniform = torch.zeros(4, 10)
    loss, mask = uda_consistency(uniform, torch.randn(4, 10), temperature=0.4, threshold=0.8)
    assert loss.item() == 0.0 and not mask.any()

    weak = torch.tensor([[0.9, 0.1], [0.7, 0.3]]).log()  # max 0.9 passes 0.8; 0.7 does not (unsharpened)
    strong = torch.tensor([[0.6, 0.4], [0.1, 0.9]]).log().requires_grad_()
    loss, mask = uda_consistency(weak, strong, temperature=0.5, threshold=0.8)
    p = torch.tensor([0.81, 0.01]) / 0.82  # softmax(log(0.9, 0.1) / 0.5) = (0.9^2, 0.1^2) normalised
    kl = float((p * (p.log() - torch.tensor([0.6, 0.4]).log())).sum())
    assert mask.tolist() == [True, False]
    assert loss.item() == pytest.approx(kl / 2, rel=1e-5)  # averaged over ALL unlabeled examples
    loss.backward()
    assert strong.grad[1].abs().sum() == 0 and strong.grad[0].abs().sum() > 0


def test_feedback_baseline_moves_one_percent_towards_h():
    moving = torch.tensor(0.0)
    out = centred_feedback(torch.tensor(1.0), moving, 0.01)
    assert moving.item() == pytest.approx(0.01) and out.item() == pytest.approx(0.99)
    assert centred_feedback(torch.tensor(0.0), torch.tensor(0.0), 0.01).item() == 0.0
    assert centred_feedback(torch.tensor(0.3), torch.tensor(5.0), 0.0).item() == pytest.approx(0.3)


# ---------------------------------------------------------------------------- MPL step
def sgd_update(model: nn.Module, lr: float, log: list | None = None, name: str = ""):
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def update(loss):
        if log is not None:
            log.append(f"{name} step")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return update


def step_kwargs(**overrides):
    kwargs = dict(uda_weight=1.0, temperature=0.7, threshold=0.6, label_smoothing=0.0, soft_pseudo_labels=False)
    return {**kwargs, **overrides}


def tiny_vit(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model, _ = build_classifier("tiny", 16, 4, 1, {"depth": 1, "embed_dim": 32, "num_heads": 2}, 3, None, 0.0)
    return model


def test_mpl_with_student_lr_zero_has_zero_feedback_and_teacher_loss_equal_to_its_uda_loss():
    teacher, student = tiny_vit(0), tiny_vit(1)
    torch.manual_seed(2)
    x_l, y_l = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 0])
    u_w, u_s = torch.randn(6, 1, 16, 16), torch.randn(6, 1, 16, 16)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    out = meta_pseudo_labels_step(teacher, student, (x_l, y_l), (u_w, u_s), **step_kwargs(),
                                  update_student=sgd_update(student, 0.0), update_teacher=sgd_update(teacher, 0.1))
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert out.feedback.item() == 0.0 and out.ce_old.item() == out.ce_new.item()
    assert out.teacher_loss.item() == out.teacher_uda.item()


def two_class_problem(seed: int = 0):
    """Points in R^2 labeled by the sign of the first coordinate."""
    g = torch.Generator().manual_seed(seed)
    x_l, u = torch.randn(64, 2, generator=g), torch.randn(256, 2, generator=g)
    return x_l, (x_l[:, 0] > 0).long(), u


def teacher_confidence_change(teacher_weight: float) -> tuple[float, float]:
    """(h, change of the teacher's log-probability of its own pseudo labels caused by the MPL term)."""
    x_l, y_l, u = two_class_problem()

    def run(student_lr: float) -> tuple[torch.Tensor, nn.Module, torch.Tensor]:
        teacher, student = nn.Linear(2, 2), nn.Linear(2, 2)
        with torch.no_grad():
            teacher.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]) * teacher_weight)  # +: right labels
            teacher.bias.zero_()
            student.weight.zero_(), student.bias.zero_()  # uniform predictions: any signal helps or hurts
        out = meta_pseudo_labels_step(teacher, student, (x_l, y_l), (u, u), **step_kwargs(uda_weight=0.0),
                                      update_student=sgd_update(student, student_lr),
                                      update_teacher=sgd_update(teacher, 0.5))
        pseudo = (u @ torch.tensor([[-1.0, 1.0], [0.0, 0.0]]) * teacher_weight).argmax(dim=1)
        return out.feedback, teacher, pseudo

    h, taught, pseudo = run(student_lr=1.0)
    _, untaught, _ = run(student_lr=0.0)  # same start, h = 0: the UDA part of the teacher update only
    with torch.no_grad():
        conf = lambda m: F.log_softmax(m(u), dim=1).gather(1, pseudo[:, None]).mean().item()
        return h.item(), conf(taught) - conf(untaught)


def test_mpl_feedback_sign_reinforces_pseudo_labels_that_help_the_student():
    h_good, change_good = teacher_confidence_change(teacher_weight=3.0)   # the teacher labels by the true rule
    assert h_good > 0 and change_good > 0                                  # reinforced
    h_bad, change_bad = teacher_confidence_change(teacher_weight=-3.0)    # the teacher labels every point wrongly
    assert h_bad < 0 and change_bad < 0                                    # discouraged


def test_mpl_call_order_teacher_forward_student_step_reevaluation_then_teacher_step():
    teacher, student = tiny_vit(0), tiny_vit(1)
    events: list[str] = []
    teacher.register_forward_hook(lambda m, i, o: events.append(f"teacher forward {len(i[0])}"))
    student.register_forward_hook(lambda m, i, o: events.append(f"student forward {len(i[0])}"))
    x_l, y_l = torch.randn(2, 1, 16, 16), torch.tensor([0, 1])
    u_w, u_s = torch.randn(3, 1, 16, 16), torch.randn(3, 1, 16, 16)
    meta_pseudo_labels_step(teacher, student, (x_l, y_l), (u_w, u_s), **step_kwargs(),
                            update_student=sgd_update(student, 0.1, events, "student"),
                            update_teacher=sgd_update(teacher, 0.1, events, "teacher"))
    assert events == [
        "teacher forward 8",   # [x_l, u_weak, u_strong] in one forward
        "student forward 3",   # u_strong with the teacher's pseudo labels
        "student forward 2",   # ce_old on x_l, before the student's step
        "student step",
        "student forward 2",   # ce_new of the UPDATED student
        "teacher step",        # UDA + h * MPL
    ]


# ---------------------------------------------------------------------------- data
def write_pngs(folder, names, value):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (20, 20), (value + i, 0, 0)).save(folder / f"{name}.png")


def test_semi_data_module_on_folders_gives_weak_and_strong_views(tmp_path):
    for cls, value in (("cat", 10), ("dog", 120)):
        write_pngs(tmp_path / "labeled" / "train" / cls, [f"t{i}" for i in range(3)], value)
        write_pngs(tmp_path / "labeled" / "val" / cls, ["v0"], value)
    write_pngs(tmp_path / "unlabeled", [f"u{i}" for i in range(8)], 60)
    dm = SemiSupervisedDataModule(root=str(tmp_path / "labeled"), unlabeled_root=str(tmp_path / "unlabeled"),
                                  img_size=16, batch_size=2, mu=3, labels_per_class=None, num_workers=0)
    dm.setup()
    assert (len(dm.train_set), len(dm.unlabeled_set), len(dm.val_set), dm.num_classes) == (6, 8, 2, 2)
    loaders = dm.train_dataloader()
    batch = {name: next(iter(loader)) for name, loader in loaders.items()}
    assert batch["labeled"][0].dtype == torch.uint8 and batch["unlabeled"][0].shape[0] == 6
    out = dm.on_after_batch_transfer(batch, 0)
    (x, _), (u_weak, u_strong) = out["labeled"], out["unlabeled"]
    assert x.shape == (2, 3, 16, 16) and u_weak.shape == u_strong.shape == (6, 3, 16, 16)
    assert not torch.equal(u_weak, u_strong)
    assert len(loaders["labeled"]) == len(loaders["unlabeled"]) == dm.steps_per_epoch == 1


def test_semi_data_module_clear_errors(tmp_path):
    with pytest.raises(UserError, match="fewer than --data.labels_per_class 7000"):
        SemiSupervisedDataModule(labels_per_class=7000).setup()
    write_pngs(tmp_path / "flat", ["a", "b"], 0)
    for cls in ("cat", "dog"):
        write_pngs(tmp_path / "labeled" / cls, [f"i{i}" for i in range(10)], 0)
    with pytest.raises(UserError, match="--data.unlabeled_root"):
        SemiSupervisedDataModule(root=str(tmp_path / "labeled"), labels_per_class=None, img_size=16).setup()
    with pytest.raises(UserError, match="fewer than one unlabeled batch"):
        SemiSupervisedDataModule(root=str(tmp_path / "labeled"), unlabeled_root=str(tmp_path / "flat"),
                                 labels_per_class=None, img_size=16, batch_size=2).setup()


def test_classifier_starts_from_an_exported_pretrained_encoder(tmp_path):
    from ssl_kit.encoders import build_encoder, resolve_encoder_spec
    from ssl_kit.encoders import export_encoder

    spec = resolve_encoder_spec("tiny", img_size=16, patch_size=4, in_chans=1, depth=1, embed_dim=32, num_heads=2)
    pretrained = build_encoder(spec)
    export_encoder(pretrained, spec, tmp_path / "encoder")
    # the architecture comes from the export: the "small" name and patch 8 given here are ignored
    model, built = build_classifier("small", 16, 8, 1, None, 10, str(tmp_path / "encoder"), 0.0)
    assert built.kwargs["num_classes"] == 10 and model.head.out_features == 10
    for key, value in pretrained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert model.head.weight.abs().max() < 1e-3  # predictions start uniform
    with pytest.raises(UserError, match="does not exist"):
        build_classifier("tiny", 16, 4, 1, None, 10, str(tmp_path / "missing"), 0.0)


def test_classifier_with_average_pooling_reads_the_normed_mean_patch_token(tmp_path):
    from ssl_kit.encoders import build_encoder, resolve_encoder_spec
    from ssl_kit.encoders import export_encoder
    from ssl_kit.methods.classifier import pre_logits

    spec = resolve_encoder_spec("tiny", img_size=16, patch_size=4, in_chans=1, depth=1, embed_dim=32, num_heads=2)
    export_encoder(build_encoder(spec), spec, tmp_path / "encoder")
    model, built = build_classifier("tiny", 16, 4, 1, None, 10, str(tmp_path / "encoder"), 0.0, "avg")
    assert built.kwargs["global_pool"] == "avg"
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        tokens = model.forward_features(x)  # [3, 1 + 16, 32]; the final norm moves to fc_norm under avg pooling
        assert torch.allclose(pre_logits(model.eval(), x), model.fc_norm(tokens[:, 1:].mean(dim=1)), atol=1e-6)
    with pytest.raises(UserError, match="global_pool must be token or avg"):
        build_classifier("tiny", 16, 4, 1, None, 10, None, 0.0, "max")


def tiny_uda(**kwargs):
    from types import SimpleNamespace

    from ssl_kit.methods import UDA

    module = UDA(encoder_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2}, img_size=16, **kwargs)
    module._trainer = SimpleNamespace(estimated_stepping_batches=10, global_step=0, world_size=1)
    module.log = module.log_dict = lambda *args, **kw: None
    return module


def test_uda_weak_view_target_carries_no_gradient_and_the_strong_view_does():
    module = tiny_uda(confidence_threshold=0.0)
    calls = []
    forward = module.encoder.forward
    module.encoder.forward = lambda x: calls.append((len(x), torch.is_grad_enabled())) or forward(x)
    labeled = (torch.randn(2, 1, 16, 16), torch.tensor([0, 1]))
    weak, strong = torch.randn(6, 1, 16, 16), torch.randn(6, 1, 16, 16)
    loss = module.training_step({"labeled": labeled, "unlabeled": (weak, strong)}, 0)
    assert calls == [(6, False), (2 + 6, True)]  # weak views without a graph; [labeled, strong] with one
    loss.backward()
    with_entropy = tiny_uda(confidence_threshold=0.0, entropy_weight=0.1)
    calls.clear()
    forward = with_entropy.encoder.forward
    with_entropy.encoder.forward = lambda x: calls.append((len(x), torch.is_grad_enabled())) or forward(x)
    with_entropy.training_step({"labeled": labeled, "unlabeled": (weak, strong)}, 0)
    assert calls[0] == (6, True)  # entropy minimisation on the weak predictions needs their gradient


def test_uda_layer_decay_gives_each_block_its_own_lr_and_tsa_is_off_by_default():
    from ssl_kit.methods.classifier import classifier_param_groups

    module = tiny_uda(layer_decay=0.5)
    assert module.hparams.tsa == "none"
    groups = classifier_param_groups(module.encoder, 0.05, 0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    enc = module.encoder  # depth 2: head 1, blocks.1 0.5, blocks.0 0.25, embeddings 0.125
    assert scale[id(enc.head.weight)] == 1.0 and scale[id(enc.blocks[1].attn.qkv.weight)] == 0.5
    assert scale[id(enc.blocks[0].attn.qkv.weight)] == 0.25 and scale[id(enc.patch_embed.proj.weight)] == 0.125
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert wd[id(enc.blocks[0].attn.qkv.bias)] == 0 and wd[id(enc.blocks[0].attn.qkv.weight)] == 0.05
    assert all(g["lr_scale"] == 1.0 for g in classifier_param_groups(enc, 0.05, 1.0) if "lr_scale" in g)
    with pytest.raises(UserError, match=r"layer_decay must be in \(0, 1\]"):
        tiny_uda(layer_decay=0.0)


def test_mpl_teacher_warms_up_alone_while_the_student_waits_then_both_learn():
    from types import SimpleNamespace

    from ssl_kit.methods import MetaPseudoLabels

    module = MetaPseudoLabels(encoder_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}, img_size=16,
                              warmup_epochs=0.0, student_wait_epochs=2.0)
    module._trainer = SimpleNamespace(estimated_stepping_batches=40, num_training_batches=10, accumulate_grad_batches=1,
                                      world_size=1, max_epochs=4, datamodule=SimpleNamespace(batch_size=256))
    (teacher, student) = [c["lr_scheduler"]["scheduler"] for c in module.configure_optimizers()]
    teacher_lrs, student_lrs = [], []
    for _ in range(40):
        teacher_lrs.append(teacher.optimizer.param_groups[0]["lr"])
        student_lrs.append(student.optimizer.param_groups[0]["lr"])
        teacher.optimizer.step()
        student.optimizer.step()
        teacher.step()
        student.step()
    assert all(lr > 0 for lr in teacher_lrs[:20]) and all(lr == 0 for lr in student_lrs[:20])  # 2 epochs of 10 steps
    assert all(lr > 0 for lr in student_lrs[20:39])  # then the student learns on its own cosine
    assert student_lrs[20] == pytest.approx(1e-2)  # the student's schedule starts after the wait (base 1e-2 at batch 256)


def test_a_trained_classifier_given_as_init_from_keeps_its_head_a_bare_encoder_gets_a_near_zero_one(tmp_path):
    from ssl_kit.encoders import build_encoder, resolve_encoder_spec
    from ssl_kit.encoders import export_encoder

    spec = resolve_encoder_spec("tiny", img_size=16, patch_size=4, in_chans=1, depth=1, embed_dim=32, num_heads=2,
                                num_classes=10, global_pool="avg")
    classifier = build_encoder(spec)
    torch.nn.init.normal_(classifier.head.weight, std=1.0)
    export_encoder(classifier, spec, tmp_path / "classifier")
    model, _ = build_classifier("tiny", 16, 4, 1, None, 10, str(tmp_path / "classifier"), 0.0, "avg")
    assert torch.equal(model.head.weight, classifier.head.weight)  # UDA / MPL start from the fine-tuned model
    other_pool, _ = build_classifier("tiny", 16, 4, 1, None, 10, str(tmp_path / "classifier"), 0.0, "token")
    assert other_pool.head.weight.abs().max() < 1e-3  # a head trained on another readout is not reused


def test_mpl_teacher_init_from_starts_the_teacher_from_its_own_export_and_the_student_from_init_from(tmp_path):
    """Issue #22: MPL's teacher warm-up done beforehand (a UDA export), the student from the supervised export."""
    from ssl_kit.encoders import build_encoder, export_encoder, resolve_encoder_spec
    from ssl_kit.methods import MetaPseudoLabels

    spec = resolve_encoder_spec("tiny", img_size=16, patch_size=4, in_chans=1, depth=1, embed_dim=32, num_heads=2,
                                num_classes=10, global_pool="avg")
    exports = {}
    for name in ("uda", "supervised"):
        exports[name] = build_encoder(spec)
        export_encoder(exports[name], spec, tmp_path / name)
    module = MetaPseudoLabels(img_size=16, global_pool="avg", init_from=str(tmp_path / "supervised"),
                              teacher_init_from=str(tmp_path / "uda"))
    for network, source in ((module.teacher, exports["uda"]), (module.student, exports["supervised"])):
        assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), source.state_dict().values()))
    assert not torch.equal(module.teacher.head.weight, module.student.head.weight)
    with pytest.raises(UserError, match="--model.teacher_init_from .* does not exist"):
        MetaPseudoLabels(img_size=16, global_pool="avg", teacher_init_from=str(tmp_path / "missing"))
