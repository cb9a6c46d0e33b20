"""MAE pretraining on this machine: 1 CPU process (2 threads) vs 2 CPU DDP processes (1 thread each).

Run (from the repo root; ~5 minutes on 2 otherwise idle cores, longer when they are shared):
    python benchmarks/ddp_scaling.py
    python benchmarks/ddp_scaling.py --quick          # smoke run: 2 configs, few steps, batch 32 (~1.5 min)
Options: --steps 20 --warmup 5 --batch-size 128 --repeats 2 --configs 1p2t,2p_weak,2p_strong,1p1t,2p_weak_nohook
         --max-wait 20 (seconds to wait for the other processes on the machine to go quiet before each run)
         --max-busy 0.3 --retries 1 --budget 540 (re-run a configuration once when other processes used more than
         0.3 cores during its measured steps, while less than 540 s have passed; every attempt is kept)
         --out benchmarks/results/ddp_scaling/ddp_scaling.json (the markdown table goes next to it, .md)

What runs: ``ssl_kit.methods.MAE`` (ViT encoder dim 192, depth 4, 3 heads; 32 px, patch 4; decoder dim 64,
depth 1, 2 heads; mask ratio 0.75) with ``ssl_kit.data.PretrainDataModule`` on the built-in Fashion-MNIST,
trained by a plain ``pytorch_lightning.Trainer`` (fp32, the method's own AdamW + schedule, augmentation on
the device as in ``ssl-pretrain``; no logger, checkpoints, progress bar or k-NN monitor) for
``warmup + steps`` optimizer steps. Each configuration is a fresh ``python benchmarks/ddp_scaling.py --worker``
process; the DDP ones use ``strategy="ddp"`` (gloo), ``accelerator="cpu"``, ``devices=2`` (Lightning starts
rank 1 by re-running the same command), and rank 0 writes the results of all ranks to a JSON file.

Configurations (b = --batch-size, images per process and step):
    1p2t            1 process x 2 torch threads, batch b              (the baseline)
    2p_weak         2 DDP processes x 1 thread, batch b each           (weak scaling: global batch 2b)
    2p_strong       2 DDP processes x 1 thread, batch b/2 each         (strong scaling: global batch b)
    1p1t            1 process x 1 thread, batch b                      (what one DDP rank's compute compares to)
    2p_weak_nohook  as 2p_weak without the timing hook                 (cost of timing the all-reduce)

Per step, measured by a Lightning callback with time.perf_counter (medians over the measured steps):
    total    on_train_batch_end(i-1) -> on_train_batch_end(i)
    data     on_train_batch_end(i-1) -> on_train_batch_start(i): loader + collate + device-side kornia
             augmentation + the loop's bookkeeping between steps; ``aug`` is the augmentation part alone
             (PretrainDataModule.on_after_batch_transfer, timed by a subclass)
    comm     wall time inside DDP's gradient all-reduce: a communication hook (registered in the callback's
             on_fit_start) wraps the default allreduce_hook and waits on its future, summed over the buckets
             of the step. Waiting makes the all-reduce synchronous (no overlap with the rest of backward), and it
             includes the time a rank waits for the slower rank to reach the same bucket.
    compute  total - data - comm: forward + backward + optimizer step (+ DDP's per-forward buffer broadcast)
img/s = global batch x measured steps / (wall time of the measured steps, on rank 0).
scaling efficiency = img/s(config) / img/s(1p2t): both use the 2 cores, so 1.0 means processes and threads
are equally good; for strong scaling the same global batch is processed, for weak scaling twice as many images
per step. Contention: the load average and PSI before each run, and during the measured steps the CPU seconds
our processes used per wall second (cpu_util, up to the thread count) and the CPU seconds other processes used
(other_cores_busy, from /proc/stat), are recorded per run; a configuration's headline numbers are from its best
(highest img/s) run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]  # ssl_kit itself comes from the installed package

CONFIGS: dict[str, dict[str, Any]] = {
    "1p2t": dict(procs=1, threads=2, batch_div=1, hook=True, label="1 proc x 2 threads"),
    "2p_weak": dict(procs=2, threads=1, batch_div=1, hook=True, label="2 procs x 1 thread, weak"),
    "2p_strong": dict(procs=2, threads=1, batch_div=2, hook=True, label="2 procs x 1 thread, strong"),
    "1p1t": dict(procs=1, threads=1, batch_div=1, hook=True, label="1 proc x 1 thread"),
    "2p_weak_nohook": dict(procs=2, threads=1, batch_div=1, hook=False, label="2 procs x 1 thread, weak, no hook"),
}
MODEL = dict(encoder="tiny", encoder_kwargs=dict(embed_dim=192, depth=4, num_heads=3), img_size=32, patch_size=4,
             in_chans=1, decoder_dim=64, decoder_depth=1, decoder_heads=2, mask_ratio=0.75)


# ----------------------------------------------------------------------------- machine state
def cpu_pressure() -> str | None:
    """Linux PSI line for CPU (avg10 >> 0: other processes competed for the cores)."""
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return None


def cpu_jiffies() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz


def others_busy_cores(seconds: float = 1.0) -> float:
    """Cores kept busy by other processes over ``seconds`` (this process sleeps meanwhile)."""
    b0, _ = cpu_jiffies()
    time.sleep(seconds)
    b1, _ = cpu_jiffies()
    return (b1 - b0) / seconds


# ----------------------------------------------------------------------------- worker side (every rank)
def make_timer_classes():
    import pytorch_lightning as pl
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    from ssl_kit.data import PretrainDataModule

    class TimedPretrainDataModule(PretrainDataModule):
        """PretrainDataModule that times its device-side augmentation of training batches."""

        last_aug_s = 0.0

        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            t0 = time.perf_counter()
            out = super().on_after_batch_transfer(batch, dataloader_idx)
            self.last_aug_s = time.perf_counter() - t0
            return out

    class StepTimer(pl.Callback):
        """Per-step wall times (data / compute / gradient all-reduce); rank 0 writes every rank's to ``out``."""

        def __init__(self, warmup: int, steps: int, threads: int, hook: bool, out: str, meta: dict[str, Any]):
            self.warmup, self.steps, self.threads, self.hook, self.out, self.meta = warmup, steps, threads, hook, out, meta
            self.starts: list[float] = []
            self.ends: list[float] = []
            self.aug: list[float] = []
            self.comm: list[float] = []
            self.comm_calls: list[int] = []
            self._comm_s, self._calls, self._sizes, self.bucket_bytes = 0.0, 0, [], []
            self.cpu0 = self.cpu1 = self.sys0 = self.sys1 = None

        def _timed_allreduce(self, state, bucket):  # unannotated: DDP checks hook annotations (strings here)
            t0 = time.perf_counter()
            fut = allreduce_hook(state, bucket)  # state None: the default (world) group; averages the grads
            fut.wait()
            self._comm_s += time.perf_counter() - t0
            self._calls += 1
            buf = bucket.buffer()
            self._sizes.append(buf.numel() * buf.element_size())
            return fut

        def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            torch.set_num_threads(self.threads)  # Lightning may set it from OMP_NUM_THREADS / cpu count
            model = trainer.strategy.model
            self.is_ddp = isinstance(model, DistributedDataParallel)
            if self.is_ddp and self.hook:
                model.register_comm_hook(None, self._timed_allreduce)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.starts.append(time.perf_counter())
            self.aug.append(trainer.datamodule.last_aug_s)
            self._comm_s, self._calls, self._sizes = 0.0, 0, []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.ends.append(time.perf_counter())
            self.comm.append(self._comm_s)
            self.comm_calls.append(self._calls)
            self.bucket_bytes = self._sizes  # DDP re-buckets after its first step: keep the latest step's sizes
            n = len(self.ends)
            if n in (self.warmup, self.warmup + self.steps):
                cpu, sysb = time.process_time(), cpu_jiffies()
                if n == self.warmup:
                    self.cpu0, self.sys0 = cpu, sysb
                else:
                    self.cpu1, self.sys1 = cpu, sysb

        def rank_stats(self, trainer: pl.Trainer) -> dict[str, Any]:
            w, s = self.warmup, self.steps
            idx = range(w, w + s)  # measured steps; step i's interval starts at ends[i-1] (w >= 1)
            total = [self.ends[i] - self.ends[i - 1] for i in idx]
            data = [self.starts[i] - self.ends[i - 1] for i in idx]
            comm = [self.comm[i] for i in idx]
            aug = [self.aug[i] for i in idx]
            compute = [t - d - c for t, d, c in zip(total, data, comm)]
            wall = self.ends[w + s - 1] - self.ends[w - 1]
            ms = lambda xs: 1e3 * statistics.median(xs)  # noqa: E731
            mean_ms = lambda xs: 1e3 * statistics.fmean(xs)  # noqa: E731
            return dict(
                rank=trainer.global_rank, torch_threads=torch.get_num_threads(), wall_s=wall,
                cpu_s=self.cpu1 - self.cpu0, cpu_util=(self.cpu1 - self.cpu0) / wall,
                sys_busy_s=self.sys1[0] - self.sys0[0], sys_steal_s=self.sys1[1] - self.sys0[1],
                median_ms=dict(total=ms(total), data=ms(data), aug=ms(aug), compute=ms(compute), comm=ms(comm)),
                mean_ms=dict(total=mean_ms(total), data=mean_ms(data), aug=mean_ms(aug), compute=mean_ms(compute),
                             comm=mean_ms(comm)),
                allreduce_calls_per_step=statistics.median([self.comm_calls[i] for i in idx]),
                bucket_bytes=self.bucket_bytes,
                per_step_ms=dict(total=[1e3 * v for v in total], data=[1e3 * v for v in data],
                                 aug=[1e3 * v for v in aug], compute=[1e3 * v for v in compute],
                                 comm=[1e3 * v for v in comm]),
            )

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            mine = self.rank_stats(trainer)
            if dist.is_available() and dist.is_initialized():
                ranks: list[Any] = [None] * dist.get_world_size()
                dist.all_gather_object(ranks, mine)
            else:
                ranks = [mine]
            if trainer.global_rank != 0:
                return
            r0 = ranks[0]
            steps = self.steps
            global_batch = self.meta["batch_per_proc"] * trainer.world_size
            ours = sum(r["cpu_s"] for r in ranks)
            result = dict(self.meta, world_size=trainer.world_size, ddp=self.is_ddp, global_batch=global_batch,
                          img_per_s=global_batch * steps / r0["wall_s"], wall_s=r0["wall_s"],
                          cpu_util_total=ours / r0["wall_s"],
                          other_cores_busy=max(0.0, (r0["sys_busy_s"] - ours) / r0["wall_s"]),
                          steal_cores=r0["sys_steal_s"] / r0["wall_s"],
                          param_count=sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
                          ranks=ranks)
            Path(self.out).write_text(json.dumps(result, indent=1))

    return TimedPretrainDataModule, StepTimer


