"""Evaluation table on Fashion-MNIST: pretrained MAE encoder vs the same encoder at random init vs raw pixels.

Rows: k-NN top-1 and linear-probe top-1 (cached features) with all labels and with 10 labels per class,
and the commands ``ssl-linear-probe`` (10 per class) and ``ssl-finetune`` (all labels, 10 per class) with
their own defaults. Features for k-NN and the cached probe are extracted once per encoder with the same
functions the commands use (``ssl_kit.eval.cli.extract_split_features``, ``weighted_knn``,
``LinearProbe``); the commands' wall times are reported.

Usage (2 CPU cores, about 35 min):
    python benchmarks/eval_fmnist.py --encoder runs/mae/TIME/encoder
Writes benchmarks/results/eval_fmnist/eval_fmnist.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from ssl_kit.data.classification import ClassificationDataModule, balanced_subset
from ssl_kit.data.module import EpochSeededRandomSampler
from ssl_kit.eval.cli import extract_split_features, finetune_main, knn_main, linear_probe_main
from ssl_kit.encoders import EncoderSource, load_encoder
from ssl_kit.eval.knn import weighted_knn
from ssl_kit.eval.linear_probe import LinearProbe
from ssl_kit.runtime import tune_cpu_allocator

RESULTS = Path(__file__).parent / "results" / Path(__file__).stem  # one folder per benchmark


def knn(train_f, train_y, val_f, val_y) -> float:
    return float((weighted_knn(train_f, train_y, val_f, 10, 20, 0.07)[20] == val_y).float().mean())


def cached_probe(train_f, train_y, val_f, val_y, epochs: int = 90, batch: int = 256, base_lr: float = 0.1) -> float:
    """The cached-features linear probe of ssl-linear-probe (LARS, warmup 1/9 of the epochs)."""
    pl.seed_everything(0, verbose=False)
    train = TensorDataset(train_f, train_y)
    module = LinearProbe(None, train_f.shape[1], 10, base_lr=base_lr, warmup_epochs=epochs / 9, batch_size=batch)
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=epochs)
    trainer.fit(module, DataLoader(train, batch_size=batch, sampler=EpochSeededRandomSampler(train, 0), drop_last=len(train) > batch),
                DataLoader(TensorDataset(val_f, val_y), batch_size=2048))
    return float(trainer.callback_metrics["val_top1"])


def feature_rows(name: str, train_f, train_y, val_f, val_y, few_idx: list[int]) -> dict[str, float]:
    few_f, few_y = train_f[few_idx], train_y[few_idx]
    row = {"knn_all": knn(train_f, train_y, val_f, val_y), "knn_10pc": knn(few_f, few_y, val_f, val_y),
           "linear_cached_all": cached_probe(train_f, train_y, val_f, val_y),
           # 100 labels: batch 10 and base_lr 30 (MAE's 0.1 is calibrated for batch 16384; see README)
           "linear_cached_10pc": cached_probe(few_f, few_y, val_f, val_y, epochs=60, batch=10, base_lr=30.0)}
    print(name, {k: round(v, 4) for k, v in row.items()}, flush=True)
    return row


def timed(fn, argv: list[str], out: Path) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    assert fn([*argv, "--out", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text()), round(time.perf_counter() - start, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", required=True, help="export folder of the pretrained encoder")
    parser.add_argument("--out", default="runs/bench_eval")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tune_cpu_allocator()
    out = Path(args.out)
    config = json.loads((Path(args.encoder) / "config.json").read_text())
    kw = config["kwargs"]
    random_args = ["--random_init", config["timm_name"], "--patch_size", str(kw["patch_size"]),
                   "--encoder_kwargs", json.dumps({k: kw[k] for k in ("embed_dim", "depth", "num_heads")})]
    sources = {"pretrained": ["--encoder", args.encoder], "random_init": random_args}
    data = ClassificationDataModule(train_augment="none")
    data.setup()
    few_idx = balanced_subset(data.splits.train_labels, 10, 10, 0, data.classes)
    result: dict[str, Any] = {"encoder": args.encoder, "encoder_config": config, "rows": {}, "wall_s": {}}

    with torch.no_grad():  # raw pixels: the normalised 32 x 32 image, flattened
        train_x, train_y = data.splits.train.tensors
        val_x, val_y = data.splits.val.tensors
        result["rows"]["raw_pixels"] = feature_rows("raw_pixels", data.eval_transform(train_x).flatten(1), train_y,
                                                    data.eval_transform(val_x).flatten(1), val_y, few_idx)
    for name in ("pretrained", "random_init"):
        src = EncoderSource(encoder=args.encoder) if name == "pretrained" else EncoderSource(
            random_init=config["timm_name"], patch_size=kw["patch_size"],
            encoder_kwargs={k: kw[k] for k in ("embed_dim", "depth", "num_heads")})
        torch.manual_seed(0)
        model, _ = load_encoder(src, 32, 1)
        start = time.perf_counter()
        feats = extract_split_features(model, data, "cls", 4, torch.device("cpu"))
        result["wall_s"][f"{name}_feature_extraction_70k"] = round(time.perf_counter() - start, 1)
        result["rows"][name] = feature_rows(name, *feats, few_idx)

    # the commands themselves (wall time of each)
    m, t = timed(knn_main, [*sources["pretrained"], "--labels-per-class", "10"], out / "knn_pretrained_10pc")
    result["wall_s"]["ssl-knn 10 per class (100 memory, 10k queries)"] = t
    result["rows"]["pretrained"]["knn_10pc_cli"] = m["knn_top1"]["20"]
    for name, src in sources.items():
        # the commands' own defaults: probe 1000 LARS steps on cached features (base_lr 1), fine-tune 500 AdamW steps
        # of 64 images (base_lr 4e-3, layer decay 0.75, pad-crop + flip), both with the encoder's own readout
        m, t = timed(linear_probe_main, [*src, "--labels-per-class", "10"], out / f"probe_10pc_{name}")
        result["rows"][name]["linear_probe_10pc_cli"] = m["val_top1_final"]
        result["wall_s"][f"ssl-linear-probe 10 per class (defaults), {name}"] = t
        m, t = timed(finetune_main, [*src, "--labels-per-class", "10"], out / f"ft_10pc_{name}")
        result["rows"][name]["finetune_10pc"] = m["val_top1_final"]
        result["wall_s"][f"ssl-finetune 10 per class (defaults), {name}"] = t
        m, t = timed(finetune_main, [*src], out / f"ft_all_{name}")
        result["rows"][name]["finetune_all"] = m["val_top1_final"]
        result["wall_s"][f"ssl-finetune all labels (defaults: 500 steps x 64), {name}"] = t
        print(name, result["rows"][name], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "eval_fmnist.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({"rows": result["rows"], "wall_s": result["wall_s"]}, indent=2))


if __name__ == "__main__":
    main()
