"""Short iBOT variants side by side (issue #21): why the teacher goes uniform, and which settings keep it sharp.

Each variant is ``ssl-pretrain --recipe ibot --trainer.limit_train_batches 25`` (175 steps, ~5 min on 2 CPU cores)
with its overrides, seed 0. Each finished run is scored on a fixed subset of Fashion-MNIST (10k memory images, 2k
queries, drawn with seed 0; weighted k-NN k 20, T 0.07, bf16 features where the CPU has them): the TEACHER's and the
STUDENT's [CLS] and mean patch token, and, from the run's ``metrics.csv``, the monitor's k-NN and the teacher's
normalised [CLS] entropies (per image, of the batch mean) of the last epoch. The untrained networks (both inits) and
any ``--exports`` (e.g. an MAE encoder) are scored on the same subset as references. The subset is a screen, not
the benchmark: ``ssl_effects.py`` gives the full 60k / 10k figures of the variants worth a full run.

Usage:
    python benchmarks/ibot_screens.py                       # every variant below; finished runs are only scored
    python benchmarks/ibot_screens.py --variants recipe bn_t02 --exports runs/tta/bf16_900_s2/encoder
Writes benchmarks/results/ibot_screens/ibot_screens.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from sweep import finished_run_wall, logged_rows, pretrain_command
from ssl_kit.data.augment import EvalTransform
from ssl_kit.data.fashion_mnist import MEAN, STD, load_fashion_mnist
from ssl_kit.encoders import EncoderSource, load_encoder
from ssl_kit.eval.knn import weighted_knn
from ssl_kit.methods import IBOT
from ssl_kit.precision import autocast_dtype, resolve_precision

RESULTS = Path(__file__).parent / "results" / Path(__file__).stem
SHARP = ["--model.teacher_temp", "0.02", "--model.teacher_temp2", "0.02", "--model.warmup_teacher_temp", "0.02",
         "--model.warmup_teacher_temp2", "0.02"]
VARIANTS: dict[str, list[str]] = {  # name -> overrides of the recipe
    "recipe": [],
    "t02": SHARP,
    "no_mask": ["--model.mask_prob", "0"],
    "bn": ["--model.norm_in_head", "bn"],
    "bn_t02": ["--model.norm_in_head", "bn", *SHARP],
    "bn_t02_weak_crops": ["--model.norm_in_head", "bn", *SHARP, "--data.global_scale", "[0.6,1.0]",
                          "--data.local_scale", "[0.2,0.6]"],
    "mae_init": ["--model.encoder_init", "mae"],
    "mae_init_m0996": ["--model.encoder_init", "mae", "--model.teacher_momentum", "0.996"],
    "mae_init_bn_t02": ["--model.encoder_init", "mae", "--model.norm_in_head", "bn", *SHARP],
}
STEPS = ["--trainer.limit_train_batches", "25", "--trainer.enable_progress_bar", "false"]
# the recipe's network (tiny, depth 6, patch 4, 1 channel, K 1024, head 512 / 128) at either init
NETWORK = dict(encoder="tiny", encoder_kwargs={"depth": 6}, patch_size=4, in_chans=1, out_dim=1024, hidden_dim=512,
               bottleneck_dim=128)


def subset(seed: int = 0) -> dict[str, torch.Tensor]:
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    g = torch.Generator().manual_seed(seed)
    tr, te = torch.randperm(len(train_x), generator=g)[:10000], torch.randperm(len(test_x), generator=g)[:2000]
    return {"train_x": train_x[tr], "train_y": train_y[tr], "test_x": test_x[te], "test_y": test_y[te]}


def features(embed, images: torch.Tensor, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """``{cls, avgpool: [N, D]}`` of uint8 ``images`` through ``embed(normalised batch) -> [B, 1 + L, D]`` tokens."""
    transform, out = EvalTransform(32, MEAN, STD), {"cls": [], "avgpool": []}
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        for i in range(0, len(images), 500):
            tokens = embed(transform(images[i:i + 500])).float()
            out["cls"].append(tokens[:, 0])
            out["avgpool"].append(tokens[:, 1:].mean(dim=1))
    return {k: torch.cat(v) for k, v in out.items()}


def knn_scores(embed, data: dict[str, torch.Tensor], dtype: torch.dtype | None, prefix: str) -> dict[str, float]:
    train_f, test_f = features(embed, data["train_x"], dtype), features(embed, data["test_x"], dtype)
    scores = {}
    for name in ("cls", "avgpool"):
        pred = weighted_knn(train_f[name], data["train_y"], test_f[name], num_classes=10, k=20, temperature=0.07)[20]
        scores[f"{prefix}_{name}"] = round(100 * float((pred == data["test_y"]).float().mean()), 1)
    return scores


def score_ibot(model: IBOT, data: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, float]:
    model.eval()
    return {**knn_scores(lambda x: model.encode(model.ema_teacher, x), data, dtype, "teacher"),
            **knn_scores(lambda x: model.encode(model.encoder, x), data, dtype, "student")}


def last_epoch_figures(run_dir: Path) -> dict[str, float]:
    rows = logged_rows(run_dir)
    last: dict[str, float] = {}
    for key, name in (("knn_top1_cls", "monitor_knn_cls"), ("teacher_entropy_epoch", "teacher_entropy"),
                      ("teacher_marginal_entropy_epoch", "teacher_marginal_entropy"), ("feature_cosine", "cosine")):
        values = [float(r[key]) for r in rows if r.get(key)]
        if values:
            last[name] = round(values[-1] * (100 if key.startswith("knn") else 1), 3)
    return last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default="runs/ibot_screens", help="run folders: OUT/VARIANT")
    parser.add_argument("--exports", nargs="*", default=[], help="encoder exports scored as references (e.g. MAE)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    dtype = autocast_dtype(resolve_precision("auto", "cpu"))
    data = subset()
    result: dict[str, Any] = {"protocol": "175 steps of recipes/ibot.yaml (seed 0) + overrides; weighted k-NN k 20 "
                              "T 0.07 on 10k / 2k Fashion-MNIST images drawn with seed 0",
                              "command": "python benchmarks/ibot_screens.py " + " ".join(sys.argv[1:]),
                              "references": {}, "variants": {}}
    for init in ("timm", "mae"):
        torch.manual_seed(0)
        result["references"][f"untrained_{init}_init"] = score_ibot(IBOT(**NETWORK, encoder_init=init), data, dtype)
    for path in args.exports:
        encoder, _ = load_encoder(EncoderSource(encoder=path), 32, 1)
        encoder.eval()
        result["references"][path] = knn_scores(encoder.forward_features, data, dtype, "export")
    for name in args.variants:
        run_dir = Path(args.out) / name
        cmd = pretrain_command("ibot", run_dir, 0, *STEPS, *VARIANTS[name])
        if not (run_dir / "checkpoints" / "last.ckpt").is_file():
            subprocess.run(cmd, check=True)
        wall = round(finished_run_wall(run_dir), 1)  # the run's own training time, over its resumes
        model = IBOT.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", map_location="cpu")
        result["variants"][name] = {"command": " ".join(cmd), "wall_s": wall, **score_ibot(model, data, dtype),
                                    **last_epoch_figures(run_dir)}
        print(name, result["variants"][name], flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "ibot_screens.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"`{result['command']}`", "", "| network | teacher cls | teacher avgpool | student cls | student avgpool | "
             "teacher entropy (per image / batch mean) | mean cosine |", "|---|---|---|---|---|---|---|"]
    for name, row in {**result["references"], **result["variants"]}.items():
        cells = [row.get(k, row.get(k.replace("teacher", "export"), "")) for k in
                 ("teacher_cls", "teacher_avgpool", "student_cls", "student_avgpool")]
        entropy = (f"{row['teacher_entropy']:.2f} / {row['teacher_marginal_entropy']:.2f}"
                   if "teacher_entropy" in row else "")
        lines.append(f"| {name} | {' | '.join(str(c) for c in cells)} | {entropy} | {row.get('cosine', '')} |")
    (RESULTS / "ibot_screens.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
