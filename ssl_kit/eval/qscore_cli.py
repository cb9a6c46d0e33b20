"""``ssl-qscore``: score every image of a data set without labels, and (with labels) test the claim.

Q-score is computed on the encoder's readout (``--feature auto``: its method's) in ``--space abs`` (``|h|``,
non-negative as the paper's features; ``raw`` and ``standardized`` are the others, :mod:`ssl_kit.losses.qscore`).

Writes into ``--out``:
* ``qscores.csv``: index, file path (image folders), label, Q-score, rank (1 = lowest Q);
* ``lowest_q.png``: the ``--num_lowest`` images with the lowest Q (likely misclassified);
* ``metrics.json``: mean Q, sparsity; with labels also a cached-feature linear probe's top-1 and
  how well Q predicts its correctness (AUROC, and AUPRC for "correct" with score Q, as the paper
  reports it, and for "wrong" with score -Q), torchmetrics;
* ``qscore_hist.png``: Q of the probe's correct vs wrong predictions.
"""
from __future__ import annotations

import csv
from typing import Any, Sequence

import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
)
from torchvision.utils import save_image

from ssl_kit.encoders import load_encoder
from ssl_kit.encoders.features import READOUTS
from ssl_kit.errors import UserError
from ssl_kit.eval.cli import (
    ValHistory,
    base_parser,
    cached_feature_loaders,
    default_feature,
    device_of,
    extract_split_features,
    make_trainer,
    prepare,
    run_command,
    write_metrics,
)
from ssl_kit.eval.linear_probe import LinearProbe
from ssl_kit.losses.qscore import feature_space, qscore, sparsity
from ssl_kit.qscore import save_qscore_histogram


def probe_correctness(cfg: Any, out: Any, data: Any, train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor,
                      val_y: torch.Tensor) -> torch.Tensor:
    """Train a linear probe on cached train features; ``[N_val]`` bool, True where it is right."""
    module = LinearProbe(None, feature_dim=train_f.shape[1], num_classes=data.num_classes, base_lr=cfg.probe_base_lr,
                         warmup_epochs=min(10.0, cfg.trainer.max_epochs / 9), batch_size=data.batch_size)
    train_loader, val_loader = cached_feature_loaders(train_f, train_y, val_f, val_y, data)
    make_trainer(cfg, out, ValHistory()).fit(module, train_loader, val_loader)
    module.eval()
    with torch.no_grad():
        return module(val_f).argmax(dim=1) == val_y


def qscore_body(argv: list[str]) -> dict[str, Any]:
    parser = base_parser("ssl-qscore", "Q-score of every image; flags likely-misclassified samples without labels.",
                         with_trainer=True)
    parser.add_argument("--num_lowest", type=int, default=32, help="images in lowest_q.png")
    parser.add_argument("--eta", type=float, default=0.05, help="sparsity threshold: entries below eta are inactive")
    parser.add_argument("--feature", type=str, default="auto", help="readout: auto (its method's), cls or avgpool")
    parser.add_argument("--space", type=str, default="abs",
                        help="Q-score feature space: abs (|h|: AUROC 0.58 / 0.59 on two MAE encoders), raw, or "
                             "standardized (per dimension over the scored images, then ReLU; ssl_kit.losses.qscore)")
    parser.add_argument("--probe_base_lr", type=float, default=0.1, help="cached linear probe (LARS) base lr")
    parser.set_defaults({"trainer.max_epochs": 30, "data.train_augment": "none"})
    cfg = parser.parse_args(argv)
    data, out, source, start = prepare(cfg, "qscore")
    if cfg.space not in ("abs", "raw", "standardized"):
        raise UserError(f"--space must be abs, raw or standardized, got {cfg.space!r}.")
    feature = default_feature(source, cfg.feature)
    if feature not in READOUTS:
        raise UserError(f"--feature must be auto, cls or avgpool, got {cfg.feature!r}.")
    model, _ = load_encoder(source, data.img_size, data.in_chans)
    train_f, train_y, val_f, val_y = extract_split_features(model, data, feature, 1, device_of(cfg))
    scored = feature_space(val_f, cfg.space)
    q = qscore(scored)
    order = torch.argsort(q)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, len(q) + 1)
    labeled = bool((val_y >= 0).all()) and bool((train_y >= 0).all())
    metrics: dict[str, Any] = {"command": "ssl-qscore", "encoder": source.describe(), "num_scored": len(q),
                               "feature": feature, "space": cfg.space, "sigma": "population",
                               "qscore_mean": float(q.mean()), "sparsity": float(sparsity(scored, cfg.eta)),
                               "sparsity_raw": float(sparsity(val_f, cfg.eta)), "eta": cfg.eta}
    correct = None
    if labeled:
        correct = probe_correctness(cfg, out, data, train_f, train_y, val_f, val_y)
        wrong = ~correct
        metrics.update(
            probe_top1=float(correct.float().mean()),
            auroc=float(binary_auroc(q, correct.long())),
            auprc_correct=float(binary_average_precision(q, correct.long())),
            auprc_wrong=float(binary_average_precision(-q, wrong.long())),
            wrong_rate=float(wrong.float().mean()),
        )
        save_qscore_histogram(q, out / "qscore_hist.png", "Q-score of the probe's predictions",
                              {"correct": q[correct], "wrong": q[wrong]})
    paths = getattr(getattr(data.val_set, "images", None), "paths", None)
    indices = getattr(data.val_set, "indices", range(len(q)))
    with open(out / "qscores.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "path", "label", "qscore", "rank"] + (["probe_correct"] if correct is not None else []))
        for i in range(len(q)):
            path = str(paths[indices[i]]) if paths is not None else ""
            row = [i, path, int(val_y[i]), f"{float(q[i]):.6g}", int(rank[i])]
            writer.writerow(row + ([int(correct[i])] if correct is not None else []))
    lowest = order[: cfg.num_lowest].tolist()
    images = torch.stack([data.val_set[i][0] for i in lowest]).float() / 255.0
    save_image(images, str(out / "lowest_q.png"), nrow=8, padding=2, pad_value=1.0)
    metrics["wall_s"] = round(__import__("time").perf_counter() - start, 1)
    write_metrics(out, metrics)
    line = f"mean Q-score {metrics['qscore_mean']:.4g}, sparsity {100 * metrics['sparsity']:.1f} % ({len(q)} images)"
    if labeled:
        line += (f"\n  linear probe top-1 {100 * metrics['probe_top1']:.2f} %; Q predicts correctness: "
                 f"AUROC {metrics['auroc']:.3f}, AUPRC(correct) {metrics['auprc_correct']:.3f}, "
                 f"AUPRC(wrong, base rate {metrics['wrong_rate']:.3f}) {metrics['auprc_wrong']:.3f}")
    print(f"{line}\n  lowest-Q images: {out / 'lowest_q.png'}\n  scores: {out / 'qscores.csv'}")
    return metrics


def qscore_main(args: Sequence[str] | None = None) -> int:
    return run_command("ssl-qscore", qscore_body, args)