def worker(cfg: dict[str, Any], out: str) -> None:
    """One configuration; Lightning re-runs this same command for DDP rank 1."""
    import torch

    torch.set_num_threads(cfg["threads"])
    import pytorch_lightning as pl

    from ssl_kit.methods import MAE
    from ssl_kit.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # as ssl-pretrain does
    TimedPretrainDataModule, StepTimer = make_timer_classes()
    pl.seed_everything(0, verbose=False)
    model = MAE(**MODEL)
    dm = TimedPretrainDataModule(img_size=MODEL["img_size"], batch_size=cfg["batch_per_proc"], num_workers=0,
                                 knn_train_size=100, knn_test_size=100, seed=0)
    timer = StepTimer(cfg["warmup"], cfg["steps"], cfg["threads"], cfg["hook"], out, meta=dict(cfg))
    trainer = pl.Trainer(
        accelerator="cpu", devices=cfg["procs"], strategy="ddp" if cfg["procs"] > 1 else "auto",
        precision="32-true", max_steps=cfg["warmup"] + cfg["steps"], max_epochs=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer], default_root_dir=str(Path(out).parent),
    )
    trainer.fit(model, datamodule=dm)


# ----------------------------------------------------------------------------- orchestrator
def run_config(name: str, args: argparse.Namespace, tmp: Path, rep: int, attempt: int = 0) -> dict[str, Any]:
    spec = CONFIGS[name]
    cfg = dict(config=name, label=spec["label"], procs=spec["procs"], threads=spec["threads"], hook=spec["hook"],
               batch_per_proc=args.batch_size // spec["batch_div"], warmup=args.warmup, steps=args.steps, repeat=rep,
               attempt=attempt)
    waited, busy = 0.0, others_busy_cores()
    while busy > 0.25 and waited < args.max_wait:  # let other work on the machine finish, up to max_wait
        time.sleep(2.0)
        waited += 3.0
        busy = others_busy_cores()
    out = tmp / f"{name}_{rep}_{attempt}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]),
               PYTHONWARNINGS="ignore")
    for key in ("MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"):  # a fresh process group per run
        env.pop(key, None)
    before = dict(loadavg=os.getloadavg(), cpu_pressure=cpu_pressure(), others_busy_cores=busy, waited_s=waited)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg), "--result", str(out)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{name} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-4000:]}")
    result = json.loads(out.read_text())
    result.update(before=before, after=dict(loadavg=os.getloadavg(), cpu_pressure=cpu_pressure()),
                  process_wall_s=elapsed)
    return result


