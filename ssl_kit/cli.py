"""Console scripts. ``ssl-pretrain --recipe NAME [--section.key value ...]``.

A recipe is a LightningCLI YAML (``recipes/NAME.yaml`` or any path); every key can be overridden
on the command line and ``--print_config`` shows the resolved configuration. The run writes into
``runs/NAME/YYYYmmdd-HHMMSS`` (or ``--run_dir``): ``checkpoints/`` (last + best), ``metrics.csv``,
``pictures/``, ``encoder/`` (timm-loadable export) and ``config.yaml``.
"""
from __future__ import annotations

import argparse
import logging
import re
import shlex
import signal
import sys
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar, TQDMProgressBar, Timer
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ssl_kit.callbacks import CheckpointOnSignal, EncoderExport
from ssl_kit.checkpointing import (newest_checkpoint, remove_partial_writes, require_matching_checkpoint,
                                   require_readable_checkpoint)
from ssl_kit.data.resumable import CountResumedEpoch, RestoreLoaderPosition
from ssl_kit.errors import UserError, find_user_error
from ssl_kit.eval.knn import KNNMonitor, knn_unscorable
from ssl_kit.qscore import QScoreMonitor, QScoreRegularizer
from ssl_kit.methods.base import SSLMethod
from ssl_kit.precision import Trainer
from ssl_kit.runtime import setup_logging, tune_cpu_allocator
from ssl_kit.teacher import EMATeacher
from ssl_kit.validation import check_trainer_settings

log = logging.getLogger("ssl_kit")

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"


def available_recipes() -> list[str]:
    """Names of the recipes shipped with the package."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def resolve_recipe(name_or_path: str) -> Path:
    """A shipped recipe name or a path to a YAML file -> the YAML path (clear error otherwise)."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise UserError(f"Recipe file {path} does not exist. Shipped recipes: {', '.join(available_recipes())}.")
        return path
    shipped = RECIPE_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise UserError(
            f"Unknown recipe {name_or_path!r}. Available: {', '.join(available_recipes())} "
            "(or pass a path to your own YAML)."
        )
    return shipped


def pop_option(argv: list[str], name: str) -> tuple[str | None, list[str]]:
    """Remove ``--name VALUE`` or ``--name=VALUE`` from argv, returning the value."""
    out, value, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == name:
            if i + 1 >= len(argv):
                raise UserError(f"{name} needs a value.")
            value, i = argv[i + 1], i + 2
            continue
        if arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
        else:
            out.append(arg)
        i += 1
    return value, out


