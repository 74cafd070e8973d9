"""examples/long_lag.py runs end to end with tiny settings (as a subprocess, the way a user runs it)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "long_lag.py"


def test_long_lag_example(tmp_path):
    args = [
        "--T",
        "20",
        "--budget",
        "1000",
        "--hidden",
        "8",
        "--cells",
        "rnn,gru",
        "--out-dir",
        str(tmp_path),
    ]
    run = subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = dict(
        re.findall(r"^\s+(rnn|gru|mean)\s+(?:not solved|baseline|[\d,]+ seq)\s+(\d+\.\d+)", run.stdout, re.M)
    )
    assert set(rows) == {"rnn", "gru", "mean"}
    assert 0.03 < float(rows["mean"]) < 0.05  # always predicting 0.5: about 1/24
    flows = json.loads((tmp_path / "gradflow.json").read_text())["flows"]
    assert [f["label"] for f in flows] == ["RNN", "GRU"] and all(len(f["h_norm"][0]) == 20 for f in flows)
    assert (tmp_path / "gradflow.png").stat().st_size > 0
