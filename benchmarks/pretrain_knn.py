"""Representation quality of a default recipe on Fashion-MNIST (k-NN top-1, full splits).

Compares, with the same weighted k-NN (k = 20, T = 0.07, L2-normalised features, all 60k training
images as memory, all 10k test images scored):
  * the encoder exported by a run of ``ssl-pretrain --recipe NAME`` (timed, wall clock),
  * the same encoder architecture at the method's random initialisation,
  * raw pixels (the normalised 32 x 32 input, flattened).

Usage (2 CPU cores; about 10 min of pretraining plus ~4 min of feature extraction):
    python benchmarks/pretrain_knn.py --recipe mae         # runs the default recipe, then evaluates
    python benchmarks/pretrain_knn.py --encoder runs/mae/TIME/encoder   # evaluate an existing export
Writes benchmarks/results/RECIPE_knn.json (or --result NAME).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from eval_fmnist import cached_probe  # same folder
from ssl_kit.data.augment import EvalTransform
from ssl_kit.data.fashion_mnist import MEAN, STD, load_fashion_mnist
from ssl_kit.eval.knn import FEATURE_BATCH_CPU, extract_features, weighted_knn
from ssl_kit.encoders import (
    EncoderSpec,
    build_random_encoder,
    load_exported_encoder,
    recorded_init,
    select_attention_kernel,
)
from ssl_kit.precision import autocast_dtype, resolve_precision

RESULTS = Path(__file__).parent / "results" / Path(__file__).stem  # one folder per benchmark


def knn_top1(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor) -> float:
    pred = weighted_knn(train_f, train_y, test_f, num_classes=10, k=20, temperature=0.07)[20]
    return float((pred == test_y).float().mean())


def features(model: torch.nn.Module, images: torch.Tensor, transform: EvalTransform,
             dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[N, D]`` features of uint8 ``images``, forward passes autocast to ``dtype`` (None: fp32), with the
    attention kernel ssl_kit picks for this sequence length on the CPU (as ssl-knn does)."""
    model.eval()
    select_attention_kernel(model, model.patch_embed.num_patches + model.num_prefix_tokens, "cpu")
    loader = DataLoader(TensorDataset(images, torch.zeros(len(images))), batch_size=FEATURE_BATCH_CPU)
    with torch.inference_mode():
        return extract_features(model, loader, transform, torch.device("cpu"), dtype)[0]


def feature_dtype(precision: str) -> torch.dtype | None:
    """Autocast dtype for feature extraction: ``auto`` as ssl-pretrain resolves it here, else the named precision."""
    return autocast_dtype(resolve_precision(precision, "cpu"))


def random_init_encoder(config: dict) -> torch.nn.Module:
    """The exported architecture at the method's own initialisation (``ssl-knn --random_init same``)."""
    return build_random_encoder(EncoderSpec(config["timm_name"], dict(config["kwargs"])), recorded_init(config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", help="existing export folder; skips pretraining")
    parser.add_argument("--recipe", default="mae")
    parser.add_argument("--run_dir", default=None, help="default runs/bench_RECIPE_knn")
    parser.add_argument("--result", default=None, help="default RECIPE_knn.json")
    parser.add_argument("--linear", action="store_true",
                        help="also a linear probe on the same cached features (LARS, 90 epochs, as eval_fmnist.py; "
                             "raw pixels' probe is in eval_fmnist.json)")
    parser.add_argument("--skip_random_init", action="store_true", help="only the pretrained encoder and raw pixels")
    parser.add_argument("--feature_precision", default="auto", choices=["auto", "32-true", "bf16-mixed"],
                        help="precision of feature extraction (auto: bf16 where the CPU has it natively, as ssl-knn)")
    parser.add_argument("overrides", nargs="*", help="extra ssl-pretrain overrides (after --)")
    args = parser.parse_args()
    args.run_dir = args.run_dir or f"runs/bench_{args.recipe}_knn"
    args.result = args.result or f"{args.recipe}_knn.json"
    torch.set_num_threads(2)
    dtype = feature_dtype(args.feature_precision)
    result: dict[str, object] = {"protocol": "weighted k-NN k=20 T=0.07, 60k train memory, 10k test, 32 px",
                                 "feature_dtype": str(dtype or torch.float32)}
    encoder_dir = Path(args.encoder) if args.encoder else Path(args.run_dir) / "encoder"
    if not args.encoder:
        cmd = ["ssl-pretrain", "--recipe", args.recipe, "--run_dir", args.run_dir, *args.overrides]
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        result["pretrain_wall_s"] = round(time.perf_counter() - start, 1)
        result["pretrain_command"] = " ".join(cmd)
        resolved = (Path(args.run_dir) / "config.yaml").read_text()  # the recipe as it ran
        result["pretrain_config"] = {line.split(":")[0].strip(): line.split(":", 1)[1].strip()
                                     for line in resolved.splitlines() if line.strip().startswith(("base_lr", "max_epochs", "limit_train_batches", "batch_size"))}
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    transform = EvalTransform(32, MEAN, STD)

    with torch.no_grad():
        raw_train = transform(train_x).flatten(1)
        raw_test = transform(test_x).flatten(1)
    result["raw_pixels_knn_top1"] = knn_top1(raw_train, train_y, raw_test, test_y)
    print(f"raw pixels: {result['raw_pixels_knn_top1']:.4f}", flush=True)

    pretrained = load_exported_encoder(encoder_dir)
    config = json.loads((encoder_dir / "config.json").read_text())
    random_init = random_init_encoder(config)
    models = [("pretrained", pretrained)] + ([] if args.skip_random_init else [("random_init", random_init)])
    for name, model in models:
        start = time.perf_counter()
        tr, te = features(model, train_x, transform, dtype), features(model, test_x, transform, dtype)
        result[f"{name}_knn_top1"] = knn_top1(tr, train_y, te, test_y)
        result[f"{name}_extract_s"] = round(time.perf_counter() - start, 1)
        if args.linear:
            result[f"{name}_linear_cached_top1"] = cached_probe(tr, train_y, te, test_y)
        print(f"{name}: {result[f'{name}_knn_top1']:.4f}", flush=True)
    result["encoder"] = str(encoder_dir)
    result["encoder_config"] = config
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / args.result).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "encoder_config"}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
