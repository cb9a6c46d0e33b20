"""The pieces that make training independent of the number of processes (ssl_kit/distributed.py)."""
import logging
import os
import socket
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl_kit.data.augment import TrainAugment
from ssl_kit.data.module import log_world_change
from ssl_kit.data.resumable import ResumableLoader
from ssl_kit.distributed import (DrawPlan, GlobalBatchSampler, check_draw_groups, global_mean, merge_rows, split_rows,
                                 step_seed)
from ssl_kit.encoders import random_masking
from ssl_kit.errors import UserError


def test_global_batch_sampler_two_ranks_share_the_one_process_batches():
    data = list(range(50))
    one = list(GlobalBatchSampler(data, per_device_batch=6, num_replicas=1, rank=0, seed=3))
    ranks = [list(GlobalBatchSampler(data, per_device_batch=3, num_replicas=2, rank=r, seed=3)) for r in (0, 1)]
    assert len(one) == 48 and len(ranks[0]) == len(ranks[1]) == 24  # 8 global batches of 6, the rest dropped
    for step in range(8):
        # the global batch at step t is the 1-process batch; rank r holds the contiguous rows [3r, 3r + 3)
        assert one[6 * step:6 * step + 6] == ranks[0][3 * step:3 * step + 3] + ranks[1][3 * step:3 * step + 3]
    assert sorted(one) == sorted(set(one))  # one pass: no image twice


def test_global_batch_sampler_epochs_and_long_epochs():
    data = list(range(10))
    s = GlobalBatchSampler(data, per_device_batch=4, num_replicas=1, seed=0, num_samples=25)
    first = list(s)
    assert len(first) == 24 and sorted(first[:10]) == data and sorted(first[10:20]) == data  # consecutive permutations
    s.set_epoch(1)
    assert list(s) != first
    s.set_epoch(0)
    assert list(s) == first  # as after a resume
    with pytest.raises(UserError, match="fewer than one global batch of 4 x 4 processes"):
        GlobalBatchSampler(data, per_device_batch=4, num_replicas=4)
    small = GlobalBatchSampler(data, per_device_batch=16)  # one process, fewer images than a batch: all of them
    assert small.partial and sorted(small) == data


def test_resumable_loader_saves_its_place_and_a_resume_continues_from_it():
    """A mid-epoch checkpoint's loader state makes the resumed epoch hand out exactly the batches it had left; a
    state saved at an epoch's end leaves the next epoch whole."""
    data = torch.arange(40)

    def loader() -> ResumableLoader:
        return ResumableLoader(data, batch_size=4, sampler=GlobalBatchSampler(data, per_device_batch=4, seed=3))

    first = loader()
    first.sampler.set_epoch(1)
    whole = [b.tolist() for b in first]
    it = iter(first)
    done = [next(it).tolist() for _ in range(3)]
    assert done == whole[:3] and first.state_dict() == {"epoch": 1, "batches": 3}

    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    batches = iter(resumed)  # Lightning calls iter() before it sets the epoch: nothing is drawn yet
    resumed.sampler.set_epoch(1)
    assert [b.tolist() for b in batches] == whole[3:] and len(resumed) == 10
    assert resumed.state_dict() == {"epoch": 1, "batches": 10}
    assert [b.tolist() for b in resumed] == whole  # the next pass over the epoch is whole again

    ended = loader()
    ended.load_state_dict({"epoch": 0, "batches": 10})  # saved at epoch 0's end, resumed in epoch 1
    assert ended.state_dict() == {"epoch": 0, "batches": 10}  # saved again before Lightning set the epoch
    ended.sampler.set_epoch(1)
    assert ended.state_dict() == {"epoch": 1, "batches": 0}  # ... or after, before epoch 1's first batch
    assert [b.tolist() for b in ended] == whole
    ended.sampler.set_epoch(2)
    assert ended.state_dict() == {"epoch": 2, "batches": 0}  # not epoch 1's count


