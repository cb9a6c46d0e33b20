"""A training DataLoader that knows its place in the epoch, so a mid-epoch checkpoint resumes at the next batch.

Lightning saves ``state_dict()`` of every training loader that has one into the checkpoint (the fit loop's
``combined_loader`` entry) and calls ``load_state_dict()`` when it resumes in the middle of an epoch; without it the
resumed epoch would start over from its first batch while the step counter continued. Lightning 2.5-2.6 skips that
call when ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (every ssl_kit method does):
:class:`RestoreLoaderPosition` makes it (Lightning-AI/pytorch-lightning#20550).
"""
from __future__ import annotations

from typing import Any, Iterator

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from ssl_kit.distributed import GlobalBatchSampler


class ResumableLoader(DataLoader):
    """DataLoader over a :class:`~ssl_kit.distributed.GlobalBatchSampler` whose state is (epoch, batches handed out).

    Iteration starts at the first ``next()``, not at ``iter()`` (Lightning calls ``iter()`` before it sets the
    sampler's epoch, and worker processes would fetch the wrong epoch's images). The count is exact because Lightning
    does not fetch ahead from loaders of known length: at a checkpoint it equals the batches trained on.
    """

    sampler: GlobalBatchSampler
    _handed_out = 0
    _pass_epoch: int | None = None  # the epoch of the pass that _handed_out counts

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self._pass_epoch, self._handed_out = self.sampler.epoch, self.sampler.batches_skipped()
        for batch in super().__iter__():
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        epoch = int(self.sampler.epoch)
        # saved before this epoch's pass began (its first batch): what the pass will skip, 0 or a pending resume
        done = self._handed_out if self._pass_epoch == epoch else self.sampler.batches_skipped()
        return {"epoch": epoch, "batches": int(done)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.sampler.resume_at(int(state_dict["epoch"]), int(state_dict["batches"]))


class RestoreLoaderPosition(pl.Callback):
    """Give the training loaders the positions a resumed checkpoint saved for them, before the first batch.

    Lightning loads them only while building the loaders, which ``estimated_stepping_batches`` makes happen before
    the checkpoint is read (Lightning-AI/pytorch-lightning#20550); this asks its fit loop to load them at the start
    of training instead (a no-op once Lightning has done it: it clears what it loaded). ResumableLoader starts
    iterating at the first batch, so the positions still apply.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        load = getattr(trainer.fit_loop, "_load_combined_loader_states", None)
        if load is not None:
            load()


class CountResumedEpoch(pl.Callback):
    """Count an epoch that began right after a resume from its predecessor's last batch as started.

    Resuming from a checkpoint written on an epoch's last batch (``--keep_every_n_steps`` at an epoch's length, or a
    SIGTERM there) makes Lightning (2.5-2.6) close that epoch and start the next one while it still considers itself
    "restarted mid-epoch": it skips the next epoch's ``ready`` / ``started`` counts. A checkpoint saved later in that
    epoch (SIGTERM, a kept step) then says the epoch has not begun, and its resume runs the whole epoch again after
    the steps already taken. While a batch runs, ``started`` must be one more than ``processed``; this restores it.
    """

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        progress = trainer.fit_loop.epoch_progress
        if progress.current.started == progress.current.processed:
            progress.increment_ready()
            progress.increment_started()
