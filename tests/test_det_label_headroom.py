"""benchmarks/det_label_headroom.py records finished detector runs instead of rerunning them, runs the missing ones
with the labeled fraction and the epochs of the step budget, and refuses a budget that is not whole epochs."""
import json
import sys

import pytest

from helpers import finished_detection_run as finished_run
from helpers import fake_detection_runs, import_benchmark


def test_finished_runs_are_recorded_and_missing_ones_run_with_fraction_and_epochs(monkeypatch, tmp_path):
    bench = import_benchmark(monkeypatch, "det_label_headroom")
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    runs = tmp_path / "runs"
    finished_run(runs / "labeled100_400_random_s1", epochs=2)
    commands = fake_detection_runs(monkeypatch, epochs=2)
    monkeypatch.setattr(sys, "argv", ["det_label_headroom.py", "--inits", "random", "--steps", "400", "--fractions",
                                      "0.1", "1.0", "--runs", str(runs), "--result", "h.json"])
    bench.main()
    assert len(commands) == 1  # only the 10 % run was missing
    cmd = " ".join(commands[0])
    assert "--data.labeled_fraction 0.1" in cmd and "--trainer.max_epochs 2" in cmd and "--recipe det_supervised" in cmd
    result = json.loads((tmp_path / "h.json").read_text())["runs"]
    assert set(result) == {"labeled10_400_random_s1", "labeled100_400_random_s1"}
    recorded = result["labeled100_400_random_s1"]
    assert recorded["wall_s"] == pytest.approx(930.0, abs=1.0)
    assert recorded["val_map50_per_epoch"] == [0.2, 0.3] and recorded["curve_steps"] == [200, 400]
    assert recorded["labeled_fraction"] == 1.0 and recorded["steps"] == 400
    assert (tmp_path / "h.png").stat().st_size > 0


def test_a_budget_that_is_not_whole_epochs_is_refused(monkeypatch, tmp_path, capsys):
    bench = import_benchmark(monkeypatch, "det_label_headroom")
    monkeypatch.setattr(sys, "argv", ["det_label_headroom.py", "--inits", "random", "--steps", "3100"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "multiple of 200" in capsys.readouterr().err
