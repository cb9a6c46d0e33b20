"""benchmarks/det_continuations.py: runs branched from one checkpoint get the base run's curve before the branch,
their own after it (over resumed parts), and each reference step is paired with the others' values within the
tolerance."""
import json
import sys

import pytest

from helpers import import_benchmark

HEADER = "epoch,step,val_map,val_map50,val_map_student,val_map50_student\n"


def write(path, rows):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.csv").write_text(HEADER + "".join(f"0,{s - 1},{v},{v + 0.2},{v - 0.01},{v + 0.19}\n" for s, v in rows))


def test_branched_runs_inherit_the_base_curve_and_lead_is_measured_per_step(monkeypatch, tmp_path, capsys):
    bench = import_benchmark(monkeypatch, "det_continuations")
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results")
    write(tmp_path / "base", [(200, 0.1), (400, 0.2), (600, 0.25)])
    write(tmp_path / "ref", [(200, 0.1), (400, 0.2), (600, 0.3), (800, 0.31)])
    write(tmp_path / "branch", [(600, 0.33), (815, 0.35)])  # branched at step 400, resumed 15 steps late
    argv = ["det_continuations.py", "--name", "t", "--base", str(tmp_path / "base"), "--tolerance", "15",
            f"ref={tmp_path / 'ref'}", f"branch={tmp_path / 'branch'}"]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    result = json.loads((tmp_path / "results" / "t.json").read_text())
    assert result["runs"]["branch"]["branch_step"] == 600
    assert result["shared_steps"] == [200, 400, 600, 800]
    lead = result["lead_over_reference"]["branch"]
    assert [lead[str(s)]["val_map"] for s in (200, 400, 600, 800)] == pytest.approx([0.0, 0.0, 0.03, 0.04])
    assert "val_map +4.00 points" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", [a for a in argv if a not in ("--tolerance", "15")])
    bench.main()
    assert json.loads((tmp_path / "results" / "t.json").read_text())["shared_steps"] == [200, 400, 600]
