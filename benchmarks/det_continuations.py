"""Paired detection runs that branch from one checkpoint (issue #23): their val curves side by side, and each run's
lead over the first one at every validation step they share.

A paired comparison starts several settings from the same state, e.g. the step-3000 checkpoint of a run kept with
``--keep_every_n_steps 3000``, each continued in its own ``--run_dir`` with ``--ckpt_path`` of that checkpoint. A
continued run's folder holds only the steps after the branch (over all its resumes: ``metrics.partN.csv``); the
first steps of every curve are those of ``--base``, the run the checkpoint came from.

    python benchmarks/det_continuations.py --name ema_s1 --base runs/det_st6000/st_6000_s1 \\
        supervised=runs/det_oracle/labeled10_6000_mae_s1 st_ema999=runs/det_st6000/st_ema999_cont_s1

Writes benchmarks/results/det_continuations/NAME.json: per run, its folder, branch step and the curves of
``val_map``, ``val_map50`` (EMA teacher) and their ``_student`` versions; and per shared step the differences to
the first run.

Over seeds (one result file per seed, the same run names): each run's lead over the reference at the last shared
step and averaged over the shared steps from ``--from_step`` on, per seed and as mean and standard deviation:

    python benchmarks/det_continuations.py --name ema_seeds --summarise ema_s0 ema_s1 --from_step 3200
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from sweep import logged_rows

RESULTS = Path(__file__).parent / "results" / Path(__file__).stem
METRICS = ["val_map", "val_map50", "val_map_student", "val_map50_student"]


def curve(run_dir: Path, base: Path | None) -> tuple[int, dict[int, dict[str, float]]]:
    """(first step the run logged itself, {optimizer steps taken: metrics}) with ``base``'s values before that step
    (Lightning logs the 0-based step index; steps taken = index + 1)."""
    own = {int(r["step"]) + 1: {m: float(r[m]) for m in METRICS} for r in logged_rows(run_dir) if r.get(METRICS[0])}
    if not own:
        raise SystemExit(f"{run_dir} logged no {METRICS[0]} yet.")
    branch = min(own)
    if base is None or base == run_dir:
        return 0, own
    inherited = {s: v for s, v in curve(base, None)[1].items() if s < branch}
    return branch, {**inherited, **own}


def nearest(values: dict[int, dict[str, float]], step: int, tolerance: int) -> int | None:
    """The logged step closest to ``step``, if within ``tolerance`` steps."""
    best = min(values, key=lambda s: abs(s - step))
    return best if abs(best - step) <= tolerance else None


def summarise(names: list[str], from_step: int) -> dict:
    """Each run's lead over the reference in the result files ``names`` (one per seed): at the last shared step and
    averaged over the shared steps >= ``from_step``; per file, mean and standard deviation (``statistics.stdev``)."""
    results = {n: json.loads((RESULTS / f"{n}.json").read_text()) for n in names}
    references = {r["reference"] for r in results.values()}
    if len(references) != 1:
        raise SystemExit(f"the result files compare with different references: {sorted(references)}")
    runs = sorted(set.intersection(*(set(r["lead_over_reference"]) for r in results.values())))
    summary: dict = {"reference": references.pop(), "files": names, "from_step": from_step, "runs": {}}
    for run in runs:
        per_file = {}
        for name, result in results.items():
            lead = {int(step): v for step, v in result["lead_over_reference"][run].items()}
            late = [v for step, v in lead.items() if step >= from_step]
            if not late:
                raise SystemExit(f"{name}: {run} shares no step >= {from_step} with the reference")
            per_file[name] = {"last_step": max(lead), "last": lead[max(lead)],
                              "late_mean": {m: round(statistics.fmean(v[m] for v in late), 4) for m in METRICS},
                              "late_steps": len(late)}
        summary["runs"][run] = {"per_file": per_file, **{
            f"{kind}_{stat}": {m: round(fn([f[kind][m] for f in per_file.values()]), 4) for m in METRICS}
            for kind in ("last", "late_mean") for stat, fn in (("mean", statistics.fmean), ("sd", spread))}}
    for run, s in summary["runs"].items():
        print(f"{run} - {summary['reference']}: " + "; ".join(
            f"{m} last {s['last_mean'][m] * 100:+.2f} ± {s['last_sd'][m] * 100:.2f}, steps >= {from_step} "
            f"{s['late_mean_mean'][m] * 100:+.2f} ± {s['late_mean_sd'][m] * 100:.2f} points" for m in METRICS[:2]))
    return summary


def spread(values: list[float]) -> float:
    """Sample standard deviation (0 for one value)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="NAME=RUN_DIR; differences are to the first")
    parser.add_argument("--summarise", nargs="+", metavar="RESULT",
                        help="instead of runs: result files (names, one per seed) to summarise over seeds")
    parser.add_argument("--from_step", type=int, default=0, help="with --summarise: average the leads from this step")
    parser.add_argument("--base", help="the run the branch checkpoint came from (its curve before the branch)")
    parser.add_argument("--name", required=True, help="result file name")
    parser.add_argument("--tolerance", type=int, default=0,
                        help="pair a reference step with another run's value logged this many steps away at most "
                             "(a run resumed before Lightning's second-stop fix ran 15 extra steps)")
    args = parser.parse_args()
    if args.summarise:
        if args.runs:
            parser.error("give runs or --summarise, not both")
        out = RESULTS / f"{args.name}.json"
        out.write_text(json.dumps(summarise(args.summarise, args.from_step), indent=1) + "\n")
        print(f"wrote {out}")
        return
    if not args.runs:
        parser.error("give NAME=RUN_DIR runs (or --summarise RESULT ...)")
    base = Path(args.base) if args.base else None
    runs = {}
    for item in args.runs:
        name, sep, folder = item.partition("=")
        if not sep:
            parser.error(f"{item!r}: give NAME=RUN_DIR")
        branch, values = curve(Path(folder), base)
        runs[name] = {"run_dir": folder, "branch_step": branch, "curves": values}
    first, *others = runs
    paired = {step: {n: nearest(r["curves"], step, args.tolerance) for n, r in runs.items()}
              for step in sorted(runs[first]["curves"])}
    shared = [step for step, at in paired.items() if all(s is not None for s in at.values())]
    print("step  " + "  ".join(f"{n}: mAP / mAP@50 (student mAP)" for n in runs))
    lead = {n: {} for n in others}
    for step in shared:
        value = {n: runs[n]["curves"][paired[step][n]] for n in runs}
        print(f"{step:5d} " + "  ".join(f"{v['val_map']:.4f} / {v['val_map50']:.4f} ({v['val_map_student']:.4f})"
                                        for v in value.values()))
        for n in others:
            lead[n][step] = {m: round(value[n][m] - value[first][m], 4) for m in METRICS}
    for n in others:
        last = lead[n][shared[-1]] if shared else {}
        print(f"{n} - {first} at step {shared[-1] if shared else '-'}: "
              + ", ".join(f"{m} {v * 100:+.2f} points" for m, v in last.items()))
    out = RESULTS / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"base": args.base, "reference": first, "tolerance": args.tolerance, "shared_steps": shared, "runs": runs,
              "lead_over_reference": lead}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
