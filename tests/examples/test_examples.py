"""The example scripts run end to end with tiny settings (as subprocesses, the way a user runs them)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(script: str, *args: str) -> str:
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def test_char_lm(tmp_path):
    out = _run(
        "char_lm.py",
        "--steps",
        "20",
        "--hidden",
        "16",
        "--seq-len",
        "16",
        "--batch",
        "4",
        "--eval-every",
        "10",
        "--out-dir",
        str(tmp_path),
    )
    bpc = [float(v) for v in re.findall(r"validation (\d+\.\d+) bits/char", out)]
    assert len(bpc) == 3 and bpc[-1] < bpc[0]
    assert "sample: The " in out and (tmp_path / "model.loss.png").is_file()


def test_forecast_co2(tmp_path):
    pytest.importorskip("statsmodels")
    out = _run(
        "forecast_co2.py", "--steps", "30", "--hidden", "8", "--eval-every", "15", "--out-dir", str(tmp_path)
    )
    rows = dict(re.findall(r"^(GRU 8|seasonal naive)\s+(\d+\.\d+)", out, flags=re.M))
    assert set(rows) == {"GRU 8", "seasonal naive"}
    # the baseline's error is the yearly growth of CO2 (~1.6 ppm in the last test years)
    assert 1.0 < float(rows["seasonal naive"]) < 2.5
    assert (tmp_path / "model.pt").is_file()
