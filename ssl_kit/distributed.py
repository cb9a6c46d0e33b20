"""Training that does not depend on the number of processes.

A run on W processes with ``b`` images each must train like one process with ``W b`` images (METHODS
and issue #10: same weights to float tolerance). Three pieces make that true:

* :class:`GlobalBatchSampler`: step ``t`` of every run sees the same global batch (one seeded
  permutation stream); process ``r`` takes the contiguous rows ``[r b, (r + 1) b)`` of it.
* :class:`DrawPlan`: random draws (augmentation, masks, box jitter) are made per *draw group* of
  ``draw_group_size`` consecutive rows of the global batch, each group under a seed of (run seed,
  step, group index, site). A group gets the same draws whichever process holds it.
* :func:`global_mean`: a loss normalised by a data-dependent count (kept examples, reliable pixels)
  divides by the count over the whole global batch, not the process's share.

DDP then averages gradients of equal-sized shards, which is the global-batch gradient.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from ssl_kit.errors import UserError


def step_seed(*parts: int | str) -> int:
    """A 63-bit seed from integers and names (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


class GlobalBatchSampler(DistributedSampler):
    """Shuffled training order that is the same global batch sequence on any number of processes.

    The order is consecutive permutations of the data set drawn from ``seed * 1_000_003 + epoch``
    (``num_samples`` images per epoch, default one pass), cut into global batches of
    ``per_device_batch * num_replicas``; process ``rank`` yields rows ``[rank b, (rank + 1) b)`` of each.
    A trailing partial global batch is dropped (one process with fewer images than a batch gets them all
    as one smaller batch). Being a DistributedSampler, Lightning keeps it under DDP
    and calls ``set_epoch``. After :meth:`resume_at` (a mid-epoch resume), the next pass over that epoch
    leaves out the batches already trained on.
    """

    def __init__(self, dataset: Dataset, per_device_batch: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 num_samples: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.per_device_batch = per_device_batch
        self.images_per_epoch = num_samples or len(dataset)
        self.steps = self.images_per_epoch // (per_device_batch * num_replicas)
        # one process with fewer images than a batch (a few-label fine-tune): one smaller batch per epoch
        self.partial = self.steps == 0 and num_replicas == 1
        if self.steps == 0 and not self.partial:
            raise UserError(
                f"{self.images_per_epoch} training images per epoch are fewer than one global batch of "
                f"{per_device_batch} x {num_replicas} processes: lower --data.batch_size or add images."
            )
        if self.partial:
            self.steps, self.per_device_batch = 1, self.images_per_epoch
        self.num_samples = self.steps * self.per_device_batch  # DistributedSampler.__len__
        self.total_size = self.num_samples * num_replicas
        self._resume: tuple[int, int] | None = None  # (epoch, batches done) of a mid-epoch resume

    def resume_at(self, epoch: int, batches: int) -> None:
        """Let the next pass over epoch ``epoch`` start after its first ``batches`` batches; a pass over any other
        epoch (the resumed epoch had ended) is whole. ``len()`` stays the whole epoch's, as Lightning counts."""
        self._resume = (epoch, batches)
        self.set_epoch(epoch)  # until Lightning sets the epoch it runs

    def batches_skipped(self) -> int:
        """Batches of this epoch that the next pass leaves out (0 unless resuming in the middle of it)."""
        return self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0

    def global_order(self) -> Tensor:
        """``[steps * W * b]`` data-set indices of this epoch (the 1-process order)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = len(self.dataset)
        need = self.total_size
        return torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(need / n))])[:need]

    def __iter__(self) -> Iterator[int]:
        skip, self._resume = self.batches_skipped(), None
        rows = self.global_order().view(self.steps, self.num_replicas, self.per_device_batch)[skip:, self.rank]
        return iter(rows.reshape(-1).tolist())


# ----------------------------------------------------------------------------- draw groups
def split_rows(value: Any, groups: int) -> list[Any]:
    """Cut a batch into ``groups`` equal parts along the rows: tensors along dim 0, lists of per-image
    items (dicts) into sub-lists, dicts and tuples entry by entry; anything else is shared by every part."""
    if isinstance(value, Tensor):
        return list(value.chunk(groups)) if groups > 1 else [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        n = len(value) // groups
        return [value[i * n:(i + 1) * n] for i in range(groups)]
    if isinstance(value, dict):  # named views of the same images: {"weak": [B, ...], "strong": [B, ...]}
        columns = {k: split_rows(v, groups) for k, v in value.items()}
        return [{k: columns[k][i] for k in value} for i in range(groups)]
    if isinstance(value, tuple):
        return list(zip(*(split_rows(v, groups) for v in value)))
    return [value] * groups


def merge_rows(parts: Sequence[Any]) -> Any:
    """Inverse of :func:`split_rows` on the outputs of each group: tensors concatenated along dim 0, lists of
    dicts joined, tuples / lists / dicts / dataclasses merged element by element, other values taken from
    the first group."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, Tensor):
        return torch.cat(list(parts))
    if isinstance(first, list) and first and all(isinstance(v, dict) for v in first):
        return [item for part in parts for item in part]
    if isinstance(first, dict):
        return {k: merge_rows([p[k] for p in parts]) for k in first}
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        return dataclasses.replace(first, **{f.name: merge_rows([getattr(p, f.name) for p in parts])
                                             for f in dataclasses.fields(first)})
    if isinstance(first, tuple) and hasattr(first, "_fields"):  # NamedTuple
        return type(first)(*(merge_rows(list(col)) for col in zip(*parts)))
    if isinstance(first, (tuple, list)):
        return type(first)(merge_rows(list(col)) for col in zip(*parts))
    return first


def _devices(value: Any) -> set[torch.device]:
    """Devices of the tensors in ``value`` and in the dicts, lists and tuples inside it."""
    if isinstance(value, Tensor):
        return {value.device}
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return set().union(*(_devices(v) for v in items)) if items else set()


@dataclasses.dataclass
class DrawPlan:
    """The random streams of one training step on one process.

    The process's rows are ``groups`` consecutive draw groups of the global batch, the first being
    ``first_group``; a group's draws at a site come from ``step_seed(seed, step, group, site)``.

    Attributes:
        seed: the run's data seed.
        step: training batches seen before this one.
        first_group: global index of this process's first group.
        groups: draw groups on this process (per-device batch / draw_group_size).
    """

    seed: int
    step: int
    first_group: int
    groups: int

    def group_seed(self, group: int, site: str) -> int:
        return step_seed(self.seed, self.step, self.first_group + group, site)

    def run(self, site: str, fn: Callable[..., Any], *inputs: Any, rows: int | None = None) -> Any:
        """``fn(*inputs)`` per draw group under the group's seed, outputs merged back along the rows.

        Args:
            site: name of the draw ("augment", "mask", ...): different sites get independent streams.
            fn: the random function; called with each group's slice of ``inputs`` (see :func:`split_rows`),
                or, when ``inputs`` is empty, with the group's row count (``rows / groups``).
            rows: the process's row count, when ``fn`` takes a count instead of tensors.
        """
        if inputs:
            pieces = list(zip(*(split_rows(x, self.groups) for x in inputs)))
        else:
            if rows is None or rows % self.groups:
                raise ValueError(f"{rows} rows cannot be cut into {self.groups} draw groups")
            pieces = [(rows // self.groups,)] * self.groups
        return merge_rows(self._per_group(site, fn, pieces, inputs))

    def _per_group(self, site: str, fn: Callable[..., Any], pieces: list[tuple], inputs: tuple) -> list[Any]:
        """``fn(*pieces[g])`` for each group g with the global RNG (CPU and the inputs' GPUs) seeded for that
        group and restored afterwards."""
        outputs = []
        cuda = [d for d in _devices(inputs) if d.type == "cuda"]
        for group, args in enumerate(pieces):
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(self.group_seed(group, site))
                outputs.append(fn(*args))
        return outputs

    def mean(self, site: str, fn: Callable[..., tuple[Tensor, dict[str, Any]]], *inputs: Any) -> tuple[Tensor, dict[str, Any]]:
        """A whole training step per draw group, as if each group were one device: ``fn(*group_inputs)``
        returns ``(loss, logs)``; the result is the mean over groups of both (what DDP's gradient averaging
        makes of the same groups on separate processes). Everything random inside ``fn`` that uses the global
        RNG (torchvision's proposal sampling, box jitter) is seeded per group."""
        results = self._per_group(site, fn, list(zip(*(split_rows(x, self.groups) for x in inputs))), inputs)
        if len(results) == 1:
            return results[0]
        loss = torch.stack([r[0] for r in results]).mean()
        logs = {k: sum(r[1][k] for r in results) / len(results) for k in results[0][1]}
        return loss, logs


def check_draw_groups(batch_size: int, draw_group_size: int | None) -> int:
    """Draw groups per process for a per-device batch (clear error when it does not divide)."""
    if draw_group_size is None:
        return 1
    if draw_group_size <= 0 or batch_size % draw_group_size:
        raise UserError(
            f"--data.draw_group_size {draw_group_size} must divide --data.batch_size {batch_size} "
            "(it is the number of images that share one random stream; leave it unset for one group per device)."
        )
    return batch_size // draw_group_size


# ----------------------------------------------------------------------------- global normalisation
def global_sum(x: Tensor) -> Tensor:
    """Sum of a (detached) statistic over all processes; ``x`` itself when not distributed."""
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


def global_mean(total: Tensor, count: Tensor) -> Tensor:
    """``sum over the global batch / max(count over the global batch, 1)`` for a loss whose normaliser
    depends on the data (kept examples, reliable pixels, summed weights).

    ``total`` (with gradient) is this process's sum; ``count`` its share of the normaliser. The result is
    scaled by the world size because DDP averages the processes' gradients: the average of the
    processes' ``W * total_r / N`` is ``sum_r total_r / N``, the 1-process loss.
    """
    if not is_distributed():
        return total / count.clamp(min=1)
    return total * dist.get_world_size() / global_sum(count.to(total.dtype)).clamp(min=1)
