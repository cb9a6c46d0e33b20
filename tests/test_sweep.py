"""benchmarks/sweep.py builds the ``ssl-pretrain`` command every sweep starts from; every benchmark script imports
(their shared helpers moved between files: a broken import would only show when a benchmark is next run)."""
import importlib
import os
from pathlib import Path

import pytest
import torch

from helpers import BENCHMARKS, import_benchmark


def test_pretrain_command_seeds_the_run_and_optionally_the_data(monkeypatch):
    sweep = import_benchmark(monkeypatch, "sweep")
    assert sweep.pretrain_command("mae", Path("runs/x"), None, "--a", "1") == [
        "ssl-pretrain", "--recipe", "mae", "--run_dir", "runs/x", "--a", "1"]
    assert sweep.pretrain_command("mae", Path("runs/x"), 3) == [
        "ssl-pretrain", "--recipe", "mae", "--run_dir", "runs/x", "--seed_everything", "3"]
    assert sweep.pretrain_command("u2pl", Path("r"), 0, "--b", data_seed=True)[5:] == [
        "--seed_everything", "0", "--data.seed", "0", "--b"]


def write_metrics(path: Path, rows: list[tuple[int, str]]) -> None:
    path.write_text("epoch,step,val_map\n" + "".join(f"0,{step},{value}\n" for step, value in rows))


def test_a_resumed_run_is_recorded_over_all_its_parts(monkeypatch, tmp_path):
    """ssl-pretrain keeps a resumed run's earlier metrics as metrics.partN.csv: the recorded curve joins the parts
    in order (part10 after part2), and a part resumed from an older checkpoint replaces the steps it logs again."""
    sweep = import_benchmark(monkeypatch, "sweep")
    write_metrics(tmp_path / "metrics.part1.csv", [(9, ""), (199, "0.1"), (399, "0.2")])
    write_metrics(tmp_path / "metrics.part2.csv", [(399, "0.25"), (599, "0.3")])  # a resume that logs step 399 again
    for part in range(3, 10):
        write_metrics(tmp_path / f"metrics.part{part}.csv", [])
    write_metrics(tmp_path / "metrics.part10.csv", [(799, "0.4")])
    write_metrics(tmp_path / "metrics.csv", [(999, "0.5")])
    rows = sweep.logged_rows(tmp_path)
    assert [(r["step"], r["val_map"]) for r in rows] == [
        ("9", ""), ("199", "0.1"), ("399", "0.25"), ("599", "0.3"), ("799", "0.4"), ("999", "0.5")]
    assert sweep.finished_epochs(tmp_path, "val_map", 5) and not sweep.finished_epochs(tmp_path, "val_map", 6)


def test_a_finished_runs_wall_time_is_its_checkpoints_training_time_over_resumes(monkeypatch, tmp_path):
    """The training time Lightning's Timer keeps in last.ckpt (summed over resumes); without one (older runs), the
    time from config.yaml to last.ckpt."""
    sweep = import_benchmark(monkeypatch, "sweep")
    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    torch.save({"callbacks": {"Timer": {"time_elapsed": {"train": 1234.5, "validate": 0.0}}}}, last)
    assert sweep.finished_run_wall(tmp_path) == 1234.5
    (tmp_path / "config.yaml").write_text("")
    torch.save({"callbacks": {}}, last)
    os.utime(tmp_path / "config.yaml", (1000.0, 1000.0))
    os.utime(last, (1100.0, 1100.0))
    assert sweep.finished_run_wall(tmp_path) == 100.0


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCHMARKS.glob("*.py")))
def test_every_benchmark_script_imports(monkeypatch, script):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module(script)
    if script != "sweep":  # the shared helpers, not a benchmark
        assert callable(getattr(module, "main", None)), f"benchmarks/{script}.py has no main()"
