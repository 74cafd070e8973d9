"""`rnndeploy bench runtime` as a user runs it: a smoke run writes its results under the current directory, never
into the source tree's benchmarks/results."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from rnndeploy.cli import main

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@pytest.mark.slow
def test_bench_runtime_writes_under_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    committed = {
        p.name: p.stat().st_mtime_ns for p in RESULTS.glob("*") if p.stem in ("runtime", "step-graph")
    }
    result = CliRunner().invoke(main, ["bench", "runtime", "--quick", "--no-server"])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "bench-results" / "runtime.json").read_text())
    assert {"lstm-2x256", "gru-1x64", "lstm-2x512"} == {r["model"] for r in written["latency"]}
    assert (tmp_path / "bench-results" / "runtime.png").stat().st_size > 0
    # the one-step graph against the sequence graph, in the same run
    forms = json.loads((tmp_path / "bench-results" / "step-graph.json").read_text())["latency"]
    cases = {(r["model"], r["batch"], r["graph"]) for r in forms}
    for model in ("gru-1x64", "rnn-1x128", "lstm-2x256"):
        for batch in (1, 64):
            for graph in ("seq fp32", "step fp32 fused", "step int8 fused", "step int8 separate"):
                assert (model, batch, graph) in cases, (model, batch, graph)
    assert ("lstm-2x256", 64, "seq int8 (DynamicQuantizeLSTM)") in cases
    assert all(r["vs_seq_fp32"] == 1.0 for r in forms if r["graph"] == "seq fp32")
    assert {
        p.name: p.stat().st_mtime_ns for p in RESULTS.glob("*") if p.stem in ("runtime", "step-graph")
    } == (committed)


@pytest.mark.slow
def test_protocol_floor_benchmark_measures_every_client(tmp_path):
    """benchmarks/bench_protocol_floor.py starts both echo servers, times every client and writes its JSON."""
    import subprocess
    import sys

    script = RESULTS.parent / "bench_protocol_floor.py"
    run = subprocess.run(
        [sys.executable, str(script), "--steps", "30", "--repeats", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads((tmp_path / "protocol-floor.json").read_text())["rows"]
    assert [r["client"] for r in rows] == [
        "HTTP: tritonclient.http infer",
        "gRPC: tritonclient.grpc infer (unary)",
        "gRPC: tritonclient.grpc stream",
        "gRPC: grpc.aio stream",
    ]
    assert all(r["p50_us"] > 0 and r["p99_us"] >= r["p50_us"] for r in rows)
    assert rows[0]["vs_http_p50"] == 1.0
