"""Evaluation commands: ``ssl-knn``, ``ssl-linear-probe``, ``ssl-finetune``, ``ssl-export``.

Each takes ``--ckpt`` (a checkpoint of any ssl_kit method), ``--encoder`` (an export folder) or
``--random_init NAME`` (a baseline; ``--random_init same`` with ``--ckpt`` / ``--encoder``: that network at its
method's own initialisation), ``--data.*`` like ssl-pretrain (default: Fashion-MNIST
train/test), writes ``metrics.json`` and a CSV into ``--out`` (default ``runs/eval/COMMAND/TIME``)
and prints the headline figure. Probe and fine-tune also take ``--trainer.*`` Lightning flags.
"""
from __future__ import annotations

import csv
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import pytorch_lightning as pl
import timm
import torch
from pytorch_lightning.cli import LightningArgumentParser
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from ssl_kit.data.classification import ClassificationDataModule
from ssl_kit.data.module import EpochSeededRandomSampler
from ssl_kit.encoders import (
    EncoderSource,
    encoder_record,
    export_encoder,
    load_encoder,
    read_checkpoint,
    select_attention_kernel,
)
from ssl_kit.encoders.features import encoder_features, feature_dim
from ssl_kit.errors import UserError, find_user_error
from ssl_kit.eval.finetune import FineTune
from ssl_kit.eval.knn import extract_features, feature_batch_size, weighted_knn
from ssl_kit.eval.linear_probe import LinearProbe
from ssl_kit.precision import Trainer, autocast_dtype, resolve_precision
from ssl_kit.runtime import setup_logging, tune_cpu_allocator

log = logging.getLogger("ssl_kit")

# Dashed spellings from the docs -> the parser's names.
ALIASES = {"--random-init": "--random_init", "--cached-features": "--cached_features",
           "--labels-per-class": "--data.labels_per_class"}
TRAINER_SKIP = {"logger", "callbacks", "default_root_dir", "enable_checkpointing"}


def normalise_argv(argv: Sequence[str]) -> list[str]:
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        out.append(ALIASES.get(name, name) + eq + value)
    return out


def base_parser(prog: str, description: str, with_trainer: bool) -> LightningArgumentParser:
    parser = LightningArgumentParser(prog=prog, description=description, default_env=False)
    parser.add_argument("--ckpt", type=str | None, default=None, help="ssl_kit method checkpoint")
    parser.add_argument("--encoder", type=str | None, default=None, help="exported encoder folder")
    parser.add_argument("--random_init", type=str | None, default=None,
                        help="preset or timm name, random weights; 'same' with --ckpt / --encoder: that network "
                             "at its method's own initialisation (the like-for-like baseline)")
    parser.add_argument("--patch_size", type=int, default=16, help="patch size for --random_init")
    parser.add_argument("--encoder_kwargs", type=dict | None, default=None, help="ViT kwargs for --random_init")
    parser.add_argument("--out", type=str | None, default=None, help="output folder")
    parser.add_class_arguments(ClassificationDataModule, "data", instantiate=False)
    if with_trainer:
        parser.add_class_arguments(Trainer, "trainer", instantiate=False, skip=TRAINER_SKIP)
    else:
        parser.add_argument("--precision", type=Literal["auto", "32-true", "bf16-mixed"], default="auto",
                            help="forward passes: auto (bf16 where the processor has it natively), 32-true or bf16-mixed")
    return parser


def run_command(prog: str, body: Callable[[list[str]], dict[str, Any]], args: Sequence[str] | None) -> int:
    """Shared wrapper: logging, allocator, clear user errors (exit 2)."""
    setup_logging()
    tune_cpu_allocator()
    try:
        body(normalise_argv(sys.argv[1:] if args is None else args))
    except Exception as err:
        user_error = find_user_error(err)
        if user_error is None:
            raise
        print(f"{prog}: error: {user_error}", file=sys.stderr)
        return 2
    return 0


def output_dir(cfg: Any, command: str) -> Path:
    out = Path(cfg.out) if cfg.out else Path("runs") / "eval" / command / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    return out


def prepare(cfg: Any, command: str) -> tuple[ClassificationDataModule, Path, EncoderSource, float]:
    """Data (set up, so bad data fails before anything is written), output folder, encoder source, start time.
    Every random draw of the run follows ``--data.seed`` (the labeled subset too)."""
    start = time.perf_counter()
    data = ClassificationDataModule(**cfg.data)
    data.setup()
    pl.seed_everything(data.seed, workers=True, verbose=False)  # head init, augmentation, drop-path: one seed per run
    return data, output_dir(cfg, command), source_of(cfg), start


