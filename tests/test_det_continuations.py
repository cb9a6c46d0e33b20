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


def test_leads_are_summarised_over_seeds_at_the_last_step_and_over_the_late_steps(monkeypatch, tmp_path, capsys):
    bench = import_benchmark(monkeypatch, "det_continuations")
    monkeypatch.setattr(bench, "RESULTS", tmp_path)

    def result(name, leads):
        lead = {str(step): {m: v for m in bench.METRICS} for step, v in leads.items()}
        (tmp_path / f"{name}.json").write_text(json.dumps({"reference": "sup", "lead_over_reference": {"st": lead}}))

    result("s0", {200: 0.0, 400: 0.01, 600: 0.02})
    result("s1", {200: 0.0, 400: 0.03, 600: 0.00})
    monkeypatch.setattr(sys, "argv", ["det_continuations.py", "--name", "both", "--summarise", "s0", "s1",
                                      "--from_step", "400"])
    bench.main()
    st = json.loads((tmp_path / "both.json").read_text())["runs"]["st"]
    assert st["last_mean"]["val_map"] == pytest.approx(0.01)
    assert st["last_sd"]["val_map"] == pytest.approx(0.02 ** 0.5 / 10, abs=1e-4)  # stdev(0.02, 0.00), kept to 4 places
    assert st["late_mean_mean"]["val_map"] == pytest.approx((0.015 + 0.015) / 2)
    assert st["per_file"]["s1"]["late_steps"] == 2
    assert "val_map last +1.00 ± 1.41" in capsys.readouterr().out
