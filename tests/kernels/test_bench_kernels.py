"""`rnndeploy bench kernels`: refuses without a GPU, checks options, writes JSON/CSV/PNG from rows."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from click.testing import CliRunner

from rnndeploy.cli import main, write_kernel_results
from rnndeploy.kernels.benchmark import Row


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_gpu():
    result = CliRunner().invoke(main, ["bench", "kernels", "--cells", "lstm"])
    assert result.exit_code == 1
    assert "needs a CUDA GPU" in result.output


def test_rejects_bad_lists():
    result = CliRunner().invoke(main, ["bench", "kernels", "--batch", "1,x"])
    assert result.exit_code == 2
    assert "comma-separated" in result.output
    result = CliRunner().invoke(main, ["bench", "kernels", "--cells", "lstm,transformer"])
    assert result.exit_code == 2
    assert "'transformer' is not one of" in result.output


def test_results_files(tmp_path):
    rows = [
        Row("lstm", "full", "triton", "bf16", 16, 768, 1024, 2.0, 1.9, 2.1, 100.0, "split"),
        Row("lstm", "full", "cudnn", "bf16", 16, 768, 1024, 5.0, 4.9, 5.2, 120.0, ""),
        Row("lstm", "full", "reference", "bf16", 16, 768, 256, 90.0, 89.0, 91.0, 300.0, ""),
    ]
    env = {"device": "FakeGPU", "commit": "abc"}
    paths = write_kernel_results(rows, env, {"batch": [16]}, tmp_path)
    doc = json.loads(paths[0].read_text())
    assert doc["environment"]["device"] == "FakeGPU" and len(doc["rows"]) == 3
    (s,) = doc["speedups"]
    assert s["speedup"] == pytest.approx(2.5) and s["cudnn_peak_mib"] == 120.0
    with open(paths[1]) as f:
        records = list(csv.DictReader(f))
    assert [r["provider"] for r in records] == ["triton", "cudnn", "reference"]
    assert records[0]["device"] == "FakeGPU"
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