def source_of(cfg: Any) -> EncoderSource:
    return EncoderSource(cfg.ckpt, cfg.encoder, cfg.random_init, cfg.patch_size, cfg.encoder_kwargs)


def write_metrics(out: Path, metrics: dict[str, Any]) -> None:
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")


def device_of(cfg: Any) -> torch.device:
    accelerator = getattr(getattr(cfg, "trainer", None), "accelerator", "auto")
    use_cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    return torch.device("cuda" if use_cuda else "cpu")


def feature_precision(cfg: Any) -> torch.dtype | None:
    """Autocast dtype of feature extraction: ``--precision`` (ssl-knn) or ``--trainer.precision``, ``auto`` resolved
    for the hardware (:mod:`ssl_kit.precision`)."""
    trainer = getattr(cfg, "trainer", None)
    precision = trainer.precision if trainer is not None else cfg.precision
    accelerator = trainer.accelerator if trainer is not None else "auto"
    return autocast_dtype(resolve_precision(precision, accelerator))


# readouts of checkpoints written before the record carried one: each method's paper readout
PAPER_READOUT = {"MAE": "cls", "LoMaR": "avgpool", "IBOT": "cls"}


def default_feature(source: EncoderSource, kind: str) -> str:
    """``--feature auto``: the readout the encoder's method evaluates (its ``--model.readout``, recorded in the
    checkpoint and export: ``cls`` for MAE's linear probe and iBOT, ``avgpool`` for LoMaR, whose loss never
    trains the last [CLS]); a classifier's follows its ``global_pool``; a named random init reads ``cls``."""
    if kind != "auto":
        return kind
    spec, record = encoder_record(source)
    if record.get("readout"):
        return record["readout"]
    if record.get("method") in PAPER_READOUT:
        return PAPER_READOUT[record["method"]]
    pool = spec.kwargs.get("global_pool") if spec is not None else None
    return "avgpool" if pool == "avg" else "cls"


def finetune_pool(source: EncoderSource) -> str:
    """``--global_pool auto`` of ``ssl-finetune``: ``avg`` where the method's reference fine-tunes on the mean patch
    token (MAE, LoMaR; also a random init), else the pool of the method's readout (``token`` for iBOT)."""
    _, record = encoder_record(source)
    if record.get("method") in ("MAE", "LoMaR") or not record:
        return "avg"
    return "avg" if default_feature(source, "auto") == "avgpool" else "token"


