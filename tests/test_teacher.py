import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ssl_kit.teacher import EMATeacher, cosine_momentum, ema_update, inverse_momentum, make_ema_copy


def test_cosine_momentum_values():
    assert cosine_momentum(0, 1000) == pytest.approx(0.996)
    assert cosine_momentum(500, 1000) == pytest.approx(0.998)
    assert cosine_momentum(1000, 1000) == pytest.approx(1.0)


def test_inverse_momentum_values():
    assert [inverse_momentum(i, 0.999) for i in (0, 1, 2)] == pytest.approx([0.0, 0.5, 2 / 3])
    assert inverse_momentum(999, 0.999) == pytest.approx(0.999)
    assert inverse_momentum(10**6, 0.99) == pytest.approx(0.99)


def test_ema_update_rule_and_integer_buffers():
    student = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    teacher = make_ema_copy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(1.0)
        for p in teacher.parameters():
            p.fill_(0.0)
    student[1].num_batches_tracked.fill_(7)
    student[1].running_mean.fill_(2.0)
    ema_update(student, teacher, momentum=0.75)
    assert all(torch.allclose(p, torch.full_like(p, 0.25)) for p in teacher.parameters())
    assert teacher[1].num_batches_tracked.item() == 7  # copied, not averaged
    assert torch.allclose(teacher[1].running_mean, torch.full((2,), 0.5))  # 0.75 * 0 + 0.25 * 2
    assert all(not p.requires_grad for p in teacher.parameters())


def test_momentum_zero_is_a_full_copy():
    student = nn.Linear(3, 3)
    teacher = make_ema_copy(nn.Linear(3, 3))
    ema_update(student, teacher, inverse_momentum(0))
    assert torch.equal(teacher.weight, student.weight)


class ToyWithTeacher(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.student = nn.Linear(4, 1)
        self.ema_teacher = make_ema_copy(self.student)
        self.snapshots = []

    def ema_pairs(self):
        return [(self.student, self.ema_teacher)]

    def training_step(self, batch, batch_idx):
        return self.student(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), lr=0.1)


class RecordSteps(pl.Callback):
    """Snapshot student and teacher after every optimizer step (to replay the EMA by hand)."""

    def __init__(self, ema):
        self.ema, self.records = ema, []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.records.append((trainer.global_step, self.ema.last_momentum, pl_module.student.weight.detach().clone(), pl_module.ema_teacher.weight.detach().clone()))


def test_ema_callback_once_per_optimizer_step_with_accumulation(tmp_path):
    torch.manual_seed(0)
    model = ToyWithTeacher()
    ema = EMATeacher(schedule="inverse", cap=0.9)
    calls = []
    original = ema.momentum
    ema.momentum = lambda step, total: calls.append(step) or original(step, total)
    record = RecordSteps(ema)
    loader = DataLoader(TensorDataset(torch.randn(12, 4)), batch_size=2)  # 6 batches
    trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=3, callbacks=[ema, record], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    teacher0 = model.ema_teacher.weight.detach().clone()
    trainer.fit(model, loader)
    assert trainer.global_step == 2
    assert calls == [0, 1]  # 6 micro-batches, 2 optimizer steps -> 2 updates, momentum 0 then 0.5
    # replay: update after step 0 is a full copy; after step 1 the 0.5 average
    w_after_0 = record.records[2][2]
    w_after_1 = record.records[5][2]
    assert torch.equal(record.records[2][3], w_after_0)
    assert torch.allclose(model.ema_teacher.weight, 0.5 * w_after_0 + 0.5 * w_after_1)
    assert not torch.equal(model.ema_teacher.weight, teacher0)
    assert model.ema_teacher.weight.grad is None


def test_ema_callback_needs_explicit_pairs(tmp_path):
    class NoTeacher(ToyWithTeacher):
        ema_pairs = None

    trainer = pl.Trainer(max_epochs=1, callbacks=[EMATeacher()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(TypeError, match="ema_pairs"):
        trainer.fit(NoTeacher(), DataLoader(TensorDataset(torch.randn(4, 4)), batch_size=2))


def test_burn_in_cap_holds_until_the_burn_in_epochs_end(tmp_path):
    """Soft Teacher's burn_in_ema_decay: the inverse schedule is capped at ``burn_in_cap`` for the first
    ``burn_in_epochs`` (6 steps here), at ``cap`` from then on; the count of steps runs on (no restart)."""
    model = ToyWithTeacher()
    ema = EMATeacher(schedule="inverse", cap=0.9, burn_in_cap=0.5, burn_in_epochs=1)
    record = RecordSteps(ema)
    trainer = pl.Trainer(max_epochs=2, callbacks=[ema, record], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(TensorDataset(torch.randn(12, 4)), batch_size=2))
    momenta = [m for _, m, _, _ in record.records]
    assert momenta == pytest.approx([0.0, 0.5, 0.5, 0.5, 0.5, 0.5, 6 / 7, 7 / 8, 8 / 9, 0.9, 0.9, 0.9])
    assert EMATeacher(schedule="inverse", cap=0.9).momentum(3, 12) == pytest.approx(0.75)  # no burn-in cap