class PretrainCLI(LightningCLI):
    """LightningCLI with run folders, default callbacks and data-to-model links."""

    recipe_name: str = "custom"

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_dir", type=str | None, default=None, help="Output folder (default runs/RECIPE/TIME).")
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="Checkpoint to resume from; 'last': the newest of RUN_DIR/checkpoints/last.ckpt and "
                            "RUN_DIR/hpc_ckpt_N.ckpt (SLURM requeue), a fresh start when there is none.")
        parser.add_argument("--knn_every_n_epochs", type=int, default=1, help="k-NN monitor frequency (0 = off).")
        parser.add_argument("--keep_every_n_steps", type=int, default=0,
                            help="Also keep a checkpoint every N optimizer steps, never overwritten: "
                            "RUN_DIR/checkpoints/steps/step=NNNNNN.ckpt (0 = off); --ckpt_path one of them continues "
                            "from that state, e.g. with other settings.")
        parser.add_argument("--qscore", type=bool, default=False,
                            help="Add the Q-score regulariser (lambda 1e-4, 1e-4) and the Q-score/sparsity monitor.")
        parser.add_argument("--init_weights", type=str | None, default=None,
                            help="Start from the weights of this ssl_kit checkpoint (fresh optimizer and schedule).")
        parser.link_arguments("data.img_size", "model.init_args.img_size", apply_on="instantiate")
        parser.link_arguments("data.in_chans", "model.init_args.in_chans", apply_on="instantiate")

    def run_dir(self) -> Path:
        cfg = self.config
        if cfg.get("run_dir"):
            return Path(cfg["run_dir"])
        ckpt = cfg.get("ckpt_path")
        if ckpt == "last":
            raise UserError("--ckpt_path last resumes the newest checkpoint of a run folder: pass --run_dir too.")
        if ckpt and Path(ckpt).parent.name == "checkpoints":
            return Path(ckpt).parent.parent  # resume continues the same run folder
        return Path("runs") / self.recipe_name / time.strftime("%Y%m%d-%H%M%S")

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; an error that is not already a UserError (a setting no check anticipated,
        raised from deep inside timm or torch) becomes one line naming what failed, instead of jsonargparse's
        ten-line "Does not validate against any of the Union subtypes"."""
        try:
            super().instantiate_classes()
        except Exception as err:
            if find_user_error(err) is not None:
                raise
            raise UserError(f"these settings could not be built: {condense_parse_error(str(err))}") from err

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        check_trainer_settings(self.config["trainer"])
        run_dir = self.run_dir()
        require_writable_folder(run_dir)
        self.run_path = run_dir
        dm = self.datamodule
        dm.setup("fit")  # fail on bad data now, before anything is written
        if rank_zero_only.rank == 0:
            remove_partial_writes(run_dir)
        knn_every = int(self.config.get("knn_every_n_epochs", 1))
        # k-NN on data it cannot score (no labeled held-out split, one class) would log a meaningless top-1 and
        # pick a "best" checkpoint by it: the best is then simply the last
        method_monitor = self.model.checkpoint_monitor  # classifiers follow their val_top1, U2PL its mIoU, ...
        self.unscored = knn_unscorable(dm) if knn_every > 0 and method_monitor is None else None
        monitor = method_monitor or (("knn_top1", "max") if knn_every > 0 else ("train_loss_epoch", "min"))
        if hasattr(dm, "save_subset"):
            save_labeled_subset(dm, run_dir)
        checkpoints = run_dir / "checkpoints"
        self.checkpoint = None if self.unscored else ModelCheckpoint(
            dirpath=checkpoints,
            filename="best-epoch{epoch:03d}-" + monitor[0].split("_")[0] + "{" + monitor[0] + ":.4f}",
            auto_insert_metric_name=False,
            monitor=monitor[0],
            mode=monitor[1],
            save_top_k=1,
        )
        if self.unscored and rank_zero_only.rank == 0:
            log.info("no k-NN score (%s): the best checkpoint is the last one, %s", self.unscored,
                     checkpoints / "last.ckpt")
        # Lightning >= 2.5 writes save_last only when a top-k file was written in the same step, so
        # the latest state gets its own unmonitored checkpoint, overwritten every epoch.
        self.last_checkpoint = ModelCheckpoint(
            dirpath=checkpoints, filename="last", save_top_k=1, enable_version_counter=False
        )
        self.on_signal = CheckpointOnSignal(checkpoints / "last.ckpt")
        callbacks: list[pl.Callback] = list(self.config_init["trainer"].get("callbacks") or [])
        callbacks += [c for c in (self.checkpoint, self.last_checkpoint) if c is not None]
        keep_every = int(self.config.get("keep_every_n_steps") or 0)
        if keep_every < 0:
            raise UserError(f"--keep_every_n_steps must be >= 0 (0 = keep no step checkpoints), got {keep_every}.")
        if keep_every:
            callbacks.append(ModelCheckpoint(dirpath=checkpoints / "steps", filename="step={step:06d}",
                                             auto_insert_metric_name=False, every_n_train_steps=keep_every, save_top_k=-1))
        callbacks += [self.on_signal, RestoreLoaderPosition(), CountResumedEpoch(), LearningRateMonitor(logging_interval="step")]
        if self.config_init["trainer"].get("max_time") is None:  # with --trainer.max_time Lightning adds its own Timer
            callbacks.append(Timer(verbose=False))  # training time, kept in every checkpoint and summed over resumes
        if self.config_init["trainer"].get("enable_progress_bar", True) is not False:
            callbacks.append(RichProgressBar() if sys.stdout.isatty() else TQDMProgressBar(refresh_rate=20))
        if knn_every > 0 and not self.unscored and getattr(dm, "has_labels", False):
            callbacks.append(KNNMonitor(every_n_epochs=knn_every))
        callbacks += self.model.method_callbacks(run_dir / "pictures")  # its pictures and EMA teacher
        if sum(isinstance(c, EMATeacher) for c in callbacks) > 1:
            raise UserError(f"{type(self.model).__name__} brings its own EMA teacher; remove ssl_kit.teacher.EMATeacher "
                            "from --trainer.callbacks (it would update the teacher twice per step) and set its momentum "
                            "with the method's settings (e.g. --model.teacher_momentum, --model.ema_decay).")
        callbacks.append(EncoderExport(run_dir / "encoder"))
        if self.config.get("qscore"):
            callbacks += [QScoreRegularizer(), QScoreMonitor(run_dir / "pictures")]
        logger = self.config_init["trainer"].get("logger")
        if logger in (None, True):
            keep_earlier_metrics(run_dir)
            logger = CSVLogger(save_dir=str(run_dir), name="", version="")
        kwargs.update(default_root_dir=str(run_dir), callbacks=callbacks, logger=logger)
        trainer = super().instantiate_trainer(**kwargs)
        if trainer.world_size > 1:  # too few images for one global batch: say so once, before processes start
            dm.trainer = trainer
            try:
                dm.train_dataloader()
            finally:
                dm.trainer = None
        return trainer


def require_writable_folder(run_dir: Path) -> None:
    """One clear error, before anything is written, when ``run_dir`` cannot be made or written (a file in the way,
    no permission, a read-only file system); nothing is left behind by the check."""
    existing = run_dir.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"--run_dir {run_dir}: {existing} is a file, not a folder. Pass another --run_dir.")
    try:
        tempfile.TemporaryDirectory(dir=existing, prefix=".ssl_kit-write-test-").cleanup()
    except OSError as err:
        raise UserError(f"--run_dir {run_dir} cannot be written ({err.strerror} in {existing}): pass a folder you "
                        "can write to.") from err


@rank_zero_only
def keep_earlier_metrics(run_dir: Path) -> None:
    """A resumed (or requeued) run writes into the same folder, where Lightning's CSVLogger deletes the earlier
    ``metrics.csv``: keep it as ``metrics.partN.csv`` (N = 1, 2, ...) instead."""
    metrics = run_dir / "metrics.csv"
    if not metrics.is_file():
        return
    part = 1
    while (run_dir / f"metrics.part{part}.csv").exists():
        part += 1
    metrics.rename(run_dir / f"metrics.part{part}.csv")
    log.info("earlier metrics of this run folder kept as %s", run_dir / f"metrics.part{part}.csv")


@rank_zero_only
def save_labeled_subset(dm: pl.LightningDataModule, run_dir: Path) -> None:
    """Write the data module's labeled subset (few-label runs) into the run folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    dm.save_subset(run_dir / "labeled_subset.json")


