"""LoMaR vs MAE training-step throughput across resolutions, in one run (CPU, fp32).

Run (from the repo root):
    python benchmarks/lomar_throughput.py            # all configs, >= ~8 s timed per measurement
    python benchmarks/lomar_throughput.py --quick    # 1-2 timed steps each (smoke)
Options: --threads 2  --min-time 8  --out benchmarks/results/lomar_throughput/lomar_throughput.json

Configs (patch 16, 3 channels):
  (a) ViT-Tiny (192/12/3); MAE with a 128-wide 4-block decoder; 224, 448, 672, 896 px
  (b) ViT-B (768/12/12); MAE with its default 512-wide 8-block decoder; 224, 448 px
LoMaR uses its defaults (4 windows of 7 x 7 patches, ratio 0.8, contextual RPE), MAE mask ratio 0.75.

Each (method, config) runs in its own subprocess so its peak RSS is its own. Per config the
script reports img/s of both, the speed ratio LoMaR/MAE, the FLOP ratio MAE/LoMaR per image
(torch.utils.flop_counter, forward + backward), the % of the machine's fp32 matmul peak each
reaches (peak = best large torch.mm measured in the parent before and after), and peak RSS.
It also writes a PNG of milliseconds per image against resolution.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]  # ssl_kit itself comes from the installed package

from mae_throughput import cpu_pressure, matmul_peak_gflops, max_rss_mib  # noqa: E402

ENCODERS = {
    "a": dict(encoder="tiny", decoder=dict(decoder_dim=128, decoder_depth=4, decoder_heads=4), batch=8,
              sizes=(224, 448, 672, 896)),
    "b": dict(encoder="base", decoder=dict(decoder_dim=512, decoder_depth=8, decoder_heads=16), batch=4,
              sizes=(224, 448)),
}


def build(method: str, family: str, img_size: int) -> torch.nn.Module:
    from ssl_kit.methods import LoMaR, MAE

    cfg = ENCODERS[family]
    common = dict(encoder=cfg["encoder"], img_size=img_size, patch_size=16, in_chans=3)
    if method == "mae":
        return MAE(**common, **cfg["decoder"])
    return LoMaR(**common)


def loss_of(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = model(images)
    return out[0] if isinstance(out, tuple) else out.loss


def measure_one(method: str, family: str, img_size: int, min_time: float, min_steps: int) -> dict[str, Any]:
    """Time forward + backward + fused AdamW (the optimizer training builds) for one configuration."""
    from torch.utils.flop_counter import FlopCounterMode

    from ssl_kit.optim import _fused_ok, adamw_param_groups
    from ssl_kit.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    torch.manual_seed(0)
    model = build(method, family, img_size).train()
    batch = ENCODERS[family]["batch"]
    images = torch.randn(batch, 3, img_size, img_size)
    with FlopCounterMode(display=False) as fc:
        loss_of(model, images).backward()
    model.zero_grad(set_to_none=True)
    groups = adamw_param_groups({"model": model}, 0.05)
    opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=_fused_ok(groups))

    def step() -> None:
        loss_of(model, images).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    steps, t0 = 0, time.perf_counter()
    while steps < min_steps or time.perf_counter() - t0 < min_time:
        step()
        steps += 1
    elapsed = time.perf_counter() - t0
    flops = fc.get_total_flops()
    return dict(method=method, family=family, img_size=img_size, batch=batch, steps=steps,
                img_per_s=batch * steps / elapsed, ms_per_img=1e3 * elapsed / (batch * steps),
                gflop_per_img=flops / batch / 1e9, achieved_gflops=flops * steps / elapsed / 1e9,
                max_rss_mib=max_rss_mib())


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, family, title in ((axes[0], "a", "(a) ViT-Tiny"), (axes[1], "b", "(b) ViT-B")):
        for method, style in (("mae", "o-"), ("lomar", "s-")):
            pts = [(r["img_size"], r["ms_per_img"]) for r in rows if r["family"] == family and r["method"] == method]
            if pts:
                ax.plot(*zip(*pts), style, label="MAE" if method == "mae" else "LoMaR")
        ax.set_xlabel("image size (px, patch 16)")
        ax.set_ylabel("ms per image (fwd + bwd + AdamW)")
        ax.set_title(f"{title}, 2-core CPU, fp32")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=None)
    ap.add_argument("--families", default="a,b")
    ap.add_argument("--single", help=argparse.SUPPRESS)  # method,family,img_size (child process)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "lomar_throughput" / "lomar_throughput.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    min_time = args.min_time if args.min_time is not None else (0.0 if args.quick else 8.0)
    min_steps = 1 if args.quick else 2
    if args.single:
        method, family, size = args.single.split(",")
        print(json.dumps(measure_one(method, family, int(size), min_time, min_steps)))
        return {}

    psi_before = cpu_pressure()
    peak = matmul_peak_gflops()[0]
    rows = []
    for family in args.families.split(","):
        for size in ENCODERS[family]["sizes"]:
            for method in ("mae", "lomar"):
                cmd = [sys.executable, __file__, "--single", f"{method},{family},{size}", "--threads", str(args.threads),
                       "--min-time", str(min_time)] + (["--quick"] if args.quick else [])
                proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
                if proc.returncode != 0:
                    raise RuntimeError(proc.stderr[-3000:])
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"  {method:>5} ({family}) {size:>4}px: {row['img_per_s']:.2f} img/s, "
                      f"{row['gflop_per_img']:.1f} GFLOP/img, RSS {row['max_rss_mib']:.0f} MiB", flush=True)
    peak = max(peak, matmul_peak_gflops()[0])
    table = []
    print(f"\nLoMaR vs MAE, fp32, {args.threads} threads, matmul peak {peak:.1f} GFLOP/s")
    hdr = (f"{'cfg':>3} {'px':>4} {'MAE img/s':>9} {'LoMaR img/s':>11} {'speed x':>7} {'FLOP x':>6} "
           f"{'MAE %pk':>7} {'LoMaR %pk':>9} {'MAE MiB':>7} {'LoMaR MiB':>9}")
    print(hdr + "\n" + "-" * len(hdr))
    for family in args.families.split(","):
        for size in ENCODERS[family]["sizes"]:
            mae, lomar = (next(r for r in rows if r["family"] == family and r["img_size"] == size and r["method"] == m)
                          for m in ("mae", "lomar"))
            entry = dict(family=family, img_size=size, mae_img_per_s=mae["img_per_s"],
                         lomar_img_per_s=lomar["img_per_s"], speed_ratio=lomar["img_per_s"] / mae["img_per_s"],
                         flop_ratio=mae["gflop_per_img"] / lomar["gflop_per_img"],
                         mae_fraction_of_peak=mae["achieved_gflops"] / peak,
                         lomar_fraction_of_peak=lomar["achieved_gflops"] / peak,
                         mae_max_rss_mib=mae["max_rss_mib"], lomar_max_rss_mib=lomar["max_rss_mib"])
            table.append(entry)
            print(f"{family:>3} {size:>4} {entry['mae_img_per_s']:>9.2f} {entry['lomar_img_per_s']:>11.2f} "
                  f"{entry['speed_ratio']:>7.2f} {entry['flop_ratio']:>6.2f} {100 * entry['mae_fraction_of_peak']:>6.1f}% "
                  f"{100 * entry['lomar_fraction_of_peak']:>8.1f}% {entry['mae_max_rss_mib']:>7.0f} {entry['lomar_max_rss_mib']:>9.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    plot(rows, png)
    result = dict(torch=torch.__version__, threads=args.threads, quick=args.quick, matmul_peak_gflops=peak,
                  cpu_pressure_before=psi_before, cpu_pressure_after=cpu_pressure(), loadavg=os.getloadavg(),
                  configs=table, measurements=rows)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out} and {png}")
    return result


if __name__ == "__main__":
    main()