def extract_split_features(model: torch.nn.Module, data: ClassificationDataModule, kind: str, last_n: int,
                           device: torch.device, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """Features of the un-augmented train and val splits, computed once (forward passes autocast to ``dtype``)."""
    model.eval().to(device)
    # fused kernels on GPUs; on CPUs the explicit softmax(QK^T)V for short sequences (bf16 at 65 tokens: ~600 img/s
    # against ~510 fused, 2 cores)
    select_attention_kernel(model, model.patch_embed.num_patches + model.num_prefix_tokens, device)
    embed = lambda x: encoder_features(model, x, kind, last_n)  # noqa: E731
    train_loader, val_loader = data.feature_loaders(feature_batch_size(device))
    with torch.inference_mode():
        train_f, train_y = extract_features(embed, train_loader, data.eval_transform.to(device), device, dtype)
        val_f, val_y = extract_features(embed, val_loader, data.eval_transform.to(device), device, dtype)
    return train_f, train_y, val_f, val_y


def cached_feature_loaders(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor,
                           data: ClassificationDataModule) -> tuple[DataLoader, DataLoader]:
    """Loaders over extracted features: seeded shuffled train batches (``data.epoch_steps`` of them per epoch when
    set, cycling the features as fresh permutations), large val batches."""
    train_set = TensorDataset(train_f, train_y)
    num_samples = data.epoch_steps * data.batch_size if data.epoch_steps else None
    train_loader = DataLoader(train_set, batch_size=data.batch_size,
                              sampler=EpochSeededRandomSampler(train_set, data.seed, num_samples),
                              drop_last=num_samples is not None or len(train_set) > data.batch_size)
    return train_loader, DataLoader(TensorDataset(val_f, val_y), batch_size=1024)


# ---------------------------------------------------------------------------------------- k-NN
def knn_body(argv: list[str]) -> dict[str, Any]:
    parser = base_parser("ssl-knn", "Weighted k-NN top-1 on L2-normalised frozen features.", with_trainer=False)
    parser.add_argument("--k", type=str, default="20", help="neighbours: one value or a list like 10,20,100,200")
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--feature", type=str, default="auto",
                        help="auto (the readout its method evaluates: cls for MAE and iBOT, avgpool for LoMaR), cls, "
                             "avgpool or cls_last_n")
    parser.add_argument("--last_n", type=int, default=4)
    parser.set_defaults({"data.train_augment": "none"})
    cfg = parser.parse_args(argv)
    try:
        ks = sorted({int(k) for k in str(cfg.k).split(",")})
    except ValueError as err:
        raise UserError(f"--k takes integers like 20 or 10,20,100,200, got {cfg.k!r}") from err
    data, out, source, start = prepare(cfg, "knn")
    feature = default_feature(source, cfg.feature)
    model, _ = load_encoder(source, data.img_size, data.in_chans)
    dtype = feature_precision(cfg)
    train_f, train_y, val_f, val_y = extract_split_features(model, data, feature, cfg.last_n, device_of(cfg), dtype)
    preds = weighted_knn(train_f, train_y, val_f, data.num_classes, ks, cfg.temperature)
    top1 = {k: float((preds[k] == val_y).float().mean()) for k in ks}
    with open(out / "knn.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["k", "top1"])
        writer.writerows([[k, f"{v:.6f}"] for k, v in top1.items()])
    data.save_subset(out / "labeled_subset.json")
    metrics = {"command": "ssl-knn", "encoder": source.describe(), "feature": feature, "temperature": cfg.temperature,
               "precision": "bf16-mixed" if dtype == torch.bfloat16 else "32-true",
               "knn_top1": {str(k): v for k, v in top1.items()}, "num_train": len(train_y), "num_val": len(val_y),
               "labels_per_class": data.labels_per_class, "wall_s": round(time.perf_counter() - start, 1)}
    write_metrics(out, metrics)
    head = ks[len(ks) // 2] if 20 not in ks else 20
    print(f"k-NN top-1 (k={head}, T={cfg.temperature}): {100 * top1[head]:.2f} %  [{source.describe()}; {feature}]\n"
          f"  all k: {', '.join(f'{k}: {100 * v:.2f} %' for k, v in top1.items())}\n  metrics: {out / 'metrics.json'}")
    return metrics


def knn_main(args: Sequence[str] | None = None) -> int:
    return run_command("ssl-knn", knn_body, args)


# ---------------------------------------------------------------------------------------- fit helpers
class ValHistory(pl.Callback):
    """Validation top-1 after every epoch (for final and best figures)."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after Lightning has finalised the epoch's metrics
        if not trainer.sanity_checking and "val_top1" in trainer.callback_metrics:
            self.values.append(float(trainer.callback_metrics["val_top1"]))


def make_trainer(cfg: Any, out: Path, history: ValHistory) -> pl.Trainer:
    trainer_kwargs = {k: v for k, v in dict(cfg.trainer).items() if k not in TRAINER_SKIP}
    trainer_kwargs.setdefault("num_sanity_val_steps", 0)
    return Trainer(**trainer_kwargs, logger=CSVLogger(str(out), name="", version=""), callbacks=[history],
                      default_root_dir=str(out), enable_checkpointing=False)


def fit_and_report(command: str, cfg: Any, out: Path, module: pl.LightningModule, fit: Callable[[pl.Trainer], None],
                   extra: dict[str, Any], start: float) -> dict[str, Any]:
    history = ValHistory()
    trainer = make_trainer(cfg, out, history)
    fit(trainer)
    if not history.values:
        raise UserError("No validation epoch ran: raise --trainer.max_epochs or --trainer.limit_val_batches.")
    metrics = {"command": command, **extra, "val_top1_final": history.values[-1], "val_top1_best": max(history.values),
               "val_top1_per_epoch": history.values, "epochs": trainer.current_epoch,
               "wall_s": round(time.perf_counter() - start, 1)}
    write_metrics(out, metrics)
    return metrics


# ---------------------------------------------------------------------------------------- schedules in steps
def add_schedule_arguments(parser: LightningArgumentParser, steps: int, val_every: int, warmup_steps: int) -> None:
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps of the whole run (the schedule)")
    parser.add_argument("--val_every", type=int, default=val_every, help="steps between validations (one 'epoch')")
    parser.add_argument("--warmup_steps", type=int, default=warmup_steps, help="linear lr warmup, then cosine")


def apply_schedule(cfg: Any, data: ClassificationDataModule) -> float:
    """Set the Trainer and the data from ``--steps`` / ``--val_every``: an epoch is ``val_every`` batches (labeled
    images cycled as fresh permutations), ``max_steps = steps``. Returns the warmup in epochs."""
    if cfg.steps < 1 or cfg.val_every < 1 or cfg.warmup_steps < 0:
        raise UserError(f"--steps and --val_every must be >= 1 and --warmup_steps >= 0, got {cfg.steps}, {cfg.val_every}, "
                        f"{cfg.warmup_steps}.")
    val_every = min(cfg.val_every, cfg.steps)
    data.epoch_steps = val_every
    cfg.trainer.max_steps = cfg.steps
    cfg.trainer.max_epochs = -(-cfg.steps // val_every)
    return cfg.warmup_steps / val_every


# ---------------------------------------------------------------------------------------- linear probe
def linear_probe_body(argv: list[str]) -> dict[str, Any]:
    parser = base_parser("ssl-linear-probe", "Linear probe on a frozen encoder (MAE protocol: BatchNorm + linear, LARS).",
                         with_trainer=True)
    parser.add_argument("--feature", type=str, default="auto",
                        help="auto (the readout its method evaluates: cls for MAE and iBOT, avgpool for LoMaR), "
                             "cls, avgpool, or cls_last_n")
    parser.add_argument("--last_n", type=int, default=4)
    # MAE's 0.1 is calibrated for batch 16384 x 90 ImageNet epochs; 1000 steps on 100 labels (MAE recipe encoder, avgpool):
    # base_lr 0.1 -> 59.4 %, 1 -> 67.4 %, 5 -> 64.7 %, 20 -> 62.3 % (k-NN on the same features 62.1 %)
    parser.add_argument("--base_lr", type=float, default=1.0, help="LARS lr per 256 images (MAE, ImageNet: 0.1)")
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--cached_features", type=bool, default=True,
                        help="extract features once (no augmentation) and train the head on them (fast); false: the "
                             "MAE protocol, frozen encoder on augmented images every step")
    add_schedule_arguments(parser, steps=1000, val_every=200, warmup_steps=100)
    parser.set_defaults({"data.train_augment": "crop_flip"})
    cfg = parser.parse_args(argv)
    data, out, source, start = prepare(cfg, "linear_probe")
    warmup_epochs = apply_schedule(cfg, data)
    feature = default_feature(source, cfg.feature)
    model, _ = load_encoder(source, data.img_size, data.in_chans)
    dim = feature_dim(model, feature, cfg.last_n)
    hp = dict(feature_dim=dim, num_classes=data.num_classes, feature=feature, last_n=cfg.last_n,
              base_lr=cfg.base_lr, weight_decay=cfg.weight_decay, warmup_epochs=warmup_epochs, batch_size=data.batch_size)
    if cfg.cached_features:
        train_f, train_y, val_f, val_y = extract_split_features(model, data, feature, cfg.last_n, device_of(cfg),
                                                                feature_precision(cfg))
        train_loader, val_loader = cached_feature_loaders(train_f, train_y, val_f, val_y, data)
        module = LinearProbe(None, **hp)
        fit = lambda trainer: trainer.fit(module, train_loader, val_loader)  # noqa: E731
    else:
        module = LinearProbe(model, **hp)
        fit = lambda trainer: trainer.fit(module, datamodule=data)  # noqa: E731
    protocol = ("cached features: extracted once without augmentation, head trained on them"
                if cfg.cached_features else f"full: frozen encoder on augmented images ({cfg.data.train_augment}) every step")
    data.save_subset(out / "labeled_subset.json")
    metrics = fit_and_report("ssl-linear-probe", cfg, out, module, fit, {
        "encoder": source.describe(), "protocol": protocol, "cached_features": bool(cfg.cached_features),
        "feature": feature, "labels_per_class": data.labels_per_class, "optimizer": "LARS",
        "base_lr": cfg.base_lr, "steps": cfg.steps, "batch_size": data.batch_size}, start)
    print(f"linear probe top-1: {100 * metrics['val_top1_final']:.2f} % (best validation {100 * metrics['val_top1_best']:.2f} %)"
          f"  [{source.describe()}; {feature}; {'cached features' if cfg.cached_features else 'full protocol'}]\n"
          f"  metrics: {out / 'metrics.json'}")
    return metrics


def linear_probe_main(args: Sequence[str] | None = None) -> int:
    return run_command("ssl-linear-probe", linear_probe_body, args)


# ---------------------------------------------------------------------------------------- fine-tune
def finetune_body(argv: list[str]) -> dict[str, Any]:
    parser = base_parser("ssl-finetune", "Full fine-tuning with layer-wise lr decay.", with_trainer=True)
    parser.add_argument("--base_lr", type=float, default=4e-3,
                        help="AdamW lr per 256 images (lr 1e-3 at the default batch 64; MAE's ViT-B recipe: 5e-4 at "
                             "batch 1024)")
    parser.add_argument("--layer_decay", type=float, default=0.75)
    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--drop_path", type=float, default=0.1)
    parser.add_argument("--label_smoothing", type=float, default=0.1)
    parser.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (MAE: 0.8); 0 = off")
    parser.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (MAE: 1.0); 0 = off")
    parser.add_argument("--min_lr", type=float, default=1e-6)
    parser.add_argument("--global_pool", type=str, default="auto",
                        help="auto (avg for MAE / LoMaR / random init, token for iBOT), avg or token")
    add_schedule_arguments(parser, steps=500, val_every=100, warmup_steps=50)
    parser.set_defaults({"data.train_augment": "pad_crop", "data.batch_size": 64})
    cfg = parser.parse_args(argv)
    data, out, source, start = prepare(cfg, "finetune")
    warmup_epochs = apply_schedule(cfg, data)
    pool = cfg.global_pool if cfg.global_pool != "auto" else finetune_pool(source)
    if pool not in ("avg", "token"):
        raise UserError(f"--global_pool must be auto, avg or token, got {cfg.global_pool!r}.")
    model, spec = load_encoder(source, data.img_size, data.in_chans, num_classes=data.num_classes,
                               global_pool=pool, drop_path_rate=cfg.drop_path)
    module = FineTune(model, data.num_classes, base_lr=cfg.base_lr, layer_decay=cfg.layer_decay,
                      weight_decay=cfg.weight_decay, warmup_epochs=warmup_epochs, min_lr=cfg.min_lr,
                      label_smoothing=cfg.label_smoothing, mixup=cfg.mixup, cutmix=cfg.cutmix, batch_size=data.batch_size)
    data.save_subset(out / "labeled_subset.json")
    metrics = fit_and_report("ssl-finetune", cfg, out, module, lambda trainer: trainer.fit(module, datamodule=data), {
        "encoder": source.describe(), "labels_per_class": data.labels_per_class, "layer_decay": cfg.layer_decay,
        "base_lr": cfg.base_lr, "global_pool": pool, "drop_path": cfg.drop_path, "mixup": cfg.mixup, "cutmix": cfg.cutmix,
        "train_augment": cfg.data.train_augment, "steps": cfg.steps, "batch_size": data.batch_size}, start)
    print(f"fine-tune top-1: {100 * metrics['val_top1_final']:.2f} % (best validation {100 * metrics['val_top1_best']:.2f} %)"
          f"  [{source.describe()}; {pool} pool]\n  metrics: {out / 'metrics.json'}")
    return metrics


def finetune_main(args: Sequence[str] | None = None) -> int:
    return run_command("ssl-finetune", finetune_body, args)


# ---------------------------------------------------------------------------------------- export
def export_body(argv: list[str]) -> dict[str, Any]:
    parser = LightningArgumentParser(prog="ssl-export", description="Export a checkpoint's encoder for timm.", default_env=False)
    parser.add_argument("--ckpt", type=str, help="ssl_kit method checkpoint")
    parser.add_argument("--out", type=str, help="export folder (model.safetensors + config.json)")
    cfg = parser.parse_args(argv)
    spec, state, record = read_checkpoint(Path(cfg.ckpt))  # read once: the recorded spec rebuilds the encoder
    model = timm.create_model(spec.timm_name, pretrained=False, **spec.kwargs)
    model.load_state_dict(state)
    out = export_encoder(model, spec, cfg.out, {"method": record.get("method"), "source_checkpoint": str(cfg.ckpt)})
    print(f"exported {record.get('method')} encoder ({spec.timm_name}) to {out}")
    return {"out": str(out)}


def export_main(args: Sequence[str] | None = None) -> int:
    return run_command("ssl-export", export_body, args)
