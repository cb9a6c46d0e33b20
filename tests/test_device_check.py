"""Issue #20: the prepared accelerator check runs end to end (tiny shapes on the CPU), so the session that is
lent a GPU finds a working script."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"


def test_device_check_smoke_writes_every_figure(tmp_path):
    out = tmp_path / "device_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--seconds", "0.1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = [k for k, v in result.items() if isinstance(v, dict) and "img_per_s" in v]
    assert rows == ["mae_tiny_32px_fp32", "mae_tiny_32px_bf16", "mae_tiny_64px_bf16", "lomar_tiny_64px_bf16"]
    assert all(result[k]["img_per_s"] > 0 and result[k]["peak_memory_mib"] > 0 for k in rows)
    assert result["bf16_over_fp32"] > 0 and result["lomar_over_mae_64px"] > 0
    assert result["compile_rows"] == "skipped: no CUDA"
    assert result["fsdp_2_steps"] == {"ran": False, "reason": "Lightning's FSDP strategy needs CUDA; this machine has none"}


def test_device_check_runs_only_the_parts_asked_for_at_the_batch_given(tmp_path):
    out = tmp_path / "device_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--seconds", "0.1", "--parts", "mae224", "--batch", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {k: v for k, v in result.items() if isinstance(v, dict)}
    assert sorted(rows) == ["mae_tiny_32px_bf16", "mae_tiny_32px_fp32"]
    assert {v["batch"] for v in rows.values()} == {2}
