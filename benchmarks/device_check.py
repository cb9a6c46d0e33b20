"""The prepared accelerator check (issue #20): one command, at most ~8 minutes on one GPU.

Measures, on the device the machine has (CUDA when present, else the CPU):
  1. MAE ViT-B/16 at 224 px: training img/s in fp32 and under bf16 autocast, each eager and with
     ``torch.compile``; peak device memory of each;
  2. LoMaR vs MAE, ViT-B/16 at 448 px, bf16: img/s and peak memory (LoMaR's local windows against MAE's
     global attention at 784 tokens);
  3. a 2-step ``ssl-pretrain`` run of the MAE ViT-B recipe shape under FSDP (Lightning's FSDP needs CUDA, so
     it is untested on CPU machines), on a generated image folder (no data set needed);
and writes every figure to one JSON (``--out``). Each part has its own time limit and records its error
instead of stopping the others.

    bash benchmarks/device_check.sh                       # what a session holding a GPU runs
    python benchmarks/device_check.py --smoke --out X.json # tiny shapes on the CPU, no compile (a test runs this)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def peak_memory_mib(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(method: str, encoder: str, img_size: int) -> torch.nn.Module:
    from ssl_kit.methods import MAE, LoMaR

    common = dict(encoder=encoder, img_size=img_size, patch_size=16, in_chans=3)
    if method == "mae":
        decoder = dict(decoder_dim=512, decoder_depth=8, decoder_heads=16) if encoder == "base" else \
            dict(decoder_dim=32, decoder_depth=1, decoder_heads=2)
        return MAE(**common, **decoder)
    return LoMaR(**common, window_size=min(7, img_size // 16))  # the paper's 7x7 where the grid holds it (smoke: 4x4)


def throughput(method: str, encoder: str, img_size: int, batch: int, bf16: bool, compile_model: bool,
               seconds: float, encoder_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Training img/s (forward + backward + fused AdamW) of one configuration, after warm-up."""
    dev = device()
    torch.manual_seed(0)
    model = build(method, encoder, img_size).to(dev).train()
    if hasattr(model, "select_attention_kernels"):
        model.select_attention_kernels(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type in ("cuda", "cpu"))
    images = torch.randn(batch, 3, img_size, img_size, device=dev)
    run = torch.compile(model) if compile_model else model

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            out = run(images)
            loss = out[0] if isinstance(out, tuple) else out.loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - start
    for _ in range(2):
        step()
    sync()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or steps < 3:
        step()
        steps += 1
        sync()
    elapsed = time.perf_counter() - start
    return {"method": method, "encoder": encoder, "img_size": img_size, "batch": batch, "bf16": bf16,
            "compile": compile_model, "steps": steps, "img_per_s": round(batch * steps / elapsed, 2),
            "ms_per_step": round(1e3 * elapsed / steps, 2), "first_step_s": round(first, 2),
            "peak_memory_mib": round(peak_memory_mib(dev), 1)}