def load_initial_weights(model: pl.LightningModule, path: Path) -> None:
    """Copy the weights of a checkpoint of the same method and architecture into ``model``."""
    if not path.is_file():
        raise UserError(f"--init_weights {path}: no such checkpoint.")
    state = torch.load(path, map_location="cpu", weights_only=False).get("state_dict", {})
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise UserError(
            f"--init_weights {path} does not match this recipe's model (same method and encoder sizes needed): "
            f"{str(err).splitlines()[0]}"
        ) from err
    logging.getLogger("ssl_kit").info("initial weights from %s", path)


def condense_parse_error(message: str) -> str:
    """jsonargparse's multi-line error (``Parser key "model": Does not validate ... Errors: - Problem with given
    class_path ...: Parser key "mask_ratio": Expected a <class 'float'>. Got value: abc``) as one line naming the flag:
    ``--model.mask_ratio: expected a float, got abc``."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    flag = "--" + ".".join(keys) if keys else ""
    cls = re.search(r"class_path '[\w.]*?(\w+)'", message)
    option = re.search(r"Option '([^']+)' is not accepted", message)
    if option:
        owner = f" of {cls.group(1)}" if cls else ""
        return (f"{flag}.{option.group(1)} is not an option{owner}: add --print_config to the command to see the "
                "accepted ones.")
    structural = ("Does not validate", "Subtypes:", "Errors:", "- Expected a <class 'NoneType'>", "Given value",
                  "Parser key", "- Problem with given class_path")
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    detail = next((line for line in lines if not line.startswith(structural)), lines[0] if lines else message)
    detail = re.sub(r"<class '([\w.]+)'>", r"\1", detail.lstrip("- "))
    return f"{flag}: {detail}" if flag else detail


def pretrain_main(args: Sequence[str] | None = None) -> int:
    """Entry point of ``ssl-pretrain``; returns the process exit code."""
    setup_logging()
    tune_cpu_allocator()
    argv = list(sys.argv[1:] if args is None else args)
    argv_given = list(argv)
    try:
        recipe, argv = pop_option(argv, "--recipe")
        if recipe is None and not any(a == "--config" or a.startswith("--config=") for a in argv):
            if any(a in ("-h", "--help") for a in argv):
                print(f"ssl-pretrain --recipe NAME [overrides]; recipes: {', '.join(available_recipes())}")
            else:
                raise UserError(f"Choose a recipe: ssl-pretrain --recipe NAME, with NAME one of {', '.join(available_recipes())}.")
        ckpt_arg, _ = pop_option(list(argv), "--ckpt_path")  # read only: the parser takes it from argv
        if ckpt_arg and ckpt_arg != "last":
            require_readable_checkpoint(Path(ckpt_arg))
        PretrainCLI.recipe_name = Path(recipe).stem if recipe else "custom"
        if recipe is not None:
            argv = ["--config", str(resolve_recipe(recipe))] + argv
        if torch.cuda.is_available():
            torch.set_float32_matmul_precision("high")
        # LightningCLI warns whenever args= is given while sys.argv has arguments; ours are sys.argv's own,
        # rewritten (--recipe -> --config), so the warning is noise before every run
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        # Lightning 2.6 on torch >= 2.10: internal deprecation and a size estimate it cannot make; neither is actionable
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        warnings.filterwarnings("ignore", message="Precision bf16-mixed is not supported by the model summary")
        # the run folder holds config.yaml before the logger starts, and keep_earlier_metrics already moved an
        # earlier metrics.csv aside: CSVLogger's "previous log files will be deleted" is not true here
        warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
        cli = PretrainCLI(
            SSLMethod,
            pl.LightningDataModule,
            trainer_class=Trainer,  # --trainer.precision auto (the recipes' default) picks bf16 where it is native
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=argv,
            run=False,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "ssl-pretrain", "default_env": False, "exit_on_error": False},
        )
        if cli.config.get("init_weights"):
            load_initial_weights(cli.model, Path(cli.config["init_weights"]))
        ckpt_path = cli.config.get("ckpt_path")
        if ckpt_path == "last":
            ckpt_path = newest_checkpoint(cli.run_path)
            if ckpt_path is None and rank_zero_only.rank == 0:
                log.info("--ckpt_path last: no checkpoint in %s yet, starting fresh", cli.run_path)
        if ckpt_path:
            require_matching_checkpoint(cli.model, Path(ckpt_path))
            if rank_zero_only.rank == 0:
                log.info("resuming from %s", ckpt_path)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    except argparse.ArgumentError as err:  # an unknown option or a value of the wrong type (exit_on_error=False)
        print(f"ssl-pretrain: error: {condense_parse_error(err.message)}", file=sys.stderr)
        return 2
    except SIGTERMException:  # Lightning stopped at a step boundary; CheckpointOnSignal saved the state there
        return stopped_by_signal(cli, argv_given)
    except Exception as err:  # a UserError, possibly wrapped by jsonargparse while instantiating classes
        user_error = find_user_error(err)
        if user_error is None:
            raise
        print(f"ssl-pretrain: error: {user_error}", file=sys.stderr)
        return 2
    if cli.trainer.is_global_zero:
        print_summary(cli)
    return 0


def resume_command(argv: list[str], run_dir: Path) -> str:
    """The ``ssl-pretrain`` command line that resumes ``run_dir`` from its newest checkpoint."""
    _, argv = pop_option(argv, "--ckpt_path")
    _, argv = pop_option(argv, "--run_dir")
    return shlex.join(["ssl-pretrain", *argv, "--ckpt_path", "last", "--run_dir", str(run_dir)])


def stopped_by_signal(cli: PretrainCLI, argv: list[str]) -> int:
    """After SIGTERM (or SIGUSR1): say where the checkpoint is and how to resume; the exit code is 128 + the
    signal's number, as for a process the signal ended, so schedulers and scripts see an unfinished run."""
    on_signal = cli.on_signal
    if rank_zero_only.rank == 0:
        if on_signal.saved is not None:
            print(f"ssl-pretrain: stopped by {on_signal.signal_name} at step {cli.trainer.global_step}; checkpoint "
                  f"{on_signal.saved}. Resume with: {resume_command(argv, cli.run_path)}", file=sys.stderr)
        else:
            print(f"ssl-pretrain: stopped by {on_signal.signal_name} before the first training step; nothing to "
                  "save.", file=sys.stderr)
    return 128 + int(getattr(signal, on_signal.signal_name))


