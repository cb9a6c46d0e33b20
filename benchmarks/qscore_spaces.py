"""Does Q-score predict linear-probe mistakes on a ViT, and in which feature space? (issue #21, METHODS.md section 8)

For each encoder: features of the full Fashion-MNIST splits (both readouts), a cached linear probe on each
readout (LARS, base lr 0.1, 30 epochs: the ssl-qscore probe), then the AUROC with which each candidate score
separates the probe's correct from wrong test predictions (0.5 = chance, below 0.5 = the score points the
wrong way). Feature spaces (``dataset`` statistics from the training features):
  raw             the readout after the final LayerNorm, signed (what the regulariser used)
  abs / relu      |h| / max(h, 0)
  standardized    relu((h - mean) / std) per dimension (invariant to a LayerNorm gain and bias)
  scaled          relu(h / std) per dimension (invariant to a LayerNorm gain only)
  unit_abs        |h| / || h ||_2 per sample (no rescaling of a sample changes it; Q becomes Z * L2 / L1)
  unit_relu       relu(h) / || relu(h) ||_2 per sample
Scores: Q (the paper's), its parts Z = (max - mean) / sigma and 1 / L1, and the max.
Readouts: ``cls`` and ``avgpool`` (after the final LayerNorm), and ``mlp_cls`` / ``mlp_avgpool``: the last block's
MLP hidden activations (fc1 -> GELU, 4 x width, no LayerNorm after them), the ViT's closest analogue of the
post-ReLU features the paper scores (``--mlp_hidden``).

Usage (2 CPU cores, ~4 min per encoder; features are cached in --cache):
    python benchmarks/qscore_spaces.py runs/bench_effects/mae_s0/encoder runs/bench_effects/mae_s1/encoder
Writes benchmarks/results/qscore_spaces/qscore_spaces.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import binary_auroc

from ssl_effects import readouts_of  # same folder
from ssl_kit.data.fashion_mnist import load_fashion_mnist
from ssl_kit.data.module import EpochSeededRandomSampler
from ssl_kit.encoders import EncoderSource, load_encoder
from ssl_kit.eval.linear_probe import LinearProbe
from ssl_kit.losses.qscore import qscore
from ssl_kit.precision import autocast_dtype, resolve_precision

RESULTS = Path(__file__).parent / "results" / Path(__file__).stem  # one folder per benchmark


def probe_correct(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor) -> torch.Tensor:
    """``[N_test]`` 0/1: where a cached linear probe (ssl-qscore's: LARS, base lr 0.1, 30 epochs) is right."""
    pl.seed_everything(0, verbose=False)
    train = TensorDataset(train_f, train_y)
    module = LinearProbe(None, train_f.shape[1], 10, base_lr=0.1, warmup_epochs=30 / 9, batch_size=256)
    trainer = pl.Trainer(max_epochs=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(train, batch_size=256, sampler=EpochSeededRandomSampler(train, 0), drop_last=True))
    module.eval()
    with torch.no_grad():
        return (module(test_f).argmax(dim=1) == test_y).long()


def mlp_hidden_of(model: torch.nn.Module, images: torch.Tensor, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """``{"mlp_cls": [N, 4D], "mlp_avgpool": [N, 4D]}``: the last block's MLP activations (after GELU) at [CLS] and
    averaged over the patch tokens, from one forward pass per batch of uint8 ``images``."""
    captured: list[torch.Tensor] = []
    prefix = model.num_prefix_tokens

    def embed(x: torch.Tensor) -> dict[str, torch.Tensor]:
        captured.clear()
        model.forward_features(x)
        hidden = captured[-1]  # [B, prefix + L, 4D]
        return {"mlp_cls": hidden[:, 0], "mlp_avgpool": hidden[:, prefix:].mean(dim=1)}

    hook = model.blocks[-1].mlp.act.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        return readouts_of(model, images, dtype, embed)
    finally:
        hook.remove()


def spaces(h: torch.Tensor, train: torch.Tensor) -> dict[str, torch.Tensor]:
    mean, std = train.mean(dim=0), train.std(dim=0)
    unit = torch.nn.functional.normalize
    return {"raw": h, "abs": h.abs(), "relu": h.relu(), "standardized": ((h - mean) / std).relu(), "scaled": (h / std).relu(),
            "unit_abs": unit(h.abs(), dim=1), "unit_relu": unit(h.relu(), dim=1)}


def scores(f: torch.Tensor) -> dict[str, torch.Tensor]:
    z = (f.max(dim=1).values - f.mean(dim=1)) / f.std(dim=1, unbiased=False).clamp_min(1e-6)
    return {"Q": qscore(f), "Z": z, "1/L1": 1 / f.abs().sum(dim=1).clamp_min(1e-6), "max": f.max(dim=1).values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("encoders", nargs="+", help="export folders")
    parser.add_argument("--cache", default="runs/bench_qscore_spaces")
    parser.add_argument("--result", default="qscore_spaces.json")
    parser.add_argument("--mlp_hidden", action="store_true", help="also score the last block's MLP activations")
    args = parser.parse_args()
    torch.set_num_threads(2)
    dtype = autocast_dtype(resolve_precision("auto", "cpu"))
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    result: dict = {"command": "python benchmarks/qscore_spaces.py " + " ".join(sys.argv[1:]),
                    "protocol": "AUROC of each score for 'the cached linear probe is right' on the 10k test images",
                    "encoders": {}}
    for encoder in args.encoders:
        cache = Path(args.cache) / (hashlib.sha1(str(Path(encoder).resolve()).encode()).hexdigest()[:12] + ".pt")
        if cache.is_file():
            feats = torch.load(cache)
        else:
            model, _ = load_encoder(EncoderSource(encoder=encoder), 32, 1)
            feats = {"tr": readouts_of(model, train_x, dtype), "te": readouts_of(model, test_x, dtype)}
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(feats, cache)
        readouts = ["cls", "avgpool"]
        if args.mlp_hidden:
            mlp_cache = cache.with_name(cache.stem + "_mlp.pt")
            if mlp_cache.is_file():
                mlp = torch.load(mlp_cache)
            else:
                model, _ = load_encoder(EncoderSource(encoder=encoder), 32, 1)
                mlp = {"tr": mlp_hidden_of(model, train_x, dtype), "te": mlp_hidden_of(model, test_x, dtype)}
                torch.save(mlp, mlp_cache)
            for split in ("tr", "te"):
                feats[split].update(mlp[split])
            readouts += ["mlp_cls", "mlp_avgpool"]
        rows = {}
        for readout in readouts:
            train_f, test_f = feats["tr"][readout], feats["te"][readout]
            correct = probe_correct(train_f, train_y, test_f, test_y)
            rows[readout] = {"probe_top1": round(float(correct.float().mean()), 4)}
            for space, f in spaces(test_f, train_f).items():
                rows[readout][space] = {name: round(float(binary_auroc(s, correct)), 4) for name, s in scores(f).items()}
            print(encoder, readout, json.dumps(rows[readout]), flush=True)
        result["encoders"][encoder] = rows
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / args.result).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
