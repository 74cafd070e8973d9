"""`rnndeploy bench kernels`: refuses without a GPU, checks options, writes JSON/CSV/PNG from rows."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("triton", reason="rnndeploy.bench.kernels times Triton kernels")

from rnndeploy.bench import kernels as benchmark  # noqa: E402
from rnndeploy.bench.kernels import Row, write_results  # noqa: E402
from rnndeploy.cli import main  # noqa: E402


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
    paths = write_results(rows, env, {"batch": [16]}, tmp_path)
    doc = json.loads(paths[0].read_text())
    assert doc["environment"]["device"] == "FakeGPU" and len(doc["rows"]) == 3
    (s,) = doc["speedups"]
    assert s["speedup"] == pytest.approx(2.5) and s["cudnn_peak_mib"] == 120.0
    with open(paths[1]) as f:
        records = list(csv.DictReader(f))
    assert [r["provider"] for r in records] == ["triton", "cudnn", "reference"]
    assert records[0]["device"] == "FakeGPU"
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_case_loses_no_other_number(monkeypatch):
    """One case raising is recorded as a Failure; the cases before and after it are still timed and reported."""

    def fake_case(cell, provider, B, H, T, dtype, training):
        if B == 2:
            raise RuntimeError("out of resources: shared memory")
        return lambda: None

    monkeypatch.setattr(benchmark, "_case", fake_case)
    monkeypatch.setattr(benchmark, "do_bench", lambda fn, quantiles, rep: [1.0, 0.9, 1.1])
    monkeypatch.setattr(benchmark, "_peak_mib", lambda fn: 0.0)
    seen = []
    rows, failures = benchmark.run_benchmark(
        ["lstm"], ["forward"], ["cudnn"], ["fp32"], [1, 2, 3], [8], [4], on_result=seen.append
    )
    assert [r.batch for r in rows] == [1, 3], f"expected batches 1 and 3 timed, got {rows}"
    (f,) = failures
    assert f.batch == 2 and "out of resources" in f.error
    assert [r.batch for r in seen] == [1, 2, 3], "on_result must see every case in order, as it finishes"


def test_cli_writes_a_line_per_case_and_keeps_them_when_interrupted(monkeypatch, tmp_path):
    def fake_run(*args, on_result, **kwargs):
        on_result(Row("lstm", "full", "triton", "bf16", 16, 768, 1024, 2.0, 1.9, 2.1, 100.0, "split"))
        on_result(benchmark.Failure("lstm", "full", "cudnn", "bf16", 16, 768, 1024, "RuntimeError: boom"))
        raise KeyboardInterrupt  # what SIGTERM from `timeout` becomes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(benchmark, "environment", lambda: {"device": "FakeGPU", "commit": "abc"})
    monkeypatch.setattr(benchmark, "run_benchmark", fake_run)
    result = CliRunner().invoke(main, ["bench", "kernels", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (tmp_path / "kernels.jsonl").read_text().splitlines()]
    assert lines[0]["environment"]["device"] == "FakeGPU"
    assert lines[1]["row"]["strategy"] == "split" and lines[2]["failure"]["error"] == "RuntimeError: boom"
    assert "FAILED lstm full cudnn" in result.output
    doc = json.loads((tmp_path / "kernels.json").read_text())
    assert len(doc["rows"]) == 1 and doc["failures"][0]["provider"] == "cudnn"


@pytest.mark.interpreter
def test_headline_check_compares_every_tensor_on_cpu():
    """The GPU session's first stage, at an interpreter-sized shape: every output and gradient is checked."""
    lines = []
    results = benchmark.headline(
        cells=("lstm", "gru"), B=3, T=5, H=8, dtype_name="bf16", echo=lines.append, device="cpu"
    )
    lstm = [r["tensor"] for r in results if r["check"] == "lstm"]
    assert lstm == ["y", "h_T", "c_T", "dx", "dh0", "dc0", "dweight_ih_l0", "dweight_hh_l0", "dbias_ih_l0",
                    "dbias_hh_l0"]  # fmt: skip
    assert len(results) == 10 + 8 and all(r["result"] == "ok" for r in results), results
    assert len(lines) == len(results) and "triton_err=" in lines[0]
