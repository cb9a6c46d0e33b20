"""benchmarks/u2pl_scenes.py --plot draws the val mIoU curves of earlier result files without running anything."""
import json
import sys

from PIL import Image

from helpers import import_benchmark


def fake_result(seed: int) -> dict:
    command = f"ssl-pretrain --recipe {{}} --seed_everything {seed} --data.seed {seed}"
    return {"runs": {f"{m}_125lab_lomar": {"method": m, "command": command.format(m), "curve_steps": [390, 780],
                                           "val_miou_per_epoch": [0.2 + seed / 100, 0.25]}
                     for m in ("seg_supervised", "u2pl")}}


def test_plot_mode_writes_the_png_of_the_named_results_and_runs_nothing(monkeypatch, tmp_path):
    bench = import_benchmark(monkeypatch, "u2pl_scenes")
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    for seed in (0, 1):
        (tmp_path / f"r{seed}.json").write_text(json.dumps(fake_result(seed)))
    monkeypatch.setattr(bench, "run_and_record", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    monkeypatch.setattr(sys, "argv", ["u2pl_scenes.py", "--plot", "r0.json", "r1.json", "--result", "both.json"])
    bench.main()
    with Image.open(tmp_path / "both.png") as png:
        assert png.size[0] > 400 and png.size[1] > 200
    assert not (tmp_path / "both.json").exists()  # only the picture
