"""benchmarks/sweep.py builds the ``ssl-pretrain`` command every sweep starts from; every benchmark script imports
(their shared helpers moved between files: a broken import would only show when a benchmark is next run)."""
import importlib
from pathlib import Path

import pytest

from helpers import BENCHMARKS, import_benchmark


def test_pretrain_command_seeds_the_run_and_optionally_the_data(monkeypatch):
    sweep = import_benchmark(monkeypatch, "sweep")
    assert sweep.pretrain_command("mae", Path("runs/x"), None, "--a", "1") == [
        "ssl-pretrain", "--recipe", "mae", "--run_dir", "runs/x", "--a", "1"]
    assert sweep.pretrain_command("mae", Path("runs/x"), 3) == [
        "ssl-pretrain", "--recipe", "mae", "--run_dir", "runs/x", "--seed_everything", "3"]
    assert sweep.pretrain_command("u2pl", Path("r"), 0, "--b", data_seed=True)[5:] == [
        "--seed_everything", "0", "--data.seed", "0", "--b"]


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCHMARKS.glob("*.py")))
def test_every_benchmark_script_imports(monkeypatch, script):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module(script)
    if script != "sweep":  # the shared helpers, not a benchmark
        assert callable(getattr(module, "main", None)), f"benchmarks/{script}.py has no main()"