def summary_rows(runs: list[dict[str, Any]], order: list[str]) -> list[dict[str, Any]]:
    """One row per configuration: its best repeat (highest img/s), with the per-rank breakdown averaged."""
    rows = []
    for name in order:
        mine = [r for r in runs if r["config"] == name]
        best = max(mine, key=lambda r: r["img_per_s"])
        parts = {k: statistics.fmean(rk["median_ms"][k] for rk in best["ranks"]) for k in best["ranks"][0]["median_ms"]}
        rows.append(dict(config=name, label=best["label"], procs=best["procs"], threads=best["threads"], hook=best["hook"],
                         batch_per_proc=best["batch_per_proc"], global_batch=best["global_batch"],
                         img_per_s=best["img_per_s"], img_per_s_all=[r["img_per_s"] for r in mine],
                         step_ms=parts["total"], data_ms=parts["data"], aug_ms=parts["aug"],
                         compute_ms=parts["compute"], comm_ms=parts["comm"],
                         comm_frac=parts["comm"] / parts["total"], cpu_util=best["cpu_util_total"],
                         other_cores_busy=best["other_cores_busy"], loadavg_1m=best["before"]["loadavg"][0],
                         repeat=best["repeat"]))
    base = next((r for r in rows if r["config"] == "1p2t"), None)
    for r in rows:
        r["efficiency_vs_1p2t"] = r["img_per_s"] / base["img_per_s"] if base else None
    return rows