def image_folder(root: Path, count: int, size: int) -> Path:
    """A folder of random RGB PNGs in two class folders (``ssl-pretrain --data.root``)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for i in range(count):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


def fsdp_run(smoke: bool, timeout: float) -> dict[str, Any]:
    """Two optimizer steps of the ViT-B MAE recipe shape under FSDP through the CLI (needs CUDA)."""
    if not torch.cuda.is_available():
        return {"ran": False, "reason": "Lightning's FSDP strategy needs CUDA; this machine has none"}
    work = Path(tempfile.mkdtemp(prefix="ssl_kit_fsdp_"))
    size = 64 if smoke else 224
    data = image_folder(work / "images", 32, size)
    encoder = ["--model.encoder", "tiny"] if smoke else ["--model.encoder", "base", "--model.decoder_dim", "512",
                                                          "--model.decoder_depth", "8", "--model.decoder_heads", "16"]
    cmd = [sys.executable, "-m", "ssl_kit.cli", "--recipe", "mae", "--data.root", str(data), "--data.img_size", str(size),
           "--model.patch_size", "16", *encoder, "--data.batch_size", "8", "--trainer.strategy", "fsdp",
           "--trainer.devices", "1", "--trainer.max_steps", "2", "--trainer.max_epochs", "1",
           "--trainer.precision", "auto", "--knn_every_n_epochs", "0", "--trainer.enable_progress_bar", "false",
           "--run_dir", str(work / "run")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    ckpt = work / "run" / "checkpoints" / "last.ckpt"
    return {"ran": True, "exit_code": proc.returncode, "wall_s": round(time.perf_counter() - start, 1),
            "checkpoint_written": ckpt.exists(), "command": " ".join(cmd[2:]),
            "stderr_tail": proc.stderr[-2000:] if proc.returncode else proc.stderr[-400:]}


def guarded(name: str, fn: Callable[[], Any], results: dict[str, Any], out: Path) -> None:
    """Run one part; record its result or its error, and write the JSON so far."""
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as err:  # one failing part must not hide the others' figures
        results[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-1500:]}
    print(f"[{time.perf_counter() - start:6.1f} s] {name}: {json.dumps(results[name])[:600]}", flush=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, ~1 s per measurement (CPU test)")
    ap.add_argument("--seconds", type=float, default=None, help="timed seconds per measurement (default 10, smoke 0.5)")
    ap.add_argument("--no_compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--batch", type=int, default=None, help="batch of the 224 px rows (default 256: at 64 an H200 waits on kernel launches and bf16 "
                    "measured 0.99x fp32, at 256 2.02x; smoke 4)")
    ap.add_argument("--parts", nargs="+", default=["mae224", "big", "fsdp", "compile"],
                    choices=["mae224", "big", "fsdp", "compile"], help="which measurements to run (default all)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", str(REPO / "benchmarks" / "results" / "device_check")),
                                                  "device_check.json"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dev = device()
    seconds = args.seconds if args.seconds is not None else (0.5 if args.smoke else 10.0)
    encoder, size, batch, big, big_batch = ("tiny", 32, 4, 64, 2) if args.smoke else ("base", 224, 256, 448, 16)
    batch = args.batch or batch
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": args.smoke,
        "bf16_supported": bool(torch.cuda.is_bf16_supported()) if dev.type == "cuda" else None}
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as ssl-pretrain on CUDA (float32 matmul precision "high")
        torch.backends.cudnn.allow_tf32 = True
    # torch.compile on a CPU spends minutes compiling (measured: 112 s for the smoke model): GPU only
    run_compile = "compile" in args.parts and not args.no_compile and dev.type != "cpu"
    results["compile_rows"] = "skipped: no CUDA" if dev.type == "cpu" else ("skipped: --no_compile" if args.no_compile else "run")
    # the eager rows, 448 px and FSDP first, the compile rows (minutes of compiling) last: a run cut short by its
    # time limit keeps the certain figures
    for bf16 in (False, True) if "mae224" in args.parts else ():
        name = f"mae_{encoder}_{size}px_{'bf16' if bf16 else 'fp32'}"
        guarded(name, lambda: throughput("mae", encoder, size, batch, bf16, False, seconds), results, out)
    for method in ("mae", "lomar") if "big" in args.parts else ():
        guarded(f"{method}_{encoder}_{big}px_bf16", lambda: throughput(method, encoder, big, big_batch, True, False, seconds),
                results, out)
    if "fsdp" in args.parts:
        guarded("fsdp_2_steps", lambda: fsdp_run(args.smoke, timeout=180), results, out)
    for bf16 in (False, True) if run_compile else ():
        name = f"mae_{encoder}_{size}px_{'bf16' if bf16 else 'fp32'}_compile"
        guarded(name, lambda: throughput("mae", encoder, size, batch, bf16, True, seconds), results, out)
    rows = {k: v for k, v in results.items() if isinstance(v, dict) and "img_per_s" in v}
    fp32, bf16 = rows.get(f"mae_{encoder}_{size}px_fp32"), rows.get(f"mae_{encoder}_{size}px_bf16")
    if fp32 and bf16:
        results["bf16_over_fp32"] = round(bf16["img_per_s"] / fp32["img_per_s"], 3)
    for precision in ("fp32", "bf16"):
        eager, compiled = rows.get(f"mae_{encoder}_{size}px_{precision}"), rows.get(f"mae_{encoder}_{size}px_{precision}_compile")
        if eager and compiled:
            results[f"compile_over_eager_{precision}"] = round(compiled["img_per_s"] / eager["img_per_s"], 3)
    lomar, mae = rows.get(f"lomar_{encoder}_{big}px_bf16"), rows.get(f"mae_{encoder}_{big}px_bf16")
    if lomar and mae:
        results[f"lomar_over_mae_{big}px"] = round(lomar["img_per_s"] / mae["img_per_s"], 3)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
