"""Does pretraining beat the same network untrained? MAE, LoMaR, iBOT on Fashion-MNIST (issue #21).

For each recipe and seed: ``ssl-pretrain --recipe R --seed_everything S`` (timed), then on the full splits
(60k memory / training set, 10k test) for both readouts ([CLS] and mean patch token, one forward pass):
  * weighted k-NN (k = 20, T = 0.07) and, with ``--probe``, the cached-feature linear probe of ssl-linear-probe,
  * the same figures for the method's OWN network at its OWN initialisation (``ssl-knn --random_init same``:
    iRPE ViT for LoMaR, timm init for iBOT, MAE init and sin-cos table for MAE), drawn with ``torch.manual_seed(S)``,
  * the collapse figures of each feature set (mean pairwise cosine, mean per-dimension spread of the
    normalised test features, :func:`ssl_kit.encoders.features.feature_spread`),
  * raw pixels (the normalised 32 x 32 input) as the common reference.
Feature extraction runs in the precision ssl-knn picks (bf16 where the CPU has it natively).

Usage (2 CPU cores: ~10 min of pretraining per run, ~2-5 min of feature extraction per network):
    python benchmarks/ssl_effects.py --recipes mae lomar ibot --seeds 0 1 --probe default
    python benchmarks/ssl_effects.py --recipes ibot --seeds 0 --tag ibot_m099 -- --trainer.max_epochs 3
An existing run folder with an ``encoder/`` is evaluated, not retrained (its pretraining time is read from
``bench_wall.json``); features once extracted are kept in it (``bench_*features.pt``). Writes benchmarks/results/ssl_effects[_TAG].json and .md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, TensorDataset

from eval_fmnist import cached_probe  # same folder
from sweep import pretrain_command
from ssl_kit.data.augment import EvalTransform
from ssl_kit.data.fashion_mnist import MEAN, STD, load_fashion_mnist
from ssl_kit.encoders import EncoderSource, encoder_record, load_encoder, select_attention_kernel
from ssl_kit.encoders.features import READOUTS, feature_spread, readout_features
from ssl_kit.eval.knn import FEATURE_BATCH_CPU, extract_readouts, weighted_knn
from ssl_kit.precision import autocast_dtype, resolve_precision

RESULTS = Path(__file__).parent / "results" / Path(__file__).stem  # one folder per benchmark


def knn_top1(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor) -> float:
    pred = weighted_knn(train_f, train_y, test_f, num_classes=10, k=20, temperature=0.07)[20]
    return round(float((pred == test_y).float().mean()), 4)


def readouts_of(model: torch.nn.Module, images: torch.Tensor, dtype: torch.dtype | None,
                embed: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """``{readout: [N, D]}`` of uint8 ``images`` (one forward pass per batch): ``embed(normalised batch)``, by default
    both readouts of :func:`readout_features`."""
    model.eval()
    select_attention_kernel(model, model.patch_embed.num_patches + model.num_prefix_tokens, "cpu")
    loader = DataLoader(TensorDataset(images, torch.zeros(len(images))), batch_size=FEATURE_BATCH_CPU)
    with torch.inference_mode():
        return extract_readouts(embed or (lambda x: readout_features(model, x)), loader, EvalTransform(32, MEAN, STD),
                                torch.device("cpu"), dtype)[0]


def score(model: torch.nn.Module, data: dict[str, torch.Tensor], dtype: torch.dtype | None, probe: list[str],
          cache: Path) -> dict[str, Any]:
    """k-NN and spread of both readouts, the cached linear probe of the readouts in ``probe``. Features are kept in
    ``cache`` (a later call on the same network reads them; the extraction time is kept with them)."""
    if cache.is_file():
        saved = torch.load(cache)
        train_f, test_f, extract_s = saved["train"], saved["test"], saved["extract_s"]
    else:
        start = time.perf_counter()
        train_f, test_f = readouts_of(model, data["train_x"], dtype), readouts_of(model, data["test_x"], dtype)
        extract_s = round(time.perf_counter() - start, 1)
        torch.save({"train": train_f, "test": test_f, "extract_s": extract_s}, cache)
    row: dict[str, Any] = {"extract_s": extract_s}
    for name in READOUTS:
        row[f"knn_{name}"] = knn_top1(train_f[name], data["train_y"], test_f[name], data["test_y"])
        spread = feature_spread(test_f[name])
        row[f"cosine_{name}"], row[f"std_{name}"] = round(spread["mean_cosine"], 4), round(spread["mean_std"], 4)
        if name in probe:
            row[f"probe_{name}"] = round(cached_probe(train_f[name], data["train_y"], test_f[name], data["test_y"]), 4)
    print({k: v for k, v in row.items()}, flush=True)
    return row


def probes(choice: str, readout: str) -> list[str]:
    return {"none": [], "default": [readout], "both": list(READOUTS)}[choice]


def pretrain(recipe: str, seed: int, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Run the recipe unless ``run_dir`` already holds its export; the command and wall time either way."""
    record_file = run_dir / "bench_wall.json"
    if (run_dir / "encoder" / "config.json").is_file() and record_file.is_file():
        return json.loads(record_file.read_text())
    cmd = pretrain_command(recipe, run_dir, seed, *overrides)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    record = {"command": " ".join(cmd), "pretrain_wall_s": round(time.perf_counter() - start, 1)}
    record_file.write_text(json.dumps(record) + "\n")
    return record


def mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def table(result: dict[str, Any]) -> str:
    """Markdown: per recipe, pretrained (mean ± std over seeds) vs own random init, each readout."""
    probe = any(key.startswith("probe_") for row in result["runs"] for key in row)
    cols = ["k-NN cls", "k-NN avgpool"] + (["probe (default)"] if probe else []) + ["cosine (default)", "minutes"]
    lines = [f"| recipe (default readout) | network | {' | '.join(cols)} |", "|" + "---|" * (len(cols) + 2)]
    for recipe, readout in result["readouts"].items():
        runs = [r for r in result["runs"] if r["recipe"] == recipe]
        if not runs:
            continue
        keys = ["knn_cls", "knn_avgpool"] + ([f"probe_{readout}"] if probe else [])
        cells = [mean_spread([r[k] for r in runs]) if all(k in r for r in runs) else "" for k in keys]
        cos = statistics.mean(r[f"cosine_{readout}"] for r in runs)
        minutes = statistics.mean(r["pretrain_wall_s"] for r in runs) / 60
        lines.append(f"| {recipe} ({readout}) | pretrained, {len(runs)} seed(s) | {' | '.join(cells)} | {cos:.3f} | {minutes:.1f} |")
        base = result["random_init"].get(recipe)
        if base is None:
            continue
        cells = [f"{100 * base[k]:.2f}" if k in base else "" for k in keys]
        lines.append(f"| {recipe} | own random init | {' | '.join(cells)} | {base[f'cosine_{readout}']:.3f} | |")
    lines.append(f"| raw pixels | | {100 * result['raw_pixels_knn']:.2f} | | " + ("| " if probe else "") + "| |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["mae", "lomar", "ibot"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--out", default="runs/bench_effects", help="run folders: OUT/[TAG_]RECIPE_sSEED")
    parser.add_argument("--tag", default="", help="names the run folders and the result file of a variant")
    parser.add_argument("--probe", choices=["none", "default", "both"], default="none",
                        help="cached linear probe (LARS, 90 epochs, ~1-2 min each) on the method's default readout "
                             "or on both readouts")
    parser.add_argument("--no_baseline", action="store_true", help="skip the own-random-init rows (a variant of a recipe "
                        "whose baseline is already measured: the init does not depend on the recipe's training settings)")
    parser.add_argument("overrides", nargs="*", help="extra ssl-pretrain overrides for every run (after --)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    dtype = autocast_dtype(resolve_precision("auto", "cpu"))
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    data = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
    transform = EvalTransform(32, MEAN, STD)
    with torch.no_grad():
        raw = knn_top1(transform(train_x).flatten(1), train_y, transform(test_x).flatten(1), test_y)
    name = f"ssl_effects_{args.tag}" if args.tag else "ssl_effects"
    result: dict[str, Any] = {
        "protocol": "Fashion-MNIST 60k/10k, 32 px; weighted k-NN k=20 T=0.07 and cached linear probe (LARS 90 epochs) "
                    "on [CLS] and mean patch token after the final norm; features in " + str(dtype or torch.float32),
        "command": "python benchmarks/ssl_effects.py " + " ".join(sys.argv[1:]),
        "raw_pixels_knn": raw, "readouts": {}, "runs": [], "random_init": {}}
    for recipe in args.recipes:
        for seed in args.seeds:
            run_dir = Path(args.out) / f"{args.tag + '_' if args.tag else ''}{recipe}_s{seed}"
            record = pretrain(recipe, seed, run_dir, args.overrides)
            source = EncoderSource(encoder=str(run_dir / "encoder"))
            readout = encoder_record(source)[1].get("readout", "cls")
            result["readouts"][recipe] = readout
            print(f"{recipe} seed {seed}: pretrained", flush=True)
            model, _ = load_encoder(source, 32, 1)
            result["runs"].append({"recipe": recipe, "seed": seed, "readout": readout, **record, "run_dir": str(run_dir),
                                   **score(model, data, dtype, probes(args.probe, readout), run_dir / "bench_features.pt")})
            if recipe not in result["random_init"] and not args.no_baseline:  # one draw (the first seed's) of the network's own init
                print(f"{recipe}: own random init", flush=True)
                torch.manual_seed(seed)
                baseline, _ = load_encoder(EncoderSource(encoder=str(run_dir / "encoder"), random_init="same"), 32, 1)
                result["random_init"][recipe] = {"seed": seed, **score(baseline, data, dtype, probes(args.probe, readout),
                                                                       run_dir / "bench_random_init_features.pt")}
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(f"`{result['command']}`\n\n" + table(result))
    print(table(result))


if __name__ == "__main__":
    sys.exit(main())