def table(rows: list[dict[str, Any]], markdown: bool) -> str:
    head = ["config", "procs x thr", "batch/proc", "global batch", "img/s", "eff vs 1p2t", "step ms", "data(aug) ms",
            "compute ms", "comm ms", "comm %", "cpu util", "others busy", "load 1m"]
    lines = []
    for r in rows:
        eff = f"{r['efficiency_vs_1p2t']:.2f}" if r["efficiency_vs_1p2t"] is not None else "-"
        lines.append([r["config"], f"{r['procs']} x {r['threads']}", str(r["batch_per_proc"]), str(r["global_batch"]),
                      f"{r['img_per_s']:.1f}", eff, f"{r['step_ms']:.1f}", f"{r['data_ms']:.1f} ({r['aug_ms']:.1f})",
                      *((f"{r['compute_ms']:.1f}", f"{r['comm_ms']:.1f}", f"{100 * r['comm_frac']:.1f}")
                        if r["hook"] or r["procs"] == 1 else (f"{r['compute_ms']:.1f} (+comm)", "n/a", "n/a")),
                      f"{r['cpu_util']:.2f}", f"{r['other_cores_busy']:.2f}", f"{r['loadavg_1m']:.2f}"])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), "-" * len(fmt(head))] + [fmt(c) for c in lines])