def test_draw_groups_make_draws_independent_of_the_process_split():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 28, 28), dtype=torch.uint8)
    augment = TrainAugment(32, [0.5] * 3, [0.25] * 3, color_jitter=0.4)
    # one process holding groups 0 and 1, vs two processes holding one group each
    together = DrawPlan(seed=5, step=7, first_group=0, groups=2)
    halves = [DrawPlan(seed=5, step=7, first_group=g, groups=1) for g in (0, 1)]
    views = together.run("augment", augment, images)
    assert torch.equal(views, torch.cat([halves[0].run("augment", augment, images[:4]),
                                         halves[1].run("augment", augment, images[4:])]))
    mask = together.run("mask", lambda n: random_masking(n, 64, 0.75), rows=8)
    parts = [h.run("mask", lambda n: random_masking(n, 64, 0.75), rows=4) for h in halves]
    assert torch.equal(mask.ids_keep, torch.cat([p.ids_keep for p in parts]))
    assert torch.equal(mask.mask, torch.cat([p.mask for p in parts])) and int(mask.mask.sum()) == 8 * 48
    # sites, steps and groups draw independently; the global RNG outside is left as it was
    state = torch.random.get_rng_state()
    other_site = together.run("mask2", lambda n: random_masking(n, 64, 0.75), rows=8)
    assert not torch.equal(other_site.ids_keep, mask.ids_keep)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not torch.equal(views[:4], views[4:])
    assert len({step_seed(5, 7, g, "mask") for g in range(4)} | {step_seed(5, 8, 0, "mask")}) == 5


@dataclass
class Pair:
    a: torch.Tensor
    name: str


def test_split_and_merge_rows_keep_structure():
    x = torch.arange(12).view(6, 2)
    targets = [{"boxes": torch.zeros(i, 4)} for i in range(6)]
    parts = [split_rows(x, 3), split_rows(targets, 3), split_rows("shared", 3)]
    assert [p.shape[0] for p in parts[0]] == [2, 2, 2] and [len(p) for p in parts[1]] == [2, 2, 2]
    assert parts[2] == ["shared"] * 3
    outputs = [(xs * 2, ts, [xs, xs + 1], {"k": Pair(xs, "n")}) for xs, ts in zip(parts[0], parts[1])]
    merged = merge_rows(outputs)
    assert torch.equal(merged[0], x * 2) and merged[1] == targets
    assert torch.equal(merged[2][1], x + 1) and torch.equal(merged[3]["k"].a, x) and merged[3]["k"].name == "n"


def test_draw_group_size_must_divide_the_batch():
    assert check_draw_groups(8, None) == 1 and check_draw_groups(8, 2) == 4
    with pytest.raises(UserError, match="must divide --data.batch_size 8"):
        check_draw_groups(8, 3)


def test_world_change_is_reported(ssl_caplog):
    saved = {"world_size": 2, "batch_size": 4, "accumulate_grad_batches": 1}
    log_world_change(saved, world=1, accumulate=1, batch_size=8)
    assert "resuming a run of 2 process(es) x 4 images x 1 accumulation on 1 x 8 x 1: the same global batch of 8" \
        in ssl_caplog.text
    ssl_caplog.clear()
    with ssl_caplog.at_level(logging.WARNING, logger="ssl_kit"):
        log_world_change(saved, world=1, accumulate=1, batch_size=4)
    assert "the global batch changes 8 -> 4" in ssl_caplog.text
    ssl_caplog.clear()
    log_world_change(saved, world=2, accumulate=1, batch_size=4)
    assert ssl_caplog.text == ""


def _global_mean_worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    values = [torch.tensor([1.0, 2.0, 3.0], requires_grad=True), torch.tensor([10.0], requires_grad=True)][rank]
    loss = global_mean(values.sum(), torch.tensor(len(values)))
    loss.backward()
    grads = [torch.zeros(1) for _ in range(2)]
    dist.all_gather(grads, values.grad[:1].clone())
    losses = [torch.zeros(()) for _ in range(2)]
    dist.all_gather(losses, loss.detach())
    if rank == 0:
        out["mean_of_losses"] = float(sum(losses) / 2)
        out["grads"] = [float(g) for g in grads]
    dist.destroy_process_group()


def test_global_mean_over_two_processes_is_the_one_process_mean():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_global_mean_worker, args=(port, out), nprocs=2)
    # 1 process: (1 + 2 + 3 + 10) / 4 = 4; DDP averages the processes' gradients: each row gets 1/4
    assert out["mean_of_losses"] == pytest.approx(4.0)
    assert [g / 2 for g in out["grads"]] == pytest.approx([0.25, 0.25])
    assert global_mean(torch.tensor(16.0), torch.tensor(4)) == 4.0 and global_mean(torch.tensor(0.0), torch.tensor(0)) == 0.0