def print_summary(cli: PretrainCLI) -> None:
    """Tell the user where everything went."""
    run = cli.run_path
    ckpt = cli.checkpoint
    lines = [f"run folder: {run}"]
    if cli.last_checkpoint.best_model_path:
        lines.append(f"  last checkpoint: {cli.last_checkpoint.best_model_path}")
    if ckpt is None:
        lines.append(f"  best checkpoint: the last one (no k-NN score: {cli.unscored})")
    elif ckpt.best_model_path:
        score = f" ({ckpt.monitor} {float(ckpt.best_model_score):.4f})" if ckpt.best_model_score is not None else ""
        lines.append(f"  best checkpoint: {ckpt.best_model_path}{score}")
    logger = cli.trainer.logger
    if isinstance(logger, CSVLogger):
        lines.append(f"  metrics: {Path(logger.log_dir) / 'metrics.csv'}")
    pictures = run / "pictures"
    if pictures.is_dir():
        lines.append(f"  pictures: {pictures}")
    lines.append(f"  encoder (timm): {run / 'encoder'}")
    timer = next((c for c in cli.trainer.callbacks if isinstance(c, Timer)), None)
    if timer is not None:
        lines.append(f"  training time: {timedelta(seconds=round(timer.time_elapsed('train')))} (over all resumes)")
    print("\n".join(lines))


def main() -> None:
    sys.exit(pretrain_main())


if __name__ == "__main__":
    main()