def notes(rows: list[dict[str, Any]]) -> list[str]:
    by = {r["config"]: r for r in rows}
    out = []
    if "1p2t" in by and "1p1t" in by:
        out.append(f"2 threads vs 1 thread in one process (compute per step): {by['1p1t']['compute_ms']:.1f} -> "
                   f"{by['1p2t']['compute_ms']:.1f} ms, speed-up {by['1p1t']['compute_ms'] / by['1p2t']['compute_ms']:.2f}x")
    if "2p_weak" in by and "1p1t" in by:
        out.append(f"a DDP rank's compute (1 thread, same batch) vs 1 process x 1 thread: {by['2p_weak']['compute_ms']:.1f} "
                   f"vs {by['1p1t']['compute_ms']:.1f} ms ({by['2p_weak']['compute_ms'] / by['1p1t']['compute_ms']:.2f}x)")
    if "2p_weak" in by and "2p_weak_nohook" in by:
        out.append(f"timing hook cost (2p_weak with vs without the synchronous all-reduce timer): "
                   f"{by['2p_weak']['img_per_s']:.1f} vs {by['2p_weak_nohook']['img_per_s']:.1f} img/s")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="measured steps per run (default 20; --quick 6)")
    ap.add_argument("--warmup", type=int, default=None, help="un-timed steps first (default 5; --quick 2)")
    ap.add_argument("--batch-size", type=int, default=None, help="images per process and step (default 128; --quick 32)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per configuration, interleaved (default 2; --quick 1)")
    ap.add_argument("--configs", default=None, help=f"comma list of {', '.join(CONFIGS)} (default: all; "
                                                    "--quick: 1p2t,2p_weak)")
    ap.add_argument("--quick", action="store_true", help="smoke run: few steps, small batch, 2 configs, 1 repeat")
    ap.add_argument("--max-wait", type=float, default=20.0, help="seconds to wait for other load before each run")
    ap.add_argument("--max-busy", type=float, default=0.3,
                    help="a run during which other processes kept more cores busy than this is repeated (--retries)")
    ap.add_argument("--retries", type=int, default=1, help="extra attempts per run when the cores were shared")
    ap.add_argument("--budget", type=float, default=540.0, help="no more retries after this many seconds in all")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per run")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ddp_scaling" / "ddp_scaling.json"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        worker(json.loads(args.worker), args.result)
        return None

    q = args.quick
    args.steps = args.steps or (6 if q else 20)
    args.warmup = args.warmup or (2 if q else 5)
    args.batch_size = args.batch_size or (32 if q else 128)
    args.repeats = args.repeats or (1 if q else 2)
    order = (args.configs or ("1p2t,2p_weak" if q else "1p2t,2p_weak,2p_strong,1p1t,2p_weak_nohook")).split(",")
    unknown = [c for c in order if c not in CONFIGS]
    if unknown or args.warmup < 1 or args.batch_size < 2:
        ap.error(f"unknown configs {unknown}" if unknown else "--warmup must be >= 1 and --batch-size >= 2")

    import torch

    start = time.time()
    runs = []
    with tempfile.TemporaryDirectory(prefix="ddp_scaling_") as tmp:
        for rep in range(args.repeats):
            for name in (order if rep % 2 == 0 else order[::-1]):  # interleaved: drifting load hits all configs
                for attempt in range(args.retries + 1):  # re-run (all attempts kept) when others shared the cores
                    r = run_config(name, args, Path(tmp), rep, attempt)
                    runs.append(r)
                    print(f"[{rep}{'.' + str(attempt) if attempt else ''}] {name:15s} {r['img_per_s']:8.1f} img/s"
                          f"  step {r['ranks'][0]['median_ms']['total']:7.1f} ms"
                          f"  comm {r['ranks'][0]['median_ms']['comm']:6.1f} ms  cpu util {r['cpu_util_total']:.2f}"
                          f"  others busy {r['other_cores_busy']:.2f}  load {r['before']['loadavg'][0]:.2f}"
                          f"  ({r['process_wall_s']:.0f} s)", flush=True)
                    if r["other_cores_busy"] <= args.max_busy or time.time() - start > args.budget:
                        break
    rows = summary_rows(runs, order)
    title = (f"MAE ({MODEL['encoder_kwargs']['embed_dim']}d x {MODEL['encoder_kwargs']['depth']} ViT, "
             f"{MODEL['img_size']} px / patch {MODEL['patch_size']}, decoder {MODEL['decoder_dim']}d x "
             f"{MODEL['decoder_depth']}) on Fashion-MNIST, CPU, {os.cpu_count()} cores, torch {torch.__version__}; "
             f"{args.steps} measured steps after {args.warmup} warm-up; per config the best of {args.repeats} interleaved "
             "repeats (+ re-runs when shared)"
             + (" [QUICK]" if q else ""))
    text_table = table(rows, markdown=False)
    extra = notes(rows)
    print("\n" + title + "\n" + text_table)
    for line in extra:
        print("  " + line)
    result = dict(title=title, command="python benchmarks/ddp_scaling.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  quick=q, model=MODEL, steps=args.steps, warmup=args.warmup, batch_size=args.batch_size,
                  repeats=args.repeats, configs=order, torch=torch.__version__, cpu_count=os.cpu_count(),
                  machine=platform.machine(), processor=platform.processor(), total_time_s=time.time() - start,
                  loadavg_end=os.getloadavg(), summary=rows, notes=extra, runs=runs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    md = [f"# DDP scaling on CPU: {title}", "", f"Command: `{result['command']}`", "", table(rows, markdown=True), ""]
    md += [f"- {line}" for line in extra]
    md += ["- step = data + compute + comm (medians over steps, averaged over ranks); data = loader + kornia augmentation "
           "(aug) + loop bookkeeping; comm = gradient all-reduce, timed synchronously by a DDP comm hook; "
           "eff = img/s / img/s(1p2t); cpu util = CPU seconds of our processes per wall second; others busy = cores "
           "used by other processes meanwhile (/proc/stat); load 1m = os.getloadavg() before the run.",
           "- every run (img/s @ others busy): " + "; ".join(
               f"{name} " + ", ".join(f"{r['img_per_s']:.1f} @ {r['other_cores_busy']:.2f}" for r in runs if r["config"] == name)
               for name in order), ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {out} and {out.with_suffix('.md')}  ({result['total_time_s']:.0f} s in all)")
    return result


if __name__ == "__main__":
    main()
