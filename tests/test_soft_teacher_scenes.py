"""benchmarks/soft_teacher_scenes.py: a step budget other than the recipes' sets the epochs of both recipes and Soft
Teacher's burn-in, names the runs by it, records finished runs without rerunning them, and refuses budgets it
cannot express."""
import json
import sys

import pytest

from helpers import fake_detection_runs, finished_detection_run, import_benchmark


def test_a_longer_budget_runs_both_recipes_with_its_epochs_and_burn_in(monkeypatch, tmp_path):
    bench = import_benchmark(monkeypatch, "soft_teacher_scenes")
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    runs = tmp_path / "runs"
    finished_detection_run(runs / "det_supervised_600_random_s1", epochs=3, wall_s=600.0)
    commands = fake_detection_runs(monkeypatch, epochs=3)
    monkeypatch.setattr(sys, "argv", ["soft_teacher_scenes.py", "--inits", "random", "--seeds", "1", "--steps", "600",
                                      "--burn_in_steps", "400", "--runs", str(runs), "--result", "d.json"])
    bench.main()
    assert len(commands) == 1  # the supervised run was already finished
    cmd = " ".join(commands[0])
    assert "--recipe soft_teacher" in cmd and "--trainer.max_epochs 3" in cmd and "--model.sup_only_epochs 2" in cmd
    assert "--seed_everything 1 --data.seed 1" in cmd
    result = json.loads((tmp_path / "d.json").read_text())["runs"]
    assert set(result) == {"det_supervised_600_random_s1", "soft_teacher_600_random_s1"}
    supervised = result["det_supervised_600_random_s1"]
    assert supervised["wall_s"] == pytest.approx(600.0, abs=1.0) and supervised["steps"] == 600
    assert "--trainer.max_epochs 3" in supervised["command"] and "sup_only_epochs" not in supervised["command"]
    assert supervised["val_map50_per_epoch"] == [0.2, 0.3, 0.4] and supervised["curve_steps"] == [200, 400, 600]


def test_a_tag_names_runs_whose_overrides_change_the_recipe(monkeypatch, tmp_path):
    bench = import_benchmark(monkeypatch, "soft_teacher_scenes")
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    commands = fake_detection_runs(monkeypatch, epochs=3)
    monkeypatch.setattr(sys, "argv", ["soft_teacher_scenes.py", "--methods", "soft_teacher", "--inits", "random",
                                      "--seeds", "0", "--steps", "600", "--burn_in_steps", "400", "--runs",
                                      str(tmp_path / "runs"), "--result", "d.json", "--tag", "ema999", "--",
                                      "--model.ema_decay", "0.999"])
    bench.main()
    (cmd,) = commands
    assert cmd[-2:] == ["--model.ema_decay", "0.999"] and str(tmp_path / "runs" / "soft_teacher_600_ema999_random_s0") in cmd
    assert set(json.loads((tmp_path / "d.json").read_text())["runs"]) == {"soft_teacher_600_ema999_random_s0"}


def test_the_recipe_budget_keeps_the_recipes_unchanged(monkeypatch, tmp_path):
    bench = import_benchmark(monkeypatch, "soft_teacher_scenes")
    assert bench.budget_args("soft_teacher", bench.RECIPE_STEPS, None) == []
    assert bench.budget_args("det_supervised", 3000, 1800) == ["--trainer.max_epochs", "15"]
    assert bench.budget_args("soft_teacher", 3000, 1800) == ["--trainer.max_epochs", "15", "--model.sup_only_epochs", "9"]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "3000"], "--burn_in_steps"),
    (["--steps", "6100", "--burn_in_steps", "3000"], "multiple of 200"),
    (["--steps", "600", "--burn_in_steps", "600"], "leaves no step"),
])
def test_budgets_it_cannot_express_are_refused(monkeypatch, capsys, argv, message):
    bench = import_benchmark(monkeypatch, "soft_teacher_scenes")
    monkeypatch.setattr(sys, "argv", ["soft_teacher_scenes.py", "--inits", "random", *argv])
    with pytest.raises(SystemExit):
        bench.main()
    assert message in capsys.readouterr().err
